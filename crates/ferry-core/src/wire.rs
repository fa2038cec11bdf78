//! Updates and flat state vectors as safetensors files: the bytes a node uploads, and the
//! server state a coordinator persists between rounds.
//!
//! An update file holds the delta as `delta/<tensor>` with the model's shapes, SCAFFOLD's
//! control-variate change as `control/<tensor>`, and the scalars (`num_examples`, FedNova's
//! normaliser, the distributed-DP clip indicator `unclipped`, metrics as `metric.<name>`) in the safetensors metadata. Anything else is refused,
//! so a node cannot slip in tensors of the wrong name, shape or dtype.

use std::collections::{BTreeMap, HashMap};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::{CoreError, ModelLayout, Update};

const DELTA: &str = "delta/";
const CONTROL: &str = "control/";
const METRIC: &str = "metric.";

fn safetensors_error(e: impl std::fmt::Display) -> CoreError {
    CoreError::Safetensors(e.to_string())
}

fn views<'a>(
    prefix: &str,
    values: &'a [f32],
    layout: &ModelLayout,
) -> Result<Vec<(String, TensorView<'a>)>, CoreError> {
    layout
        .entries()
        .map(|(spec, range)| {
            let bytes: &[u8] = bytemuck::cast_slice(&values[range]);
            TensorView::new(Dtype::F32, spec.shape.clone(), bytes)
                .map(|view| (format!("{prefix}{}", spec.name), view))
                .map_err(safetensors_error)
        })
        .collect()
}

/// Serialises an update for the model `layout` as a safetensors file.
pub fn encode_update(update: &Update, layout: &ModelLayout) -> Result<Vec<u8>, CoreError> {
    let check = |values: &[f32]| {
        if values.len() == layout.num_params() {
            Ok(())
        } else {
            Err(CoreError::LengthMismatch {
                expected: layout.num_params(),
                got: values.len(),
            })
        }
    };
    check(&update.delta)?;
    let mut tensors = views(DELTA, &update.delta, layout)?;
    if let Some(control) = &update.control_delta {
        check(control)?;
        tensors.extend(views(CONTROL, control, layout)?);
    }
    let mut metadata =
        HashMap::from([("num_examples".to_string(), update.num_examples.to_string())]);
    if let Some(normalizer) = update.normalizer {
        metadata.insert("normalizer".into(), normalizer.to_string());
    }
    if let Some(unclipped) = update.unclipped {
        metadata.insert("unclipped".into(), unclipped.to_string());
    }
    for (name, value) in &update.metrics {
        metadata.insert(format!("{METRIC}{name}"), value.to_string());
    }
    safetensors::serialize(tensors, Some(metadata)).map_err(safetensors_error)
}

fn read_flat(
    file: &SafeTensors<'_>,
    prefix: &str,
    layout: &ModelLayout,
) -> Result<Option<Vec<f32>>, CoreError> {
    let mut values = Vec::new();
    for (i, (spec, _)) in layout.entries().enumerate() {
        let name = format!("{prefix}{}", spec.name);
        let view = match file.tensor(&name) {
            Ok(view) => view,
            Err(_) if i == 0 && prefix == CONTROL => return Ok(None),
            Err(_) => {
                return Err(CoreError::LayoutMismatch(format!(
                    "update lacks tensor '{name}'"
                )));
            }
        };
        if view.dtype() != Dtype::F32 {
            return Err(CoreError::UnsupportedDtype {
                name,
                dtype: format!("{:?}", view.dtype()),
            });
        }
        if view.shape() != spec.shape.as_slice() {
            return Err(CoreError::LayoutMismatch(format!(
                "tensor '{name}' has shape {:?}, the model's is {:?}",
                view.shape(),
                spec.shape
            )));
        }
        values.extend(
            view.data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        );
    }
    Ok(Some(values))
}

fn parse_number<T: std::str::FromStr>(key: &str, text: &str) -> Result<T, CoreError> {
    text.parse()
        .map_err(|_| CoreError::Safetensors(format!("metadata '{key}' is not a number: '{text}'")))
}

