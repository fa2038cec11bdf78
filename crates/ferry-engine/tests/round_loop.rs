//! The round loop with scripted nodes: aggregation, selection, failures, stopping, ordering.

use std::{collections::BTreeMap, sync::Arc};

use ferry_core::{
    Model, ModelLayout, TensorSpec, Update,
    evaluation::{EvaluationSchedule, NodeEvaluation},
    strategy::{Strategy, StrategyName, StrategyParams},
    task::LocalTraining,
};
use ferry_engine::{
    EngineError,
    federation::{Federation, RoundObserver, RunSettings, StopReason},
    node::{EvaluateTask, Evaluator, NodeError, NodeHandle, NodeId, RoundTask, Score},
    record::RoundRecord,
    secure::SecAggSettings,
};

/// A node that moves the model halfway towards its own target, or fails.
struct ScriptedNode {
    id: NodeId,
    target: Vec<f32>,
    examples: u64,
    fail: bool,
}

impl NodeHandle for ScriptedNode {
    fn id(&self) -> NodeId {
        self.id
    }

    fn train(&self, task: &RoundTask) -> Result<Update, NodeError> {
        if self.fail {
            return Err(NodeError {
                node: self.id,
                reason: "disk on fire".into(),
            });
        }
        // Vary the delta with the round seed so that summation order would show in the bits.
        let jitter = (task.seed % 1000) as f32 * 1e-7 + self.id as f32 * 1e-3;
        let delta = task
            .model
            .values()
            .iter()
            .zip(&self.target)
            .map(|(m, t)| (t - m) * 0.5 + jitter)
            .collect();
        let mut update = Update::new(delta, self.examples);
        update.metrics = BTreeMap::from([("train_loss".into(), 1.0)]);
        Ok(update)
    }

    /// Scores the model by its distance from the target, each node a little worse than the
    /// one before, on `10 × examples` held-out examples.
    fn evaluate(&self, task: &EvaluateTask) -> Result<NodeEvaluation, NodeError> {
        if self.fail {
            return Err(NodeError {
                node: self.id,
                reason: "no held-out data".into(),
            });
        }
        let d = f64::from((task.model.values()[0] - self.target[0]).abs());
        Ok(NodeEvaluation {
            num_examples: self.examples * 10,
            loss: d,
            accuracy: (1.0 - d - 0.05 * f64::from(self.id)).clamp(0.0, 1.0),
            metrics: BTreeMap::new(),
        })
    }
}

/// Accuracy rises as the first parameter approaches 1.
struct DistanceEvaluator;

impl Evaluator for DistanceEvaluator {
    fn evaluate(&self, model: &Model) -> Result<Score, String> {
        let d = f64::from((model.values()[0] - 1.0).abs());
        Ok(Score {
            loss: d,
            accuracy: (1.0 - d).clamp(0.0, 1.0),
            ..Score::default()
        })
    }
}

fn model() -> Model {
    let layout = ModelLayout::new(vec![TensorSpec {
        name: "w".into(),
        shape: vec![3],
        dtype: ferry_core::TensorDtype::F32,
    }])
    .expect("layout");
    Model::new(Arc::new(layout), vec![0.0; 3]).expect("model")
}

fn settings(rounds: u32, parallelism: usize) -> RunSettings {
    RunSettings {
        rounds,
        fraction: 1.0,
        min_clients: 1,
        target_accuracy: None,
        training: LocalTraining {
            epochs: 1,
            batch_size: 1,
            lr: 0.1,
            momentum: 0.0,
            weight_decay: 0.0,
        },
        seed: 3,
        parallelism,
        secure: None,
        mode: Default::default(),
        devices: None,
        compress: Default::default(),
        evaluation: EvaluationSchedule::OFF,
    }
}

fn nodes(count: u32, failing: &[u32]) -> Vec<Arc<dyn NodeHandle>> {
    (0..count)
        .map(|id| {
            Arc::new(ScriptedNode {
                id,
                target: vec![1.0, 2.0, 3.0],
                examples: u64::from(id) + 1,
                fail: failing.contains(&id),
            }) as Arc<dyn NodeHandle>
        })
        .collect()
}

#[derive(Default)]
struct Recorder {
    started: Vec<(u32, usize)>,
    returned: usize,
    finished: Vec<RoundRecord>,
}

impl RoundObserver for Recorder {
    fn round_started(&mut self, round: u32, selected: usize) {
        self.started.push((round, selected));
    }
    fn node_returned(&mut self, _round: u32) {
        self.returned += 1;
    }
    fn round_finished(&mut self, record: &RoundRecord) {
        self.finished.push(record.clone());
    }
}

