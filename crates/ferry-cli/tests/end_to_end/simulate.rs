//! End-to-end: the real `ferry` binary, run as a user would: simulations, their outputs and
//! options, evaluation of a saved model, and the benchmarks.
//!
//! Needs the datasets and Python packages that `scripts/install-deps.sh` installs.

use std::process::Command;

use serde_json::Value;

use crate::support::cli::{
    assert_clean_failure, ferry_stdout, mnist_logreg, simulate, stderr, stdout, written_history,
};

#[test]
fn fashion_mnist_fedavg_learns_and_writes_every_output() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let h = simulate(
        tmp.path(),
        &["--rounds", "3", "--clients", "10", "--seed", "1"],
    );
    let rounds = h["rounds"].as_array().expect("rounds");
    assert_eq!(rounds.len(), 3);
    let acc: Vec<f64> = rounds
        .iter()
        .map(|r| r["accuracy"].as_f64().expect("accuracy"))
        .collect();
    assert!(acc.iter().all(|a| (0.0..=1.0).contains(a)));
    assert!(acc[2] > acc[0], "accuracy should rise: {acc:?}");
    assert!(
        acc[2] > 0.65,
        "LeNet on Fashion-MNIST after 3 FedAvg rounds: {acc:?}"
    );
    for r in rounds {
        assert_eq!(r["participants"], 10);
        assert_eq!(r["bytes_up"], 10 * 44_426 * 4);
        assert_eq!(r["bytes_down"], 10 * 44_426 * 4);
        assert!(r["wall_s"].as_f64().is_some(), "{r}");
    }
    assert_eq!(h["final"]["accuracy"], rounds[2]["accuracy"]);
    assert_eq!(h["config"]["seed"], 1);

    let csv = std::fs::read_to_string(tmp.path().join("history.csv")).expect("csv");
    assert_eq!(csv.lines().count(), 4);
    assert!(csv.starts_with("round,accuracy,loss,participants"));
    // The last ten columns are history.json's accuracy per class, round by round.
    let header: Vec<&str> = csv.lines().next().expect("header").split(',').collect();
    assert_eq!(header[header.len() - 10..].first(), Some(&"class_0"));
    assert_eq!(header.last(), Some(&"class_9"));
    for (line, r) in csv.lines().skip(1).zip(rounds) {
        let cells: Vec<&str> = line.split(',').collect();
        let from_csv: Vec<f64> = cells[cells.len() - 10..]
            .iter()
            .map(|c| c.parse().expect("a class accuracy"))
            .collect();
        let from_json: Vec<f64> = r["class_accuracy"]
            .as_array()
            .expect("class_accuracy")
            .iter()
            .map(|a| a.as_f64().expect("every class is in the test set"))
            .collect();
        assert_eq!(from_csv, from_json);
    }
    let svg = std::fs::read_to_string(tmp.path().join("accuracy.svg")).expect("svg");
    assert!(svg.contains("<svg") && svg.contains("test accuracy") && svg.contains("polyline"));

    let model = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&model).expect("model file");
    let sha = ferry_core::model::sha256_hex(&bytes);
    assert_eq!(h["final"]["model_sha256"], sha.as_str());
    let script = "import sys\nfrom safetensors.numpy import load_file\nd = load_file(sys.argv[1])\nfor k in sorted(d): print(k, list(d[k].shape), d[k].dtype)";
    let py = Command::new(crate::support::python3())
        .args(["-c", script, model.to_str().expect("utf-8")])
        .output()
        .expect("python3 runs");
    assert!(
        py.status.success(),
        "Python safetensors could not load the model: {}",
        stderr(&py)
    );
    let listing = stdout(&py);
    assert!(
        listing.contains("conv1.weight [6, 1, 5, 5] float32"),
        "{listing}"
    );
    assert!(listing.contains("fc3.bias [10] float32"), "{listing}");
    assert_eq!(listing.lines().count(), 10);
}

