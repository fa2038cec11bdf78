//! Whole secure rounds between one server and many clients, with nodes dropping at every
//! stage.

use std::collections::BTreeSet;

use ferry_secagg::{
    MaskedInput, NeighbourGraph, ParticipantId, SecAggClient, SecAggError, SecAggParams,
    SecAggServer, SecureSum, UnmaskRequest, max_sum_error,
};
use proptest::prelude::*;

/// The last stage a node completes before it drops out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Drop {
    BeforeAdvertising,
    BeforeSharing,
    BeforeMasking,
    BeforeUnmasking,
    Never,
}

struct Outcome {
    result: Result<SecureSum, SecAggError>,
    /// The plain weighted sum and weight of the nodes whose masked input arrived.
    expected: (Vec<f64>, f64),
    /// Ids of the nodes whose masked input arrived.
    sent_masked: Vec<ParticipantId>,
}

fn seed(i: usize, salt: u8) -> [u8; 32] {
    let mut s = [salt; 32];
    s[..8].copy_from_slice(&(i as u64).to_le_bytes());
    s
}

/// The seed `run_round`'s server places the neighbour graph with.
const GRAPH_SEED: [u8; 32] = [42; 32];

/// Whether `drops` break the protocol's threshold, worked out from sets alone and
/// independently of the server's code: too few nodes advertise or keep enough neighbours that
/// shared keys (more than `threshold` are needed), no masked input arrives, or some secret the
/// unmasking needs (a survivor's self-mask seed, the masking key of a dropped node with a
/// surviving neighbour) is held by fewer than `threshold` neighbours that answer.
fn threshold_broken(params: &SecAggParams, drops: &[Drop]) -> bool {
    let t = params.threshold;
    // Ids follow advertising order, as the server hands them out.
    let advertised: Vec<Drop> = drops
        .iter()
        .copied()
        .filter(|d| *d > Drop::BeforeAdvertising)
        .collect();
    if advertised.len() <= t {
        return true;
    }
    let graph = NeighbourGraph::new(
        advertised.len(),
        params.neighbourhood(advertised.len()),
        GRAPH_SEED,
    );
    let ids = |keep: &dyn Fn(Drop) -> bool| -> BTreeSet<ParticipantId> {
        (0..advertised.len() as ParticipantId)
            .filter(|&u| keep(advertised[u as usize]))
            .collect()
    };
    let live_neighbours = |u: ParticipantId, among: &BTreeSet<ParticipantId>| {
        graph
            .neighbours(u)
            .iter()
            .filter(|v| among.contains(v))
            .count()
    };
    let mut shared = ids(&|d| d > Drop::BeforeSharing);
    while let Some(short) = shared
        .iter()
        .copied()
        .find(|&u| live_neighbours(u, &shared) < t)
    {
        shared.remove(&short);
    }
    if shared.len() <= t {
        return true;
    }
    let masked: BTreeSet<ParticipantId> = ids(&|d| d > Drop::BeforeMasking)
        .intersection(&shared)
        .copied()
        .collect();
    let answering: BTreeSet<ParticipantId> = ids(&|d| d == Drop::Never)
        .intersection(&masked)
        .copied()
        .collect();
    if masked.is_empty() {
        return true;
    }
    let survivor_short = masked.iter().any(|&u| live_neighbours(u, &answering) < t);
    let dropped_short = shared
        .difference(&masked)
        .any(|&u| live_neighbours(u, &masked) > 0 && live_neighbours(u, &answering) < t);
    survivor_short || dropped_short
}

