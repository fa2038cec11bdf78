//! Distance-based rules: Krum and Multi-Krum (Blanchard et al., 2017) and Bulyan's selection
//! (El Mhamdi et al., 2018). The pairwise squared distances are computed once per round,
//! blockwise over coordinates (each block of every update is read once while it is in cache),
//! giving n^2 scalars, never n^2 vectors.

use rayon::prelude::*;

/// Coordinates per block of the distance computation.
const BLOCK: usize = 1 << 12;

/// Squared L2 distances between every pair of `updates`, as a symmetric `n x n` matrix
/// (row-major).
pub fn pairwise_sq_distances(updates: &[&[f32]]) -> Vec<f64> {
    let n = updates.len();
    let dim = updates.first().map_or(0, |u| u.len());
    let blocks = dim.div_ceil(BLOCK);
    let partial = |block: usize| {
        let range = block * BLOCK..((block + 1) * BLOCK).min(dim);
        let mut d = vec![0.0f64; n * n];
        for i in 0..n {
            let a = &updates[i][range.clone()];
            for j in i + 1..n {
                let b = &updates[j][range.clone()];
                let s: f64 = a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| {
                        let diff = f64::from(*x) - f64::from(*y);
                        diff * diff
                    })
                    .sum();
                d[i * n + j] = s;
            }
        }
        d
    };
    // Blocks are summed in a fixed order, so the result does not depend on the thread count.
    let partials: Vec<Vec<f64>> = (0..blocks).into_par_iter().map(partial).collect();
    let mut d = vec![0.0f64; n * n];
    for p in &partials {
        for (total, v) in d.iter_mut().zip(p) {
            *total += v;
        }
    }
    for i in 0..n {
        for j in i + 1..n {
            d[j * n + i] = d[i * n + j];
        }
    }
    d
}

/// Krum scores of the `candidates` (indices into the `n x n` matrix `d`): each one's sum of
/// squared distances to its `candidates.len() - f - 2` nearest other candidates (at least one).
pub fn krum_scores(d: &[f64], n: usize, candidates: &[usize], f: usize) -> Vec<f64> {
    let neighbours = candidates.len().saturating_sub(f + 2).max(1);
    candidates
        .iter()
        .map(|&i| {
            let mut to_others: Vec<f64> = candidates
                .iter()
                .filter(|&&j| j != i)
                .map(|&j| d[i * n + j])
                .collect();
            let k = neighbours.min(to_others.len());
            if k == 0 {
                return 0.0;
            }
            to_others.select_nth_unstable_by(k - 1, f64::total_cmp);
            to_others[..k].iter().sum()
        })
        .collect()
}

/// The `keep` candidates with the lowest Krum scores, best first (ties to the lower index).
pub fn krum_select(d: &[f64], n: usize, f: usize, keep: usize) -> Vec<usize> {
    let candidates: Vec<usize> = (0..n).collect();
    let scores = krum_scores(d, n, &candidates, f);
    let mut order = candidates;
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
    order.truncate(keep);
    order
}

/// Bulyan's selection: `n - 2f` successive Krum picks, each among the updates not yet picked.
pub fn bulyan_select(d: &[f64], n: usize, f: usize) -> Vec<usize> {
    let mut remaining: Vec<usize> = (0..n).collect();
    let mut picked = Vec::with_capacity(n - 2 * f);
    while picked.len() < n - 2 * f {
        let scores = krum_scores(d, n, &remaining, f);
        let best = (0..remaining.len())
            .min_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)))
            .unwrap_or(0);
        picked.push(remaining.remove(best));
    }
    picked
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn distances_match_hand_values() {
        let a = vec![0.0f32, 0.0];
        let b = vec![3.0f32, 4.0];
        let c = vec![1.0f32, 0.0];
        let d = pairwise_sq_distances(&[&a, &b, &c]);
        assert_eq!(d, [0.0, 25.0, 1.0, 25.0, 0.0, 20.0, 1.0, 20.0, 0.0]);
    }

    #[test]
    fn krum_picks_the_update_in_the_tight_cluster() {
        // Four honest updates near 0, one far away; f = 1 -> 2 neighbours each.
        let rows: Vec<Vec<f32>> = vec![
            vec![0.0, 0.1],
            vec![0.1, 0.0],
            vec![0.0, 0.0],
            vec![-0.1, 0.0],
            vec![100.0, 100.0],
        ];
        let refs: Vec<&[f32]> = rows.iter().map(Vec::as_slice).collect();
        let d = pairwise_sq_distances(&refs);
        // Scores: row 2 (origin) is 0.01 + 0.01 = 0.02 from its two nearest; the others more.
        assert_eq!(krum_select(&d, 5, 1, 1), [2]);
        let multi = krum_select(&d, 5, 1, 4);
        assert!(!multi.contains(&4), "{multi:?}");
        let bulyan = bulyan_select(&d, 5, 1);
        assert_eq!(bulyan.len(), 3);
        assert!(!bulyan.contains(&4), "{bulyan:?}");
    }

    proptest! {
        #[test]
        fn blockwise_distances_equal_direct_ones(
            rows in prop::collection::vec(prop::collection::vec(-10f32..10.0, 5000), 2..5),
        ) {
            let refs: Vec<&[f32]> = rows.iter().map(Vec::as_slice).collect();
            let d = pairwise_sq_distances(&refs);
            let n = rows.len();
            for i in 0..n {
                for j in 0..n {
                    let direct: f64 = rows[i].iter().zip(&rows[j])
                        .map(|(a, b)| (f64::from(*a) - f64::from(*b)).powi(2)).sum();
                    prop_assert!((d[i * n + j] - direct).abs() <= 1e-9 * direct.max(1.0));
                }
            }
        }
    }
}
