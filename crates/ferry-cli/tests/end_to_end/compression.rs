//! Compressed updates in a deployment: a server with `compress = "topk:0.25"` and two node
//! agents whose trainers move every weight by a fixed step of their own. Each upload carries
//! the top quarter of what the node has to send, in exactly top-k's bytes; what it does not
//! send stays in the node's state folder and goes in later updates, so the final model plus
//! the nodes' mean residual is exactly where uncompressed training would have taken the
//! model. With `fp16`, the model goes down in half precision too: trainers get it in the
//! model's own dtype with rounded values, and each round's change lands on the server's
//! full-precision model. A run that asks for compression with SecAgg+ is refused at start
//! with the reason.
//!
//! Needs Python with numpy and safetensors (`scripts/install-deps.sh`).

use crate::support;

use std::{fs, time::Duration};

use support::{TestServer, history, server_succeeds};

const ROUNDS: usize = 3;
const WEIGHTS: usize = 8;

/// Adds the node's own step to every weight: node 0 steps (1, 2, ..., 8) / 8, node 1 the
/// same backwards. Values in eighths and sixteenths are exact in f32, so the test's sums
/// are exact too.
const TRAINER: &str = r#"import json, sys
import numpy as np
from safetensors.numpy import load_file, save_file
task = json.load(open(sys.argv[-1]))
step = np.arange(1, 9, dtype=np.float32) / 8
if sys.argv[1] == "1":
    step = step[::-1].copy()
w = load_file(task["model_in"])["w"]
save_file({"w": (w + step).astype(np.float32)}, task["model_out"])
json.dump({"num_examples": 10}, open(task["result_out"], "w"))
"#;

/// A node's residual file (raw little-endian f32), the one file under its `residual` folder.
fn residual(node_dir: &std::path::Path) -> Vec<f32> {
    let files: Vec<_> = fs::read_dir(node_dir.join("residual"))
        .expect("the node keeps its residual in its state folder")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    fs::read(&files[0])
        .expect("residual")
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

#[test]
fn top_k_updates_carry_their_bytes_and_what_they_hold_back_arrives_later() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let (server, trainer) = support::own_model_server(
        dir,
        "numpy",
        &format!("{{'w': np.zeros({WEIGHTS}, np.float32)}}"),
        TRAINER,
        &format!(
            "clients = 2\nmin_clients = 2\nfraction = 1.0\nrounds = {ROUNDS}\n\
             compress = \"topk:0.25\"\nevaluate_every = 0\nround_timeout = 60\n\
             heartbeat = 1\noffline_after = 4\n"
        ),
    );
    let (mut processes, logs) =
        support::python_trainer_fleet(&server, dir, 2, &trainer, |i| i.to_string());
    let server_log = server_succeeds(&mut processes, &logs, Duration::from_secs(180));

    let h = history(&server.out).expect("history.json");
    assert_eq!(h["config"]["run"]["compress"], "topk:0.25");
    let rounds = h["rounds"].as_array().expect("rounds");
    assert_eq!(rounds.len(), ROUNDS, "{server_log}");
    for r in rounds {
        // Two updates of the top 2 of 8 values, each a u32 index and an f32 value.
        assert_eq!(r["bytes_up"].as_u64(), Some(2 * 2 * 8), "{r}");
    }
    let check = |path: &std::path::Path| -> Vec<f32> {
        ferry_core::Model::from_safetensors(&fs::read(path).expect("model"))
            .expect("model")
            .values()
            .to_vec()
    };
    let model = check(&server.out.join("model.safetensors"));
    let held: Vec<Vec<f32>> = (0..2)
        .map(|i| residual(&dir.join(format!("node-site-{i}"))))
        .collect();
    assert!(
        held.iter().all(|r| r.iter().any(|v| *v != 0.0)),
        "top-k held something back on every node: {held:?}"
    );
    // Uncompressed, each round moves every weight by the mean step, 9/16.
    for (j, w) in model.iter().enumerate() {
        let mean_held = (held[0][j] + held[1][j]) / 2.0;
        assert_eq!(
            w + mean_held,
            ROUNDS as f32 * 9.0 / 16.0,
            "weight {j}: model {model:?}, held {held:?}"
        );
    }
}

/// Refuses (exits non-zero) unless the model it is given is f32 with values exact in half
/// precision, then adds 0.5 to every weight.
const HALF_TRAINER: &str = r#"import json, sys
import numpy as np
from safetensors.numpy import load_file, save_file
task = json.load(open(sys.argv[-1]))
w = load_file(task["model_in"])["w"]
assert w.dtype == np.float32, w.dtype
assert (w.astype(np.float16).astype(np.float32) == w).all(), w
save_file({"w": (w + np.float32(0.5)).astype(np.float32)}, task["model_out"])
json.dump({"num_examples": 10}, open(task["result_out"], "w"))
"#;

#[test]
fn half_precision_downloads_reach_trainers_rounded_and_the_server_keeps_full_precision() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let (server, trainer) = support::own_model_server(
        dir,
        "numpy",
        &format!("{{'w': (np.arange({WEIGHTS}, dtype=np.float32) + 1) / 10}}"),
        HALF_TRAINER,
        "clients = 2\nmin_clients = 2\nfraction = 1.0\nrounds = 2\ncompress = \"fp16\"\n\
         evaluate_every = 0\nround_timeout = 60\nheartbeat = 1\noffline_after = 4\n",
    );
    let (mut processes, logs) =
        support::python_trainer_fleet(&server, dir, 2, &trainer, |_| String::new());
    let server_log = server_succeeds(&mut processes, &logs, Duration::from_secs(180));
    let h = history(&server.out).expect("history.json");
    let rounds = h["rounds"].as_array().expect("rounds");
    assert_eq!(rounds.len(), 2, "{server_log}");
    for r in rounds {
        // Two nodes, 8 values each way in 2 bytes.
        assert_eq!(r["bytes_down"].as_u64(), Some(2 * 2 * 8), "{r}");
        assert_eq!(r["bytes_up"].as_u64(), Some(2 * 2 * 8), "{r}");
    }
    // Each round's change (0.5, exact) lands on the server's own f32 values, not on the
    // rounded copies the nodes trained from.
    let check = format!(
        "import numpy as np\nfrom safetensors.numpy import load_file\n\
         w0 = (np.arange({WEIGHTS}, dtype=np.float32) + 1) / 10\n\
         w = load_file('{}')['w']\n\
         expected = (w0 + np.float32(0.5)) + np.float32(0.5)\n\
         assert (w == expected).all(), (w, expected)\n\
         assert (w.astype(np.float16).astype(np.float32) != w).any(), w\n",
        server.out.join("model.safetensors").display()
    );
    support::run_python(&check, &[]);
}

#[test]
fn compression_with_secure_aggregation_is_refused_at_start() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = TestServer::new(
        tmp.path(),
        &[],
        false,
        "dataset = \"mnist-subset\"\nmodel = \"logreg\"\nclients = 6\nsecagg = true\n\
         compress = \"int8\"\n",
    );
    let said = support::refused_at_start(&server);
    assert!(said.contains("SecAgg+") && said.contains("int8"), "{said}");
}
