//! `ferry server`'s run as a dashboard source: the coordinator's status and records, the
//! store's nodes and tokens, and the operator's actions.

use std::sync::Arc;

use ferry_dashboard::{DashboardError, NodeView, Operator, RunView, Source, TokenView};
use ferry_server::{
    ServerError,
    coordinator::Coordinator,
    store::{IdentityKind, Store},
};
use futures::future::BoxFuture;
use tokio::sync::watch;

/// The deployed run behind the dashboard.
pub struct ServerDashboard {
    coordinator: Arc<Coordinator>,
    store: Store,
    config: serde_json::Value,
}

impl ServerDashboard {
    /// The run `coordinator` drives, its nodes in `store`, configured by `config`.
    pub fn new(coordinator: Arc<Coordinator>, store: Store, config: serde_json::Value) -> Self {
        Self {
            coordinator,
            store,
            config,
        }
    }

    async fn read(&self) -> Result<RunView, ServerError> {
        let status = self.coordinator.status().await;
        let rounds = self.coordinator.history().await?;
        let failed = self.coordinator.failed_rounds().await?;
        let online = self.coordinator.online().await;
        let nodes = self
            .store
            .nodes()
            .await?
            .into_iter()
            .map(|n| NodeView {
                online: Some(online.contains_key(&n.node_id)),
                last_seen_s: online.get(&n.node_id).copied(),
                id: n.node_id,
                name: n.name,
                revoked: n.revoked,
                relay: n.kind == IdentityKind::Relay,
                via: n.relay,
            })
            .collect();
        let history = serde_json::json!({
            "config": self.config,
            "rounds": rounds,
            "final": null,
            "failed_rounds": failed,
        });
        Ok(RunView {
            kind: "deployment",
            title: status.run_id.clone(),
            history,
            live: serde_json::to_value(status).unwrap_or_default(),
            nodes,
            actions: true,
            runs: Vec::new(),
        })
    }
}

fn unavailable(e: ServerError) -> DashboardError {
    DashboardError::Unavailable(e.to_string())
}

impl Source for ServerDashboard {
    fn view(&self, _run: Option<String>) -> BoxFuture<'_, Result<RunView, DashboardError>> {
        Box::pin(async move { self.read().await.map_err(unavailable) })
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.coordinator.subscribe()
    }

    fn operator(&self) -> Option<&dyn Operator> {
        Some(self)
    }
}

impl Operator for ServerDashboard {
    fn tokens(&self) -> BoxFuture<'_, Result<Vec<TokenView>, DashboardError>> {
        Box::pin(async move {
            Ok(self
                .store
                .tokens()
                .await
                .map_err(unavailable)?
                .into_iter()
                .map(|t| TokenView {
                    name: t.name,
                    used: t.used,
                    revoked: t.revoked,
                })
                .collect())
        })
    }

    fn create_token(&self, name: String) -> BoxFuture<'_, Result<String, DashboardError>> {
        Box::pin(async move {
            self.store.create_token(&name).await.map_err(|e| match e {
                ServerError::Settings(message) => DashboardError::Invalid(message),
                other => unavailable(other),
            })
        })
    }

    fn revoke_token(&self, name: String) -> BoxFuture<'_, Result<bool, DashboardError>> {
        Box::pin(async move { self.store.revoke(&name).await.map_err(unavailable) })
    }

    fn stop_after_round(&self) -> BoxFuture<'_, Result<(), DashboardError>> {
        Box::pin(async move {
            self.coordinator.stop_after_round().await;
            Ok(())
        })
    }
}
