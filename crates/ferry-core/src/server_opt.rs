//! The server-optimizer step: how an aggregate becomes the next global model.
//!
//! Reddi et al. (2021) cast FedAvg as server SGD with learning rate 1 on the mean delta; the
//! adaptive server optimizers (FedAdam, FedYogi, FedAdagrad) and server momentum (FedAvgM)
//! are the same step with state, which [`ServerOptimizer::state_bytes`] reports.

use crate::{CoreError, aggregate::Aggregate, algebra};

/// Applies an aggregated delta to the global parameters.
pub trait ServerOptimizer: Send {
    /// Updates `global` in place from the round's aggregate.
    fn apply(&mut self, global: &mut [f32], aggregate: &Aggregate) -> Result<(), CoreError>;

    /// Bytes of state the optimizer keeps between rounds (0 for plain FedAvg).
    fn state_bytes(&self) -> usize;
}

/// Server SGD: `x = x + lr * delta`. With `lr = 1` this is FedAvg's "apply the mean delta".
#[derive(Debug, Clone)]
pub struct ServerSgd {
    lr: f32,
}

impl ServerSgd {
    /// Server SGD with the given learning rate.
    pub fn new(lr: f32) -> Self {
        Self { lr }
    }
}

impl ServerOptimizer for ServerSgd {
    fn apply(&mut self, global: &mut [f32], aggregate: &Aggregate) -> Result<(), CoreError> {
        if global.len() != aggregate.delta.len() {
            return Err(CoreError::LengthMismatch {
                expected: global.len(),
                got: aggregate.delta.len(),
            });
        }
        algebra::add_scaled(global, &aggregate.delta, self.lr);
        Ok(())
    }

    fn state_bytes(&self) -> usize {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_lr_applies_the_mean_delta() {
        let mut global = vec![1.0, 2.0];
        let aggregate = Aggregate {
            delta: vec![0.5, -1.0],
            participants: 2,
            num_examples: 10,
        };
        let mut opt = ServerSgd::new(1.0);
        opt.apply(&mut global, &aggregate).expect("same length");
        assert_eq!(global, [1.5, 1.0]);
        assert_eq!(opt.state_bytes(), 0);
        let short = Aggregate {
            delta: vec![0.0],
            ..aggregate
        };
        assert!(opt.apply(&mut global, &short).is_err());
    }
}
