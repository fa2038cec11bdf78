//! The long-lived trainer: the user's program starts once and takes every round's task as one
//! JSON line on its stdin, so a framework's start-up (seconds of `import torch`) is paid once
//! per run, not once per round.
//!
//! Each task line is `task.json`'s object (`"kind": "train"` or `"evaluate"`); the files are
//! the per-round mode's. The program answers on stdout with one line `{"ferry": "done"}` once it has written
//! `model_out` and `result_out`, or `{"ferry": "error", "message": "..."}`; every other stdout
//! line is its own output and is passed through. The program is started again if it dies, is
//! killed when a task passes the round's deadline, and its exit status and the end of its
//! stderr become the node's failure report.

use std::{
    collections::VecDeque,
    io::{BufRead, BufReader, Write},
    process::{Child, ChildStdin, Stdio},
    sync::{
        Arc, Mutex,
        mpsc::{self, Receiver, RecvTimeoutError},
    },
    time::{Duration, SystemTime},
};

use ferry_core::{Update, evaluation::NodeEvaluation};
use serde::{Deserialize, Serialize};

use super::{
    RoundFiles, TrainerCommand,
    process::{Ended, RESTARTS_AFTER_KILL, StarterThread, spawn_kept, stderr_tail},
};
use crate::agent::{EvalTask, TrainTask, Trainer};

/// Lines of the program's stderr kept for a failure report.
const STDERR_LINES: usize = 10;

/// A trainer whose program serves every round's task from one process.
pub struct LongLivedTrainer {
    files: RoundFiles,
    worker: Worker,
}

/// One long-lived process of the user's program, started when its first task comes and
/// started again when it dies: a node's own (see [`LongLivedTrainer`]), or one of a pool that
/// serves any virtual node (see [`super::pool`]).
pub struct Worker {
    command: TrainerCommand,
    /// Its place in a pool, told to the program as `FERRY_TRAINER_WORKER` (to pick a device,
    /// say); `None` for a node's own process.
    index: Option<usize>,
    process: Mutex<Option<Process>>,
}

/// Why one attempt at a task did not succeed.
pub(super) enum Attempt {
    /// A signal killed the program during the task: it may be tried again, where it resumes
    /// from the node's checkpoint folder. Holds how it was killed.
    Killed(String),
    /// The task failed for good; the node's failure report.
    Failed(String),
}

/// Hands a task to a program and waits for its answer, trying again after a kill.
pub(super) trait Exchange {
    /// Serves `task` for `round` until `deadline`; `what` names the work in reports.
    fn exchange(
        &self,
        task: &impl Serialize,
        round: u32,
        deadline: Option<SystemTime>,
        what: &str,
    ) -> Result<(), String>;
}

/// Runs `attempt` at `what` of `round` until it succeeds, fails for good, or its program has
/// been killed 1 + [`RESTARTS_AFTER_KILL`] times; after each kill the task is tried `again`
/// (where, in words).
pub(super) fn retried_after_kills(
    what: &str,
    round: u32,
    again: &str,
    mut attempt: impl FnMut() -> Result<(), Attempt>,
) -> Result<(), String> {
    let mut retries = 0;
    loop {
        match attempt() {
            Ok(()) => return Ok(()),
            Err(Attempt::Killed(how)) if retries < RESTARTS_AFTER_KILL => {
                retries += 1;
                eprintln!(
                    "the trainer process was killed ({how}) during {what} {round}; the task \
                     goes {again} ({retries} of {RESTARTS_AFTER_KILL})"
                );
            }
            Err(Attempt::Killed(how)) => {
                return Err(format!(
                    "the trainer process was killed ({how}) during {what} {round}, {} \
                     times; it starts again for the next task",
                    1 + RESTARTS_AFTER_KILL
                ));
            }
            Err(Attempt::Failed(report)) => return Err(report),
        }
    }
}

/// The running program and the threads reading its output.
struct Process {
    child: Child,
    /// Dropped after the program has ended; the program dies with it.
    _starter: StarterThread,
    stdin: ChildStdin,
    replies: Receiver<Reply>,
    stderr: Arc<Mutex<VecDeque<String>>>,
}

/// What the program answered a task with.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reply {
    Done,
    Failed(String),
}

