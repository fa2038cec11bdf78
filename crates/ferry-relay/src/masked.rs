//! SecAgg+ at a relay: its nodes' masked inputs (and lower relays' masked sums) added modulo
//! 2^k into one masked sum, sent upstream in their place. The relay never unmasks anything:
//! each node's self mask stays on until the server unmasks the round's whole sum, so the
//! relay's sum reveals no more than one input does, and the server still sees only its total.

use std::sync::Arc;

use bytes::Bytes;
use ferry_client::transfer::UploadBody;
use ferry_proto::{
    secagg::{self, MaskedSum},
    v1::Task,
};
use ferry_secagg::{MaskedInput, SecAggParams};
use tonic::Status;

use crate::{
    flush::{Aggregate, lose},
    relay::Relay,
    store::Held,
};

/// A round's SecAgg+ parameters and the values in one masked input (the model's and the
/// weight slot), from its task.
pub(crate) async fn shape(relay: &Relay, task: &Task) -> Result<(SecAggParams, usize), Status> {
    let wire = task
        .secagg
        .as_ref()
        .ok_or_else(|| Status::failed_precondition("the round is not secure"))?;
    let (params, _) = secagg::task_from_wire(wire);
    let layout = relay.layout(task).await?;
    Ok((params, layout.num_params() + 1))
}

/// What one held upload stands for: a node's masked input, or a lower relay's masked sum.
pub(crate) fn read_held(
    bytes: &[u8],
    holder: &str,
    values: usize,
    params: &SecAggParams,
) -> Result<MaskedSum, String> {
    let (contributors, packed) = match secagg::masked_sum_contributors(bytes) {
        Ok((contributors, packed)) => (contributors, packed),
        Err(_) => (vec![holder.to_string()], bytes),
    };
    Ok(MaskedSum {
        contributors,
        input: secagg::masked_from_bytes(packed, values, params).map_err(|e| e.to_string())?,
    })
}

/// Adds `held` (in holder order) into one masked sum; `None` when none of them could be read
/// (each such upload is dropped and its nodes' failure reported).
pub(crate) async fn sum_masked(
    relay: &Arc<Relay>,
    task: &Task,
    held: Vec<Held>,
) -> Result<Option<Aggregate>, String> {
    let round = task.round;
    let (params, values) = shape(relay, task)
        .await
        .map_err(|s| s.message().to_string())?;
    let mut total = MaskedInput {
        values: vec![0; values],
    };
    let mut nodes = Vec::new();
    let mut folded = Vec::new();
    for update in held {
        let read = match relay.blobs.get(&update.blob).await {
            Ok(bytes) => read_held(&bytes, &update.holder, values, &params),
            Err(e) => Err(format!("its stored update: {e}")),
        };
        match read.and_then(|sum| {
            total.add(&sum.input, &params).map_err(|e| e.to_string())?;
            Ok(sum.contributors)
        }) {
            Ok(contributors) => {
                nodes.extend(contributors);
                folded.push(update);
            }
            Err(why) => lose(relay, round, &update, &why).await,
        }
    }
    if folded.is_empty() {
        return Ok(None);
    }
    nodes.sort();
    let sum = MaskedSum {
        contributors: nodes.clone(),
        input: total,
    };
    let bytes = Bytes::from(secagg::masked_sum_to_bytes(&sum, &params));
    let id = ferry_core::content::content_id(&bytes);
    Ok(Some(Aggregate {
        body: Arc::new(bytes) as Arc<dyn UploadBody>,
        id,
        folded,
        nodes,
        what: "a masked sum",
    }))
}

/// Checks a node's masked input as the server would (its length, every value within the
/// modulus); only the server's unmasked total can be checked further.
pub(crate) async fn check_input(relay: &Relay, task: &Task, bytes: &[u8]) -> Result<(), Status> {
    let (params, values) = shape(relay, task).await?;
    secagg::masked_from_bytes(bytes, values, &params)
        .map(|_| ())
        .map_err(|e| Status::invalid_argument(e.to_string()))
}

/// A lower relay's masked sum, read whole.
pub(crate) async fn read_sum(
    relay: &Relay,
    task: &Task,
    bytes: &[u8],
) -> Result<MaskedSum, Status> {
    let (params, values) = shape(relay, task).await?;
    secagg::masked_sum_from_bytes(bytes, values, &params)
        .map_err(|e| Status::invalid_argument(e.to_string()))
}
