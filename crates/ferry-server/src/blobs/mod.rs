//! Model blobs, named by their content id (BLAKE3; see `ferry_core::content`), in an
//! `object_store`: a local folder by default, or an S3-compatible bucket ([`s3`]); plus the
//! local staging folder where uploads grow chunk by chunk until they are complete and
//! verified. New blobs lie under `blake3/`; blobs that a store written before BLAKE3 holds stay
//! under `sha256/`, read and checked by that hash.
//!
//! A remote store is written a part at a time (multipart uploads for large blobs), read by
//! ranges for downloads, and read whole only into a private temporary file, hashed as it
//! arrives: a corrupted or truncated object is never folded.

use std::{
    io::{Seek, SeekFrom, Write},
    ops::Range,
    path::{Path, PathBuf},
    sync::Arc,
};

use bytes::Bytes;
use ferry_core::content::{self, ContentHasher, LEGACY_SHA256};
use futures::StreamExt;
use object_store::{
    ObjectStore, PutPayload, buffered::BufWriter, local::LocalFileSystem, path::Path as ObjectPath,
};
use tokio::io::AsyncWriteExt;

use crate::ServerError;

pub mod s3;

/// The part size of multipart uploads to a remote store (S3 asks at least 5 MiB of every part
/// but the last), and the size below which a blob goes in one PUT.
const PART_BYTES: usize = 16 << 20;

/// Parts of one blob in flight to a remote store at once.
const PARTS_IN_FLIGHT: usize = 4;

/// Where blobs live.
#[derive(Debug, Clone)]
pub struct Blobs {
    store: Arc<dyn ObjectStore>,
    staging: PathBuf,
    /// The store's folder when it is local, where a verified upload is moved in by rename.
    local: Option<PathBuf>,
}

/// Where blob `id` lies in the object store.
fn key(id: &str) -> ObjectPath {
    match id.strip_prefix(LEGACY_SHA256) {
        Some(digits) => ObjectPath::from(format!("sha256/{digits}")),
        None => ObjectPath::from(format!("blake3/{id}")),
    }
}

/// The error for a blob whose bytes are not what its id names.
fn corrupt(id: &str) -> ServerError {
    ServerError::Settings(format!(
        "blob {id} is corrupt (its content has another hash)"
    ))
}

impl Blobs {
    /// Blobs in the local folder `dir`, with uploads staged in `dir/../uploads`.
    pub fn local(dir: &Path) -> Result<Self, ServerError> {
        std::fs::create_dir_all(dir)
            .map_err(ServerError::io(format!("creating {}", dir.display())))?;
        let staging = dir.parent().unwrap_or(dir).join("uploads");
        std::fs::create_dir_all(&staging)
            .map_err(ServerError::io(format!("creating {}", staging.display())))?;
        let store = LocalFileSystem::new_with_prefix(dir)?;
        Ok(Self {
            store: Arc::new(store),
            staging,
            local: Some(dir.to_path_buf()),
        })
    }

    /// The blob store at `location`: `s3://BUCKET/PREFIX` (reached with `s3`'s settings), or a
    /// local folder. `staging` is the local folder where uploads grow until verified; a local
    /// store keeps it beside the blobs instead.
    pub fn at(location: &str, s3: &s3::S3Settings, staging: &Path) -> Result<Self, ServerError> {
        if s3::parse(location).is_none() {
            return Self::local(Path::new(location));
        }
        Self::remote(s3::open(location, s3)?, staging)
    }

    /// Blobs in `store`, a remote object store, with uploads staged in the local folder
    /// `staging`.
    pub fn remote(store: Arc<dyn ObjectStore>, staging: &Path) -> Result<Self, ServerError> {
        std::fs::create_dir_all(staging)
            .map_err(ServerError::io(format!("creating {}", staging.display())))?;
        Ok(Self {
            store,
            staging: staging.to_path_buf(),
            local: None,
        })
    }

    /// Stores `bytes` under their content id and returns it; storing the same bytes twice is a
    /// no-op.
    pub async fn put(&self, bytes: Vec<u8>) -> Result<String, ServerError> {
        let id = content::content_id(&bytes);
        self.put_hashed(&id, bytes).await?;
        Ok(id)
    }

    /// Stores `bytes` whose content id the caller has just verified to be `id` (a checked
    /// upload), without hashing them again.
    pub async fn put_hashed(&self, id: &str, bytes: Vec<u8>) -> Result<(), ServerError> {
        if self.size(id).await.is_ok() {
            return Ok(());
        }
        if self.local.is_some() || bytes.len() <= PART_BYTES {
            self.store.put(&key(id), PutPayload::from(bytes)).await?;
            return Ok(());
        }
        let mut writer = self.writer(id);
        writer.put(Bytes::from(bytes)).await?;
        writer.shutdown().await.map_err(remote_write(id))
    }

