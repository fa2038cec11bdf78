//! The relay service a relay serves to the relays below it (a chain): each lower relay syncs
//! its subtree's part of this relay's view, and hands over nodes that failed over to it. To a
//! lower relay this relay looks like the server.

use std::{collections::HashSet, time::Duration};

use ferry_proto::v1::{
    AdoptRequest, AdoptResponse, Finished, RelaySyncRequest, RelaySyncResponse, relay_server,
};
use ferry_server::{auth::Credential, store::IdentityKind};
use tonic::{Request, Response, Status};

use crate::relay::{Relay, internal, lock, unauthenticated};

/// Longest a lower relay's sync is held open.
const MAX_WAIT: Duration = Duration::from_secs(30);

#[tonic::async_trait]
impl relay_server::Relay for Relay {
    async fn sync(
        &self,
        request: Request<RelaySyncRequest>,
    ) -> Result<Response<RelaySyncResponse>, Status> {
        let lower = self.lower_relay(&request).await?;
        let RelaySyncRequest {
            online,
            wait_ms,
            version,
            relays,
        } = request.into_inner();
        self.mark_online(&lower, &online, &relays).await?;
        let mut changed = self.subscribe();
        if changed.borrow_and_update().revision == version {
            let wait = Duration::from_millis(u64::from(wait_ms)).min(MAX_WAIT);
            let _ = tokio::time::timeout(wait, changed.changed()).await;
        }
        let view = self.subscribe().borrow().clone();
        let mut train_nodes = Vec::new();
        if let Some(round) = view.round() {
            let answered: HashSet<String> = self
                .store
                .nodes_in(round)
                .await
                .map_err(internal)?
                .into_iter()
                .collect();
            for node in &view.train_nodes {
                let done = answered.contains(node) || self.gave_up(round, node);
                if !done
                    && self
                        .is_member_below(node, IdentityKind::Node, &lower)
                        .await?
                {
                    train_nodes.push(node.clone());
                }
            }
        }
        let mut evaluate_nodes = Vec::new();
        for node in &view.evaluate_nodes {
            if self
                .is_member_below(node, IdentityKind::Node, &lower)
                .await?
            {
                evaluate_nodes.push(node.clone());
            }
        }
        train_nodes.sort();
        evaluate_nodes.sort();
        let ready = |task: &Option<ferry_proto::v1::Task>| task.clone().filter(|t| view.ready(t));
        let revoked = self.store.revoked_below(&lower).await.map_err(internal)?;
        Ok(Response::new(RelaySyncResponse {
            version: view.revision,
            train: ready(&view.train),
            train_nodes,
            evaluate: ready(&view.evaluate),
            evaluate_nodes,
            idle_reason: view.unreachable_reason().unwrap_or(view.idle.clone()),
            finished: view.finished.clone().map(|reason| Finished { reason }),
            fold: view.fold.into(),
            relay_deadline_unix_ms: view.lower_relay_deadline_unix_ms(),
            revoked,
        }))
    }

    async fn adopt(
        &self,
        request: Request<AdoptRequest>,
    ) -> Result<Response<AdoptResponse>, Status> {
        let lower = self.lower_relay(&request).await?;
        let text = request.into_inner().credential;
        let credential = Credential::from_header(&format!("Bearer {text}")).ok_or_else(|| {
            unauthenticated("malformed credential; expected '<node_id>.<secret>'".into())
        })?;
        Ok(Response::new(self.adopt(&credential, Some(&lower)).await?))
    }
}

impl Relay {
    /// Marks the nodes and relays a lower relay heard from (those below it) as online here,
    /// so that this relay reports them upstream.
    async fn mark_online(
        &self,
        lower: &str,
        online: &[String],
        relays: &[String],
    ) -> Result<(), Status> {
        let now = std::time::Instant::now();
        let mut nodes = Vec::new();
        for node in online {
            if self
                .is_member_below(node, IdentityKind::Node, lower)
                .await?
            {
                nodes.push(node.clone());
            }
        }
        let mut below = HashSet::new();
        for relay in relays {
            if self
                .is_member_below(relay, IdentityKind::Relay, lower)
                .await?
            {
                below.insert(relay.clone());
            }
        }
        let mut seen = lock(&self.seen);
        for node in nodes {
            seen.insert(node, now);
        }
        drop(seen);
        let mut seen = lock(&self.relays_seen);
        for relay in below {
            seen.insert(relay, now);
        }
        Ok(())
    }
}
