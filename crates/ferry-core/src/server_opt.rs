//! The server-optimizer step: how an aggregate becomes the next global model.
//!
//! Reddi et al. (2021) cast FedAvg as server SGD with learning rate 1 on the mean delta; the
//! adaptive server optimizers (FedAdam, FedYogi, FedAdagrad) and server momentum (FedAvgM)
//! are the same step with state, which [`ServerOptimizer::state_bytes`] reports.

use std::{collections::BTreeMap, sync::Arc};

use crate::{CoreError, aggregate::Aggregate, algebra};

/// An optimizer's state as named flat vectors, for persisting a run between rounds.
pub type OptimizerState = BTreeMap<String, Vec<f32>>;

/// Applies an aggregated delta to the global parameters.
pub trait ServerOptimizer: Send {
    /// Updates `global` in place from the round's aggregate.
    fn apply(&mut self, global: &mut [f32], aggregate: &Aggregate) -> Result<(), CoreError>;

    /// Bytes of state the optimizer keeps between rounds (0 for plain FedAvg).
    fn state_bytes(&self) -> usize;

    /// Server state that every selected node receives with the model (SCAFFOLD's control
    /// variate `c`); none for most optimizers.
    fn broadcast(&self) -> Option<Arc<Vec<f32>>> {
        None
    }

    /// The state kept between rounds, so that a restarted coordinator continues the same run.
    fn save(&self) -> OptimizerState;

    /// Restores state produced by [`ServerOptimizer::save`] of the same optimizer.
    fn restore(&mut self, state: OptimizerState) -> Result<(), CoreError>;
}

/// Takes the named vectors out of `state`, refusing unknown names and vectors of unequal length.
fn take_vectors<const N: usize>(
    mut state: OptimizerState,
    names: [&str; N],
) -> Result<[Vec<f32>; N], CoreError> {
    let vectors = names.map(|name| state.remove(name).unwrap_or_default());
    if let Some(unknown) = state.keys().next() {
        return Err(CoreError::LayoutMismatch(format!(
            "optimizer state holds '{unknown}'; expected only {names:?}"
        )));
    }
    if vectors.iter().any(|v| v.len() != vectors[0].len()) {
        return Err(CoreError::LayoutMismatch(format!(
            "optimizer state vectors {names:?} differ in length"
        )));
    }
    Ok(vectors)
}

fn saved(pairs: &[(&str, &Vec<f32>)]) -> OptimizerState {
    pairs
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(name, v)| (name.to_string(), v.to_vec()))
        .collect()
}

/// Server SGD with optional momentum (FedAvgM, Hsu et al., 2019):
/// `v = momentum * v + delta; x = x + lr * v`. With `lr = 1` and no momentum this is FedAvg's
/// "apply the mean delta".
#[derive(Debug, Clone)]
pub struct ServerSgd {
    lr: f32,
    momentum: f32,
    velocity: Vec<f32>,
}

impl ServerSgd {
    /// Server SGD with the given learning rate and momentum (0 for none).
    pub fn new(lr: f32, momentum: f32) -> Self {
        Self {
            lr,
            momentum,
            velocity: Vec::new(),
        }
    }
}

fn check_len(global: &[f32], aggregate: &Aggregate) -> Result<(), CoreError> {
    if global.len() == aggregate.delta.len() {
        Ok(())
    } else {
        Err(CoreError::LengthMismatch {
            expected: global.len(),
            got: aggregate.delta.len(),
        })
    }
}

impl ServerOptimizer for ServerSgd {
    fn apply(&mut self, global: &mut [f32], aggregate: &Aggregate) -> Result<(), CoreError> {
        check_len(global, aggregate)?;
        if self.momentum == 0.0 {
            algebra::add_scaled(global, &aggregate.delta, self.lr);
            return Ok(());
        }
        if self.velocity.is_empty() {
            self.velocity = vec![0.0; global.len()];
        }
        algebra::scale(&mut self.velocity, self.momentum);
        algebra::add_scaled(&mut self.velocity, &aggregate.delta, 1.0);
        algebra::add_scaled(global, &self.velocity, self.lr);
        Ok(())
    }

    fn state_bytes(&self) -> usize {
        self.velocity.len() * std::mem::size_of::<f32>()
    }

    fn save(&self) -> OptimizerState {
        saved(&[("velocity", &self.velocity)])
    }

