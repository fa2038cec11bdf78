//! A run in this process (a simulation) as a dashboard [`Source`]: the run reports its
//! progress here and the pages read it.

use std::sync::Mutex;

use futures::future::BoxFuture;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::source::{DashboardError, NodeView, RunView, Source};

/// A run's progress as it happens.
pub struct LiveRun {
    title: String,
    config: Value,
    nodes: Vec<NodeView>,
    rounds_total: u32,
    progress: Mutex<Progress>,
    changed: watch::Sender<u64>,
}

#[derive(Default)]
struct Progress {
    records: Vec<Value>,
    phase: &'static str,
    round: u32,
    selected: usize,
    returned: usize,
    finished: Option<String>,
}

impl LiveRun {
    /// A run called `title`, configured by `config` (shown as its settings), of
    /// `rounds_total` rounds over the nodes `node_ids`.
    pub fn new(title: String, config: Value, rounds_total: u32, node_ids: Vec<String>) -> Self {
        let nodes = node_ids.into_iter().map(NodeView::named).collect();
        Self {
            title,
            config,
            nodes,
            rounds_total,
            progress: Mutex::new(Progress {
                phase: "starting",
                ..Progress::default()
            }),
            changed: watch::channel(0).0,
        }
    }

    fn update(&self, change: impl FnOnce(&mut Progress)) {
        // A poisoned lock means a page read panicked; the run's own progress still counts.
        let mut progress = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        change(&mut progress);
        drop(progress);
        self.changed.send_modify(|v| *v += 1);
    }

    /// Round `round` started with `selected` nodes.
    pub fn round_started(&self, round: u32, selected: usize) {
        self.update(|p| {
            (p.phase, p.round, p.selected, p.returned) = ("training", round, selected, 0);
        });
    }

    /// One selected node returned.
    pub fn node_returned(&self) {
        self.update(|p| p.returned += 1);
    }

    /// The round's new model is being evaluated.
    pub fn evaluating(&self) {
        self.update(|p| p.phase = "evaluating");
    }

    /// A round finished with `record` (a `RoundRecord` as JSON).
    pub fn round_finished(&self, record: Value) {
        self.update(|p| {
            p.records.push(record);
            p.phase = "between_rounds";
        });
    }

    /// The run ended, for `reason`.
    pub fn finished(&self, reason: &str) {
        self.update(|p| {
            p.phase = "finished";
            p.finished = Some(reason.to_string());
        });
    }
}

impl Source for LiveRun {
    fn view(&self, _run: Option<String>) -> BoxFuture<'_, Result<RunView, DashboardError>> {
        let progress = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        let view = RunView {
            kind: "simulation",
            title: self.title.clone(),
            history: json!({
                "config": self.config,
                "rounds": progress.records,
                "final": null,
            }),
            live: json!({
                "phase": progress.phase,
                "round": progress.round,
                "rounds": self.rounds_total,
                "cohort": progress.selected,
                "updates_in": progress.returned,
                "finished": progress.finished,
            }),
            nodes: self.nodes.clone(),
            actions: false,
            runs: Vec::new(),
        };
        Box::pin(async move { Ok(view) })
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_view_follows_the_run() {
        let run = LiveRun::new(
            "sim".into(),
            json!({"strategy": "fedavg"}),
            3,
            vec!["0".into(), "1".into()],
        );
        let changes = run.changes();
        run.round_started(1, 2);
        run.node_returned();
        assert!(changes.has_changed().expect("open"));
        let view = run.view(None).await.expect("view");
        assert_eq!(view.live["phase"], "training");
        assert_eq!(view.live["updates_in"], 1);
        run.round_finished(json!({"round": 1, "accuracy": 0.5}));
        run.finished("rounds_completed");
        let view = run.view(None).await.expect("view");
        assert_eq!(view.history["rounds"][0]["accuracy"], 0.5);
        assert_eq!(view.live["finished"], "rounds_completed");
        assert_eq!(view.nodes.len(), 2);
    }
}
