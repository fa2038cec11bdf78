//! Model blobs, content-addressed by sha256, in an `object_store` (a local folder by default;
//! S3-compatible stores plug in through the same trait), plus the local staging folder where
//! uploads grow chunk by chunk until they are complete and verified.

use std::{
    ops::Range,
    path::{Path, PathBuf},
    sync::Arc,
};

use bytes::Bytes;
use ferry_core::model::sha256_hex;
use object_store::{ObjectStore, PutPayload, local::LocalFileSystem, path::Path as ObjectPath};

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

    /// Stores the verified upload `staged` (whose content is `bytes`, hashing to `sha256`):
    /// a local store takes the file by rename, without writing it again; otherwise, or across
    /// filesystems, the bytes are put.
    pub async fn adopt(
        &self,
        sha256: &str,
        staged: &Path,
        bytes: &[u8],
    ) -> Result<(), ServerError> {
        if self.size(sha256).await.is_ok() {
            return Ok(());
        }
        if let Some(dir) = &self.local {
            let target = dir.join(key(sha256).as_ref());
            let moved = match target.parent() {
                Some(parent) => tokio::fs::create_dir_all(parent).await.is_ok(),
                None => true,
            } && tokio::fs::rename(staged, &target).await.is_ok();
            if moved {
                return Ok(());
            }
        }
        self.put_hashed(sha256, bytes.to_vec()).await
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

    /// Bytes `range` of the blob.
    pub async fn range(&self, sha256: &str, range: Range<u64>) -> Result<Bytes, ServerError> {
        Ok(self.store.get_range(&key(sha256), range).await?)
    }

    /// The staging file of `node`'s upload for `round` with content hash `sha256`.
    pub fn staging_file(&self, round: u32, node: &str, sha256: &str) -> PathBuf {
        let safe = |s: &str| {
            s.chars()
                .filter(char::is_ascii_alphanumeric)
                .collect::<String>()
        };
        self.staging
            .join(format!("r{round}-{}-{}.part", safe(node), safe(sha256)))
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
                .staging_file(3, "../x", "ab/c")
                .starts_with(dir.path().join("uploads"))
        );
    }
}
