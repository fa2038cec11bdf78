//! The element types a model file may hold, and how Ferry treats each.
//!
//! Floating-point tensors (f32, f16, bf16, f64) are parameters: they are averaged, and a model
//! keeps them as f32 in its flat vector (every f16 and bf16 value is exactly an f32; f64 values
//! are rounded to f32), writing each back in its own dtype. Every other tensor (integers and
//! booleans, such as BatchNorm's `num_batches_tracked`) is carried: it travels with the model
//! to the nodes unchanged and is never part of an update, so it is never averaged.

use safetensors::tensor::Dtype;
use serde::{Deserialize, Serialize};

use crate::CoreError;

/// The element type of a parameter tensor, as its model file stores it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TensorDtype {
    /// 32-bit float.
    #[default]
    F32,
    /// 16-bit IEEE float.
    F16,
    /// bfloat16.
    Bf16,
    /// 64-bit float (held as f32 while Ferry works on it).
    F64,
}

impl TensorDtype {
    /// The parameter dtype for a safetensors dtype, `None` for a tensor that is carried.
    pub fn of(dtype: Dtype) -> Option<Self> {
        match dtype {
            Dtype::F32 => Some(Self::F32),
            Dtype::F16 => Some(Self::F16),
            Dtype::BF16 => Some(Self::Bf16),
            Dtype::F64 => Some(Self::F64),
            _ => None,
        }
    }

    /// The safetensors dtype.
    pub fn safetensors(self) -> Dtype {
        match self {
            Self::F32 => Dtype::F32,
            Self::F16 => Dtype::F16,
            Self::Bf16 => Dtype::BF16,
            Self::F64 => Dtype::F64,
        }
    }

    /// The dtype an update's delta of such a tensor travels in: f16 and bf16 in their own
    /// 2 bytes (a model kept in half precision gains nothing from a finer delta), f32 and f64
    /// as f32 (the precision Ferry holds every parameter in).
    pub fn on_the_wire(self) -> Self {
        match self {
            Self::F16 | Self::Bf16 => self,
            Self::F32 | Self::F64 => Self::F32,
        }
    }

    /// Appends `values` encoded in this dtype, little-endian, to `out` (round to nearest).
    pub fn encode_into(self, values: &[f32], out: &mut Vec<u8>) {
        out.reserve(values.len() * self.size());
        match self {
            Self::F32 => out.extend(values.iter().flat_map(|v| v.to_le_bytes())),
            Self::F16 => out.extend(
                values
                    .iter()
                    .flat_map(|&v| half::f16::from_f32(v).to_le_bytes()),
            ),
            Self::Bf16 => out.extend(
                values
                    .iter()
                    .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()),
            ),
            Self::F64 => out.extend(values.iter().flat_map(|&v| f64::from(v).to_le_bytes())),
        }
    }

    /// Rounds `values` in place to what this dtype holds (to nearest; f32 and f64 hold every
    /// f32 value).
    pub fn round(self, values: &mut [f32]) {
        match self {
            Self::F32 | Self::F64 => {}
            Self::F16 => values
                .iter_mut()
                .for_each(|v| *v = half::f16::from_f32(*v).to_f32()),
            Self::Bf16 => values
                .iter_mut()
                .for_each(|v| *v = half::bf16::from_f32(*v).to_f32()),
        }
    }

    /// Bytes per value in a file.
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::Bf16 => 2,
            Self::F64 => 8,
        }
    }

    /// Appends the little-endian `bytes` of tensor `name`, decoded to f32, to `out`.
    pub fn decode_into(
        self,
        name: &str,
        bytes: &[u8],
        out: &mut Vec<f32>,
    ) -> Result<(), CoreError> {
        if !bytes.len().is_multiple_of(self.size()) {
            return Err(CoreError::Safetensors(format!(
                "tensor '{name}' holds {} bytes, not a whole number of {self:?} values",
                bytes.len()
            )));
        }
        out.reserve(bytes.len() / self.size());
        match self {
            Self::F32 => out.extend(
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            ),
            Self::F16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
            ),
            Self::Bf16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
            ),
            Self::F64 => out.extend(bytes.chunks_exact(8).map(|b| {
                f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32
            })),
        }
        Ok(())
    }

    /// `values` as little-endian bytes of this dtype (f16 and bf16 rounded to nearest).
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        match self {
            Self::F32 => bytemuck::cast_slice(values).to_vec(),
            Self::F16 => values
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect(),
            Self::Bf16 => values
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect(),
            Self::F64 => values
                .iter()
                .flat_map(|v| f64::from(*v).to_le_bytes())
                .collect(),
        }
    }
}

impl std::fmt::Display for TensorDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
            Self::F64 => "f64",
        })
    }
}

/// A tensor that travels with the model but is not a parameter (integers, booleans): its
/// bytes exactly as the model file holds them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CarriedTensor {
    /// Name in the model file.
    pub name: String,
    /// Its safetensors dtype.
    pub dtype: Dtype,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Little-endian element bytes.
    pub data: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn every_float_dtype_round_trips_what_it_can_represent(
            values in proptest::collection::vec(-1e4f32..1e4, 0..64)
        ) {
            for dtype in [TensorDtype::F32, TensorDtype::F16, TensorDtype::Bf16, TensorDtype::F64] {
                let mut once = Vec::new();
                dtype.decode_into("t", &dtype.encode(&values), &mut once).expect("decode");
                // A value that went through the dtype is exact in it: a second trip is lossless.
                let mut twice = Vec::new();
                dtype.decode_into("t", &dtype.encode(&once), &mut twice).expect("decode");
                prop_assert_eq!(&once, &twice);
                for (v, r) in values.iter().zip(&once) {
                    let tolerance = match dtype {
                        TensorDtype::F32 | TensorDtype::F64 => 0.0,
                        TensorDtype::F16 => v.abs() * 1e-3 + 1e-4,
                        TensorDtype::Bf16 => v.abs() * 8e-3 + 1e-30,
                    };
                    prop_assert!((v - r).abs() <= tolerance, "{dtype}: {v} -> {r}");
                }
            }
        }
    }

    #[test]
    fn a_truncated_tensor_is_refused_by_name() {
        let err = TensorDtype::F16
            .decode_into("bn.weight", &[1, 2, 3], &mut Vec::new())
            .unwrap_err();
        assert!(err.to_string().contains("bn.weight"), "{err}");
    }
}
