//! Gaussian noise for differential privacy, drawn from ChaCha20.
//!
//! A deployment draws from the operating system's entropy, so nobody who knows the run's
//! configuration can reproduce (and subtract) the noise; a simulation draws from the run seed,
//! so an experiment repeats bit for bit.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use rand_distr::StandardNormal;

/// Where a run's privacy noise comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoiseSeed {
    /// Fresh operating-system entropy for every draw (deployments).
    Os,
    /// Derived from the run seed and the draw's stream (simulations).
    Run(u64),
}

/// A Gaussian noise generator.
#[derive(Debug, Clone)]
pub struct NoiseSource {
    rng: ChaCha20Rng,
}

impl NoiseSource {
    /// A generator for one use (`stream`: a round, or a round and node) of `seed`.
    pub fn new(seed: NoiseSeed, stream: u64) -> Self {
        let rng = match seed {
            NoiseSeed::Os => ChaCha20Rng::from_os_rng(),
            NoiseSeed::Run(seed) => ChaCha20Rng::seed_from_u64(crate::seed::mix_seed(
                seed ^ 0x5052_4956_4143_5921,
                stream,
            )),
        };
        Self { rng }
    }

    /// One draw from `N(0, std^2)`.
    pub fn gaussian(&mut self, std: f64) -> f64 {
        let unit: f64 = self.rng.sample(StandardNormal);
        unit * std
    }

    /// Adds independent `N(0, std^2)` noise to every value.
    pub fn add_to_f32(&mut self, values: &mut [f32], std: f64) {
        if std > 0.0 {
            for v in values {
                *v += self.gaussian(std) as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_seeded_noise_repeats_and_streams_differ() {
        let draw = |stream| NoiseSource::new(NoiseSeed::Run(3), stream).gaussian(1.0);
        assert_eq!(draw(1), draw(1));
        assert_ne!(draw(1), draw(2));
        assert_ne!(
            NoiseSource::new(NoiseSeed::Os, 1).gaussian(1.0),
            NoiseSource::new(NoiseSeed::Os, 1).gaussian(1.0)
        );
    }

    #[test]
    fn noise_has_the_requested_spread() {
        let mut values = vec![0.0f32; 200_000];
        NoiseSource::new(NoiseSeed::Run(0), 0).add_to_f32(&mut values, 3.0);
        let n = values.len() as f64;
        let mean = values.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let var = values
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n;
        // Standard errors: mean 3/sqrt(n) = 0.0067; variance 9*sqrt(2/n) = 0.028.
        assert!(mean.abs() < 0.03, "mean {mean}");
        assert!((var - 9.0).abs() < 0.15, "variance {var}");
    }
}
