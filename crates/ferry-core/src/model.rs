//! A model as named, shaped `f32` tensors stored in one flat vector.
//!
//! Keeping every parameter in one contiguous vector lets the update algebra and the
//! aggregators work on a single flat slice, while the [`ModelLayout`] keeps the names and
//! shapes that ML engines and the safetensors file need. Tensors are ordered by name, so two
//! models with the same tensors always have the same flat order.

use std::sync::Arc;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use sha2::{Digest, Sha256};

use crate::CoreError;

/// The name and shape of one tensor of a model.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TensorSpec {
    /// Name as the model uses it, for example `conv1.weight`.
    pub name: String,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// Number of values the tensor holds.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the tensor holds no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The tensors of a model, in canonical (name) order, with their offsets in the flat vector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelLayout {
    specs: Vec<TensorSpec>,
    offsets: Vec<usize>,
    total: usize,
}

impl ModelLayout {
    /// Builds a layout from tensor specs in any order; duplicate names are refused.
    pub fn new(mut specs: Vec<TensorSpec>) -> Result<Self, CoreError> {
        specs.sort_by(|a, b| a.name.cmp(&b.name));
        if let Some(pair) = specs.windows(2).find(|w| w[0].name == w[1].name) {
            return Err(CoreError::LayoutMismatch(format!(
                "tensor name '{}' appears twice",
                pair[0].name
            )));
        }
        let mut offsets = Vec::with_capacity(specs.len());
        let mut total = 0;
        for spec in &specs {
            offsets.push(total);
            total += spec.len();
        }
        Ok(Self {
            specs,
            offsets,
            total,
        })
    }

    /// The tensors in canonical order.
    pub fn specs(&self) -> &[TensorSpec] {
        &self.specs
    }

    /// Tensor names in canonical order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.specs.iter().map(|s| s.name.as_str())
    }

    /// Total number of parameters.
    pub fn num_params(&self) -> usize {
        self.total
    }

    /// Each tensor with the range of the flat vector that holds it, in layout order.
    pub fn entries(&self) -> impl Iterator<Item = (&TensorSpec, std::ops::Range<usize>)> {
        self.specs
            .iter()
            .zip(&self.offsets)
            .map(|(spec, &start)| (spec, start..start + spec.len()))
    }

    /// Where the named tensor lives in the flat vector.
    pub fn range(&self, name: &str) -> Option<std::ops::Range<usize>> {
        let i = self
            .specs
            .binary_search_by(|s| s.name.as_str().cmp(name))
            .ok()?;
        Some(self.offsets[i]..self.offsets[i] + self.specs[i].len())
    }
}

/// A model: a layout plus one flat vector of parameter values.
#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    layout: Arc<ModelLayout>,
    values: Vec<f32>,
}

impl Model {
    /// Pairs a layout with its values; the count must match the layout.
    pub fn new(layout: Arc<ModelLayout>, values: Vec<f32>) -> Result<Self, CoreError> {
        if values.len() != layout.num_params() {
            return Err(CoreError::LengthMismatch {
                expected: layout.num_params(),
                got: values.len(),
            });
        }
        Ok(Self { layout, values })
    }

    /// The model's layout (shared between all models of a run).
    pub fn layout(&self) -> &Arc<ModelLayout> {
        &self.layout
    }

    /// All parameters, flat, in layout order.
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// All parameters, flat and writable, in layout order.
    pub fn values_mut(&mut self) -> &mut [f32] {
        &mut self.values
    }

    /// The values of one named tensor.
    pub fn tensor(&self, name: &str) -> Option<&[f32]> {
        self.layout.range(name).map(|r| &self.values[r])
    }

    /// Number of parameters.
    pub fn num_params(&self) -> usize {
        self.values.len()
    }

