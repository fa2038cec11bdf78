//! The external-command trainer: local training in any language. For each round Ferry writes
//! the global model (safetensors) and the task (JSON) to a fresh folder, hands the task to the
//! user's program, and reads back the trained model (safetensors) and a result (JSON). An
//! evaluation task (`"kind": "evaluate"`) asks the program to score the global model on the
//! node's held-out data instead and write only its figures. The program runs once per task
//! ([`ExecTrainer`]) or once for the whole run, taking tasks as JSON lines
//! ([`long_lived::LongLivedTrainer`]). The contract is documented in `docs/exec-trainer.md`.

pub mod long_lived;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use ferry_core::{
    Model, Update, algebra,
    evaluation::NodeEvaluation,
    personal::{self, PersonalTensors},
    strategy::{ClientProcedure, fednova_normalizer},
};
use serde::{Deserialize, Serialize};

use crate::agent::{EvalTask, TrainTask, Trainer};

/// The user's command, split into the program and its arguments.
#[derive(Debug, Clone)]
pub struct TrainerCommand {
    program: String,
    args: Vec<String>,
}

impl TrainerCommand {
    /// Splits `command` on whitespace; the first word is the program.
    pub fn parse(command: &str) -> Result<Self, String> {
        let mut words = command.split_whitespace().map(String::from);
        let program = words.next().ok_or(
            "--trainer-cmd is empty; give the command to run, for example \"python3 train.py\"",
        )?;
        Ok(Self {
            program,
            args: words.collect(),
        })
    }

    /// A process of the command, with the given extra arguments, stdout inherited and stderr
    /// piped (so a failure can be reported with its last lines).
    fn command(&self) -> Command {
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .stdout(Stdio::inherit())
            .stderr(Stdio::piped());
        command
    }

    fn cannot_run(&self, e: &std::io::Error) -> String {
        format!("cannot run the trainer command '{}': {e}", self.program)
    }
}

/// Where a node's trainer exchanges files with Ferry: one fresh folder per round under
/// `work_dir`, and the node's data folder.
#[derive(Debug, Clone)]
pub struct RoundFiles {
    data_dir: Option<PathBuf>,
    work_dir: PathBuf,
}

impl RoundFiles {
    /// Round folders under `work_dir`; `data_dir` is passed on to the trainer.
    pub fn new(data_dir: Option<PathBuf>, work_dir: PathBuf) -> Self {
        Self { data_dir, work_dir }
    }

