//! The key schedule and the segment AEAD (all through AWS-LC).
//!
//! ```text
//! PRK        = HKDF-Extract-SHA256(salt = header salt, IKM = data key)
//! commitment = HKDF-Expand(PRK, "kluis-envelope/v1 key commitment", 32)
//! Kh         = HKDF-Expand(PRK, "kluis-envelope/v1 header tag key", 32)
//! header tag = HMAC-SHA256(Kh, header bytes before the tag)
//! H          = SHA-256(all header bytes, tag included)
//! Ks || P    = HKDF-Expand(PRK, "kluis-envelope/v1 segment key" || H, 32 + 7)
//! nonce(i,f) = P (7 bytes) || i as u32 big-endian || f (0x00 or 0x01)
//! ```

use crate::header::{COMMITMENT_LEN, HEADER_TAG_LEN, SALT_LEN};
use crate::key::DataKey;
use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use aws_lc_rs::{digest, hkdf, hmac};
use zeroize::Zeroizing;

/// Length of the AES-GCM tag that ends every segment.
pub(crate) const TAG_LEN: usize = 16;
/// Length of the derived nonce prefix.
pub(crate) const NONCE_PREFIX_LEN: usize = 7;

const LABEL_COMMITMENT: &[u8] = b"kluis-envelope/v1 key commitment";
const LABEL_HEADER_TAG: &[u8] = b"kluis-envelope/v1 header tag key";
const LABEL_SEGMENT_KEY: &[u8] = b"kluis-envelope/v1 segment key";

/// The cryptographic library failed (not an authentication failure).
#[derive(Debug, Clone, Copy)]
pub(crate) struct CryptoFailure;

/// An authentication failure (or a failure to run the AEAD at all).
#[derive(Debug, Clone, Copy)]
pub(crate) struct OpenFailure;

struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// The per-stream pseudorandom key. `hkdf::Prk` zeroizes itself on drop.
pub(crate) struct StreamSecrets {
    prk: hkdf::Prk,
}

impl StreamSecrets {
    pub(crate) fn new(key: &DataKey, salt: &[u8; SALT_LEN]) -> Self {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(key.expose_secret());
        Self { prk }
    }

    fn expand(&self, info: &[&[u8]], out: &mut [u8]) -> Result<(), CryptoFailure> {
        self.prk
            .expand(info, Len(out.len()))
            .and_then(|okm| okm.fill(out))
            .map_err(|_| CryptoFailure)
    }

    /// The key commitment stored in the header.
    pub(crate) fn commitment(&self) -> Result<[u8; COMMITMENT_LEN], CryptoFailure> {
        let mut out = [0; COMMITMENT_LEN];
        self.expand(&[LABEL_COMMITMENT], &mut out)?;
        Ok(out)
    }

    fn header_tag_key(&self) -> Result<hmac::Key, CryptoFailure> {
        let mut bytes = Zeroizing::new([0; 32]);
        self.expand(&[LABEL_HEADER_TAG], bytes.as_mut())?;
        Ok(hmac::Key::new(hmac::HMAC_SHA256, bytes.as_ref()))
    }

    /// HMAC-SHA256 over the header bytes that precede the tag.
    pub(crate) fn header_tag(
        &self,
        untagged: &[u8],
    ) -> Result<[u8; HEADER_TAG_LEN], CryptoFailure> {
        let tag = hmac::sign(&self.header_tag_key()?, untagged);
        let mut out = [0; HEADER_TAG_LEN];
        if tag.as_ref().len() != HEADER_TAG_LEN {
            return Err(CryptoFailure);
        }
        out.copy_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Checks the header tag in constant time; `Ok(false)` when it differs.
    pub(crate) fn header_tag_matches(
        &self,
        untagged: &[u8],
        tag: &[u8],
    ) -> Result<bool, CryptoFailure> {
        Ok(hmac::verify(&self.header_tag_key()?, untagged, tag).is_ok())
    }

    /// The segment cipher, bound to the exact header bytes.
    pub(crate) fn segment_cipher(&self, header: &[u8]) -> Result<SegmentCipher, CryptoFailure> {
        let header_hash = digest::digest(&digest::SHA256, header);
        let mut okm = Zeroizing::new([0; 32 + NONCE_PREFIX_LEN]);
        self.expand(&[LABEL_SEGMENT_KEY, header_hash.as_ref()], okm.as_mut())?;
        let (key_bytes, prefix_bytes) = okm.split_at(32);
        let key = UnboundKey::new(&AES_256_GCM, key_bytes).map_err(|_| CryptoFailure)?;
        let mut nonce_prefix = [0; NONCE_PREFIX_LEN];
        nonce_prefix.copy_from_slice(prefix_bytes);
        Ok(SegmentCipher {
            key: LessSafeKey::new(key),
            nonce_prefix,
        })
    }
}

/// Constant-time equality of two byte strings of public length.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    aws_lc_rs::constant_time::verify_slices_are_equal(a, b).is_ok()
}

