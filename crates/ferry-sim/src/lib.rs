//! Federated learning simulated on one machine with the real engine.
//!
//! [`Simulation::prepare`] loads a dataset, splits it across virtual nodes with a NIID-Bench
//! partitioner and builds the initial model; [`Simulation::run`] drives the same
//! [`ferry_engine::federation::Federation`] that deployment uses, with in-process nodes
//! training in parallel, one thread each. [`baselines`] answers "is federated learning worth it
//! here?" by training centrally and on each node alone. [`attack`] stages poisoning attacks by a
//! share of the nodes, to measure robust aggregation.

#![warn(missing_docs)]

pub mod attack;
pub mod baselines;
pub mod config;
pub mod cross_site;
pub mod error;
pub mod evaluator;
pub mod fleet;
pub mod node;
pub mod simulation;

pub use config::SimConfig;
pub use error::SimError;
pub use simulation::Simulation;
