//! Retention: with `keep_rounds`, a committed round's blobs that only older rounds used are
//! removed from the blob store, and blobs a newer round shares are kept.

use crate::support;

use ferry_core::content::content_id;
use ferry_server::{blobs::Blobs, coordinator::RunSpec};
use support::*;

#[tokio::test]
async fn blobs_older_than_the_kept_rounds_go_and_shared_ones_stay() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token = add_token(dir.path(), "site-a").await;
    let spec = RunSpec {
        keep_rounds: Some(1),
        ..spec(3, 1)
    };
    let running = start_with(dir.path(), spec, None).await;
    let mut c = client(&running.url).await;
    let node = enrol(&mut c, &token).await;
    let first = update_bytes(vec![0.25; 6], 10);
    let shared = update_bytes(vec![0.5; 6], 10);
    let mut models = Vec::new();
    for (round, bytes) in [&first, &shared, &shared].into_iter().enumerate() {
        let task = pull(&mut c, &node).await;
        assert_eq!(task.round as usize, round + 1);
        models.push(task.model.expect("model").hash);
        let receipt = upload(&mut c, &node, chunks(task.round, bytes, 0, 1000))
            .await
            .expect("upload");
        assert!(receipt.accepted);
        wait_rounds(&running.coordinator, round + 1).await;
    }
    // A round's blobs are pruned after its commit (which the history shows) and before the
    // coordinator moves past it (which its status shows).
    let mut status = running.coordinator.status().await;
    for _ in 0..100 {
        if status.round > 3 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        status = running.coordinator.status().await;
    }
    assert!(status.round > 3, "round 3 never closed: {status:?}");
    running.stop().await;

    let blobs = Blobs::local(&dir.path().join("blobs")).expect("blobs");
    let kept = |sha: &str| {
        let blobs = &blobs;
        let sha = sha.to_string();
        async move { blobs.size(&sha).await.is_ok() }
    };
    // Round 1's update and the model round 1 made (round 2's task) are gone.
    assert!(!kept(&content_id(&first)).await, "round 1's update removed");
    assert!(!kept(&models[1]).await, "round 1's model removed");
    // Round 2 is older than the one round kept: the model it made goes, but the update it
    // shares with round 3 stays.
    assert!(!kept(&models[2]).await, "round 2's model removed");
    assert!(
        kept(&content_id(&shared)).await,
        "a blob round 3 still uses stays"
    );
    // The initial model (no round made it) and the current model stay.
    assert!(kept(&models[0]).await, "the initial model stays");
    assert!(kept(&status.model_id).await, "the current model stays");
}
