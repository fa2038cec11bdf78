//! A pool of long-lived trainer processes that serves any virtual node of a simulation, so
//! that a thousand nodes of the user's own PyTorch code need a few processes, not a thousand
//! (each holding the framework: hundreds of megabytes, and seconds of start-up).
//!
//! Nothing a node keeps between tasks lives in a worker: the node's round folders, its own
//! personal tensors and SCAFFOLD control variate are its [`RoundFiles`], and every task hands
//! the program the model (with the node's own personal tensors in it), the node's `data_dir`
//! and seed. A task takes whichever worker is free, so which worker serves which node never
//! changes a result. A task whose worker is killed goes to another worker (the killed one is
//! started again when its next task comes), where it resumes from the node's checkpoint folder.

use std::{
    sync::{Arc, Condvar, Mutex},
    time::SystemTime,
};

use ferry_core::{Update, evaluation::NodeEvaluation};
use serde::Serialize;

use super::{
    RoundFiles,
    long_lived::{Attempt, Exchange, Worker, evaluate_with, retried_after_kills, train_with},
};
use crate::agent::{EvalTask, TrainTask, Trainer};

/// `workers` long-lived processes of one program, each serving one task at a time.
pub struct WorkerPool {
    workers: Vec<Worker>,
    /// Indexes of the workers serving no task.
    free: Mutex<Vec<usize>>,
    freed: Condvar,
}

impl WorkerPool {
    /// A pool of `workers` (at least one) processes of `command`, each started when its first
    /// task comes.
    pub fn new(command: &str, workers: usize) -> Result<Arc<Self>, String> {
        let workers = (0..workers.max(1))
            .map(|index| Worker::new(command, Some(index)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Arc::new(Self {
            free: Mutex::new((0..workers.len()).rev().collect()),
            freed: Condvar::new(),
            workers,
        }))
    }

    /// How many processes the pool runs at most.
    pub fn len(&self) -> usize {
        self.workers.len()
    }

    /// Whether the pool has no worker (never: it has at least one).
    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// Runs `work` on a free worker, waiting for one, and says which it was; a free worker
    /// other than `avoid` is taken first.
    fn with_worker<T>(&self, avoid: Option<usize>, work: impl FnOnce(&Worker) -> T) -> (usize, T) {
        let index = {
            let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                let other = free.iter().rposition(|&index| Some(index) != avoid);
                if let Some(index) = other.map(|at| free.remove(at)).or_else(|| free.pop()) {
                    break index;
                }
                free = self.freed.wait(free).unwrap_or_else(|p| p.into_inner());
            }
        };
        let result = work(&self.workers[index]);
        self.free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(index);
        self.freed.notify_one();
        (index, result)
    }
}

/// A task whose worker is killed is tried again on another free worker (the same one only when
/// it is the pool's only free one), at most [`super::process::RESTARTS_AFTER_KILL`] times.
impl Exchange for WorkerPool {
    fn exchange(
        &self,
        task: &impl Serialize,
        round: u32,
        deadline: Option<SystemTime>,
        what: &str,
    ) -> Result<(), String> {
        let mut killed = None;
        retried_after_kills(what, round, "to another worker", || {
            let (index, attempt) =
                self.with_worker(killed, |worker| worker.attempt(task, round, deadline, what));
            attempt.map_err(|attempt| match attempt {
                Attempt::Killed(how) => {
                    killed = Some(index);
                    Attempt::Killed(format!("{how}, worker {index}"))
                }
                failed => failed,
            })
        })
    }
}

/// One virtual node's trainer: its own round folders, served by whichever worker of the pool
/// is free.
pub struct PooledTrainer {
    files: RoundFiles,
    pool: Arc<WorkerPool>,
}

impl PooledTrainer {
    /// The node whose data folder is `data_dir` and whose round folders (and the state it
    /// keeps between rounds) are under `work_dir`, trained by `pool`.
    pub fn new(
        pool: Arc<WorkerPool>,
        data_dir: Option<std::path::PathBuf>,
        work_dir: std::path::PathBuf,
    ) -> Self {
        Self {
            files: RoundFiles::new(data_dir, work_dir),
            pool,
        }
    }
}

impl Trainer for PooledTrainer {
    fn train(&self, task: &TrainTask) -> Result<Update, String> {
        train_with(&self.files, &*self.pool, task)
    }

    fn evaluate(&self, task: &EvalTask) -> Result<NodeEvaluation, String> {
        evaluate_with(&self.files, &*self.pool, task)
    }
}

#[cfg(test)]
mod tests {
    use ferry_core::{Model, personal::TensorRoles, strategy::ClientProcedure};

