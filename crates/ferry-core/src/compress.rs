//! Update compression: how a node's delta is encoded on the wire to save uplink bytes.
//!
//! - `fp16` / `bf16`: every value in 2 bytes (round to nearest).
//! - `int8`: every value in 1 byte, with one f32 scale per block of [`INT8_BLOCK`] values,
//!   rounded stochastically so that the decoded value is unbiased.
//! - `topk:R`: only the largest `R` share of the values by magnitude, as (u32 index, f32
//!   value) pairs; what is not sent stays on the node as error feedback and is added to its
//!   next update (Stich et al., 2018), so nothing is lost, only delayed.
//!
//! Encoding and decoding are exact inverses of each other's format; [`Compression::wire_bytes`]
//! gives an encoding's length from the value count alone, which is what the bytes ledger
//! records.

use std::{fmt, str::FromStr};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{CoreError, TensorDtype};

/// Values sharing one int8 scale.
pub const INT8_BLOCK: usize = 1024;

/// How a run encodes updates (and, where sound, model downloads) on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Compression {
    /// 4-byte f32 values.
    #[default]
    None,
    /// IEEE half precision.
    Fp16,
    /// bfloat16: f32's exponent range with 8 bits of mantissa.
    Bf16,
    /// One byte per value and a scale per block, stochastic rounding.
    Int8,
    /// Top-k sparsification of this share of the values, with error feedback.
    TopK {
        /// Share of the values sent, in `(0, 1]`.
        ratio: f64,
    },
}

impl Compression {
    /// Bytes an encoding of `n` values occupies.
    pub fn wire_bytes(self, n: usize) -> u64 {
        let bytes = match self {
            Self::None => 4 * n,
            Self::Fp16 | Self::Bf16 => 2 * n,
            Self::Int8 => n + 4 * n.div_ceil(INT8_BLOCK),
            Self::TopK { ratio } => 8 * Self::kept(ratio, n),
        };
        bytes as u64
    }

    /// Whether the model download may be sent this way too. Half precision is: a node
    /// trains from the rounded model and returns its change from it, which the server
    /// applies to its full-precision model. int8 and top-k are not: a model's weights are
    /// not centred on zero as a delta is, so int8's per-block scale spends its levels on the
    /// largest weights, and top-k would zero most of the model; top-k's error feedback would
    /// also need the server to keep a residual per node.
    pub fn compresses_downloads(self) -> bool {
        self.download_dtype().is_some()
    }

    /// The half dtype model downloads travel in where they are compressed (see
    /// [`crate::download`]).
    pub fn download_dtype(self) -> Option<TensorDtype> {
        match self {
            Self::Fp16 => Some(TensorDtype::F16),
            Self::Bf16 => Some(TensorDtype::Bf16),
            _ => None,
        }
    }

    /// Bytes a model download of `n` values occupies: half precision where downloads are
    /// compressed, f32 otherwise.
    pub fn download_bytes(self, n: usize) -> u64 {
        if self.compresses_downloads() {
            self.wire_bytes(n)
        } else {
            Self::None.wire_bytes(n)
        }
    }

    /// The dtype each value travels in, for the encodings that keep every value (f32 for
    /// int8 and top-k, which never ask).
    fn value_dtype(self) -> TensorDtype {
        match self {
            Self::Fp16 => TensorDtype::F16,
            Self::Bf16 => TensorDtype::Bf16,
            _ => TensorDtype::F32,
        }
    }

    /// Whether the node keeps an error-feedback residual between rounds.
    pub fn keeps_residual(self) -> bool {
        matches!(self, Self::TopK { .. })
    }

    fn kept(ratio: f64, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        ((ratio * n as f64).ceil() as usize).clamp(1, n)
    }

    /// Encodes `values` for the wire. With top-k, `residual` (empty or of the same length)
    /// is added first and left holding what was not sent; other encodings leave it alone.
    /// `seed` drives int8's stochastic rounding.
    pub fn encode(self, values: &[f32], residual: &mut Vec<f32>, seed: u64) -> Vec<u8> {
        match self {
            Self::None | Self::Fp16 | Self::Bf16 => {
                let mut out = Vec::new();
                self.value_dtype().encode_into(values, &mut out);
                out
            }
            Self::Int8 => encode_int8(values, seed),
            Self::TopK { ratio } => encode_top_k(values, residual, Self::kept(ratio, values.len())),
        }
    }

    /// Decodes `n` values from `bytes`, refusing bytes of the wrong length or a top-k index
    /// out of range.
    pub fn decode(self, bytes: &[u8], n: usize) -> Result<Vec<f32>, CoreError> {
        let expected = self.wire_bytes(n);
        if bytes.len() as u64 != expected {
            return Err(CoreError::Compression(format!(
                "{self} encoding of {n} values is {expected} bytes, got {}",
                bytes.len()
            )));
        }
        Ok(match self {
            Self::None | Self::Fp16 | Self::Bf16 => {
                let mut out = Vec::with_capacity(n);
                self.value_dtype().decode_into("update", bytes, &mut out)?;
                out
            }
            Self::Int8 => decode_int8(bytes, n),
            Self::TopK { .. } => decode_top_k(bytes, n)?,
        })
    }

