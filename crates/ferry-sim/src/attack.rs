//! Simulated attacks by a share of the nodes, so that what each aggregation rule buys can be
//! measured: model poisoning (the attackers rewrite their updates after training) and data
//! poisoning (they train on corrupted data). Definitions follow ../shared/REFERENCES.md.

use std::{collections::BTreeSet, fmt, str::FromStr};

use ferry_core::{Update, seed::mix_seed};
use ferry_engine::node::{Adversary, NodeId};
use ferry_ml::data::{Dataset, NUM_CLASSES, PIXELS};
use rand::{SeedableRng, seq::index};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use serde::Serialize;

use crate::SimError;

/// The attacks a simulation can stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttackKind {
    /// Send `-k * update`.
    SignFlip,
    /// Send pure noise `N(0, s^2)` per value.
    Gaussian,
    /// Send `k * update` (boosting / model replacement).
    Scale,
    /// Train with every label `y` replaced by `9 - y`.
    LabelFlip,
    /// "A little is enough" (Baruch et al., 2019): send `mu_j - z * sigma_j` per coordinate,
    /// from the mean and spread of the honest updates.
    Alie,
    /// Pixel-pattern backdoor: train on a share of examples stamped with a trigger and
    /// relabelled to the target class.
    Backdoor,
}

impl AttackKind {
    /// Every attack, in the order tables list them.
    pub const ALL: [AttackKind; 6] = [
        Self::SignFlip,
        Self::Gaussian,
        Self::Scale,
        Self::LabelFlip,
        Self::Alie,
        Self::Backdoor,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::SignFlip => "sign-flip",
            Self::Gaussian => "gaussian",
            Self::Scale => "scale",
            Self::LabelFlip => "label-flip",
            Self::Alie => "alie",
            Self::Backdoor => "backdoor",
        }
    }

    /// Whether the attack corrupts the training data rather than the update.
    pub fn poisons_data(self) -> bool {
        matches!(self, Self::LabelFlip | Self::Backdoor)
    }
}

impl FromStr for AttackKind {
    type Err = SimError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.to_ascii_lowercase();
        Self::ALL
            .into_iter()
            .find(|a| a.as_str() == lower)
            .ok_or_else(|| {
                SimError::Attack(format!(
                    "unknown attack '{s}': expected sign-flip, gaussian, scale, label-flip, \
                     alie or backdoor"
                ))
            })
    }
}

impl fmt::Display for AttackKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How many nodes attack.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Attackers {
    /// A share of the nodes, rounded to the nearest count.
    Fraction(f64),
    /// An exact number of nodes.
    Count(usize),
}

impl FromStr for Attackers {
    type Err = SimError;

    /// `0.2` is a fraction, `4` a count.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            SimError::Attack(format!(
                "--attackers takes a fraction in [0, 1) (0.2) or a whole count (4), got '{s}'"
            ))
        };
        if let Ok(count) = s.parse::<usize>() {
            return Ok(Self::Count(count));
        }
        let fraction: f64 = s.parse().map_err(|_| bad())?;
        if (0.0..1.0).contains(&fraction) {
            Ok(Self::Fraction(fraction))
        } else {
            Err(bad())
        }
    }
}

impl Attackers {
    /// The number of attacking nodes among `nodes`.
    pub fn count(self, nodes: usize) -> Result<usize, SimError> {
        let n = match self {
            Self::Fraction(f) => (f * nodes as f64).round() as usize,
            Self::Count(c) => c,
        };
        if n > nodes {
            return Err(SimError::Attack(format!(
                "{n} attackers among {nodes} nodes is not possible"
            )));
        }
        Ok(n)
    }
}

/// An attack and its parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct AttackSettings {
    /// What the attackers do.
    pub kind: AttackKind,
    /// How many attack.
    pub attackers: Attackers,
    /// Sign flip's `k` and scaling's factor.
    pub scale: f64,
    /// Gaussian attack's standard deviation.
    pub std: f64,
    /// ALIE's `z`; `None` derives it from the cohort and attacker counts as Baruch et al. do.
    pub z: Option<f64>,
    /// Backdoor and its success rate: the label triggered images should get.
    pub target: u8,
    /// Backdoor: share of each attacker's examples it stamps and relabels.
    pub poison_fraction: f64,
}

/// The nodes that attack, drawn from the run seed: `count` of `nodes`, sorted.
pub fn pick_attackers(nodes: usize, count: usize, seed: u64) -> Vec<NodeId> {
    let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(seed, 0xA77A_C4E5));
    let mut picked: Vec<NodeId> = index::sample(&mut rng, nodes, count.min(nodes))
        .into_iter()
        .map(|i| i as NodeId)
        .collect();
    picked.sort_unstable();
    picked
}

