//! Chaos: a deployed run whose nodes reach the server only through a fault-injecting proxy
//! (connections refused, cut mid-transfer, stalled, delayed) while the server is killed with
//! SIGKILL 24 times at moments drawn from a seeded generator. After the run, the invariants:
//! it ended with every round; every committed round lists exactly the updates the store
//! accepted for it, each once; and the final model equals the initial model plus every
//! committed round's FedAvg of its accepted updates, replayed from the blob store (closer
//! than any one update counted twice would leave it).
//!
//! Needs the MNIST subset that `scripts/install-deps.sh` installs.

use crate::support;

use std::{collections::BTreeMap, fs, time::Duration};

use ferry_core::{Model, update_file};
use ferry_server::{blobs::Blobs, store::Store};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use support::{
    Killer, TestServer, chaos::ChaosProxy, history, rounds_done, share_args, spawn_logged,
    token_client_args, until_listening, wait_for,
};

const NODES: usize = 4;
const ROUNDS: usize = 40;
const KILLS: usize = 24;
/// Seeds the kill schedule and the proxy's faults: a failing run can be repeated.
const SEED: u64 = 20_261_202;

#[test]
fn a_run_through_a_faulty_network_and_24_server_kills_loses_and_doubles_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let server = TestServer::new(
        dir,
        &[],
        false,
        &format!(
            "dataset = \"mnist-subset\"\nmodel = \"logreg\"\nclients = {NODES}\nmin_clients = 3\n\
             min_results = 3\nrounds = {ROUNDS}\nlocal-epochs = 1\nround_timeout = 10\n\
             heartbeat = 1\noffline_after = 4\nretry-backoff = 1\nmax-round-failures = 50\n"
        ),
    );
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let mut logs = vec![dir.join("server-1.log")];
    let mut processes = Killer(vec![server.spawn(&logs[0])]);
    until_listening(server.port, "the server", Duration::from_secs(60));
    let store = runtime
        .block_on(Store::open(&server.store))
        .expect("the run's store");
    let initial_sha = runtime
        .block_on(store.run())
        .expect("run row")
        .expect("a run started")
        .model_sha;

    let proxy = ChaosProxy::start(server.port, SEED);
    let through_proxy = format!("https://localhost:{}", proxy.port);
    for i in 0..NODES {
        let token = server.token(&format!("site-{i}"));
        let mut args = token_client_args(&server, &token, &format!("site-{i}"));
        let url = args.iter().position(|a| a == "--server").expect("--server") + 1;
        args[url] = through_proxy.clone();
        args.extend(share_args("logreg", NODES, i, 300));
        let log = dir.join(format!("client-{i}.log"));
        processes.0.push(spawn_logged(&args, &log));
        logs.push(log);
    }

    let out = server.out.clone();
    wait_for("round 1", Duration::from_secs(180), &logs, || {
        rounds_done(&out) >= 1
    });
    let mut schedule = ChaCha8Rng::seed_from_u64(SEED);
    for kill in 1..=KILLS {
        std::thread::sleep(Duration::from_millis(schedule.random_range(300..2_500)));
        assert!(
            matches!(processes.0[0].try_wait(), Ok(None)),
            "the run ended before kill {kill} ({} rounds done); give it more rounds",
            rounds_done(&out)
        );
        processes.0[0].kill().expect("kill -9 the server");
        let _ = processes.0[0].wait();
        let log = dir.join(format!("server-{}.log", kill + 1));
        processes.0[0] = server.spawn(&log);
        logs.push(log);
    }
    wait_for(
        "the server to finish",
        Duration::from_secs(600),
        &logs,
        || matches!(processes.0[0].try_wait(), Ok(Some(_))),
    );
    let exit = processes.0[0].wait().expect("server status");
    let last_log = fs::read_to_string(&logs[KILLS]).unwrap_or_default();
    assert!(exit.success(), "server exit {exit}\n{last_log}");
    let [passed, refused, cut, stalled, delayed] = proxy.counts();
    eprintln!(
        "proxy: {passed} connections passed, {refused} refused, {cut} cut, {stalled} stalled, \
         {delayed} delayed"
    );
    assert!(
        refused > 0 && cut > 0 && stalled > 0 && delayed > 0,
        "every fault was injected"
    );

    // The run ended, with every round once.
    let h = history(&out).expect("history.json");
    assert_eq!(h["final"]["stop"], "rounds_completed", "{h}");
    let rounds = h["rounds"].as_array().expect("rounds").clone();
    let numbers: Vec<u64> = rounds.iter().filter_map(|r| r["round"].as_u64()).collect();
    assert_eq!(numbers, (1..=ROUNDS as u64).collect::<Vec<_>>());

    // Every committed round lists exactly the updates the store accepted for it, each once.
    let blobs = Blobs::local(&dir.join("blobs")).expect("blob store");
    let blob = |sha: &str| {
        runtime
            .block_on(blobs.get(sha))
            .expect("blob kept, hash checked")
    };
    let initial = Model::from_safetensors(&blob(&initial_sha)).expect("initial model");
    let mut replayed: Vec<f64> = initial.values().iter().map(|&v| f64::from(v)).collect();
    let mut smallest_double_count = f64::INFINITY;
    for record in &rounds {
        let round = record["round"].as_u64().expect("round") as u32;
        let accepted: BTreeMap<String, String> = runtime
            .block_on(store.accepted(round))
            .expect("accepted updates")
            .into_iter()
            .collect();
        let mut contributors: Vec<String> = record["contributors"]
            .as_array()
            .expect("contributors")
            .iter()
            .map(|c| c.as_str().expect("node id").to_string())
            .collect();
        contributors.sort();
        let listed: Vec<String> = accepted.keys().cloned().collect();
        assert_eq!(
            contributors, listed,
            "round {round} folded what it accepted, once each"
        );
        assert_eq!(record["participants"], listed.len(), "round {round}");

        // FedAvg: the example-weighted mean of the accepted deltas, added to the model.
        let updates: Vec<_> = accepted
            .values()
            .map(|sha| {
                update_file::decode_update(&blob(sha), initial.layout()).expect("a stored update")
            })
            .collect();
        let total: f64 = updates.iter().map(|u| u.num_examples as f64).sum();
        let mut mean = vec![0.0f64; replayed.len()];
        for update in &updates {
            let weight = update.num_examples as f64 / total;
            for (m, &d) in mean.iter_mut().zip(&update.delta) {
                *m += weight * f64::from(d);
            }
        }
        for update in &updates {
            // Counting this update twice would move the model by n / (N + n) * (delta - mean).
            let share = update.num_examples as f64 / (total + update.num_examples as f64);
            let shift = update
                .delta
                .iter()
                .zip(&mean)
                .map(|(&d, &m)| (share * (f64::from(d) - m)).abs())
                .fold(0.0, f64::max);
            smallest_double_count = smallest_double_count.min(shift);
        }
        for (v, m) in replayed.iter_mut().zip(&mean) {
            *v += m;
        }
    }

    // The final model is the replay of the committed updates.
    let final_model =
        Model::from_safetensors(&fs::read(out.join("model.safetensors")).expect("model"))
            .expect("final model");
    let gap = final_model
        .values()
        .iter()
        .zip(&replayed)
        .map(|(&v, &r)| (f64::from(v) - r).abs())
        .fold(0.0, f64::max);
    eprintln!(
        "replay: largest gap {gap:.3e}; the smallest double count would move a value by \
         {smallest_double_count:.3e}"
    );
    assert!(
        gap * 10.0 < smallest_double_count,
        "the final model is not the replay of the committed updates: gap {gap:.3e}, while \
         counting any one update twice would move it by at least {smallest_double_count:.3e}"
    );
}
