//! Choosing which nodes take part in a round.

use ferry_core::{evaluation::EvaluationSchedule, seed::mix_seed};
use rand::{Rng, SeedableRng, seq::index};
use rand_chacha::ChaCha8Rng;

/// Mixed into the run seed for each federated evaluation's draw, so it never repeats the
/// round's training cohort draw.
const EVALUATION_STREAM: u64 = 0x4576_616c;

/// The nodes (positions out of `available`) that score the model after `round`, and the
/// evaluation's seed: `schedule`'s share of them, drawn from `run_seed`, the same rule in
/// simulation and deployment.
pub fn evaluators(
    available: usize,
    schedule: &EvaluationSchedule,
    run_seed: u64,
    round: u32,
) -> (Vec<usize>, u64) {
    let seed = mix_seed(run_seed, EVALUATION_STREAM ^ u64::from(round));
    (sample(available, schedule.nodes(available), seed), seed)
}

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

/// Poisson sampling: each of `available` positions is taken independently with probability
/// `rate`, from `seed`; sorted. The cohort size varies from round to round, which is what the
/// differential-privacy accountant assumes.
pub fn poisson(available: usize, rate: f64, seed: u64) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..available)
        .filter(|_| rng.random_bool(rate.clamp(0.0, 1.0)))
        .collect()
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

    #[test]
    fn poisson_sampling_takes_each_node_with_the_rate() {
        let picks: usize = (0..200).map(|seed| poisson(100, 0.1, seed).len()).sum();
        // 20,000 Bernoulli(0.1) draws: mean 2,000, standard deviation 42.
        assert!((1800..=2200).contains(&picks), "{picks}");
        let one = poisson(100, 0.1, 3);
        assert!(one.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(one, poisson(100, 0.1, 3));
        assert_eq!(poisson(5, 1.0, 0), [0, 1, 2, 3, 4]);
    }
}
