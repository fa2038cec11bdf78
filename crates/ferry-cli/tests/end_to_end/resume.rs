//! Training that resumes mid-round: two PyTorch nodes train through the SDK with
//! `pytorch.Checkpoint` (SGD with momentum, dropout, a shuffle drawn each epoch), and one of
//! them is interrupted half-way through a long local epoch of round 1: its trainer SIGKILLed
//! (the node starts it again), or, separately, the node's agent SIGKILLed (its trainer dies
//! with it) and started again. Either way the node's update joins round 1, the trainer resumed
//! from its checkpoint, and the run ends with the model of an uninterrupted run of the same
//! seed.
//!
//! Needs the `.venv` (Debian's python3-torch, safetensors) that `scripts/install-deps.sh`
//! makes.

use crate::support;

use std::{
    fs,
    path::{Path, PathBuf},
    sync::OnceLock,
    time::Duration,
};

use ferry_harness::process::ends_within;
use support::{Killer, TestServer, client_args, history, server_succeeds, spawn_logged_with_env};

/// The node's trainer: 2 local epochs of 40 batches, 50 ms each, a checkpoint every 10 steps;
/// it writes its process id to its checkpoint folder so the test can kill it.
const TRAINER: &str = r#"import os, sys, time
import torch
from ferry_sdk import pytorch

torch.set_num_threads(1)
SITE = int(sys.argv[1])


def net():
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 1)
    )


