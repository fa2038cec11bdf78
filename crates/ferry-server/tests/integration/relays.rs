//! What the server lets a relay do, at the protocol: speak for its own subtree only, never for
//! a node outside it; send partial aggregates that count each contributor once, whichever
//! path the contributor's update took; and nothing for a node credential or a revoked relay.

use std::collections::BTreeSet;

use ferry_core::{
    Update,
    aggregate::{Aggregator, WeightedMean, Weighting},
    partial::partial_update,
    wire,
};
use ferry_proto::v1::{
    AdoptRequest, EnrolRequest, RelaySyncRequest, UploadReceipt, relay_client::RelayClient,
};
use ferry_server::{
    coordinator::RunSpec,
    store::{IdentityKind, Store},
};
use tonic::{Code, Request, metadata::MetadataValue};

use crate::support::{
    authed, chunks, client, enrol, initial, pull, start, update_bytes, upload, wait_rounds,
};

async fn store(dir: &std::path::Path) -> Store {
    Store::open(&format!("sqlite:{}", dir.join("ferry.db").display()))
        .await
        .expect("store")
}

/// `credential`'s request, forwarded on behalf of `node`.
fn on_behalf<T>(credential: &str, node: &str, message: T) -> Request<T> {
    let mut request = authed(credential, message);
    request.metadata_mut().insert(
        ferry_proto::ON_BEHALF_OF,
        MetadataValue::try_from(node).expect("ascii"),
    );
    request
}

fn node_id(credential: &str) -> String {
    credential.split('.').next().expect("id").to_string()
}

/// A partial aggregate of `updates` ((node, delta, examples)), weighted by examples.
fn partial_bytes(updates: &[(&str, Vec<f32>, u64)]) -> Vec<u8> {
    let mut mean = Box::new(WeightedMean::new(6, Weighting::Examples));
    for (_, delta, n) in updates {
        mean.accept(&Update::new(delta.clone(), *n)).expect("valid");
    }
    let contributors = updates
        .iter()
        .map(|(node, _, n)| (node.to_string(), *n))
        .collect();
    let partial = partial_update(
        mean.into_sums(),
        Weighting::Examples,
        contributors,
        (0.0, 0),
    );
    wire::encode_update(&partial, initial().layout()).expect("encode")
}

async fn send(
    fleet: &mut ferry_proto::v1::fleet_client::FleetClient<tonic::transport::Channel>,
    credential: &str,
    round: u32,
    bytes: &[u8],
) -> Result<UploadReceipt, tonic::Status> {
    upload(fleet, credential, chunks(round, bytes, 0, 1024)).await
}

