//! A model Ferry has never seen, deployed: the server starts from the user's safetensors file
//! (f16, f64 and 0-d f32 parameters and an integer counter, no central test set), two nodes
//! train it with an external-command trainer, and the final model comes back with every
//! tensor in its own dtype, the integer counter as the initial model had it, and the
//! parameters moved as FedAvg of the nodes' work says.
//!
//! Needs Python with numpy and safetensors (`scripts/install-deps.sh`).

use crate::support;

use std::{fs, path::Path, time::Duration};

use support::{TestServer, history, server_succeeds, write_csv};

const ROUNDS: u32 = 3;

/// Writes the initial model: weights at 0, an f64 bias at -1, a 0-d scale at 3, and a
/// step counter of 5.
fn write_initial_model(path: &Path) {
    let script = format!(
        "import numpy as np\nfrom safetensors.numpy import save_file\n\
         save_file({{'enc.weight': np.zeros((4, 3), np.float16), \
         'head.bias': np.full(3, -1.0, np.float64), 'scale': np.array(3.0, np.float32), \
         'bn.num_batches_tracked': np.array(5, np.int64)}}, '{}')\n",
        path.display()
    );
    python(&script);
}

/// Runs a Python snippet, failing the test with its stderr if it fails.
fn python(script: &str) {
    support::run_python(script, &[]);
}

/// A trainer that moves every float tensor half way to 1 (in its own dtype) and bumps the
/// counter, which the server must not take.
const TRAINER: &str = r#"import json, sys
import numpy as np
from safetensors.numpy import load_file, save_file
task = json.load(open(sys.argv[-1]))
tensors = load_file(task["model_in"])
out = {}
for name, t in tensors.items():
    if np.issubdtype(t.dtype, np.floating):
        out[name] = np.asarray(t + 0.5 * (1 - t.astype(np.float64))).astype(t.dtype)
    else:
        out[name] = np.asarray(t + 100)
save_file(out, task["model_out"])
json.dump({"num_examples": 10, "metrics": {"train_loss": 0.5}}, open(task["result_out"], "w"))
"#;

#[test]
fn a_users_own_model_is_federated_with_its_dtypes_and_carried_tensors_intact() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let initial = dir.join("init.safetensors");
    write_initial_model(&initial);
    let trainer = dir.join("trainer.py");
    fs::write(&trainer, TRAINER).expect("trainer");
    let server = TestServer::new(
        dir,
        &[],
        false,
        &format!(
            "initial_model = \"{}\"\nclients = 2\nmin_clients = 2\nrounds = {ROUNDS}\n\
             round_timeout = 60\n",
            initial.display()
        ),
    );
    let (mut processes, logs) =
        support::python_trainer_fleet(&server, dir, 2, &trainer, |_| String::new());
    let server_log = server_succeeds(&mut processes, &logs, Duration::from_secs(120));
    assert!(
        server_log.contains("(3 tensors, 16 parameters, 1 carried; no central test set)"),
        "{server_log}"
    );
    let h = history(&server.out).expect("history.json");
    let rounds = h["rounds"].as_array().expect("rounds");
    assert_eq!(rounds.len(), ROUNDS as usize);
    for r in rounds {
        assert_eq!(r["participants"], 2, "{r}");
        assert!(r["accuracy"].is_null(), "no central test set: {r}");
    }
    // Each round halves the distance to 1: after 3 rounds 1 - (1 - w0) / 8.
    let check = format!(
        "import numpy as np\nfrom safetensors.numpy import load_file\n\
         m = load_file('{}')\n\
         assert m['enc.weight'].dtype == np.float16 and m['enc.weight'].shape == (4, 3), m\n\
         assert m['head.bias'].dtype == np.float64 and m['scale'].dtype == np.float32, m\n\
         assert m['scale'].shape == (), m['scale'].shape\n\
         assert m['bn.num_batches_tracked'].dtype == np.int64 and int(m['bn.num_batches_tracked']) == 5, m\n\
         assert np.allclose(m['enc.weight'].astype(np.float64), 1 - 1 / 8, atol=1e-3), m\n\
         assert np.allclose(m['head.bias'], 1 - 2 / 8, atol=1e-6), m\n\
         assert np.allclose(m['scale'], 1 + 2 / 8, atol=1e-6), m\n",
        server.out.join("model.safetensors").display()
    );
    python(&check);
}

#[test]
fn a_server_refuses_an_initial_model_that_is_missing_or_not_a_model() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let not_a_model = dir.join("notes.txt");
    fs::write(&not_a_model, "hello").expect("file");
    for (path, expected) in [
        (dir.join("missing.safetensors"), "No such file"),
        (not_a_model, "not a safetensors model file"),
    ] {
        let case = dir
            .join(path.file_name().expect("name"))
            .with_extension("case");
        fs::create_dir_all(&case).expect("case folder");
        let server = TestServer::new(
            &case,
            &[],
            false,
            &format!("initial_model = \"{}\"\n", path.display()),
        );
        let stderr = support::refused_at_start(&server);
        assert!(
            stderr.contains(&path.display().to_string()) && stderr.contains(expected),
            "{stderr}"
        );
    }
}

