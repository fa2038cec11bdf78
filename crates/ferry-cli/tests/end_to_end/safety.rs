//! End-to-end: the safety features of `ferry simulate`, run as a user would: differential
//! privacy and its accountant, attacks against robust aggregation rules, and secure
//! aggregation.
//!
//! Needs the datasets that `scripts/install-deps.sh` installs.

use std::path::Path;

use serde_json::Value;

use crate::support::{
    cli::{assert_clean_failure, ferry_stdout, mnist_logreg, simulate, stdout, written_history},
    run_ok,
};

/// `ferry privacy epsilon` for `steps` rounds at rate q and multiplier z, as printed.
fn cli_epsilon(q: &str, z: &str, steps: usize) -> f64 {
    let text = ferry_stdout(&[
        "privacy",
        "epsilon",
        "--sampling-rate",
        q,
        "--noise-multiplier",
        z,
        "--steps",
        &steps.to_string(),
        "--delta",
        "1e-5",
    ]);
    let value = text
        .trim()
        .strip_prefix("epsilon=")
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("epsilon=<value> order=<alpha> expected: {text}"));
    value.parse().expect("a number")
}

#[test]
fn private_simulation_reports_epsilon_each_round_and_stops_at_its_budget() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let private = mnist_logreg(&[
        "--clients",
        "20",
        "--fraction",
        "0.5",
        "--rounds",
        "10",
        "--dp-noise-multiplier",
        "1.0",
        "--dp-clip",
        "0.5",
    ]);
    // q = 0.5, z = 1: epsilon is 6.48 after 3 rounds and 7.41 after 4, so a budget of 7
    // allows exactly 3.
    let mut args = private.clone();
    args.extend(["--dp-epsilon-budget", "7"]);
    let h = simulate(tmp.path(), &args);
    let rounds = h["rounds"].as_array().expect("rounds");
    assert_eq!(rounds.len(), 3, "{rounds:?}");
    assert_eq!(h["final"]["stop"], "budget_exhausted");
    for (i, r) in rounds.iter().enumerate() {
        let eps = r["epsilon"].as_f64().expect("epsilon every round");
        let want = cli_epsilon("0.5", "1.0", i + 1);
        assert!(
            (eps - want).abs() < 1e-9 * want,
            "round {}: {eps} vs {want}",
            i + 1
        );
        assert_eq!(r["dp"]["clip_norm"], 0.5);
        assert_eq!(r["dp"]["expected_count"], 10.0);
    }
    // Poisson sampling: the cohort size varies around 10.
    let sizes: Vec<u64> = rounds
        .iter()
        .map(|r| r["participants"].as_u64().expect("participants"))
        .collect();
    assert!(sizes.iter().all(|&n| (1..=20).contains(&n)), "{sizes:?}");
    let csv = std::fs::read_to_string(tmp.path().join("history.csv")).expect("csv");
    assert!(
        csv.lines()
            .next()
            .is_some_and(|h| h.contains(",epsilon,clip_norm,federated_accuracy,"))
    );

    // A budget the first round would already exceed is refused before any training.
    let out_dir = tmp.path().join("refused");
    let mut refused = vec!["simulate", "--out", out_dir.to_str().expect("utf-8")];
    refused.extend_from_slice(&private);
    refused.extend(["--dp-epsilon-budget", "1"]);
    assert_clean_failure(&refused, "first round alone would spend epsilon 3.894");
}

#[test]
fn distributed_and_adaptive_private_runs_learn() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let h = simulate(
        tmp.path(),
        &mnist_logreg(&[
            "--clients",
            "40",
            "--fraction",
            "0.5",
            "--rounds",
            "8",
            "--dp-noise-multiplier",
            "0.5",
            "--dp-adaptive-clip",
            "--dp-placement",
            "distributed",
            "--dp-per-layer",
        ]),
    );
    let rounds = h["rounds"].as_array().expect("rounds");
    assert_eq!(rounds.len(), 8);
    let clips: Vec<f64> = rounds
        .iter()
        .map(|r| r["dp"]["clip_norm"].as_f64().expect("clip"))
        .collect();
    assert_eq!(
        clips[0], 0.1,
        "the adaptive clip starts at its initial norm"
    );
    assert!(
        clips.windows(2).any(|w| w[0] != w[1]),
        "the adaptive clip should move: {clips:?}"
    );
    assert!(
        rounds
            .iter()
            .all(|r| r["dp"]["unclipped_fraction"].is_f64())
    );
    let first = rounds[0]["accuracy"].as_f64().expect("accuracy");
    let last = rounds[7]["accuracy"].as_f64().expect("accuracy");
    assert!(
        last > first && last > 0.5,
        "logreg with distributed DP (z = 0.5, 20 of 40 nodes) should learn: {first} -> {last}"
    );
}

