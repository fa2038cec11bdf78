//! Counting a relay's partial aggregate: one accepted row per contributing node, all in one
//! transaction, so that a node is counted once in a round whichever path its update took.

use std::collections::HashMap;

use sqlx::Row;

use crate::{ServerError, store::Store};

/// Rows inserted per statement (each row binds three values; both databases cap the
/// parameters of one statement).
const ROWS_PER_INSERT: usize = 300;

/// What the store made of a partial aggregate it was asked to count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartialAcceptance {
    /// Every contributor counted now.
    Accepted,
    /// This very partial was counted before (a retry): nothing counted again.
    Duplicate,
    /// These contributors are already counted in the round (through another path): nothing
    /// counted.
    CountedElsewhere(Vec<String>),
    /// The round is not the run's open round: nothing counted.
    RoundClosed,
}

impl Store {
    /// Counts the partial aggregate `id` for each of `contributors` in `round`, or none of
    /// them.
    pub async fn accept_partial(
        &self,
        round: u32,
        contributors: &[String],
        id: &str,
    ) -> Result<PartialAcceptance, ServerError> {
        self.patiently("counting a partial aggregate", move || async move {
            let mut tx = self.begin().await?;
            let open = sqlx::query("SELECT 1 FROM run WHERE id = 1 AND round = $1")
                .bind(i64::from(round))
                .fetch_optional(&mut *tx)
                .await?;
            if open.is_none() {
                return Ok(PartialAcceptance::RoundClosed);
            }
            let counted: HashMap<String, String> =
                sqlx::query("SELECT node_id, sha256 FROM accepted WHERE round = $1")
                    .bind(i64::from(round))
                    .fetch_all(&mut *tx)
                    .await?
                    .iter()
                    .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
                    .collect::<Result<_, sqlx::Error>>()?;
            let already: Vec<&String> = contributors
                .iter()
                .filter(|node| counted.contains_key(*node))
                .collect();
            if !already.is_empty() {
                let same = already.len() == contributors.len()
                    && already.iter().all(|node| counted[*node] == id);
                return Ok(if same {
                    PartialAcceptance::Duplicate
                } else {
                    PartialAcceptance::CountedElsewhere(already.into_iter().cloned().collect())
                });
            }
            for rows in contributors.chunks(ROWS_PER_INSERT) {
                let values: Vec<String> = (0..rows.len())
                    .map(|i| format!("(${}, ${}, ${})", 3 * i + 1, 3 * i + 2, 3 * i + 3))
                    .collect();
                let sql = format!(
                    "INSERT INTO accepted (round, node_id, sha256) VALUES {}",
                    values.join(", ")
                );
                let mut insert = sqlx::query(&sql);
                for node in rows {
                    insert = insert.bind(i64::from(round)).bind(node.as_str()).bind(id);
                }
                insert.execute(&mut *tx).await?;
            }
            tx.commit().await?;
            Ok(PartialAcceptance::Accepted)
        })
        .await
    }

    /// Takes back a partial aggregate's rows (the round refused to fold it).
    pub async fn unaccept_partial(&self, round: u32, id: &str) -> Result<(), ServerError> {
        self.patiently("taking back a partial aggregate", move || async move {
            let mut tx = self.begin().await?;
            sqlx::query("DELETE FROM accepted WHERE round = $1 AND sha256 = $2")
                .bind(i64::from(round))
                .bind(id)
                .execute(&mut *tx)
                .await?;
            Ok(tx.commit().await?)
        })
        .await
    }
}
