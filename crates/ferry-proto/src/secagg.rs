//! Conversions between the SecAgg+ messages of `ferry.v1` and ferry-secagg's types, so that
//! the server and the node agent read and write them the same way.

use ferry_secagg::{
    MaskedInput, PublicKeys, RevealedShare, Roster, SealedShare, SecAggError, SecAggParams,
    ShareKind, UnmaskRequest,
};

use crate::v1;

fn key(bytes: &[u8], what: &str) -> Result<[u8; 32], SecAggError> {
    bytes.try_into().map_err(|_| {
        SecAggError::Malformed(format!("{what} must be 32 bytes, got {}", bytes.len()))
    })
}

/// A node's keys on the wire.
pub fn keys_to_wire(keys: &PublicKeys) -> v1::SecAggKeys {
    v1::SecAggKeys {
        cipher: keys.cipher.to_vec(),
        mask: keys.mask.to_vec(),
    }
}

/// A node's keys from the wire.
pub fn keys_from_wire(keys: &v1::SecAggKeys) -> Result<PublicKeys, SecAggError> {
    Ok(PublicKeys {
        cipher: key(&keys.cipher, "a cipher public key")?,
        mask: key(&keys.mask, "a mask public key")?,
    })
}

/// The roster on the wire.
pub fn roster_to_wire(roster: &Roster) -> v1::SecAggRoster {
    v1::SecAggRoster {
        context: roster.context.clone(),
        graph_seed: roster.graph_seed.to_vec(),
        members: roster.members.iter().map(keys_to_wire).collect(),
    }
}

/// The roster from the wire.
pub fn roster_from_wire(roster: &v1::SecAggRoster) -> Result<Roster, SecAggError> {
    Ok(Roster {
        context: roster.context.clone(),
        graph_seed: key(&roster.graph_seed, "the graph seed")?,
        members: roster
            .members
            .iter()
            .map(keys_from_wire)
            .collect::<Result<_, _>>()?,
    })
}

/// Sealed shares on the wire.
pub fn shares_to_wire(shares: &[SealedShare]) -> v1::SecAggSealedShares {
    v1::SecAggSealedShares {
        shares: shares
            .iter()
            .map(|s| v1::SecAggSealedShare {
                from: s.from,
                to: s.to,
                ciphertext: s.ciphertext.clone(),
            })
            .collect(),
    }
}

/// Sealed shares from the wire.
pub fn shares_from_wire(shares: &v1::SecAggSealedShares) -> Vec<SealedShare> {
    shares
        .shares
        .iter()
        .map(|s| SealedShare {
            from: s.from,
            to: s.to,
            ciphertext: s.ciphertext.clone(),
        })
        .collect()
}

/// The unmask request on the wire.
pub fn request_to_wire(request: &UnmaskRequest) -> v1::SecAggUnmaskRequest {
    v1::SecAggUnmaskRequest {
        survivors: request.survivors.clone(),
        dropped: request.dropped.clone(),
    }
}

/// The unmask request from the wire.
pub fn request_from_wire(request: &v1::SecAggUnmaskRequest) -> UnmaskRequest {
    UnmaskRequest {
        survivors: request.survivors.clone(),
        dropped: request.dropped.clone(),
    }
}

/// Revealed shares on the wire.
pub fn revealed_to_wire(shares: &[RevealedShare]) -> v1::SecAggRevealedShares {
    v1::SecAggRevealedShares {
        shares: shares
            .iter()
            .map(|s| v1::SecAggRevealedShare {
                owner: s.owner,
                kind: match s.kind {
                    ShareKind::SelfMaskSeed => v1::SecAggShareKind::SelfMaskSeed,
                    ShareKind::MaskingKey => v1::SecAggShareKind::MaskingKey,
                } as i32,
                value: s.value.to_vec(),
            })
            .collect(),
    }
}

/// Revealed shares from the wire.
pub fn revealed_from_wire(
    shares: &v1::SecAggRevealedShares,
) -> Result<Vec<RevealedShare>, SecAggError> {
    shares
        .shares
        .iter()
        .map(|s| {
            let kind = match v1::SecAggShareKind::try_from(s.kind) {
                Ok(v1::SecAggShareKind::SelfMaskSeed) => ShareKind::SelfMaskSeed,
                Ok(v1::SecAggShareKind::MaskingKey) => ShareKind::MaskingKey,
                _ => {
                    return Err(SecAggError::Malformed(format!(
                        "unknown share kind {}",
                        s.kind
                    )));
                }
            };
            Ok(RevealedShare {
                owner: s.owner,
                kind,
                value: key(&s.value, "a revealed share")?,
            })
        })
        .collect()
}

/// A round's SecAgg+ parameters and weight cap (`None`: every node weighs 1) on the wire.
pub fn task_to_wire(params: &SecAggParams, weight_cap: Option<u64>) -> v1::SecAggTask {
    v1::SecAggTask {
        neighbours: params.neighbours as u32,
        threshold: params.threshold as u32,
        clip: params.clip,
        quantization_bits: params.quantization_bits,
        modulus_bits: params.modulus_bits,
        weight_cap: weight_cap.unwrap_or(0),
    }
}

/// A round's SecAgg+ parameters and weight cap from the wire.
pub fn task_from_wire(task: &v1::SecAggTask) -> (SecAggParams, Option<u64>) {
    (
        SecAggParams {
            neighbours: task.neighbours as usize,
            threshold: task.threshold as usize,
            clip: task.clip,
            quantization_bits: task.quantization_bits,
            modulus_bits: task.modulus_bits,
        },
        (task.weight_cap > 0).then_some(task.weight_cap),
    )
}

