//! `ferry simulate` on a simulated fleet: compressed runs against an uncompressed one at the
//! same seed, an asynchronous run that records versions with their staleness on the
//! simulated clock, and `ferry bench fleet-learning` end to end.

use crate::support;

use serde_json::Value;
use support::cli::{assert_clean_failure, mnist_logreg, simulate};

/// Logistic regression on MNIST: 784 x 10 weights and 10 biases.
const PARAMS: u64 = 7850;
const NODES: u64 = 4;
const ROUNDS: usize = 4;

fn rounds(history: &Value) -> &Vec<Value> {
    history["rounds"].as_array().expect("rounds")
}

fn total(history: &Value, key: &str) -> u64 {
    rounds(history)
        .iter()
        .map(|r| r[key].as_u64().expect("bytes"))
        .sum()
}

fn final_accuracy(history: &Value) -> f64 {
    history["final"]["accuracy"].as_f64().expect("accuracy")
}

#[test]
fn compressed_runs_send_what_their_encoding_says_and_learn_as_f32_does() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run = |name: &str, compress: &str| {
        simulate(
            &tmp.path().join(name),
            &mnist_logreg(&[
                "--clients",
                "4",
                "--rounds",
                "4",
                "--seed",
                "3",
                "--compress",
                compress,
            ]),
        )
    };
    let plain = run("none", "none");
    let updates = NODES * ROUNDS as u64;
    assert_eq!(total(&plain, "bytes_up"), updates * 4 * PARAMS);
    let int8 = run("int8", "int8");
    // One byte a value and one 4-byte scale per 1,024 values: 8 scales.
    assert_eq!(total(&int8, "bytes_up"), updates * (PARAMS + 4 * 8));
    assert_eq!(total(&int8, "bytes_down"), total(&plain, "bytes_down"));
    let half = run("bf16", "bf16");
    assert_eq!(total(&half, "bytes_up"), updates * 2 * PARAMS);
    assert_eq!(total(&half, "bytes_down"), updates * 2 * PARAMS);
    let top = run("topk", "topk:0.1");
    // 785 (index, value) pairs of 8 bytes.
    assert_eq!(total(&top, "bytes_up"), updates * 8 * 785);
    for (name, run) in [("int8", &int8), ("bf16", &half), ("topk", &top)] {
        assert_eq!(run["config"]["compress"], name.replace("topk", "topk:0.1"));
        let gap = final_accuracy(&plain) - final_accuracy(run);
        assert!(gap < 0.05, "{name} ends {gap} below f32");
        // Different bits on the wire, so a different model.
        assert_ne!(
            run["final"]["model_sha256"], plain["final"]["model_sha256"],
            "{name}"
        );
    }
}

#[test]
fn an_asynchronous_run_records_versions_with_staleness_on_the_simulated_clock() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let history = simulate(
        tmp.path(),
        &mnist_logreg(&[
            "--clients",
            "8",
            "--rounds",
            "6",
            "--mode",
            "async",
            "--buffer-size",
            "2",
            "--max-concurrency",
            "6",
            "--speed",
            "stragglers:0.25,20",
            "--bandwidth",
            "1,10",
        ]),
    );
    assert_eq!(history["config"]["mode"], "async");
    assert_eq!(history["config"]["fedbuff"]["buffer_size"], 2);
    assert_eq!(history["config"]["devices"]["speed"], "stragglers:0.25,20");
    let versions = rounds(&history);
    assert_eq!(versions.len(), 6);
    let mut clock = 0.0;
    for v in versions {
        assert_eq!(v["participants"], 2, "{v}");
        let at = v["sim_time_s"].as_f64().expect("simulated time");
        assert!(at >= clock, "the clock runs forward: {v}");
        clock = at;
        assert!(v["staleness"]["mean_weight"].as_f64().expect("weight") <= 1.0);
    }
    let csv = std::fs::read_to_string(tmp.path().join("history.csv")).expect("csv");
    assert!(
        csv.lines()
            .next()
            .expect("header")
            .contains("sim_time_s,staleness_mean")
    );
    // The first version comes when the first two fast tasks are done. Two stragglers 20 times
    // slower never hold a version up: the six fast nodes make all six versions in a few of
    // their tasks' time, far less than one straggler's task.
    let first = versions[0]["sim_time_s"].as_f64().expect("time");
    assert!(
        clock < 10.0 * first,
        "six versions took {clock} s, the first {first} s"
    );
}

#[test]
fn fleet_options_that_cannot_work_are_refused_with_the_reason() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["--compress", "int8", "--secagg"],
            "cannot be used with SecAgg+",
        ),
        (
            &["--mode", "async", "--secagg"],
            "SecAgg+ is not available in asynchronous mode",
        ),
        (&["--round-deadline", "5"], "give the run simulated devices"),
        (
            &["--trace", "/nonexistent/trace.csv"],
            "cannot read the trace",
        ),
    ];
    for (flags, needle) in cases {
        let mut args = vec!["simulate"];
        args.extend(mnist_logreg(flags));
        assert_clean_failure(&args, needle);
    }
}

#[test]
fn bench_fleet_learning_draws_its_fleet_and_compares_the_runs() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let path = |name: &str| dir.join(name).display().to_string();
    let out = support::run_ok(&[
        "bench",
        "fleet-learning",
        "--rounds",
        "2",
        "--versions",
        "3",
        "--runs",
        "sync,fedbuff,int8",
        "--trace",
        &path("trace.csv"),
        "--out",
        &path("runs"),
        "--results",
        &path("results.csv"),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("drawn and written to"), "{stdout}");
    for run in ["| sync |", "| fedbuff |", "| int8 |"] {
        assert!(stdout.contains(run), "{stdout}");
    }
    let trace = std::fs::read_to_string(path("trace.csv")).expect("trace");
    let slow = trace
        .lines()
        .skip(1)
        .filter_map(|l| l.split(',').next().zip(l.split(',').nth(3)))
        .filter(|(_, speed)| *speed == "0.1")
        .map(|(node, _)| node)
        .collect::<std::collections::BTreeSet<_>>();
    assert_eq!(slow.len(), 30, "30 of the 100 nodes are 10 times slower");
    let results = std::fs::read_to_string(path("results.csv")).expect("results");
    assert_eq!(results.lines().count(), 4, "{results}");
    // Each int8 update is one byte a value and a scale per 1,024 values; lenet has 44,426.
    let history = support::cli::written_history(&dir.join("runs/int8"));
    for r in rounds(&history) {
        let participants = r["participants"].as_u64().expect("participants");
        assert_eq!(
            r["bytes_up"].as_u64(),
            Some(participants * (44_426 + 4 * 44)),
            "{r}"
        );
    }
    for chart in ["accuracy-vs-time.svg", "accuracy-vs-uplink.svg"] {
        assert!(dir.join("runs").join(chart).exists(), "{chart}");
    }
}