#[test]
fn privacy_commands_agree_with_each_other_and_the_public_vector() {
    // Public vector: q 0.04, z 1.5, 2250 steps, delta 1e-5 -> 7.32911117143 on orders
    // 1.1..10.9 and 12..63; the CLI searches those and more, so it may only be lower.
    let eps = cli_epsilon("0.04", "1.5", 2250);
    assert!(eps <= 7.32911117143 + 1e-9 && eps > 7.2, "{eps}");
    let text = ferry_stdout(&[
        "privacy",
        "noise",
        "--sampling-rate",
        "0.1",
        "--steps",
        "50",
        "--delta",
        "1e-5",
        "--epsilon",
        "5",
    ]);
    let z = text
        .trim()
        .strip_prefix("noise_multiplier=")
        .unwrap_or_else(|| panic!("noise_multiplier=<value> expected: {text}"));
    let z_value: f64 = z.parse().expect("a number");
    assert!(cli_epsilon("0.1", z, 50) <= 5.0);
    assert!(cli_epsilon("0.1", &(z_value * 0.99).to_string(), 50) > 5.0);
    assert_clean_failure(
        &[
            "privacy",
            "epsilon",
            "--sampling-rate",
            "1.5",
            "--noise-multiplier",
            "1",
            "--steps",
            "10",
            "--delta",
            "1e-5",
        ],
        "--sampling-rate",
    );
}

#[test]
fn bench_dp_writes_accuracy_against_epsilon() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("study");
    let mut args = vec!["bench", "dp", "--noise-multipliers", "0,0.6,1.2"];
    args.extend(mnist_logreg(&[
        "--clients",
        "20",
        "--fraction",
        "0.5",
        "--rounds",
        "3",
        "--dp-clip",
        "0.5",
        "--out",
        out.to_str().expect("utf-8"),
    ]));
    run_ok(&args);
    let csv = std::fs::read_to_string(out.join("results.csv")).expect("results.csv");
    let rows: Vec<Vec<&str>> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect();
    assert_eq!(rows.len(), 3, "{csv}");
    assert_eq!(
        rows[0][1], "inf",
        "the reference run spends no privacy: {csv}"
    );
    let eps: Vec<f64> = rows[1..]
        .iter()
        .map(|r| r[1].parse().expect("epsilon"))
        .collect();
    let want = cli_epsilon("0.5", "0.6", 3);
    assert!((eps[0] - want).abs() < 1e-3, "{eps:?} vs {want}");
    assert!(eps[1] < eps[0], "more noise, less epsilon: {eps:?}");
    let svg = std::fs::read_to_string(out.join("accuracy-vs-epsilon.svg")).expect("chart");
    assert!(svg.contains("epsilon") && svg.contains("z=1.2") && svg.contains("no privacy"));
    assert!(out.join("z1.2/history.json").exists());
}

/// A 20-node, 5-round logistic-regression run on the MNIST subset with `extra` flags; returns
/// the history and the printed output.
fn attacked_run(dir: &Path, extra: &[&str]) -> (Value, String) {
    let out_dir = dir.to_str().expect("utf-8");
    let mut args = vec!["simulate", "--out", out_dir];
    args.extend(mnist_logreg(&["--clients", "20", "--rounds", "5"]));
    args.extend_from_slice(extra);
    let out = run_ok(&args);
    (written_history(dir), stdout(&out))
}

fn final_accuracy(h: &Value) -> f64 {
    h["final"]["accuracy"].as_f64().expect("final accuracy")
}