/// Scores nothing, like a run of a user's model without a central test set.
struct NoTestSet;

impl Evaluator for NoTestSet {
    fn evaluate(&self, _model: &Model) -> Result<Score, String> {
        Ok(Score::unevaluated())
    }
}

fn run(
    settings: RunSettings,
    nodes: Vec<Arc<dyn NodeHandle>>,
) -> (
    Result<ferry_engine::federation::RunOutcome, EngineError>,
    Recorder,
) {
    run_with(settings, nodes, Box::new(DistanceEvaluator))
}

fn run_with(
    settings: RunSettings,
    nodes: Vec<Arc<dyn NodeHandle>>,
    evaluator: Box<dyn Evaluator>,
) -> (
    Result<ferry_engine::federation::RunOutcome, EngineError>,
    Recorder,
) {
    let mut recorder = Recorder::default();
    let fed = Federation::new(
        settings,
        Strategy::new(StrategyName::FedAvg, &StrategyParams::default(), 3),
        nodes,
        evaluator,
        model(),
    );
    let out = fed.and_then(|f| f.run(&mut recorder));
    (out, recorder)
}

#[test]
fn fedavg_converges_and_records_every_round() {
    let (out, rec) = run(settings(6, 2), nodes(5, &[]));
    let out = out.expect("runs");
    assert_eq!(out.rounds.len(), 6);
    assert_eq!(out.stop, StopReason::RoundsCompleted);
    assert!(out.rounds[5].accuracy > out.rounds[0].accuracy);
    assert!(
        (out.model.values()[2] - 3.0).abs() < 0.2,
        "{:?}",
        out.model.values()
    );
    assert_eq!(rec.started, (1..=6).map(|r| (r, 5)).collect::<Vec<_>>());
    assert_eq!(rec.returned, 30);
    let first = &out.rounds[0];
    assert_eq!(first.participants, 5);
    assert_eq!(first.bytes_down, 5 * 3 * 4);
    assert_eq!(first.bytes_up, 5 * 3 * 4);
    assert_eq!(rec.finished, out.rounds);
}

#[test]
fn same_model_bits_on_any_number_of_threads() {
    let a = run(settings(4, 1), nodes(9, &[])).0.expect("runs").model;
    let b = run(settings(4, 4), nodes(9, &[])).0.expect("runs").model;
    let c = run(settings(4, 9), nodes(9, &[])).0.expect("runs").model;
    assert_eq!(a.sha256().expect("hash"), b.sha256().expect("hash"));
    assert_eq!(a.sha256().expect("hash"), c.sha256().expect("hash"));
}

#[test]
fn failed_nodes_are_counted_and_the_round_goes_on() {
    let (out, _) = run(settings(2, 2), nodes(4, &[1, 3]));
    let out = out.expect("runs");
    assert_eq!(out.rounds[0].participants, 2);
    assert_eq!(out.rounds[0].failures, 2);
}

#[test]
fn a_round_with_no_usable_update_is_an_error_naming_the_cause() {
    let (out, _) = run(settings(2, 2), nodes(2, &[0, 1]));
    let err = out.expect_err("nothing to aggregate").to_string();
    assert!(err.contains("disk on fire"), "{err}");
}

#[test]
fn stops_at_target_accuracy() {
    let mut s = settings(50, 2);
    s.target_accuracy = Some(0.9);
    let out = run(s, nodes(3, &[])).0.expect("runs");
    assert_eq!(out.stop, StopReason::TargetReached);
    assert!(out.rounds.len() < 50);
    assert!(out.rounds.last().is_some_and(|r| r.accuracy >= 0.9));
}

#[test]
fn federated_evaluation_runs_on_schedule_and_records_the_spread() {
    let mut s = settings(5, 2);
    s.evaluation = EvaluationSchedule::checked(2, 0.5).expect("valid");
    let out = run(s, nodes(6, &[4])).0.expect("runs");
    let evaluated: Vec<u32> = out
        .rounds
        .iter()
        .filter(|r| r.federated.is_some())
        .map(|r| r.round)
        .collect();
    assert_eq!(evaluated, [2, 4, 5], "every 2 rounds and the last");
    let (early, late) = (
        out.rounds[1].federated.clone().expect("round 2"),
        out.rounds[4].federated.clone().expect("round 5"),
    );
    assert!(late.accuracy > early.accuracy, "{early:?} -> {late:?}");
    // Half of six nodes asked each time; node 4 has no held-out data whenever it is drawn.
    assert_eq!(late.nodes + late.failures, 3);
    assert!(
        late.accuracy_min < late.accuracy_max,
        "nodes differ: {late:?}"
    );
    assert!(late.accuracy_min <= late.accuracy_median && late.accuracy_median <= late.accuracy_max);
    assert!(out.rounds[0].federated.is_none());
}

