//! Tensors kept out of averaging by name. Personal tensors stay on each node: a run names them
//! by patterns (for example every BatchNorm tensor, as FedBN keeps normalisation local), and
//! each node keeps its own trained values from round to round. Frozen tensors travel down with
//! the model and never back (FFA-LoRA's shared A, a pinned base). Both are carried like integer
//! tensors, so the server never averages them and nodes never upload them.

use safetensors::tensor::{SafeTensors, TensorView};

use crate::{CoreError, dtype::CarriedTensor};

/// Which of a model's tensors a run keeps out of averaging, by name patterns (`*` matches any
/// run of characters): **personal** tensors, each node's own (trained there, kept there), and
/// **frozen** tensors, sent to every node with the model and never changed (a pinned base, or
/// LoRA's shared A in FFA-LoRA). Both are carried like integer tensors: never averaged, never
/// uploaded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TensorRoles {
    personal: Vec<String>,
    frozen: Vec<String>,
}

impl TensorRoles {
    /// A run whose personal tensors `patterns` name (each non-empty: `features.1.*`,
    /// `*running_*`, `bn*`), and no frozen tensors.
    pub fn new(patterns: Vec<String>) -> Result<Self, CoreError> {
        Self::checked(&patterns, "personal")?;
        Ok(Self {
            personal: patterns,
            frozen: Vec::new(),
        })
    }

    /// A run's roles from its `personal` and `frozen` patterns (each non-empty), as a task or
    /// a run's settings name them.
    pub fn of(personal: Vec<String>, frozen: Vec<String>) -> Result<Self, CoreError> {
        Self::new(personal)?.with_frozen(frozen)
    }

    /// These roles with the frozen tensors `patterns` name (each non-empty).
    pub fn with_frozen(self, patterns: Vec<String>) -> Result<Self, CoreError> {
        Self::checked(&patterns, "frozen")?;
        Ok(Self {
            frozen: patterns,
            ..self
        })
    }

    fn checked(patterns: &[String], role: &str) -> Result<(), CoreError> {
        if patterns.iter().any(|p| p.trim().is_empty()) {
            return Err(CoreError::LayoutMismatch(format!(
                "a {role}-tensor pattern is empty; give names such as 'bn*' or 'features.1.*'"
            )));
        }
        Ok(())
    }

    /// The personal tensors' patterns, as given.
    pub fn patterns(&self) -> &[String] {
        &self.personal
    }

    /// The frozen tensors' patterns, as given.
    pub fn frozen_patterns(&self) -> &[String] {
        &self.frozen
    }

    /// Whether the run carries no tensor by name (no personal and no frozen tensors).
    pub fn is_empty(&self) -> bool {
        self.personal.is_empty() && self.frozen.is_empty()
    }

    /// Whether the run has personal tensors.
    pub fn has_personal(&self) -> bool {
        !self.personal.is_empty()
    }

    /// Whether the tensor `name` is carried by name: personal or frozen.
    pub fn matches(&self, name: &str) -> bool {
        self.is_personal(name) || self.is_frozen(name)
    }

    /// Whether the tensor `name` is personal.
    pub fn is_personal(&self, name: &str) -> bool {
        self.personal.iter().any(|pattern| glob(pattern, name))
    }

    /// Whether the tensor `name` is frozen (a name both patterns match is personal).
    pub fn is_frozen(&self, name: &str) -> bool {
        !self.is_personal(name) && self.frozen.iter().any(|pattern| glob(pattern, name))
    }

    /// Refuses patterns that name no tensor among `names`: a typo would otherwise silently
    /// average what the user meant to keep.
    pub fn check_against(&self, names: &[&str]) -> Result<(), CoreError> {
        let roles = [("personal", &self.personal), ("frozen", &self.frozen)];
        let unused = roles.iter().find_map(|(role, patterns)| {
            patterns
                .iter()
                .find(|pattern| !names.iter().any(|name| glob(pattern, name)))
                .map(|pattern| (role, pattern))
        });
        match unused {
            Some((role, unused)) => Err(CoreError::LayoutMismatch(format!(
                "the {role}-tensor pattern '{unused}' matches no tensor of the model (it has: \
                 {})",
                names.join(", ")
            ))),
            None => Ok(()),
        }
    }

    /// Refuses a trained model `trained` whose frozen tensors differ from `sent`'s: they were
    /// to come back as they were sent.
    pub fn check_frozen_kept(
        &self,
        sent: &crate::Model,
        trained: &crate::Model,
    ) -> Result<(), CoreError> {
        for tensor in sent.carried().iter().filter(|t| self.is_frozen(&t.name)) {
            let back = trained.carried().iter().find(|t| t.name == tensor.name);
            if back.is_none_or(|b| b != tensor) {
                return Err(CoreError::LayoutMismatch(format!(
                    "the trainer changed the frozen tensor '{}' (the run's frozen patterns: {}); \
                     frozen tensors must come back exactly as they were received: leave them \
                     out of the optimizer",
                    tensor.name,
                    self.frozen.join(", ")
                )));
            }
        }
        Ok(())
    }
}

