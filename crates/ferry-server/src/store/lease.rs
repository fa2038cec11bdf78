//! The coordinator lease: several servers share one PostgreSQL store, and the one holding the
//! lease is the active coordinator. Time is the database's clock, so servers' clocks need not
//! agree; the epoch, which grows with each new holder, fences every state change (see
//! [`Store::fenced`]).

use std::time::Duration;

use sqlx::Row;

use crate::{ServerError, store::Store};

/// The lease as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The server holding it (its name).
    pub holder: String,
    /// Where nodes and operators reach that server.
    pub address: String,
    /// Grows by one with every change of holder.
    pub epoch: i64,
    /// Milliseconds until it expires by the database's clock (negative once it has).
    pub expires_in_ms: i64,
}

/// What a server's bid for the lease came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Campaign {
    /// This server holds the lease now, under this epoch.
    Won {
        /// The epoch to write under.
        epoch: i64,
    },
    /// Another server holds a lease that has not expired.
    Held(Lease),
}

impl Store {
    /// The database's clock in milliseconds since the Unix epoch, as SQL.
    fn clock_sql(&self) -> &'static str {
        if self.postgres {
            "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)"
        } else {
            "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)"
        }
    }

    /// Bids for the lease as `holder` (reachable at `address`) for `ttl`: won when no server
    /// holds it, when its holder let it expire, or when `holder` held it before (the same
    /// server restarted). Winning takes a new epoch, which fences out every earlier holder.
    pub async fn campaign(
        &self,
        holder: &str,
        address: &str,
        ttl: Duration,
    ) -> Result<Campaign, ServerError> {
        let now = self.clock_sql();
        let ttl_ms = ttl.as_millis() as i64;
        let mut tx = self.pool.begin().await?;
        let won = sqlx::query(&format!(
            "INSERT INTO lease (id, holder, address, epoch, expires_ms) \
             VALUES (1, $1, $2, 1, {now} + $3) \
             ON CONFLICT (id) DO UPDATE SET holder = excluded.holder, \
                 address = excluded.address, epoch = lease.epoch + 1, \
                 expires_ms = excluded.expires_ms \
             WHERE lease.expires_ms < {now} OR lease.holder = excluded.holder"
        ))
        .bind(holder)
        .bind(address)
        .bind(ttl_ms)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        let lease = read_lease(&mut tx, now).await?;
        tx.commit().await?;
        match lease {
            Some(lease) if won && lease.holder == holder => {
                Ok(Campaign::Won { epoch: lease.epoch })
            }
            Some(lease) => Ok(Campaign::Held(lease)),
            None => Err(ServerError::Settings(
                "the lease row vanished while a server bid for it".into(),
            )),
        }
    }

    /// Extends the lease held under `epoch` by `ttl` from now; false when it is no longer
    /// this epoch's (another server took over).
    pub async fn renew(&self, epoch: i64, ttl: Duration) -> Result<bool, ServerError> {
        let renewed = sqlx::query(&format!(
            "UPDATE lease SET expires_ms = {} + $1 WHERE id = 1 AND epoch = $2",
            self.clock_sql()
        ))
        .bind(ttl.as_millis() as i64)
        .bind(epoch)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(renewed == 1)
    }

    /// Gives up the lease held under `epoch` (a server stopping cleanly), so that a standby
    /// takes over at its next look instead of when the lease would have expired.
    pub async fn resign(&self, epoch: i64) -> Result<(), ServerError> {
        sqlx::query("UPDATE lease SET expires_ms = 0 WHERE id = 1 AND epoch = $1")
            .bind(epoch)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The lease, if any server ever held one.
    pub async fn lease(&self) -> Result<Option<Lease>, ServerError> {
        let mut connection = self.pool.acquire().await?;
        read_lease(&mut connection, self.clock_sql()).await
    }
}

/// Reads the lease row through `connection`, timed by the database clock `now`.
async fn read_lease(
    connection: &mut sqlx::AnyConnection,
    now: &str,
) -> Result<Option<Lease>, ServerError> {
    let row = sqlx::query(&format!(
        "SELECT holder, address, epoch, expires_ms - {now} FROM lease WHERE id = 1"
    ))
    .fetch_optional(&mut *connection)
    .await?;
    row.map(|row| {
        Ok(Lease {
            holder: row.try_get(0)?,
            address: row.try_get(1)?,
            epoch: row.try_get(2)?,
            expires_in_ms: row.try_get(3)?,
        })
    })
    .transpose()
}
