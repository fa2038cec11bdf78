//! Secure aggregation in a round (SecAgg+, from ferry-secagg): which strategies it works
//! with, how a node weights its masked input, and the four stages driven over in-process
//! nodes. The aggregator then receives one unmasked sum, never an update.

use std::sync::Arc;

use ferry_core::{
    Update,
    aggregate::{UpdateSum, Weighting, validate_update},
    privacy::{ClipRule, Placement},
    strategy::{AggregationRule, ClientProcedure, Strategy},
};
use ferry_secagg::{
    MaskedInput, PublicKeys, RevealedShare, Roster, SealedShare, SecAggClient, SecAggError,
    SecAggParams, SecAggServer, SecureSum, UnmaskRequest,
};

use crate::{
    EngineError, dispatch,
    node::{NodeError, NodeHandle},
    round::{OpenRound, RoundPlan},
};

/// Secure aggregation as a user configures it (flags or the run config); unset values take
/// defaults that fit the run.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecAggSettings {
    /// Neighbours per node in the masking graph; more than the cohort gives classic SecAgg.
    pub neighbours: usize,
    /// Shares needed to rebuild a node's secrets; unset: a majority of its neighbours.
    pub threshold: Option<usize>,
    /// Per-coordinate clip of the updates before quantisation.
    pub clip: f32,
    /// Quantisation levels are `2^quantization_bits`.
    pub quantization_bits: u32,
    /// Sums are taken modulo `2^modulus_bits`.
    pub modulus_bits: u32,
    /// FedAvg weighting: examples a node's weight may reflect; unset: the largest node's.
    pub weight_cap: Option<u64>,
}

impl Default for SecAggSettings {
    fn default() -> Self {
        let params = SecAggParams::default();
        Self {
            neighbours: params.neighbours,
            threshold: None,
            clip: params.clip,
            quantization_bits: params.quantization_bits,
            modulus_bits: params.modulus_bits,
            weight_cap: None,
        }
    }
}

impl SecAggSettings {
    /// The run's secure aggregation for `strategy` with rounds of about `cohort` nodes;
    /// `largest_node` is the default weight cap. Refuses what cannot work.
    pub fn resolve(
        &self,
        strategy: &Strategy,
        cohort: usize,
        largest_node: u64,
    ) -> Result<SecureAggregation, EngineError> {
        let probe = SecAggParams {
            neighbours: self.neighbours,
            ..SecAggParams::default()
        };
        let threshold = self
            .threshold
            .unwrap_or_else(|| probe.majority_threshold(cohort));
        let params = SecAggParams {
            neighbours: self.neighbours,
            threshold,
            clip: self.clip,
            quantization_bits: self.quantization_bits,
            modulus_bits: self.modulus_bits,
        };
        params
            .validate(cohort)
            .map_err(|e| EngineError::Settings(format!("{e} (rounds of {cohort} nodes)")))?;
        let secure = SecureAggregation::for_strategy(
            params,
            strategy,
            self.weight_cap.unwrap_or(largest_node.max(1)),
        )?;
        Ok(SecureAggregation {
            automatic_threshold: self.threshold.is_none(),
            ..secure
        })
    }
}

/// A run's secure aggregation, resolved for its strategy and cohort.
#[derive(Debug, Clone, PartialEq)]
pub struct SecureAggregation {
    /// The protocol's parameters; with an automatic threshold, each round's threshold is
    /// taken from that round's cohort ([`SecureAggregation::params_for`]).
    pub params: SecAggParams,
    /// Whether the threshold follows each round's cohort (a majority of each node's
    /// neighbourhood in that round) rather than the configured one: the run then keeps
    /// training as nodes leave for good, down to rounds of 3.
    pub automatic_threshold: bool,
    /// FedAvg weighting: a node's weight factor is `min(n_i, cap) / cap`; `None` weights
    /// every node 1 (differential privacy's fixed-denominator sum, uniform strategies).
    pub weight_cap: Option<u64>,
}

impl SecureAggregation {
    /// Settings for `strategy`, refusing those that need each update on its own.
    /// `weight_cap` bounds the example count a node's weight may reflect.
    pub fn for_strategy(
        params: SecAggParams,
        strategy: &Strategy,
        weight_cap: u64,
    ) -> Result<Self, EngineError> {
        let refuse = |why: &str| {
            Err(EngineError::Settings(format!(
                "secure aggregation hides each update from the server, so {why}"
            )))
        };
        match strategy.client {
            ClientProcedure::Scaffold => {
                return refuse(
                    "SCAFFOLD's per-node control variates cannot be kept; use another strategy",
                );
            }
            ClientProcedure::Normalized => {
                return refuse(
                    "FedNova's per-node normalisation cannot be applied; use another strategy",
                );
            }
            ClientProcedure::LossReporting => {
                return refuse(
                    "q-FedAvg cannot weigh each node's update by its own loss; use another strategy",
                );
            }
            ClientProcedure::LocalSgd | ClientProcedure::Proximal { .. } => {}
        }
        if matches!(strategy.aggregation, AggregationRule::Robust(_)) {
            return refuse("robust rules, which compare updates, cannot run; use the mean");
        }
        if strategy.norm_bound.is_some() {
            return refuse("the server cannot bound each update's norm; drop --norm-bound");
        }
        let weighting = match &strategy.privacy {
            Some(privacy) => {
                let settings = privacy.settings();
                if settings.placement == Placement::Central {
                    return refuse(
                        "the server cannot clip each update for central DP; use distributed DP",
                    );
                }
                if matches!(settings.clip, ClipRule::Adaptive(_)) {
                    return refuse(
                        "adaptive clipping cannot see each node's clip indicator; use a fixed clip",
                    );
                }
                Weighting::Uniform
            }
            None => match strategy.aggregation {
                AggregationRule::WeightedMean(weighting) => weighting,
                // Refused above.
                AggregationRule::Robust(_) | AggregationRule::Fair(_) => Weighting::Uniform,
            },
        };
        if weight_cap == 0 {
            return Err(EngineError::Settings(
                "the secure-aggregation weight cap must be at least 1 example".into(),
            ));
        }
        Ok(Self {
            params,
            automatic_threshold: false,
            weight_cap: (weighting == Weighting::Examples).then_some(weight_cap),
        })
    }

