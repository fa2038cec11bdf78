//! Deployed runs under churn: a robust (Krum) run and a SecAgg+ run, each at its default
//! settings, with the server killed with SIGKILL twice mid-run and restarted, and one node
//! killed while it trains and started again. Every round must still be applied and recorded
//! exactly once, with the participants it folded. And a SecAgg+ run with nothing but
//! `secagg = true` that loses one of its six nodes for good and finishes on the other five.
//!
//! Needs the MNIST subset that `scripts/install-deps.sh` installs.

use crate::support;

use std::{fs, path::PathBuf, time::Duration};

use ferry_server::store::Store;
use support::{
    Killer, TestServer, history, rounds_done, share_client_args, spawn_logged, wait_for,
};

const NODES: usize = 6;
const ROUNDS: usize = 6;

/// What a churned run left behind.
struct Churned {
    server: TestServer,
    /// The final `history.json` rounds.
    rounds: Vec<serde_json::Value>,
    /// The killed and restarted node's id.
    victim: String,
    /// Rounds after the one it was killed in whose update the restarted node delivered.
    rejoined: Vec<u64>,
}

/// The round of each `round N: <what>` line in a client's `log`.
fn rounds_saying(log: &str, what: &str) -> Vec<u64> {
    log.lines()
        .filter_map(|l| l.strip_prefix("round ")?.strip_suffix(what)?.parse().ok())
        .collect()
}

/// The node id a client's `log` says it runs as.
fn node_id(log: &str) -> Option<String> {
    let line = log.lines().find(|l| l.starts_with("enrolled as node "))?;
    Some(
        line.strip_prefix("enrolled as node ")?
            .split(' ')
            .next()?
            .to_string(),
    )
}

