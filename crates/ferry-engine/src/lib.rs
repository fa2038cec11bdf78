//! Ferry's round engine: the federated loop that simulation and deployment share.
//!
//! A [`federation::Federation`] selects nodes, hands each a [`node::RoundTask`] through the
//! [`node::NodeHandle`] trait, folds their updates into the strategy's streaming aggregator in
//! a fixed order, applies the server optimizer, evaluates the new global model and records the
//! round. In-process virtual nodes (ferry-sim) implement that trait; the deployed server
//! (ferry-server) drives the same [`round`] bookkeeping from network events.

#![warn(missing_docs)]

pub mod cross_site;
pub mod devices;
pub mod dispatch;
pub mod error;
pub mod fedbuff;
pub mod federation;
pub mod floor;
pub mod node;
pub mod record;
pub mod round;
pub mod secure;
pub mod selection;

pub use error::EngineError;
