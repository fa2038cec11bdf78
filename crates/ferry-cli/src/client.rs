//! `ferry client`: a node. It holds its data (a share of a public dataset for demos and tests,
//! or the site's own files), dials the server, and trains with the built-in burn models.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use clap::Args;
use ferry_client::{
    agent::{self, AgentEvent, AgentSettings, EvalTask, TrainTask, Trainer},
    connection::ServerAddress,
    exec::{ExecTrainer, long_lived::LongLivedTrainer},
};
use ferry_core::{Update, evaluation::NodeEvaluation};
use ferry_ml::{
    client::{ClientTask, train_update},
    data::{Dataset, DatasetKind},
    models::ModelKind,
    params,
    train::{self, LocalData},
};

use crate::node_share::NodeShare;

/// Options of `ferry client`.
#[derive(Args, Debug)]
pub struct ClientArgs {
    /// The server, https://HOST:PORT (http://127.0.0.1:PORT for an --insecure server); with
    /// standby servers, every address, comma-separated (the node follows the active one).
    #[arg(long)]
    pub server: String,
    /// CA certificate that signed the server's certificate.
    #[arg(long, value_name = "CA.pem")]
    pub ca: Option<PathBuf>,
    /// This node's certificate, for servers that require mutual TLS.
    #[arg(long, value_name = "CERT.pem", requires = "key")]
    pub cert: Option<PathBuf>,
    /// This node's private key, for mutual TLS.
    #[arg(long, value_name = "KEY.pem", requires = "cert")]
    pub key: Option<PathBuf>,
    /// One-time enrolment token from `ferry token create` (only needed the first time).
    #[arg(long, env = "FERRY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Folder where the node keeps its credential and strategy state.
    #[arg(long, value_name = "DIR", default_value = "ferry-node")]
    pub state_dir: PathBuf,
    /// Dataset: fashion-mnist, mnist-subset or csv (train.csv in --data-dir).
    #[arg(long, default_value = "fashion-mnist")]
    pub dataset: String,
    /// Folder holding the site's dataset files (searched before $FERRY_DATA and
    /// /usr/share/datasets).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Model the server trains: lenet, cnn, mlp or logreg.
    #[arg(long, default_value = "lenet")]
    pub model: String,
    /// The node's share of the dataset.
    #[command(flatten)]
    pub share: NodeShare,
    /// Train with this command instead of the built-in models, for example "python3 train.py"
    /// (see docs/exec-trainer.md); it gets the round's task.json path as its last argument.
    #[arg(long, value_name = "COMMAND")]
    pub trainer_cmd: Option<String>,
    /// How --trainer-cmd runs: once per round, or started once and handed every round's task
    /// as a JSON line on its stdin (no start-up cost per round).
    #[arg(long, value_enum, default_value_t = TrainerMode::PerRound)]
    pub trainer_mode: TrainerMode,
    /// Seconds to keep retrying while the server is unreachable.
    #[arg(long, default_value_t = 300.0)]
    pub give_up_after: f64,
    /// Let this site's own model (the final model fine-tuned here) leave the site, so that a
    /// run with cross-site = "local" has every site score it (see docs/cross-site.md).
    #[arg(long)]
    pub share_local_model: bool,
}

/// How the external-command trainer's program runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TrainerMode {
    /// A new process each round, with the task file's path as its last argument.
    PerRound,
    /// One process for the whole run, taking tasks as JSON lines.
    LongLived,
}

/// Local training with the built-in burn models on the node's own examples, and federated
/// evaluation on its share of the dataset's test split.
struct BuiltinTrainer {
    model: ModelKind,
    data: Dataset,
    indices: Vec<usize>,
    noise_std: f32,
    /// The node's held-out examples: its share of the test split, split like the training
    /// data (empty when the dataset has no test split).
    held_out: Dataset,
    held_out_indices: Vec<usize>,
    /// SCAFFOLD's `c_i`, kept across rounds and saved in the state folder.
    control: Mutex<Vec<f32>>,
    control_file: PathBuf,
}

impl BuiltinTrainer {
    /// Refuses a server model that is not this node's `--model` network.
    fn check_fits(&self, model: &ferry_core::Model) -> Result<(), String> {
        params::layout(self.model)
            .map_err(|e| e.to_string())
            .and_then(|layout| model.check_same_layout(&layout).map_err(|e| e.to_string()))
            .map_err(|e| {
                format!(
                    "the server's model does not fit --model {}: {e}",
                    self.model
                )
            })
    }
}

impl Trainer for BuiltinTrainer {
    fn train(&self, task: &TrainTask) -> Result<Update, String> {
        self.check_fits(&task.model)?;
        let mut control = self.control.lock().unwrap_or_else(|p| p.into_inner());
        let data = LocalData {
            dataset: &self.data,
            indices: &self.indices,
            noise_std: self.noise_std,
        };
        let client_task = ClientTask {
            model: &task.model,
            training: &task.training,
            procedure: task.procedure,
            server_control: task.server_control.as_deref(),
            seed: task.seed,
        };
        let update =
            train_update(self.model, data, client_task, &mut control).map_err(|e| e.to_string())?;
        if !control.is_empty() {
            ferry_client::control::save(&self.control_file, &control)?;
        }
        Ok(update)
    }

