//! The fleet protocol against a real server on loopback: identity, task pull, resumable and
//! idempotent uploads, refusals of bad input, and a restart that keeps every accepted update
//! exactly once.
//!
//! The model is a two-tensor toy and the evaluator scores the model by its distance to a known
//! target, so the test needs no ML engine; the protocol and the round bookkeeping are real.

use crate::support;

use support::*;

use ferry_core::{
    content::content_id,
    privacy::{
        ClipRule, DpSettings, Placement,
        accountant::{default_orders, epsilon_for},
    },
    wire,
};
use ferry_engine::secure::SecureAggregation;
use ferry_proto::v1::{
    DownloadRequest, EnrolRequest, PullTaskRequest, SecAggEmpty, SecAggRequest, UploadChunk,
    UploadStatusRequest, fleet_client::FleetClient, pull_task_response::Outcome, sec_agg_request,
    sec_agg_response,
};
use ferry_secagg::{SecAggClient, SecAggParams};
use ferry_server::{coordinator::RunSpec, store::Store};
use futures::StreamExt;
use tonic::{Code, Request, transport::Channel};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_uploads_refusals_and_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (token_a, token_b) = (
        add_token(dir.path(), "site-a").await,
        add_token(dir.path(), "site-b").await,
    );
    let running = start(dir.path(), 3, 2).await;
    let mut c = client(&running.url).await;

    // Identity: bad tokens and credentials are refused; a token enrols once.
    let err = c
        .enrol(EnrolRequest {
            token: "ferry-bogus".into(),
            ..Default::default()
        })
        .await
        .expect_err("bogus token");
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(
        err.message().contains("ferry token create"),
        "{}",
        err.message()
    );
    let a = enrol(&mut c, &token_a).await;
    let again = c
        .enrol(EnrolRequest {
            token: token_a.clone(),
            ..Default::default()
        })
        .await
        .expect_err("one-time");
    assert_eq!(again.code(), Code::Unauthenticated);
    let b = enrol(&mut c, &token_b).await;
    let forged = format!("{}.{}", a.split('.').next().expect("id"), "0".repeat(64));
    let err = c
        .pull_task(authed(
            &forged,
            PullTaskRequest {
                wait_ms: 0,
                ..Default::default()
            },
        ))
        .await
        .expect_err("forged");
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = c
        .pull_task(Request::new(PullTaskRequest {
            wait_ms: 0,
            ..Default::default()
        }))
        .await
        .expect_err("anonymous");
    assert_eq!(err.code(), Code::Unauthenticated);

    // Both nodes online: round 1 starts with both; the model downloads in chunks and verifies.
    let task = pull(&mut c, &a).await;
    assert_eq!(task.round, 1);
    let model = task.model.clone().expect("model ref");
    let mut stream = c
        .download(authed(
            &a,
            DownloadRequest {
                hash: model.hash.clone(),
                offset: 10,
            },
        ))
        .await
        .expect("download")
        .into_inner();
    let mut tail = Vec::new();
    while let Some(chunk) = stream.next().await {
        tail.extend(chunk.expect("chunk").data);
    }
    let whole = initial().to_safetensors().expect("bytes");
    assert_eq!(tail, whole[10..], "download resumes at an offset");
    assert_eq!(content_id(&whole), model.hash);

    // Bad updates are refused with precise statuses and do not count. A refused update is the
    // node's answer for the round; transport refusals (chunk size, stale round) are not.
    let nan = update_bytes(vec![f32::NAN, 0.0, 0.0, 0.0, 0.0, 0.0], 5);
    let err = upload(&mut c, &a, chunks(1, &nan, 0, 512))
        .await
        .expect_err("NaN");
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(err.message().contains("non-finite"), "{}", err.message());
    let big = vec![0u8; 2000];
    let oversized = UploadChunk {
        round: 1,
        offset: 0,
        total_bytes: big.len() as u64,
        hash: content_id(&big),
        data: big.into(),
    };
    let err = upload(&mut c, &b, vec![oversized])
        .await
        .expect_err("oversized chunk");
    assert_eq!(err.code(), Code::ResourceExhausted);
    let err = upload(
        &mut c,
        &b,
        chunks(9, &update_bytes(vec![1.0; 6], 5), 0, 512),
    )
    .await
    .expect_err("stale");
    assert_eq!(err.code(), Code::FailedPrecondition);

    // A cut upload resumes where the server says it stopped.
    let good = update_bytes(vec![1.0; 6], 30);
    let first: Vec<UploadChunk> = chunks(1, &good, 0, 50).into_iter().take(2).collect();
    let partial = upload(&mut c, &b, first).await.expect("partial upload");
    assert!(!partial.accepted);
    assert_eq!(partial.received_bytes, 100);
    let status = c
        .upload_status(authed(
            &b,
            UploadStatusRequest {
                round: 1,
                hash: content_id(&good),
            },
        ))
        .await
        .expect("status")
        .into_inner();
    assert_eq!(status.received_bytes, 100);
    let err = upload(&mut c, &b, chunks(1, &good, 50, 50))
        .await
        .expect_err("wrong offset");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("100"), "{}", err.message());
    let receipt = upload(&mut c, &b, chunks(1, &good, 100, 50))
        .await
        .expect("resumed");
    assert!(receipt.accepted && !receipt.duplicate);
    let replay = upload(&mut c, &b, chunks(1, &good, 0, 512))
        .await
        .expect("replay answered");
    assert!(
        replay.accepted && replay.duplicate,
        "a replay is acknowledged, not counted"
    );

    // Round 1 closed once both had answered: b's update counted, a's refused.
    let history = wait_rounds(&running.coordinator, 1).await;
    assert_eq!((history[0].participants, history[0].failures), (1, 1));

    // Round 2: a sends a tensor the model does not have; b delivers.
    assert_eq!(pull(&mut c, &a).await.round, 2);
    let foreign = wire::encode_vectors(&[("delta/evil", &[1.0; 6])]).expect("encode");
    let err = upload(&mut c, &a, chunks(2, &foreign, 0, 512))
        .await
        .expect_err("foreign tensor");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("evil"), "{}", err.message());
    let b2 = update_bytes(vec![1.0; 6], 30);
    let receipt = upload(&mut c, &b, chunks(2, &b2, 0, 512)).await;
    assert!(receipt.expect("b round 2").accepted);
    wait_rounds(&running.coordinator, 2).await;

    // Round 3: b delivers, then the server dies before a does.
    assert_eq!(pull(&mut c, &b).await.round, 3);
    let b3 = update_bytes(vec![1.0; 6], 30);
    let receipt = upload(&mut c, &b, chunks(3, &b3, 0, 512)).await;
    assert!(receipt.expect("b round 3").accepted);
    running.stop().await;

    let running = start(dir.path(), 3, 2).await;
    let mut c = client(&running.url).await;
    let replay = upload(&mut c, &b, chunks(3, &b3, 0, 512))
        .await
        .expect("replay after restart");
    assert!(
        replay.accepted && replay.duplicate,
        "the accepted update survived the restart, once"
    );
    let replay = upload(&mut c, &b, chunks(1, &good, 0, 512))
        .await
        .expect("old replay");
    assert!(
        replay.duplicate,
        "a replay of a closed round is acknowledged, not counted"
    );
    assert_eq!(pull(&mut c, &a).await.round, 3, "a still owes round 3");
    let a3 = update_bytes(vec![-1.0; 6], 10);
    let receipt = upload(&mut c, &a, chunks(3, &a3, 0, 512)).await;
    assert!(receipt.expect("a round 3").accepted);
    let history = wait_rounds(&running.coordinator, 3).await;
    assert_eq!((history[1].participants, history[1].failures), (1, 1));
    assert_eq!(history[2].participants, 2);
    // Rounds 1 and 2 moved every value to 2; round 3 adds (30 * 1 + 10 * -1) / 40 = 0.5, which
    // holds only if b's update was counted exactly once across the crash.
    let global = running.coordinator.global().await.expect("global model");
    assert!(
        global.values().iter().all(|v| (v - 2.5).abs() < 1e-6),
        "{:?}",
        global.values()
    );
    let finished = c
        .pull_task(authed(
            &a,
            PullTaskRequest {
                wait_ms: 2000,
                ..Default::default()
            },
        ))
        .await
        .expect("pull")
        .into_inner();
    assert!(
        matches!(finished.outcome, Some(Outcome::Finished(_))),
        "{finished:?}"
    );

    // Revocation takes effect on the next call.
    Store::open(&format!("sqlite:{}", dir.path().join("ferry.db").display()))
        .await
        .expect("store")
        .revoke("site-a")
        .await
        .expect("revoke");
    let err = c
        .pull_task(authed(
            &a,
            PullTaskRequest {
                wait_ms: 0,
                ..Default::default()
            },
        ))
        .await
        .expect_err("revoked");
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("revoked"), "{}", err.message());
    running.stop().await;
}

