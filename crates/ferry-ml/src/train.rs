//! Local training (SGD with momentum and weight decay) and evaluation.
//!
//! Training runs on one thread (burn's `flex` backend without its thread pool): simulation
//! parallelises across nodes instead, and one thread per node keeps every result independent
//! of the machine's core count.

use burn::{
    nn::loss::CrossEntropyLossConfig,
    optim::{GradientsParams, SgdConfig, decay::WeightDecayConfig, momentum::MomentumConfig},
    prelude::*,
};
use ferry_core::{Model, task::LocalTraining};
use rand::{SeedableRng, seq::SliceRandom};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;

use crate::{
    MlError,
    confusion::ConfusionMatrix,
    data::{Dataset, PIXELS},
    models::ModelKind,
    params,
};

/// Examples per forward pass when evaluating.
const EVAL_BATCH: usize = 500;

/// What local training adds to plain SGD, per the strategy's client procedure.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LocalProcedure<'a> {
    /// Plain SGD.
    Plain,
    /// FedProx: `(mu / 2) * ||w - w_start||^2` added to the loss.
    Proximal {
        /// Proximal weight.
        mu: f64,
    },
    /// SCAFFOLD: after every SGD step, `w = w - lr * correction` with `correction = c - c_i`
    /// (flat, in model layout order), as NIID-Bench applies it.
    Corrected {
        /// `c - c_i`.
        correction: &'a [f32],
    },
}

/// The data one node trains on.
#[derive(Debug, Clone, Copy)]
pub struct LocalData<'a> {
    /// The full training set.
    pub dataset: &'a Dataset,
    /// The examples of it this node holds.
    pub indices: &'a [usize],
    /// Std of the Gaussian noise added to every pixel read (feature-skew partitions).
    pub noise_std: f32,
}

/// What local training produced.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    /// The trained parameters.
    pub model: Model,
    /// Examples trained on per epoch (the FedAvg weight).
    pub num_examples: u64,
    /// SGD steps taken.
    pub steps: u64,
    /// Mean training loss over all steps, weighted by batch size.
    pub mean_loss: f64,
}

/// Loss and accuracy of a model on a test set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Evaluation {
    /// Mean cross-entropy.
    pub loss: f64,
    /// Fraction of examples classified correctly, in `[0, 1]`.
    pub accuracy: f64,
    /// Examples evaluated.
    pub examples: usize,
    /// Which class each example was taken for, by true class.
    pub confusion: ConfusionMatrix,
}

impl Evaluation {
    /// The figures a node reports for federated evaluation, with per-class accuracy as
    /// `class_N_accuracy` metrics for the classes it holds.
    pub fn to_node_evaluation(&self) -> ferry_core::evaluation::NodeEvaluation {
        ferry_core::evaluation::NodeEvaluation {
            num_examples: self.examples as u64,
            loss: self.loss,
            accuracy: self.accuracy,
            metrics: (0..crate::data::NUM_CLASSES)
                .filter_map(|c| {
                    let accuracy = self.confusion.class_accuracy(c)?;
                    Some((format!("class_{c}_accuracy"), accuracy))
                })
                .collect(),
        }
    }
}

fn optimizer(cfg: &LocalTraining) -> SgdConfig {
    let momentum = (cfg.momentum != 0.0).then(|| {
        MomentumConfig::new()
            .with_momentum(cfg.momentum)
            .with_dampening(0.0)
    });
    let decay = (cfg.weight_decay != 0.0).then(|| WeightDecayConfig::new(cfg.weight_decay as f32));
    SgdConfig::new()
        .with_momentum(momentum)
        .with_weight_decay(decay)
}

/// Builds an input batch, adding fresh pixel noise when `noise` is set.
fn images_tensor(
    dataset: &Dataset,
    batch: &[usize],
    noise: Option<(&Normal<f32>, &mut ChaCha8Rng)>,
    device: &Device,
) -> Tensor<4> {
    let mut pixels = Vec::with_capacity(batch.len() * PIXELS);
    for &i in batch {
        pixels.extend_from_slice(dataset.image(i));
    }
    if let Some((dist, rng)) = noise {
        for p in &mut pixels {
            *p += dist.sample(rng);
        }
    }
    Tensor::from_data(TensorData::new(pixels, [batch.len(), 1, 28, 28]), device)
}

