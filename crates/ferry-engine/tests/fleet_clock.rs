//! Runs on simulated devices: synchronous rounds that wait for stragglers or drop them,
//! asynchronous buffered aggregation that does not wait, and the bytes ledger under
//! compression.

use std::sync::Arc;

use ferry_core::{
    Model, ModelLayout, TensorSpec, Update,
    compress::Compression,
    evaluation::{EvaluationSchedule, NodeEvaluation},
    staleness::StalenessWeight,
    strategy::{Strategy, StrategyName, StrategyParams},
    task::LocalTraining,
};
use ferry_engine::{
    devices::Devices,
    fedbuff::FedBuff,
    federation::{Federation, Mode, RoundObserver, RunOutcome, RunSettings},
    node::{EvaluateTask, Evaluator, NodeError, NodeHandle, NodeId, RoundTask, Score},
};

const DIM: usize = 4;

/// A node that steps the model a quarter of the way to 1 in every coordinate, offset by its
/// id so that each update's origin shows in the bits.
struct Walker(NodeId);

impl NodeHandle for Walker {
    fn id(&self) -> NodeId {
        self.0
    }

    fn train(&self, task: &RoundTask) -> Result<Update, NodeError> {
        let offset = self.0 as f32 * 1e-3 + (task.seed % 97) as f32 * 1e-6;
        let delta = task
            .model
            .values()
            .iter()
            .map(|m| (1.0 - m) * 0.25 + offset)
            .collect();
        Ok(Update::new(delta, 10))
    }

    fn evaluate(&self, _task: &EvaluateTask) -> Result<NodeEvaluation, NodeError> {
        Err(NodeError {
            node: self.0,
            reason: "not used".into(),
        })
    }
}

struct Closeness;

impl Evaluator for Closeness {
    fn evaluate(&self, model: &Model) -> Result<Score, String> {
        let d = f64::from((model.values()[0] - 1.0).abs());
        Ok(Score {
            loss: d,
            accuracy: 1.0 - d.min(1.0),
            ..Score::default()
        })
    }
}

fn settings(rounds: u32, mode: Mode, devices: Devices, parallelism: usize) -> RunSettings {
    RunSettings {
        rounds,
        fraction: 1.0,
        min_clients: 1,
        target_accuracy: None,
        training: LocalTraining {
            epochs: 1,
            batch_size: 1,
            lr: 0.1,
            momentum: 0.0,
            weight_decay: 0.0,
        },
        seed: 11,
        parallelism,
        secure: None,
        evaluation: EvaluationSchedule::OFF,
        mode,
        devices: Some(Arc::new(devices)),
        compress: Compression::None,
    }
}

/// `count` nodes online throughout, each task taking 1 simulated second except node 0's,
/// which takes `slow` seconds.
fn fleet(count: usize, slow: f64) -> Devices {
    let trace: String = (0..count)
        .map(|n| {
            let speed = if n == 0 { 1.0 / slow } else { 1.0 };
            format!("{n},0,inf,{speed}\n")
        })
        .collect();
    Devices::from_trace(&trace, count, None, 1.0).expect("trace")
}

fn run(settings: RunSettings, count: usize) -> RunOutcome {
    let nodes = (0..count as NodeId)
        .map(|id| Arc::new(Walker(id)) as Arc<dyn NodeHandle>)
        .collect();
    let layout = ModelLayout::new(vec![TensorSpec::f32("w", vec![DIM])]).expect("layout");
    let model = Model::new(Arc::new(layout), vec![0.0; DIM]).expect("model");
    let strategy = Strategy::new(StrategyName::FedAvg, &StrategyParams::default(), count);
    struct Quiet;
    impl RoundObserver for Quiet {}
    Federation::new(settings, strategy, nodes, Box::new(Closeness), model)
        .expect("settings")
        .run(&mut Quiet)
        .expect("runs")
}

fn buffered(buffer_size: usize, max_concurrency: usize) -> Mode {
    Mode::Buffered(FedBuff {
        buffer_size,
        max_concurrency,
        staleness: StalenessWeight::Polynomial { a: 0.5 },
        task_deadline_s: None,
    })
}

#[test]
fn synchronous_rounds_wait_for_a_straggler_or_drop_it_at_the_deadline() {
    let waiting = run(settings(3, Mode::default(), fleet(4, 10.0), 2), 4);
    let times: Vec<f64> = waiting.rounds.iter().filter_map(|r| r.sim_time_s).collect();
    assert_eq!(times, [10.0, 20.0, 30.0]);
    assert!(waiting.rounds.iter().all(|r| r.participants == 4));

    let deadline = Mode::Synchronous {
        deadline_s: Some(2.0),
    };
    let dropping = run(settings(3, deadline, fleet(4, 10.0), 2), 4);
    let times: Vec<f64> = dropping
        .rounds
        .iter()
        .filter_map(|r| r.sim_time_s)
        .collect();
    assert_eq!(times, [2.0, 4.0, 6.0]);
    for r in &dropping.rounds {
        assert_eq!((r.participants, r.failures), (3, 1));
        assert_eq!(r.failed[0].node, "0");
        assert!(
            r.failed[0].reason.contains("round deadline"),
            "{:?}",
            r.failed
        );
    }
}