#[test]
fn same_seed_same_model_on_any_thread_count() {
    let a = tempfile::tempdir().expect("tempdir");
    let b = tempfile::tempdir().expect("tempdir");
    let c = tempfile::tempdir().expect("tempdir");
    let args = [
        "--dataset",
        "mnist-subset",
        "--rounds",
        "2",
        "--clients",
        "5",
        "--partition",
        "dirichlet:0.5",
        "--seed",
        "4",
    ];
    let one = simulate(a.path(), &[&args[..], &["--threads", "1"]].concat());
    let two = simulate(b.path(), &[&args[..], &["--threads", "2"]].concat());
    let three = simulate(c.path(), &[&args[..], &["--threads", "3"]].concat());
    assert_eq!(one["final"]["model_sha256"], two["final"]["model_sha256"]);
    assert_eq!(one["final"]["model_sha256"], three["final"]["model_sha256"]);
    let other = tempfile::tempdir().expect("tempdir");
    let args_seed5: Vec<&str> = args
        .iter()
        .map(|a| if *a == "4" { "5" } else { a })
        .collect();
    let different = simulate(other.path(), &args_seed5);
    assert_ne!(
        one["final"]["model_sha256"],
        different["final"]["model_sha256"]
    );
}

#[test]
fn non_iid_partitions_run_with_fewer_participants() {
    for partition in [
        "dirichlet:0.5",
        "labels:2",
        "classes:0+1/2+3/4+5/6+7/8+9/0+9/1+8/2+7/3+6/4+5",
    ] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let h = simulate(
            tmp.path(),
            &[
                "--rounds",
                "2",
                "--clients",
                "10",
                "--fraction",
                "0.5",
                "--partition",
                partition,
                "--model",
                "mlp",
            ],
        );
        assert_eq!(h["config"]["partition"], partition);
        for r in h["rounds"].as_array().expect("rounds") {
            assert_eq!(r["participants"], 5, "{partition}");
            assert!(
                r["loss"].as_f64().is_some_and(f64::is_finite),
                "{partition}: {r}"
            );
        }
        if partition == "dirichlet:0.5" {
            // Mild label skew still learns; labels:2 may sit at chance for the first rounds.
            let acc = h["final"]["accuracy"].as_f64().expect("accuracy");
            assert!(acc > 0.3, "{partition}: better than chance, got {acc}");
        }
    }
}

#[test]
fn config_file_sets_options_and_flags_override_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("run.toml");
    std::fs::write(
        &config,
        "dataset = \"mnist-subset\"\nmodel = \"logreg\"\nrounds = 3\nclients = 4\nseed = 9\n",
    )
    .expect("write");
    let out = tmp.path().join("out");
    let h = simulate(
        &out,
        &["--config", config.to_str().expect("utf-8"), "--rounds", "2"],
    );
    assert_eq!(h["rounds"].as_array().map(Vec::len), Some(2));
    assert_eq!(h["config"]["model"], "logreg");
    assert_eq!(h["config"]["clients"], 4);
}

#[test]
fn target_accuracy_stops_early() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let h = simulate(
        tmp.path(),
        &mnist_logreg(&[
            "--clients",
            "4",
            "--rounds",
            "20",
            "--target-accuracy",
            "0.5",
        ]),
    );
    let n = h["rounds"].as_array().map_or(0, Vec::len);
    assert!(n < 20, "should stop before 20 rounds, ran {n}");
    assert_eq!(h["final"]["stop"], "target_reached");
}

#[test]
fn virtual_nodes_evaluate_on_their_held_out_share_when_asked() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out_dir = tmp.path().to_str().expect("utf-8");
    let args = mnist_logreg(&[
        "--clients",
        "4",
        "--rounds",
        "3",
        "--evaluate-every",
        "2",
        "--evaluate-fraction",
        "0.5",
        "--partition",
        "dirichlet:0.5",
    ]);
    let printed = ferry_stdout(&[&["simulate", "--out", out_dir][..], &args].concat());
    let h = written_history(tmp.path());
    let rounds = h["rounds"].as_array().expect("rounds");
    let evaluated: Vec<u64> = rounds
        .iter()
        .filter(|r| r["federated"].is_object())
        .map(|r| r["round"].as_u64().expect("round"))
        .collect();
    assert_eq!(evaluated, [2, 3], "every 2 rounds and the last");
    let last = &rounds[2]["federated"];
    assert_eq!(last["nodes"], 2, "half of 4 nodes: {last}");
    let (min, median, max, accuracy) = (
        last["accuracy_min"].as_f64().expect("min"),
        last["accuracy_median"].as_f64().expect("median"),
        last["accuracy_max"].as_f64().expect("max"),
        last["accuracy"].as_f64().expect("accuracy"),
    );
    assert!(
        min <= median && median <= max && min <= accuracy && accuracy <= max,
        "{last}"
    );
    assert!(last["metrics"]["class_0_accuracy"].is_number(), "{last}");
    assert!(printed.contains("federated accuracy"), "{printed}");
    assert_eq!(h["final"]["federated"], rounds[2]["federated"]);
    // The nodes held 10% of their examples out of training; at 20% they score twice as many.
    let examples = last["num_examples"].as_f64().expect("examples");
    let twice = tempfile::tempdir().expect("tempdir");
    let more = simulate(
        twice.path(),
        &[&args[..], &["--evaluate-holdout", "0.2"]].concat(),
    );
    let more = more["rounds"][2]["federated"]["num_examples"]
        .as_f64()
        .expect("examples");
    assert!(
        (1.8..2.2).contains(&(more / examples)),
        "{examples} then {more}"
    );
}

