//! End-to-end deployment: the real `ferry` binary as a server and four client processes over
//! TLS on loopback. One client is killed mid-run and the server is killed with SIGKILL and
//! restarted; the run still completes, counts no update twice, and lands within two accuracy
//! points of the same run in `ferry simulate`.
//!
//! Needs the MNIST subset that `scripts/install-deps.sh` installs.

use crate::support;

use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::Value;
use support::{
    Killer, TestServer, client_args, history, http_get, rounds_done, run_ok, spawn_logged,
    wait_for, write_csv,
};

const ROUNDS: usize = 6;
const CLIENTS: usize = 4;

#[test]
fn deployed_run_survives_a_lost_client_and_a_killed_server() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let server = TestServer::new(
        dir,
        &["--hosts", "localhost,127.0.0.1"],
        false,
        &format!(
            "dataset = \"mnist-subset\"\nmodel = \"lenet\"\nclients = {CLIENTS}\n\
             min_clients = 3\nrounds = {ROUNDS}\nseed = 0\nround_timeout = 10\nmin_results = 3\n\
             heartbeat = 1\noffline_after = 4\nevaluate_every = 1\n"
        ),
    );
    let out = server.out.clone();
    let (mut processes, mut logs) = support::start_share_fleet(&server, "lenet", CLIENTS, 120);

    // A client dies for good while it trains for round 2.
    let victim_log = logs[CLIENTS].clone();
    wait_for(
        "the last client to train round 2",
        Duration::from_secs(240),
        &logs,
        || fs::read_to_string(&victim_log).is_ok_and(|log| log.contains("round 2: training")),
    );
    processes.0[CLIENTS].kill().expect("kill a client");

    // The operator API needs the admin token; metrics are open.
    let api_port = server.api_port;
    let (code, _) = http_get(api_port, "/api/v1/status", None);
    assert_eq!(code, 401);
    let admin = server.admin_token();
    let (code, body) = http_get(api_port, "/api/v1/status", Some(admin.trim()));
    assert_eq!(code, 200, "{body}");
    let status: Value = serde_json::from_str(&body).expect("status JSON");
    assert!(status["round"].as_u64().expect("round") >= 2, "{status}");
    assert_eq!(status["rounds"], ROUNDS);
    let (code, body) = http_get(api_port, "/api/v1/nodes", Some(admin.trim()));
    assert_eq!(code, 200);
    let nodes: Value = serde_json::from_str(&body).expect("nodes JSON");
    assert_eq!(nodes.as_array().map(Vec::len), Some(CLIENTS), "{nodes}");
    // Round 1's model was scored by the nodes (federated evaluation) before round 2.
    let (code, body) = http_get(api_port, "/api/v1/rounds", Some(admin.trim()));
    assert!(code == 200 && body.contains("\"participants\""), "{body}");
    assert!(body.contains("\"accuracy_median\""), "{body}");
    let (code, body) = http_get(api_port, "/metrics", None);
    assert_eq!(code, 200);
    assert!(
        body.contains("ferry_updates_accepted_total")
            && body.contains("ferry_rounds_total")
            && body.contains("ferry_federated_accuracy"),
        "{body}"
    );
    // The server dies with SIGKILL mid-run and comes back with the same configuration.
    wait_for("round 3", Duration::from_secs(240), &logs, || {
        rounds_done(&out) >= 3
    });
    processes.0[0].kill().expect("kill -9 the server");
    let _ = processes.0[0].wait();
    logs.push(dir.join("server-2.log"));
    processes.0[0] = server.spawn(&logs[logs.len() - 1]);

    wait_for(
        "the server to finish",
        Duration::from_secs(300),
        &logs,
        || matches!(processes.0[0].try_wait(), Ok(Some(_))),
    );
    let status = processes.0[0].wait().expect("server status");
    assert!(status.success(), "server exit {status}");
    for i in 1..CLIENTS {
        wait_for("clients to finish", Duration::from_secs(60), &logs, || {
            matches!(processes.0[i].try_wait(), Ok(Some(_)))
        });
        let client_log = fs::read_to_string(&logs[i]).expect("client log");
        assert!(
            client_log.contains("run finished"),
            "client {i}:\n{client_log}"
        );
    }

    let h = history(&out).expect("final history.json");
    let rounds = h["rounds"].as_array().expect("rounds");
    assert_eq!(rounds.len(), ROUNDS, "every round is recorded once");
    for (i, r) in rounds.iter().enumerate() {
        assert_eq!(r["round"], i + 1);
        let participants = r["participants"].as_u64().expect("participants");
        assert!(
            (3..=CLIENTS as u64).contains(&participants),
            "round {}: {participants}",
            i + 1
        );
    }
    assert!(
        rounds
            .iter()
            .all(|r| r["federated"]["nodes"].as_u64().is_some_and(|n| n >= 3)),
        "every round's model was scored by the live nodes, across the server's restart too"
    );
    let last = rounds.last().expect("a round");
    assert!(
        rounds.iter().skip(1).any(|r| r["participants"] == 3),
        "the lost client is missing from later rounds"
    );
    let deployed = h["final"]["accuracy"].as_f64().expect("final accuracy");
    assert_eq!(h["final"]["accuracy"], last["accuracy"]);
    let restarted = fs::read_to_string(&logs[logs.len() - 1]).expect("second server log");
    assert!(restarted.contains("ferry server: run"), "{restarted}");

    let sim_dir = dir.join("sim");
    run_ok(&[
        "simulate",
        "--dataset",
        "mnist-subset",
        "--model",
        "lenet",
        "--clients",
        &CLIENTS.to_string(),
        "--rounds",
        &ROUNDS.to_string(),
        "--seed",
        "0",
        "--out",
        sim_dir.to_str().expect("utf-8"),
    ]);
    let simulated = history(&sim_dir).expect("simulate history")["final"]["accuracy"]
        .as_f64()
        .expect("accuracy");
    eprintln!("deployed {deployed:.4}, simulated {simulated:.4}, participants per round:");
    for r in rounds {
        eprintln!(
            "  round {} participants {} accuracy {}",
            r["round"], r["participants"], r["accuracy"]
        );
    }
    assert!(
        (deployed - simulated).abs() <= 0.02,
        "deployed {deployed:.4} vs simulated {simulated:.4}"
    );
}

