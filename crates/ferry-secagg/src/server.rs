//! The coordinator's side of a secure round. It routes sealed shares it cannot read, keeps
//! one running sum of the masked inputs (never an individual input), and removes the masks
//! from the sum once enough shares are revealed.

use std::collections::{BTreeMap, BTreeSet};

use crate::{
    MaskedInput, PublicKeys, RevealedShare, Roster, SealedShare, SecAggError, SecAggParams,
    ShareKind, UnmaskRequest,
    crypto::{self, Purpose},
    graph::{NeighbourGraph, ParticipantId},
    masks::{self, Sign},
    quantize,
};

/// The unmasked result of a secure round.
#[derive(Debug, Clone, PartialEq)]
pub struct SecureSum {
    /// Sum over contributors of `weight_i * clip(update_i)`, within
    /// [`crate::max_sum_error`] per coordinate.
    pub weighted_sum: Vec<f32>,
    /// Sum of the contributors' weight factors.
    pub weight: f64,
    /// Participant ids whose masked input is in the sum.
    pub contributors: Vec<ParticipantId>,
}

/// The coordinator's state for one secure round.
pub struct SecAggServer {
    params: SecAggParams,
    context: Vec<u8>,
    graph_seed: [u8; 32],
    dim: usize,
    stage: Stage,
}

enum Stage {
    Advertising(Vec<PublicKeys>),
    Sharing(Joined, BTreeMap<ParticipantId, Vec<SealedShare>>),
    Masking(Joined, Routed, Vec<u64>),
    Unmasking(Joined, Routed, Vec<u64>, Revealed),
    Finished,
}

struct Joined {
    roster: Roster,
    graph: NeighbourGraph,
}

/// Nodes that shared keys (U2) and the sealed shares waiting for each of them.
struct Routed {
    shared: BTreeSet<ParticipantId>,
    inboxes: BTreeMap<ParticipantId, Vec<SealedShare>>,
    masked: BTreeSet<ParticipantId>,
}

/// Shamir shares of one secret: `(index, value)`.
type ShareList = Vec<(usize, [u8; 32])>;

/// Shares revealed in stage 4, by owner and kind, with their Shamir index.
struct Revealed {
    request: UnmaskRequest,
    responded: BTreeSet<ParticipantId>,
    shares: BTreeMap<(ParticipantId, ShareKind), ShareList>,
}

impl SecAggServer {
    /// A round over updates of `dim` values; `context` names the round (every derived key is
    /// bound to it) and `graph_seed` places the nodes on the neighbour graph.
    pub fn new(params: SecAggParams, context: Vec<u8>, graph_seed: [u8; 32], dim: usize) -> Self {
        Self {
            params,
            context,
            graph_seed,
            dim,
            stage: Stage::Advertising(Vec::new()),
        }
    }

    /// Values in one node's masked input: the update's coordinates and its weight slot.
    pub fn input_len(&self) -> usize {
        self.dim + 1
    }

    /// Stage 1: records a node's public keys; returns its participant id.
    pub fn receive_keys(&mut self, keys: PublicKeys) -> Result<ParticipantId, SecAggError> {
        let Stage::Advertising(members) = &mut self.stage else {
            return Err(SecAggError::Stage("key advertising is closed".into()));
        };
        if members
            .iter()
            .any(|m| m.cipher == keys.cipher || m.mask == keys.mask)
        {
            return Err(SecAggError::Malformed(
                "a public key was advertised twice".into(),
            ));
        }
        members.push(keys);
        Ok((members.len() - 1) as ParticipantId)
    }

    /// Ends stage 1 and publishes the roster; aborts when too few nodes advertised.
    pub fn close_advertising(&mut self) -> Result<Roster, SecAggError> {
        let Stage::Advertising(members) = std::mem::replace(&mut self.stage, Stage::Finished)
        else {
            return Err(SecAggError::Stage("key advertising is closed".into()));
        };
        if members.len() <= self.params.threshold {
            return Err(SecAggError::Aborted(format!(
                "{} nodes advertised keys; a threshold of {} needs at least {}",
                members.len(),
                self.params.threshold,
                self.params.threshold + 1
            )));
        }
        self.params.validate(members.len())?;
        let roster = Roster {
            context: self.context.clone(),
            graph_seed: self.graph_seed,
            members,
        };
        let neighbourhood = self.params.neighbourhood(roster.members.len());
        let graph = NeighbourGraph::new(roster.members.len(), neighbourhood, self.graph_seed);
        self.stage = Stage::Sharing(
            Joined {
                roster: roster.clone(),
                graph,
            },
            BTreeMap::new(),
        );
        Ok(roster)
    }

