//! The `ferry.v1.Relay` service (a relay's sync and the adoption of a node that failed over
//! to it), and which nodes each relay may speak for.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use ferry_core::aggregate::Weighting;
use ferry_proto::v1::{
    AdoptRequest, AdoptResponse, Finished, Fold, RelaySyncRequest, RelaySyncResponse,
    relay_server::Relay,
};
use tonic::{Request, Response, Status};

use crate::{
    auth::Credential,
    coordinator::RelayFold,
    service::{
        FleetService, MAX_WAIT, permission_denied, store_unavailable, unauthenticated,
        wire::{evaluation_message, task_message},
    },
    store::{IdentityKind, Store},
};

/// How long a relay's subtree, as read from the store, is taken as it is: enrolments and
/// moves through this server are seen at once; a revocation (`ferry token revoke` writes the
/// store directly) within this time.
const SUBTREE_FRESH_FOR: Duration = Duration::from_secs(30);

/// A relay's subtree as last read, and when.
struct Subtree {
    view: SubtreeView,
    read: Instant,
}

/// What a relay's subtree holds, as last read.
#[derive(Clone, Default)]
pub(super) struct SubtreeView {
    /// Its live nodes (never a relay: only nodes train, score and count as online).
    pub(super) members: Arc<HashSet<String>>,
    /// The live relays below it (a chain).
    pub(super) relays: Arc<HashSet<String>>,
    /// Its revoked members.
    pub(super) revoked: Vec<String>,
}

impl SubtreeView {
    /// Its live members of `kind`.
    fn live(&self, kind: IdentityKind) -> &HashSet<String> {
        match kind {
            IdentityKind::Node => &self.members,
            IdentityKind::Relay => &self.relays,
        }
    }

    /// Counts `member`, of `kind`, among its live members.
    fn add(&mut self, member: String, kind: IdentityKind) {
        let set = match kind {
            IdentityKind::Node => &mut self.members,
            IdentityKind::Relay => &mut self.relays,
        };
        Arc::make_mut(set).insert(member);
    }
}

/// The nodes below each relay, as the store said lately, so that a sync or a call a relay
/// forwards is checked without reading the whole subtree again.
#[derive(Default)]
pub(super) struct Subtrees {
    known: Mutex<HashMap<String, Subtree>>,
    /// Members that joined each relay's subtree lately, and when: a read of the subtree that
    /// began before one joined may miss it, so each read adds those that joined since it
    /// began.
    joined: Mutex<HashMap<String, JoinedLog>>,
}

/// Members that joined one relay's subtree lately: when, who, and what kind.
type JoinedLog = Vec<(Instant, String, IdentityKind)>;

/// How long a member that joined is remembered apart from the subtrees read (longer than any
/// read of a subtree takes).
const JOINED_KEPT_FOR: Duration = Duration::from_secs(60);

impl Subtrees {
    /// `relay`'s subtree, read from the store when not read lately.
    pub(super) async fn refresh(&self, store: &Store, relay: &str) -> Result<SubtreeView, Status> {
        if let Some(known) = self
            .lock()
            .get(relay)
            .filter(|known| known.read.elapsed() < SUBTREE_FRESH_FOR)
        {
            return Ok(known.view.clone());
        }
        let began = Instant::now();
        let rows = store.subtree(relay).await.map_err(store_unavailable)?;
        let mut view = SubtreeView::default();
        for row in rows {
            if row.revoked {
                view.revoked.push(row.node_id);
            } else {
                view.add(row.node_id, row.kind);
            }
        }
        if let Some(joined) = self.joined_lock().get(relay) {
            for (_, member, kind) in joined.iter().filter(|(at, _, _)| *at >= began) {
                view.add(member.clone(), *kind);
            }
        }
        let subtree = Subtree {
            view: view.clone(),
            read: began,
        };
        self.lock().insert(relay.to_string(), subtree);
        Ok(view)
    }

    /// Whether `member` is a live member of `kind` below `relay` (reading the subtree again
    /// when it is not among the members read: it may have joined since).
    pub(super) async fn contains(
        &self,
        store: &Store,
        relay: &str,
        member: &str,
        kind: IdentityKind,
    ) -> Result<bool, Status> {
        let known = self
            .lock()
            .get(relay)
            .is_some_and(|known| known.view.live(kind).contains(member));
        if known {
            return Ok(true);
        }
        self.forget(relay);
        Ok(self
            .refresh(store, relay)
            .await?
            .live(kind)
            .contains(member))
    }

    /// `relay`'s live nodes.
    pub(super) async fn members(
        &self,
        store: &Store,
        relay: &str,
    ) -> Result<Arc<HashSet<String>>, Status> {
        Ok(self.refresh(store, relay).await?.members)
    }

    /// Forgets what is known of `relay`'s subtree: it changed.
    pub(super) fn forget(&self, relay: &str) {
        self.lock().remove(relay);
    }

    /// `relay` and every relay above it (its subtree is part of theirs).
    async fn chain(store: &Store, relay: &str) -> Vec<String> {
        let mut chain = Vec::new();
        let mut next = Some(relay.to_string());
        // A chain is short; the bound only guards against a cycle in damaged data.
        while let Some(relay) = next.take().filter(|_| chain.len() < 16) {
            next = match store.node(&relay).await {
                Ok(Some(row)) => row.relay,
                _ => None,
            };
            chain.push(relay);
        }
        chain
    }

    /// Forgets what is known of the subtrees of `relay` and of every relay above it.
    pub(super) async fn forget_up(&self, store: &Store, relay: &str) {
        for relay in Self::chain(store, relay).await {
            self.forget(&relay);
        }
    }

