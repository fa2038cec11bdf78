//! Masks expanded from 32-byte seeds with ChaCha20, and vectors modulo `2^modulus_bits`.

use chacha20::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};

use crate::{SecAggError, SecAggParams};

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
    let width = params.element_bytes();
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

/// Packs a vector modulo the params' modulus into little-endian bytes.
pub fn pack(vector: &[u64], params: &SecAggParams) -> Vec<u8> {
    let width = params.element_bytes();
    let mut bytes = Vec::with_capacity(vector.len() * width);
    for value in vector {
        bytes.extend_from_slice(&value.to_le_bytes()[..width]);
    }
    bytes
}

/// Reads a vector written by [`pack`], refusing values outside the modulus.
pub fn unpack(bytes: &[u8], params: &SecAggParams) -> Result<Vec<u64>, SecAggError> {
    let width = params.element_bytes();
    if !bytes.len().is_multiple_of(width) {
        return Err(SecAggError::Malformed(format!(
            "a masked vector of {} bytes is not a whole number of {width}-byte elements",
            bytes.len()
        )));
    }
    let mask = params.modulus_mask();
    bytes
        .chunks_exact(width)
        .map(|raw| {
            let value = element_from_le(raw);
            if value & !mask == 0 {
                Ok(value)
            } else {
                Err(SecAggError::Malformed(
                    "a masked value lies outside the modulus".into(),
                ))
            }
        })
        .collect()
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

    #[test]
    fn packing_round_trips_at_both_widths() {
        for bits in [32, 64] {
            let params = SecAggParams {
                modulus_bits: bits,
                ..SecAggParams::default()
            };
            let vector = vec![0, 1, params.modulus_mask(), 12345];
            let bytes = pack(&vector, &params);
            assert_eq!(bytes.len(), 4 * params.element_bytes());
            assert_eq!(unpack(&bytes, &params).unwrap(), vector);
        }
    }

    #[test]
    fn a_value_outside_the_modulus_is_refused() {
        let params = SecAggParams {
            modulus_bits: 8,
            ..SecAggParams::default()
        };
        assert!(unpack(&300u32.to_le_bytes(), &params).is_err());
        assert!(unpack(&[1, 2, 3], &params).is_err());
    }
}
