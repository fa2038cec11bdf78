//! Ferry's wire protocol, `ferry.v1`: the messages and the gRPC `Fleet` service that nodes and
//! the coordinator speak. Generated at build time from `proto/ferry/v1/fleet.proto`.

/// Version 1 of the protocol.
pub mod v1 {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("ferry.v1");
}

pub mod secagg;

/// The metadata key that carries a node's credential on every call after enrolment.
pub const AUTHORIZATION: &str = "authorization";

/// Response header by which a standby server names the active one (its address as nodes dial
/// it), on the `UNAVAILABLE` status it answers every call with: a node that knows several
/// server addresses goes there next.
pub const ACTIVE_SERVER: &str = "ferry-active-server";

/// The metadata key by which a relay names the node of its subtree that a call is made for;
/// the call carries the relay's own credential.
pub const ON_BEHALF_OF: &str = "ferry-on-behalf-of";
