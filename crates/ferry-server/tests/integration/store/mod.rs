//! The store's test suite, run on SQLite and on PostgreSQL alike: every behaviour the
//! coordinator relies on must hold on both.

mod backends;
mod relays;

use backends::{Backend, on_both_backends};
use std::time::Duration;

use ferry_server::{
    error::ErrorKind,
    store::{Acceptance, Campaign, RoundCommit, RunRow, Store},
};
use sqlx::{AnyConnection, Connection};

on_both_backends!(
    tokens_enrol_exactly_one_node_and_revocation_reaches_the_node,
    accepted_updates_count_once_and_survive_reopening,
    racing_acceptances_of_one_update_count_it_once,
    a_store_made_before_migrations_is_adopted_with_its_rows,
    servers_and_tools_opening_a_new_store_at_once_migrate_it_once,
    one_server_holds_the_lease_and_a_lapsed_holder_is_fenced_out,
    a_restarted_holder_takes_its_lease_back_at_once,
);

/// The schema version this release's migrations bring a store to.
const LATEST_SCHEMA: i64 = 5;

async fn tokens_enrol_exactly_one_node_and_revocation_reaches_the_node(backend: Backend) {
    let store = Store::open(&backend.url()).await.expect("open");
    store.add_token("site-1", "h1").await.expect("add");
    assert_eq!(store.fleet_capacity().await.expect("capacity"), (0, 1));
    assert!(store.add_token("site-1", "h2").await.is_err(), "name taken");
    assert_eq!(
        store.enrol("h1", "n1", "s1").await.expect("enrol"),
        Some("site-1".into())
    );
    assert_eq!(
        store.enrol("h1", "n2", "s2").await.expect("enrol"),
        None,
        "one-time"
    );
    assert_eq!(store.enrol("nope", "n3", "s3").await.expect("enrol"), None);
    assert_eq!(store.fleet_capacity().await.expect("capacity"), (1, 0));
    let node = |id: &'static str| {
        let store = store.clone();
        async move { store.node(id).await.expect("node").expect("exists") }
    };
    assert!(!node("n1").await.revoked);
    assert!(store.revoke("site-1").await.expect("revoke"));
    assert!(node("n1").await.revoked);
    assert!(!store.revoke("site-9").await.expect("revoke"));
    store.add_token("site-2", "h4").await.expect("add");
    let listed = store.tokens().await.expect("tokens");
    let state: Vec<(&str, bool, bool)> = listed
        .iter()
        .map(|t| (t.name.as_str(), t.used, t.revoked))
        .collect();
    assert_eq!(state, [("site-1", true, true), ("site-2", false, false)]);
    store
        .add_token("site-1", "h3")
        .await
        .expect("a revoked name can be reused");
    assert_eq!(
        store.enrol("h3", "n4", "s4").await.expect("enrol"),
        Some("site-1".into())
    );
}

