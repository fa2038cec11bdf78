//! Content ids: the names that blobs are stored under and that every transfer is checked
//! against. A content id is the BLAKE3 hash of the bytes as 64 lowercase hex digits. Stores
//! written before BLAKE3 named their blobs by SHA-256; those ids are kept as `sha256:<hex>`,
//! so an old run still resumes and its blobs are still checked, with the hash that named them.
//!
//! BLAKE3 (not SHA-256) because every byte of a round is hashed several times (the node
//! checks the model it downloads and names its update, the server checks the update as it
//! arrives) and BLAKE3 runs several times faster on one core and in parallel on many. The
//! final model's user-facing `model_sha256` stays SHA-256, for `sha256sum`.

use std::io::Write;

use sha2::{Digest, Sha256};

/// How the id of a blob written before BLAKE3 begins.
pub const LEGACY_SHA256: &str = "sha256:";

/// Inputs from this size on are hashed on all cores.
const PARALLEL_FROM: usize = 1 << 20;

/// The content id of `bytes`.
pub fn content_id(bytes: &[u8]) -> String {
    let mut hasher = ContentHasher::new();
    hasher.update(bytes);
    hasher.finish()
}

/// Whether `bytes` are what `id` names (with the hash that named them).
pub fn matches(id: &str, bytes: &[u8]) -> bool {
    let mut hasher = ContentHasher::for_id(id);
    hasher.update(bytes);
    hasher.finish() == id
}

/// Whether `id` is well formed: 64 lowercase hex digits, optionally after `sha256:`. Blob keys,
/// file names and URLs are built from ids, so nothing else may pass for one.
pub fn is_valid(id: &str) -> bool {
    let digits = id.strip_prefix(LEGACY_SHA256).unwrap_or(id);
    digits.len() == 64
        && digits
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A content id computed over bytes fed a piece at a time (a download, an upload, a file
/// being written).
#[derive(Clone)]
pub struct ContentHasher(Algorithm);

#[derive(Clone)]
enum Algorithm {
    Blake3(Box<blake3::Hasher>),
    Sha256(Sha256),
}

impl Default for ContentHasher {
    fn default() -> Self {
        Self::new()
    }
}

impl ContentHasher {
    /// A hasher for new content: BLAKE3.
    pub fn new() -> Self {
        Self(Algorithm::Blake3(Box::new(blake3::Hasher::new())))
    }

    /// A hasher that checks content named `id`: SHA-256 for an id written before BLAKE3,
    /// BLAKE3 otherwise.
    pub fn for_id(id: &str) -> Self {
        if id.starts_with(LEGACY_SHA256) {
            Self(Algorithm::Sha256(Sha256::new()))
        } else {
            Self::new()
        }
    }

    /// Feeds `bytes`; large pieces are hashed on all cores.
    pub fn update(&mut self, bytes: &[u8]) {
        match &mut self.0 {
            Algorithm::Blake3(hasher) if bytes.len() >= PARALLEL_FROM => {
                hasher.update_rayon(bytes);
            }
            Algorithm::Blake3(hasher) => {
                hasher.update(bytes);
            }
            Algorithm::Sha256(hasher) => hasher.update(bytes),
        }
    }

    /// The id of everything fed.
    pub fn finish(self) -> String {
        match self.0 {
            Algorithm::Blake3(hasher) => hasher.finalize().to_hex().to_string(),
            Algorithm::Sha256(hasher) => {
                format!("{LEGACY_SHA256}{}", crate::model::hex(&hasher.finalize()))
            }
        }
    }
}

impl Write for ContentHasher {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.update(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_blake3_hex_and_legacy_ids_are_checked_with_sha256() {
        // BLAKE3's published test vector for the empty input.
        assert_eq!(
            content_id(b""),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
        let bytes = b"the global model";
        let id = content_id(bytes);
        assert!(is_valid(&id) && matches(&id, bytes));
        assert!(!matches(&id, b"the global modeL"));
        let legacy = format!("{LEGACY_SHA256}{}", crate::model::sha256_hex(bytes));
        assert!(is_valid(&legacy) && matches(&legacy, bytes));
        assert!(!matches(&legacy, b"other"));
        for bad in [
            "",
            "ab",
            &id.to_uppercase(),
            &format!("{id}0"),
            "../../etc/passwd",
        ] {
            assert!(!is_valid(bad), "{bad}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(32))]

        /// However the bytes are cut into pieces, and whether a piece is hashed on one core or
        /// all, the id is the same.
        #[test]
        fn the_id_does_not_depend_on_how_the_bytes_arrive(
            len in 0usize..3_000_000,
            cuts in proptest::collection::vec(0usize..3_000_000, 0..4),
        ) {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (len + 1)).collect();
            cuts.sort_unstable();
            let mut hasher = ContentHasher::new();
            let mut from = 0;
            for cut in cuts.into_iter().chain([len]) {
                hasher.update(&bytes[from..cut]);
                from = cut;
            }
            proptest::prop_assert_eq!(hasher.finish(), blake3::hash(&bytes).to_hex().to_string());
        }
    }
}
