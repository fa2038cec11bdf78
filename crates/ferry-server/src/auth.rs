//! Node identity: one-time enrolment tokens and per-node credentials, stored only as hashes.
//!
//! A credential is `<node_id>.<secret>`, sent as `authorization: Bearer <credential>` on every
//! call after enrolment. The server acts on the node the credential names, so a node can speak
//! only for itself.

use ferry_core::model::{hex, sha256_hex};
use rand::RngCore;

/// A fresh random secret: 32 bytes from the OS-seeded generator, hex-encoded.
pub fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex(&bytes)
}

/// A fresh node identifier.
pub fn new_node_id() -> String {
    new_secret()[..16].to_string()
}

/// What the store keeps of a token or secret.
pub fn hash_secret(secret: &str) -> String {
    sha256_hex(secret.as_bytes())
}

/// A node's credential as presented on a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    /// The node it claims to be.
    pub node_id: String,
    /// The node's secret.
    pub secret: String,
}

impl Credential {
    /// Reads an `authorization` header value (`Bearer <node_id>.<secret>`).
    pub fn from_header(value: &str) -> Option<Self> {
        let text = value.strip_prefix("Bearer ")?.trim();
        let (node_id, secret) = text.split_once('.')?;
        (!node_id.is_empty() && !secret.is_empty()).then(|| Self {
            node_id: node_id.to_string(),
            secret: secret.to_string(),
        })
    }

    /// Whether this credential's secret matches the stored hash.
    pub fn matches(&self, secret_hash: &str) -> bool {
        // Both sides are fixed-length hex hashes; compare without early exit.
        let ours = hash_secret(&self.secret);
        ours.len() == secret_hash.len()
            && ours
                .bytes()
                .zip(secret_hash.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_parse_and_match_only_their_hash() {
        let secret = new_secret();
        assert_eq!(secret.len(), 64);
        assert_ne!(secret, new_secret());
        let credential = Credential {
            node_id: new_node_id(),
            secret: secret.clone(),
        };
        let parsed = Credential::from_header(&format!("Bearer {}.{}", credential.node_id, secret))
            .expect("parses");
        assert_eq!(parsed, credential);
        assert!(parsed.matches(&hash_secret(&secret)));
        assert!(!parsed.matches(&hash_secret("other")));
        for bad in [
            "",
            "Bearer ",
            "Bearer abc",
            "Basic a.b",
            "Bearer .x",
            "Bearer x.",
        ] {
            assert_eq!(Credential::from_header(bad), None, "{bad:?}");
        }
    }
}
