//! Federated evaluation over the real fleet protocol: after a committed round the nodes score
//! the new model on their own data, the round's record gets the example-weighted result and
//! its spread, bad figures and failures are counted, the run ends only once its last model is
//! scored, a run without a central test set reaches its target by the nodes' figures, and a
//! restarted server evaluates a committed round again. Also personalisation: the tasks name
//! the personal tensors, which the server never averages.

use crate::support;

use std::collections::HashMap;

use ferry_core::{
    Model, Update,
    evaluation::EvaluationSchedule,
    personal::TensorRoles,
    strategy::{Strategy, StrategyName, StrategyParams},
};
use ferry_proto::v1::{
    EvaluationReport, FailureReport, HeartbeatRequest, PullTaskRequest, Task, TaskKind,
    fleet_client::FleetClient,
};
use ferry_server::coordinator::{Coordinator, RunSpec};
use support::{
    add_token, authed, chunks, client, enrol, initial, pull, spec, start_from,
    start_with_evaluator, update_bytes, upload, wait_phase,
};
use tonic::{Code, transport::Channel};

fn fedavg() -> Strategy {
    Strategy::new(StrategyName::FedAvg, &StrategyParams::default(), 3)
}

/// `rounds` rounds of three nodes, evaluated by all of them after every round.
fn evaluated_spec(rounds: u32) -> RunSpec {
    RunSpec {
        evaluation: EvaluationSchedule::checked(1, 1.0).expect("valid"),
        ..spec(rounds, 3)
    }
}

async fn nodes(dir: &std::path::Path, url: &str, n: usize) -> Vec<(FleetClient<Channel>, String)> {
    let mut fleet = Vec::new();
    for i in 0..n {
        let mut c = client(url).await;
        let credential = enrol(&mut c, &add_token(dir, &format!("site-{i}")).await).await;
        fleet.push((c, credential));
    }
    fleet
}

/// Every node pulls its training task for `round` and delivers an update.
async fn train_round(fleet: &mut [(FleetClient<Channel>, String)], round: u32) {
    for (c, credential) in fleet.iter_mut() {
        let task = pull(c, credential).await;
        assert_eq!((task.round, task.kind), (round, TaskKind::Train as i32));
        let bytes = update_bytes(vec![0.5; 6], 10);
        upload(c, credential, chunks(round, &bytes, 0, 1024))
            .await
            .expect("accepted");
    }
}

fn report(round: u32, num_examples: u64, accuracy: f64) -> EvaluationReport {
    EvaluationReport {
        round,
        num_examples,
        loss: 1.0 - accuracy,
        accuracy,
        metrics: HashMap::from([("f1".to_string(), accuracy / 2.0)]),
        site_model: String::new(),
    }
}

/// Every node takes its evaluation task and answers with `report(node's position)`.
async fn score_all(
    fleet: &mut [(FleetClient<Channel>, String)],
    report: impl Fn(usize) -> EvaluationReport,
) {
    for (i, (node, credential)) in fleet.iter_mut().enumerate() {
        let task = evaluation_task(node, credential).await;
        let answer = report(i);
        assert_eq!(task.round, answer.round);
        node.report_evaluation(authed(credential, answer))
            .await
            .expect("taken");
    }
}

/// Waits for the run to end, for `reason`.
async fn ends(coordinator: &Coordinator, reason: &str) {
    coordinator.until_finished().await;
    assert_eq!(coordinator.finished().await.as_deref(), Some(reason));
}

