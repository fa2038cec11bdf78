//! Model blobs, content-addressed by sha256, in an `object_store` (a local folder by default;
//! S3-compatible stores plug in through the same trait), plus the local staging folder where
//! uploads grow chunk by chunk until they are complete and verified.

use std::{
    io::{Seek, SeekFrom, Write},
    ops::Range,
    path::{Path, PathBuf},
    sync::Arc,
};

use bytes::Bytes;
use ferry_core::model::{hex, sha256_hex};
use object_store::{ObjectStore, PutPayload, local::LocalFileSystem, path::Path as ObjectPath};
use sha2::{Digest, Sha256};

use crate::ServerError;

/// Where blobs live.
#[derive(Debug, Clone)]
pub struct Blobs {
    store: Arc<dyn ObjectStore>,
    staging: PathBuf,
    /// The store's folder when it is local, where a verified upload is moved in by rename.
    local: Option<PathBuf>,
}

fn key(sha256: &str) -> ObjectPath {
    ObjectPath::from(format!("sha256/{sha256}"))
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

    /// Stores `bytes` under their sha256 and returns it; storing the same bytes twice is a no-op.
    pub async fn put(&self, bytes: Vec<u8>) -> Result<String, ServerError> {
        let sha = sha256_hex(&bytes);
        self.put_hashed(&sha, bytes).await?;
        Ok(sha)
    }

    /// Stores `bytes` whose sha256 the caller has just verified to be `sha256` (a checked
    /// upload), without hashing them again.
    pub async fn put_hashed(&self, sha256: &str, bytes: Vec<u8>) -> Result<(), ServerError> {
        if self.size(sha256).await.is_err() {
            self.store
                .put(&key(sha256), PutPayload::from(bytes))
                .await?;
        }
        Ok(())
    }

    /// Removes blob `sha256` (retention); a blob already gone is not an error.
    pub async fn delete(&self, sha256: &str) -> Result<(), ServerError> {
        match self.store.delete(&key(sha256)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Stores the verified file `staged` (hashing to `sha256`): a local store takes the file
    /// by rename, without writing it again; otherwise, or across filesystems, its bytes are
    /// put.
    pub async fn adopt(&self, sha256: &str, staged: &Path) -> Result<(), ServerError> {
        if self.size(sha256).await.is_ok() {
            return Ok(());
        }
        if let Some(target) = self.local_path(sha256) {
            let moved = match target.parent() {
                Some(parent) => tokio::fs::create_dir_all(parent).await.is_ok(),
                None => true,
            } && tokio::fs::rename(staged, &target).await.is_ok();
            if moved {
                return Ok(());
            }
        }
        let bytes = tokio::fs::read(staged)
            .await
            .map_err(ServerError::io(format!("reading {}", staged.display())))?;
        self.put_hashed(sha256, bytes).await
    }

    /// Stores what `write` writes, a piece at a time through a staging file, and returns its
    /// sha256 and size: a model is stored without a second copy of it in memory.
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
            hasher: Sha256::new(),
            written: 0,
        };
        write(&mut out)?;
        out.inner
            .flush()
            .map_err(ServerError::io(format!("writing {}", path.display())))?;
        let sha = hex(&out.hasher.finalize());
        self.adopt(&sha, &path).await?;
        let _ = std::fs::remove_file(&path);
        Ok((sha, out.written))
    }

    /// Blob `sha256` as a file to read from, checked against its hash first (a corrupted blob
    /// is refused, not served or folded).
    pub async fn open(&self, sha256: &str) -> Result<std::fs::File, ServerError> {
        let corrupt = || {
            ServerError::Settings(format!(
                "blob {sha256} is corrupt (its content has another hash)"
            ))
        };
        let Some(path) = self.local_path(sha256) else {
            // A remote store: fetch it (checked) into a staging file.
            let bytes = self.get(sha256).await?;
            let path = self.staging.join(format!("fetched-{sha256}.part"));
            std::fs::write(&path, &bytes)
                .map_err(ServerError::io(format!("writing {}", path.display())))?;
            let file = std::fs::File::open(&path)
                .map_err(ServerError::io(format!("opening {}", path.display())))?;
            let _ = std::fs::remove_file(&path);
            return Ok(file);
        };
        let mut file = std::fs::File::open(&path)
            .map_err(ServerError::io(format!("opening blob {}", path.display())))?;
        let mut hasher = Sha256::new();
        std::io::copy(&mut file, &mut hasher).map_err(|_| corrupt())?;
        if hex(&hasher.finalize()) != sha256 {
            return Err(corrupt());
        }
        file.seek(SeekFrom::Start(0))
            .map_err(ServerError::io(format!("reading blob {}", path.display())))?;
        Ok(file)
    }

    /// The whole blob `sha256`, checked against its hash.
    pub async fn get(&self, sha256: &str) -> Result<Bytes, ServerError> {
        let bytes = self.store.get(&key(sha256)).await?.bytes().await?;
        if sha256_hex(&bytes) != sha256 {
            return Err(ServerError::Settings(format!(
                "blob {sha256} is corrupt (its content has another hash)"
            )));
        }
        Ok(bytes)
    }

    /// The blob's size in bytes.
    pub async fn size(&self, sha256: &str) -> Result<u64, ServerError> {
        Ok(self.store.head(&key(sha256)).await?.size)
    }

    /// Bytes `range` of the blob. A local store reads them on the calling thread (a chunk
    /// from the page cache takes well under a millisecond; a blocking-thread hop would copy it
    /// once more).
    pub async fn range(&self, sha256: &str, range: Range<u64>) -> Result<Bytes, ServerError> {
        let Some(path) = self.local_path(sha256) else {
            return Ok(self.store.get_range(&key(sha256), range).await?);
        };
        let mut bytes = vec![0u8; (range.end - range.start) as usize];
        std::fs::File::open(&path)
            .and_then(|file| {
                std::os::unix::fs::FileExt::read_exact_at(&file, &mut bytes, range.start)
            })
            .map_err(ServerError::io(format!("reading blob {}", path.display())))?;
        Ok(Bytes::from(bytes))
    }

    /// Where blob `sha256` lies when the store is a local folder.
    fn local_path(&self, sha256: &str) -> Option<PathBuf> {
        self.local
            .as_ref()
            .map(|dir| dir.join(key(sha256).as_ref()))
    }

    /// The folder of `node`'s unfinished uploads, its own so that one node's uploads never
    /// touch another's (see `staged` for the files in it).
    pub fn staging_dir(&self, node: &str) -> PathBuf {
        self.staging.join(format!("node-{}", safe_name(node)))
    }
}

