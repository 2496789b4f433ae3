//! Key derivation and record sealing.
//!
//! From the root secret's input keying material (the key itself, or the
//! Argon2id output) and the store's 32-byte salt, HKDF-SHA256 derives three
//! independent keys, each with its own `info` label:
//!
//! - `kluis-store-v1 records`: AES-256-GCM key sealing every record;
//! - `kluis-store-v1 names`: HMAC-SHA256 key turning `(kind, id)` into the
//!   record's file name, so the directory does not reveal ids;
//! - `kluis-store-v1 key check`: AES-256-GCM key sealing the constant in
//!   `store.meta` that tells a wrong secret from a right one;
//! - `kluis-store-v1 audit rows`: HMAC-SHA256 key authenticating each
//!   audit record a verifier writes into the database ([`AuditRowKey`]).
//!
//! The derived bytes exist only in zeroizing buffers for the instant it takes
//! to build the AWS-LC key objects, which wipe their key schedules when freed.

use std::fmt;

use aws_lc_rs::aead::{Aad, Nonce, RandomizedNonceKey, AES_256_GCM, NONCE_LEN};
use aws_lc_rs::{hkdf, hmac};
use zeroize::Zeroizing;

use crate::secret::KEY_LEN;
use crate::StoreError;

/// AES-GCM tag length, bytes.
pub(crate) const TAG_LEN: usize = 16;
/// Length of a record's file-name tag (HMAC-SHA256), bytes.
pub(crate) const NAME_TAG_LEN: usize = 32;

const INFO_RECORDS: &[u8] = b"kluis-store-v1 records";
const INFO_NAMES: &[u8] = b"kluis-store-v1 names";
const INFO_CHECK: &[u8] = b"kluis-store-v1 key check";
const INFO_AUDIT: &[u8] = b"kluis-store-v1 audit rows";

/// Length of an audit row's authenticator ([`AuditRowKey::tag`]), bytes.
pub const AUDIT_TAG_LEN: usize = 32;

/// The plaintext of the key-check value.
pub(crate) const KEY_CHECK_PLAINTEXT: &[u8; 32] = b"kluis-store-v1 key check value!!";

struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// HKDF-SHA256-Expand of `prk` with `info`, into a zeroizing buffer.
fn expand(prk: &hkdf::Prk, info: &[u8]) -> Result<Zeroizing<[u8; KEY_LEN]>, StoreError> {
    let mut out = Zeroizing::new([0u8; KEY_LEN]);
    prk.expand(&[info], Len(KEY_LEN))
        .and_then(|okm| okm.fill(out.as_mut_slice()))
        .map_err(|_| StoreError::Crypto("deriving the store keys"))?;
    Ok(out)
}

/// An AES-256-GCM key with random 96-bit nonces.
pub(crate) struct SealingKey(RandomizedNonceKey);

impl fmt::Debug for SealingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SealingKey(<redacted>)")
    }
}

impl SealingKey {
    pub(crate) fn new(key: &[u8; KEY_LEN]) -> Result<Self, StoreError> {
        RandomizedNonceKey::new(&AES_256_GCM, key)
            .map(Self)
            .map_err(|_| StoreError::Crypto("building an AES-256-GCM key"))
    }

