//! The decoders Ferry runs on bytes it does not control: what nodes send the coordinator,
//! what the coordinator sends nodes, and the files a user or a trainer hands over.

use std::sync::{Arc, LazyLock};

use ferry_client::exec::{ExecEvaluation, ExecResult, ExecTask};
use ferry_core::{
    Model, ModelLayout, TensorSpec, Update, compress::Compression, evaluation::NodeEvaluation,
    update_file, wire,
};
use ferry_proto::{secagg as convert, v1};
use ferry_secagg::{
    MaskedInput, Roster, SealedShare, SecAggClient, SecAggParams, SecAggServer, pack,
};
use prost::Message;
use safetensors::{Dtype, tensor::TensorView};

use crate::{
    engine::{Target, tagged, untag},
    mutate::Framing,
};

/// Every target, in the order the command line lists them.
pub const ALL: [Target; 7] = [
    Target {
        name: "update-file",
        about: "a node's update (safetensors) as the coordinator reads it after upload",
        seeds: update_seeds,
        framing: Framing::Safetensors,
        decode: decode_update,
    },
    Target {
        name: "model-file",
        about: "a model file: --initial-model, a trainer's trained model, a downloaded model",
        seeds: model_seeds,
        framing: Framing::Safetensors,
        decode: decode_model,
    },
    Target {
        name: "server-state",
        about: "named vectors (a SCAFFOLD server control) as a node reads them",
        seeds: vector_seeds,
        framing: Framing::Safetensors,
        decode: decode_vectors,
    },
    Target {
        name: "fleet-messages",
        about: "every ferry.v1 protobuf message either side receives, with the SecAgg conversions",
        seeds: message_seeds,
        framing: Framing::Raw,
        decode: decode_message,
    },
    Target {
        name: "masked-input",
        about: "a SecAgg+ masked input, bit-packed, as the coordinator reads it",
        seeds: masked_seeds,
        framing: Framing::Raw,
        decode: decode_masked,
    },
    Target {
        name: "sealed-shares",
        about: "the SecAgg+ shares a node opens from its neighbours, routed by the coordinator",
        seeds: sealed_seeds,
        framing: Framing::Raw,
        decode: open_sealed,
    },
    Target {
        name: "trainer-files",
        about: "task.json and the result.json a trainer writes back to the node",
        seeds: trainer_seeds,
        framing: Framing::Raw,
        decode: decode_trainer_file,
    },
];

/// The target named `name`.
pub fn by_name(name: &str) -> Option<&'static Target> {
    ALL.iter().find(|t| t.name == name)
}

/// An error's kind: its variant's name as `Debug` prints it.
fn kind(error: impl std::fmt::Debug) -> String {
    let text = format!("{error:?}");
    let end = text
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(text.len());
    text[..end].to_string()
}

/// A two-tensor model, as a node's update must match it.
static LAYOUT: LazyLock<Arc<ModelLayout>> = LazyLock::new(|| {
    let specs = vec![
        TensorSpec::f32("conv.weight", vec![2, 3]),
        TensorSpec::f32("conv.bias", vec![2]),
    ];
    Arc::new(ModelLayout::new(specs).expect("a valid layout"))
});

fn update_seeds() -> Vec<Vec<u8>> {
    let plain = Update::new((0..8).map(|i| i as f32 / 3.0).collect(), 12);
    let mut full = plain.clone();
    full.metrics.insert("train_loss".into(), 0.25);
    full.control_delta = Some(vec![0.5; 8]);
    full.normalizer = Some(3.0);
    full.unclipped = Some(1.5);
    let mut seeds: Vec<Vec<u8>> = [&plain, &full]
        .iter()
        .map(|u| update_file::encode_update(u, &LAYOUT).expect("encodes"))
        .collect();
    // Compressed deltas: one byte tensor whose encoding the metadata names.
    for compression in [Compression::Int8, Compression::TopK { ratio: 0.25 }] {
        let encoded = update_file::EncodedUpdate::compressed(
            full.clone(),
            &LAYOUT,
            compression,
            &mut Vec::new(),
            1,
        )
        .expect("encodes");
        let mut bytes = Vec::new();
        encoded.write_to(&mut bytes).expect("writes");
        seeds.push(bytes);
    }
    seeds
}

fn decode_update(bytes: &[u8]) -> Result<(), String> {
    update_file::decode_update(bytes, &LAYOUT)
        .map(drop)
        .map_err(kind)
}

