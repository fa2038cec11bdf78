//! A node's upload while it grows: chunks are appended to a staging file only at the offset
//! the server holds, hashed as they arrive (a resumed upload hashes what it already has once),
//! and a complete upload whose hash matches is read from that file a piece at a time and moved
//! into the blob store, never written twice nor held whole in memory.

use std::{
    io::{BufReader, Write},
    path::{Path, PathBuf},
};

use ferry_core::{CoreError, ModelLayout, content::ContentHasher, update_file::UpdateFile};

use crate::blobs::{Blobs, safe_name};

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
    /// The complete bytes do not hash to the announced content id; the upload starts again.
    HashMismatch,
    /// The upload is larger than what the server keeps for one node.
    OverNodeCap {
        /// The upload's size.
        total: u64,
        /// Bytes of unfinished uploads kept per node.
        cap: u64,
    },
    /// The disk under the staging folder is full; the node should try again later.
    DiskFull,
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
                "the uploaded bytes do not match the announced hash; upload again from byte 0"
            ),
            Self::OverNodeCap { total, cap } => write!(
                f,
                "an upload of {total} bytes is more than the {cap} bytes of unfinished uploads \
                 this server keeps per node; ask the operator to raise [limits] staged-bytes-per-node"
            ),
            Self::DiskFull => write!(
                f,
                "the server's disk is full and cannot take this upload now; the node tries \
                 again (operator: free space under the blob store)"
            ),
            Self::Io(e) => write!(f, "{e}"),
        }
    }
}

/// One staging file's name, `r<round>-<sequence>-<hash>.part`: the sequence number counts
/// the node's uploads within the round, so the oldest is known from what the server wrote,
/// not from file times (which two uploads in one clock tick share).
#[derive(Debug, PartialEq, Eq)]
struct StagingName {
    round: u32,
    sequence: u64,
    hash: String,
}

impl StagingName {
    /// The name's parts; a name from before sequence numbers (`r<round>-<hash>.part`, which
    /// releases before BLAKE3 wrote) parses with sequence 0, so that it is discarded with its
    /// round like any other rather than left behind for ever.
    fn parse(name: &str) -> Option<Self> {
        let rest = name.strip_prefix('r')?.strip_suffix(".part")?;
        let (round, rest) = rest.split_once('-')?;
        let (sequence, hash) = match rest.split_once('-') {
            Some((sequence, hash)) => (sequence.parse().ok()?, hash),
            None if rest.len() == 64 && rest.bytes().all(|b| b.is_ascii_hexdigit()) => (0, rest),
            None => return None,
        };
        Some(Self {
            round: round.parse().ok()?,
            sequence,
            hash: hash.to_string(),
        })
    }

    fn file_name(&self) -> String {
        format!("r{}-{:010}-{}.part", self.round, self.sequence, self.hash)
    }
}

/// The node's unfinished uploads held in `dir`, as (name, bytes, path); none when the folder
/// does not exist yet. Files of another shape are not the server's and are left alone.
fn held_uploads(dir: &Path) -> std::io::Result<Vec<(StagingName, u64, PathBuf)>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut held = Vec::new();
    for entry in entries {
        let entry = entry?;
        if let Some(name) = StagingName::parse(&entry.file_name().to_string_lossy()) {
            held.push((name, entry.metadata()?.len(), entry.path()));
        }
    }
    Ok(held)
}

/// The largest upload a node may send for a model of `layout`: an update with every extra,
/// plus header room. The server and a relay hold uploads to it alike.
pub fn max_update_bytes(layout: &ModelLayout) -> u64 {
    let tensors = layout.specs().len() as u64;
    2 * 4 * layout.num_params() as u64 + 256 * tensors * 2 + 64 * 1024
}

/// Room a relay's upload has beyond a node's: a partial aggregate's or masked sum's list of
/// contributors (tens of thousands of node ids).
pub const PARTIAL_HEADER_ROOM: u64 = 8 << 20;