#[test]
fn exec_and_builtin_trainers_learn_together_over_mutual_tls() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let server = TestServer::new(
        dir,
        &["--clients", "node"],
        true,
        "dataset = \"mnist-subset\"\nmodel = \"logreg\"\nclients = 3\nmin_clients = 3\n\
         rounds = 3\nround_timeout = 60\nevaluate_every = 1\n",
    );
    let (certs, out) = (server.certs.clone(), server.out.clone());
    let server_log = dir.join("server.log");
    let mut processes = Killer(vec![server.spawn(&server_log)]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/exec-trainer/train.py");
    let (url, ca) = (server.url(), server.ca());
    let mut logs = vec![server_log];

    // Without a client certificate the TLS handshake itself is refused, and the node says so.
    support::until_listening(server.port, "the server", Duration::from_secs(60));
    let token = server.token("no-cert");
    let refused_log = dir.join("no-cert.log");
    let mut refused = Killer(vec![spawn_logged(
        &[
            "client",
            "--server",
            &url,
            "--ca",
            &ca,
            "--token",
            &token,
            "--give-up-after",
            "3",
            "--state-dir",
            dir.join("no-cert").to_str().expect("utf-8"),
            "--trainer-cmd",
            "python3 train.py",
        ]
        .map(String::from),
        &refused_log,
    )]);
    // A node that got in would wait for rounds and never exit: give it a minute.
    wait_for(
        "the node without a certificate to give up",
        Duration::from_secs(60),
        std::slice::from_ref(&refused_log),
        || matches!(refused.0[0].try_wait(), Ok(Some(_))),
    );
    let said = fs::read_to_string(&refused_log).expect("its log");
    assert!(
        !refused.0[0].wait().expect("status").success(),
        "a node without a certificate got in"
    );
    assert!(said.contains("CertificateRequired"), "{said}");

    for i in 0..3 {
        let token = server.token(&format!("py-{i}"));
        let data = dir.join(format!("site-{i}"));
        write_csv(&data, i, 4);
        let log = dir.join(format!("client-{i}.log"));
        let args: Vec<String> = [
            "client",
            "--server",
            &url,
            "--ca",
            &ca,
            "--cert",
            certs.join("client-node.pem").to_str().expect("utf-8"),
            "--key",
            certs.join("client-node.key").to_str().expect("utf-8"),
            "--token",
            &token,
            "--state-dir",
            dir.join(format!("node-{i}")).to_str().expect("utf-8"),
            "--data-dir",
            data.to_str().expect("utf-8"),
        ]
        .map(String::from)
        .to_vec();
        // Nodes 0 and 2 train with the Python script (node 0 runs it once per round, node 2
        // starts it once for the whole run), node 1 with the built-in trainer on the same kind
        // of CSV files.
        let python = [
            "--trainer-cmd".to_string(),
            format!("{} {}", support::python3(), script.display()),
        ];
        let trainer = match i {
            0 => python.to_vec(),
            2 => [&python[..], &["--trainer-mode".into(), "long-lived".into()]].concat(),
            _ => ["--dataset", "csv", "--model", "logreg"]
                .map(String::from)
                .to_vec(),
        };
        let args = [args, trainer].concat();
        processes.0.push(spawn_logged(&args, &log));
        logs.push(log);
    }
    wait_for(
        "the server to finish",
        Duration::from_secs(240),
        &logs,
        || matches!(processes.0[0].try_wait(), Ok(Some(_))),
    );
    let h = history(&out).expect("history.json");
    let rounds = h["rounds"].as_array().expect("rounds");
    assert_eq!(rounds.len(), 3);
    assert!(rounds.iter().all(|r| r["participants"] == 3), "{rounds:?}");
    // The long-lived trainer served every round from one process.
    let long_lived = fs::read_to_string(&logs[3]).expect("long-lived node log");
    assert!(
        !long_lived.contains("starting it again") && long_lived.contains("run finished"),
        "{long_lived}"
    );
    let accuracy = h["final"]["accuracy"].as_f64().expect("accuracy");
    eprintln!(
        "Python and built-in trainers, logistic regression on MNIST-subset CSVs: {accuracy:.4}"
    );
    assert!(
        accuracy > 0.75,
        "logistic regression trained by Python and Ferry: {accuracy}"
    );
    assert!(
        rounds[0]["train_loss"].as_f64().expect("train_loss") > 0.0,
        "metrics reach the server"
    );
    // Every node, whichever trainer it runs, scored every round's model on its own test.csv;
    // the sites' held-out rows come from the same test split the server scores on.
    for r in rounds {
        assert_eq!(r["federated"]["nodes"], 3, "{r}");
    }
    let federated = h["final"]["federated"]["accuracy"]
        .as_f64()
        .expect("federated accuracy");
    eprintln!("federated accuracy of the final model: {federated:.4}");
    assert!(
        (federated - accuracy).abs() < 0.1,
        "{federated} vs {accuracy}"
    );
    // The fairness report reads the final model's per-site accuracies.
    let fairness = &h["final"]["fairness"];
    let sites = h["final"]["federated"]["node_accuracy"]
        .as_object()
        .expect("each site's accuracy");
    let worst = sites
        .values()
        .filter_map(|a| a.as_f64())
        .fold(f64::INFINITY, f64::min);
    assert_eq!(fairness["sites"], 3, "{fairness}");
    assert_eq!(
        fairness["worst_accuracy"].as_f64(),
        Some(worst),
        "{fairness}"
    );
    assert_eq!(fairness["worst_tenth_sites"], 1, "{fairness}");
    let server_says = fs::read_to_string(&logs[0]).expect("server log");
    assert!(server_says.contains("federated accuracy"), "{server_says}");
    assert!(
        server_says.contains("fairness over 3 sites"),
        "{server_says}"
    );
}

