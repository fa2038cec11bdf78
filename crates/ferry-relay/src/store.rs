//! The relay's own durable state, a SQLite file in its data folder: the members below it
//! (nodes, and relays below it in a chain) and the updates it accepted. The members'
//! credential hashes are also kept in memory once read: every call a member makes is checked
//! against them. An accepted update is recorded (its blob stored first) before its sender is
//! told, and stays until the server has counted it, so a relay killed at any moment resumes
//! with every update it acknowledged; each node counts at most once per round.

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

use ferry_server::store::IdentityKind;

use crate::RelayError;

static MIGRATIONS: Migrator = sqlx::migrate!("migrations/relay");

/// A member of the relay's subtree (a node, or a relay below it), as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The member's identifier.
    pub node_id: String,
    /// The name of the token it enrolled with.
    pub name: String,
    /// Hash of its secret (`ferry_server::auth::hash_secret`).
    pub secret_hash: String,
    /// Whether the server revoked it.
    pub revoked: bool,
    /// A node, or a relay below this one.
    pub kind: IdentityKind,
    /// The relay below this one the member joined through; `None` for this relay's own.
    pub via: Option<String>,
}

/// An update the relay accepted and the server has not yet counted: a node's own, or a lower
/// relay's partial aggregate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// Who sent it: the node, or the lower relay.
    pub holder: String,
    /// Its blob's content id.
    pub blob: String,
    /// Its training examples (a partial's: all its contributors').
    pub examples: u64,
}

/// What came of holding an update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holding {
    /// Held, and counted for each of its nodes.
    Fresh,
    /// This very update was held before (a retry).
    Duplicate,
    /// These of its nodes are already counted through another update; nothing was held.
    CountedElsewhere(Vec<String>),
}

/// The relay's store.
#[derive(Debug, Clone)]
pub struct RelayStore {
    pool: SqlitePool,
    /// Members read or written so far, by id (only this store changes them).
    members: Arc<Mutex<HashMap<String, Member>>>,
}