/// Refuses an update's content id unless it is a BLAKE3 id (updates are never named by the
/// SHA-256 of stores written before BLAKE3), saying what is expected.
pub fn check_update_id(id: &str) -> Result<(), &'static str> {
    if ferry_core::content::is_valid(id) && !id.starts_with(ferry_core::content::LEGACY_SHA256) {
        Ok(())
    } else {
        Err("hash must be the update's BLAKE3 hash as 64 lowercase hex digits")
    }
}

/// Refuses a chunk that does not continue the upload its first chunk began.
pub fn check_same_upload(
    first: &(u32, u64, String),
    chunk: (u32, u64, &str),
) -> Result<(), &'static str> {
    if (first.0, first.1, first.2.as_str()) == chunk {
        Ok(())
    } else {
        Err("round, total_bytes and hash must be the same in every chunk of an upload")
    }
}

/// The staging file that holds `node`'s unfinished upload for `round` with content id `id`,
/// if the server has one.
pub fn held_upload(blobs: &Blobs, round: u32, node: &str, id: &str) -> Option<PathBuf> {
    let hash = safe_name(id);
    held_uploads(&blobs.staging_dir(node))
        .ok()?
        .into_iter()
        .find(|(name, _, _)| name.round == round && name.hash == hash)
        .map(|(_, _, path)| path)
}

/// Finds the staging file in `dir` for the upload of `round` hashing to `hash`, or names a
/// new one after the round's newest; discards the node's uploads of other rounds, then the
/// oldest of this round's others until they and `total` more bytes fit in `cap`.
fn make_room(dir: &Path, round: u32, hash: &str, total: u64, cap: u64) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let mut this_round = Vec::new();
    let mut resumed = None;
    for (name, len, path) in held_uploads(dir)? {
        if name.round != round {
            discard(&path);
        } else if name.hash == hash {
            resumed = Some(path);
        } else {
            this_round.push((name.sequence, len, path));
        }
    }
    this_round.sort();
    let next = this_round.last().map_or(0, |(sequence, _, _)| sequence + 1);
    let mut held: u64 = this_round.iter().map(|(_, len, _)| len).sum();
    for (_, len, other) in this_round {
        if held + total <= cap {
            break;
        }
        discard(&other);
        held -= len;
    }
    Ok(resumed.unwrap_or_else(|| {
        let name = StagingName {
            round,
            sequence: next,
            hash: hash.to_string(),
        };
        dir.join(name.file_name())
    }))
}

/// Removes a node's abandoned upload, counting it.
fn discard(path: &Path) {
    if std::fs::remove_file(path).is_ok() {
        metrics::counter!("ferry_staged_uploads_discarded_total").increment(1);
    }
}

/// An upload being received: its staging file, how much it holds, and the running hash.
pub struct StagedUpload {
    file: std::fs::File,
    path: PathBuf,
    have: u64,
    total: u64,
    id: String,
    hasher: ContentHasher,
}

fn io(context: &'static str) -> impl Fn(std::io::Error) -> StageError {
    move |e| match e.kind() {
        std::io::ErrorKind::StorageFull => StageError::DiskFull,
        _ => StageError::Io(format!("{context}: {e}")),
    }
}

impl StagedUpload {
    /// Opens (or resumes) `node`'s upload for `round` of `total` bytes with content id `id`.
    /// The node's unfinished uploads for other rounds are discarded (those rounds are over),
    /// and so are its oldest ones for this round while they and this one would hold more
    /// than `node_cap` bytes.
    pub async fn open(
        blobs: &Blobs,
        round: u32,
        node: &str,
        id: &str,
        total: u64,
        node_cap: u64,
    ) -> Result<Self, StageError> {
        if total > node_cap {
            return Err(StageError::OverNodeCap {
                total,
                cap: node_cap,
            });
        }
        let path = make_room(
            &blobs.staging_dir(node),
            round,
            &safe_name(id),
            total,
            node_cap,
        )
        .map_err(io("making room for the upload"))?;
        let mut hasher = ContentHasher::new();
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
            id: id.to_string(),
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
        if self.hasher.finish() != self.id {
            let _ = tokio::fs::remove_file(&self.path).await;
            return Err(StageError::HashMismatch);
        }
        Ok(Verified {
            path: self.path,
            id: self.id,
        })
    }
}

