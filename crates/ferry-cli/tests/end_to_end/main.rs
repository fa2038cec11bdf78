//! End-to-end tests: the real `ferry` binary started as server, clients and simulations in
//! processes of their own, on loopback.
//!
//! One test binary, not one per file, so that a clean build compiles and links the shared
//! helpers and their dependencies once.

mod support;

mod access;
mod asynchronous;
mod chaos;
mod churn;
mod compression;
mod cross_site;
mod dashboard;
mod deploy;
mod fleet;
mod fleet_sim;
mod llm_lora;
mod many_nodes;
mod own_model;
mod parity;
mod pytorch_example;
mod relays;
mod resume;
mod safety;
mod sdk;
mod simulate;
mod standby;
mod wire_dtype;