/// 32 random bytes from the system generator.
pub(crate) fn random_salt() -> Result<[u8; SALT_LEN], CryptoFailure> {
    let mut salt = [0; SALT_LEN];
    aws_lc_rs::rand::fill(&mut salt).map_err(|_| CryptoFailure)?;
    Ok(salt)
}

/// AES-256-GCM under the per-stream key, with STREAM nonces. AWS-LC frees
/// (and cleanses) the expanded key schedule when this is dropped.
pub(crate) struct SegmentCipher {
    key: LessSafeKey,
    nonce_prefix: [u8; NONCE_PREFIX_LEN],
}

impl std::fmt::Debug for SegmentCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SegmentCipher(<redacted>)")
    }
}

impl SegmentCipher {
    fn nonce(&self, index: u32, is_final: bool) -> Nonce {
        let mut nonce = [0; NONCE_LEN];
        let (prefix, rest) = nonce.split_at_mut(NONCE_PREFIX_LEN);
        prefix.copy_from_slice(&self.nonce_prefix);
        let (counter, flag) = rest.split_at_mut(4);
        counter.copy_from_slice(&index.to_be_bytes());
        flag.fill(u8::from(is_final));
        Nonce::assume_unique_for_key(nonce)
    }

    /// Encrypts `in_out` in place; returns the tag.
    pub(crate) fn seal(
        &self,
        index: u32,
        is_final: bool,
        word: [u8; 4],
        in_out: &mut [u8],
    ) -> Result<[u8; TAG_LEN], CryptoFailure> {
        let tag = self
            .key
            .seal_in_place_separate_tag(self.nonce(index, is_final), Aad::from(word), in_out)
            .map_err(|_| CryptoFailure)?;
        let mut out = [0; TAG_LEN];
        if tag.as_ref().len() != TAG_LEN {
            return Err(CryptoFailure);
        }
        out.copy_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Encrypts `plaintext` into `out` (same length) and the tag into `tag`,
    /// leaving the plaintext untouched.
    pub(crate) fn seal_into(
        &self,
        index: u32,
        is_final: bool,
        word: [u8; 4],
        plaintext: &[u8],
        out: &mut [u8],
        tag: &mut [u8],
    ) -> Result<(), CryptoFailure> {
        self.key
            .seal_out_of_place_scatter(
                self.nonce(index, is_final),
                Aad::from(word),
                plaintext,
                out,
                &[],
                tag,
            )
            .map_err(|_| CryptoFailure)
    }

    /// Authenticates `ciphertext || tag` and decrypts it into `out` (same
    /// length as the ciphertext), leaving the ciphertext intact. On failure
    /// AWS-LC has zeroed `out`.
    pub(crate) fn open(
        &self,
        index: u32,
        is_final: bool,
        word: [u8; 4],
        ciphertext: &[u8],
        tag: &[u8],
        out: &mut [u8],
    ) -> Result<(), OpenFailure> {
        self.key
            .open_separate_gather(
                self.nonce(index, is_final),
                Aad::from(word),
                ciphertext,
                tag,
                out,
            )
            .map_err(|_| OpenFailure)
    }
}
