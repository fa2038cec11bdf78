//! Splitting a training set across nodes, exactly as NIID-Bench (Li et al., ICDE 2022) defines
//! its partitions, so that published non-IID results can be reproduced.

use std::{fmt, str::FromStr};

use rand::{Rng, SeedableRng, seq::SliceRandom};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Gamma};

use super::NUM_CLASSES;
use crate::MlError;

/// The smallest share any node may get under the skewed partitions (NIID-Bench's rule).
pub const MIN_PARTY_SIZE: usize = 10;

/// Redraws allowed before a skewed partition gives up.
const MAX_DRAWS: usize = 10_000;

/// How the training set is split across nodes.
#[derive(Debug, Clone, PartialEq)]
pub enum Partitioner {
    /// A random permutation cut into equal parts.
    Iid,
    /// Label-distribution skew: per class, proportions ~ Dir(beta).
    Dirichlet(f64),
    /// Each node holds `C` classes: `i mod 10` plus `C - 1` random others.
    Labels(usize),
    /// Each node holds the classes listed for it, one list per node (`classes:0+6+4/1+8+7/...`),
    /// each class split equally among the nodes that list it: the `labels:C` rule with the
    /// draw given, to rerun a published split or to mirror which sites hold which classes.
    Classes(Vec<Vec<usize>>),
    /// Quantity skew: node shares ~ Dir(beta).
    Quantity(f64),
    /// Feature skew: IID split, node `i` adds Gaussian noise of std `s * i / (N - 1)`.
    Noise(f64),
}

impl FromStr for Partitioner {
    type Err = MlError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let unknown = || {
            MlError::BadSpec(format!(
                "unknown partition '{s}': expected iid, dirichlet:B, labels:C, classes:A+B/C+D/..., quantity:B or noise:S"
            ))
        };
        let (kind, arg) = match s.split_once(':') {
            Some((k, a)) => (k, Some(a)),
            None => (s, None),
        };
        let positive = |name: &str| -> Result<f64, MlError> {
            let raw = arg.ok_or_else(|| {
                MlError::BadSpec(format!(
                    "partition '{s}' needs a value: {name}:B with B > 0"
                ))
            })?;
            match raw.parse::<f64>() {
                Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
                _ => Err(MlError::BadSpec(format!(
                    "partition '{s}': '{raw}' must be a number > 0"
                ))),
            }
        };
        match kind {
            "iid" if arg.is_none() => Ok(Self::Iid),
            "dirichlet" => positive("dirichlet").map(Self::Dirichlet),
            "quantity" => positive("quantity").map(Self::Quantity),
            "noise" => {
                let raw = arg.ok_or_else(|| {
                    MlError::BadSpec(format!(
                        "partition '{s}' needs a value: noise:S with S >= 0"
                    ))
                })?;
                match raw.parse::<f64>() {
                    Ok(v) if v >= 0.0 && v.is_finite() => Ok(Self::Noise(v)),
                    _ => Err(MlError::BadSpec(format!(
                        "partition '{s}': '{raw}' must be a number >= 0"
                    ))),
                }
            }
            "labels" => {
                let raw = arg.ok_or_else(|| {
                    MlError::BadSpec(format!(
                        "partition '{s}' needs a class count: labels:C with 1 <= C <= 10"
                    ))
                })?;
                match raw.parse::<usize>() {
                    Ok(c) if (1..=NUM_CLASSES).contains(&c) => Ok(Self::Labels(c)),
                    _ => Err(MlError::BadSpec(format!(
                        "partition '{s}': the class count must be a whole number from 1 to {NUM_CLASSES}"
                    ))),
                }
            }
            "classes" => parse_class_lists(s, arg.unwrap_or_default()).map(Self::Classes),
            _ => Err(unknown()),
        }
    }
}

/// Parses `0+6+4/1+8+7/...`: one `+`-separated list of distinct class labels per node.
fn parse_class_lists(spec: &str, lists: &str) -> Result<Vec<Vec<usize>>, MlError> {
    let bad = |why: String| {
        MlError::BadSpec(format!(
            "partition '{spec}': {why}; write one list of classes per node, e.g. classes:0+6+4/1+8+7"
        ))
    };
    if lists.is_empty() {
        return Err(bad("no class lists given".into()));
    }
    lists
        .split('/')
        .enumerate()
        .map(|(node, list)| {
            let mut classes: Vec<usize> = Vec::new();
            for raw in list.split('+') {
                let class = raw
                    .parse::<usize>()
                    .ok()
                    .filter(|&c| c < NUM_CLASSES)
                    .ok_or_else(|| {
                        bad(format!(
                            "node {node}: '{raw}' is not a class from 0 to {}",
                            NUM_CLASSES - 1
                        ))
                    })?;
                if classes.contains(&class) {
                    return Err(bad(format!("node {node} lists class {class} twice")));
                }
                classes.push(class);
            }
            Ok(classes)
        })
        .collect()
}