#[tokio::test]
async fn central_dp_rounds_are_accounted_reported_and_replayed_after_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dp = DpSettings {
        noise_multiplier: 1.0,
        clip: ClipRule::Fixed(1.0),
        per_layer: false,
        delta: 1e-5,
        placement: Placement::Central,
        epsilon_budget: None,
        sampling_rate: 1.0,
    };
    let running = start_private(dir.path(), 3, 1, Some(dp)).await;
    assert_eq!(running.coordinator.status().await.epsilon, None);
    let token = add_token(dir.path(), "site-a").await;
    let mut fleet = client(&running.url).await;
    let credential = enrol(&mut fleet, &token).await;
    let task = pull(&mut fleet, &credential).await;
    assert!(
        task.privacy.is_none(),
        "central DP asks nothing of the node"
    );
    let receipt = upload(
        &mut fleet,
        &credential,
        chunks(
            1,
            &update_bytes(vec![30.0, 40.0, 0.0, 0.0, 0.0, 0.0], 5),
            0,
            1024,
        ),
    )
    .await
    .expect("accepted");
    assert!(!receipt.duplicate);
    let records = wait_rounds(&running.coordinator, 1).await;
    let want = epsilon_for(1.0, 1.0, 1, 1e-5, &default_orders()).epsilon;
    let record = records[0].dp.expect("a private round's record");
    assert_eq!(records[0].epsilon, Some(record.epsilon));
    assert!(
        (record.epsilon - want).abs() < 1e-12,
        "{} vs {want}",
        record.epsilon
    );
    assert_eq!(record.clip_norm, 1.0);
    assert_eq!(record.noise_multiplier, Some(1.0));
    // The update (norm 50) was clipped to norm 1 and noised with std 1 per value: the model
    // moved, but by nothing like the raw update.
    let moved = running.coordinator.global().await.expect("global model");
    assert!(
        moved.values().iter().all(|v| v.abs() < 10.0),
        "{:?}",
        moved.values()
    );
    assert!(moved.values().iter().any(|v| *v != 0.0));
    assert_eq!(
        running.coordinator.status().await.epsilon,
        Some(record.epsilon)
    );
    running.stop().await;

    // A restarted coordinator rebuilds the spent budget from its committed rounds.
    let restarted = start_private(dir.path(), 3, 1, Some(dp)).await;
    let status = restarted.coordinator.status().await;
    assert_eq!(status.epsilon, Some(record.epsilon));
    assert_eq!(status.delta, Some(1e-5));
    restarted.stop().await;
}

