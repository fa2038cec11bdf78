//! The blob store's test suite, run on a local folder and on a real S3 server (Garage, started
//! for each test on loopback) alike: what the coordinator relies on must hold on both.

use std::{io::Read, sync::Arc};

use ferry_core::content;
use ferry_harness::garage::{Garage, REGION};
use ferry_server::blobs::{
    Blobs,
    s3::{self, S3Settings},
};
use object_store::{ObjectStore, PutPayload, local::LocalFileSystem, path::Path as ObjectPath};

/// A blob store for one test, and the raw object store under it (to damage objects as a
/// failing disk or a bad copy would).
struct Backend {
    blobs: Blobs,
    raw: Arc<dyn ObjectStore>,
    _dir: tempfile::TempDir,
    _garage: Option<Garage>,
}

impl Backend {
    fn folder() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let folder = dir.path().join("blobs");
        let blobs = Blobs::local(&folder).expect("open");
        let raw = Arc::new(LocalFileSystem::new_with_prefix(&folder).expect("raw"));
        Self {
            blobs,
            raw,
            _dir: dir,
            _garage: None,
        }
    }

    fn garage() -> Self {
        let garage = Garage::start();
        let dir = tempfile::tempdir().expect("tempdir");
        let settings = S3Settings {
            endpoint: Some(garage.endpoint.clone()),
            region: Some(REGION.into()),
            credentials: Some((garage.key_id.clone(), garage.secret.clone())),
        };
        let url = garage.url("run-1");
        let blobs = Blobs::at(&url, &settings, &dir.path().join("uploads")).expect("open");
        let raw = s3::open(&url, &settings).expect("raw");
        Self {
            blobs,
            raw,
            _dir: dir,
            _garage: Some(garage),
        }
    }

    /// Replaces blob `id`'s stored bytes with `bytes`, where the store keeps it.
    async fn damage(&self, id: &str, bytes: &[u8]) {
        self.raw
            .put(
                &ObjectPath::from(format!("blake3/{id}")),
                PutPayload::from(bytes.to_vec()),
            )
            .await
            .expect("overwrite");
    }
}

/// One `#[tokio::test]` per blob store for each named suite function.
macro_rules! on_both_blob_stores {
    ($($suite:ident),* $(,)?) => {
        $(
            mod $suite {
                use super::Backend;

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn folder() {
                    super::$suite(Backend::folder()).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn garage() {
                    super::$suite(Backend::garage()).await;
                }
            }
        )*
    };
}

on_both_blob_stores!(
    blobs_are_named_by_their_content_and_read_by_ranges,
    a_large_blob_goes_in_parts_and_comes_back_whole,
    concurrent_reads_of_one_blob_do_not_share_a_file,
    a_damaged_or_truncated_blob_is_never_read,
    removed_blobs_are_gone_and_removing_twice_is_fine,
);

/// `n` bytes that differ from place to place.
fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 31 % 251) as u8).collect()
}

fn read_all(mut file: std::fs::File) -> Vec<u8> {
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).expect("read");
    bytes
}

async fn blobs_are_named_by_their_content_and_read_by_ranges(backend: Backend) {
    let blobs = &backend.blobs;
    let id = blobs.put(b"hello world".to_vec()).await.expect("put");
    assert_eq!(id, content::content_id(b"hello world"));
    assert_eq!(blobs.put(b"hello world".to_vec()).await.expect("again"), id);
    assert_eq!(blobs.size(&id).await.expect("size"), 11);
    assert_eq!(&blobs.range(&id, 6..11).await.expect("range")[..], b"world");
    assert_eq!(&blobs.get(&id).await.expect("get")[..], b"hello world");
    assert_eq!(
        read_all(blobs.open(&id).await.expect("open")),
        b"hello world"
    );
    let missing = content::content_id(b"never stored");
    assert!(blobs.get(&missing).await.is_err());
    assert!(blobs.size(&missing).await.is_err());
}

async fn a_large_blob_goes_in_parts_and_comes_back_whole(backend: Backend) {
    // Larger than two 16 MiB parts, with a short last part.
    let bytes = pattern(40 << 20);
    let expected = content::content_id(&bytes);
    let (id, size) = backend
        .blobs
        .put_written(|out| {
            for piece in bytes.chunks(1 << 20) {
                out.write_all(piece)
                    .map_err(ferry_server::ServerError::io("writing"))?;
            }
            Ok(())
        })
        .await
        .expect("put_written");
    assert_eq!((id.as_str(), size), (expected.as_str(), bytes.len() as u64));
    assert_eq!(backend.blobs.size(&id).await.expect("size"), size);
    let end = size - 5;
    assert_eq!(
        &backend.blobs.range(&id, end..size).await.expect("range")[..],
        &bytes[end as usize..]
    );
    assert!(read_all(backend.blobs.open(&id).await.expect("open")) == bytes);
    // Stored again from bytes in memory: the same id, nothing changes.
    backend
        .blobs
        .put_hashed(&id, bytes.clone())
        .await
        .expect("put again");
    assert!(backend.blobs.get(&id).await.expect("get")[..] == bytes[..]);
}

async fn concurrent_reads_of_one_blob_do_not_share_a_file(backend: Backend) {
    let bytes = pattern(3 << 20);
    let id = backend.blobs.put(bytes.clone()).await.expect("put");
    let blobs = Arc::new(backend.blobs.clone());
    let reads: Vec<_> = (0..8)
        .map(|_| {
            let (blobs, id) = (blobs.clone(), id.clone());
            tokio::spawn(async move { read_all(blobs.open(&id).await.expect("open")) })
        })
        .collect();
    for read in reads {
        assert!(
            read.await.expect("read") == bytes,
            "every reader gets the whole blob"
        );
    }
}

async fn a_damaged_or_truncated_blob_is_never_read(backend: Backend) {
    let bytes = pattern(1 << 20);
    let id = backend.blobs.put(bytes.clone()).await.expect("put");
    let mut flipped = bytes.clone();
    flipped[1000] ^= 1;
    for damaged in [flipped, bytes[..bytes.len() - 7].to_vec()] {
        backend.damage(&id, &damaged).await;
        let got = backend.blobs.get(&id).await.expect_err("damaged");
        assert!(got.to_string().contains("is corrupt"), "{got}");
        let opened = backend.blobs.open(&id).await.expect_err("damaged");
        assert!(opened.to_string().contains("is corrupt"), "{opened}");
    }
}

async fn removed_blobs_are_gone_and_removing_twice_is_fine(backend: Backend) {
    let id = backend.blobs.put(b"a model".to_vec()).await.expect("put");
    backend.blobs.delete(&id).await.expect("delete");
    assert!(backend.blobs.size(&id).await.is_err());
    backend.blobs.delete(&id).await.expect("delete again");
}
