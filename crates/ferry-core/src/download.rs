//! A model download in half precision: the copy of a global model a run with `fp16` or `bf16`
//! compression sends its nodes.
//!
//! Every parameter tensor of more than 2 bytes a value (f32, f64) is written in the half
//! dtype, and the file's metadata names each such tensor's own dtype, so that a reader gets
//! back the run's layout with the rounded values: a node trains from the model it received
//! and returns its change from it in the run's layout, which the server applies to its
//! full-precision model. Tensors already of 2 bytes a value, and carried tensors (integers,
//! personal tensors), travel as they are.

use std::{
    collections::{BTreeMap, HashMap},
    io::Write,
};

use crate::{CoreError, Model, TensorDtype, model::TensorSpec};

/// Metadata key of a download copy: a JSON object from each rounded tensor's name to its own
/// dtype (`"F32"` or `"F64"`).
const ROUNDED: &str = "ferry.rounded";

/// Writes `model` to `out` with its wider tensors rounded to `half` (f16 or bf16); returns
/// the bytes written.
pub fn write_rounded(
    model: &Model,
    out: &mut dyn Write,
    half: TensorDtype,
) -> Result<u64, CoreError> {
    // Ordered, so that the same model always makes the same file (and content id).
    let rounded: BTreeMap<&str, &str> = model
        .layout()
        .specs()
        .iter()
        .filter(|spec| travel(spec.dtype, half) != spec.dtype)
        .map(|spec| (spec.name.as_str(), name(spec.dtype)))
        .collect();
    let json =
        serde_json::to_string(&rounded).map_err(|e| CoreError::Safetensors(e.to_string()))?;
    let metadata = HashMap::from([(ROUNDED.to_string(), json)]);
    model.write_as(out, &|spec| travel(spec.dtype, half), Some(metadata))
}

/// `model` as a node reads it back from its download copy: each tensor's values rounded to
/// the dtype it travels in. Simulation trains its virtual nodes from this, so that they start
/// where deployed nodes do.
pub fn as_downloaded(model: &Model, half: TensorDtype) -> Model {
    let mut received = model.clone();
    for (spec, range) in model.layout().entries() {
        travel(spec.dtype, half).round(&mut received.values_mut()[range]);
    }
    received
}

/// The dtype a tensor of `dtype` travels in: `half` where it is wider than 2 bytes a value,
/// its own otherwise.
fn travel(dtype: TensorDtype, half: TensorDtype) -> TensorDtype {
    if dtype.size() > 2 { half } else { dtype }
}

fn name(dtype: TensorDtype) -> &'static str {
    match dtype {
        TensorDtype::F64 => "F64",
        _ => "F32",
    }
}

/// Gives each tensor of a download copy (read from a file with `metadata`) back its own
/// dtype; a file without the key is left as it is.
pub(crate) fn restore_dtypes(
    specs: &mut [TensorSpec],
    metadata: &HashMap<String, String>,
) -> Result<(), CoreError> {
    let Some(json) = metadata.get(ROUNDED) else {
        return Ok(());
    };
    let bad = |why: String| CoreError::Safetensors(format!("metadata '{ROUNDED}': {why}"));
    let rounded: HashMap<String, String> =
        serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
    for (tensor, dtype) in rounded {
        let spec = specs
            .iter_mut()
            .find(|s| s.name == tensor)
            .ok_or_else(|| bad(format!("names '{tensor}', which the file does not hold")))?;
        spec.dtype = match dtype.as_str() {
            "F32" => TensorDtype::F32,
            "F64" => TensorDtype::F64,
            other => return Err(bad(format!("'{tensor}' has unknown dtype '{other}'"))),
        };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{ModelLayout, personal::TensorRoles};

    #[test]
    fn a_half_precision_copy_reads_back_in_the_models_layout_with_rounded_values() {
        let layout = ModelLayout::new(vec![
            TensorSpec::f32("w", vec![3]),
            TensorSpec {
                name: "d".into(),
                shape: vec![1],
                dtype: TensorDtype::F64,
            },
            TensorSpec {
                name: "h".into(),
                shape: vec![1],
                dtype: TensorDtype::Bf16,
            },
        ])
        .expect("layout");
        let model = Model::new(Arc::new(layout), vec![0.1, 1.0, 0.5, 3.0, -2.0]).expect("model");
        for half in [TensorDtype::F16, TensorDtype::Bf16] {
            let mut bytes = Vec::new();
            let written = write_rounded(&model, &mut bytes, half).expect("write");
            assert_eq!(written as usize, bytes.len());
            let full = model.to_safetensors().expect("full");
            // The five values in 2 bytes instead of 4 * 3 + 8 + 2.
            let header = |b: &[u8]| 8 + u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
            assert_eq!(bytes.len() - header(&bytes), 10);
            assert_eq!(full.len() - header(&full), 22);
            let back = Model::from_safetensors_with(&bytes, &TensorRoles::default()).expect("read");
            assert_eq!(back.layout(), model.layout(), "{half:?}");
            let mut expected = Vec::new();
            half.decode_into("model", &half.encode(model.values()), &mut expected)
                .expect("decode");
            assert_eq!(back.values(), expected.as_slice());
            assert_ne!(back.values()[0], 0.1, "0.1 is not exact in half precision");
            // Simulation's virtual nodes start from the same values.
            assert_eq!(as_downloaded(&model, half), back, "{half:?}");
        }
    }

    #[test]
    fn a_rounded_list_naming_a_missing_tensor_or_dtype_is_refused() {
        let mut specs = vec![TensorSpec::f32("w", vec![1])];
        for json in [r#"{"x":"F32"}"#, r#"{"w":"I8"}"#, "not json"] {
            let metadata = HashMap::from([(ROUNDED.to_string(), json.to_string())]);
            assert!(restore_dtypes(&mut specs, &metadata).is_err(), "{json}");
        }
    }
}