fn labels_tensor(dataset: &Dataset, batch: &[usize], device: &Device) -> Tensor<1, Int> {
    let labels: Vec<i64> = batch
        .iter()
        .map(|&i| i64::from(dataset.labels[i]))
        .collect();
    Tensor::from_data(TensorData::new(labels, [batch.len()]), device)
}

/// Trains `kind` from `start` on `data` for `cfg.epochs` epochs; `seed` fixes the shuffling
/// and noise, so the same inputs always give the same model.
pub fn train_local(
    kind: ModelKind,
    start: &Model,
    data: LocalData<'_>,
    cfg: &LocalTraining,
    procedure: LocalProcedure<'_>,
    seed: u64,
) -> Result<TrainOutcome, MlError> {
    if data.indices.is_empty() {
        return Err(MlError::BadSpec("a node has no training examples".into()));
    }
    if cfg.batch_size == 0 {
        return Err(MlError::BadSpec("batch size must be at least 1".into()));
    }
    let device = Device::flex().autodiff();
    let mut net = params::build(kind, start, &device)?;
    let mut optim = optimizer(cfg).init();
    let loss_fn = CrossEntropyLossConfig::new().init(&device);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let noise = (data.noise_std > 0.0)
        .then(|| Normal::new(0.0, data.noise_std))
        .transpose()
        .map_err(|e| MlError::BadSpec(format!("invalid noise level: {e}")))?;
    let proximal = match procedure {
        LocalProcedure::Proximal { mu } => Some((mu, params::flat_tensors(start, &device))),
        _ => None,
    };
    let correction = match procedure {
        LocalProcedure::Corrected { correction } if correction.len() != start.num_params() => {
            return Err(MlError::BadSpec(format!(
                "the SCAFFOLD correction has {} values for a model of {}",
                correction.len(),
                start.num_params()
            )));
        }
        LocalProcedure::Corrected { correction } => Some(correction),
        _ => None,
    };
    let mut order = data.indices.to_vec();
    let (mut steps, mut loss_sum, mut seen) = (0u64, 0.0f64, 0usize);
    for _ in 0..cfg.epochs {
        order.shuffle(&mut rng);
        for batch in order.chunks(cfg.batch_size) {
            let x = images_tensor(
                data.dataset,
                batch,
                noise.as_ref().map(|n| (n, &mut rng)),
                &device,
            );
            let y = labels_tensor(data.dataset, batch, &device);
            let loss = loss_fn.forward(net.forward(x), y);
            loss_sum += f64::from(loss.clone().into_scalar::<f32>()) * batch.len() as f64;
            seen += batch.len();
            let objective = match &proximal {
                Some((mu, anchor)) => {
                    loss + params::squared_distance(&net, anchor).mul_scalar(mu / 2.0)
                }
                None => loss,
            };
            let grads = GradientsParams::from_grads(objective.backward(), &net);
            net = optim.step(cfg.lr, net, grads);
            if let Some(correction) = correction {
                let mut current = params::to_model(&net)?;
                ferry_core::algebra::add_scaled(current.values_mut(), correction, -(cfg.lr as f32));
                net = params::load_into(net, &current)?;
            }
            steps += 1;
        }
    }
    Ok(TrainOutcome {
        model: params::to_model(&net)?,
        num_examples: data.indices.len() as u64,
        steps,
        mean_loss: if seen == 0 {
            0.0
        } else {
            loss_sum / seen as f64
        },
    })
}

/// Sum of cross-entropy and the predictions by true class for a batch of logits.
fn score(logits: &[f32], labels: &[u8]) -> (f64, ConfusionMatrix) {
    let classes = logits.len() / labels.len().max(1);
    let mut loss = 0.0;
    let mut confusion = ConfusionMatrix::default();
    for (row, &label) in logits.chunks_exact(classes).zip(labels) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let log_sum: f64 = row
            .iter()
            .map(|v| f64::from(v - max).exp())
            .sum::<f64>()
            .ln();
        loss += log_sum - f64::from(row[usize::from(label)] - max);
        let predicted = row
            .iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
                if v > best.1 { (i, v) } else { best }
            })
            .0;
        confusion.record(usize::from(label), predicted);
    }
    (loss, confusion)
}

