//! The live feed: a server-sent event whenever the run changes, and at least every
//! [`TICK`], so pages also see what changes by time alone (a node going quiet).

use std::{convert::Infallible, time::Duration};

use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use tokio::sync::watch;

/// The longest a page waits between two events.
pub const TICK: Duration = Duration::from_secs(2);

/// A stream of `changed` events (data: the change counter) from `changes`.
pub fn feed(
    changes: watch::Receiver<u64>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>> + Send> {
    let stream = futures::stream::unfold((changes, true), |(mut changes, first)| async move {
        if !first {
            // A closed sender (the run is over) leaves only the ticks.
            let _ = tokio::time::timeout(TICK, changes.changed()).await;
            if changes.has_changed().is_err() {
                tokio::time::sleep(TICK).await;
            }
        }
        let version = *changes.borrow_and_update();
        let event = Event::default().event("changed").data(version.to_string());
        Some((Ok(event), (changes, false)))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}