#[tokio::test]
async fn a_relay_speaks_for_its_subtree_once_and_for_no_one_else() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = start(dir.path(), 1, 3).await;
    let store = store(dir.path()).await;
    let mut fleet = client(&running.url).await;
    let mut relays = RelayClient::connect(running.url.clone())
        .await
        .expect("connect");

    let relay_token = store
        .create_token_for("relay-a", IdentityKind::Relay)
        .await
        .expect("token");
    let relay = enrol(&mut fleet, &relay_token).await;
    // Two nodes enrol through the relay, one dials the server itself.
    let mut below = Vec::new();
    for name in ["site-0", "site-1"] {
        let token = store.create_token(name).await.expect("token");
        let enrolled = fleet
            .enrol(authed(
                &relay,
                EnrolRequest {
                    token,
                    ..Default::default()
                },
            ))
            .await
            .expect("enrol through the relay")
            .into_inner();
        assert_eq!(enrolled.kind, "node");
        below.push(format!("{}.{}", enrolled.node_id, enrolled.secret));
    }
    let direct_token = store.create_token("site-2").await.expect("token");
    let direct = enrol(&mut fleet, &direct_token).await;
    let (a, b, c) = (node_id(&below[0]), node_id(&below[1]), node_id(&direct));

    // A node is not a relay, and a relay is not a node.
    let refused = relays
        .sync(authed(&direct, RelaySyncRequest::default()))
        .await
        .expect_err("a node cannot sync as a relay");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused}");
    let refused = fleet
        .pull_task(authed(&relay, Default::default()))
        .await
        .expect_err("a relay pulls no task of its own");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused}");
    // A relay cannot call for a node outside its subtree.
    let refused = fleet
        .heartbeat(on_behalf(&relay, &c, Default::default()))
        .await
        .expect_err("not its node");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused}");

    // The relay's sync marks its nodes online; with the direct node, round 1 starts.
    let synced = relays
        .sync(authed(
            &relay,
            RelaySyncRequest {
                online: vec![a.clone(), b.clone(), c.clone()],
                wait_ms: 0,
                version: 0,
                relays: Vec::new(),
            },
        ))
        .await
        .expect("sync")
        .into_inner();
    assert_eq!(synced.fold, ferry_proto::v1::Fold::Examples as i32);
    let task = pull(&mut fleet, &direct).await;
    let round = task.round;
    let synced = relays
        .sync(authed(
            &relay,
            RelaySyncRequest {
                online: vec![a.clone(), b.clone()],
                wait_ms: 0,
                version: 0,
                relays: Vec::new(),
            },
        ))
        .await
        .expect("sync")
        .into_inner();
    let listed: BTreeSet<String> = synced.train_nodes.into_iter().collect();
    assert_eq!(
        listed,
        BTreeSet::from([a.clone(), b.clone()]),
        "only its own nodes"
    );
    assert!(synced.relay_deadline_unix_ms > 0);

    // A partial that names a node of another path counts nothing, and says whom to leave out.
    let foreign = partial_bytes(&[(&a, vec![1.0; 6], 10), (&c, vec![9.0; 6], 10)]);
    let receipt = send(&mut fleet, &relay, round, &foreign)
        .await
        .expect("answered");
    assert!(!receipt.accepted);
    assert_eq!(receipt.not_counted, std::slice::from_ref(&c));
    // A relay's own upload must be a partial aggregate.
    let own = update_bytes(vec![3.0; 6], 30);
    let refused = send(&mut fleet, &relay, round, &own)
        .await
        .expect_err("not a partial");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused}");
    // Node b's update comes on its behalf (as it would were the rule robust), and counts as
    // b's; a partial naming b then counts nothing.
    let forwarded = on_behalf(
        &relay,
        &b,
        futures::stream::iter(chunks(round, &own, 0, 1024)),
    );
    let receipt = fleet
        .upload(forwarded)
        .await
        .expect("forwarded")
        .into_inner();
    assert!(receipt.accepted && !receipt.duplicate);
    let with_b = partial_bytes(&[(&a, vec![1.0; 6], 10), (&b, vec![2.0; 6], 20)]);
    let receipt = send(&mut fleet, &relay, round, &with_b)
        .await
        .expect("answered");
    assert_eq!(
        receipt.not_counted,
        std::slice::from_ref(&b),
        "b already counted through another path"
    );
    let just_a = partial_bytes(&[(&a, vec![1.0; 6], 10)]);
    let receipt = send(&mut fleet, &relay, round, &just_a)
        .await
        .expect("counted");
    assert!(receipt.accepted && !receipt.duplicate, "{receipt:?}");
    // The same partial again (a retry after a lost receipt) is a duplicate, counted once.
    let receipt = send(&mut fleet, &relay, round, &just_a)
        .await
        .expect("answered");
    assert!(receipt.accepted && receipt.duplicate, "{receipt:?}");
    // Node a, now counted, cannot be counted again by its own upload either.
    let again = send(&mut fleet, &below[0], round, &update_bytes(vec![5.0; 6], 5))
        .await
        .expect("answered");
    assert!(again.duplicate, "{again:?}");

    let receipt = send(&mut fleet, &direct, round, &update_bytes(vec![6.0; 6], 60))
        .await
        .expect("direct");
    assert!(receipt.accepted);
    let history = wait_rounds(&running.coordinator, 1).await;
    let record = &history[0];
    let mut named = record.contributors.clone();
    named.sort();
    let mut want = vec![a.clone(), b.clone(), c.clone()];
    want.sort();
    assert_eq!(named, want, "every node once");
    assert_eq!(record.participants, 3);
    let at = |node: &str| {
        let i = record
            .contributors
            .iter()
            .position(|n| n == node)
            .expect("named");
        record.contributor_examples[i]
    };
    assert_eq!((at(&a), at(&b), at(&c)), (10, 30, 60));
    // FedAvg of 1.0 x 10, 3.0 x 30 and 6.0 x 60 examples.
    let model = running.coordinator.global().await.expect("model");
    let want = (10.0 + 90.0 + 360.0) / 100.0;
    assert!(
        model.values().iter().all(|v| (v - want).abs() < 1e-5),
        "{:?}",
        model.values()
    );

    // Adoption needs the node's own credential; a revoked relay can do nothing.
    let refused = relays
        .adopt(authed(
            &relay,
            AdoptRequest {
                credential: format!("{c}.wrong"),
            },
        ))
        .await
        .expect_err("a guessed credential");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused}");
    let adopted = relays
        .adopt(authed(
            &relay,
            AdoptRequest {
                credential: direct.clone(),
            },
        ))
        .await
        .expect("the node's own credential moves it here")
        .into_inner();
    assert_eq!(adopted.node_id, c);
    assert_eq!(
        store
            .node(&c)
            .await
            .expect("row")
            .expect("node")
            .relay
            .as_deref(),
        Some(node_id(&relay).as_str())
    );
    assert!(store.revoke("relay-a").await.expect("revoke"));
    let refused = relays
        .sync(authed(&relay, RelaySyncRequest::default()))
        .await
        .expect_err("revoked");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused}");
    running.stop().await;
}

