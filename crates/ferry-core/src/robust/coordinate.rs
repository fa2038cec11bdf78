//! Coordinate-wise rules: the median and the beta-trimmed mean of each coordinate across the
//! buffered updates, by selection (`select_nth_unstable`, linear time) rather than a full sort,
//! in parallel over chunks of coordinates.

use rayon::prelude::*;

/// Coordinates per parallel work item.
const CHUNK: usize = 1 << 12;

/// Writes `stat(values of coordinate j across updates)` into `out[j]`, with a scratch buffer of
/// one value per update for each worker.
fn per_coordinate(out: &mut [f32], updates: &[&[f32]], stat: impl Fn(&mut [f32]) -> f32 + Sync) {
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(chunk, out)| {
            let mut scratch = vec![0.0f32; updates.len()];
            for (offset, o) in out.iter_mut().enumerate() {
                let j = chunk * CHUNK + offset;
                for (s, u) in scratch.iter_mut().zip(updates) {
                    *s = u[j];
                }
                *o = stat(&mut scratch);
            }
        });
}

/// The median of `values` (the mean of the two middle values for an even count); reorders them.
fn median(values: &mut [f32]) -> f32 {
    let n = values.len();
    let mid = n / 2;
    let (lower, upper, _) = values.select_nth_unstable_by(mid, f32::total_cmp);
    let upper = *upper;
    if n % 2 == 1 {
        upper
    } else {
        let lower = lower.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        0.5 * (lower + upper)
    }
}

/// The mean of `values` without their `trim` smallest and `trim` largest; reorders them.
fn trimmed_mean(values: &mut [f32], trim: usize) -> f32 {
    let n = values.len();
    let kept = if trim == 0 {
        &mut values[..]
    } else {
        values.select_nth_unstable_by(trim, f32::total_cmp);
        let rest = &mut values[trim..];
        rest.select_nth_unstable_by(n - 2 * trim - 1, f32::total_cmp);
        &mut rest[..n - 2 * trim]
    };
    let sum: f64 = kept.iter().map(|v| f64::from(*v)).sum();
    (sum / kept.len() as f64) as f32
}

/// Coordinate-wise median of `updates` into `out`.
pub fn coordinate_median(out: &mut [f32], updates: &[&[f32]]) {
    per_coordinate(out, updates, median);
}

/// Coordinate-wise mean of `updates` without the `trim` smallest and `trim` largest values of
/// each coordinate (`2 * trim < updates.len()`).
pub fn coordinate_trimmed_mean(out: &mut [f32], updates: &[&[f32]], trim: usize) {
    per_coordinate(out, updates, |v| trimmed_mean(v, trim));
}

/// For each coordinate, the mean of the `keep` values closest to their median (Bulyan's last
/// step).
pub fn coordinate_mean_around_median(out: &mut [f32], updates: &[&[f32]], keep: usize) {
    per_coordinate(out, updates, |values| {
        let centre = median(values);
        let (closest, nth, _) = values.select_nth_unstable_by(keep - 1, |a, b| {
            (a - centre).abs().total_cmp(&(b - centre).abs())
        });
        let sum: f64 = closest.iter().map(|v| f64::from(*v)).sum::<f64>() + f64::from(*nth);
        (sum / keep as f64) as f32
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rows(rows: &[Vec<f32>]) -> Vec<&[f32]> {
        rows.iter().map(Vec::as_slice).collect()
    }

    #[test]
    fn median_and_trimmed_mean_match_hand_values() {
        let data = vec![
            vec![1.0, 10.0],
            vec![2.0, -5.0],
            vec![100.0, 0.0],
            vec![3.0, 1.0],
        ];
        let mut out = vec![0.0; 2];
        coordinate_median(&mut out, &rows(&data));
        assert_eq!(out, [2.5, 0.5]);
        coordinate_trimmed_mean(&mut out, &rows(&data), 1);
        assert_eq!(out, [2.5, 0.5]);
        coordinate_median(&mut out, &rows(&data[..3]));
        assert_eq!(out, [2.0, 0.0]);
        coordinate_trimmed_mean(&mut out, &rows(&data), 0);
        assert_eq!(out, [26.5, 1.5]);
    }

    #[test]
    fn mean_around_median_keeps_the_closest_values() {
        // Median of [0, 1, 2, 50, -40] is 1; the 3 closest are 0, 1, 2.
        let data = vec![vec![0.0], vec![1.0], vec![2.0], vec![50.0], vec![-40.0]];
        let mut out = vec![0.0];
        coordinate_mean_around_median(&mut out, &rows(&data), 3);
        assert_eq!(out, [1.0]);
    }

    fn sorted_column(data: &[Vec<f32>], j: usize) -> Vec<f32> {
        let mut column: Vec<f32> = data.iter().map(|r| r[j]).collect();
        column.sort_by(f32::total_cmp);
        column
    }

    proptest! {
        #[test]
        fn selection_agrees_with_sorting(
            data in prop::collection::vec(prop::collection::vec(-100f32..100.0, 5), 1..12),
            trim_share in 0.0f64..0.49,
        ) {
            let n = data.len();
            let trim = ((trim_share * n as f64).floor() as usize).min((n - 1) / 2);
            let mut median_out = vec![0.0; 5];
            let mut trimmed_out = vec![0.0; 5];
            coordinate_median(&mut median_out, &rows(&data));
            coordinate_trimmed_mean(&mut trimmed_out, &rows(&data), trim);
            for j in 0..5 {
                let column = sorted_column(&data, j);
                let want_median = if n % 2 == 1 {
                    column[n / 2]
                } else {
                    0.5 * (column[n / 2 - 1] + column[n / 2])
                };
                prop_assert_eq!(median_out[j], want_median);
                let kept = &column[trim..n - trim];
                let want = kept.iter().map(|v| f64::from(*v)).sum::<f64>() / kept.len() as f64;
                prop_assert!((f64::from(trimmed_out[j]) - want).abs() <= 1e-4 * want.abs().max(1.0));
            }
        }

        #[test]
        fn median_ignores_a_minority_of_arbitrary_values(
            honest in prop::collection::vec(-1f32..1.0, 4..9),
            attack in -1e6f32..1e6,
        ) {
            // Each honest row is constant; fewer than half the rows are the attacker's value.
            let n_attackers = (honest.len() - 1) / 2;
            let mut data: Vec<Vec<f32>> = honest.iter().map(|v| vec![*v; 3]).collect();
            data.extend(std::iter::repeat_n(vec![attack; 3], n_attackers));
            let mut out = vec![0.0; 3];
            coordinate_median(&mut out, &rows(&data));
            let lo = honest.iter().copied().fold(f32::INFINITY, f32::min);
            let hi = honest.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            prop_assert!(out.iter().all(|v| *v >= lo && *v <= hi), "{:?} outside [{}, {}]", out, lo, hi);
        }
    }
}
