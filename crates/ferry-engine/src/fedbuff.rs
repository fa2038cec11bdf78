//! Asynchronous buffered aggregation (FedBuff, Nguyen et al., 2022) on a simulated clock.
//!
//! Up to `max_concurrency` nodes train at once, each on the version of the global model it
//! received when it started; a node that contributed to the open buffer gets its next task
//! from the next version (so one fast node cannot fill a buffer), as in deployment. As each update arrives it is weighted by its staleness (versions
//! since its model) and folded into the buffer; every `buffer_size` updates the server step
//! applies the buffer and the model becomes a new version. Nobody waits for the slowest node.
//!
//! Events (a node finishing, a node leaving mid-task, a node coming online) are taken in
//! simulated-time order. Training is real: a task's update depends only on the model it
//! started from, so the in-flight tasks are trained together on the run's threads the
//! first time one of their updates is needed, and the run repeats from its seed on any
//! number of threads.
//!
//! What composes, and what is refused:
//! - every server optimizer and the FedAvg family's client procedures: the buffer's
//!   staleness-weighted mean is the aggregate the optimizer steps with;
//! - robust rules: applied to each buffer's staleness-weighted updates, so their guarantee
//!   holds per buffer (for example Krum tolerates f Byzantine updates in every buffer of
//!   at least 2f + 3); the buffer must hold at least the rule's floor;
//! - differential privacy is refused: the accountant's amplification by sampling assumes each
//!   round's cohort is a Poisson sample of the fleet, but a buffer holds whoever finished
//!   first (fast nodes again and again), so the epsilon it would report is not what is
//!   released;
//! - SecAgg+ is refused: its key agreement and secret sharing run among a cohort fixed
//!   before anyone masks, and a buffer's members are known only as they finish.

use std::sync::Arc;

use ferry_core::{algebra, seed::mix_seed, staleness::StalenessWeight, strategy::Strategy};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{
    EngineError,
    devices::{Devices, Timeline},
    dispatch,
    federation::{Federation, RoundObserver, RunOutcome, StopReason, fold},
    floor::RoundFloor,
    node::{NodeError, RoundTask},
    record::StalenessStats,
    round::{self, OpenRound, RoundPlan},
};

/// Stream mixed into the run seed for asynchronous dispatch, apart from every other draw.
const ASYNC_STREAM: u64 = 0x0061_7379_6e63;

/// FedBuff's settings.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct FedBuff {
    /// Updates per server step (K).
    pub buffer_size: usize,
    /// Nodes training at once (C).
    pub max_concurrency: usize,
    /// How an update's weight falls with its staleness.
    pub staleness: StalenessWeight,
    /// In simulation, simulated seconds a task may take: one not delivered by then is
    /// dropped and its slot freed, as a deployed server drops a task past its round timeout
    /// (`None`: a task takes as long as its node needs). A server ignores it.
    pub task_deadline_s: Option<f64>,
}

impl FedBuff {
    /// Refuses settings and combinations asynchronous aggregation cannot serve, with the
    /// reason.
    pub fn check(
        &self,
        strategy: &Strategy,
        secure: bool,
        nodes: usize,
    ) -> Result<(), EngineError> {
        let refuse = |why: String| Err(EngineError::Settings(why));
        if self.buffer_size == 0 || self.max_concurrency == 0 {
            return refuse("buffer-size and max-concurrency must be at least 1".into());
        }
        if self.max_concurrency > nodes || self.buffer_size > nodes {
            return refuse(format!(
                "buffer-size {} and max-concurrency {} cannot exceed the {nodes} nodes of the \
                 run (a node contributes at most once to each version)",
                self.buffer_size, self.max_concurrency
            ));
        }
        if strategy.privacy.is_some() {
            return refuse(
                "differential privacy is not available in asynchronous mode: the accountant's \
                 amplification by sampling assumes every round is a Poisson sample of the fleet, \
                 but a buffer holds whoever finished first, so the epsilon reported would not be \
                 what is released; use mode = \"sync\" for private runs"
                    .into(),
            );
        }
        if secure {
            return refuse(
                "SecAgg+ is not available in asynchronous mode: its key agreement and secret \
                 sharing run among a cohort fixed before anyone masks, and a buffer's members \
                 are known only as they finish; use mode = \"sync\" for secure runs"
                    .into(),
            );
        }
        let floor = RoundFloor::of(strategy, None);
        if self.buffer_size < floor.updates {
            return refuse(format!(
                "buffer-size {} is below what the aggregation rule needs per buffer: {}",
                self.buffer_size,
                floor.reason.unwrap_or_default()
            ));
        }
        Ok(())
    }
}

/// A task in flight on one node.
struct Job {
    node: usize,
    version: u32,
    task: RoundTask,
    timeline: Timeline,
    /// When the task's deadline drops it, if that comes before it ends.
    expires_at: Option<f64>,
    result: Option<Result<ferry_core::Update, NodeError>>,
}