#[tokio::test]
async fn a_relay_forwards_for_the_relays_below_it_and_only_for_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = start(dir.path(), 1, 3).await;
    let store = store(dir.path()).await;
    let mut fleet = client(&running.url).await;
    let mut relays = RelayClient::connect(running.url.clone())
        .await
        .expect("connect");
    let relay_token = |name: &'static str| {
        let store = store.clone();
        async move {
            store
                .create_token_for(name, IdentityKind::Relay)
                .await
                .expect("token")
        }
    };
    let top = enrol(&mut fleet, &relay_token("relay-top").await).await;
    let other = enrol(&mut fleet, &relay_token("relay-other").await).await;
    // The lower relay enrols through the top one, which forwards its token.
    let lower = fleet
        .enrol(authed(
            &top,
            EnrolRequest {
                token: relay_token("relay-lower").await,
                ..Default::default()
            },
        ))
        .await
        .expect("enrol through the top relay")
        .into_inner();
    assert_eq!(lower.kind, "relay");
    let lower_id = lower.node_id.clone();
    let lower = format!("{}.{}", lower.node_id, lower.secret);
    // A node enrols through the lower relay: the top one forwards on the lower's behalf.
    let node_token = store.create_token("site-0").await.expect("token");
    let enrolled = fleet
        .enrol(on_behalf(
            &top,
            &lower_id,
            EnrolRequest {
                token: node_token,
                ..Default::default()
            },
        ))
        .await
        .expect("enrol through the chain")
        .into_inner();
    let node = enrolled.node_id.clone();
    let row = store.node(&node).await.expect("row").expect("node");
    assert_eq!(row.relay.as_deref(), Some(lower_id.as_str()));

    // Another relay cannot forward for the lower relay, nor speak for its node.
    let token = store.create_token("site-1").await.expect("token");
    let refused = fleet
        .enrol(on_behalf(
            &other,
            &lower_id,
            EnrolRequest {
                token,
                ..Default::default()
            },
        ))
        .await
        .expect_err("not its relay");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused}");
    let refused = fleet
        .heartbeat(on_behalf(&other, &node, Default::default()))
        .await
        .expect_err("not its node");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused}");
    // Both relays of the chain may speak for the node.
    for relay in [&top, &lower] {
        fleet
            .heartbeat(on_behalf(relay, &node, Default::default()))
            .await
            .expect("its subtree");
    }

    // The top relay's sync reports the lower relay as a relay: it never counts as a node.
    relays
        .sync(authed(
            &top,
            RelaySyncRequest {
                online: vec![node.clone(), lower_id.clone()],
                relays: vec![lower_id.clone()],
                ..Default::default()
            },
        ))
        .await
        .expect("sync");
    assert_eq!(running.coordinator.status().await.nodes_online, 1);
    let online = running.coordinator.online().await;
    assert!(online.contains_key(&lower_id), "{online:?}");

    // A node that fails over to the lower relay moves under it through the top one.
    let direct = enrol(
        &mut fleet,
        &store.create_token("site-2").await.expect("token"),
    )
    .await;
    let refused = relays
        .adopt(on_behalf(
            &other,
            &lower_id,
            AdoptRequest {
                credential: direct.clone(),
            },
        ))
        .await
        .expect_err("not its relay");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused}");
    relays
        .adopt(on_behalf(
            &top,
            &lower_id,
            AdoptRequest {
                credential: direct.clone(),
            },
        ))
        .await
        .expect("adopted into the chain");
    let row = store
        .node(&node_id(&direct))
        .await
        .expect("row")
        .expect("node");
    assert_eq!(row.relay.as_deref(), Some(lower_id.as_str()));
    fleet
        .heartbeat(on_behalf(&top, &node_id(&direct), Default::default()))
        .await
        .expect("now in the top relay's subtree, too");
    running.stop().await;
}

#[tokio::test]
async fn a_relay_syncing_into_an_asynchronous_run_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = RunSpec {
        asynchronous: Some(ferry_engine::fedbuff::FedBuff {
            buffer_size: 2,
            max_concurrency: 2,
            staleness: Default::default(),
            task_deadline_s: None,
        }),
        ..crate::support::spec(1, 1)
    };
    let running = crate::support::start_with(dir.path(), spec, None).await;
    let store = store(dir.path()).await;
    let mut fleet = client(&running.url).await;
    let mut relays = RelayClient::connect(running.url.clone())
        .await
        .expect("connect");
    let token = store
        .create_token_for("relay-a", IdentityKind::Relay)
        .await
        .expect("token");
    let relay = enrol(&mut fleet, &token).await;
    let refused = relays
        .sync(authed(&relay, RelaySyncRequest::default()))
        .await
        .expect_err("relays serve synchronous rounds");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused}");
    assert!(refused.message().contains("asynchronously"), "{refused}");
    running.stop().await;
}
