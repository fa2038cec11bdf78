//! Standby servers: two `ferry server` processes with one configuration, one PostgreSQL
//! database and one S3 bucket (a real Garage on loopback), and six nodes that know both
//! addresses. The active server is SIGKILLed twice mid-run and restarted (it comes back as a
//! standby), and once SIGSTOPped until the other took over, then resumed: it must notice, write
//! nothing, and start again as a standby. The run must finish with every round committed
//! once, each round's stored updates exactly its participants, and each round's model the
//! FedAvg of the previous model and those updates.
//!
//! Needs PostgreSQL (`scripts/start-postgres.sh`), Garage and the MNIST subset, which
//! `scripts/install-deps.sh` installs.

use crate::support;

use std::{
    fs,
    path::PathBuf,
    process::{Child, Command},
    time::Duration,
};

use ferry_core::{Model, update_file::decode_update};
use ferry_harness::{
    garage::{Garage, REGION},
    postgres::Database,
};
use ferry_server::{
    blobs::{Blobs, s3::S3Settings},
    store::Store,
};
use support::{
    Killer, TestServer, history, rounds_done, share_args, spawn_logged_with_env, token_client_args,
    wait_for,
};

const NODES: usize = 6;
const ROUNDS: usize = 6;

/// The two servers, each started (and restarted) with its own address and log.
struct Pair {
    server: TestServer,
    env: Vec<(&'static str, String)>,
    ports: [u16; 2],
    api_ports: [u16; 2],
    logs: Vec<PathBuf>,
    starts: [usize; 2],
}

impl Pair {
    fn log(&self, i: usize) -> PathBuf {
        self.server
            .dir
            .join(format!("server-{i}-{}.log", self.starts[i]))
    }

    fn spawn(&mut self, i: usize) -> Child {
        self.starts[i] += 1;
        let log = self.log(i);
        self.logs.push(log.clone());
        let mut args = self.server.args();
        args.extend([
            "--listen".into(),
            format!("127.0.0.1:{}", self.ports[i]),
            "--api-listen".into(),
            format!("127.0.0.1:{}", self.api_ports[i]),
        ]);
        spawn_logged_with_env(&args, &log, &self.env)
    }

    /// What server `i`'s current log says.
    fn said(&self, i: usize) -> String {
        fs::read_to_string(self.log(i)).unwrap_or_default()
    }

    /// The address nodes know server `i` by.
    fn url(&self, i: usize) -> String {
        format!("https://127.0.0.1:{}", self.ports[i])
    }
}

/// Sends `signal` to process `pid`.
fn signal(signal: &str, pid: &str) {
    let sent = Command::new("kill")
        .args([signal, pid])
        .status()
        .expect("kill runs");
    assert!(sent.success(), "kill {signal} {pid}");
}

/// The lease holder's name (its advertised address), read from the store.
fn holder(runtime: &tokio::runtime::Runtime, store: &Store) -> Option<String> {
    runtime
        .block_on(store.lease())
        .ok()
        .flatten()
        .filter(|lease| lease.expires_in_ms > 0)
        .map(|lease| lease.holder)
}

/// Which of the pair holds the lease, waiting until one does.
fn active(pair: &Pair, runtime: &tokio::runtime::Runtime, store: &Store) -> usize {
    let mut found = None;
    wait_for(
        "an active server",
        Duration::from_secs(60),
        &pair.logs,
        || {
            found = holder(runtime, store).and_then(|h| (0..2).find(|&i| h == pair.url(i)));
            found.is_some()
        },
    );
    found.unwrap_or_default()
}

#[test]
fn standby_servers_take_over_from_a_killed_or_paused_leader_without_losing_an_update() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let database = runtime.block_on(Database::create());
    let garage = Garage::start();
    let mut server = TestServer::new(
        dir,
        &[],
        false,
        &format!(
            "dataset = \"mnist-subset\"\nmodel = \"logreg\"\nclients = {NODES}\nmin_clients = 3\n\
             min_results = 2\nrounds = {ROUNDS}\nlocal-epochs = 40\nround_timeout = 10\n\
             heartbeat = 1\noffline_after = 4\nretry-backoff = 1\n"
        ),
    );
    server.store = database.url();
    let config = fs::read_to_string(&server.config).expect("config");
    let config = config
        .replace(
            &format!("store = \"sqlite:{}\"", dir.join("ferry.db").display()),
            &format!("store = \"{}\"", database.url()),
        )
        .replace(
            &format!("blobs = \"{}\"", dir.join("blobs").display()),
            &format!(
                "blobs = \"{}\"\nuploads = \"{}\"",
                garage.url("federation"),
                dir.join("uploads").display()
            ),
        )
        .replace(
            "[api]\n",
            &format!(
                "[s3]\nendpoint = \"{}\"\nregion = \"{REGION}\"\n[lease]\nseconds = 3\n[api]\n",
                garage.endpoint
            ),
        );
    assert!(
        config.contains("s3://") && config.contains("postgres"),
        "{config}"
    );
    fs::write(&server.config, config).expect("config");
    let mut pair = Pair {
        env: garage.env(),
        server,
        ports: [support::free_port(), support::free_port()],
        api_ports: [support::free_port(), support::free_port()],
        logs: Vec::new(),
        starts: [0, 0],
    };
    let store = runtime
        .block_on(Store::open(&database.url()))
        .expect("store");

