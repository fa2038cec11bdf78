//! Preparing and running a simulated federation.

use std::sync::Arc;

use ferry_core::{Model, privacy::noise::NoiseSeed};
use ferry_engine::{
    federation::{Federation, RoundObserver, RunOutcome},
    node::NodeHandle,
};
use ferry_ml::data::{NUM_CLASSES, partition::Partition};

use crate::{
    SimConfig, SimError,
    attack::{self, ModelPoisoner},
    evaluator::TestSetEvaluator,
    node::VirtualNode,
};

/// A prepared simulation: data split across virtual nodes and the initial model.
pub struct Simulation {
    config: SimConfig,
    nodes: Vec<Arc<VirtualNode>>,
    evaluator: Arc<TestSetEvaluator>,
    initial: Model,
    partition: Partition,
    train_labels: Vec<u8>,
    attackers: Vec<u32>,
}

impl Simulation {
    /// Loads the dataset, partitions it and initialises the model, all from `config.seed`.
    pub fn prepare(config: SimConfig) -> Result<Self, SimError> {
        let data = config.dataset.load(config.data_dir.as_deref())?;
        if data.test.is_empty() {
            return Err(ferry_ml::MlError::BadSpec(format!(
                "{} has no test set to evaluate the global model on; add test.csv to its folder",
                config.dataset
            ))
            .into());
        }
        let partition = config
            .partition
            .split(&data.train.labels, config.clients, config.seed)?;
        let train_labels = data.train.labels.clone();
        let attackers = match &config.attack {
            Some(a) => attack::pick_attackers(
                config.clients,
                a.attackers.count(config.clients)?,
                config.seed,
            ),
            None => Vec::new(),
        };
        let train = Arc::new(data.train);
        let holdout = (config.evaluation(true).every > 0).then_some(config.evaluate_holdout);
        let nodes = partition
            .parts
            .iter()
            .zip(&partition.noise_std)
            .enumerate()
            .map(|(i, (indices, &noise))| {
                let id = i as u32;
                let poison = config
                    .attack
                    .filter(|a| a.kind.poisons_data() && attackers.contains(&id));
                let node = match poison {
                    // A data-poisoning attacker trains on its own corrupted copy.
                    Some(a) => {
                        let seed = ferry_core::seed::mix_seed(config.seed, u64::from(id));
                        let own = attack::poison_data(&train, indices, &a, seed);
                        let all = (0..own.len()).collect();
                        VirtualNode::new(id, config.model, Arc::new(own), all, noise)
                    }
                    None => {
                        VirtualNode::new(id, config.model, train.clone(), indices.clone(), noise)
                    }
                };
                Arc::new(match holdout {
                    Some(share) => node.holding_out(share, config.seed),
                    None => node,
                })
            })
            .collect();
        let mut evaluator = TestSetEvaluator::new(
            config.model,
            Arc::new(data.test.clone()),
            &partition.noise_std,
            config.seed,
        );
        if let Some(a) = config
            .attack
            .filter(|a| a.kind == attack::AttackKind::Backdoor)
        {
            evaluator = evaluator.with_backdoor(attack::triggered_test_set(&data.test, a.target));
        }
        let evaluator = Arc::new(evaluator);
        let initial = config.initial()?;
        Ok(Self {
            config,
            nodes,
            evaluator,
            initial,
            partition,
            train_labels,
            attackers,
        })
    }

    /// The attacking nodes, drawn from the seed (empty without an attack).
    pub fn attackers(&self) -> &[u32] {
        &self.attackers
    }

    /// The configuration.
    pub fn config(&self) -> &SimConfig {
        &self.config
    }

    /// Each node's examples per class, in node order: what the split looks like.
    pub fn node_classes(&self) -> Vec<[usize; NUM_CLASSES]> {
        self.partition
            .parts
            .iter()
            .map(|part| {
                let mut counts = [0; NUM_CLASSES];
                for &i in part {
                    counts[usize::from(self.train_labels[i])] += 1;
                }
                counts
            })
            .collect()
    }

    /// The initial global model.
    pub fn initial_model(&self) -> &Model {
        &self.initial
    }

    /// The virtual nodes.
    pub fn nodes(&self) -> &[Arc<VirtualNode>] {
        &self.nodes
    }

    /// The central test-set evaluator.
    pub fn evaluator(&self) -> &TestSetEvaluator {
        &self.evaluator
    }

    /// Runs the federation, reporting progress to `observer`.
    pub fn run(&self, observer: &mut dyn RoundObserver) -> Result<RunOutcome, SimError> {
        let c = &self.config;
        // Simulated DP noise comes from the run seed, so a private run repeats exactly.
        let strategy = c.strategy(self.nodes.len(), NoiseSeed::Run(c.seed))?;
        let largest_node = self.partition.parts.iter().map(Vec::len).max().unwrap_or(1);
        let secure = c.secure(&strategy, largest_node as u64)?;
        let settings = c.run_settings(secure, c.evaluation(true))?;
        let nodes = self
            .nodes
            .iter()
            .map(|n| n.clone() as Arc<dyn NodeHandle>)
            .collect();
        let evaluator = Box::new(SharedEvaluator(self.evaluator.clone()));
        let mut federation =
            Federation::new(settings, strategy, nodes, evaluator, self.initial.clone())?;
        if let Some(a) = c.attack.filter(|a| !a.kind.poisons_data()) {
            federation =
                federation.with_adversary(Box::new(ModelPoisoner::new(a, &self.attackers, c.seed)));
        }
        Ok(federation.run(observer)?)
    }
}

/// Lends the simulation's evaluator to the engine while keeping it for baselines.
struct SharedEvaluator(Arc<TestSetEvaluator>);

impl ferry_engine::node::Evaluator for SharedEvaluator {
    fn evaluate(&self, model: &Model) -> Result<ferry_engine::node::Score, String> {
        self.0.evaluate(model)
    }

    fn attack_success_rate(&self, model: &Model) -> Result<Option<f64>, String> {
        self.0.attack_success_rate(model)
    }
}
