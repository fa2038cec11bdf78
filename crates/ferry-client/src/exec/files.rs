//! The files a node and its trainer command exchange: each task's folder with the global
//! model and `task.json`, the trainer's checkpoint folder, the node's personal tensors and
//! SCAFFOLD control variate kept between rounds, and the trained model and `result.json` read
//! back into an update.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use ferry_core::{
    Model, Update, algebra,
    evaluation::NodeEvaluation,
    personal::{self, TensorRoles},
    scaffold,
    strategy::{ClientProcedure, fednova_normalizer},
};
use serde::{Deserialize, Serialize};

use crate::agent::{EvalTask, TrainTask};

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
    fn with_own_tensors(&self, model: &Model, personal: &TensorRoles) -> Result<Model, String> {
        let file = self.own_tensors_file();
        if !personal.has_personal() || !file.exists() {
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
    fn model_bytes(&self, model: &Model, personal: &TensorRoles) -> Result<Vec<u8>, String> {
        self.with_own_tensors(model, personal)?
            .to_safetensors()
            .map_err(|e| e.to_string())
    }

    /// Keeps the personal tensors of `trained` for the node's next rounds.
    fn keep_own_tensors(&self, trained: &Model, personal: &TensorRoles) -> Result<(), String> {
        if !personal.has_personal() {
            return Ok(());
        }
        let own: Vec<_> = trained
            .carried()
            .iter()
            .filter(|t| personal.is_personal(&t.name))
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

    /// Where the node keeps its SCAFFOLD control variate between rounds.
    fn control_file(&self) -> PathBuf {
        self.work_dir.join(crate::control::CONTROL_FILE)
    }

    /// The node's control variate for `model`: zero until set, and when the model's size
    /// changed.
    fn own_control(&self, model: &Model) -> Result<Vec<f32>, String> {
        let mut own = crate::control::load(&self.control_file())?;
        scaffold::fit(&mut own, model.num_params());
        Ok(own)
    }

    /// Writes SCAFFOLD's correction `c - c_i` for `task` to `dir` as a file of the model's
    /// tensors; returns its path.
    fn write_correction(&self, task: &TrainTask, dir: &Path) -> Result<PathBuf, String> {
        let own = self.own_control(&task.model)?;
        let correction = scaffold::correction(task.server_control.as_deref(), &own);
        let bytes = Model::new(task.model.layout().clone(), correction)
            .and_then(|m| m.to_safetensors())
            .map_err(|e| e.to_string())?;
        let path = dir.join("correction.safetensors");
        std::fs::write(&path, bytes)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        Ok(path)
    }

    /// SCAFFOLD's change of the node's control variate after training moved the model by
    /// `delta` in `steps` steps; the node's variate takes it and is kept.
    fn keep_control_change(
        &self,
        task: &TrainTask,
        delta: &[f32],
        steps: u64,
    ) -> Result<Vec<f32>, String> {
        let change = scaffold::control_change(
            delta,
            steps,
            task.training.lr,
            task.server_control.as_deref(),
        );
        let mut own = self.own_control(&task.model)?;
        algebra::add_scaled(&mut own, &change, 1.0);
        crate::control::save(&self.control_file(), &own)?;
        Ok(change)
    }

    /// Writes the round's global model and `task.json` to a fresh folder; returns the task
    /// and the path of `task.json`.
    pub(super) fn prepare(&self, task: &TrainTask) -> Result<(ExecTask, PathBuf), String> {
        let (procedure, mu) = procedure_name(task.procedure);
        let global = self.model_bytes(&task.model, &task.personal)?;
        let checkpoint_dir = self.checkpoint_dir(task, &global)?;
        let dir = self.fresh_dir(&format!("round-{}", task.round))?;
        let correction_in = match task.procedure {
            ClientProcedure::Scaffold => Some(self.write_correction(task, &dir)?),
            _ => None,
        };
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
            correction_in,
            frozen: task
                .model
                .carried()
                .iter()
                .filter(|t| task.personal.is_frozen(&t.name))
                .map(|t| t.name.clone())
                .collect(),
        };
        let task_path = Self::write_task(&dir, &global, &exec_task.model_in, &exec_task)?;
        Ok((exec_task, task_path))
    }

    /// Writes the global model to score and an evaluation `task.json` to a fresh folder;
    /// returns the task and the path of `task.json`.
    pub(super) fn prepare_evaluation(
        &self,
        task: &EvalTask,
    ) -> Result<(ExecEvaluation, PathBuf), String> {
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
    pub(super) fn collect_evaluation(exec_task: &ExecEvaluation) -> Result<NodeEvaluation, String> {
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
    pub(super) fn collect(&self, task: &TrainTask, exec_task: &ExecTask) -> Result<Update, String> {
        let trained = Model::from_safetensors_with(
            &read(&exec_task.model_out, "trained model")?,
            &task.personal,
        )
        .map_err(|e| format!("the trained model is not valid safetensors: {e}"))?;
        task.model
            .check_same_layout(trained.layout())
            .map_err(|e| format!("the trained model does not match the global model: {e}"))?;
        task.personal
            .check_frozen_kept(&task.model, &trained)
            .map_err(|e| e.to_string())?;
        self.keep_own_tensors(&trained, &task.personal)?;
        let result: ExecResult = serde_json::from_slice(&read(&exec_task.result_out, "result")?)
            .map_err(|e| {
                format!("result.json must be {{\"num_examples\": N, \"metrics\": {{...}}}}: {e}")
            })?;
        let mut delta = vec![0.0; task.model.num_params()];
        algebra::delta_into(&mut delta, trained.values(), task.model.values());
        let mut update = Update::new(delta, result.num_examples);
        let steps = |strategy: &str| {
            result
                .metrics
                .get("steps")
                .map(|s| *s as u64)
                .ok_or(format!(
                    "{strategy} needs metrics.steps (local SGD steps taken) in result.json"
                ))
        };
        match task.procedure {
            ClientProcedure::Normalized => {
                update.normalizer = Some(fednova_normalizer(
                    steps("FedNova")?,
                    task.training.momentum,
                ));
            }
            ClientProcedure::Scaffold => {
                let change = self.keep_control_change(task, &update.delta, steps("SCAFFOLD")?)?;
                update.control_delta = Some(change);
            }
            ClientProcedure::LossReporting => {
                ferry_core::qfedavg::loss_before(&result.metrics).map_err(|_| {
                    "q-FedAvg needs metrics.loss_before in result.json: the loss of the received \
                     model on the node's training data, measured before training"
                        .to_string()
                })?;
            }
            ClientProcedure::LocalSgd | ClientProcedure::Proximal { .. } => {}
        }
        update.metrics = result.metrics;
        Ok(update)
    }
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
    /// `local_sgd`, `proximal` (add `(mu/2)·‖w − w_global‖²`), `normalized` (report `steps`),
    /// `loss_reporting` (report `loss_before`, the received model's loss on the training data
    /// before training) or `scaffold` (add `correction_in` to every gradient, report `steps`).
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
    /// SCAFFOLD only: a file of the model's tensors holding the correction `c - c_i` to add
    /// to every local gradient (the server's control variate less the node's, which Ferry
    /// keeps); the trainer also reports `metrics.steps`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correction_in: Option<PathBuf>,
    /// The model's frozen tensors, by name: in `model_in`, to be left untrained (out of the
    /// optimizer) and written back unchanged; a trained model that changed one is refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub frozen: Vec<String>,
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

fn procedure_name(procedure: ClientProcedure) -> (&'static str, f64) {
    match procedure {
        ClientProcedure::LocalSgd => ("local_sgd", 0.0),
        ClientProcedure::Proximal { mu } => ("proximal", mu),
        ClientProcedure::Normalized => ("normalized", 0.0),
        ClientProcedure::LossReporting => ("loss_reporting", 0.0),
        ClientProcedure::Scaffold => ("scaffold", 0.0),
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
