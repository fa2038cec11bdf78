//! The relay's fleet service: to a node, the same `ferry.v1.Fleet` the server speaks. Tasks,
//! heartbeats and model downloads are answered here, from the relay's view and blobs;
//! uploads (a node's update, or a lower relay's partial aggregate) are checked by
//! [`crate::intake`] and held for [`crate::flush`]; enrolment, failure and evaluation reports
//! and SecAgg+ steps go upstream on the node's behalf.

use std::time::{Duration, Instant};

use ferry_proto::v1::{
    self, DownloadRequest, EnrolRequest, EnrolResponse, EvaluationReport, FailureAck,
    FailureReport, HeartbeatRequest, HeartbeatResponse, PullTaskRequest, PullTaskResponse,
    SecAggRequest, SecAggResponse, UploadChunk, UploadReceipt, UploadStatusRequest,
    fleet_server::Fleet, pull_task_response::Outcome,
};
use ferry_server::{
    auth::{self},
    service::{ChunkStream, chunk_stream},
    staged::{self, StagedUpload},
    store::IdentityKind,
    turns,
};
use futures::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::{
    relay::{Caller, Relay, internal, lock},
    store::Holding,
    view::NodeWork,
};

/// Longest a PullTask call is held open.
const MAX_WAIT: Duration = Duration::from_secs(30);

/// How long one try to reserve an upload's turn waits before its sender is marked online
/// again.
const RESERVE_BEAT: Duration = Duration::from_secs(2);

fn receipt(received_bytes: u64, accepted: bool, duplicate: bool) -> UploadReceipt {
    UploadReceipt {
        received_bytes,
        accepted,
        duplicate,
        not_counted: Vec::new(),
    }
}

#[tonic::async_trait]
impl Fleet for Relay {
    async fn enrol(
        &self,
        request: Request<EnrolRequest>,
    ) -> Result<Response<EnrolResponse>, Status> {
        // A relay below this one forwards its members' enrolments with its own credential;
        // those count against no address here, as at the server.
        let via = match request.metadata().get(ferry_proto::AUTHORIZATION) {
            Some(_) => Some(self.lower_relay(&request).await?),
            None => None,
        };
        let source = match via {
            Some(_) => None,
            None => request.remote_addr().map(|addr| addr.ip()),
        };
        self.guard.may_enrol(source)?;
        let asked = request.into_inner();
        let chosen = asked.secret_hash.clone();
        let forwarded = match &via {
            Some(lower) => self.on_behalf(lower, asked),
            None => self.upstream.credential.authorize(Request::new(asked)),
        };
        let enrolled = match self.upstream.fleet.clone().enrol(forwarded).await {
            Ok(enrolled) => enrolled.into_inner(),
            Err(status) => {
                if status.code() == tonic::Code::Unauthenticated {
                    self.guard.enrol_failed(source);
                }
                return Err(status);
            }
        };
        // The member's own secret is known here by its hash; one the server chose, by itself.
        let secret_hash = if enrolled.secret.is_empty() {
            chosen
        } else {
            auth::hash_secret(&enrolled.secret)
        };
        let kind = IdentityKind::parse(&enrolled.kind);
        self.store
            .add_member(
                &enrolled.node_id,
                &enrolled.name,
                &secret_hash,
                kind,
                via.as_deref(),
            )
            .await
            .map_err(internal)?;
        if kind == IdentityKind::Node {
            lock(&self.seen).insert(enrolled.node_id.clone(), Instant::now());
        }
        tracing::info!(
            "{} {} enrolled as '{}'",
            kind.as_str(),
            enrolled.node_id,
            enrolled.name
        );
        Ok(Response::new(enrolled))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let node = self.node(&request).await?;
        self.guard.node_call(&node)?;
        let round = request.into_inner().round;
        let done = self.done(round, &node).await?;
        let view = self.view.borrow().clone();
        Ok(Response::new(HeartbeatResponse {
            keep_working: view.keep_working(&node, round, done),
            current_round: view.current_round(),
        }))
    }

