//! `ferry simulate` options: flags, an optional TOML file with the same keys, defaults, and
//! validation into a [`SimConfig`].

use std::path::{Path, PathBuf};

mod fleet;
mod safety;
mod strategy;

use anyhow::{Context, Result, bail};
use clap::Args;
use ferry_core::{evaluation::EvaluationSchedule, privacy::noise::NoiseSeed, task::LocalTraining};
use ferry_sim::SimConfig;
use serde::Deserialize;

/// Options of `ferry simulate`. Every one may also be set in the `--config` file under the
/// same name (for example `local-epochs = 2`, or `local_epochs = 2`); flags override the file.
/// The `[run]` section of a server configuration uses the same keys.
#[derive(Args, Debug, Clone, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SimulateArgs {
    /// TOML file with the same keys as these flags.
    #[arg(long, value_name = "FILE.toml")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Dataset: fashion-mnist, mnist-subset or csv (train.csv and test.csv in --data-dir)
    /// [default: fashion-mnist].
    #[arg(long)]
    pub dataset: Option<String>,
    /// Folder holding the dataset files (searched before $FERRY_DATA and /usr/share/datasets).
    #[arg(long, value_name = "DIR")]
    #[serde(alias = "data_dir")]
    pub data_dir: Option<PathBuf>,
    /// Model: lenet, cnn, mlp or logreg [default: lenet].
    #[arg(long)]
    pub model: Option<String>,
    /// Start from this safetensors model file instead of a freshly initialised network (in
    /// `ferry simulate`, a file of the --model network; in a server's [run], any model).
    #[arg(long, value_name = "FILE.safetensors")]
    #[serde(alias = "initial_model")]
    pub initial_model: Option<PathBuf>,
    /// Number of virtual nodes [default: 10].
    #[arg(long)]
    pub clients: Option<usize>,
    /// Fraction of nodes selected each round, in (0, 1] [default: 1.0].
    #[arg(long)]
    pub fraction: Option<f64>,
    /// Fewest nodes selected per round [default: 1].
    #[arg(long)]
    #[serde(alias = "min_clients")]
    pub min_clients: Option<usize>,
    /// Rounds to run [default: 10].
    #[arg(long)]
    pub rounds: Option<u32>,
    /// Local epochs per round [default: 1].
    #[arg(long)]
    #[serde(alias = "local_epochs")]
    pub local_epochs: Option<u32>,
    /// Local batch size [default: 64].
    #[arg(long)]
    #[serde(alias = "batch_size")]
    pub batch_size: Option<usize>,
    /// Local SGD learning rate [default: 0.01].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Local SGD momentum [default: 0.9].
    #[arg(long)]
    pub momentum: Option<f64>,
    /// Local L2 weight decay [default: 1e-5].
    #[arg(long)]
    #[serde(alias = "weight_decay")]
    pub weight_decay: Option<f64>,
    /// Partition: iid, dirichlet:B, labels:C, classes:A+B/C+D/..., quantity:B or noise:S [default: iid].
    #[arg(long)]
    pub partition: Option<String>,
    /// Strategy: fedavg, fedavgm, fedprox, scaffold, fednova, fedadagrad, fedadam, fedyogi or
    /// qfedavg [default: fedavg].
    #[arg(long)]
    pub strategy: Option<String>,
    /// Server learning rate [default: 1 for fedavg/fedavgm, 0.01 for the adaptive ones].
    #[arg(long)]
    #[serde(alias = "server_lr")]
    pub server_lr: Option<f64>,
    /// FedProx proximal weight mu [default: 0.01].
    #[arg(long)]
    pub mu: Option<f64>,
    /// FedAvgM server momentum [default: 0.9].
    #[arg(long)]
    #[serde(alias = "server_momentum")]
    pub server_momentum: Option<f64>,
    /// FedAdam/FedYogi/FedAdagrad first-moment decay [default: 0.9].
    #[arg(long)]
    pub beta1: Option<f64>,
    /// FedAdam/FedYogi second-moment decay [default: 0.99].
    #[arg(long)]
    pub beta2: Option<f64>,
    /// FedAdam/FedYogi/FedAdagrad adaptivity floor [default: 1e-3].
    #[arg(long)]
    pub tau: Option<f64>,
    /// q-FedAvg fairness exponent q >= 0: the higher, the more weight on the nodes the model
    /// serves worst; 0 is the uniform mean [default: 1].
    #[arg(long)]
    pub q: Option<f64>,
    /// q-FedAvg step size 1/L, where L estimates the loss's Lipschitz constant: the larger,
    /// the longer each server step [default: 1].
    #[arg(long)]
    #[serde(alias = "q_lr")]
    pub q_lr: Option<f64>,
    /// Seed for everything random [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop once test accuracy reaches this fraction, in (0, 1] (federated evaluation's
    /// accuracy when the run has no central test set).
    #[arg(long)]
    #[serde(alias = "target_accuracy")]
    pub target_accuracy: Option<f64>,
    /// Personalisation: tensors of your own model (--initial-model, --trainer-cmd) that stay
    /// on each node and are never averaged or uploaded, by name patterns where `*` matches
    /// anything (FedBN: the BatchNorm tensors, for example 'bn*,features.1.*').
    #[arg(long, value_name = "PATTERNS", value_delimiter = ',')]
    pub personal: Option<Vec<String>>,
    /// Frozen tensors of your own model: sent to nodes with the model, never trained,
    /// uploaded or averaged, by name patterns (FFA-LoRA's shared A and a pinned base, for
    /// example '*.lora_A,base.*'); a trainer that changes one has its update refused.
    #[arg(long, value_name = "PATTERNS", value_delimiter = ',')]
    pub frozen: Option<Vec<String>>,
    /// Federated evaluation: nodes score the global model on their own held-out data after
    /// every N rounds and after the last; 0 turns it off [default: 1 for a run without a
    /// central test set, 0 otherwise].
    #[arg(long, value_name = "N", help_heading = "Federated evaluation")]
    #[serde(alias = "evaluate_every")]
    pub evaluate_every: Option<u32>,
    /// Federated evaluation: share of the nodes asked each time, in (0, 1] [default: 1].
    #[arg(long, help_heading = "Federated evaluation")]
    #[serde(alias = "evaluate_fraction")]
    pub evaluate_fraction: Option<f64>,
    /// Cross-site validation matrix at the end of the run: `global` scores the global model
    /// on every site's held-out data; `local` also fine-tunes a copy on each site's own data
    /// and scores every site's copy on every site (the copies leave the sites, so runs with
    /// SecAgg+ or DP refuse it) [default: off].
    #[arg(
        long,
        value_name = "global|local",
        help_heading = "Federated evaluation"
    )]
    #[serde(alias = "cross_site")]
    pub cross_site: Option<String>,
    /// Federated evaluation with built-in virtual nodes: share of each node's examples held
    /// out of training to evaluate on, in (0, 1) [default: 0.1].
    #[arg(long, help_heading = "Federated evaluation")]
    #[serde(alias = "evaluate_holdout")]
    pub evaluate_holdout: Option<f64>,
    /// Output folder [default: runs/<timestamp>].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Also train centrally and on each node alone, and compare.
    #[arg(long)]
    #[serde(default)]
    pub baselines: bool,
    /// Nodes trained at once; results do not depend on it [default: all cores].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Differential privacy: noise multiplier z (noise std = z * clip norm). Setting it makes
    /// the run private: nodes are Poisson-sampled with rate --fraction, updates are clipped,
    /// and epsilon is reported each round.
    #[arg(long, help_heading = "Differential privacy")]
    #[serde(alias = "dp_noise_multiplier")]
    pub dp_noise_multiplier: Option<f64>,
    /// L2 clip norm S of each update (with --dp-adaptive-clip: the first round's norm
    /// [default: 0.1]).
    #[arg(long, help_heading = "Differential privacy")]
    #[serde(alias = "dp_clip")]
    pub dp_clip: Option<f64>,
    /// Adapt the clip norm each round to a quantile of the update norms (Andrew et al., 2021).
    #[arg(long, help_heading = "Differential privacy")]
    #[serde(default, alias = "dp_adaptive_clip")]
    pub dp_adaptive_clip: bool,
    /// Adaptive clipping: fraction of updates that should fall under the clip [default: 0.5].
    #[arg(long, help_heading = "Differential privacy")]
    #[serde(alias = "dp_target_quantile")]
    pub dp_target_quantile: Option<f64>,
    /// Adaptive clipping: geometric learning rate of the clip norm [default: 0.2].
    #[arg(long, help_heading = "Differential privacy")]
    #[serde(alias = "dp_clip_lr")]
    pub dp_clip_lr: Option<f64>,
    /// Adaptive clipping: std of the noise on the unclipped count [default: expected cohort / 20].
    #[arg(long, help_heading = "Differential privacy")]
    #[serde(alias = "dp_count_stddev")]
    pub dp_count_stddev: Option<f64>,
    /// Clip each tensor to S / sqrt(number of tensors) instead of the whole update to S.
    #[arg(long, help_heading = "Differential privacy")]
    #[serde(default, alias = "dp_per_layer")]
    pub dp_per_layer: bool,
    /// The delta of the reported (epsilon, delta) guarantee [default: 1e-5].
    #[arg(long, help_heading = "Differential privacy")]
    #[serde(alias = "dp_delta")]
    pub dp_delta: Option<f64>,
    /// Who adds the noise: central (the server) or distributed (each node its share)
    /// [default: central].
    #[arg(long, help_heading = "Differential privacy")]
    #[serde(alias = "dp_placement")]
    pub dp_placement: Option<String>,
    /// Stop before a round that would take epsilon above this; a run whose first round would
    /// is refused.
    #[arg(long, help_heading = "Differential privacy")]
    #[serde(alias = "dp_epsilon_budget")]
    pub dp_epsilon_budget: Option<f64>,
    /// Aggregation rule: mean (the weighted mean), median, trimmed-mean, krum, multi-krum or
    /// bulyan [default: mean].
    #[arg(long, help_heading = "Robust aggregation")]
    pub aggregator: Option<String>,
    /// Trimmed mean: share of values dropped from each end of every coordinate [default: 0.2].
    #[arg(long, help_heading = "Robust aggregation")]
    #[serde(alias = "trim_beta")]
    pub trim_beta: Option<f64>,
    /// Krum, Multi-Krum, Bulyan: Byzantine updates to tolerate (f) [default: 1].
    #[arg(long, help_heading = "Robust aggregation")]
    pub byzantine: Option<usize>,
    /// Multi-Krum: updates averaged (m) [default: n - f].
    #[arg(long, help_heading = "Robust aggregation")]
    #[serde(alias = "krum_keep")]
    pub krum_keep: Option<usize>,
    /// Clip every update to this L2 norm before aggregating (composes with any rule).
    #[arg(long, help_heading = "Robust aggregation")]
    #[serde(alias = "norm_bound")]
    pub norm_bound: Option<f64>,
    /// Secure aggregation (SecAgg+): the server learns only the sum of each round's updates.
    #[arg(long, help_heading = "Secure aggregation")]
    #[serde(default)]
    pub secagg: bool,
    /// Neighbours of each node in the masking graph; at least the cohort gives classic SecAgg
    /// [default: 16].
    #[arg(long, help_heading = "Secure aggregation")]
    #[serde(alias = "secagg_neighbours")]
    pub secagg_neighbours: Option<usize>,
    /// Shares needed to rebuild a node's secrets [default: a majority of its neighbours].
    #[arg(long, help_heading = "Secure aggregation")]
    #[serde(alias = "secagg_threshold")]
    pub secagg_threshold: Option<usize>,
    /// Each update coordinate is clipped to [-c, c] before quantisation [default: 8].
    #[arg(long, help_heading = "Secure aggregation")]
    #[serde(alias = "secagg_clip")]
    pub secagg_clip: Option<f32>,
    /// Quantisation levels are 2^bits [default: 22].
    #[arg(long, help_heading = "Secure aggregation")]
    #[serde(alias = "secagg_quantization_bits")]
    pub secagg_quantization_bits: Option<u32>,
    /// Sums are taken modulo 2^bits [default: 32].
    #[arg(long, help_heading = "Secure aggregation")]
    #[serde(alias = "secagg_modulus_bits")]
    pub secagg_modulus_bits: Option<u32>,
    /// FedAvg weights: the most examples a node's weight may reflect [default: the largest
    /// node's count].
    #[arg(long, help_heading = "Secure aggregation")]
    #[serde(alias = "secagg_weight_cap")]
    pub secagg_weight_cap: Option<u64>,
    /// Simulated attackers: a fraction of the nodes (0.2) or a count (4), drawn from the seed.
    #[arg(long, help_heading = "Attack simulation")]
    pub attackers: Option<String>,
    /// What they do: sign-flip, gaussian, scale, label-flip, alie or backdoor.
    #[arg(long, help_heading = "Attack simulation")]
    pub attack: Option<String>,
    /// Sign flip's k (send -k * update) and scaling's factor [default: 10].
    #[arg(long, help_heading = "Attack simulation")]
    #[serde(alias = "attack_scale")]
    pub attack_scale: Option<f64>,
    /// Gaussian attack's standard deviation [default: 1].
    #[arg(long, help_heading = "Attack simulation")]
    #[serde(alias = "attack_std")]
    pub attack_std: Option<f64>,
    /// ALIE's z [default: from the cohort and attacker counts, as Baruch et al.].
    #[arg(long, help_heading = "Attack simulation")]
    #[serde(alias = "attack_z")]
    pub attack_z: Option<f64>,
    /// Backdoor: the label triggered images should get [default: 0].
    #[arg(long, help_heading = "Attack simulation")]
    #[serde(alias = "backdoor_target")]
    pub backdoor_target: Option<u8>,
    /// Backdoor: share of each attacker's examples stamped and relabelled [default: 0.5].
    #[arg(long, help_heading = "Attack simulation")]
    #[serde(alias = "poison_fraction")]
    pub poison_fraction: Option<f64>,
    /// Aggregation mode: sync (rounds) or async (FedBuff: nodes train whenever free, every
    /// --buffer-size updates make a new version; --rounds counts versions) [default: sync].
    #[arg(long, help_heading = "Asynchronous aggregation")]
    pub mode: Option<String>,
    /// Async: updates per server step (K) [default: 10].
    #[arg(long, help_heading = "Asynchronous aggregation")]
    #[serde(alias = "buffer_size")]
    pub buffer_size: Option<usize>,
    /// Async: nodes training at once (C) [default: the cohort size, --fraction of the nodes,
    /// at least --buffer-size].
    #[arg(long, help_heading = "Asynchronous aggregation")]
    #[serde(alias = "max_concurrency")]
    pub max_concurrency: Option<usize>,
    /// Async: staleness weight, constant, polynomial:A or hinge:A,B [default: polynomial:0.5].
    #[arg(long, help_heading = "Asynchronous aggregation")]
    pub staleness: Option<String>,
    /// Update compression: none, fp16, bf16, int8 or topk:R (the largest R share of the
    /// values, the rest kept on the node as error feedback); fp16 and bf16 also halve model
    /// downloads [default: none].
    #[arg(long, help_heading = "Compression")]
    pub compress: Option<String>,
    /// Simulated devices: compute speed per node, constant, uniform:LO,HI, lognormal:SIGMA or
    /// stragglers:SHARE,SLOWDOWN [default: constant].
    #[arg(long, help_heading = "Simulated devices")]
    pub speed: Option<String>,
    /// Simulated devices: when nodes are online, always or sessions:ON,OFF (mean seconds
    /// online and offline) [default: always].
    #[arg(long, help_heading = "Simulated devices")]
    pub availability: Option<String>,
    /// Simulated devices: every node's uplink and downlink in Mbit/s, UP,DOWN [default:
    /// transfers take no time].
    #[arg(long, value_name = "UP,DOWN", help_heading = "Simulated devices")]
    pub bandwidth: Option<String>,
    /// Simulated devices: simulated seconds per local SGD step on a speed-1 device
    /// [default: 0.05].
    #[arg(long, value_name = "SECONDS", help_heading = "Simulated devices")]
    #[serde(alias = "step_time")]
    pub step_time: Option<f64>,
    /// Simulated devices from a trace: CSV rows node,online_from,online_to,speed with
    /// optional up_mbps,down_mbps, one row per online window (replaces --speed and
    /// --availability).
    #[arg(long, value_name = "FILE.csv", help_heading = "Simulated devices")]
    pub trace: Option<PathBuf>,
    /// On simulated devices: simulated seconds a synchronous round waits for its cohort
    /// before dropping the stragglers, or, with --mode async, that a task may take before it
    /// is dropped and its slot handed to another node (as a deployed server's round-timeout
    /// does) [default: wait for every node that stays online].
    #[arg(long, value_name = "SECONDS", help_heading = "Simulated devices")]
    #[serde(alias = "round_deadline")]
    pub round_deadline: Option<f64>,
}

