//! Key agreement, share encryption and Shamir sharing.
//!
//! Two X25519 key pairs per node and round: one to agree the keys that encrypt the shares
//! routed through the server, one to agree the pairwise mask seeds. Agreed secrets go through
//! HKDF-SHA256 with the round's context and the pair's ids, so every key is used once.
//! Secrets are shared as curve25519 scalars with Shamir's scheme (vsss-rs).

use chacha20poly1305::{
    ChaCha20Poly1305, KeyInit, Nonce,
    aead::{Aead, Payload},
};
use curve25519_dalek::Scalar;
use hkdf::Hkdf;
use rand_core::CryptoRng;
use sha2::Sha256;
use vsss_rs::{DefaultShare, IdentifierPrimeField, ReadableShareSet, Share};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::{SecAggError, graph::ParticipantId};

type ScalarShare = DefaultShare<IdentifierPrimeField<Scalar>, IdentifierPrimeField<Scalar>>;

/// What a derived key is for; part of the HKDF info so the two uses never collide.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Purpose {
    ShareEncryption,
    PairwiseMask,
}

impl Purpose {
    fn label(self) -> &'static [u8] {
        match self {
            Self::ShareEncryption => b"ferry-secagg/v1/share-encryption",
            Self::PairwiseMask => b"ferry-secagg/v1/pairwise-mask",
        }
    }
}

/// A uniformly random curve25519 scalar.
pub(crate) fn random_scalar(rng: &mut impl CryptoRng) -> Scalar {
    let mut wide = [0u8; 64];
    rng.fill_bytes(&mut wide);
    Scalar::from_bytes_mod_order_wide(&wide)
}

/// The X25519 secret whose bytes are `scalar`'s, so that sharing the scalar shares the key.
pub(crate) fn secret_from_scalar(scalar: &Scalar) -> StaticSecret {
    StaticSecret::from(scalar.to_bytes())
}

/// The public key of `secret`.
pub(crate) fn public_of(secret: &StaticSecret) -> [u8; 32] {
    PublicKey::from(secret).to_bytes()
}

/// A 32-byte key agreed between `ours` and `theirs` for `purpose` in the round `context`,
/// bound to the pair `(first, second)`.
pub(crate) fn agree(
    ours: &StaticSecret,
    theirs: &[u8; 32],
    purpose: Purpose,
    context: &[u8],
    (first, second): (ParticipantId, ParticipantId),
) -> Result<[u8; 32], SecAggError> {
    let shared = ours.diffie_hellman(&PublicKey::from(*theirs));
    if !shared.was_contributory() {
        return Err(SecAggError::Malformed(
            "a peer advertised a low-order public key".into(),
        ));
    }
    let mut info = purpose.label().to_vec();
    info.extend_from_slice(&first.to_le_bytes());
    info.extend_from_slice(&second.to_le_bytes());
    let mut key = [0u8; 32];
    Hkdf::<Sha256>::new(Some(context), shared.as_bytes())
        .expand(&info, &mut key)
        .map_err(|_| SecAggError::Malformed("HKDF refused a 32-byte key".into()))?;
    Ok(key)
}

