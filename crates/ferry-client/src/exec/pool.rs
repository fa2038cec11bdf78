//! A pool of long-lived trainer processes that serves any virtual node of a simulation, so
//! that a thousand nodes of the user's own PyTorch code need a few processes, not a thousand
//! (each holding the framework: hundreds of megabytes, and seconds of start-up).
//!
//! Nothing a node keeps between tasks lives in a worker: the node's round folders, its own
//! personal tensors and SCAFFOLD control variate are its [`RoundFiles`], and every task hands
//! the program the model (with the node's own personal tensors in it), the node's `data_dir`
//! and seed. A task takes whichever worker is free, so which worker serves which node never
//! changes a result.

use std::sync::{Arc, Condvar, Mutex};

use ferry_core::{Update, evaluation::NodeEvaluation};

use super::{
    RoundFiles,
    long_lived::{Worker, evaluate_with, train_with},
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
            .map(|_| Worker::new(command))
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

    /// Runs `work` on a free worker, waiting for one.
    fn with_worker<T>(&self, work: impl FnOnce(&Worker) -> T) -> T {
        let index = {
            let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if let Some(index) = free.pop() {
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
        result
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
        self.pool
            .with_worker(|worker| train_with(&self.files, worker, task))
    }

    fn evaluate(&self, task: &EvalTask) -> Result<NodeEvaluation, String> {
        self.pool
            .with_worker(|worker| evaluate_with(&self.files, worker, task))
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
}
