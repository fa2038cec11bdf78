//! Aggregation relays: `ferry relay` processes between the nodes and the server, over TLS on
//! loopback.
//!
//! - Folding: four nodes behind two relays make, round by round, the model the same four
//!   nodes make dialling the server (within f32 rounding: the sums are grouped differently),
//!   while the server receives two partial aggregates a round instead of four updates, and
//!   every round's record still names each node with its examples.
//! - Faults: nodes that know both relays and the server, relays that reach the server through
//!   a fault-injecting proxy, while relays and the server are SIGKILLed at seeded moments and
//!   restarted. Afterwards every committed round counts each
//!   node once, every partial aggregate's contributors are exactly the rows the store counts
//!   for it, and the final model is the replay of what the store accepted.
//!
//! Needs the MNIST subset that `scripts/install-deps.sh` installs.

use crate::support;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::Child,
    time::Duration,
};

use ferry_core::{Model, update_file::decode_update};
use ferry_server::{
    blobs::Blobs,
    store::{IdentityKind, Store},
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use support::{
    Killer, TestServer, chaos::ChaosProxy, free_port, history, rounds_done, run_ok,
    server_succeeds, share_args, spawn_logged, token_client_args, until_listening, wait_for,
};

const NODES: usize = 4;

/// The `[run]` of a deployment of `nodes` nodes, every one in every round.
fn run_section(nodes: usize, rounds: usize, extra: &str) -> String {
    format!(
        "dataset = \"mnist-subset\"\nmodel = \"logreg\"\nclients = {nodes}\nmin_clients = {nodes}\n\
         min_results = {nodes}\nrounds = {rounds}\nlocal-epochs = 1\nround_timeout = 30\n\
         heartbeat = 1\noffline_after = 5\nretry-backoff = 1\n{extra}"
    )
}

/// A relay process of a test: its port, data folder and the arguments it restarts with.
struct TestRelay {
    port: u16,
    args: Vec<String>,
    logs: Vec<PathBuf>,
    dir: PathBuf,
}

impl TestRelay {
    /// Enrols relay `name` with a fresh relay token; it dials the server at `upstream`, and
    /// its nodes dial `port`.
    fn new(server: &TestServer, name: &str, upstream: &str) -> Self {
        let out = run_ok(&[
            "token",
            "create",
            "--relay",
            "--name",
            name,
            "--store",
            &server.store,
        ]);
        let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let port = free_port();
        let dir = server.dir.join(name);
        let certs = &server.certs;
        let args = [
            "relay",
            "--upstream",
            upstream,
            "--ca",
            &server.ca(),
            "--cert",
            certs.join("server.pem").to_str().expect("utf-8"),
            "--key",
            certs.join("server.key").to_str().expect("utf-8"),
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--token",
            &token,
            "--data-dir",
            dir.to_str().expect("utf-8"),
        ]
        .map(String::from)
        .to_vec();
        Self {
            port,
            args,
            logs: Vec::new(),
            dir,
        }
    }

    fn url(&self) -> String {
        format!("https://localhost:{}", self.port)
    }

    /// Starts (or restarts) the relay and waits for it to listen; a relay that exits instead
    /// fails the test with its log.
    fn spawn(&mut self) -> Child {
        let log = self
            .dir
            .with_extension(format!("{}.log", self.logs.len() + 1));
        let mut child = spawn_logged(&self.args, &log);
        self.logs.push(log.clone());
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                let said = fs::read_to_string(&log).unwrap_or_default();
                panic!("the relay exited ({status}) before listening:\n{said}");
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the relay did not listen on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        child
    }
}

/// `ferry client` for node `index` of `nodes`, enrolling through the first of `servers` and
/// knowing the rest.
fn node_args(server: &TestServer, nodes: usize, index: usize, servers: &[String]) -> Vec<String> {
    let token = server.token(&format!("site-{index}"));
    let mut args = token_client_args(server, &token, &format!("site-{index}"));
    let url = args.iter().position(|a| a == "--server").expect("--server") + 1;
    args[url] = servers.join(",");
    args.extend(share_args("logreg", nodes, index, 300));
    args
}

fn final_model(out: &Path) -> Model {
    Model::from_safetensors(&fs::read(out.join("model.safetensors")).expect("model"))
        .expect("final model")
}

/// Two relays side by side, each dialling the server.
const SIDE_BY_SIDE: &[Option<usize>] = &[None, None];

/// A chain of two: relay 1 dials relay 0, which dials the server.
const CHAIN: &[Option<usize>] = &[None, Some(0)];

/// Runs `nodes` nodes for `rounds` rounds of the `[run]` lines `extra`, through one relay per
/// entry of `uplinks` (each dialling the server, or the relay of that index; none: the nodes
/// dial the server), the nodes spread over the relays in turn; returns the server once its
/// run succeeded.
fn deploy(
    dir: &Path,
    nodes: usize,
    uplinks: &[Option<usize>],
    rounds: usize,
    extra: &str,
) -> TestServer {
    let server = TestServer::new(dir, &[], false, &run_section(nodes, rounds, extra));
    let mut logs = vec![dir.join("server.log")];
    let mut processes = Killer(vec![server.spawn(&logs[0])]);
    until_listening(server.port, "the server", Duration::from_secs(60));
    let mut middle: Vec<TestRelay> = Vec::new();
    for (r, uplink) in uplinks.iter().enumerate() {
        let upstream = match uplink {
            None => server.url(),
            Some(above) => middle[*above].url(),
        };
        let mut relay = TestRelay::new(&server, &format!("relay-{r}"), &upstream);
        processes.0.push(relay.spawn());
        logs.extend(relay.logs.clone());
        middle.push(relay);
    }
    for i in 0..nodes {
        let via = match middle.len() {
            0 => server.url(),
            n => middle[i % n].url(),
        };
        let log = dir.join(format!("client-{i}.log"));
        processes
            .0
            .push(spawn_logged(&node_args(&server, nodes, i, &[via]), &log));
        logs.push(log);
    }
    server_succeeds(&mut processes, &logs, Duration::from_secs(300));
    server
}

#[test]
fn nodes_behind_two_relays_or_a_chain_make_the_direct_runs_model_and_every_round_names_them() {
    const ROUNDS: usize = 3;
    let tmp = tempfile::tempdir().expect("tempdir");
    let direct = deploy(&tmp.path().join("direct"), NODES, &[], ROUNDS, "");
    let direct_model = final_model(&direct.out);
    let model_bytes = 4 * direct_model.num_params() as u64;
    let direct_rounds = history(&direct.out).expect("history")["rounds"].clone();
    assert_eq!(direct_rounds[0]["bytes_up"].as_u64(), Some(4 * model_bytes));

    // Side by side, two partial aggregates come up a round; through a chain, one (the lower
    // relay's partial folds into the upper relay's).
    for (name, uplinks, partials) in [("side-by-side", SIDE_BY_SIDE, 2), ("chain", CHAIN, 1)] {
        let relayed = deploy(&tmp.path().join(name), NODES, uplinks, ROUNDS, "");
        let model = final_model(&relayed.out);
        let gap = direct_model
            .values()
            .iter()
            .zip(model.values())
            .map(|(x, y)| (x - y).abs() / (1.0 + x.abs()))
            .fold(0.0f32, f32::max);
        eprintln!("{name}: largest relative gap to the direct run's model: {gap:.3e}");
        assert!(
            gap < 1e-5,
            "{name}: the relayed run's model differs: {gap:.3e}"
        );

        let h = history(&relayed.out).expect("history");
        let rounds = h["rounds"].as_array().expect("rounds");
        assert_eq!(rounds.len(), ROUNDS);
        for r in rounds {
            let contributors = r["contributors"].as_array().expect("contributors");
            let examples = r["contributor_examples"].as_array().expect("examples");
            assert_eq!(contributors.len(), NODES, "{name}: {r}");
            assert_eq!(examples.len(), NODES, "{name}: {r}");
            assert!(examples.iter().all(|n| n.as_u64().is_some_and(|n| n > 0)));
            assert_eq!(
                r["bytes_up"].as_u64(),
                Some(partials * model_bytes),
                "{name}: {r}"
            );
        }
        check_topology(&relayed, uplinks);
    }
}

/// The relays are relays in the store, each below the relay it dials (or the server), and
/// every node sits below one.
fn check_topology(server: &TestServer, uplinks: &[Option<usize>]) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let store = runtime.block_on(Store::open(&server.store)).expect("store");
    let identities = runtime.block_on(store.nodes()).expect("nodes");
    let relays: BTreeMap<&str, Option<&str>> = identities
        .iter()
        .filter(|n| n.kind == IdentityKind::Relay)
        .map(|n| (n.name.as_str(), n.relay.as_deref()))
        .collect();
    assert_eq!(relays.len(), uplinks.len());
    let id_of = |name: &str| {
        identities
            .iter()
            .find(|n| n.name == name)
            .map(|n| n.node_id.as_str())
    };
    for (r, uplink) in uplinks.iter().enumerate() {
        let above = uplink.and_then(|a| id_of(&format!("relay-{a}")));
        assert_eq!(relays[format!("relay-{r}").as_str()], above, "relay-{r}");
    }
    let relay_ids: BTreeSet<&str> = relays.keys().filter_map(|name| id_of(name)).collect();
    for node in identities.iter().filter(|n| n.kind == IdentityKind::Node) {
        assert!(
            node.relay.as_deref().is_some_and(|r| relay_ids.contains(r)),
            "{node:?}"
        );
    }
}

