//! Choosing which nodes take part in a round.

use rand::{SeedableRng, seq::index};
use rand_chacha::ChaCha8Rng;

/// How many of `available` nodes a round uses: `fraction` of them, at least `min_clients`,
/// never more than are available.
pub fn cohort_size(available: usize, fraction: f64, min_clients: usize) -> usize {
    let wanted = (fraction * available as f64 - 1e-9).ceil().max(0.0) as usize;
    wanted.max(min_clients).max(1).min(available)
}

/// Picks `count` distinct positions out of `available`, uniformly, from `seed`; sorted.
pub fn sample(available: usize, count: usize, seed: u64) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut picked = index::sample(&mut rng, available, count.min(available)).into_vec();
    picked.sort_unstable();
    picked
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cohort_respects_fraction_minimum_and_availability() {
        assert_eq!(cohort_size(10, 1.0, 1), 10);
        assert_eq!(cohort_size(100, 0.1, 1), 10);
        assert_eq!(cohort_size(10, 0.25, 1), 3);
        assert_eq!(cohort_size(10, 0.1, 5), 5);
        assert_eq!(cohort_size(4, 0.5, 9), 4);
        assert_eq!(cohort_size(10, 0.01, 0), 1);
    }

    #[test]
    fn sample_is_distinct_sorted_and_seeded() {
        let a = sample(100, 10, 5);
        assert_eq!(a.len(), 10);
        assert!(a.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(a, sample(100, 10, 5));
        assert_ne!(a, sample(100, 10, 6));
        assert_eq!(sample(3, 10, 0), [0, 1, 2]);
    }
}
