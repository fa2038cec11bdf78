//! The public parameters every participant of a secure round agrees on.

use crate::SecAggError;

/// Parameters of a SecAgg+ round, chosen by the coordinator and sent to every node.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SecAggParams {
    /// Neighbours of each node in the masking graph (Bell et al., 2020); at least the number
    /// of other participants gives classic SecAgg (Bonawitz et al., 2017).
    pub neighbours: usize,
    /// Shares of a node's secrets needed to rebuild them (Shamir threshold), at least 2.
    pub threshold: usize,
    /// Every update coordinate is clipped to `[-clip, clip]` before quantisation.
    pub clip: f32,
    /// Quantisation levels per coordinate are `2^quantization_bits`.
    pub quantization_bits: u32,
    /// Sums are computed modulo `2^modulus_bits` (at most 64).
    pub modulus_bits: u32,
}

impl Default for SecAggParams {
    /// The defaults: 16 neighbours, a majority threshold, clip 8, 2^22 levels, modulus 2^32
    /// (the clip, levels and modulus are those REFERENCES.md records from one peer system).
    fn default() -> Self {
        Self {
            neighbours: 16,
            threshold: 9,
            clip: 8.0,
            quantization_bits: 22,
            modulus_bits: 32,
        }
    }
}

impl SecAggParams {
    /// Classic-or-plus parameters with `neighbours` neighbours and a majority threshold.
    pub fn with_neighbours(neighbours: usize) -> Self {
        Self {
            neighbours,
            threshold: neighbours / 2 + 1,
            ..Self::default()
        }
    }

    /// Checks the parameters for a round of `participants` nodes.
    pub fn validate(&self, participants: usize) -> Result<(), SecAggError> {
        let bad = |reason: String| Err(SecAggError::Params(reason));
        if participants < 3 {
            return bad(format!(
                "secure aggregation needs at least 3 nodes in a round, got {participants}: with \
                 2, each could subtract its own update from the sum and read the other's"
            ));
        }
        if self.threshold < 2 {
            return bad(format!(
                "threshold must be at least 2, got {}",
                self.threshold
            ));
        }
        if self.neighbours < self.threshold {
            return bad(format!(
                "neighbours ({}) must be at least the threshold ({})",
                self.neighbours, self.threshold
            ));
        }
        if !(self.clip.is_finite() && self.clip > 0.0) {
            return bad(format!("clip must be positive, got {}", self.clip));
        }
        if !(1..=64).contains(&self.modulus_bits) {
            return bad(format!(
                "modulus bits must be in 1..=64, got {}",
                self.modulus_bits
            ));
        }
        if !(1..=53).contains(&self.quantization_bits) {
            return bad(format!(
                "quantisation bits must be in 1..=53, got {}",
                self.quantization_bits
            ));
        }
        let neighbourhood = self.neighbourhood(participants);
        if neighbourhood < self.threshold {
            return bad(format!(
                "{participants} participants give each node {neighbourhood} neighbours, fewer \
                 than the threshold {}; lower the threshold",
                self.threshold
            ));
        }
        // Every coordinate's sum over all participants must stay below the modulus.
        let needed = (participants.max(1) as f64).log2().ceil() as u32 + self.quantization_bits;
        if needed > self.modulus_bits {
            return bad(format!(
                "{participants} participants with {} quantisation bits need a modulus of at \
                 least 2^{needed}; raise the modulus bits or lower the quantisation bits",
                self.quantization_bits
            ));
        }
        Ok(())
    }

    /// Neighbours of each node in a round of `participants` nodes: `neighbours` rounded up
    /// to an even number (the graph is a ring with `neighbours / 2` on each side), or every
    /// other node when that is fewer.
    pub fn neighbourhood(&self, participants: usize) -> usize {
        let others = participants.saturating_sub(1);
        let even = self.neighbours.div_ceil(2) * 2;
        if even >= others { others } else { even }
    }

    /// The fewest nodes a round can finish with: the roster and the survivors must exceed the
    /// threshold (each survivor's secrets are rebuilt from `threshold` other nodes' shares),
    /// and never fewer than 3. A round that starts with exactly this many survives no dropout.
    pub fn min_participants(&self) -> usize {
        (self.threshold + 1).max(3)
    }

    /// The default threshold for a round of `participants` nodes: a majority of each node's
    /// neighbourhood, at least 2.
    pub fn majority_threshold(&self, participants: usize) -> usize {
        (self.neighbourhood(participants) / 2 + 1).max(2)
    }

    /// The largest quantised value of one coordinate, `2^quantization_bits - 1`.
    pub(crate) fn max_level(&self) -> u64 {
        (1u64 << self.quantization_bits) - 1
    }

    /// The bit mask that reduces a value modulo `2^modulus_bits`.
    pub(crate) fn modulus_mask(&self) -> u64 {
        if self.modulus_bits == 64 {
            u64::MAX
        } else {
            (1u64 << self.modulus_bits) - 1
        }
    }

    /// Keystream bytes drawn per coordinate of a mask.
    pub(crate) fn keystream_bytes(&self) -> usize {
        if self.modulus_bits <= 32 { 4 } else { 8 }
    }

    /// Bytes of `values` masked coordinates on the wire: `modulus_bits` bits each, packed.
    pub fn packed_bytes(&self, values: usize) -> usize {
        (values * self.modulus_bits as usize).div_ceil(8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fit_a_thousand_nodes_but_not_a_million() {
        let params = SecAggParams::default();
        assert!(params.validate(1000).is_ok());
        assert!(params.validate(1 << 20).is_err());
    }

    #[test]
    fn a_threshold_above_the_neighbours_is_refused() {
        let params = SecAggParams {
            neighbours: 4,
            threshold: 5,
            ..SecAggParams::default()
        };
        assert!(params.validate(10).is_err());
        assert!(SecAggParams::with_neighbours(4).validate(10).is_ok());
    }

    #[test]
    fn min_participants_is_the_smallest_valid_round() {
        for neighbours in [2, 4, 5, 16] {
            for threshold in 2..=neighbours {
                let params = SecAggParams {
                    neighbours,
                    threshold,
                    ..SecAggParams::default()
                };
                let n = params.min_participants();
                assert!(params.validate(n).is_ok(), "{params:?} with {n}");
                assert!(params.validate(n - 1).is_err(), "{params:?} with {}", n - 1);
            }
        }
    }

    #[test]
    fn two_nodes_are_too_few() {
        let err = SecAggParams::with_neighbours(2).validate(2).unwrap_err();
        assert!(err.to_string().contains("at least 3 nodes"), "{err}");
    }

    #[test]
    fn a_small_round_has_fewer_neighbours() {
        assert_eq!(SecAggParams::default().neighbourhood(5), 4);
        assert_eq!(SecAggParams::default().neighbourhood(100), 16);
        assert_eq!(SecAggParams::with_neighbours(5).neighbourhood(100), 6);
        assert!(SecAggParams::default().validate(5).is_err());
    }
}
