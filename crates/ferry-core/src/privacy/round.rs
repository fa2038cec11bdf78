//! One round's privacy parameters, fixed when the round is planned: what the nodes are told
//! to do and what the server's noisy sum uses.

use crate::privacy::{Placement, node::NodePrivacy, noise::NoiseSeed};

/// One round's privacy parameters, fixed when the round is planned.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundPrivacy {
    /// The round.
    pub round: u32,
    /// Who adds the noise.
    pub placement: Placement,
    /// Expected cohort size `q * N`: the fixed denominator.
    pub expected_count: f64,
    /// The clip norm.
    pub clip: f64,
    /// Noise multiplier of the update sum (adaptive clipping raises it to pay for the count).
    pub update_noise_multiplier: f64,
    /// Standard deviation of the noise on the unclipped count; zero without adaptive clipping.
    pub count_stddev: f64,
    /// Clip each tensor separately.
    pub per_layer: bool,
    /// Where the server's noise comes from.
    pub noise: NoiseSeed,
}

impl RoundPrivacy {
    /// What each node must do to its update: clip and add its noise share (distributed
    /// placement); `None` when the server does it all.
    pub fn node_instructions(&self) -> Option<NodePrivacy> {
        (self.placement == Placement::Distributed).then(|| {
            let share = self.expected_count.sqrt();
            NodePrivacy {
                clip: self.clip,
                noise_std: self.update_noise_multiplier * self.clip / share,
                count_noise_std: self.count_stddev / share,
                per_layer: self.per_layer,
            }
        })
    }
}
