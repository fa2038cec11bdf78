//! The node's side of a secure round.

use std::collections::BTreeMap;

use chacha20::ChaCha20Rng;
use curve25519_dalek::Scalar;
use rand_core::SeedableRng;
use x25519_dalek::StaticSecret;

use crate::{
    MaskedInput, PublicKeys, RevealedShare, Roster, SealedShare, SecAggError, SecAggParams,
    ShareKind, UnmaskRequest,
    crypto::{self, Purpose},
    graph::{NeighbourGraph, ParticipantId},
    masks::{self, Sign},
    quantize,
};

/// Bytes of a share plaintext: sender id, recipient id, then the two shares.
const SHARE_PLAINTEXT: usize = 4 + 4 + 32 + 32;

/// One node's secrets and progress through a secure round.
pub struct SecAggClient {
    params: SecAggParams,
    rng: ChaCha20Rng,
    cipher_secret: StaticSecret,
    mask_scalar: Scalar,
    self_seed: Scalar,
    stage: Stage,
}

enum Stage {
    Advertised,
    Shared(Joined),
    Masked(BTreeMap<ParticipantId, HeldShares>),
    Done,
}

/// What a node knows once the roster is out.
struct Joined {
    me: ParticipantId,
    roster: Roster,
    graph: NeighbourGraph,
}

/// The shares a neighbour gave this node.
struct HeldShares {
    self_seed: [u8; 32],
    masking_key: [u8; 32],
}

impl SecAggClient {
    /// A node's fresh secrets for one round, drawn from `rng_seed` (OS entropy in deployment,
    /// the run seed in simulation).
    pub fn new(params: SecAggParams, rng_seed: [u8; 32]) -> Self {
        let mut rng = ChaCha20Rng::from_seed(rng_seed);
        let cipher_secret = crypto::secret_from_scalar(&crypto::random_scalar(&mut rng));
        let mask_scalar = crypto::random_scalar(&mut rng);
        let self_seed = crypto::random_scalar(&mut rng);
        Self {
            params,
            rng,
            cipher_secret,
            mask_scalar,
            self_seed,
            stage: Stage::Advertised,
        }
    }

