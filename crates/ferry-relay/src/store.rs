//! The relay's own durable state, a SQLite file in its data folder: the nodes below it and
//! the updates it accepted. The nodes' credential hashes are also kept in memory once read:
//! every call a node makes is checked against them. An accepted update is recorded (its blob stored first) before the
//! node is told, and stays until the server has counted it, so a relay killed at any moment
//! resumes with every update it acknowledged.

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex},
};

use sqlx::{
    Row, SqlitePool,
    migrate::Migrator,
    sqlite::{SqliteConnectOptions, SqlitePoolOptions},
};

use crate::RelayError;

static MIGRATIONS: Migrator = sqlx::migrate!("migrations/relay");

/// A node below the relay, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The node's identifier.
    pub node_id: String,
    /// The name of the token it enrolled with.
    pub name: String,
    /// Hash of its secret (`ferry_server::auth::hash_secret`).
    pub secret_hash: String,
    /// Whether the server revoked it.
    pub revoked: bool,
}

/// An update the relay accepted and the server has not yet counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// The node it came from.
    pub node_id: String,
    /// Its blob's content id.
    pub blob: String,
    /// Its training examples.
    pub examples: u64,
}

/// The relay's store.
#[derive(Debug, Clone)]
pub struct RelayStore {
    pool: SqlitePool,
    /// Members read or written so far, by id (only this store changes them).
    members: Arc<Mutex<HashMap<String, Member>>>,
}

impl RelayStore {
    /// Opens (creating if needed) the store in `dir`.
    pub async fn open(dir: &Path) -> Result<Self, RelayError> {
        let options = SqliteConnectOptions::new()
            .filename(dir.join("relay.db"))
            .create_if_missing(true)
            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
            // In WAL mode, NORMAL keeps every committed transaction through a crash of the
            // relay's process (SIGKILL included); a power loss may lose the latest ones.
            .synchronous(sqlx::sqlite::SqliteSynchronous::Normal);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        MIGRATIONS
            .run(&pool)
            .await
            .map_err(|e| RelayError::Store(e.to_string()))?;
        Ok(Self {
            pool,
            members: Arc::default(),
        })
    }

    fn known(&self) -> std::sync::MutexGuard<'_, HashMap<String, Member>> {
        // Each critical section is one lookup or one write of the map.
        self.members
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The node `node_id`, if it is below this relay.
    pub async fn member(&self, node_id: &str) -> Result<Option<Member>, RelayError> {
        if let Some(member) = self.known().get(node_id) {
            return Ok(Some(member.clone()));
        }
        let row = sqlx::query(
            "SELECT node_id, name, secret_hash, revoked FROM members WHERE node_id = ?1",
        )
        .bind(node_id)
        .fetch_optional(&self.pool)
        .await?;
        let member = row
            .map(|row| -> Result<Member, sqlx::Error> {
                Ok(Member {
                    node_id: row.try_get(0)?,
                    name: row.try_get(1)?,
                    secret_hash: row.try_get(2)?,
                    revoked: row.try_get::<i64, _>(3)? != 0,
                })
            })
            .transpose()?;
        if let Some(member) = &member {
            self.known().insert(member.node_id.clone(), member.clone());
        }
        Ok(member)
    }

    /// Records a node below this relay (enrolled through it, or moved to it).
    pub async fn add_member(
        &self,
        node_id: &str,
        name: &str,
        secret_hash: &str,
    ) -> Result<(), RelayError> {
        sqlx::query(
            "INSERT INTO members (node_id, name, secret_hash) VALUES (?1, ?2, ?3) \
             ON CONFLICT (node_id) DO UPDATE SET name = ?2, secret_hash = ?3, revoked = 0",
        )
        .bind(node_id)
        .bind(name)
        .bind(secret_hash)
        .execute(&self.pool)
        .await?;
        let member = Member {
            node_id: node_id.to_string(),
            name: name.to_string(),
            secret_hash: secret_hash.to_string(),
            revoked: false,
        };
        self.known().insert(node_id.to_string(), member);
        Ok(())
    }

    /// Marks the nodes the server revoked.
    pub async fn revoke(&self, nodes: &[String]) -> Result<(), RelayError> {
        let mut tx = self.pool.begin().await?;
        for node in nodes {
            sqlx::query("UPDATE members SET revoked = 1 WHERE node_id = ?1")
                .bind(node)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        let mut known = self.known();
        for node in nodes {
            if let Some(member) = known.get_mut(node) {
                member.revoked = true;
            }
        }
        Ok(())
    }

    /// Records `node`'s accepted update for `round`; false if one was already recorded.
    pub async fn hold(
        &self,
        round: u32,
        node: &str,
        blob: &str,
        examples: u64,
    ) -> Result<bool, RelayError> {
        let inserted = sqlx::query(
            "INSERT INTO held (round, node_id, blob, examples, state) \
             VALUES (?1, ?2, ?3, ?4, 'held') ON CONFLICT (round, node_id) DO NOTHING",
        )
        .bind(i64::from(round))
        .bind(node)
        .bind(blob)
        .bind(examples as i64)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(inserted == 1)
    }

    /// Whether the relay accepted `node`'s update for `round` (sent on or not).
    pub async fn has(&self, round: u32, node: &str) -> Result<bool, RelayError> {
        Ok(
            sqlx::query("SELECT 1 FROM held WHERE round = ?1 AND node_id = ?2")
                .bind(i64::from(round))
                .bind(node)
                .fetch_optional(&self.pool)
                .await?
                .is_some(),
        )
    }

    /// Every node whose update for `round` the relay accepted.
    pub async fn nodes_in(&self, round: u32) -> Result<Vec<String>, RelayError> {
        let rows = sqlx::query("SELECT node_id FROM held WHERE round = ?1")
            .bind(i64::from(round))
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(|row| row.try_get(0))
            .collect::<Result<_, _>>()?)
    }

