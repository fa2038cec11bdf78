//! The cross-site validation matrix, simulated and deployed: every cell is checked against
//! `ferry evaluate` of that model on that site's held-out data.
//!
//! Needs the MNIST subset that `scripts/install-deps.sh` installs.

use crate::support;

use std::{collections::BTreeMap, fs, path::Path, time::Duration};

use serde_json::Value;
use support::{
    TestServer,
    cli::{assert_clean_failure, ferry_stdout, mnist_logreg, simulate, written_history},
    refused_at_start, start_share_fleet, wait_for,
};

/// `ferry evaluate --json` of `model` with `scope` flags: (accuracy, examples).
fn evaluate(model: &Path, scope: &[&str]) -> (f64, u64) {
    let mut args = vec!["evaluate", model.to_str().expect("utf-8"), "--json"];
    args.extend_from_slice(scope);
    let report: Value = serde_json::from_str(&ferry_stdout(&args)).expect("evaluate's JSON");
    (
        report["accuracy"].as_f64().expect("accuracy"),
        report["examples"].as_u64().expect("examples"),
    )
}

/// The matrix's cells by (model, site).
fn cells(matrix: &Value) -> BTreeMap<(String, String), f64> {
    let sites: Vec<String> = matrix["sites"]
        .as_array()
        .expect("sites")
        .iter()
        .map(|s| s.as_str().expect("site").to_string())
        .collect();
    let mut cells = BTreeMap::new();
    for row in matrix["rows"].as_array().expect("rows") {
        let model = row["model"].as_str().expect("model").to_string();
        for (site, cell) in sites.iter().zip(row["accuracy"].as_array().expect("cells")) {
            cells.insert(
                (model.clone(), site.clone()),
                cell.as_f64().expect("scored"),
            );
        }
    }
    cells
}

#[test]
fn a_simulated_matrix_scores_every_model_on_every_site_as_ferry_evaluate_does() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let dir_arg = dir.to_str().expect("utf-8");
    let h = simulate(
        dir,
        &mnist_logreg(&[
            "--clients",
            "4",
            "--rounds",
            "2",
            "--partition",
            "labels:2",
            "--cross-site",
            "local",
        ]),
    );
    let matrix = &h["final"]["cross_site"];
    let sites = ["0", "1", "2", "3"];
    assert_eq!(matrix["sites"], serde_json::json!(sites));
    let models: Vec<&str> = matrix["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| r["model"].as_str().expect("model"))
        .collect();
    assert_eq!(
        models,
        ["global", "local:0", "local:1", "local:2", "local:3"]
    );
    let cells = cells(matrix);
    assert_eq!(cells.len(), 20);
    // The global row is the final federated evaluation, site by site.
    for site in sites {
        assert_eq!(
            cells[&("global".to_string(), site.to_string())],
            h["final"]["federated"]["node_accuracy"][site]
                .as_f64()
                .expect("site accuracy"),
            "site {site}"
        );
    }
    // Every cell, and every example count, is what `ferry evaluate` finds on that site.
    for ((model, site), accuracy) in &cells {
        let file = match model.strip_prefix("local:") {
            Some(own) => dir.join("cross-site").join(format!("{own}.safetensors")),
            None => dir.join("model.safetensors"),
        };
        let column = sites.iter().position(|s| s == site).expect("column");
        assert_eq!(
            evaluate(&file, &["--run", dir_arg, "--site", site]),
            (*accuracy, matrix["examples"][column].as_u64().expect("n")),
            "{model} on site {site}"
        );
    }
    // Under label skew each site's own model serves its own classes best.
    for site in sites {
        let own = cells[&(format!("local:{site}"), site.to_string())];
        let elsewhere = sites
            .iter()
            .filter(|s| **s != site)
            .map(|s| cells[&(format!("local:{site}"), s.to_string())])
            .fold(0.0, f64::max);
        assert!(
            own > elsewhere,
            "site {site}: {own} at home, {elsewhere} away"
        );
    }
    let csv = fs::read_to_string(dir.join("cross-site.csv")).expect("cross-site.csv");
    assert_eq!(csv.lines().count(), 2 + 5, "{csv}");
    assert!(csv.starts_with("model,0,1,2,3\nexamples,"), "{csv}");
    // Computed again on demand from the run's folder, the matrix is the same.
    fs::remove_file(dir.join("cross-site.csv")).expect("remove");
    ferry_stdout(&["cross-site", dir_arg, "--models", "local"]);
    assert_eq!(&written_history(dir)["final"]["cross_site"], matrix);
    assert!(dir.join("cross-site.csv").exists());
}

