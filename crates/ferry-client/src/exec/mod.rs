//! The external-command trainer: local training in any language. For each round Ferry writes
//! the global model (safetensors) and the task (JSON) to a fresh folder, hands the task to the
//! user's program, and reads back the trained model (safetensors) and a result (JSON). An
//! evaluation task (`"kind": "evaluate"`) asks the program to score the global model on the
//! node's held-out data instead and write only its figures. The program runs once per task
//! ([`ExecTrainer`]) or once for the whole run, taking tasks as JSON lines
//! ([`long_lived::LongLivedTrainer`]). The contract is documented in `docs/exec-trainer.md`.

mod files;
pub mod long_lived;
pub mod pool;
mod process;

use std::path::{Path, PathBuf};

use ferry_core::{Update, evaluation::NodeEvaluation};

use crate::agent::{EvalTask, TrainTask, Trainer};
pub use files::{ExecEvaluation, ExecResult, ExecTask, RoundFiles};
pub use process::TrainerCommand;
use process::{Ended, RESTARTS_AFTER_KILL, stderr_tail};

/// A trainer that runs a command once per round, for example `python3 train.py TASK_JSON`.
#[derive(Debug, Clone)]
pub struct ExecTrainer {
    command: TrainerCommand,
    files: RoundFiles,
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
        Err(Ended::from_status(run.status, why))
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
    use ferry_core::{
        Model, ModelLayout, TensorSpec, personal::TensorRoles, strategy::ClientProcedure,
        task::LocalTraining,
    };
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
            personal: TensorRoles::default(),
        }
    }

    /// `model` carrying a one-value f32 tensor `name` (a personal or frozen tensor).
    pub(super) fn with_scalar(model: &Model, name: &str, value: f32) -> Model {
        model
            .clone()
            .with_carried(vec![ferry_core::dtype::CarriedTensor {
                name: name.into(),
                dtype: safetensors::Dtype::F32,
                shape: vec![1],
                data: bytemuck::cast_slice(&[value]).to_vec(),
            }])
            .expect("model")
    }

    fn task(procedure: ClientProcedure) -> TrainTask {
        sample_task(2, procedure, vec![1.0, 2.0, 3.0], None)
    }

    /// A shell "trainer" that copies the model and reports 7 examples: the delta is zero and
    /// the count and metrics come through.
    #[test]
    fn a_command_that_copies_the_model_gives_a_zero_delta() {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = copying_script(
            dir.path(),
            r#"{"num_examples": 7, "metrics": {"train_loss": 0.5, "steps": 3}}"#,
        );
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

    /// A shell trainer in `dir` that copies the global model (a zero delta) and writes
    /// `result` as its result.json; returns the script's path.
    fn copying_script(dir: &Path, result: &str) -> PathBuf {
        let script = dir.join("copy.sh");
        std::fs::write(
            &script,
            format!(
                "d=$(dirname \"$1\"); cp \"$d/global.safetensors\" \"$d/trained.safetensors\"; \
                 echo '{result}' > \"$d/result.json\""
            ),
        )
        .expect("script");
        script
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

    /// The correction Ferry handed the trainer for round `round`.
    fn correction(work: &Path, round: u32) -> Vec<f32> {
        let bytes = std::fs::read(work.join(format!("round-{round}/correction.safetensors")))
            .expect("correction.safetensors");
        Model::from_safetensors(&bytes)
            .expect("a model file")
            .values()
            .to_vec()
    }

    #[test]
    fn scaffold_hands_the_trainer_its_correction_and_keeps_the_nodes_control_variate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = copying_script(
            dir.path(),
            r#"{"num_examples": 4, "metrics": {"steps": 2}}"#,
        );
        let work = dir.path().join("work");
        let trainer = sh_trainer(&script, &work);
        let round = |round, control: Vec<f32>| {
            let mut task = sample_task(round, ClientProcedure::Scaffold, vec![1.0, 2.0], None);
            task.server_control = Some(control);
            task
        };
        let first = trainer.train(&round(1, vec![0.5, -1.0])).expect("trains");
        // The node's c_i starts at zero, so the correction is the server's c; the model did
        // not move, so c_i changes by -c.
        assert_eq!(correction(&work, 1), [0.5, -1.0]);
        assert_eq!(first.control_delta, Some(vec![-0.5, 1.0]));
        // A restarted node (a new trainer on the same folder) keeps c_i = [-0.5, 1.0].
        let restarted = sh_trainer(&script, &work);
        restarted.train(&round(2, vec![1.0, 1.0])).expect("trains");
        assert_eq!(correction(&work, 2), [1.5, 0.0]);
        let written: ExecTask = serde_json::from_slice(
            &std::fs::read(work.join("round-2/task.json")).expect("task.json"),
        )
        .expect("task parses");
        assert_eq!(written.procedure, "scaffold");
        assert_eq!(
            written.correction_in,
            Some(work.join("round-2/correction.safetensors"))
        );
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
            personal: TensorRoles::default(),
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
        let personal = TensorRoles::new(vec!["bn".into()]).expect("valid");
        let mut task = sample_task(1, ClientProcedure::LocalSgd, vec![1.0, 2.0], None);
        task.model = with_scalar(&task.model, "bn", 10.0);
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

    /// A frozen tensor (`lora_a`) is named in `task.json`, never part of the update, and a
    /// trainer that changes it has its update refused, naming the tensor.
    #[test]
    fn a_frozen_tensor_travels_down_only_and_may_not_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = dir.path().join("train.py");
        // Adds one to every tensor but those task.json lists as frozen, unless told to touch
        // them too.
        std::fs::write(
            &script,
            "import json, sys\nfrom safetensors.numpy import load_file, save_file\n\
             t = json.load(open(sys.argv[-1]))\nm = load_file(t['model_in'])\n\
             keep = [] if 'touch' in sys.argv else t.get('frozen', [])\n\
             save_file({k: v if k in keep else v + 1 for k, v in m.items()}, t['model_out'])\n\
             json.dump({'num_examples': 2}, open(t['result_out'], 'w'))\n",
        )
        .expect("script");
        let roles = TensorRoles::default()
            .with_frozen(vec!["lora_*".into()])
            .expect("valid");
        let mut task = sample_task(1, ClientProcedure::LocalSgd, vec![1.0, 2.0], None);
        task.model = with_scalar(&task.model, "lora_a", 0.5);
        task.personal = roles;
        let trainer = |args: &str, work: &str| {
            ExecTrainer::new(
                &format!("{} {} {args}", python3(), script.display()),
                None,
                dir.path().join(work),
            )
            .expect("trainer")
        };
        let update = trainer("", "kept").train(&task).expect("trains");
        assert_eq!(update.delta, [1.0, 1.0], "only the trainable tensors");
        let task_json: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.path().join("kept/round-1/task.json")).expect("task.json"),
        )
        .expect("json");
        assert_eq!(task_json["frozen"], serde_json::json!(["lora_a"]));
        let refused = trainer("touch", "touched")
            .train(&task)
            .expect_err("a changed frozen tensor is refused");
        assert!(refused.contains("frozen tensor 'lora_a'"), "{refused}");
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
        // SCAFFOLD's control change needs the number of steps taken.
        let script = copying_script(dir.path(), r#"{"num_examples": 4}"#);
        let err = sh_trainer(&script, &dir.path().join("w"))
            .train(&task(ClientProcedure::Scaffold))
            .expect_err("scaffold");
        assert!(err.contains("SCAFFOLD needs metrics.steps"), "{err}");
        assert!(ExecTrainer::new("  ", None, dir.path().into()).is_err());
    }
}
