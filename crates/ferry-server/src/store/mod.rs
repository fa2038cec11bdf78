//! Durable run state behind one interface: SQLite by default (`sqlite:PATH`), Postgres by URL
//! (`postgres://...`), through sqlx's `Any` driver and SQL that both accept.
//!
//! What is kept: enrolment tokens and node credentials (hashes only), the run (its id, the
//! config it was started with, the open round, the current model and optimizer state by
//! content hash), each finished round's record, each round's cohort, and every accepted update
//! (by content hash). A round's commit is one transaction, so after a crash the store shows
//! either the round still open with its accepted updates, or the round closed — never half.

use std::time::Duration;

use sqlx::{Any, AnyPool, Row, Transaction, any::AnyPoolOptions, migrate::Migrator};

mod identity;
mod lease;
mod partial;
mod rounds;

pub use identity::{Enrolled, IdentityKind, NodeRow, TokenRow};
pub use lease::{Campaign, Lease};
pub use partial::PartialAcceptance;
pub use rounds::RoundCommit;

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
        || said.contains("duplicate column name")
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
    /// Whether the database is PostgreSQL (else SQLite): the few statements the two spell
    /// differently (the database clock) are chosen by it.
    postgres: bool,
    /// The lease epoch this handle writes under (see [`Store::fenced`]); `None` for a store
    /// with one server, or for the CLI's own commands.
    fence: Option<i64>,
    /// How long a call waits for an unreachable database before failing (see
    /// [`Store::waiting_up_to`]); zero fails at once.
    patience: Duration,
}

/// How long a PostgreSQL session may sit in an open transaction: a server paused mid-
/// transaction (SIGSTOP, a frozen VM) must not hold the lease row's lock for ever and keep a
/// standby from taking over.
const IDLE_IN_TRANSACTION: &str = "SET idle_in_transaction_session_timeout = 5000";

