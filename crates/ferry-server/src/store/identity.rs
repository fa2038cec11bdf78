//! Who may join: enrolment tokens (by hash) and the nodes enrolled with them, and how many
//! nodes the fleet can still have.

use sqlx::Row;

use crate::{
    ServerError,
    store::{Store, now_ms},
};

/// What an enrolled identity is: a node training on its data, or a relay between nodes and
/// the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IdentityKind {
    /// A node.
    Node,
    /// An aggregation relay.
    Relay,
}

impl IdentityKind {
    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Node => "node",
            Self::Relay => "relay",
        }
    }

    /// The kind a stored name stands for (a node for anything but "relay").
    pub fn parse(stored: &str) -> Self {
        if stored == "relay" {
            Self::Relay
        } else {
            Self::Node
        }
    }
}

/// A node's (or relay's) enrolment, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRow {
    /// The node's identifier.
    pub node_id: String,
    /// The name of the token it enrolled with.
    pub name: String,
    /// sha256 of its secret.
    pub secret_hash: String,
    /// Whether its credential was revoked.
    pub revoked: bool,
    /// A node or a relay.
    pub kind: IdentityKind,
    /// The relay the node joined through, if it did not dial the server itself.
    pub relay: Option<String>,
}

/// What a token enrolled: the identity, the token's name and what kind of identity it made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enrolled {
    /// The identity's id (the one asked for, or the one enrolled before with the same token
    /// and secret hash).
    pub node_id: String,
    /// The token's name, which the identity takes.
    pub name: String,
    /// A node or a relay.
    pub kind: IdentityKind,
}

/// An enrolment token, as listed to its operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRow {
    /// Its name, which the node enrolled with it takes.
    pub name: String,
    /// Whether a node has enrolled with it.
    pub used: bool,
    /// Whether it was revoked.
    pub revoked: bool,
}

fn node_row(row: &sqlx::any::AnyRow) -> Result<NodeRow, ServerError> {
    Ok(NodeRow {
        node_id: row.try_get(0)?,
        name: row.try_get(1)?,
        secret_hash: row.try_get(2)?,
        revoked: row.try_get::<i64, _>(3)? != 0,
        kind: IdentityKind::parse(&row.try_get::<String, _>(4)?),
        relay: row.try_get(5)?,
    })
}

const NODE_COLUMNS: &str = "node_id, name, secret_hash, revoked, kind, relay";

impl Store {
    /// Creates a one-time enrolment token for the node `name` and returns it; only its hash is
    /// stored, so this is the one time it can be shown.
    pub async fn create_token(&self, name: &str) -> Result<String, ServerError> {
        self.create_token_for(name, IdentityKind::Node).await
    }

    /// [`Store::create_token`] for an identity of `kind` (a relay token enrols a relay).
    pub async fn create_token_for(
        &self,
        name: &str,
        kind: IdentityKind,
    ) -> Result<String, ServerError> {
        let token = format!("ferry-{}", crate::auth::new_secret());
        self.add_token_for(name, &crate::auth::hash_secret(&token), kind)
            .await?;
        Ok(token)
    }

    /// Records a new enrolment token under `name`; a live token of that name must not exist.
    pub async fn add_token(&self, name: &str, token_hash: &str) -> Result<(), ServerError> {
        self.add_token_for(name, token_hash, IdentityKind::Node)
            .await
    }