    /// The updates of `round` not yet counted upstream, in node order.
    pub async fn unsent(&self, round: u32) -> Result<Vec<Held>, RelayError> {
        let rows = sqlx::query(
            "SELECT node_id, blob, examples FROM held WHERE round = ?1 AND state = 'held' \
             ORDER BY node_id",
        )
        .bind(i64::from(round))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(Held {
                    node_id: row.try_get(0)?,
                    blob: row.try_get(1)?,
                    examples: row.try_get::<i64, _>(2)? as u64,
                })
            })
            .collect()
    }

    /// Marks `nodes`' updates of `round` as counted upstream.
    pub async fn mark_sent(&self, round: u32, nodes: &[String]) -> Result<(), RelayError> {
        let mut tx = self.pool.begin().await?;
        for node in nodes {
            sqlx::query("UPDATE held SET state = 'sent' WHERE round = ?1 AND node_id = ?2")
                .bind(i64::from(round))
                .bind(node)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Forgets `nodes`' updates of `round` (the server cannot count them through this relay);
    /// returns their blobs.
    pub async fn drop_held(&self, round: u32, nodes: &[String]) -> Result<Vec<String>, RelayError> {
        let mut tx = self.pool.begin().await?;
        let mut blobs = Vec::new();
        for node in nodes {
            let row = sqlx::query(
                "DELETE FROM held WHERE round = ?1 AND node_id = ?2 AND state = 'held' \
                 RETURNING blob",
            )
            .bind(i64::from(round))
            .bind(node)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(row) = row {
                blobs.push(row.try_get(0)?);
            }
        }
        tx.commit().await?;
        Ok(blobs)
    }

    /// Forgets every update of the rounds before `round` (they closed); returns their blobs.
    pub async fn forget_before(&self, round: u32) -> Result<Vec<String>, RelayError> {
        let rows = sqlx::query("DELETE FROM held WHERE round < ?1 RETURNING blob")
            .bind(i64::from(round))
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(|row| row.try_get(0))
            .collect::<Result<_, _>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn members_are_answered_from_memory_and_revocation_reaches_them() {
        let dir = tempfile::tempdir().expect("dir");
        let store = RelayStore::open(dir.path()).await.expect("open");
        store.add_member("n1", "site-1", "h1").await.expect("add");
        assert_eq!(
            store
                .member("n1")
                .await
                .expect("read")
                .map(|m| m.secret_hash),
            Some("h1".to_string())
        );
        store.revoke(&["n1".into()]).await.expect("revoke");
        assert!(
            store
                .member("n1")
                .await
                .expect("read")
                .expect("kept")
                .revoked
        );
        drop(store);
        let reopened = RelayStore::open(dir.path()).await.expect("reopen");
        let member = reopened.member("n1").await.expect("read").expect("stored");
        assert!(
            member.revoked,
            "the revocation was stored, not only remembered"
        );
        assert_eq!(reopened.member("n2").await.expect("read"), None);
    }

    #[tokio::test]
    async fn held_updates_survive_reopening_and_count_once() {
        let dir = tempfile::tempdir().expect("dir");
        let store = RelayStore::open(dir.path()).await.expect("open");
        assert!(store.hold(3, "b", "blob-b", 7).await.expect("hold"));
        assert!(store.hold(3, "a", "blob-a", 5).await.expect("hold"));
        assert!(!store.hold(3, "a", "blob-a2", 9).await.expect("again"));
        drop(store);
        let store = RelayStore::open(dir.path()).await.expect("reopen");
        let unsent = store.unsent(3).await.expect("unsent");
        assert_eq!(
            unsent
                .iter()
                .map(|h| h.node_id.as_str())
                .collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(unsent[0].examples, 5);
        store.mark_sent(3, &["a".into()]).await.expect("sent");
        assert_eq!(store.unsent(3).await.expect("unsent").len(), 1);
        assert!(store.has(3, "a").await.expect("has"));
        assert_eq!(
            store
                .drop_held(3, &["a".into(), "b".into()])
                .await
                .expect("drop"),
            ["blob-b"],
            "a sent update is not dropped"
        );
        assert_eq!(store.forget_before(4).await.expect("forget"), ["blob-a"]);
        assert!(!store.has(3, "a").await.expect("has"));
    }
}
