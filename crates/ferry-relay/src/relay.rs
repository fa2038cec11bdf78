//! The relay's state: its link upstream, its store and blobs, what it knows of the run, and
//! who calls it: a node (one it does not know is adopted from the server with the node's own
//! credential), a relay below it (a chain), or such a relay forwarding for one of its nodes.

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use ferry_core::{Model, ModelLayout, personal::TensorRoles};
use ferry_proto::v1::{
    self, AdoptRequest, AdoptResponse, BlobRef, RelaySyncResponse, fleet_server::FleetServer,
    relay_server::RelayServer,
};
use ferry_server::{
    auth::{self, Credential},
    blobs::Blobs,
    limits::{AbuseLimits, Guard},
    store::IdentityKind,
    turns::TransferTurns,
};
use tokio::sync::watch;
use tonic::{Request, Status};

use crate::{store::RelayStore, upstream::Upstream, view::View};

/// A node heard from within this long counts as online in the relay's sync.
const ONLINE_WINDOW: Duration = Duration::from_secs(30);

/// Chunk size of downloads when the task does not say.
const DEFAULT_CHUNK: u64 = 1 << 20;

/// The relay: its link upstream, its store and blobs, and what it knows of the run.
pub struct Relay {
    pub(crate) upstream: Upstream,
    pub(crate) store: RelayStore,
    pub(crate) blobs: Blobs,
    pub(crate) downloads: PathBuf,
    pub(crate) view: watch::Sender<View>,
    pub(crate) seen: Mutex<HashMap<String, Instant>>,
    /// Relays below this one, by when each was last heard from.
    pub(crate) relays_seen: Mutex<HashMap<String, Instant>>,
    pub(crate) gave_up: Mutex<HashSet<(u32, String)>>,
    pub(crate) fetching: Mutex<HashSet<String>>,
    pub(crate) layouts: Mutex<HashMap<String, Arc<ModelLayout>>>,
    pub(crate) transfers: Arc<TransferTurns>,
    pub(crate) guard: Guard,
    /// Woken when an update is held or a node gives up, so that the flush loop looks again.
    pub(crate) flush: tokio::sync::Notify,
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here is one insert, remove or read.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `request`'s metadata without `ferry-on-behalf-of`, to check the caller as itself.
fn strip_on_behalf<T>(request: &Request<T>) -> Request<()> {
    let mut metadata = request.metadata().clone();
    metadata.remove(ferry_proto::ON_BEHALF_OF);
    Request::from_parts(metadata, Default::default(), ())
}

pub(crate) fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(format!("relay: {e}"))
}

pub(crate) fn unauthenticated(message: String) -> Status {
    tracing::warn!("refused call: {message}");
    Status::unauthenticated(message)
}

pub(crate) fn permission_denied(message: String) -> Status {
    tracing::warn!("refused call: {message}");
    Status::permission_denied(message)
}

/// Whom a call is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Caller {
    /// A node: the caller itself, or a node a lower relay forwards for.
    Node(String),
    /// A relay below this one, as itself (its partial aggregates, its model downloads).
    Relay(String),
}
impl Relay {
    /// A relay over `upstream`, keeping its state in `store` and `blobs`, and partial
    /// downloads in `downloads`.
    pub fn new(upstream: Upstream, store: RelayStore, blobs: Blobs, downloads: PathBuf) -> Self {
        Self {
            upstream,
            store,
            blobs,
            downloads,
            view: watch::channel(View::default()).0,
            seen: Mutex::default(),
            relays_seen: Mutex::default(),
            gave_up: Mutex::default(),
            fetching: Mutex::default(),
            layouts: Mutex::default(),
            transfers: TransferTurns::standard(),
            guard: Guard::new(AbuseLimits::default()),
            flush: tokio::sync::Notify::new(),
        }
    }

