//! Secure aggregation for Ferry: the server learns the sum of the nodes' updates, never one
//! update.
//!
//! SecAgg (Bonawitz et al., 2017) with the sparse neighbour graph of SecAgg+ (Bell et al.,
//! 2020), as pure state machines with no transport: [`SecAggClient`] runs on each node,
//! [`SecAggServer`] on the coordinator, and the caller carries their [`messages`] by whatever
//! means it has (in-process calls in simulation, the fleet protocol in deployment). A round
//! has four stages: advertise keys, share keys, masked input, unmask. Nodes may drop at any
//! stage; the round survives while every node whose secret must be rebuilt keeps at least
//! `threshold` responsive neighbours, and aborts with [`SecAggError::Aborted`] otherwise.

#![warn(missing_docs)]

mod client;
mod crypto;
pub mod graph;
mod masks;
pub mod messages;
mod params;
mod quantize;
mod server;

pub use client::SecAggClient;
pub use graph::{NeighbourGraph, ParticipantId};
pub use masks::{pack, unpack};
pub use messages::{
    MaskedInput, PublicKeys, RevealedShare, Roster, SealedShare, ShareKind, UnmaskRequest,
};
pub use params::SecAggParams;
pub use quantize::{max_sum_error, weight_factor};
pub use server::{SecAggServer, SecureSum};

/// Why a secure-aggregation step failed.
#[derive(Debug, thiserror::Error)]
pub enum SecAggError {
    /// The parameters cannot work for this round.
    #[error("secure aggregation parameters: {0}")]
    Params(String),
    /// A message was malformed, forged or addressed to someone else.
    #[error("malformed secure-aggregation message: {0}")]
    Malformed(String),
    /// A message arrived in the wrong stage.
    #[error("secure-aggregation message out of order: {0}")]
    Stage(String),
    /// An honest node refused a request that would reveal an update.
    #[error("secure aggregation refused: {0}")]
    Refused(String),
    /// Too many nodes dropped for the round to finish.
    #[error("secure round aborted: {0}")]
    Aborted(String),
}
