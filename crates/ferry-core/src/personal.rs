//! Personalisation by name: tensors that stay on each node. A run names them by patterns (for
//! example every BatchNorm tensor, as FedBN keeps normalisation local); they are carried like
//! integer tensors, so the server never averages them and nodes never upload them, and each
//! node keeps its own trained values from round to round.

use safetensors::tensor::{SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

use crate::{CoreError, dtype::CarriedTensor};

/// The patterns naming a run's personal tensors; `*` matches any run of characters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersonalTensors(Vec<String>);

impl PersonalTensors {
    /// The patterns, each non-empty (`features.1.*`, `*running_*`, `bn*`).
    pub fn new(patterns: Vec<String>) -> Result<Self, CoreError> {
        if patterns.iter().any(|p| p.trim().is_empty()) {
            return Err(CoreError::LayoutMismatch(
                "a personal-tensor pattern is empty; give names such as 'bn*' or \
                 'features.1.*'"
                    .into(),
            ));
        }
        Ok(Self(patterns))
    }

    /// The patterns as given.
    pub fn patterns(&self) -> &[String] {
        &self.0
    }

    /// Whether the run has no personal tensors.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether the tensor `name` is personal.
    pub fn matches(&self, name: &str) -> bool {
        self.0.iter().any(|pattern| glob(pattern, name))
    }

    /// Refuses patterns that name no tensor among `names`: a typo would otherwise silently
    /// average what the user meant to keep.
    pub fn check_against(&self, names: &[&str]) -> Result<(), CoreError> {
        match self
            .0
            .iter()
            .find(|pattern| !names.iter().any(|name| glob(pattern, name)))
        {
            Some(unused) => Err(CoreError::LayoutMismatch(format!(
                "the personal-tensor pattern '{unused}' matches no tensor of the model (it has: \
                 {})",
                names.join(", ")
            ))),
            None => Ok(()),
        }
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
        let bn =
            PersonalTensors::new(vec!["features.1.*".into(), "*running_*".into()]).expect("valid");
        for name in ["features.1.weight", "features.1.bias", "bn2.running_mean"] {
            assert!(bn.matches(name), "{name}");
        }
        for name in ["features.10.weight", "features.0.weight", "classifier.bias"] {
            assert!(!bn.matches(name), "{name}");
        }
        assert!(glob("a*b*c", "a-x-b-y-c") && !glob("a*b*c", "a-x-c"));
        assert!(glob("exact", "exact") && !glob("exact", "exact2"));
        assert!(glob("*", "") && !glob("ab*ba", "aba"));
        assert!(PersonalTensors::new(vec![" ".into()]).is_err());
    }

    #[test]
    fn a_pattern_that_names_no_tensor_is_refused() {
        let names = ["conv.weight", "bn.weight"];
        let ok = PersonalTensors::new(vec!["bn.*".into()]).expect("valid");
        assert!(ok.check_against(&names).is_ok());
        let typo = PersonalTensors::new(vec!["bn.*".into(), "batchnorm.*".into()]).expect("valid");
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
