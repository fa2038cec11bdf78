//! Evaluation of the global model on the central test set.

use std::sync::Arc;

use ferry_core::Model;
use ferry_engine::node::{Evaluator, Score};
use ferry_ml::{
    data::{Dataset, NUM_CLASSES},
    models::ModelKind,
    train,
};

/// Scores models on the test set; under feature-skew partitions, on one noised copy of it per
/// node (NIID-Bench's protocol).
pub struct TestSetEvaluator {
    model: ModelKind,
    test: Arc<Dataset>,
    noise_copies: Vec<f32>,
    seed: u64,
    backdoor: Option<Dataset>,
}

impl TestSetEvaluator {
    /// An evaluator of `model` networks on `test`, noised once per entry of `noise_copies`
    /// when any is non-zero.
    pub fn new(model: ModelKind, test: Arc<Dataset>, noise_copies: &[f32], seed: u64) -> Self {
        let noisy = noise_copies.iter().any(|&s| s > 0.0);
        Self {
            model,
            test,
            noise_copies: if noisy {
                noise_copies.to_vec()
            } else {
                Vec::new()
            },
            seed,
            backdoor: None,
        }
    }

    /// Also measures a backdoor's success on `triggered` (test images stamped with the
    /// trigger, labelled with the target).
    pub fn with_backdoor(mut self, triggered: Dataset) -> Self {
        self.backdoor = Some(triggered);
        self
    }

    /// Full evaluation result.
    pub fn evaluation(&self, model: &Model) -> Result<train::Evaluation, ferry_ml::MlError> {
        train::evaluate(self.model, model, &self.test, &self.noise_copies, self.seed)
    }
}

impl Evaluator for TestSetEvaluator {
    fn evaluate(&self, model: &Model) -> Result<Score, String> {
        self.evaluation(model)
            .map(|e| Score {
                loss: e.loss,
                accuracy: e.accuracy,
                class_accuracy: (0..NUM_CLASSES)
                    .map(|class| e.confusion.class_accuracy(class))
                    .collect(),
            })
            .map_err(|e| e.to_string())
    }

    fn attack_success_rate(&self, model: &Model) -> Result<Option<f64>, String> {
        self.backdoor
            .as_ref()
            .map(|triggered| {
                train::evaluate(self.model, model, triggered, &[], self.seed)
                    .map(|e| e.accuracy)
                    .map_err(|e| e.to_string())
            })
            .transpose()
    }
}