    fn restore(&mut self, state: OptimizerState) -> Result<(), CoreError> {
        [self.velocity] = take_vectors(state, ["velocity"])?;
        Ok(())
    }
}

/// SCAFFOLD's server (Karimireddy et al., 2020, option II): `x = x + lr * mean(dy)` over the
/// participants and `c = c + sum(dc) / N` over all `N` nodes of the federation.
#[derive(Debug, Clone)]
pub struct ScaffoldServer {
    lr: f32,
    fleet_size: usize,
    control: Arc<Vec<f32>>,
}

impl ScaffoldServer {
    /// A SCAFFOLD server for a federation of `fleet_size` nodes, with `c = 0`.
    pub fn new(lr: f32, fleet_size: usize) -> Self {
        Self {
            lr,
            fleet_size: fleet_size.max(1),
            control: Arc::new(Vec::new()),
        }
    }
}

impl ServerOptimizer for ScaffoldServer {
    fn apply(&mut self, global: &mut [f32], aggregate: &Aggregate) -> Result<(), CoreError> {
        check_len(global, aggregate)?;
        let dc = aggregate
            .control_delta_sum
            .as_ref()
            .ok_or(CoreError::MissingExtra("SCAFFOLD control-variate changes"))?;
        if dc.len() != global.len() {
            return Err(CoreError::LengthMismatch {
                expected: global.len(),
                got: dc.len(),
            });
        }
        algebra::add_scaled(global, &aggregate.delta, self.lr);
        let control = Arc::make_mut(&mut self.control);
        if control.is_empty() {
            control.resize(global.len(), 0.0);
        }
        algebra::add_scaled(control, dc, 1.0 / self.fleet_size as f32);
        Ok(())
    }

    fn state_bytes(&self) -> usize {
        self.control.len() * std::mem::size_of::<f32>()
    }

    fn broadcast(&self) -> Option<Arc<Vec<f32>>> {
        Some(self.control.clone())
    }

    fn save(&self) -> OptimizerState {
        saved(&[("control", &self.control)])
    }

    fn restore(&mut self, state: OptimizerState) -> Result<(), CoreError> {
        let [control] = take_vectors(state, ["control"])?;
        self.control = Arc::new(control);
        Ok(())
    }
}

/// Which second-moment rule an adaptive server optimizer uses (Reddi et al., 2021).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdaptiveRule {
    /// `v = v + D^2`.
    Adagrad,
    /// `v = b2 * v + (1 - b2) * D^2`.
    Adam,
    /// `v = v - (1 - b2) * D^2 * sign(v - D^2)`.
    Yogi,
}

/// Hyper-parameters of an adaptive server optimizer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaptiveParams {
    /// Server learning rate (eta).
    pub lr: f32,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay (unused by Adagrad).
    pub beta2: f32,
    /// Adaptivity floor added to `sqrt(v)`.
    pub tau: f32,
}

/// FedAdagrad, FedAdam and FedYogi (Reddi et al., 2021): with the mean delta D,
/// `m = b1 * m + (1 - b1) * D`, `v` by the rule, `x = x + lr * m / (sqrt(v) + tau)`;
/// `m` and `v` start at zero and, as in the paper, there is no bias correction.
#[derive(Debug, Clone)]
pub struct AdaptiveServer {
    rule: AdaptiveRule,
    params: AdaptiveParams,
    m: Vec<f32>,
    v: Vec<f32>,
}

impl AdaptiveServer {
    /// An adaptive server optimizer with zero-initialised moments.
    pub fn new(rule: AdaptiveRule, params: AdaptiveParams) -> Self {
        Self {
            rule,
            params,
            m: Vec::new(),
            v: Vec::new(),
        }
    }
}

impl ServerOptimizer for AdaptiveServer {
    fn apply(&mut self, global: &mut [f32], aggregate: &Aggregate) -> Result<(), CoreError> {
        check_len(global, aggregate)?;
        if self.m.is_empty() {
            self.m = vec![0.0; global.len()];
            self.v = vec![0.0; global.len()];
        }
        let AdaptiveParams {
            lr,
            beta1,
            beta2,
            tau,
        } = self.params;
        let rule = self.rule;
        for (((x, m), v), d) in global
            .iter_mut()
            .zip(&mut self.m)
            .zip(&mut self.v)
            .zip(&aggregate.delta)
        {
            let d2 = d * d;
            *m = beta1 * *m + (1.0 - beta1) * d;
            *v = match rule {
                AdaptiveRule::Adagrad => *v + d2,
                AdaptiveRule::Adam => beta2 * *v + (1.0 - beta2) * d2,
                AdaptiveRule::Yogi => {
                    *v - (1.0 - beta2) * d2 * (*v - d2).signum() * f32::from(*v != d2)
                }
            };
            *x += lr * *m / (v.sqrt() + tau);
        }
        Ok(())
    }