    /// A fresh, empty folder `name` under the work folder.
    fn fresh_dir(&self, name: &str) -> Result<PathBuf, String> {
        let dir = self.work_dir.join(name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .map_err(|e| format!("cannot clear {}: {e}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        Ok(dir)
    }

    /// Where the node keeps its personal tensors between rounds.
    fn own_tensors_file(&self) -> PathBuf {
        self.work_dir.join("personal.safetensors")
    }

    /// `model` with the node's own personal tensors in place of the server's, once the node
    /// has trained them.
    fn with_own_tensors(&self, model: &Model, personal: &PersonalTensors) -> Result<Model, String> {
        let file = self.own_tensors_file();
        if personal.is_empty() || !file.exists() {
            return Ok(model.clone());
        }
        let own = personal::load(&read(&file, "personal tensors")?).map_err(|e| e.to_string())?;
        model.with_own(&own).map_err(|e| {
            format!(
                "{e}; delete {} to start from the server's values",
                file.display()
            )
        })
    }

    /// The safetensors bytes the trainer gets for `model`: with the node's own personal
    /// tensors in place.
    fn model_bytes(&self, model: &Model, personal: &PersonalTensors) -> Result<Vec<u8>, String> {
        self.with_own_tensors(model, personal)?
            .to_safetensors()
            .map_err(|e| e.to_string())
    }

    /// Keeps the personal tensors of `trained` for the node's next rounds.
    fn keep_own_tensors(&self, trained: &Model, personal: &PersonalTensors) -> Result<(), String> {
        if personal.is_empty() {
            return Ok(());
        }
        let own: Vec<_> = trained
            .carried()
            .iter()
            .filter(|t| personal.matches(&t.name))
            .collect();
        let bytes = personal::save(&own).map_err(|e| e.to_string())?;
        let file = self.own_tensors_file();
        crate::state_file::replace(&file, &bytes).map_err(|e| {
            format!(
                "cannot keep the node's personal tensors in {}: {e}",
                file.display()
            )
        })
    }

    /// Writes the model's safetensors bytes `global` and the task to `dir`; returns the path
    /// of `task.json`.
    fn write_task(
        dir: &Path,
        global: &[u8],
        model_in: &Path,
        task: &impl Serialize,
    ) -> Result<PathBuf, String> {
        let task_path = dir.join("task.json");
        let task_json = serde_json::to_vec_pretty(task).map_err(|e| e.to_string())?;
        std::fs::write(model_in, global)
            .and_then(|()| std::fs::write(&task_path, task_json))
            .map_err(|e| format!("cannot write the task for the trainer command: {e}"))?;
        Ok(task_path)
    }

    /// The checkpoint folder of `task` (whose model the trainer gets as `global`), created if
    /// missing and kept as it is otherwise: the same task after a restart of the trainer or
    /// of the agent (the server gives an open round's task back to its node) finds what the
    /// trainer saved. Other tasks' checkpoint folders are removed, so at most one task's
    /// checkpoints are kept.
    fn checkpoint_dir(&self, task: &TrainTask, global: &[u8]) -> Result<PathBuf, String> {
        let name = format!(
            "round-{}-{}",
            task.round,
            &ferry_core::content::content_id(global)[..16]
        );
        let root = self.work_dir.join("checkpoints");
        let dir = root.join(&name);
        if let Ok(entries) = std::fs::read_dir(&root) {
            for stale in entries.flatten().filter(|e| e.file_name() != name.as_str()) {
                std::fs::remove_dir_all(stale.path()).map_err(|e| {
                    format!(
                        "cannot remove the old checkpoints {}: {e}",
                        stale.path().display()
                    )
                })?;
            }
        }
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        Ok(dir)
    }

    /// Writes the round's global model and `task.json` to a fresh folder; returns the task
    /// and the path of `task.json`.
    fn prepare(&self, task: &TrainTask) -> Result<(ExecTask, PathBuf), String> {
        let (procedure, mu) = procedure_name(task.procedure)?;
        let global = self.model_bytes(&task.model, &task.personal)?;
        let checkpoint_dir = self.checkpoint_dir(task, &global)?;
        let dir = self.fresh_dir(&format!("round-{}", task.round))?;
        let exec_task = ExecTask {
            kind: "train".into(),
            round: task.round,
            epochs: task.training.epochs,
            batch_size: task.training.batch_size,
            lr: task.training.lr,
            momentum: task.training.momentum,
            weight_decay: task.training.weight_decay,
            seed: task.seed,
            procedure: procedure.into(),
            mu,
            model_in: dir.join("global.safetensors"),
            model_out: dir.join("trained.safetensors"),
            result_out: dir.join("result.json"),
            data_dir: self.data_dir.clone(),
            checkpoint_dir,
        };
        let task_path = Self::write_task(&dir, &global, &exec_task.model_in, &exec_task)?;
        Ok((exec_task, task_path))
    }

    /// Writes the global model to score and an evaluation `task.json` to a fresh folder;
    /// returns the task and the path of `task.json`.
    fn prepare_evaluation(&self, task: &EvalTask) -> Result<(ExecEvaluation, PathBuf), String> {
        let dir = self.fresh_dir(&format!("evaluate-{}", task.round))?;
        let exec_task = ExecEvaluation {
            kind: "evaluate".into(),
            round: task.round,
            seed: task.seed,
            model_in: dir.join("global.safetensors"),
            result_out: dir.join("result.json"),
            data_dir: self.data_dir.clone(),
        };
        let global = self.model_bytes(&task.model, &task.personal)?;
        let task_path = Self::write_task(&dir, &global, &exec_task.model_in, &exec_task)?;
        Ok((exec_task, task_path))
    }

    /// Reads the figures the trainer wrote for an evaluation.
    fn collect_evaluation(exec_task: &ExecEvaluation) -> Result<NodeEvaluation, String> {
        let evaluation: NodeEvaluation =
            serde_json::from_slice(&read(&exec_task.result_out, "evaluation result")?).map_err(
                |e| {
                    format!(
                        "an evaluation's result.json must be {{\"num_examples\": N, \"loss\": L, \
                         \"accuracy\": A, \"metrics\": {{...}}}}: {e}"
                    )
                },
            )?;
        evaluation.validate()?;
        Ok(evaluation)
    }

    /// Reads what the trainer wrote for `exec_task` and turns it into the round's update; the
    /// trained personal tensors stay on the node.
    fn collect(&self, task: &TrainTask, exec_task: &ExecTask) -> Result<Update, String> {
        let trained = Model::from_safetensors_with(
            &read(&exec_task.model_out, "trained model")?,
            &task.personal,
        )
        .map_err(|e| format!("the trained model is not valid safetensors: {e}"))?;
        task.model
            .check_same_layout(trained.layout())
            .map_err(|e| format!("the trained model does not match the global model: {e}"))?;
        self.keep_own_tensors(&trained, &task.personal)?;
        let result: ExecResult = serde_json::from_slice(&read(&exec_task.result_out, "result")?)
            .map_err(|e| {
                format!("result.json must be {{\"num_examples\": N, \"metrics\": {{...}}}}: {e}")
            })?;
        let mut delta = vec![0.0; task.model.num_params()];
        algebra::delta_into(&mut delta, trained.values(), task.model.values());
        let mut update = Update::new(delta, result.num_examples);
        if task.procedure == ClientProcedure::Normalized {
            let steps = result
                .metrics
                .get("steps")
                .ok_or("FedNova needs metrics.steps (local SGD steps taken) in result.json")?;
            update.normalizer = Some(fednova_normalizer(*steps as u64, task.training.momentum));
        }
        if task.procedure == ClientProcedure::LossReporting {
            ferry_core::qfedavg::loss_before(&result.metrics).map_err(|_| {
                "q-FedAvg needs metrics.loss_before in result.json: the loss of the received \
                 model on the node's training data, measured before training"
                    .to_string()
            })?;
        }
        update.metrics = result.metrics;
        Ok(update)
    }
}

/// A trainer that runs a command once per round, for example `python3 train.py TASK_JSON`.
#[derive(Debug, Clone)]
pub struct ExecTrainer {
    command: TrainerCommand,
    files: RoundFiles,
}

/// What the command reads from `task.json` for a training task.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExecTask {
    /// `train`.
    pub kind: String,
    /// The round.
    pub round: u32,
    /// Local epochs.
    pub epochs: u32,
    /// Batch size.
    pub batch_size: usize,
    /// SGD learning rate.
    pub lr: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// L2 weight decay.
    pub weight_decay: f64,
    /// Seed for shuffling.
    pub seed: u64,
    /// `local_sgd`, `proximal` (add `(mu/2)·‖w − w_global‖²`), `normalized` (report `steps`)
    /// or `loss_reporting` (report `loss_before`, the received model's loss on the training
    /// data before training).
    pub procedure: String,
    /// FedProx's mu (0 unless `procedure` is `proximal`).
    pub mu: f64,
    /// The global model to start from.
    pub model_in: PathBuf,
    /// Where to write the trained model.
    pub model_out: PathBuf,
    /// Where to write the result.
    pub result_out: PathBuf,
    /// The node's data folder (`--data-dir`), if given.
    pub data_dir: Option<PathBuf>,
    /// A folder for the trainer's checkpoints that outlives the trainer and the agent: a
    /// trainer started again on the same task (after it was killed, or after the node
    /// restarted while the round was open) finds there what it saved, and resumes.
    pub checkpoint_dir: PathBuf,
}

/// What the command reads from `task.json` for an evaluation task: score `model_in` on the
/// node's held-out data and write `{"num_examples", "loss", "accuracy", "metrics"}` to
/// `result_out`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExecEvaluation {
    /// `evaluate`.
    pub kind: String,
    /// The round whose global model is scored.
    pub round: u32,
    /// Seed for any randomness in scoring.
    pub seed: u64,
    /// The global model to score.
    pub model_in: PathBuf,
    /// Where to write the figures.
    pub result_out: PathBuf,
    /// The node's data folder (`--data-dir`), if given.
    pub data_dir: Option<PathBuf>,
}

/// What the command writes to `result.json`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ExecResult {
    /// Training examples behind the trained model (the FedAvg weight).
    pub num_examples: u64,
    /// Metrics to report, for example `train_loss`; `steps` is required by FedNova.
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
}