/// A secure round's step for `round`, retried while the server answers "wait".
async fn secagg_step(
    client: &mut FleetClient<Channel>,
    credential: &str,
    round: u32,
    step: sec_agg_request::Step,
) -> Result<sec_agg_response::Outcome, tonic::Status> {
    loop {
        let request = SecAggRequest {
            round,
            wait_ms: 2000,
            step: Some(step.clone()),
        };
        let outcome = client
            .sec_agg(authed(credential, request))
            .await?
            .into_inner()
            .outcome
            .expect("an outcome");
        if !matches!(outcome, sec_agg_response::Outcome::Wait(_)) {
            return Ok(outcome);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secure_round_runs_over_the_protocol_and_starts_again_after_a_restart() {
    use ferry_proto::secagg as convert;
    use sec_agg_request::Step;
    use sec_agg_response::Outcome as Reply;

    let dir = tempfile::tempdir().expect("tempdir");
    let params = SecAggParams::with_neighbours(2);
    let secure_spec = || RunSpec {
        secure: Some(SecureAggregation {
            params,
            automatic_threshold: false,
            weight_cap: Some(10),
        }),
        ..spec(1, 3)
    };
    let running = start_with(dir.path(), secure_spec(), None).await;
    let mut fleet = client(&running.url).await;
    let mut credentials = Vec::new();
    for i in 0..3 {
        let token = add_token(dir.path(), &format!("site-{i}")).await;
        credentials.push(enrol(&mut fleet, &token).await);
    }
    for credential in &credentials {
        let task = pull(&mut fleet, credential).await;
        let wire = task.secagg.expect("the task asks for secure aggregation");
        assert_eq!(convert::task_from_wire(&wire), (params, Some(10)));
    }
    // Malformed keys are refused; good ones are taken; then the coordinator dies.
    let short = Step::Advertise(ferry_proto::v1::SecAggKeys {
        cipher: vec![1; 31],
        mask: vec![2; 32],
    });
    let refused = secagg_step(&mut fleet, &credentials[0], 1, short).await;
    assert_eq!(
        refused.expect_err("31-byte key").code(),
        Code::InvalidArgument
    );
    let early = SecAggClient::new(params, [9; 32]);
    let advertise = Step::Advertise(convert::keys_to_wire(&early.public_keys()));
    let ack = secagg_step(&mut fleet, &credentials[0], 1, advertise).await;
    assert!(matches!(ack, Ok(Reply::Ack(_))));
    running.stop().await;

    // The restarted coordinator cannot use keys that lived in the old process: round 1 starts
    // again, and the nodes walk all four stages anew.
    let running = start_with(dir.path(), secure_spec(), None).await;
    let mut fleet = client(&running.url).await;
    let mut nodes: Vec<SecAggClient> = (0..3u8)
        .map(|i| SecAggClient::new(params, [i; 32]))
        .collect();
    for credential in &credentials {
        // Any authenticated call puts the node back online.
        let beat = ferry_proto::v1::HeartbeatRequest { round: 1 };
        fleet
            .heartbeat(authed(credential, beat))
            .await
            .expect("heartbeat");
    }
    for (credential, node) in credentials.iter().zip(&nodes) {
        assert_eq!(pull(&mut fleet, credential).await.round, 1);
        let step = Step::Advertise(convert::keys_to_wire(&node.public_keys()));
        let ack = secagg_step(&mut fleet, credential, 1, step).await;
        assert!(matches!(ack, Ok(Reply::Ack(_))), "{ack:?}");
    }
    for (credential, node) in credentials.iter().zip(nodes.iter_mut()) {
        let roster =
            match secagg_step(&mut fleet, credential, 1, Step::GetRoster(SecAggEmpty {})).await {
                Ok(Reply::Roster(roster)) => convert::roster_from_wire(&roster).expect("roster"),
                other => panic!("roster expected: {other:?}"),
            };
        assert_eq!(roster.members.len(), 3);
        let sealed = node.share_keys(&roster).expect("share");
        let step = Step::Share(convert::shares_to_wire(&sealed));
        assert!(matches!(
            secagg_step(&mut fleet, credential, 1, step).await,
            Ok(Reply::Ack(_))
        ));
    }
    // Each node masks the same update, weighted by 5 of at most 10 examples.
    let delta = [0.5f32, -0.25, 0.0, 1.0, 0.0, 0.0];
    for (credential, node) in credentials.iter().zip(nodes.iter_mut()) {
        let inbox =
            match secagg_step(&mut fleet, credential, 1, Step::GetInbox(SecAggEmpty {})).await {
                Ok(Reply::Inbox(inbox)) => convert::shares_from_wire(&inbox),
                other => panic!("inbox expected: {other:?}"),
            };
        let masked = node.mask(&inbox, &delta, 0.5).expect("mask");
        let bytes = convert::masked_to_bytes(&masked, &params);
        let receipt = upload(&mut fleet, credential, chunks(1, &bytes, 0, 1024))
            .await
            .expect("masked input accepted");
        assert!(receipt.accepted);
    }
    for (credential, node) in credentials.iter().zip(nodes.iter_mut()) {
        let request = match secagg_step(
            &mut fleet,
            credential,
            1,
            Step::GetUnmaskRequest(SecAggEmpty {}),
        )
        .await
        {
            Ok(Reply::UnmaskRequest(request)) => convert::request_from_wire(&request),
            other => panic!("unmask request expected: {other:?}"),
        };
        assert_eq!(request.survivors.len(), 3);
        let shares = node.unmask(&request).expect("reveal");
        let step = Step::Reveal(convert::revealed_to_wire(&shares));
        assert!(matches!(
            secagg_step(&mut fleet, credential, 1, step).await,
            Ok(Reply::Ack(_))
        ));
    }
    let records = wait_rounds(&running.coordinator, 1).await;
    assert_eq!(records[0].participants, 3);
    assert_eq!(records[0].aborted, None);
    // FedAvg of three equal updates is that update, within the quantisation error.
    let model = running.coordinator.global().await.expect("global model");
    for (got, want) in model.values().iter().zip(delta) {
        assert!((got - want).abs() < 1e-4, "{got} vs {want}");
    }
    // The server stored no update: its blobs are the two models.
    let blobs = std::fs::read_dir(dir.path().join("blobs/blake3"))
        .expect("blobs")
        .filter(|e| e.as_ref().is_ok_and(|e| e.path().is_file()))
        .count();
    assert_eq!(blobs, 2);
    running.stop().await;
}

#[tokio::test]
async fn an_enrolment_retried_with_the_nodes_own_secret_gets_the_same_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = start(dir.path(), 1, 1).await;
    let token = add_token(dir.path(), "site-1").await;
    let mut c = client(&running.url).await;
    let ask = |secret_hash: &str| EnrolRequest {
        token: token.clone(),
        secret_hash: secret_hash.to_string(),
    };
    let hash = ferry_core::model::sha256_hex(b"the node's own secret");
    let first = c.enrol(ask(&hash)).await.expect("enrol").into_inner();
    assert!(first.secret.is_empty(), "the node has its secret");
    // The answer was lost; the node asks again with the same token and secret.
    let again = c.enrol(ask(&hash)).await.expect("a retry").into_inner();
    assert_eq!(again.node_id, first.node_id);
    // Someone else holding the spent token but not the secret gets nothing.
    let other = ferry_core::model::sha256_hex(b"a guess");
    let refused = c.enrol(ask(&other)).await.expect_err("not the secret");
    assert_eq!(refused.code(), Code::Unauthenticated);
    let malformed = c.enrol(ask("not-a-hash")).await.expect_err("malformed");
    assert_eq!(malformed.code(), Code::InvalidArgument);
    // The node's credential is its own secret.
    let credential = format!("{}.the node's own secret", first.node_id);
    pull(&mut c, &credential).await;
    running.stop().await;
}