impl fmt::Display for Partitioner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Iid => write!(f, "iid"),
            Self::Dirichlet(b) => write!(f, "dirichlet:{b}"),
            Self::Labels(c) => write!(f, "labels:{c}"),
            Self::Classes(lists) => {
                let lists: Vec<String> = lists
                    .iter()
                    .map(|l| l.iter().map(usize::to_string).collect::<Vec<_>>().join("+"))
                    .collect();
                write!(f, "classes:{}", lists.join("/"))
            }
            Self::Quantity(b) => write!(f, "quantity:{b}"),
            Self::Noise(s) => write!(f, "noise:{s}"),
        }
    }
}

/// The result of partitioning: each node's example indices, and its feature-noise level.
#[derive(Debug, Clone, PartialEq)]
pub struct Partition {
    /// Indices into the training set, one list per node.
    pub parts: Vec<Vec<usize>>,
    /// Standard deviation of the Gaussian noise node `i` adds to every pixel it reads
    /// (all zero except under `noise:S`).
    pub noise_std: Vec<f32>,
}

impl Partitioner {
    /// Splits examples with these `labels` across `nodes` nodes; the same seed gives the same
    /// split.
    pub fn split(&self, labels: &[u8], nodes: usize, seed: u64) -> Result<Partition, MlError> {
        let n = labels.len();
        if nodes == 0 {
            return Err(MlError::Partition(
                "the number of clients must be at least 1".into(),
            ));
        }
        if n < nodes {
            return Err(MlError::Partition(format!(
                "{n} training examples cannot be split across {nodes} clients"
            )));
        }
        let skewed = matches!(self, Self::Dirichlet(_) | Self::Quantity(_));
        if skewed && n < nodes * MIN_PARTY_SIZE {
            return Err(MlError::Partition(format!(
                "{self} needs at least {MIN_PARTY_SIZE} examples per client, but {n} examples cannot give that to {nodes} clients"
            )));
        }
        if let Self::Classes(lists) = self
            && lists.len() != nodes
        {
            return Err(MlError::Partition(format!(
                "{self} lists classes for {} nodes, but the run has {nodes} clients; give one list per client",
                lists.len()
            )));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let parts = match self {
            Self::Iid | Self::Noise(_) => iid(n, nodes, &mut rng),
            Self::Dirichlet(beta) => dirichlet(labels, nodes, *beta, &mut rng)?,
            Self::Labels(c) => {
                let lists = draw_class_lists(nodes, *c, &mut rng);
                split_among_owners(labels, &lists, &mut rng)
            }
            Self::Classes(lists) => split_among_owners(labels, lists, &mut rng),
            Self::Quantity(beta) => quantity(n, nodes, *beta, &mut rng)?,
        };
        let noise_std = (0..nodes)
            .map(|i| match *self {
                Self::Noise(s) if nodes > 1 => (s * i as f64 / (nodes - 1) as f64) as f32,
                _ => 0.0,
            })
            .collect();
        Ok(Partition { parts, noise_std })
    }
}

/// Cuts `items` into `nodes` consecutive runs of near-equal size (the first `len % nodes` runs
/// one longer), like `numpy.array_split`.
fn array_split(items: &[usize], nodes: usize) -> Vec<Vec<usize>> {
    let base = items.len() / nodes;
    let extra = items.len() % nodes;
    let mut out = Vec::with_capacity(nodes);
    let mut start = 0;
    for i in 0..nodes {
        let len = base + usize::from(i < extra);
        out.push(items[start..start + len].to_vec());
        start += len;
    }
    out
}

/// Cuts `items` at `floor(cumsum(p) * len)`, like NIID-Bench's `np.split` on proportions.
fn split_by_proportions(items: &[usize], proportions: &[f64]) -> Vec<Vec<usize>> {
    let mut out = Vec::with_capacity(proportions.len());
    let mut cumulative = 0.0;
    let mut start = 0;
    for (j, p) in proportions.iter().enumerate() {
        cumulative += p;
        let end = if j + 1 == proportions.len() {
            items.len()
        } else {
            ((cumulative * items.len() as f64) as usize).clamp(start, items.len())
        };
        out.push(items[start..end].to_vec());
        start = end;
    }
    out
}

/// A draw from the symmetric Dirichlet(beta) over `k` outcomes, through normalised Gammas.
fn dirichlet_draw(k: usize, beta: f64, rng: &mut ChaCha8Rng) -> Vec<f64> {
    let gamma = Gamma::new(beta, 1.0).expect("beta was checked to be positive and finite");
    let draws: Vec<f64> = (0..k).map(|_| gamma.sample(rng)).collect();
    let total: f64 = draws.iter().sum();
    if total > 0.0 {
        draws.iter().map(|d| d / total).collect()
    } else {
        // Every Gamma draw underflowed (tiny beta): all mass on one random outcome.
        let winner = rng.random_range(0..k);
        (0..k)
            .map(|i| if i == winner { 1.0 } else { 0.0 })
            .collect()
    }
}

fn iid(n: usize, nodes: usize, rng: &mut ChaCha8Rng) -> Vec<Vec<usize>> {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(rng);
    array_split(&idx, nodes)
}

fn by_class(labels: &[u8]) -> Vec<Vec<usize>> {
    let mut classes = vec![Vec::new(); NUM_CLASSES];
    for (i, &l) in labels.iter().enumerate() {
        classes[usize::from(l)].push(i);
    }
    classes
}

fn dirichlet(
    labels: &[u8],
    nodes: usize,
    beta: f64,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<Vec<usize>>, MlError> {
    let n = labels.len();
    let cap = n as f64 / nodes as f64;
    let classes = by_class(labels);
    for _ in 0..MAX_DRAWS {
        let mut parts: Vec<Vec<usize>> = vec![Vec::new(); nodes];
        for class in &classes {
            let mut idx = class.clone();
            idx.shuffle(rng);
            let mut p = dirichlet_draw(nodes, beta, rng);
            for (pj, part) in p.iter_mut().zip(&parts) {
                if part.len() as f64 >= cap {
                    *pj = 0.0;
                }
            }
            let total: f64 = p.iter().sum();
            if total <= 0.0 {
                continue;
            }
            p.iter_mut().for_each(|v| *v /= total);
            for (part, share) in parts.iter_mut().zip(split_by_proportions(&idx, &p)) {
                part.extend(share);
            }
        }
        let covered: usize = parts.iter().map(Vec::len).sum();
        if covered == n && parts.iter().all(|p| p.len() >= MIN_PARTY_SIZE) {
            return Ok(parts);
        }
    }
    Err(MlError::Partition(format!(
        "dirichlet:{beta} could not give all {nodes} clients at least {MIN_PARTY_SIZE} examples in {MAX_DRAWS} draws; use a larger B or fewer clients"
    )))
}

/// NIID-Bench's `#C=k` draw: node `i` holds class `i mod 10` plus `per_node - 1` other random
/// classes.
fn draw_class_lists(nodes: usize, per_node: usize, rng: &mut ChaCha8Rng) -> Vec<Vec<usize>> {
    (0..nodes)
        .map(|node| {
            let mut held = vec![node % NUM_CLASSES];
            while held.len() < per_node {
                let c = rng.random_range(0..NUM_CLASSES);
                if !held.contains(&c) {
                    held.push(c);
                }
            }
            held
        })
        .collect()
}

/// Gives each node the classes in its list, each class shuffled and split equally among the
/// nodes that list it; a class nobody lists is left out.
fn split_among_owners(
    labels: &[u8],
    lists: &[Vec<usize>],
    rng: &mut ChaCha8Rng,
) -> Vec<Vec<usize>> {
    let mut owners: Vec<Vec<usize>> = vec![Vec::new(); NUM_CLASSES];
    for (node, held) in lists.iter().enumerate() {
        for &c in held {
            owners[c].push(node);
        }
    }
    let mut parts = vec![Vec::new(); lists.len()];
    for (class, mut idx) in by_class(labels).into_iter().enumerate() {
        idx.shuffle(rng);
        if owners[class].is_empty() {
            continue;
        }
        for (&node, share) in owners[class]
            .iter()
            .zip(array_split(&idx, owners[class].len()))
        {
            parts[node].extend(share);
        }
    }
    parts
}

fn quantity(
    n: usize,
    nodes: usize,
    beta: f64,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<Vec<usize>>, MlError> {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(rng);
    for _ in 0..MAX_DRAWS {
        let p = dirichlet_draw(nodes, beta, rng);
        let smallest = p.iter().fold(f64::INFINITY, |a, &b| a.min(b));
        if smallest * n as f64 >= MIN_PARTY_SIZE as f64 {
            return Ok(split_by_proportions(&idx, &p));
        }
    }
    Err(MlError::Partition(format!(
        "quantity:{beta} could not give all {nodes} clients at least {MIN_PARTY_SIZE} examples in {MAX_DRAWS} draws; use a larger B or fewer clients"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// 600 examples of each class, interleaved.
    fn labels() -> Vec<u8> {
        (0..6000).map(|i| (i % 10) as u8).collect()
    }

    fn assert_disjoint_cover(parts: &[Vec<usize>], n: usize) {
        let mut seen = vec![false; n];
        for &i in parts.iter().flatten() {
            assert!(!seen[i], "index {i} given to two nodes");
            seen[i] = true;
        }
        assert!(
            seen.iter().all(|&s| s),
            "some examples were given to nobody"
        );
    }

    fn classes_of(part: &[usize], labels: &[u8]) -> BTreeSet<u8> {
        part.iter().map(|&i| labels[i]).collect()
    }

    fn max_class_share(part: &[usize], labels: &[u8]) -> f64 {
        let mut counts = [0usize; NUM_CLASSES];
        for &i in part {
            counts[usize::from(labels[i])] += 1;
        }
        *counts.iter().max().unwrap_or(&0) as f64 / part.len() as f64
    }

    #[test]
    fn parses_every_spec_and_refuses_bad_ones() {
        assert_eq!("iid".parse::<Partitioner>().ok(), Some(Partitioner::Iid));
        assert_eq!(
            "dirichlet:0.5".parse::<Partitioner>().ok(),
            Some(Partitioner::Dirichlet(0.5))
        );
        assert_eq!(
            "labels:2".parse::<Partitioner>().ok(),
            Some(Partitioner::Labels(2))
        );
        assert_eq!(
            "quantity:1".parse::<Partitioner>().ok(),
            Some(Partitioner::Quantity(1.0))
        );
        assert_eq!(
            "noise:0.1".parse::<Partitioner>().ok(),
            Some(Partitioner::Noise(0.1))
        );
        for bad in [
            "shards",
            "dirichlet",
            "dirichlet:-1",
            "dirichlet:x",
            "labels:0",
            "labels:11",
            "labels:2.5",
            "noise:-0.1",
            "iid:3",
            "classes",
            "classes:0+0/1",
            "classes:0+10",
            "classes:0/x",
            "classes:0//1",
        ] {
            let err = bad.parse::<Partitioner>().expect_err(bad);
            assert!(err.to_string().contains(bad), "{bad}: {err}");
        }
        assert_eq!(Partitioner::Dirichlet(0.5).to_string(), "dirichlet:0.5");
        let spec = "classes:0+6+4/1/9+2";
        let parsed: Partitioner = spec.parse().expect("classes");
        assert_eq!(
            parsed,
            Partitioner::Classes(vec![vec![0, 6, 4], vec![1], vec![9, 2]])
        );
        assert_eq!(parsed.to_string(), spec);
    }

    #[test]
    fn classes_gives_each_node_exactly_its_listed_classes_in_equal_shares() {
        let labels = labels();
        let lists = vec![vec![0, 6, 4], vec![1, 6], vec![2, 4], vec![3, 4, 5]];
        let p = Partitioner::Classes(lists.clone())
            .split(&labels, 4, 9)
            .expect("split");
        for (part, list) in p.parts.iter().zip(&lists) {
            let held: BTreeSet<u8> = list.iter().map(|&c| c as u8).collect();
            assert_eq!(classes_of(part, &labels), held);
        }
        let count = |node: usize, class: u8| {
            p.parts[node]
                .iter()
                .filter(|&&i| labels[i] == class)
                .count()
        };
        // Class 4 has three owners, class 6 two, class 0 one; classes 7-9 nobody.
        assert_eq!([count(0, 4), count(2, 4), count(3, 4)], [200, 200, 200]);
        assert_eq!([count(0, 6), count(1, 6)], [300, 300]);
        assert_eq!(count(0, 0), 600);
        assert_eq!(p.parts.iter().map(Vec::len).sum::<usize>(), 4200);
        let err = Partitioner::Classes(lists)
            .split(&labels, 5, 0)
            .expect_err("four lists for five clients");
        assert!(err.to_string().contains("one list per client"), "{err}");
    }

    #[test]
    fn iid_gives_equal_sizes_and_balanced_labels() {
        let labels = labels();
        let p = Partitioner::Iid.split(&labels, 7, 3).expect("split");
        assert_disjoint_cover(&p.parts, labels.len());
        let sizes: Vec<_> = p.parts.iter().map(Vec::len).collect();
        assert!(
            sizes.iter().max().unwrap_or(&0) - sizes.iter().min().unwrap_or(&0) <= 1,
            "{sizes:?}"
        );
        for part in &p.parts {
            // ~857 examples, ~86 per class: 5 standard deviations is ~45.
            assert!(
                max_class_share(part, &labels) < 0.16,
                "label share too skewed for IID"
            );
        }
        assert!(p.noise_std.iter().all(|&s| s == 0.0));
    }

    #[test]
    fn same_seed_same_split_other_seed_other_split() {
        let labels = labels();
        for spec in [
            "iid",
            "dirichlet:0.5",
            "labels:2",
            "quantity:0.5",
            "noise:0.1",
        ] {
            let part: Partitioner = spec.parse().expect("valid");
            let a = part.split(&labels, 10, 42).expect("split");
            assert_eq!(a, part.split(&labels, 10, 42).expect("split"), "{spec}");
            assert_ne!(
                a.parts,
                part.split(&labels, 10, 43).expect("split").parts,
                "{spec}"
            );
        }
    }

    #[test]
    fn dirichlet_respects_minimum_size_and_skews_more_for_small_beta() {
        let labels = labels();
        let skew = |beta: f64| {
            let p = Partitioner::Dirichlet(beta)
                .split(&labels, 10, 1)
                .expect("split");
            assert_disjoint_cover(&p.parts, labels.len());
            assert!(p.parts.iter().all(|part| part.len() >= MIN_PARTY_SIZE));
            p.parts
                .iter()
                .map(|part| max_class_share(part, &labels))
                .sum::<f64>()
                / 10.0
        };
        let (low, high) = (skew(0.1), skew(100.0));
        assert!(
            low > 0.5,
            "dirichlet:0.1 should concentrate labels, mean max share {low}"
        );
        assert!(
            high < 0.2,
            "dirichlet:100 should be near IID, mean max share {high}"
        );
    }

    #[test]
    fn labels_c_gives_each_node_exactly_c_classes_including_its_own() {
        let labels = labels();
        for c in [1, 2, 3, 10] {
            let p = Partitioner::Labels(c).split(&labels, 10, 5).expect("split");
            for (i, part) in p.parts.iter().enumerate() {
                let classes = classes_of(part, &labels);
                assert_eq!(classes.len(), c, "node {i} under labels:{c}");
                assert!(classes.contains(&((i % 10) as u8)));
            }
            // Each class is shared equally among the nodes holding it.
            for class in 0..10u8 {
                let shares: Vec<usize> = p
                    .parts
                    .iter()
                    .map(|part| part.iter().filter(|&&i| labels[i] == class).count())
                    .filter(|&s| s > 0)
                    .collect();
                let (lo, hi) = (shares.iter().min(), shares.iter().max());
                assert!(
                    hi.zip(lo).is_none_or(|(h, l)| h - l <= 1),
                    "class {class}: {shares:?}"
                );
            }
        }
    }

    #[test]
    fn labels_one_with_ten_nodes_is_one_class_per_node() {
        let labels = labels();
        let p = Partitioner::Labels(1).split(&labels, 10, 0).expect("split");
        assert_disjoint_cover(&p.parts, labels.len());
        assert!(p.parts.iter().all(|part| part.len() == 600));
    }

    #[test]
    fn quantity_skews_sizes_but_not_labels() {
        let labels = labels();
        let p = Partitioner::Quantity(0.5)
            .split(&labels, 10, 2)
            .expect("split");
        assert_disjoint_cover(&p.parts, labels.len());
        let sizes: Vec<_> = p.parts.iter().map(Vec::len).collect();
        assert!(sizes.iter().all(|&s| s >= MIN_PARTY_SIZE));
        assert!(
            sizes.iter().max() > Some(&(2 * sizes.iter().min().copied().unwrap_or(0))),
            "{sizes:?}"
        );
        let largest = p.parts.iter().max_by_key(|p| p.len()).expect("ten parts");
        assert!(max_class_share(largest, &labels) < 0.2);
    }

    #[test]
    fn noise_grows_linearly_with_node_index() {
        let p = Partitioner::Noise(0.4)
            .split(&labels(), 5, 0)
            .expect("split");
        assert_eq!(p.noise_std, [0.0, 0.1, 0.2, 0.3, 0.4]);
        let sizes: Vec<_> = p.parts.iter().map(Vec::len).collect();
        assert_eq!(sizes, [1200; 5]);
    }

    #[test]
    fn impossible_splits_are_errors() {
        let few: Vec<u8> = (0..50).map(|i| (i % 10) as u8).collect();
        assert!(Partitioner::Dirichlet(0.5).split(&few, 10, 0).is_err());
        assert!(Partitioner::Iid.split(&few, 51, 0).is_err());
        assert!(Partitioner::Iid.split(&few, 0, 0).is_err());
    }
}
