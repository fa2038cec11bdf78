//! What a run whose nodes train outside Ferry's built-in trainer starts from (a deployed
//! server, or `ferry simulate --trainer-cmd`): a built-in network initialised from the seed
//! and scored on its dataset's test set, or a model file of the user's own (`initial_model`),
//! scored centrally only when it is a built-in network and the dataset has a test set.

use std::sync::Arc;

use anyhow::{Result, bail};
use ferry_core::Model;
use ferry_engine::node::Evaluator;
use ferry_ml::params;
use ferry_sim::{SimConfig, evaluator::TestSetEvaluator};

/// The initial model, how rounds are scored centrally (if at all), and how to describe it.
pub struct StartingPoint {
    /// The initial global model.
    pub model: Model,
    /// The central evaluator; `None` when the run has no central test set.
    pub evaluator: Option<Box<dyn Evaluator>>,
    /// For the server's first line.
    pub description: String,
}

impl StartingPoint {
    /// The starting point `run` configures.
    pub fn of(run: &SimConfig) -> Result<Self> {
        let personal = run.personal_tensors()?;
        let Some(path) = &run.initial_model else {
            if !personal.is_empty() {
                bail!(
                    "personal and frozen tensors are for a model of your own: set \
                     initial_model (the built-in {} trains every tensor)",
                    run.model
                );
            }
            return Ok(Self {
                model: params::init_model(run.model, run.seed)?,
                evaluator: Some(central_evaluator(run)?),
                description: format!("{} on {}", run.model, run.dataset),
            });
        };
        let model = params::load_model_file_with(path, &personal)?;
        let builtin = params::init_model(run.model, run.seed)?;
        if personal.is_empty() && builtin.check_same_layout(model.layout()).is_ok() {
            return Ok(Self {
                model,
                evaluator: Some(central_evaluator(run)?),
                description: format!("{} from {} on {}", run.model, path.display(), run.dataset),
            });
        }
        let kept = if personal.is_empty() {
            String::new()
        } else {
            let names: Vec<&str> = model
                .carried()
                .iter()
                .map(|t| t.name.as_str())
                .filter(|name| personal.matches(name))
                .collect();
            format!("; kept on each node or frozen: {}", names.join(", "))
        };
        let description = format!(
            "the model in {} ({} tensors, {} parameters, {} carried{kept}; no central test set)",
            path.display(),
            model.layout().specs().len(),
            model.num_params(),
            model.carried().len()
        );
        Ok(Self {
            model,
            evaluator: None,
            description,
        })
    }
}

/// Scores each round's model on `run`'s dataset's test set.
fn central_evaluator(run: &SimConfig) -> Result<Box<dyn Evaluator>> {
    let data = run.dataset.load(run.data_dir.as_deref())?;
    if data.test.is_empty() {
        bail!(
            "the server evaluates every round, but {} has no test set (add test.csv to its folder)",
            run.dataset
        );
    }
    Ok(Box::new(TestSetEvaluator::new(
        run.model,
        Arc::new(data.test),
        &[],
        run.seed,
    )))
}