#[test]
fn sites_own_models_stay_home_when_updates_are_hidden_or_private() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().to_str().expect("utf-8");
    for private in [
        &["--secagg"][..],
        &["--dp-noise-multiplier", "1.0", "--dp-clip", "1.0"][..],
    ] {
        let mut args = vec!["simulate", "--out", out, "--cross-site", "local"];
        args.extend_from_slice(&mnist_logreg(private));
        assert_clean_failure(&args, "--cross-site global");
    }
    // A run that held nothing out has no site data the model did not train on.
    let plain = tmp.path().join("plain");
    simulate(&plain, &mnist_logreg(&["--clients", "3", "--rounds", "1"]));
    assert_clean_failure(
        &["cross-site", plain.to_str().expect("utf-8")],
        "held none out",
    );
}

#[test]
fn a_deployed_matrix_is_the_global_model_on_every_nodes_share_as_ferry_evaluate_scores_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let nodes = 3;
    let server = TestServer::new(
        tmp.path(),
        &[],
        false,
        &format!(
            "dataset = \"mnist-subset\"\nmodel = \"logreg\"\nclients = {nodes}\n\
             min_clients = {nodes}\nrounds = 2\nround_timeout = 60\ncross-site = \"global\"\n"
        ),
    );
    let (mut processes, logs) = start_share_fleet(&server, "logreg", nodes, 60);
    wait_for(
        "the server to finish",
        Duration::from_secs(180),
        &logs,
        || matches!(processes.0[0].try_wait(), Ok(Some(_))),
    );
    let h = support::history(&server.out).expect("history.json");
    let matrix = &h["final"]["cross_site"];
    let cells = cells(matrix);
    assert_eq!(cells.len(), nodes, "{matrix}");
    // Which node id each share's client enrolled as.
    let mut share_of = BTreeMap::new();
    for (i, log) in logs[1..].iter().enumerate() {
        let text = fs::read_to_string(log).expect("client log");
        let id = text
            .lines()
            .find_map(|l| l.strip_prefix("enrolled as node "))
            .and_then(|rest| rest.split_whitespace().next())
            .expect("the client says which node it is");
        share_of.insert(id.to_string(), i);
    }
    let model = server.out.join("model.safetensors");
    let sites = matrix["sites"].as_array().expect("sites");
    for (column, site) in sites.iter().enumerate() {
        let site = site.as_str().expect("site");
        let share = share_of[site].to_string();
        let scored = evaluate(
            &model,
            &[
                "--dataset",
                "mnist-subset",
                "--partition",
                "iid",
                "--num-partitions",
                &nodes.to_string(),
                "--partition-index",
                &share,
            ],
        );
        let in_matrix = (
            cells[&("global".to_string(), site.to_string())],
            matrix["examples"][column].as_u64().expect("examples"),
        );
        assert_eq!(scored.1, in_matrix.1, "site {site}");
        assert!(
            (scored.0 - in_matrix.0).abs() < 1e-9,
            "site {site}: {scored:?} vs {in_matrix:?}"
        );
    }
    // Sites' own models stay on their nodes in deployment.
    let refused = TestServer::new(
        &tmp.path().join("local"),
        &[],
        false,
        "dataset = \"mnist-subset\"\nmodel = \"logreg\"\ncross-site = \"local\"\n",
    );
    assert!(
        refused_at_start(&refused).contains("cross-site = \"global\""),
        "the refusal names the fix"
    );
}
