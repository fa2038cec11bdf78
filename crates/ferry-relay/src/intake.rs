//! What the relay takes in: a node's update, checked as the server checks it (hash, names,
//! shapes, dtypes, finite values, the round; a masked input's shape and modulus), or a lower
//! relay's partial aggregate or masked sum, whose contributors must all be nodes of that
//! relay's subtree still owing the round; either is stored before its sender is told, and
//! each node counts at most once.

use std::collections::HashSet;

use ferry_core::{aggregate::UpdateSource, partial::PartialMeta};
use ferry_proto::v1::{self, FailureReport, Fold, UploadChunk};
use ferry_server::{
    staged::{self, Verified},
    store::IdentityKind,
};
use tonic::Status;

use crate::{
    flush::weighting,
    masked,
    relay::{Relay, internal, lock},
    store::{Held, Holding},
};

impl Relay {
    /// Checks a node's upload's first chunk: the round is open for `node` at this relay and
    /// its hash is well formed. `Ok(None)`: the relay already holds the node's update.
    pub(crate) async fn expect_upload(
        &self,
        node: &str,
        chunk: &UploadChunk,
    ) -> Result<Option<v1::Task>, Status> {
        if self.store.has(chunk.round, node).await.map_err(internal)? {
            return Ok(None);
        }
        let task = self.open_task(chunk)?;
        if !self.view.borrow().train_nodes.contains(node) || self.gave_up(chunk.round, node) {
            return Err(self.not_open(chunk.round));
        }
        Ok(Some(task))
    }

    /// Checks a lower relay's upload's first chunk: the round is open here and its hash is
    /// well formed. `Ok(None)`: the relay already holds this very partial.
    pub(crate) async fn expect_partial(
        &self,
        lower: &str,
        chunk: &UploadChunk,
    ) -> Result<Option<v1::Task>, Status> {
        if self
            .store
            .holds(chunk.round, lower, &chunk.hash)
            .await
            .map_err(internal)?
        {
            return Ok(None);
        }
        self.open_task(chunk).map(Some)
    }

    fn open_task(&self, chunk: &UploadChunk) -> Result<v1::Task, Status> {
        staged::check_update_id(&chunk.hash).map_err(Status::invalid_argument)?;
        self.view
            .borrow()
            .train
            .clone()
            .filter(|task| task.round == chunk.round)
            .ok_or_else(|| self.not_open(chunk.round))
    }

    fn not_open(&self, round: u32) -> Status {
        Status::failed_precondition(format!(
            "round {round} is not open for this node (the relay is at round {}); pull a new task",
            self.view.borrow().current_round()
        ))
    }

    /// Checks `node`'s whole update and holds it; an update the server would refuse is
    /// refused here, and the node's failure reported upstream.
    pub(crate) async fn take_update(
        &self,
        node: &str,
        round: u32,
        task: &v1::Task,
        verified: Verified,
    ) -> Result<Holding, Status> {
        let examples = if task.secagg.is_some() {
            // A masked input: beyond its shape, only the server's unmasked sum can be checked.
            let bytes = verified.read().await.map_err(internal)?;
            if let Err(refused) = masked::check_input(self, task, &bytes).await {
                self.refuse(node, round, refused.message()).await;
                return Err(refused);
            }
            0
        } else {
            let layout = self.layout(task).await?;
            let checked = verified.open_update(&layout).and_then(|mut file| {
                file.check()?;
                Ok(file.meta().num_examples)
            });
            match checked {
                Ok(examples) => examples,
                Err(e) => {
                    self.refuse(node, round, &e.to_string()).await;
                    return Err(Status::invalid_argument(e.to_string()));
                }
            }
        };
        let held = Held {
            holder: node.to_string(),
            blob: verified.id().to_string(),
            examples,
        };
        self.keep(round, verified, &held, &[node.to_string()]).await
    }

    /// Refuses `node`'s update for `round`: the server records the node's failure (the
    /// node hears why either way), and the relay no longer waits for it.
    async fn refuse(&self, node: &str, round: u32, why: &str) {
        let reason = format!("the relay refused the update: {why}");
        let report = self.on_behalf(node, FailureReport { round, reason });
        let _ = self.upstream.fleet.clone().report_failure(report).await;
        lock(&self.gave_up).insert((round, node.to_string()));
        self.flush.notify_one();
    }

    /// Checks a lower relay's whole partial aggregate (or, in a secure round, masked sum) and
    /// holds it: it must fold the way this round folds, and name only nodes below that relay
    /// that owe the round their update; otherwise the receipt names the nodes to leave out.
    pub(crate) async fn take_partial(
        &self,
        lower: &str,
        round: u32,
        task: &v1::Task,
        verified: Verified,
    ) -> Result<Holding, Status> {
        let (examples, contributors) = if self.view.borrow().fold == Fold::MaskedSum {
            let bytes = verified.read().await.map_err(internal)?;
            let sum = masked::read_sum(self, task, &bytes).await?;
            (0, sum.contributors)
        } else {
            let partial = self.read_partial(task, &verified).await?;
            let examples = partial.examples();
            (
                examples,
                partial.contributors.into_iter().map(|(n, _)| n).collect(),
            )
        };
        let waiting: HashSet<String> = self.view.borrow().train_nodes.clone();
        let mut outsiders = Vec::new();
        for node in &contributors {
            if !waiting.contains(node)
                || self.gave_up(round, node)
                || !self
                    .is_member_below(node, IdentityKind::Node, lower)
                    .await?
            {
                outsiders.push(node.clone());
            }
        }
        if !outsiders.is_empty() {
            return Ok(Holding::CountedElsewhere(outsiders));
        }
        let held = Held {
            holder: lower.to_string(),
            blob: verified.id().to_string(),
            examples,
        };
        self.keep(round, verified, &held, &contributors).await
    }

    /// A lower relay's partial aggregate, checked as the server checks one: whole, and
    /// folded the way this round folds.
    async fn read_partial(
        &self,
        task: &v1::Task,
        verified: &Verified,
    ) -> Result<PartialMeta, Status> {
        let layout = self.layout(task).await?;
        let partial = verified
            .open_update(&layout)
            .and_then(|mut file| {
                file.check()?;
                Ok(file.meta().partial.clone())
            })
            .map_err(|e| Status::invalid_argument(e.to_string()))?
            .ok_or_else(|| {
                Status::invalid_argument(
                    "a relay uploads partial aggregates as itself; a node's own update travels \
                     on its behalf",
                )
            })?;
        let fold = self.view.borrow().fold;
        if weighting(fold) != Some(partial.weighting) {
            return Err(Status::invalid_argument(
                "this run's rule does not fold updates this way at relays; pass each update \
                 through",
            ));
        }
        Ok(partial)
    }

    /// Stores `verified` and records it as `held`, counted for `nodes`.
    async fn keep(
        &self,
        round: u32,
        verified: Verified,
        held: &Held,
        nodes: &[String],
    ) -> Result<Holding, Status> {
        verified.keep(&self.blobs).await.map_err(internal)?;
        let holding = self
            .store
            .hold(round, held, nodes)
            .await
            .map_err(internal)?;
        if let Holding::CountedElsewhere(_) = holding
            && !self.store.blob_held(&held.blob).await.map_err(internal)?
        {
            let _ = self.blobs.delete(&held.blob).await;
        }
        self.flush.notify_one();
        Ok(holding)
    }
}
