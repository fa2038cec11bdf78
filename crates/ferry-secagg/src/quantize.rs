//! Fixed-point encoding of an update for summation modulo a power of two.
//!
//! Each coordinate is clipped to `[-c, c]`, multiplied by the node's weight factor
//! `w` in `[0, 1]`, shifted to `[0, 2c]` and stochastically rounded to one of `L + 1`
//! levels, so the rounding is unbiased. One more slot carries `w` itself, so the sum reveals
//! the total weight and the weighted mean can be formed without any node's weight.

use rand_core::Rng;

use crate::SecAggParams;

/// A uniform draw from `[0, 1)`.
fn unit(rng: &mut impl Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// `z` rounded down or up at random so that its expectation is `z`.
fn stochastic_round(z: f64, rng: &mut impl Rng) -> u64 {
    let floor = z.floor();
    let up = unit(rng) < z - floor;
    floor as u64 + u64::from(up)
}

/// Encodes `values` scaled by `weight`, followed by the weight slot.
pub(crate) fn encode(
    values: &[f32],
    weight: f64,
    params: &SecAggParams,
    rng: &mut impl Rng,
) -> Vec<u64> {
    let clip = f64::from(params.clip);
    let levels = params.max_level() as f64;
    let scale = levels / (2.0 * clip);
    let mut encoded = Vec::with_capacity(values.len() + 1);
    encoded.extend(values.iter().map(|&v| {
        let shifted = weight * f64::from(v).clamp(-clip, clip) + clip;
        stochastic_round(shifted * scale, rng).min(params.max_level())
    }));
    encoded.push(stochastic_round(weight * levels, rng).min(params.max_level()));
    encoded
}

/// Decodes the sum of `contributors` encodings into the weighted sum of the values and the
/// total weight.
pub(crate) fn decode(sum: &[u64], contributors: usize, params: &SecAggParams) -> (Vec<f32>, f64) {
    let clip = f64::from(params.clip);
    let levels = params.max_level() as f64;
    let step = 2.0 * clip / levels;
    let offset = contributors as f64 * clip;
    let (values, weight) = sum.split_at(sum.len().saturating_sub(1));
    let decoded = values
        .iter()
        .map(|&s| (s as f64 * step - offset) as f32)
        .collect();
    let weight = weight.first().map_or(0.0, |&w| w as f64 / levels);
    (decoded, weight)
}

/// The weight factor in `[0, 1]` a node with `num_examples` examples folds into its input:
/// `min(n, cap) / cap` for FedAvg weighting, 1 when `cap` is `None` (every node counts once).
pub fn weight_factor(num_examples: u64, cap: Option<u64>) -> f64 {
    match cap {
        Some(cap) if cap > 0 => num_examples.min(cap) as f64 / cap as f64,
        _ => 1.0,
    }
}

/// The largest error of one decoded coordinate of a sum over `contributors` nodes: each
/// node's rounding moves its value by less than one level.
pub fn max_sum_error(contributors: usize, params: &SecAggParams) -> f64 {
    contributors as f64 * 2.0 * f64::from(params.clip) / params.max_level() as f64
}

#[cfg(test)]
mod tests {
    use chacha20::ChaCha20Rng;
    use rand_core::SeedableRng;

    use super::*;

    #[test]
    fn one_encoding_decodes_within_one_level() {
        let params = SecAggParams::default();
        let mut rng = ChaCha20Rng::from_seed([3; 32]);
        let values = [0.0f32, 1.5, -7.99, 8.0, -8.0, 0.123_456];
        let (decoded, weight) = decode(&encode(&values, 0.5, &params, &mut rng), 1, &params);
        for (v, d) in values.iter().zip(&decoded) {
            assert!((0.5 * v - d).abs() <= max_sum_error(1, &params) as f32 + 1e-6);
        }
        assert!((weight - 0.5).abs() < 1e-6);
    }

    #[test]
    fn values_outside_the_clip_are_clipped() {
        let params = SecAggParams::default();
        let mut rng = ChaCha20Rng::from_seed([4; 32]);
        let (decoded, _) = decode(
            &encode(&[100.0, -100.0], 1.0, &params, &mut rng),
            1,
            &params,
        );
        assert!((decoded[0] - 8.0).abs() < 1e-4);
        assert!((decoded[1] + 8.0).abs() < 1e-4);
    }

    #[test]
    fn rounding_is_unbiased() {
        // Coarse levels make the bias of deterministic rounding visible.
        let params = SecAggParams {
            quantization_bits: 2,
            clip: 1.0,
            ..SecAggParams::default()
        };
        let mut rng = ChaCha20Rng::from_seed([5; 32]);
        let trials = 20_000;
        let mean: f64 = (0..trials)
            .map(|_| f64::from(decode(&encode(&[0.1], 1.0, &params, &mut rng), 1, &params).0[0]))
            .sum::<f64>()
            / trials as f64;
        assert!((mean - 0.1).abs() < 0.01, "mean {mean}");
    }
}