/// Each round's record of a run through the relays of `uplinks`, checked to have aggregated
/// `nodes` updates; returns the bytes the server received in its first round.
fn relayed_round_bytes(dir: &Path, nodes: usize, uplinks: &[Option<usize>], extra: &str) -> u64 {
    let server = deploy(dir, nodes, uplinks, 2, extra);
    let h = history(&server.out).expect("history");
    let rounds = h["rounds"].as_array().expect("rounds");
    assert_eq!(rounds.len(), 2, "`{extra}`: {h}");
    for r in rounds {
        assert_eq!(
            r["participants"].as_u64(),
            Some(nodes as u64),
            "`{extra}`: {r}"
        );
        assert!(r["aborted"].is_null(), "`{extra}`: {r}");
    }
    rounds[0]["bytes_up"].as_u64().expect("bytes up")
}

#[test]
fn each_rule_folds_at_relays_or_passes_through_them_and_every_round_applies() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let model = 4 * 7850;
    // Linear rules: two partial aggregates a round (SCAFFOLD's carry control sums too).
    for (i, (extra, per_partial)) in [
        ("strategy = \"fednova\"\n", model),
        ("strategy = \"scaffold\"\n", 2 * model),
        (
            "dp-noise-multiplier = 0.3\ndp-clip = 1.0\ndp-placement = \"distributed\"\n",
            model,
        ),
        // Compressed updates are decoded at the relay (the nodes having fetched the
        // half-precision model through it) and folded into f32 partial sums.
        ("compress = \"topk:0.01\"\n", model),
        ("compress = \"fp16\"\n", model),
    ]
    .into_iter()
    .enumerate()
    {
        let bytes = relayed_round_bytes(
            &tmp.path().join(format!("fold-{i}")),
            NODES,
            SIDE_BY_SIDE,
            extra,
        );
        assert_eq!(
            bytes,
            2 * per_partial as u64,
            "`{extra}` folds at the relays"
        );
    }
    // Rules that need each update: every node's update reaches the server as the node sent
    // it (compressed: int8's byte a value and a 4-byte scale per 1,024 values).
    let int8 = 7850 + 4 * 8;
    for (i, (extra, per_node)) in [
        ("aggregator = \"median\"\n", model),
        ("dp-noise-multiplier = 0.3\ndp-clip = 1.0\n", model),
        ("aggregator = \"median\"\ncompress = \"int8\"\n", int8),
    ]
    .into_iter()
    .enumerate()
    {
        let bytes = relayed_round_bytes(
            &tmp.path().join(format!("pass-{i}")),
            NODES,
            SIDE_BY_SIDE,
            extra,
        );
        assert_eq!(bytes, (NODES * per_node) as u64, "`{extra}` passes through");
    }
    // Through a chain, too, each update passes both relays on its node's behalf.
    let extra = "aggregator = \"median\"\n";
    let bytes = relayed_round_bytes(&tmp.path().join("pass-chain"), NODES, CHAIN, extra);
    assert_eq!(
        bytes,
        (NODES * model) as u64,
        "`{extra}` passes through a chain"
    );
    // SecAgg+: keys and shares pass through the relays on each node's behalf; each relay
    // adds its nodes' masked inputs (32-bit values, the model's and the weight slot) into
    // one masked sum, and the round's total unmasks at the server. The server receives one
    // masked sum per relay at the top (beside the small key-exchange messages), not six
    // inputs.
    let masked_input = (7850 + 1) * 4;
    for (name, uplinks, sums) in [("secagg", SIDE_BY_SIDE, 2), ("secagg-chain", CHAIN, 1)] {
        let bytes = relayed_round_bytes(&tmp.path().join(name), 6, uplinks, "secagg = true\n");
        assert!(
            (sums * masked_input..(sums + 1) * masked_input).contains(&bytes),
            "{name}: {bytes} bytes up, expected {sums} masked sums of {masked_input} bytes"
        );
    }
}

