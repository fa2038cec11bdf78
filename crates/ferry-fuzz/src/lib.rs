//! Fuzzing for Ferry's decoders. Every decoder that reads bytes from the network or from a
//! file a user or trainer hands over is fed arbitrary and mutated inputs, reproducible from a
//! seed; the rules are that no input panics and none makes the decoder allocate more than
//! [`engine::allocation_cap`] at once (a length field claiming 4 GB gets nothing), so each
//! bad input ends as a typed error.
//!
//! - [`targets`]: the decoders and their valid seed inputs.
//! - [`mutate`]: the input generator.
//! - [`engine`]: runs a target and reports what broke.
//! - [`probe`]: the allocator wrapper that measures allocations.
//!
//! The `ferry-fuzz` binary runs millions of inputs (`docs/fuzzing.md`); the test suite runs a
//! short pass of each target.

#![warn(missing_docs)]

pub mod engine;
pub mod mutate;
pub mod probe;
pub mod targets;

pub use engine::{Report, Target, run};