async fn evaluation_task(c: &mut FleetClient<Channel>, credential: &str) -> Task {
    let task = pull(c, credential).await;
    assert_eq!(task.kind, TaskKind::Evaluate as i32, "{task:?}");
    assert!(
        task.training.is_none(),
        "an evaluation carries no training settings"
    );
    task
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_score_each_round_and_the_record_keeps_the_weighted_result_and_spread() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = start_with_evaluator(dir.path(), evaluated_spec(2), fedavg(), None).await;
    let coordinator = running.coordinator.clone();
    let mut fleet = nodes(dir.path(), &running.url, 3).await;

    train_round(&mut fleet, 1).await;
    wait_phase(&coordinator, "evaluating").await;
    let model = coordinator.status().await.model_id;
    let [(a, ca), (b, cb), (c, cc)] = &mut fleet[..] else {
        unreachable!("three nodes")
    };
    for (node, credential) in [(&mut *a, &*ca), (&mut *b, &*cb), (&mut *c, &*cc)] {
        let task = evaluation_task(node, credential).await;
        assert_eq!(task.round, 1);
        assert_eq!(
            task.model.expect("model").hash,
            model,
            "the new model is scored"
        );
    }
    let beat = a
        .heartbeat(authed(ca, HeartbeatRequest { round: 1 }))
        .await
        .expect("heartbeat")
        .into_inner();
    assert!(beat.keep_working, "an evaluating node is told to go on");

    a.report_evaluation(authed(ca, report(1, 100, 0.6)))
        .await
        .expect("taken");
    let refused = b
        .report_evaluation(authed(cb, report(1, 100, 1.5)))
        .await
        .expect_err("an accuracy above 1 is refused");
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains("[0, 1]"),
        "{}",
        refused.message()
    );
    c.report_failure(authed(
        cc,
        FailureReport {
            round: 1,
            reason: "no held-out data".into(),
        },
    ))
    .await
    .expect("reported");
    let again = a
        .report_evaluation(authed(ca, report(1, 100, 0.6)))
        .await
        .expect_err("one evaluation per node");
    assert_eq!(again.code(), Code::FailedPrecondition);

    // Round 2 trains, then every node scores it; the run ends only after that.
    train_round(&mut fleet, 2).await;
    wait_phase(&coordinator, "evaluating").await;
    assert_eq!(
        coordinator.finished().await,
        None,
        "the last model is scored first"
    );
    score_all(&mut fleet, |i| {
        report(2, 100 * (i as u64 + 1), 0.5 + 0.1 * i as f64)
    })
    .await;
    ends(&coordinator, "rounds_completed").await;

    let history = coordinator.history().await.expect("history");
    let first = history[0].federated.clone().expect("round 1 evaluated");
    assert_eq!(
        (first.nodes, first.failures, first.num_examples),
        (1, 2, 100)
    );
    assert!((first.accuracy - 0.6).abs() < 1e-12);
    let last = history[1].federated.clone().expect("round 2 evaluated");
    assert_eq!((last.nodes, last.failures, last.num_examples), (3, 0, 600));
    // (100·0.5 + 200·0.6 + 300·0.7) / 600
    assert!((last.accuracy - 380.0 / 600.0).abs() < 1e-12, "{last:?}");
    assert_eq!(
        (last.accuracy_min, last.accuracy_median, last.accuracy_max),
        (0.5, 0.6, 0.7)
    );
    assert!((last.metrics["f1"] - 190.0 / 600.0).abs() < 1e-12);
    assert!(history[1].accuracy.is_nan(), "no central test set");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_test_set_the_nodes_figures_reach_the_target() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = RunSpec {
        target_accuracy: Some(0.9),
        ..evaluated_spec(5)
    };
    let running = start_with_evaluator(dir.path(), spec, fedavg(), None).await;
    let coordinator = running.coordinator.clone();
    let mut fleet = nodes(dir.path(), &running.url, 3).await;
    train_round(&mut fleet, 1).await;
    score_all(&mut fleet, |_| report(1, 50, 0.95)).await;
    ends(&coordinator, "target_reached").await;
    assert_eq!(coordinator.history().await.expect("history").len(), 1);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_evaluates_the_committed_round_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = start_with_evaluator(dir.path(), evaluated_spec(1), fedavg(), None).await;
    let mut fleet = nodes(dir.path(), &running.url, 3).await;
    train_round(&mut fleet, 1).await;
    wait_phase(&running.coordinator, "evaluating").await;
    running.stop().await;

    let restarted = start_with_evaluator(dir.path(), evaluated_spec(1), fedavg(), None).await;
    let coordinator = restarted.coordinator.clone();
    assert_eq!(
        coordinator.finished().await,
        None,
        "the last model was not scored yet"
    );
    // The nodes reconnect one by one; the evaluation waits for a round's worth of them.
    let mut reconnected = Vec::new();
    for (_, credential) in fleet.iter() {
        let mut node = client(&restarted.url).await;
        node.pull_task(authed(
            credential,
            PullTaskRequest {
                wait_ms: 0,
                ..Default::default()
            },
        ))
        .await
        .expect("pull");
        reconnected.push((node, credential.clone()));
    }
    score_all(&mut reconnected, |_| report(1, 10, 0.7)).await;
    ends(&coordinator, "rounds_completed").await;
    let history = coordinator.history().await.expect("history");
    assert_eq!(history[0].federated.as_ref().map(|f| f.nodes), Some(3));
    restarted.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn personal_tensors_are_named_in_every_task_and_never_averaged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let personal = TensorRoles::new(vec!["b".into()]).expect("valid");
    let start =
        Model::from_safetensors_with(&initial().to_safetensors().expect("bytes"), &personal)
            .expect("model");
    assert_eq!(start.num_params(), 4, "only w is averaged");
    let spec = RunSpec {
        personal: personal.clone(),
        ..evaluated_spec(1)
    };
    let running = start_from(dir.path(), spec, fedavg(), None, start.clone()).await;
    let coordinator = running.coordinator.clone();
    let mut fleet = nodes(dir.path(), &running.url, 3).await;
    for (c, credential) in fleet.iter_mut() {
        let task = pull(c, credential).await;
        assert_eq!(task.personal, ["b"], "the node is told what to keep");
        let update = Update::new(vec![0.5; 4], 10);
        let bytes = ferry_core::wire::encode_update(&update, start.layout()).expect("encode");
        upload(c, credential, chunks(1, &bytes, 0, 1024))
            .await
            .expect("an update without the personal tensor is accepted");
    }
    score_all(&mut fleet, |_| report(1, 10, 0.5)).await;
    ends(&coordinator, "rounds_completed").await;
    let global = coordinator.global().await.expect("global model");
    assert_eq!(global.values(), [0.5; 4], "w moved");
    assert_eq!(
        global.carried(),
        start.carried(),
        "b kept the initial values"
    );
    running.stop().await;
}
