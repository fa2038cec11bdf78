//! Privacy accounting for DP-FedAvg: Rényi differential privacy (RDP) of the Poisson-subsampled
//! Gaussian mechanism, composed over rounds and converted to an (epsilon, delta) guarantee.
//!
//! Integer orders use the closed binomial sum; fractional orders use the two-sided series of
//! Mironov, Talwar & Zhang (2019, "Rényi Differential Privacy of the Sampled Gaussian
//! Mechanism"). The conversion is the tighter one of Balle et al. (2020) / Canonne, Kamath &
//! Steinke (2020):
//! `eps = min over alpha of rdp(alpha) + log((alpha-1)/alpha) - (log delta + log alpha)/(alpha-1)`.

use crate::CoreError;

/// Orders searched when none are given: 1.1 to 10.9 in steps of 0.1, and 12 to 63 (the set the
/// public reference vectors use), extended by 64, 80, 96, 128, 256 and 512 so that small
/// epsilons (large noise, few rounds), whose best order is high, are not overstated.
pub fn default_orders() -> Vec<f64> {
    let mut orders: Vec<f64> = (11..=109).map(|x| f64::from(x) / 10.0).collect();
    orders.extend((12..=63).map(f64::from));
    orders.extend([64.0, 80.0, 96.0, 128.0, 256.0, 512.0]);
    orders
}

/// A short description of [`default_orders`], for help texts and reports.
pub const DEFAULT_ORDERS_TEXT: &str = "1.1..10.9 step 0.1, 12..63, 64, 80, 96, 128, 256, 512";

/// An (epsilon, delta) guarantee and the RDP order that gave it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EpsilonAt {
    /// The privacy loss epsilon.
    pub epsilon: f64,
    /// The Rényi order at which the minimum was reached.
    pub order: f64,
}

/// RDP at `order` of one step of the Gaussian mechanism with noise multiplier `z`, applied to a
/// Poisson sample with rate `q`.
pub fn rdp_sampled_gaussian(q: f64, z: f64, order: f64) -> f64 {
    if q <= 0.0 {
        return 0.0;
    }
    if z <= 0.0 {
        return f64::INFINITY;
    }
    if q >= 1.0 {
        return order / (2.0 * z * z);
    }
    let log_a = if order.fract() == 0.0 {
        log_a_integer(q, z, order)
    } else {
        log_a_fractional(q, z, order)
    };
    log_a / (order - 1.0)
}

/// `log A` for an integer order: `A = sum_i C(a,i) q^i (1-q)^(a-i) exp((i^2 - i) / (2 z^2))`.
fn log_a_integer(q: f64, z: f64, order: f64) -> f64 {
    let n = order as u64;
    let mut log_binom = 0.0;
    let mut acc = SignedLogSum::default();
    for i in 0..=n {
        let fi = i as f64;
        if i > 0 {
            log_binom += (order - fi + 1.0).ln() - fi.ln();
        }
        let term =
            log_binom + fi * q.ln() + (order - fi) * (-q).ln_1p() + (fi * fi - fi) / (2.0 * z * z);
        acc.add(1.0, term);
    }
    acc.log_value()
}

/// `log A` for a fractional order, as the sum of the two series of Mironov, Talwar & Zhang
/// (2019, Section 3.3), split at `z0 = z^2 log(1/q - 1) + 1/2`.
fn log_a_fractional(q: f64, z: f64, order: f64) -> f64 {
    let z0 = z * z * (1.0 / q - 1.0).ln() + 0.5;
    let sqrt2z = std::f64::consts::SQRT_2 * z;
    let (log_q, log_1mq) = (q.ln(), (-q).ln_1p());
    let mut first = SignedLogSum::default();
    let mut second = SignedLogSum::default();
    let mut log_binom = 0.0;
    let mut sign = 1.0;
    for i in 0..100_000u32 {
        let fi = f64::from(i);
        if i > 0 {
            let factor = (order - fi + 1.0) / fi;
            if factor < 0.0 {
                sign = -sign;
            }
            log_binom += factor.abs().ln();
        }
        let j = order - fi;
        let s0 = log_binom
            + fi * log_q
            + j * log_1mq
            + (fi * fi - fi) / (2.0 * z * z)
            + (0.5f64).ln()
            + log_erfc((fi - z0) / sqrt2z);
        let s1 = log_binom
            + j * log_q
            + fi * log_1mq
            + (j * j - j) / (2.0 * z * z)
            + (0.5f64).ln()
            + log_erfc((z0 - j) / sqrt2z);
        first.add(sign, s0);
        second.add(sign, s1);
        // Past the order the terms shrink geometrically; stop once they no longer matter
        // (A >= 1, so an absolute threshold is a relative one).
        if fi > order && s0.max(s1) < -36.0 {
            break;
        }
    }
    let mut total = SignedLogSum::default();
    total.add(1.0, first.log_value());
    total.add(1.0, second.log_value());
    total.log_value()
}

