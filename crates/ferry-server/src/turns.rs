//! Transfer turns: how many downloads and uploads stream at once, and an upload's turn held
//! for it before its data moves.
//!
//! A stream waiting for a turn still receives what its node has already sent, up to the
//! stream's flow-control window, and keeps it in memory. With a thousand nodes uploading at
//! once that is nearly every update, and when several nodes share one HTTP/2 connection (a
//! proxy in front of the server, a fleet simulator) those waiting bytes can fill the
//! connection's window, so the streams that do hold a turn stall for good. So a node first
//! asks for its upload's status, that call waits for a turn and reserves it for the node,
//! and the upload's data is sent only after that. An upload that arrives without a
//! reservation (an older node) waits for a turn as before.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Model downloads and update uploads streaming at once (at the server, and at each relay).
/// Each holds its stream's buffers (about two chunks); the rest wait for a turn before their
/// first chunk, so memory stays flat however many nodes transfer together, while a few
/// streams are enough to keep every core busy.
pub const CONCURRENT_TRANSFERS: usize = 8;

/// The longest an upload's status call waits for a turn to reserve (the upload then waits
/// for one itself).
pub const RESERVATION_PATIENCE: Duration = Duration::from_secs(20);

/// How long a reserved turn waits for its upload before it goes back.
pub const RESERVATION_HOLD: Duration = Duration::from_secs(10);

/// The server's (or a relay's) transfer turns.
pub struct TransferTurns {
    turns: Arc<Semaphore>,
    /// Turns reserved by node, with the reservation's number (so a stale expiry cannot take
    /// a later reservation away).
    reserved: Mutex<HashMap<String, (u64, OwnedSemaphorePermit)>>,
    next: Mutex<u64>,
    hold: Duration,
}

/// The server is shutting down: no more turns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed;

impl TransferTurns {
    /// [`CONCURRENT_TRANSFERS`] at once, a reserved turn held for [`RESERVATION_HOLD`].
    pub fn standard() -> Arc<Self> {
        Self::new(CONCURRENT_TRANSFERS, RESERVATION_HOLD)
    }

    /// `turns` transfers at once; a reserved turn not used within `hold` goes back.
    pub fn new(turns: usize, hold: Duration) -> Arc<Self> {
        Arc::new(Self {
            turns: Arc::new(Semaphore::new(turns)),
            reserved: Mutex::default(),
            next: Mutex::new(0),
            hold,
        })
    }

    fn reservations(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, (u64, OwnedSemaphorePermit)>> {
        // The map stays consistent whatever a panicking holder was doing.
        self.reserved.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits at most `patience` for a turn and keeps it for `node`'s next upload; false if
    /// none came free in time (the upload will then wait for one).
    pub async fn reserve(self: &Arc<Self>, node: &str, patience: Duration) -> bool {
        if self.reservations().contains_key(node) {
            return true;
        }
        let Ok(Ok(permit)) =
            tokio::time::timeout(patience, self.turns.clone().acquire_owned()).await
        else {
            return false;
        };
        let number = {
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            *next += 1;
            *next
        };
        self.reservations()
            .insert(node.to_string(), (number, permit));
        let (turns, node) = (Arc::downgrade(self), node.to_string());
        tokio::spawn(async move {
            let Some(hold) = turns.upgrade().map(|t| t.hold) else {
                return;
            };
            tokio::time::sleep(hold).await;
            if let Some(turns) = turns.upgrade() {
                let mut reserved = turns.reservations();
                if reserved.get(&node).is_some_and(|(n, _)| *n == number) {
                    reserved.remove(&node);
                }
            }
        });
        true
    }

    /// The turn for `node`'s upload: its reservation, or the next free turn.
    pub async fn for_upload(&self, node: &str) -> Result<OwnedSemaphorePermit, Closed> {
        if let Some((_, permit)) = self.reservations().remove(node) {
            return Ok(permit);
        }
        self.for_download().await
    }

    /// `node`'s reserved turn, or a turn free right now; `None` if neither (the upload is
    /// then refused before any of its data is read, and the node asks for its status again).
    pub fn for_upload_now(&self, node: &str) -> Option<OwnedSemaphorePermit> {
        if let Some((_, permit)) = self.reservations().remove(node) {
            return Some(permit);
        }
        self.turns.clone().try_acquire_owned().ok()
    }

    /// The next free turn.
    pub async fn for_download(&self) -> Result<OwnedSemaphorePermit, Closed> {
        self.turns.clone().acquire_owned().await.map_err(|_| Closed)
    }

    /// Turns free right now.
    pub fn available(&self) -> usize {
        self.turns.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_reserved_turn_waits_for_its_upload_and_others_wait_for_it() {
        let turns = TransferTurns::new(1, Duration::from_secs(60));
        assert!(turns.reserve("a", Duration::from_millis(10)).await);
        assert!(
            turns.reserve("a", Duration::from_millis(10)).await,
            "already held"
        );
        assert!(
            !turns.reserve("b", Duration::from_millis(20)).await,
            "no turn free"
        );
        let upload = turns.for_upload("a").await.expect("a's turn");
        assert_eq!(turns.available(), 0);
        drop(upload);
        assert!(turns.reserve("b", Duration::from_millis(10)).await);
    }

    #[tokio::test]
    async fn an_unused_reservation_goes_back_after_its_hold() {
        let turns = TransferTurns::new(1, Duration::from_millis(100));
        assert!(turns.reserve("a", Duration::from_millis(10)).await);
        assert_eq!(turns.available(), 0);
        // Waiting for the turn ends once the reservation has gone back.
        assert!(
            turns.reserve("b", Duration::from_secs(30)).await,
            "a never uploaded"
        );
        drop(turns.for_upload("b").await.expect("b's turn"));
        // An expired reservation does not cancel a newer one of the same node.
        assert!(turns.reserve("a", Duration::from_millis(10)).await);
        let upload = turns.for_upload("a").await.expect("a's turn");
        assert_eq!(turns.available(), 0);
        drop(upload);
        assert_eq!(turns.available(), 1);
    }

    #[tokio::test]
    async fn an_upload_without_a_turn_is_refused_at_once() {
        let turns = TransferTurns::new(1, Duration::from_secs(60));
        assert!(turns.reserve("a", Duration::from_secs(1)).await);
        assert!(turns.for_upload_now("b").is_none(), "the only turn is a's");
        let a = turns.for_upload_now("a").expect("a's reserved turn");
        assert!(turns.for_upload_now("b").is_none());
        drop(a);
        assert!(turns.for_upload_now("b").is_some(), "free again");
    }
}
