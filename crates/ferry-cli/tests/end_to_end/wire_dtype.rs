//! A bf16 model on the wire: a server starts from a PyTorch bf16 model, two nodes train it
//! with an external-command trainer, and every download and update carries 2 bytes a value;
//! the round records' bytes agree with the server's own transport counter.
//!
//! Needs the `.venv` with torch and safetensors (`scripts/install-deps.sh`).

use crate::support;

use std::{fs, time::Duration};

use support::{history, http_get, server_succeeds};

const ROUNDS: u64 = 2;
const NODES: u64 = 2;
const VALUES: u64 = 1000 * 500;

/// Moves the bf16 weights half way to 1, in bf16.
const TRAINER: &str = r#"import json, sys
import torch
from safetensors.torch import load_file, save_file
task = json.load(open(sys.argv[-1]))
w = load_file(task["model_in"])["w"]
save_file({"w": (w + 0.5 * (1 - w)).to(torch.bfloat16)}, task["model_out"])
json.dump({"num_examples": 10}, open(task["result_out"], "w"))
"#;

#[test]
fn a_bf16_model_moves_two_bytes_a_value_both_ways() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let (server, trainer) = support::own_model_server(
        dir,
        "torch",
        "{'w': torch.zeros(1000, 500, dtype=torch.bfloat16)}",
        TRAINER,
        &format!(
            "clients = {NODES}\nmin_clients = {NODES}\nrounds = {ROUNDS}\nround_timeout = 60\n\
             evaluate_every = 1\n"
        ),
    );
    let (mut processes, logs) =
        support::python_trainer_fleet(&server, dir, NODES, &trainer, |_| String::new());
    // Once the last round has committed, its model is scored by the nodes (there is no
    // central test set): every upload is in, and the server's counters are read then.
    support::until_listening(server.api_port, "the server's API", Duration::from_secs(60));
    let admin = server.admin_token();
    let mut metrics = String::new();
    support::wait_for(
        "the last round to commit",
        Duration::from_secs(180),
        &logs,
        || {
            if let Ok(Some(status)) = processes.0[0].try_wait() {
                let log = fs::read_to_string(&logs[0]).unwrap_or_default();
                panic!("the server exited ({status}) before its counters were read:\n{log}");
            }
            let (_, body) = http_get(server.api_port, "/api/v1/status", Some(&admin));
            let status: serde_json::Value = serde_json::from_str(&body).expect("status JSON");
            if status["round"].as_u64().is_some_and(|r| r > ROUNDS) {
                metrics = http_get(server.api_port, "/metrics", None).1;
                return true;
            }
            false
        },
    );
    let bytes_in: u64 = metrics
        .lines()
        .find_map(|line| line.strip_prefix("ferry_bytes_in_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .expect("ferry_bytes_in_total") as u64;
    server_succeeds(&mut processes, &logs, Duration::from_secs(60));

    let h = history(&server.out).expect("history.json");
    let rounds = h["rounds"].as_array().expect("rounds");
    assert_eq!(rounds.len() as u64, ROUNDS);
    for r in rounds {
        assert_eq!(r["participants"], NODES, "{r}");
        assert_eq!(r["bytes_up"], NODES * 2 * VALUES, "{r}");
        assert_eq!(r["bytes_down"], NODES * 2 * VALUES, "{r}");
    }
    // What crossed the server's transport: the values and each upload's small header, far
    // from the 4 bytes a value an f32 update would take.
    let values_up = ROUNDS * NODES * 2 * VALUES;
    assert!(
        bytes_in >= values_up && bytes_in < values_up + ROUNDS * NODES * 4096,
        "transport counted {bytes_in} bytes in for {values_up} bytes of values"
    );
    support::run_python(
        &format!(
            "import torch\nfrom safetensors.torch import load_file\n\
             w = load_file('{}')['w']\n\
             assert w.dtype == torch.bfloat16, w.dtype\n\
             assert torch.allclose(w.float(), torch.full_like(w.float(), 0.75), atol=1e-2), w\n",
            server.out.join("model.safetensors").display()
        ),
        &[],
    );
}