#[test]
fn baselines_report_central_and_local_accuracy() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let h = simulate(
        tmp.path(),
        &mnist_logreg(&[
            "--clients",
            "10",
            "--rounds",
            "2",
            "--partition",
            "labels:2",
            "--baselines",
            "--evaluate-every",
            "2",
        ]),
    );
    let b = &h["baselines"];
    assert_eq!(b["epochs"], 2);
    assert_eq!(b["local_accuracies"].as_array().map(Vec::len), Some(10));
    let central = b["central_accuracy"].as_f64().expect("central");
    let local_mean = b["local_mean_accuracy"].as_f64().expect("mean");
    let worst = b["local_worst_accuracy"].as_f64().expect("worst");
    // A node holding 2 of 10 classes cannot score much above 20% on the full test set.
    assert!(
        worst <= local_mean && local_mean < 0.45,
        "local-only on labels:2: {local_mean}"
    );
    assert!(
        central > 0.8,
        "pooled training of logreg on MNIST: {central}"
    );
    // Each site's gain: the federated model's accuracy on the site's held-out data minus its
    // own model's there.
    let site_local = b["local_site_accuracies"].as_object().expect("per site");
    assert_eq!(site_local.len(), 10);
    let federated = h["final"]["federated"]["node_accuracy"]
        .as_object()
        .expect("federated per site");
    let gain = &h["final"]["gain_over_local"];
    assert_eq!(gain["sites"], 10);
    for (site, g) in gain["per_site"].as_object().expect("per site") {
        let expected = federated[site].as_f64().expect("f") - site_local[site].as_f64().expect("l");
        assert!(
            (g.as_f64().expect("gain") - expected).abs() < 1e-12,
            "{site}"
        );
    }
    let worse = gain["per_site"]
        .as_object()
        .expect("per site")
        .values()
        .filter(|g| g.as_f64().is_some_and(|g| g < 0.0))
        .count();
    assert_eq!(gain["sites_worse_off"], worse);
}

#[test]
fn evaluate_scores_a_saved_model_class_by_class() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let h = simulate(
        tmp.path(),
        &mnist_logreg(&["--clients", "4", "--rounds", "2", "--partition", "labels:2"]),
    );
    let model = tmp.path().join("model.safetensors");
    let model_arg = model.to_str().expect("utf-8");
    let report: Value = serde_json::from_str(&ferry_stdout(&[
        "evaluate",
        model_arg,
        "--dataset",
        "mnist-subset",
        "--json",
    ]))
    .expect("one JSON object");
    assert_eq!(report["model"], "logreg", "recognised from its tensors");
    assert_eq!(report["model_sha256"], h["final"]["model_sha256"]);
    assert_eq!(report["accuracy"], h["final"]["accuracy"]);
    assert_eq!(report["loss"], h["final"]["loss"]);
    let classes = report["classes"].as_array().expect("classes");
    assert_eq!(classes.len(), 10);
    let last_round = h["rounds"]
        .as_array()
        .and_then(|r| r.last())
        .expect("rounds");
    let recorded: Vec<&Value> = classes.iter().map(|c| &c["accuracy"]).collect();
    assert_eq!(
        last_round["class_accuracy"]
            .as_array()
            .map(|a| a.iter().collect::<Vec<_>>()),
        Some(recorded),
        "history.json records the final model's per-class accuracy"
    );
    let (mut examples, mut correct) = (0, 0);
    for (c, class) in classes.iter().enumerate() {
        let row: Vec<u64> = class["predicted"]
            .as_array()
            .expect("confusion row")
            .iter()
            .map(|v| v.as_u64().expect("count"))
            .collect();
        assert_eq!(class["examples"], row.iter().sum::<u64>());
        let accuracy = class["accuracy"].as_f64().expect("accuracy");
        assert!((accuracy - row[c] as f64 / row.iter().sum::<u64>() as f64).abs() < 1e-12);
        examples += row.iter().sum::<u64>();
        correct += row[c];
    }
    assert_eq!(report["examples"], examples);
    let overall = report["accuracy"].as_f64().expect("accuracy");
    assert!((overall - correct as f64 / examples as f64).abs() < 1e-12);

    let table = ferry_stdout(&["evaluate", model_arg, "--dataset", "mnist-subset"]);
    assert!(table.contains("most often taken for"), "{table}");
    assert!(
        table.lines().any(|l| l.starts_with("9 9 ")),
        "one row per digit: {table}"
    );
    assert_clean_failure(
        &[
            "evaluate",
            tmp.path()
                .join("absent.safetensors")
                .to_str()
                .expect("utf-8"),
        ],
        "cannot read the model file",
    );
    let csv = tmp.path().join("history.csv");
    assert_clean_failure(
        &["evaluate", csv.to_str().expect("utf-8")],
        "is not a model Ferry can read",
    );
}

