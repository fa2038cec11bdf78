//! Update algebra on flat `f32` slices.
//!
//! Aggregation is bound by memory bandwidth, so every operation streams the vectors once, in
//! parallel over fixed-size chunks. The chunk boundaries do not depend on the number of
//! threads, so results (including reductions) are bit-identical whatever the thread count.

use rayon::prelude::*;

/// Values per parallel work item: large enough to amortise scheduling, small enough to
/// spread a 1M-parameter model over every core.
const CHUNK: usize = 1 << 15;

/// Writes `local - global` into `out`: the update a node sends back.
///
/// # Panics
/// When the three slices differ in length (a programming error: callers check layouts).
pub fn delta_into(out: &mut [f32], local: &[f32], global: &[f32]) {
    assert_eq!(out.len(), local.len(), "delta_into: length mismatch");
    assert_eq!(out.len(), global.len(), "delta_into: length mismatch");
    out.par_chunks_mut(CHUNK)
        .zip(local.par_chunks(CHUNK).zip(global.par_chunks(CHUNK)))
        .for_each(|(o, (l, g))| {
            for ((o, l), g) in o.iter_mut().zip(l).zip(g) {
                *o = l - g;
            }
        });
}

/// Adds `weight * x` to the accumulator `acc`: one streaming step of a weighted mean. Each
/// product and sum is formed in `f64` and rounded once, so the accumulator needs no more memory
/// than the model.
///
/// # Panics
/// When `acc` and `x` differ in length.
pub fn weighted_accumulate(acc: &mut [f32], x: &[f32], weight: f64) {
    assert_eq!(acc.len(), x.len(), "weighted_accumulate: length mismatch");
    acc.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(a, x)| {
            for (a, x) in a.iter_mut().zip(x) {
                *a = (f64::from(*a) + weight * f64::from(*x)) as f32;
            }
        });
}

/// Multiplies every value of `x` by `factor`.
pub fn scale(x: &mut [f32], factor: f32) {
    x.par_chunks_mut(CHUNK).for_each(|c| {
        for v in c {
            *v *= factor;
        }
    });
}

/// Adds `factor * y` to `x` (the axpy of a server step).
///
/// # Panics
/// When `x` and `y` differ in length.
pub fn add_scaled(x: &mut [f32], y: &[f32], factor: f32) {
    assert_eq!(x.len(), y.len(), "add_scaled: length mismatch");
    x.par_chunks_mut(CHUNK)
        .zip(y.par_chunks(CHUNK))
        .for_each(|(x, y)| {
            for (x, y) in x.iter_mut().zip(y) {
                *x += factor * y;
            }
        });
}

/// The Euclidean norm of `x`, summed in `f64` in a fixed chunk order.
pub fn l2_norm(x: &[f32]) -> f64 {
    let partials: Vec<f64> = x
        .par_chunks(CHUNK)
        .map(|c| c.iter().map(|v| f64::from(*v) * f64::from(*v)).sum())
        .collect();
    partials.iter().sum::<f64>().sqrt()
}

/// Index of the first NaN or infinite value, if any.
pub fn first_non_finite(x: &[f32]) -> Option<usize> {
    x.par_chunks(CHUNK)
        .enumerate()
        .filter_map(|(i, c)| c.iter().position(|v| !v.is_finite()).map(|p| i * CHUNK + p))
        .min()
}

/// Divides an accumulator by `divisor` in place (in `f64`, rounded once): the mean.
pub fn divide(acc: &mut [f32], divisor: f64) {
    acc.par_chunks_mut(CHUNK).for_each(|a| {
        for a in a {
            *a = (f64::from(*a) / divisor) as f32;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn delta_is_local_minus_global() {
        let mut out = [0.0; 3];
        delta_into(&mut out, &[1.0, 2.0, 3.0], &[0.5, 2.5, -1.0]);
        assert_eq!(out, [0.5, -0.5, 4.0]);
    }

    #[test]
    fn accumulate_and_mean_give_weighted_average() {
        let mut acc = vec![0.0; 2];
        weighted_accumulate(&mut acc, &[1.0, 2.0], 3.0);
        weighted_accumulate(&mut acc, &[5.0, -2.0], 1.0);
        divide(&mut acc, 4.0);
        assert_eq!(acc, [2.0, 1.0]);
    }

    #[test]
    fn norm_of_three_four_is_five() {
        assert_eq!(l2_norm(&[3.0, 4.0]), 5.0);
    }

    #[test]
    fn finds_first_non_finite_across_chunks() {
        let mut x = vec![0.0f32; 3 * CHUNK];
        x[2 * CHUNK + 7] = f32::INFINITY;
        x[CHUNK + 1] = f32::NAN;
        assert_eq!(first_non_finite(&x), Some(CHUNK + 1));
        assert_eq!(first_non_finite(&[1.0, 2.0]), None);
    }

    #[test]
    fn scale_and_add_scaled() {
        let mut x = vec![1.0f32, -2.0];
        scale(&mut x, 2.0);
        assert_eq!(x, [2.0, -4.0]);
        add_scaled(&mut x, &[1.0, 1.0], -0.5);
        assert_eq!(x, [1.5, -4.5]);
    }

    proptest! {
        #[test]
        fn norm_is_scale_equivariant(v in prop::collection::vec(-100.0f32..100.0, 1..300), s in -4.0f32..4.0) {
            let mut scaled = v.clone();
            scale(&mut scaled, s);
            let expected = l2_norm(&v) * f64::from(s.abs());
            prop_assert!((l2_norm(&scaled) - expected).abs() <= 1e-5 * expected.max(1.0));
        }

        #[test]
        fn global_plus_delta_is_local(pairs in prop::collection::vec((-1e3f32..1e3, -1e3f32..1e3), 0..500)) {
            let (local, global): (Vec<f32>, Vec<f32>) = pairs.into_iter().unzip();
            let mut d = vec![0.0; local.len()];
            delta_into(&mut d, &local, &global);
            let mut back = global.clone();
            add_scaled(&mut back, &d, 1.0);
            for (b, l) in back.iter().zip(&local) {
                prop_assert!((b - l).abs() <= 1e-3);
            }
        }

        #[test]
        fn norm_triangle_inequality(pairs in prop::collection::vec((-10.0f32..10.0, -10.0f32..10.0), 1..200)) {
            let (a, b): (Vec<f32>, Vec<f32>) = pairs.into_iter().unzip();
            let mut sum = a.clone();
            add_scaled(&mut sum, &b, 1.0);
            prop_assert!(l2_norm(&sum) <= l2_norm(&a) + l2_norm(&b) + 1e-4);
        }
    }
}
