//! Fairness across sites: how evenly a federated model serves the sites that scored it.
//!
//! The mean accuracy can hide a site the model fails. From each site's accuracy on its own
//! held-out data (a federated evaluation's `node_accuracy`), the report gives the worst site,
//! the mean of the worst tenth of the sites (at least one), the unweighted mean over sites, the
//! spread (best minus worst) and the standard deviation: the figures fairness-aware
//! aggregation (q-FedAvg, Li et al., 2020) is judged by.

use std::collections::BTreeMap;

use crate::evaluation::FederatedEvaluation;

/// Share of the sites whose mean is the "worst tenth".
const WORST_SHARE: f64 = 0.1;

/// How evenly a model serves the sites that scored it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FairnessReport {
    /// Sites scored.
    pub sites: usize,
    /// The site the model serves worst.
    pub worst_site: String,
    /// Its accuracy.
    pub worst_accuracy: f64,
    /// Mean accuracy of the worst tenth of the sites (at least one site).
    pub worst_tenth_accuracy: f64,
    /// Sites in that worst tenth.
    pub worst_tenth_sites: usize,
    /// Unweighted mean accuracy over sites (each site counts once, whatever its size).
    pub mean_accuracy: f64,
    /// Best site's accuracy minus the worst's.
    pub spread: f64,
    /// Standard deviation of the sites' accuracies.
    pub std: f64,
}

impl FairnessReport {
    /// The report of `evaluation`'s sites; `None` when it names none.
    pub fn of(evaluation: &FederatedEvaluation) -> Option<Self> {
        Self::of_sites(&evaluation.node_accuracy)
    }

    /// The report of these sites' accuracies; `None` for no site.
    pub fn of_sites(accuracy: &BTreeMap<String, f64>) -> Option<Self> {
        let mut sites: Vec<(&String, f64)> = accuracy.iter().map(|(s, a)| (s, *a)).collect();
        sites.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(b.0)));
        let (worst_site, worst_accuracy) = *sites.first()?;
        let n = sites.len();
        let tenth = ((n as f64 * WORST_SHARE).ceil() as usize).clamp(1, n);
        let mean_of = |values: &[(&String, f64)]| {
            values.iter().map(|(_, a)| a).sum::<f64>() / values.len() as f64
        };
        let mean = mean_of(&sites);
        let variance = sites.iter().map(|(_, a)| (a - mean).powi(2)).sum::<f64>() / n as f64;
        Some(Self {
            sites: n,
            worst_site: worst_site.clone(),
            worst_accuracy,
            worst_tenth_accuracy: mean_of(&sites[..tenth]),
            worst_tenth_sites: tenth,
            mean_accuracy: mean,
            spread: sites[n - 1].1 - worst_accuracy,
            std: variance.sqrt(),
        })
    }
}

/// What each site gains from the federation over training alone: the federated model's
/// accuracy on the site's held-out data minus that of a model the site trained on its own data
/// only, scored on the same examples.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LocalGain {
    /// Sites with both figures.
    pub sites: usize,
    /// Unweighted mean gain over those sites.
    pub mean_gain: f64,
    /// The site that gains least (or loses most).
    pub worst_site: String,
    /// Its gain.
    pub worst_gain: f64,
    /// Sites the federated model serves worse than their own model.
    pub sites_worse_off: usize,
    /// Every site's gain.
    pub per_site: BTreeMap<String, f64>,
}

impl LocalGain {
    /// The gains of the sites found in both `federated` and `local` (accuracy by site);
    /// `None` when no site is in both.
    pub fn of(federated: &BTreeMap<String, f64>, local: &BTreeMap<String, f64>) -> Option<Self> {
        let per_site: BTreeMap<String, f64> = federated
            .iter()
            .filter_map(|(site, f)| Some((site.clone(), f - local.get(site)?)))
            .collect();
        let (worst_site, worst_gain) = per_site
            .iter()
            .min_by(|a, b| a.1.total_cmp(b.1))
            .map(|(s, g)| (s.clone(), *g))?;
        Some(Self {
            sites: per_site.len(),
            mean_gain: per_site.values().sum::<f64>() / per_site.len() as f64,
            worst_site,
            worst_gain,
            sites_worse_off: per_site.values().filter(|g| **g < 0.0).count(),
            per_site,
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn sites(accuracies: &[f64]) -> BTreeMap<String, f64> {
        accuracies
            .iter()
            .enumerate()
            .map(|(i, a)| (format!("site-{i:02}"), *a))
            .collect()
    }

    #[test]
    fn the_worst_site_and_the_worst_tenth_are_named_and_averaged() {
        let mut accuracies = vec![0.9; 18];
        accuracies.extend([0.5, 0.7]);
        let report = FairnessReport::of_sites(&sites(&accuracies)).expect("report");
        assert_eq!(report.sites, 20);
        assert_eq!(report.worst_site, "site-18");
        assert_eq!(report.worst_accuracy, 0.5);
        // The worst 2 of 20.
        assert_eq!(report.worst_tenth_sites, 2);
        assert!((report.worst_tenth_accuracy - 0.6).abs() < 1e-12);
        assert!((report.mean_accuracy - 0.87).abs() < 1e-12);
        assert!((report.spread - 0.4).abs() < 1e-12);
        assert!(FairnessReport::of_sites(&BTreeMap::new()).is_none());
        // Three sites: the worst tenth is the worst site.
        let three = FairnessReport::of_sites(&sites(&[0.8, 0.6, 0.7])).expect("report");
        assert_eq!(
            (three.worst_tenth_sites, three.worst_tenth_accuracy),
            (1, 0.6)
        );
    }

    #[test]
    fn each_sites_gain_is_its_federated_accuracy_over_its_own_models() {
        let federated = sites(&[0.9, 0.6, 0.8]);
        let mut local = sites(&[0.7, 0.65, 0.8]);
        local.insert("elsewhere".into(), 0.1);
        let gain = LocalGain::of(&federated, &local).expect("three sites");
        assert_eq!(gain.sites, 3);
        assert_eq!(gain.worst_site, "site-01");
        assert!((gain.worst_gain + 0.05).abs() < 1e-12);
        assert_eq!(gain.sites_worse_off, 1);
        assert!((gain.mean_gain - 0.05).abs() < 1e-12);
        assert!(LocalGain::of(&federated, &BTreeMap::new()).is_none());
    }

    proptest! {
        #[test]
        fn the_figures_are_ordered_and_equal_sites_are_perfectly_fair(
            accuracies in prop::collection::vec(0.0f64..=1.0, 1..60),
            equal in 0.0f64..=1.0,
            n in 1usize..40,
        ) {
            let r = FairnessReport::of_sites(&sites(&accuracies)).expect("report");
            prop_assert!(r.worst_accuracy <= r.worst_tenth_accuracy + 1e-12);
            prop_assert!(r.worst_tenth_accuracy <= r.mean_accuracy + 1e-12);
            prop_assert!(r.std <= r.spread + 1e-12);
            prop_assert!(r.worst_tenth_sites >= 1 && r.worst_tenth_sites <= r.sites);
            let flat = FairnessReport::of_sites(&sites(&vec![equal; n])).expect("report");
            prop_assert_eq!(flat.spread, 0.0);
            prop_assert!(flat.std < 1e-12);
            prop_assert!((flat.worst_tenth_accuracy - equal).abs() < 1e-12);
        }
    }
}