    /// Replaces `values` by what the receiver decodes from their encoding (what a simulated
    /// node's update becomes on the wire), updating top-k's `residual`; returns the bytes
    /// sent.
    pub fn round_trip(
        self,
        values: &mut [f32],
        residual: &mut Vec<f32>,
        seed: u64,
    ) -> Result<u64, CoreError> {
        if self == Self::None {
            return Ok(self.wire_bytes(values.len()));
        }
        let bytes = self.encode(values, residual, seed);
        let decoded = self.decode(&bytes, values.len())?;
        values.copy_from_slice(&decoded);
        Ok(bytes.len() as u64)
    }
}

fn encode_int8(values: &[f32], seed: u64) -> Vec<u8> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(Compression::Int8.wire_bytes(values.len()) as usize);
    for block in values.chunks(INT8_BLOCK) {
        let max = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let scale = if max > 0.0 && max.is_finite() {
            max / 127.0
        } else {
            0.0
        };
        out.extend_from_slice(&scale.to_le_bytes());
        for &v in block {
            let level = if scale == 0.0 {
                0
            } else {
                // Stochastic rounding: floor(x + u), u uniform in [0, 1), is unbiased.
                let x = f64::from(v / scale);
                (x + rng.random::<f64>()).floor().clamp(-127.0, 127.0) as i8
            };
            out.push(level as u8);
        }
    }
    out
}

fn decode_int8(bytes: &[u8], n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    let mut rest = bytes;
    while out.len() < n {
        let count = (n - out.len()).min(INT8_BLOCK);
        let scale = f32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
        out.extend(
            rest[4..4 + count]
                .iter()
                .map(|&b| f32::from(b as i8) * scale),
        );
        rest = &rest[4 + count..];
    }
    out
}

fn encode_top_k(values: &[f32], residual: &mut Vec<f32>, k: usize) -> Vec<u8> {
    if residual.len() != values.len() {
        *residual = vec![0.0; values.len()];
    }
    for (r, v) in residual.iter_mut().zip(values) {
        *r += v;
    }
    let mut order: Vec<u32> = (0..values.len() as u32).collect();
    if k < order.len() {
        order.select_nth_unstable_by(k, |&a, &b| {
            residual[b as usize]
                .abs()
                .total_cmp(&residual[a as usize].abs())
        });
        order.truncate(k);
    }
    order.sort_unstable();
    let mut out = Vec::with_capacity(8 * k);
    for &i in &order {
        out.extend_from_slice(&i.to_le_bytes());
    }
    for &i in &order {
        let sent = std::mem::take(&mut residual[i as usize]);
        out.extend_from_slice(&sent.to_le_bytes());
    }
    out
}

fn decode_top_k(bytes: &[u8], n: usize) -> Result<Vec<f32>, CoreError> {
    let (indices, values) = bytes.split_at(bytes.len() / 2);
    let mut out = vec![0.0f32; n];
    for (i, v) in indices.chunks_exact(4).zip(values.chunks_exact(4)) {
        let index = u32::from_le_bytes([i[0], i[1], i[2], i[3]]) as usize;
        let slot = out.get_mut(index).ok_or_else(|| {
            CoreError::Compression(format!("top-k index {index} is past the {n} values"))
        })?;
        *slot = f32::from_le_bytes([v[0], v[1], v[2], v[3]]);
    }
    Ok(out)
}

impl FromStr for Compression {
    type Err = CoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            CoreError::Settings(format!(
                "unknown compression '{s}': expected none, fp16, bf16, int8 or topk:R with R in \
                 (0, 1] (topk:0.01 sends the largest 1% of the values)"
            ))
        };
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "none" => Self::None,
            "fp16" => Self::Fp16,
            "bf16" => Self::Bf16,
            "int8" => Self::Int8,
            other => {
                let ratio: f64 = other
                    .strip_prefix("topk:")
                    .and_then(|r| r.parse().ok())
                    .ok_or_else(bad)?;
                if !(ratio > 0.0 && ratio <= 1.0) {
                    return Err(bad());
                }
                Self::TopK { ratio }
            }
        })
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("none"),
            Self::Fp16 => f.write_str("fp16"),
            Self::Bf16 => f.write_str("bf16"),
            Self::Int8 => f.write_str("int8"),
            Self::TopK { ratio } => write!(f, "topk:{ratio}"),
        }
    }
}

impl serde::Serialize for Compression {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ALL: [Compression; 5] = [
        Compression::None,
        Compression::Fp16,
        Compression::Bf16,
        Compression::Int8,
        Compression::TopK { ratio: 0.1 },
    ];

