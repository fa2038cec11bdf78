//! A deployed asynchronous run (FedBuff): a server with `mode = "async"`, two fast nodes and
//! one that takes seconds longer for every task. Versions advance on the fast nodes' updates
//! without waiting for the slow one, whose updates arrive stale and are weighed down; the
//! server is killed with SIGKILL mid-run and resumes, and every version still holds exactly
//! its buffer of updates, each node at most once.
//!
//! Needs Python with numpy and safetensors (`scripts/install-deps.sh`).

use crate::support;

use std::{fs, time::Duration};

use support::{history, rounds_done, server_succeeds, wait_for};

const VERSIONS: usize = 8;
const BUFFER: usize = 2;

/// Moves every weight half way to 1. A fast node (first argument `fast`) sleeps 0.1 s first; a
/// slow one (`slow HISTORY`) waits until the server's `history.json` holds two versions past
/// the one it was given (at most 60 s): whatever the machine's speed, its update is two
/// versions stale or more.
const TRAINER: &str = r#"import json, os, sys, time
import numpy as np
from safetensors.numpy import load_file, save_file
task = json.load(open(sys.argv[-1]))
def versions(path):
    try:
        return len(json.load(open(path))["rounds"])
    except (OSError, ValueError, KeyError):
        return 0
if sys.argv[1] == "fast":
    time.sleep(0.1)
else:
    waited = 0
    while versions(sys.argv[2]) < task["round"] + 1 and waited < 600:
        time.sleep(0.1)
        waited += 1
w = load_file(task["model_in"])["w"]
save_file({"w": (w + 0.5 * (1 - w)).astype(np.float32)}, task["model_out"])
json.dump({"num_examples": 10}, open(task["result_out"], "w"))
"#;

#[test]
fn versions_advance_without_the_slowest_node_and_survive_a_server_kill() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let (server, trainer) = support::own_model_server(
        dir,
        "numpy",
        "{'w': np.zeros(8, np.float32)}",
        TRAINER,
        &format!(
            "clients = 3\nmin_clients = 2\nrounds = {VERSIONS}\nmode = \"async\"\n\
             buffer-size = {BUFFER}\nmax-concurrency = 3\nstaleness = \"polynomial:0.5\"\n\
             evaluate_every = 0\nround_timeout = 60\nheartbeat = 1\noffline_after = 4\n"
        ),
    );
    // site-2 is the slow node.
    let history_file = server.out.join("history.json");
    let (mut processes, mut logs) = support::python_trainer_fleet(&server, dir, 3, &trainer, |i| {
        if i == 2 {
            format!("slow {}", history_file.display())
        } else {
            "fast".to_string()
        }
    });
    wait_for("version 3", Duration::from_secs(180), &logs, || {
        rounds_done(&server.out) >= 3
    });
    processes.0[0].kill().expect("kill -9 the server");
    let _ = processes.0[0].wait();
    logs.push(dir.join("server-2.log"));
    let restarted = logs.len() - 1;
    processes.0[0] = server.spawn(&logs[restarted]);
    let server_log = server_succeeds(
        &mut processes,
        &[logs[restarted].clone()],
        Duration::from_secs(240),
    );
    // The slow node's identity, as its log names it at enrolment.
    let slow_log = fs::read_to_string(&logs[3]).expect("slow node's log");
    let slow = slow_log
        .lines()
        .find_map(|l| l.strip_prefix("enrolled as node "))
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the slow node enrolled")
        .to_string();

    let h = history(&server.out).expect("history.json");
    assert_eq!(h["config"]["run"]["mode"], "async");
    let versions = h["rounds"].as_array().expect("rounds");
    assert_eq!(
        versions.len(),
        VERSIONS,
        "every version recorded once:\n{server_log}"
    );
    let mut slow_versions = 0;
    let mut stale = 0;
    for (i, v) in versions.iter().enumerate() {
        assert_eq!(v["round"], i + 1);
        let contributors: Vec<&str> = v["contributors"]
            .as_array()
            .expect("contributors")
            .iter()
            .filter_map(|c| c.as_str())
            .collect();
        assert_eq!(contributors.len(), BUFFER, "version {}: {v}", i + 1);
        assert_ne!(
            contributors[0], contributors[1],
            "a node once a version: {v}"
        );
        assert_eq!(v["participants"], BUFFER);
        let staleness = &v["staleness"];
        assert!(
            staleness["mean_weight"]
                .as_f64()
                .is_some_and(|w| w > 0.0 && w <= 1.0)
        );
        if staleness["max"].as_u64().is_some_and(|m| m >= 1) {
            stale += 1;
        }
        if contributors.contains(&slow.as_str()) {
            slow_versions += 1;
        }
    }
    // The two fast nodes make most versions; the slow node's few updates come late.
    assert!(
        slow_versions <= VERSIONS / 2,
        "the slow node is in {slow_versions} of {VERSIONS} versions"
    );
    assert!(
        slow_versions >= 1,
        "the slow node's update arrives before the run ends"
    );
    for v in versions.iter().filter(|v| {
        v["contributors"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c.as_str() == Some(slow.as_str())))
    }) {
        assert!(
            v["staleness"]["max"].as_u64() >= Some(2),
            "folded stale: {v}"
        );
        assert!(
            v["staleness"]["mean_weight"].as_f64() < Some(1.0),
            "weighed down: {v}"
        );
    }
    assert!(stale >= slow_versions);
    // The weights moved to about 1 (a stale update, computed from an older model, may carry
    // them a little past it).
    let check = format!(
        "import numpy as np\nfrom safetensors.numpy import load_file\n\
         w = load_file('{}')['w']\nassert (abs(w - 1) < 0.05).all(), w\n",
        server.out.join("model.safetensors").display()
    );
    support::run_python(&check, &[]);
}
