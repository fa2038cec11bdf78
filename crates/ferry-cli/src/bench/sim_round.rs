//! `ferry bench sim-round`: simulated FedAvg rounds of N in-process nodes that return an
//! update without training, so that a round's cost is the engine's own (task hand-out, threads,
//! ordered folding, the server step); the workload a simulation framework's no-op round
//! measures.

use std::sync::Arc;

use anyhow::Result;
use clap::Args;
use ferry_core::{
    Model, ModelLayout, TensorSpec, Update,
    evaluation::{EvaluationSchedule, NodeEvaluation},
    strategy::{Strategy, StrategyName, StrategyParams},
};
use ferry_engine::{
    federation::{Federation, RoundObserver, RunSettings},
    node::{EvaluateTask, Evaluator, NodeError, NodeHandle, NodeId, RoundTask, Score},
};

use super::peak_rss_bytes;

/// Options of `ferry bench sim-round`.
#[derive(Args, Debug)]
pub struct SimRoundArgs {
    /// Simulated nodes, every one selected each round.
    #[arg(long, default_value_t = 100)]
    pub nodes: usize,
    /// Model parameters (one f32 tensor).
    #[arg(long, default_value_t = 1_000_000)]
    pub params: usize,
    /// Rounds; the time per round is the mean of those after the first.
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// Also print the figures as one JSON line, for scripts (benchmarks/peers/flower).
    #[arg(long)]
    pub json: bool,
}

/// A node that answers every round with an update of the model's size at once.
struct NoOpNode(NodeId);

impl NodeHandle for NoOpNode {
    fn id(&self) -> NodeId {
        self.0
    }

    fn train(&self, task: &RoundTask) -> Result<Update, NodeError> {
        Ok(Update::new(vec![0.0; task.model.num_params()], 1))
    }

    fn evaluate(&self, _task: &EvaluateTask) -> Result<NodeEvaluation, NodeError> {
        Err(NodeError {
            node: self.0,
            reason: "the no-op round benchmark does not evaluate".into(),
        })
    }
}

/// No central test set: the rounds are not scored.
struct Unscored;

impl Evaluator for Unscored {
    fn evaluate(&self, _model: &Model) -> Result<Score, String> {
        Ok(Score::unevaluated())
    }
}

/// Shows nothing: the figures are printed at the end.
struct Quiet;

impl RoundObserver for Quiet {}

/// Runs the benchmark.
pub fn run(args: SimRoundArgs) -> Result<()> {
    anyhow::ensure!(
        args.nodes >= 1 && args.params >= 1 && args.rounds >= 2,
        "--nodes and --params must be at least 1, --rounds at least 2"
    );
    let layout = ModelLayout::new(vec![TensorSpec::f32("weights", vec![args.params])])?;
    let initial = Model::new(Arc::new(layout), vec![0.01; args.params])?;
    let nodes: Vec<Arc<dyn NodeHandle>> = (0..args.nodes)
        .map(|i| Arc::new(NoOpNode(i as NodeId)) as Arc<dyn NodeHandle>)
        .collect();
    let settings = RunSettings {
        rounds: args.rounds,
        fraction: 1.0,
        min_clients: args.nodes,
        target_accuracy: None,
        training: super::no_training(),
        seed: 0,
        parallelism: std::thread::available_parallelism().map_or(1, usize::from),
        secure: None,
        evaluation: EvaluationSchedule::OFF,
        mode: Default::default(),
        devices: None,
        compress: Default::default(),
    };
    let strategy = Strategy::new(StrategyName::FedAvg, &StrategyParams::default(), args.nodes);
    let federation = Federation::new(settings, strategy, nodes, Box::new(Unscored), initial)?;
    let outcome = federation.run(&mut Quiet)?;
    let later: Vec<f64> = outcome.rounds.iter().skip(1).map(|r| r.wall_s).collect();
    let round_s = later.iter().sum::<f64>() / later.len() as f64;
    let model_mb = args.params as f64 * 4.0 / 1e6;
    let peak = peak_rss_bytes();
    println!(
        "simulated FedAvg rounds, {} in-process nodes x {} parameters ({model_mb:.1} MB), no-op \
         training",
        args.nodes, args.params
    );
    println!(
        "time per round      {round_s:.3} s (mean of rounds 2-{}; first {:.3} s)",
        args.rounds,
        outcome.rounds.first().map_or(0.0, |r| r.wall_s)
    );
    if let Some(p) = peak {
        println!(
            "peak RSS            {:.1} MB = {:.1} model sizes (the whole simulation)",
            p as f64 / 1e6,
            p as f64 / (model_mb * 1e6)
        );
    }
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "system": "ferry",
                "nodes": args.nodes,
                "params": args.params,
                "round_s": round_s,
                "peak_rss_mb": peak.map(|b| b as f64 / 1e6),
            })
        );
    }
    Ok(())
}