#[test]
fn bad_input_gets_one_line_errors() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().to_str().expect("utf-8");
    assert_clean_failure(
        &["simulate", "--out", out, "--partition", "zipf:2"],
        "zipf:2",
    );
    for (flag, value) in [
        ("--fraction", "1.5"),
        ("--evaluate-holdout", "1.5"),
        ("--evaluate-fraction", "0"),
    ] {
        assert_clean_failure(&["simulate", "--out", out, flag, value], flag);
    }
    assert_clean_failure(
        &["simulate", "--out", out, "--dataset", "cifar10"],
        "cifar10",
    );
    assert_clean_failure(&["simulate", "--out", out, "--model", "resnet"], "resnet");
    assert_clean_failure(
        &["simulate", "--out", out, "--strategy", "fedfoo"],
        "fedfoo",
    );
    let missing = tmp.path().join("nope.toml");
    assert_clean_failure(
        &["simulate", "--config", missing.to_str().expect("utf-8")],
        "nope.toml",
    );
    assert_clean_failure(&["simulate", "--config", out], "cannot read config file");
    let broken = tmp.path().join("broken.toml");
    std::fs::write(&broken, "rounds = \"many\"\n").expect("write");
    assert_clean_failure(
        &["simulate", "--config", broken.to_str().expect("utf-8")],
        "broken.toml",
    );
}

#[test]
fn bench_aggregate_holds_a_few_models_not_one_per_client() {
    let text = ferry_stdout(&[
        "bench",
        "aggregate",
        "--clients",
        "40",
        "--params",
        "2000000",
    ]);
    let line = text
        .lines()
        .find(|l| l.starts_with("peak RSS"))
        .expect("peak RSS line");
    let sizes: f64 = line
        .split('=')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .expect("model-size ratio");
    // Holding every update would be 40 model sizes; streaming keeps two inputs, the f64
    // accumulator (two sizes) and the result, plus the process itself.
    assert!(sizes < 12.0, "peak RSS is {sizes} model sizes: {line}");
}

/// A short run of the Ferry half of benchmarks/peers/flower: one deployed round with node
/// processes over TLS, measured against bare loopback TLS.
#[test]
fn bench_round_reports_the_round_its_processes_and_the_tls_ceiling() {
    let printed = ferry_stdout(&[
        "bench",
        "round",
        "--clients",
        "2",
        "--params",
        "100000",
        "--json",
    ]);
    let figures: Value = printed
        .lines()
        .rev()
        .find_map(|line| serde_json::from_str(line).ok())
        .expect("a JSON line");
    assert_eq!(
        (figures["nodes"].as_u64(), figures["params"].as_u64()),
        (Some(2), Some(100_000))
    );
    for key in [
        "round_s",
        "throughput_gbps",
        "tls_ceiling_gbps",
        "peak_rss_coordinator_mb",
        "peak_rss_node_mb",
    ] {
        assert!(
            figures[key].as_f64().is_some_and(|v| v > 0.0),
            "{key}: {figures}"
        );
    }
    let tls = ferry_stdout(&["bench", "tls", "--streams", "2", "--megabytes", "2"]);
    assert!(
        tls.contains("1 stream(s)") && tls.contains("2 stream(s)"),
        "{tls}"
    );
}

