//! Sending the relay's held updates upstream. Where the run's rule is linear, the round's
//! held updates are folded (in node order, so that the same updates always make the same
//! bytes and a cut upload resumes) into one partial aggregate, sent once every node of the
//! subtree's cohort has answered the relay or at the relay deadline; where the server needs
//! each update, each is sent as it came, on its node's behalf. An update leaves the relay's
//! store only once the server has counted it, or cannot.

use std::{collections::HashSet, sync::Arc, time::Duration};

use ferry_client::{
    backoff::Backoff,
    transfer::{self, UploadBody},
};
use ferry_core::{
    aggregate::{Aggregator, UpdateSource, WeightedMean, Weighting},
    partial::partial_update,
    update_file::{EncodedUpdate, UpdateFile},
};
use ferry_proto::v1::{FailureReport, Fold, Task};
use tokio::sync::watch;
use tonic::{Code, Status};

use crate::{relay::Relay, store::Held};

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

fn weighting(fold: Fold) -> Option<Weighting> {
    match fold {
        Fold::PassThrough => None,
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
    let Some(weighting) = weighting(view.fold) else {
        let held = relay.store.unsent(round).await.map_err(|e| e.to_string())?;
        return pass_through(relay, &task, held).await;
    };
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
    send_partial(relay, &task, weighting, held).await
}

/// Folds `held` into one partial aggregate and sends it as the relay's upload for the round.
async fn send_partial(
    relay: &Arc<Relay>,
    task: &Task,
    weighting: Weighting,
    held: Vec<Held>,
) -> Result<(), String> {
    let round = task.round;
    let layout = relay
        .layout(task)
        .await
        .map_err(|s| s.message().to_string())?;
    let mut mean = Box::new(WeightedMean::new(layout.num_params(), weighting));
    let mut losses = (0.0, 0usize);
    let mut folded = Vec::new();
    for update in held {
        let file = match relay.blobs.open(&update.blob).await {
            Ok(file) => file,
            Err(e) => {
                lose(
                    relay,
                    round,
                    &update.node_id,
                    &format!("its stored update: {e}"),
                )
                .await;
                continue;
            }
        };
        let layout = layout.clone();
        let folding = tokio::task::spawn_blocking(move || {
            let fold = || -> Result<Option<f64>, ferry_core::CoreError> {
                let mut file = UpdateFile::open(std::io::BufReader::new(file), &layout)?;
                let loss = file.meta().metrics.get("train_loss").copied();
                mean.accept_source(&mut file)?;
                Ok(loss)
            };
            let result = fold();
            (mean, result)
        })
        .await
        .map_err(|e| e.to_string())?;
        mean = folding.0;
        match folding.1 {
            Ok(loss) => {
                if let Some(loss) = loss {
                    losses.0 += loss;
                    losses.1 += 1;
                }
                folded.push((update.node_id, update.examples));
            }
            Err(e) => lose(relay, round, &update.node_id, &e.to_string()).await,
        }
    }
    if folded.is_empty() {
        return Ok(());
    }
    let nodes: Vec<String> = folded.iter().map(|(node, _)| node.clone()).collect();
    let partial = partial_update(mean.into_sums(), weighting, folded, losses);
    let encoded = EncodedUpdate::new(partial, &layout).map_err(|e| e.to_string())?;
    let id = encoded.content_id();
    let body: Arc<dyn UploadBody> = Arc::new(encoded);
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
                .mark_sent(round, &nodes)
                .await
                .map_err(|e| e.to_string())?;
            tracing::info!(
                "round {round}: a partial aggregate of {} updates {} upstream",
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
                 sending the partial again without them",
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
        let credential = relay.upstream.credential.on_behalf_of(&update.node_id);
        let sent = transfer::upload(
            &mut client,
            &credential,
            round,
            &body,
            &update.blob,
            task.max_chunk_bytes as usize,
        )
        .await;
        let node = [update.node_id.clone()];
        match sent {
            Ok(receipt) if receipt.accepted => relay
                .store
                .mark_sent(round, &node)
                .await
                .map_err(|e| e.to_string())?,
            Ok(_) => return Err("the server holds part of the update; resuming".into()),
            Err(status) if refused_for_good(&status) => {
                tracing::warn!(
                    "round {round}: the server refused node {}'s update: {}",
                    update.node_id,
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
/// dropped, and the node's failure reported upstream.
async fn lose(relay: &Relay, round: u32, node: &str, why: &str) {
    tracing::error!("round {round}: dropping node {node}'s update: {why}");
    forget(relay, round, &[node.to_string()]).await;
    let report = relay
        .upstream
        .credential
        .on_behalf_of(node)
        .authorize(tonic::Request::new(FailureReport {
            round,
            reason: format!("the relay lost the update: {why}"),
        }));
    let _ = relay.upstream.fleet.clone().report_failure(report).await;
}
