//! A run whose store and blob folder were written before BLAKE3 (blobs named by SHA-256 under
//! `sha256/`, store without versioned migrations) resumes: its model is served under its
//! legacy id and checked with SHA-256, and the next round's blobs are named by BLAKE3.

use crate::support;

use ferry_core::{content, model::sha256_hex};
use sqlx::{AnyConnection, Connection};
use support::*;

/// The store and blob folder the release before BLAKE3 left for a run at round 1.
async fn write_legacy_run(dir: &std::path::Path) -> String {
    let model = initial().to_safetensors().expect("bytes");
    let digits = sha256_hex(&model);
    std::fs::create_dir_all(dir.join("blobs/sha256")).expect("blob folder");
    std::fs::write(dir.join(format!("blobs/sha256/{digits}")), &model).expect("model blob");
    sqlx::any::install_default_drivers();
    let url = format!("sqlite:{}?mode=rwc", dir.join("ferry.db").display());
    let mut old = AnyConnection::connect(&url).await.expect("old store");
    for statement in [
        "CREATE TABLE run (id BIGINT PRIMARY KEY, run_id TEXT NOT NULL, config_hash TEXT NOT NULL, \
         round BIGINT NOT NULL, model_sha TEXT NOT NULL, state_sha TEXT NOT NULL, finished TEXT NOT NULL)",
        "CREATE TABLE accepted (round BIGINT NOT NULL, node_id TEXT NOT NULL, sha256 TEXT NOT NULL, \
         PRIMARY KEY (round, node_id))",
        "CREATE TABLE round_blobs (round BIGINT PRIMARY KEY, shas TEXT NOT NULL)",
    ] {
        sqlx::query(statement)
            .execute(&mut old)
            .await
            .expect(statement);
    }
    sqlx::query(
        "INSERT INTO run (id, run_id, config_hash, round, model_sha, state_sha, finished) \
         VALUES (1, 'legacy', 'test', 1, $1, '', '')",
    )
    .bind(&digits)
    .execute(&mut old)
    .await
    .expect("run row");
    old.close().await.expect("close");
    digits
}

#[tokio::test]
async fn a_run_stored_before_blake3_resumes_and_goes_on_with_blake3() {
    let dir = tempfile::tempdir().expect("tempdir");
    let digits = write_legacy_run(dir.path()).await;
    let token = add_token(dir.path(), "site-a").await;
    let running = start(dir.path(), 1, 1).await;
    assert_eq!(
        running.coordinator.run_id(),
        "legacy",
        "the stored run resumed"
    );
    let mut c = client(&running.url).await;
    let node = enrol(&mut c, &token).await;
    let task = pull(&mut c, &node).await;
    let model = task.model.expect("model");
    assert_eq!(model.hash, format!("{}{digits}", content::LEGACY_SHA256));
    let upload_bytes = update_bytes(vec![0.5; 6], 10);
    let receipt = upload(&mut c, &node, chunks(task.round, &upload_bytes, 0, 1000))
        .await
        .expect("upload");
    assert!(receipt.accepted);
    wait_rounds(&running.coordinator, 1).await;
    let next = running.coordinator.status().await.model_id;
    running.stop().await;
    assert!(
        content::is_valid(&next) && !next.starts_with(content::LEGACY_SHA256),
        "{next}"
    );
    let stored = std::fs::read(dir.path().join(format!("blobs/blake3/{next}"))).expect("new model");
    assert!(content::matches(&next, &stored));
    let update = content::content_id(&upload_bytes);
    assert!(dir.path().join(format!("blobs/blake3/{update}")).is_file());
}
