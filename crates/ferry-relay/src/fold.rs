//! Folding a round's held updates (nodes' own, and lower relays' partial aggregates) into one
//! partial aggregate, in holder order, so that the same updates always make the same bytes
//! and a cut upload resumes.

use std::sync::Arc;

use ferry_client::transfer::UploadBody;
use ferry_core::{
    aggregate::{Aggregator, UpdateSource, WeightedMean, Weighting},
    partial::partial_update,
    update_file::{EncodedUpdate, UpdateFile},
};
use ferry_proto::v1::Task;

use crate::{
    flush::{Aggregate, lose},
    relay::Relay,
    store::Held,
};

/// What folding one held update adds besides its sums.
struct Folded {
    /// A partial's contributors (`None`: the update is its holder's own).
    contributors: Option<Vec<(String, u64)>>,
    /// Its training losses' sum and count.
    losses: (f64, usize),
}

/// Folds `held` into one partial aggregate weighted by `weighting`; `None` when none of them
/// could be read (each such update is dropped and its nodes' failure reported).
pub(crate) async fn fold_partial(
    relay: &Arc<Relay>,
    task: &Task,
    weighting: Weighting,
    held: Vec<Held>,
) -> Result<Option<Aggregate>, String> {
    let round = task.round;
    let layout = relay
        .layout(task)
        .await
        .map_err(|s| s.message().to_string())?;
    let mut mean = Box::new(WeightedMean::new(layout.num_params(), weighting));
    let mut losses = (0.0, 0usize);
    let mut contributors = Vec::new();
    let mut folded = Vec::new();
    for update in held {
        let file = match relay.blobs.open(&update.blob).await {
            Ok(file) => file,
            Err(e) => {
                lose(relay, round, &update, &format!("its stored update: {e}")).await;
                continue;
            }
        };
        let layout = layout.clone();
        let folding = tokio::task::spawn_blocking(move || {
            let fold = || -> Result<Folded, ferry_core::CoreError> {
                let mut file = UpdateFile::open(std::io::BufReader::new(file), &layout)?;
                let meta = file.meta();
                let folded = match &meta.partial {
                    // A lower relay's partial: its contributors and losses, as they came.
                    Some(partial) => Folded {
                        contributors: Some(partial.contributors.clone()),
                        losses: (partial.train_loss_sum, partial.train_losses),
                    },
                    None => Folded {
                        contributors: None,
                        losses: meta
                            .metrics
                            .get("train_loss")
                            .map_or((0.0, 0), |loss| (*loss, 1)),
                    },
                };
                mean.accept_source(&mut file)?;
                Ok(folded)
            };
            let result = fold();
            (mean, result)
        })
        .await
        .map_err(|e| e.to_string())?;
        mean = folding.0;
        match folding.1 {
            Ok(done) => {
                losses.0 += done.losses.0;
                losses.1 += done.losses.1;
                contributors.extend(
                    done.contributors
                        .unwrap_or_else(|| vec![(update.holder.clone(), update.examples)]),
                );
                folded.push(update);
            }
            Err(e) => lose(relay, round, &update, &e.to_string()).await,
        }
    }
    if folded.is_empty() {
        return Ok(None);
    }
    let nodes: Vec<String> = contributors.iter().map(|(node, _)| node.clone()).collect();
    let partial = partial_update(mean.into_sums(), weighting, contributors, losses);
    let encoded = EncodedUpdate::new(partial, &layout).map_err(|e| e.to_string())?;
    let id = encoded.content_id();
    Ok(Some(Aggregate {
        body: Arc::new(encoded) as Arc<dyn UploadBody>,
        id,
        folded,
        nodes,
        what: "a partial aggregate",
    }))
}