/// How deep a chain of relays the store follows (a bound against a cycle in damaged data).
const MAX_DEPTH: usize = 16;

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

    /// The member `node_id`, if it is below this relay.
    pub async fn member(&self, node_id: &str) -> Result<Option<Member>, RelayError> {
        if let Some(member) = self.known().get(node_id) {
            return Ok(Some(member.clone()));
        }
        let row = sqlx::query(
            "SELECT node_id, name, secret_hash, revoked, kind, via FROM members \
             WHERE node_id = ?1",
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
                    kind: IdentityKind::parse(row.try_get::<&str, _>(4)?),
                    via: row.try_get(5)?,
                })
            })
            .transpose()?;
        if let Some(member) = &member {
            self.known().insert(member.node_id.clone(), member.clone());
        }
        Ok(member)
    }

    /// Records a member (enrolled through this relay, or moved to it), joined through the
    /// lower relay `via` if any.
    pub async fn add_member(
        &self,
        node_id: &str,
        name: &str,
        secret_hash: &str,
        kind: IdentityKind,
        via: Option<&str>,
    ) -> Result<(), RelayError> {
        sqlx::query(
            "INSERT INTO members (node_id, name, secret_hash, kind, via) \
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (node_id) DO UPDATE \
             SET name = ?2, secret_hash = ?3, revoked = 0, kind = ?4, via = ?5",
        )
        .bind(node_id)
        .bind(name)
        .bind(secret_hash)
        .bind(kind.as_str())
        .bind(via)
        .execute(&self.pool)
        .await?;
        let member = Member {
            node_id: node_id.to_string(),
            name: name.to_string(),
            secret_hash: secret_hash.to_string(),
            revoked: false,
            kind,
            via: via.map(str::to_string),
        };
        self.known().insert(node_id.to_string(), member);
        Ok(())
    }

    /// Whether the member `node_id` joined through the lower relay `relay` (or through a
    /// relay below it).
    pub async fn is_below(&self, node_id: &str, relay: &str) -> Result<bool, RelayError> {
        let mut next = self.member(node_id).await?.and_then(|m| m.via);
        for _ in 0..MAX_DEPTH {
            match next {
                Some(via) if via == relay => return Ok(true),
                Some(via) => next = self.member(&via).await?.and_then(|m| m.via),
                None => return Ok(false),
            }
        }
        Ok(false)
    }

    /// The revoked members below the lower relay `relay`.
    pub async fn revoked_below(&self, relay: &str) -> Result<Vec<String>, RelayError> {
        let rows = sqlx::query(
            "WITH RECURSIVE below (node_id) AS ( \
               SELECT node_id FROM members WHERE via = ?1 \
               UNION SELECT m.node_id FROM members m JOIN below b ON m.via = b.node_id) \
             SELECT node_id FROM members WHERE revoked = 1 \
               AND node_id IN (SELECT node_id FROM below) ORDER BY node_id",
        )
        .bind(relay)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|row| row.try_get(0))
            .collect::<Result<_, _>>()?)
    }

    /// Marks the members the server revoked.
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

    /// Records `update` for `round`, counted for each of `nodes` (the node itself, or a
    /// partial's contributors), in one transaction: all of them or none.
    pub async fn hold(
        &self,
        round: u32,
        update: &Held,
        nodes: &[String],
    ) -> Result<Holding, RelayError> {
        let round = i64::from(round);
        let mut tx = self.pool.begin().await?;
        let mut elsewhere = Vec::new();
        let mut this_one = 0;
        for node in nodes {
            let counted =
                sqlx::query("SELECT holder, blob FROM counted WHERE round = ?1 AND node_id = ?2")
                    .bind(round)
                    .bind(node)
                    .fetch_optional(&mut *tx)
                    .await?;
            if let Some(row) = counted {
                let (holder, blob): (String, String) = (row.try_get(0)?, row.try_get(1)?);
                if holder == update.holder && blob == update.blob {
                    this_one += 1;
                } else {
                    elsewhere.push(node.clone());
                }
            }
        }
        if !elsewhere.is_empty() {
            return Ok(Holding::CountedElsewhere(elsewhere));
        }
        if this_one > 0 {
            return Ok(Holding::Duplicate);
        }
        sqlx::query(
            "INSERT INTO held_updates (round, holder, blob, examples, state) \
             VALUES (?1, ?2, ?3, ?4, 'held')",
        )
        .bind(round)
        .bind(&update.holder)
        .bind(&update.blob)
        .bind(update.examples as i64)
        .execute(&mut *tx)
        .await?;
        for node in nodes {
            sqlx::query(
                "INSERT INTO counted (round, node_id, holder, blob) VALUES (?1, ?2, ?3, ?4)",
            )
            .bind(round)
            .bind(node)
            .bind(&update.holder)
            .bind(&update.blob)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(Holding::Fresh)
    }

    /// Whether the relay accepted an update for `round` that counts for `node` (sent on or
    /// not).
    pub async fn has(&self, round: u32, node: &str) -> Result<bool, RelayError> {
        Ok(
            sqlx::query("SELECT 1 FROM counted WHERE round = ?1 AND node_id = ?2")
                .bind(i64::from(round))
                .bind(node)
                .fetch_optional(&self.pool)
                .await?
                .is_some(),
        )
    }

    /// Whether the relay holds the update `blob` from `holder` for `round` (sent on or not).
    pub async fn holds(&self, round: u32, holder: &str, blob: &str) -> Result<bool, RelayError> {
        Ok(
            sqlx::query(
                "SELECT 1 FROM held_updates WHERE round = ?1 AND holder = ?2 AND blob = ?3",
            )
            .bind(i64::from(round))
            .bind(holder)
            .bind(blob)
            .fetch_optional(&self.pool)
            .await?
            .is_some(),
        )
    }

    /// Whether any held update (of any round) is stored as `blob`.
    pub async fn blob_held(&self, blob: &str) -> Result<bool, RelayError> {
        Ok(
            sqlx::query("SELECT 1 FROM held_updates WHERE blob = ?1 LIMIT 1")
                .bind(blob)
                .fetch_optional(&self.pool)
                .await?
                .is_some(),
        )
    }

    /// Every node an accepted update of `round` counts for.
    pub async fn nodes_in(&self, round: u32) -> Result<Vec<String>, RelayError> {
        let rows = sqlx::query("SELECT node_id FROM counted WHERE round = ?1")
            .bind(i64::from(round))
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(|row| row.try_get(0))
            .collect::<Result<_, _>>()?)
    }

    /// The updates of `round` not yet counted upstream, in holder order.
    pub async fn unsent(&self, round: u32) -> Result<Vec<Held>, RelayError> {
        let rows = sqlx::query(
            "SELECT holder, blob, examples FROM held_updates WHERE round = ?1 \
             AND state = 'held' ORDER BY holder, blob",
        )
        .bind(i64::from(round))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(Held {
                    holder: row.try_get(0)?,
                    blob: row.try_get(1)?,
                    examples: row.try_get::<i64, _>(2)? as u64,
                })
            })
            .collect()
    }

    /// Marks `updates` of `round` as counted upstream.
    pub async fn mark_sent(&self, round: u32, updates: &[Held]) -> Result<(), RelayError> {
        let mut tx = self.pool.begin().await?;
        for update in updates {
            sqlx::query(
                "UPDATE held_updates SET state = 'sent' \
                 WHERE round = ?1 AND holder = ?2 AND blob = ?3",
            )
            .bind(i64::from(round))
            .bind(&update.holder)
            .bind(&update.blob)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Forgets the unsent updates of `round` that count for any of `nodes` (the server cannot
    /// count them through this relay), with every node each counted for; returns their blobs.
    pub async fn drop_held(&self, round: u32, nodes: &[String]) -> Result<Vec<String>, RelayError> {
        let round = i64::from(round);
        let mut tx = self.pool.begin().await?;
        let mut blobs = Vec::new();
        for node in nodes {
            let row = sqlx::query(
                "DELETE FROM held_updates WHERE state = 'held' AND (round, holder, blob) IN \
                 (SELECT round, holder, blob FROM counted WHERE round = ?1 AND node_id = ?2) \
                 RETURNING holder, blob",
            )
            .bind(round)
            .bind(node)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(row) = row else { continue };
            let (holder, blob): (String, String) = (row.try_get(0)?, row.try_get(1)?);
            sqlx::query("DELETE FROM counted WHERE round = ?1 AND holder = ?2 AND blob = ?3")
                .bind(round)
                .bind(&holder)
                .bind(&blob)
                .execute(&mut *tx)
                .await?;
            blobs.push(blob);
        }
        tx.commit().await?;
        Ok(blobs)
    }

    /// Forgets the unsent `update` of `round` (it can no longer be read); returns the nodes it
    /// counted for.
    pub async fn drop_update(&self, round: u32, update: &Held) -> Result<Vec<String>, RelayError> {
        let round = i64::from(round);
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "DELETE FROM held_updates WHERE round = ?1 AND holder = ?2 AND blob = ?3 \
             AND state = 'held'",
        )
        .bind(round)
        .bind(&update.holder)
        .bind(&update.blob)
        .execute(&mut *tx)
        .await?;
        let rows = sqlx::query(
            "DELETE FROM counted WHERE round = ?1 AND holder = ?2 AND blob = ?3 \
             RETURNING node_id",
        )
        .bind(round)
        .bind(&update.holder)
        .bind(&update.blob)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(rows
            .iter()
            .map(|row| row.try_get(0))
            .collect::<Result<_, _>>()?)
    }

    /// Forgets every update of the rounds before `round` (they closed); returns their blobs.
    pub async fn forget_before(&self, round: u32) -> Result<Vec<String>, RelayError> {
        let round = i64::from(round);
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM counted WHERE round < ?1")
            .bind(round)
            .execute(&mut *tx)
            .await?;
        let rows = sqlx::query("DELETE FROM held_updates WHERE round < ?1 RETURNING blob")
            .bind(round)
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(rows
            .iter()
            .map(|row| row.try_get(0))
            .collect::<Result<_, _>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(holder: &str, blob: &str, examples: u64) -> Held {
        Held {
            holder: holder.into(),
            blob: blob.into(),
            examples,
        }
    }

    #[tokio::test]
    async fn members_are_answered_from_memory_and_revocation_reaches_them() {
        let dir = tempfile::tempdir().expect("dir");
        let store = RelayStore::open(dir.path()).await.expect("open");
        store
            .add_member("n1", "site-1", "h1", IdentityKind::Node, None)
            .await
            .expect("add");
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
    async fn a_chain_is_followed_down_from_a_lower_relay() {
        let dir = tempfile::tempdir().expect("dir");
        let store = RelayStore::open(dir.path()).await.expect("open");
        store
            .add_member("r1", "relay-1", "h", IdentityKind::Relay, None)
            .await
            .expect("add");
        store
            .add_member("r2", "relay-2", "h", IdentityKind::Relay, Some("r1"))
            .await
            .expect("add");
        store
            .add_member("n1", "site-1", "h", IdentityKind::Node, Some("r2"))
            .await
            .expect("add");
        store
            .add_member("n2", "site-2", "h", IdentityKind::Node, None)
            .await
            .expect("add");
        assert!(store.is_below("n1", "r2").await.expect("read"));
        assert!(store.is_below("n1", "r1").await.expect("read"));
        assert!(!store.is_below("n2", "r1").await.expect("read"));
        assert!(!store.is_below("r1", "r1").await.expect("read"));
        store
            .revoke(&["n1".into(), "n2".into()])
            .await
            .expect("revoke");
        assert_eq!(store.revoked_below("r1").await.expect("read"), ["n1"]);
    }

    #[tokio::test]
    async fn held_updates_survive_reopening_and_count_each_node_once() {
        let dir = tempfile::tempdir().expect("dir");
        let store = RelayStore::open(dir.path()).await.expect("open");
        let fresh = |h: Holding| assert_eq!(h, Holding::Fresh);
        fresh(
            store
                .hold(3, &held("b", "blob-b", 7), &["b".into()])
                .await
                .expect("hold"),
        );
        fresh(
            store
                .hold(3, &held("a", "blob-a", 5), &["a".into()])
                .await
                .expect("hold"),
        );
        assert_eq!(
            store
                .hold(3, &held("a", "blob-a", 5), &["a".into()])
                .await
                .expect("again"),
            Holding::Duplicate
        );
        // A lower relay's partial naming a counted node holds nothing.
        let partial = held("r", "blob-p", 9);
        assert_eq!(
            store
                .hold(3, &partial, &["a".into(), "c".into()])
                .await
                .expect("partial"),
            Holding::CountedElsewhere(vec!["a".into()])
        );
        assert!(!store.has(3, "c").await.expect("has"));
        fresh(
            store
                .hold(3, &partial, &["c".into(), "d".into()])
                .await
                .expect("partial"),
        );
        drop(store);
        let store = RelayStore::open(dir.path()).await.expect("reopen");
        let unsent = store.unsent(3).await.expect("unsent");
        assert_eq!(
            unsent.iter().map(|h| h.holder.as_str()).collect::<Vec<_>>(),
            ["a", "b", "r"]
        );
        let mut nodes = store.nodes_in(3).await.expect("nodes");
        nodes.sort();
        assert_eq!(nodes, ["a", "b", "c", "d"]);
        store.mark_sent(3, &unsent[..1]).await.expect("sent");
        assert_eq!(store.unsent(3).await.expect("unsent").len(), 2);
        assert!(store.holds(3, "r", "blob-p").await.expect("holds"));
        assert_eq!(
            store
                .drop_held(3, &["a".into(), "b".into(), "d".into()])
                .await
                .expect("drop"),
            ["blob-b", "blob-p"],
            "a sent update is not dropped; a partial goes with all its nodes"
        );
        assert!(!store.has(3, "c").await.expect("has"));
        assert!(store.has(3, "a").await.expect("has"));
        assert_eq!(store.forget_before(4).await.expect("forget"), ["blob-a"]);
        assert!(!store.has(3, "a").await.expect("has"));
    }
}