    /// The protocol's parameters for a round of `cohort` nodes.
    pub fn params_for(&self, cohort: usize) -> SecAggParams {
        let mut params = self.params;
        if self.automatic_threshold {
            params.threshold = params.majority_threshold(cohort);
        }
        params
    }

    /// The fewest masked inputs a round can be unmasked from: the configured threshold's
    /// floor, or, with an automatic threshold, that of the smallest cohort it serves (3).
    pub fn min_participants(&self) -> usize {
        if self.automatic_threshold {
            self.params_for(MIN_AUTOMATIC_COHORT).min_participants()
        } else {
            self.params.min_participants()
        }
    }

    /// The factor in `[0, 1]` a node with `num_examples` examples folds into its input.
    pub fn weight_factor(&self, num_examples: u64) -> f64 {
        ferry_secagg::weight_factor(num_examples, self.weight_cap)
    }

    /// The aggregator's view of an unmasked sum.
    pub fn update_sum(&self, sum: &SecureSum) -> UpdateSum {
        UpdateSum {
            weighted_delta: sum.weighted_sum.clone(),
            weight: sum.weight,
            participants: sum.contributors.len(),
            num_examples: match self.weight_cap {
                Some(cap) => (sum.weight * cap as f64).round() as u64,
                None => sum.contributors.len() as u64,
            },
        }
    }
}

/// The smallest cohort an automatic threshold serves: 2 of each node's 2 neighbours, so a
/// round needs all 3 masked inputs.
const MIN_AUTOMATIC_COHORT: usize = 3;

/// The HKDF context that binds a round's keys to the run and the round.
pub fn round_context(run: &str, round: u32) -> Vec<u8> {
    format!("ferry/{run}/round/{round}").into_bytes()
}

/// Bytes of a secure round's messages: keys, sealed shares, rosters, inboxes, masked inputs,
/// unmask requests and revealed shares, without transport framing.
pub mod wire_bytes {
    use super::*;

    /// Stage 1 upload.
    pub fn keys(_: &PublicKeys) -> u64 {
        64
    }
    /// Stage 1 download.
    pub fn roster(roster: &Roster) -> u64 {
        (roster.context.len() + 32 + 64 * roster.members.len()) as u64
    }
    /// Stage 2 upload or download.
    pub fn shares(shares: &[SealedShare]) -> u64 {
        shares.iter().map(|s| 8 + s.ciphertext.len() as u64).sum()
    }
    /// Stage 3 upload.
    pub fn masked(input: &MaskedInput, params: &SecAggParams) -> u64 {
        params.packed_bytes(input.values.len()) as u64
    }
    /// Stage 4 download.
    pub fn request(request: &UnmaskRequest) -> u64 {
        4 * (request.survivors.len() + request.dropped.len()) as u64
    }
    /// Stage 4 upload.
    pub fn revealed(shares: &[RevealedShare]) -> u64 {
        37 * shares.len() as u64
    }
}

/// A 32-byte seed drawn from a 64-bit one (simulation: secrets follow the run seed so that a
/// run is reproducible; deployment draws them from the OS).
pub fn seed_bytes(seed: u64) -> [u8; 32] {
    let mut bytes = [0u8; 32];
    for (i, chunk) in bytes.chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&ferry_core::seed::mix_seed(seed, i as u64).to_le_bytes());
    }
    bytes
}

