//! The cross-site validation matrix of a simulated run: a model scored on every virtual node's
//! held-out examples, the same examples its federated evaluation reads.
//!
//! With [`CrossSiteModels::Local`], each node first fine-tunes the model on its own training
//! data with the run's local training settings, and every node's fine-tuned model is scored
//! on every node's held-out examples too.

use std::collections::BTreeMap;

use ferry_core::{
    Model,
    cross_site::{CrossSiteMatrix, CrossSiteModels, SiteScores},
    seed::mix_seed,
};
use ferry_engine::{dispatch, node::NodeHandle};
use ferry_ml::train::{LocalProcedure, train_local};

use crate::{SimError, Simulation};

/// The seed a run of seed `run_seed` scores models on its sites with (it draws the pixel noise
/// of feature-skewed partitions), so that a cell can be checked on its own.
pub fn scoring_seed(run_seed: u64) -> u64 {
    mix_seed(run_seed, 0xC505_5173)
}

/// A finished cross-site validation.
pub struct CrossSite {
    /// Models x sites.
    pub matrix: CrossSiteMatrix,
    /// Each site's fine-tuned model, by site (empty for [`CrossSiteModels::Global`]).
    pub local_models: BTreeMap<String, Model>,
}

/// Scores `model` (and, for [`CrossSiteModels::Local`], each node's fine-tuned copy of it) on
/// every node's held-out examples; `finished` is called as each model is fine-tuned and as
/// each model is scored on all sites. Refuses a run whose nodes hold nothing out.
pub fn run(
    sim: &Simulation,
    model: &Model,
    models: CrossSiteModels,
    mut finished: impl FnMut(),
) -> Result<CrossSite, SimError> {
    let cfg = sim.config();
    let nodes = sim.nodes();
    let seed = scoring_seed(cfg.seed);
    let mut local_models = BTreeMap::new();
    if models == CrossSiteModels::Local {
        let mut tuned: Vec<Result<Model, SimError>> = Vec::with_capacity(nodes.len());
        dispatch::run_ordered(
            nodes.len(),
            cfg.threads,
            |i| -> Result<Model, SimError> {
                let out = train_local(
                    cfg.model,
                    model,
                    nodes[i].data(),
                    &cfg.training,
                    LocalProcedure::Plain,
                    mix_seed(seed, i as u64),
                )?;
                Ok(out.model)
            },
            |_| finished(),
            |_, m| tuned.push(m),
        );
        for (node, tuned) in nodes.iter().zip(tuned) {
            local_models.insert(node.id().to_string(), tuned?);
        }
    }
    let rows: Vec<&Model> = std::iter::once(model)
        .chain(local_models.values())
        .collect();
    let mut scored: Vec<Result<SiteScores, SimError>> = Vec::with_capacity(rows.len());
    dispatch::run_ordered(
        rows.len(),
        cfg.threads,
        |row| -> Result<SiteScores, SimError> {
            let mut scores = SiteScores::new();
            for node in nodes {
                if let Some(evaluation) = node.score_held_out(rows[row], seed) {
                    let evaluation = evaluation?;
                    scores.insert(
                        node.id().to_string(),
                        (evaluation.accuracy, evaluation.examples as u64),
                    );
                }
            }
            Ok(scores)
        },
        |_| finished(),
        |_, s| scored.push(s),
    );
    let mut scored = scored.into_iter();
    let global = scored.next().transpose()?.unwrap_or_default();
    let local = local_models
        .keys()
        .cloned()
        .zip(scored)
        .map(|(site, s)| s.map(|s| (site, s)))
        .collect::<Result<BTreeMap<_, _>, _>>()?;
    let matrix = CrossSiteMatrix::build(&global, &local).ok_or_else(|| {
        SimError::Engine(ferry_engine::EngineError::Settings(
            "no node holds examples out of training to score models on; raise \
             --evaluate-holdout"
                .into(),
        ))
    })?;
    Ok(CrossSite {
        matrix,
        local_models,
    })
}
