//! Ferry's node agent: runs where the data lives, dials the coordinator, and sends back only
//! model updates.
//!
//! - [`agent`]: the loop (enrol, pull, download, train with heartbeats, upload) and the
//!   [`agent::Trainer`] trait that local training plugs into.
//! - [`connection`]: the TLS channel and the node's stored credential.
//! - [`failover`]: several server addresses (an active server and its standbys) as one
//!   channel.
//! - [`transfer`]: resumable, hash-checked downloads and uploads.
//! - [`exec`]: the external-command trainer (any language, through files).
//! - [`backoff`]: reconnection pacing.
//! - [`feedback`]: the update's compression, with top-k's error feedback kept in the state
//!   folder.

#![warn(missing_docs)]

pub mod agent;
pub mod backoff;
pub mod connection;
pub mod control;
pub mod error;
pub mod exec;
pub mod failover;
pub mod feedback;
mod link;
mod secure;
mod state_file;
pub mod transfer;

pub use error::ClientError;
pub use link::explain;
