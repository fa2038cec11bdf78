//! The configuration files under the fuzz harness: `ferry server --config` and
//! `ferry simulate --config` files, mutated, must end as an error naming the file, never a
//! panic. `FERRY_FUZZ_INPUTS` sets the inputs per file kind (docs/fuzzing.md runs 10^6).

use std::path::Path;

use ferry_fuzz::{Target, engine, mutate::Framing};

use super::config::{ServerFile, check};
use crate::options::{SimulateArgs, parse_toml};

const SERVER_FILE: &str = r#"listen = "127.0.0.1:7443"
store = "sqlite:./ferry-data/ferry.db"
blobs = "ferry-data/blobs"
out = "ferry-data/run"

[api]
listen = "127.0.0.1:7444"
admin-token-file = "ferry-data/admin-token"

[limits]
enrol-failures-per-minute = 10
node-calls-per-second = 10.0
uploads-per-node = 2
staged-bytes-per-node = 1000000

[run]
dataset = "fashion-mnist"
model = "lenet"
strategy = "fedprox"
mu = 0.01
clients = 10
min_clients = 3
rounds = 20
local-epochs = 1
batch-size = 32
lr = 0.01
seed = 7
round-timeout = 60
min-results = 3
heartbeat = 1
offline-after = 4
max-chunk-bytes = 1048576
dp-noise-multiplier = 0.8
dp-clip = 1.0
dp-placement = "central"
"#;

const SIMULATE_FILE: &str = r#"dataset = "fashion-mnist"
model = "lenet"
strategy = "fedavg"
aggregator = "krum"
byzantine = 1
clients = 20
fraction = 0.5
rounds = 10
partition = "dirichlet:0.5"
local-epochs = 2
lr = 0.05
"#;

fn seeds() -> Vec<Vec<u8>> {
    vec![
        engine::tagged(b's', SERVER_FILE.as_bytes()),
        engine::tagged(b'r', SIMULATE_FILE.as_bytes()),
    ]
}

/// Reads the input as the file kind its first byte names (`s`: server; else simulate).
fn read_config(bytes: &[u8]) -> Result<(), String> {
    let (kind, body) = engine::untag(bytes)?;
    let text = std::str::from_utf8(body).map_err(|_| "not UTF-8".to_string())?;
    let path = Path::new("fuzz.toml");
    let checked = if kind == b's' {
        parse_toml::<ServerFile>(text, path).and_then(|file| check(file, path, true).map(drop))
    } else {
        parse_toml::<SimulateArgs>(text, path).and_then(|args| args.resolve().map(drop))
    };
    checked.map_err(|_| "refused".to_string())
}

#[test]
fn config_files_survive_fuzzing() {
    let inputs = std::env::var("FERRY_FUZZ_INPUTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(5_000);
    let target = Target {
        name: "config",
        about: "server and simulate configuration files",
        seeds,
        framing: Framing::Raw,
        decode: read_config,
    };
    let report = engine::run(&target, inputs, 1, |done| {
        eprintln!("config: {done} inputs")
    });
    let findings: Vec<_> = report.findings.iter().map(|f| &f.what).collect();
    assert_eq!(report.panics, 0, "{findings:?}");
    assert!(report.accepted > 0, "the seeds are valid configurations");
    assert!(
        report.refused() > inputs / 4,
        "{} refused",
        report.refused()
    );
    eprintln!(
        "config: {} inputs, {} accepted, {} refused, no panic",
        report.inputs,
        report.accepted,
        report.refused()
    );
}