async fn accepted_updates_count_once_and_survive_reopening(backend: Backend) {
    let url = backend.url();
    let run = RunRow {
        run_id: "r".into(),
        config_hash: "c".into(),
        round: 1,
        model_sha: "m0".into(),
        state_sha: String::new(),
        finished: String::new(),
    };
    {
        let store = Store::open(&url).await.expect("open");
        store.start_run(&run).await.expect("start");
        store
            .set_cohort(1, &["a".into(), "b".into()])
            .await
            .expect("cohort");
        store
            .set_cohort(1, &["b".into()])
            .await
            .expect("idempotent");
        assert_eq!(
            store.accept(1, "a", "x").await.expect("accept"),
            Acceptance::Accepted
        );
        assert_eq!(
            store.accept(1, "a", "x").await.expect("replay"),
            Acceptance::Duplicate
        );
        assert_eq!(
            store.accept(1, "c", "z").await.expect("accept"),
            Acceptance::Accepted
        );
        store.unaccept(1, "c").await.expect("unaccept");
        assert_eq!(
            store.accept(2, "a", "y").await.expect("a later round"),
            Acceptance::RoundClosed
        );
        store.set_population(1, 7).await.expect("population");
        store.set_population(1, 9).await.expect("idempotent");
    }
    let store = Store::open(&url).await.expect("reopen");
    assert_eq!(
        store.schema_version().await.expect("version"),
        LATEST_SCHEMA
    );
    assert_eq!(store.run().await.expect("run"), Some(run.clone()));
    assert_eq!(store.cohort(1).await.expect("cohort"), ["a", "b"]);
    assert_eq!(store.population(1).await.expect("population"), Some(9));
    assert_eq!(store.population(2).await.expect("population"), None);
    assert_eq!(
        store.accepted(1).await.expect("accepted"),
        [("a".into(), "x".into())]
    );
    store
        .commit_round(&RoundCommit {
            round: 1,
            record_json: "{}".into(),
            model_sha: "m1".into(),
            state_sha: "s1".into(),
            blobs: vec!["m1".into()],
            finished: None,
            contributors: vec!["a".into()],
        })
        .await
        .expect("commit");
    // A committed round counts nothing more.
    assert_eq!(
        store.accept(1, "b", "w").await.expect("late"),
        Acceptance::RoundClosed
    );
    let run = store.run().await.expect("run").expect("exists");
    assert_eq!((run.round, run.model_sha.as_str()), (2, "m1"));
    assert_eq!(store.round_records().await.expect("records"), ["{}"]);
    assert_eq!(store.round_blobs(1).await.expect("blobs"), ["m1"]);
    assert!(store.round_blobs(2).await.expect("none yet").is_empty());
    // A failed attempt at round 2 is recorded and leaves nothing of itself behind.
    store.set_cohort(2, &["a".into()]).await.expect("cohort");
    store.set_population(2, 3).await.expect("population");
    assert_eq!(
        store.accept(2, "a", "y").await.expect("accept"),
        Acceptance::Accepted
    );
    assert_eq!(store.failed_attempts(2).await.expect("count"), 0);
    store.fail_round(2, 1, "{\"a\":1}").await.expect("fail");
    store.fail_round(2, 2, "{\"a\":2}").await.expect("fail");
    assert_eq!(store.failed_attempts(2).await.expect("count"), 2);
    assert!(store.cohort(2).await.expect("cohort").is_empty());
    assert!(store.accepted(2).await.expect("accepted").is_empty());
    assert_eq!(store.population(2).await.expect("population"), None);
    assert_eq!(
        store.failed_round_records().await.expect("failed"),
        ["{\"a\":1}", "{\"a\":2}"]
    );
    let unmoved = store.run().await.expect("run").expect("exists");
    assert_eq!((unmoved.round, unmoved.model_sha.as_str()), (2, "m1"));
    assert_eq!(
        store
            .accept(2, "a", "y")
            .await
            .expect("the retry accepts again"),
        Acceptance::Accepted
    );
    // An asynchronous update keeps the round it was trained on, for its staleness.
    assert_eq!(
        store
            .accept_trained_on(2, 1, "b", "v")
            .await
            .expect("a stale update"),
        Acceptance::Accepted
    );
    assert_eq!(
        store.accepted_trained_on(2).await.expect("accepted"),
        [("a".into(), "y".into(), 2), ("b".into(), "v".into(), 1)]
    );
    store.unaccept(2, "b").await.expect("unaccept");
    store.unaccept(2, "a").await.expect("unaccept");
    assert!(store.accepted(2).await.expect("accepted").is_empty());
    store.finish_run("budget_exhausted").await.expect("finish");
    let run = store.run().await.expect("run").expect("exists");
    assert_eq!((run.round, run.finished.as_str()), (2, "budget_exhausted"));
}

/// The same node's update arriving on many connections at once (a retry racing its first
/// try, or two paths) is counted exactly once; a committed round forgets any update it did not
/// fold (one that lost the race with the close).
async fn racing_acceptances_of_one_update_count_it_once(backend: Backend) {
    let store = Store::open(&backend.url()).await.expect("open");
    store
        .start_run(&RunRow {
            run_id: "r".into(),
            config_hash: "c".into(),
            round: 5,
            model_sha: "m4".into(),
            state_sha: String::new(),
            finished: String::new(),
        })
        .await
        .expect("start");
    let attempts: Vec<_> = (0..16)
        .map(|i| {
            let store = store.clone();
            let node = if i % 2 == 0 { "node-a" } else { "node-b" };
            tokio::spawn(async move { store.accept(5, node, "sha").await })
        })
        .collect();
    let mut counted = 0;
    for attempt in attempts {
        match attempt.await.expect("task").expect("accept") {
            Acceptance::Accepted => counted += 1,
            Acceptance::Duplicate => {}
            Acceptance::RoundClosed => panic!("round 5 is open"),
        }
    }
    assert_eq!(counted, 2);
    assert_eq!(
        store.accepted(5).await.expect("accepted"),
        [
            ("node-a".into(), "sha".into()),
            ("node-b".into(), "sha".into())
        ]
    );
    store
        .commit_round(&RoundCommit {
            round: 5,
            record_json: "{}".into(),
            model_sha: "m5".into(),
            state_sha: String::new(),
            blobs: vec![],
            finished: None,
            contributors: vec!["node-b".into()],
        })
        .await
        .expect("commit");
    assert_eq!(
        store.accepted(5).await.expect("accepted"),
        [("node-b".into(), "sha".into())]
    );
}