    /// Encrypts `buffer` in place and returns `nonce || ciphertext || tag`
    /// preceded by `prefix` (the record's version byte). The plaintext in
    /// `buffer` is overwritten by the ciphertext.
    pub(crate) fn seal(
        &self,
        prefix: &[u8],
        aad: &[u8],
        buffer: &mut [u8],
    ) -> Result<Vec<u8>, StoreError> {
        let (nonce, tag) = self
            .0
            .seal_in_place_separate_tag(Aad::from(aad), buffer)
            .map_err(|_| StoreError::Crypto("encrypting"))?;
        let len = prefix
            .len()
            .saturating_add(NONCE_LEN)
            .saturating_add(buffer.len())
            .saturating_add(TAG_LEN);
        let mut out = Vec::with_capacity(len);
        out.extend_from_slice(prefix);
        out.extend_from_slice(nonce.as_ref());
        out.extend_from_slice(buffer);
        out.extend_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Opens `nonce || ciphertext || tag` (without prefix). On success returns
    /// the plaintext in a zeroizing buffer; `None` if it does not authenticate.
    pub(crate) fn open(&self, aad: &[u8], sealed: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        let (nonce, rest) = sealed.split_at_checked(NONCE_LEN)?;
        if rest.len() < TAG_LEN {
            return None;
        }
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buffer = Zeroizing::new(rest.to_vec());
        let plain_len = self
            .0
            .open_in_place(nonce, Aad::from(aad), buffer.as_mut_slice())
            .ok()?
            .len();
        buffer.truncate(plain_len);
        Some(buffer)
    }
}

/// The keys derived from the root secret for one store.
pub(crate) struct StoreKeys {
    records: SealingKey,
    names: hmac::Key,
    check: SealingKey,
    audit: AuditRowKey,
}

impl fmt::Debug for StoreKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StoreKeys(<redacted>)")
    }
}

impl StoreKeys {
    /// Derives the store keys from the input keying material and the salt.
    pub(crate) fn derive(ikm: &[u8; KEY_LEN], salt: &[u8]) -> Result<Self, StoreError> {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(ikm);
        let records = SealingKey::new(&*expand(&prk, INFO_RECORDS)?)?;
        let names = hmac::Key::new(hmac::HMAC_SHA256, expand(&prk, INFO_NAMES)?.as_slice());
        let check = SealingKey::new(&*expand(&prk, INFO_CHECK)?)?;
        let audit = AuditRowKey(hmac::Key::new(
            hmac::HMAC_SHA256,
            expand(&prk, INFO_AUDIT)?.as_slice(),
        ));
        Ok(Self {
            records,
            names,
            check,
            audit,
        })
    }

    pub(crate) fn records(&self) -> &SealingKey {
        &self.records
    }

    pub(crate) fn check(&self) -> &SealingKey {
        &self.check
    }

    pub(crate) fn audit(&self) -> &AuditRowKey {
        &self.audit
    }

    /// HMAC-SHA256 over `label || len(kind) || kind || id`: the record's name.
    pub(crate) fn name_tag(&self, kind: &str, id: &str) -> Result<[u8; NAME_TAG_LEN], StoreError> {
        let kind_len = u8::try_from(kind.len()).map_err(|_| StoreError::InvalidKind {
            kind: kind.to_owned(),
            reason: "longer than 255 bytes",
        })?;
        let mut ctx = hmac::Context::with_key(&self.names);
        ctx.update(b"kluis-store-v1 name\0");
        ctx.update(&[kind_len]);
        ctx.update(kind.as_bytes());
        ctx.update(id.as_bytes());
        let tag = ctx.sign();
        let mut out = [0u8; NAME_TAG_LEN];
        if tag.as_ref().len() != NAME_TAG_LEN {
            return Err(StoreError::Crypto("computing a record name"));
        }
        out.copy_from_slice(tag.as_ref());
        Ok(out)
    }
}

/// The key that authenticates the audit records a verifier of this store
/// writes into its database: whoever can write the database but does not
/// hold the store's root cannot add a record that a verifier accepts
/// (`kluis_audit.mac`, docs/deploy.md).
#[derive(Clone)]
pub struct AuditRowKey(hmac::Key);

impl fmt::Debug for AuditRowKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuditRowKey(<redacted>)")
    }
}

impl AuditRowKey {
    fn context(&self, seq: u64, line: &[u8]) -> hmac::Context {
        let mut ctx = hmac::Context::with_key(&self.0);
        ctx.update(b"kluis-audit-row-v1\0");
        ctx.update(&seq.to_be_bytes());
        ctx.update(&u64::try_from(line.len()).unwrap_or(u64::MAX).to_be_bytes());
        ctx.update(line);
        ctx
    }