#[test]
fn a_node_leaving_before_its_update_arrives_is_lost_and_the_round_goes_on() {
    // Node 1 leaves at 0.5 s, halfway through its task, and is back at 5 s.
    let trace = "0,0,inf,1\n1,0,0.5,1\n1,5,inf,1\n2,0,inf,1\n";
    let devices = Devices::from_trace(trace, 3, None, 1.0).expect("trace");
    let out = run(settings(2, Mode::default(), devices, 1), 3);
    let first = &out.rounds[0];
    assert_eq!((first.participants, first.failures), (2, 1));
    assert!(
        first.failed[0].reason.contains("went offline"),
        "{:?}",
        first.failed
    );
    // Round 2 starts at 1 s, while node 1 is away: it is not selected.
    assert_eq!((out.rounds[1].participants, out.rounds[1].failures), (2, 0));
    assert_eq!(out.rounds[1].sim_time_s, Some(2.0));
}

#[test]
fn asynchronous_versions_advance_without_waiting_for_the_slowest() {
    let out = run(settings(6, buffered(2, 4), fleet(4, 50.0), 2), 4);
    assert_eq!(out.rounds.len(), 6);
    let last = out.rounds.last().and_then(|r| r.sim_time_s).expect("clock");
    // Three 1-second nodes, each at most once a version, make a version about every second,
    // long before the slow node's first update at 50 s.
    assert!(last <= 6.0, "six versions took {last} simulated seconds");
    for r in &out.rounds {
        assert_eq!(r.participants, 2);
        assert!(
            !r.contributors.contains(&"0".to_string()),
            "{:?}",
            r.contributors
        );
        assert!(r.staleness.is_some());
    }
    // The fast nodes' updates arrive one version stale once the buffer turns over.
    assert!(
        out.rounds
            .iter()
            .any(|r| r.staleness.is_some_and(|s| s.max >= 1))
    );
    assert!(out.model.values()[0] > 0.5, "{:?}", out.model.values());
}

#[test]
fn a_slow_node_s_update_is_folded_late_with_its_staleness() {
    let out = run(settings(30, buffered(2, 4), fleet(4, 10.0), 2), 4);
    let arrival = out
        .rounds
        .iter()
        .find(|r| r.contributors.contains(&"0".to_string()))
        .expect("the slow node's update arrives");
    let stale = arrival.staleness.expect("stats");
    assert!(stale.max >= 5, "{stale:?}");
    assert!(stale.mean_weight < 1.0, "{stale:?}");
    assert!(arrival.sim_time_s.expect("clock") >= 10.0);
}

#[test]
fn an_asynchronous_task_past_its_deadline_is_dropped_and_its_slot_handed_out_again() {
    let Mode::Buffered(buffer) = buffered(2, 4) else {
        unreachable!("buffered() makes an asynchronous mode")
    };
    let mode = Mode::Buffered(FedBuff {
        task_deadline_s: Some(5.0),
        ..buffer
    });
    // Node 0 takes 10 s a task: each is dropped at 5 s, and the node is given another.
    let out = run(settings(30, mode, fleet(4, 10.0), 2), 4);
    let drops: Vec<_> = out.rounds.iter().flat_map(|r| &r.failed).collect();
    assert!(drops.len() >= 2, "{drops:?}");
    for drop in &drops {
        assert_eq!(drop.node, "0");
        assert!(drop.reason.contains("task deadline"), "{}", drop.reason);
    }
    assert!(
        out.rounds
            .iter()
            .all(|r| !r.contributors.contains(&"0".to_string()))
    );
    assert_eq!(out.rounds.len(), 30);
}

#[test]
fn an_asynchronous_run_repeats_on_any_number_of_threads() {
    let one = run(settings(8, buffered(3, 4), fleet(5, 3.0), 1), 5);
    let three = run(settings(8, buffered(3, 4), fleet(5, 3.0), 3), 5);
    assert_eq!(one.model.values(), three.model.values());
    let contributors = |o: &RunOutcome| -> Vec<Vec<String>> {
        o.rounds.iter().map(|r| r.contributors.clone()).collect()
    };
    assert_eq!(contributors(&one), contributors(&three));
}

#[test]
fn the_bytes_ledger_charges_what_a_compression_sends() {
    let mut plain = settings(1, Mode::default(), fleet(2, 1.0), 1);
    let f32_round = run(plain.clone(), 2).rounds.remove(0);
    assert_eq!(f32_round.bytes_up, 2 * 4 * DIM as u64);
    assert_eq!(f32_round.bytes_down, 2 * 4 * DIM as u64);
    plain.compress = Compression::Fp16;
    let half = run(plain.clone(), 2).rounds.remove(0);
    assert_eq!(
        (half.bytes_up, half.bytes_down),
        (2 * 2 * DIM as u64, 2 * 2 * DIM as u64)
    );
    plain.compress = Compression::Int8;
    let int8 = run(plain, 2).rounds.remove(0);
    // One byte a value and a 4-byte scale; the model still travels as f32.
    assert_eq!(int8.bytes_up, 2 * (DIM as u64 + 4));
    assert_eq!(int8.bytes_down, 2 * 4 * DIM as u64);
}
