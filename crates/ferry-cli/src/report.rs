//! The run's output folder: `history.json`, `history.csv`, `accuracy.svg` and
//! `model.safetensors`.

use std::{fmt::Write as _, path::Path};

use anyhow::{Context, Result};
use ferry_core::{
    Model,
    cross_site::{CrossSiteMatrix, CrossSiteModels},
    evaluation::FederatedEvaluation,
    fairness::{FairnessReport, LocalGain},
    model::sha256_hex,
};
use ferry_engine::{
    federation::{RoundObserver, RunOutcome, StopReason},
    record::RoundRecord,
};
use ferry_server::coordinator::FailedRound;
use ferry_sim::{SimConfig, baselines::Baselines};
use serde::Serialize;

/// The final state of a run.
#[derive(Debug, Serialize)]
pub struct FinalRecord {
    /// Test accuracy of the final model, in `[0, 1]` (`null` without a central test set).
    #[serde(with = "ferry_engine::record::nan_as_null")]
    pub accuracy: f64,
    /// Test loss of the final model (`null` without a central test set).
    #[serde(with = "ferry_engine::record::nan_as_null")]
    pub loss: f64,
    /// sha256 of `model.safetensors`.
    pub model_sha256: String,
    /// Rounds that ran.
    pub rounds_run: u32,
    /// Why the run stopped.
    pub stop: StopReason,
    /// Seconds for the whole federated run.
    pub wall_s: f64,
    /// Update bytes received over the run.
    pub bytes_up: u64,
    /// Model bytes sent over the run.
    pub bytes_down: u64,
    /// Federated evaluation of the final model on the nodes' held-out data, when the run
    /// evaluated it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub federated: Option<FederatedEvaluation>,
    /// How evenly the final model serves the sites that scored it, from `federated`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fairness: Option<FairnessReport>,
    /// Each site's gain from the federation over training alone (simulations with
    /// `--baselines` and federated evaluation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gain_over_local: Option<LocalGain>,
    /// The cross-site validation matrix, when the run asked for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cross_site: Option<CrossSiteMatrix>,
}

impl FinalRecord {
    /// The final record of a run whose rounds were `rounds` (the last one's figures), whose
    /// model file has `model_sha256`, and which stopped for `stop` after `wall_s` seconds.
    pub fn of(
        rounds: &[RoundRecord],
        model_sha256: String,
        stop: StopReason,
        wall_s: f64,
    ) -> Result<Self> {
        let last = rounds.last().context("the run finished no round")?;
        Ok(Self {
            accuracy: last.accuracy,
            loss: last.loss,
            model_sha256,
            rounds_run: last.round,
            stop,
            wall_s,
            bytes_up: rounds.iter().map(|r| r.bytes_up).sum(),
            bytes_down: rounds.iter().map(|r| r.bytes_down).sum(),
            federated: last.federated.clone(),
            fairness: last.federated.as_ref().and_then(FairnessReport::of),
            gain_over_local: None,
            // A deployed coordinator writes the full matrix (sites' own models included) into
            // the final round's record.
            cross_site: last.cross_site.clone(),
        })
    }

    /// Sets the cross-site matrix, when the run asked for one and its last round holds none,
    /// to its global row: the final federated evaluation, in which every site scored the
    /// final model.
    pub fn with_global_matrix(mut self, asked: Option<CrossSiteModels>) -> Self {
        if asked.is_some() && self.cross_site.is_none() {
            self.cross_site = self
                .federated
                .as_ref()
                .and_then(CrossSiteMatrix::of_evaluation);
        }
        self
    }
}

/// Everything `history.json` holds, for a run configured by `C` (a simulation or a deployment).
#[derive(Debug, Serialize)]
pub struct History<'a, C: Serialize = SimConfig> {
    /// The resolved configuration.
    pub config: &'a C,
    /// One record per round.
    pub rounds: &'a [RoundRecord],
    /// The final model's figures; `null` while the run is in progress.
    #[serde(rename = "final")]
    pub final_record: Option<FinalRecord>,
    /// Central and local-only baselines, when asked for.
    pub baselines: Option<&'a Baselines>,
    /// The nodes that attacked, in an attack simulation.
    #[serde(skip_serializing_if = "<[u32]>::is_empty")]
    pub attackers: &'a [u32],
    /// A deployment's round attempts that failed and were retried (or stopped the run).
    #[serde(skip_serializing_if = "<[FailedRound]>::is_empty")]
    pub failed_rounds: &'a [FailedRound],
}

/// Serialises `model` and returns its bytes with their sha256.
pub fn model_bytes(model: &Model) -> Result<(Vec<u8>, String)> {
    let bytes = model
        .to_safetensors()
        .context("cannot serialise the final model")?;
    let sha = sha256_hex(&bytes);
    Ok((bytes, sha))
}