    /// The authenticator of record `seq` stored as `line` (its bytes as
    /// written, so a reader checks them before parsing anything; the line
    /// holds `prev_hash`, which ties it to the chain before it).
    pub fn tag(&self, seq: u64, line: &[u8]) -> [u8; AUDIT_TAG_LEN] {
        let mut out = [0u8; AUDIT_TAG_LEN];
        let tag = self.context(seq, line).sign();
        if let Some(bytes) = tag.as_ref().get(..AUDIT_TAG_LEN) {
            out.copy_from_slice(bytes);
        }
        out
    }

    /// Whether `tag` is the authenticator of record `seq` stored as `line`
    /// (compared in constant time).
    pub fn verify(&self, seq: u64, line: &[u8], tag: &[u8]) -> bool {
        use subtle::ConstantTimeEq as _;
        tag.len() == AUDIT_TAG_LEN && bool::from(self.tag(seq, line).ct_eq(tag))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn seal_open_round_trip_and_aad_binding() {
        let key = SealingKey::new(&[7u8; KEY_LEN]).unwrap();
        let mut buf = b"hello world".to_vec();
        let sealed = key.seal(&[1], b"aad", &mut buf).unwrap();
        assert_ne!(&buf, b"hello world");
        assert_eq!(sealed.len(), 1 + 12 + 11 + 16);
        let body = sealed.get(1..).unwrap();
        assert_eq!(key.open(b"aad", body).unwrap().as_slice(), b"hello world");
        assert!(key.open(b"aae", body).is_none());
        let mut flipped = body.to_vec();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(key.open(b"aad", &flipped).is_none());
        assert!(key.open(b"aad", body.get(..20).unwrap()).is_none());
        assert!(key.open(b"aad", &[]).is_none());
        assert_eq!(NONCE_LEN, 12);
    }

    #[test]
    fn an_audit_row_tag_binds_its_key_position_and_hash() {
        let keys = StoreKeys::derive(&[1u8; KEY_LEN], &[2u8; 32]).unwrap();
        let other = StoreKeys::derive(&[1u8; KEY_LEN], &[3u8; 32]).unwrap();
        let key = keys.audit();
        let tag = key.tag(7, &[9u8; 48]);
        assert!(key.verify(7, &[9u8; 48], &tag));
        assert!(!key.verify(8, &[9u8; 48], &tag));
        assert!(!key.verify(7, &[8u8; 48], &tag));
        assert!(!other.audit().verify(7, &[9u8; 48], &tag));
        assert!(!key.verify(7, &[9u8; 48], &tag[..31]));
        let mut flipped = tag;
        flipped[0] ^= 1;
        assert!(!key.verify(7, &[9u8; 48], &flipped));
        assert_eq!(format!("{key:?}"), "AuditRowKey(<redacted>)");
    }

    #[test]
    fn derived_keys_differ_and_depend_on_salt() {
        let a = StoreKeys::derive(&[1u8; KEY_LEN], &[2u8; 32]).unwrap();
        let b = StoreKeys::derive(&[1u8; KEY_LEN], &[3u8; 32]).unwrap();
        assert_ne!(
            a.name_tag("k", "id").unwrap(),
            b.name_tag("k", "id").unwrap()
        );
        assert_ne!(
            a.name_tag("k", "id").unwrap(),
            a.name_tag("k", "id2").unwrap()
        );
        // The kind length prefix keeps ("ab", "c") and ("a", "bc") apart.
        assert_ne!(
            a.name_tag("ab", "c").unwrap(),
            a.name_tag("a", "bc").unwrap()
        );
        // The record key and the check key are different keys.
        let mut buf = b"x".to_vec();
        let sealed = a.records().seal(&[], b"", &mut buf).unwrap();
        assert!(a.check().open(b"", &sealed).is_none());
        assert!(a.records().open(b"", &sealed).is_some());
        assert_eq!(format!("{a:?}"), "StoreKeys(<redacted>)");
    }
}