#[test]
fn demo_runs_a_whole_deployment_and_stops_everything() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("demo");
    let result = run_ok(&[
        "demo",
        "--dataset",
        "mnist-subset",
        "--partition",
        "iid",
        "--clients",
        "2",
        "--rounds",
        "2",
        "--out",
        out.to_str().expect("utf-8"),
    ]);
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert!(stdout.contains("round   2/2"), "{stdout}");
    assert!(stdout.contains("demo done"), "{stdout}");
    let h = history(&out.join("results")).expect("results/history.json");
    assert_eq!(h["rounds"].as_array().map(Vec::len), Some(2));
    assert!(
        h["rounds"]
            .as_array()
            .expect("rounds")
            .iter()
            .all(|r| r["participants"] == 2)
    );
    assert!(out.join("results/model.safetensors").exists());
    for i in 0..2 {
        let log = fs::read_to_string(out.join(format!("client-{i}.log"))).expect("client log");
        assert!(
            log.contains("run finished"),
            "client {i} did not stop by itself:\n{log}"
        );
    }
}

/// Runs a `CLIENTS`-node logistic-regression deployment on the MNIST subset, with `run` added
/// to its `[run]` section, until the server exits; returns the server, the processes (the
/// clients may still be stopping) and their logs.
fn run_logreg_fleet(dir: &Path, run: &str) -> (TestServer, Killer, Vec<PathBuf>) {
    let server = TestServer::new(
        dir,
        &[],
        false,
        &format!(
            "dataset = \"mnist-subset\"\nmodel = \"logreg\"\nclients = {CLIENTS}\n\
             min_clients = {CLIENTS}\nround_timeout = 60\n{run}"
        ),
    );
    let (mut processes, logs) = support::start_share_fleet(&server, "logreg", CLIENTS, 60);
    wait_for(
        "the server to finish",
        Duration::from_secs(240),
        &logs,
        || matches!(processes.0[0].try_wait(), Ok(Some(_))),
    );
    (server, processes, logs)
}

