//! Masks expanded from 32-byte seeds with ChaCha20, and vectors modulo `2^modulus_bits`.

use chacha20::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};

use crate::{MaskedInput, SecAggError, SecAggParams};

/// Whether a mask is added to or taken from a vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sign {
    Plus,
    Minus,
}

/// Elements expanded per keystream request.
const BLOCK: usize = 4096;

/// Adds (or subtracts) the mask expanded from `seed` to `vector`, modulo the params' modulus.
pub(crate) fn apply_mask(vector: &mut [u64], seed: &[u8; 32], sign: Sign, params: &SecAggParams) {
    let width = params.keystream_bytes();
    let mask = params.modulus_mask();
    let mut rng = ChaCha20Rng::from_seed(*seed);
    let mut bytes = vec![0u8; BLOCK * width];
    for chunk in vector.chunks_mut(BLOCK) {
        let stream = &mut bytes[..chunk.len() * width];
        rng.fill_bytes(stream);
        for (value, raw) in chunk.iter_mut().zip(stream.chunks_exact(width)) {
            let m = element_from_le(raw) & mask;
            *value = match sign {
                Sign::Plus => value.wrapping_add(m),
                Sign::Minus => value.wrapping_sub(m),
            } & mask;
        }
    }
}

impl MaskedInput {
    /// Adds `other` into this input modulo `2^modulus_bits`: a relay's sum of its nodes'
    /// masked inputs. The pairwise masks of two nodes summed here cancel, but each node's self
    /// mask stays until the server unmasks the whole round's sum, so the sum reveals no more
    /// than one input does.
    pub fn add(&mut self, other: &MaskedInput, params: &SecAggParams) -> Result<(), SecAggError> {
        if other.values.len() != self.values.len() {
            return Err(SecAggError::Malformed(format!(
                "a masked input of {} values, expected {}",
                other.values.len(),
                self.values.len()
            )));
        }
        add_into(&mut self.values, &other.values, params);
        Ok(())
    }
}

/// Adds `other` into `sum`, modulo the params' modulus.
pub(crate) fn add_into(sum: &mut [u64], other: &[u64], params: &SecAggParams) {
    let mask = params.modulus_mask();
    for (s, o) in sum.iter_mut().zip(other) {
        *s = s.wrapping_add(*o) & mask;
    }
}

fn element_from_le(raw: &[u8]) -> u64 {
    let mut word = [0u8; 8];
    word[..raw.len()].copy_from_slice(raw);
    u64::from_le_bytes(word)
}

/// Packs a vector modulo the params' modulus into a little-endian bit stream of
/// `modulus_bits` bits per value (the last byte padded with zero bits), so that a sum modulus
/// of 26 bits costs 26 bits on the wire, not a 32-bit word.
pub fn pack(vector: &[u64], params: &SecAggParams) -> Vec<u8> {
    let bits = params.modulus_bits;
    let mask = params.modulus_mask();
    let mut bytes = Vec::with_capacity(params.packed_bytes(vector.len()));
    let mut pending: u128 = 0;
    let mut pending_bits = 0u32;
    for value in vector {
        pending |= u128::from(value & mask) << pending_bits;
        pending_bits += bits;
        if pending_bits >= 64 {
            bytes.extend_from_slice(&(pending as u64).to_le_bytes());
            pending >>= 64;
            pending_bits -= 64;
        }
    }
    let tail = pending_bits.div_ceil(8) as usize;
    bytes.extend_from_slice(&(pending as u64).to_le_bytes()[..tail]);
    bytes
}

/// Reads `values` coordinates written by [`pack`], refusing a stream of the wrong length or
/// with bits set in its padding.
pub fn unpack(bytes: &[u8], values: usize, params: &SecAggParams) -> Result<Vec<u64>, SecAggError> {
    let expected = params.packed_bytes(values);
    if bytes.len() != expected {
        return Err(SecAggError::Malformed(format!(
            "a masked vector of {values} values at {} bits each takes {expected} bytes, not {}",
            params.modulus_bits,
            bytes.len()
        )));
    }
    let bits = params.modulus_bits;
    let mask = params.modulus_mask();
    let mut vector = Vec::with_capacity(values);
    let mut pending: u128 = 0;
    let mut pending_bits = 0u32;
    let mut input = bytes.iter();
    for _ in 0..values {
        while pending_bits < bits {
            let byte = input.next().copied().unwrap_or(0);
            pending |= u128::from(byte) << pending_bits;
            pending_bits += 8;
        }
        vector.push(pending as u64 & mask);
        pending >>= bits;
        pending_bits -= bits;
    }
    if pending != 0 {
        return Err(SecAggError::Malformed(
            "a masked vector has bits set in its padding".into(),
        ));
    }
    Ok(vector)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mask_added_then_subtracted_leaves_the_vector() {
        let params = SecAggParams {
            modulus_bits: 20,
            ..SecAggParams::default()
        };
        let original: Vec<u64> = (0..10_000).map(|i| i % (1 << 20)).collect();
        let mut vector = original.clone();
        apply_mask(&mut vector, &[9; 32], Sign::Plus, &params);
        assert_ne!(vector, original);
        assert!(vector.iter().all(|&v| v < 1 << 20));
        apply_mask(&mut vector, &[9; 32], Sign::Minus, &params);
        assert_eq!(vector, original);
    }

    proptest::proptest! {
        #[test]
        fn packing_round_trips_at_every_width(
            bits in 1u32..=64,
            raw in proptest::collection::vec(proptest::num::u64::ANY, 0..200),
        ) {
            let params = SecAggParams { modulus_bits: bits, ..SecAggParams::default() };
            let vector: Vec<u64> = raw.iter().map(|v| v & params.modulus_mask()).collect();
            let bytes = pack(&vector, &params);
            proptest::prop_assert_eq!(bytes.len(), (vector.len() * bits as usize).div_ceil(8));
            proptest::prop_assert_eq!(unpack(&bytes, vector.len(), &params).unwrap(), vector);
        }
    }

    #[test]
    fn a_26_bit_modulus_costs_26_bits_per_value() {
        let params = SecAggParams {
            modulus_bits: 26,
            ..SecAggParams::default()
        };
        let vector = vec![params.modulus_mask(); 1000];
        assert_eq!(pack(&vector, &params).len(), 3250);
    }

    #[test]
    fn a_stream_of_the_wrong_length_or_with_padding_bits_is_refused() {
        let params = SecAggParams {
            modulus_bits: 12,
            ..SecAggParams::default()
        };
        let bytes = pack(&[1, 2, 3], &params);
        assert_eq!(bytes.len(), 5);
        assert!(unpack(&bytes, 2, &params).is_err());
        assert!(unpack(&bytes[..4], 3, &params).is_err());
        let mut padded = bytes.clone();
        padded[4] |= 0x80;
        assert!(unpack(&padded, 3, &params).is_err());
        assert_eq!(unpack(&bytes, 3, &params).unwrap(), vec![1, 2, 3]);
    }
}