/// Stamps the backdoor trigger: a 4 x 4 white square in the bottom-right corner.
pub fn stamp_trigger(image: &mut [f32]) {
    for row in 23..27 {
        for col in 23..27 {
            image[row * 28 + col] = 1.0;
        }
    }
}

/// The attacker's copy of its data: labels flipped (`y -> 9 - y`), or a `fraction` of the
/// examples stamped with the trigger and relabelled `target`.
pub fn poison_data(
    data: &Dataset,
    indices: &[usize],
    settings: &AttackSettings,
    seed: u64,
) -> Dataset {
    let mut own = data.select(indices);
    match settings.kind {
        AttackKind::LabelFlip => {
            for label in &mut own.labels {
                *label = (NUM_CLASSES as u8 - 1) - *label;
            }
        }
        AttackKind::Backdoor => {
            let count = (settings.poison_fraction * own.len() as f64).round() as usize;
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            for i in index::sample(&mut rng, own.len(), count.min(own.len())) {
                stamp_trigger(&mut own.images[i * PIXELS..(i + 1) * PIXELS]);
                own.labels[i] = settings.target;
            }
        }
        _ => {}
    }
    own
}

/// The test images that are not of the target class, stamped with the trigger and labelled
/// with the target: a model's accuracy on them is the backdoor's success rate.
pub fn triggered_test_set(test: &Dataset, target: u8) -> Dataset {
    let keep: Vec<usize> = (0..test.len())
        .filter(|&i| test.labels[i] != target)
        .collect();
    let mut triggered = test.select(&keep);
    for i in 0..triggered.len() {
        stamp_trigger(&mut triggered.images[i * PIXELS..(i + 1) * PIXELS]);
        triggered.labels[i] = target;
    }
    triggered
}

