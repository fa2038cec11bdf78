//! A model as named, shaped parameter tensors stored in one flat `f32` vector, plus the
//! non-parameter tensors it carries.
//!
//! Keeping every parameter in one contiguous vector lets the update algebra and the
//! aggregators work on a single flat slice, while the [`ModelLayout`] keeps the names, shapes
//! and file dtypes that ML engines and the safetensors file need. Tensors are ordered by name,
//! so two models with the same tensors always have the same flat order. Any set of named
//! tensors of any shapes (0-d included) is a model, as long as one is floating point; see
//! [`crate::dtype`] for what each dtype becomes.

use std::{
    io::{Read, Seek, Write},
    sync::Arc,
};

use sha2::{Digest, Sha256};

use crate::{
    CoreError,
    dtype::{CarriedTensor, TensorDtype},
    personal::TensorRoles,
    tensor_file::{self, Planned, TensorReader},
};

/// The name, shape and file dtype of one parameter tensor of a model.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TensorSpec {
    /// Name as the model uses it, for example `conv1.weight`.
    pub name: String,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// How the model file stores it (values are f32 in memory whatever it is).
    #[serde(default)]
    pub dtype: TensorDtype,
}

impl TensorSpec {
    /// An f32 tensor.
    pub fn f32(name: impl Into<String>, shape: Vec<usize>) -> Self {
        Self {
            name: name.into(),
            shape,
            dtype: TensorDtype::F32,
        }
    }

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

    /// Bytes of the parameter values in the model's file, each tensor in its own dtype:
    /// what a node downloads.
    pub fn param_bytes(&self) -> u64 {
        self.specs
            .iter()
            .map(|s| (s.len() * s.dtype.size()) as u64)
            .sum()
    }

    /// Bytes of an update's delta values on the wire, each tensor in its wire dtype
    /// ([`crate::TensorDtype::on_the_wire`]).
    pub fn delta_bytes(&self) -> u64 {
        self.specs
            .iter()
            .map(|s| (s.len() * s.dtype.on_the_wire().size()) as u64)
            .sum()
    }

    /// Each tensor with the range of the flat vector that holds it, in layout order.
    pub fn entries(&self) -> impl Iterator<Item = (&TensorSpec, std::ops::Range<usize>)> {
        self.specs
            .iter()
            .zip(&self.offsets)
            .map(|(spec, &start)| (spec, start..start + spec.len()))
    }

    /// Checks that `other` has exactly these tensors and shapes, naming the first difference.
    pub fn check_same(&self, other: &ModelLayout) -> Result<(), CoreError> {
        if self == other {
            return Ok(());
        }
        let ours = self.specs();
        let theirs = other.specs();
        let detail = ours
            .iter()
            .zip(theirs)
            .find(|(a, b)| a != b)
            .map(|(a, b)| {
                format!(
                    "expected tensor '{}' {:?} {}, got '{}' {:?} {}",
                    a.name, a.shape, a.dtype, b.name, b.shape, b.dtype
                )
            })
            .unwrap_or_else(|| format!("expected {} tensors, got {}", ours.len(), theirs.len()));
        Err(CoreError::LayoutMismatch(detail))
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

/// One tensor as a model file holds it: name, shape, dtype and bytes.
/// A model: a layout plus one flat vector of parameter values, and the tensors it carries.
#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    layout: Arc<ModelLayout>,
    values: Vec<f32>,
    carried: Arc<[CarriedTensor]>,
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
        Ok(Self {
            layout,
            values,
            carried: Arc::from(Vec::new()),
        })
    }

    /// The model with `carried` as its non-parameter tensors (whose names must not clash with
    /// a parameter's).
    pub fn with_carried(mut self, carried: Vec<CarriedTensor>) -> Result<Self, CoreError> {
        if let Some(clash) = carried
            .iter()
            .find(|t| self.layout.range(&t.name).is_some())
        {
            return Err(CoreError::LayoutMismatch(format!(
                "tensor name '{}' appears twice",
                clash.name
            )));
        }
        self.carried = Arc::from(carried);
        Ok(self)
    }