    /// A node's fresh secrets for one round, drawn from the operating system's entropy (what
    /// a deployed node uses, so the server cannot predict them).
    pub fn from_os_entropy(params: SecAggParams) -> Result<Self, SecAggError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed)
            .map_err(|e| SecAggError::Params(format!("no operating-system entropy: {e}")))?;
        Ok(Self::new(params, seed))
    }

    /// Stage 1: the public keys to advertise.
    pub fn public_keys(&self) -> PublicKeys {
        PublicKeys {
            cipher: crypto::public_of(&self.cipher_secret),
            mask: crypto::public_of(&crypto::secret_from_scalar(&self.mask_scalar)),
        }
    }

    /// Stage 2: finds this node in `roster`, shares its two secrets among its neighbours and
    /// seals each neighbour's shares for that neighbour alone.
    pub fn share_keys(&mut self, roster: &Roster) -> Result<Vec<SealedShare>, SecAggError> {
        if !matches!(self.stage, Stage::Advertised) {
            return Err(SecAggError::Stage("keys were already shared".into()));
        }
        let mine = self.public_keys();
        let me = roster
            .members
            .iter()
            .position(|keys| *keys == mine)
            .ok_or_else(|| SecAggError::Malformed("the roster leaves this node out".into()))?
            as ParticipantId;
        self.params.validate(roster.members.len())?;
        let neighbourhood = self.params.neighbourhood(roster.members.len());
        let graph = NeighbourGraph::new(roster.members.len(), neighbourhood, roster.graph_seed);
        let neighbours = graph.neighbours(me).to_vec();
        let threshold = self.params.threshold;
        let seed_shares =
            crypto::split(&self.self_seed, threshold, neighbours.len(), &mut self.rng)?;
        let key_shares = crypto::split(
            &self.mask_scalar,
            threshold,
            neighbours.len(),
            &mut self.rng,
        )?;
        let mut sealed = Vec::with_capacity(neighbours.len());
        for (i, &peer) in neighbours.iter().enumerate() {
            let mut plaintext = Vec::with_capacity(SHARE_PLAINTEXT);
            plaintext.extend_from_slice(&me.to_le_bytes());
            plaintext.extend_from_slice(&peer.to_le_bytes());
            plaintext.extend_from_slice(&seed_shares[i]);
            plaintext.extend_from_slice(&key_shares[i]);
            let key = crypto::agree(
                &self.cipher_secret,
                &roster.members[peer as usize].cipher,
                Purpose::ShareEncryption,
                &roster.context,
                (me, peer),
            )?;
            sealed.push(SealedShare {
                from: me,
                to: peer,
                ciphertext: crypto::seal(&key, &plaintext, &share_aad(&roster.context, me, peer))?,
            });
        }
        self.stage = Stage::Shared(Joined {
            me,
            roster: roster.clone(),
            graph,
        });
        Ok(sealed)
    }

    /// Stage 3: opens the shares neighbours sent (`inbox`), then masks `values` weighted by
    /// `weight` (in `[0, 1]`) with this node's self mask and a pairwise mask per neighbour
    /// that shared keys.
    pub fn mask(
        &mut self,
        inbox: &[SealedShare],
        values: &[f32],
        weight: f64,
    ) -> Result<MaskedInput, SecAggError> {
        if !(0.0..=1.0).contains(&weight) {
            return Err(SecAggError::Params(format!(
                "the weight factor must be in [0, 1], got {weight}"
            )));
        }
        let joined = match std::mem::replace(&mut self.stage, Stage::Done) {
            Stage::Shared(joined) => joined,
            other => {
                self.stage = other;
                return Err(SecAggError::Stage(
                    "mask comes after share_keys, once".into(),
                ));
            }
        };
        match self.mask_with(&joined, inbox, values, weight) {
            Ok((masked, held)) => {
                self.stage = Stage::Masked(held);
                Ok(masked)
            }
            Err(e) => {
                // A refused inbox leaves the node able to take a corrected one.
                self.stage = Stage::Shared(joined);
                Err(e)
            }
        }
    }

    fn mask_with(
        &mut self,
        joined: &Joined,
        inbox: &[SealedShare],
        values: &[f32],
        weight: f64,
    ) -> Result<(MaskedInput, BTreeMap<ParticipantId, HeldShares>), SecAggError> {
        let held = self.open_inbox(joined, inbox)?;
        if held.len() < self.params.threshold {
            return Err(SecAggError::Aborted(format!(
                "only {} neighbours shared keys, fewer than the threshold {}",
                held.len(),
                self.params.threshold
            )));
        }
        let mut vector = quantize::encode(values, weight, &self.params, &mut self.rng);
        masks::apply_mask(
            &mut vector,
            &self.self_seed.to_bytes(),
            Sign::Plus,
            &self.params,
        );
        let mask_secret = crypto::secret_from_scalar(&self.mask_scalar);
        for &peer in held.keys() {
            let pair = (joined.me.min(peer), joined.me.max(peer));
            let seed = crypto::agree(
                &mask_secret,
                &joined.roster.members[peer as usize].mask,
                Purpose::PairwiseMask,
                &joined.roster.context,
                pair,
            )?;
            let sign = if joined.me < peer {
                Sign::Plus
            } else {
                Sign::Minus
            };
            masks::apply_mask(&mut vector, &seed, sign, &self.params);
        }
        Ok((MaskedInput { values: vector }, held))
    }

    fn open_inbox(
        &self,
        joined: &Joined,
        inbox: &[SealedShare],
    ) -> Result<BTreeMap<ParticipantId, HeldShares>, SecAggError> {
        let mut held = BTreeMap::new();
        for share in inbox {
            if share.to != joined.me || !joined.graph.neighbours(joined.me).contains(&share.from) {
                return Err(SecAggError::Malformed(format!(
                    "a share from {} to {} was delivered to {}",
                    share.from, share.to, joined.me
                )));
            }
            let key = crypto::agree(
                &self.cipher_secret,
                &joined.roster.members[share.from as usize].cipher,
                Purpose::ShareEncryption,
                &joined.roster.context,
                (share.from, joined.me),
            )?;
            let aad = share_aad(&joined.roster.context, share.from, joined.me);
            let plaintext = crypto::open(&key, &share.ciphertext, &aad)?;
            if plaintext.len() != SHARE_PLAINTEXT
                || plaintext[..4] != share.from.to_le_bytes()
                || plaintext[4..8] != joined.me.to_le_bytes()
            {
                return Err(SecAggError::Malformed(
                    "a share names the wrong pair".into(),
                ));
            }
            let mut self_seed = [0u8; 32];
            let mut masking_key = [0u8; 32];
            self_seed.copy_from_slice(&plaintext[8..40]);
            masking_key.copy_from_slice(&plaintext[40..72]);
            let duplicate = held
                .insert(
                    share.from,
                    HeldShares {
                        self_seed,
                        masking_key,
                    },
                )
                .is_some();
            if duplicate {
                return Err(SecAggError::Malformed(format!(
                    "two shares from {} were delivered",
                    share.from
                )));
            }
        }
        Ok(held)
    }

    /// Stage 4: reveals the self-mask-seed share of each surviving neighbour and the
    /// masking-key share of each neighbour that dropped. Refuses outright if any neighbour is
    /// named both ways, since the two shares together would unmask that neighbour's update.
    pub fn unmask(&mut self, request: &UnmaskRequest) -> Result<Vec<RevealedShare>, SecAggError> {
        if let Some(both) = request
            .survivors
            .iter()
            .find(|id| request.dropped.contains(id))
        {
            return Err(SecAggError::Refused(format!(
                "node {both} is named both a survivor and dropped; revealing both of its \
                 shares would expose its update"
            )));
        }
        let held = match std::mem::replace(&mut self.stage, Stage::Done) {
            Stage::Masked(held) => held,
            other => {
                self.stage = other;
                return Err(SecAggError::Stage("unmask comes after mask, once".into()));
            }
        };
        let mut revealed = Vec::new();
        for (&owner, shares) in &held {
            if request.survivors.contains(&owner) {
                revealed.push(RevealedShare {
                    owner,
                    kind: ShareKind::SelfMaskSeed,
                    value: shares.self_seed,
                });
            } else if request.dropped.contains(&owner) {
                revealed.push(RevealedShare {
                    owner,
                    kind: ShareKind::MaskingKey,
                    value: shares.masking_key,
                });
            }
        }
        Ok(revealed)
    }
}

/// Associated data of a sealed share: the round and the ordered pair.
fn share_aad(context: &[u8], from: ParticipantId, to: ParticipantId) -> Vec<u8> {
    let mut aad = context.to_vec();
    aad.extend_from_slice(&from.to_le_bytes());
    aad.extend_from_slice(&to.to_le_bytes());
    aad
}
