//! A deployed node's compression of its update, with top-k's error feedback (what its updates
//! have not yet sent) kept in the node's state folder from one task to the next and across
//! restarts of the agent.
//!
//! The residual is committed only once the server has the update: if the round is lost
//! before that, the whole of what the node had to send (the old residual plus the new delta)
//! stays for its next update, so a lost upload loses nothing.

use std::path::{Path, PathBuf};

use ferry_core::{
    ModelLayout, TensorDtype, Update, compress::Compression, update_file::EncodedUpdate,
};

use crate::ClientError;

/// One task's compression on this node, and the error feedback it carries.
#[derive(Debug)]
pub struct Compressor {
    compression: Compression,
    /// Where the residual lives; `None` for encodings that keep none.
    path: Option<PathBuf>,
    /// What stays on the node once the update is delivered.
    residual: Vec<f32>,
    /// What stays on the node if it is not: everything it had to send.
    unsent: Vec<f32>,
}

impl Compressor {
    /// The compression a task names (`""` or `"none"` for none), with the residual this node
    /// kept for the run `run_id` under `state_dir`; a residual of another model size (a
    /// different run's) is dropped.
    pub fn load(
        state_dir: &Path,
        run_id: &str,
        compress: &str,
        num_params: usize,
    ) -> Result<Self, String> {
        let compression = if compress.is_empty() {
            Compression::None
        } else {
            compress
                .parse::<Compression>()
                .map_err(|e| format!("the task's compress field: {e}; upgrade this node"))?
        };
        let path = compression
            .keeps_residual()
            .then(|| residual_path(state_dir, run_id));
        let residual = path
            .as_deref()
            .and_then(|p| std::fs::read(p).ok())
            .filter(|bytes| bytes.len() == 4 * num_params)
            .and_then(|bytes| {
                let mut values = Vec::with_capacity(num_params);
                TensorDtype::F32
                    .decode_into("residual", &bytes, &mut values)
                    .ok()
                    .map(|()| values)
            })
            .unwrap_or_default();
        Ok(Self {
            compression,
            path,
            residual,
            unsent: Vec::new(),
        })
    }

    /// Encodes `update` for upload as the task asks; `seed` drives int8's rounding.
    pub fn encode(
        &mut self,
        update: Update,
        layout: &ModelLayout,
        seed: u64,
    ) -> Result<EncodedUpdate, String> {
        if self.path.is_some() {
            self.unsent = if self.residual.len() == update.delta.len() {
                self.residual
                    .iter()
                    .zip(&update.delta)
                    .map(|(r, d)| r + d)
                    .collect()
            } else {
                update.delta.clone()
            };
        }
        EncodedUpdate::compressed(update, layout, self.compression, &mut self.residual, seed)
            .map_err(|e| e.to_string())
    }

    /// The server has the update: what it did not carry stays for the next one.
    pub fn delivered(&self) -> Result<(), ClientError> {
        self.save(&self.residual)
    }

    /// The update will never count: all of it stays for the next one.
    pub fn lost(&self) -> Result<(), ClientError> {
        self.save(&self.unsent)
    }

    fn save(&self, values: &[f32]) -> Result<(), ClientError> {
        match &self.path {
            Some(path) => crate::state_file::replace(path, &TensorDtype::F32.encode(values)),
            None => Ok(()),
        }
    }
}

/// The residual's file for a run: its id kept to safe characters.
fn residual_path(state_dir: &Path, run_id: &str) -> PathBuf {
    let name: String = run_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    state_dir.join("residual").join(format!("{name}.f32"))
}

#[cfg(test)]
mod tests {
    use ferry_core::{TensorSpec, update_file::decode_update};

    use super::*;

    fn layout() -> ModelLayout {
        ModelLayout::new(vec![TensorSpec::f32("w", vec![4])]).expect("layout")
    }

    fn sent(encoded: &EncodedUpdate) -> Vec<f32> {
        let mut bytes = Vec::new();
        encoded.write_to(&mut bytes).expect("write");
        decode_update(&bytes, &layout()).expect("decode").delta
    }

    #[test]
    fn top_k_feedback_survives_a_restart_once_delivered_and_keeps_everything_when_lost() {
        let dir = tempfile::tempdir().expect("tempdir");
        let load = || Compressor::load(dir.path(), "run/1", "topk:0.25", 4).expect("load");
        let mut first = load();
        let update = Update::new(vec![4.0, -1.0, 2.0, 0.5], 10);
        assert_eq!(
            sent(&first.encode(update, &layout(), 0).expect("encode")),
            [4.0, 0.0, 0.0, 0.0]
        );
        first.delivered().expect("save");
        // A new agent (a restart) finds what the first update did not send.
        let mut second = load();
        let update = Update::new(vec![0.0, 0.0, 1.0, 0.0], 10);
        assert_eq!(
            sent(&second.encode(update, &layout(), 0).expect("encode")),
            [0.0, 0.0, 3.0, 0.0]
        );
        // That upload is lost: its 3.0 stays with the rest.
        second.lost().expect("save");
        let mut third = load();
        let update = Update::new(vec![0.0; 4], 10);
        assert_eq!(
            sent(&third.encode(update, &layout(), 0).expect("encode")),
            [0.0, 0.0, 3.0, 0.0]
        );
        // Another run's residual is its own.
        let other = Compressor::load(dir.path(), "run-2", "topk:0.25", 4).expect("load");
        assert!(other.residual.is_empty());
    }

    #[test]
    fn encodings_without_feedback_write_nothing_and_unknown_ones_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        for name in ["", "none", "int8", "bf16"] {
            let mut compressor = Compressor::load(dir.path(), "r", name, 4).expect("load");
            let update = Update::new(vec![1.0, 2.0, 3.0, 4.0], 1);
            let encoded = compressor.encode(update, &layout(), 3).expect("encode");
            assert_eq!(sent(&encoded).len(), 4);
            compressor.delivered().expect("nothing to save");
        }
        assert!(!dir.path().join("residual").exists());
        let err = Compressor::load(dir.path(), "r", "zip", 4).expect_err("unknown");
        assert!(err.contains("zip") && err.contains("upgrade"), "{err}");
    }
}