fn model_seeds() -> Vec<Vec<u8>> {
    let model = Model::new(LAYOUT.clone(), (0..8).map(|i| i as f32).collect()).expect("model");
    let half = [0u8; 8];
    let counts = 7i64.to_le_bytes();
    let mixed = safetensors::serialize(
        [
            (
                "h",
                TensorView::new(Dtype::F16, vec![2, 2], &half).expect("view"),
            ),
            (
                "steps",
                TensorView::new(Dtype::I64, vec![1], &counts).expect("view"),
            ),
        ],
        None,
    )
    .expect("serialises");
    vec![model.to_safetensors().expect("encodes"), mixed]
}

fn decode_model(bytes: &[u8]) -> Result<(), String> {
    Model::from_safetensors(bytes).map(drop).map_err(kind)
}

fn vector_seeds() -> Vec<Vec<u8>> {
    let one = wire::encode_vectors(&[("conv.bias", &[1.0, 2.0]), ("c", &[3.0])]).expect("encodes");
    let empty = wire::encode_vectors(&[]).expect("encodes");
    vec![one, empty]
}

fn decode_vectors(bytes: &[u8]) -> Result<(), String> {
    wire::decode_vectors(bytes).map(drop).map_err(kind)
}

/// The message types, in the order a message input's first byte picks them.
const MESSAGES: usize = 15;

fn message_seeds() -> Vec<Vec<u8>> {
    let keys = v1::SecAggKeys {
        cipher: vec![9; 32],
        mask: vec![4; 32],
    };
    let sealed = v1::SecAggSealedShares {
        shares: vec![v1::SecAggSealedShare {
            from: 1,
            to: 2,
            ciphertext: vec![7; 60],
        }],
    };
    let revealed = v1::SecAggRevealedShares {
        shares: vec![v1::SecAggRevealedShare {
            owner: 2,
            kind: 1,
            value: vec![3; 32],
        }],
    };
    let blob = Some(v1::BlobRef {
        hash: "ab".repeat(32),
        size_bytes: 1 << 20,
    });
    let task = v1::Task {
        run_id: "run".into(),
        round: 3,
        model: blob.clone(),
        server_control: blob,
        training: Some(v1::LocalTraining {
            epochs: 1,
            batch_size: 32,
            lr: 0.01,
            momentum: 0.9,
            weight_decay: 1e-5,
        }),
        secagg: Some(v1::SecAggTask {
            neighbours: 4,
            threshold: 3,
            clip: 8.0,
            quantization_bits: 22,
            modulus_bits: 32,
            weight_cap: 100,
        }),
        personal: vec!["bn.running_mean".into()],
        ..Default::default()
    };
    use v1::{pull_task_response::Outcome, sec_agg_request::Step, sec_agg_response};
    let encoded: [Vec<u8>; MESSAGES] = [
        v1::EnrolRequest {
            token: "ferry-enrol-abc".into(),
            ..Default::default()
        }
        .encode_to_vec(),
        v1::HeartbeatRequest { round: 4 }.encode_to_vec(),
        v1::PullTaskRequest {
            wait_ms: 30_000,
            ..Default::default()
        }
        .encode_to_vec(),
        v1::DownloadRequest {
            hash: "ab".repeat(32),
            offset: 4096,
        }
        .encode_to_vec(),
        v1::UploadChunk {
            round: 2,
            offset: 0,
            data: vec![1; 64].into(),
            total_bytes: 64,
            hash: "cd".repeat(32),
        }
        .encode_to_vec(),
        v1::UploadStatusRequest {
            round: 2,
            hash: "cd".repeat(32),
        }
        .encode_to_vec(),
        v1::EvaluationReport {
            round: 2,
            num_examples: 10,
            loss: 0.5,
            accuracy: 0.9,
            metrics: [("f1".to_string(), 0.8)].into(),
            site_model: "site-1".into(),
        }
        .encode_to_vec(),
        v1::FailureReport {
            round: 2,
            reason: "out of memory".into(),
        }
        .encode_to_vec(),
        v1::SecAggRequest {
            round: 2,
            wait_ms: 100,
            step: Some(Step::Advertise(keys.clone())),
        }
        .encode_to_vec(),
        v1::SecAggRequest {
            round: 2,
            wait_ms: 100,
            step: Some(Step::Share(sealed.clone())),
        }
        .encode_to_vec(),
        v1::SecAggRequest {
            round: 2,
            wait_ms: 100,
            step: Some(Step::Reveal(revealed)),
        }
        .encode_to_vec(),
        v1::PullTaskResponse {
            outcome: Some(Outcome::Task(task)),
        }
        .encode_to_vec(),
        v1::SecAggResponse {
            outcome: Some(sec_agg_response::Outcome::Roster(v1::SecAggRoster {
                context: b"round 2".to_vec(),
                graph_seed: vec![1; 32],
                members: vec![keys.clone(), keys],
            })),
        }
        .encode_to_vec(),
        v1::SecAggResponse {
            outcome: Some(sec_agg_response::Outcome::Inbox(sealed)),
        }
        .encode_to_vec(),
        v1::BlobChunk {
            offset: 0,
            data: vec![5; 32].into(),
            total_bytes: 32,
        }
        .encode_to_vec(),
    ];
    encoded
        .into_iter()
        .enumerate()
        .map(|(i, bytes)| tagged(i as u8, &bytes))
        .collect()
}