impl Job {
    /// When the coordinator knows the task's outcome: its update arrived, its node left, or
    /// its deadline passed.
    fn ends_at(&self) -> f64 {
        self.expires_at.unwrap_or_else(|| self.timeline.ends_at())
    }

    /// Whether the task ends without an update to train for.
    fn fails(&self) -> bool {
        self.expires_at.is_some() || self.timeline.lost_at.is_some()
    }
}

/// Runs `federation` asynchronously until `rounds` versions or the target accuracy.
pub(crate) fn run(
    mut fed: Federation,
    buffer: &FedBuff,
    observer: &mut dyn RoundObserver,
) -> Result<RunOutcome, EngineError> {
    let devices = fed.settings.devices.clone().ok_or_else(|| {
        EngineError::Settings(
            "asynchronous aggregation runs on a simulated clock: give the run simulated devices"
                .into(),
        )
    })?;
    buffer.check(
        &fed.strategy,
        fed.settings.secure.is_some(),
        fed.nodes.len(),
    )?;
    let mut run = Run {
        clock: 0.0,
        version: 0,
        busy: vec![false; fed.nodes.len()],
        contributed: vec![false; fed.nodes.len()],
        jobs: Vec::new(),
        dispatched: 0,
        rng: ChaCha8Rng::seed_from_u64(mix_seed(fed.settings.seed, ASYNC_STREAM)),
        template: template(&fed, 1),
        staleness: StalenessStats::default(),
    };
    let mut open = OpenRound::new(&run.template, &fed.strategy);
    let mut records = Vec::new();
    let mut stop = StopReason::RoundsCompleted;
    observer.round_started(1, buffer.buffer_size);
    loop {
        run.dispatch(&fed, &devices, buffer, &mut open);
        let Some(mut job) = run.next_event(&devices, buffer.max_concurrency)? else {
            continue;
        };
        run.busy[job.node] = false;
        observer.node_returned(run.version + 1);
        let id = fed.nodes[job.node].id();
        if let (Some(at), Some(deadline)) = (job.expires_at, buffer.task_deadline_s) {
            open.fail(
                &id.to_string(),
                format!(
                    "not delivered within the task deadline of {deadline} simulated seconds \
                     (dropped at {at:.0})"
                ),
            );
            continue;
        }
        if let Some(at) = job.timeline.lost_at {
            open.fail(
                &id.to_string(),
                format!("went offline at {at:.0} simulated seconds, before its update arrived"),
            );
            continue;
        }
        let tau = u64::from(run.version - job.version);
        let node = job.node;
        let result = match job.result.take() {
            Some(result) => result,
            None => run.train_in_flight(&fed, job),
        };
        let weight = buffer.staleness.weight(tau);
        let result = result.map(|mut update| {
            run.contributed[node] = true;
            algebra::scale(&mut update.delta, weight as f32);
            update
        });
        let before = open.accepted();
        fold(&mut open, id, result);
        if open.accepted() > before {
            run.staleness.add(tau, weight);
        }
        if open.accepted() < buffer.buffer_size {
            continue;
        }
        run.version += 1;
        let applied = open.apply(&mut fed.strategy, Arc::make_mut(&mut fed.global))?;
        let mut record = fed.record(applied, run.version, observer)?;
        record.sim_time_s = Some(run.clock);
        record.staleness = Some(std::mem::take(&mut run.staleness));
        if fed.keep(record, observer, &mut records) {
            stop = StopReason::TargetReached;
            break;
        }
        if run.version >= fed.settings.rounds {
            break;
        }
        run.template = template(&fed, run.version + 1);
        run.contributed.fill(false);
        open = OpenRound::new(&run.template, &fed.strategy);
        observer.round_started(run.version + 1, buffer.buffer_size);
    }
    Ok(RunOutcome {
        rounds: records,
        model: Arc::unwrap_or_clone(fed.global),
        stop,
    })
}

/// The asynchronous run's state between events.
struct Run {
    /// The simulated clock.
    clock: f64,
    /// Versions made so far.
    version: u32,
    /// Whether each node has a task in flight.
    busy: Vec<bool>,
    /// Whether each node's update is in the open buffer.
    contributed: Vec<bool>,
    /// Tasks in flight, in dispatch order.
    jobs: Vec<Job>,
    /// Tasks handed out so far (each one's seed stream).
    dispatched: u64,
    /// Which idle online node takes the next task.
    rng: ChaCha8Rng,
    /// The current version's task, as every node starting now receives it.
    template: RoundPlan,
    /// The current buffer's staleness so far.
    staleness: StalenessStats,
}