macro_rules! prefer_flags {
    ($flags:expr, $file:expr, [$($field:ident),*]) => {
        $( if $flags.$field.is_none() { $flags.$field = $file.$field; } )*
    };
}

impl SimulateArgs {
    /// Fills every option not given as a flag from the `--config` file, if any.
    pub fn merge_config_file(mut self) -> Result<Self> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let file = read_config_file(&path)?;
        prefer_flags!(
            self,
            file,
            [
                dataset,
                data_dir,
                model,
                initial_model,
                clients,
                fraction,
                min_clients,
                rounds,
                local_epochs,
                batch_size,
                lr,
                momentum,
                weight_decay,
                partition,
                strategy,
                server_lr,
                mu,
                server_momentum,
                beta1,
                beta2,
                tau,
                q,
                q_lr,
                seed,
                target_accuracy,
                personal,
                frozen,
                evaluate_every,
                evaluate_fraction,
                evaluate_holdout,
                cross_site,
                out,
                threads,
                dp_noise_multiplier,
                dp_clip,
                dp_target_quantile,
                dp_clip_lr,
                dp_count_stddev,
                dp_delta,
                dp_placement,
                dp_epsilon_budget,
                aggregator,
                trim_beta,
                byzantine,
                krum_keep,
                norm_bound,
                attackers,
                attack,
                attack_scale,
                attack_std,
                attack_z,
                backdoor_target,
                poison_fraction,
                secagg_neighbours,
                secagg_threshold,
                secagg_clip,
                secagg_quantization_bits,
                secagg_modulus_bits,
                secagg_weight_cap,
                mode,
                buffer_size,
                max_concurrency,
                staleness,
                compress,
                speed,
                availability,
                bandwidth,
                step_time,
                trace,
                round_deadline
            ]
        );
        self.secagg |= file.secagg;
        self.baselines |= file.baselines;
        self.dp_adaptive_clip |= file.dp_adaptive_clip;
        self.dp_per_layer |= file.dp_per_layer;
        Ok(self)
    }

    /// Applies defaults and checks every value.
    pub fn resolve(&self) -> Result<SimConfig> {
        let clients = self.clients.unwrap_or(10);
        let fraction = self.fraction.unwrap_or(1.0);
        let min_clients = self.min_clients.unwrap_or(1);
        let rounds = self.rounds.unwrap_or(10);
        let training = LocalTraining {
            epochs: self.local_epochs.unwrap_or(1),
            batch_size: self.batch_size.unwrap_or(64),
            lr: self.lr.unwrap_or(0.01),
            momentum: self.momentum.unwrap_or(0.9),
            weight_decay: self.weight_decay.unwrap_or(1e-5),
        };
        let threads = match self.threads {
            Some(t) => t,
            None => std::thread::available_parallelism().map_or(1, usize::from),
        };
        check(clients >= 1, || {
            format!("--clients must be at least 1, got {clients}")
        })?;
        check(fraction > 0.0 && fraction <= 1.0, || {
            format!("--fraction must be in (0, 1], got {fraction}")
        })?;
        check(min_clients <= clients, || {
            format!("--min-clients ({min_clients}) cannot exceed --clients ({clients})")
        })?;
        check(rounds >= 1, || "--rounds must be at least 1".to_string())?;
        check(training.epochs >= 1, || {
            "--local-epochs must be at least 1".to_string()
        })?;
        check(training.batch_size >= 1, || {
            "--batch-size must be at least 1".to_string()
        })?;
        check(training.lr > 0.0 && training.lr.is_finite(), || {
            format!("--lr must be a positive number, got {}", training.lr)
        })?;
        check((0.0..1.0).contains(&training.momentum), || {
            format!("--momentum must be in [0, 1), got {}", training.momentum)
        })?;
        check(
            training.weight_decay >= 0.0 && training.weight_decay.is_finite(),
            || {
                format!(
                    "--weight-decay must be a number >= 0, got {}",
                    training.weight_decay
                )
            },
        )?;
        if let Some(t) = self.target_accuracy {
            check(t > 0.0 && t <= 1.0, || {
                format!("--target-accuracy is a fraction in (0, 1], got {t}")
            })?;
        }
        check(threads >= 1, || "--threads must be at least 1".to_string())?;
        let evaluate_fraction = self.evaluate_fraction.unwrap_or(1.0);
        EvaluationSchedule::checked(0, evaluate_fraction).map_err(|e| anyhow::anyhow!("--{e}"))?;
        let evaluate_holdout = self.evaluate_holdout.unwrap_or(0.1);
        check(evaluate_holdout > 0.0 && evaluate_holdout < 1.0, || {
            format!("--evaluate-holdout must be in (0, 1), got {evaluate_holdout}")
        })?;
        let server = self.resolve_strategy_params()?;
        let dp = self.resolve_dp(fraction)?;
        let config = SimConfig {
            dataset: self.dataset.as_deref().unwrap_or("fashion-mnist").parse()?,
            data_dir: self.data_dir.clone(),
            model: self.model.as_deref().unwrap_or("lenet").parse()?,
            initial_model: self.initial_model.clone(),
            personal: self.personal.clone().unwrap_or_default(),
            frozen: self.frozen.clone().unwrap_or_default(),
            clients,
            fraction,
            min_clients,
            rounds,
            training,
            partition: self.partition.as_deref().unwrap_or("iid").parse()?,
            strategy: self.strategy.as_deref().unwrap_or("fedavg").parse()?,
            strategy_params: server,
            seed: self.seed.unwrap_or(0),
            target_accuracy: self.target_accuracy,
            evaluate_every: self.evaluate_every,
            evaluate_fraction,
            evaluate_holdout,
            threads,
            dp,
            aggregator: self.resolve_aggregator(clients, fraction, min_clients)?,
            norm_bound: self.norm_bound,
            attack: self.resolve_attack()?,
            secagg: self.resolve_secagg()?,
            fleet: self.resolve_fleet(clients, fraction, min_clients)?,
            cross_site: self.resolve_cross_site(dp.is_some())?,
        };
        // Refuse combinations secure and asynchronous aggregation or compression cannot
        // serve before any data is loaded.
        let strategy = config.strategy(clients, NoiseSeed::Os)?;
        config.secure(&strategy, 1)?;
        config.check_compression()?;
        if let Some(fedbuff) = &config.fleet.fedbuff {
            fedbuff.check(&strategy, config.secagg.is_some(), clients)?;
        }
        Ok(config)
    }

    /// The output folder: `--out`, or `runs/<timestamp>`.
    pub fn out_dir(&self) -> PathBuf {
        self.out.clone().unwrap_or_else(|| {
            PathBuf::from("runs").join(chrono::Local::now().format("%Y%m%d-%H%M%S").to_string())
        })
    }
}

