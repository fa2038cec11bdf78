//! The one error type of ferry-core.

/// Everything that can go wrong in model (de)serialisation, update algebra and aggregation.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// The bytes are not a valid safetensors file.
    #[error("invalid safetensors data: {0}")]
    Safetensors(String),
    /// A model file has no floating-point tensor, so there is nothing to train.
    #[error(
        "the model file holds no floating-point tensor (f32, f16, bf16 or f64) to train; it \
         holds: {0}"
    )]
    NoParameters(String),
    /// A tensor has a dtype Ferry cannot use where it was found.
    #[error("tensor '{name}' has dtype {dtype}; updates carry f32 deltas only")]
    UnsupportedDtype {
        /// Tensor name.
        name: String,
        /// The dtype found.
        dtype: String,
    },
    /// A model or update does not have the layout of the run's model.
    #[error("layout mismatch: {0}")]
    LayoutMismatch(String),
    /// A flat vector has the wrong number of values.
    #[error("expected {expected} values, got {got}")]
    LengthMismatch {
        /// Values the model has.
        expected: usize,
        /// Values received.
        got: usize,
    },
    /// An update holds NaN or infinity.
    #[error("update holds a non-finite value at index {index}")]
    NonFinite {
        /// Index of the first non-finite value.
        index: usize,
    },
    /// An update claims to be trained on zero examples, so it cannot be weighted.
    #[error("update reports num_examples = 0; a node must train on at least one example")]
    ZeroExamples,
    /// An update lacks what the run's strategy needs from it.
    #[error("update lacks {0}, which this strategy needs")]
    MissingExtra(&'static str),
    /// Aggregation was asked to finish with nothing accepted.
    #[error("no updates were accepted this round, so there is nothing to aggregate")]
    NoUpdates,
    /// A strategy or partition name that Ferry does not know.
    #[error(
        "unknown strategy '{0}': expected fedavg, fedavgm, fedprox, scaffold, fednova, fedadagrad, fedadam or fedyogi"
    )]
    UnknownStrategy(String),
    /// An encoding that does not decode as its compression says.
    #[error("{0}")]
    Compression(String),
    /// A setting Ferry does not know or cannot use, with what it expects.
    #[error("{0}")]
    Settings(String),
    /// A robust aggregation rule that cannot work with its parameters or its updates.
    #[error("{0}")]
    Robust(String),
    /// A rule that needs each update on its own was given only their sum.
    #[error(
        "this aggregation needs each update on its own, which secure aggregation hides; with \
         secure aggregation use fedavg, fedavgm, fedprox, fedadam, fedyogi or fedadagrad with the \
         mean, and distributed differential privacy with a fixed clip"
    )]
    NeedsIndividualUpdates,
    /// A relay's partial aggregate that the run's rule cannot fold (it needs each update, or
    /// weights them another way).
    #[error("a relay's partial aggregate cannot be folded here: {0}")]
    PartialNotFoldable(String),
    /// A file or stream could not be read or written.
    #[error("reading or writing tensors: {0}")]
    Io(String),
    /// A differential-privacy setting or step that cannot be carried out.
    #[error("{0}")]
    Privacy(String),
}
