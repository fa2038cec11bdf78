//! Sending the relay's held updates upstream. Where the run's rule is linear, the round's
//! held updates are folded into one partial aggregate ([`crate::fold`]); in a secure round,
//! added into one masked sum ([`crate::masked`]); either is sent once every node of the
//! subtree's cohort has answered the relay, or at the relay deadline. Where the server needs
//! each update, each is sent as it came, on its node's behalf. An update leaves the relay's
//! store only once the server has counted it, or cannot.

use std::{collections::HashSet, sync::Arc, time::Duration};

use ferry_client::{
    backoff::Backoff,
    transfer::{self, UploadBody},
};
use ferry_core::aggregate::Weighting;
use ferry_proto::v1::{FailureReport, Fold, Task};
use tokio::sync::watch;
use tonic::{Code, Status};

use crate::{fold::fold_partial, masked::sum_masked, relay::Relay, store::Held};

/// How often the loop looks even when nothing woke it (the relay deadline passing).
const TICK: Duration = Duration::from_millis(500);

/// Sends held updates upstream until `stop`.
pub async fn flush_loop(relay: Arc<Relay>, mut stop: watch::Receiver<bool>) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        tokio::select! {
            () = relay.flush.notified() => {}
            () = tokio::time::sleep(TICK) => {}
            _ = stop.changed() => return,
        }
        match flush_once(&relay).await {
            Ok(()) => backoff.reset(),
            Err(why) => {
                let pause = backoff.next_delay();
                tracing::warn!(
                    "sending updates upstream failed ({why}); trying again in {:.1} s",
                    pause.as_secs_f64()
                );
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    }
}

/// How updates fold at a relay under `fold` (`None`: they pass through, or are masked
/// inputs).
pub(crate) fn weighting(fold: Fold) -> Option<Weighting> {
    match fold {
        Fold::PassThrough | Fold::MaskedSum => None,
        Fold::Examples => Some(Weighting::Examples),
        Fold::Uniform => Some(Weighting::Uniform),
        Fold::Normalized => Some(Weighting::Normalized),
    }
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Whether a call's failure means the server will never count these updates (the round
/// closed, or it refused them), rather than a passing fault.
fn refused_for_good(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::FailedPrecondition | Code::NotFound | Code::InvalidArgument | Code::PermissionDenied
    )
}

/// One look at the held updates: sends what is due.
async fn flush_once(relay: &Arc<Relay>) -> Result<(), String> {
    let view = relay.subscribe().borrow().clone();
    let Some(task) = view.train.clone() else {
        return Ok(());
    };
    let round = task.round;
    for blob in relay
        .store
        .forget_before(round)
        .await
        .map_err(|e| e.to_string())?
    {
        let _ = relay.blobs.delete(&blob).await;
    }
    if view.fold == Fold::PassThrough {
        let held = relay.store.unsent(round).await.map_err(|e| e.to_string())?;
        return pass_through(relay, &task, held).await;
    }
    // Who has answered is read before what is held: an update stored in between joins this
    // partial rather than making a second one.
    let answered: HashSet<String> = relay
        .store
        .nodes_in(round)
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .collect();
    let everyone_in = view
        .train_nodes
        .iter()
        .all(|node| answered.contains(node) || relay.gave_up(round, node));
    if !everyone_in && now_unix_ms() < view.relay_deadline_unix_ms {
        return Ok(());
    }
    let held = relay.store.unsent(round).await.map_err(|e| e.to_string())?;
    if held.is_empty() {
        return Ok(());
    }
    let aggregate = match weighting(view.fold) {
        Some(weighting) => fold_partial(relay, &task, weighting, held).await?,
        None => sum_masked(relay, &task, held).await?,
    };
    match aggregate {
        Some(aggregate) => send_aggregate(relay, &task, aggregate).await,
        None => Ok(()),
    }
}

/// One upload standing for several held updates.
pub(crate) struct Aggregate {
    /// What is uploaded.
    pub(crate) body: Arc<dyn UploadBody>,
    /// Its content id.
    pub(crate) id: String,
    /// The held updates in it.
    pub(crate) folded: Vec<Held>,
    /// Every node it counts for.
    pub(crate) nodes: Vec<String>,
    /// What it is, as the log says it.
    pub(crate) what: &'static str,
}