/// Decodes the message its first byte names, then converts what the receiver converts.
fn decode_message(bytes: &[u8]) -> Result<(), String> {
    use v1::{pull_task_response::Outcome, sec_agg_request::Step, sec_agg_response};
    let (which, body) = untag(bytes)?;
    fn decode<M: Message + Default>(body: &[u8]) -> Result<M, String> {
        M::decode(body).map_err(|_| "DecodeError".to_string())
    }
    match usize::from(which) % MESSAGES {
        0 => decode::<v1::EnrolRequest>(body).map(drop),
        1 => decode::<v1::HeartbeatRequest>(body).map(drop),
        2 => decode::<v1::PullTaskRequest>(body).map(drop),
        3 => decode::<v1::DownloadRequest>(body).map(drop),
        4 => decode::<v1::UploadChunk>(body).map(drop),
        5 => decode::<v1::UploadStatusRequest>(body).map(drop),
        6 => decode::<v1::EvaluationReport>(body).map(drop),
        7 => decode::<v1::FailureReport>(body).map(drop),
        8..=10 => match decode::<v1::SecAggRequest>(body)?.step {
            Some(Step::Advertise(keys)) => convert::keys_from_wire(&keys).map(drop).map_err(kind),
            Some(Step::Share(shares)) => {
                convert::shares_from_wire(&shares);
                Ok(())
            }
            Some(Step::Reveal(shares)) => {
                convert::revealed_from_wire(&shares).map(drop).map_err(kind)
            }
            _ => Ok(()),
        },
        11 => match decode::<v1::PullTaskResponse>(body)?.outcome {
            Some(Outcome::Task(task)) => {
                if let Some(secagg) = &task.secagg {
                    let (params, _) = convert::task_from_wire(secagg);
                    params.validate(16).map_err(kind)?;
                }
                Ok(())
            }
            _ => Ok(()),
        },
        12 | 13 => match decode::<v1::SecAggResponse>(body)?.outcome {
            Some(sec_agg_response::Outcome::Roster(roster)) => {
                convert::roster_from_wire(&roster).map(drop).map_err(kind)
            }
            Some(sec_agg_response::Outcome::Inbox(shares)) => {
                convert::shares_from_wire(&shares);
                Ok(())
            }
            Some(sec_agg_response::Outcome::UnmaskRequest(request)) => {
                convert::request_from_wire(&request);
                Ok(())
            }
            _ => Ok(()),
        },
        _ => decode::<v1::BlobChunk>(body).map(drop),
    }
}

/// Masked-input widths a coordinator may use, picked by an input's first byte.
const MODULUS_BITS: [u32; 3] = [32, 64, 13];
/// Coordinates in a fuzzed masked input (model values plus the weight slot).
const MASKED_VALUES: usize = 37;

fn modulus(which: u8) -> SecAggParams {
    SecAggParams {
        modulus_bits: MODULUS_BITS[usize::from(which) % MODULUS_BITS.len()],
        quantization_bits: 12,
        ..SecAggParams::default()
    }
}

fn masked_seeds() -> Vec<Vec<u8>> {
    (0..MODULUS_BITS.len() as u8)
        .map(|which| {
            let params = modulus(which);
            let values = (0..MASKED_VALUES as u64)
                .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - params.modulus_bits))
                .collect::<Vec<_>>();
            tagged(which, &pack(&values, &params))
        })
        .collect()
}

fn decode_masked(bytes: &[u8]) -> Result<(), String> {
    let (which, body) = untag(bytes)?;
    convert::masked_from_bytes(body, MASKED_VALUES, &modulus(which))
        .map(|input: MaskedInput| drop(input))
        .map_err(kind)
}

/// A secure round's first two stages, run once: node 0's roster and the shares its three
/// neighbours sealed for it.
struct SharedRound {
    params: SecAggParams,
    roster: Roster,
    inbox: Vec<SealedShare>,
}

const NODE_SEED: [u8; 32] = [11; 32];

