//! The relay's picture of the run: the server's latest answer for its subtree, which models it
//! holds, and whether the server can be reached; and what a node is to do by it.

use std::{collections::HashSet, time::Duration};

use ferry_proto::v1::{Fold, RelaySyncResponse, Task};

/// How long a relay keeps answering "the run is over" before it exits.
pub const FINISHED_GRACE: Duration = Duration::from_secs(10);

/// What the relay knows of the run.
#[derive(Debug, Clone, Default)]
pub struct View {
    /// The version of the server's latest answer (0 before the first).
    pub version: u64,
    /// The open round's task.
    pub train: Option<Task>,
    /// The subtree's cohort nodes that have not answered the server.
    pub train_nodes: HashSet<String>,
    /// The open evaluation's task.
    pub evaluate: Option<Task>,
    /// The subtree's nodes asked to score it.
    pub evaluate_nodes: HashSet<String>,
    /// Why the others have nothing to do.
    pub idle: String,
    /// Why the run ended, once it has.
    pub finished: Option<String>,
    /// How updates are folded here.
    pub fold: Fold,
    /// When the relay sends what it holds of the open round.
    pub relay_deadline_unix_ms: u64,
    /// Blobs the relay holds whole and verified.
    pub cached: HashSet<String>,
    /// Why the server cannot be reached, while it cannot.
    pub unreachable: Option<String>,
    /// Counts the changes a relay below this one would see (the version it is answered with).
    pub revision: u64,
}

/// What one node is to do.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeWork {
    /// Train (or score) with this task.
    Task(Box<Task>),
    /// Nothing now, for this reason.
    Idle(String),
    /// The run ended.
    Finished(String),
}

impl View {
    /// Takes the server's answer, keeping what the relay holds.
    pub fn apply(&mut self, answer: RelaySyncResponse) {
        self.version = answer.version;
        self.train = answer.train;
        self.train_nodes = answer.train_nodes.into_iter().collect();
        self.evaluate = answer.evaluate;
        self.evaluate_nodes = answer.evaluate_nodes.into_iter().collect();
        self.idle = answer.idle_reason;
        self.finished = answer.finished.map(|f| f.reason);
        self.fold = Fold::try_from(answer.fold).unwrap_or(Fold::PassThrough);
        self.relay_deadline_unix_ms = answer.relay_deadline_unix_ms;
        self.unreachable = None;
    }

    /// The blobs a task needs (its model, and its broadcast state).
    pub fn blobs_of(task: &Task) -> impl Iterator<Item = &ferry_proto::v1::BlobRef> {
        task.model.iter().chain(task.server_control.iter())
    }

    /// Whether the relay holds every blob `task` needs.
    pub fn ready(&self, task: &Task) -> bool {
        Self::blobs_of(task).all(|blob| self.cached.contains(&blob.hash))
    }

    /// The open round, if any.
    pub fn round(&self) -> Option<u32> {
        self.train.as_ref().map(|t| t.round)
    }

    /// What `node` is to do, given whether the relay already holds its update of the open
    /// round or saw it give the round up (`done`).
    pub fn work_for(&self, node: &str, done: bool) -> NodeWork {
        if let Some(reason) = &self.finished {
            return NodeWork::Finished(reason.clone());
        }
        if let Some(task) = self
            .evaluate
            .as_ref()
            .filter(|t| self.evaluate_nodes.contains(node) && self.ready(t))
        {
            return NodeWork::Task(Box::new(task.clone()));
        }
        if let Some(task) = self
            .train
            .as_ref()
            .filter(|t| !done && self.train_nodes.contains(node) && self.ready(t))
        {
            return NodeWork::Task(Box::new(task.clone()));
        }
        if let Some(why) = self.unreachable_reason() {
            return NodeWork::Idle(why);
        }
        if self.version == 0 {
            return NodeWork::Idle("the relay is waiting for the server's first answer".into());
        }
        if self.train_nodes.contains(node) && !done {
            return NodeWork::Idle("the relay is fetching the round's model".into());
        }
        NodeWork::Idle(self.idle.clone())
    }

    /// Why work waits, while the server cannot be reached.
    pub fn unreachable_reason(&self) -> Option<String> {
        self.unreachable.as_ref().map(|why| {
            format!("the relay cannot reach the server ({why}); this node's work waits for it")
        })
    }

    /// When a relay below this one sends what it holds of the open round: as far before this
    /// relay's deadline as this relay's is before the round's, so that its partial arrives
    /// here in time.
    pub fn lower_relay_deadline_unix_ms(&self) -> u64 {
        let round_deadline = self.train.as_ref().map_or(0, |t| t.deadline_unix_ms);
        let margin = round_deadline.saturating_sub(self.relay_deadline_unix_ms);
        self.relay_deadline_unix_ms.saturating_sub(margin)
    }

    /// Whether `node` should go on with its work on `round` (a heartbeat's answer).
    pub fn keep_working(&self, node: &str, round: u32, done: bool) -> bool {
        let training = self.round() == Some(round) && self.train_nodes.contains(node) && !done;
        let scoring = self.evaluate.as_ref().is_some_and(|t| t.round == round)
            && self.evaluate_nodes.contains(node);
        training || scoring
    }

    /// The round the run is at, as a heartbeat reports it.
    pub fn current_round(&self) -> u32 {
        self.round()
            .or_else(|| self.evaluate.as_ref().map(|t| t.round + 1))
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use ferry_proto::v1::BlobRef;

    use super::*;

    fn view() -> View {
        let task = Task {
            round: 4,
            model: Some(BlobRef {
                hash: "m".into(),
                size_bytes: 1,
            }),
            ..Task::default()
        };
        View {
            version: 2,
            train: Some(task),
            train_nodes: ["a".to_string(), "b".to_string()].into(),
            idle: "round 4 is running without this node".into(),
            fold: Fold::Examples,
            ..View::default()
        }
    }

    #[test]
    fn a_node_gets_its_task_only_once_the_model_is_here_and_its_update_is_not() {
        let mut v = view();
        assert_eq!(
            v.work_for("a", false),
            NodeWork::Idle("the relay is fetching the round's model".into())
        );
        v.cached.insert("m".into());
        assert!(matches!(v.work_for("a", false), NodeWork::Task(t) if t.round == 4));
        assert!(
            matches!(v.work_for("a", true), NodeWork::Idle(_)),
            "already delivered"
        );
        assert_eq!(
            v.work_for("c", false),
            NodeWork::Idle("round 4 is running without this node".into())
        );
        assert!(v.keep_working("a", 4, false));
        assert!(!v.keep_working("a", 4, true));
        assert!(!v.keep_working("c", 4, false));
    }

    #[test]
    fn a_partitioned_relay_keeps_its_nodes_waiting_with_the_reason() {
        let mut v = view();
        v.unreachable = Some("connection refused".into());
        match v.work_for("c", false) {
            NodeWork::Idle(why) => assert!(why.contains("cannot reach the server"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert!(
            v.keep_working("a", 4, false),
            "training nodes go on meanwhile"
        );
        v.finished = Some("rounds completed".into());
        assert_eq!(
            v.work_for("a", false),
            NodeWork::Finished("rounds completed".into())
        );
    }
}
