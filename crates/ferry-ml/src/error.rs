//! The one error type of ferry-ml.

use std::path::PathBuf;

/// What can go wrong loading data, partitioning it, or training.
#[derive(Debug, thiserror::Error)]
pub enum MlError {
    /// The dataset's files are nowhere Ferry looks.
    #[error("{dataset} not found (looked in {}); {hint}", list_paths(searched))]
    DatasetNotFound {
        /// Human name of the dataset.
        dataset: &'static str,
        /// Folders that were searched, in order.
        searched: Vec<PathBuf>,
        /// How to install it.
        hint: &'static str,
    },
    /// A dataset file exists but cannot be read or parsed.
    #[error("cannot read {path}: {reason}")]
    BadDataFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A dataset or partition name Ferry does not know, or one with a bad parameter.
    #[error("{0}")]
    BadSpec(String),
    /// The requested split cannot be made from this data.
    #[error("cannot partition: {0}")]
    Partition(String),
    /// The model in a task does not match the network it is loaded into.
    #[error(transparent)]
    Core(#[from] ferry_core::CoreError),
}

fn list_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