#[test]
fn relays_and_the_server_killed_mid_round_lose_and_double_nothing() {
    const ROUNDS: usize = 200;
    const KILLS: usize = 8;
    const SEED: u64 = 20_261_206;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let server = TestServer::new(
        dir,
        &[],
        false,
        &format!(
            "dataset = \"mnist-subset\"\nmodel = \"logreg\"\nclients = {NODES}\nmin_clients = 2\n\
             min_results = 2\nrounds = {ROUNDS}\nlocal-epochs = 1\nround_timeout = 10\n\
             heartbeat = 1\noffline_after = 4\nretry-backoff = 1\nmax-round-failures = 50\n"
        ),
    );
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let mut logs = vec![dir.join("server-1.log")];
    let mut processes = Killer(vec![server.spawn(&logs[0])]);
    until_listening(server.port, "the server", Duration::from_secs(60));
    let store = runtime.block_on(Store::open(&server.store)).expect("store");
    let initial_sha = runtime
        .block_on(store.run())
        .expect("run row")
        .expect("a run started")
        .model_sha;
    // The relays reach the server through a proxy that refuses, cuts, stalls and delays
    // their connections.
    let proxy = ChaosProxy::start(server.port, SEED);
    let through_proxy = format!("https://localhost:{}", proxy.port);
    let mut relays = [
        TestRelay::new(&server, "relay-a", &through_proxy),
        TestRelay::new(&server, "relay-b", &through_proxy),
    ];
    for relay in &mut relays {
        processes.0.push(relay.spawn());
    }
    for i in 0..NODES {
        let (home, other) = (&relays[i % 2], &relays[(i + 1) % 2]);
        let servers = [home.url(), other.url(), server.url()];
        let log = dir.join(format!("client-{i}.log"));
        processes
            .0
            .push(spawn_logged(&node_args(&server, NODES, i, &servers), &log));
        logs.push(log);
    }
    let out = server.out.clone();
    wait_for("round 1", Duration::from_secs(180), &logs, || {
        rounds_done(&out) >= 1
    });
    let mut schedule = ChaCha8Rng::seed_from_u64(SEED);
    for kill in 1..=KILLS {
        std::thread::sleep(Duration::from_millis(schedule.random_range(500..3_000)));
        assert!(
            matches!(processes.0[0].try_wait(), Ok(None)),
            "the run ended before kill {kill} ({} rounds done); give it more rounds",
            rounds_done(&out)
        );
        // 0: the server; 1, 2: a relay.
        let target = schedule.random_range(0..3);
        processes.0[target].kill().expect("kill -9");
        let _ = processes.0[target].wait();
        std::thread::sleep(Duration::from_millis(schedule.random_range(0..2_000)));
        processes.0[target] = match target {
            0 => {
                let log = dir.join(format!("server-{}.log", kill + 1));
                logs.push(log.clone());
                let child = server.spawn(&log);
                until_listening(server.port, "the server", Duration::from_secs(60));
                child
            }
            r => relays[r - 1].spawn(),
        };
    }
    let relay_logs: Vec<PathBuf> = relays.iter().flat_map(|r| r.logs.clone()).collect();
    logs.extend(relay_logs);
    wait_for(
        "the server to finish",
        Duration::from_secs(600),
        &logs,
        || matches!(processes.0[0].try_wait(), Ok(Some(_))),
    );
    assert!(processes.0[0].wait().expect("status").success());
    let [passed, refused, cut, stalled, delayed] = proxy.counts();
    eprintln!(
        "proxy: {passed} connections passed, {refused} refused, {cut} cut, {stalled} stalled, \
         {delayed} delayed"
    );

    let h = history(&out).expect("history.json");
    assert_eq!(h["final"]["stop"], "rounds_completed", "{h}");
    let rounds = h["rounds"].as_array().expect("rounds").clone();
    assert_eq!(rounds.len(), ROUNDS);
    let blobs = Blobs::local(&dir.join("blobs")).expect("blob store");
    let blob = |id: &str| runtime.block_on(blobs.get(id)).expect("blob kept");
    let initial = Model::from_safetensors(&blob(&initial_sha)).expect("initial model");
    let mut replayed: Vec<f64> = initial.values().iter().map(|&v| f64::from(v)).collect();
    let mut smallest_double_count = f64::INFINITY;
    let mut partials = 0;
    for record in &rounds {
        let round = record["round"].as_u64().expect("round") as u32;
        let accepted: BTreeMap<String, String> = runtime
            .block_on(store.accepted(round))
            .expect("accepted")
            .into_iter()
            .collect();
        let mut contributors: Vec<String> = record["contributors"]
            .as_array()
            .expect("contributors")
            .iter()
            .map(|c| c.as_str().expect("id").to_string())
            .collect();
        contributors.sort();
        let listed: Vec<String> = accepted.keys().cloned().collect();
        assert_eq!(
            contributors, listed,
            "round {round}: each node counted once"
        );

        // Each blob the round counted, once: a node's update, or a relay's partial whose
        // contributors are exactly the rows that name it.
        let mut groups: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (node, id) in &accepted {
            groups.entry(id).or_default().push(node);
        }
        let mut sums = Vec::new();
        for (id, nodes) in &groups {
            let update = decode_update(&blob(id), initial.layout()).expect("an update");
            let (sum, weight): (Vec<f64>, f64) = match &update.partial {
                Some(partial) => {
                    partials += 1;
                    let named: BTreeSet<&str> = partial
                        .contributors
                        .iter()
                        .map(|(n, _)| n.as_str())
                        .collect();
                    assert_eq!(
                        named,
                        nodes.iter().copied().collect::<BTreeSet<_>>(),
                        "round {round}: a partial counts exactly its contributors"
                    );
                    let sum = update.delta.iter().map(|&d| f64::from(d)).collect();
                    (sum, partial.weight)
                }
                None => {
                    assert_eq!(nodes.len(), 1, "round {round}: {nodes:?} share one update");
                    let n = update.num_examples as f64;
                    (update.delta.iter().map(|&d| n * f64::from(d)).collect(), n)
                }
            };
            sums.push((sum, weight));
        }
        let total: f64 = sums.iter().map(|(_, w)| w).sum();
        let mut mean = vec![0.0f64; replayed.len()];
        for (sum, _) in &sums {
            for (m, s) in mean.iter_mut().zip(sum) {
                *m += s / total;
            }
        }
        // (A round with one group cannot show a double count in its model: its mean is the
        // group's. The rows above rule that out.)
        for (sum, weight) in sums.iter().filter(|_| sums.len() > 1) {
            // Counting this group twice would move the model by w / (W + w) * (its mean - mean).
            let share = weight / (total + weight);
            let shift = sum
                .iter()
                .zip(&mean)
                .map(|(s, m)| (share * (s / weight - m)).abs())
                .fold(0.0, f64::max);
            smallest_double_count = smallest_double_count.min(shift);
        }
        for (v, m) in replayed.iter_mut().zip(&mean) {
            *v += m;
        }
    }
    assert!(partials > 0, "some rounds came through the relays");
    let gap = final_model(&out)
        .values()
        .iter()
        .zip(&replayed)
        .map(|(&v, &r)| (f64::from(v) - r).abs())
        .fold(0.0, f64::max);
    eprintln!(
        "{partials} partial aggregates; replay gap {gap:.3e}; the smallest double count would \
         move a value by {smallest_double_count:.3e}"
    );
    assert!(
        gap * 10.0 < smallest_double_count,
        "the final model is not the replay of what the store accepted: gap {gap:.3e}, while \
         counting any one contribution twice would move it by {smallest_double_count:.3e}"
    );
}
