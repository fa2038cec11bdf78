//! A simulation's complete, validated configuration.

use std::{path::PathBuf, sync::Arc};

use ferry_core::{
    CoreError, Model,
    compress::Compression,
    evaluation::EvaluationSchedule,
    personal::TensorRoles,
    privacy::{DpSettings, Placement, mechanism::Privacy, noise::NoiseSeed},
    robust::RobustRule,
    strategy::{Strategy, StrategyName, StrategyParams},
    task::LocalTraining,
};
use ferry_ml::{
    data::{DatasetKind, partition::Partitioner},
    models::ModelKind,
    params,
};
use serde::{Serialize, Serializer};

use ferry_engine::{
    EngineError,
    federation::RunSettings,
    secure::{SecAggSettings, SecureAggregation},
};

use ferry_core::cross_site::CrossSiteModels;

use crate::{SimError, attack::AttackSettings, fleet::FleetSettings};

/// Everything that determines a simulated run (recorded in `history.json`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SimConfig {
    /// Which dataset to split across nodes.
    pub dataset: DatasetKind,
    /// Where to look for it first.
    pub data_dir: Option<PathBuf>,
    /// The network to train.
    pub model: ModelKind,
    /// A model file to start from instead of the network initialised from the seed.
    pub initial_model: Option<PathBuf>,
    /// Patterns naming the model's tensors that stay on each node (personalisation, as
    /// FedBN keeps BatchNorm local); only for a model of the user's own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub personal: Vec<String>,
    /// Patterns naming the model's frozen tensors: sent to nodes with the model, never
    /// trained, uploaded or averaged (FFA-LoRA's shared A, a pinned base); only for a model of
    /// the user's own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub frozen: Vec<String>,
    /// Number of virtual nodes.
    pub clients: usize,
    /// Fraction of nodes selected per round.
    pub fraction: f64,
    /// Fewest nodes per round.
    pub min_clients: usize,
    /// Rounds to run at most.
    pub rounds: u32,
    /// Local training settings.
    #[serde(flatten)]
    pub training: LocalTraining,
    /// How the training set is split.
    #[serde(serialize_with = "as_text")]
    pub partition: Partitioner,
    /// The federated strategy.
    pub strategy: StrategyName,
    /// The strategy's hyper-parameters.
    #[serde(flatten)]
    pub strategy_params: StrategyParams,
    /// Seed of everything random: initial model, partition, selection, shuffling.
    pub seed: u64,
    /// Stop when the global model reaches this accuracy.
    pub target_accuracy: Option<f64>,
    /// Federated evaluation after every this many rounds (0 never); unset: every round for a
    /// run without a central test set, never otherwise.
    pub evaluate_every: Option<u32>,
    /// Federated evaluation: share of the nodes asked each time.
    pub evaluate_fraction: f64,
    /// Built-in virtual nodes under federated evaluation: share of each node's examples held
    /// out of training to evaluate on.
    pub evaluate_holdout: f64,
    /// Nodes trained at once (does not change results).
    pub threads: usize,
    /// Differential privacy, when the run is private.
    pub dp: Option<DpSettings>,
    /// A robust rule in place of the weighted mean.
    pub aggregator: Option<RobustRule>,
    /// Clip each update to this L2 norm before aggregating.
    pub norm_bound: Option<f64>,
    /// A simulated attack by some of the nodes.
    pub attack: Option<AttackSettings>,
    /// Secure aggregation: the server learns only each round's sum.
    pub secagg: Option<SecAggSettings>,
    /// Synchronous or asynchronous aggregation, simulated devices, compression.
    #[serde(flatten)]
    pub fleet: FleetSettings,
    /// The cross-site validation matrix at the end of the run: the global model, or also
    /// each site's fine-tuned model, on every site's held-out data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cross_site: Option<CrossSiteModels>,
}

fn as_text<S: Serializer>(p: &Partitioner, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(p)
}

impl SimConfig {
    /// The model the run starts from: the `initial_model` file when set (for virtual nodes,
    /// which train built-in networks, it must be a `model` network, for example a finished
    /// run's `model.safetensors`), else the network initialised from the seed.
    pub fn initial(&self) -> Result<Model, SimError> {
        if !self.personal.is_empty() || !self.frozen.is_empty() {
            return Err(SimError::InitialModel(
                "personal and frozen tensors are for nodes that train a model of your own; \
                 built-in virtual nodes train every tensor, so use --personal and --frozen with \
                 --trainer-cmd"
                    .into(),
            ));
        }
        let fresh = params::init_model(self.model, self.seed)?;
        let Some(path) = &self.initial_model else {
            return Ok(fresh);
        };
        let loaded = params::load_model_file(path)?;
        fresh.check_same_layout(loaded.layout()).map_err(|e| {
            SimError::InitialModel(format!(
                "{} is not a {} network ({e}); virtual nodes train built-in networks, so start \
                 from a {} model file or drop initial-model",
                path.display(),
                self.model,
                self.model
            ))
        })?;
        Ok(loaded)
    }