#[test]
fn bench_train_reports_throughput() {
    let text = ferry_stdout(&[
        "bench",
        "train",
        "--model",
        "logreg",
        "--seconds",
        "0.2",
        "--threads",
        "1",
    ]);
    let row = text
        .lines()
        .find(|l| l.starts_with("logreg"))
        .expect("logreg row");
    let fields: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(fields[1], "7850");
    assert!(fields[2].parse::<f64>().expect("img/s") > 0.0);
}

#[test]
fn every_strategy_improves_on_label_skew_and_reports_its_state() {
    // MLP: 199,210 parameters; momentum keeps one vector, the adaptive optimizers two.
    let params = 199_210u64;
    for (strategy, state_vectors, upload_vectors) in [
        ("fedavg", 0, 1),
        ("fedavgm", 1, 1),
        ("fedprox", 0, 1),
        ("scaffold", 1, 2),
        ("fednova", 0, 1),
        ("fedadagrad", 2, 1),
        ("fedadam", 2, 1),
        ("fedyogi", 2, 1),
        ("qfedavg", 0, 1),
    ] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let h = simulate(
            tmp.path(),
            &[
                "--dataset",
                "mnist-subset",
                "--model",
                "mlp",
                "--partition",
                "labels:2",
                "--rounds",
                "5",
                "--strategy",
                strategy,
            ],
        );
        let rounds = h["rounds"].as_array().expect("rounds");
        let acc: Vec<f64> = rounds
            .iter()
            .map(|r| r["accuracy"].as_f64().expect("accuracy"))
            .collect();
        assert!(
            rounds
                .iter()
                .all(|r| r["loss"].as_f64().is_some_and(f64::is_finite)),
            "{strategy} diverged: {acc:?}"
        );
        let best_later = acc[1..].iter().copied().fold(0.0, f64::max);
        assert!(
            best_later > acc[0],
            "{strategy} never improved on round 1: {acc:?}"
        );
        assert_eq!(
            rounds[4]["strategy_state_bytes"],
            state_vectors * params * 4,
            "{strategy}"
        );
        assert_eq!(h["config"]["strategy"], strategy);
        // SCAFFOLD uploads its control-variate change beside the delta: twice the bytes.
        assert_eq!(
            rounds[0]["bytes_up"],
            upload_vectors * 10 * params * 4,
            "{strategy}"
        );
        assert_eq!(rounds[0]["bytes_down"], 10 * params * 4, "{strategy}");
    }
}

#[test]
fn bench_niid_appends_one_row_per_seed_and_keeps_each_run() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let results = tmp.path().join("niid.csv");
    let runs = tmp.path().join("runs");
    let args = [
        "bench",
        "niid",
        "--strategy",
        "fednova",
        "--partition",
        "labels:3",
        "--seeds",
        "0,1",
        "--rounds",
        "1",
        "--local-epochs",
        "1",
    ];
    let paths = [
        "--results",
        results.to_str().expect("utf-8"),
        "--out",
        runs.to_str().expect("utf-8"),
    ];
    let printed = ferry_stdout(&[&args[..], &paths[..]].concat());
    for seed in ["0", "1"] {
        let dir = runs.join(format!("fednova-labels3-s{seed}"));
        let model = std::fs::read(dir.join("model.safetensors")).expect("final model");
        let h = written_history(&dir);
        let sha = ferry_core::model::sha256_hex(&model);
        assert_eq!(h["final"]["model_sha256"], sha.as_str());
        assert!(
            printed.contains(&format!("model_sha256 {sha}")),
            "{printed}"
        );
        assert!(dir.join("accuracy.svg").exists());
    }
    let text = std::fs::read_to_string(&results).expect("results file");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines[0].starts_with("date,command,strategy,partition,seed"));
    for (row, seed) in lines[1..].iter().zip(["0", "1"]) {
        let fields: Vec<&str> = row.rsplitn(4, ',').collect();
        let accuracy: f64 = fields[2].parse().expect("final accuracy");
        assert!(accuracy > 0.1 && accuracy <= 1.0, "{row}");
        assert!(
            row.contains(&format!(",fednova,labels:3,{seed},1,1,")),
            "{row}"
        );
    }
}
