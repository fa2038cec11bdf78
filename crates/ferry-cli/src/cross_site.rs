//! The cross-site validation matrix: computed at the end of `ferry simulate --cross-site` (and
//! of a deployed run by its coordinator, which this writes out the same way), and
//! on demand for a finished run with `ferry cross-site RUN_DIR`.
//!
//! Beside `history.json`'s `final.cross_site`, the matrix is written as `cross-site.csv` (one
//! row per model, one column per site) and, for sites' own models, each model as
//! `cross-site/<site>.safetensors`, so that any cell can be checked with `ferry evaluate`.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use ferry_core::{
    Model,
    cross_site::{CrossSiteMatrix, CrossSiteModels, GLOBAL_ROW},
};
use ferry_engine::{cross_site::SiteModels, federation::RunOutcome};
use ferry_sim::{Simulation, cross_site};

use crate::{
    options::SimulateArgs,
    progress::progress_bar,
    report::{self, put},
};

/// The file a simulation keeps its settings in, so that its matrix can be computed later.
pub const RUN_SETTINGS: &str = "run.toml";

/// Options of `ferry cross-site`.
#[derive(clap::Args, Debug)]
pub struct CrossSiteArgs {
    /// A finished run's output folder.
    pub run_dir: PathBuf,
    /// `global`: the global model on every site; `local`: also each site's own fine-tuned
    /// model on every site (built-in simulations only: other runs make it while they run)
    /// [default: global].
    #[arg(long, value_name = "global|local")]
    pub models: Option<String>,
}

/// Computes the matrix of a simulated run's final `model` with its virtual nodes, prints its
/// summary and writes the CSV and the sites' own models into `out`.
pub fn for_simulation(
    sim: &Simulation,
    model: &Model,
    models: CrossSiteModels,
    out: &Path,
) -> Result<CrossSiteMatrix> {
    let nodes = sim.nodes().len();
    let jobs = match models {
        CrossSiteModels::Global => 1,
        CrossSiteModels::Local => 2 * nodes + 1,
    };
    println!(
        "cross-site validation: {} on every site's held-out data",
        match models {
            CrossSiteModels::Global => "the global model".to_string(),
            CrossSiteModels::Local =>
                format!("the global model and {nodes} sites' own fine-tuned models"),
        }
    );
    let bar = progress_bar(
        jobs as u64,
        "cross-site [{bar:30}] {pos}/{len} steps  {elapsed}",
    );
    let result = cross_site::run(sim, model, models, || bar.inc(1));
    bar.finish_and_clear();
    let result = result?;
    write_site_models(out, &result.local_models)?;
    write_csv(out, &result.matrix)?;
    print_summary(&result.matrix);
    Ok(result.matrix)
}

/// The matrix of a simulation of the user's own trainer whose nodes made `site_models`: the
/// final federated evaluation's global row, then each site model's row; prints its summary
/// (and any node that failed) and writes the CSV and the sites' models into `out`. `None`
/// when no site scored the final model.
pub fn for_own_code(
    outcome: &RunOutcome,
    site_models: SiteModels,
    out: &Path,
) -> Result<Option<CrossSiteMatrix>> {
    for failure in &site_models.failures {
        eprintln!("cross-site: {failure}");
    }
    let Some(matrix) = outcome
        .rounds
        .last()
        .and_then(|r| r.federated.as_ref())
        .and_then(CrossSiteMatrix::of_evaluation)
        .map(|global| global.with_local_rows(&site_models.scores))
    else {
        eprintln!("cross-site: no site scored the final model, so the run has no matrix");
        return Ok(None);
    };
    write_site_models(out, &site_models.models)?;
    write_csv(out, &matrix)?;
    print_summary(&matrix);
    Ok(Some(matrix))
}

/// Writes each site's own model as `cross-site/<site>.safetensors` in `out` (nothing when
/// there are none), so that any cell of the matrix can be checked with `ferry evaluate`.
pub fn write_site_models(out: &Path, models: &BTreeMap<String, Model>) -> Result<()> {
    if models.is_empty() {
        return Ok(());
    }
    let dir = out.join("cross-site");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for (site, model) in models {
        let (bytes, _) = report::model_bytes(model)?;
        put(&dir, &format!("{site}.safetensors"), &bytes)?;
    }
    Ok(())
}

/// Writes `cross-site.csv`: a header of the sites, a row of their example counts, then one
/// row of accuracies per model (empty where a site did not score it).
pub fn write_csv(out: &Path, matrix: &CrossSiteMatrix) -> Result<()> {
    let mut csv = format!("model,{}\n", matrix.sites.join(","));
    let examples: Vec<String> = matrix.examples.iter().map(u64::to_string).collect();
    csv.push_str(&format!("examples,{}\n", examples.join(",")));
    for row in &matrix.rows {
        let cells: Vec<String> = row
            .accuracy
            .iter()
            .map(|a| a.map(|a| format!("{a:.6}")).unwrap_or_default())
            .collect();
        csv.push_str(&format!("{},{}\n", row.model, cells.join(",")));
    }
    put(out, "cross-site.csv", csv.as_bytes())
}