impl ExecTrainer {
    /// A trainer running `command` (split on whitespace; the first word is the program), with
    /// round folders under `work_dir`.
    pub fn new(
        command: &str,
        data_dir: Option<PathBuf>,
        work_dir: PathBuf,
    ) -> Result<Self, String> {
        Ok(Self {
            command: TrainerCommand::parse(command)?,
            files: RoundFiles::new(data_dir, work_dir),
        })
    }
}

fn procedure_name(procedure: ClientProcedure) -> Result<(&'static str, f64), String> {
    match procedure {
        ClientProcedure::LocalSgd => Ok(("local_sgd", 0.0)),
        ClientProcedure::Proximal { mu } => Ok(("proximal", mu)),
        ClientProcedure::Normalized => Ok(("normalized", 0.0)),
        ClientProcedure::LossReporting => Ok(("loss_reporting", 0.0)),
        ClientProcedure::Scaffold => Err(
            "the run uses SCAFFOLD, which the external-command trainer does not support; use the built-in trainer".into(),
        ),
    }
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| {
        format!(
            "the trainer command wrote no {what} at {}: {e}",
            path.display()
        )
    })
}

/// The last lines a failed trainer wrote to stderr (at most 10 lines and 1,500 characters),
/// as `; stderr: ...`, so the node's failure report says why.
fn stderr_tail(text: &str) -> String {
    let lines: Vec<&str> = text.trim_end().lines().collect();
    let tail = lines[lines.len().saturating_sub(10)..].join("\n");
    if tail.is_empty() {
        return String::new();
    }
    let start = tail.char_indices().rev().nth(1499).map_or(0, |(i, _)| i);
    format!("; stderr: {}", &tail[start..])
}