/// Runs a churned deployment with `run` added to `[run]`.
fn churned_run(dir: &std::path::Path, run: &str) -> Churned {
    let server = TestServer::new(
        dir,
        &[],
        false,
        &format!(
            "dataset = \"mnist-subset\"\nmodel = \"logreg\"\nclients = {NODES}\nmin_clients = 3\n\
             min_results = 2\nrounds = {ROUNDS}\nlocal-epochs = 40\nround_timeout = 8\n\
             heartbeat = 1\noffline_after = 4\nretry-backoff = 1\nsecagg-stage-timeout = 8\n{run}"
        ),
    );
    let mut logs = vec![dir.join("server-1.log")];
    let mut processes = Killer(vec![server.spawn(&logs[0])]);
    let mut node_args = Vec::new();
    for i in 0..NODES {
        let args = share_client_args(&server, "logreg", NODES, i, 120);
        let log = dir.join(format!("client-{i}.log"));
        processes.0.push(spawn_logged(&args, &log));
        logs.push(log);
        node_args.push(args);
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = server.out.clone();
    let restart_server = |processes: &mut Killer, logs: &mut Vec<PathBuf>, n: usize| {
        assert!(
            rounds_done(&out) < ROUNDS,
            "the run finished before kill {}; slow its rounds down",
            n - 1
        );
        processes.0[0].kill().expect("kill -9 the server");
        let _ = processes.0[0].wait();
        let log = dir.join(format!("server-{n}.log"));
        processes.0[0] = server.spawn(&log);
        logs.push(log);
    };

    // First SIGKILL once a round is in.
    wait_for("round 1", Duration::from_secs(120), &logs, || {
        rounds_done(&out) >= 1
    });
    restart_server(&mut processes, &mut logs, 2);

    // A node dies while it trains, and comes back with its stored credential.
    let victim_log = logs[1].clone();
    let trained_before = fs::read_to_string(&victim_log)
        .unwrap_or_default()
        .matches(": training")
        .count();
    // Watched closely (not at `wait_for`'s pace): a round of this model trains and delivers
    // in well under a second, and the kill must land in between.
    let watching = std::time::Instant::now();
    while fs::read_to_string(&victim_log)
        .unwrap_or_default()
        .matches(": training")
        .count()
        <= trained_before
    {
        assert!(
            watching.elapsed() < Duration::from_secs(120),
            "node 0 did not train again"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    processes.0[1].kill().expect("kill a node");
    let _ = processes.0[1].wait();
    // The kill landed while the node trained: its last round began training and was never
    // delivered.
    let before_kill = fs::read_to_string(&victim_log).expect("victim log");
    let killed_in = *rounds_saying(&before_kill, ": training")
        .last()
        .expect("the victim trained");
    assert!(
        !rounds_saying(&before_kill, ": update delivered").contains(&killed_in),
        "node 0 finished round {killed_in} before the kill:\n{before_kill}"
    );
    let victim = node_id(&before_kill).expect("the victim's node id");
    let restarted_log = dir.join("client-0-restarted.log");
    processes.0[1] = spawn_logged(&node_args[0], &restarted_log);
    logs.push(restarted_log.clone());

    // Second SIGKILL a few rounds later.
    wait_for("round 3", Duration::from_secs(180), &logs, || {
        rounds_done(&out) >= 3
    });
    restart_server(&mut processes, &mut logs, 3);

    wait_for(
        "the server to finish",
        Duration::from_secs(300),
        &logs,
        || matches!(processes.0[0].try_wait(), Ok(Some(_))),
    );
    let exit = processes.0[0].wait().expect("server status");
    let last_log = fs::read_to_string(&logs[logs.len() - 1]).unwrap_or_default();
    assert!(exit.success(), "server exit {exit}\n{last_log}");
    assert!(
        last_log.contains(&format!("round   {ROUNDS}/{ROUNDS}")),
        "the last server, started after the second kill, ran the last round:\n{last_log}"
    );
    let h = history(&out).expect("history.json");
    assert_eq!(h["final"]["stop"], "rounds_completed", "{h}");
    let rounds = h["rounds"].as_array().expect("rounds").clone();
    assert_eq!(
        rounds.len(),
        ROUNDS,
        "every round recorded once: {rounds:?}"
    );
    for (i, r) in rounds.iter().enumerate() {
        assert_eq!(r["round"], i + 1, "{rounds:?}");
        assert!(r["aborted"].is_null(), "{r}");
    }
    // The node came back as itself, with its stored credential, and took part again.
    let after = fs::read_to_string(&restarted_log).expect("restarted node's log");
    assert_eq!(node_id(&after).as_deref(), Some(victim.as_str()), "{after}");
    let rejoined: Vec<u64> = rounds_saying(&after, ": update delivered")
        .into_iter()
        .filter(|&r| r > killed_in)
        .collect();
    assert!(
        !rejoined.is_empty(),
        "the restarted node delivered no update after round {killed_in}:\n{after}"
    );
    Churned {
        server,
        rounds,
        victim,
        rejoined,
    }
}

#[test]
fn a_krum_deployment_finishes_every_round_through_server_and_node_kills() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let Churned {
        server,
        rounds,
        victim,
        rejoined,
    } = churned_run(tmp.path(), "aggregator = \"krum\"\n");
    // Each round folded exactly the updates the store accepted for it: none lost, none twice.
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let store = runtime
        .block_on(Store::open(&server.store))
        .expect("the run's store");
    for r in &rounds {
        let round = r["round"].as_u64().expect("round") as u32;
        let accepted = runtime
            .block_on(store.accepted(round))
            .expect("accepted updates");
        let participants = r["participants"].as_u64().expect("participants");
        assert_eq!(participants, accepted.len() as u64, "round {round}: {r}");
        // Krum with byzantine 1 needs more than 4 updates.
        assert!(participants >= 5, "round {round}: {r}");
        // The restarted node's updates are among the round's contributors.
        if rejoined.contains(&u64::from(round)) {
            assert!(
                accepted.iter().any(|(node, _)| *node == victim),
                "round {round}: {victim} delivered but is not among {accepted:?}"
            );
        }
    }
}

#[test]
fn a_secagg_deployment_finishes_every_round_through_server_and_node_kills() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let Churned { rounds, .. } = churned_run(tmp.path(), "secagg = true\n");
    for r in &rounds {
        // The default threshold follows each round's cohort: a round of 3 needs all 3 masked
        // inputs, one of six 4 (3 of 5 neighbours).
        let participants = r["participants"].as_u64().expect("participants");
        assert!(
            (3..=NODES as u64).contains(&participants),
            "round {}: {r}",
            r["round"]
        );
    }
}

#[test]
fn a_secagg_deployment_with_default_settings_goes_on_after_losing_a_node_for_good() {
    // `secagg = true` and the default fleet of 10: the threshold follows each round's cohort,
    // so rounds of the six nodes, and then of the five left, finish.
    const ROUNDS: usize = 8;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let server = TestServer::new(
        dir,
        &[],
        false,
        &format!(
            "dataset = \"mnist-subset\"\nmodel = \"logreg\"\nrounds = {ROUNDS}\nsecagg = true\n\
             round_timeout = 20\nheartbeat = 1\noffline_after = 4\nsecagg-stage-timeout = 8\n"
        ),
    );
    let (mut processes, logs) = support::start_share_fleet(&server, "logreg", NODES, 120);
    // The node that leaves is the first to deliver an update, so it has taken part and the run
    // has most of its rounds ahead: which node comes online first, and how fast a round of
    // logreg goes, are left to chance.
    let mut first = None;
    wait_for(
        "a node's first update",
        Duration::from_secs(120),
        &logs,
        || {
            first = (1..logs.len()).find(|&i| {
                let log = fs::read_to_string(&logs[i]).unwrap_or_default();
                !rounds_saying(&log, ": update delivered").is_empty()
            });
            first.is_some()
        },
    );
    let victim_index = first.expect("a node delivered");
    let victim = node_id(&fs::read_to_string(&logs[victim_index]).expect("log")).expect("enrolled");
    // It leaves for good.
    processes.0[victim_index].kill().expect("kill -9 a node");
    let _ = processes.0[victim_index].wait();
    let killed_after = rounds_done(&server.out);
    assert!(
        killed_after + 1 < ROUNDS,
        "the run was about to end when the node was lost; give it more rounds"
    );
    let server_log = support::server_succeeds(&mut processes, &logs, Duration::from_secs(240));
    let h = history(&server.out).expect("history.json");
    let rounds = h["rounds"].as_array().expect("rounds");
    assert_eq!(rounds.len(), ROUNDS, "{server_log}");
    assert!(
        rounds.iter().any(|r| r["contributors"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c == victim.as_str()))),
        "the lost node took part before it left: {rounds:?}"
    );
    // Every round after the one it was lost in finishes on the other five, or fewer.
    for r in &rounds[killed_after + 1..] {
        let participants = r["participants"].as_u64().expect("participants");
        assert!((3..NODES as u64).contains(&participants), "{r}");
        let contributors = r["contributors"].as_array().expect("contributors");
        assert!(!contributors.iter().any(|c| c == victim.as_str()), "{r}");
    }
}
