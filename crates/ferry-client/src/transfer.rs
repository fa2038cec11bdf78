//! Resumable transfers: downloads continue from the bytes already in their file, uploads from
//! the bytes the server says it holds, and both are checked against their content id. Neither holds
//! a whole copy of what it moves: a download goes to a file, an upload's chunks are produced
//! from the update on demand.

use std::{
    io::Write,
    path::{Path, PathBuf},
    sync::Arc,
};

use bytes::Bytes;
use ferry_core::{content::ContentHasher, update_file::EncodedUpdate};
use ferry_proto::v1::{
    DownloadRequest, UploadChunk, UploadReceipt, UploadStatusRequest, fleet_client::FleetClient,
};
use futures::StreamExt;
use tonic::Status;

use crate::{connection::StoredCredential, failover::Servers};

/// The file a download of blob `id` grows in, under `dir`.
pub fn download_path(dir: &Path, id: &str) -> PathBuf {
    let safe: String = id.chars().filter(char::is_ascii_alphanumeric).collect();
    dir.join(format!("{safe}.part"))
}

fn local(context: &str, e: std::io::Error) -> Status {
    Status::internal(format!("{context}: {e}"))
}

/// Continues downloading blob `id` of `size` bytes into the file `path` from the bytes it
/// already holds; returns once the blob is complete and verified. A broken stream returns the
/// error with the bytes so far kept, so the next call resumes; a blob whose bytes do not match
/// its hash is discarded.
pub async fn download(
    client: &mut FleetClient<Servers>,
    credential: &StoredCredential,
    id: &str,
    size: u64,
    path: &Path,
) -> Result<(), Status> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .open(path)
        .map_err(|e| local("opening the download file", e))?;
    // Bytes already held (a resumed download) are hashed once; new ones as they arrive.
    let mut hasher = ContentHasher::for_id(id);
    let mut have =
        std::io::copy(&mut file, &mut hasher).map_err(|e| local("reading the download file", e))?;
    if have > size {
        file.set_len(0)
            .map_err(|e| local("truncating the download file", e))?;
        (hasher, have) = (ContentHasher::for_id(id), 0);
    }
    if have < size {
        let request = credential.authorize(tonic::Request::new(DownloadRequest {
            hash: id.to_string(),
            offset: have,
        }));
        let mut stream = client.download(request).await?.into_inner();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            if chunk.offset != have {
                return Err(Status::data_loss("download chunk out of order"));
            }
            file.write_all(&chunk.data)
                .map_err(|e| local("writing the download file", e))?;
            hasher.update(&chunk.data);
            have += chunk.data.len() as u64;
        }
    }
    if have < size {
        return Err(Status::unavailable("download ended early"));
    }
    if hasher.finish() != id {
        drop(file);
        let _ = std::fs::remove_file(path);
        return Err(Status::data_loss(
            "downloaded bytes do not match their content id; starting over",
        ));
    }
    Ok(())
}

/// What an upload sends: bytes read at any offset, so a resumed upload starts mid-way and no
/// chunk list is built up front.
pub trait UploadBody: Send + Sync {
    /// Total bytes.
    fn total(&self) -> u64;

    /// The content id of all the bytes (see `ferry_core::content`).
    fn content_id(&self) -> String;

    /// Fills `out` from `offset`; returns how many bytes it filled.
    fn read_at(&self, offset: u64, out: &mut [u8]) -> usize;
}

impl UploadBody for Bytes {
    fn total(&self) -> u64 {
        self.len() as u64
    }

    fn content_id(&self) -> String {
        ferry_core::content::content_id(self)
    }

    fn read_at(&self, offset: u64, out: &mut [u8]) -> usize {
        let from = self.get(offset as usize..).unwrap_or_default();
        let n = from.len().min(out.len());
        out[..n].copy_from_slice(&from[..n]);
        n
    }
}

impl UploadBody for EncodedUpdate {
    fn total(&self) -> u64 {
        self.len()
    }

    fn content_id(&self) -> String {
        EncodedUpdate::content_id(self)
    }

    fn read_at(&self, offset: u64, out: &mut [u8]) -> usize {
        EncodedUpdate::read_at(self, offset, out)
    }
}

/// Uploads `body` (whose content id is `id`) as this node's update for `round`, continuing from
/// what the server already holds. Returns the server's receipt once the update is accepted (or
/// known as a duplicate), or, for a relay's partial aggregate, once the server names the
/// contributors it cannot count.
pub async fn upload(
    client: &mut FleetClient<Servers>,
    credential: &StoredCredential,
    round: u32,
    body: &Arc<dyn UploadBody>,
    id: &str,
    chunk_bytes: usize,
) -> Result<UploadReceipt, Status> {
    let status = client
        .upload_status(
            credential.authorize(tonic::Request::new(UploadStatusRequest {
                round,
                hash: id.to_string(),
            })),
        )
        .await?
        .into_inner();
    if status.accepted {
        return Ok(status);
    }
    let total = body.total();
    let start = status.received_bytes.min(total);
    let chunks = futures::stream::iter(Chunks {
        body: body.clone(),
        id: id.to_string(),
        round,
        total,
        chunk_bytes: chunk_bytes.max(1) as u64,
        next: Some(start),
    });
    let request = credential.authorize(tonic::Request::new(chunks));
    let receipt = client.upload(request).await?.into_inner();
    // A relay's partial that names nodes the server cannot count through it: the caller
    // sends it again without them.
    if !receipt.accepted && receipt.not_counted.is_empty() {
        return Err(Status::unavailable(format!(
            "server holds {} of {total} bytes; resuming",
            receipt.received_bytes
        )));
    }
    Ok(receipt)
}

/// An upload's chunks from an offset, each read from the body when the stream asks for it.
struct Chunks {
    body: Arc<dyn UploadBody>,
    id: String,
    round: u32,
    total: u64,
    chunk_bytes: u64,
    /// Where the next chunk starts; `None` once the last was produced (at least one is: an
    /// upload staged whole but never finalised needs an empty closing chunk).
    next: Option<u64>,
}

impl Iterator for Chunks {
    type Item = UploadChunk;

    fn next(&mut self) -> Option<UploadChunk> {
        let offset = self.next?;
        let mut data = vec![0u8; self.chunk_bytes.min(self.total - offset) as usize];
        let filled = self.body.read_at(offset, &mut data);
        data.truncate(filled);
        let end = offset + filled as u64;
        self.next = (end < self.total && filled > 0).then_some(end);
        Some(UploadChunk {
            round: self.round,
            offset,
            data: Bytes::from(data),
            total_bytes: self.total,
            hash: self.id.clone(),
        })
    }
}