/// The standard normal quantile, by bisection on `Phi(x) = erfc(-x / sqrt 2) / 2`.
fn normal_quantile(p: f64) -> f64 {
    let (mut lo, mut hi) = (-10.0f64, 10.0f64);
    for _ in 0..100 {
        let mid = 0.5 * (lo + hi);
        if 0.5 * libm::erfc(-mid / std::f64::consts::SQRT_2) < p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// ALIE's `z` for `n` updates of which `f` are the attackers' (Baruch et al., 2019): with
/// `s = floor(n/2 + 1) - f` honest supporters needed, `z = Phi^-1((n - s) / n)`.
pub fn alie_z(n: usize, f: usize) -> f64 {
    let s = (n / 2 + 1).saturating_sub(f) as f64;
    normal_quantile(((n as f64 - s) / n as f64).clamp(1e-6, 1.0 - 1e-6))
}

/// Model poisoning: rewrites the attackers' updates after training.
pub struct ModelPoisoner {
    settings: AttackSettings,
    attackers: BTreeSet<NodeId>,
    seed: u64,
}

impl ModelPoisoner {
    /// An adversary controlling `attackers`.
    pub fn new(settings: AttackSettings, attackers: &[NodeId], seed: u64) -> Self {
        Self {
            settings,
            attackers: attackers.iter().copied().collect(),
            seed,
        }
    }
}

impl Adversary for ModelPoisoner {
    fn tamper(&self, round: u32, updates: &mut [(NodeId, Update)]) {
        let is_attacker = |id: &NodeId| self.attackers.contains(id);
        let s = &self.settings;
        match s.kind {
            AttackKind::SignFlip | AttackKind::Scale => {
                let factor = if s.kind == AttackKind::SignFlip {
                    -s.scale
                } else {
                    s.scale
                };
                for (_, u) in updates.iter_mut().filter(|(id, _)| is_attacker(id)) {
                    ferry_core::algebra::scale(&mut u.delta, factor as f32);
                }
            }
            AttackKind::Gaussian => {
                // The options refuse a negative or non-finite deviation before a run starts.
                let Ok(normal) = Normal::new(0.0f32, s.std as f32) else {
                    return;
                };
                for (id, u) in updates.iter_mut().filter(|(id, _)| is_attacker(id)) {
                    let stream = mix_seed(u64::from(round), u64::from(*id));
                    let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(self.seed, stream));
                    for v in &mut u.delta {
                        *v = normal.sample(&mut rng);
                    }
                }
            }
            AttackKind::Alie => {
                let honest: Vec<&[f32]> = updates
                    .iter()
                    .filter(|(id, _)| !is_attacker(id))
                    .map(|(_, u)| u.delta.as_slice())
                    .collect();
                let n_attackers = updates.len() - honest.len();
                if honest.is_empty() || n_attackers == 0 {
                    return;
                }
                let z = s.z.unwrap_or_else(|| alie_z(updates.len(), n_attackers));
                let dim = honest[0].len();
                let mut crafted = vec![0.0f32; dim];
                for (j, c) in crafted.iter_mut().enumerate() {
                    let mean =
                        honest.iter().map(|u| f64::from(u[j])).sum::<f64>() / honest.len() as f64;
                    let var = honest
                        .iter()
                        .map(|u| (f64::from(u[j]) - mean).powi(2))
                        .sum::<f64>()
                        / honest.len() as f64;
                    *c = (mean - z * var.sqrt()) as f32;
                }
                for (_, u) in updates.iter_mut().filter(|(id, _)| is_attacker(id)) {
                    u.delta.copy_from_slice(&crafted);
                }
            }
            AttackKind::LabelFlip | AttackKind::Backdoor => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(kind: AttackKind) -> AttackSettings {
        AttackSettings {
            kind,
            attackers: Attackers::Count(1),
            scale: 10.0,
            std: 1.0,
            z: None,
            target: 0,
            poison_fraction: 0.5,
        }
    }

    fn round_of(deltas: &[[f32; 2]]) -> Vec<(NodeId, Update)> {
        deltas
            .iter()
            .enumerate()
            .map(|(i, d)| (i as NodeId, Update::new(d.to_vec(), 10)))
            .collect()
    }

    #[test]
    fn attackers_parse_as_fraction_or_count_and_are_seeded() {
        assert_eq!(
            "0.2".parse::<Attackers>().ok(),
            Some(Attackers::Fraction(0.2))
        );
        assert_eq!("4".parse::<Attackers>().ok(), Some(Attackers::Count(4)));
        assert!("1.5".parse::<Attackers>().is_err());
        assert_eq!(Attackers::Fraction(0.2).count(20).ok(), Some(4));
        let picked = pick_attackers(20, 4, 7);
        assert_eq!(picked.len(), 4);
        assert_eq!(picked, pick_attackers(20, 4, 7));
        assert_ne!(picked, pick_attackers(20, 4, 8));
    }

    #[test]
    fn model_attacks_rewrite_only_the_attackers() {
        let honest = [[1.0, 2.0], [3.0, 2.0], [2.0, 5.0]];
        let mut flipped = round_of(&honest);
        ModelPoisoner::new(settings(AttackKind::SignFlip), &[2], 0).tamper(1, &mut flipped);
        assert_eq!(flipped[2].1.delta, [-20.0, -50.0]);
        assert_eq!(flipped[0].1.delta, [1.0, 2.0]);
        let mut alie = round_of(&honest);
        let mut s = settings(AttackKind::Alie);
        s.z = Some(1.0);
        ModelPoisoner::new(s, &[2], 0).tamper(1, &mut alie);
        // Honest nodes 0 and 1: mean [2, 2], std [1, 0] -> [1, 2].
        assert_eq!(alie[2].1.delta, [1.0, 2.0]);
        let mut noise = round_of(&honest);
        ModelPoisoner::new(settings(AttackKind::Gaussian), &[0], 0).tamper(1, &mut noise);
        assert_ne!(noise[0].1.delta, [1.0, 2.0]);
        assert_eq!(noise[1].1.delta, [3.0, 2.0]);
    }

    #[test]
    fn alie_z_matches_baruch_et_al() {
        // n = 50, f = 12: s = 26 - 12 = 14, z = Phi^-1(36/50) = 0.5828.
        assert!((alie_z(50, 12) - 0.5828).abs() < 1e-3, "{}", alie_z(50, 12));
        assert!((normal_quantile(0.975) - 1.95996).abs() < 1e-4);
    }

    #[test]
    fn data_poisoning_flips_labels_or_plants_the_trigger() {
        let data = Dataset {
            images: vec![0.0; 4 * PIXELS],
            labels: vec![0, 3, 9, 5],
        };
        let flipped = poison_data(&data, &[1, 2], &settings(AttackKind::LabelFlip), 0);
        assert_eq!(flipped.labels, [6, 0]);
        let mut backdoor = settings(AttackKind::Backdoor);
        backdoor.poison_fraction = 1.0;
        backdoor.target = 7;
        let planted = poison_data(&data, &[0, 1, 2, 3], &backdoor, 0);
        assert_eq!(planted.labels, [7, 7, 7, 7]);
        assert_eq!(planted.image(0)[26 * 28 + 26], 1.0);
        let triggered = triggered_test_set(&data, 0);
        assert_eq!(triggered.labels, [0, 0, 0]);
        assert_eq!(triggered.image(2)[23 * 28 + 23], 1.0);
    }
}
