//! `ferry bench robust`: what each aggregation rule buys under each attack. One simulation per
//! (rule, attack) pair; writes `results.csv` and `table.md` (rows: rules; columns: no attack and
//! each attack; cells: final accuracy, and the backdoor's success rate).

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use anyhow::{Context, Result};
use clap::Args;
use ferry_engine::record::RoundRecord;

use crate::{options::SimulateArgs, report};

/// Options of `ferry bench robust`: the simulation (every `ferry simulate` flag, including
/// `--attackers` and the rules' parameters) and the grid.
#[derive(Args)]
pub struct RobustArgs {
    /// Comma-separated aggregation rules: the table's rows.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "mean,median,trimmed-mean,krum,multi-krum,bulyan"
    )]
    rules: Vec<String>,
    /// Comma-separated attacks: the table's columns (`none` is the run without attackers).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "none,sign-flip,gaussian,scale,label-flip,alie,backdoor"
    )]
    attacks: Vec<String>,
    #[command(flatten)]
    run: SimulateArgs,
}

/// One cell of the grid.
struct Cell {
    final_accuracy: f64,
    best_accuracy: f64,
    attack_success_rate: Option<f64>,
    aggregation_s: f64,
    wall_s: f64,
    /// Why the run stopped early (a model driven to NaN leaves no usable update).
    stopped: Option<String>,
}

/// Runs the grid and writes the results.
pub fn run(args: RobustArgs) -> Result<()> {
    let base = args.run.merge_config_file()?;
    let out = base.out_dir();
    report::prepare_dir(&out)?;
    let mut cells: BTreeMap<(usize, usize), Cell> = BTreeMap::new();
    for (r, rule) in args.rules.iter().enumerate() {
        for (a, attack) in args.attacks.iter().enumerate() {
            let mut run = base.clone();
            run.aggregator = Some(rule.clone());
            if attack == "none" {
                run.attack = None;
                run.attackers = None;
            } else {
                run.attack = Some(attack.clone());
            }
            let config = run.resolve()?;
            println!(
                "{rule} under {attack}: {} clients, {} rounds",
                config.clients, config.rounds
            );
            let dir = out.join(format!("{rule}-{attack}"));
            let cell = match super::simulate_in(&config, &dir, false) {
                Ok((outcome, final_record)) => {
                    let last = outcome.rounds.last().context("the run finished no round")?;
                    Cell {
                        final_accuracy: last.accuracy,
                        best_accuracy: outcome.best_accuracy(),
                        attack_success_rate: last.attack_success_rate,
                        aggregation_s: mean_aggregation_s(&outcome.rounds),
                        wall_s: final_record.wall_s,
                        stopped: None,
                    }
                }
                // An attack that drives the model to NaN ends the run: the cell keeps the
                // rounds that finished (their history is on disk) and says why it stopped.
                Err(e) => {
                    let rounds = read_rounds(&dir)?;
                    let last = rounds.last().with_context(|| {
                        format!("{rule} under {attack} failed before any round: {e:#}")
                    })?;
                    println!("{rule} under {attack} stopped: {e:#}");
                    Cell {
                        final_accuracy: last.accuracy,
                        best_accuracy: rounds.iter().map(|r| r.accuracy).fold(0.0, f64::max),
                        attack_success_rate: last.attack_success_rate,
                        aggregation_s: mean_aggregation_s(&rounds),
                        wall_s: rounds.iter().map(|r| r.wall_s).sum(),
                        stopped: Some(format!("{e:#}")),
                    }
                }
            };
            cells.insert((r, a), cell);
        }
    }
    let mut csv = String::from(
        "rule,attack,final_accuracy,best_accuracy,attack_success_rate,aggregation_s_per_round,wall_s,stopped\n",
    );
    for ((r, a), c) in &cells {
        let _ = writeln!(
            csv,
            "{},{},{:.4},{:.4},{},{:.4},{:.1},\"{}\"",
            args.rules[*r],
            args.attacks[*a],
            c.final_accuracy,
            c.best_accuracy,
            c.attack_success_rate
                .map_or(String::new(), |v| format!("{v:.4}")),
            c.aggregation_s,
            c.wall_s,
            c.stopped.as_deref().unwrap_or("").replace('"', "'")
        );
    }
    std::fs::write(out.join("results.csv"), &csv)
        .with_context(|| format!("cannot write {}", out.join("results.csv").display()))?;
    let table = markdown(&args.rules, &args.attacks, &cells);
    std::fs::write(out.join("table.md"), &table)
        .with_context(|| format!("cannot write {}", out.join("table.md").display()))?;
    print!("{table}");
    println!("results in {}", out.display());
    Ok(())
}

/// The table: one row per rule, one column per attack, then the rule's mean aggregation time
/// per round (over all its runs).
fn markdown(
    rules: &[String],
    attacks: &[String],
    cells: &BTreeMap<(usize, usize), Cell>,
) -> String {
    let mut table = format!(
        "| rule | {} | aggregation per round |\n",
        attacks.join(" | ")
    );
    let _ = writeln!(table, "|---|{}---|", "---|".repeat(attacks.len()));
    for (r, rule) in rules.iter().enumerate() {
        let mut row = format!("| {rule} |");
        let mut times = Vec::new();
        for a in 0..attacks.len() {
            let Some(c) = cells.get(&(r, a)) else {
                row.push_str(" — |");
                continue;
            };
            times.push(c.aggregation_s);
            let _ = write!(row, " {:.2}%", 100.0 * c.final_accuracy);
            if let Some(asr) = c.attack_success_rate {
                let _ = write!(row, " (backdoor {:.1}%)", 100.0 * asr);
            }
            if c.stopped.is_some() {
                row.push_str(" (diverged)");
            }
            row.push_str(" |");
        }
        let mean_time = times.iter().sum::<f64>() / times.len().max(1) as f64;
        let _ = writeln!(row, " {:.1} ms |", 1e3 * mean_time);
        table.push_str(&row);
    }
    table
}

/// Mean seconds per round spent in the aggregation rule.
fn mean_aggregation_s(rounds: &[RoundRecord]) -> f64 {
    rounds.iter().map(|r| r.aggregation_s).sum::<f64>() / rounds.len().max(1) as f64
}

/// The round records a run left in `dir/history.json`.
fn read_rounds(dir: &Path) -> Result<Vec<RoundRecord>> {
    let path = dir.join("history.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let history: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    serde_json::from_value(history["rounds"].clone())
        .with_context(|| format!("{} holds no round records", path.display()))
}
