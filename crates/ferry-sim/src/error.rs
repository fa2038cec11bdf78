//! The one error type of ferry-sim.

/// What can stop a simulation.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// Data loading, partitioning or training failed.
    #[error(transparent)]
    Ml(#[from] ferry_ml::MlError),
    /// The round engine refused the settings or a round failed.
    #[error(transparent)]
    Engine(#[from] ferry_engine::EngineError),
    /// The initial model file does not fit the run.
    #[error("{0}")]
    InitialModel(String),
    /// An attack that cannot be staged as configured.
    #[error("{0}")]
    Attack(String),
    /// The simulated devices cannot be built as configured.
    #[error("{0}")]
    Devices(String),
    /// Model or aggregation error.
    #[error(transparent)]
    Core(#[from] ferry_core::CoreError),
}
