//! `examples/pytorch` as its README runs it: Fashion-MNIST shares in one folder per site, the
//! initial model of a PyTorch network with BatchNorm that Ferry has never seen, a TLS server
//! with no central test set, three nodes training and evaluating through the Python SDK in
//! long-lived mode; the nodes' federated accuracy rises round by round, and the final model
//! loads back into the network with `strict=True`, scores on the sites' held-out data what the
//! run reported, and classifies the whole test set far better than the initial one.
//!
//! Needs the `.venv` (Debian's python3-torch, safetensors) and Fashion-MNIST that
//! `scripts/install-deps.sh` installs.

use crate::support;

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use support::{
    Killer, TestServer, client_args, history, sdk_path, server_succeeds, spawn_logged_with_env,
};

fn example(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/pytorch")
        .join(file)
}

/// Runs one of the example's scripts; returns its stdout.
fn script(file: &str, args: &[&str]) -> String {
    support::run_sdk_script(&example(file), args, None)
}

/// The accuracy `evaluate.py` prints for `model` (with `extra` arguments) after `label`.
fn printed_accuracy(model: &Path, extra: &[&str], label: &str) -> f64 {
    let mut args = vec![model.display().to_string()];
    args.extend(extra.iter().map(|a| a.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let printed = script("evaluate.py", &args);
    printed
        .trim()
        .strip_prefix(label)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("evaluate.py printed {printed}"))
}

fn test_accuracy(model: &Path) -> f64 {
    printed_accuracy(model, &[], "test accuracy ")
}

#[test]
fn the_pytorch_example_deploys_over_tls_and_its_model_loads_back_strictly() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let data = dir.join("data");
    let data_arg = data.display().to_string();
    script(
        "make_shares.py",
        &[
            "--nodes",
            "3",
            "--per-node",
            "1500",
            "--test-per-node",
            "400",
            "--out",
            &data_arg,
        ],
    );
    let initial = dir.join("init.safetensors");
    script("init_model.py", &[&initial.display().to_string()]);
    let before = test_accuracy(&initial);

    let server = TestServer::new(
        dir,
        &[],
        false,
        &format!(
            "initial_model = \"{}\"\nclients = 3\nmin_clients = 3\nrounds = 3\nlr = 0.05\n\
             round_timeout = 120\n",
            initial.display()
        ),
    );
    let mut logs = vec![dir.join("server.log")];
    let mut processes = Killer(vec![server.spawn(&logs[0])]);
    for i in 0..3 {
        let log = dir.join(format!("client-{i}.log"));
        let mut args = client_args(&server, &format!("site-{i}"));
        args.extend([
            "--trainer-cmd".into(),
            format!("{} {}", support::python3(), example("train.py").display()),
            "--trainer-mode".into(),
            "long-lived".into(),
            "--data-dir".into(),
            data.join(format!("site-{i}")).display().to_string(),
        ]);
        let sdk = sdk_path();
        processes
            .0
            .push(spawn_logged_with_env(&args, &log, &[("PYTHONPATH", &sdk)]));
        logs.push(log);
    }
    server_succeeds(&mut processes, &logs, Duration::from_secs(240));
    let h = history(&server.out).expect("history.json");
    let rounds = h["rounds"].as_array().expect("rounds");
    assert_eq!(rounds.len(), 3, "{rounds:?}");
    let mut federated = Vec::new();
    for r in rounds {
        assert_eq!(r["participants"], 3, "{r}");
        assert!(r["accuracy"].is_null(), "no central test set: {r}");
        assert!(r["train_loss"].as_f64().is_some_and(|l| l > 0.0), "{r}");
        // Every node scored every round's model on its own 400 held-out examples.
        let f = &r["federated"];
        assert_eq!(
            (f["nodes"].as_u64(), f["num_examples"].as_u64()),
            (Some(3), Some(1200)),
            "{r}"
        );
        federated.push(f["accuracy"].as_f64().expect("federated accuracy"));
    }
    eprintln!("federated accuracy by round: {federated:?}");
    assert!(
        federated[2] > federated[0],
        "the nodes' accuracy rises: {federated:?}"
    );
    // The final model loads with strict=True (evaluate.py), scores on the sites' held-out
    // data what the nodes reported, and has learned.
    let model = server.out.join("model.safetensors");
    let pattern = data.join("site-*").display().to_string();
    let held_out = printed_accuracy(&model, &["--held-out", &pattern], "held-out accuracy ");
    assert!(
        (held_out - federated[2]).abs() < 0.002,
        "held-out {held_out} vs federated {}",
        federated[2]
    );
    assert_eq!(
        h["final"]["federated"]["accuracy"],
        rounds[2]["federated"]["accuracy"]
    );
    let after = test_accuracy(&model);
    eprintln!("FashionNet test accuracy: initial {before:.4}, after 3 deployed rounds {after:.4}");
    assert!(after > 0.6 && after > before + 0.3, "{before} -> {after}");
}