/// Evaluates `model` on `test`, once per entry of `noise_copies` (each copy of the test set
/// carries Gaussian pixel noise of that std, drawn from `seed`); an empty list means the clean
/// test set once. Batches run in parallel; totals are summed in a fixed order.
pub fn evaluate(
    kind: ModelKind,
    model: &Model,
    test: &Dataset,
    noise_copies: &[f32],
    seed: u64,
) -> Result<Evaluation, MlError> {
    let indices: Vec<usize> = (0..test.len()).collect();
    evaluate_examples(kind, model, test, &indices, noise_copies, seed)
}

/// [`evaluate`] on the examples `indices` of `test` only: a node's held-out share.
pub fn evaluate_examples(
    kind: ModelKind,
    model: &Model,
    test: &Dataset,
    indices: &[usize],
    noise_copies: &[f32],
    seed: u64,
) -> Result<Evaluation, MlError> {
    let copies: Vec<f32> = if noise_copies.is_empty() {
        vec![0.0]
    } else {
        noise_copies.to_vec()
    };
    let jobs: Vec<(usize, f32, &[usize])> = copies
        .iter()
        .enumerate()
        .flat_map(|(c, &std)| indices.chunks(EVAL_BATCH).map(move |b| (c, std, b)))
        .collect();
    let device = Device::flex();
    let partials = jobs
        .par_iter()
        .enumerate()
        .map(|(job, &(_, std, batch))| {
            let net = params::build(kind, model, &device)?;
            let mut rng =
                ChaCha8Rng::seed_from_u64(seed ^ (job as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let noise = (std > 0.0)
                .then(|| Normal::new(0.0, std))
                .transpose()
                .map_err(|e| MlError::BadSpec(format!("invalid noise level: {e}")))?;
            let x = images_tensor(test, batch, noise.as_ref().map(|n| (n, &mut rng)), &device);
            let logits = net
                .forward(x)
                .into_data()
                .try_into_vec::<f32>()
                .map_err(|e| MlError::BadSpec(format!("unexpected logits dtype: {e:?}")))?;
            let labels: Vec<u8> = batch.iter().map(|&i| test.labels[i]).collect();
            Ok(score(&logits, &labels))
        })
        .collect::<Result<Vec<_>, MlError>>()?;
    let mut loss = 0.0;
    let mut confusion = ConfusionMatrix::default();
    for (batch_loss, batch_confusion) in &partials {
        loss += batch_loss;
        confusion.merge(batch_confusion);
    }
    let examples = indices.len() * copies.len();
    Ok(Evaluation {
        loss: loss / examples.max(1) as f64,
        accuracy: confusion.correct() as f64 / examples.max(1) as f64,
        examples,
        confusion,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::init_model;

    /// Two linearly separable classes: bright top half vs bright bottom half.
    fn toy(n: usize) -> Dataset {
        let mut images = Vec::with_capacity(n * PIXELS);
        let mut labels = Vec::with_capacity(n);
        for i in 0..n {
            let label = (i % 2) as u8;
            for p in 0..PIXELS {
                let top = p < PIXELS / 2;
                let lit = (label == 0) == top;
                images.push(if lit { 0.9 } else { 0.1 } + ((i * 31 + p * 7) % 10) as f32 * 0.005);
            }
            labels.push(label);
        }
        Dataset { images, labels }
    }

    /// All of `indices` of `data`, without pixel noise.
    fn clean<'a>(data: &'a Dataset, indices: &'a [usize]) -> LocalData<'a> {
        LocalData {
            dataset: data,
            indices,
            noise_std: 0.0,
        }
    }

    fn cfg(epochs: u32) -> LocalTraining {
        LocalTraining {
            epochs,
            batch_size: 16,
            lr: 0.05,
            momentum: 0.9,
            weight_decay: 1e-5,
        }
    }

    #[test]
    fn score_counts_correct_argmax_and_cross_entropy() {
        let (loss, confusion) = score(&[2.0, 0.0, 0.0, 5.0], &[0, 0]);
        assert_eq!(confusion.correct(), 1);
        assert_eq!(
            confusion.count(0, 1),
            1,
            "the second example was taken for class 1"
        );
        let expected = (1.0 + (-2.0f64).exp()).ln() + (1.0 + 5.0f64.exp()).ln();
        assert!((loss - expected).abs() < 1e-5, "{loss} vs {expected}");
    }

    #[test]
    fn training_learns_a_separable_task_and_is_reproducible() {
        let data = toy(128);
        let indices: Vec<usize> = (0..128).collect();
        let start = init_model(ModelKind::Logreg, 1).expect("init");
        let local = clean(&data, &indices);
        let train = |seed| {
            train_local(
                ModelKind::Logreg,
                &start,
                local,
                &cfg(3),
                LocalProcedure::Plain,
                seed,
            )
            .expect("train")
        };
        let before = evaluate(ModelKind::Logreg, &start, &data, &[], 0).expect("eval");
        let out = train(9);
        let after = evaluate(ModelKind::Logreg, &out.model, &data, &[], 0).expect("eval");
        assert_eq!(out.num_examples, 128);
        assert_eq!(out.steps, 3 * 8);
        assert!(after.accuracy > 0.95, "accuracy {}", after.accuracy);
        assert!(after.loss < before.loss);
        assert_eq!(train(9).model, out.model);
        assert_ne!(train(10).model, out.model);
    }

    /// Logistic regression with every parameter zero: a uniform softmax.
    fn zero_logreg() -> Model {
        let m = init_model(ModelKind::Logreg, 0).expect("init");
        Model::new(m.layout().clone(), vec![0.0; m.num_params()]).expect("zeros")
    }

    #[test]
    fn one_sgd_step_matches_the_cross_entropy_gradient() {
        // Logistic regression from zero weights: the softmax is uniform, so the gradient of the
        // mean cross-entropy w.r.t. bias c is the batch mean of (0.1 - [label == c]).
        let mut data = toy(2);
        data.labels = vec![3, 7];
        let zero = zero_logreg();
        let one_step = LocalTraining {
            epochs: 1,
            batch_size: 2,
            lr: 1.0,
            momentum: 0.0,
            weight_decay: 0.0,
        };
        let local = clean(&data, &[0, 1]);
        let out = train_local(
            ModelKind::Logreg,
            &zero,
            local,
            &one_step,
            LocalProcedure::Plain,
            0,
        )
        .expect("train");
        let bias = out.model.tensor("fc.bias").expect("bias");
        for (c, b) in bias.iter().enumerate() {
            let expected = if c == 3 || c == 7 { 0.5 - 0.1 } else { -0.1 };
            assert!((b - expected).abs() < 1e-6, "bias {c}: {b} vs {expected}");
        }
        // Weight [pixel, class]: -(mean over the batch of x_pixel * (0.1 - onehot)).
        let weight = out.model.tensor("fc.weight").expect("weight");
        let (x0, x1) = (data.image(0)[0], data.image(1)[0]);
        let expected = (x0 * (1.0 - 0.1) + x1 * (-0.1)) / 2.0;
        assert!(
            (weight[3] - expected).abs() < 1e-6,
            "{} vs {expected}",
            weight[3]
        );
    }

    #[test]
    fn momentum_and_weight_decay_follow_the_pytorch_rule() {
        // Two steps on the same single example; with momentum m, step 2 moves by
        // lr * (m * g1 + g2). Compare against training without momentum.
        let mut data = toy(1);
        data.labels = vec![2];
        let zero = zero_logreg();
        let run = |momentum: f64, weight_decay: f64| {
            let cfg = LocalTraining {
                epochs: 2,
                batch_size: 1,
                lr: 0.1,
                momentum,
                weight_decay,
            };
            let local = clean(&data, &[0]);
            train_local(
                ModelKind::Logreg,
                &zero,
                local,
                &cfg,
                LocalProcedure::Plain,
                0,
            )
            .expect("train")
            .model
        };
        let plain = run(0.0, 0.0);
        let with_momentum = run(0.9, 0.0);
        // Step 1 is identical (buffer = g1); step 2 adds 0.9 * lr * g1 more.
        let g1 = -0.9f32; // d loss / d bias[2] at the uniform softmax: 0.1 - 1
        let b_plain = plain.tensor("fc.bias").expect("bias")[2];
        let b_momentum = with_momentum.tensor("fc.bias").expect("bias")[2];
        assert!(
            (b_momentum - b_plain - 0.9 * 0.1 * -g1).abs() < 1e-5,
            "{b_momentum} vs {b_plain}"
        );
        assert_ne!(run(0.0, 0.5), plain, "weight decay must change the result");
    }

    #[test]
    fn proximal_term_pulls_towards_the_start_and_vanishes_at_mu_zero() {
        let data = toy(64);
        let indices: Vec<usize> = (0..64).collect();
        let start = init_model(ModelKind::Mlp, 2).expect("init");
        let local = clean(&data, &indices);
        let run = |procedure| {
            train_local(ModelKind::Mlp, &start, local, &cfg(2), procedure, 1)
                .expect("train")
                .model
        };
        let distance = |m: &Model| {
            let mut d = vec![0.0; m.num_params()];
            ferry_core::algebra::delta_into(&mut d, m.values(), start.values());
            ferry_core::algebra::l2_norm(&d)
        };
        let plain = run(LocalProcedure::Plain);
        assert_eq!(
            run(LocalProcedure::Proximal { mu: 0.0 }),
            plain,
            "mu = 0 is plain SGD"
        );
        let pulled = run(LocalProcedure::Proximal { mu: 5.0 });
        assert!(
            distance(&pulled) < 0.8 * distance(&plain),
            "{} vs {}",
            distance(&pulled),
            distance(&plain)
        );
    }

    #[test]
    fn scaffold_correction_shifts_every_step_by_lr_times_correction() {
        let mut data = toy(1);
        data.labels = vec![4];
        let start = init_model(ModelKind::Logreg, 5).expect("init");
        let one = LocalTraining {
            epochs: 1,
            batch_size: 1,
            lr: 0.1,
            momentum: 0.0,
            weight_decay: 0.0,
        };
        let local = clean(&data, &[0]);
        let zeros = vec![0.0f32; start.num_params()];
        let halves = vec![0.5f32; start.num_params()];
        let plain = train_local(
            ModelKind::Logreg,
            &start,
            local,
            &one,
            LocalProcedure::Plain,
            0,
        )
        .expect("train");
        let zero = train_local(
            ModelKind::Logreg,
            &start,
            local,
            &one,
            LocalProcedure::Corrected { correction: &zeros },
            0,
        )
        .expect("train");
        assert_eq!(
            zero.model, plain.model,
            "zero control variates change nothing"
        );
        let shifted = train_local(
            ModelKind::Logreg,
            &start,
            local,
            &one,
            LocalProcedure::Corrected {
                correction: &halves,
            },
            0,
        )
        .expect("train");
        for (s, p) in shifted.model.values().iter().zip(plain.model.values()) {
            assert!((s - (p - 0.05)).abs() < 1e-6, "{s} vs {p}");
        }
        let short = [0.0f32; 3];
        assert!(
            train_local(
                ModelKind::Logreg,
                &start,
                local,
                &one,
                LocalProcedure::Corrected { correction: &short },
                0
            )
            .is_err()
        );
    }

    #[test]
    fn lenet_trains_without_error_and_changes_weights() {
        let data = toy(64);
        let indices: Vec<usize> = (0..64).collect();
        let start = init_model(ModelKind::Lenet, 1).expect("init");
        let local = LocalData {
            dataset: &data,
            indices: &indices,
            noise_std: 0.1,
        };
        let out = train_local(
            ModelKind::Lenet,
            &start,
            local,
            &cfg(1),
            LocalProcedure::Plain,
            0,
        )
        .expect("train");
        assert_ne!(out.model, start);
        assert!(out.mean_loss.is_finite());
    }

    #[test]
    fn noisy_evaluation_counts_every_copy() {
        let data = toy(10);
        let model = init_model(ModelKind::Logreg, 0).expect("init");
        let eval = evaluate(ModelKind::Logreg, &model, &data, &[0.0, 0.5, 1.0], 3).expect("eval");
        assert_eq!(eval.examples, 30);
        assert_eq!(
            eval,
            evaluate(ModelKind::Logreg, &model, &data, &[0.0, 0.5, 1.0], 3).expect("eval")
        );
    }

    #[test]
    fn empty_node_data_is_an_error() {
        let data = toy(4);
        let start = init_model(ModelKind::Logreg, 0).expect("init");
        let local = clean(&data, &[]);
        assert!(
            train_local(
                ModelKind::Logreg,
                &start,
                local,
                &cfg(1),
                LocalProcedure::Plain,
                0
            )
            .is_err()
        );
    }
}