/// Runs one round; node `i` holds `updates[i]` with weight factor `weights[i]`.
fn run_round(
    params: SecAggParams,
    updates: &[Vec<f32>],
    weights: &[f64],
    drops: &[Drop],
) -> Outcome {
    let dim = updates[0].len();
    let mut server = SecAggServer::new(params, b"round 1".to_vec(), GRAPH_SEED, dim);
    let mut clients: Vec<SecAggClient> = (0..updates.len())
        .map(|i| SecAggClient::new(params, seed(i, 1)))
        .collect();
    // Stage 1: node i gets participant id ids[i].
    let mut ids = vec![None; clients.len()];
    for (i, client) in clients.iter().enumerate() {
        if drops[i] > Drop::BeforeAdvertising {
            ids[i] = Some(server.receive_keys(client.public_keys()).unwrap());
        }
    }
    let mut expected = (vec![0.0; dim], 0.0);
    let mut sent_masked = Vec::new();
    let result = (|| {
        let roster = server.close_advertising()?;
        for (i, client) in clients.iter_mut().enumerate() {
            if let (Some(id), true) = (ids[i], drops[i] > Drop::BeforeSharing) {
                let sealed = client.share_keys(&roster)?;
                server.receive_shares(id, sealed)?;
            }
        }
        server.close_sharing()?;
        for (i, client) in clients.iter_mut().enumerate() {
            let Some(id) = ids[i] else { continue };
            if drops[i] <= Drop::BeforeMasking {
                continue;
            }
            let Ok(inbox) = server.inbox(id) else {
                continue;
            };
            let inbox = inbox.to_vec();
            let masked = client.mask(&inbox, &updates[i], weights[i])?;
            server.receive_masked(id, &masked)?;
            sent_masked.push(id);
            for (e, &v) in expected.0.iter_mut().zip(&updates[i]) {
                *e += weights[i] * f64::from(v.clamp(-params.clip, params.clip));
            }
            expected.1 += weights[i];
        }
        let request = server.close_masking()?;
        for (i, client) in clients.iter_mut().enumerate() {
            if let (Some(id), Drop::Never) = (ids[i], drops[i])
                && request.survivors.contains(&id)
            {
                let shares = client.unmask(&request)?;
                server.receive_unmask(id, &shares)?;
            }
        }
        server.finish()
    })();
    Outcome {
        result,
        expected,
        sent_masked,
    }
}

fn assert_sum_matches(outcome: &Outcome, params: &SecAggParams) {
    let sum = outcome.result.as_ref().expect("the round finishes");
    let n = sum.contributors.len();
    assert_eq!(sum.contributors, outcome.sent_masked);
    let tolerance = max_sum_error(n, params) + 1e-5 * n as f64;
    for (got, want) in sum.weighted_sum.iter().zip(&outcome.expected.0) {
        assert!(
            (f64::from(*got) - want).abs() <= tolerance,
            "got {got}, want {want}, tolerance {tolerance}"
        );
    }
    assert!((sum.weight - outcome.expected.1).abs() <= n as f64 / params.max_level_f64());
}

trait Levels {
    fn max_level_f64(&self) -> f64;
}

impl Levels for SecAggParams {
    fn max_level_f64(&self) -> f64 {
        ((1u64 << self.quantization_bits) - 1) as f64
    }
}

fn updates(n: usize, dim: usize) -> Vec<Vec<f32>> {
    (0..n)
        .map(|i| {
            (0..dim)
                .map(|j| ((i * 31 + j * 7) % 17) as f32 / 4.0 - 2.0)
                .collect()
        })
        .collect()
}

#[test]
fn without_dropouts_the_unmasked_sum_is_the_plain_sum() {
    let params = SecAggParams::with_neighbours(4);
    let n = 10;
    let weights: Vec<f64> = (0..n).map(|i| (i + 1) as f64 / n as f64).collect();
    let outcome = run_round(params, &updates(n, 100), &weights, &vec![Drop::Never; n]);
    assert_sum_matches(&outcome, &params);
    assert_eq!(outcome.sent_masked.len(), n);
}

#[test]
fn a_node_that_drops_after_masking_is_counted_and_one_that_drops_before_is_not() {
    let params = SecAggParams::with_neighbours(6);
    let n = 12;
    let mut drops = vec![Drop::Never; n];
    drops[3] = Drop::BeforeUnmasking;
    drops[7] = Drop::BeforeMasking;
    let outcome = run_round(params, &updates(n, 50), &vec![1.0; n], &drops);
    assert_sum_matches(&outcome, &params);
    let sum = outcome.result.as_ref().unwrap();
    assert_eq!(sum.contributors.len(), n - 1);
    assert!(
        sum.contributors.contains(&3),
        "dropped after masking: counted"
    );
    assert!(
        !sum.contributors.contains(&7),
        "dropped before masking: left out"
    );
    assert!((sum.weight - (n - 1) as f64).abs() < 1e-4);
}