    /// Adds `member`, just enrolled through `relay`, to the subtrees known of `relay` and of
    /// every relay above it, so that a fleet enrolling through relays does not make each
    /// relay's next sync read its whole subtree again.
    pub(super) async fn joined(
        &self,
        store: &Store,
        relay: &str,
        member: &str,
        kind: IdentityKind,
    ) {
        let chain = Self::chain(store, relay).await;
        let now = Instant::now();
        let mut joined = self.joined_lock();
        for relay in &chain {
            let log = joined.entry(relay.clone()).or_default();
            log.retain(|(at, _, _)| now.duration_since(*at) < JOINED_KEPT_FOR);
            log.push((now, member.to_string(), kind));
        }
        drop(joined);
        let mut known = self.lock();
        for relay in chain {
            if let Some(subtree) = known.get_mut(&relay) {
                subtree.view.add(member.to_string(), kind);
            }
        }
    }

    fn joined_lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, JoinedLog>> {
        // Each critical section is one read or one append of a list.
        self.joined
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Subtree>> {
        // A panic while holding this map cannot leave it half-written.
        self.known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn fold_message(fold: RelayFold) -> Fold {
    match fold {
        RelayFold::PassThrough => Fold::PassThrough,
        RelayFold::Weighted(Weighting::Examples) => Fold::Examples,
        RelayFold::Weighted(Weighting::Uniform) => Fold::Uniform,
        RelayFold::Weighted(Weighting::Normalized) => Fold::Normalized,
        RelayFold::MaskedSum => Fold::MaskedSum,
    }
}

#[tonic::async_trait]
impl Relay for FleetService {
    async fn sync(
        &self,
        request: Request<RelaySyncRequest>,
    ) -> Result<Response<RelaySyncResponse>, Status> {
        let relay = self.relay_caller(&request).await?;
        if self.coordinator.spec().asynchronous.is_some() {
            return Err(Status::failed_precondition(
                "this run aggregates asynchronously (mode = \"async\"), and relays serve \
                 synchronous rounds: connect its nodes to the server itself",
            ));
        }
        let RelaySyncRequest {
            online,
            wait_ms,
            version,
            relays,
        } = request.into_inner();
        let SubtreeView {
            members,
            relays: below,
            revoked,
        } = self.subtrees.refresh(&self.store, &relay).await?;
        self.coordinator
            .seen_all(
                std::iter::once(relay.as_str()).chain(
                    relays
                        .iter()
                        .map(String::as_str)
                        .filter(|r| below.contains(*r)),
                ),
                online
                    .iter()
                    .map(String::as_str)
                    .filter(|n| members.contains(*n)),
            )
            .await;
        let wait = Duration::from_millis(u64::from(wait_ms))
            .min(MAX_WAIT)
            .min(self.liveness_beat());
        let mut work = self.coordinator.subscribe_work();
        if *work.borrow_and_update() == version {
            let _ = tokio::time::timeout(wait, work.changed()).await;
        }
        let version = *work.borrow();
        // Nodes may have enrolled through the relay while it waited.
        let members = self.subtrees.members(&self.store, &relay).await?;
        let view = self.coordinator.relay_view(&members).await;
        let spec = self.coordinator.spec();
        let (train, train_nodes) = match &view.train {
            Some((task, nodes)) => (Some(task_message(task, spec)), nodes.clone()),
            None => (None, Vec::new()),
        };
        let (evaluate, evaluate_nodes) = match &view.evaluate {
            Some((task, nodes)) => (Some(evaluation_message(task, spec)), nodes.clone()),
            None => (None, Vec::new()),
        };
        Ok(Response::new(RelaySyncResponse {
            version,
            train,
            train_nodes,
            evaluate,
            evaluate_nodes,
            idle_reason: view.idle,
            finished: view.finished.map(|reason| Finished { reason }),
            fold: fold_message(view.fold).into(),
            relay_deadline_unix_ms: view.relay_deadline_unix_ms,
            revoked,
        }))
    }

    async fn adopt(
        &self,
        request: Request<AdoptRequest>,
    ) -> Result<Response<AdoptResponse>, Status> {
        let relay = self.relay_caller(&request).await?;
        let text = request.into_inner().credential;
        let credential = Credential::from_header(&format!("Bearer {text}")).ok_or_else(|| {
            unauthenticated("malformed credential; expected '<node_id>.<secret>'")
        })?;
        let node = self
            .store
            .node(&credential.node_id)
            .await
            .map_err(store_unavailable)?
            .filter(|node| credential.matches(&node.secret_hash) && !node.revoked)
            .ok_or_else(|| {
                unauthenticated(&format!(
                    "unknown or revoked credential for node '{}'; enrol again with a new token",
                    credential.node_id
                ))
            })?;
        if node.kind != IdentityKind::Node || node.node_id == relay {
            return Err(permission_denied(
                "only a node can move into a relay's subtree",
            ));
        }
        if node.relay.as_deref() != Some(relay.as_str()) {
            self.store
                .move_node(&node.node_id, Some(&relay))
                .await
                .map_err(store_unavailable)?;
            if let Some(old) = &node.relay {
                self.subtrees.forget_up(&self.store, old).await;
            }
            self.subtrees.forget_up(&self.store, &relay).await;
            tracing::info!("node {} moved under relay {relay}", node.node_id);
        }
        Ok(Response::new(AdoptResponse {
            node_id: node.node_id,
            name: node.name,
        }))
    }
}