/// `log(erfc(x))`, accurate where `erfc` underflows.
fn log_erfc(x: f64) -> f64 {
    if x < 25.0 {
        return libm::erfc(x).ln();
    }
    // Asymptotic expansion: erfc(x) ~ exp(-x^2) / (x sqrt(pi)) * (1 - 1/(2x^2) + 3/(4x^4) - ...).
    let x2 = x * x;
    let series = 1.0 - 1.0 / (2.0 * x2) + 3.0 / (4.0 * x2 * x2) - 15.0 / (8.0 * x2 * x2 * x2);
    -x2 - x.ln() - 0.5 * std::f64::consts::PI.ln() + series.ln()
}

/// A sum of signed terms, each given by its logarithm, kept as `sign * exp(log_mag)` so that
/// terms far beyond `f64`'s range add without overflow.
#[derive(Debug, Clone, Copy)]
struct SignedLogSum {
    sign: f64,
    log_mag: f64,
}

impl Default for SignedLogSum {
    fn default() -> Self {
        Self {
            sign: 1.0,
            log_mag: f64::NEG_INFINITY,
        }
    }
}

impl SignedLogSum {
    fn add(&mut self, sign: f64, log_mag: f64) {
        if log_mag == f64::NEG_INFINITY {
            return;
        }
        if self.log_mag == f64::NEG_INFINITY {
            (self.sign, self.log_mag) = (sign, log_mag);
            return;
        }
        let (big, small) = if self.log_mag >= log_mag {
            ((self.sign, self.log_mag), (sign, log_mag))
        } else {
            ((sign, log_mag), (self.sign, self.log_mag))
        };
        let ratio = (small.1 - big.1).exp();
        let factor = if big.0 == small.0 {
            1.0 + ratio
        } else {
            1.0 - ratio
        };
        self.sign = big.0;
        self.log_mag = big.1 + factor.ln();
    }

    /// The log of the sum; the sum of a probability-like series is positive.
    fn log_value(&self) -> f64 {
        if self.sign < 0.0 {
            f64::NAN
        } else {
            self.log_mag
        }
    }
}

/// The best (epsilon, delta) guarantee implied by RDP values `rdp` at `orders`.
pub fn epsilon_from_rdp(orders: &[f64], rdp: &[f64], delta: f64) -> EpsilonAt {
    let mut best = EpsilonAt {
        epsilon: f64::INFINITY,
        order: f64::NAN,
    };
    for (&order, &value) in orders.iter().zip(rdp) {
        if order <= 1.0 || !value.is_finite() {
            continue;
        }
        let eps = value + ((order - 1.0) / order).ln() - (delta.ln() + order.ln()) / (order - 1.0);
        if eps < best.epsilon {
            best = EpsilonAt {
                epsilon: eps.max(0.0),
                order,
            };
        }
    }
    best
}

/// Accumulated RDP of a run, one value per order; rounds compose by addition, so rounds may
/// differ in sampling rate and noise.
#[derive(Debug, Clone, PartialEq)]
pub struct RdpAccountant {
    orders: Vec<f64>,
    rdp: Vec<f64>,
}

impl Default for RdpAccountant {
    fn default() -> Self {
        Self::new(default_orders())
    }
}

impl RdpAccountant {
    /// An accountant that has spent nothing, searching `orders` (each above 1).
    pub fn new(orders: Vec<f64>) -> Self {
        let rdp = vec![0.0; orders.len()];
        Self { orders, rdp }
    }

