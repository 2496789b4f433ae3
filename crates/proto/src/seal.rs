//! Sealing and opening released keys: HPKE (RFC 9180) base mode with
//! DHKEM(P-384, HKDF-SHA384), HKDF-SHA384 and AES-256-GCM, then an ECDSA
//! P-384/SHA-384 signature by the verifier identity over the transcript (see
//! [`crate::binding`] for the exact bytes). HPKE is [`crate::hpke_p384`] and
//! ECDSA is AWS-LC's, both through `aws-lc-rs`.

use crate::binding::{hpke_info, request_hash, transcript_bytes, TranscriptFields};
use crate::delegation::{delegation_message, DelegatedKey, DELEGATION_CLOCK_SKEW_MS};
use crate::error::{hex, EphemeralKeyError, OpenError, SealError};
use crate::hpke_p384::{self, KeyPair, PublicKey};
use crate::identity::VerifierIdentity;
use crate::keys::{
    check_released_keys, decode_payload, encode_payload, DecodedPayload, ReleasedKey,
    PAYLOAD_VERSION,
};
use crate::message::{
    KeyRequest, SealedKeys, HASH_LEN, MAX_OPERATIONS, MAX_SEALED_CIPHERTEXT_LEN,
    P384_PUBLIC_KEY_LEN,
};
use aws_lc_rs::signature::{ParsedPublicKey, UnparsedPublicKey, ECDSA_P384_SHA384_FIXED};
use std::fmt;
use zeroize::Zeroizing;

/// HPKE associated data: empty; everything is bound through `info` and the
/// KEM context (which includes the recipient key).
const HPKE_AAD: &[u8] = b"";

/// AES-GCM tag length.
const TAG_LEN: usize = hpke_p384::NT;

/// Seal `keys` to the enclave and sign the result (verifier side).
///
/// **Callers must take `recipient_public_key_sec1` and `document_sha384` from a
/// `kluis_attestation::VerifiedAttestation`** (`document().public_key` and
/// `document_sha384()`), after checking the nonce, `request_hash` against the
/// document's `user_data` and the policy; this crate does not depend on the
/// attestation crate and cannot check that itself. `keys` must answer the
/// request in order ([`crate::check_released_keys`]).
///
/// The recipient key must be an uncompressed SEC1 P-384 point (97 bytes), as
/// [`EphemeralKeyPair::public_key_sec1`] makes.
pub fn seal_keys(
    recipient_public_key_sec1: &[u8],
    document_sha384: &[u8; HASH_LEN],
    request_hash: &[u8; HASH_LEN],
    keys: &[ReleasedKey],
    identity: &VerifierIdentity,
) -> Result<SealedKeys, SealError> {
    let (recipient, payload) = check_and_encode(recipient_public_key_sec1, keys)?;
    let ephemeral = KeyPair::generate().map_err(|_| SealError::Randomness)?;
    seal_payload(
        &recipient,
        document_sha384,
        request_hash,
        payload,
        identity,
        ephemeral,
    )
}

/// [`seal_keys`], signed by a release key the identity certified
/// ([`DelegatedKey`]) instead of the identity itself; the answer carries the
/// certificate.
pub fn seal_keys_delegated(
    recipient_public_key_sec1: &[u8],
    document_sha384: &[u8; HASH_LEN],
    request_hash: &[u8; HASH_LEN],
    keys: &[ReleasedKey],
    release_key: &DelegatedKey,
) -> Result<SealedKeys, SealError> {
    let (recipient, payload) = check_and_encode(recipient_public_key_sec1, keys)?;
    let ephemeral = KeyPair::generate().map_err(|_| SealError::Randomness)?;
    let mut sealed = seal_payload(
        &recipient,
        document_sha384,
        request_hash,
        payload,
        release_key.key(),
        ephemeral,
    )?;
    sealed.delegation = Some(release_key.delegation().clone());
    Ok(sealed)
}

