//! The built-in networks. Every one maps a batch of 28x28 grey images `[B, 1, 28, 28]` to ten
//! class logits `[B, 10]`.

use std::{fmt, str::FromStr};

use burn::{
    nn::{
        Linear, LinearConfig, PaddingConfig2d,
        conv::{Conv2d, Conv2dConfig},
        pool::{MaxPool2d, MaxPool2dConfig},
    },
    prelude::*,
    tensor::activation::relu,
};

use crate::{MlError, data::NUM_CLASSES};

/// The networks Ferry can train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// NIID-Bench's CNN for (Fashion-)MNIST, 44,426 parameters.
    Lenet,
    /// McMahan et al.'s CNN: two 5x5 "same" convolutions (32, 64), FC 3136-512-10.
    Cnn,
    /// McMahan et al.'s "2NN": 784-200-200-10 with ReLU.
    Mlp,
    /// Multinomial logistic regression: 784-10.
    Logreg,
}

impl ModelKind {
    /// Every built-in model, for benchmarks and help texts.
    pub const ALL: [ModelKind; 4] = [Self::Lenet, Self::Cnn, Self::Mlp, Self::Logreg];
}

impl FromStr for ModelKind {
    type Err = MlError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "lenet" => Ok(Self::Lenet),
            "cnn" => Ok(Self::Cnn),
            "mlp" => Ok(Self::Mlp),
            "logreg" => Ok(Self::Logreg),
            _ => Err(MlError::BadSpec(format!(
                "unknown model '{s}': expected lenet, cnn, mlp or logreg"
            ))),
        }
    }
}

impl fmt::Display for ModelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Lenet => "lenet",
            Self::Cnn => "cnn",
            Self::Mlp => "mlp",
            Self::Logreg => "logreg",
        })
    }
}

/// NIID-Bench's CNN: conv(1->6, 5) relu pool, conv(6->16, 5) relu pool, FC 256-120-84-10.
#[derive(Module, Debug)]
pub struct Lenet {
    conv1: Conv2d,
    conv2: Conv2d,
    pool: MaxPool2d,
    fc1: Linear,
    fc2: Linear,
    fc3: Linear,
}

impl Lenet {
    fn new(device: &Device) -> Self {
        Self {
            conv1: Conv2dConfig::new([1, 6], [5, 5]).init(device),
            conv2: Conv2dConfig::new([6, 16], [5, 5]).init(device),
            pool: MaxPool2dConfig::new([2, 2]).init(),
            fc1: LinearConfig::new(16 * 4 * 4, 120).init(device),
            fc2: LinearConfig::new(120, 84).init(device),
            fc3: LinearConfig::new(84, NUM_CLASSES).init(device),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        let x = self.pool.forward(relu(self.conv1.forward(x)));
        let x = self.pool.forward(relu(self.conv2.forward(x)));
        let x: Tensor<2> = x.flatten(1, 3);
        let x = relu(self.fc1.forward(x));
        let x = relu(self.fc2.forward(x));
        self.fc3.forward(x)
    }
}

/// McMahan et al.'s CNN (1,663,370 parameters).
#[derive(Module, Debug)]
pub struct Cnn {
    conv1: Conv2d,
    conv2: Conv2d,
    pool: MaxPool2d,
    fc1: Linear,
    fc2: Linear,
}

impl Cnn {
    fn new(device: &Device) -> Self {
        let same = PaddingConfig2d::Explicit(2, 2, 2, 2);
        Self {
            conv1: Conv2dConfig::new([1, 32], [5, 5])
                .with_padding(same.clone())
                .init(device),
            conv2: Conv2dConfig::new([32, 64], [5, 5])
                .with_padding(same)
                .init(device),
            pool: MaxPool2dConfig::new([2, 2]).init(),
            fc1: LinearConfig::new(64 * 7 * 7, 512).init(device),
            fc2: LinearConfig::new(512, NUM_CLASSES).init(device),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        let x = self.pool.forward(relu(self.conv1.forward(x)));
        let x = self.pool.forward(relu(self.conv2.forward(x)));
        let x: Tensor<2> = x.flatten(1, 3);
        self.fc2.forward(relu(self.fc1.forward(x)))
    }
}

/// McMahan et al.'s "2NN" (199,210 parameters).
#[derive(Module, Debug)]
pub struct Mlp {
    fc1: Linear,
    fc2: Linear,
    fc3: Linear,
}

impl Mlp {
    fn new(device: &Device) -> Self {
        Self {
            fc1: LinearConfig::new(28 * 28, 200).init(device),
            fc2: LinearConfig::new(200, 200).init(device),
            fc3: LinearConfig::new(200, NUM_CLASSES).init(device),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        let x: Tensor<2> = x.flatten(1, 3);
        let x = relu(self.fc1.forward(x));
        let x = relu(self.fc2.forward(x));
        self.fc3.forward(x)
    }
}

/// Multinomial logistic regression (7,850 parameters).
#[derive(Module, Debug)]
pub struct Logreg {
    fc: Linear,
}

impl Logreg {
    fn new(device: &Device) -> Self {
        Self {
            fc: LinearConfig::new(28 * 28, NUM_CLASSES).init(device),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        self.fc.forward(x.flatten(1, 3))
    }
}

/// One of the built-in networks, as a burn module.
#[derive(Module, Debug)]
pub enum Net {
    /// See [`Lenet`].
    Lenet(Lenet),
    /// See [`Cnn`].
    Cnn(Cnn),
    /// See [`Mlp`].
    Mlp(Mlp),
    /// See [`Logreg`].
    Logreg(Logreg),
}

impl Net {
    /// A freshly initialised network of the given kind on `device` (burn's default
    /// initialisation; Ferry overwrites it with seeded values, see [`crate::params`]).
    pub fn new(kind: ModelKind, device: &Device) -> Self {
        match kind {
            ModelKind::Lenet => Self::Lenet(Lenet::new(device)),
            ModelKind::Cnn => Self::Cnn(Cnn::new(device)),
            ModelKind::Mlp => Self::Mlp(Mlp::new(device)),
            ModelKind::Logreg => Self::Logreg(Logreg::new(device)),
        }
    }

    /// Class logits `[B, 10]` for images `[B, 1, 28, 28]`.
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        match self {
            Self::Lenet(m) => m.forward(images),
            Self::Cnn(m) => m.forward(images),
            Self::Mlp(m) => m.forward(images),
            Self::Logreg(m) => m.forward(images),
        }
    }
}
