//! The gRPC `ferry.v1.Fleet` service: authenticates every call (a node's own, or one a relay
//! forwards for a node of its subtree), then hands it to the [`Coordinator`]; and the
//! `ferry.v1.Relay` service relays sync through. Bad input gets a precise status and a log line; nothing a node sends can
//! take the server down.

use std::{path::Path, pin::Pin, sync::Arc, time::Duration};

use ferry_core::evaluation::NodeEvaluation;
use ferry_proto::v1::{
    self, BlobChunk, DownloadRequest, EnrolRequest, EnrolResponse, EvaluationReport, FailureAck,
    FailureReport, HeartbeatRequest, HeartbeatResponse, PullTaskRequest, PullTaskResponse,
    SecAggRequest, SecAggResponse, UploadChunk, UploadReceipt, UploadStatusRequest,
    fleet_server::Fleet, pull_task_response::Outcome,
};
use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

mod callers;
mod refusals;
mod relay;
mod wire;

use callers::{Actor, permission_denied, store_unavailable, unauthenticated};
use refusals::{refused, refused_request, rejected, stage_refused};
use wire::{
    evaluation_message, receipt, secagg_outcome, secagg_step, task_message, tuning_message,
};

use crate::{
    auth,
    coordinator::{Coordinator, Work},
    limits::{AbuseLimits, Guard},
    secure::SecAggReply,
    staged::StagedUpload,
    store::{IdentityKind, Store},
    turns::TransferTurns,
};

/// Longest a PullTask call is held open.
pub(crate) const MAX_WAIT: Duration = Duration::from_secs(30);

/// Completed uploads checked at once: an update is read from its file a piece at a time, but a
/// secure round's masked input and a rule that needs each update whole read it into memory,
/// so this bounds the server's memory however many nodes finish together.
const CONCURRENT_DECODES: usize = 2;

/// The longest failure reason a node's report may leave in the run's records.
const MAX_REASON_CHARS: usize = 500;

/// The fleet service over one coordinator and its store; also the Relay service relays sync
/// through.
pub struct FleetService {
    coordinator: Arc<Coordinator>,
    store: Store,
    decoding: tokio::sync::Semaphore,
    transfers: Arc<TransferTurns>,
    guard: Guard,
    subtrees: relay::Subtrees,
}

impl FleetService {
    /// A service for `coordinator`, authenticating nodes against `store` and holding them
    /// to `limits`.
    pub fn new(coordinator: Arc<Coordinator>, store: Store, limits: AbuseLimits) -> Self {
        Self {
            coordinator,
            store,
            decoding: tokio::sync::Semaphore::new(CONCURRENT_DECODES),
            transfers: TransferTurns::standard(),
            guard: Guard::new(limits),
            subtrees: relay::Subtrees::default(),
        }
    }

    /// How often a call that keeps a node waiting marks it seen: three times per
    /// `offline_after`, so a waiting node never counts as offline (never under 100 ms, so a
    /// tiny `offline_after` cannot make a wait spin).
    fn liveness_beat(&self) -> Duration {
        (self.coordinator.spec().offline_after / 3).max(Duration::from_millis(100))
    }
}

async fn staged_len(path: &Path) -> u64 {
    tokio::fs::metadata(path).await.map_or(0, |m| m.len())
}

/// A download's answer: the blob's chunks.
pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<BlobChunk, Status>> + Send>>;

/// Streams blob `id`'s bytes in `range` from `blobs` in chunks of `chunk` bytes, holding the
/// transfer `turn` until the stream ends or the receiver goes away.
pub fn chunk_stream(
    blobs: crate::blobs::Blobs,
    id: String,
    range: std::ops::Range<u64>,
    chunk: u64,
    turn: tokio::sync::OwnedSemaphorePermit,
) -> ChunkStream {
    let total = range.end;
    Box::pin(futures::stream::unfold(range.start, move |at| {
        let (blobs, id) = (blobs.clone(), id.clone());
        let _turn = &turn;
        async move {
            if at >= total {
                return None;
            }
            let end = (at + chunk).min(total);
            let item = blobs
                .range(&id, at..end)
                .await
                .inspect(|data| {
                    metrics::counter!("ferry_bytes_out_total").increment(data.len() as u64)
                })
                .map(|data| BlobChunk {
                    offset: at,
                    data,
                    total_bytes: total,
                })
                .map_err(|e| Status::internal(format!("reading blob: {e}")));
            Some((item, end))
        }
    }))
}

