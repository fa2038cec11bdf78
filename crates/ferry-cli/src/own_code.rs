//! `ferry simulate --trainer-cmd CMD --node-data 'DIR/*'`: the user's own training program as
//! every virtual node's trainer, each node holding one data folder, run by the same round
//! engine as every simulation (and through the same node-side code as `ferry client`), so a
//! team can try its code on one machine before deploying it.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context, Result, bail};
use clap::Args;
use ferry_client::{
    agent::{EvalTask, TrainTask, Trainer},
    exec::{
        ExecTrainer,
        long_lived::LongLivedTrainer,
        pool::{PooledTrainer, WorkerPool},
    },
};
use ferry_core::{
    Model, Update,
    cross_site::CrossSiteModels,
    evaluation::NodeEvaluation,
    personal::TensorRoles,
    privacy::{
        node::privatize,
        noise::{NoiseSeed, NoiseSource},
    },
};
use ferry_engine::{
    cross_site::{SiteModels, fine_tune_and_score},
    federation::{Federation, RoundObserver, RunOutcome},
    node::{EvaluateTask, Evaluator, NodeError, NodeHandle, NodeId, RoundTask, Score, WireEncoder},
};
use ferry_sim::SimConfig;

use crate::{client::TrainerMode, progress::progress_bar, starting_point::StartingPoint};

/// Examples a node's FedAvg weight reflects at most under secure aggregation: Ferry does not
/// know the sizes of the user's data folders, as a server does not know its nodes'.
const WEIGHT_CAP: u64 = 10_000;

/// The options that make `ferry simulate` run the user's own code.
#[derive(Args, Debug, Default)]
pub struct OwnCodeArgs {
    /// Train every virtual node with this command (see docs/exec-trainer.md) instead of the
    /// built-in networks; needs --node-data.
    #[arg(long, value_name = "COMMAND", help_heading = "Your own code")]
    pub trainer_cmd: Option<String>,
    /// One virtual node per folder matching this pattern (`DIR/*`, or `DIR/site-*`); each
    /// folder is that node's `data_dir`.
    #[arg(long, value_name = "PATTERN", help_heading = "Your own code")]
    pub node_data: Option<String>,
    /// How --trainer-cmd runs: once per round and node, or long-lived processes that take
    /// every task as a JSON line.
    #[arg(long, value_enum, help_heading = "Your own code")]
    pub trainer_mode: Option<TrainerMode>,
    /// Long-lived mode: how many processes serve the virtual nodes' tasks, any node in any
    /// process (results never depend on it), or `per-node` for one process per node for the
    /// run (each holds its framework: memory grows with the nodes) [default: the number of
    /// cores].
    #[arg(long, value_name = "N|per-node", help_heading = "Your own code")]
    pub trainer_workers: Option<Workers>,
}

/// How many long-lived processes serve a simulation's virtual nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workers {
    /// A pool of this many processes, each serving any node's task.
    Pool(usize),
    /// One process per node, for the run.
    PerNode,
}

impl std::str::FromStr for Workers {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "per-node" => Ok(Self::PerNode),
            n => match n.parse::<usize>() {
                Ok(n) if n >= 1 => Ok(Self::Pool(n)),
                _ => Err(format!(
                    "give a number of processes (1 or more) or 'per-node', not '{n}'"
                )),
            },
        }
    }
}

/// How the user's program serves a simulation's tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serving {
    /// A process per task.
    PerRound,
    /// Long-lived processes, as many as `Workers` says.
    LongLived(Workers),
}

impl std::fmt::Display for Serving {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::PerRound => f.write_str("a process per task"),
            Self::LongLived(Workers::PerNode) => f.write_str("a long-lived process per node"),
            Self::LongLived(Workers::Pool(n)) => {
                write!(f, "{n} long-lived process(es) serving every node")
            }
        }
    }
}

