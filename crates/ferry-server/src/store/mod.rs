//! Durable run state behind one interface: SQLite by default (`sqlite:PATH`), Postgres by URL
//! (`postgres://...`), through sqlx's `Any` driver and SQL that both accept.
//!
//! What is kept: enrolment tokens and node credentials (hashes only), the run (its id, the
//! config it was started with, the open round, the current model and optimizer state by
//! content hash), each finished round's record, each round's cohort, and every accepted update
//! (by content hash). A round's commit is one transaction, so after a crash the store shows
//! either the round still open with its accepted updates, or the round closed — never half.

use sqlx::{AnyPool, Row, any::AnyPoolOptions};

mod identity;

pub use identity::{NodeRow, TokenRow};

use crate::ServerError;

/// Milliseconds since the Unix epoch, for timestamps in the store.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

const SCHEMA: &[&str] = &[
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
];

/// Whether `error` is SQLite's "database is locked" (another process holds the file).
fn is_locked(error: &sqlx::Error) -> bool {
    error.to_string().contains("database is locked")
}

/// The stored state of the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunRow {
    /// Random identifier chosen when the run started.
    pub run_id: String,
    /// Hash of the run configuration it was started with.
    pub config_hash: String,
    /// The open round (the next one to run when none is open).
    pub round: u32,
    /// Content hash of the current global model.
    pub model_sha: String,
    /// Content hash of the server optimizer's state (empty when it has none).
    pub state_sha: String,
    /// Why the run ended; empty while it runs.
    pub finished: String,
}

/// What a finished round changes, committed at once.
#[derive(Debug, Clone)]
pub struct RoundCommit {
    /// The round that closed.
    pub round: u32,
    /// Its record, as JSON.
    pub record_json: String,
    /// The new global model's hash.
    pub model_sha: String,
    /// The optimizer state's hash.
    pub state_sha: String,
    /// Every blob the round wrote for what comes after it (model, optimizer state, the
    /// state broadcast to nodes), so that retention can later remove them.
    pub blobs: Vec<String>,
    /// Set when this round ends the run.
    pub finished: Option<String>,
}

/// The store of a coordinator.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
}

/// Turns `sqlite:PATH` into a URL that creates the file when missing.
fn connect_url(url: &str) -> String {
    if url.starts_with("sqlite:") && !url.contains('?') && !url.contains(":memory:") {
        format!("{url}?mode=rwc")
    } else {
        url.to_string()
    }
}

impl Store {
    /// Opens (creating if needed) the store at `url`: `sqlite:PATH` or `postgres://...`.
    pub async fn open(url: &str) -> Result<Self, ServerError> {
        if !(url.starts_with("sqlite:")
            || url.starts_with("postgres://")
            || url.starts_with("postgresql://"))
        {
            return Err(ServerError::Settings(format!(
                "store '{url}' is not supported; use sqlite:PATH or postgres://USER@HOST/DB"
            )));
        }
        if let Some(path) = url
            .strip_prefix("sqlite:")
            .filter(|p| !p.contains(":memory:"))
        {
            let path = std::path::Path::new(path.trim_start_matches("//"));
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .map_err(ServerError::io(format!("creating {}", dir.display())))?;
            }
        }
        sqlx::any::install_default_drivers();
        let pool = AnyPoolOptions::new()
            .max_connections(if url.starts_with("sqlite:") { 1 } else { 8 })
            .connect(&connect_url(url))
            .await?;
        // Two processes opening a new SQLite file at once (a server starting while `ferry token
        // create` runs) can find it locked while the other switches it to WAL or creates the
        // tables, before any busy timeout applies: try again for a few seconds.
        let mut attempts = 0;
        loop {
            match Self::prepare(&pool, url.starts_with("sqlite:")).await {
                Err(e) if attempts < 50 && is_locked(&e) => {
                    attempts += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                prepared => {
                    prepared?;
                    return Ok(Self { pool });
                }
            }
        }
    }

    /// Sets SQLite's journal mode and busy timeout, and creates the tables.
    async fn prepare(pool: &AnyPool, sqlite: bool) -> Result<(), sqlx::Error> {
        if sqlite {
            sqlx::query("PRAGMA busy_timeout=5000")
                .execute(pool)
                .await?;
            sqlx::query("PRAGMA journal_mode=WAL").execute(pool).await?;
        }
        for statement in SCHEMA {
            sqlx::query(statement).execute(pool).await?;
        }
        Ok(())
    }