/// Prints the global model's worst and mean site, and how the sites' own models fare at home
/// and elsewhere.
pub fn print_summary(matrix: &CrossSiteMatrix) {
    let mean = |cells: &[f64]| cells.iter().sum::<f64>() / cells.len().max(1) as f64;
    if let Some(global) = matrix.row(GLOBAL_ROW) {
        let scored: Vec<(usize, f64)> = global
            .accuracy
            .iter()
            .enumerate()
            .filter_map(|(i, a)| Some((i, (*a)?)))
            .collect();
        if let Some((worst, accuracy)) = scored.iter().min_by(|a, b| a.1.total_cmp(&b.1)) {
            let values: Vec<f64> = scored.iter().map(|(_, a)| *a).collect();
            println!(
                "cross-site: global model on {} sites: mean {:.4}, worst site {} {:.4}",
                values.len(),
                mean(&values),
                matrix.sites[*worst],
                accuracy
            );
        }
    }
    let (mut home, mut away) = (Vec::new(), Vec::new());
    for row in matrix.rows.iter().filter(|r| r.model != GLOBAL_ROW) {
        let own = row.model.strip_prefix("local:").unwrap_or_default();
        for (site, cell) in matrix.sites.iter().zip(&row.accuracy) {
            if let Some(a) = cell {
                if site == own { &mut home } else { &mut away }.push(*a);
            }
        }
    }
    if !home.is_empty() {
        println!(
            "cross-site: sites' own models: mean {:.4} on their own site, {:.4} on the others",
            mean(&home),
            mean(&away)
        );
    }
}

/// `ferry cross-site RUN_DIR`: the matrix of a finished run, written into its `history.json`
/// and `cross-site.csv`. A simulation is re-created from its `run.toml` and its final model is
/// scored anew; a deployment's matrix is its final federated evaluation (its nodes' data is
/// out of reach), so its run must have evaluated every node after its last round.
pub fn run(args: CrossSiteArgs) -> Result<()> {
    let models: CrossSiteModels = args
        .models
        .as_deref()
        .unwrap_or("global")
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--models: {e}"))?;
    let dir = &args.run_dir;
    let history_path = dir.join("history.json");
    let text = std::fs::read_to_string(&history_path).with_context(|| {
        format!(
            "cannot read {}; give a finished run's output folder",
            history_path.display()
        )
    })?;
    let mut history: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", history_path.display()))?;
    if history["final"].is_null() {
        bail!(
            "{} has no final record: the run did not finish",
            history_path.display()
        );
    }
    let matrix = if dir.join(RUN_SETTINGS).exists() {
        simulated_matrix(dir, models)?
    } else {
        evaluated_matrix(&history, models)?
    };
    history["final"]["cross_site"] = serde_json::to_value(&matrix)?;
    put(
        dir,
        "history.json",
        serde_json::to_string_pretty(&history)?.as_bytes(),
    )?;
    write_csv(dir, &matrix)?;
    println!(
        "cross-site matrix written to {} and cross-site.csv",
        history_path.display()
    );
    Ok(())
}

/// The matrix of a run whose nodes are out of reach (a deployment, or a simulation of the
/// user's own trainer): the one its nodes made at its end if it has sites' own models (nothing
/// can make those again), else its final federated evaluation.
fn evaluated_matrix(
    history: &serde_json::Value,
    models: CrossSiteModels,
) -> Result<CrossSiteMatrix> {
    let stored: Option<CrossSiteMatrix> =
        serde_json::from_value(history["final"]["cross_site"].clone()).ok();
    if let Some(stored) = stored.filter(|m| m.rows.len() > 1) {
        println!("the run's matrix has its sites' own models, made at its end: kept as it is");
        print_summary(&stored);
        return Ok(stored);
    }
    if models == CrossSiteModels::Local {
        bail!(
            "this run's nodes and their data are out of reach, so sites' own models can only \
             be made while it runs: run it with --cross-site local (a server's cross-site = \
             \"local\"), or use --models global"
        );
    }
    let federated = serde_json::from_value(history["final"]["federated"].clone()).context(
        "the run has no final federated evaluation; run it with cross-site = \"global\" (a \
         server's [run], or --cross-site global) so that every node scores the final model",
    )?;
    let matrix = CrossSiteMatrix::of_evaluation(&federated)
        .context("the final federated evaluation names no site with its examples")?;
    print_summary(&matrix);
    Ok(matrix)
}

fn simulated_matrix(dir: &Path, models: CrossSiteModels) -> Result<CrossSiteMatrix> {
    let sim = simulation_of(dir, Some(models))?;
    let model_path = dir.join("model.safetensors");
    let model = ferry_ml::params::load_model_file(&model_path)
        .with_context(|| format!("cannot read the final model {}", model_path.display()))?;
    sim.initial_model()
        .check_same_layout(model.layout())
        .with_context(|| format!("{} is not this run's network", model_path.display()))?;
    for_simulation(&sim, &model, models, dir)
}

/// The virtual nodes of the simulated run in `dir`, re-created from its `run.toml` (the same
/// data, partition and held-out examples), with the cross-site matrix set to `models`.
pub fn simulation_of(dir: &Path, models: Option<CrossSiteModels>) -> Result<Simulation> {
    let settings = dir.join(RUN_SETTINGS);
    anyhow::ensure!(
        settings.exists(),
        "{} is missing: give the output folder of a `ferry simulate` run of built-in nodes",
        settings.display()
    );
    let mut args: SimulateArgs = crate::options::read_toml(&settings)?;
    anyhow::ensure!(
        args.resolve()?.evaluation(true).every > 0,
        "the run in {} trained on all of its nodes' examples and held none out, so no site has \
         data to score on that the model did not see; re-run it with --cross-site or \
         --evaluate-every",
        dir.display()
    );
    if models.is_some() {
        args.cross_site = models.map(|m| m.to_string());
    }
    Ok(Simulation::prepare(args.resolve()?)?)
}