    /// The tensors that travel with the model but are never averaged (integers, booleans,
    /// and a run's personal tensors).
    pub fn carried(&self) -> &[CarriedTensor] {
        &self.carried
    }

    /// The model with each carried tensor named in `own` (a node's personal tensors) taking
    /// `own`'s value; a saved tensor whose dtype or shape no longer fits is refused.
    pub fn with_own(&self, own: &[CarriedTensor]) -> Result<Self, CoreError> {
        let mut carried = self.carried.to_vec();
        for tensor in &mut carried {
            let Some(mine) = own.iter().find(|o| o.name == tensor.name) else {
                continue;
            };
            if (mine.dtype, &mine.shape) != (tensor.dtype, &tensor.shape) {
                return Err(CoreError::LayoutMismatch(format!(
                    "the node's own tensor '{}' is {:?} {:?}, the model's is {:?} {:?}",
                    mine.name, mine.dtype, mine.shape, tensor.dtype, tensor.shape
                )));
            }
            tensor.data.clone_from(&mine.data);
        }
        Ok(Self {
            carried: Arc::from(carried),
            ..self.clone()
        })
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

    /// The tensors of the model's file: each parameter tensor in the dtype `dtype_of` gives
    /// it, then each carried tensor as it came.
    fn planned(&self, dtype_of: &dyn Fn(&TensorSpec) -> TensorDtype) -> Vec<Planned> {
        self.layout
            .specs()
            .iter()
            .map(|spec| Planned {
                name: spec.name.clone(),
                dtype: dtype_of(spec).safetensors(),
                shape: spec.shape.clone(),
            })
            .chain(self.carried.iter().map(|t| Planned {
                name: t.name.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
            }))
            .collect()
    }

    /// Writes the model as a safetensors file to `out` a tensor (or a piece of one) at a
    /// time, so that no second copy of the model is made; returns the bytes written.
    pub fn write_safetensors(&self, out: &mut dyn Write) -> Result<u64, CoreError> {
        self.write_as(out, &|spec| spec.dtype, None)
    }

    /// [`Model::write_safetensors`] with each parameter tensor in the dtype `dtype_of` gives
    /// it (its values rounded to it) and the file's `metadata`.
    pub(crate) fn write_as(
        &self,
        out: &mut dyn Write,
        dtype_of: &dyn Fn(&TensorSpec) -> TensorDtype,
        metadata: Option<std::collections::HashMap<String, String>>,
    ) -> Result<u64, CoreError> {
        let io = |e: std::io::Error| CoreError::Io(e.to_string());
        let (header, order) = tensor_file::header(&self.planned(dtype_of), metadata)?;
        out.write_all(&header).map_err(io)?;
        let mut written = header.len() as u64;
        let entries: Vec<_> = self.layout.entries().collect();
        for i in order {
            let Some((spec, range)) = entries.get(i).cloned() else {
                let data = &self.carried[i - entries.len()].data;
                out.write_all(data).map_err(io)?;
                written += data.len() as u64;
                continue;
            };
            let values = &self.values[range];
            let dtype = dtype_of(spec);
            if dtype == TensorDtype::F32 {
                out.write_all(bytemuck::cast_slice(values)).map_err(io)?;
            } else {
                for piece in values.chunks(1 << 18) {
                    out.write_all(&dtype.encode(piece)).map_err(io)?;
                }
            }
            written += (values.len() * dtype.size()) as u64;
        }
        Ok(written)
    }

    /// Serialises the model as a safetensors file: each parameter tensor in its own dtype,
    /// each carried tensor as it came.
    pub fn to_safetensors(&self) -> Result<Vec<u8>, CoreError> {
        let mut bytes = Vec::new();
        self.write_safetensors(&mut bytes)?;
        Ok(bytes)
    }

    /// Reads a safetensors model file: its floating-point tensors (f32, f16, bf16, f64) are
    /// the parameters, every other tensor is carried. A file without a floating-point tensor
    /// is refused.
    pub fn from_safetensors(bytes: &[u8]) -> Result<Self, CoreError> {
        Self::from_safetensors_with(bytes, &TensorRoles::default())
    }

    /// [`Model::from_safetensors`] for a run with `personal` tensors: those are carried too,
    /// whatever their dtype, so they are never averaged or uploaded.
    pub fn from_safetensors_with(bytes: &[u8], personal: &TensorRoles) -> Result<Self, CoreError> {
        Self::read_safetensors(std::io::Cursor::new(bytes), personal)
    }

    /// [`Model::from_safetensors_with`] for a file or any seekable source, read a tensor at a
    /// time: the values are the only copy of the parameters held.
    pub fn read_safetensors(
        source: impl Read + Seek,
        personal: &TensorRoles,
    ) -> Result<Self, CoreError> {
        let mut file = TensorReader::open(source).map_err(|e| match e {
            CoreError::Safetensors(e) => {
                CoreError::Safetensors(format!("not a safetensors model file ({e})"))
            }
            other => other,
        })?;
        let mut entries = file.entries().to_vec();
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        let mut specs = Vec::new();
        let mut carried = Vec::new();
        for entry in entries {
            match TensorDtype::of(entry.dtype).filter(|_| !personal.matches(&entry.name)) {
                Some(dtype) => specs.push(TensorSpec {
                    name: entry.name,
                    shape: entry.shape,
                    dtype,
                }),
                None => carried.push(CarriedTensor {
                    data: file.read_bytes(&entry.name)?,
                    name: entry.name,
                    dtype: entry.dtype,
                    shape: entry.shape,
                }),
            }
        }
        crate::download::restore_dtypes(&mut specs, file.metadata())?;
        if specs.is_empty() {
            return Err(CoreError::NoParameters(
                carried
                    .iter()
                    .map(|t| format!("{} ({:?})", t.name, t.dtype))
                    .collect::<Vec<_>>()
                    .join(", "),
            ));
        }
        let layout = ModelLayout::new(specs)?;
        let mut values = vec![0.0f32; layout.num_params()];
        for (spec, range) in layout.entries() {
            file.read_f32_into(&spec.name, &mut values[range])?;
        }
        Self::new(Arc::new(layout), values)?.with_carried(carried)
    }

    /// Hex sha256 of the model's safetensors bytes: equal models have equal hashes, and the
    /// hash matches `sha256sum` of the saved file.
    pub fn sha256(&self) -> Result<String, CoreError> {
        Ok(sha256_hex(&self.to_safetensors()?))
    }

    /// Checks that `other` has exactly this model's tensors and shapes.
    pub fn check_same_layout(&self, other: &ModelLayout) -> Result<(), CoreError> {
        self.layout.check_same(other)
    }
}

/// Hex-encoded sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// `digest` as lowercase hex.
pub fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use safetensors::tensor::{Dtype, SafeTensors, TensorView};