/// The tables exactly as the release before versioned migrations created them.
const UNVERSIONED_SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS tokens (name TEXT PRIMARY KEY, token_hash TEXT NOT NULL UNIQUE, \
     created_ms BIGINT NOT NULL, used BIGINT NOT NULL DEFAULT 0, revoked BIGINT NOT NULL DEFAULT 0)",
    "CREATE TABLE IF NOT EXISTS nodes (node_id TEXT PRIMARY KEY, name TEXT NOT NULL, \
     secret_hash TEXT NOT NULL, enrolled_ms BIGINT NOT NULL, revoked BIGINT NOT NULL DEFAULT 0)",
    "CREATE TABLE IF NOT EXISTS run (id BIGINT PRIMARY KEY, run_id TEXT NOT NULL, \
     config_hash TEXT NOT NULL, round BIGINT NOT NULL, model_sha TEXT NOT NULL, \
     state_sha TEXT NOT NULL, finished TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS rounds (round BIGINT PRIMARY KEY, record TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS cohort (round BIGINT NOT NULL, node_id TEXT NOT NULL, \
     PRIMARY KEY (round, node_id))",
    "CREATE TABLE IF NOT EXISTS accepted (round BIGINT NOT NULL, node_id TEXT NOT NULL, \
     sha256 TEXT NOT NULL, PRIMARY KEY (round, node_id))",
    "CREATE TABLE IF NOT EXISTS population (round BIGINT PRIMARY KEY, nodes BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS failed_rounds (round BIGINT NOT NULL, attempt BIGINT NOT NULL, \
     record TEXT NOT NULL, PRIMARY KEY (round, attempt))",
    "CREATE TABLE IF NOT EXISTS round_blobs (round BIGINT PRIMARY KEY, shas TEXT NOT NULL)",
    "INSERT INTO run (id, run_id, config_hash, round, model_sha, state_sha, finished) \
     VALUES (1, 'old-run', 'cfg', 4, 'm3', '', '')",
    "INSERT INTO tokens (name, token_hash, created_ms) VALUES ('site-1', 'h1', 0)",
    "INSERT INTO accepted (round, node_id, sha256) VALUES (4, 'n1', 'u1')",
    "INSERT INTO rounds (round, record) VALUES (3, '{\"round\":3}')",
    "INSERT INTO round_blobs (round, shas) VALUES (3, 'm3 s3')",
];

/// A store written by the release before versioned migrations opens, is brought to the
/// latest schema, and keeps its run, tokens, accepted updates and records; the blobs it refers
/// to were named by SHA-256, and their ids now say so.
async fn a_store_made_before_migrations_is_adopted_with_its_rows(backend: Backend) {
    let url = backend.url();
    if let Backend::Sqlite(dir) = &backend {
        std::fs::create_dir_all(dir.path().join("db")).expect("folder");
    }
    sqlx::any::install_default_drivers();
    let sqlite_url = format!("{url}?mode=rwc");
    let mut old = AnyConnection::connect(if url.starts_with("sqlite:") {
        &sqlite_url
    } else {
        &url
    })
    .await
    .expect("connect");
    for statement in UNVERSIONED_SCHEMA {
        sqlx::query(statement)
            .execute(&mut old)
            .await
            .expect(statement);
    }
    old.close().await.expect("close");

    let store = Store::open(&url).await.expect("the old store opens");
    assert_eq!(
        store.schema_version().await.expect("version"),
        LATEST_SCHEMA
    );
    let run = store.run().await.expect("run").expect("kept");
    assert_eq!(
        (
            run.run_id.as_str(),
            run.round,
            run.model_sha.as_str(),
            run.state_sha.as_str()
        ),
        ("old-run", 4, "sha256:m3", "")
    );
    assert_eq!(
        store.accepted(4).await.expect("accepted"),
        [("n1".into(), "sha256:u1".into())]
    );
    assert_eq!(
        store.round_blobs(3).await.expect("blobs"),
        ["sha256:m3", "sha256:s3"]
    );
    assert_eq!(
        store.round_records().await.expect("records"),
        ["{\"round\":3}"]
    );
    assert_eq!(
        store.enrol("h1", "n1", "s").await.expect("enrol"),
        Some("site-1".into())
    );
    drop(store);
    // Opening again applies nothing twice.
    let store = Store::open(&url).await.expect("reopen");
    assert_eq!(
        store.schema_version().await.expect("version"),
        LATEST_SCHEMA
    );
    assert_eq!(
        store.run().await.expect("run").expect("kept").model_sha,
        "sha256:m3"
    );
}