/// Times a training command killed by a signal is started again on its task (it resumes from
/// its checkpoint folder) before the round is given up.
const RESTARTS_AFTER_KILL: u32 = 3;

impl ExecTrainer {
    /// Runs the command on the training task at `task_path`, starting it again if a signal
    /// killed it (an out-of-memory killer, an operator), at most [`RESTARTS_AFTER_KILL`]
    /// times.
    fn run_training(&self, task_path: &Path) -> Result<(), String> {
        let mut restarts = 0;
        loop {
            match self.run_once(task_path) {
                Err(Ended::Killed(why)) if restarts < RESTARTS_AFTER_KILL => {
                    restarts += 1;
                    eprintln!(
                        "{why}; starting it again from its checkpoint folder ({restarts} of \
                         {RESTARTS_AFTER_KILL})"
                    );
                }
                Err(Ended::Killed(why) | Ended::Failed(why)) => return Err(why),
                Ok(()) => return Ok(()),
            }
        }
    }

    /// Runs the command once on the task at `task_path`; a failure says how it ended.
    fn run_once(&self, task_path: &Path) -> Result<(), Ended> {
        let run = self
            .command
            .command()
            .arg(task_path)
            .env("FERRY_TASK", task_path)
            .spawn()
            .and_then(|child| child.wait_with_output())
            .map_err(|e| Ended::Failed(self.command.cannot_run(&e)))?;
        // The node's log keeps all the trainer said; the server hears the end of it.
        eprint!("{}", String::from_utf8_lossy(&run.stderr));
        if run.status.success() {
            return Ok(());
        }
        let why = format!(
            "the trainer command exited with {}{}",
            run.status,
            stderr_tail(&String::from_utf8_lossy(&run.stderr))
        );
        Err(
            match std::os::unix::process::ExitStatusExt::signal(&run.status) {
                Some(_) => Ended::Killed(why),
                None => Ended::Failed(why),
            },
        )
    }
}

/// How a trainer command that did not succeed ended.
enum Ended {
    /// A signal killed it: starting it again may finish the task.
    Killed(String),
    /// It failed by itself, or could not start.
    Failed(String),
}

impl From<Ended> for String {
    fn from(ended: Ended) -> Self {
        match ended {
            Ended::Killed(why) | Ended::Failed(why) => why,
        }
    }
}

