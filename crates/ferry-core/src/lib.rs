//! Ferry's core: what a federated round computes, free of any ML engine or network.
//!
//! - [`model`]: a model as named, shaped `f32` tensors in one flat vector, with safetensors
//!   (de)serialisation.
//! - [`content`]: content ids (BLAKE3) that name blobs and check every transfer.
//! - [`algebra`]: update algebra on flat slices (delta, weighted accumulate, scale, L2 norm).
//! - [`compress`]: update compression on the wire (half precision, int8, top-k with error
//!   feedback).
//! - [`download`]: a model download in half precision, read back in the run's layout.
//! - [`update`]: what a node sends back after local training.
//! - [`update_file`]: an update as a safetensors file, read and written without a second copy.
//! - [`aggregate`]: the streaming [`aggregate::Aggregator`] interface and FedAvg.
//! - [`evaluation`]: federated evaluation (nodes' scores on their held-out data, combined).
//! - [`fairness`]: how evenly a model serves the sites (worst site, worst tenth, spread).
//! - [`personal`]: personalisation by name (tensors that stay on each node, as in FedBN).
//! - [`privacy`]: client-level differential privacy (clipping, noise, RDP accountant).
//! - [`robust`]: robust aggregation (median, trimmed mean, Krum, Multi-Krum, Bulyan, norm
//!   bounding).
//! - [`seed`]: independent random streams from one run seed.
//! - [`server_opt`]: the server-optimizer step that turns an aggregate into the next model.
//! - [`staleness`]: how asynchronous aggregation weighs an update by its staleness.
//! - [`strategy`]: a strategy as a composition of client procedure, aggregation rule and server
//!   optimizer.
//! - [`task`]: the local-training settings a node receives with the global model.
//! - [`tensor_file`]: safetensors files read and written a piece at a time.
//! - [`wire`]: updates and server state as safetensors files, for transport and persistence.

#![warn(missing_docs)]

pub mod aggregate;
pub mod algebra;
pub mod compress;
pub mod content;
pub mod cross_site;
pub mod download;
pub mod dtype;
pub mod error;
pub mod evaluation;
pub mod fairness;
pub mod model;
pub mod partial;
pub mod personal;
pub mod privacy;
pub mod qfedavg;
pub mod robust;
pub mod scaffold;
pub mod seed;
pub mod server_opt;
pub mod staleness;
pub mod strategy;
pub mod task;
pub mod tensor_file;
pub mod update;
pub mod update_file;
pub mod wire;

pub use dtype::TensorDtype;
pub use error::CoreError;
pub use model::{Model, ModelLayout, TensorSpec};
pub use update::Update;
