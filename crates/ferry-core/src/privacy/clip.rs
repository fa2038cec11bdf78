//! L2 clipping of updates: the bound on each node's influence that differential privacy's
//! noise is calibrated to.
//!
//! Whole-model clipping scales the delta so its norm is at most `S`. Per-layer clipping bounds
//! each of the `L` tensors by `S / sqrt(L)`, so the whole update still stays within `S` (the
//! sensitivity the noise assumes) while a layer with large gradients cannot crowd out the rest.

use std::ops::Range;

use crate::{ModelLayout, algebra};

/// The slices of a flat update that are clipped separately.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClipScope {
    parts: Vec<Range<usize>>,
}

impl ClipScope {
    /// One bound for the whole model.
    pub fn whole(dim: usize) -> Self {
        Self {
            parts: std::iter::once(0..dim).collect(),
        }
    }

    /// One bound per tensor of `layout`.
    pub fn per_layer(layout: &ModelLayout) -> Self {
        Self {
            parts: layout.entries().map(|(_, range)| range).collect(),
        }
    }

    /// Either scope, as a run configures it.
    pub fn for_layout(layout: &ModelLayout, per_layer: bool) -> Self {
        if per_layer {
            Self::per_layer(layout)
        } else {
            Self::whole(layout.num_params())
        }
    }

    /// Values the scope covers.
    pub fn dim(&self) -> usize {
        self.parts.last().map_or(0, |r| r.end)
    }

    /// The bound each part gets when the whole update must stay within `bound`.
    fn part_bound(&self, bound: f64) -> f64 {
        bound / (self.parts.len() as f64).sqrt()
    }

    /// The factor (at most 1) that brings each part within its bound, and whether no part
    /// needed clipping.
    pub fn factors(&self, delta: &[f32], bound: f64) -> (Vec<f64>, bool) {
        let part_bound = self.part_bound(bound);
        let factors: Vec<f64> = self
            .parts
            .iter()
            .map(|range| {
                let norm = algebra::l2_norm(&delta[range.clone()]);
                if norm > part_bound {
                    part_bound / norm
                } else {
                    1.0
                }
            })
            .collect();
        let unclipped = factors.iter().all(|&f| f == 1.0);
        (factors, unclipped)
    }

    /// Clips `delta` in place; returns whether it was already within the bound.
    pub fn clip(&self, delta: &mut [f32], bound: f64) -> bool {
        let (factors, unclipped) = self.factors(delta, bound);
        for (range, factor) in self.parts.iter().zip(factors) {
            if factor < 1.0 {
                algebra::scale(&mut delta[range.clone()], factor as f32);
            }
        }
        unclipped
    }

    /// Adds the clipped `delta` to `acc` without copying it; returns whether it was already
    /// within the bound.
    pub fn accumulate_clipped(&self, acc: &mut [f32], delta: &[f32], bound: f64) -> bool {
        let (factors, unclipped) = self.factors(delta, bound);
        for (range, factor) in self.parts.iter().zip(factors) {
            algebra::weighted_accumulate(&mut acc[range.clone()], &delta[range.clone()], factor);
        }
        unclipped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TensorSpec;
    use proptest::prelude::*;

    fn layout() -> ModelLayout {
        ModelLayout::new(vec![
            TensorSpec {
                name: "a".into(),
                shape: vec![2],
                dtype: crate::TensorDtype::F32,
            },
            TensorSpec {
                name: "b".into(),
                shape: vec![2],
                dtype: crate::TensorDtype::F32,
            },
        ])
        .expect("layout")
    }

    #[test]
    fn whole_model_clipping_scales_to_the_bound() {
        let mut delta = vec![3.0, 4.0, 0.0, 0.0];
        assert!(!ClipScope::whole(4).clip(&mut delta, 1.0));
        assert_eq!(delta, [0.6, 0.8, 0.0, 0.0]);
        let mut small = vec![0.3, 0.4, 0.0, 0.0];
        assert!(ClipScope::whole(4).clip(&mut small, 1.0));
        assert_eq!(small, [0.3, 0.4, 0.0, 0.0]);
    }

    #[test]
    fn per_layer_clipping_bounds_each_tensor_by_s_over_sqrt_l() {
        // Bound 2 over 2 tensors: each gets sqrt(2). Tensor a has norm 5, b has norm 1.
        let scope = ClipScope::for_layout(&layout(), true);
        let mut delta = vec![3.0, 4.0, 0.6, 0.8];
        assert!(!scope.clip(&mut delta, 2.0));
        let a = algebra::l2_norm(&delta[..2]);
        assert!((a - 2f64.sqrt()).abs() < 1e-6, "{a}");
        assert_eq!(&delta[2..], [0.6, 0.8]);
    }

    proptest! {
        #[test]
        fn clipped_updates_respect_the_bound_and_accumulate_equally(
            delta in prop::collection::vec(-10f32..10.0, 4),
            bound in 0.01f64..20.0,
            per_layer in any::<bool>(),
        ) {
            let scope = ClipScope::for_layout(&layout(), per_layer);
            let mut clipped = delta.clone();
            scope.clip(&mut clipped, bound);
            prop_assert!(algebra::l2_norm(&clipped) <= bound * (1.0 + 1e-5));
            let mut acc = vec![0.0f32; 4];
            scope.accumulate_clipped(&mut acc, &delta, bound);
            for (a, c) in acc.iter().zip(&clipped) {
                prop_assert!((a - c).abs() <= 1e-5 * a.abs().max(1.0));
            }
        }
    }
}