/// Whether `name` matches `pattern`, where `*` matches any run of characters.
fn glob(pattern: &str, name: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = name.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// A node's personal tensors as a safetensors file, to keep between rounds.
pub fn save(tensors: &[&CarriedTensor]) -> Result<Vec<u8>, CoreError> {
    let views = tensors
        .iter()
        .map(|t| {
            TensorView::new(t.dtype, t.shape.clone(), &t.data)
                .map(|view| (t.name.clone(), view))
                .map_err(|e| CoreError::Safetensors(format!("tensor '{}': {e}", t.name)))
        })
        .collect::<Result<Vec<_>, _>>()?;
    safetensors::serialize(views, None).map_err(|e| CoreError::Safetensors(e.to_string()))
}

/// The tensors of a file written by [`save`].
pub fn load(bytes: &[u8]) -> Result<Vec<CarriedTensor>, CoreError> {
    let file = SafeTensors::deserialize(bytes)
        .map_err(|e| CoreError::Safetensors(format!("the node's personal tensors: {e}")))?;
    Ok(file
        .tensors()
        .into_iter()
        .map(|(name, view)| CarriedTensor {
            name,
            dtype: view.dtype(),
            shape: view.shape().to_vec(),
            data: view.data().to_vec(),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_whole_names_with_stars_anywhere() {
        let bn = TensorRoles::new(vec!["features.1.*".into(), "*running_*".into()]).expect("valid");
        for name in ["features.1.weight", "features.1.bias", "bn2.running_mean"] {
            assert!(bn.matches(name), "{name}");
        }
        for name in ["features.10.weight", "features.0.weight", "classifier.bias"] {
            assert!(!bn.matches(name), "{name}");
        }
        assert!(glob("a*b*c", "a-x-b-y-c") && !glob("a*b*c", "a-x-c"));
        assert!(glob("exact", "exact") && !glob("exact", "exact2"));
        assert!(glob("*", "") && !glob("ab*ba", "aba"));
        assert!(TensorRoles::new(vec![" ".into()]).is_err());
    }

    #[test]
    fn frozen_tensors_are_carried_but_not_personal_and_must_come_back_unchanged() {
        let roles = TensorRoles::of(vec!["bn*".into()], vec!["*.lora_A".into(), "bn*".into()])
            .expect("valid");
        assert!(roles.is_frozen("attn.lora_A") && roles.matches("attn.lora_A"));
        assert!(!roles.is_personal("attn.lora_A"));
        assert!(
            roles.is_personal("bn1") && !roles.is_frozen("bn1"),
            "personal wins"
        );
        assert!(!roles.matches("attn.lora_B"));
        assert!(TensorRoles::default().with_frozen(vec!["".into()]).is_err());
        let sent =
            crate::Model::from_safetensors_with(&frozen_model_bytes(1.0), &roles).expect("model");
        assert_eq!(sent.carried().len(), 1, "lora_A travels carried");
        let same =
            crate::Model::from_safetensors_with(&frozen_model_bytes(1.0), &roles).expect("model");
        assert!(roles.check_frozen_kept(&sent, &same).is_ok());
        let changed =
            crate::Model::from_safetensors_with(&frozen_model_bytes(2.0), &roles).expect("model");
        let err = roles
            .check_frozen_kept(&sent, &changed)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("'attn.lora_A'") && err.contains("*.lora_A"),
            "{err}"
        );
    }

    /// A model file of a trainable `attn.lora_B` and an `attn.lora_A` of `a`s.
    fn frozen_model_bytes(a: f32) -> Vec<u8> {
        let b: Vec<u8> = [0.5f32; 4].iter().flat_map(|v| v.to_le_bytes()).collect();
        let a: Vec<u8> = [a; 4].iter().flat_map(|v| v.to_le_bytes()).collect();
        let views = [
            (
                "attn.lora_A",
                TensorView::new(safetensors::Dtype::F32, vec![2, 2], &a),
            ),
            (
                "attn.lora_B",
                TensorView::new(safetensors::Dtype::F32, vec![2, 2], &b),
            ),
        ]
        .map(|(name, view)| (name, view.expect("view")));
        safetensors::serialize(views, None).expect("bytes")
    }

    #[test]
    fn a_pattern_that_names_no_tensor_is_refused() {
        let names = ["conv.weight", "bn.weight"];
        let ok = TensorRoles::new(vec!["bn.*".into()]).expect("valid");
        assert!(ok.check_against(&names).is_ok());
        let typo = TensorRoles::new(vec!["bn.*".into(), "batchnorm.*".into()]).expect("valid");
        let err = typo.check_against(&names).unwrap_err().to_string();
        assert!(
            err.contains("'batchnorm.*'") && err.contains("conv.weight"),
            "{err}"
        );
    }

    #[test]
    fn saved_tensors_come_back_as_they_were() {
        let t = CarriedTensor {
            name: "bn.running_mean".into(),
            dtype: safetensors::Dtype::F32,
            shape: vec![2],
            data: bytemuck::cast_slice(&[1.5f32, -2.0]).to_vec(),
        };
        let back = load(&save(&[&t]).expect("save")).expect("load");
        assert_eq!(back, vec![t]);
    }
}