fn check(ok: bool, message: impl FnOnce() -> String) -> Result<()> {
    if ok { Ok(()) } else { bail!(message()) }
}

/// Reads a TOML file into `T`, with errors that name the file and the offending key.
pub fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    parse_toml(&text, path)
}

/// [`read_toml`] for `text` already read from `path`.
pub fn parse_toml<T: serde::de::DeserializeOwned>(text: &str, path: &Path) -> Result<T> {
    toml::from_str(text).map_err(|e| {
        let reason = e.message().to_string();
        anyhow::anyhow!("config file {} is not valid: {reason}", path.display())
    })
}

fn read_config_file(path: &Path) -> Result<SimulateArgs> {
    read_toml(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::privacy::ClipRule;

    #[test]
    fn defaults_match_the_documented_ones() {
        let cfg = SimulateArgs::default()
            .resolve()
            .expect("defaults are valid");
        assert_eq!(cfg.clients, 10);
        assert_eq!(cfg.rounds, 10);
        assert_eq!(cfg.training.batch_size, 64);
        assert_eq!(cfg.training.lr, 0.01);
        assert_eq!(cfg.training.momentum, 0.9);
        assert_eq!(cfg.training.weight_decay, 1e-5);
        assert_eq!(cfg.partition.to_string(), "iid");
    }

    #[test]
    fn flags_override_the_file_and_the_file_overrides_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("run.toml");
        std::fs::write(
            &path,
            "rounds = 7\nlocal-epochs = 3\npartition = \"labels:2\"\nbaselines = true\n",
        )
        .expect("write");
        let args = SimulateArgs {
            config: Some(path),
            rounds: Some(2),
            ..Default::default()
        };
        let merged = args.merge_config_file().expect("merge");
        let cfg = merged.resolve().expect("valid");
        assert_eq!(cfg.rounds, 2);
        assert_eq!(cfg.training.epochs, 3);
        assert_eq!(cfg.partition.to_string(), "labels:2");
        assert!(merged.baselines);
    }

    #[test]
    fn unknown_keys_and_missing_files_are_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "roundz = 3\n").expect("write");
        let err = SimulateArgs {
            config: Some(path),
            ..Default::default()
        }
        .merge_config_file()
        .expect_err("unknown key");
        assert!(format!("{err:#}").contains("roundz"), "{err:#}");
        let missing = dir.path().join("missing.toml");
        let err = SimulateArgs {
            config: Some(missing.clone()),
            ..Default::default()
        }
        .merge_config_file()
        .expect_err("missing");
        assert!(format!("{err:#}").contains(&missing.display().to_string()));
    }

    #[test]
    fn bad_values_name_the_flag() {
        let cases: [(SimulateArgs, &str); 4] = [
            (
                SimulateArgs {
                    fraction: Some(1.5),
                    ..Default::default()
                },
                "--fraction",
            ),
            (
                SimulateArgs {
                    min_clients: Some(11),
                    ..Default::default()
                },
                "--min-clients",
            ),
            (
                SimulateArgs {
                    partition: Some("zipf".into()),
                    ..Default::default()
                },
                "zipf",
            ),
            (
                SimulateArgs {
                    target_accuracy: Some(85.0),
                    ..Default::default()
                },
                "--target-accuracy",
            ),
        ];
        for (args, needle) in cases {
            let err = args.resolve().expect_err(needle).to_string();
            assert!(err.contains(needle), "{needle}: {err}");
        }
    }

    #[test]
    fn privacy_flags_resolve_and_misuse_is_named() {
        let private = SimulateArgs {
            fraction: Some(0.1),
            dp_noise_multiplier: Some(1.1),
            dp_clip: Some(0.5),
            dp_placement: Some("distributed".into()),
            ..Default::default()
        };
        let dp = private.resolve().expect("valid").dp.expect("private");
        assert_eq!(dp.sampling_rate, 0.1);
        assert_eq!(dp.clip, ClipRule::Fixed(0.5));
        assert_eq!(dp.delta, 1e-5);
        let cases: [(SimulateArgs, &str); 4] = [
            (
                SimulateArgs {
                    dp_clip: Some(0.5),
                    ..Default::default()
                },
                "--dp-noise-multiplier",
            ),
            (
                SimulateArgs {
                    dp_noise_multiplier: Some(1.0),
                    ..Default::default()
                },
                "--dp-clip",
            ),
            (
                SimulateArgs {
                    dp_noise_multiplier: Some(1.0),
                    dp_clip: Some(1.0),
                    dp_target_quantile: Some(0.3),
                    ..Default::default()
                },
                "--dp-adaptive-clip",
            ),
            (
                SimulateArgs {
                    dp_noise_multiplier: Some(1.0),
                    dp_clip: Some(1.0),
                    dp_placement: Some("edge".into()),
                    ..Default::default()
                },
                "central or distributed",
            ),
        ];
        for (args, needle) in cases {
            let err = args.resolve().expect_err(needle).to_string();
            assert!(err.contains(needle), "{needle}: {err}");
        }
    }
}