#[test]
fn distributed_dp_deployment_reports_epsilon_and_stops_at_its_budget() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // Poisson sampling at q = 0.75 of 4 nodes, z = 0.8: epsilon is 8.45 after 2 rounds and
    // 10.60 after 3 (`ferry privacy epsilon`), so a budget of 9 stops the run after round 2.
    // Nodes clip and noise their own updates (distributed placement) with an adaptive clip,
    // whose noised indicator the server cannot aggregate unless every node sent one.
    let (server, mut processes, logs) = run_logreg_fleet(
        tmp.path(),
        "fraction = 0.75\nrounds = 5\ndp-noise-multiplier = 0.8\ndp-adaptive-clip = true\n\
         dp-count-stddev = 2.0\ndp-placement = \"distributed\"\ndp-epsilon-budget = 9.0\n",
    );
    let server_log = fs::read_to_string(&logs[0]).expect("server log");
    assert!(server_log.contains("budget_exhausted"), "{server_log}");
    let h = history(&server.out).expect("history.json");
    assert_eq!(h["final"]["stop"], "budget_exhausted");
    let rounds = h["rounds"].as_array().expect("rounds");
    assert_eq!(rounds.len(), 2, "{rounds:?}");
    let mut last_epsilon = 0.0;
    for r in rounds {
        let epsilon = r["epsilon"].as_f64().expect("epsilon each round");
        assert!(epsilon > last_epsilon && epsilon <= 9.0, "{r}");
        last_epsilon = epsilon;
        assert_eq!(
            r["failures"], 0,
            "every update carried its clip indicator: {r}"
        );
        assert!(r["dp"]["unclipped_fraction"].is_f64(), "{r}");
        assert_eq!(r["dp"]["expected_count"], 3.0);
    }
    for i in 1..=CLIENTS {
        wait_for("clients to finish", Duration::from_secs(60), &logs, || {
            matches!(processes.0[i].try_wait(), Ok(Some(_)))
        });
    }
}

#[test]
fn a_robust_rule_aggregates_a_deployed_round() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (server, _processes, logs) = run_logreg_fleet(
        tmp.path(),
        "rounds = 2\naggregator = \"multi-krum\"\nbyzantine = 0\nkrum-keep = 2\n",
    );
    let h = history(&server.out).expect("history.json");
    assert_eq!(h["config"]["run"]["aggregator"]["rule"], "multi-krum");
    let rounds = h["rounds"].as_array().expect("rounds");
    assert_eq!(rounds.len(), 2);
    for r in rounds {
        assert_eq!(r["participants"], 4, "{r}");
        // Multi-Krum keeps 2 of the 4 updates and names the two nodes it left out.
        assert_eq!(r["excluded"].as_array().map(Vec::len), Some(2), "{r}");
    }
    let accuracy = h["final"]["accuracy"].as_f64().expect("accuracy");
    assert!(
        accuracy > 0.6,
        "logreg with multi-krum over 2 rounds: {accuracy}"
    );
    let server_log = fs::read_to_string(&logs[0]).expect("server log");
    assert!(server_log.contains("left out 2:"), "{server_log}");
}