    /// Stage 2: takes a node's sealed shares, one for each of its neighbours.
    pub fn receive_shares(
        &mut self,
        from: ParticipantId,
        shares: Vec<SealedShare>,
    ) -> Result<(), SecAggError> {
        let Stage::Sharing(joined, sent) = &mut self.stage else {
            return Err(SecAggError::Stage("key sharing is closed".into()));
        };
        let neighbours = joined.graph.neighbours(from);
        let addressed: BTreeSet<ParticipantId> = shares.iter().map(|s| s.to).collect();
        let well_formed = shares.len() == neighbours.len()
            && shares.iter().all(|s| s.from == from)
            && addressed.iter().copied().eq(neighbours.iter().copied());
        if !well_formed {
            return Err(SecAggError::Malformed(format!(
                "node {from} must send one share to each of its {} neighbours",
                neighbours.len()
            )));
        }
        if sent.insert(from, shares).is_some() {
            return Err(SecAggError::Malformed(format!(
                "node {from} shared keys twice"
            )));
        }
        Ok(())
    }

    /// Ends stage 2. Nodes left with fewer than `threshold` neighbours that shared keys are
    /// dropped (their secrets could not be rebuilt); the rest get their inboxes.
    pub fn close_sharing(&mut self) -> Result<(), SecAggError> {
        let Stage::Sharing(joined, mut sent) = std::mem::replace(&mut self.stage, Stage::Finished)
        else {
            return Err(SecAggError::Stage("key sharing is closed".into()));
        };
        let mut shared: BTreeSet<ParticipantId> = sent.keys().copied().collect();
        loop {
            let short: Vec<ParticipantId> = shared
                .iter()
                .copied()
                .filter(|&u| {
                    let live = joined
                        .graph
                        .neighbours(u)
                        .iter()
                        .filter(|v| shared.contains(v))
                        .count();
                    live < self.params.threshold
                })
                .collect();
            if short.is_empty() {
                break;
            }
            for u in short {
                shared.remove(&u);
            }
        }
        if shared.len() <= self.params.threshold {
            return Err(SecAggError::Aborted(format!(
                "only {} nodes shared keys with enough neighbours; the threshold is {}",
                shared.len(),
                self.params.threshold
            )));
        }
        let mut inboxes: BTreeMap<ParticipantId, Vec<SealedShare>> =
            shared.iter().map(|&u| (u, Vec::new())).collect();
        for (from, shares) in std::mem::take(&mut sent) {
            if !shared.contains(&from) {
                continue;
            }
            for share in shares {
                if let Some(inbox) = inboxes.get_mut(&share.to) {
                    inbox.push(share);
                }
            }
        }
        self.stage = Stage::Masking(
            joined,
            Routed {
                shared,
                inboxes,
                masked: BTreeSet::new(),
            },
            vec![0; self.dim + 1],
        );
        Ok(())
    }

    /// The sealed shares waiting for `id` in stage 3; fails for a node that is no longer in
    /// the round.
    pub fn inbox(&self, id: ParticipantId) -> Result<&[SealedShare], SecAggError> {
        let Stage::Masking(_, routed, _) = &self.stage else {
            return Err(SecAggError::Stage(
                "inboxes are open in stage 3 only".into(),
            ));
        };
        routed
            .inboxes
            .get(&id)
            .map(Vec::as_slice)
            .ok_or_else(|| SecAggError::Aborted(format!("node {id} is no longer in the round")))
    }

    /// Stage 3: folds a node's masked input into the running masked sum.
    pub fn receive_masked(
        &mut self,
        from: ParticipantId,
        input: &MaskedInput,
    ) -> Result<(), SecAggError> {
        self.receive_masked_sum(&[from], input)
    }

    /// Stage 3: folds the sum of several nodes' masked inputs (taken by a relay, modulo the
    /// same modulus) into the running masked sum, as if each had arrived alone; all of them
    /// count, or none.
    pub fn receive_masked_sum(
        &mut self,
        from: &[ParticipantId],
        input: &MaskedInput,
    ) -> Result<(), SecAggError> {
        let Stage::Masking(_, routed, sum) = &mut self.stage else {
            return Err(SecAggError::Stage("masked input is closed".into()));
        };
        let mut seen = BTreeSet::new();
        for &id in from {
            if !routed.shared.contains(&id) {
                return Err(SecAggError::Malformed(format!(
                    "node {id} did not share keys in this round"
                )));
            }
            if routed.masked.contains(&id) || !seen.insert(id) {
                return Err(SecAggError::Malformed(format!(
                    "node {id} sent its masked input twice"
                )));
            }
        }
        if seen.is_empty() {
            return Err(SecAggError::Malformed("a masked sum of no node".into()));
        }
        if input.values.len() != sum.len() {
            return Err(SecAggError::Malformed(format!(
                "a masked input of {} values, expected {}",
                input.values.len(),
                sum.len()
            )));
        }
        if input
            .values
            .iter()
            .any(|&v| v & !self.params.modulus_mask() != 0)
        {
            return Err(SecAggError::Malformed(
                "a masked value lies outside the modulus".into(),
            ));
        }
        routed.masked.extend(seen);
        masks::add_into(sum, &input.values, &self.params);
        Ok(())
    }

    /// Every vector the server holds at this moment (for audits and tests): the running
    /// masked sum during stages 3 and 4, nothing before.
    pub fn held_vectors(&self) -> Vec<&[u64]> {
        match &self.stage {
            Stage::Masking(_, _, sum) | Stage::Unmasking(_, _, sum, _) => vec![sum.as_slice()],
            _ => Vec::new(),
        }
    }