/// A protocol line on the program's stdout.
#[derive(Deserialize)]
struct ReplyLine {
    ferry: String,
    #[serde(default)]
    message: Option<String>,
}

impl LongLivedTrainer {
    /// A trainer that starts `command` (split on whitespace) when the first task comes, with
    /// round folders under `work_dir`.
    pub fn new(
        command: &str,
        data_dir: Option<std::path::PathBuf>,
        work_dir: std::path::PathBuf,
    ) -> Result<Self, String> {
        Ok(Self {
            files: RoundFiles::new(data_dir, work_dir),
            worker: Worker::new(command, None)?,
        })
    }
}

impl Worker {
    /// A worker that starts `command` (split on whitespace) when its first task comes; `index`
    /// is its place in a pool, if it is in one.
    pub fn new(command: &str, index: Option<usize>) -> Result<Self, String> {
        Ok(Self {
            command: TrainerCommand::parse(command)?,
            index,
            process: Mutex::new(None),
        })
    }

    fn start(&self) -> Result<Process, String> {
        let mut command = self.command.command();
        if let Some(index) = self.index {
            command.env("FERRY_TRAINER_WORKER", index.to_string());
        }
        command
            .env("FERRY_TRAINER", "long-lived")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let (mut child, starter) = spawn_kept(command).map_err(|e| self.command.cannot_run(&e))?;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err("the trainer's pipes could not be opened".into());
        };
        let (send, replies) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                match serde_json::from_str::<ReplyLine>(&line) {
                    Ok(reply) => {
                        let reply = match reply.ferry.as_str() {
                            "done" => Reply::Done,
                            other => Reply::Failed(reply.message.unwrap_or_else(|| {
                                format!("the trainer answered '{other}' without a message")
                            })),
                        };
                        if send.send(reply).is_err() {
                            break;
                        }
                    }
                    // The program's own output.
                    Err(_) => println!("{line}"),
                }
            }
        });
        let kept = Arc::new(Mutex::new(VecDeque::new()));
        let tail = kept.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("{line}");
                if let Ok(mut tail) = tail.lock() {
                    if tail.len() == STDERR_LINES {
                        tail.pop_front();
                    }
                    tail.push_back(line);
                }
            }
        });
        Ok(Process {
            child,
            _starter: starter,
            stdin,
            replies,
            stderr: kept,
        })
    }
}