#[test]
fn without_a_test_set_the_target_is_reached_by_federated_evaluation() {
    let mut s = settings(50, 2);
    s.target_accuracy = Some(0.9);
    s.evaluation = EvaluationSchedule::checked(1, 1.0).expect("valid");
    let out = run_with(s, nodes(1, &[]), Box::new(NoTestSet))
        .0
        .expect("runs");
    assert_eq!(out.stop, StopReason::TargetReached);
    let last = out.rounds.last().expect("rounds");
    assert!(last.accuracy.is_nan(), "no central score");
    assert!(last.federated.as_ref().is_some_and(|f| f.accuracy >= 0.9));
    assert!(out.best_accuracy() >= 0.9);
}

#[test]
fn fraction_selects_a_subset_each_round() {
    let mut s = settings(3, 2);
    s.fraction = 0.3;
    let (out, rec) = run(s, nodes(10, &[]));
    out.expect("runs");
    assert!(rec.started.iter().all(|&(_, n)| n == 3));
}

#[test]
fn impossible_settings_are_refused() {
    let mut s = settings(1, 1);
    s.min_clients = 11;
    assert!(matches!(
        run(s, nodes(10, &[])).0,
        Err(EngineError::Settings(_))
    ));
    let mut s = settings(1, 1);
    s.fraction = 1.5;
    let err = run(s, nodes(10, &[]))
        .0
        .expect_err("bad fraction")
        .to_string();
    assert!(err.contains("1.5"), "{err}");
}

/// Settings with secure aggregation over neighbourhoods of 4 (threshold 3).
fn secure_settings(rounds: u32, nodes: usize) -> RunSettings {
    let strategy = Strategy::new(StrategyName::FedAvg, &StrategyParams::default(), nodes);
    let secagg = SecAggSettings {
        neighbours: 4,
        ..SecAggSettings::default()
    };
    RunSettings {
        secure: Some(secagg.resolve(&strategy, nodes, 10).expect("valid")),
        ..settings(rounds, 2)
    }
}

#[test]
fn a_secure_run_reaches_the_plain_fedavg_model_within_the_quantisation_error() {
    let plain = run(settings(3, 2), nodes(8, &[])).0.expect("runs");
    let (secure, rec) = run(secure_settings(3, 8), nodes(8, &[]));
    let secure = secure.expect("runs");
    for (a, b) in plain.model.values().iter().zip(secure.model.values()) {
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    }
    let first = &secure.rounds[0];
    assert_eq!(first.participants, 8);
    assert_eq!(first.aborted, None);
    // Keys, sealed shares, masked inputs (model + weight slot) and revealed shares go up.
    assert!(first.bytes_up > 8 * 4 * 4, "{}", first.bytes_up);
    assert_eq!(rec.returned, 24);
}

#[test]
fn a_secure_round_leaves_out_nodes_that_failed_before_masking() {
    // Each node keeps at least 3 of its 4 neighbours: the threshold holds.
    let (out, _) = run(secure_settings(2, 8), nodes(8, &[5]));
    let out = out.expect("runs");
    assert_eq!(out.rounds[0].participants, 7, "{:?}", out.rounds[0].aborted);
    assert_eq!(out.rounds[0].failures, 1);
    assert!(out.rounds[1].accuracy > out.rounds[0].accuracy);
}

#[test]
fn a_secure_round_that_loses_too_many_nodes_aborts_and_the_run_goes_on() {
    // Five of eight fail: the survivors' neighbourhoods fall below the threshold of 3.
    let (out, _) = run(secure_settings(2, 8), nodes(8, &[0, 1, 2, 3, 4]));
    let out = out.expect("the run survives an aborted round");
    assert_eq!(out.rounds.len(), 2);
    let first = &out.rounds[0];
    assert_eq!(first.participants, 0);
    assert!(
        first
            .aborted
            .as_deref()
            .is_some_and(|r| r.contains("threshold")),
        "{first:?}"
    );
    assert_eq!(
        out.model.values(),
        model().values(),
        "no round moved the model"
    );
}

#[test]
fn secure_aggregation_refuses_strategies_that_need_each_update() {
    for name in [
        StrategyName::Scaffold,
        StrategyName::FedNova,
        StrategyName::QFedAvg,
    ] {
        let strategy = Strategy::new(name, &StrategyParams::default(), 8);
        let err = SecAggSettings::default()
            .resolve(&strategy, 8, 10)
            .expect_err("refused");
        assert!(err.to_string().contains("secure aggregation"), "{err}");
    }
}
