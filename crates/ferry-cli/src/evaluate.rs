//! `ferry evaluate`: scores a saved model on a dataset's test set, overall and class by class.
//! Under non-IID data the global accuracy can hide a class that only one node held; the
//! per-class table shows it, and which class it is taken for instead.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use ferry_core::Model;
use ferry_ml::{
    data::{DatasetKind, NUM_CLASSES},
    params,
    train::{self, Evaluation},
};
use serde_json::json;

use crate::node_share::NodeShare;

/// Options of `ferry evaluate`.
#[derive(Args, Debug)]
pub struct EvaluateArgs {
    /// The model file (safetensors), for example a run's `model.safetensors`; the network
    /// (lenet, cnn, mlp or logreg) is recognised from its tensors.
    #[arg(value_name = "MODEL.safetensors")]
    model: PathBuf,
    /// Dataset whose test set scores the model: fashion-mnist, mnist-subset or csv.
    #[arg(long, default_value = "fashion-mnist")]
    dataset: String,
    /// Folder holding the dataset files (searched before $FERRY_DATA and /usr/share/datasets).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Score on one deployed node's held-out data instead of the whole test set: its share
    /// of the test split, given by the flags that node was started with.
    #[command(flatten)]
    share: NodeShare,
    /// Score on a site of a finished simulation instead: the output folder of the run ...
    #[arg(long, value_name = "RUN_DIR", requires = "site")]
    run: Option<PathBuf>,
    /// ... and the site (virtual node id) whose held-out examples score the model, as its
    /// cross-site matrix names it.
    #[arg(long, requires = "run")]
    site: Option<u32>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

/// Runs `ferry evaluate`.
pub fn run(args: EvaluateArgs) -> Result<()> {
    let bytes = std::fs::read(&args.model)
        .with_context(|| format!("cannot read the model file {}", args.model.display()))?;
    let model = Model::from_safetensors(&bytes).with_context(|| {
        format!(
            "{} is not a model Ferry can read (a safetensors file of f32 tensors)",
            args.model.display()
        )
    })?;
    let kind = params::kind_of(&model)?;
    let (evaluation, dataset, scored) = match (&args.run, args.site) {
        (Some(run), Some(site)) => on_simulated_site(&model, run, site)?,
        _ => {
            let dataset: DatasetKind = args.dataset.parse()?;
            let test = dataset.load(args.data_dir.as_deref())?.test;
            let (indices, noise) = args.share.indices(&test.labels)?;
            let scored = match args.share.partition_index {
                Some(i) => format!("share {i} of the {dataset} test set"),
                None => format!("the {dataset} test set"),
            };
            let evaluation = train::evaluate_examples(kind, &model, &test, &indices, &[noise], 0)?;
            (evaluation, dataset, scored)
        }
    };
    let sha256 = ferry_core::model::sha256_hex(&bytes);
    let names = dataset.class_names();
    if args.json {
        println!(
            "{}",
            as_json(&evaluation, &names, &kind.to_string(), &sha256)
        );
        return Ok(());
    }
    println!(
        "{} ({} parameters, sha256 {sha256}) on {scored} ({} images)",
        kind,
        model.num_params(),
        evaluation.examples
    );
    println!(
        "accuracy {:.4}  loss {:.4}",
        evaluation.accuracy, evaluation.loss
    );
    println!();
    println!(
        "{:<16} {:>8} {:>8}  most often taken for",
        "class", "accuracy", "examples"
    );
    let confusion = &evaluation.confusion;
    for (class, name) in names.iter().enumerate() {
        let accuracy = confusion
            .class_accuracy(class)
            .map_or_else(|| "-".to_string(), |a| format!("{a:.4}"));
        let confused = confusion
            .most_confused_with(class)
            .map_or_else(String::new, |(other, share)| {
                format!("{other} {} ({:.1}%)", names[other], share * 100.0)
            });
        println!(
            "{:<16} {accuracy:>8} {:>8}  {confused}",
            format!("{class} {name}"),
            confusion.examples(class)
        );
    }
    Ok(())
}

/// `model` scored on the held-out examples of `site` in the finished simulation in `run`,
/// exactly as its cross-site matrix scored it.
fn on_simulated_site(
    model: &Model,
    run: &std::path::Path,
    site: u32,
) -> Result<(Evaluation, DatasetKind, String)> {
    let sim = crate::cross_site::simulation_of(run, None)?;
    let node = sim
        .nodes()
        .get(site as usize)
        .with_context(|| format!("the run has {} sites, numbered from 0", sim.nodes().len()))?;
    let seed = ferry_sim::cross_site::scoring_seed(sim.config().seed);
    let evaluation = node
        .score_held_out(model, seed)
        .context("the site holds no examples out of training")??;
    Ok((
        evaluation,
        sim.config().dataset,
        format!("site {site}'s held-out examples in {}", run.display()),
    ))
}

/// The evaluation as one JSON object: totals, then per class its accuracy, example count and
/// the row of the confusion matrix.
fn as_json(
    evaluation: &Evaluation,
    names: &[&str; NUM_CLASSES],
    model: &str,
    sha256: &str,
) -> serde_json::Value {
    let confusion = &evaluation.confusion;
    let classes: Vec<serde_json::Value> = names
        .iter()
        .enumerate()
        .map(|(class, name)| {
            json!({
                "class": class,
                "name": name,
                "accuracy": confusion.class_accuracy(class),
                "examples": confusion.examples(class),
                "predicted": (0..NUM_CLASSES).map(|p| confusion.count(class, p)).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "model": model,
        "model_sha256": sha256,
        "accuracy": evaluation.accuracy,
        "loss": evaluation.loss,
        "examples": evaluation.examples,
        "classes": classes,
    })
}