    fn state_bytes(&self) -> usize {
        (self.m.len() + self.v.len()) * std::mem::size_of::<f32>()
    }

    fn save(&self) -> OptimizerState {
        saved(&[("m", &self.m), ("v", &self.v)])
    }

    fn restore(&mut self, state: OptimizerState) -> Result<(), CoreError> {
        [self.m, self.v] = take_vectors(state, ["m", "v"])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_lr_applies_the_mean_delta() {
        let mut global = vec![1.0, 2.0];
        let aggregate = Aggregate {
            delta: vec![0.5, -1.0],
            participants: 2,
            num_examples: 10,
            control_delta_sum: None,
            unclipped_fraction: None,
            excluded: Vec::new(),
        };
        let mut opt = ServerSgd::new(1.0, 0.0);
        opt.apply(&mut global, &aggregate).expect("same length");
        assert_eq!(global, [1.5, 1.0]);
        assert_eq!(opt.state_bytes(), 0);
        let short = Aggregate {
            delta: vec![0.0],
            ..aggregate
        };
        assert!(opt.apply(&mut global, &short).is_err());
    }

    fn aggregate(delta: Vec<f32>) -> Aggregate {
        Aggregate {
            delta,
            participants: 1,
            num_examples: 1,
            control_delta_sum: None,
            unclipped_fraction: None,
            excluded: Vec::new(),
        }
    }

    #[test]
    fn scaffold_moves_x_by_mean_delta_and_c_by_control_sum_over_fleet() {
        let mut opt = ScaffoldServer::new(1.0, 4);
        assert_eq!(opt.broadcast().map(|c| c.len()), Some(0));
        let mut x = vec![1.0f32, 1.0];
        let mut agg = aggregate(vec![0.5, -0.5]);
        assert!(
            opt.apply(&mut x, &agg).is_err(),
            "control changes are required"
        );
        agg.control_delta_sum = Some(vec![2.0, -4.0]);
        opt.apply(&mut x, &agg).expect("apply");
        assert_eq!(x, [1.5, 0.5]);
        assert_eq!(opt.broadcast().map(|c| c.to_vec()), Some(vec![0.5, -1.0]));
        assert_eq!(opt.state_bytes(), 8);
    }

    #[test]
    fn server_momentum_accumulates_velocity() {
        let mut opt = ServerSgd::new(0.5, 0.9);
        let mut x = vec![0.0f32];
        opt.apply(&mut x, &aggregate(vec![1.0])).expect("apply");
        assert_eq!(x, [0.5]); // v = 1
        opt.apply(&mut x, &aggregate(vec![1.0])).expect("apply");
        assert!((x[0] - (0.5 + 0.5 * 1.9)).abs() < 1e-6); // v = 0.9 + 1
        assert_eq!(opt.state_bytes(), 4);
    }

    const PARAMS: AdaptiveParams = AdaptiveParams {
        lr: 0.1,
        beta1: 0.9,
        beta2: 0.99,
        tau: 1e-3,
    };

    /// Hand-computed first step from zero moments with D = [2, -1].
    #[test]
    fn adaptive_rules_match_hand_computed_first_step() {
        // m = 0.1 * D = [0.2, -0.1]
        let cases = [
            (AdaptiveRule::Adagrad, [4.0f32, 1.0]), // v = D^2
            (AdaptiveRule::Adam, [0.04, 0.01]),     // v = 0.01 * D^2
            (AdaptiveRule::Yogi, [0.04, 0.01]),     // v = 0 - 0.01 * D^2 * sign(0 - D^2)
        ];
        for (rule, v) in cases {
            let mut opt = AdaptiveServer::new(rule, PARAMS);
            let mut x = vec![1.0f32, 1.0];
            opt.apply(&mut x, &aggregate(vec![2.0, -1.0]))
                .expect("apply");
            let expected = [
                1.0 + 0.1 * 0.2 / (v[0].sqrt() + 1e-3),
                1.0 - 0.1 * 0.1 / (v[1].sqrt() + 1e-3),
            ];
            for (got, want) in x.iter().zip(expected) {
                assert!((got - want).abs() < 1e-5, "{rule:?}: {got} vs {want}");
            }
            assert_eq!(opt.state_bytes(), 16);
        }
    }

    #[test]
    fn yogi_grows_v_more_slowly_than_adagrad_once_v_is_large() {
        // Second step with a smaller delta: Adagrad keeps adding, Yogi moves v towards D^2.
        let mut yogi = AdaptiveServer::new(AdaptiveRule::Yogi, PARAMS);
        let mut adagrad = AdaptiveServer::new(AdaptiveRule::Adagrad, PARAMS);
        let (mut xy, mut xa) = (vec![0.0f32], vec![0.0f32]);
        for d in [3.0f32, 0.1] {
            yogi.apply(&mut xy, &aggregate(vec![d])).expect("apply");
            adagrad.apply(&mut xa, &aggregate(vec![d])).expect("apply");
        }
        // Yogi: v1 = 0.09, then v1 > D^2 = 0.01 so v2 = 0.09 - 0.01 * 0.01 = 0.0899.
        assert!((yogi.v[0] - 0.0899).abs() < 1e-6, "{}", yogi.v[0]);
        assert!((adagrad.v[0] - 9.01).abs() < 1e-5, "{}", adagrad.v[0]);
    }

    /// Saving after two steps, restoring into a fresh optimizer and stepping both once more
    /// gives the same parameters: a restarted coordinator continues the same run.
    #[test]
    fn saved_state_restores_the_same_trajectory() {
        let optimizers: [fn() -> Box<dyn ServerOptimizer>; 3] = [
            || Box::new(ServerSgd::new(0.5, 0.9)),
            || Box::new(AdaptiveServer::new(AdaptiveRule::Yogi, PARAMS)),
            || Box::new(ScaffoldServer::new(1.0, 3)),
        ];
        for make in optimizers {
            let mut agg = aggregate(vec![0.3, -0.7]);
            agg.control_delta_sum = Some(vec![1.0, 2.0]);
            let (mut original, mut x) = (make(), vec![1.0f32, 2.0]);
            original.apply(&mut x, &agg).expect("apply");
            original.apply(&mut x, &agg).expect("apply");
            let mut restored = make();
            restored.restore(original.save()).expect("restore");
            assert_eq!(restored.state_bytes(), original.state_bytes());
            let mut y = x.clone();
            original.apply(&mut x, &agg).expect("apply");
            restored.apply(&mut y, &agg).expect("apply");
            assert_eq!(x, y);
            assert_eq!(original.broadcast(), restored.broadcast());
        }
        let mut sgd = ServerSgd::new(1.0, 0.9);
        let err = sgd
            .restore(OptimizerState::from([("m".into(), vec![1.0])]))
            .expect_err("foreign state");
        assert!(err.to_string().contains("'m'"), "{err}");
    }

    proptest::proptest! {
        #[test]
        fn fedavgm_with_zero_momentum_equals_fedavg(
            deltas in proptest::collection::vec(proptest::collection::vec(-1.0f32..1.0, 5), 1..6),
        ) {
            let mut opt = ServerSgd::new(1.0, 0.0);
            let mut x = vec![0.5f32; 5];
            for d in &deltas {
                let expected: Vec<f32> = x.iter().zip(d).map(|(x, d)| x + d).collect();
                opt.apply(&mut x, &aggregate(d.clone())).expect("apply");
                proptest::prop_assert_eq!(&x, &expected);
            }
            proptest::prop_assert_eq!(opt.state_bytes(), 0);
        }

        #[test]
        fn first_momentum_step_equals_fedavg(
            d in proptest::collection::vec(-1.0f32..1.0, 1..20),
            momentum in 0.01f32..0.99,
        ) {
            let mut opt = ServerSgd::new(1.0, momentum);
            let mut x = vec![0.0f32; d.len()];
            opt.apply(&mut x, &aggregate(d.clone())).expect("apply");
            proptest::prop_assert_eq!(x, d);
        }
    }
}