    let mut processes = Killer(vec![pair.spawn(0)]);
    let first = active(&pair, &runtime, &store);
    assert_eq!(first, 0, "the only server takes the lease");
    processes.0.push(pair.spawn(1));
    wait_for("the standby", Duration::from_secs(60), &pair.logs, || {
        pair.said(1).contains("standby;")
    });
    let both = format!("{},{}", pair.url(0), pair.url(1));
    for i in 0..NODES {
        let token = pair.server.token(&format!("site-{i}"));
        let mut args = token_client_args(&pair.server, &token, &format!("site-{i}"));
        let at = args.iter().position(|a| a == "--server").expect("--server") + 1;
        args[at] = both.clone();
        args.extend(share_args("logreg", NODES, i, 180));
        let log = dir.join(format!("client-{i}.log"));
        processes.0.push(support::spawn_logged(&args, &log));
        pair.logs.push(log);
    }
    let out = pair.server.out.clone();

    // Two SIGKILLs of whichever server is active, each in a round after a committed one; the
    // killed server comes back (as a standby).
    for after in [1, 2] {
        wait_for("a round", Duration::from_secs(180), &pair.logs, || {
            rounds_done(&out) >= after
        });
        assert!(rounds_done(&out) < ROUNDS, "the run outpaced the kills");
        let victim = active(&pair, &runtime, &store);
        processes.0[victim]
            .kill()
            .expect("SIGKILL the active server");
        let _ = processes.0[victim].wait();
        let other = 1 - victim;
        wait_for(
            "the standby to take over",
            Duration::from_secs(30),
            &pair.logs,
            || pair.said(other).contains("active coordinator"),
        );
        processes.0[victim] = pair.spawn(victim);
    }

    // A SIGSTOP of the active server: the other takes over and commits a round; the paused one
    // is resumed, finds its lease gone, and starts again as a standby.
    wait_for("round 3", Duration::from_secs(180), &pair.logs, || {
        rounds_done(&out) >= 3
    });
    let paused = active(&pair, &runtime, &store);
    let pid = processes.0[paused].id().to_string();
    signal("-STOP", &pid);
    let other = 1 - paused;
    let committed = rounds_done(&out);
    wait_for(
        "the standby to take over from the paused server",
        Duration::from_secs(30),
        &pair.logs,
        || pair.said(other).contains("active coordinator"),
    );
    wait_for(
        "a round committed by the new active server",
        Duration::from_secs(180),
        &pair.logs,
        || rounds_done(&out) > committed,
    );
    signal("-CONT", &pid);
    wait_for(
        "the resumed server to stand by",
        Duration::from_secs(30),
        &pair.logs,
        || pair.said(paused).contains("starting again as a standby"),
    );

    // The run ends; the active server gives up its lease, and the standby ends too.
    wait_for(
        "the run to finish",
        Duration::from_secs(300),
        &pair.logs,
        || history(&out).is_some_and(|h| !h["final"].is_null()),
    );
    wait_for(
        "both servers to exit",
        Duration::from_secs(60),
        &pair.logs,
        || {
            processes.0[..2]
                .iter_mut()
                .all(|p| matches!(p.try_wait(), Ok(Some(_))))
        },
    );
    let h = history(&out).expect("history.json");
    assert_eq!(h["final"]["stop"], "rounds_completed", "{h}");
    let rounds = h["rounds"].as_array().expect("rounds");
    assert_eq!(rounds.len(), ROUNDS, "every round once: {rounds:?}");

