//! The run's output folder: `history.json`, `history.csv`, `accuracy.svg` and
//! `model.safetensors`.

use std::{fmt::Write as _, path::Path};

use anyhow::{Context, Result};
use ferry_core::{Model, model::sha256_hex};
use ferry_engine::{federation::StopReason, record::RoundRecord};
use ferry_sim::{SimConfig, baselines::Baselines};
use serde::Serialize;

/// The final state of a run.
#[derive(Debug, Serialize)]
pub struct FinalRecord {
    /// Test accuracy of the final model, in `[0, 1]`.
    pub accuracy: f64,
    /// Test loss of the final model.
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
}

/// Everything `history.json` holds.
#[derive(Debug, Serialize)]
pub struct History<'a> {
    /// The resolved configuration.
    pub config: &'a SimConfig,
    /// One record per round.
    pub rounds: &'a [RoundRecord],
    /// The final model's figures.
    #[serde(rename = "final")]
    pub final_record: FinalRecord,
    /// Central and local-only baselines, when asked for.
    pub baselines: Option<&'a Baselines>,
}

/// Serialises `model` and returns its bytes with their sha256.
pub fn model_bytes(model: &Model) -> Result<(Vec<u8>, String)> {
    let bytes = model
        .to_safetensors()
        .context("cannot serialise the final model")?;
    let sha = sha256_hex(&bytes);
    Ok((bytes, sha))
}

/// Writes every output file into `dir`, creating it if needed.
pub fn write(dir: &Path, history: &History<'_>, model_safetensors: &[u8]) -> Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create output folder {}", dir.display()))?;
    let put = |name: &str, bytes: &[u8]| {
        let path = dir.join(name);
        std::fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))
    };
    put("model.safetensors", model_safetensors)?;
    put(
        "history.json",
        serde_json::to_string_pretty(history)?.as_bytes(),
    )?;
    put("history.csv", csv(history.rounds).as_bytes())?;
    let title = format!(
        "{} on {} ({}, {} clients, {})",
        history.config.strategy,
        history.config.dataset,
        history.config.model,
        history.config.clients,
        history.config.partition
    );
    crate::chart::draw(&dir.join("accuracy.svg"), history.rounds, &title)
}

fn csv(rounds: &[RoundRecord]) -> String {
    let mut out = String::from(
        "round,accuracy,loss,participants,failures,bytes_up,bytes_down,wall_s,train_loss,strategy_state_bytes\n",
    );
    for r in rounds {
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{},{:.3},{},{}",
            r.round,
            r.accuracy,
            r.loss,
            r.participants,
            r.failures,
            r.bytes_up,
            r.bytes_down,
            r.wall_s,
            r.train_loss,
            r.strategy_state_bytes
        );
    }
    out
}
