//! The distributions simulated devices are drawn from: compute speed and online sessions,
//! with the names runs give them.

use std::{fmt, str::FromStr};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Exp, LogNormal};

use crate::EngineError;

/// Most online windows drawn for one node from a session distribution; past the last one the
/// node stays online.
const MAX_SESSIONS: usize = 4096;

/// Simulated seconds a session distribution covers before its nodes stay online for good.
const SESSION_HORIZON_S: f64 = 7.0 * 24.0 * 3600.0;

/// How fast each node computes, relative to a reference device (1 = reference).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SpeedDistribution {
    /// Every node at the reference speed.
    Constant,
    /// Uniform between the two factors.
    Uniform(f64, f64),
    /// Log-normal with median 1 and this sigma.
    LogNormal(f64),
    /// This share of the nodes (drawn from the seed) is slower by this factor; the others run
    /// at the reference speed.
    Stragglers {
        /// Share of slow nodes, in `[0, 1]`.
        share: f64,
        /// How many times slower they are (at least 1).
        slowdown: f64,
    },
}

/// When each node is online.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Availability {
    /// Every node online for the whole run.
    Always,
    /// Alternating online and offline sessions of exponential lengths with these means, in
    /// simulated seconds; a node starts online with the long-run share of online time.
    Sessions {
        /// Mean online session.
        online_s: f64,
        /// Mean offline gap.
        offline_s: f64,
    },
}

impl SpeedDistribution {
    pub(super) fn draw(self, nodes: usize, seed: u64) -> Result<Vec<f64>, EngineError> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        Ok(match self {
            Self::Constant => vec![1.0; nodes],
            Self::Uniform(lo, hi) => (0..nodes).map(|_| rng.random_range(lo..=hi)).collect(),
            Self::LogNormal(sigma) => {
                let d = LogNormal::new(0.0, sigma)
                    .map_err(|e| EngineError::Settings(format!("speed lognormal: {e}")))?;
                (0..nodes).map(|_| d.sample(&mut rng)).collect()
            }
            Self::Stragglers { share, slowdown } => {
                let slow =
                    crate::selection::sample(nodes, (share * nodes as f64).round() as usize, seed);
                (0..nodes)
                    .map(|n| {
                        if slow.binary_search(&n).is_ok() {
                            1.0 / slowdown
                        } else {
                            1.0
                        }
                    })
                    .collect()
            }
        })
    }
}

impl Availability {
    pub(super) fn draw(self, seed: u64) -> Result<Vec<(f64, f64)>, EngineError> {
        let Self::Sessions {
            online_s,
            offline_s,
        } = self
        else {
            return Ok(vec![(0.0, f64::INFINITY)]);
        };
        let bad = |e: rand_distr::ExpError| EngineError::Settings(format!("sessions: {e}"));
        let on = Exp::new(1.0 / online_s).map_err(bad)?;
        let off = Exp::new(1.0 / offline_s).map_err(bad)?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut t = if rng.random_bool(online_s / (online_s + offline_s)) {
            0.0
        } else {
            off.sample(&mut rng)
        };
        let mut windows = Vec::new();
        while t < SESSION_HORIZON_S && windows.len() < MAX_SESSIONS - 1 {
            let end = t + on.sample(&mut rng);
            windows.push((t, end));
            t = end + off.sample(&mut rng);
        }
        windows.push((t, f64::INFINITY));
        Ok(windows)
    }
}

fn numbers(text: &str, count: usize) -> Option<Vec<f64>> {
    let values: Vec<f64> = text
        .split(',')
        .map(|v| v.trim().parse::<f64>())
        .collect::<Result<_, _>>()
        .ok()?;
    (values.len() == count && values.iter().all(|v| v.is_finite() && *v >= 0.0)).then_some(values)
}

impl FromStr for SpeedDistribution {
    type Err = EngineError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            EngineError::Settings(format!(
                "unknown speed distribution '{s}': expected constant, uniform:LO,HI, \
                 lognormal:SIGMA or stragglers:SHARE,SLOWDOWN (stragglers:0.3,10: 30% of the \
                 nodes 10 times slower)"
            ))
        };
        let lower = s.trim().to_ascii_lowercase();
        let (kind, rest) = lower.split_once(':').unwrap_or((lower.as_str(), ""));
        Ok(match kind {
            "constant" if rest.is_empty() => Self::Constant,
            "uniform" => match numbers(rest, 2).ok_or_else(bad)?[..] {
                [lo, hi] if lo > 0.0 && lo <= hi => Self::Uniform(lo, hi),
                _ => return Err(bad()),
            },
            "lognormal" => Self::LogNormal(numbers(rest, 1).ok_or_else(bad)?[0]),
            "stragglers" => match numbers(rest, 2).ok_or_else(bad)?[..] {
                [share, slowdown] if share <= 1.0 && slowdown >= 1.0 => {
                    Self::Stragglers { share, slowdown }
                }
                _ => return Err(bad()),
            },
            _ => return Err(bad()),
        })
    }
}

impl fmt::Display for SpeedDistribution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Constant => f.write_str("constant"),
            Self::Uniform(lo, hi) => write!(f, "uniform:{lo},{hi}"),
            Self::LogNormal(sigma) => write!(f, "lognormal:{sigma}"),
            Self::Stragglers { share, slowdown } => write!(f, "stragglers:{share},{slowdown}"),
        }
    }
}

impl FromStr for Availability {
    type Err = EngineError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase();
        if lower == "always" {
            return Ok(Self::Always);
        }
        match lower
            .strip_prefix("sessions:")
            .and_then(|r| numbers(r, 2))
            .as_deref()
        {
            Some(&[online_s, offline_s]) if online_s > 0.0 && offline_s > 0.0 => {
                Ok(Self::Sessions {
                    online_s,
                    offline_s,
                })
            }
            _ => Err(EngineError::Settings(format!(
                "unknown availability '{s}': expected always or sessions:ON,OFF (mean online \
                 and offline seconds, for example sessions:600,300)"
            ))),
        }
    }
}

impl fmt::Display for Availability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Always => f.write_str("always"),
            Self::Sessions {
                online_s,
                offline_s,
            } => write!(f, "sessions:{online_s},{offline_s}"),
        }
    }
}
