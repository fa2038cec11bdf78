//! Moving parameters between burn networks and ferry-core [`Model`]s, and seeded
//! initialisation.
//!
//! Tensor names are the module paths (`conv1.weight`, `fc3.bias`), without the [`Net`] variant,
//! so a saved model reads like the network it came from. burn stores a linear layer's weight as
//! `[in, out]` (PyTorch uses `[out, in]`).

use std::{collections::HashMap, sync::Arc};

use burn::{
    module::{ModuleMapper, ModuleVisitor, Param},
    prelude::*,
};
use ferry_core::{CoreError, Model, ModelLayout, TensorSpec, personal::TensorRoles};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{
    MlError,
    models::{ModelKind, Net},
};

/// Tracks the dotted path of the module being visited, leaving enum variants out.
#[derive(Default)]
struct PathTracker {
    parts: Vec<String>,
    pushed: Vec<bool>,
}

impl PathTracker {
    fn enter(&mut self, name: &str, container_type: &str) {
        let is_variant = container_type.starts_with("Enum:");
        if !is_variant {
            self.parts.push(name.to_string());
        }
        self.pushed.push(!is_variant);
    }

    fn exit(&mut self) {
        if self.pushed.pop().unwrap_or(false) {
            self.parts.pop();
        }
    }

    fn name(&self) -> String {
        self.parts.join(".")
    }
}

#[derive(Default)]
struct Collector {
    path: PathTracker,
    tensors: Vec<(TensorSpec, Vec<f32>)>,
}

impl ModuleVisitor for Collector {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let tensor = param.val();
        let shape = tensor.dims().to_vec();
        let values = tensor
            .into_data()
            .try_into_vec::<f32>()
            .expect("burn float parameters of the flex backend are f32");
        self.tensors
            .push((TensorSpec::f32(self.path.name(), shape), values));
    }
}

/// Reads a network's parameters into a [`Model`].
pub fn to_model(net: &Net) -> Result<Model, CoreError> {
    let mut collector = Collector::default();
    net.visit(&mut collector);
    let layout = ModelLayout::new(collector.tensors.iter().map(|(s, _)| s.clone()).collect())?;
    let mut values = vec![0.0; layout.num_params()];
    for (spec, data) in &collector.tensors {
        if let Some(range) = layout.range(&spec.name) {
            values[range].copy_from_slice(data);
        }
    }
    Model::new(Arc::new(layout), values)
}

struct Loader<'a> {
    path: PathTracker,
    model: &'a Model,
    error: Option<CoreError>,
}

impl ModuleMapper for Loader<'_> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let name = self.path.name();
        let dims = param.lazy_shape().dims::<D>().to_vec();
        let Some(range) = self.model.layout().range(&name) else {
            self.error.get_or_insert(CoreError::LayoutMismatch(format!(
                "the model has no tensor '{name}'"
            )));
            return param;
        };
        let expected: usize = dims.iter().product();
        if range.len() != expected {
            self.error.get_or_insert(CoreError::LayoutMismatch(format!(
                "tensor '{name}' holds {} values, the network needs {dims:?}",
                range.len()
            )));
            return param;
        }
        let data = TensorData::new(self.model.values()[range].to_vec(), dims);
        let tensor = Tensor::<D>::from_data(data, &param.lazy_device());
        let id = param.id;
        param.transform_for_load(tensor, id)
    }
}

/// Loads `model`'s values into `net`; the model must have exactly the network's tensors.
pub fn load_into(net: Net, model: &Model) -> Result<Net, MlError> {
    let mut loader = Loader {
        path: PathTracker::default(),
        model,
        error: None,
    };
    let net = net.map(&mut loader);
    match loader.error {
        Some(e) => Err(e.into()),
        None => Ok(net),
    }
}

/// Each tensor of `model` as a flat constant on `device`, by name: the anchor of FedProx's
/// proximal term.
pub fn flat_tensors(model: &Model, device: &Device) -> HashMap<String, Tensor<1>> {
    model
        .layout()
        .entries()
        .map(|(spec, range)| {
            let n = range.len();
            let data = TensorData::new(model.values()[range].to_vec(), [n]);
            (spec.name.clone(), Tensor::from_data(data, device))
        })
        .collect()
}

