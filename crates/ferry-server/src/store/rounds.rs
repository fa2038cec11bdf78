//! What the store keeps of each round once it ends: the commit (record, new model and state,
//! the next round, the blobs it wrote, the updates it folded), a failed attempt, and the
//! records read back.

use sqlx::Row;

use crate::{ServerError, store::Store};

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

impl Store {
    /// Closes a round: its record, the new model and optimizer state, and the next round, in
    /// one transaction.
    pub async fn commit_round(&self, commit: &RoundCommit) -> Result<(), ServerError> {
        self.patiently("committing a round", move || async move {
            let mut tx = self.begin().await?;
            sqlx::query("INSERT INTO rounds (round, record) VALUES ($1, $2)")
                .bind(i64::from(commit.round))
                .bind(&commit.record_json)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "UPDATE run SET round = $1, model_sha = $2, state_sha = $3, finished = $4 \
                 WHERE id = 1",
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
            let contributors: std::collections::HashSet<&str> =
                commit.contributors.iter().map(String::as_str).collect();
            for row in counted {
                let node: String = row.try_get(0)?;
                if !contributors.contains(node.as_str()) {
                    sqlx::query("DELETE FROM accepted WHERE round = $1 AND node_id = $2")
                        .bind(i64::from(commit.round))
                        .bind(&node)
                        .execute(&mut *tx)
                        .await?;
                }
            }
            Ok(tx.commit().await?)
        })
        .await
    }

    /// The blobs committed `round` wrote (empty for rounds committed before they were
    /// recorded).
    pub async fn round_blobs(&self, round: u32) -> Result<Vec<String>, ServerError> {
        self.patiently("reading a round's blobs", move || async move {
            let row = sqlx::query("SELECT shas FROM round_blobs WHERE round = $1")
                .bind(i64::from(round))
                .fetch_optional(&self.pool)
                .await?;
            let ids: String = match row {
                Some(row) => row.try_get(0)?,
                None => String::new(),
            };
            Ok(ids.split_whitespace().map(String::from).collect())
        })
        .await
    }

    /// Rewrites committed `round`'s record (with its federated evaluation), and marks the run
    /// finished for `finished` if given, in one transaction.
    pub async fn amend_round(
        &self,
        round: u32,
        record_json: &str,
        finished: Option<&str>,
    ) -> Result<(), ServerError> {
        self.patiently("amending a round's record", move || async move {
            let mut tx = self.begin().await?;
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
            Ok(tx.commit().await?)
        })
        .await
    }

    /// Failed attempts recorded for `round` so far.
    pub async fn failed_attempts(&self, round: u32) -> Result<u32, ServerError> {
        self.patiently("reading a round's failed attempts", move || async move {
            let count: i64 = sqlx::query("SELECT COUNT(*) FROM failed_rounds WHERE round = $1")
                .bind(i64::from(round))
                .fetch_one(&self.pool)
                .await?
                .try_get(0)?;
            Ok(u32::try_from(count).unwrap_or(u32::MAX))
        })
        .await
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
        self.patiently("recording a failed round", move || async move {
            let mut tx = self.begin().await?;
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
            Ok(tx.commit().await?)
        })
        .await
    }

    /// The records of all failed round attempts, as JSON, in order.
    pub async fn failed_round_records(&self) -> Result<Vec<String>, ServerError> {
        self.records("SELECT record FROM failed_rounds ORDER BY round, attempt")
            .await
    }

    /// The records of all finished rounds, as JSON, in round order.
    pub async fn round_records(&self) -> Result<Vec<String>, ServerError> {
        self.records("SELECT record FROM rounds ORDER BY round")
            .await
    }

    /// The one text column `sql` selects, row by row.
    async fn records(&self, sql: &str) -> Result<Vec<String>, ServerError> {
        self.patiently("reading round records", move || async move {
            let rows = sqlx::query(sql).fetch_all(&self.pool).await?;
            rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
        })
        .await
    }
}