/// A complete upload whose bytes hash to what the node announced, in its staging file.
pub struct Verified {
    path: PathBuf,
    id: String,
}

impl Verified {
    /// The verified content hash.
    pub fn id(&self) -> &str {
        &self.id
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
        blobs.adopt(&self.id, &self.path).await
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
    use ferry_core::content::content_id;

    use super::*;

    #[tokio::test]
    async fn an_upload_resumes_at_the_held_offset_and_is_verified_once_complete() {
        let dir = tempfile::tempdir().expect("tempdir");
        let blobs = Blobs::local(&dir.path().join("blobs")).expect("blobs");
        let bytes: Vec<u8> = (0..100u8).collect();
        let sha = content_id(&bytes);
        let mut first = StagedUpload::open(&blobs, 1, "n1", &sha, 100, 1000)
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
        let mut again = StagedUpload::open(&blobs, 1, "n1", &sha, 100, 1000)
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
            held_upload(&blobs, 1, "n1", &sha).is_none(),
            "moved, not copied"
        );

        let mut wrong = StagedUpload::open(&blobs, 2, "n1", &sha, 3, 1000)
            .await
            .expect("open");
        wrong.append(0, b"abc").await.expect("chunk");
        assert!(matches!(
            wrong.finish().await,
            Err(StageError::HashMismatch)
        ));
        assert!(
            held_upload(&blobs, 2, "n1", &sha).is_none(),
            "a bad upload starts over"
        );
    }

    #[test]
    fn staging_files_from_before_sequence_numbers_are_the_servers_too() {
        let old = format!("r7-{}.part", "ab".repeat(32));
        assert_eq!(
            StagingName::parse(&old),
            Some(StagingName {
                round: 7,
                sequence: 0,
                hash: "ab".repeat(32)
            })
        );
        assert_eq!(
            StagingName::parse("r7-0000000003-abc.part").map(|n| (n.round, n.sequence)),
            Some((7, 3))
        );
        assert_eq!(
            StagingName::parse("r7-notes.part"),
            None,
            "not the server's"
        );
        assert_eq!(StagingName::parse("notes.txt"), None);
    }

    #[tokio::test]
    async fn a_node_keeps_at_most_its_cap_of_unfinished_uploads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let blobs = Blobs::local(&dir.path().join("blobs")).expect("blobs");
        let held = |round, sha: &str| held_upload(&blobs, round, "n1", sha).is_some();
        let start = |round, sha: &'static str| {
            let blobs = &blobs;
            async move {
                let mut upload = StagedUpload::open(blobs, round, "n1", sha, 100, 200)
                    .await
                    .expect("open");
                upload.append(0, &[1; 60]).await.expect("chunk");
            }
        };
        start(1, "aa").await;
        // A new round's upload discards the old round's.
        start(2, "bb").await;
        assert!(!held(1, "aa") && held(2, "bb"));
        // Within the round, a second upload fits in 200 bytes beside the first; a third
        // discards the oldest, whatever the file times say.
        start(2, "cc").await;
        assert!(held(2, "bb") && held(2, "cc"));
        let oldest = held_upload(&blobs, 2, "n1", "bb").expect("held");
        let recent = std::time::SystemTime::now() + std::time::Duration::from_secs(3600);
        std::fs::File::options()
            .append(true)
            .open(oldest)
            .and_then(|file| file.set_modified(recent))
            .expect("touch");
        start(2, "dd").await;
        assert!(!held(2, "bb") && held(2, "cc") && held(2, "dd"));
        // Another node's uploads are its own.
        StagedUpload::open(&blobs, 2, "n2", "ee", 100, 200)
            .await
            .expect("open");
        assert!(held(2, "cc"));
        // The round's numbering goes on after a discard: "dd" is newer than "cc".
        start(2, "gg").await;
        assert!(!held(2, "cc") && held(2, "dd") && held(2, "gg"));
        assert_eq!(
            StagedUpload::open(&blobs, 2, "n1", "ff", 201, 200)
                .await
                .err(),
            Some(StageError::OverNodeCap {
                total: 201,
                cap: 200
            })
        );
    }
}