impl OwnCodeArgs {
    /// The command and the node folders when the run uses the user's code, `None` when it
    /// does not; refuses half a configuration.
    pub fn wanted(&self) -> Result<Option<(&str, Vec<PathBuf>)>> {
        match (&self.trainer_cmd, &self.node_data) {
            (Some(command), Some(pattern)) => Ok(Some((command, node_folders(pattern)?))),
            (None, None) if self.trainer_mode.is_none() && self.trainer_workers.is_none() => {
                Ok(None)
            }
            (Some(_), None) => bail!(
                "--trainer-cmd needs --node-data 'DIR/*': one folder of data per virtual node"
            ),
            _ => bail!(
                "--node-data, --trainer-mode and --trainer-workers need --trainer-cmd, the \
                 program to run"
            ),
        }
    }

    /// How the program serves tasks: per round unless long-lived, where a pool of as many
    /// processes as cores serves every node unless --trainer-workers says otherwise.
    pub fn serving(&self) -> Result<Serving> {
        match (
            self.trainer_mode.unwrap_or(TrainerMode::PerRound),
            self.trainer_workers,
        ) {
            (TrainerMode::PerRound, None) => Ok(Serving::PerRound),
            (TrainerMode::PerRound, Some(_)) => bail!(
                "--trainer-workers sets how many long-lived processes serve the nodes: add \
                 --trainer-mode long-lived"
            ),
            (TrainerMode::LongLived, workers) => {
                Ok(Serving::LongLived(workers.unwrap_or_else(|| {
                    Workers::Pool(std::thread::available_parallelism().map_or(1, usize::from))
                })))
            }
        }
    }
}

/// The folders matching `pattern`: `*` in its last component matches any run of characters;
/// only folders count, in name order.
pub fn node_folders(pattern: &str) -> Result<Vec<PathBuf>> {
    let pattern = Path::new(pattern);
    let parent = pattern
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let last = pattern
        .file_name()
        .and_then(|n| n.to_str())
        .context("--node-data needs a folder pattern such as 'data/*'")?;
    let (prefix, suffix) = last.split_once('*').unwrap_or((last, ""));
    let exact = !last.contains('*');
    let mut folders: Vec<PathBuf> = std::fs::read_dir(parent)
        .with_context(|| format!("--node-data: cannot list {}", parent.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.is_dir())
        .filter(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|name| {
                    if exact {
                        name == last
                    } else {
                        name.len() >= prefix.len() + suffix.len()
                            && name.starts_with(prefix)
                            && name.ends_with(suffix)
                    }
                })
        })
        .collect();
    folders.sort();
    if folders.is_empty() {
        bail!(
            "--node-data '{}' matches no folder; give one folder per node, for example \
             'data/*' with data/site-0, data/site-1, ...",
            pattern.display()
        );
    }
    Ok(folders)
}

/// The node folders for the run's first line: all of them when few, else the first three,
/// the last and how many between.
fn folder_list(folders: &[PathBuf]) -> String {
    let shown = |f: &PathBuf| f.display().to_string();
    match folders {
        [first @ .., last] if folders.len() > 5 => format!(
            "{}, ... ({} more), {}",
            first[..3].iter().map(shown).collect::<Vec<_>>().join(", "),
            folders.len() - 4,
            shown(last)
        ),
        _ => folders.iter().map(shown).collect::<Vec<_>>().join(", "),
    }
}

/// A virtual node whose training is the user's program on its own data folder.
struct ProgramNode {
    id: NodeId,
    trainer: Box<dyn Trainer>,
    /// The run's personal tensors, which the node keeps as its own.
    personal: TensorRoles,
    /// How its updates are encoded, with top-k's error feedback.
    wire: WireEncoder,
}

impl NodeHandle for ProgramNode {
    fn id(&self) -> NodeId {
        self.id
    }

    fn train(&self, task: &RoundTask) -> Result<Update, NodeError> {
        let fail = |reason: String| NodeError {
            node: self.id,
            reason,
        };
        let train_task = TrainTask {
            round: task.round,
            model: (*task.model).clone(),
            training: task.training.clone(),
            procedure: task.procedure,
            server_control: task.server_control.as_deref().cloned(),
            seed: ferry_core::seed::mix_seed(task.seed, u64::from(self.id)),
            deadline: None,
            personal: self.personal.clone(),
        };
        let mut update = self.trainer.train(&train_task).map_err(fail)?;
        if let Some(instructions) = &task.privacy {
            // As a deployed node does after any trainer, with noise from the run seed so the
            // simulation repeats.
            let mut noise = NoiseSource::new(NoiseSeed::Run(task.seed), u64::from(self.id));
            privatize(&mut update, instructions, task.model.layout(), &mut noise);
        }
        let seed = ferry_core::seed::mix_seed(task.seed, u64::from(self.id));
        self.wire.encode(self.id, task, &mut update, seed)?;
        Ok(update)
    }

