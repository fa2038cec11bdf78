//! Deployment parity: every aggregation rule at its default `byzantine`, SecAgg+ at its default
//! threshold, central and distributed differential privacy, and every server optimizer, each
//! deployed over TLS with real client processes joining one at a time. Each server is
//! configured with `min_clients = 2` and `min_results = 1`, below what most rules need: the
//! coordinator must raise them, start no round it cannot finish, and apply an update in every
//! round. Dimensions that compose share one server (Krum with FedAvgM, Bulyan with FedYogi).
//!
//! Needs the MNIST subset that `scripts/install-deps.sh` installs.

use crate::support;

use std::{fs, time::Duration};

use serde_json::Value;
use support::{Killer, TestServer, share_client_args, spawn_logged, wait_for};

/// One deployed configuration.
struct Case {
    /// Extra `[run]` lines.
    run: &'static str,
    /// Client processes (also the run's declared `clients`).
    nodes: usize,
    /// Updates every round must have aggregated: the rule's floor.
    floor: u64,
}

const ROUNDS: usize = 2;

/// Deploys `case` and checks that its run applied an update in every round and succeeded.
fn deploy(case: &Case) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let server = TestServer::new(
        dir,
        &[],
        false,
        &format!(
            "dataset = \"mnist-subset\"\nmodel = \"logreg\"\nclients = {}\nmin_clients = 2\n\
             min_results = 1\nrounds = {ROUNDS}\nround_timeout = 30\nheartbeat = 1\n\
             offline_after = 5\nretry-backoff = 1\n{}",
            case.nodes, case.run
        ),
    );
    let mut logs = vec![dir.join("server.log")];
    let mut processes = Killer(vec![server.spawn(&logs[0])]);
    // The nodes join one at a time.
    for i in 0..case.nodes {
        let log = dir.join(format!("client-{i}.log"));
        let args = share_client_args(&server, "logreg", case.nodes, i, 60);
        processes.0.push(spawn_logged(&args, &log));
        logs.push(log);
        std::thread::sleep(Duration::from_millis(300));
    }
    wait_for(
        &format!("the server of `{}` to finish", case.run.trim()),
        Duration::from_secs(180),
        &logs,
        || matches!(processes.0[0].try_wait(), Ok(Some(_))),
    );
    let server_log = fs::read_to_string(&logs[0]).expect("server log");
    let exit = processes.0[0].wait().expect("server status");
    assert!(
        exit.success(),
        "`{}`: server exit {exit}\n{server_log}",
        case.run
    );
    let h: Value = support::history(&server.out).expect("history.json");
    assert_eq!(h["final"]["stop"], "rounds_completed", "{}: {h}", case.run);
    assert!(
        h.get("failed_rounds").is_none(),
        "`{}`: no round may fail when nothing is killed: {}\n{server_log}",
        case.run,
        h["failed_rounds"]
    );
    let rounds = h["rounds"].as_array().expect("rounds");
    assert_eq!(rounds.len(), ROUNDS, "`{}`: {rounds:?}", case.run);
    for (i, r) in rounds.iter().enumerate() {
        assert_eq!(r["round"], i + 1);
        assert!(r["aborted"].is_null(), "`{}`: {r}", case.run);
        let participants = r["participants"].as_u64().expect("participants");
        assert!(
            participants >= case.floor.max(1) && participants <= case.nodes as u64,
            "`{}` round {}: {participants} participants, floor {}\n{server_log}",
            case.run,
            i + 1,
            case.floor
        );
        assert!(r["loss"].as_f64().is_some_and(f64::is_finite), "{r}");
    }
    if case.floor > 2 {
        assert!(
            server_log.contains(&format!("min_clients raised from 2 to {}", case.floor)),
            "`{}`: the raise is announced\n{server_log}",
            case.run
        );
    }
}

#[test]
fn every_robust_rule_at_its_default_byzantine_applies_every_deployed_round() {
    for case in [
        Case {
            run: "aggregator = \"krum\"\nstrategy = \"fedavgm\"\n",
            nodes: 6,
            floor: 5,
        },
        Case {
            run: "aggregator = \"multi-krum\"\nstrategy = \"fedadam\"\n",
            nodes: 6,
            floor: 5,
        },
        Case {
            run: "aggregator = \"bulyan\"\nstrategy = \"fedyogi\"\n",
            nodes: 7,
            floor: 7,
        },
        Case {
            run: "aggregator = \"trimmed-mean\"\nstrategy = \"fedprox\"\n",
            nodes: 6,
            floor: 5,
        },
        Case {
            run: "aggregator = \"median\"\nstrategy = \"fedadagrad\"\n",
            nodes: 4,
            floor: 1,
        },
    ] {
        deploy(&case);
    }
}

#[test]
fn secagg_at_its_default_threshold_and_both_dp_placements_apply_every_deployed_round() {
    for case in [
        // The default threshold follows each round's cohort: a round may start with 3 nodes
        // (2 of 2 neighbours, all 3 masked inputs needed); six take 3 of 5, 4 inputs.
        Case {
            run: "secagg = true\n",
            nodes: 6,
            floor: 3,
        },
        Case {
            run: "secagg = true\ndp-noise-multiplier = 0.3\ndp-clip = 1.0\n\
                  dp-placement = \"distributed\"\nstrategy = \"fedadam\"\n",
            nodes: 6,
            floor: 3,
        },
        Case {
            run: "dp-noise-multiplier = 0.3\ndp-clip = 1.0\n",
            nodes: 4,
            floor: 1,
        },
        Case {
            run: "dp-noise-multiplier = 0.3\ndp-clip = 1.0\ndp-placement = \"distributed\"\n\
                  strategy = \"fedyogi\"\n",
            nodes: 4,
            floor: 1,
        },
    ] {
        deploy(&case);
    }
}

#[test]
fn strategies_with_their_own_server_step_apply_every_deployed_round() {
    for case in [
        Case {
            run: "strategy = \"scaffold\"\n",
            nodes: 3,
            floor: 1,
        },
        Case {
            run: "strategy = \"fednova\"\n",
            nodes: 3,
            floor: 1,
        },
        Case {
            run: "strategy = \"fedavg\"\n",
            nodes: 3,
            floor: 1,
        },
        // The server refuses a q-FedAvg update without its node's loss_before, so a round
        // is applied only if the deployed nodes report it.
        Case {
            run: "strategy = \"qfedavg\"\nq = 2\n",
            nodes: 3,
            floor: 1,
        },
    ] {
        deploy(&case);
    }
}

#[test]
fn a_fleet_too_small_for_the_rule_is_refused_at_start_with_what_to_change() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = TestServer::new(
        tmp.path(),
        &[],
        false,
        "dataset = \"mnist-subset\"\nmodel = \"logreg\"\nclients = 6\nmin_clients = 3\n\
         aggregator = \"trimmed-mean\"\ntrim-beta = 0.1\n",
    );
    let stderr = support::refused_at_start(&server);
    assert!(
        stderr.contains("trimmed-mean with trim-beta 0.1 needs 10 updates")
            && stderr.contains("clients = 6")
            && stderr.contains("set clients"),
        "{stderr}"
    );
}
