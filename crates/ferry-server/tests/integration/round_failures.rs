//! Rounds that cannot be aggregated, over the real fleet protocol: the coordinator waits for
//! as many nodes as its rule needs and says why, extends a short round once, then records it
//! as failed and tries the same round again without using up one of the run's rounds, and
//! stops the run after too many failures in a row.

use crate::support;

use std::time::Duration;

use ferry_core::{
    robust::RobustRule,
    strategy::{Strategy, StrategyName, StrategyParams},
};
use ferry_proto::v1::{FailureReport, PullTaskRequest};
use ferry_server::coordinator::{Coordinator, FAILED_ROUNDS, RunSpec};
use support::{
    Running, add_token, authed, chunks, client, enrol, pull, spec, start_with_strategy,
    update_bytes, upload,
};

fn krum() -> Strategy {
    Strategy::new(StrategyName::FedAvg, &StrategyParams::default(), 5)
        .with_robust_rule(RobustRule::Krum { byzantine: 1 })
        .expect("krum composes with fedavg")
}

/// One round, rounds of at least one node as configured (the rule raises that), a one-second
/// deadline and short retries.
fn short_spec(max_round_failures: u32) -> RunSpec {
    RunSpec {
        round_timeout: Duration::from_secs(1),
        retry_backoff: Duration::from_millis(300),
        max_round_failures,
        min_results: 1,
        ..spec(1, 1)
    }
}

/// Enrols `n` nodes named from `site-{first}` on and marks them online with a pull that does
/// not wait.
async fn online_nodes(
    dir: &std::path::Path,
    running: &Running,
    first: usize,
    n: usize,
) -> Vec<String> {
    let mut fleet = client(&running.url).await;
    let mut credentials = Vec::new();
    for i in first..first + n {
        let token = add_token(dir, &format!("site-{i}")).await;
        let credential = enrol(&mut fleet, &token).await;
        fleet
            .pull_task(authed(
                &credential,
                PullTaskRequest {
                    wait_ms: 0,
                    ..Default::default()
                },
            ))
            .await
            .expect("pull");
        credentials.push(credential);
    }
    credentials
}

async fn wait_until(what: &str, coordinator: &Coordinator, done: impl Fn(&str) -> bool) {
    for _ in 0..200 {
        let status = serde_json::to_string(&coordinator.status().await).expect("json");
        if done(&status) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = coordinator.status().await;
    panic!("{what} did not happen within 10 s: {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_krum_round_waits_extends_fails_and_is_tried_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = start_with_strategy(dir.path(), short_spec(3), krum()).await;
    let coordinator = running.coordinator.clone();

    // Krum with f = 1 needs more than 4 updates: min_clients and min_results are raised to 5,
    // and the run says what it waits for.
    assert_eq!(coordinator.spec().cohort.min_clients, 5);
    assert_eq!(coordinator.spec().min_results, 5);
    let credentials = online_nodes(dir.path(), &running, 0, 3).await;
    let status = coordinator.status().await;
    assert_eq!(status.phase, "waiting_for_nodes");
    assert_eq!(status.nodes_needed, 5);
    // The store knows the fleet: three nodes enrolled and no token left cannot fill a round.
    let waiting = status.waiting.expect("a waiting message");
    assert!(
        waiting.starts_with(
            "waiting for 5 online nodes: krum with byzantine 1 needs more than 4 updates; \
             3 online; only 3 node(s) are enrolled and 0 enrolment token(s) unused"
        ),
        "{waiting}"
    );
    let credentials = [credentials, online_nodes(dir.path(), &running, 3, 2).await].concat();
    wait_until("round 1 to start", &coordinator, |s| {
        s.contains("\"phase\":\"training\"")
    })
    .await;

    // Three nodes deliver, two give up: everyone answered, but three updates are too few.
    let mut fleet = client(&running.url).await;
    for credential in &credentials[..3] {
        let task = pull(&mut fleet, credential).await;
        assert_eq!(task.round, 1);
        let bytes = update_bytes(vec![0.5; 6], 10);
        upload(&mut fleet, credential, chunks(1, &bytes, 0, 1024))
            .await
            .expect("accepted");
    }
    for credential in &credentials[3..] {
        pull(&mut fleet, credential).await;
        fleet
            .report_failure(authed(
                credential,
                FailureReport {
                    round: 1,
                    reason: "out of memory".into(),
                },
            ))
            .await
            .expect("report");
    }
    // The round is extended once (the two are asked again); nobody answers, so it fails.
    wait_until("round 1 to fail", &coordinator, |s| {
        s.contains("\"phase\":\"retrying\"")
    })
    .await;
    let status = coordinator.status().await;
    assert_eq!((status.round, status.failed_attempts), (1, 1));
    assert!(
        status
            .last_failure
            .as_deref()
            .is_some_and(|f| f.contains("3 update(s) arrived") && f.contains("krum")),
        "{status:?}"
    );
    assert!(coordinator.history().await.expect("history").is_empty());
    let failed = coordinator.failed_rounds().await.expect("failed rounds");
    assert_eq!(failed.len(), 1);
    assert_eq!((failed[0].round, failed[0].attempt), (1, 1));
    assert_eq!((failed[0].updates, failed[0].cohort), (3, 5));

    // The same round is tried again after the backoff, with nothing of the failed attempt
    // counted: all five deliver and the run's one round completes.
    for credential in &credentials {
        let task = pull(&mut fleet, credential).await;
        assert_eq!(task.round, 1, "the failed round is retried, not skipped");
        let bytes = update_bytes(vec![1.0; 6], 10);
        upload(&mut fleet, credential, chunks(1, &bytes, 0, 1024))
            .await
            .expect("accepted in the retry");
    }
    coordinator.until_finished().await;
    assert_eq!(
        coordinator.finished().await.as_deref(),
        Some("rounds_completed")
    );
    let history = coordinator.history().await.expect("history");
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].participants, 5, "only the retry's updates count");
    assert_eq!(coordinator.status().await.failed_attempts, 0);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_rounds_keep_failing_stops_as_failed_without_claiming_rounds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = start_with_strategy(dir.path(), short_spec(2), krum()).await;
    let coordinator = running.coordinator.clone();
    let credentials = online_nodes(dir.path(), &running, 0, 5).await;
    // Nobody ever delivers: the round fails twice (each time after one extension), and the
    // run stops as failed. Keep the nodes online meanwhile.
    let mut fleet = client(&running.url).await;
    for _ in 0..100 {
        if coordinator.finished().await.is_some() {
            break;
        }
        for credential in &credentials {
            let _ = fleet
                .pull_task(authed(
                    credential,
                    PullTaskRequest {
                        wait_ms: 0,
                        ..Default::default()
                    },
                ))
                .await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(coordinator.finished().await.as_deref(), Some(FAILED_ROUNDS));
    let status = coordinator.status().await;
    assert_eq!(status.phase, "failed");
    assert_eq!(status.failed_attempts, 2);
    assert!(coordinator.history().await.expect("history").is_empty());
    let failed = coordinator.failed_rounds().await.expect("failed");
    assert_eq!(
        failed
            .iter()
            .map(|f| (f.round, f.attempt))
            .collect::<Vec<_>>(),
        [(1, 1), (1, 2)]
    );
    running.stop().await;
}
