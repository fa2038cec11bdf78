//! Who a call comes from and whom it is for: a node's own credential, a relay's, or a relay's
//! call forwarded for a node of its subtree (`ferry-on-behalf-of`); and the statuses that
//! refuse the others.

use tonic::{Request, Status};

use crate::{
    auth::Credential,
    service::FleetService,
    store::{IdentityKind, NodeRow},
};

/// Whom a call is for.
pub(super) enum Actor {
    /// A node: the caller itself, or a node of the calling relay's subtree.
    Node(String),
    /// A relay, as itself (its partial aggregates, its model downloads).
    Relay(String),
}

impl Actor {
    pub(super) fn id(&self) -> &str {
        match self {
            Self::Node(id) | Self::Relay(id) => id,
        }
    }
}

impl FleetService {
    /// The enrolled identity a call comes from (a node or a relay), or UNAUTHENTICATED with
    /// the reason.
    pub(super) async fn caller<T>(&self, request: &Request<T>) -> Result<NodeRow, Status> {
        let header = request
            .metadata()
            .get(ferry_proto::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| unauthenticated("no credential sent; enrol with a token first"))?;
        let credential = Credential::from_header(header).ok_or_else(|| {
            unauthenticated("malformed credential; expected 'Bearer <node_id>.<secret>'")
        })?;
        let node = self
            .store
            .node(&credential.node_id)
            .await
            .map_err(store_unavailable)?;
        match node {
            Some(node) if node.revoked => Err(unauthenticated(&format!(
                "{} {} ('{}') has been revoked; ask the operator for a new token",
                node.kind.as_str(),
                node.node_id,
                node.name
            ))),
            Some(node) if credential.matches(&node.secret_hash) => Ok(node),
            _ => Err(unauthenticated(&format!(
                "unknown credential for node '{}'; enrol again with a new token",
                credential.node_id
            ))),
        }
    }

    /// Whom a call is for: the calling node, a node of the calling relay's subtree named by
    /// `ferry-on-behalf-of`, or the calling relay itself. A node named is marked alive.
    pub(super) async fn actor<T>(&self, request: &Request<T>) -> Result<Actor, Status> {
        let caller = self.caller(request).await?;
        let on_behalf = request
            .metadata()
            .get(ferry_proto::ON_BEHALF_OF)
            .map(|v| v.to_str().unwrap_or_default().to_string());
        let node = match (caller.kind, on_behalf) {
            (IdentityKind::Relay, None) => return Ok(Actor::Relay(caller.node_id)),
            (IdentityKind::Node, None) => caller.node_id,
            (IdentityKind::Node, Some(_)) => {
                return Err(permission_denied(
                    "only a relay may call on behalf of another node",
                ));
            }
            (IdentityKind::Relay, Some(node)) => {
                if !self
                    .subtrees
                    .contains(&self.store, &caller.node_id, &node, IdentityKind::Node)
                    .await?
                {
                    return Err(permission_denied(&format!(
                        "node '{node}' is not in relay {}'s subtree",
                        caller.node_id
                    )));
                }
                node
            }
        };
        self.coordinator.seen(&node).await;
        Ok(Actor::Node(node))
    }

    /// The node a node's call is for; a relay calling as itself is refused (its nodes' work
    /// comes through the Relay service).
    pub(super) async fn node_actor<T>(&self, request: &Request<T>) -> Result<String, Status> {
        match self.actor(request).await? {
            Actor::Node(node) => Ok(node),
            Actor::Relay(relay) => Err(permission_denied(&format!(
                "relay {relay} called a node's method as itself; a relay syncs its nodes' \
                 work through the Relay service and forwards their calls on their behalf"
            ))),
        }
    }

    /// The relay a Relay-service call or a forwarded enrolment is for: the calling relay, or
    /// a relay below it named by `ferry-on-behalf-of` (a chain), or the status to refuse it
    /// with.
    pub(super) async fn relay_caller<T>(&self, request: &Request<T>) -> Result<String, Status> {
        let caller = self.caller(request).await?;
        if caller.kind != IdentityKind::Relay {
            return Err(permission_denied(&format!(
                "'{}' enrolled as a node; only relays call the Relay service or forward \
                 enrolments (create a relay token with `ferry token create --relay`)",
                caller.name
            )));
        }
        let Some(below) = request.metadata().get(ferry_proto::ON_BEHALF_OF) else {
            return Ok(caller.node_id);
        };
        let below = below.to_str().unwrap_or_default();
        if !self
            .subtrees
            .contains(&self.store, &caller.node_id, below, IdentityKind::Relay)
            .await?
        {
            return Err(permission_denied(&format!(
                "'{below}' is not a relay below relay {}",
                caller.node_id
            )));
        }
        Ok(below.to_string())
    }

    /// The relay an enrolment comes through (see [`Self::relay_caller`]); `None` for a node
    /// enrolling itself.
    pub(super) async fn enrolling_via<T>(
        &self,
        request: &Request<T>,
    ) -> Result<Option<String>, Status> {
        if request.metadata().get(ferry_proto::AUTHORIZATION).is_none() {
            return Ok(None);
        }
        Ok(Some(self.relay_caller(request).await?))
    }
}

pub(super) fn store_unavailable(e: crate::ServerError) -> Status {
    Status::unavailable(format!("store unavailable: {e}"))
}

pub(super) fn permission_denied(message: &str) -> Status {
    tracing::warn!("refused call: {message}");
    metrics::counter!("ferry_calls_refused_total", "why" => "not_permitted").increment(1);
    Status::permission_denied(message.to_string())
}

pub(super) fn unauthenticated(message: &str) -> Status {
    tracing::warn!("refused call: {message}");
    metrics::counter!("ferry_calls_unauthenticated_total").increment(1);
    Status::unauthenticated(message.to_string())
}
