//! Durable run state behind one interface: SQLite by default (`sqlite:PATH`), Postgres by URL
//! (`postgres://...`), through sqlx's `Any` driver and SQL that both accept.
//!
//! What is kept: enrolment tokens and node credentials (hashes only), the run (its id, the
//! config it was started with, the open round, the current model and optimizer state by
//! content hash), each finished round's record, each round's cohort, and every accepted update
//! (by content hash). A round's commit is one transaction, so after a crash the store shows
//! either the round still open with its accepted updates, or the round closed — never half.

use sqlx::{AnyPool, Row, any::AnyPoolOptions, migrate::Migrator};

mod identity;

pub use identity::{NodeRow, TokenRow};

use crate::ServerError;

/// Milliseconds since the Unix epoch, for timestamps in the store.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The store's schema, one versioned migration at a time, in a folder per database. The first
/// creates the tables only where missing, so a store made before migrations existed is
/// adopted as version 1 with its rows.
static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("migrations/postgres");

/// Whether `error` comes from another process opening the same SQLite file at the same
/// moment: the file is locked, or that process recorded a migration first (SQLite has no
/// advisory lock to migrate under; the loser's transaction rolled back, and trying again
/// finds the migration applied).
fn is_contended(error: &sqlx::Error) -> bool {
    let said = error.to_string();
    said.contains("database is locked")
        || said.contains("UNIQUE constraint failed: _sqlx_migrations")
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
    /// The nodes whose updates the round folded. Any other update accepted for the round (one
    /// whose fold lost the race with the round's close) is forgotten in the same transaction,
    /// so the store's accepted updates of a committed round are exactly its contributors.
    pub contributors: Vec<String>,
}

/// What the store made of an update it was asked to count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acceptance {
    /// Counted now.
    Accepted,
    /// That node's update for the round was already counted (a replay or a retry).
    Duplicate,
    /// The round is not the run's open round (it closed, or never opened): not counted.
    RoundClosed,
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
                Err(e) if attempts < 50 && is_contended(&e) => {
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

    /// Sets SQLite's journal mode and busy timeout, and brings the schema up to this
    /// release's version (each migration in a transaction of its own; on PostgreSQL under an
    /// advisory lock, so servers starting together migrate once).
    async fn prepare(pool: &AnyPool, sqlite: bool) -> Result<(), sqlx::Error> {
        if sqlite {
            sqlx::query("PRAGMA busy_timeout=5000")
                .execute(pool)
                .await?;
            sqlx::query("PRAGMA journal_mode=WAL").execute(pool).await?;
        }
        let migrations = if sqlite {
            &SQLITE_MIGRATIONS
        } else {
            &POSTGRES_MIGRATIONS
        };
        migrations
            .run(pool)
            .await
            .map_err(|e| sqlx::Error::Migrate(Box::new(e)))
    }

    /// The schema version this store is at: the newest migration applied.
    pub async fn schema_version(&self) -> Result<i64, ServerError> {
        let version: Option<i64> =
            sqlx::query("SELECT MAX(version) FROM _sqlx_migrations WHERE success = TRUE")
                .fetch_one(&self.pool)
                .await?
                .try_get(0)?;
        Ok(version.unwrap_or(0))
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
            sqlx::query(
                "INSERT INTO cohort (round, node_id) VALUES ($1, $2) \
                 ON CONFLICT (round, node_id) DO NOTHING",
            )
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
        sqlx::query(
            "INSERT INTO population (round, nodes) VALUES ($1, $2) \
             ON CONFLICT (round) DO UPDATE SET nodes = excluded.nodes",
        )
        .bind(i64::from(round))
        .bind(nodes as i64)
        .execute(&self.pool)
        .await?;
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

    /// Counts `node`'s update for `round` (blob `id`) if `round` is the run's open round and
    /// no update of that node is counted in it yet. One statement decides both: two servers,
    /// two paths or a retry racing with the same update count it once, and an update that
    /// arrives after its round committed is never counted.
    pub async fn accept(
        &self,
        round: u32,
        node: &str,
        id: &str,
    ) -> Result<Acceptance, ServerError> {
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO accepted (round, node_id, sha256) \
             SELECT $1, $2, $3 WHERE EXISTS (SELECT 1 FROM run WHERE id = 1 AND round = $1) \
             ON CONFLICT (round, node_id) DO NOTHING",
        )
        .bind(i64::from(round))
        .bind(node)
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let acceptance = if inserted == 1 {
            Acceptance::Accepted
        } else {
            let counted = sqlx::query("SELECT 1 FROM accepted WHERE round = $1 AND node_id = $2")
                .bind(i64::from(round))
                .bind(node)
                .fetch_optional(&mut *tx)
                .await?;
            if counted.is_some() {
                Acceptance::Duplicate
            } else {
                Acceptance::RoundClosed
            }
        };
        tx.commit().await?;
        Ok(acceptance)
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
        let counted = sqlx::query("SELECT node_id FROM accepted WHERE round = $1")
            .bind(i64::from(commit.round))
            .fetch_all(&mut *tx)
            .await?;
        for row in counted {
            let node: String = row.try_get(0)?;
            if !commit.contributors.contains(&node) {
                sqlx::query("DELETE FROM accepted WHERE round = $1 AND node_id = $2")
                    .bind(i64::from(commit.round))
                    .bind(&node)
                    .execute(&mut *tx)
                    .await?;
            }
        }
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