    proptest! {
        #[test]
        fn encodings_have_the_length_the_ledger_records(
            values in prop::collection::vec(-10.0f32..10.0, 0..3000),
            seed in any::<u64>(),
        ) {
            for c in ALL {
                let bytes = c.encode(&values, &mut Vec::new(), seed);
                prop_assert_eq!(bytes.len() as u64, c.wire_bytes(values.len()));
                prop_assert_eq!(c.decode(&bytes, values.len()).unwrap().len(), values.len());
            }
        }

        #[test]
        fn int8_is_within_one_level_of_each_value(
            values in prop::collection::vec(-5.0f32..5.0, 1..3000),
            seed in any::<u64>(),
        ) {
            let c = Compression::Int8;
            let decoded = c.decode(&c.encode(&values, &mut Vec::new(), seed), values.len()).unwrap();
            for (block, got) in values.chunks(INT8_BLOCK).zip(decoded.chunks(INT8_BLOCK)) {
                let level = block.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0;
                for (v, d) in block.iter().zip(got) {
                    prop_assert!((v - d).abs() <= level * 1.0001 + 1e-12);
                }
            }
        }

        #[test]
        fn top_k_sends_plus_residual_equal_the_input(
            values in prop::collection::vec(-1.0f32..1.0, 1..2000),
            ratio in 0.001f64..1.0,
        ) {
            let c = Compression::TopK { ratio };
            let mut residual = Vec::new();
            let sent = c.decode(&c.encode(&values, &mut residual, 0), values.len()).unwrap();
            let nonzero = sent.iter().filter(|v| **v != 0.0).count();
            prop_assert!(nonzero <= Compression::kept(ratio, values.len()));
            for ((v, s), r) in values.iter().zip(&sent).zip(&residual) {
                prop_assert_eq!(*v, s + r);
            }
        }
    }

    #[test]
    fn int8_rounding_is_unbiased() {
        let values = vec![0.3f32; INT8_BLOCK];
        let mut with_max = values.clone();
        with_max[0] = 1.27; // scale 0.01: 0.3 lies on a level; 0.305 does not.
        with_max[1..].fill(0.305);
        let mut mean = 0.0f64;
        let trials = 200;
        for seed in 0..trials {
            let c = Compression::Int8;
            let decoded = c
                .decode(&c.encode(&with_max, &mut Vec::new(), seed), INT8_BLOCK)
                .unwrap();
            mean += decoded[1..].iter().map(|&v| f64::from(v)).sum::<f64>();
        }
        mean /= (trials as f64) * (INT8_BLOCK - 1) as f64;
        assert!((mean - 0.305).abs() < 5e-4, "mean {mean}");
    }

    #[test]
    fn error_feedback_delivers_every_value_eventually() {
        let c = Compression::TopK { ratio: 0.25 };
        let values = [4.0f32, -3.0, 2.0, 1.0];
        let mut residual = Vec::new();
        let mut delivered = [0.0f32; 4];
        for round in 0..4 {
            let input = if round == 0 { values } else { [0.0; 4] };
            let sent = c.decode(&c.encode(&input, &mut residual, 0), 4).unwrap();
            for (d, s) in delivered.iter_mut().zip(sent) {
                *d += s;
            }
        }
        assert_eq!(delivered, values);
        assert!(residual.iter().all(|r| *r == 0.0));
    }

    #[test]
    fn half_precision_halves_the_bytes_and_keeps_three_digits() {
        for c in [Compression::Fp16, Compression::Bf16] {
            let values = [0.123_456f32, -1.5, 3.0e-3];
            let decoded = c.decode(&c.encode(&values, &mut Vec::new(), 0), 3).unwrap();
            assert_eq!(c.wire_bytes(3), 6);
            for (v, d) in values.iter().zip(decoded) {
                assert!((v - d).abs() <= v.abs() * 4e-3, "{c}: {v} -> {d}");
            }
        }
    }

    #[test]
    fn names_parse_and_bad_ones_are_explained() {
        for c in ALL {
            assert_eq!(c.to_string().parse::<Compression>().unwrap(), c);
        }
        for bad in ["topk:0", "topk:1.5", "topk:x", "gzip"] {
            let e = bad.parse::<Compression>().unwrap_err().to_string();
            assert!(e.contains("expected none, fp16"), "{e}");
        }
        assert!(Compression::Fp16.compresses_downloads());
        assert!(!Compression::Int8.compresses_downloads());
    }

    #[test]
    fn a_decoder_refuses_bytes_of_the_wrong_length_or_index() {
        let c = Compression::TopK { ratio: 0.5 };
        assert!(c.decode(&[0; 7], 2).is_err());
        let mut bad = vec![];
        bad.extend_from_slice(&9u32.to_le_bytes());
        bad.extend_from_slice(&1.0f32.to_le_bytes());
        assert!(c.decode(&bad, 2).unwrap_err().to_string().contains("past"));
    }
}