/// Runs `call` again while it fails for a reason that may pass (see
/// [`ServerError::is_retryable`]) and `patience` lasts, logging each wait.
async fn retrying<T, F>(
    patience: Duration,
    what: &str,
    mut call: impl FnMut() -> F,
) -> Result<T, ServerError>
where
    F: std::future::Future<Output = Result<T, ServerError>>,
{
    let started = std::time::Instant::now();
    let mut pause = Duration::from_millis(250);
    loop {
        match call().await {
            Err(e) if e.is_retryable() && started.elapsed() < patience => {
                tracing::warn!(
                    "the store cannot be reached while {what} ({e}); trying again in {:.1} s",
                    pause.as_secs_f64()
                );
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            done => return done,
        }
    }
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
        let postgres = !url.starts_with("sqlite:");
        let pool = AnyPoolOptions::new()
            .max_connections(if postgres { 8 } else { 1 })
            // A database that is down fails a call within seconds (and a patient store tries
            // again), rather than after sqlx's default of half a minute.
            .acquire_timeout(Duration::from_secs(5))
            .after_connect(move |connection, _| {
                Box::pin(async move {
                    if postgres {
                        sqlx::query(IDLE_IN_TRANSACTION).execute(connection).await?;
                    }
                    Ok(())
                })
            })
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
                    return Ok(Self {
                        pool,
                        postgres,
                        fence: None,
                        patience: Duration::ZERO,
                    });
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

    /// This store, writing under lease `epoch`: every state-changing transaction first checks
    /// that the lease still has that epoch (and on PostgreSQL locks its row until it commits),
    /// so a server that lost the lease writes nothing, even if it has not noticed yet.
    pub fn fenced(mut self, epoch: i64) -> Self {
        self.fence = Some(epoch);
        self
    }

    /// This store, waiting up to `patience` for a database that cannot be reached (restarting,
    /// a network cut), saying in the log why it waits, rather than failing the call.
    pub fn waiting_up_to(mut self, patience: Duration) -> Self {
        self.patience = patience;
        self
    }

    /// Whether the store is PostgreSQL, which several servers can share (SQLite is one
    /// host's file).
    pub fn is_shared(&self) -> bool {
        self.postgres
    }

    /// Begins a state-changing transaction, checked against the fence.
    async fn begin(&self) -> Result<Transaction<'static, Any>, ServerError> {
        let mut tx = self.pool.begin().await?;
        if let Some(epoch) = self.fence {
            let held = sqlx::query("UPDATE lease SET epoch = epoch WHERE id = 1 AND epoch = $1")
                .bind(epoch)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if held != 1 {
                return Err(ServerError::Fenced { epoch });
            }
        }
        Ok(tx)
    }

    /// Runs `call` (one transaction or one read, safe to repeat when it failed), again while
    /// it fails for a reason that may pass and the store's patience lasts.
    async fn patiently<T, F>(&self, what: &str, call: impl FnMut() -> F) -> Result<T, ServerError>
    where
        F: std::future::Future<Output = Result<T, ServerError>>,
    {
        retrying(self.patience, what, call).await
    }

    /// Opens the store at `url` like [`Store::open`], waiting up to `patience` (and saying why
    /// in the log) while the database cannot be reached, as when it restarts; the store then
    /// waits the same way on every call ([`Store::waiting_up_to`]).
    pub async fn open_waiting(url: &str, patience: Duration) -> Result<Self, ServerError> {
        let store = retrying(patience, "opening the store", || Self::open(url)).await?;
        Ok(store.waiting_up_to(patience))
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
        self.patiently("reading the run", move || async move {
            let row = sqlx::query(
                "SELECT run_id, config_hash, round, model_sha, state_sha, finished \
                 FROM run WHERE id = 1",
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
        })
        .await
    }

    /// Records the start of a run.
    pub async fn start_run(&self, run: &RunRow) -> Result<(), ServerError> {
        self.patiently("recording the run's start", move || async move {
            let mut tx = self.begin().await?;
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
            .execute(&mut *tx)
            .await?;
            Ok(tx.commit().await?)
        })
        .await
    }

    /// Records a round's cohort (idempotent).
    pub async fn set_cohort(&self, round: u32, nodes: &[String]) -> Result<(), ServerError> {
        self.patiently("recording a cohort", move || async move {
            let mut tx = self.begin().await?;
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
            Ok(tx.commit().await?)
        })
        .await
    }

    /// Records how many nodes `round`'s cohort was drawn from (idempotent): a private round's
    /// noise and denominator depend on it, so a restarted server must plan with the same.
    pub async fn set_population(&self, round: u32, nodes: usize) -> Result<(), ServerError> {
        self.patiently("recording a round's population", move || async move {
            let mut tx = self.begin().await?;
            sqlx::query(
                "INSERT INTO population (round, nodes) VALUES ($1, $2) \
                 ON CONFLICT (round) DO UPDATE SET nodes = excluded.nodes",
            )
            .bind(i64::from(round))
            .bind(nodes as i64)
            .execute(&mut *tx)
            .await?;
            Ok(tx.commit().await?)
        })
        .await
    }

    /// The population stored for `round`, if any.
    pub async fn population(&self, round: u32) -> Result<Option<usize>, ServerError> {
        self.patiently("reading a round's population", move || async move {
            let row = sqlx::query("SELECT nodes FROM population WHERE round = $1")
                .bind(i64::from(round))
                .fetch_optional(&self.pool)
                .await?;
            Ok(row
                .map(|r| r.try_get::<i64, _>(0))
                .transpose()?
                .map(|n| n as usize))
        })
        .await
    }

    /// Ends the run without closing a round (a privacy budget reached before the next one).
    pub async fn finish_run(&self, reason: &str) -> Result<(), ServerError> {
        self.patiently("recording the run's end", move || async move {
            let mut tx = self.begin().await?;
            sqlx::query("UPDATE run SET finished = $1 WHERE id = 1")
                .bind(reason)
                .execute(&mut *tx)
                .await?;
            Ok(tx.commit().await?)
        })
        .await
    }

    /// The stored cohort of `round`.
    pub async fn cohort(&self, round: u32) -> Result<Vec<String>, ServerError> {
        self.patiently("reading a cohort", move || async move {
            let rows = sqlx::query("SELECT node_id FROM cohort WHERE round = $1 ORDER BY node_id")
                .bind(i64::from(round))
                .fetch_all(&self.pool)
                .await?;
            rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
        })
        .await
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
        self.accept_trained_on(round, round, node, id).await
    }

    /// [`Store::accept`] for an asynchronous update trained on the model of version
    /// `trained_on` (an earlier round), which is kept with it.
    pub async fn accept_trained_on(
        &self,
        round: u32,
        trained_on: u32,
        node: &str,
        id: &str,
    ) -> Result<Acceptance, ServerError> {
        self.patiently("counting an update", move || async move {
            let mut tx = self.begin().await?;
            let inserted = sqlx::query(
                "INSERT INTO accepted (round, node_id, sha256, trained_on) \
                 SELECT $1, $2, $3, $4 WHERE EXISTS (SELECT 1 FROM run WHERE id = 1 AND round = $1) \
                 ON CONFLICT (round, node_id) DO NOTHING",
            )
            .bind(i64::from(round))
            .bind(node)
            .bind(id)
            .bind(i64::from(trained_on))
            .execute(&mut *tx)
            .await?
            .rows_affected();
            let acceptance = if inserted == 1 {
                Acceptance::Accepted
            } else {
                let counted =
                    sqlx::query("SELECT 1 FROM accepted WHERE round = $1 AND node_id = $2")
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
        })
        .await
    }

    /// Takes back an acceptance that the aggregator then refused.
    pub async fn unaccept(&self, round: u32, node: &str) -> Result<(), ServerError> {
        self.patiently("taking back an update", move || async move {
            let mut tx = self.begin().await?;
            sqlx::query("DELETE FROM accepted WHERE round = $1 AND node_id = $2")
                .bind(i64::from(round))
                .bind(node)
                .execute(&mut *tx)
                .await?;
            Ok(tx.commit().await?)
        })
        .await
    }

    /// The updates counted in `round` with the round each was trained on, as `(node, content
    /// id, trained on)`, in node order.
    pub async fn accepted_trained_on(
        &self,
        round: u32,
    ) -> Result<Vec<(String, String, u32)>, ServerError> {
        self.patiently("reading a round's updates", move || async move {
            let rows = sqlx::query(
                "SELECT node_id, sha256, COALESCE(trained_on, round) FROM accepted \
                 WHERE round = $1 ORDER BY node_id",
            )
            .bind(i64::from(round))
            .fetch_all(&self.pool)
            .await?;
            rows.iter()
                .map(|r| {
                    let trained_on: i64 = r.try_get(2)?;
                    Ok((r.try_get(0)?, r.try_get(1)?, trained_on as u32))
                })
                .collect()
        })
        .await
    }

    /// The updates counted in `round`, as `(node, content id)`, in node order.
    pub async fn accepted(&self, round: u32) -> Result<Vec<(String, String)>, ServerError> {
        self.patiently("reading a round's updates", move || async move {
            let rows = sqlx::query(
                "SELECT node_id, sha256 FROM accepted WHERE round = $1 ORDER BY node_id",
            )
            .bind(i64::from(round))
            .fetch_all(&self.pool)
            .await?;
            rows.iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                .collect()
        })
        .await
    }
}