impl Run {
    /// Hands the current version to idle online nodes, drawn from the seed, until the
    /// buffer's concurrency is reached or no idle node is online.
    fn dispatch(
        &mut self,
        fed: &Federation,
        devices: &Devices,
        buffer: &FedBuff,
        open: &mut OpenRound,
    ) {
        let (down, up) = round::transfer_bytes(&self.template.task);
        while self.jobs.len() < buffer.max_concurrency {
            let idle: Vec<usize> = (0..fed.nodes.len())
                .filter(|&n| self.may_start(n) && devices.profile(n).online_at(self.clock))
                .collect();
            if idle.is_empty() {
                return;
            }
            let node = idle[self.rng.random_range(0..idle.len())];
            self.dispatched += 1;
            let mut task = self.template.task.clone();
            task.seed = mix_seed(fed.settings.seed, ASYNC_STREAM ^ self.dispatched);
            let steps = fed.nodes[node].steps(&task.training);
            let timeline = devices.timeline(node, self.clock, steps, down, up);
            let expires_at = buffer
                .task_deadline_s
                .map(|d| self.clock + d)
                .filter(|&at| at < timeline.ends_at());
            self.busy[node] = true;
            open.add_downloads(1);
            self.jobs.push(Job {
                node,
                version: self.version,
                task,
                timeline,
                expires_at,
                result: None,
            });
        }
    }

    /// Whether node `n` may be handed a task: none in flight, and not in the open buffer.
    fn may_start(&self, n: usize) -> bool {
        !self.busy[n] && !self.contributed[n]
    }

    /// Moves the clock to the next event: a task ending (returned), or an idle node coming
    /// online while a slot is free (`None`: dispatch again). Fails when nothing is in flight
    /// and no node will ever be online again.
    fn next_event(
        &mut self,
        devices: &Devices,
        concurrency: usize,
    ) -> Result<Option<Job>, EngineError> {
        let ending = self
            .jobs
            .iter()
            .enumerate()
            .min_by(|a, b| a.1.ends_at().total_cmp(&b.1.ends_at()))
            .map(|(i, job)| (i, job.ends_at()));
        let arriving = (self.jobs.len() < concurrency)
            .then(|| {
                (0..self.busy.len())
                    .filter(|&n| self.may_start(n))
                    .filter_map(|n| devices.profile(n).next_online(self.clock))
                    .filter(|&t| t > self.clock)
                    .min_by(f64::total_cmp)
            })
            .flatten();
        match (ending, arriving) {
            (Some((i, at)), arriving) if arriving.is_none_or(|a| at <= a) => {
                self.clock = at;
                Ok(Some(self.jobs.remove(i)))
            }
            (_, Some(at)) => {
                self.clock = at;
                Ok(None)
            }
            _ => Err(EngineError::Settings(format!(
                "no node is online after {:.0} simulated seconds and none has a task, so no \
                 version can follow {}; give the devices longer online windows",
                self.clock, self.version
            ))),
        }
    }

    /// Trains `job` and every other in-flight task not trained yet, on the run's threads,
    /// keeping the others' results for when they arrive; returns `job`'s.
    fn train_in_flight(
        &mut self,
        fed: &Federation,
        job: Job,
    ) -> Result<ferry_core::Update, NodeError> {
        let pending: Vec<usize> = (0..self.jobs.len())
            .filter(|&i| self.jobs[i].result.is_none() && !self.jobs[i].fails())
            .collect();
        let tasks: Vec<(usize, &RoundTask)> = std::iter::once((job.node, &job.task))
            .chain(
                pending
                    .iter()
                    .map(|&i| (self.jobs[i].node, &self.jobs[i].task)),
            )
            .collect();
        let mut results = Vec::with_capacity(tasks.len());
        let nodes = &fed.nodes;
        dispatch::run_ordered(
            tasks.len(),
            fed.settings.parallelism,
            |i| nodes[tasks[i].0].train(tasks[i].1),
            |_| {},
            |_, result| results.push(result),
        );
        let mut results = results.into_iter();
        let own = results.next().unwrap_or_else(|| {
            Err(NodeError {
                node: fed.nodes[job.node].id(),
                reason: "training produced no result".into(),
            })
        });
        for (i, result) in pending.into_iter().zip(results) {
            self.jobs[i].result = Some(result);
        }
        own
    }
}

/// The task of version `next`'s nodes: the current global model (as the run's compression
/// sends it), the strategy's broadcast, the run's local training.
fn template(fed: &Federation, next: u32) -> RoundPlan {
    RoundPlan {
        selected: Vec::new(),
        task: RoundTask {
            round: next,
            model: fed.global.clone(),
            training: fed.settings.training.clone(),
            procedure: fed.strategy.client,
            seed: mix_seed(fed.settings.seed, u64::from(next)),
            server_control: fed.strategy.optimizer.broadcast(),
            privacy: None,
            compress: ferry_core::compress::Compression::None,
        },
        privacy: None,
    }
    .compressed(fed.settings.compress)
}