#[test]
fn too_many_dropouts_abort_the_round_cleanly() {
    let params = SecAggParams::with_neighbours(4);
    let n = 8;
    let mut drops = vec![Drop::Never; n];
    for d in drops.iter_mut().take(5) {
        *d = Drop::BeforeUnmasking;
    }
    assert!(threshold_broken(&params, &drops));
    let outcome = run_round(params, &updates(n, 10), &vec![1.0; n], &drops);
    assert!(matches!(outcome.result, Err(SecAggError::Aborted(_))));
}

/// A round of `n` nodes over `dim` values through stage 2: every node advertised and shared.
fn keys_shared(n: usize, dim: usize, salt: u8) -> (SecAggServer, Vec<SecAggClient>) {
    let params = SecAggParams::with_neighbours(4);
    let mut server = SecAggServer::new(params, vec![salt], [salt; 32], dim);
    let mut clients: Vec<SecAggClient> = (0..n)
        .map(|i| SecAggClient::new(params, seed(i, salt)))
        .collect();
    assert!(server.held_vectors().is_empty());
    for client in &clients {
        server.receive_keys(client.public_keys()).unwrap();
    }
    let roster = server.close_advertising().unwrap();
    for (i, client) in clients.iter_mut().enumerate() {
        let sealed = client.share_keys(&roster).unwrap();
        server.receive_shares(i as ParticipantId, sealed).unwrap();
    }
    server.close_sharing().unwrap();
    (server, clients)
}

#[test]
fn the_server_holds_only_a_masked_sum() {
    let params = SecAggParams::with_neighbours(4);
    let n = 6;
    let dim = 200;
    let data = updates(n, dim);
    let (mut server, mut clients) = keys_shared(n, dim, 2);
    let inbox = server.inbox(0).unwrap().to_vec();
    let masked = clients[0].mask(&inbox, &data[0], 1.0).unwrap();
    server.receive_masked(0, &masked).unwrap();
    // One vector, and read as if it were unmasked it is nowhere near node 0's update.
    let held = server.held_vectors();
    assert_eq!(held.len(), 1);
    let step = 2.0 * f64::from(params.clip) / ((1u64 << params.quantization_bits) - 1) as f64;
    let far = held[0][..dim]
        .iter()
        .zip(&data[0])
        .filter(|&(&h, &x)| {
            let decoded = h as f64 * step - f64::from(params.clip);
            (decoded - f64::from(x)).abs() > 0.1
        })
        .count();
    assert!(
        far > dim * 9 / 10,
        "only {far} of {dim} coordinates are masked"
    );
}

/// Runs stages 3 and 4 of a round where every node sends its masked input; `relayed` nodes'
/// inputs arrive as one sum taken by a relay, the others alone. Returns the round's sum and
/// the relay's sum.
fn finish_with_relay(
    n: usize,
    data: &[Vec<f32>],
    relayed: &[ParticipantId],
) -> (SecureSum, Option<MaskedInput>) {
    let params = SecAggParams::with_neighbours(4);
    let (mut server, mut clients) = keys_shared(n, data[0].len(), 5);
    let mut relay: Option<MaskedInput> = None;
    for (i, client) in clients.iter_mut().enumerate() {
        let id = i as ParticipantId;
        let inbox = server.inbox(id).unwrap().to_vec();
        let masked = client.mask(&inbox, &data[i], 1.0).unwrap();
        if !relayed.contains(&id) {
            server.receive_masked(id, &masked).unwrap();
            continue;
        }
        match &mut relay {
            Some(sum) => sum.add(&masked, &params).unwrap(),
            None => relay = Some(masked),
        }
    }
    if let Some(sum) = &relay {
        server.receive_masked_sum(relayed, sum).unwrap();
        let again = server.receive_masked_sum(&relayed[..1], sum);
        assert!(again.is_err(), "a node counts once");
    }
    let request = server.close_masking().unwrap();
    for (i, client) in clients.iter_mut().enumerate() {
        let shares = client.unmask(&request).unwrap();
        server.receive_unmask(i as ParticipantId, &shares).unwrap();
    }
    (server.finish().unwrap(), relay)
}