/// Sends `aggregate` as the relay's upload for `round`; its held updates count as sent once
/// the server counted it, and are dropped where the server cannot count them.
async fn send_aggregate(
    relay: &Arc<Relay>,
    task: &Task,
    aggregate: Aggregate,
) -> Result<(), String> {
    let round = task.round;
    let Aggregate {
        body,
        id,
        folded,
        nodes,
        what,
    } = aggregate;
    let mut client = relay.upstream.fleet.clone();
    let sent = transfer::upload(
        &mut client,
        &relay.upstream.credential,
        round,
        &body,
        &id,
        task.max_chunk_bytes as usize,
    )
    .await;
    match sent {
        Ok(receipt) if receipt.accepted => {
            relay
                .store
                .mark_sent(round, &folded)
                .await
                .map_err(|e| e.to_string())?;
            tracing::info!(
                "round {round}: {what} of {} updates {} upstream",
                nodes.len(),
                if receipt.duplicate {
                    "was already counted"
                } else {
                    "counted"
                }
            );
            Ok(())
        }
        Ok(receipt) => {
            tracing::warn!(
                "round {round}: the server counts {} of these nodes through another path ({}); \
                 sending {what} again without them",
                receipt.not_counted.len(),
                receipt.not_counted.join(", ")
            );
            forget(relay, round, &receipt.not_counted).await;
            relay.flush.notify_one();
            Ok(())
        }
        Err(status) if refused_for_good(&status) => {
            tracing::warn!(
                "round {round}: the server will not count this relay's {} updates: {}",
                nodes.len(),
                status.message()
            );
            forget(relay, round, &nodes).await;
            Ok(())
        }
        Err(status) => Err(ferry_client::explain(&status)),
    }
}

/// Sends each of `held` upstream as it came, on its node's behalf.
async fn pass_through(relay: &Arc<Relay>, task: &Task, held: Vec<Held>) -> Result<(), String> {
    let round = task.round;
    let mut client = relay.upstream.fleet.clone();
    for update in held {
        let bytes = relay
            .blobs
            .get(&update.blob)
            .await
            .map_err(|e| e.to_string())?;
        let body: Arc<dyn UploadBody> = Arc::new(bytes);
        let credential = relay.upstream.credential.on_behalf_of(&update.holder);
        let sent = transfer::upload(
            &mut client,
            &credential,
            round,
            &body,
            &update.blob,
            task.max_chunk_bytes as usize,
        )
        .await;
        let node = [update.holder.clone()];
        match sent {
            Ok(receipt) if receipt.accepted => relay
                .store
                .mark_sent(round, std::slice::from_ref(&update))
                .await
                .map_err(|e| e.to_string())?,
            Ok(_) => return Err("the server holds part of the update; resuming".into()),
            Err(status) if refused_for_good(&status) => {
                tracing::warn!(
                    "round {round}: the server refused node {}'s update: {}",
                    update.holder,
                    status.message()
                );
                forget(relay, round, &node).await;
            }
            Err(status) => return Err(ferry_client::explain(&status)),
        }
    }
    Ok(())
}

/// Drops `nodes`' held updates of `round` and their blobs.
async fn forget(relay: &Relay, round: u32, nodes: &[String]) {
    match relay.store.drop_held(round, nodes).await {
        Ok(blobs) => {
            for blob in blobs {
                let _ = relay.blobs.delete(&blob).await;
            }
        }
        Err(e) => tracing::warn!("forgetting updates of round {round}: {e}"),
    }
}

/// A held update that can no longer be read (its file was damaged after it was checked):
/// dropped, and the failure of each node it counted for reported upstream.
pub(crate) async fn lose(relay: &Relay, round: u32, update: &Held, why: &str) {
    tracing::error!(
        "round {round}: dropping the update from {}: {why}",
        update.holder
    );
    let nodes = match relay.store.drop_update(round, update).await {
        Ok(nodes) => nodes,
        Err(e) => {
            tracing::warn!("forgetting an update of round {round}: {e}");
            return;
        }
    };
    let _ = relay.blobs.delete(&update.blob).await;
    for node in nodes {
        let report = relay.on_behalf(
            &node,
            FailureReport {
                round,
                reason: format!("the relay lost the update: {why}"),
            },
        );
        let _ = relay.upstream.fleet.clone().report_failure(report).await;
    }
}