    /// Ends stage 3 and says whose secrets each responder must reveal.
    pub fn close_masking(&mut self) -> Result<UnmaskRequest, SecAggError> {
        let Stage::Masking(joined, routed, sum) =
            std::mem::replace(&mut self.stage, Stage::Finished)
        else {
            return Err(SecAggError::Stage("masked input is closed".into()));
        };
        if routed.masked.is_empty() {
            return Err(SecAggError::Aborted("no masked input arrived".into()));
        }
        let request = UnmaskRequest {
            survivors: routed.masked.iter().copied().collect(),
            dropped: routed.shared.difference(&routed.masked).copied().collect(),
        };
        self.stage = Stage::Unmasking(
            joined,
            routed,
            sum,
            Revealed {
                request: request.clone(),
                responded: BTreeSet::new(),
                shares: BTreeMap::new(),
            },
        );
        Ok(request)
    }

    /// Stage 4: takes the shares one survivor reveals; refuses the whole response if any
    /// share is of the wrong kind or owner.
    pub fn receive_unmask(
        &mut self,
        from: ParticipantId,
        shares: &[RevealedShare],
    ) -> Result<(), SecAggError> {
        let Stage::Unmasking(joined, routed, _, revealed) = &mut self.stage else {
            return Err(SecAggError::Stage("unmasking is closed".into()));
        };
        if !routed.masked.contains(&from) || revealed.responded.contains(&from) {
            return Err(SecAggError::Malformed(format!(
                "node {from} may not answer the unmask request"
            )));
        }
        let mut indexed = Vec::with_capacity(shares.len());
        for share in shares {
            let expected = if routed.masked.contains(&share.owner) {
                ShareKind::SelfMaskSeed
            } else {
                ShareKind::MaskingKey
            };
            let index = joined.graph.share_index(share.owner, from);
            match index {
                Some(index) if share.kind == expected && routed.shared.contains(&share.owner) => {
                    indexed.push(((share.owner, share.kind), (index, share.value)));
                }
                _ => {
                    return Err(SecAggError::Malformed(format!(
                        "node {from} revealed a share it was not asked for (owner {})",
                        share.owner
                    )));
                }
            }
        }
        revealed.responded.insert(from);
        for (key, share) in indexed {
            revealed.shares.entry(key).or_default().push(share);
        }
        Ok(())
    }

    /// Ends the round: rebuilds the survivors' self-mask seeds and the dropped nodes'
    /// masking keys, removes every mask from the sum and decodes it.
    pub fn finish(&mut self) -> Result<SecureSum, SecAggError> {
        let Stage::Unmasking(joined, routed, mut sum, revealed) =
            std::mem::replace(&mut self.stage, Stage::Finished)
        else {
            return Err(SecAggError::Stage(
                "finish comes after close_masking".into(),
            ));
        };
        let rebuild = |owner: ParticipantId, kind: ShareKind| {
            let shares = revealed
                .shares
                .get(&(owner, kind))
                .map_or(&[][..], Vec::as_slice);
            if shares.len() < self.params.threshold {
                return Err(SecAggError::Aborted(format!(
                    "{} of node {owner}'s neighbours revealed shares; the threshold is {}",
                    shares.len(),
                    self.params.threshold
                )));
            }
            crypto::combine(&shares[..self.params.threshold])
        };
        for &u in &revealed.request.survivors {
            let seed = rebuild(u, ShareKind::SelfMaskSeed)?;
            masks::apply_mask(&mut sum, &seed.to_bytes(), Sign::Minus, &self.params);
        }
        for &u in &revealed.request.dropped {
            let live: Vec<ParticipantId> = joined
                .graph
                .neighbours(u)
                .iter()
                .copied()
                .filter(|v| routed.masked.contains(v))
                .collect();
            if live.is_empty() {
                continue;
            }
            let key = rebuild(u, ShareKind::MaskingKey)?;
            let secret = crypto::secret_from_scalar(&key);
            if crypto::public_of(&secret) != joined.roster.members[u as usize].mask {
                return Err(SecAggError::Aborted(format!(
                    "node {u}'s rebuilt masking key does not match its advertised key"
                )));
            }
            for v in live {
                let pair = (u.min(v), u.max(v));
                let seed = crypto::agree(
                    &secret,
                    &joined.roster.members[v as usize].mask,
                    Purpose::PairwiseMask,
                    &joined.roster.context,
                    pair,
                )?;
                // v added this mask with sign + when v < u; take it back out.
                let undo = if v < u { Sign::Minus } else { Sign::Plus };
                masks::apply_mask(&mut sum, &seed, undo, &self.params);
            }
        }
        let (weighted_sum, weight) = quantize::decode(&sum, routed.masked.len(), &self.params);
        Ok(SecureSum {
            weighted_sum,
            weight,
            contributors: revealed.request.survivors.clone(),
        })
    }
}
