//! A node's upload while it grows: chunks are appended to a staging file only at the offset
//! the server holds, hashed as they arrive (a resumed upload hashes what it already has once),
//! and a complete upload whose hash matches is read from that file a piece at a time and moved
//! into the blob store, never written twice nor held whole in memory.

use std::{
    io::{BufReader, Write},
    path::PathBuf,
};

use ferry_core::{CoreError, ModelLayout, model::hex, update_file::UpdateFile};
use sha2::{Digest, Sha256};

use crate::blobs::Blobs;

/// Why a chunk or a finished upload was refused, for the gRPC status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StageError {
    /// The chunk does not continue at the held offset; the node should ask and resume.
    WrongOffset {
        /// Bytes the server holds.
        have: u64,
        /// Where the chunk claimed to start.
        offset: u64,
    },
    /// The chunk runs past the announced size.
    PastTotal,
    /// The complete bytes do not hash to the announced sha256; the upload starts again.
    HashMismatch,
    /// The staging file could not be read or written.
    Io(String),
}

impl std::fmt::Display for StageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::WrongOffset { have, offset } => write!(
                f,
                "upload continues at byte {have}, not {offset}; ask UploadStatus and resume there"
            ),
            Self::PastTotal => write!(f, "chunk runs past total_bytes"),
            Self::HashMismatch => write!(
                f,
                "the uploaded bytes do not match the announced sha256; upload again from byte 0"
            ),
            Self::Io(e) => write!(f, "{e}"),
        }
    }
}

/// An upload being received: its staging file, how much it holds, and the running hash.
pub struct StagedUpload {
    file: std::fs::File,
    path: PathBuf,
    have: u64,
    total: u64,
    sha256: String,
    hasher: Sha256,
}

fn io(context: &'static str) -> impl Fn(std::io::Error) -> StageError {
    move |e| StageError::Io(format!("{context}: {e}"))
}

impl StagedUpload {
    /// Opens (or resumes) `node`'s upload for `round` of `total` bytes hashing to `sha256`.
    pub async fn open(
        blobs: &Blobs,
        round: u32,
        node: &str,
        sha256: &str,
        total: u64,
    ) -> Result<Self, StageError> {
        let path = blobs.staging_file(round, node, sha256);
        let mut hasher = Sha256::new();
        // Plain file calls on the calling thread: a chunk goes to the page cache in well under a
        // millisecond, and a hop to a blocking thread would copy it once more.
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&path)
            .map_err(io("opening the staged upload"))?;
        // A resumed upload: hash what is already held, once.
        let have =
            std::io::copy(&mut file, &mut hasher).map_err(io("reading the staged upload"))?;
        Ok(Self {
            file,
            path,
            have,
            total,
            sha256: sha256.to_string(),
            hasher,
        })
    }

    /// Bytes held so far.
    pub fn have(&self) -> u64 {
        self.have
    }

    /// Whether every announced byte has arrived.
    pub fn is_complete(&self) -> bool {
        self.have >= self.total
    }

    /// Appends `data`, which must start at `offset` = the bytes held.
    pub async fn append(&mut self, offset: u64, data: &[u8]) -> Result<(), StageError> {
        if offset != self.have {
            return Err(StageError::WrongOffset {
                have: self.have,
                offset,
            });
        }
        if self.have + data.len() as u64 > self.total {
            return Err(StageError::PastTotal);
        }
        // Written through before the next chunk: an UploadStatus after a cut sees every byte.
        self.file
            .write_all(data)
            .map_err(io("writing the staged upload"))?;
        self.hasher.update(data);
        self.have += data.len() as u64;
        Ok(())
    }

    /// The complete upload, checked against its hash; a mismatch discards the file.
    pub async fn finish(self) -> Result<Verified, StageError> {
        drop(self.file);
        let hash = hex(&self.hasher.finalize());
        if hash != self.sha256 {
            let _ = tokio::fs::remove_file(&self.path).await;
            return Err(StageError::HashMismatch);
        }
        Ok(Verified {
            path: self.path,
            sha256: self.sha256,
        })
    }
}

/// A complete upload whose bytes hash to what the node announced, in its staging file.
pub struct Verified {
    path: PathBuf,
    sha256: String,
}

impl Verified {
    /// The verified content hash.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// The upload as an update of the model `layout`, read from its file on demand. The open
    /// file stays readable after [`Verified::keep`] moves it.
    pub fn open_update(
        &self,
        layout: &ModelLayout,
    ) -> Result<UpdateFile<BufReader<std::fs::File>>, CoreError> {
        let file = std::fs::File::open(&self.path)
            .map_err(|e| CoreError::Io(format!("opening the staged upload: {e}")))?;
        UpdateFile::open(BufReader::new(file), layout)
    }

    /// The upload's bytes, for inputs that are used whole (a secure round's masked input).
    pub async fn read(&self) -> Result<Vec<u8>, StageError> {
        tokio::fs::read(&self.path)
            .await
            .map_err(io("reading the staged upload"))
    }

    /// Moves the staging file into the blob store under its hash (a rename where the store is
    /// a local folder).
    pub async fn keep(&self, blobs: &Blobs) -> Result<(), crate::ServerError> {
        blobs.adopt(&self.sha256, &self.path).await
    }
}

impl Drop for Verified {
    /// The staging file is consumed either way: kept in the blob store, or refused.
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use ferry_core::model::sha256_hex;

    use super::*;

    #[tokio::test]
    async fn an_upload_resumes_at_the_held_offset_and_is_verified_once_complete() {
        let dir = tempfile::tempdir().expect("tempdir");
        let blobs = Blobs::local(&dir.path().join("blobs")).expect("blobs");
        let bytes: Vec<u8> = (0..100u8).collect();
        let sha = sha256_hex(&bytes);
        let mut first = StagedUpload::open(&blobs, 1, "n1", &sha, 100)
            .await
            .expect("open");
        first.append(0, &bytes[..40]).await.expect("chunk");
        assert_eq!(
            first.append(10, &bytes[10..20]).await,
            Err(StageError::WrongOffset {
                have: 40,
                offset: 10
            })
        );
        drop(first);
        // The connection broke; the node resumes where the server's file ends.
        let mut again = StagedUpload::open(&blobs, 1, "n1", &sha, 100)
            .await
            .expect("open");
        assert_eq!(again.have(), 40);
        assert_eq!(again.append(40, &[0; 61]).await, Err(StageError::PastTotal));
        again.append(40, &bytes[40..]).await.expect("rest");
        assert!(again.is_complete());
        let verified = again.finish().await.expect("hash matches");
        assert_eq!(verified.read().await.expect("read"), bytes);
        verified.keep(&blobs).await.expect("kept");
        drop(verified);
        assert_eq!(&blobs.get(&sha).await.expect("stored")[..], &bytes[..]);
        assert!(
            !blobs.staging_file(1, "n1", &sha).exists(),
            "moved, not copied"
        );

        let mut wrong = StagedUpload::open(&blobs, 2, "n1", &sha, 3)
            .await
            .expect("open");
        wrong.append(0, b"abc").await.expect("chunk");
        assert!(matches!(
            wrong.finish().await,
            Err(StageError::HashMismatch)
        ));
        assert!(
            !blobs.staging_file(2, "n1", &sha).exists(),
            "a bad upload starts over"
        );
    }
}