    /// A writer of blob `id` to the store, in parts once it outgrows one.
    fn writer(&self, id: &str) -> BufWriter {
        BufWriter::with_capacity(self.store.clone(), key(id), PART_BYTES)
            .with_max_concurrency(PARTS_IN_FLIGHT)
    }

    /// Removes blob `id` (retention); a blob already gone is not an error.
    pub async fn delete(&self, id: &str) -> Result<(), ServerError> {
        match self.store.delete(&key(id)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Stores the verified file `staged` (whose content id is `id`): a local store takes the
    /// file by rename, without writing it again; otherwise, or across filesystems, its bytes
    /// are put.
    pub async fn adopt(&self, id: &str, staged: &Path) -> Result<(), ServerError> {
        if self.size(id).await.is_ok() {
            return Ok(());
        }
        if let Some(target) = self.local_path(id) {
            let moved = match target.parent() {
                Some(parent) => tokio::fs::create_dir_all(parent).await.is_ok(),
                None => true,
            } && tokio::fs::rename(staged, &target).await.is_ok();
            if moved {
                return Ok(());
            }
        }
        let mut file = tokio::fs::File::open(staged)
            .await
            .map_err(ServerError::io(format!("reading {}", staged.display())))?;
        let mut writer = self.writer(id);
        tokio::io::copy(&mut file, &mut writer)
            .await
            .map_err(remote_write(id))?;
        writer.shutdown().await.map_err(remote_write(id))
    }

    /// Stores what `write` writes, a piece at a time through a staging file, and returns its
    /// content id and size: a model is stored without a second copy of it in memory.
    pub async fn put_written(
        &self,
        write: impl FnOnce(&mut dyn Write) -> Result<(), ServerError>,
    ) -> Result<(String, u64), ServerError> {
        static WRITTEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = WRITTEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = self
            .staging
            .join(format!("written-{}-{n}.part", std::process::id()));
        let file = std::fs::File::create(&path)
            .map_err(ServerError::io(format!("creating {}", path.display())))?;
        let mut out = Hashing {
            inner: std::io::BufWriter::with_capacity(1 << 20, file),
            hasher: ContentHasher::new(),
            written: 0,
        };
        write(&mut out)?;
        out.inner
            .flush()
            .map_err(ServerError::io(format!("writing {}", path.display())))?;
        let id = out.hasher.finish();
        self.adopt(&id, &path).await?;
        let _ = std::fs::remove_file(&path);
        Ok((id, out.written))
    }

    /// Blob `id` as a file to read from, checked against its id first (a corrupted blob is
    /// refused, not served or folded).
    pub async fn open(&self, id: &str) -> Result<std::fs::File, ServerError> {
        let Some(path) = self.local_path(id) else {
            return self.fetch(id).await;
        };
        let mut file = std::fs::File::open(&path)
            .map_err(ServerError::io(format!("opening blob {}", path.display())))?;
        let mut hasher = ContentHasher::for_id(id);
        std::io::copy(&mut file, &mut hasher).map_err(|_| corrupt(id))?;
        if hasher.finish() != id {
            return Err(corrupt(id));
        }
        file.seek(SeekFrom::Start(0))
            .map_err(ServerError::io(format!("reading blob {}", path.display())))?;
        Ok(file)
    }

    /// Remote blob `id` in a temporary file of this call's own (gone once closed), hashed as
    /// it arrives and refused unless it is what `id` names.
    async fn fetch(&self, id: &str) -> Result<std::fs::File, ServerError> {
        let staging = self.staging.clone();
        let file = tokio::task::spawn_blocking(move || tempfile::tempfile_in(&staging))
            .await
            .map_err(|e| ServerError::Settings(format!("creating a temporary file: {e}")))?
            .map_err(ServerError::io(format!(
                "creating a temporary file in {}",
                self.staging.display()
            )))?;
        let mut out = tokio::io::BufWriter::with_capacity(1 << 20, tokio::fs::File::from_std(file));
        let mut hasher = ContentHasher::for_id(id);
        let mut chunks = self.store.get(&key(id)).await?.into_stream();
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk?;
            hasher.update(&chunk);
            out.write_all(&chunk)
                .await
                .map_err(ServerError::io(format!("staging blob {id}")))?;
        }
        out.flush()
            .await
            .map_err(ServerError::io(format!("staging blob {id}")))?;
        if hasher.finish() != id {
            return Err(corrupt(id));
        }
        let mut file = out.into_inner().into_std().await;
        file.seek(SeekFrom::Start(0))
            .map_err(ServerError::io(format!("reading blob {id}")))?;
        Ok(file)
    }

    /// The whole blob `id`, checked against its id.
    pub async fn get(&self, id: &str) -> Result<Bytes, ServerError> {
        let bytes = self.store.get(&key(id)).await?.bytes().await?;
        if !content::matches(id, &bytes) {
            return Err(corrupt(id));
        }
        Ok(bytes)
    }

    /// The blob's size in bytes.
    pub async fn size(&self, id: &str) -> Result<u64, ServerError> {
        Ok(self.store.head(&key(id)).await?.size)
    }

    /// Bytes `range` of the blob. A local store reads them on the calling thread (a chunk
    /// from the page cache takes well under a millisecond; a blocking-thread hop would copy it
    /// once more).
    pub async fn range(&self, id: &str, range: Range<u64>) -> Result<Bytes, ServerError> {
        let Some(path) = self.local_path(id) else {
            return Ok(self.store.get_range(&key(id), range).await?);
        };
        let mut bytes = vec![0u8; (range.end - range.start) as usize];
        std::fs::File::open(&path)
            .and_then(|file| {
                std::os::unix::fs::FileExt::read_exact_at(&file, &mut bytes, range.start)
            })
            .map_err(ServerError::io(format!("reading blob {}", path.display())))?;
        Ok(Bytes::from(bytes))
    }

    /// Where blob `id` lies when the store is a local folder.
    fn local_path(&self, id: &str) -> Option<PathBuf> {
        self.local.as_ref().map(|dir| dir.join(key(id).as_ref()))
    }

    /// The folder of `node`'s unfinished uploads, its own so that one node's uploads never
    /// touch another's (see `staged` for the files in it).
    pub fn staging_dir(&self, node: &str) -> PathBuf {
        self.staging.join(format!("node-{}", safe_name(node)))
    }
}

/// The error for a blob that could not be written to a remote store.
fn remote_write(id: &str) -> impl FnOnce(std::io::Error) -> ServerError {
    ServerError::io(format!("writing blob {id} to the blob store"))
}

/// `name` with everything but ASCII letters and digits left out, safe as part of a file name.
pub(crate) fn safe_name(name: &str) -> String {
    name.chars().filter(char::is_ascii_alphanumeric).collect()
}

/// A writer that hashes and counts what passes through it.
struct Hashing<W> {
    inner: W,
    hasher: ContentHasher,
    written: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn blobs_are_content_addressed_and_ranged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let blobs = Blobs::local(&dir.path().join("blobs")).expect("open");
        let id = blobs.put(b"hello world".to_vec()).await.expect("put");
        assert_eq!(id, content::content_id(b"hello world"));
        assert!(dir.path().join(format!("blobs/blake3/{id}")).is_file());
        assert_eq!(blobs.put(b"hello world".to_vec()).await.expect("again"), id);
        assert_eq!(blobs.size(&id).await.expect("size"), 11);
        assert_eq!(&blobs.range(&id, 6..11).await.expect("range")[..], b"world");
        assert_eq!(&blobs.get(&id).await.expect("get")[..], b"hello world");
        assert!(blobs.get(&content::content_id(b"other")).await.is_err());
        assert!(
            blobs
                .staging_dir("../x")
                .starts_with(dir.path().join("uploads"))
        );
    }

