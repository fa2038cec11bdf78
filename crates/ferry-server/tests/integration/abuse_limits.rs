//! The abuse limits over the real protocol: each refuses what it should, with the status a
//! node can act on, counts the refusal in the metrics, and leaves well-behaved calls alone.

use crate::support;

use std::{
    sync::{Mutex, OnceLock},
    time::Duration,
};

use ferry_proto::v1::{EnrolRequest, HeartbeatRequest, UploadChunk};
use ferry_server::{counter_totals::CounterTotals, limits::AbuseLimits};
use metrics_util::debugging::{DebuggingRecorder, Snapshotter};
use support::*;
use tonic::Code;

/// The process's metrics, shared by the tests of this file.
fn metrics() -> &'static Snapshotter {
    static SNAPSHOTTER: OnceLock<Snapshotter> = OnceLock::new();
    SNAPSHOTTER.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder.install().expect("the only recorder");
        snapshotter
    })
}

/// `ferry_limit_refusals_total{limit}` so far in this process. Each read of the recorder
/// resets its counters, and the tests read it concurrently, so the totals are kept here.
fn refusals(limit: &str) -> u64 {
    static TOTALS: Mutex<CounterTotals> = Mutex::new(CounterTotals::new());
    let mut totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    totals.add_snapshot(metrics().snapshot());
    totals.get("ferry_limit_refusals_total", &format!("limit={limit}"))
}

#[tokio::test]
async fn token_guessing_is_refused_per_source_once_its_failures_are_spent() {
    metrics();
    let dir = tempfile::tempdir().expect("tempdir");
    let token = add_token(dir.path(), "site-a").await;
    let limits = AbuseLimits {
        enrol_failures_per_minute: 3,
        ..AbuseLimits::default()
    };
    let running = start_limited(dir.path(), 1, 1, limits).await;
    let mut c = client(&running.url).await;
    let before = refusals("enrol_failures");
    for guess in 0..3 {
        let err = c
            .enrol(EnrolRequest {
                token: format!("ferry-guess-{guess}"),
                ..Default::default()
            })
            .await
            .expect_err("a wrong token");
        assert_eq!(err.code(), Code::Unauthenticated);
    }
    // Spent: even the right token is refused from this address for now, unchecked.
    let err = c
        .enrol(EnrolRequest {
            token: token.clone(),
            ..Default::default()
        })
        .await
        .expect_err("rate-limited");
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    assert!(err.message().contains("try again in"), "{}", err.message());
    assert_eq!(refusals("enrol_failures"), before + 1);
    running.stop().await;
}

#[tokio::test]
async fn heartbeats_past_the_rate_are_refused_and_a_node_within_it_is_served() {
    metrics();
    let dir = tempfile::tempdir().expect("tempdir");
    let (fast, slow) = (
        add_token(dir.path(), "fast").await,
        add_token(dir.path(), "slow").await,
    );
    let limits = AbuseLimits {
        node_calls_per_second: 1.0,
        ..AbuseLimits::default()
    };
    let running = start_limited(dir.path(), 1, 3, limits).await;
    let mut c = client(&running.url).await;
    let (fast, slow) = (enrol(&mut c, &fast).await, enrol(&mut c, &slow).await);
    let before = refusals("node_call_rate");
    // Calls as fast as they go until the bucket (a burst of two, refilled one a second) runs
    // dry: the first is served, and the one past the rate is refused with the status a node
    // backs off on. No count per unit of time is assumed.
    let mut codes = Vec::new();
    while !codes.contains(&Some(Code::ResourceExhausted)) {
        assert!(codes.len() < 1000, "no call was refused: {codes:?}");
        let beat = c
            .heartbeat(authed(&fast, HeartbeatRequest { round: 0 }))
            .await;
        codes.push(beat.err().map(|s| s.code()));
    }
    assert_eq!(codes[0], None, "{codes:?}");
    assert!(
        codes
            .iter()
            .all(|c| matches!(c, None | Some(Code::ResourceExhausted))),
        "{codes:?}"
    );
    let refused = codes.iter().filter(|c| c.is_some()).count();
    assert_eq!(refusals("node_call_rate"), before + refused as u64);
    // Another node is not held to the first one's calls.
    c.heartbeat(authed(&slow, HeartbeatRequest { round: 0 }))
        .await
        .expect("within its own rate");
    running.stop().await;
}

#[tokio::test]
async fn a_node_streams_one_upload_at_a_time_and_keeps_at_most_its_staged_bytes() {
    metrics();
    let dir = tempfile::tempdir().expect("tempdir");
    let token = add_token(dir.path(), "site-a").await;
    let bytes = update_bytes(vec![0.5; 6], 10);
    let limits = AbuseLimits {
        uploads_per_node: 1,
        staged_bytes_per_node: Some(bytes.len() as u64),
        ..AbuseLimits::default()
    };
    let running = start_limited(dir.path(), 1, 1, limits).await;
    let mut c = client(&running.url).await;
    let node = enrol(&mut c, &token).await;
    let task = pull(&mut c, &node).await;
    let parts = chunks(task.round, &bytes, 0, 100);

    // An upload left open after its first chunk holds the node's one slot.
    let (send, receive) = tokio::sync::mpsc::channel::<UploadChunk>(4);
    send.send(parts[0].clone()).await.expect("queued");
    let held = tokio::spawn({
        let (mut c, node) = (c.clone(), node.clone());
        async move {
            let stream = tokio_stream::wrappers::ReceiverStream::new(receive);
            c.upload(authed(&node, stream)).await
        }
    });
    let staged = dir
        .path()
        .join("uploads")
        .join(format!("node-{}", node.split('.').next().expect("id")));
    for _ in 0..100 {
        let grown = std::fs::read_dir(&staged)
            .map(|entries| {
                entries
                    .flatten()
                    .any(|e| e.metadata().is_ok_and(|m| m.len() > 0))
            })
            .unwrap_or(false);
        if grown {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = refusals("concurrent_uploads");
    let err = upload(&mut c, &node, parts.clone())
        .await
        .expect_err("a second upload at once");
    assert_eq!(err.code(), Code::Aborted, "{}", err.message());
    assert_eq!(refusals("concurrent_uploads"), before + 1);

    // An upload bigger than the node's staged bytes is refused before anything is kept.
    let before = refusals("staged_bytes");
    drop(send);
    let _ = held.await.expect("the first upload ends");
    let bigger = update_bytes(vec![0.5; 6], 10)
        .into_iter()
        .chain([b' '; 8])
        .collect::<Vec<_>>();
    let err = upload(&mut c, &node, chunks(task.round, &bigger, 0, 100))
        .await
        .expect_err("past the staged-bytes cap");
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    assert!(
        err.message().contains("staged-bytes-per-node"),
        "{}",
        err.message()
    );
    assert_eq!(refusals("staged_bytes"), before + 1);

    // With the slot free again, the node resumes and its update is accepted.
    let receipt = upload(&mut c, &node, chunks(task.round, &bytes, 100, 100))
        .await
        .expect("resumed");
    assert!(receipt.accepted);
    running.stop().await;
}
