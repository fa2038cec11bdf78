//! The cross-site validation matrix: which model works where.
//!
//! Each row is one model (the federation's global model, and, where the operator opts in, each
//! site's own model fine-tuned from it on that site's data); each column is one site's held-out
//! data, with the number of examples scored there. A cross-organisation federation reads it to
//! see what the shared model does for each member, and whether a site would be better served by
//! its own model.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::evaluation::FederatedEvaluation;

/// Which models the matrix scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CrossSiteModels {
    /// The global model only: nothing leaves a site but its scores.
    Global,
    /// The global model and each site's fine-tuned model. A site's model leaves the site, so
    /// runs with secure aggregation or differential privacy refuse it.
    Local,
}

impl std::str::FromStr for CrossSiteModels {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "global" => Ok(Self::Global),
            "local" => Ok(Self::Local),
            other => Err(format!(
                "cross-site takes 'global' (the global model on every site) or 'local' (also \
                 each site's fine-tuned model on every site), got '{other}'"
            )),
        }
    }
}

impl std::fmt::Display for CrossSiteModels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Global => "global",
            Self::Local => "local",
        })
    }
}

/// The name of the global model's row.
pub const GLOBAL_ROW: &str = "global";

/// The name of the row of `site`'s own fine-tuned model.
pub fn local_row(site: &str) -> String {
    format!("local:{site}")
}

/// One model's scores on every site.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MatrixRow {
    /// `global`, or `local:<site>` for a site's fine-tuned model.
    pub model: String,
    /// Accuracy on each site's held-out data, in the order of [`CrossSiteMatrix::sites`];
    /// `None` where that site did not score it.
    pub accuracy: Vec<Option<f64>>,
}

/// Models x sites: each model's accuracy on each site's held-out data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CrossSiteMatrix {
    /// The sites (columns), in name order.
    pub sites: Vec<String>,
    /// Held-out examples each site scored on, in the order of `sites`.
    pub examples: Vec<u64>,
    /// The models (rows): the global model first, then the sites' own models in site order.
    pub rows: Vec<MatrixRow>,
}

/// One model's scores as they come in: accuracy and held-out examples by site.
pub type SiteScores = BTreeMap<String, (f64, u64)>;

impl CrossSiteMatrix {
    /// The matrix of `global`'s scores and, for each site that sent its own model, that
    /// model's scores (`local`, by site); `None` when no site scored the global model.
    pub fn build(global: &SiteScores, local: &BTreeMap<String, SiteScores>) -> Option<Self> {
        if global.is_empty() {
            return None;
        }
        let sites: Vec<String> = global.keys().cloned().collect();
        let examples = sites.iter().map(|s| global[s].1).collect();
        let matrix = Self {
            sites,
            examples,
            rows: Vec::new(),
        };
        let global_row = matrix.row_of(GLOBAL_ROW.to_string(), global);
        Some(
            Self {
                rows: vec![global_row],
                ..matrix
            }
            .with_local_rows(local),
        )
    }

    /// This matrix with a row added for each site's own model (`local`, by site), scored on
    /// this matrix's sites.
    pub fn with_local_rows(mut self, local: &BTreeMap<String, SiteScores>) -> Self {
        for (site, scores) in local {
            let row = self.row_of(local_row(site), scores);
            self.rows.push(row);
        }
        self
    }

    /// The row of `model` with `scores` on this matrix's sites.
    fn row_of(&self, model: String, scores: &SiteScores) -> MatrixRow {
        MatrixRow {
            model,
            accuracy: self
                .sites
                .iter()
                .map(|s| scores.get(s).map(|(a, _)| *a))
                .collect(),
        }
    }

    /// The global row of a federated evaluation that kept each site's accuracy and examples.
    pub fn of_evaluation(evaluation: &FederatedEvaluation) -> Option<Self> {
        let global: SiteScores = evaluation
            .node_accuracy
            .iter()
            .filter_map(|(site, a)| {
                Some((site.clone(), (*a, *evaluation.node_examples.get(site)?)))
            })
            .collect();
        Self::build(&global, &BTreeMap::new())
    }

    /// The row of `model`, if the matrix has it.
    pub fn row(&self, model: &str) -> Option<&MatrixRow> {
        self.rows.iter().find(|r| r.model == model)
    }

    /// `model`'s accuracy on `site`, if it was scored there.
    pub fn cell(&self, model: &str, site: &str) -> Option<f64> {
        let column = self.sites.iter().position(|s| s == site)?;
        self.row(model)?.accuracy[column]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scores(cells: &[(&str, f64, u64)]) -> SiteScores {
        cells
            .iter()
            .map(|(s, a, n)| (s.to_string(), (*a, *n)))
            .collect()
    }

    #[test]
    fn rows_follow_the_global_models_sites_with_gaps_where_a_site_did_not_score() {
        let global = scores(&[("a", 0.8, 10), ("b", 0.6, 20)]);
        let local = BTreeMap::from([
            ("b".to_string(), scores(&[("a", 0.3, 10), ("b", 0.9, 20)])),
            ("a".to_string(), scores(&[("a", 0.95, 10)])),
        ]);
        let m = CrossSiteMatrix::build(&global, &local).expect("matrix");
        assert_eq!(m.sites, ["a", "b"]);
        assert_eq!(m.examples, [10, 20]);
        let models: Vec<&str> = m.rows.iter().map(|r| r.model.as_str()).collect();
        assert_eq!(models, ["global", "local:a", "local:b"]);
        assert_eq!(m.cell("global", "b"), Some(0.6));
        assert_eq!(m.cell("local:b", "a"), Some(0.3));
        assert_eq!(m.cell("local:a", "b"), None);
        assert_eq!(m.cell("local:c", "a"), None);
        assert!(CrossSiteMatrix::build(&SiteScores::new(), &local).is_none());
    }

    #[test]
    fn the_settings_name_parses_back() {
        for models in [CrossSiteModels::Global, CrossSiteModels::Local] {
            assert_eq!(models.to_string().parse::<CrossSiteModels>(), Ok(models));
        }
        assert!("all".parse::<CrossSiteModels>().is_err());
    }
}
