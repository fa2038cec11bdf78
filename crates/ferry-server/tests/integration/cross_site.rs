//! Sites' own models in a deployed cross-site matrix, over the real fleet protocol: after the
//! last round is scored, nodes that opt in fine-tune the final model and send it, a node that
//! does not is never asked, a restarted server keeps the models already sent, every node
//! scores every site's model, and the run ends with the matrix in its final record.

use crate::support;

use std::collections::BTreeMap;

use ferry_core::{
    cross_site::CrossSiteModels,
    evaluation::EvaluationSchedule,
    strategy::{Strategy, StrategyName, StrategyParams},
};
use ferry_proto::v1::{
    EvaluationReport, PullTaskRequest, Task, TaskKind, fleet_client::FleetClient,
    pull_task_response::Outcome,
};
use ferry_server::coordinator::RunSpec;
use support::{
    add_token, authed, chunks, client, enrol, spec, start_with_evaluator, update_bytes, upload,
    wait_phase,
};
use tonic::transport::Channel;

type Node = (FleetClient<Channel>, String);

fn fedavg() -> Strategy {
    Strategy::new(StrategyName::FedAvg, &StrategyParams::default(), 3)
}

/// One round of three nodes with sites' own models in the matrix.
fn local_matrix_spec() -> RunSpec {
    RunSpec {
        evaluation: EvaluationSchedule::checked(1, 1.0).expect("valid"),
        cross_site: Some(CrossSiteModels::Local),
        ..spec(1, 3)
    }
}

/// One pull that waits up to `wait_ms` for work: the task, if one came.
async fn pull_once(node: &mut Node, shares: bool, wait_ms: u32) -> Option<Task> {
    let (c, credential) = node;
    let request = PullTaskRequest {
        wait_ms,
        share_local_model: shares,
    };
    match c
        .pull_task(authed(credential, request))
        .await
        .expect("pull")
        .into_inner()
        .outcome
    {
        Some(Outcome::Task(task)) => Some(task),
        _ => None,
    }
}

/// Pulls until a task comes (at most 40 s).
async fn task(node: &mut Node, shares: bool) -> Task {
    for _ in 0..20 {
        if let Some(task) = pull_once(node, shares, 2000).await {
            return task;
        }
    }
    panic!("no task within 40 s");
}

fn report(task: &Task, accuracy: f64) -> EvaluationReport {
    EvaluationReport {
        round: task.round,
        num_examples: 10,
        loss: 1.0 - accuracy,
        accuracy,
        metrics: Default::default(),
        site_model: task.site_model.clone(),
    }
}

async fn send_update(node: &mut Node, round: u32, value: f32) {
    let (c, credential) = node;
    upload(
        c,
        credential,
        chunks(round, &update_bytes(vec![value; 6], 10), 0, 1024),
    )
    .await
    .expect("accepted");
}

async fn answer(node: &mut Node, task: &Task, accuracy: f64) {
    let (c, credential) = node;
    c.report_evaluation(authed(credential, report(task, accuracy)))
        .await
        .expect("taken");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sites_that_opt_in_send_their_own_model_which_every_site_scores_across_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = start_with_evaluator(dir.path(), local_matrix_spec(), fedavg(), None).await;
    let mut fleet: Vec<Node> = Vec::new();
    let mut ids = Vec::new();
    for i in 0..3 {
        let mut c = client(&running.url).await;
        let credential = enrol(&mut c, &add_token(dir.path(), &format!("site-{i}")).await).await;
        ids.push(credential.split('.').next().expect("node id").to_string());
        fleet.push((c, credential));
    }
    // Round 1: every node trains (+0.5), then scores the final model.
    for node in fleet.iter_mut() {
        let t = task(node, true).await;
        assert_eq!((t.round, t.kind), (1, TaskKind::Train as i32));
        send_update(node, 1, 0.5).await;
    }
    for (i, node) in fleet.iter_mut().enumerate() {
        let t = task(node, true).await;
        assert_eq!(
            (t.round, t.kind, t.site_model.as_str()),
            (1, TaskKind::Evaluate as i32, "")
        );
        answer(node, &t, 0.5 + 0.1 * i as f64).await;
    }
    wait_phase(&running.coordinator, "cross_site").await;
    assert_eq!(
        running.coordinator.finished().await,
        None,
        "the matrix comes first"
    );

    // Nodes 0 and 1 share their model, node 2 does not and is never asked to tune.
    let tune = task(&mut fleet[0], true).await;
    assert_eq!((tune.round, tune.kind), (2, TaskKind::Tune as i32));
    assert!(
        tune.training.is_some(),
        "fine-tuning uses the run's local training"
    );
    assert_eq!(pull_once(&mut fleet[2], false, 0).await, None);
    send_update(&mut fleet[0], 2, 0.25).await;
    running.stop().await;

    // Restarted mid-phase: node 0's model is kept; node 1 is asked again and node 2 not.
    let restarted = start_with_evaluator(dir.path(), local_matrix_spec(), fedavg(), None).await;
    let coordinator = restarted.coordinator.clone();
    for (i, node) in fleet.iter_mut().enumerate() {
        node.0 = client(&restarted.url).await;
        if i != 1 {
            assert_eq!(pull_once(node, i == 0, 0).await, None, "node {i}");
        }
    }
    wait_phase(&coordinator, "cross_site").await;
    let tune = task(&mut fleet[1], true).await;
    assert_eq!((tune.round, tune.kind), (2, TaskKind::Tune as i32));
    send_update(&mut fleet[1], 2, -0.25).await;

    // Every node scores both sites' models, one task each.
    let mut models_scored = BTreeMap::new();
    for (i, node) in fleet.iter_mut().enumerate() {
        for _ in 0..2 {
            let t = task(node, i < 2).await;
            assert_eq!(t.kind, TaskKind::Evaluate as i32);
            let site = t.site_model.clone();
            let hash = t.model.as_ref().expect("model").hash.clone();
            let accuracy = if ids[i] == site { 0.9 } else { 0.2 };
            answer(node, &t, accuracy).await;
            models_scored.insert((site, ids[i].clone()), hash);
        }
    }
    coordinator.until_finished().await;
    assert_eq!(
        coordinator.finished().await.as_deref(),
        Some("rounds_completed")
    );

    let site_models = coordinator.site_models().await.expect("site models");
    // Site models (and the matrix's rows) come in node id order.
    let mut sharing = vec![ids[0].clone(), ids[1].clone()];
    sharing.sort();
    assert_eq!(site_models.keys().cloned().collect::<Vec<_>>(), sharing);
    assert_eq!(site_models[&ids[0]].values(), &[0.75; 6], "0.5 + 0.25");
    assert_eq!(site_models[&ids[1]].values(), &[0.25; 6], "0.5 - 0.25");
    assert_eq!(models_scored.len(), 6, "two site models on three sites");

    let history = coordinator.history().await.expect("history");
    let matrix = history[0]
        .cross_site
        .clone()
        .expect("the matrix is in the final record");
    let rows: Vec<&str> = matrix.rows.iter().map(|r| r.model.as_str()).collect();
    let mut expected = vec!["global".to_string()];
    expected.extend(sharing.iter().map(|id| format!("local:{id}")));
    assert_eq!(rows, expected);
    for (i, site) in ids.iter().enumerate() {
        assert_eq!(matrix.cell("global", site), Some(0.5 + 0.1 * i as f64));
        for own in &ids[..2] {
            let expected = if own == site { 0.9 } else { 0.2 };
            assert_eq!(matrix.cell(&format!("local:{own}"), site), Some(expected));
        }
    }
    restarted.stop().await;
}