    /// A blob folder written before BLAKE3 (`sha256/<hex>`) is still read, and checked with
    /// SHA-256, under its legacy id.
    #[tokio::test]
    async fn blobs_named_by_sha256_before_blake3_are_read_and_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let folder = dir.path().join("blobs");
        let digits = ferry_core::model::sha256_hex(b"an old model");
        std::fs::create_dir_all(folder.join("sha256")).expect("folder");
        std::fs::write(folder.join(format!("sha256/{digits}")), b"an old model").expect("old blob");
        let blobs = Blobs::local(&folder).expect("open");
        let id = format!("{LEGACY_SHA256}{digits}");
        assert_eq!(&blobs.get(&id).await.expect("get")[..], b"an old model");
        let mut file = blobs.open(&id).await.expect("open");
        let mut read = String::new();
        std::io::Read::read_to_string(&mut file, &mut read).expect("read");
        assert_eq!(read, "an old model");
        std::fs::write(folder.join(format!("sha256/{digits}")), b"an old modeL").expect("rot");
        assert!(blobs.get(&id).await.is_err());
        assert!(blobs.open(&id).await.is_err());
    }

    #[tokio::test]
    async fn a_corrupted_blob_is_detected_by_its_hash() {
        let dir = tempfile::tempdir().expect("tempdir");
        let blobs = Blobs::local(&dir.path().join("blobs")).expect("blobs");
        let id = blobs.put(b"the global model".to_vec()).await.expect("put");
        let path = blobs.local_path(&id).expect("a local blob");
        let mut bytes = std::fs::read(&path).expect("stored");
        bytes[3] ^= 0x20;
        std::fs::write(&path, bytes).expect("bit rot");
        let read = blobs.get(&id).await.expect_err("corrupt");
        assert!(read.to_string().contains("is corrupt"), "{read}");
        let opened = blobs.open(&id).await.expect_err("corrupt");
        assert!(opened.to_string().contains("is corrupt"), "{opened}");
    }
}
