//! The one error type of ferry-engine.

/// What stops a run.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The run settings cannot work (for example more required clients than nodes).
    #[error("invalid run settings: {0}")]
    Settings(String),
    /// Every selected node failed or was refused, so the round has nothing to aggregate.
    #[error("round {round}: no usable update from {selected} selected nodes ({reasons})")]
    EmptyRound {
        /// The round.
        round: u32,
        /// Nodes selected.
        selected: usize,
        /// Why updates failed, first few.
        reasons: String,
    },
    /// Evaluating the global model failed.
    #[error("evaluation failed: {0}")]
    Evaluation(String),
    /// Aggregation or the server step failed.
    #[error(transparent)]
    Core(#[from] ferry_core::CoreError),
}