#[test]
fn sign_flip_attackers_break_fedavg_but_not_median_or_krum() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let attack = ["--attackers", "0.2", "--attack", "sign-flip"];
    let (clean, _) = attacked_run(&tmp.path().join("clean"), &[]);
    let (mean, _) = attacked_run(&tmp.path().join("mean"), &attack);
    let mut median_args = attack.to_vec();
    median_args.extend(["--aggregator", "median"]);
    let (median, _) = attacked_run(&tmp.path().join("median"), &median_args);
    let mut krum_args = attack.to_vec();
    krum_args.extend(["--aggregator", "krum", "--byzantine", "4"]);
    let (krum, printed) = attacked_run(&tmp.path().join("krum"), &krum_args);
    let (clean, mean, median, krum) = (
        final_accuracy(&clean),
        final_accuracy(&mean),
        final_accuracy(&median),
        final_accuracy(&krum),
    );
    eprintln!(
        "no attack {clean:.4}; sign flip: mean {mean:.4}, median {median:.4}, krum {krum:.4}"
    );
    assert!(
        mean < 0.3,
        "FedAvg should collapse under 20% sign flips: {mean}"
    );
    assert!(
        median > clean - 0.05,
        "median {median} vs no attack {clean}"
    );
    assert!(krum > clean - 0.08, "krum {krum} vs no attack {clean}");
    // Four attackers, drawn from the seed, are recorded; Krum keeps one update and names the
    // nodes it left out, in history and on screen.
    let h = written_history(&tmp.path().join("krum"));
    assert_eq!(h["attackers"].as_array().map(Vec::len), Some(4));
    assert_eq!(h["config"]["aggregator"]["rule"], "krum");
    for r in h["rounds"].as_array().expect("rounds") {
        assert_eq!(r["excluded"].as_array().map(Vec::len), Some(19), "{r}");
        assert!(r["aggregation_s"].as_f64().is_some(), "{r}");
    }
    assert!(printed.contains("left out 19:"), "{printed}");
}

#[test]
fn backdoor_success_is_reported_each_round_and_the_median_resists_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let backdoor = [
        "--attackers",
        "0.2",
        "--attack",
        "backdoor",
        "--backdoor-target",
        "0",
    ];
    let (mean, printed) = attacked_run(&tmp.path().join("mean"), &backdoor);
    let mut median_args = backdoor.to_vec();
    median_args.extend(["--aggregator", "median"]);
    let (median, _) = attacked_run(&tmp.path().join("median"), &median_args);
    let asr = |h: &Value| -> Vec<f64> {
        h["rounds"]
            .as_array()
            .expect("rounds")
            .iter()
            .map(|r| r["attack_success_rate"].as_f64().expect("every round"))
            .collect()
    };
    let (mean_asr, median_asr) = (asr(&mean), asr(&median));
    eprintln!("backdoor success: mean {mean_asr:?}, median {median_asr:?}");
    assert!(
        mean_asr[4] > 0.5,
        "the backdoor should take under FedAvg: {mean_asr:?}"
    );
    assert!(
        median_asr[4] < 0.2,
        "the median should resist it: {median_asr:?}"
    );
    assert!(printed.contains("backdoor success"), "{printed}");
}

#[test]
fn bench_robust_writes_the_rule_by_attack_table() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("grid");
    let mut args = vec![
        "bench",
        "robust",
        "--rules",
        "mean,median",
        "--attacks",
        "none,sign-flip",
    ];
    args.extend(mnist_logreg(&[
        "--clients",
        "10",
        "--rounds",
        "3",
        "--attackers",
        "0.2",
        "--out",
        out.to_str().expect("utf-8"),
    ]));
    run_ok(&args);
    let table = std::fs::read_to_string(out.join("table.md")).expect("table.md");
    assert!(
        table.starts_with("| rule | none | sign-flip | aggregation per round |"),
        "{table}"
    );
    assert_eq!(table.lines().count(), 4, "{table}");
    let csv = std::fs::read_to_string(out.join("results.csv")).expect("results.csv");
    assert_eq!(csv.lines().count(), 5, "{csv}");
    assert!(out.join("median-sign-flip/history.json").exists());
}

#[test]
fn robust_rule_preconditions_and_attack_flags_get_clear_errors() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().to_str().expect("utf-8");
    assert_clean_failure(
        &[
            "simulate",
            "--out",
            out,
            "--aggregator",
            "krum",
            "--byzantine",
            "4",
        ],
        "2f + 2 = 10",
    );
    assert_clean_failure(
        &[
            "simulate",
            "--out",
            out,
            "--aggregator",
            "bulyan",
            "--byzantine",
            "2",
        ],
        "4f + 3 = 11",
    );
    assert_clean_failure(
        &["simulate", "--out", out, "--aggregator", "krumm"],
        "krumm",
    );
    assert_clean_failure(
        &["simulate", "--out", out, "--attack", "sign-flip"],
        "--attackers",
    );
    assert_clean_failure(
        &[
            "simulate",
            "--out",
            out,
            "--attackers",
            "0.2",
            "--attack",
            "meteor",
        ],
        "meteor",
    );
    assert_clean_failure(
        &[
            "simulate",
            "--out",
            out,
            "--attackers",
            "0.2",
            "--attack",
            "gaussian",
            "--attack-std",
            "0",
        ],
        "--attack-std",
    );
    assert_clean_failure(
        &[
            "simulate",
            "--out",
            out,
            "--strategy",
            "scaffold",
            "--aggregator",
            "median",
        ],
        "scaffold cannot use --aggregator median",
    );
}