#[tonic::async_trait]
impl Fleet for FleetService {
    async fn enrol(
        &self,
        request: Request<EnrolRequest>,
    ) -> Result<Response<EnrolResponse>, Status> {
        let via = self.enrolling_via(&request).await?;
        // A relay's address carries its whole subtree's enrolments (the relay limits each
        // of its own sources): failures it forwards are not held against it.
        let source = match via {
            Some(_) => None,
            None => request.remote_addr().map(|addr| addr.ip()),
        };
        self.guard.may_enrol(source)?;
        let EnrolRequest { token, secret_hash } = request.into_inner();
        // The node's own secret, by its hash (an enrolment it may retry), or one chosen here.
        let (secret, secret_hash) = if secret_hash.is_empty() {
            let secret = auth::new_secret();
            let hash = auth::hash_secret(&secret);
            (secret, hash)
        } else if secret_hash.len() == 64
            && secret_hash
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            (String::new(), secret_hash)
        } else {
            return Err(Status::invalid_argument(
                "secret_hash must be the SHA-256 of the node's secret as 64 lowercase hex digits",
            ));
        };
        let enrolled = self
            .store
            .enrol_under(
                &auth::hash_secret(token.trim()),
                &auth::new_node_id(),
                &secret_hash,
                via.as_deref(),
            )
            .await
            .map_err(store_unavailable)?
            .ok_or_else(|| {
                self.guard.enrol_failed(source);
                unauthenticated("enrolment token unknown, already used or revoked; create a new one with `ferry token create`")
            })?;
        let (node_id, name, kind) = (enrolled.node_id, enrolled.name, enrolled.kind);
        match &via {
            Some(relay) => {
                self.subtrees
                    .joined(&self.store, relay, &node_id, kind)
                    .await;
                tracing::info!(
                    "{} {node_id} enrolled as '{name}' through relay {relay}",
                    kind.as_str()
                );
            }
            None => tracing::info!("{} {node_id} enrolled as '{name}'", kind.as_str()),
        }
        if kind == IdentityKind::Node {
            self.coordinator.seen(&node_id).await;
        }
        Ok(Response::new(EnrolResponse {
            node_id,
            secret,
            name,
            kind: kind.as_str().to_string(),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let node = self.node_actor(&request).await?;
        self.guard.node_call(&node)?;
        let (keep_working, current_round) = self
            .coordinator
            .keep_working(&node, request.into_inner().round)
            .await;
        Ok(Response::new(HeartbeatResponse {
            keep_working,
            current_round,
        }))
    }

    async fn pull_task(
        &self,
        request: Request<PullTaskRequest>,
    ) -> Result<Response<PullTaskResponse>, Status> {
        let node = self.node_actor(&request).await?;
        self.guard.node_call(&node)?;
        let PullTaskRequest {
            wait_ms,
            share_local_model,
        } = request.into_inner();
        let wait = Duration::from_millis(u64::from(wait_ms)).min(MAX_WAIT);
        let mut changed = self.coordinator.subscribe_work();
        let give_up = tokio::time::Instant::now() + wait;
        let outcome = loop {
            match self.coordinator.work_for(&node, share_local_model).await {
                Work::Task(task) => {
                    break Outcome::Task(task_message(&task, self.coordinator.spec()));
                }
                Work::Tune(task) => {
                    break Outcome::Task(tuning_message(&task, self.coordinator.spec()));
                }
                Work::Evaluate(task) => {
                    break Outcome::Task(evaluation_message(&task, self.coordinator.spec()));
                }
                Work::Finished(reason) => break Outcome::Finished(v1::Finished { reason }),
                Work::Idle(reason) => {
                    // A node waiting here is alive: it is marked seen at least three times
                    // per `offline_after`, so a long wait never shows it offline.
                    let until = give_up.min(tokio::time::Instant::now() + self.liveness_beat());
                    let woke = tokio::time::timeout_at(until, changed.changed()).await;
                    let waited_out = woke.is_err() && until >= give_up;
                    if matches!(woke, Ok(Err(_))) || waited_out {
                        break Outcome::Idle(v1::Idle {
                            retry_after_ms: 500,
                            reason,
                        });
                    }
                    self.coordinator.seen(&node).await;
                }
            }
        };
        Ok(Response::new(PullTaskResponse {
            outcome: Some(outcome),
        }))
    }

    type DownloadStream = ChunkStream;

    async fn download(
        &self,
        request: Request<DownloadRequest>,
    ) -> Result<Response<Self::DownloadStream>, Status> {
        self.actor(&request).await?;
        let DownloadRequest { hash, offset } = request.into_inner();
        let blob = self.coordinator.downloadable(&hash).await.ok_or_else(|| {
            Status::not_found(format!(
                "blob {hash} is not the current model or server state; pull a new task"
            ))
        })?;
        if offset > blob.size {
            return Err(Status::out_of_range(format!(
                "offset {offset} is past the end of blob {hash} ({} bytes)",
                blob.size
            )));
        }
        let turn = self
            .transfers
            .for_download()
            .await
            .map_err(|_| Status::unavailable("the server is shutting down"))?;
        let stream = chunk_stream(
            self.coordinator.blobs().clone(),
            hash,
            offset..blob.size,
            self.coordinator.spec().max_chunk_bytes as u64,
            turn,
        );
        Ok(Response::new(stream))
    }

    async fn upload(
        &self,
        request: Request<Streaming<UploadChunk>>,
    ) -> Result<Response<UploadReceipt>, Status> {
        let actor = self.actor(&request).await?;
        let node = actor.id().to_string();
        let _slot = self.guard.upload_slot(&node)?;
        let _turn = self
            .transfers
            .for_upload(&node)
            .await
            .map_err(|_| Status::unavailable("the server is shutting down"))?;
        let mut chunks = request.into_inner();
        let max_chunk = self.coordinator.spec().max_chunk_bytes;
        let max_total = self.coordinator.max_update_bytes()
            + match actor {
                Actor::Relay(_) => crate::staged::PARTIAL_HEADER_ROOM,
                Actor::Node(_) => 0,
            };
        let mut staged: Option<StagedUpload> = None;
        let mut header: Option<(u32, u64, String)> = None;
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk?;
            if chunk.data.len() > max_chunk {
                let message = format!(
                    "chunk of {} bytes exceeds the limit of {max_chunk}",
                    chunk.data.len()
                );
                return Err(rejected(
                    &node,
                    "chunk_too_large",
                    Status::resource_exhausted(message),
                ));
            }
            match &header {
                None => {
                    if chunk.total_bytes > max_total {
                        let message = format!(
                            "update of {} bytes exceeds the limit of {max_total} for this model",
                            chunk.total_bytes
                        );
                        return Err(rejected(
                            &node,
                            "update_too_large",
                            Status::resource_exhausted(message),
                        ));
                    }
                    if let Err(why) = crate::staged::check_update_id(&chunk.hash) {
                        let status = Status::invalid_argument(why);
                        return Err(rejected(&node, "malformed", status));
                    }
                    if let Actor::Node(_) = actor
                        && let Some(dup) = self
                            .coordinator
                            .may_upload(&node, chunk.round)
                            .await
                            .map_err(|r| refused(&node, r))?
                    {
                        return Ok(Response::new(receipt(chunk.total_bytes, Some(dup))));
                    }
                    let upload = StagedUpload::open(
                        self.coordinator.blobs(),
                        chunk.round,
                        &node,
                        &chunk.hash,
                        chunk.total_bytes,
                        self.guard.staged_bytes_per_node(max_total),
                    )
                    .await
                    .map_err(|e| stage_refused(&node, e))?;
                    staged = Some(upload);
                    header = Some((chunk.round, chunk.total_bytes, chunk.hash.clone()));
                }
                Some(h) => {
                    if let Err(why) = crate::staged::check_same_upload(
                        h,
                        (chunk.round, chunk.total_bytes, &chunk.hash),
                    ) {
                        return Err(rejected(&node, "malformed", Status::invalid_argument(why)));
                    }
                }
            }
            let Some(upload) = staged.as_mut() else {
                continue;
            };
            upload
                .append(chunk.offset, &chunk.data)
                .await
                .map_err(|e| stage_refused(&node, e))?;
            metrics::counter!("ferry_bytes_in_total").increment(chunk.data.len() as u64);
        }
        let (Some(upload), Some((round, total, _))) = (staged, header) else {
            return Err(rejected(
                &node,
                "malformed",
                Status::invalid_argument("empty upload"),
            ));
        };
        if !upload.is_complete() {
            return Ok(Response::new(receipt(upload.have(), None)));
        }
        let _permit = self
            .decoding
            .acquire()
            .await
            .map_err(|_| Status::unavailable("the server is shutting down"))?;
        let verified = upload.finish().await.map_err(|e| stage_refused(&node, e))?;
        let submitted = match &actor {
            Actor::Node(_) => self.coordinator.submit(&node, round, verified).await,
            Actor::Relay(relay) => {
                let members = self.subtrees.members(&self.store, relay).await?;
                self.coordinator
                    .submit_partial(relay, &members, round, verified)
                    .await
            }
        };
        match submitted {
            Ok(submission) => Ok(Response::new(receipt(total, Some(submission)))),
            Err(refusal) => Err(refused(&node, refusal)),
        }
    }

    async fn upload_status(
        &self,
        request: Request<UploadStatusRequest>,
    ) -> Result<Response<UploadReceipt>, Status> {
        let actor = self.actor(&request).await?;
        let node = actor.id().to_string();
        let UploadStatusRequest { round, hash } = request.into_inner();
        if let Actor::Node(_) = actor
            && let Some(dup) = self
                .coordinator
                .may_upload(&node, round)
                .await
                .map_err(|r| refused(&node, r))?
        {
            return Ok(Response::new(receipt(0, Some(dup))));
        }
        // The node uploads next: it waits here, sending nothing, until it may, and counts
        // as online while it waits.
        let give_up = tokio::time::Instant::now() + crate::turns::RESERVATION_PATIENCE;
        while !self.transfers.reserve(&node, self.liveness_beat()).await
            && tokio::time::Instant::now() < give_up
        {
            self.coordinator.seen(&node).await;
        }
        let held = crate::staged::held_upload(self.coordinator.blobs(), round, &node, &hash);
        let have = match held {
            Some(path) => staged_len(&path).await,
            None => 0,
        };
        Ok(Response::new(receipt(have, None)))
    }

    async fn report_failure(
        &self,
        request: Request<FailureReport>,
    ) -> Result<Response<FailureAck>, Status> {
        let node = self.node_actor(&request).await?;
        let FailureReport { round, reason } = request.into_inner();
        let reason: String = reason.chars().take(MAX_REASON_CHARS).collect();
        self.coordinator.report_failure(&node, round, &reason).await;
        Ok(Response::new(FailureAck {}))
    }

    async fn report_evaluation(
        &self,
        request: Request<EvaluationReport>,
    ) -> Result<Response<FailureAck>, Status> {
        let node = self.node_actor(&request).await?;
        let EvaluationReport {
            round,
            num_examples,
            loss,
            accuracy,
            metrics,
            site_model,
        } = request.into_inner();
        let evaluation = NodeEvaluation {
            num_examples,
            loss,
            accuracy,
            metrics: metrics.into_iter().collect(),
        };
        self.coordinator
            .report_evaluation(
                &node,
                round,
                (!site_model.is_empty()).then_some(site_model.as_str()),
                evaluation,
            )
            .await
            .map_err(|r| refused_request(&node, "evaluation", r))?;
        Ok(Response::new(FailureAck {}))
    }

    async fn sec_agg(
        &self,
        request: Request<SecAggRequest>,
    ) -> Result<Response<SecAggResponse>, Status> {
        let node = self.node_actor(&request).await?;
        let SecAggRequest {
            round,
            wait_ms,
            step,
        } = request.into_inner();
        let step = secagg_step(step)?;
        let wait = Duration::from_millis(u64::from(wait_ms)).min(MAX_WAIT);
        let mut changed = self.coordinator.subscribe();
        let give_up = tokio::time::Instant::now() + wait;
        let reply = loop {
            let reply = self
                .coordinator
                .secagg(&node, round, step.clone())
                .await
                .map_err(|r| refused_request(&node, "secure-aggregation step", r))?;
            if !matches!(reply, SecAggReply::Wait) {
                break reply;
            }
            let woke = tokio::time::timeout_at(give_up, changed.changed()).await;
            if !matches!(woke, Ok(Ok(()))) {
                break reply;
            }
        };
        Ok(Response::new(SecAggResponse {
            outcome: Some(secagg_outcome(reply)),
        }))
    }
}