    use super::*;
    use crate::exec::tests::{python3, sample_task, with_scalar};

    /// Adds 1 to every tensor (the personal `bn` included) and reports its process id; scores
    /// a model by its `bn`.
    const SERVER: &str = r#"import json, os, sys
from safetensors.numpy import load_file, save_file
for line in sys.stdin:
    task = json.loads(line)
    m = load_file(task["model_in"])
    if task["kind"] == "evaluate":
        json.dump({"num_examples": 1, "loss": 0.0, "accuracy": float(m["bn"][0]) / 100,
                   "metrics": {"pid": os.getpid()}}, open(task["result_out"], "w"))
    else:
        save_file({k: v + 1 for k, v in m.items()}, task["model_out"])
        json.dump({"num_examples": 2, "metrics": {"pid": os.getpid()}}, open(task["result_out"], "w"))
    print(json.dumps({"ferry": "done"}), flush=True)
"#;

    #[test]
    fn one_worker_serves_two_nodes_alternately_and_each_keeps_its_own_personal_tensor() {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = dir.path().join("serve.py");
        std::fs::write(&script, SERVER).expect("script");
        let pool =
            WorkerPool::new(&format!("{} {}", python3(), script.display()), 1).expect("pool");
        let node = |name: &str| PooledTrainer::new(pool.clone(), None, dir.path().join(name));
        let (a, b) = (node("a"), node("b"));
        let roles = TensorRoles::new(vec!["bn".into()]).expect("valid");
        let mut task = sample_task(1, ClientProcedure::LocalSgd, vec![1.0, 2.0], None);
        task.model = with_scalar(&task.model, "bn", 10.0);
        task.personal = roles.clone();
        // a trains three times, b once, interleaved on the one worker.
        let mut pids = Vec::new();
        for (round, trainer) in [(1, &a), (1, &b), (2, &a), (3, &a)] {
            task.round = round;
            let update = trainer.train(&task).expect("trains");
            assert_eq!(update.delta, [1.0, 1.0], "only the shared tensors move");
            pids.push(update.metrics["pid"]);
        }
        assert!(pids.iter().all(|p| *p == pids[0]), "one process: {pids:?}");
        let score = |trainer: &PooledTrainer, model: &Model| {
            trainer
                .evaluate(&EvalTask {
                    round: 3,
                    model: model.clone(),
                    seed: 1,
                    deadline: None,
                    personal: roles.clone(),
                })
                .expect("evaluates")
                .accuracy
        };
        // Each node scores with its own bn: a's trained three times, b's once.
        assert_eq!(score(&a, &task.model), 0.13);
        assert_eq!(score(&b, &task.model), 0.11);
        assert_eq!(pool.len(), 1);
    }

    /// Trains like `SERVER`, reports which worker it is, and kills itself first when its
    /// node's folder holds a file `die` (which it removes).
    const KILLED_ONCE: &str = r#"import json, os, signal, sys
from safetensors.numpy import load_file, save_file
for line in sys.stdin:
    task = json.loads(line)
    flag = os.path.join(task["data_dir"], "die")
    if os.path.exists(flag):
        os.remove(flag)
        os.kill(os.getpid(), signal.SIGKILL)
    save_file({k: v + 1 for k, v in load_file(task["model_in"]).items()}, task["model_out"])
    json.dump({"num_examples": 2, "metrics": {"worker": float(os.environ["FERRY_TRAINER_WORKER"])}},
              open(task["result_out"], "w"))
    print(json.dumps({"ferry": "done"}), flush=True)
"#;

    #[test]
    fn a_task_whose_worker_is_killed_is_finished_by_another_worker() {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = dir.path().join("serve.py");
        std::fs::write(&script, KILLED_ONCE).expect("script");
        let pool =
            WorkerPool::new(&format!("{} {}", python3(), script.display()), 2).expect("pool");
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).expect("data");
        let node = PooledTrainer::new(pool, Some(data.clone()), dir.path().join("node"));
        let mut task = sample_task(1, ClientProcedure::LocalSgd, vec![1.0, 2.0], None);
        let worker = |task: &TrainTask| node.train(task).expect("trains").metrics["worker"];
        assert_eq!(worker(&task), 0.0, "a lone task takes the first worker");
        std::fs::write(data.join("die"), "").expect("flag");
        task.round = 2;
        assert_eq!(worker(&task), 1.0, "the other worker finished the task");
        assert!(
            !data.join("die").exists(),
            "worker 0 was killed on it first"
        );
        task.round = 3;
        assert!(
            [0.0, 1.0].contains(&worker(&task)),
            "the pool serves on after the kill"
        );
    }
}
