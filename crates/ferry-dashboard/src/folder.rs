//! Finished runs' output folders as a dashboard [`Source`] (`ferry dashboard runs/`): every
//! folder under the root holding a `history.json`, read again on each request.

use std::path::{Path, PathBuf};

use futures::future::BoxFuture;
use serde_json::Value;
use tokio::sync::watch;

use crate::source::{AccuracyCurve, DashboardError, NodeView, RunView, Source, accuracy_points};

/// How deep under the root run folders are looked for (`runs/demo-x/server/` is two deep).
const DEPTH: usize = 3;

/// The runs under one folder.
pub struct FolderRuns {
    root: PathBuf,
    changed: watch::Sender<u64>,
}

impl FolderRuns {
    /// The runs under `root` (which may itself be one run's folder).
    pub fn new(root: PathBuf) -> Result<Self, DashboardError> {
        if !root.is_dir() {
            return Err(DashboardError::NotFound(format!(
                "{} is not a folder; give the folder holding runs' outputs (for example runs/)",
                root.display()
            )));
        }
        Ok(Self {
            root,
            changed: watch::channel(0).0,
        })
    }

    /// Each run's name (its path under the root, `.` for the root) and history file, by name.
    pub fn runs(&self) -> Vec<(String, PathBuf)> {
        let mut found = Vec::new();
        collect(&self.root, &self.root, DEPTH, &mut found);
        found.sort();
        found
    }

    fn read(&self, path: &Path) -> Result<Value, DashboardError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            DashboardError::Unavailable(format!("cannot read {}: {e}", path.display()))
        })?;
        serde_json::from_str(&text).map_err(|e| {
            DashboardError::Unavailable(format!(
                "{} is not a run history ({e}); was it written by ferry?",
                path.display()
            ))
        })
    }
}

fn collect(root: &Path, dir: &Path, depth: usize, found: &mut Vec<(String, PathBuf)>) {
    let history = dir.join("history.json");
    if history.is_file() {
        let name = dir
            .strip_prefix(root)
            .ok()
            .map(|p| p.to_string_lossy().into_owned())
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| ".".into());
        found.push((name, history));
    }
    if depth == 0 {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            collect(root, &entry.path(), depth - 1, found);
        }
    }
}

/// The nodes a finished run's records name, in order of first appearance.
fn nodes_named(history: &Value) -> Vec<NodeView> {
    let mut ids: Vec<String> = Vec::new();
    let records = history.get("rounds").and_then(Value::as_array);
    for record in records.into_iter().flatten() {
        let contributors = record.get("contributors").and_then(Value::as_array);
        let failed = record.get("failed").and_then(Value::as_array);
        let named = contributors
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .chain(
                failed
                    .into_iter()
                    .flatten()
                    .filter_map(|f| f.get("node").and_then(Value::as_str)),
            );
        for id in named {
            if !ids.iter().any(|known| known == id) {
                ids.push(id.to_string());
            }
        }
    }
    ids.into_iter().map(NodeView::named).collect()
}

impl Source for FolderRuns {
    fn view(&self, run: Option<String>) -> BoxFuture<'_, Result<RunView, DashboardError>> {
        Box::pin(async move {
            let runs = self.runs();
            let chosen = match &run {
                Some(name) => runs.iter().find(|(n, _)| n == name).ok_or_else(|| {
                    DashboardError::NotFound(format!("no run named {name} under this folder"))
                })?,
                None => runs
                    .iter()
                    .max_by_key(|(_, path)| std::fs::metadata(path).and_then(|m| m.modified()).ok())
                    .ok_or_else(|| {
                        DashboardError::NotFound(format!(
                            "no history.json under {}: point ferry dashboard at a folder of \
                             run outputs",
                            self.root.display()
                        ))
                    })?,
            };
            let history = self.read(&chosen.1)?;
            Ok(RunView {
                kind: "finished",
                title: chosen.0.clone(),
                nodes: nodes_named(&history),
                history,
                live: Value::Null,
                actions: false,
                runs: runs.into_iter().map(|(name, _)| name).collect(),
            })
        })
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn curves(&self) -> BoxFuture<'_, Result<Vec<AccuracyCurve>, DashboardError>> {
        Box::pin(async move {
            Ok(self
                .runs()
                .into_iter()
                .filter_map(|(name, path)| {
                    let history = self.read(&path).ok()?;
                    Some(AccuracyCurve {
                        name,
                        points: accuracy_points(&history),
                    })
                })
                .collect())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, accuracy: f64) {
        std::fs::create_dir_all(dir).expect("dir");
        let history = serde_json::json!({
            "config": {"strategy": "fedavg"},
            "rounds": [{"round": 1, "accuracy": accuracy, "contributors": ["a", "b"],
                        "failed": [{"node": "c", "reason": "timeout"}]}],
        });
        std::fs::write(dir.join("history.json"), history.to_string()).expect("write");
    }

    #[tokio::test]
    async fn finds_runs_nested_under_the_root_and_compares_them() {
        let root = tempfile::tempdir().expect("tmp");
        write(&root.path().join("one"), 0.5);
        write(&root.path().join("demo/server"), 0.7);
        std::fs::create_dir_all(root.path().join("empty")).expect("dir");
        let runs = FolderRuns::new(root.path().to_path_buf()).expect("runs");
        let names: Vec<String> = runs.runs().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["demo/server", "one"]);
        let view = runs.view(Some("one".into())).await.expect("view");
        assert_eq!(view.history["rounds"][0]["accuracy"], 0.5);
        let ids: Vec<&str> = view.nodes.iter().map(|n| n.id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "c"]);
        let curves = runs.curves().await.expect("curves");
        assert_eq!(curves[0].points, vec![(1, 0.7)]);
        assert!(matches!(
            runs.view(Some("nope".into())).await,
            Err(DashboardError::NotFound(_))
        ));
    }

    #[test]
    fn a_missing_root_is_refused_with_what_to_give() {
        let e = FolderRuns::new("/no/such/folder".into())
            .err()
            .expect("refused");
        assert!(e.to_string().contains("folder of run outputs") || e.to_string().contains("runs/"));
    }

    #[tokio::test]
    async fn a_corrupt_history_names_its_file() {
        let root = tempfile::tempdir().expect("tmp");
        std::fs::write(root.path().join("history.json"), "{not json").expect("write");
        let runs = FolderRuns::new(root.path().to_path_buf()).expect("runs");
        let e = runs.view(None).await.expect_err("refused");
        assert!(e.to_string().contains("history.json"), "{e}");
    }
}