    /// The fleet service nodes (and relays below this one) call.
    pub fn fleet_server(self: &Arc<Self>) -> FleetServer<Self> {
        let limit = 64 << 20;
        FleetServer::from_arc(self.clone())
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit)
    }

    /// The relay service relays below this one call.
    pub fn relay_server(self: &Arc<Self>) -> RelayServer<Self> {
        RelayServer::from_arc(self.clone())
    }

    /// The relay's view, as it changes.
    pub fn subscribe(&self) -> watch::Receiver<View> {
        self.view.subscribe()
    }

    /// Takes the server's answer; nodes waiting for work are woken only if it changed what
    /// some node is to do. Models no open task needs any more leave the cache.
    pub fn apply(&self, answer: RelaySyncResponse) {
        let mut stale = Vec::new();
        self.view.send_if_modified(|view| {
            let before = (
                view.train.clone(),
                view.evaluate.clone(),
                view.finished.clone(),
            );
            let (nodes, evaluating) = (view.train_nodes.clone(), view.evaluate_nodes.clone());
            let was_unreachable = view.unreachable.is_some();
            view.apply(answer);
            let needed: HashSet<String> = view
                .train
                .iter()
                .chain(view.evaluate.iter())
                .flat_map(View::blobs_of)
                .map(|blob| blob.hash.clone())
                .collect();
            stale = view
                .cached
                .iter()
                .filter(|id| !needed.contains(*id))
                .cloned()
                .collect();
            view.cached.retain(|id| needed.contains(id));
            // Nodes leaving the cohort's waiting list (they answered) change no node's work:
            // thousands of idle nodes long-polling here are not woken for each of them.
            let changed = was_unreachable
                || before
                    != (
                        view.train.clone(),
                        view.evaluate.clone(),
                        view.finished.clone(),
                    )
                || !view.train_nodes.is_subset(&nodes)
                || evaluating != view.evaluate_nodes;
            view.revision += u64::from(changed);
            changed
        });
        if !stale.is_empty() {
            lock(&self.layouts).retain(|id, _| !stale.contains(id));
            let blobs = self.blobs.clone();
            tokio::spawn(async move {
                for id in stale {
                    let _ = blobs.delete(&id).await;
                }
            });
        }
        self.flush.notify_one();
    }

    /// Notes that the server cannot be reached, and why.
    pub fn unreachable(&self, why: String) {
        self.view.send_if_modified(|view| {
            let changed = view.unreachable.as_ref() != Some(&why);
            view.unreachable = Some(why);
            view.revision += u64::from(changed);
            changed
        });
    }

    /// The blobs the open tasks need that the relay neither holds nor is fetching.
    pub fn missing_blobs(&self) -> Vec<BlobRef> {
        let view = self.view.borrow();
        let fetching = lock(&self.fetching);
        view.train
            .iter()
            .chain(view.evaluate.iter())
            .flat_map(View::blobs_of)
            .filter(|blob| !view.cached.contains(&blob.hash) && !fetching.contains(&blob.hash))
            .cloned()
            .collect()
    }

    /// Claims the fetch of blob `id`; false if it is already being fetched.
    pub fn start_fetch(&self, id: &str) -> bool {
        lock(&self.fetching).insert(id.to_string())
    }

    /// A fetch of blob `id` ended: held (`ok`) or given up.
    pub fn fetched(&self, id: &str, ok: bool) {
        lock(&self.fetching).remove(id);
        if ok {
            self.view.send_modify(|view| {
                view.cached.insert(id.to_string());
                view.revision += 1;
            });
        }
    }

    /// Where partial downloads grow.
    pub fn downloads_dir(&self) -> PathBuf {
        self.downloads.clone()
    }

    /// Nodes heard from recently (directly or through a relay below); with `since`, only
    /// those heard from since then.
    pub fn online_nodes(&self, since: Option<Instant>) -> Vec<String> {
        let mut seen = lock(&self.seen);
        seen.retain(|_, at| at.elapsed() < ONLINE_WINDOW);
        seen.iter()
            .filter(|(_, at)| since.is_none_or(|since| **at >= since))
            .map(|(node, _)| node.clone())
            .collect()
    }

    /// Relays below this one heard from recently.
    pub fn online_relays(&self) -> Vec<String> {
        let mut seen = lock(&self.relays_seen);
        seen.retain(|_, at| at.elapsed() < ONLINE_WINDOW);
        seen.keys().cloned().collect()
    }

    /// Whether `node` gave `round` up (its failure went upstream).
    pub fn gave_up(&self, round: u32, node: &str) -> bool {
        lock(&self.gave_up).contains(&(round, node.to_string()))
    }

    /// The layout of the model `task` trains, read from the relay's copy once.
    pub async fn layout(&self, task: &v1::Task) -> Result<Arc<ModelLayout>, Status> {
        let model = task
            .model
            .as_ref()
            .ok_or_else(|| Status::failed_precondition("the task names no model"))?;
        if let Some(layout) = lock(&self.layouts).get(&model.hash) {
            return Ok(layout.clone());
        }
        let personal =
            TensorRoles::of(task.personal.clone(), task.frozen.clone()).map_err(internal)?;
        let file = self.blobs.open(&model.hash).await.map_err(internal)?;
        let layout = tokio::task::spawn_blocking(move || {
            Model::read_safetensors(std::io::BufReader::new(file), &personal)
                .map(|model| model.layout().clone())
        })
        .await
        .map_err(internal)?
        .map_err(internal)?;
        lock(&self.layouts).insert(model.hash.clone(), layout.clone());
        Ok(layout)
    }

    /// Whom a call is for: a member's credential checked against the relay's members (a
    /// node it does not know, one that enrolled elsewhere and failed over here, is asked of
    /// the server, which moves it into this relay's subtree); a lower relay may name a node
    /// of its own subtree in `ferry-on-behalf-of`.
    pub(crate) async fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        let credential = request
            .metadata()
            .get(ferry_proto::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(Credential::from_header)
            .ok_or_else(|| {
                unauthenticated(
                    "no or malformed credential; expected 'Bearer <node_id>.<secret>'".into(),
                )
            })?;
        let kind = match self
            .store
            .member(&credential.node_id)
            .await
            .map_err(internal)?
        {
            Some(member) if member.revoked => {
                return Err(unauthenticated(format!(
                    "{} {} ('{}') has been revoked; ask the operator for a new token",
                    member.kind.as_str(),
                    member.node_id,
                    member.name
                )));
            }
            Some(member) if credential.matches(&member.secret_hash) => member.kind,
            _ => {
                self.adopt(&credential, None).await?;
                IdentityKind::Node
            }
        };
        let on_behalf = request
            .metadata()
            .get(ferry_proto::ON_BEHALF_OF)
            .map(|v| v.to_str().unwrap_or_default().to_string());
        let caller = match (kind, on_behalf) {
            (IdentityKind::Node, None) => Caller::Node(credential.node_id),
            (IdentityKind::Node, Some(_)) => {
                return Err(permission_denied(
                    "only a relay may call on behalf of another node".into(),
                ));
            }
            (IdentityKind::Relay, None) => {
                lock(&self.relays_seen).insert(credential.node_id.clone(), Instant::now());
                return Ok(Caller::Relay(credential.node_id));
            }
            (IdentityKind::Relay, Some(node)) => {
                if !self
                    .is_member_below(&node, IdentityKind::Node, &credential.node_id)
                    .await?
                {
                    return Err(permission_denied(format!(
                        "node '{node}' is not in relay {}'s subtree",
                        credential.node_id
                    )));
                }
                Caller::Node(node)
            }
        };
        if let Caller::Node(node) = &caller {
            lock(&self.seen).insert(node.clone(), Instant::now());
        }
        Ok(caller)
    }

    /// The node a node's call is for; a relay calling as itself is refused.
    pub(crate) async fn node<T>(&self, request: &Request<T>) -> Result<String, Status> {
        match self.caller(request).await? {
            Caller::Node(node) => Ok(node),
            Caller::Relay(relay) => Err(permission_denied(format!(
                "relay {relay} called a node's method as itself; a relay syncs its nodes' work \
                 through the Relay service and forwards their calls on their behalf"
            ))),
        }
    }

    /// The relay below this one that a relay-service call or a forwarded enrolment is for:
    /// the calling relay, or a relay below it that it names in `ferry-on-behalf-of`.
    pub(crate) async fn lower_relay<T>(&self, request: &Request<T>) -> Result<String, Status> {
        let Caller::Relay(caller) = self.caller(&strip_on_behalf(request)).await? else {
            return Err(permission_denied(
                "only a relay below this one calls the Relay service or forwards an enrolment \
                 (create a relay token with `ferry token create --relay`)"
                    .into(),
            ));
        };
        let Some(below) = request.metadata().get(ferry_proto::ON_BEHALF_OF) else {
            return Ok(caller);
        };
        let below = below.to_str().unwrap_or_default().to_string();
        if !self
            .is_member_below(&below, IdentityKind::Relay, &caller)
            .await?
        {
            return Err(permission_denied(format!(
                "'{below}' is not a relay below relay {caller}"
            )));
        }
        Ok(below)
    }

    /// Whether `member` is a live member of `kind` that joined through the lower relay
    /// `relay` (or a relay below it).
    pub(crate) async fn is_member_below(
        &self,
        member: &str,
        kind: IdentityKind,
        relay: &str,
    ) -> Result<bool, Status> {
        let live = self
            .store
            .member(member)
            .await
            .map_err(internal)?
            .is_some_and(|m| m.kind == kind && !m.revoked);
        Ok(live && self.store.is_below(member, relay).await.map_err(internal)?)
    }

    /// Takes the node whose credential this is into the relay's subtree (through the lower
    /// relay `via`, if any): the server checks the credential and moves the node.
    pub(crate) async fn adopt(
        &self,
        credential: &Credential,
        via: Option<&str>,
    ) -> Result<AdoptResponse, Status> {
        let message = AdoptRequest {
            credential: format!("{}.{}", credential.node_id, credential.secret),
        };
        let request = match via {
            Some(relay) => self.on_behalf(relay, message),
            None => self.upstream.credential.authorize(Request::new(message)),
        };
        let adopted = self
            .upstream
            .relay
            .clone()
            .adopt(request)
            .await?
            .into_inner();
        self.store
            .add_member(
                &adopted.node_id,
                &adopted.name,
                &auth::hash_secret(&credential.secret),
                IdentityKind::Node,
                via,
            )
            .await
            .map_err(internal)?;
        tracing::info!("node {} joined this relay", adopted.node_id);
        Ok(adopted)
    }

    /// The relay's credential for a call made on `node`'s behalf.
    pub(crate) fn on_behalf<T>(&self, node: &str, message: T) -> Request<T> {
        self.upstream
            .credential
            .on_behalf_of(node)
            .authorize(Request::new(message))
    }

    pub(crate) async fn done(&self, round: u32, node: &str) -> Result<bool, Status> {
        Ok(self.gave_up(round, node) || self.store.has(round, node).await.map_err(internal)?)
    }

    pub(crate) fn chunk_bytes(&self) -> u64 {
        self.view
            .borrow()
            .train
            .as_ref()
            .map_or(DEFAULT_CHUNK, |t| u64::from(t.max_chunk_bytes).max(1))
    }
}