/// Creates the output folder, so that a run that cannot write its results fails before it
/// trains.
pub fn prepare_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create output folder {}", dir.display()))
}

/// Writes `bytes` as `dir/name` whole: beside it first, then renamed into place.
pub(crate) fn put(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let path = dir.join(name);
    // Write beside the target and rename, so a reader never sees half a file.
    let partial = dir.join(format!(".{name}.partial"));
    std::fs::write(&partial, bytes)
        .with_context(|| format!("cannot write {}", partial.display()))?;
    std::fs::rename(&partial, &path).with_context(|| format!("cannot write {}", path.display()))
}

/// Writes `history.json` and `history.csv` as they stand; called after every round so that a
/// long run that is stopped keeps the rounds it finished.
pub fn write_history<C: Serialize>(dir: &Path, history: &History<'_, C>) -> Result<()> {
    put(
        dir,
        "history.json",
        serde_json::to_string_pretty(history)?.as_bytes(),
    )?;
    put(dir, "history.csv", csv(history.rounds).as_bytes())
}

/// Writes a finished simulated run's outputs into `dir`: the final model, the history with its
/// final record (with `baselines` and the `cross_site` matrix, when they were computed; else
/// the matrix's global row from the final evaluation, when the run asked for one) and the
/// chart; returns the final record.
pub fn write_simulation(
    dir: &Path,
    config: &SimConfig,
    outcome: &RunOutcome,
    wall_s: f64,
    baselines: Option<&Baselines>,
    cross_site: Option<CrossSiteMatrix>,
    attackers: &[u32],
) -> Result<FinalRecord> {
    let (model_safetensors, sha) = model_bytes(&outcome.model)?;
    let mut final_record = FinalRecord::of(&outcome.rounds, sha, outcome.stop, wall_s)?
        .with_global_matrix(config.cross_site);
    if cross_site.is_some() {
        final_record.cross_site = cross_site;
    }
    final_record.gain_over_local = final_record
        .federated
        .as_ref()
        .zip(baselines)
        .and_then(|(f, b)| LocalGain::of(&f.node_accuracy, &b.local_site_accuracies));
    let history = History {
        config,
        rounds: &outcome.rounds,
        final_record: Some(final_record),
        baselines,
        attackers,
        failed_rounds: &[],
    };
    let title = format!(
        "{} on {} ({}, {} clients, {})",
        config.strategy, config.dataset, config.model, config.clients, config.partition
    );
    write(dir, &history, &model_safetensors, &title)?;
    history
        .final_record
        .context("the final record was just written")
}

/// Writes every output file into `dir`, with `title` over the chart.
pub fn write<C: Serialize>(
    dir: &Path,
    history: &History<'_, C>,
    model_safetensors: &[u8],
    title: &str,
) -> Result<()> {
    prepare_dir(dir)?;
    put(dir, "model.safetensors", model_safetensors)?;
    write_history(dir, history)?;
    crate::chart::draw(&dir.join("accuracy.svg"), history.rounds, title)
}

/// The rounds as a table, with one `class_K` column per label after the fixed columns (empty
/// where a class has no test examples), so a spreadsheet shows which classes a run fails on.
fn csv(rounds: &[RoundRecord]) -> String {
    let classes = rounds
        .iter()
        .map(|r| r.class_accuracy.len())
        .max()
        .unwrap_or(0);
    let mut out = String::from(
        "round,accuracy,loss,participants,failures,bytes_up,bytes_down,wall_s,train_loss,strategy_state_bytes,epsilon,clip_norm,federated_accuracy,federated_loss,federated_accuracy_min,federated_accuracy_median,federated_accuracy_max,sim_time_s,staleness_mean,staleness_max",
    );
    for class in 0..classes {
        let _ = write!(out, ",class_{class}");
    }
    out.push('\n');
    let optional = |value: Option<f64>| value.map_or(String::new(), |v| v.to_string());
    let measured = |value: f64| optional((!value.is_nan()).then_some(value));
    for r in rounds {
        let federated = r.federated.as_ref();
        let _ = write!(
            out,
            "{},{},{},{},{},{},{},{:.3},{},{},{},{},{},{},{},{},{},{},{},{}",
            r.round,
            measured(r.accuracy),
            measured(r.loss),
            r.participants,
            r.failures,
            r.bytes_up,
            r.bytes_down,
            r.wall_s,
            r.train_loss,
            r.strategy_state_bytes,
            optional(r.epsilon),
            optional(r.dp.map(|dp| dp.clip_norm)),
            optional(federated.map(|f| f.accuracy)),
            optional(federated.map(|f| f.loss)),
            optional(federated.map(|f| f.accuracy_min)),
            optional(federated.map(|f| f.accuracy_median)),
            optional(federated.map(|f| f.accuracy_max)),
            optional(r.sim_time_s),
            optional(r.staleness.map(|s| s.mean)),
            optional(r.staleness.map(|s| s.max as f64))
        );
        for class in 0..classes {
            let accuracy = r.class_accuracy.get(class).copied().flatten();
            let _ = write!(out, ",{}", optional(accuracy));
        }
        out.push('\n');
    }
    out
}

