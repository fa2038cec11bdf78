//! What travels between nodes and the server in the four stages of a secure round.

use crate::graph::ParticipantId;

/// Stage 1 (advertise keys): a node's two public keys for this round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublicKeys {
    /// X25519 key that peers use to encrypt the shares they send this node.
    pub cipher: [u8; 32],
    /// X25519 key that peers use to agree pairwise masks with this node.
    pub mask: [u8; 32],
}

/// The server's answer to stage 1: who takes part, in roster order (a node's participant id
/// is its position here), and the public seed that places them on the neighbour graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Roster {
    /// Binds every derived key to this round (HKDF salt).
    pub context: Vec<u8>,
    /// Places the participants on the neighbour graph.
    pub graph_seed: [u8; 32],
    /// The advertised keys, by participant id.
    pub members: Vec<PublicKeys>,
}

/// Stage 2 (share keys): one node's shares of its secrets, encrypted for one neighbour and
/// routed by the server, which cannot read them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedShare {
    /// The node whose secrets these are.
    pub from: ParticipantId,
    /// The neighbour that can open them.
    pub to: ParticipantId,
    /// ChaCha20-Poly1305 ciphertext of both shares.
    pub ciphertext: Vec<u8>,
}

/// Stage 3 (masked input): a node's quantised, weighted update plus its masks, modulo
/// `2^modulus_bits`; alone it reveals nothing about the update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaskedInput {
    /// One value per model coordinate, then the weight slot.
    pub values: Vec<u64>,
}

/// Stage 4 request (unmask): whose masked input arrived and who dropped after sharing keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnmaskRequest {
    /// Nodes whose masked input arrived: their self-mask seeds are to be rebuilt.
    pub survivors: Vec<ParticipantId>,
    /// Nodes that shared keys but sent no masked input: their masking keys are to be rebuilt.
    pub dropped: Vec<ParticipantId>,
}

/// Which of a node's two secrets a share belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ShareKind {
    /// The seed of the node's self mask (revealed for survivors).
    SelfMaskSeed,
    /// The node's masking key (revealed for nodes that dropped).
    MaskingKey,
}

/// One share a node reveals in stage 4.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RevealedShare {
    /// The node whose secret this share is of.
    pub owner: ParticipantId,
    /// Which secret.
    pub kind: ShareKind,
    /// The share's value (a canonical curve25519 scalar).
    pub value: [u8; 32],
}