/// `name` with everything but ASCII letters and digits left out, safe as part of a file name.
pub(crate) fn safe_name(name: &str) -> String {
    name.chars().filter(char::is_ascii_alphanumeric).collect()
}

/// A writer that hashes and counts what passes through it.
struct Hashing<W> {
    inner: W,
    hasher: Sha256,
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
        let sha = blobs.put(b"hello world".to_vec()).await.expect("put");
        assert_eq!(sha, sha256_hex(b"hello world"));
        assert_eq!(
            blobs.put(b"hello world".to_vec()).await.expect("again"),
            sha
        );
        assert_eq!(blobs.size(&sha).await.expect("size"), 11);
        assert_eq!(
            &blobs.range(&sha, 6..11).await.expect("range")[..],
            b"world"
        );
        assert_eq!(&blobs.get(&sha).await.expect("get")[..], b"hello world");
        assert!(blobs.get(&sha256_hex(b"other")).await.is_err());
        assert!(
            blobs
                .staging_dir("../x")
                .starts_with(dir.path().join("uploads"))
        );
    }

    #[tokio::test]
    async fn a_corrupted_blob_is_detected_by_its_hash() {
        let dir = tempfile::tempdir().expect("tempdir");
        let blobs = Blobs::local(&dir.path().join("blobs")).expect("blobs");
        let sha = blobs.put(b"the global model".to_vec()).await.expect("put");
        let path = blobs.local_path(&sha).expect("a local blob");
        let mut bytes = std::fs::read(&path).expect("stored");
        bytes[3] ^= 0x20;
        std::fs::write(&path, bytes).expect("bit rot");
        let read = blobs.get(&sha).await.expect_err("corrupt");
        assert!(read.to_string().contains("is corrupt"), "{read}");
        let opened = blobs.open(&sha).await.expect_err("corrupt");
        assert!(opened.to_string().contains("is corrupt"), "{opened}");
    }
}
