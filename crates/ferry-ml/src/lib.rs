//! Ferry's machine-learning side, on burn's `flex` CPU backend.
//!
//! - [`models`]: the built-in networks (`lenet`, `cnn`, `mlp`, `logreg`) and their conversion to
//!   and from ferry-core [`ferry_core::Model`]s.
//! - [`data`]: datasets (Fashion-MNIST, the MNIST subset), and the NIID-Bench partitioners.
//! - [`train`]: local training (SGD with momentum and weight decay) and evaluation.
//! - [`confusion`]: per-class scores of an evaluation.
//! - [`client`]: the client half of a strategy around the trainer, shared by simulated and
//!   deployed nodes.

#![warn(missing_docs)]

pub mod client;
pub mod confusion;
pub mod data;
pub mod error;
pub mod models;
pub mod params;
pub mod train;

pub use error::MlError;
