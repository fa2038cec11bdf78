//! The node's part of distributed differential privacy: clip its own update and add its share
//! of the noise before the update leaves the node.

use serde::{Deserialize, Serialize};

use crate::{
    ModelLayout, Update,
    privacy::{clip::ClipScope, noise::NoiseSource},
};

/// What the server asks of each node in a distributed-DP round.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct NodePrivacy {
    /// The L2 bound of the update.
    pub clip: f64,
    /// Standard deviation of the node's noise share on each value.
    pub noise_std: f64,
    /// Standard deviation of the node's noise share on its clip indicator (adaptive clipping;
    /// zero otherwise).
    pub count_noise_std: f64,
    /// Clip each tensor separately.
    pub per_layer: bool,
}

/// Clips `update` and adds the node's noise share, and sets its noised clip indicator.
pub fn privatize(
    update: &mut Update,
    instructions: &NodePrivacy,
    layout: &ModelLayout,
    noise: &mut NoiseSource,
) {
    let scope = ClipScope::for_layout(layout, instructions.per_layer);
    let within = scope.clip(&mut update.delta, instructions.clip);
    noise.add_to_f32(&mut update.delta, instructions.noise_std);
    update.unclipped =
        Some(f64::from(u8::from(within)) + noise.gaussian(instructions.count_noise_std));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{TensorSpec, algebra, privacy::noise::NoiseSeed};

    #[test]
    fn privatized_update_is_clipped_noised_and_flagged() {
        let layout = ModelLayout::new(vec![TensorSpec {
            name: "w".into(),
            shape: vec![3],
            dtype: crate::TensorDtype::F32,
        }])
        .expect("layout");
        let mut noise = NoiseSource::new(NoiseSeed::Run(1), 0);
        let mut quiet = Update::new(vec![30.0, 40.0, 0.0], 7);
        let exact = NodePrivacy {
            clip: 5.0,
            noise_std: 0.0,
            count_noise_std: 0.0,
            per_layer: false,
        };
        privatize(&mut quiet, &exact, &layout, &mut noise);
        assert!((algebra::l2_norm(&quiet.delta) - 5.0).abs() < 1e-5);
        assert_eq!(quiet.unclipped, Some(0.0));
        let mut noisy = Update::new(vec![0.1, 0.0, 0.0], 7);
        privatize(
            &mut noisy,
            &NodePrivacy {
                noise_std: 1.0,
                ..exact
            },
            &layout,
            &mut noise,
        );
        assert_ne!(noisy.delta, [0.1, 0.0, 0.0]);
        assert_eq!(noisy.unclipped, Some(1.0));
    }
}