/// Reads an update file written by [`encode_update`] for the model `layout`, refusing unknown,
/// missing, misshapen or non-f32 tensors. Values are not checked for NaN here; the aggregator
/// does that.
pub fn decode_update(bytes: &[u8], layout: &ModelLayout) -> Result<Update, CoreError> {
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(safetensors_error)?;
    let file = SafeTensors::deserialize(bytes).map_err(safetensors_error)?;
    let expected = |name: &str| {
        let bare = name
            .strip_prefix(DELTA)
            .or_else(|| name.strip_prefix(CONTROL));
        bare.is_some_and(|bare| layout.range(bare).is_some())
    };
    if let Some(name) = file.names().into_iter().find(|name| !expected(name)) {
        return Err(CoreError::LayoutMismatch(format!(
            "update holds tensor '{name}', which the model does not have"
        )));
    }
    let delta = read_flat(&file, DELTA, layout)?.unwrap_or_default();
    let control_delta = read_flat(&file, CONTROL, layout)?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let num_examples = metadata
        .get("num_examples")
        .ok_or_else(|| CoreError::Safetensors("update metadata lacks 'num_examples'".into()))
        .and_then(|text| parse_number("num_examples", text))?;
    let normalizer = metadata
        .get("normalizer")
        .map(|text| parse_number("normalizer", text))
        .transpose()?;
    let unclipped = metadata
        .get("unclipped")
        .map(|text| parse_number("unclipped", text))
        .transpose()?;
    let metrics = metadata
        .iter()
        .filter_map(|(key, text)| key.strip_prefix(METRIC).map(|name| (key, name, text)))
        .map(|(key, name, text)| Ok((name.to_string(), parse_number(key, text)?)))
        .collect::<Result<BTreeMap<_, _>, CoreError>>()?;
    Ok(Update {
        delta,
        num_examples,
        metrics,
        control_delta,
        normalizer,
        unclipped,
    })
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
    use crate::TensorSpec;

    fn layout() -> ModelLayout {
        ModelLayout::new(vec![
            TensorSpec {
                name: "w".into(),
                shape: vec![2, 2],
                dtype: crate::TensorDtype::F32,
            },
            TensorSpec {
                name: "b".into(),
                shape: vec![2],
                dtype: crate::TensorDtype::F32,
            },
        ])
        .expect("layout")
    }

    fn full_update() -> Update {
        let mut update = Update::new(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 42);
        update.control_delta = Some(vec![-1.0, -2.0, -3.0, -4.0, -5.0, -6.0]);
        update.normalizer = Some(9.5);
        update.unclipped = Some(0.75);
        update.metrics.insert("train_loss".into(), 0.25);
        update
    }

    #[test]
    fn updates_round_trip_with_every_extra() {
        let layout = layout();
        for update in [full_update(), Update::new(vec![0.5; 6], 1)] {
            let bytes = encode_update(&update, &layout).expect("encode");
            assert_eq!(decode_update(&bytes, &layout).expect("decode"), update);
        }
    }

    #[test]
    fn foreign_missing_and_misshapen_tensors_are_refused() {
        let layout = layout();
        let other = ModelLayout::new(vec![
            TensorSpec {
                name: "w".into(),
                shape: vec![4],
                dtype: crate::TensorDtype::F32,
            },
            TensorSpec {
                name: "b".into(),
                shape: vec![2],
                dtype: crate::TensorDtype::F32,
            },
        ])
        .expect("layout");
        let bytes = encode_update(&Update::new(vec![0.0; 6], 1), &other).expect("encode");
        let err = decode_update(&bytes, &layout).expect_err("shape differs");
        assert!(err.to_string().contains("shape [4]"), "{err}");

        let extra = encode_vectors(&[("delta/w", &[0.0; 4]), ("evil", &[1.0])]).expect("encode");
        let err = decode_update(&extra, &layout).expect_err("unknown tensor");
        assert!(err.to_string().contains("'evil'"), "{err}");

        let missing = encode_vectors(&[("delta/w", &[0.0; 4])]).expect("encode");
        let err = decode_update(&missing, &layout).expect_err("shape and b missing");
        assert!(matches!(err, CoreError::LayoutMismatch(_)), "{err}");
    }

    #[test]
    fn an_update_without_example_count_is_refused() {
        let layout = layout();
        let zeros = [0u8; 16];
        let tensors = vec![
            (
                "delta/b",
                TensorView::new(Dtype::F32, vec![2], &zeros[..8]).expect("view"),
            ),
            (
                "delta/w",
                TensorView::new(Dtype::F32, vec![2, 2], &zeros).expect("view"),
            ),
        ];
        let bytes = safetensors::serialize(tensors, None).expect("serialize");
        let err = decode_update(&bytes, &layout).expect_err("no num_examples");
        assert!(err.to_string().contains("num_examples"), "{err}");
        assert!(decode_update(b"not safetensors", &layout).is_err());
    }

    #[test]
    fn vectors_round_trip() {
        let bytes = encode_vectors(&[("m", &[1.0, 2.0]), ("v", &[3.0])]).expect("encode");
        let back = decode_vectors(&bytes).expect("decode");
        assert_eq!(back["m"], [1.0, 2.0]);
        assert_eq!(back["v"], [3.0]);
    }
}