/// [`seal_keys`] with the KEM's ephemeral key made by RFC 9180
/// `DeriveKeyPair(ikm)`: for test vectors only.
#[cfg(test)]
pub(crate) fn seal_keys_with_ikm(
    recipient_public_key_sec1: &[u8],
    document_sha384: &[u8; HASH_LEN],
    request_hash: &[u8; HASH_LEN],
    keys: &[ReleasedKey],
    identity: &VerifierIdentity,
    ikm: &[u8; hpke_p384::NSK],
) -> Result<SealedKeys, SealError> {
    let (recipient, payload) = check_and_encode(recipient_public_key_sec1, keys)?;
    let ephemeral = KeyPair::derive(ikm).map_err(|_| SealError::Randomness)?;
    seal_payload(
        &recipient,
        document_sha384,
        request_hash,
        payload,
        identity,
        ephemeral,
    )
}

/// Seal and sign an encoded payload with the KEM's ephemeral key made by
/// `DeriveKeyPair(ikm)`, so that tests can seal payloads that
/// [`encode_payload`] would never produce.
#[cfg(test)]
pub(crate) fn seal_payload_with_ikm(
    recipient_bytes: &[u8; P384_PUBLIC_KEY_LEN],
    document_sha384: &[u8; HASH_LEN],
    request_hash: &[u8; HASH_LEN],
    payload: Zeroizing<Vec<u8>>,
    identity: &VerifierIdentity,
    ikm: &[u8; hpke_p384::NSK],
) -> Result<SealedKeys, SealError> {
    let recipient = recipient_key(recipient_bytes)?;
    let ephemeral = KeyPair::derive(ikm).map_err(|_| SealError::Randomness)?;
    seal_payload(
        &recipient,
        document_sha384,
        request_hash,
        payload,
        identity,
        ephemeral,
    )
}

/// The recipient key, validated: 97 bytes, uncompressed SEC1, on the curve.
fn recipient_key(recipient_public_key_sec1: &[u8]) -> Result<PublicKey, SealError> {
    PublicKey::from_bytes(recipient_public_key_sec1).ok_or(SealError::RecipientKey {
        expected: P384_PUBLIC_KEY_LEN,
        found: recipient_public_key_sec1.len(),
    })
}

/// Check the recipient key and the keys, and encode the payload.
fn check_and_encode(
    recipient_public_key_sec1: &[u8],
    keys: &[ReleasedKey],
) -> Result<(PublicKey, Zeroizing<Vec<u8>>), SealError> {
    let recipient = recipient_key(recipient_public_key_sec1)?;
    if keys.is_empty() || keys.len() > MAX_OPERATIONS {
        return Err(SealError::KeyCount {
            found: keys.len(),
            limit: MAX_OPERATIONS,
        });
    }
    for (index, key) in keys.iter().enumerate() {
        key.check_bounds()
            .map_err(|(field, min, max, found)| SealError::KeyField {
                index,
                field,
                min,
                max,
                found,
            })?;
    }
    Ok((recipient, encode_payload(keys)?))
}

/// HPKE-seal `payload` to `recipient` with the KEM's `ephemeral` key pair,
/// then sign the transcript.
fn seal_payload(
    recipient: &PublicKey,
    document_sha384: &[u8; HASH_LEN],
    request_hash: &[u8; HASH_LEN],
    payload: Zeroizing<Vec<u8>>,
    identity: &VerifierIdentity,
    ephemeral: KeyPair,
) -> Result<SealedKeys, SealError> {
    if payload.len() > MAX_SEALED_CIPHERTEXT_LEN.saturating_sub(TAG_LEN) {
        // Unreachable through `seal_keys` (64 keys of bounded size stay far
        // below); kept so the ciphertext limit holds by construction.
        return Err(SealError::PayloadTooLarge {
            found: payload.len(),
            max: MAX_SEALED_CIPHERTEXT_LEN.saturating_sub(TAG_LEN),
        });
    }
    let info = hpke_info(document_sha384, request_hash);
    let (enc, ciphertext) = hpke_p384::seal(ephemeral, recipient, &info, HPKE_AAD, &payload)
        .map_err(|_| SealError::Hpke {
            detail: "AWS-LC refused the ECDH, HKDF or AES-GCM step".to_owned(),
        })?;
    drop(payload);

    let signature = identity.sign(&transcript_bytes(&TranscriptFields {
        document_sha384,
        request_hash,
        recipient_public_key: recipient.as_bytes(),
        enc: &enc,
        ciphertext: &ciphertext,
    }))?;

    Ok(SealedKeys {
        document_sha384: *document_sha384,
        request_hash: *request_hash,
        enc,
        ciphertext,
        signature,
        delegation: None,
    })
}