    /// [`Store::add_token`] for an identity of `kind`.
    pub async fn add_token_for(
        &self,
        name: &str,
        token_hash: &str,
        kind: IdentityKind,
    ) -> Result<(), ServerError> {
        let mut tx = self.begin().await?;
        // A revoked token's name is free again; a live one's is not.
        sqlx::query("DELETE FROM tokens WHERE name = $1 AND revoked <> 0")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        let added = sqlx::query(
            "INSERT INTO tokens (name, token_hash, created_ms, kind) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(token_hash)
        .bind(now_ms())
        .bind(kind.as_str())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if added == 0 {
            return Err(ServerError::Settings(format!(
                "a token named '{name}' already exists; revoke it first (ferry token revoke --name {name})"
            )));
        }
        tx.commit().await?;
        Ok(())
    }

    /// Revokes the token `name` and every node enrolled with it; false if no such token.
    pub async fn revoke(&self, name: &str) -> Result<bool, ServerError> {
        let mut tx = self.begin().await?;
        let tokens = sqlx::query("UPDATE tokens SET revoked = 1 WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        sqlx::query("UPDATE nodes SET revoked = 1 WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(tokens > 0)
    }

    /// Spends a one-time token: if `token_hash` names an unused, unrevoked token, marks it used
    /// and records the node; returns the token's name. Done in one transaction, so a token
    /// enrols at most one node.
    pub async fn enrol(
        &self,
        token_hash: &str,
        node_id: &str,
        secret_hash: &str,
    ) -> Result<Option<String>, ServerError> {
        Ok(self
            .enrol_under(token_hash, node_id, secret_hash, None)
            .await?
            .map(|enrolled| enrolled.name))
    }

    /// [`Store::enrol`] through the relay `via` (the identity joins that relay's subtree);
    /// says what kind of identity the token made. A token already spent answers with the
    /// identity it made if `secret_hash` is that identity's (a retried enrolment), else
    /// `None`.
    pub async fn enrol_under(
        &self,
        token_hash: &str,
        node_id: &str,
        secret_hash: &str,
        via: Option<&str>,
    ) -> Result<Option<Enrolled>, ServerError> {
        let mut tx = self.begin().await?;
        let spent = sqlx::query(
            "UPDATE tokens SET used = 1 WHERE token_hash = $1 AND used = 0 AND revoked = 0",
        )
        .bind(token_hash)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if spent == 0 {
            // A retry of an enrolment whose answer was lost: the same token and secret hash
            // name the identity it made.
            let made = sqlx::query(
                "SELECT n.node_id, n.name, n.kind FROM nodes n JOIN tokens t ON n.name = t.name \
                 WHERE t.token_hash = $1 AND t.revoked = 0 AND n.secret_hash = $2 \
                 AND n.revoked = 0",
            )
            .bind(token_hash)
            .bind(secret_hash)
            .fetch_optional(&mut *tx)
            .await?;
            return made
                .map(|row| {
                    Ok(Enrolled {
                        node_id: row.try_get(0)?,
                        name: row.try_get(1)?,
                        kind: IdentityKind::parse(&row.try_get::<String, _>(2)?),
                    })
                })
                .transpose();
        }
        let row = sqlx::query("SELECT name, kind FROM tokens WHERE token_hash = $1")
            .bind(token_hash)
            .fetch_one(&mut *tx)
            .await?;
        let enrolled = Enrolled {
            node_id: node_id.to_string(),
            name: row.try_get(0)?,
            kind: IdentityKind::parse(&row.try_get::<String, _>(1)?),
        };
        sqlx::query(
            "INSERT INTO nodes (node_id, name, secret_hash, enrolled_ms, kind, relay) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(node_id)
        .bind(&enrolled.name)
        .bind(secret_hash)
        .bind(now_ms())
        .bind(enrolled.kind.as_str())
        .bind(via)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(enrolled))
    }

    /// Moves `node_id` into the subtree of the relay `relay` (`None`: the node dials the
    /// server itself), as it fails over from one path to another.
    pub async fn move_node(&self, node_id: &str, relay: Option<&str>) -> Result<(), ServerError> {
        let mut tx = self.begin().await?;
        sqlx::query("UPDATE nodes SET relay = $2 WHERE node_id = $1")
            .bind(node_id)
            .bind(relay)
            .execute(&mut *tx)
            .await?;
        Ok(tx.commit().await?)
    }

    /// Every identity below the relay `relay`: the nodes and relays that joined through it,
    /// and theirs in turn (a chain of relays).
    pub async fn subtree(&self, relay: &str) -> Result<Vec<NodeRow>, ServerError> {
        let rows = sqlx::query(&format!(
            "WITH RECURSIVE below (node_id) AS ( \
               SELECT node_id FROM nodes WHERE relay = $1 \
               UNION SELECT n.node_id FROM nodes n JOIN below b ON n.relay = b.node_id) \
             SELECT {NODE_COLUMNS} FROM nodes WHERE node_id IN (SELECT node_id FROM below) \
             ORDER BY node_id"
        ))
        .bind(relay)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(node_row).collect()
    }

    /// The node `node_id`, if enrolled.
    pub async fn node(&self, node_id: &str) -> Result<Option<NodeRow>, ServerError> {
        let row = sqlx::query(&format!(
            "SELECT {NODE_COLUMNS} FROM nodes WHERE node_id = $1"
        ))
        .bind(node_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(node_row).transpose()
    }

    /// All enrolled nodes.
    pub async fn nodes(&self) -> Result<Vec<NodeRow>, ServerError> {
        let rows = sqlx::query(&format!(
            "SELECT {NODE_COLUMNS} FROM nodes ORDER BY node_id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(node_row).collect()
    }

    /// Every enrolment token, by name (never the token itself: only its hash is stored).
    pub async fn tokens(&self) -> Result<Vec<TokenRow>, ServerError> {
        let rows = sqlx::query("SELECT name, used, revoked FROM tokens ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                Ok(TokenRow {
                    name: row.try_get(0)?,
                    used: row.try_get::<i64, _>(1)? != 0,
                    revoked: row.try_get::<i64, _>(2)? != 0,
                })
            })
            .collect()
    }

    /// How many nodes the fleet can have: nodes enrolled and not revoked, and enrolment tokens
    /// neither used nor revoked.
    pub async fn fleet_capacity(&self) -> Result<(usize, usize), ServerError> {
        let count = |sql: &'static str| async move {
            let n: i64 = sqlx::query(sql).fetch_one(&self.pool).await?.try_get(0)?;
            Ok::<usize, ServerError>(usize::try_from(n).unwrap_or(0))
        };
        Ok((
            count("SELECT COUNT(*) FROM nodes WHERE revoked = 0 AND kind = 'node'").await?,
            count("SELECT COUNT(*) FROM tokens WHERE used = 0 AND revoked = 0 AND kind = 'node'")
                .await?,
        ))
    }
}