impl Trainer for ExecTrainer {
    fn train(&self, task: &TrainTask) -> Result<Update, String> {
        let (exec_task, task_path) = self.files.prepare(task)?;
        self.run_training(&task_path)?;
        self.files.collect(task, &exec_task)
    }

    fn evaluate(&self, task: &EvalTask) -> Result<NodeEvaluation, String> {
        let (exec_task, task_path) = self.files.prepare_evaluation(task)?;
        self.run_once(&task_path)?;
        RoundFiles::collect_evaluation(&exec_task)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::agent::EvalTask;
    use ferry_core::{ModelLayout, TensorSpec, task::LocalTraining};
    use std::sync::Arc;

    /// The Python the tests' trainer scripts run under: the repository's `.venv` (numpy and
    /// safetensors), which `scripts/install-deps.sh` makes.
    pub(super) fn python3() -> String {
        let venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python3");
        assert!(
            venv.exists(),
            "{} is missing: run scripts/install-deps.sh first",
            venv.display()
        );
        venv.display().to_string()
    }

    /// Round `round` of `procedure` over a one-tensor model holding `values`.
    pub(super) fn sample_task(
        round: u32,
        procedure: ClientProcedure,
        values: Vec<f32>,
        deadline: Option<std::time::SystemTime>,
    ) -> TrainTask {
        let layout =
            ModelLayout::new(vec![TensorSpec::f32("w", vec![values.len()])]).expect("layout");
        TrainTask {
            round,
            model: Model::new(Arc::new(layout), values).expect("model"),
            training: LocalTraining {
                epochs: 1,
                batch_size: 4,
                lr: 0.1,
                momentum: 0.0,
                weight_decay: 0.0,
            },
            procedure,
            server_control: None,
            seed: 5,
            deadline,
            personal: PersonalTensors::default(),
        }
    }

    fn task(procedure: ClientProcedure) -> TrainTask {
        sample_task(2, procedure, vec![1.0, 2.0, 3.0], None)
    }

    /// A shell "trainer" that copies the model and reports 7 examples: the delta is zero and
    /// the count and metrics come through.
    #[test]
    fn a_command_that_copies_the_model_gives_a_zero_delta() {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = dir.path().join("train.sh");
        std::fs::write(
            &script,
            "d=$(dirname \"$1\"); cp \"$d/global.safetensors\" \"$d/trained.safetensors\"; \
             echo '{\"num_examples\": 7, \"metrics\": {\"train_loss\": 0.5, \"steps\": 3}}' > \"$d/result.json\"",
        )
        .expect("script");
        let trainer = sh_trainer(&script, &dir.path().join("work"));
        let update = trainer
            .train(&task(ClientProcedure::Normalized))
            .expect("trains");
        assert_eq!(update.delta, [0.0, 0.0, 0.0]);
        assert_eq!(update.num_examples, 7);
        assert_eq!(update.metrics["train_loss"], 0.5);
        assert_eq!(update.normalizer, Some(3.0));
        let written: ExecTask = serde_json::from_slice(
            &std::fs::read(dir.path().join("work/round-2/task.json")).expect("task.json"),
        )
        .expect("task parses");
        assert_eq!(
            (written.round, written.seed, written.procedure.as_str()),
            (2, 5, "normalized")
        );
    }

    /// A shell trainer that appends a line to `runs` in its checkpoint folder, is killed by
    /// SIGKILL while `saved` is missing there (it writes it first, as a checkpoint), and
    /// otherwise finishes, reporting that it resumed.
    const KILLED_ONCE: &str = "d=$(dirname \"$1\"); \
        c=$(sed -n 's/.*\"checkpoint_dir\": \"\\(.*\\)\".*/\\1/p' \"$1\"); \
        echo run >> \"$c/runs\"; \
        if [ ! -f \"$c/saved\" ]; then touch \"$c/saved\"; kill -9 $$; fi; \
        cp \"$d/global.safetensors\" \"$d/trained.safetensors\"; \
        echo '{\"num_examples\": 4, \"metrics\": {\"resumed\": 1}}' > \"$d/result.json\"";

    /// The shell script `script` as a per-round trainer working in `work`.
    fn sh_trainer(script: &Path, work: &Path) -> ExecTrainer {
        ExecTrainer::new(
            &format!("sh {}", script.display()),
            None,
            work.to_path_buf(),
        )
        .expect("trainer")
    }

    fn checkpoint_folders(work: &Path) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(work.join("checkpoints"))
            .expect("checkpoints")
            .map(|e| e.expect("entry").path())
            .collect();
        dirs.sort();
        dirs
    }