    /// Serialises the model as a safetensors file (f32, little endian).
    pub fn to_safetensors(&self) -> Result<Vec<u8>, CoreError> {
        let views = self
            .layout
            .entries()
            .map(|(spec, range)| {
                let bytes: &[u8] = bytemuck::cast_slice(&self.values[range]);
                TensorView::new(Dtype::F32, spec.shape.clone(), bytes)
                    .map(|view| (spec.name.clone(), view))
                    .map_err(|e| CoreError::Safetensors(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        safetensors::serialize(views, None).map_err(|e| CoreError::Safetensors(e.to_string()))
    }

    /// Reads a safetensors file whose tensors are all f32.
    pub fn from_safetensors(bytes: &[u8]) -> Result<Self, CoreError> {
        let file =
            SafeTensors::deserialize(bytes).map_err(|e| CoreError::Safetensors(e.to_string()))?;
        let mut tensors = file.tensors();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        let specs = tensors
            .iter()
            .map(|(name, view)| {
                if view.dtype() != Dtype::F32 {
                    return Err(CoreError::UnsupportedDtype {
                        name: name.clone(),
                        dtype: format!("{:?}", view.dtype()),
                    });
                }
                Ok(TensorSpec {
                    name: name.clone(),
                    shape: view.shape().to_vec(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let layout = Arc::new(ModelLayout::new(specs)?);
        let mut values = Vec::with_capacity(layout.num_params());
        for (_, view) in &tensors {
            values.extend(
                view.data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
        }
        Self::new(layout, values)
    }

    /// Hex sha256 of the model's safetensors bytes: equal models have equal hashes, and the
    /// hash matches `sha256sum` of the saved file.
    pub fn sha256(&self) -> Result<String, CoreError> {
        Ok(sha256_hex(&self.to_safetensors()?))
    }

    /// Checks that `other` has exactly this model's tensors and shapes.
    pub fn check_same_layout(&self, other: &ModelLayout) -> Result<(), CoreError> {
        if self.layout.as_ref() == other {
            return Ok(());
        }
        let ours = self.layout.specs();
        let theirs = other.specs();
        let detail = ours
            .iter()
            .zip(theirs)
            .find(|(a, b)| a != b)
            .map(|(a, b)| {
                format!(
                    "expected tensor '{}' {:?}, got '{}' {:?}",
                    a.name, a.shape, b.name, b.shape
                )
            })
            .unwrap_or_else(|| format!("expected {} tensors, got {}", ours.len(), theirs.len()));
        Err(CoreError::LayoutMismatch(detail))
    }
}

/// Hex-encoded sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small_model() -> Model {
        let layout = ModelLayout::new(vec![
            TensorSpec {
                name: "fc.weight".into(),
                shape: vec![2, 3],
            },
            TensorSpec {
                name: "fc.bias".into(),
                shape: vec![3],
            },
        ])
        .expect("valid layout");
        Model::new(Arc::new(layout), (0..9).map(|v| v as f32 * 0.5).collect())
            .expect("matching length")
    }

    #[test]
    fn layout_sorts_by_name_and_computes_offsets() {
        let model = small_model();
        let names: Vec<_> = model.layout().names().collect();
        assert_eq!(names, ["fc.bias", "fc.weight"]);
        assert_eq!(model.tensor("fc.bias"), Some(&[0.0, 0.5, 1.0][..]));
        assert_eq!(model.tensor("fc.weight").map(<[f32]>::len), Some(6));
        assert_eq!(model.tensor("missing"), None);
    }

    #[test]
    fn duplicate_names_are_refused() {
        let spec = TensorSpec {
            name: "a".into(),
            shape: vec![1],
        };
        assert!(ModelLayout::new(vec![spec.clone(), spec]).is_err());
    }

    #[test]
    fn wrong_value_count_is_refused() {
        let layout = small_model().layout().clone();
        assert!(matches!(
            Model::new(layout, vec![0.0; 8]),
            Err(CoreError::LengthMismatch {
                expected: 9,
                got: 8
            })
        ));
    }

    #[test]
    fn safetensors_round_trip_keeps_names_shapes_values_and_hash() {
        let model = small_model();
        let bytes = model.to_safetensors().expect("serialises");
        let back = Model::from_safetensors(&bytes).expect("parses");
        assert_eq!(back, model);
        assert_eq!(back.sha256().expect("hash"), sha256_hex(&bytes));
    }

    #[test]
    fn hash_changes_when_one_value_changes() {
        let model = small_model();
        let mut other = model.clone();
        other.values_mut()[4] += 1e-6;
        assert_ne!(model.sha256().expect("hash"), other.sha256().expect("hash"));
    }

    #[test]
    fn garbage_bytes_are_an_error_not_a_panic() {
        assert!(matches!(
            Model::from_safetensors(b"not a safetensors file"),
            Err(CoreError::Safetensors(_))
        ));
    }

    #[test]
    fn non_f32_tensors_are_refused() {
        let data = [0u8; 4];
        let view = TensorView::new(Dtype::I32, vec![1], &data).expect("view");
        let bytes = safetensors::serialize(vec![("x".to_string(), view)], None).expect("bytes");
        assert!(matches!(
            Model::from_safetensors(&bytes),
            Err(CoreError::UnsupportedDtype { .. })
        ));
    }

    #[test]
    fn layout_check_names_the_first_difference() {
        let model = small_model();
        let other = ModelLayout::new(vec![TensorSpec {
            name: "fc.bias".into(),
            shape: vec![4],
        }])
        .expect("layout");
        let err = model.check_same_layout(&other).expect_err("differs");
        assert!(err.to_string().contains("fc.bias"), "{err}");
    }
}