    // Every round's stored updates are its participants, and its model is their FedAvg.
    let blobs = Blobs::at(
        &garage.url("federation"),
        &S3Settings {
            endpoint: Some(garage.endpoint.clone()),
            region: Some(REGION.into()),
            credentials: Some((garage.key_id.clone(), garage.secret.clone())),
        },
        &dir.join("check"),
    )
    .expect("blobs");
    let model_after = |round: u32| -> Model {
        let ids = runtime
            .block_on(store.round_blobs(round))
            .expect("round blobs");
        let bytes = runtime.block_on(blobs.get(&ids[0])).expect("model blob");
        Model::from_safetensors(&bytes).expect("model")
    };
    for (i, record) in rounds.iter().enumerate() {
        let round = i as u32 + 1;
        assert_eq!(record["round"], round, "{record}");
        let accepted = runtime.block_on(store.accepted(round)).expect("accepted");
        assert_eq!(
            record["participants"].as_u64(),
            Some(accepted.len() as u64),
            "round {round}: the record's participants are its stored updates"
        );
        if round == 1 {
            continue;
        }
        let before = model_after(round - 1);
        let after = model_after(round);
        let mut sum = vec![0f64; before.values().len()];
        let mut weight = 0f64;
        for (_, id) in &accepted {
            let bytes = runtime.block_on(blobs.get(id)).expect("update blob");
            let update = decode_update(&bytes, before.layout()).expect("update");
            let n = update.num_examples as f64;
            for (s, d) in sum.iter_mut().zip(&update.delta) {
                *s += n * f64::from(*d);
            }
            weight += n;
        }
        for ((b, a), s) in before.values().iter().zip(after.values()).zip(&sum) {
            let replayed = f64::from(*b) + s / weight;
            assert!(
                (replayed - f64::from(*a)).abs() < 1e-4,
                "round {round}: the model is not the FedAvg of its stored updates"
            );
        }
    }
    let last = model_after(ROUNDS as u32);
    let written = Model::from_safetensors(&fs::read(out.join("model.safetensors")).expect("model"))
        .expect("final model");
    assert_eq!(
        written.values(),
        last.values(),
        "the final model is the last round's"
    );
    drop(processes);
    drop(garage);
}

/// `url` (`postgres://USER@HOST:PORT/DB`) with its port, and with the port replaced by `port`.
fn through_port(url: &str, port: u16) -> (u16, String) {
    let (head, tail) = url.rsplit_once('@').expect("postgres://USER@HOST:PORT/DB");
    let (host_port, database) = tail.split_once('/').expect("a database");
    let (host, old) = host_port.rsplit_once(':').expect("a port");
    (
        old.parse().expect("a port number"),
        format!("{head}@{host}:{port}/{database}"),
    )
}

#[test]
fn a_server_waits_out_a_database_restart_and_finishes_the_run() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let database = runtime.block_on(Database::create());
    let (pg_port, _) = through_port(&database.url(), 0);
    let relay = support::outage::Outage::start(pg_port);
    let (_, relayed) = through_port(&database.url(), relay.port);
    let nodes = 4;
    let rounds = 5;
    let mut server = TestServer::new(
        dir,
        &[],
        false,
        &format!(
            "dataset = \"mnist-subset\"\nmodel = \"logreg\"\nclients = {nodes}\nmin_clients = 2\n\
             min_results = 2\nrounds = {rounds}\nlocal-epochs = 40\nround_timeout = 30\n\
             heartbeat = 1\noffline_after = 4\nretry-backoff = 1\n"
        ),
    );
    let config = fs::read_to_string(&server.config)
        .expect("config")
        .replace(&server.store, &relayed);
    fs::write(&server.config, config).expect("config");
    server.store = database.url();
    let mut logs = vec![dir.join("server.log")];
    let mut processes = Killer(vec![server.spawn(&logs[0])]);
    for i in 0..nodes {
        let args = support::share_client_args(&server, "logreg", nodes, i, 120);
        let log = dir.join(format!("client-{i}.log"));
        processes.0.push(support::spawn_logged(&args, &log));
        logs.push(log);
    }
    wait_for("round 1", Duration::from_secs(120), &logs, || {
        rounds_done(&server.out) >= 1
    });
    // The database goes away for 6 s mid-run (shorter than the 10 s lease, so the server
    // keeps it), then comes back.
    relay.outage(Duration::from_secs(6));
    let log = support::server_succeeds(&mut processes, &logs, Duration::from_secs(300));
    assert!(
        log.contains("cannot be reached") || log.contains("cannot renew the coordinator lease"),
        "the server said why it waited:\n{log}"
    );
    let h = history(&server.out).expect("history.json");
    assert_eq!(h["final"]["stop"], "rounds_completed", "{h}");
    assert_eq!(h["rounds"].as_array().map(Vec::len), Some(rounds), "{h}");
}