/// Encrypts `plaintext` under a key used for this one message.
pub(crate) fn seal(key: &[u8; 32], plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, SecAggError> {
    ChaCha20Poly1305::new(key.into())
        .encrypt(
            &Nonce::default(),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .map_err(|_| SecAggError::Malformed("share encryption failed".into()))
}

/// Decrypts a message sealed by [`seal`]; fails if it was altered or sealed for someone else.
pub(crate) fn open(key: &[u8; 32], ciphertext: &[u8], aad: &[u8]) -> Result<Vec<u8>, SecAggError> {
    ChaCha20Poly1305::new(key.into())
        .decrypt(
            &Nonce::default(),
            Payload {
                msg: ciphertext,
                aad,
            },
        )
        .map_err(|_| SecAggError::Malformed("a share failed to decrypt".into()))
}

/// Splits `secret` into `count` shares, any `threshold` of which rebuild it; share `i` has
/// Shamir x-coordinate `i + 1`.
pub(crate) fn split(
    secret: &Scalar,
    threshold: usize,
    count: usize,
    rng: &mut impl CryptoRng,
) -> Result<Vec<[u8; 32]>, SecAggError> {
    let shares = vsss_rs::shamir::split_secret::<ScalarShare>(
        threshold,
        count,
        &IdentifierPrimeField(*secret),
        rng,
    )
    .map_err(|e| SecAggError::Params(format!("Shamir sharing failed: {e:?}")))?;
    Ok(shares.iter().map(|s| s.value().0.to_bytes()).collect())
}

/// Rebuilds a secret from `(index, share)` pairs made by [`split`].
pub(crate) fn combine(shares: &[(usize, [u8; 32])]) -> Result<Scalar, SecAggError> {
    let parsed = shares
        .iter()
        .map(|(index, bytes)| {
            let value =
                Option::<Scalar>::from(Scalar::from_canonical_bytes(*bytes)).ok_or_else(|| {
                    SecAggError::Malformed("a share is not a canonical scalar".into())
                })?;
            Ok(ScalarShare::with_identifier_and_value(
                IdentifierPrimeField(Scalar::from(*index as u64 + 1)),
                IdentifierPrimeField(value),
            ))
        })
        .collect::<Result<Vec<_>, SecAggError>>()?;
    parsed
        .combine()
        .map(|s| s.0)
        .map_err(|e| SecAggError::Malformed(format!("shares do not combine: {e:?}")))
}

#[cfg(test)]
mod tests {
    use chacha20::ChaCha20Rng;
    use rand_core::SeedableRng;

    use super::*;

    #[test]
    fn both_sides_agree_on_the_same_key_and_other_pairs_do_not() {
        let mut rng = ChaCha20Rng::from_seed([1; 32]);
        let a = secret_from_scalar(&random_scalar(&mut rng));
        let b = secret_from_scalar(&random_scalar(&mut rng));
        let c = secret_from_scalar(&random_scalar(&mut rng));
        let ab = agree(&a, &public_of(&b), Purpose::PairwiseMask, b"r1", (0, 1)).unwrap();
        let ba = agree(&b, &public_of(&a), Purpose::PairwiseMask, b"r1", (0, 1)).unwrap();
        let ac = agree(&a, &public_of(&c), Purpose::PairwiseMask, b"r1", (0, 1)).unwrap();
        let other_use = agree(&a, &public_of(&b), Purpose::ShareEncryption, b"r1", (0, 1)).unwrap();
        assert_eq!(ab, ba);
        assert_ne!(ab, ac);
        assert_ne!(ab, other_use);
    }

    #[test]
    fn a_low_order_public_key_is_refused() {
        let mut rng = ChaCha20Rng::from_seed([2; 32]);
        let a = secret_from_scalar(&random_scalar(&mut rng));
        assert!(agree(&a, &[0; 32], Purpose::PairwiseMask, b"r", (0, 1)).is_err());
    }

    #[test]
    fn sealed_shares_open_only_with_their_key_and_data() {
        let sealed = seal(&[7; 32], b"share", b"0->1").unwrap();
        assert_eq!(open(&[7; 32], &sealed, b"0->1").unwrap(), b"share");
        assert!(open(&[8; 32], &sealed, b"0->1").is_err());
        assert!(open(&[7; 32], &sealed, b"0->2").is_err());
    }

    #[test]
    fn any_threshold_shares_rebuild_the_secret_and_fewer_do_not() {
        let mut rng = ChaCha20Rng::from_seed([3; 32]);
        let secret = random_scalar(&mut rng);
        let shares = split(&secret, 3, 6, &mut rng).unwrap();
        let pick = |idx: &[usize]| idx.iter().map(|&i| (i, shares[i])).collect::<Vec<_>>();
        assert_eq!(combine(&pick(&[0, 2, 5])).unwrap(), secret);
        assert_eq!(combine(&pick(&[4, 1, 3])).unwrap(), secret);
        assert_ne!(combine(&pick(&[0, 1])).unwrap_or_default(), secret);
    }
}