    #[test]
    fn a_trainer_killed_mid_task_is_started_again_on_its_checkpoint_folder() {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = dir.path().join("train.sh");
        std::fs::write(&script, KILLED_ONCE).expect("script");
        let work = dir.path().join("work");
        let trainer = sh_trainer(&script, &work);
        let update = trainer
            .train(&task(ClientProcedure::LocalSgd))
            .expect("the second start finishes");
        assert_eq!(update.metrics["resumed"], 1.0);
        let folders = checkpoint_folders(&work);
        assert_eq!(folders.len(), 1, "{folders:?}");
        let runs = std::fs::read_to_string(folders[0].join("runs")).expect("runs");
        assert_eq!(runs.lines().count(), 2, "killed once, started again once");
        // A restarted agent given the same task back finds the same folder, checkpoint kept.
        let restarted = sh_trainer(&script, &work);
        restarted
            .train(&task(ClientProcedure::LocalSgd))
            .expect("resumes at once");
        assert_eq!(checkpoint_folders(&work), folders);
        let runs = std::fs::read_to_string(folders[0].join("runs")).expect("runs");
        assert_eq!(runs.lines().count(), 3, "no kill: the checkpoint was found");
        // The next task's folder replaces it.
        restarted
            .train(&sample_task(
                3,
                ClientProcedure::LocalSgd,
                vec![4.0, 5.0],
                None,
            ))
            .expect("trains");
        let next = checkpoint_folders(&work);
        assert_eq!(next.len(), 1);
        assert_ne!(next, folders);
    }