/// A masked input as uploaded: its values bit-packed at the modulus width.
pub fn masked_to_bytes(input: &MaskedInput, params: &SecAggParams) -> Vec<u8> {
    ferry_secagg::pack(&input.values, params)
}

/// A masked input of `values` coordinates from uploaded bytes.
pub fn masked_from_bytes(
    bytes: &[u8],
    values: usize,
    params: &SecAggParams,
) -> Result<MaskedInput, SecAggError> {
    Ok(MaskedInput {
        values: ferry_secagg::unpack(bytes, values, params)?,
    })
}

/// Starts a relay's masked sum (what it uploads in place of its nodes' masked inputs).
const MASKED_SUM_MAGIC: &[u8; 8] = b"FMSUM01\n";

/// A relay's sum of several nodes' masked inputs, with the nodes it sums.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaskedSum {
    /// The nodes whose masked inputs are in the sum, in node order.
    pub contributors: Vec<String>,
    /// The sum, modulo `2^modulus_bits`.
    pub input: MaskedInput,
}

/// A masked sum as uploaded: the magic, the contributor count (u32, little-endian), each
/// contributor's id (u16 length, then UTF-8), then the values bit-packed at the modulus width.
pub fn masked_sum_to_bytes(sum: &MaskedSum, params: &SecAggParams) -> Vec<u8> {
    let mut bytes = MASKED_SUM_MAGIC.to_vec();
    bytes.extend_from_slice(&(sum.contributors.len() as u32).to_le_bytes());
    for node in &sum.contributors {
        bytes.extend_from_slice(&(node.len() as u16).to_le_bytes());
        bytes.extend_from_slice(node.as_bytes());
    }
    bytes.extend(masked_to_bytes(&sum.input, params));
    bytes
}

/// The contributors a masked sum names, and the packed values after them.
pub fn masked_sum_contributors(bytes: &[u8]) -> Result<(Vec<String>, &[u8]), SecAggError> {
    let malformed = |why: &str| SecAggError::Malformed(format!("a relay's masked sum: {why}"));
    let rest = bytes
        .strip_prefix(MASKED_SUM_MAGIC)
        .ok_or_else(|| malformed("it does not start as one"))?;
    let (count, mut rest) = rest
        .split_first_chunk::<4>()
        .ok_or_else(|| malformed("it ends before its contributor count"))?;
    let count = u32::from_le_bytes(*count) as usize;
    let mut contributors = Vec::with_capacity(count.min(rest.len() / 2));
    for _ in 0..count {
        let (len, tail) = rest
            .split_first_chunk::<2>()
            .ok_or_else(|| malformed("it ends inside its contributors"))?;
        let len = usize::from(u16::from_le_bytes(*len));
        if tail.len() < len {
            return Err(malformed("it ends inside a contributor's id"));
        }
        let (id, tail) = tail.split_at(len);
        let id =
            std::str::from_utf8(id).map_err(|_| malformed("a contributor's id is not UTF-8"))?;
        contributors.push(id.to_string());
        rest = tail;
    }
    Ok((contributors, rest))
}

/// A masked sum of `values` coordinates from uploaded bytes.
pub fn masked_sum_from_bytes(
    bytes: &[u8],
    values: usize,
    params: &SecAggParams,
) -> Result<MaskedSum, SecAggError> {
    let (contributors, packed) = masked_sum_contributors(bytes)?;
    Ok(MaskedSum {
        contributors,
        input: masked_from_bytes(packed, values, params)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_survive_the_wire() {
        let keys = PublicKeys {
            cipher: [1; 32],
            mask: [2; 32],
        };
        let roster = Roster {
            context: b"ctx".to_vec(),
            graph_seed: [3; 32],
            members: vec![keys, keys],
        };
        assert_eq!(roster_from_wire(&roster_to_wire(&roster)).unwrap(), roster);
        let revealed = vec![RevealedShare {
            owner: 4,
            kind: ShareKind::MaskingKey,
            value: [5; 32],
        }];
        assert_eq!(
            revealed_from_wire(&revealed_to_wire(&revealed)).unwrap(),
            revealed
        );
        let params = SecAggParams::default();
        assert_eq!(
            task_from_wire(&task_to_wire(&params, Some(60))),
            (params, Some(60))
        );
        let short = v1::SecAggKeys {
            cipher: vec![0; 31],
            mask: vec![0; 32],
        };
        assert!(keys_from_wire(&short).is_err());
    }

    #[test]
    fn a_masked_sum_survives_the_wire_and_a_cut_one_is_refused() {
        let params = SecAggParams::default();
        let sum = MaskedSum {
            contributors: vec!["node-a".into(), "node-b".into()],
            input: MaskedInput {
                values: vec![1, 2, 3, u64::from(u32::MAX)],
            },
        };
        let bytes = masked_sum_to_bytes(&sum, &params);
        assert_eq!(masked_sum_from_bytes(&bytes, 4, &params).unwrap(), sum);
        assert_eq!(masked_sum_contributors(&bytes).unwrap().0, sum.contributors);
        for cut in [3, 10, 14, bytes.len() - 1] {
            assert!(
                masked_sum_from_bytes(&bytes[..cut], 4, &params).is_err(),
                "{cut}"
            );
        }
        let input = masked_to_bytes(&sum.input, &params);
        assert!(
            masked_sum_from_bytes(&input, 4, &params).is_err(),
            "a node's own input is not a sum"
        );
    }
}
