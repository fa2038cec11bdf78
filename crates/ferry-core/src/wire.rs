//! Updates and flat state vectors as safetensors files: the bytes a node uploads (see
//! [`crate::update_file`]), and the server state a coordinator persists between rounds.

use std::collections::BTreeMap;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::CoreError;
pub use crate::update_file::{decode_update, encode_update};

fn safetensors_error(e: impl std::fmt::Display) -> CoreError {
    CoreError::Safetensors(e.to_string())
}

/// Serialises named flat vectors (server-optimizer state, SCAFFOLD's `c`) as one-dimensional
/// f32 tensors.
pub fn encode_vectors(vectors: &[(&str, &[f32])]) -> Result<Vec<u8>, CoreError> {
    let tensors = vectors
        .iter()
        .map(|(name, values)| {
            TensorView::new(Dtype::F32, vec![values.len()], bytemuck::cast_slice(values))
                .map(|view| (name.to_string(), view))
                .map_err(safetensors_error)
        })
        .collect::<Result<Vec<_>, _>>()?;
    safetensors::serialize(tensors, None).map_err(safetensors_error)
}

/// Reads vectors written by [`encode_vectors`].
pub fn decode_vectors(bytes: &[u8]) -> Result<BTreeMap<String, Vec<f32>>, CoreError> {
    let file = SafeTensors::deserialize(bytes).map_err(safetensors_error)?;
    file.tensors()
        .into_iter()
        .map(|(name, view)| {
            if view.dtype() != Dtype::F32 {
                return Err(CoreError::UnsupportedDtype {
                    name,
                    dtype: format!("{:?}", view.dtype()),
                });
            }
            let values = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            Ok((name, values))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_round_trip() {
        let bytes = encode_vectors(&[("m", &[1.0, 2.0]), ("v", &[3.0])]).expect("encode");
        let back = decode_vectors(&bytes).expect("decode");
        assert_eq!(back["m"], [1.0, 2.0]);
        assert_eq!(back["v"], [3.0]);
    }
}