    fn evaluate(&self, task: &EvaluateTask) -> Result<NodeEvaluation, NodeError> {
        let eval_task = EvalTask {
            round: task.round,
            model: (*task.model).clone(),
            seed: ferry_core::seed::mix_seed(task.seed, u64::from(self.id)),
            deadline: None,
            personal: self.personal.clone(),
        };
        self.trainer
            .evaluate(&eval_task)
            .map_err(|reason| NodeError {
                node: self.id,
                reason,
            })
    }
}

/// Scores nothing: a model of the user's own has no central test set.
struct Unevaluated;

impl Evaluator for Unevaluated {
    fn evaluate(&self, _model: &Model) -> Result<Score, String> {
        Ok(Score::unevaluated())
    }
}

/// Runs `config`'s federation with `command` as the trainer of one node per data folder in
/// `folders`, served as `serving` says; round folders go under `out/nodes/`. With `--cross-site local`, the
/// same nodes then fine-tune the final model and score each other's (the sites' models).
pub fn run(
    command: &str,
    serving: Serving,
    folders: &[PathBuf],
    config: &SimConfig,
    out: &Path,
    observer: &mut dyn RoundObserver,
) -> Result<(RunOutcome, Option<SiteModels>)> {
    let start = StartingPoint::of(config)?;
    let evaluation = config.evaluation(start.evaluator.is_some());
    let personal = config.personal_tensors()?;
    let evaluator = start.evaluator.unwrap_or_else(|| Box::new(Unevaluated));
    let pool = match serving {
        Serving::LongLived(Workers::Pool(n)) => {
            Some(WorkerPool::new(command, n).map_err(anyhow::Error::msg)?)
        }
        _ => None,
    };
    let nodes = folders
        .iter()
        .enumerate()
        .map(|(i, folder)| {
            let work = out.join("nodes").join(format!("node-{i}"));
            let data = Some(folder.clone());
            let trainer: Box<dyn Trainer> = match (&pool, serving) {
                (Some(pool), _) => Box::new(PooledTrainer::new(pool.clone(), data, work)),
                (None, Serving::PerRound) => Box::new(ExecTrainer::new(command, data, work)?),
                (None, Serving::LongLived(_)) => {
                    Box::new(LongLivedTrainer::new(command, data, work)?)
                }
            };
            Ok(Arc::new(ProgramNode {
                id: i as NodeId,
                trainer,
                personal: personal.clone(),
                wire: WireEncoder::default(),
            }) as Arc<dyn NodeHandle>)
        })
        .collect::<Result<Vec<_>, String>>()
        .map_err(anyhow::Error::msg)?;
    println!(
        "{} nodes, each training with `{command}` on its folder ({serving}): {}",
        nodes.len(),
        folder_list(folders)
    );
    let strategy = config.strategy(nodes.len(), NoiseSeed::Run(config.seed))?;
    let secure = config.secure(&strategy, WEIGHT_CAP)?;
    let settings = config.run_settings(secure, evaluation)?;
    let federation = Federation::new(settings, strategy, nodes.clone(), evaluator, start.model)?;
    let outcome = federation.run(observer)?;
    if config.cross_site != Some(CrossSiteModels::Local) {
        return Ok((outcome, None));
    }
    println!(
        "cross-site validation: every node fine-tunes the final model with your trainer, then \
         scores every site's model"
    );
    let bar = progress_bar(
        2 * nodes.len() as u64,
        "cross-site [{bar:30}] {pos}/{len} steps  {elapsed}",
    );
    let after_last = outcome.rounds.last().map_or(1, |r| r.round + 1);
    let site_models = fine_tune_and_score(
        &nodes,
        &Arc::new(outcome.model.clone()),
        &config.training,
        after_last,
        config.seed,
        config.threads,
        || bar.inc(1),
    );
    bar.finish_and_clear();
    Ok((outcome, Some(site_models)))
}