struct SquaredDistance<'a> {
    path: PathTracker,
    anchor: &'a HashMap<String, Tensor<1>>,
    total: Option<Tensor<1>>,
}

impl ModuleVisitor for SquaredDistance<'_> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let Some(anchor) = self.anchor.get(&self.path.name()) else {
            return;
        };
        let w = param.val();
        let n = w.dims().iter().product::<usize>();
        let term = (w.reshape([n]) - anchor.clone()).powi_scalar(2).sum();
        self.total = Some(match self.total.take() {
            Some(total) => total + term,
            None => term,
        });
    }
}

/// `||w - anchor||^2` over every parameter of `net` that `anchor` names, as a differentiable
/// one-element tensor.
pub fn squared_distance(net: &Net, anchor: &HashMap<String, Tensor<1>>) -> Tensor<1> {
    let mut visitor = SquaredDistance {
        path: PathTracker::default(),
        anchor,
        total: None,
    };
    net.visit(&mut visitor);
    let device = anchor
        .values()
        .next()
        .map(Tensor::device)
        .unwrap_or_else(Device::flex);
    visitor.total.unwrap_or_else(|| Tensor::zeros([1], &device))
}

/// A network of `kind` on `device` holding `model`'s parameters.
pub fn build(kind: ModelKind, model: &Model, device: &Device) -> Result<Net, MlError> {
    load_into(Net::new(kind, device), model)
}

/// The layout (tensor names and shapes) of a built-in model.
pub fn layout(kind: ModelKind) -> Result<Arc<ModelLayout>, CoreError> {
    Ok(to_model(&Net::new(kind, &Device::flex()))?.layout().clone())
}

/// The built-in network whose layout (tensor names and shapes) `model` has, so that a saved
/// model can be loaded without being told which network it came from.
pub fn kind_of(model: &Model) -> Result<ModelKind, MlError> {
    for kind in ModelKind::ALL {
        if model.check_same_layout(layout(kind)?.as_ref()).is_ok() {
            return Ok(kind);
        }
    }
    let tensors: Vec<String> = model
        .layout()
        .specs()
        .iter()
        .map(|s| format!("{} {:?}", s.name, s.shape))
        .collect();
    Err(MlError::BadSpec(format!(
        "the model's tensors ({}) match none of the built-in networks (lenet, cnn, mlp, logreg)",
        tensors.join(", ")
    )))
}

/// Reads the model file at `path` that a user hands over (any named tensors; see
/// `ferry_core::dtype`), naming the file in every error.
pub fn load_model_file(path: &std::path::Path) -> Result<Model, MlError> {
    load_model_file_with(path, &TensorRoles::default())
}

/// [`load_model_file`] for a run with `personal` tensors (carried, never averaged); refuses
/// patterns that name none of the file's tensors.
pub fn load_model_file_with(
    path: &std::path::Path,
    personal: &TensorRoles,
) -> Result<Model, MlError> {
    let bad = |reason: String| MlError::BadDataFile {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| {
        bad(format!(
            "{e}; give the path of a safetensors model file (PyTorch: \
             safetensors.torch.save_file(model.state_dict(), PATH))"
        ))
    })?;
    let model = Model::from_safetensors_with(&bytes, personal).map_err(|e| bad(e.to_string()))?;
    let names: Vec<&str> = model
        .layout()
        .names()
        .chain(model.carried().iter().map(|t| t.name.as_str()))
        .collect();
    personal
        .check_against(&names)
        .map_err(|e| bad(e.to_string()))?;
    Ok(model)
}

