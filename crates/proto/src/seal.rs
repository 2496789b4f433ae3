//! Sealing and opening released keys: HPKE (RFC 9180) base mode with
//! DHKEM(P-384, HKDF-SHA384), HKDF-SHA384 and AES-256-GCM, then an ECDSA
//! P-384/SHA-384 signature by the verifier identity over the transcript (see
//! [`crate::binding`] for the exact bytes).

use crate::binding::{hpke_info, request_hash, transcript_bytes, TranscriptFields};
use crate::error::{hex, EphemeralKeyError, OpenError, SealError};
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
use hpke::aead::{AeadTag, AesGcm256};
use hpke::kdf::HkdfSha384;
use hpke::kem::DhP384HkdfSha384;
use hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};
use rand_core::{OsRng, RngCore as _};
use std::fmt;
use zeroize::{Zeroize, Zeroizing};

type Kem = DhP384HkdfSha384;
type Kdf = HkdfSha384;
type Aead = AesGcm256;

/// HPKE associated data: empty; everything is bound through `info` and the
/// KEM context (which includes the recipient key).
const HPKE_AAD: &[u8] = b"";

/// AES-GCM tag length.
const TAG_LEN: usize = 16;

/// Randomness the KEM draws per encapsulation (one P-384 scalar's worth of
/// input keying material, RFC 9180 `DeriveKeyPair(ikm)` with `Nsk` = 48).
const IKM_LEN: usize = 48;

/// An RNG that hands out pre-drawn bytes. The `hpke` crate takes an infallible
/// RNG of another `rand_core` generation; drawing the bytes first from the
/// fallible OS source keeps a randomness failure an error rather than a panic,
/// and lets test vectors fix the ephemeral key. If the library ever asks for
/// more than was drawn, it gets zeros and `overdrawn` is set, and the caller
/// discards the result.
struct PredrawnRng {
    bytes: Zeroizing<[u8; IKM_LEN]>,
    used: usize,
    overdrawn: bool,
}

impl PredrawnRng {
    fn new(ikm: &[u8; IKM_LEN]) -> Self {
        let mut bytes = Zeroizing::new([0u8; IKM_LEN]);
        bytes.copy_from_slice(ikm);
        PredrawnRng {
            bytes,
            used: 0,
            overdrawn: false,
        }
    }
}

impl hpke::rand_core::RngCore for PredrawnRng {
    fn next_u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.fill_bytes(&mut b);
        u32::from_le_bytes(b)
    }

    fn next_u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.fill_bytes(&mut b);
        u64::from_le_bytes(b)
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        let end = self.used.saturating_add(dest.len());
        match self.bytes.get(self.used..end) {
            Some(src) => {
                dest.copy_from_slice(src);
                self.used = end;
            }
            None => {
                dest.zeroize();
                self.overdrawn = true;
            }
        }
    }
}

impl hpke::rand_core::CryptoRng for PredrawnRng {}

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
    let mut ikm = Zeroizing::new([0u8; IKM_LEN]);
    OsRng
        .try_fill_bytes(&mut ikm[..])
        .map_err(|_| SealError::Randomness)?;
    seal_keys_with_ikm(
        recipient_public_key_sec1,
        document_sha384,
        request_hash,
        keys,
        identity,
        &ikm,
    )
}

/// [`seal_keys`] with the KEM's ephemeral input keying material given: for
/// test vectors only.
pub(crate) fn seal_keys_with_ikm(
    recipient_public_key_sec1: &[u8],
    document_sha384: &[u8; HASH_LEN],
    request_hash: &[u8; HASH_LEN],
    keys: &[ReleasedKey],
    identity: &VerifierIdentity,
    ikm: &[u8; IKM_LEN],
) -> Result<SealedKeys, SealError> {
    let recipient_error = || SealError::RecipientKey {
        expected: P384_PUBLIC_KEY_LEN,
        found: recipient_public_key_sec1.len(),
    };
    let recipient_bytes: &[u8; P384_PUBLIC_KEY_LEN] = recipient_public_key_sec1
        .try_into()
        .map_err(|_| recipient_error())?;
    if recipient_bytes.first() != Some(&0x04)
        || <Kem as hpke::Kem>::PublicKey::from_bytes(recipient_bytes).is_err()
    {
        return Err(recipient_error());
    }

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

    let payload = encode_payload(keys)?;
    seal_payload_with_ikm(
        recipient_bytes,
        document_sha384,
        request_hash,
        payload,
        identity,
        ikm,
    )
}

