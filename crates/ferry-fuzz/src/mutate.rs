//! Inputs for a decoder: valid encodings (the seeds) taken apart byte by byte, plus plain
//! random bytes, from a seeded generator so that any run can be repeated exactly.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Integers that break length fields and offsets: zero, one, sign and width edges, 4 GB.
const INTERESTING: [u64; 10] = [
    0,
    1,
    0x7f,
    0xff,
    0x7fff_ffff,
    0xffff_ffff,
    4 << 30,
    i64::MAX as u64,
    u64::MAX,
    u64::MAX - 7,
];

/// Tokens that change the structure of text formats (JSON, TOML) rather than their values.
const TOKENS: [&[u8]; 20] = [
    b"\"",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"=",
    b"\n",
    b"[[",
    b"null",
    b"true",
    b"-1",
    b"1e308",
    b"NaN",
    b"99999999999999999999",
    b"\\u0000",
    b"\"dtype\"",
    b"\"shape\"",
    b"\"data_offsets\"",
];

/// How a target's inputs are framed, so that mutations can reach past the framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Bytes as they are.
    Raw,
    /// A safetensors file: an 8-byte little-endian header length, the JSON header, the data.
    /// Half the mutated inputs change the header or the data and keep the length right, so
    /// they get past the first check to the header's meaning.
    Safetensors,
}

/// Generates the inputs of one fuzz run.
pub struct Mutator {
    rng: ChaCha8Rng,
    seeds: Vec<Vec<u8>>,
    framing: Framing,
}

impl Mutator {
    /// Inputs derived from `seeds` (valid encodings framed as `framing` says), reproducible
    /// from `seed`.
    pub fn new(seeds: Vec<Vec<u8>>, framing: Framing, seed: u64) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            seeds,
            framing,
        }
    }

    /// The next input: one in twenty is random bytes, one in twenty a seed as it is, the rest
    /// a seed with a few mutations (one in half the cases, two in a quarter, up to eight).
    pub fn next_input(&mut self) -> Vec<u8> {
        let pick = self.rng.random_range(0..20);
        if pick == 0 || self.seeds.is_empty() {
            let len = self.rng.random_range(0..512);
            return (0..len).map(|_| self.rng.random()).collect();
        }
        let mut input = self.seeds[self.rng.random_range(0..self.seeds.len())].clone();
        if pick == 1 {
            return input;
        }
        let mutations = 1 + self.rng.random::<u8>().trailing_ones().min(7);
        if self.framing == Framing::Safetensors
            && self.rng.random()
            && let Some((mut header, mut data)) = split_safetensors(&input)
        {
            for _ in 0..mutations {
                if self.rng.random_range(0..4) == 0 {
                    self.mutate(&mut data);
                } else {
                    self.mutate(&mut header);
                }
            }
            return [(header.len() as u64).to_le_bytes().to_vec(), header, data].concat();
        }
        for _ in 0..mutations {
            self.mutate(&mut input);
        }
        input
    }

    fn position(&mut self, input: &[u8]) -> usize {
        self.rng.random_range(0..=input.len())
    }

    fn mutate(&mut self, input: &mut Vec<u8>) {
        match self.rng.random_range(0..10) {
            0 if !input.is_empty() => {
                let at = self.rng.random_range(0..input.len());
                input[at] ^= 1 << self.rng.random_range(0..8);
            }
            1 if !input.is_empty() => {
                let at = self.rng.random_range(0..input.len());
                input[at] = INTERESTING[self.rng.random_range(0..4)] as u8;
            }
            2 => {
                // An integer field overwritten, little-endian as safetensors and protobuf's
                // fixed fields are, 4 or 8 bytes wide.
                let value = INTERESTING[self.rng.random_range(0..INTERESTING.len())];
                let width = if self.rng.random() { 4 } else { 8 };
                let bytes = &value.to_le_bytes()[..width];
                let at = self.position(input).min(input.len().saturating_sub(width));
                let end = (at + width).min(input.len());
                input.splice(at..end, bytes.iter().copied());
            }
            3 => {
                // A protobuf varint: a length or number field claiming up to 2^64.
                let value = INTERESTING[self.rng.random_range(0..INTERESTING.len())];
                let at = self.position(input);
                input.splice(at..at, varint(value));
            }
            4 => {
                let at = self.position(input);
                input.truncate(at);
            }
            5 if !input.is_empty() => {
                let start = self.rng.random_range(0..input.len());
                let end = self.rng.random_range(start..=input.len().min(start + 64));
                input.drain(start..end);
            }
            6 if !input.is_empty() => {
                let start = self.rng.random_range(0..input.len());
                let end = self.rng.random_range(start..=input.len().min(start + 64));
                let copy = input[start..end].to_vec();
                let at = self.position(input);
                input.splice(at..at, copy);
            }
            7 => {
                let token = TOKENS[self.rng.random_range(0..TOKENS.len())];
                let at = self.position(input);
                input.splice(at..at, token.iter().copied());
            }
            8 if !self.seeds.is_empty() => {
                // Splice: this input's head, another seed's tail.
                let other = &self.seeds[self.rng.random_range(0..self.seeds.len())];
                let from = self.rng.random_range(0..=other.len());
                let tail = other[from..].to_vec();
                let at = self.position(input);
                input.truncate(at);
                input.extend(tail);
            }
            _ => {
                let at = self.position(input);
                let len = self.rng.random_range(1..16);
                let noise: Vec<u8> = (0..len).map(|_| self.rng.random()).collect();
                input.splice(at..at, noise);
            }
        }
    }
}

/// A well-framed safetensors input's header and data.
fn split_safetensors(input: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let len = u64::from_le_bytes(input.get(..8)?.try_into().ok()?);
    let end = 8usize.checked_add(usize::try_from(len).ok()?)?;
    Some((input.get(8..end)?.to_vec(), input.get(end..)?.to_vec()))
}

fn varint(mut value: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(10);
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_inputs_and_mutations_change_them() {
        let seeds = vec![b"{\"num_examples\": 3}".to_vec()];
        let run = |seed| {
            let mut m = Mutator::new(seeds.clone(), Framing::Raw, seed);
            (0..200).map(|_| m.next_input()).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        let changed = run(7).iter().filter(|i| **i != seeds[0]).count();
        assert!(
            changed > 150,
            "{changed} of 200 inputs differ from the seed"
        );
    }

    #[test]
    fn framed_mutations_keep_a_safetensors_length_right() {
        let header = br#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
        let seed = [&(header.len() as u64).to_le_bytes()[..], header, &[0; 4]].concat();
        let mut m = Mutator::new(vec![seed], Framing::Safetensors, 3);
        let framed = (0..400)
            .map(|_| m.next_input())
            .filter(|i| {
                split_safetensors(i).is_some_and(|(h, _)| h.starts_with(b"{") && h != header)
            })
            .count();
        assert!(
            framed > 100,
            "{framed} of 400 inputs are reframed header mutations"
        );
    }

    #[test]
    fn varints_are_protobuf_encoded() {
        assert_eq!(varint(1), [1]);
        assert_eq!(varint(300), [0xac, 0x02]);
        assert_eq!(varint(u64::MAX).len(), 10);
    }
}