/// A freshly initialised model, the same for the same seed on every machine.
///
/// Every weight and bias is drawn from U(-1/sqrt(fan_in), 1/sqrt(fan_in)), PyTorch's default
/// for `Conv2d` and `Linear` (Kaiming-uniform with a = sqrt(5)), from a ChaCha generator
/// seeded with `seed`, tensor by tensor in layout order.
pub fn init_model(kind: ModelKind, seed: u64) -> Result<Model, CoreError> {
    let layout = layout(kind)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut values = vec![0.0f32; layout.num_params()];
    for (spec, range) in layout.entries() {
        let layer = spec.name.rsplit_once('.').map_or("", |(layer, _)| layer);
        let weight_shape = layout
            .specs()
            .iter()
            .find(|s| s.name == format!("{layer}.weight"))
            .map_or(spec.shape.as_slice(), |s| s.shape.as_slice());
        let fan_in = match weight_shape {
            [_, input, kh, kw] => input * kh * kw,
            [input, _] => *input,
            other => other.iter().product(),
        };
        let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
        for v in &mut values[range] {
            *v = rng.random_range(-bound..bound);
        }
    }
    Model::new(layout, values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_model_names_its_network() {
        for kind in ModelKind::ALL {
            let model = init_model(kind, 3).expect("init");
            assert_eq!(kind_of(&model).expect("known layout"), kind);
        }
        let lenet = init_model(ModelKind::Lenet, 0).expect("init");
        let specs = lenet.layout().specs()[1..].to_vec();
        let values = lenet.values()[lenet.layout().specs()[0].shape.iter().product()..].to_vec();
        let partial =
            Model::new(Arc::new(ModelLayout::new(specs).expect("layout")), values).expect("model");
        let err = kind_of(&partial)
            .expect_err("a layer is missing")
            .to_string();
        assert!(err.contains("match none of the built-in networks"), "{err}");
        assert!(err.contains("conv1.weight [6, 1, 5, 5]"), "{err}");
    }

    #[test]
    fn lenet_has_the_niid_bench_parameter_count_and_names() {
        let model = init_model(ModelKind::Lenet, 0).expect("init");
        assert_eq!(model.num_params(), 44_426);
        let names: Vec<_> = model.layout().names().collect();
        assert_eq!(
            names,
            [
                "conv1.bias",
                "conv1.weight",
                "conv2.bias",
                "conv2.weight",
                "fc1.bias",
                "fc1.weight",
                "fc2.bias",
                "fc2.weight",
                "fc3.bias",
                "fc3.weight"
            ]
        );
        let conv1 = model
            .layout()
            .specs()
            .iter()
            .find(|s| s.name == "conv1.weight");
        assert_eq!(conv1.map(|s| s.shape.clone()), Some(vec![6, 1, 5, 5]));
    }

    #[test]
    fn other_models_have_the_published_parameter_counts() {
        let count = |k| init_model(k, 0).expect("init").num_params();
        assert_eq!(count(ModelKind::Cnn), 1_663_370);
        assert_eq!(count(ModelKind::Mlp), 199_210);
        assert_eq!(count(ModelKind::Logreg), 7_850);
    }

    #[test]
    fn init_is_seeded_and_bounded_by_fan_in() {
        let a = init_model(ModelKind::Lenet, 7).expect("init");
        assert_eq!(a, init_model(ModelKind::Lenet, 7).expect("init"));
        assert_ne!(a, init_model(ModelKind::Lenet, 8).expect("init"));
        let bound = 1.0 / (256f32).sqrt();
        let fc1 = a.tensor("fc1.weight").expect("fc1");
        assert!(fc1.iter().all(|v| v.abs() <= bound));
        assert!(fc1.iter().any(|v| v.abs() > 0.9 * bound));
        let fc1_bias = a.tensor("fc1.bias").expect("bias");
        assert!(fc1_bias.iter().all(|v| v.abs() <= bound));
    }

    #[test]
    fn load_then_read_back_is_identity() {
        let model = init_model(ModelKind::Mlp, 3).expect("init");
        let net = build(ModelKind::Mlp, &model, &Device::flex()).expect("load");
        assert_eq!(to_model(&net).expect("read"), model);
    }

    #[test]
    fn loading_a_model_of_another_network_is_an_error() {
        let model = init_model(ModelKind::Logreg, 0).expect("init");
        let err = build(ModelKind::Lenet, &model, &Device::flex()).expect_err("mismatch");
        assert!(err.to_string().contains("conv"), "{err}");
    }
}