/// Seal and sign an encoded payload. Separate so that tests can seal payloads
/// that [`encode_payload`] would never produce.
pub(crate) fn seal_payload_with_ikm(
    recipient_bytes: &[u8; P384_PUBLIC_KEY_LEN],
    document_sha384: &[u8; HASH_LEN],
    request_hash: &[u8; HASH_LEN],
    mut payload: Zeroizing<Vec<u8>>,
    identity: &VerifierIdentity,
    ikm: &[u8; IKM_LEN],
) -> Result<SealedKeys, SealError> {
    let recipient = <Kem as hpke::Kem>::PublicKey::from_bytes(recipient_bytes).map_err(|_| {
        SealError::RecipientKey {
            expected: P384_PUBLIC_KEY_LEN,
            found: recipient_bytes.len(),
        }
    })?;
    if payload.len() > MAX_SEALED_CIPHERTEXT_LEN.saturating_sub(TAG_LEN) {
        // Unreachable through `seal_keys` (64 keys of bounded size stay far
        // below); kept so the ciphertext limit holds by construction.
        return Err(SealError::PayloadTooLarge {
            found: payload.len(),
            max: MAX_SEALED_CIPHERTEXT_LEN.saturating_sub(TAG_LEN),
        });
    }
    let info = hpke_info(document_sha384, request_hash);
    let mut rng = PredrawnRng::new(ikm);
    let (encapped, tag) = hpke::single_shot_seal_in_place_detached::<Aead, Kdf, Kem, _>(
        &OpModeS::Base,
        &recipient,
        &info,
        &mut payload[..],
        HPKE_AAD,
        &mut rng,
    )
    .map_err(|e| SealError::Hpke {
        detail: e.to_string(),
    })?;
    if rng.overdrawn {
        return Err(SealError::Hpke {
            detail: "the KEM drew more randomness than RFC 9180 specifies".to_owned(),
        });
    }

    let mut enc = [0u8; P384_PUBLIC_KEY_LEN];
    enc.copy_from_slice(&encapped.to_bytes());
    // `payload` now holds ciphertext; copy it out with the tag. The buffer is
    // zeroized on drop either way.
    let mut ciphertext = Vec::with_capacity(payload.len().saturating_add(TAG_LEN));
    ciphertext.extend_from_slice(&payload[..]);
    ciphertext.extend_from_slice(&tag.to_bytes());

    let signature = identity.sign(&transcript_bytes(&TranscriptFields {
        document_sha384,
        request_hash,
        recipient_public_key: recipient_bytes,
        enc: &enc,
        ciphertext: &ciphertext,
    }))?;

    Ok(SealedKeys {
        document_sha384: *document_sha384,
        request_hash: *request_hash,
        enc,
        ciphertext,
        signature,
    })
}

/// The enclave's ephemeral HPKE key pair for one key-release session
/// (DHKEM(P-384)). The private half is zeroized on drop, cannot be exported
/// and is never shown by `Debug`.
pub struct EphemeralKeyPair {
    private: <Kem as hpke::Kem>::PrivateKey,
    public: [u8; P384_PUBLIC_KEY_LEN],
}

impl EphemeralKeyPair {
    /// A new key pair from the operating system's random source.
    pub fn generate() -> Result<Self, EphemeralKeyError> {
        let mut ikm = Zeroizing::new([0u8; IKM_LEN]);
        OsRng
            .try_fill_bytes(&mut ikm[..])
            .map_err(|_| EphemeralKeyError::Randomness)?;
        Ok(Self::derive(&ikm))
    }

    /// RFC 9180 `DeriveKeyPair(ikm)`: for test vectors only.
    pub(crate) fn derive(ikm: &[u8; IKM_LEN]) -> Self {
        let (private, public_key) = Kem::derive_keypair(ikm);
        let mut public = [0u8; P384_PUBLIC_KEY_LEN];
        public.copy_from_slice(&public_key.to_bytes());
        EphemeralKeyPair { private, public }
    }

    /// The public key, uncompressed SEC1 (97 bytes): what goes in the
    /// attestation document's `public_key`.
    pub fn public_key_sec1(&self) -> [u8; P384_PUBLIC_KEY_LEN] {
        self.public
    }
}

impl fmt::Debug for EphemeralKeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EphemeralKeyPair")
            .field("public_key", &hex(&self.public))
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
    let transcript = transcript_bytes(&TranscriptFields {
        document_sha384: &sealed.document_sha384,
        request_hash: &sealed.request_hash,
        recipient_public_key: &ephemeral.public,
        enc: &sealed.enc,
        ciphertext: &sealed.ciphertext,
    });
    pinned
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

    let encapped =
        <Kem as hpke::Kem>::EncappedKey::from_bytes(&sealed.enc).map_err(|_| OpenError::Decrypt)?;
    let body_len = sealed.ciphertext.len().saturating_sub(TAG_LEN);
    let (body, tag) = sealed
        .ciphertext
        .split_at_checked(body_len)
        .ok_or(OpenError::Decrypt)?;
    let tag = AeadTag::<Aead>::from_bytes(tag).map_err(|_| OpenError::Decrypt)?;
    let mut plaintext = Zeroizing::new(body.to_vec());
    let info = hpke_info(document_sha384, request_hash);
    hpke::single_shot_open_in_place_detached::<Aead, Kdf, Kem>(
        &OpModeR::Base,
        &ephemeral.private,
        &encapped,
        &info,
        &mut plaintext[..],
        HPKE_AAD,
        &tag,
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
