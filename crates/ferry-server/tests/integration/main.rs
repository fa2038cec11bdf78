//! The server's integration tests: the coordinator and the fleet service over the real gRPC
//! protocol, on loopback.
//!
//! One test binary, not one per file: each links the whole server, and in a clean release
//! build the seven binaries took 41-59 s of CPU each to compile (`cargo build --timings`).

mod support;

mod abuse_limits;
mod blob_store;
mod connection_state;
mod cross_site;
mod disk_full;
mod federated_evaluation;
mod legacy_store;
mod protocol;
mod relays;
mod retention;
mod round_failures;
mod store;