#[test]
fn a_relays_sum_of_masked_inputs_unmasks_to_the_same_total_and_shows_no_update() {
    let params = SecAggParams::with_neighbours(4);
    let (n, dim) = (6, 200);
    let data = updates(n, dim);
    let (direct, _) = finish_with_relay(n, &data, &[]);
    let relayed_ids = [0, 1, 2];
    let (relayed, relay_sum) = finish_with_relay(n, &data, &relayed_ids);
    // Sums modulo 2^k are exact: grouping the inputs at a relay changes no bit.
    assert_eq!(relayed, direct);
    // What the relay holds, read as if it were unmasked, is nowhere near its nodes' sum.
    let relay_sum = relay_sum.expect("the relay summed");
    let step = 2.0 * f64::from(params.clip) / ((1u64 << params.quantization_bits) - 1) as f64;
    let far = (0..dim)
        .filter(|&j| {
            let plain: f64 = relayed_ids
                .iter()
                .map(|&i| f64::from(data[i as usize][j]))
                .sum();
            // Decoded as the quantiser would: each node's value is offset by the clip.
            let decoded = relay_sum.values[j] as f64 * step
                - relayed_ids.len() as f64 * f64::from(params.clip);
            (decoded - plain).abs() > 0.1
        })
        .count();
    assert!(
        far > dim * 9 / 10,
        "only {far} of {dim} coordinates of the relay's sum are masked"
    );
}

#[test]
fn an_honest_node_refuses_to_reveal_both_shares_of_a_peer() {
    let (server, mut clients) = keys_shared(6, 4, 3);
    let inbox = server.inbox(0).unwrap().to_vec();
    clients[0].mask(&inbox, &[0.5; 4], 1.0).unwrap();
    let greedy = UnmaskRequest {
        survivors: vec![0, 1, 2],
        dropped: vec![2],
    };
    assert!(matches!(
        clients[0].unmask(&greedy),
        Err(SecAggError::Refused(_))
    ));
}

#[test]
fn a_share_sealed_for_one_node_cannot_be_opened_by_another() {
    let params = SecAggParams::with_neighbours(4);
    // Five nodes with four neighbours each: everyone neighbours everyone.
    let mut server = SecAggServer::new(params, b"misroute".to_vec(), [7; 32], 4);
    let mut clients: Vec<SecAggClient> = (0..5)
        .map(|i| SecAggClient::new(params, seed(i, 4)))
        .collect();
    for client in &clients {
        server.receive_keys(client.public_keys()).unwrap();
    }
    let roster = server.close_advertising().unwrap();
    let sealed = clients[0].share_keys(&roster).unwrap();
    clients[1].share_keys(&roster).unwrap();
    assert_eq!((sealed[0].to, sealed[1].to), (1, 2));
    let honest = sealed[0].clone();
    let mut forged = sealed[1].clone();
    forged.to = 1;
    assert!(matches!(
        clients[1].mask(&[forged], &[0.0; 4], 1.0),
        Err(SecAggError::Malformed(_))
    ));
    // The refusal left node 1 able to go on with what was really sealed for it.
    assert!(matches!(
        clients[1].mask(&[honest], &[0.0; 4], 1.0),
        Err(SecAggError::Aborted(_))
    ));
}

fn drop_strategy() -> impl Strategy<Value = Drop> {
    prop_oneof![
        6 => Just(Drop::Never),
        1 => Just(Drop::BeforeAdvertising),
        1 => Just(Drop::BeforeSharing),
        1 => Just(Drop::BeforeMasking),
        1 => Just(Drop::BeforeUnmasking),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn the_unmasked_sum_equals_the_plain_sum_under_any_dropouts(
        n in 5usize..16,
        dim in 1usize..64,
        extra_neighbours in 0usize..6,
        drops in proptest::collection::vec(drop_strategy(), 16),
        weights in proptest::collection::vec(0.0f64..=1.0, 16),
        values in proptest::collection::vec(-10.0f32..10.0, 16 * 64),
    ) {
        let params = SecAggParams::with_neighbours((4 + extra_neighbours).min(n - 1));
        let updates: Vec<Vec<f32>> = (0..n).map(|i| values[i * dim..(i + 1) * dim].to_vec()).collect();
        let outcome = run_round(params, &updates, &weights[..n], &drops[..n]);
        let broken = threshold_broken(&params, &drops[..n]);
        match &outcome.result {
            Ok(_) => {
                prop_assert!(!broken, "the round finished though dropouts broke the threshold");
                assert_sum_matches(&outcome, &params);
            }
            // A round aborts exactly when dropouts starved some secret below the threshold.
            Err(SecAggError::Aborted(reason)) => {
                prop_assert!(broken, "aborted with the threshold intact: {}", reason);
            }
            Err(e) => prop_assert!(false, "unexpected error {e}"),
        }
    }
}