    use super::*;

    fn small_model() -> Model {
        let layout = ModelLayout::new(vec![
            TensorSpec {
                name: "fc.weight".into(),
                shape: vec![2, 3],
                dtype: crate::TensorDtype::F32,
            },
            TensorSpec {
                name: "fc.bias".into(),
                shape: vec![3],
                dtype: crate::TensorDtype::F32,
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
            dtype: crate::TensorDtype::F32,
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

    /// A file as a PyTorch user's model might be: bf16 and f64 weights, a 0-d f16 scalar, and
    /// BatchNorm's integer step counter.
    fn mixed_file() -> Vec<u8> {
        let bf16: Vec<u8> = [0.5f32, -1.25, 3.0]
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        let f64s: Vec<u8> = [0.1f64, 0.2].iter().flat_map(|v| v.to_le_bytes()).collect();
        let scalar = half::f16::from_f32(2.0).to_le_bytes();
        let steps = 7i64.to_le_bytes();
        let views = vec![
            ("fc.weight", Dtype::BF16, vec![3], &bf16[..]),
            ("fc.bias", Dtype::F64, vec![2], &f64s[..]),
            ("temperature", Dtype::F16, vec![], &scalar[..]),
            ("bn.num_batches_tracked", Dtype::I64, vec![], &steps[..]),
        ]
        .into_iter()
        .map(|(name, dtype, shape, data)| {
            (
                name.to_string(),
                TensorView::new(dtype, shape, data).expect("view"),
            )
        })
        .collect::<Vec<_>>();
        safetensors::serialize(views, None).expect("bytes")
    }

    #[test]
    fn float_tensors_of_every_width_are_parameters_and_integers_are_carried() {
        let bytes = mixed_file();
        let model = Model::from_safetensors(&bytes).expect("a model");
        let specs: Vec<_> = model
            .layout()
            .specs()
            .iter()
            .map(|s| (s.name.as_str(), s.shape.clone(), s.dtype))
            .collect();
        assert_eq!(
            specs,
            [
                ("fc.bias", vec![2], TensorDtype::F64),
                ("fc.weight", vec![3], TensorDtype::Bf16),
                ("temperature", vec![], TensorDtype::F16),
            ]
        );
        assert_eq!(model.num_params(), 6, "a 0-d tensor holds one value");
        assert_eq!(model.tensor("temperature"), Some(&[2.0f32][..]));
        assert_eq!(model.carried().len(), 1);
        assert_eq!(model.carried()[0].name, "bn.num_batches_tracked");
        // Written back in each tensor's own dtype: bf16, f16 and integers byte for byte, f64
        // at f32 precision.
        let again = model.to_safetensors().expect("bytes");
        let reread = SafeTensors::deserialize(&again).expect("safetensors");
        let original = SafeTensors::deserialize(&bytes).expect("safetensors");
        for (name, view) in original.tensors() {
            let other = reread.tensor(&name).expect("every tensor written back");
            assert_eq!(
                (view.dtype(), view.shape()),
                (other.dtype(), other.shape()),
                "{name}"
            );
            if view.dtype() != Dtype::F64 {
                assert_eq!(view.data(), other.data(), "{name}");
            }
        }
        let bias = reread.tensor("fc.bias").expect("bias");
        let written: Vec<f64> = bias
            .data()
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
            .collect();
        assert_eq!(written, [f64::from(0.1f32), f64::from(0.2f32)]);
    }

    #[test]
    fn personal_tensors_are_carried_and_a_node_can_put_its_own_in() {
        let personal = TensorRoles::new(vec!["fc.b*".into()]).expect("valid");
        let model = Model::from_safetensors_with(&mixed_file(), &personal).expect("a model");
        let names: Vec<&str> = model.layout().names().collect();
        assert_eq!(
            names,
            ["fc.weight", "temperature"],
            "fc.bias is not a parameter"
        );
        let carried: Vec<&str> = model.carried().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(carried, ["bn.num_batches_tracked", "fc.bias"]);
        let mut own = model.carried()[1].clone();
        own.data = bytemuck::cast_slice(&[7.0f64, 8.0]).to_vec();
        let mine = model.with_own(std::slice::from_ref(&own)).expect("fits");
        assert_eq!(mine.carried()[1].data, own.data);
        assert_eq!(mine.values(), model.values(), "shared tensors untouched");
        own.shape = vec![3];
        assert!(
            model.with_own(&[own]).is_err(),
            "a saved tensor of another shape"
        );
        let everything = TensorRoles::new(vec!["*".into()]).expect("valid");
        assert!(matches!(
            Model::from_safetensors_with(&mixed_file(), &everything),
            Err(CoreError::NoParameters(_))
        ));
    }

    #[test]
    fn a_file_without_a_float_tensor_is_refused_naming_what_it_holds() {
        let data = [0u8; 4];
        let view = TensorView::new(Dtype::I32, vec![1], &data).expect("view");
        let bytes = safetensors::serialize(vec![("steps".to_string(), view)], None).expect("bytes");
        let err = Model::from_safetensors(&bytes).unwrap_err();
        assert!(matches!(err, CoreError::NoParameters(_)), "{err}");
        assert!(err.to_string().contains("steps (I32)"), "{err}");
    }

    #[test]
    fn layout_check_names_the_first_difference() {
        let model = small_model();
        let other = ModelLayout::new(vec![TensorSpec {
            name: "fc.bias".into(),
            shape: vec![4],
            dtype: crate::TensorDtype::F32,
        }])
        .expect("layout");
        let err = model.check_same_layout(&other).expect_err("differs");
        assert!(err.to_string().contains("fc.bias"), "{err}");
    }
}