#[test]
fn a_secure_deployment_survives_a_client_killed_between_stages() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let rounds = 3;
    let server = TestServer::new(
        dir,
        &[],
        false,
        &format!(
            "dataset = \"mnist-subset\"\nmodel = \"logreg\"\nclients = {CLIENTS}\n\
             min_clients = {CLIENTS}\nrounds = {rounds}\nround_timeout = 10\nheartbeat = 1\n\
             offline_after = 4\nsecagg = true\nsecagg-neighbours = 4\nsecagg-threshold = 2\n\
             secagg-stage-timeout = 10\n"
        ),
    );
    // Rounds need four nodes, so the victim's round has at least three survivors, each with
    // at least two live neighbours: the threshold holds when it drops.
    let mut logs = vec![dir.join("server-1.log")];
    let mut processes = Killer(vec![server.spawn(&logs[0])]);
    // A node whose trainer never finishes joins first, so that round 1 includes it: it
    // advertises and shares its keys, then is killed while "training", between the key
    // stages and its masked input.
    let victim_log = dir.join("client-victim.log");
    let hang = dir.join("hang.sh");
    fs::write(&hang, "#!/bin/sh\nsleep 120\n").expect("trainer script");
    let mut permissions = fs::metadata(&hang).expect("script").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o755);
    fs::set_permissions(&hang, permissions).expect("executable");
    let mut victim = client_args(&server, "victim");
    victim.extend(["--trainer-cmd".to_string(), hang.display().to_string()]);
    processes.0.push(spawn_logged(&victim, &victim_log));
    logs.push(victim_log.clone());
    wait_for(
        "the victim to enrol",
        Duration::from_secs(60),
        &logs,
        || fs::read_to_string(&victim_log).is_ok_and(|log| log.contains("enrolled")),
    );
    support::spawn_share_clients(&server, "logreg", CLIENTS, 60, &mut processes, &mut logs);
    let mut victim_round = 0;
    wait_for(
        "the victim to train",
        Duration::from_secs(120),
        &logs,
        || {
            let log = fs::read_to_string(&victim_log).unwrap_or_default();
            victim_round = log
                .lines()
                .find_map(|l| {
                    l.strip_suffix(": training")?
                        .strip_prefix("round ")?
                        .parse()
                        .ok()
                })
                .unwrap_or(0);
            victim_round > 0
        },
    );
    processes.0[1].kill().expect("kill the victim");
    wait_for(
        "the server to finish",
        Duration::from_secs(240),
        &logs,
        || matches!(processes.0[0].try_wait(), Ok(Some(_))),
    );
    let server_log = fs::read_to_string(&logs[0]).expect("server log");
    assert!(
        server_log.contains("1 nodes dropped after sharing keys"),
        "{server_log}"
    );
    let h = history(&server.out).expect("history.json");
    let records = h["rounds"].as_array().expect("rounds");
    assert_eq!(records.len(), rounds, "{records:?}");
    for r in records {
        assert!(r["aborted"].is_null(), "{r}");
    }
    // The victim's round summed the live nodes' inputs; its masks were removed, its update
    // was never in.
    for r in records {
        let participants = r["participants"].as_u64().expect("participants");
        assert!((3..=CLIENTS as u64).contains(&participants), "{r}");
    }
    assert_eq!(victim_round, 1, "the victim was in round 1");
    let victim_said = fs::read_to_string(&victim_log).expect("victim log");
    assert!(
        !victim_said.contains("update delivered"),
        "the victim never sent its masked input:\n{victim_said}"
    );
    // The server kept no update: its blob store holds the initial and each round's model.
    let blobs = fs::read_dir(dir.join("blobs/blake3"))
        .expect("blob store")
        .filter(|e| e.as_ref().is_ok_and(|e| e.path().is_file()))
        .count();
    assert_eq!(blobs, rounds + 1, "blobs for {rounds} rounds");

    // The same run in simulation, without secure aggregation and without the victim.
    let sim_dir = dir.join("sim");
    run_ok(&[
        "simulate",
        "--dataset",
        "mnist-subset",
        "--model",
        "logreg",
        "--clients",
        &CLIENTS.to_string(),
        "--rounds",
        &rounds.to_string(),
        "--out",
        sim_dir.to_str().expect("utf-8"),
    ]);
    let simulated = history(&sim_dir).expect("simulated history")["final"]["accuracy"]
        .as_f64()
        .expect("accuracy");
    let deployed = h["final"]["accuracy"].as_f64().expect("accuracy");
    assert!(
        (deployed - simulated).abs() < 0.03,
        "secure deployment {deployed} vs plain simulation {simulated}"
    );
}