    /// Adds `steps` rounds of the subsampled Gaussian with rate `q` and noise multiplier `z`.
    pub fn compose(&mut self, q: f64, z: f64, steps: u64) {
        for (total, &order) in self.rdp.iter_mut().zip(&self.orders) {
            *total += steps as f64 * rdp_sampled_gaussian(q, z, order);
        }
    }

    /// The guarantee spent so far at `delta`.
    pub fn epsilon(&self, delta: f64) -> EpsilonAt {
        epsilon_from_rdp(&self.orders, &self.rdp, delta)
    }

    /// The accumulated RDP at each order.
    pub fn rdp(&self) -> &[f64] {
        &self.rdp
    }
}

/// Epsilon of `steps` rounds with rate `q` and noise multiplier `z`, at `delta`.
pub fn epsilon_for(q: f64, z: f64, steps: u64, delta: f64, orders: &[f64]) -> EpsilonAt {
    let mut accountant = RdpAccountant::new(orders.to_vec());
    accountant.compose(q, z, steps);
    accountant.epsilon(delta)
}

/// The smallest noise multiplier (to a relative 1e-6) whose `steps` rounds at rate `q` stay
/// within `epsilon` at `delta`, found by bisection.
pub fn noise_for_epsilon(
    q: f64,
    steps: u64,
    delta: f64,
    epsilon: f64,
    orders: &[f64],
) -> Result<f64, CoreError> {
    let meets = |z: f64| epsilon_for(q, z, steps, delta, orders).epsilon <= epsilon;
    let mut high = 1.0;
    while !meets(high) {
        high *= 2.0;
        if high > 1e6 {
            return Err(CoreError::Privacy(format!(
                "no noise multiplier up to 1e6 reaches epsilon {epsilon} in {steps} rounds at \
                 sampling rate {q}; allow a larger epsilon or fewer rounds"
            )));
        }
    }
    let mut low = 0.0;
    while high - low > 1e-6 * high {
        let mid = 0.5 * (low + high);
        if meets(mid) {
            high = mid;
        } else {
            low = mid;
        }
    }
    Ok(high)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn public_orders() -> Vec<f64> {
        let mut orders: Vec<f64> = (11..=109).map(|x| f64::from(x) / 10.0).collect();
        orders.extend((12..=63).map(f64::from));
        orders
    }

    fn assert_rel(got: f64, want: f64, rtol: f64) {
        assert!(
            ((got - want) / want).abs() <= rtol,
            "got {got}, want {want} (rtol {rtol})"
        );
    }

    #[test]
    fn matches_public_rdp_vectors_at_q001_z25() {
        // 50 steps, q = 0.01, z = 2.5, at integer orders (binomial sum).
        for (order, want) in [
            (5.0, 2.18075656e-3),
            (50.0, 2.38460375e-2),
            (100.0, 167.416308),
        ] {
            assert_rel(50.0 * rdp_sampled_gaussian(0.01, 2.5, order), want, 1e-6);
        }
        // The fractional order 2.5 (series): the public value 1.08548710e-3 carries only a
        // 1e-4 tolerance. Direct numerical integration of E[(mu/mu0)^2.5] (trapezoid rule,
        // 8e6 points on [-60, 300], in log space) gives 1.08541805692e-3, which the series
        // must match closely.
        let got = 50.0 * rdp_sampled_gaussian(0.01, 2.5, 2.5);
        assert_rel(got, 1.08548710e-3, 1e-4);
        assert_rel(got, 1.08541805692e-3, 1e-9);
    }

    #[test]
    fn matches_public_rdp_vector_at_q01_z2() {
        assert_rel(10.0 * rdp_sampled_gaussian(0.1, 2.0, 5.0), 0.07737, 1e-4);
    }

    #[test]
    fn matches_public_epsilon_vector() {
        let eps = epsilon_for(0.04, 1.5, 2250, 1e-5, &public_orders());
        assert_rel(eps.epsilon, 7.32911117143, 1e-6);
    }

    #[test]
    fn conversion_matches_public_vector_for_constant_rdp() {
        let orders: Vec<f64> = (2..=32).map(f64::from).collect();
        let rdp = vec![1.1; orders.len()];
        let eps = epsilon_from_rdp(&orders, &rdp, 1e-5);
        assert_rel(eps.epsilon, 1.32783806176, 1e-9);
        assert_eq!(eps.order, 32.0);
    }

    #[test]
    fn fractional_orders_match_numerical_integration() {
        // RDP of one step, E[(mu/mu0)^alpha] integrated directly (trapezoid rule, 8e6 points on
        // [-60, 300], in log space), independently of the series. Low fractional orders have
        // slowly decaying series tails, where a series cut at a fixed number of terms drifts.
        let cases = [
            (0.1, 1.0, 3.2, 0.035695054268047054),
            (0.1, 0.5, 1.6, 0.17801343930450952),
            (0.5, 1.0, 2.5, 0.5105603809236317),
            (0.1, 1.0, 1.5, 0.0117345921966856),
        ];
        for (q, z, order, want) in cases {
            assert_rel(rdp_sampled_gaussian(q, z, order), want, 1e-8);
        }
    }

    #[test]
    fn unsampled_gaussian_has_closed_form() {
        // q = 1: RDP(alpha) = alpha / (2 z^2), for integer and fractional orders alike.
        assert_rel(rdp_sampled_gaussian(1.0, 2.0, 3.0), 3.0 / 8.0, 1e-12);
        assert_rel(rdp_sampled_gaussian(1.0, 2.0, 3.5), 3.5 / 8.0, 1e-12);
        assert_eq!(rdp_sampled_gaussian(0.0, 2.0, 3.0), 0.0);
    }

    #[test]
    fn fractional_series_agrees_with_binomial_sum_at_integers() {
        // The two-sided series is valid at integer orders too; it must agree with the sum.
        for (q, z, order) in [(0.01, 2.5, 5.0), (0.1, 1.0, 8.0), (0.3, 0.8, 3.0)] {
            let series = log_a_fractional(q, z, order) / (order - 1.0);
            assert_rel(series, rdp_sampled_gaussian(q, z, order), 1e-8);
        }
    }

    #[test]
    fn finer_default_orders_never_give_a_larger_epsilon() {
        let public = epsilon_for(0.04, 1.5, 2250, 1e-5, &public_orders());
        let default = epsilon_for(0.04, 1.5, 2250, 1e-5, &default_orders());
        assert!(default.epsilon <= public.epsilon);
    }

    #[test]
    fn noise_search_meets_the_target_and_is_tight() {
        let orders = default_orders();
        let z = noise_for_epsilon(0.1, 50, 1e-5, 5.0, &orders).expect("reachable");
        assert!(epsilon_for(0.1, z, 50, 1e-5, &orders).epsilon <= 5.0);
        assert!(epsilon_for(0.1, z * 0.999, 50, 1e-5, &orders).epsilon > 5.0);
    }

    proptest! {
        #[test]
        fn epsilon_falls_with_noise_and_grows_with_rounds_and_rate(
            q in 0.001f64..0.5,
            z in 0.5f64..5.0,
            steps in 1u64..500,
        ) {
            let orders = default_orders();
            let base = epsilon_for(q, z, steps, 1e-5, &orders).epsilon;
            prop_assert!(base.is_finite() && base >= 0.0);
            prop_assert!(epsilon_for(q, z * 1.2, steps, 1e-5, &orders).epsilon <= base + 1e-9);
            prop_assert!(epsilon_for(q, z, steps + 10, 1e-5, &orders).epsilon >= base - 1e-9);
            prop_assert!(epsilon_for((q * 1.5).min(1.0), z, steps, 1e-5, &orders).epsilon >= base - 1e-9);
        }

        #[test]
        fn subsampling_never_costs_more_than_the_full_gaussian(
            q in 0.001f64..1.0,
            z in 0.5f64..5.0,
            order_tenths in 11u32..500,
        ) {
            let order = f64::from(order_tenths) / 10.0;
            let sampled = rdp_sampled_gaussian(q, z, order);
            prop_assert!(sampled >= -1e-12);
            prop_assert!(sampled <= order / (2.0 * z * z) * (1.0 + 1e-9) + 1e-12);
        }
    }
}