    fn evaluate(&self, task: &EvalTask) -> Result<NodeEvaluation, String> {
        self.check_fits(&task.model)?;
        if self.held_out_indices.is_empty() {
            return Err(
                "this node has no held-out examples: its dataset has no test split (for csv, \
                 add test.csv to --data-dir)"
                    .into(),
            );
        }
        train::evaluate_examples(
            self.model,
            &task.model,
            &self.held_out,
            &self.held_out_indices,
            &[self.noise_std],
            task.seed,
        )
        .map(|e| e.to_node_evaluation())
        .map_err(|e| e.to_string())
    }
}

fn builtin_trainer(args: &ClientArgs) -> Result<BuiltinTrainer> {
    let kind: DatasetKind = args.dataset.parse()?;
    let model: ModelKind = args.model.parse()?;
    let splits = kind.load(args.data_dir.as_deref())?;
    let (data, held_out) = (splits.train, splits.test);
    let (indices, noise_std) = args.share.indices(&data.labels)?;
    let held_out_indices = if held_out.is_empty() {
        Vec::new()
    } else {
        args.share.indices(&held_out.labels)?.0
    };
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("cannot create {}", args.state_dir.display()))?;
    let control_file = args.state_dir.join(ferry_client::control::CONTROL_FILE);
    Ok(BuiltinTrainer {
        model,
        data,
        indices,
        noise_std,
        held_out,
        held_out_indices,
        control: Mutex::new(
            ferry_client::control::load(&control_file).map_err(anyhow::Error::msg)?,
        ),
        control_file,
    })
}

fn read_file(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read the {what} {}", path.display()))
}

/// Runs `ferry client`.
pub fn run(args: ClientArgs) -> Result<()> {
    let trainer: Arc<dyn Trainer> = match &args.trainer_cmd {
        Some(command) => {
            println!(
                "ferry client: training with `{command}`, server {}",
                args.server
            );
            let work_dir = args.state_dir.join("exec");
            let data_dir = args.data_dir.clone();
            match args.trainer_mode {
                TrainerMode::PerRound => Arc::new(
                    ExecTrainer::new(command, data_dir, work_dir).map_err(anyhow::Error::msg)?,
                ),
                TrainerMode::LongLived => Arc::new(
                    LongLivedTrainer::new(command, data_dir, work_dir)
                        .map_err(anyhow::Error::msg)?,
                ),
            }
        }
        None => {
            let trainer = builtin_trainer(&args)?;
            println!(
                "ferry client: {} examples of {} for {}, server {}",
                trainer.indices.len(),
                args.dataset,
                args.model,
                args.server
            );
            Arc::new(trainer)
        }
    };
    let settings = AgentSettings {
        server: ServerAddress {
            url: args.server.clone(),
            ca_pem: args
                .ca
                .as_deref()
                .map(|p| read_file(p, "CA certificate"))
                .transpose()?,
            identity: match (&args.cert, &args.key) {
                (Some(cert), Some(key)) => Some((
                    read_file(cert, "node certificate")?,
                    read_file(key, "node key")?,
                )),
                _ => None,
            },
        },
        token: args.token.clone(),
        state_dir: args.state_dir.clone(),
        seed_stream: args.share.partition_index.unwrap_or(0) as u64,
        max_backoff: Duration::from_secs(10),
        give_up_after: Duration::from_secs_f64(args.give_up_after),
        share_local_model: args.share_local_model,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let reason = runtime.block_on(agent::run(settings, trainer, |event| match event {
        AgentEvent::Ready { node_id, name } => {
            println!("enrolled as node {node_id} ('{name}')")
        }
        AgentEvent::Assigned(round) => {
            println!("round {round}: task received, downloading the model")
        }
        AgentEvent::Training(round) => println!("round {round}: training"),
        AgentEvent::Evaluating(round) => println!("round {round}: evaluating the new model"),
        AgentEvent::Tuning => println!(
            "the rounds are done: fine-tuning the final model into this site's own, for the \
             cross-site matrix (--share-local-model)"
        ),
        AgentEvent::Evaluated {
            round,
            site_model: None,
            accuracy,
        } => println!("round {round}: evaluated, accuracy {accuracy:.4} on held-out data"),
        AgentEvent::Evaluated {
            site_model: Some(site),
            accuracy,
            ..
        } => {
            println!("cross-site: site {site}'s own model scores {accuracy:.4} on this site's data")
        }
        AgentEvent::Delivered { round, duplicate } => println!(
            "round {round}: update delivered{}",
            if duplicate { " (already counted)" } else { "" }
        ),
        AgentEvent::Abandoned { round, reason } => {
            println!("round {round}: skipped ({reason})")
        }
        AgentEvent::Retrying(message) => eprintln!("server unreachable: {message}"),
    }))?;
    println!("run finished: {reason}");
    Ok(())
}
