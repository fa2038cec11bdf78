//! Sites' own models for a cross-site matrix, made and scored by any nodes: each node
//! fine-tunes the final model with its own `train` (plain local SGD, the run's local training),
//! and every node scores every site's model with its own `evaluate`. Simulations of the user's
//! own trainer use it; built-in simulations fine-tune their in-process nodes directly
//! (ferry-sim), and a deployed coordinator asks its nodes over the network.

use std::{collections::BTreeMap, sync::Arc};

use ferry_core::{
    Model, algebra, compress::Compression, cross_site::SiteScores, seed::mix_seed,
    strategy::ClientProcedure, task::LocalTraining,
};

use crate::{
    dispatch,
    node::{EvaluateTask, NodeError, NodeHandle, RoundTask},
};

/// Mixed into the run seed for the fine-tuning and scoring tasks' seed.
const SITE_MODELS_STREAM: u64 = 0x517E_0DE1;

/// Sites' own models and their scores.
#[derive(Debug, Default)]
pub struct SiteModels {
    /// Each site's own model, by node id.
    pub models: BTreeMap<String, Model>,
    /// Each site model's scores, by the site that scored it.
    pub scores: BTreeMap<String, SiteScores>,
    /// Fine-tuning or scoring that failed (its row or cell is missing).
    pub failures: Vec<NodeError>,
}

/// Has every node in `nodes` fine-tune `model` into its own (tasks numbered `round`, with
/// `training`), then every node score every site's model; `step` is called as each node's
/// fine-tuning and each node's scoring ends, on `threads` threads.
pub fn fine_tune_and_score(
    nodes: &[Arc<dyn NodeHandle>],
    model: &Arc<Model>,
    training: &LocalTraining,
    round: u32,
    run_seed: u64,
    threads: usize,
    mut step: impl FnMut(),
) -> SiteModels {
    let seed = mix_seed(run_seed, SITE_MODELS_STREAM);
    let mut out = SiteModels::default();
    let task = RoundTask {
        round,
        model: model.clone(),
        training: training.clone(),
        procedure: ClientProcedure::LocalSgd,
        seed,
        server_control: None,
        privacy: None,
        compress: Compression::None,
    };
    let mut tuned = Vec::with_capacity(nodes.len());
    dispatch::run_ordered(
        nodes.len(),
        threads,
        |i| nodes[i].train(&task).map(|u| own_model(model, &u.delta)),
        |_| step(),
        |i, result| tuned.push((nodes[i].id().to_string(), result)),
    );
    let mut rows = Vec::new();
    for (site, result) in tuned {
        match result {
            Ok(own) => rows.push((site, Arc::new(own))),
            Err(e) => out.failures.push(e),
        }
    }
    // One job per scoring node, each scoring the site models in turn: a node runs one task
    // at a time, as a deployed node does.
    let mut scored = Vec::with_capacity(nodes.len());
    dispatch::run_ordered(
        nodes.len(),
        threads,
        |i| {
            rows.iter()
                .map(|(_, own)| {
                    let task = EvaluateTask {
                        round,
                        model: own.clone(),
                        seed,
                    };
                    nodes[i].evaluate(&task)
                })
                .collect::<Vec<_>>()
        },
        |_| step(),
        |i, cells| scored.push((nodes[i].id().to_string(), cells)),
    );
    for (scorer, cells) in scored {
        for ((site, _), evaluation) in rows.iter().zip(cells) {
            match evaluation {
                Ok(e) => {
                    out.scores
                        .entry(site.clone())
                        .or_default()
                        .insert(scorer.clone(), (e.accuracy, e.num_examples));
                }
                Err(e) => out.failures.push(e),
            }
        }
    }
    out.models = rows
        .into_iter()
        .map(|(site, own)| (site, Arc::unwrap_or_clone(own)))
        .collect();
    out
}

/// A site's own model: `model` plus the site's fine-tuning delta (the deployed coordinator
/// makes it the same way from an uploaded update).
pub fn own_model(model: &Model, delta: &[f32]) -> Model {
    let mut own = model.clone();
    algebra::add_scaled(own.values_mut(), delta, 1.0);
    own
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::{ModelLayout, TensorSpec, Update, evaluation::NodeEvaluation};

    /// A node whose training moves every value by `shift` and whose score of a model is its
    /// first value plus its own id.
    struct Shifting {
        id: u32,
        shift: f32,
        fails_training: bool,
    }

    impl NodeHandle for Shifting {
        fn id(&self) -> u32 {
            self.id
        }

        fn train(&self, task: &RoundTask) -> Result<Update, NodeError> {
            if self.fails_training {
                return Err(NodeError {
                    node: self.id,
                    reason: "out of memory".into(),
                });
            }
            assert_eq!(task.procedure, ClientProcedure::LocalSgd);
            Ok(Update::new(vec![self.shift; task.model.num_params()], 5))
        }

        fn evaluate(&self, task: &EvaluateTask) -> Result<NodeEvaluation, NodeError> {
            Ok(NodeEvaluation {
                num_examples: 10,
                loss: 0.0,
                accuracy: f64::from(task.model.values()[0]) + f64::from(self.id) / 100.0,
                metrics: Default::default(),
            })
        }
    }

    #[test]
    fn every_node_scores_each_sites_fine_tuned_model_and_a_failed_site_has_no_row() {
        let layout = ModelLayout::new(vec![TensorSpec::f32("w", vec![3])]).expect("layout");
        let model = Arc::new(Model::new(Arc::new(layout), vec![0.25; 3]).expect("model"));
        let nodes: Vec<Arc<dyn NodeHandle>> = [(0, 0.25, false), (1, 0.5, false), (2, 0.0, true)]
            .into_iter()
            .map(|(id, shift, fails_training)| {
                Arc::new(Shifting {
                    id,
                    shift,
                    fails_training,
                }) as Arc<dyn NodeHandle>
            })
            .collect();
        let mut steps = 0;
        let training = LocalTraining {
            epochs: 1,
            batch_size: 8,
            lr: 0.1,
            momentum: 0.0,
            weight_decay: 0.0,
        };
        let out = fine_tune_and_score(&nodes, &model, &training, 4, 7, 2, || steps += 1);
        assert_eq!(steps, 3 + 3, "three nodes fine-tune, then three score");
        assert_eq!(out.models.keys().collect::<Vec<_>>(), ["0", "1"]);
        assert_eq!(out.models["0"].values(), &[0.5; 3]);
        assert_eq!(out.models["1"].values(), &[0.75; 3]);
        assert_eq!(out.failures.len(), 1);
        assert_eq!(out.failures[0].node, 2);
        let (accuracy, examples) = out.scores["1"]["2"];
        assert!(
            (accuracy - 0.77).abs() < 1e-12 && examples == 10,
            "{accuracy} {examples}"
        );
        assert_eq!(out.scores["0"].len(), 3, "every node scores");
    }
}