    /// The run's strategy for `fleet_size` nodes, with its privacy, robust rule and norm bound;
    /// `noise` says where DP noise comes from (the run seed in simulation, the OS in
    /// deployment).
    pub fn strategy(&self, fleet_size: usize, noise: NoiseSeed) -> Result<Strategy, CoreError> {
        let mut strategy = Strategy::new(self.strategy, &self.strategy_params, fleet_size);
        if let Some(dp) = self.dp {
            strategy = strategy.with_privacy(Privacy::new(dp, noise)?)?;
        }
        if let Some(rule) = self.aggregator {
            strategy = strategy.with_robust_rule(rule)?;
        }
        if let Some(bound) = self.norm_bound {
            strategy = strategy.with_norm_bound(bound)?;
        }
        Ok(strategy)
    }

    /// The run's secure aggregation for `strategy`, or `None` without it; `largest_node` is
    /// the default weight cap. Refuses strategies and settings it cannot serve.
    pub fn secure(
        &self,
        strategy: &Strategy,
        largest_node: u64,
    ) -> Result<Option<SecureAggregation>, EngineError> {
        let cohort = match &self.dp {
            // Poisson sampling: rounds hold q * N nodes on average.
            Some(_) => ((self.fraction * self.clients as f64).round() as usize).max(1),
            None => {
                ferry_engine::selection::cohort_size(self.clients, self.fraction, self.min_clients)
            }
        };
        self.secagg
            .map(|s| s.resolve(strategy, cohort, largest_node))
            .transpose()
    }

    /// The run's personal and frozen tensors.
    pub fn personal_tensors(&self) -> Result<TensorRoles, CoreError> {
        TensorRoles::of(self.personal.clone(), self.frozen.clone())
    }

    /// When the run evaluates federatedly; `central` says whether it also has a central test
    /// set (without one, federated evaluation runs every round unless configured otherwise).
    /// A run with a cross-site matrix evaluates at least after its last round, on every node:
    /// the matrix's global row is that evaluation.
    pub fn evaluation(&self, central: bool) -> EvaluationSchedule {
        let every = self.evaluate_every.unwrap_or(if central { 0 } else { 1 });
        match self.cross_site {
            Some(_) => EvaluationSchedule {
                every: if every == 0 { u32::MAX } else { every },
                fraction: 1.0,
            },
            None => EvaluationSchedule {
                every,
                fraction: self.evaluate_fraction,
            },
        }
    }

    /// The round engine's settings for this run, with `secure` aggregation when it has it and
    /// federated evaluation as `evaluation` says; simulated devices are read or drawn here.
    pub fn run_settings(
        &self,
        secure: Option<SecureAggregation>,
        evaluation: EvaluationSchedule,
    ) -> Result<RunSettings, SimError> {
        Ok(RunSettings {
            rounds: self.rounds,
            fraction: self.fraction,
            min_clients: self.min_clients,
            target_accuracy: self.target_accuracy,
            training: self.training.clone(),
            seed: self.seed,
            parallelism: self.threads,
            secure,
            evaluation,
            mode: self.fleet.mode(),
            devices: self.fleet.devices(self.clients, self.seed)?.map(Arc::new),
            compress: self.fleet.compress,
        })
    }

    /// Refuses a compression that would break the run's guarantees, with the reason: SecAgg+
    /// and distributed differential privacy. (Central differential privacy composes: the
    /// server clips each decoded update, so the noise's sensitivity holds.)
    pub fn check_compression(&self) -> Result<(), SimError> {
        let name = self.fleet.compress;
        if name == Compression::None {
            return Ok(());
        }
        if self.secagg.is_some() {
            return Err(SimError::Devices(format!(
                "compress = {name} cannot be used with SecAgg+: masked inputs are fixed-point \
                 integers modulo 2^k under masks that cover every coordinate, so rounding or \
                 sparsifying them before masking breaks the encoding and saves nothing after; \
                 shrink SecAgg+'s own encoding with secagg-modulus-bits instead"
            )));
        }
        if self
            .dp
            .is_some_and(|dp| dp.placement == Placement::Distributed)
        {
            return Err(SimError::Devices(format!(
                "compress = {name} cannot be used with distributed differential privacy: each \
                 node's noise share is sized so that the exact sum of the shares carries the \
                 run's noise, and compressing each noised update (top-k's error feedback adds \
                 earlier rounds' values) changes that sum; use dp-placement = central, where the \
                 server clips each decoded update"
            )));
        }
        Ok(())
    }

    /// Local epochs a node trains over the whole run on average: what the central and
    /// local-only baselines get, for a like-for-like comparison.
    pub fn epochs_per_node(&self, rounds_run: u32) -> u32 {
        let cohort =
            ferry_engine::selection::cohort_size(self.clients, self.fraction, self.min_clients);
        let share = cohort as f64 / self.clients as f64;
        ((f64::from(rounds_run) * f64::from(self.training.epochs) * share).ceil() as u32).max(1)
    }
}