impl Process {
    /// Whether the program is still running.
    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Stops the program (killing it first if `kill`) and says how it ended, with the end
    /// of its stderr.
    fn end(mut self, kill: bool) -> Ended {
        if kill {
            let _ = self.child.kill();
        }
        let status = self.child.wait();
        // Let the stderr thread drain what the program wrote last.
        std::thread::sleep(Duration::from_millis(50));
        let tail = self
            .stderr
            .lock()
            .map(|lines| lines.iter().cloned().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default();
        match status {
            Ok(status) => Ended::from_status(status, format!("{status}{}", stderr_tail(&tail))),
            Err(e) => Ended::Failed(format!("an unknown status ({e}){}", stderr_tail(&tail))),
        }
    }

    /// Hands the program `task` and waits for its answer until `deadline`.
    fn serve(
        &mut self,
        task: &impl Serialize,
        deadline: Option<SystemTime>,
    ) -> Result<Reply, Waited> {
        let line = serde_json::to_string(task).map_err(|e| Waited::Refused(e.to_string()))?;
        if writeln!(self.stdin, "{line}")
            .and_then(|()| self.stdin.flush())
            .is_err()
        {
            return Err(Waited::Died);
        }
        let reply = match deadline {
            Some(at) => {
                let left = at.duration_since(SystemTime::now()).unwrap_or_default();
                self.replies.recv_timeout(left)
            }
            None => self
                .replies
                .recv()
                .map_err(|_| RecvTimeoutError::Disconnected),
        };
        match reply {
            Ok(reply) => Ok(reply),
            Err(RecvTimeoutError::Timeout) => Err(Waited::Late),
            Err(RecvTimeoutError::Disconnected) => Err(Waited::Died),
        }
    }
}

/// Why no answer came.
enum Waited {
    Late,
    Died,
    Refused(String),
}

impl Worker {
    /// Hands the running program (started again if it had died) `task` for `round`, and waits
    /// for its answer until `deadline`, once; `what` names the work in failure reports.
    pub(super) fn attempt(
        &self,
        task: &impl Serialize,
        round: u32,
        deadline: Option<SystemTime>,
        what: &str,
    ) -> Result<(), Attempt> {
        let mut slot = self
            .process
            .lock()
            .map_err(|_| Attempt::Failed("the trainer's previous task panicked".into()))?;
        let mut process = match slot.take() {
            Some(mut process) => {
                if process.alive() {
                    process
                } else {
                    eprintln!(
                        "the trainer process had exited ({}); starting it again",
                        String::from(process.end(false))
                    );
                    self.start().map_err(Attempt::Failed)?
                }
            }
            None => self.start().map_err(Attempt::Failed)?,
        };
        match process.serve(task, deadline) {
            Ok(Reply::Done) => {
                *slot = Some(process);
                Ok(())
            }
            Ok(Reply::Failed(message)) => {
                *slot = Some(process);
                Err(Attempt::Failed(format!(
                    "the trainer reported for {what} {round}: {message}"
                )))
            }
            Err(Waited::Refused(reason)) => {
                *slot = Some(process);
                Err(Attempt::Failed(reason))
            }
            Err(Waited::Late) => Err(Attempt::Failed(format!(
                "the trainer did not finish {what} {round} by the round's deadline; it was \
                 stopped ({}) and starts again for the next task",
                String::from(process.end(true))
            ))),
            Err(Waited::Died) => match process.end(false) {
                Ended::Killed(how) => Err(Attempt::Killed(how)),
                ended => Err(Attempt::Failed(format!(
                    "the trainer process exited with {} during {what} {round}; it starts \
                     again for the next task",
                    String::from(ended)
                ))),
            },
        }
    }
}

/// A node's own process is started again on a task it was killed during (it resumes from its
/// checkpoint folder), at most [`RESTARTS_AFTER_KILL`] times.
impl Exchange for Worker {
    fn exchange(
        &self,
        task: &impl Serialize,
        round: u32,
        deadline: Option<SystemTime>,
        what: &str,
    ) -> Result<(), String> {
        retried_after_kills(what, round, "to the process started again", || {
            self.attempt(task, round, deadline, what)
        })
    }
}

impl Trainer for LongLivedTrainer {
    fn train(&self, task: &TrainTask) -> Result<Update, String> {
        train_with(&self.files, &self.worker, task)
    }

