//! Resumable transfers: downloads continue from the bytes already held, uploads from the bytes
//! the server says it holds, and both are checked against their sha256.

use bytes::Bytes;
use ferry_core::model::sha256_hex;
use ferry_proto::v1::{
    DownloadRequest, UploadChunk, UploadReceipt, UploadStatusRequest, fleet_client::FleetClient,
};
use futures::StreamExt;
use tonic::{Status, transport::Channel};

use crate::connection::StoredCredential;

/// Continues downloading blob `sha256` into `buffer` from `buffer.len()`; returns once the blob
/// is complete and verified. A broken stream returns the error with the bytes so far kept, so
/// the next call resumes.
pub async fn download(
    client: &mut FleetClient<Channel>,
    credential: &StoredCredential,
    sha256: &str,
    size: u64,
    buffer: &mut Vec<u8>,
) -> Result<(), Status> {
    if (buffer.len() as u64) < size {
        let request = credential.authorize(tonic::Request::new(DownloadRequest {
            sha256: sha256.to_string(),
            offset: buffer.len() as u64,
        }));
        let mut stream = client.download(request).await?.into_inner();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            if chunk.offset != buffer.len() as u64 {
                return Err(Status::data_loss("download chunk out of order"));
            }
            buffer.extend_from_slice(&chunk.data);
        }
    }
    if (buffer.len() as u64) < size {
        return Err(Status::unavailable("download ended early"));
    }
    if sha256_hex(buffer) != sha256 {
        buffer.clear();
        return Err(Status::data_loss(
            "downloaded bytes do not match their sha256; starting over",
        ));
    }
    Ok(())
}

/// Uploads `bytes` as this node's update for `round`, continuing from what the server already
/// holds. Returns the server's receipt once the update is accepted (or known as a duplicate).
pub async fn upload(
    client: &mut FleetClient<Channel>,
    credential: &StoredCredential,
    round: u32,
    bytes: &Bytes,
    chunk_bytes: usize,
) -> Result<UploadReceipt, Status> {
    let sha256 = sha256_hex(bytes);
    let status = client
        .upload_status(
            credential.authorize(tonic::Request::new(UploadStatusRequest {
                round,
                sha256: sha256.clone(),
            })),
        )
        .await?
        .into_inner();
    if status.accepted {
        return Ok(status);
    }
    let start = (status.received_bytes as usize).min(bytes.len());
    let total = bytes.len() as u64;
    let chunk_bytes = chunk_bytes.max(1);
    let mut chunks: Vec<UploadChunk> = (start..bytes.len())
        .step_by(chunk_bytes)
        .map(|offset| UploadChunk {
            round,
            offset: offset as u64,
            data: bytes.slice(offset..(offset + chunk_bytes).min(bytes.len())),
            total_bytes: total,
            sha256: sha256.clone(),
        })
        .collect();
    if chunks.is_empty() {
        // Everything is staged but was never finalised: send an empty closing chunk.
        chunks.push(UploadChunk {
            round,
            offset: total,
            data: Bytes::new(),
            total_bytes: total,
            sha256: sha256.clone(),
        });
    }
    let request = credential.authorize(tonic::Request::new(futures::stream::iter(chunks)));
    let receipt = client.upload(request).await?.into_inner();
    if !receipt.accepted {
        return Err(Status::unavailable(format!(
            "server holds {} of {total} bytes; resuming",
            receipt.received_bytes
        )));
    }
    Ok(receipt)
}