#[test]
fn secure_aggregation_learns_what_plain_fedavg_learns_and_counts_its_traffic() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let base = mnist_logreg(&["--clients", "20", "--rounds", "3"]);
    let plain = simulate(&tmp.path().join("plain"), &base);
    let mut args = base.clone();
    args.extend([
        "--secagg",
        "--secagg-neighbours",
        "6",
        "--strategy",
        "fedadam",
    ]);
    let fedadam_secure = simulate(&tmp.path().join("adam"), &args);
    args.truncate(base.len() + 3);
    let secure = simulate(&tmp.path().join("secure"), &args);
    // The unmasked sum differs from the plain one only by quantisation (2^22 levels).
    let (a, b) = (final_accuracy(&plain), final_accuracy(&secure));
    assert!((a - b).abs() < 0.005, "plain {a}, secure {b}");
    assert!(final_accuracy(&fedadam_secure) > 0.3);
    let round = &secure["rounds"][0];
    assert_eq!(round["participants"], 20);
    // Keys, sealed shares and revealed shares ride on top of the masked vectors.
    let up = |h: &Value| h["rounds"][0]["bytes_up"].as_u64().expect("bytes_up");
    assert!(
        up(&secure) > up(&plain),
        "{} vs {}",
        up(&secure),
        up(&plain)
    );
    assert_eq!(secure["config"]["secagg"]["neighbours"], 6);
}

#[test]
fn secure_aggregation_refuses_what_needs_each_update() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().to_str().expect("utf-8");
    for (extra, needle) in [
        (vec!["--strategy", "scaffold"], "SCAFFOLD"),
        (vec!["--strategy", "fednova"], "FedNova"),
        (vec!["--aggregator", "median"], "robust rules"),
        (vec!["--norm-bound", "1"], "--norm-bound"),
        (
            vec!["--dp-noise-multiplier", "1", "--dp-clip", "1"],
            "distributed DP",
        ),
        (
            vec!["--attackers", "0.2", "--attack", "sign-flip"],
            "model-poisoning",
        ),
        (
            vec!["--secagg-threshold", "1"],
            "threshold must be at least 2",
        ),
    ] {
        let mut args = vec!["simulate", "--out", out, "--secagg"];
        args.extend(mnist_logreg(&["--clients", "10", "--rounds", "1"]));
        args.extend(extra);
        assert_clean_failure(&args, needle);
    }
    assert_clean_failure(
        &["simulate", "--out", out, "--secagg-neighbours", "4"],
        "--secagg",
    );
}

#[test]
fn secure_aggregation_carries_distributed_dp_noise_unchanged() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let base = mnist_logreg(&[
        "--clients",
        "20",
        "--fraction",
        "0.5",
        "--rounds",
        "3",
        "--dp-noise-multiplier",
        "0.5",
        "--dp-clip",
        "1",
        "--dp-placement",
        "distributed",
    ]);
    let plain = simulate(&tmp.path().join("plain"), &base);
    let mut args = base.clone();
    args.extend(["--secagg", "--secagg-neighbours", "4"]);
    let secure = simulate(&tmp.path().join("secure"), &args);
    // Nodes noise before masking, so the accounting is the same and the sum differs only by
    // quantisation.
    for (p, s) in plain["rounds"]
        .as_array()
        .expect("rounds")
        .iter()
        .zip(secure["rounds"].as_array().expect("rounds"))
    {
        assert_eq!(p["epsilon"], s["epsilon"]);
        assert_eq!(p["participants"], s["participants"]);
    }
    let (a, b) = (final_accuracy(&plain), final_accuracy(&secure));
    assert!((a - b).abs() < 0.005, "plain {a}, secure {b}");
}