def train(module, task):
    torch.manual_seed(task.seed)
    data = torch.Generator().manual_seed(100 + SITE)
    x = torch.randn(640, 8, generator=data)
    y = x[:, :4].sum(1, keepdim=True) - x[:, 4:].sum(1, keepdim=True)
    order = torch.Generator().manual_seed(task.seed)
    optimizer = torch.optim.SGD(module.parameters(), lr=task.lr, momentum=0.9)
    checkpoint = pytorch.Checkpoint(task, module, optimizer, every_steps=10, generators=[order])
    with open(os.path.join(task.checkpoint_dir, "pid"), "w") as f:
        f.write(str(os.getpid()))
    module.train()
    for _ in checkpoint.epochs():
        for batch in checkpoint.batches(torch.randperm(640, generator=order).split(task.batch_size)):
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(module(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
            checkpoint.values["loss"] = checkpoint.values.get("loss", 0.0) + loss.item()
            time.sleep(0.05)
    return None, 640, {"train_loss": checkpoint.values["loss"] / checkpoint.step}


pytorch.run(net(), train)
"#;

/// The initial model: the trainer's network with seed 0.
const INITIAL: &str = "(torch.manual_seed(0), {k: v.contiguous() for k, v in torch.nn.Sequential(\
    torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 1)\
    ).state_dict().items()})[1]";

#[derive(Clone, Copy, PartialEq)]
enum Interruption {
    None,
    Trainer,
    Agent,
}

/// What a run left: its initial and final models' values, round 1's participants, and every
/// log of site-0's node.
struct Outcome {
    initial: Vec<f32>,
    model: Vec<f32>,
    round_one_participants: u64,
    node_logs: String,
}

/// Deploys the two-node federation in `dir`, interrupting site-0 in round 1 as asked.
fn federation(dir: &Path, interruption: Interruption) -> Outcome {
    let (server, trainer) = support::own_model_server(
        dir,
        "torch",
        INITIAL,
        TRAINER,
        "clients = 2\nmin_clients = 2\nrounds = 2\nlocal-epochs = 2\nbatch-size = 16\n\
         lr = 0.02\nseed = 3\nevaluate_every = 0\nround_timeout = 300\n",
    );
    let mut logs = vec![dir.join("server.log")];
    let mut processes = Killer(vec![server.spawn(&logs[0])]);
    let sdk = support::sdk_path();
    let mut node_args = Vec::new();
    for i in 0..2 {
        let mut args = client_args(&server, &format!("site-{i}"));
        args.extend([
            "--trainer-cmd".into(),
            format!("{} {} {i}", support::python3(), trainer.display()),
        ]);
        let log = dir.join(format!("client-{i}.log"));
        processes
            .0
            .push(spawn_logged_with_env(&args, &log, &[("PYTHONPATH", &sdk)]));
        logs.push(log);
        node_args.push(args);
    }
    if interruption != Interruption::None {
        let task_dir = wait_for_first_checkpoint(&server, &logs);
        // Past the checkpoint, so that some steps are lost and done again.
        std::thread::sleep(Duration::from_millis(300));
        let trainer_pid: u32 = fs::read_to_string(task_dir.join("pid"))
            .expect("the trainer's pid")
            .trim()
            .parse()
            .expect("a process id");
        match interruption {
            Interruption::Trainer => kill(trainer_pid),
            _ => {
                processes.0[1].kill().expect("kill -9 site-0's agent");
                let _ = processes.0[1].wait();
                assert!(
                    ends_within(trainer_pid, Duration::from_secs(10)),
                    "the trainer dies with its agent"
                );
                let log = dir.join("client-0-restarted.log");
                processes.0[1] =
                    spawn_logged_with_env(&node_args[0], &log, &[("PYTHONPATH", &sdk)]);
                logs.push(log);
            }
        }
    }
    server_succeeds(&mut processes, &logs, Duration::from_secs(300));
    let h = history(&server.out).expect("history.json");
    let node_logs = [1, 3]
        .iter()
        .filter_map(|&i| logs.get(i))
        .map(|log| fs::read_to_string(log).unwrap_or_default())
        .collect();
    Outcome {
        initial: values(&dir.join("init.safetensors")),
        model: values(&server.out.join("model.safetensors")),
        round_one_participants: h["rounds"][0]["participants"].as_u64().unwrap_or(0),
        node_logs,
    }
}

fn values(model: &Path) -> Vec<f32> {
    ferry_core::Model::from_safetensors(&fs::read(model).expect("a model file"))
        .expect("a model")
        .values()
        .to_vec()
}

/// Waits until site-0's trainer has saved its first checkpoint of round 1; returns its
/// checkpoint folder.
fn wait_for_first_checkpoint(server: &TestServer, logs: &[PathBuf]) -> PathBuf {
    let root = server.dir.join("node-site-0/exec/checkpoints");
    let mut found = None;
    support::wait_for(
        "site-0's first checkpoint",
        Duration::from_secs(120),
        logs,
        || {
            found = fs::read_dir(&root).ok().and_then(|entries| {
                entries.flatten().map(|e| e.path()).find(|dir| {
                    dir.join("ferry-checkpoint.pt").exists() && dir.join("pid").exists()
                })
            });
            found.is_some()
        },
    );
    let dir = found.expect("found");
    assert!(
        dir.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("round-1-")),
        "{}",
        dir.display()
    );
    dir
}

fn kill(pid: u32) {
    let status = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -9 {pid}");
}

/// The final model of the run nothing interrupts (computed once for both tests).
fn uninterrupted() -> &'static [f32] {
    static MODEL: OnceLock<Vec<f32>> = OnceLock::new();
    MODEL.get_or_init(|| {
        let tmp = tempfile::tempdir().expect("tempdir");
        let outcome = federation(tmp.path(), Interruption::None);
        assert_eq!(outcome.round_one_participants, 2);
        assert!(
            !outcome.node_logs.contains("resuming"),
            "{}",
            outcome.node_logs
        );
        outcome.model
    })
}

fn assert_resumed_to_the_same_model(interruption: Interruption) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let outcome = federation(tmp.path(), interruption);
    assert_eq!(
        outcome.round_one_participants, 2,
        "site-0's update joined round 1"
    );
    assert!(
        outcome
            .node_logs
            .contains("resuming round 1 from its checkpoint: epoch 0, batch"),
        "the trainer resumed from its checkpoint:\n{}",
        outcome.node_logs
    );
    let expected = uninterrupted();
    assert_eq!(outcome.model.len(), expected.len());
    let largest = outcome
        .model
        .iter()
        .zip(expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        largest <= 1e-6,
        "the final model differs from the uninterrupted run's by up to {largest}"
    );
    assert_ne!(outcome.model, outcome.initial, "the run moved the model");
}

#[test]
fn a_trainer_killed_mid_epoch_resumes_and_ends_with_the_uninterrupted_model() {
    assert_resumed_to_the_same_model(Interruption::Trainer);
}

#[test]
fn an_agent_killed_mid_epoch_comes_back_to_its_round_and_ends_with_the_uninterrupted_model() {
    assert_resumed_to_the_same_model(Interruption::Agent);
}