/// Runs `plan`'s round securely over in-process `nodes`: each node keeps its own
/// [`SecAggClient`]; the coordinator's [`SecAggServer`] sees keys, sealed shares, masked
/// inputs and revealed shares, and `open` receives the unmasked sum. An aborted protocol
/// leaves the round without an aggregate; the run goes on.
pub(crate) fn run_round(
    secure: &SecureAggregation,
    plan: &RoundPlan,
    nodes: &[Arc<dyn NodeHandle>],
    parallelism: usize,
    open: &mut OpenRound,
    mut node_returned: impl FnMut(),
) {
    let selected: Vec<&Arc<dyn NodeHandle>> = plan.selected.iter().map(|&i| &nodes[i]).collect();
    let params = secure.params_for(selected.len());
    let dim = plan.task.model.num_params();
    let mut clients: Vec<SecAggClient> = selected
        .iter()
        .map(|node| {
            let seed = ferry_core::seed::mix_seed(plan.task.seed, u64::from(node.id()));
            SecAggClient::new(params, seed_bytes(seed))
        })
        .collect();
    let mut server = SecAggServer::new(
        params,
        round_context("simulation", plan.task.round),
        seed_bytes(plan.task.seed ^ 0x5ec_a66),
        dim,
    );
    let mut traffic = Traffic::default();
    let outcome = (|| -> Result<(), SecAggError> {
        for client in &clients {
            let keys = client.public_keys();
            traffic.up += wire_bytes::keys(&keys);
            server.receive_keys(keys)?;
        }
        let roster = server.close_advertising()?;
        for (id, client) in clients.iter_mut().enumerate() {
            traffic.down += wire_bytes::roster(&roster);
            let sealed = client.share_keys(&roster)?;
            traffic.up += wire_bytes::shares(&sealed);
            server.receive_shares(id as u32, sealed)?;
        }
        server.close_sharing()?;
        let mut updates_ok = vec![false; clients.len()];
        let mut failure: Option<SecAggError> = None;
        dispatch::run_ordered(
            selected.len(),
            parallelism,
            |i| selected[i].train(&plan.task),
            |_| node_returned(),
            |i, result: Result<Update, NodeError>| {
                if failure.is_some() {
                    return;
                }
                let update = match result.and_then(|u| {
                    validate_update(&u, dim).map_err(|e| NodeError {
                        node: selected[i].id(),
                        reason: e.to_string(),
                    })?;
                    Ok(u)
                }) {
                    Ok(update) => update,
                    Err(e) => return open.fail(&e.node.to_string(), e.reason),
                };
                let id = i as u32;
                let Ok(inbox) = server.inbox(id) else {
                    return open.fail(
                        &selected[i].id().to_string(),
                        "left the secure round".into(),
                    );
                };
                traffic.down += wire_bytes::shares(inbox);
                let inbox = inbox.to_vec();
                let weight = secure.weight_factor(update.num_examples);
                match clients[i].mask(&inbox, &update.delta, weight) {
                    Ok(masked) => {
                        traffic.up += wire_bytes::masked(&masked, &params);
                        match server.receive_masked(id, &masked) {
                            Ok(()) => {
                                open.note_secure_update(
                                    &selected[i].id().to_string(),
                                    update.metrics.get("train_loss").copied(),
                                );
                                updates_ok[i] = true;
                            }
                            Err(e) => failure = Some(e),
                        }
                    }
                    Err(e) => open.fail(&selected[i].id().to_string(), e.to_string()),
                }
            },
        );
        if let Some(e) = failure {
            return Err(e);
        }
        let request = server.close_masking()?;
        for (id, client) in clients.iter_mut().enumerate() {
            if !updates_ok[id] {
                continue;
            }
            traffic.down += wire_bytes::request(&request);
            let shares = client.unmask(&request)?;
            traffic.up += wire_bytes::revealed(&shares);
            server.receive_unmask(id as u32, &shares)?;
        }
        let sum = server.finish()?;
        open.accept_sum(&secure.update_sum(&sum))
            .map_err(|e| SecAggError::Aborted(e.to_string()))
    })();
    open.add_protocol_bytes(traffic.up, traffic.down);
    if let Err(e) = outcome {
        open.abort(e.to_string());
    }
}

/// Bytes a secure round moved beyond the model download.
#[derive(Debug, Default)]
struct Traffic {
    up: u64,
    down: u64,
}

#[cfg(test)]
mod tests {
    use ferry_core::strategy::{StrategyName, StrategyParams};

    use super::*;

    #[test]
    fn an_unset_threshold_follows_each_rounds_cohort_and_a_set_one_stays() {
        let fedavg = Strategy::new(StrategyName::FedAvg, &StrategyParams::default(), 10);
        let automatic = SecAggSettings::default()
            .resolve(&fedavg, 10, 100)
            .expect("resolves");
        assert!(automatic.automatic_threshold);
        // Ten nodes: 5 of each node's 9 neighbours, so a round needs 6 masked inputs.
        assert_eq!(automatic.params_for(10).threshold, 5);
        // Six nodes: 3 of 5 neighbours; five left: 3 of 4. Either round finishes without
        // one of its nodes.
        assert_eq!(automatic.params_for(6).threshold, 3);
        assert_eq!(automatic.params_for(6).min_participants(), 4);
        assert_eq!(automatic.params_for(5).min_participants(), 4);
        assert_eq!(automatic.min_participants(), 3);
        let fixed = SecAggSettings {
            threshold: Some(5),
            ..SecAggSettings::default()
        }
        .resolve(&fedavg, 10, 100)
        .expect("resolves");
        assert!(!fixed.automatic_threshold);
        assert_eq!(fixed.params_for(6).threshold, 5);
        assert_eq!(fixed.min_participants(), 6);
    }
}
