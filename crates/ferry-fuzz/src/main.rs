//! `ferry-fuzz`: runs the decoders under millions of arbitrary and mutated inputs and exits
//! non-zero, with the failing inputs saved, if any input panics or allocates past the cap.

use std::{path::PathBuf, time::Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use ferry_fuzz::{Report, Target, engine, probe::LargestAllocation, targets};

#[global_allocator]
static ALLOCATOR: LargestAllocation = LargestAllocation;

/// Fuzz Ferry's decoders.
#[derive(Parser)]
#[command(name = "ferry-fuzz")]
struct Args {
    /// Targets to run (all when none is named); `--list` shows them.
    targets: Vec<String>,
    /// Inputs per target.
    #[arg(long, default_value_t = 1_000_000)]
    inputs: u64,
    /// Seed of the input generator: the same seed gives the same inputs.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Folder for the inputs that broke a rule.
    #[arg(long, default_value = "target/fuzz-findings")]
    findings: PathBuf,
    /// List the targets and exit.
    #[arg(long)]
    list: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.list {
        for target in &targets::ALL {
            println!("{:<16} {}", target.name, target.about);
        }
        return Ok(());
    }
    let chosen: Vec<&Target> = if args.targets.is_empty() {
        targets::ALL.iter().collect()
    } else {
        args.targets
            .iter()
            .map(|name| {
                targets::by_name(name).with_context(|| {
                    format!("no fuzz target '{name}'; `ferry-fuzz --list` shows them")
                })
            })
            .collect::<Result<_>>()?
    };
    let mut broken = Vec::new();
    for target in chosen {
        let started = Instant::now();
        let report = engine::run(target, args.inputs, args.seed, |done| {
            eprint!("\r{}: {done} of {} inputs", target.name, args.inputs);
        });
        eprintln!();
        print_report(target, &report, started.elapsed().as_secs_f64());
        if !report.is_clean() {
            save_findings(&args.findings, target, &report)?;
            broken.push(target.name);
        }
    }
    if !broken.is_empty() {
        bail!(
            "{} broke a rule; the inputs are in {}",
            broken.join(", "),
            args.findings.display()
        );
    }
    Ok(())
}

fn print_report(target: &Target, report: &Report, seconds: f64) {
    let refusals = report
        .refusals
        .iter()
        .map(|(kind, n)| format!("{kind} {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    println!(
        "{}: {} inputs in {seconds:.1} s ({:.0}/s): {} accepted, {} refused ({refusals}), {} panics, {} over the allocation cap; largest allocation {} bytes",
        target.name,
        report.inputs,
        report.inputs as f64 / seconds.max(1e-9),
        report.accepted,
        report.refused(),
        report.panics,
        report.oversized,
        report
            .largest_allocation
            .map_or("unmeasured".into(), |b| b.to_string()),
    );
    for finding in &report.findings {
        println!("  {}", finding.what);
    }
}

fn save_findings(dir: &std::path::Path, target: &Target, report: &Report) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for (i, finding) in report.findings.iter().enumerate() {
        let path = dir.join(format!("{}-{i}.bin", target.name));
        std::fs::write(&path, &finding.input)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}