    async fn pull_task(
        &self,
        request: Request<PullTaskRequest>,
    ) -> Result<Response<PullTaskResponse>, Status> {
        let node = self.node(&request).await?;
        self.guard.node_call(&node)?;
        let wait = Duration::from_millis(u64::from(request.into_inner().wait_ms)).min(MAX_WAIT);
        let give_up = tokio::time::Instant::now() + wait;
        let mut changed = self.subscribe();
        let outcome = loop {
            let asked = {
                let view = changed.borrow_and_update();
                view.round().filter(|_| view.train_nodes.contains(&node))
            };
            let done = match asked {
                Some(round) => self.done(round, &node).await?,
                None => false,
            };
            let work = changed.borrow().work_for(&node, done);
            match work {
                NodeWork::Task(task) => break Outcome::Task(*task),
                NodeWork::Finished(reason) => break Outcome::Finished(v1::Finished { reason }),
                NodeWork::Idle(reason) => {
                    let woke = tokio::time::timeout_at(give_up, changed.changed()).await;
                    if !matches!(woke, Ok(Ok(()))) {
                        break Outcome::Idle(v1::Idle {
                            retry_after_ms: 500,
                            reason,
                        });
                    }
                    lock(&self.seen).insert(node.clone(), Instant::now());
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
        self.caller(&request).await?;
        let DownloadRequest { hash, offset } = request.into_inner();
        if !self.view.borrow().cached.contains(&hash) {
            return Err(Status::not_found(format!(
                "blob {hash} is not a model this relay serves now; pull a new task"
            )));
        }
        let size = self.blobs.size(&hash).await.map_err(internal)?;
        if offset > size {
            return Err(Status::out_of_range(format!(
                "offset {offset} is past the end of blob {hash} ({size} bytes)"
            )));
        }
        let turn = self
            .transfers
            .for_download()
            .await
            .map_err(|_| Status::unavailable("the relay is shutting down"))?;
        let chunk = self.chunk_bytes();
        Ok(Response::new(chunk_stream(
            self.blobs.clone(),
            hash,
            offset..size,
            chunk,
            turn,
        )))
    }

    async fn upload(
        &self,
        request: Request<Streaming<UploadChunk>>,
    ) -> Result<Response<UploadReceipt>, Status> {
        let caller = self.caller(&request).await?;
        let sender = match &caller {
            Caller::Node(id) | Caller::Relay(id) => id.clone(),
        };
        let _slot = self.guard.upload_slot(&sender)?;
        // Without a turn, the upload is refused before its data is read: data waiting here
        // would fill the connection's flow-control window, which other nodes' uploads share.
        let _turn = self.transfers.for_upload_now(&sender).ok_or_else(|| {
            Status::unavailable("no transfer turn is free; ask for the upload's status again")
        })?;
        let mut chunks = request.into_inner();
        let mut staged: Option<(StagedUpload, (u32, u64, String), v1::Task)> = None;
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk?;
            if staged.is_none() {
                let task = match &caller {
                    Caller::Node(node) => self.expect_upload(node, &chunk).await?,
                    Caller::Relay(lower) => self.expect_partial(lower, &chunk).await?,
                };
                let Some(task) = task else {
                    return Ok(Response::new(receipt(chunk.total_bytes, true, true)));
                };
                let layout = self.layout(&task).await?;
                let limit = staged::max_update_bytes(&layout);
                if chunk.total_bytes > limit {
                    return Err(Status::resource_exhausted(format!(
                        "update of {} bytes exceeds the limit of {limit} for this model",
                        chunk.total_bytes
                    )));
                }
                let upload = StagedUpload::open(
                    &self.blobs,
                    chunk.round,
                    &sender,
                    &chunk.hash,
                    chunk.total_bytes,
                    self.guard.staged_bytes_per_node(limit),
                )
                .await
                .map_err(|e| Status::failed_precondition(e.to_string()))?;
                let header = (chunk.round, chunk.total_bytes, chunk.hash.clone());
                staged = Some((upload, header, task));
            }
            let Some((upload, header, task)) = staged.as_mut() else {
                continue;
            };
            staged::check_same_upload(header, (chunk.round, chunk.total_bytes, &chunk.hash))
                .map_err(Status::invalid_argument)?;
            if chunk.data.len() > task.max_chunk_bytes as usize {
                return Err(Status::resource_exhausted(format!(
                    "chunk of {} bytes exceeds the limit of {}",
                    chunk.data.len(),
                    task.max_chunk_bytes
                )));
            }
            upload
                .append(chunk.offset, &chunk.data)
                .await
                .map_err(|e| Status::failed_precondition(e.to_string()))?;
        }
        let Some((upload, (round, _, _), task)) = staged else {
            return Err(Status::invalid_argument("empty upload"));
        };
        if !upload.is_complete() {
            return Ok(Response::new(receipt(upload.have(), false, false)));
        }
        let total = upload.have();
        let verified = upload
            .finish()
            .await
            .map_err(|e| Status::data_loss(e.to_string()))?;
        let holding = match &caller {
            Caller::Node(node) => self.take_update(node, round, &task, verified).await?,
            Caller::Relay(lower) => self.take_partial(lower, round, &task, verified).await?,
        };
        Ok(Response::new(match holding {
            Holding::Fresh => receipt(total, true, false),
            Holding::Duplicate => receipt(total, true, true),
            Holding::CountedElsewhere(nodes) => UploadReceipt {
                not_counted: nodes,
                ..receipt(total, false, false)
            },
        }))
    }

    async fn upload_status(
        &self,
        request: Request<UploadStatusRequest>,
    ) -> Result<Response<UploadReceipt>, Status> {
        let caller = self.caller(&request).await?;
        let UploadStatusRequest { round, hash } = request.into_inner();
        let (sender, held, seen) = match caller {
            Caller::Node(node) => {
                let held = self.store.has(round, &node).await;
                (node, held, &self.seen)
            }
            Caller::Relay(lower) => {
                let held = self.store.holds(round, &lower, &hash).await;
                (lower, held, &self.relays_seen)
            }
        };
        if held.map_err(internal)? {
            return Ok(Response::new(receipt(0, true, true)));
        }
        // The upload comes next: it waits here, sending nothing, until it may (as at the
        // server; see `ferry_server::turns`), and its sender counts as online meanwhile.
        let give_up = tokio::time::Instant::now() + turns::RESERVATION_PATIENCE;
        while !self.transfers.reserve(&sender, RESERVE_BEAT).await
            && tokio::time::Instant::now() < give_up
        {
            lock(seen).insert(sender.clone(), Instant::now());
        }
        let have = match staged::held_upload(&self.blobs, round, &sender, &hash) {
            Some(path) => tokio::fs::metadata(&path).await.map_or(0, |m| m.len()),
            None => 0,
        };
        Ok(Response::new(receipt(have, false, false)))
    }

    async fn report_failure(
        &self,
        request: Request<FailureReport>,
    ) -> Result<Response<FailureAck>, Status> {
        let node = self.node(&request).await?;
        let report = request.into_inner();
        let round = report.round;
        let ack = self
            .upstream
            .fleet
            .clone()
            .report_failure(self.on_behalf(&node, report))
            .await?;
        lock(&self.gave_up).insert((round, node));
        self.flush.notify_one();
        Ok(ack)
    }

    async fn report_evaluation(
        &self,
        request: Request<EvaluationReport>,
    ) -> Result<Response<FailureAck>, Status> {
        let node = self.node(&request).await?;
        let report = request.into_inner();
        self.upstream
            .fleet
            .clone()
            .report_evaluation(self.on_behalf(&node, report))
            .await
    }

    async fn sec_agg(
        &self,
        request: Request<SecAggRequest>,
    ) -> Result<Response<SecAggResponse>, Status> {
        let node = self.node(&request).await?;
        let step = request.into_inner();
        self.upstream
            .fleet
            .clone()
            .sec_agg(self.on_behalf(&node, step))
            .await
    }
}