    fn evaluate(&self, task: &EvalTask) -> Result<NodeEvaluation, String> {
        evaluate_with(&self.files, &self.worker, task)
    }
}

/// `task` trained by `worker`'s program in `files`' round folders.
pub(super) fn train_with(
    files: &RoundFiles,
    worker: &impl Exchange,
    task: &TrainTask,
) -> Result<Update, String> {
    let (exec_task, _) = files.prepare(task)?;
    worker.exchange(&exec_task, task.round, task.deadline, "round")?;
    files.collect(task, &exec_task)
}

/// `task` scored by `worker`'s program in `files`' round folders.
pub(super) fn evaluate_with(
    files: &RoundFiles,
    worker: &impl Exchange,
    task: &EvalTask,
) -> Result<NodeEvaluation, String> {
    let (exec_task, _) = files.prepare_evaluation(task)?;
    worker.exchange(
        &exec_task,
        task.round,
        task.deadline,
        "the evaluation of round",
    )?;
    RoundFiles::collect_evaluation(&exec_task)
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use ferry_core::strategy::ClientProcedure;

    use super::*;
    use crate::exec::tests::{python3, sample_task};

    fn task(round: u32, deadline: Option<SystemTime>) -> TrainTask {
        sample_task(round, ClientProcedure::LocalSgd, vec![1.0, 2.0], deadline)
    }

    /// A Python program serving tasks: it adds 1 to every weight and reports its process id
    /// as a metric; round 3 crashes it, round 4 hangs it, round 5 is refused, and round 7
    /// is killed by SIGKILL until it has left `saved` in its checkpoint folder.
    const SERVER: &str = r#"import json, os, signal, sys, time
from safetensors.numpy import load_file, save_file
assert os.environ["FERRY_TRAINER"] == "long-lived"
for line in sys.stdin:
    task = json.loads(line)
    if task["kind"] == "evaluate":
        m = load_file(task["model_in"])
        json.dump({"num_examples": 4, "loss": 0.5, "accuracy": float(m["w"][0]) / 10,
                   "metrics": {"pid": os.getpid()}}, open(task["result_out"], "w"))
        print(json.dumps({"ferry": "done"}), flush=True)
        continue
    assert task["kind"] == "train"
    print("training round", task["round"])
    sys.stdout.flush()
    if task["round"] == 3:
        print("CUDA out of memory", file=sys.stderr)
        sys.exit(7)
    if task["round"] == 4:
        time.sleep(60)
    if task["round"] == 5:
        print(json.dumps({"ferry": "error", "message": "no data for this round"}), flush=True)
        continue
    if task["round"] == 7:
        saved = os.path.join(task["checkpoint_dir"], "saved")
        if not os.path.exists(saved):
            open(saved, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
    m = load_file(task["model_in"])
    save_file({k: v + 1 for k, v in m.items()}, task["model_out"])
    json.dump({"num_examples": 3, "metrics": {"pid": os.getpid()}}, open(task["result_out"], "w"))
    print(json.dumps({"ferry": "done"}), flush=True)
"#;

    fn trainer(dir: &Path) -> LongLivedTrainer {
        let script: PathBuf = dir.join("serve.py");
        std::fs::write(&script, SERVER).expect("script");
        LongLivedTrainer::new(
            &format!("{} {}", python3(), script.display()),
            None,
            dir.join("work"),
        )
        .expect("trainer")
    }

    #[test]
    fn a_program_killed_during_a_task_is_started_again_on_that_task() {
        let dir = tempfile::tempdir().expect("tempdir");
        let trainer = trainer(dir.path());
        let first = trainer.train(&task(1, None)).expect("round 1");
        let resumed = trainer
            .train(&task(7, None))
            .expect("round 7 is finished by the restarted program");
        assert_eq!(resumed.delta, [1.0, 1.0]);
        assert_ne!(
            resumed.metrics["pid"], first.metrics["pid"],
            "a new process finished it"
        );
    }

    #[test]
    fn one_process_serves_rounds_and_is_restarted_after_a_crash_or_a_deadline() {
        let dir = tempfile::tempdir().expect("tempdir");
        let trainer = trainer(dir.path());
        let first = trainer.train(&task(1, None)).expect("round 1");
        assert_eq!(first.delta, [1.0, 1.0]);
        assert_eq!(first.num_examples, 3);
        let second = trainer.train(&task(2, None)).expect("round 2");
        assert_eq!(
            first.metrics["pid"], second.metrics["pid"],
            "the same process served both rounds"
        );

        let crash = trainer.train(&task(3, None)).expect_err("round 3 crashes");
        assert!(
            crash.contains("exit status: 7") && crash.contains("CUDA out of memory"),
            "{crash}"
        );
        let after_crash = trainer.train(&task(2, None)).expect("restarted");
        assert_ne!(after_crash.metrics["pid"], first.metrics["pid"]);

        let soon = SystemTime::now() + Duration::from_secs(2);
        let late = trainer
            .train(&task(4, Some(soon)))
            .expect_err("round 4 hangs");
        assert!(
            late.contains("did not finish round 4 by the round's deadline"),
            "{late}"
        );
        let refused = trainer
            .train(&task(5, None))
            .expect_err("round 5 is refused");
        assert!(refused.contains("no data for this round"), "{refused}");
        let after_kill = trainer.train(&task(6, None)).expect("served again");
        assert_eq!(after_kill.delta, [1.0, 1.0]);
        let scored = trainer
            .evaluate(&EvalTask {
                round: 6,
                model: task(6, None).model,
                seed: 1,
                deadline: None,
                personal: Default::default(),
            })
            .expect("evaluates");
        assert_eq!((scored.num_examples, scored.accuracy), (4, 0.1));
        assert_eq!(
            scored.metrics["pid"], after_kill.metrics["pid"],
            "the process that trains also evaluates"
        );
    }
}