    /// The stored run, if one was started.
    pub async fn run(&self) -> Result<Option<RunRow>, ServerError> {
        let row = sqlx::query(
            "SELECT run_id, config_hash, round, model_sha, state_sha, finished FROM run WHERE id = 1",
        )
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| {
            Ok(RunRow {
                run_id: row.try_get(0)?,
                config_hash: row.try_get(1)?,
                round: u32::try_from(row.try_get::<i64, _>(2)?).unwrap_or(0),
                model_sha: row.try_get(3)?,
                state_sha: row.try_get(4)?,
                finished: row.try_get(5)?,
            })
        })
        .transpose()
    }

    /// Records the start of a run.
    pub async fn start_run(&self, run: &RunRow) -> Result<(), ServerError> {
        sqlx::query(
            "INSERT INTO run (id, run_id, config_hash, round, model_sha, state_sha, finished) \
             VALUES (1, $1, $2, $3, $4, $5, $6)",
        )
        .bind(&run.run_id)
        .bind(&run.config_hash)
        .bind(i64::from(run.round))
        .bind(&run.model_sha)
        .bind(&run.state_sha)
        .bind(&run.finished)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records a round's cohort (idempotent).
    pub async fn set_cohort(&self, round: u32, nodes: &[String]) -> Result<(), ServerError> {
        let mut tx = self.pool.begin().await?;
        for node in nodes {
            sqlx::query("DELETE FROM cohort WHERE round = $1 AND node_id = $2")
                .bind(i64::from(round))
                .bind(node)
                .execute(&mut *tx)
                .await?;
            sqlx::query("INSERT INTO cohort (round, node_id) VALUES ($1, $2)")
                .bind(i64::from(round))
                .bind(node)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Records how many nodes `round`'s cohort was drawn from (idempotent): a private round's
    /// noise and denominator depend on it, so a restarted server must plan with the same.
    pub async fn set_population(&self, round: u32, nodes: usize) -> Result<(), ServerError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM population WHERE round = $1")
            .bind(i64::from(round))
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO population (round, nodes) VALUES ($1, $2)")
            .bind(i64::from(round))
            .bind(nodes as i64)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The population stored for `round`, if any.
    pub async fn population(&self, round: u32) -> Result<Option<usize>, ServerError> {
        let row = sqlx::query("SELECT nodes FROM population WHERE round = $1")
            .bind(i64::from(round))
            .fetch_optional(&self.pool)
            .await?;
        Ok(row
            .map(|r| r.try_get::<i64, _>(0))
            .transpose()?
            .map(|n| n as usize))
    }

    /// Ends the run without closing a round (a privacy budget reached before the next one).
    pub async fn finish_run(&self, reason: &str) -> Result<(), ServerError> {
        sqlx::query("UPDATE run SET finished = $1 WHERE id = 1")
            .bind(reason)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The stored cohort of `round`.
    pub async fn cohort(&self, round: u32) -> Result<Vec<String>, ServerError> {
        let rows = sqlx::query("SELECT node_id FROM cohort WHERE round = $1 ORDER BY node_id")
            .bind(i64::from(round))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
    }

    /// Records that `node`'s update for `round` (blob `sha256`) is counted; false if that node
    /// already has an update counted in the round (a replay).
    pub async fn accept(&self, round: u32, node: &str, sha256: &str) -> Result<bool, ServerError> {
        let exists = sqlx::query("SELECT 1 FROM accepted WHERE round = $1 AND node_id = $2")
            .bind(i64::from(round))
            .bind(node)
            .fetch_optional(&self.pool)
            .await?;
        if exists.is_some() {
            return Ok(false);
        }
        sqlx::query("INSERT INTO accepted (round, node_id, sha256) VALUES ($1, $2, $3)")
            .bind(i64::from(round))
            .bind(node)
            .bind(sha256)
            .execute(&self.pool)
            .await?;
        Ok(true)
    }

    /// Takes back an acceptance that the aggregator then refused.
    pub async fn unaccept(&self, round: u32, node: &str) -> Result<(), ServerError> {
        sqlx::query("DELETE FROM accepted WHERE round = $1 AND node_id = $2")
            .bind(i64::from(round))
            .bind(node)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The updates counted in `round`, as `(node, sha256)`, in node order.
    pub async fn accepted(&self, round: u32) -> Result<Vec<(String, String)>, ServerError> {
        let rows =
            sqlx::query("SELECT node_id, sha256 FROM accepted WHERE round = $1 ORDER BY node_id")
                .bind(i64::from(round))
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }

    /// Closes a round: its record, the new model and optimizer state, and the next round, in
    /// one transaction.
    pub async fn commit_round(&self, commit: &RoundCommit) -> Result<(), ServerError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("INSERT INTO rounds (round, record) VALUES ($1, $2)")
            .bind(i64::from(commit.round))
            .bind(&commit.record_json)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE run SET round = $1, model_sha = $2, state_sha = $3, finished = $4 WHERE id = 1",
        )
        .bind(i64::from(commit.round) + 1)
        .bind(&commit.model_sha)
        .bind(&commit.state_sha)
        .bind(commit.finished.clone().unwrap_or_default())
        .execute(&mut *tx)
        .await?;
        sqlx::query("INSERT INTO round_blobs (round, shas) VALUES ($1, $2)")
            .bind(i64::from(commit.round))
            .bind(commit.blobs.join(" "))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The blobs committed `round` wrote (empty for rounds committed before they were
    /// recorded).
    pub async fn round_blobs(&self, round: u32) -> Result<Vec<String>, ServerError> {
        let row = sqlx::query("SELECT shas FROM round_blobs WHERE round = $1")
            .bind(i64::from(round))
            .fetch_optional(&self.pool)
            .await?;
        let shas: String = match row {
            Some(row) => row.try_get(0)?,
            None => String::new(),
        };
        Ok(shas.split_whitespace().map(String::from).collect())
    }

    /// Rewrites committed `round`'s record (with its federated evaluation), and marks the run
    /// finished for `finished` if given, in one transaction.
    pub async fn amend_round(
        &self,
        round: u32,
        record_json: &str,
        finished: Option<&str>,
    ) -> Result<(), ServerError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE rounds SET record = $1 WHERE round = $2")
            .bind(record_json)
            .bind(i64::from(round))
            .execute(&mut *tx)
            .await?;
        if let Some(reason) = finished {
            sqlx::query("UPDATE run SET finished = $1 WHERE id = 1")
                .bind(reason)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Failed attempts recorded for `round` so far.
    pub async fn failed_attempts(&self, round: u32) -> Result<u32, ServerError> {
        let count: i64 = sqlx::query("SELECT COUNT(*) FROM failed_rounds WHERE round = $1")
            .bind(i64::from(round))
            .fetch_one(&self.pool)
            .await?
            .try_get(0)?;
        Ok(u32::try_from(count).unwrap_or(u32::MAX))
    }

    /// Records failed attempt `attempt` at `round` and forgets the attempt's cohort,
    /// population and accepted updates, in one transaction: the retry starts clean, and a
    /// restart does not resume the failed attempt.
    pub async fn fail_round(
        &self,
        round: u32,
        attempt: u32,
        record_json: &str,
    ) -> Result<(), ServerError> {
        let round = i64::from(round);
        let mut tx = self.pool.begin().await?;
        sqlx::query("INSERT INTO failed_rounds (round, attempt, record) VALUES ($1, $2, $3)")
            .bind(round)
            .bind(i64::from(attempt))
            .bind(record_json)
            .execute(&mut *tx)
            .await?;
        for table in ["cohort", "accepted", "population"] {
            sqlx::query(&format!("DELETE FROM {table} WHERE round = $1"))
                .bind(round)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The records of all failed round attempts, as JSON, in order.
    pub async fn failed_round_records(&self) -> Result<Vec<String>, ServerError> {
        let rows = sqlx::query("SELECT record FROM failed_rounds ORDER BY round, attempt")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
    }

    /// The records of all finished rounds, as JSON, in round order.
    pub async fn round_records(&self) -> Result<Vec<String>, ServerError> {
        let rows = sqlx::query("SELECT record FROM rounds ORDER BY round")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store(dir: &tempfile::TempDir) -> Store {
        let url = format!("sqlite:{}", dir.path().join("db/ferry.db").display());
        Store::open(&url).await.expect("open")
    }

    /// Empties every table, so a shared Postgres database starts clean.
    async fn wipe(store: &Store) {
        for table in [
            "tokens",
            "nodes",
            "run",
            "rounds",
            "cohort",
            "accepted",
            "population",
            "failed_rounds",
        ] {
            sqlx::query(&format!("DELETE FROM {table}"))
                .execute(&store.pool)
                .await
                .expect("wipe");
        }
    }

    #[tokio::test]
    async fn sqlite_tokens_enrol_exactly_one_node_and_revocation_reaches_the_node() {
        let dir = tempfile::tempdir().expect("tempdir");
        tokens_enrol_once_and_revocation_reaches_the_node(&store(&dir).await).await;
    }

    #[tokio::test]
    async fn sqlite_accepted_updates_count_once_and_survive_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite:{}", dir.path().join("db/ferry.db").display());
        accepted_updates_count_once_and_survive_reopening(&url).await;
    }

    /// The same behaviour on Postgres, through the same code. Needs a database to write to:
    /// `FERRY_TEST_POSTGRES_URL=postgres://USER@HOST:PORT/DB` (its Ferry tables are emptied).
    #[tokio::test]
    async fn postgres_behaves_like_sqlite() {
        let Ok(url) = std::env::var("FERRY_TEST_POSTGRES_URL") else {
            eprintln!("FERRY_TEST_POSTGRES_URL is not set; the Postgres store was not exercised");
            return;
        };
        let store = Store::open(&url).await.expect("open postgres");
        wipe(&store).await;
        tokens_enrol_once_and_revocation_reaches_the_node(&store).await;
        wipe(&store).await;
        accepted_updates_count_once_and_survive_reopening(&url).await;
        wipe(&store).await;
    }

    async fn tokens_enrol_once_and_revocation_reaches_the_node(store: &Store) {
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
        assert!(
            !store
                .node("n1")
                .await
                .expect("node")
                .expect("exists")
                .revoked
        );
        assert!(store.revoke("site-1").await.expect("revoke"));
        assert!(
            store
                .node("n1")
                .await
                .expect("node")
                .expect("exists")
                .revoked
        );
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
    }

    async fn accepted_updates_count_once_and_survive_reopening(url: &str) {
        let run = RunRow {
            run_id: "r".into(),
            config_hash: "c".into(),
            round: 1,
            model_sha: "m0".into(),
            state_sha: String::new(),
            finished: String::new(),
        };
        {
            let store = Store::open(url).await.expect("open");
            store.start_run(&run).await.expect("start");
            store
                .set_cohort(1, &["a".into(), "b".into()])
                .await
                .expect("cohort");
            store
                .set_cohort(1, &["b".into()])
                .await
                .expect("idempotent");
            assert!(store.accept(1, "a", "x").await.expect("accept"));
            assert!(!store.accept(1, "a", "x").await.expect("replay"));
            store.set_population(1, 7).await.expect("population");
            store.set_population(1, 9).await.expect("idempotent");
        }
        let store = Store::open(url).await.expect("reopen");
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
            })
            .await
            .expect("commit");
        let run = store.run().await.expect("run").expect("exists");
        assert_eq!((run.round, run.model_sha.as_str()), (2, "m1"));
        assert_eq!(store.round_records().await.expect("records"), ["{}"]);
        assert_eq!(store.round_blobs(1).await.expect("blobs"), ["m1"]);
        assert!(store.round_blobs(2).await.expect("none yet").is_empty());
        // A failed attempt at round 2 is recorded and leaves nothing of itself behind.
        store.set_cohort(2, &["a".into()]).await.expect("cohort");
        store.set_population(2, 3).await.expect("population");
        assert!(store.accept(2, "a", "y").await.expect("accept"));
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
        assert!(
            store
                .accept(2, "a", "y")
                .await
                .expect("the retry accepts again")
        );
        store.finish_run("budget_exhausted").await.expect("finish");
        let run = store.run().await.expect("run").expect("exists");
        assert_eq!((run.round, run.finished.as_str()), (2, "budget_exhausted"));
    }
}
