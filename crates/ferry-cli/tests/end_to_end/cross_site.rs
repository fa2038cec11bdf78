//! The cross-site validation matrix, simulated and deployed: every cell is checked against
//! `ferry evaluate` of that model on that site's held-out data.
//!
//! Needs the MNIST subset that `scripts/install-deps.sh` installs.

use crate::support;

use std::{collections::BTreeMap, fs, path::Path, time::Duration};

use serde_json::Value;
use support::{
    Killer, TestServer,
    cli::{assert_clean_failure, ferry_stdout, mnist_logreg, simulate, written_history},
    refused_at_start, share_client_args, spawn_logged, wait_for,
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

/// The matrix's models, in row order.
fn row_models(matrix: &Value) -> Vec<&str> {
    matrix["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| r["model"].as_str().expect("model"))
        .collect()
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
    let models = row_models(matrix);
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
fn a_deployed_matrix_scores_the_global_model_and_the_sites_that_share_theirs_as_ferry_evaluate_does()
 {
    let tmp = tempfile::tempdir().expect("tempdir");
    let nodes = 3;
    let sharing = 2;
    let server = TestServer::new(
        tmp.path(),
        &[],
        false,
        &format!(
            "dataset = \"mnist-subset\"\nmodel = \"logreg\"\nclients = {nodes}\n\
             min_clients = {nodes}\nrounds = 2\nround_timeout = 60\ncross-site = \"local\"\n"
        ),
    );
    let mut logs = vec![server.dir.join("server-1.log")];
    let mut processes = Killer(vec![server.spawn(&logs[0])]);
    for i in 0..nodes {
        let log = server.dir.join(format!("client-{i}.log"));
        let mut args = share_client_args(&server, "logreg", nodes, i, 60);
        if i < sharing {
            args.push("--share-local-model".into());
        }
        processes.0.push(spawn_logged(&args, &log));
        logs.push(log);
    }
    wait_for(
        "the server to finish",
        Duration::from_secs(180),
        &logs,
        || matches!(processes.0[0].try_wait(), Ok(Some(_))),
    );
    let h = support::history(&server.out).expect("history.json");
    let matrix = &h["final"]["cross_site"];
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
    let models = row_models(matrix);
    let mut expected = vec!["global".to_string()];
    expected.extend(
        share_of
            .iter()
            .filter(|(_, share)| **share < sharing)
            .map(|(id, _)| format!("local:{id}")),
    );
    assert_eq!(
        models, expected,
        "only the sites that opted in send a model"
    );
    let cells = cells(matrix);
    assert_eq!(cells.len(), nodes * (1 + sharing), "{matrix}");
    let sites = matrix["sites"].as_array().expect("sites");
    for ((model, site), accuracy) in &cells {
        let file = match model.strip_prefix("local:") {
            Some(own) => server
                .out
                .join("cross-site")
                .join(format!("{own}.safetensors")),
            None => server.out.join("model.safetensors"),
        };
        let share = share_of[site].to_string();
        let scored = evaluate(
            &file,
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
        let column = sites.iter().position(|s| s == site).expect("column");
        let examples = matrix["examples"][column].as_u64().expect("examples");
        assert_eq!(scored.1, examples, "{model} on site {site}");
        assert!(
            (scored.0 - accuracy).abs() < 1e-9,
            "{model} on site {site}: ferry evaluate {scored:?}, matrix {accuracy}"
        );
    }
    // A site's own model is the final model fine-tuned there: not the global model.
    let global = fs::read(server.out.join("model.safetensors")).expect("model");
    for (id, _) in share_of.iter().filter(|(_, share)| **share < sharing) {
        let own = fs::read(
            server
                .out
                .join("cross-site")
                .join(format!("{id}.safetensors")),
        )
        .expect("site model");
        assert_ne!(own, global, "site {id}'s model");
    }
    let csv = fs::read_to_string(server.out.join("cross-site.csv")).expect("cross-site.csv");
    assert_eq!(csv.lines().count(), 2 + 1 + sharing, "{csv}");
    // Sites' own models are refused where updates are hidden from the server.
    let refused = TestServer::new(
        &tmp.path().join("local"),
        &[],
        false,
        "dataset = \"mnist-subset\"\nmodel = \"logreg\"\nsecagg = true\ncross-site = \"local\"\n",
    );
    assert!(
        refused_at_start(&refused).contains("cross-site global"),
        "the refusal names the fix"
    );
}
