//! The non-federated baselines a federated result should be judged against.
//!
//! - **Central**: one model trained on the pooled training data (what federated learning tries
//!   to match without moving data).
//! - **Local only**: each node trains alone on its own data (what a node gets by not joining).
//!
//! Both train for as many epochs as a node sees over the federated run, from the same initial
//! model, and are scored on the same test set. Where nodes hold data out for federated
//! evaluation, each local-only model is also scored on its own node's held-out examples, the
//! data the federated model's per-site accuracy comes from, so that each site's gain from
//! joining can be told ([`ferry_core::fairness::LocalGain`]).

use std::collections::BTreeMap;

use ferry_core::seed::mix_seed;
use ferry_engine::{dispatch, node::NodeHandle};
use ferry_ml::train::{Evaluation, LocalData, LocalProcedure, train_local};

use crate::{SimError, Simulation};

/// Baseline results beside a federated run.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Baselines {
    /// Epochs each baseline trained.
    pub epochs: u32,
    /// Accuracy of central training on the pooled data.
    pub central_accuracy: f64,
    /// Loss of central training on the pooled data.
    pub central_loss: f64,
    /// Mean accuracy of the nodes' local-only models.
    pub local_mean_accuracy: f64,
    /// Worst node's local-only accuracy.
    pub local_worst_accuracy: f64,
    /// Every node's local-only accuracy, in node order.
    pub local_accuracies: Vec<f64>,
    /// Each node's local-only accuracy on its own held-out examples, by node id (empty when
    /// nodes hold nothing out).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub local_site_accuracies: BTreeMap<String, f64>,
}

/// Trains the central and local-only baselines for `epochs` epochs each, the central model
/// alongside the nodes' on the same worker threads; `finished` is called as each of the
/// `nodes + 1` models is done.
pub fn run(
    sim: &Simulation,
    epochs: u32,
    mut finished: impl FnMut(),
) -> Result<Baselines, SimError> {
    let cfg = sim.config();
    let mut training = cfg.training.clone();
    training.epochs = epochs;
    let nodes = sim.nodes();
    let pooled: Vec<usize> = nodes
        .iter()
        .flat_map(|n| n.data().indices.iter().copied())
        .collect();
    let first = nodes.first().map(|n| n.data()).ok_or_else(no_nodes)?;
    let central_data = LocalData {
        indices: &pooled,
        noise_std: 0.0,
        ..first
    };
    let seed = mix_seed(cfg.seed, u64::MAX);
    // Job 0 is central training on the pooled data; job i > 0 is node i - 1 alone.
    let mut results: Vec<Result<Scores, SimError>> = Vec::with_capacity(nodes.len() + 1);
    dispatch::run_ordered(
        nodes.len() + 1,
        cfg.threads,
        |job| -> Result<Scores, SimError> {
            let data = if job == 0 {
                central_data
            } else {
                nodes[job - 1].data()
            };
            let out = train_local(
                cfg.model,
                sim.initial_model(),
                data,
                &training,
                LocalProcedure::Plain,
                mix_seed(seed, job as u64),
            )?;
            let site = match job {
                0 => None,
                _ => {
                    let node = &nodes[job - 1];
                    node.score_held_out(&out.model, seed)
                        .transpose()?
                        .map(|e| (node.id().to_string(), e.accuracy))
                }
            };
            Ok(Scores {
                test: sim.evaluator().evaluation(&out.model)?,
                site,
            })
        },
        |_| finished(),
        |_, r| results.push(r),
    );
    let mut results = results.into_iter();
    let central = results.next().ok_or_else(no_nodes)??.test;
    let locals = results.collect::<Result<Vec<_>, _>>()?;
    let local_accuracies: Vec<f64> = locals.iter().map(|s| s.test.accuracy).collect();
    let local_site_accuracies = locals.into_iter().filter_map(|s| s.site).collect();
    let mean = local_accuracies.iter().sum::<f64>() / local_accuracies.len().max(1) as f64;
    let worst = local_accuracies
        .iter()
        .copied()
        .fold(f64::INFINITY, f64::min);
    Ok(Baselines {
        epochs,
        central_accuracy: central.accuracy,
        central_loss: central.loss,
        local_mean_accuracy: mean,
        local_worst_accuracy: worst,
        local_accuracies,
        local_site_accuracies,
    })
}

/// One baseline model's figures: on the central test set, and (a local-only model) on its
/// node's held-out examples.
struct Scores {
    test: Evaluation,
    site: Option<(String, f64)>,
}

fn no_nodes() -> SimError {
    SimError::Engine(ferry_engine::EngineError::Settings(
        "the run has no nodes".into(),
    ))
}