/// A server starting while `ferry token create` runs (or two servers starting together) open
/// a new store at the same moment: each open succeeds, and the schema is migrated once.
async fn servers_and_tools_opening_a_new_store_at_once_migrate_it_once(backend: Backend) {
    let url = backend.url();
    let opening: Vec<_> = (0..8)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { Store::open(&url).await })
        })
        .collect();
    for open in opening {
        let store = open.await.expect("task").expect("opens");
        assert_eq!(
            store.schema_version().await.expect("version"),
            LATEST_SCHEMA
        );
    }
}

/// A run at round 1, for the lease tests to write to.
fn a_run() -> RunRow {
    RunRow {
        run_id: "r".into(),
        config_hash: "c".into(),
        round: 1,
        model_sha: "m".into(),
        state_sha: String::new(),
        finished: String::new(),
    }
}

async fn one_server_holds_the_lease_and_a_lapsed_holder_is_fenced_out(backend: Backend) {
    let store = Store::open(&backend.url()).await.expect("open");
    store.start_run(&a_run()).await.expect("run");
    let short = Duration::from_millis(300);
    let Campaign::Won { epoch: first } = store
        .campaign("a", "https://a:7443", short)
        .await
        .expect("bid")
    else {
        panic!("the first bid wins");
    };
    match store
        .campaign("b", "https://b:7443", short)
        .await
        .expect("bid")
    {
        Campaign::Held(lease) => {
            assert_eq!(
                (lease.holder.as_str(), lease.address.as_str()),
                ("a", "https://a:7443")
            );
            assert_eq!(lease.epoch, first);
            assert!(lease.expires_in_ms > 0);
        }
        won => panic!("a live lease is not taken: {won:?}"),
    }
    assert!(store.renew(first, short).await.expect("renew"));
    let a = store.clone().fenced(first);
    assert_eq!(
        a.accept(1, "n1", "u1").await.expect("accept"),
        Acceptance::Accepted
    );
    // a stops renewing (paused, cut off); its lease lapses and b takes over.
    tokio::time::sleep(short * 2).await;
    let Campaign::Won { epoch: second } = store
        .campaign("b", "https://b:7443", short)
        .await
        .expect("bid")
    else {
        panic!("a lapsed lease goes to the next bidder");
    };
    assert_eq!(second, first + 1);
    let b = store.clone().fenced(second);
    // a wakes up believing it leads: every write it tries is refused, and changes nothing.
    assert!(
        !store.renew(first, short).await.expect("renew"),
        "a's lease is gone"
    );
    for refused in [
        a.accept(1, "n2", "u2").await.map(drop),
        a.unaccept(1, "n1").await,
        a.finish_run("done").await,
        a.set_cohort(1, &["n3".into()]).await,
    ] {
        assert_eq!(refused.expect_err("fenced").kind(), ErrorKind::Fenced);
    }
    assert_eq!(
        store.accepted(1).await.expect("accepted"),
        vec![("n1".into(), "u1".into())]
    );
    assert!(store.cohort(1).await.expect("cohort").is_empty());
    assert_eq!(store.run().await.expect("run").expect("a run").finished, "");
    // b writes under its own epoch.
    assert_eq!(
        b.accept(1, "n2", "u2").await.expect("accept"),
        Acceptance::Accepted
    );
    b.resign(second).await.expect("resign");
    assert!(
        matches!(
            store.campaign("c", "https://c:7443", short).await.expect("bid"),
            Campaign::Won { epoch } if epoch == second + 1
        ),
        "a resigned lease goes at the next bid"
    );
}

async fn a_restarted_holder_takes_its_lease_back_at_once(backend: Backend) {
    let store = Store::open(&backend.url()).await.expect("open");
    let long = Duration::from_secs(600);
    let Campaign::Won { epoch } = store
        .campaign("a", "https://a:7443", long)
        .await
        .expect("bid")
    else {
        panic!("the first bid wins");
    };
    // The same server, restarted, need not wait for its own lease to lapse; its old
    // incarnation's epoch is fenced out all the same.
    assert_eq!(
        store
            .campaign("a", "https://a:7443", long)
            .await
            .expect("bid"),
        Campaign::Won { epoch: epoch + 1 }
    );
    assert!(!store.renew(epoch, long).await.expect("renew"));
    assert!(matches!(
        store
            .campaign("b", "https://b:7443", long)
            .await
            .expect("bid"),
        Campaign::Held(_)
    ));
}
