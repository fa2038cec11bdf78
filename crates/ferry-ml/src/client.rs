//! The client half of a strategy, wrapped around the local trainer: what a node does with a
//! round's task, whether it is a virtual node in `ferry simulate` or a real one behind
//! `ferry client`. Both call [`train_update`], so a strategy behaves the same in both.

use std::collections::BTreeMap;

use ferry_core::{
    Model, Update, algebra,
    qfedavg::LOSS_BEFORE,
    strategy::{ClientProcedure, fednova_normalizer},
    task::LocalTraining,
};

use crate::{
    MlError,
    models::ModelKind,
    train::{LocalData, LocalProcedure, evaluate_examples, train_local},
};

/// One round's work as the node sees it.
#[derive(Debug, Clone, Copy)]
pub struct ClientTask<'a> {
    /// The global model to start from.
    pub model: &'a Model,
    /// Local training settings.
    pub training: &'a LocalTraining,
    /// The strategy's client procedure.
    pub procedure: ClientProcedure,
    /// Server state sent with the model (SCAFFOLD's `c`); `None` or empty until set.
    pub server_control: Option<&'a [f32]>,
    /// The node's own seed for this round (shuffling, noise).
    pub seed: u64,
}

/// Trains `kind` on `data` for one round and returns the update to send.
///
/// `control` is the node's SCAFFOLD control variate `c_i`, kept by the caller across rounds
/// (empty means zero); other procedures leave it untouched.
pub fn train_update(
    kind: ModelKind,
    data: LocalData<'_>,
    task: ClientTask<'_>,
    control: &mut Vec<f32>,
) -> Result<Update, MlError> {
    let dim = task.model.num_params();
    let server_control = task.server_control.filter(|c| !c.is_empty());
    let scaffold = task.procedure == ClientProcedure::Scaffold;
    if scaffold {
        ferry_core::scaffold::fit(control, dim);
    }
    // SCAFFOLD: the correction c - c_i, with c and c_i zero until first set.
    let correction: Vec<f32> = if scaffold {
        ferry_core::scaffold::correction(server_control, control)
    } else {
        Vec::new()
    };
    let procedure = match task.procedure {
        ClientProcedure::LocalSgd
        | ClientProcedure::Normalized
        | ClientProcedure::LossReporting => LocalProcedure::Plain,
        ClientProcedure::Proximal { mu } => LocalProcedure::Proximal { mu },
        ClientProcedure::Scaffold => LocalProcedure::Corrected {
            correction: &correction,
        },
    };
    let loss_before = match task.procedure {
        ClientProcedure::LossReporting => Some(loss_on(kind, task.model, data, task.seed)?),
        _ => None,
    };
    let outcome = train_local(kind, task.model, data, task.training, procedure, task.seed)?;
    let mut delta = vec![0.0; dim];
    algebra::delta_into(&mut delta, outcome.model.values(), task.model.values());
    let mut update = Update::new(delta, outcome.num_examples);
    update.metrics = BTreeMap::from([
        ("train_loss".to_string(), outcome.mean_loss),
        ("steps".to_string(), outcome.steps as f64),
    ]);
    if let Some(loss) = loss_before {
        update.metrics.insert(LOSS_BEFORE.to_string(), loss);
    }
    match task.procedure {
        ClientProcedure::Scaffold => {
            let dc = ferry_core::scaffold::control_change(
                &update.delta,
                outcome.steps,
                task.training.lr,
                server_control,
            );
            algebra::add_scaled(control, &dc, 1.0);
            update.control_delta = Some(dc);
        }
        ClientProcedure::Normalized => {
            update.normalizer = Some(fednova_normalizer(outcome.steps, task.training.momentum));
        }
        ClientProcedure::LocalSgd
        | ClientProcedure::Proximal { .. }
        | ClientProcedure::LossReporting => {}
    }
    Ok(update)
}

/// The mean loss of `model` on the node's training data, read as training reads it (with the
/// partition's pixel noise, if any): q-FedAvg's `F_k`.
fn loss_on(kind: ModelKind, model: &Model, data: LocalData<'_>, seed: u64) -> Result<f64, MlError> {
    let noise: &[f32] = if data.noise_std > 0.0 {
        &[data.noise_std]
    } else {
        &[]
    };
    Ok(evaluate_examples(kind, model, data.dataset, data.indices, noise, seed)?.loss)
}
