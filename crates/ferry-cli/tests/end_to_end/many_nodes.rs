//! `examples/many-nodes` as its README runs it, scaled down: Fashion-MNIST as one pooled
//! folder of CSV files, split by `ferry simulate --node-data pooled --clients N --partition
//! dirichlet:0.5` into label-skewed node folders, and LeNet in PyTorch trained through the SDK
//! by a pool of long-lived processes that serve every node. The split keeps every row, the
//! last round's federated evaluation covers the whole pooled test set, and a pool of 1 and a
//! pool of 2 processes give the same model byte for byte.
//!
//! Needs the `.venv` (Debian's python3-torch, safetensors) and Fashion-MNIST that
//! `scripts/install-deps.sh` installs.

use crate::support;

use std::{
    fs,
    path::{Path, PathBuf},
};

use support::{python3, sdk_path};

const NODES: usize = 30;
const IMAGES: usize = 1500;

fn example(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/many-nodes")
        .join(file)
}

/// Data rows of a CSV file (its header line left out), with each row's label.
fn labels(path: &Path) -> Vec<u8> {
    fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .skip(1)
        .map(|row| {
            row.split(',')
                .next()
                .and_then(|l| l.parse().ok())
                .expect("a label")
        })
        .collect()
}

/// Runs the example over `NODES` nodes split from `dir/pooled` with `workers` processes;
/// returns the run's folder.
fn simulate(dir: &Path, workers: &str) -> PathBuf {
    let out = format!("run-{workers}");
    let done = support::ferry()
        .current_dir(dir)
        .env("PYTHONPATH", sdk_path())
        .args(["simulate", "--trainer-cmd"])
        .arg(format!("{} {}", python3(), example("train.py").display()))
        .args(["--trainer-mode", "long-lived", "--trainer-workers", workers])
        .args(["--node-data", "pooled", "--clients", &NODES.to_string()])
        .args([
            "--partition",
            "dirichlet:0.5",
            "--fraction",
            "0.2",
            "--rounds",
            "3",
        ])
        .args(["--initial-model", "init.safetensors", "--local-epochs", "1"])
        .args([
            "--batch-size",
            "16",
            "--lr",
            "0.05",
            "--evaluate-every",
            "3",
        ])
        .args(["--evaluate-fraction", "1", "--out", &out])
        .output()
        .expect("simulate runs");
    assert!(
        done.status.success(),
        "{}{}",
        String::from_utf8_lossy(&done.stdout),
        String::from_utf8_lossy(&done.stderr)
    );
    dir.join(out)
}

#[test]
fn a_pooled_folder_split_into_many_nodes_trains_lenet_through_a_pool_of_workers() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    support::run_sdk_script(
        &example("pool.py"),
        &["--out", "pooled", "--limit", &IMAGES.to_string()],
        Some(dir),
    );
    support::run_sdk_script(&example("init_model.py"), &["init.safetensors"], Some(dir));

    let one = simulate(dir, "1");
    // The split: every training row went to exactly one node, at least 10 each (the
    // Dirichlet partition's floor), and the label mix differs from node to node.
    let shares: Vec<Vec<u8>> = (0..NODES)
        .map(|i| labels(&one.join(format!("data/node-{i}/train.csv"))))
        .collect();
    assert_eq!(shares.iter().map(Vec::len).sum::<usize>(), IMAGES);
    assert!(
        shares.iter().all(|s| s.len() >= 10),
        "{:?}",
        shares.iter().map(Vec::len).collect::<Vec<_>>()
    );
    let top_share = |s: &Vec<u8>| {
        (0..10u8)
            .map(|c| s.iter().filter(|&&l| l == c).count())
            .max()
            .unwrap_or(0) as f64
            / s.len() as f64
    };
    assert!(
        shares.iter().any(|s| top_share(s) > 0.5),
        "Dirichlet(0.5) skews some node's labels"
    );

    let history = support::cli::written_history(&one);
    let rounds = history["rounds"].as_array().expect("rounds");
    assert_eq!(rounds.len(), 3);
    for r in rounds {
        assert_eq!(r["participants"], 6, "20% of {NODES} nodes: {r}");
        assert!(r["train_loss"].as_f64().is_some_and(|l| l > 0.0), "{r}");
    }
    // The last round's federated evaluation: every node scored the model on its share of the
    // pooled test set, which together is the whole of it.
    let federated = &rounds[2]["federated"];
    assert_eq!(
        federated["nodes"].as_u64(),
        Some(NODES as u64),
        "{federated}"
    );
    assert_eq!(
        federated["num_examples"].as_u64(),
        Some(IMAGES as u64),
        "{federated}"
    );
    let model = fs::read(one.join("model.safetensors")).expect("model");
    assert_ne!(
        model,
        fs::read(dir.join("init.safetensors")).expect("initial")
    );

    let two = simulate(dir, "2");
    assert!(
        model == fs::read(two.join("model.safetensors")).expect("model"),
        "a pool of 2 processes gave another model than a pool of 1"
    );
}