#[test]
fn simulate_continues_from_a_model_file_and_refuses_one_of_another_network() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run = |out: &Path, model: &str, extra: &[&str]| {
        let mut args = vec![
            "simulate",
            "--dataset",
            "mnist-subset",
            "--model",
            model,
            "--clients",
            "2",
            "--rounds",
            "1",
            "--out",
            out.to_str().expect("utf-8"),
        ];
        args.extend_from_slice(extra);
        support::ferry()
            .args(&args)
            .output()
            .expect("simulate runs")
    };
    let first = tmp.path().join("first");
    assert!(run(&first, "logreg", &[]).status.success());
    let model = first.join("model.safetensors");
    let second = tmp.path().join("second");
    let out = run(
        &second,
        "logreg",
        &["--initial-model", model.to_str().expect("utf-8")],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (a, b) = (
        history(&first).expect("first history"),
        history(&second).expect("second history"),
    );
    assert_eq!(
        b["config"]["initial_model"].as_str(),
        model.to_str(),
        "the file is recorded"
    );
    // One more round from where the first run ended: better than one round from scratch.
    let from_scratch = a["rounds"][0]["accuracy"].as_f64().expect("accuracy");
    let continued = b["rounds"][0]["accuracy"].as_f64().expect("accuracy");
    assert!(continued > from_scratch, "{continued} vs {from_scratch}");

    let out = run(
        &tmp.path().join("third"),
        "mlp",
        &["--initial-model", model.to_str().expect("utf-8")],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("is not a mlp network"), "{stderr}");
}

/// `ferry simulate` of logistic regression on MNIST-subset CSVs with
/// `examples/exec-trainer/train.py` as every node's long-lived trainer, nodes from
/// `node_data`, evaluating every round, with `extra` options.
fn simulate_exec_example(node_data: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/exec-trainer/train.py");
    let command = format!("{} {}", support::python3(), script.display());
    let mut args = vec![
        "simulate",
        "--dataset",
        "mnist-subset",
        "--model",
        "logreg",
        "--trainer-cmd",
        &command,
        "--trainer-mode",
        "long-lived",
        "--node-data",
        node_data.to_str().expect("utf-8"),
        "--evaluate-every",
        "1",
        "--out",
        out.to_str().expect("utf-8"),
    ];
    args.extend_from_slice(extra);
    support::run_ok(&args)
}

#[test]
fn simulate_runs_the_users_trainer_as_every_node_on_its_own_folder() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for i in 0..3 {
        write_csv(&tmp.path().join(format!("data/site-{i}")), i, 6);
    }
    let out = tmp.path().join("run");
    let pattern = tmp.path().join("data/site-*");
    let run = simulate_exec_example(&pattern, &out, &["--rounds", "3"]);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(stdout.contains("3 nodes, each training with"), "{stdout}");
    let h = history(&out).expect("history.json");
    assert_eq!(h["config"]["clients"], 3, "one node per folder");
    let rounds = h["rounds"].as_array().expect("rounds");
    assert_eq!(rounds.len(), 3);
    assert!(rounds.iter().all(|r| r["participants"] == 3), "{rounds:?}");
    let first = rounds[0]["accuracy"]
        .as_f64()
        .expect("scored on the test set");
    let last = rounds[2]["accuracy"]
        .as_f64()
        .expect("scored on the test set");
    assert!(last > first && last > 0.7, "{first} -> {last}");
    // Each node's program also scored every round's model on its own test.csv.
    let federated: Vec<f64> = rounds
        .iter()
        .map(|r| r["federated"]["accuracy"].as_f64().expect("federated"))
        .collect();
    assert!(
        rounds.iter().all(|r| r["federated"]["nodes"] == 3),
        "{rounds:?}"
    );
    assert!(federated[2] > federated[0], "{federated:?}");
    assert!(stdout.contains("federated accuracy"), "{stdout}");

    // One folder split into three nodes by a label-skew partition, as a built-in dataset is.
    write_csv(&tmp.path().join("pooled"), 0, 2);
    let split_out = tmp.path().join("split-run");
    let pooled = tmp.path().join("pooled");
    let run = simulate_exec_example(
        &pooled,
        &split_out,
        &["--rounds", "2", "--clients", "3", "--partition", "labels:4"],
    );
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(stdout.contains("into 3 nodes (labels:4)"), "{stdout}");
    let h = history(&split_out).expect("history.json");
    assert!(
        h["rounds"]
            .as_array()
            .expect("rounds")
            .iter()
            .all(|r| r["participants"] == 3 && r["federated"]["nodes"] == 3),
        "{h}"
    );
    for i in 0..3 {
        let share = std::fs::read_to_string(split_out.join(format!("data/node-{i}/train.csv")))
            .expect("the node's share");
        let classes: std::collections::BTreeSet<&str> =
            share.lines().filter_map(|l| l.split(',').next()).collect();
        assert_eq!(
            classes.len(),
            4,
            "labels:4 gives node {i} four classes: {classes:?}"
        );
    }

    let missing = support::ferry()
        .args([
            "simulate",
            "--trainer-cmd",
            "python3 train.py",
            "--node-data",
        ])
        .arg(tmp.path().join("nowhere/*"))
        .output()
        .expect("simulate runs");
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        !missing.status.success() && stderr.contains("cannot list"),
        "{stderr}"
    );
}

#[test]
fn simulate_compresses_the_users_trainer_updates_as_it_does_virtual_nodes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for i in 0..2 {
        write_csv(&tmp.path().join(format!("data/site-{i}")), i, 6);
    }
    let out = tmp.path().join("run");
    let pattern = tmp.path().join("data/site-*");
    simulate_exec_example(&pattern, &out, &["--rounds", "2", "--compress", "int8"]);
    let h = history(&out).expect("history.json");
    assert_eq!(h["config"]["compress"], "int8");
    for r in h["rounds"].as_array().expect("rounds") {
        // logreg's 7,850 values in one byte each, with 8 block scales of 4 bytes.
        let participants = r["participants"].as_u64().expect("participants");
        assert_eq!(participants, 2, "{r}");
        assert_eq!(r["bytes_up"], participants * (7850 + 4 * 8), "{r}");
    }
}
