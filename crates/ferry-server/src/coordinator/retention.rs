//! Retention: once a round commits, the blobs that only an older round used (its model, its
//! optimizer and broadcast state, its accepted updates) are removed, so a long run's blob
//! store stops growing at `keep_rounds` rounds' worth. Nothing the run may still need goes:
//! the newer rounds' blobs are kept even where an older round shares them (blobs are
//! content-addressed), and a restart needs only the current model and state and the open
//! round's updates.

use std::collections::BTreeSet;

use crate::ServerError;

use super::Coordinator;

impl Coordinator {
    /// After `round` committed: removes what round `round - keep_rounds` alone used. A
    /// failure is logged and counted, never fatal (the blobs stay until a later round's
    /// pruning or by hand).
    pub(super) async fn prune(&self, round: u32) {
        let Some(keep) = self.spec.keep_rounds else {
            return;
        };
        let Some(old) = round.checked_sub(keep).filter(|&old| old >= 1) else {
            return;
        };
        match self.prune_round(old, round).await {
            Ok(removed) => {
                metrics::counter!("ferry_blobs_pruned_total").increment(removed as u64);
            }
            Err(e) => {
                tracing::warn!("could not remove round {old}'s blobs: {e}");
                metrics::counter!("ferry_blob_pruning_errors_total").increment(1);
            }
        }
    }

    /// The blobs round `round` wrote or accepted.
    async fn blobs_of(&self, round: u32) -> Result<BTreeSet<String>, ServerError> {
        let mut shas: BTreeSet<String> = self.store.round_blobs(round).await?.into_iter().collect();
        shas.extend(
            self.store
                .accepted(round)
                .await?
                .into_iter()
                .map(|(_, sha)| sha),
        );
        Ok(shas)
    }

    async fn prune_round(&self, old: u32, newest: u32) -> Result<usize, ServerError> {
        let mut doomed = self.blobs_of(old).await?;
        for kept in old + 1..=newest {
            for sha in self.blobs_of(kept).await? {
                doomed.remove(&sha);
            }
        }
        for sha in &doomed {
            self.blobs.delete(sha).await?;
        }
        Ok(doomed.len())
    }
}