static ROUND: LazyLock<SharedRound> = LazyLock::new(|| {
    let params = SecAggParams::with_neighbours(3);
    let mut server = SecAggServer::new(params, b"fuzz".to_vec(), [5; 32], 4);
    let seed = |i: u8| if i == 0 { NODE_SEED } else { [i; 32] };
    let mut nodes: Vec<SecAggClient> = (0..4).map(|i| SecAggClient::new(params, seed(i))).collect();
    let ids: Vec<_> = nodes
        .iter()
        .map(|n| server.receive_keys(n.public_keys()).expect("keys"))
        .collect();
    let roster = server.close_advertising().expect("roster");
    for (node, &id) in nodes.iter_mut().zip(&ids) {
        let sealed = node.share_keys(&roster).expect("shares");
        server.receive_shares(id, sealed).expect("routed");
    }
    server.close_sharing().expect("closed");
    let inbox = server.inbox(ids[0]).expect("inbox").to_vec();
    SharedRound {
        params,
        roster,
        inbox,
    }
});

fn sealed_seeds() -> Vec<Vec<u8>> {
    ROUND
        .inbox
        .iter()
        .enumerate()
        .map(|(i, share)| tagged(i as u8 | (share.from as u8) << 2, &share.ciphertext))
        .collect()
}

/// Node 0 opens its inbox with one share's ciphertext replaced by the input (its first byte
/// picks the share, in its low two bits, and the claimed sender, in the rest).
fn open_sealed(bytes: &[u8]) -> Result<(), String> {
    let (which, ciphertext) = untag(bytes)?;
    let round = &*ROUND;
    let mut inbox = round.inbox.clone();
    let slot = usize::from(which & 3) % inbox.len();
    inbox[slot].ciphertext = ciphertext.to_vec();
    inbox[slot].from = u32::from(which >> 2);
    let mut node = SecAggClient::new(round.params, NODE_SEED);
    node.share_keys(&round.roster).map_err(kind)?;
    node.mask(&inbox, &[0.5, -0.25, 1.0, 0.0], 0.5)
        .map(drop)
        .map_err(kind)
}

fn trainer_seeds() -> Vec<Vec<u8>> {
    let task = ExecTask {
        kind: "train".into(),
        round: 3,
        epochs: 1,
        batch_size: 32,
        lr: 0.01,
        momentum: 0.9,
        weight_decay: 1e-5,
        seed: 7,
        procedure: "local_sgd".into(),
        mu: 0.0,
        model_in: "round-3/model.safetensors".into(),
        model_out: "round-3/trained.safetensors".into(),
        result_out: "round-3/result.json".into(),
        data_dir: Some("data".into()),
        checkpoint_dir: "checkpoints/round-3-0123456789abcdef".into(),
        correction_in: None,
        frozen: vec!["attn.lora_A".into()],
    };
    let evaluation = ExecEvaluation {
        kind: "evaluate".into(),
        round: 3,
        seed: 7,
        model_in: "round-3/model.safetensors".into(),
        result_out: "round-3/result.json".into(),
        data_dir: None,
    };
    [
        br#"{"num_examples": 600, "metrics": {"train_loss": 0.31, "steps": 10}}"#.to_vec(),
        br#"{"num_examples": 100, "loss": 0.4, "accuracy": 0.88, "metrics": {"f1": 0.8}}"#.to_vec(),
        serde_json::to_vec(&task).expect("encodes"),
        serde_json::to_vec(&evaluation).expect("encodes"),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, bytes)| tagged(i as u8, &bytes))
    .collect()
}

/// Reads the trainer file its first byte names, as the node (or a Rust trainer) reads it.
fn decode_trainer_file(bytes: &[u8]) -> Result<(), String> {
    let (which, body) = untag(bytes)?;
    let json = |e: serde_json::Error| format!("Json{:?}", e.classify());
    match which % 4 {
        0 => serde_json::from_slice::<ExecResult>(body)
            .map(drop)
            .map_err(json),
        1 => serde_json::from_slice::<NodeEvaluation>(body)
            .map_err(json)?
            .validate()
            .map_err(|_| "Invalid".to_string()),
        2 => serde_json::from_slice::<ExecTask>(body)
            .map(drop)
            .map_err(json),
        _ => serde_json::from_slice::<ExecEvaluation>(body)
            .map(drop)
            .map_err(json),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_seed_is_accepted_by_its_decoder() {
        for target in &ALL {
            for (i, seed) in (target.seeds)().iter().enumerate() {
                assert_eq!((target.decode)(seed), Ok(()), "{} seed {i}", target.name);
            }
        }
    }

    #[test]
    fn a_tampered_share_is_refused() {
        let mut seed = sealed_seeds().remove(0);
        let last = seed.len() - 1;
        seed[last] ^= 1;
        assert_eq!(open_sealed(&seed), Err("Malformed".into()));
    }
}
