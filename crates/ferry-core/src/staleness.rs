//! Staleness weights of asynchronous aggregation (FedBuff, Nguyen et al., 2022; the
//! functions of FedAsync, Xie et al., 2019): an update trained on a model `tau` versions
//! older than the current one counts `s(tau)` times as much as a fresh one.

use std::{fmt, str::FromStr};

use crate::{
    CoreError, Update,
    aggregate::{Part, UpdateSource},
    tensor_file::Visit,
    update::UpdateMeta,
};

/// How an update's weight falls with its staleness `tau` (server versions since the model
/// it trained on).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StalenessWeight {
    /// `s(tau) = 1`.
    Constant,
    /// `s(tau) = (1 + tau)^-a`; FedBuff's default is `a = 0.5`.
    Polynomial {
        /// The exponent `a >= 0`.
        a: f64,
    },
    /// `s(tau) = 1` for `tau <= b`, then `1 / (a (tau - b) + 1)`.
    Hinge {
        /// The slope `a >= 0` past the hinge.
        a: f64,
        /// Staleness tolerated at full weight.
        b: u64,
    },
}

impl Default for StalenessWeight {
    fn default() -> Self {
        Self::Polynomial { a: 0.5 }
    }
}

impl StalenessWeight {
    /// The weight of an update `tau` versions stale, in `(0, 1]`.
    pub fn weight(self, tau: u64) -> f64 {
        let tau = tau as f64;
        match self {
            Self::Constant => 1.0,
            Self::Polynomial { a } => (1.0 + tau).powf(-a),
            Self::Hinge { a, b } => {
                let b = b as f64;
                if tau <= b {
                    1.0
                } else {
                    1.0 / (a * (tau - b) + 1.0)
                }
            }
        }
    }
}

/// An update read from `inner` with its delta scaled by a staleness weight (its scalars and
/// SCAFFOLD's control change as they are), so that a deployed server folds a stale upload
/// from its file as simulation folds a scaled update.
pub struct Weighted<'a> {
    inner: &'a mut dyn UpdateSource,
    weight: f32,
    scaled: Vec<f32>,
}

impl<'a> Weighted<'a> {
    /// `inner` with its delta multiplied by `weight`.
    pub fn new(inner: &'a mut dyn UpdateSource, weight: f64) -> Self {
        Self {
            inner,
            weight: weight as f32,
            scaled: Vec::new(),
        }
    }
}

impl UpdateSource for Weighted<'_> {
    fn meta(&self) -> &UpdateMeta {
        self.inner.meta()
    }

    fn check(&mut self) -> Result<(), CoreError> {
        self.inner.check()
    }

    fn visit(&mut self, part: Part, visit: &mut Visit<'_>) -> Result<(), CoreError> {
        if part == Part::Control {
            return self.inner.visit(part, visit);
        }
        let (weight, scaled) = (self.weight, &mut self.scaled);
        self.inner.visit(part, &mut |at, values| {
            scaled.clear();
            scaled.extend(values.iter().map(|v| v * weight));
            visit(at, scaled)
        })
    }

    fn read_whole(&mut self) -> Result<Update, CoreError> {
        let mut update = self.inner.read_whole()?;
        crate::algebra::scale(&mut update.delta, self.weight);
        Ok(update)
    }
}

impl FromStr for StalenessWeight {
    type Err = CoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            CoreError::Settings(format!(
                "unknown staleness weight '{s}': expected constant, polynomial:A (A >= 0, for \
                 example polynomial:0.5) or hinge:A,B (A >= 0, B a whole number of versions)"
            ))
        };
        let number = |x: &str| {
            x.trim()
                .parse::<f64>()
                .ok()
                .filter(|v| *v >= 0.0 && v.is_finite())
        };
        let lower = s.trim().to_ascii_lowercase();
        if lower == "constant" {
            return Ok(Self::Constant);
        }
        if let Some(a) = lower.strip_prefix("polynomial:") {
            return Ok(Self::Polynomial {
                a: number(a).ok_or_else(bad)?,
            });
        }
        if let Some((a, b)) = lower.strip_prefix("hinge:").and_then(|r| r.split_once(',')) {
            return Ok(Self::Hinge {
                a: number(a).ok_or_else(bad)?,
                b: b.trim().parse().map_err(|_| bad())?,
            });
        }
        Err(bad())
    }
}

impl fmt::Display for StalenessWeight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Constant => f.write_str("constant"),
            Self::Polynomial { a } => write!(f, "polynomial:{a}"),
            Self::Hinge { a, b } => write!(f, "hinge:{a},{b}"),
        }
    }
}

impl serde::Serialize for StalenessWeight {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn weights_start_at_one_and_never_grow_with_staleness(
            a in 0.0f64..4.0,
            b in 0u64..20,
            tau in 0u64..1000,
        ) {
            for rule in [
                StalenessWeight::Constant,
                StalenessWeight::Polynomial { a },
                StalenessWeight::Hinge { a, b },
            ] {
                prop_assert_eq!(rule.weight(0), 1.0);
                let (now, later) = (rule.weight(tau), rule.weight(tau + 1));
                prop_assert!(now > 0.0 && now <= 1.0);
                prop_assert!(later <= now);
            }
        }
    }

    #[test]
    fn a_weighted_source_scales_the_delta_and_nothing_else() {
        let layout = crate::ModelLayout::new(vec![crate::TensorSpec::f32("w", vec![3])]).unwrap();
        let mut update = Update::new(vec![1.0, -2.0, 4.0], 7);
        update.control_delta = Some(vec![1.0, 1.0, 1.0]);
        let bytes = crate::update_file::encode_update(&update, &layout).unwrap();
        let mut file =
            crate::update_file::UpdateFile::open(std::io::Cursor::new(bytes), &layout).unwrap();
        let mut weighted = Weighted::new(&mut file, 0.5);
        let mut seen = Vec::new();
        weighted
            .visit(Part::Delta, &mut |_, values| {
                seen.extend_from_slice(values);
                Ok(())
            })
            .unwrap();
        assert_eq!(seen, [0.5, -1.0, 2.0]);
        let whole = weighted.read_whole().unwrap();
        assert_eq!(whole.delta, [0.5, -1.0, 2.0]);
        assert_eq!(whole.control_delta, Some(vec![1.0, 1.0, 1.0]));
        assert_eq!(weighted.meta().num_examples, 7);
    }

    #[test]
    fn published_shapes() {
        let poly = StalenessWeight::Polynomial { a: 0.5 };
        assert!((poly.weight(3) - 0.5).abs() < 1e-12);
        let hinge = StalenessWeight::Hinge { a: 10.0, b: 4 };
        assert_eq!(hinge.weight(4), 1.0);
        assert!((hinge.weight(5) - 1.0 / 11.0).abs() < 1e-12);
    }

    #[test]
    fn names_parse_and_bad_ones_are_explained() {
        for text in ["constant", "polynomial:0.5", "hinge:10,4"] {
            assert_eq!(text.parse::<StalenessWeight>().unwrap().to_string(), text);
        }
        for bad in ["poly", "polynomial:-1", "hinge:1", "hinge:1,x", "linear"] {
            let e = bad.parse::<StalenessWeight>().unwrap_err().to_string();
            assert!(e.contains("expected constant"), "{e}");
        }
    }
}