    #[test]
    fn a_trainer_killed_every_time_is_given_up_after_its_restarts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = dir.path().join("train.sh");
        std::fs::write(
            &script,
            "c=$(sed -n 's/.*\"checkpoint_dir\": \"\\(.*\\)\".*/\\1/p' \"$1\"); \
             echo run >> \"$c/runs\"; kill -9 $$",
        )
        .expect("script");
        let work = dir.path().join("work");
        let trainer = sh_trainer(&script, &work);
        let err = trainer
            .train(&task(ClientProcedure::LocalSgd))
            .expect_err("gives up");
        assert!(err.contains("signal: 9"), "{err}");
        let runs =
            std::fs::read_to_string(checkpoint_folders(&work)[0].join("runs")).expect("runs");
        assert_eq!(runs.lines().count() as u32, 1 + RESTARTS_AFTER_KILL);
    }

    #[test]
    fn an_evaluation_task_asks_for_figures_and_refuses_incomplete_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = dir.path().join("evaluate.sh");
        let trainer = sh_trainer(&script, &dir.path().join("work"));
        let eval_task = EvalTask {
            round: 3,
            model: task(ClientProcedure::LocalSgd).model,
            seed: 1,
            deadline: None,
            personal: PersonalTensors::default(),
        };
        let cases = [
            (
                r#"{"num_examples": 9, "loss": 0.3, "accuracy": 0.75, "metrics": {"f1": 0.7}}"#,
                None,
            ),
            (r#"{"num_examples": 9, "loss": 0.3}"#, Some("accuracy")),
            (
                r#"{"num_examples": 9, "loss": 0.3, "accuracy": 75}"#,
                Some("[0, 1]"),
            ),
        ];
        for (figures, refused) in cases {
            std::fs::write(
                &script,
                format!(
                    "d=$(dirname \"$1\"); grep -q '\"kind\": \"evaluate\"' \"$1\" || exit 9; \
                     test -f \"$d/global.safetensors\" || exit 8; \
                     echo '{figures}' > \"$d/result.json\""
                ),
            )
            .expect("script");
            match (trainer.evaluate(&eval_task), refused) {
                (Ok(scored), None) => {
                    assert_eq!((scored.num_examples, scored.accuracy), (9, 0.75));
                    assert_eq!(scored.metrics["f1"], 0.7);
                }
                (Err(e), Some(needle)) => assert!(e.contains(needle), "{figures}: {e}"),
                (other, _) => panic!("{figures}: {other:?}"),
            }
        }
    }

    /// A personal tensor (`bn`) is trained on the node, kept there between rounds and tasks,
    /// and never part of the update.
    #[test]
    fn personal_tensors_stay_on_the_node_from_round_to_round() {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = dir.path().join("add_one.py");
        std::fs::write(
            &script,
            "import json, sys\nfrom safetensors.numpy import load_file, save_file\n\
             t = json.load(open(sys.argv[-1]))\nm = load_file(t['model_in'])\n\
             if t['kind'] == 'evaluate':\n\
             \x20   json.dump({'num_examples': 1, 'loss': 0.0, 'accuracy': float(m['bn'][0]) / 100}, open(t['result_out'], 'w'))\n\
             else:\n\
             \x20   save_file({k: v + 1 for k, v in m.items()}, t['model_out'])\n\
             \x20   json.dump({'num_examples': 2}, open(t['result_out'], 'w'))\n",
        )
        .expect("script");
        let work = dir.path().join("work");
        let trainer = ExecTrainer::new(
            &format!("{} {}", python3(), script.display()),
            None,
            work.clone(),
        )
        .expect("trainer");
        let personal = PersonalTensors::new(vec!["bn".into()]).expect("valid");
        let mut task = sample_task(1, ClientProcedure::LocalSgd, vec![1.0, 2.0], None);
        task.model = task
            .model
            .with_carried(vec![ferry_core::dtype::CarriedTensor {
                name: "bn".into(),
                dtype: safetensors::Dtype::F32,
                shape: vec![1],
                data: bytemuck::cast_slice(&[10.0f32]).to_vec(),
            }])
            .expect("model");
        task.personal = personal.clone();
        let bn_given = |round: u32| {
            let bytes = std::fs::read(work.join(format!("round-{round}/global.safetensors")))
                .expect("global");
            let model = Model::from_safetensors_with(&bytes, &personal).expect("model");
            model.carried()[0].data.clone()
        };
        let first = trainer.train(&task).expect("round 1");
        assert_eq!(
            first.delta,
            [1.0, 1.0],
            "the update holds only the shared tensor"
        );
        assert_eq!(
            bn_given(1),
            bytemuck::cast_slice::<f32, u8>(&[10.0]),
            "the server's value"
        );
        task.round = 2;
        trainer.train(&task).expect("round 2");
        assert_eq!(
            bn_given(2),
            bytemuck::cast_slice::<f32, u8>(&[11.0]),
            "the node's own value"
        );
        let scored = trainer
            .evaluate(&EvalTask {
                round: 2,
                model: task.model.clone(),
                seed: 1,
                deadline: None,
                personal,
            })
            .expect("evaluates");
        assert_eq!(
            scored.accuracy, 0.12,
            "scored with the node's own bn after round 2"
        );
    }

    #[test]
    fn failures_say_what_the_command_did_wrong() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cases = [
            ("exit 3", "exited"),
            (
                "echo 'Traceback: KeyError: fc.weight' >&2; exit 1",
                "stderr: Traceback: KeyError: fc.weight",
            ),
            ("true", "no trained model"),
            (
                "d=$(dirname \"$1\"); printf junk > \"$d/trained.safetensors\"",
                "not valid safetensors",
            ),
        ];
        for (body, needle) in cases {
            let script = dir.path().join("bad.sh");
            std::fs::write(&script, body).expect("script");
            let trainer = sh_trainer(&script, &dir.path().join("w"));
            let err = trainer
                .train(&task(ClientProcedure::LocalSgd))
                .expect_err(needle);
            assert!(err.contains(needle), "{body}: {err}");
        }
        let trainer = ExecTrainer::new("true", None, dir.path().join("w")).expect("trainer");
        let err = trainer
            .train(&task(ClientProcedure::Scaffold))
            .expect_err("scaffold");
        assert!(err.contains("SCAFFOLD"), "{err}");
        assert!(ExecTrainer::new("  ", None, dir.path().into()).is_err());
    }
}