/// The enclave's ephemeral HPKE key pair for one key-release session
/// (DHKEM(P-384)). The private half is an AWS-LC key: cleansed when freed,
/// not exportable, and never shown by `Debug`.
pub struct EphemeralKeyPair {
    key_pair: KeyPair,
}

impl EphemeralKeyPair {
    /// A new key pair from AWS-LC's random source.
    pub fn generate() -> Result<Self, EphemeralKeyError> {
        KeyPair::generate()
            .map(|key_pair| EphemeralKeyPair { key_pair })
            .map_err(|_| EphemeralKeyError::Randomness)
    }

    /// RFC 9180 `DeriveKeyPair(ikm)`: for test vectors only.
    #[cfg(test)]
    #[allow(clippy::expect_used)]
    pub(crate) fn derive(ikm: &[u8; hpke_p384::NSK]) -> Self {
        EphemeralKeyPair {
            key_pair: KeyPair::derive(ikm).expect("DeriveKeyPair"),
        }
    }

    /// The public key, uncompressed SEC1 (97 bytes): what goes in the
    /// attestation document's `public_key`.
    pub fn public_key_sec1(&self) -> [u8; P384_PUBLIC_KEY_LEN] {
        *self.key_pair.public_key()
    }
}

impl fmt::Debug for EphemeralKeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EphemeralKeyPair")
            .field("public_key", &hex(self.key_pair.public_key()))
            .field("private_key", &"<redacted>")
            .finish()
    }
}

/// The pinned verifier key: a SEC1 P-384 point, uncompressed (97 bytes) or
/// compressed (49 bytes), on the curve. Other encodings (X.509 DER, hybrid)
/// are configuration errors.
fn pinned_key(bytes: &[u8]) -> Result<ParsedPublicKey, OpenError> {
    let sec1 = matches!(
        (bytes.first(), bytes.len()),
        (Some(0x04), P384_PUBLIC_KEY_LEN) | (Some(0x02 | 0x03), 49)
    );
    if !sec1 {
        return Err(OpenError::PinnedKey);
    }
    UnparsedPublicKey::new(&ECDSA_P384_SHA384_FIXED, bytes)
        .parse()
        .map_err(|_| OpenError::PinnedKey)
}

fn check_lengths(sealed: &SealedKeys) -> Result<(), OpenError> {
    let n = sealed.ciphertext.len();
    if !(TAG_LEN..=MAX_SEALED_CIPHERTEXT_LEN).contains(&n) {
        return Err(OpenError::Malformed {
            field: "ciphertext",
            min: TAG_LEN,
            max: MAX_SEALED_CIPHERTEXT_LEN,
            found: n,
        });
    }
    Ok(())
}