/// Rewrites the history files after every round.
pub struct HistoryFiles<'a> {
    dir: &'a Path,
    config: &'a SimConfig,
    attackers: &'a [u32],
    rounds: Vec<RoundRecord>,
    warned: bool,
}

impl<'a> HistoryFiles<'a> {
    /// Keeps `dir`'s history files up to date for a run of `config` whose attacking nodes (in
    /// an attack simulation) are `attackers`.
    pub fn new(dir: &'a Path, config: &'a SimConfig, attackers: &'a [u32]) -> Self {
        Self {
            dir,
            config,
            attackers,
            rounds: Vec::new(),
            warned: false,
        }
    }
}

impl RoundObserver for HistoryFiles<'_> {
    fn round_finished(&mut self, record: &RoundRecord) {
        self.rounds.push(record.clone());
        let history = History {
            config: self.config,
            rounds: &self.rounds,
            final_record: None,
            baselines: None,
            attackers: self.attackers,
            failed_rounds: &[],
        };
        if let Err(e) = write_history(self.dir, &history)
            && !self.warned
        {
            eprintln!("warning: {e:#}; the run goes on and will try again after each round");
            self.warned = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::{strategy::StrategyParams, task::LocalTraining};

    fn config() -> SimConfig {
        SimConfig {
            dataset: "fashion-mnist".parse().expect("dataset"),
            data_dir: None,
            model: "logreg".parse().expect("model"),
            initial_model: None,
            personal: Vec::new(),
            frozen: Vec::new(),
            clients: 2,
            fraction: 1.0,
            min_clients: 1,
            rounds: 5,
            training: LocalTraining {
                epochs: 1,
                batch_size: 8,
                lr: 0.1,
                momentum: 0.0,
                weight_decay: 0.0,
            },
            partition: "iid".parse().expect("partition"),
            strategy: "fedavg".parse().expect("strategy"),
            strategy_params: StrategyParams::default(),
            seed: 0,
            target_accuracy: None,
            evaluate_every: None,
            evaluate_fraction: 1.0,
            evaluate_holdout: 0.1,
            threads: 1,
            dp: None,
            aggregator: None,
            norm_bound: None,
            attack: None,
            secagg: None,
            fleet: Default::default(),
            cross_site: None,
        }
    }

    fn record(round: u32) -> RoundRecord {
        RoundRecord {
            round,
            accuracy: 0.5,
            loss: 1.0,
            class_accuracy: Vec::new(),
            participants: 2,
            failures: 0,
            bytes_up: 8,
            bytes_down: 8,
            wall_s: 0.1,
            train_loss: 1.2,
            strategy_state_bytes: 0,
            epsilon: None,
            dp: None,
            excluded: Vec::new(),
            attack_success_rate: None,
            aggregation_s: 0.0,
            aborted: None,
            federated: None,
            contributors: vec!["1".into(), "2".into()],
            contributor_examples: vec![10, 20],
            failed: Vec::new(),
            sim_time_s: None,
            staleness: None,
            cross_site: None,
        }
    }

    #[test]
    fn history_is_on_disk_after_every_round_with_final_null() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = config();
        let mut files = HistoryFiles::new(dir.path(), &config, &[]);
        files.round_finished(&record(1));
        files.round_finished(&record(2));
        let text = std::fs::read_to_string(dir.path().join("history.json")).expect("json");
        let json: serde_json::Value = serde_json::from_str(&text).expect("valid");
        assert_eq!(json["rounds"].as_array().map(Vec::len), Some(2));
        assert!(json["final"].is_null());
        let csv = std::fs::read_to_string(dir.path().join("history.csv")).expect("csv");
        assert_eq!(csv.lines().count(), 3);
        assert!(!dir.path().join(".history.json.partial").exists());
    }

    #[test]
    fn csv_has_a_column_per_class_left_empty_where_a_class_has_no_examples() {
        let mut first = record(1);
        first.class_accuracy = vec![Some(0.5), None, Some(1.0)];
        let csv = csv(&[first, record(2)]);
        let lines: Vec<&str> = csv.lines().collect();
        assert!(lines[0].ends_with(",staleness_max,class_0,class_1,class_2"));
        assert!(lines[1].ends_with(",0.5,,1"), "{}", lines[1]);
        // A round with no per-class figures keeps the table rectangular.
        assert!(lines[2].ends_with(",,,"), "{}", lines[2]);
        let width = |line: &str| line.split(',').count();
        assert!(lines.iter().all(|line| width(line) == width(lines[0])));
    }
}