/// Check the signature on `sealed` against the pinned verifier key, then open
/// it (enclave side).
///
/// In order: lengths; the pinned key parses; the signature verifies under it
/// over the transcript built from this enclave's own public key and the
/// received fields ([`OpenError::BadSignature`] otherwise: a parent that
/// substitutes its own key, or alters a byte, stops here, before anything is
/// decrypted); the response names `document_sha384` and `request_hash`; the
/// HPKE box opens with `info` built from the caller's values; the payload
/// decodes, has version [`PAYLOAD_VERSION`] and is within bounds.
///
/// `pinned_verifier_public_key_sec1` must come from the enclave image, never
/// from the parent. `document_sha384` is SHA-384 of the attestation document
/// bytes the enclave sent. Prefer [`open_keys_for_request`], which also checks
/// the keys against the request operation by operation.
pub fn open_keys(
    sealed: &SealedKeys,
    ephemeral: &EphemeralKeyPair,
    pinned_verifier_public_key_sec1: &[u8],
    document_sha384: &[u8; HASH_LEN],
    request_hash: &[u8; HASH_LEN],
) -> Result<Vec<ReleasedKey>, OpenError> {
    check_lengths(sealed)?;
    let pinned = pinned_key(pinned_verifier_public_key_sec1)?;
    // The answer's signer: the pinned identity, or a release key it
    // certified and that is still valid by this enclave's clock.
    let signer = match &sealed.delegation {
        None => pinned,
        Some(delegation) => {
            pinned
                .verify_sig(
                    &delegation_message(&delegation.public_key, delegation.not_after_ms),
                    &delegation.signature,
                )
                .map_err(|_| OpenError::BadDelegation)?;
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                .unwrap_or(0);
            if now_ms
                > delegation
                    .not_after_ms
                    .saturating_add(DELEGATION_CLOCK_SKEW_MS)
            {
                return Err(OpenError::DelegationExpired {
                    not_after_ms: delegation.not_after_ms,
                    now_ms,
                });
            }
            UnparsedPublicKey::new(&ECDSA_P384_SHA384_FIXED, &delegation.public_key)
                .parse()
                .map_err(|_| OpenError::BadDelegation)?
        }
    };
    let transcript = transcript_bytes(&TranscriptFields {
        document_sha384: &sealed.document_sha384,
        request_hash: &sealed.request_hash,
        recipient_public_key: ephemeral.key_pair.public_key(),
        enc: &sealed.enc,
        ciphertext: &sealed.ciphertext,
    });
    signer
        .verify_sig(&transcript, &sealed.signature)
        .map_err(|_| OpenError::BadSignature)?;

    if &sealed.document_sha384 != document_sha384 {
        return Err(OpenError::DocumentMismatch {
            expected: hex(document_sha384),
            found: hex(&sealed.document_sha384),
        });
    }
    if &sealed.request_hash != request_hash {
        return Err(OpenError::RequestMismatch {
            expected: hex(request_hash),
            found: hex(&sealed.request_hash),
        });
    }

    let info = hpke_info(document_sha384, request_hash);
    let plaintext = hpke_p384::open(
        &ephemeral.key_pair,
        &sealed.enc,
        &info,
        HPKE_AAD,
        &sealed.ciphertext,
    )
    .map_err(|_| OpenError::Decrypt)?;

    let keys = match decode_payload(&plaintext).map_err(|e| OpenError::Payload {
        detail: e.to_string(),
    })? {
        DecodedPayload::V1(keys) => keys,
        DecodedPayload::Unsupported(found) => {
            return Err(OpenError::PayloadVersion {
                expected: PAYLOAD_VERSION,
                found,
            })
        }
    };
    if keys.is_empty() {
        return Err(OpenError::Payload {
            detail: "no keys released".to_owned(),
        });
    }
    for (index, key) in keys.iter().enumerate() {
        key.check_bounds()
            .map_err(|(field, min, max, found)| OpenError::Payload {
                detail: format!(
                    "key {index}: `{field}` must be {min}..={max} bytes, found {found}"
                ),
            })?;
    }
    Ok(keys)
}

/// [`open_keys`] for `request`, then check that the keys answer it operation
/// by operation ([`crate::check_released_keys`]).
pub fn open_keys_for_request(
    sealed: &SealedKeys,
    ephemeral: &EphemeralKeyPair,
    pinned_verifier_public_key_sec1: &[u8],
    document_sha384: &[u8; HASH_LEN],
    request: &KeyRequest,
) -> Result<Vec<ReleasedKey>, OpenError> {
    let keys = open_keys(
        sealed,
        ephemeral,
        pinned_verifier_public_key_sec1,
        document_sha384,
        &request_hash(request),
    )?;
    check_released_keys(request, &keys)
        .map_err(|e| OpenError::ResponseMismatch { detail: e.detail })?;
    Ok(keys)
}
