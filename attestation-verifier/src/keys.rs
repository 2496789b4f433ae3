//! The key hierarchy: customer master keys (CMKs) with versions, and the data
//! keys wrapped under them.
//!
//! A CMK is named `tenant/application/environment`. It is one logical key with
//! numbered versions of backing material; exactly one version is current and
//! wraps new data keys; older versions only unwrap what they wrapped. Material
//! lives in a [`KeyBackend`]; this module holds only metadata and never sees
//! CMK material.
//!
//! Lifecycle: `Enabled` ⇄ `Disabled`; either → `PendingDeletion { after }` (a
//! waiting period of at least 7 days) → `Destroyed` once the period is over
//! (material destroyed: every data key under the CMK is unrecoverable). A
//! pending deletion can be cancelled back to `Disabled`. A destroyed CMK keeps
//! its metadata as a tombstone so errors can name it.
//!
//! Everything here is a pure state transition on [`CmkRecord`] plus calls into
//! the backend; time is an argument.

use kluis_keystore::{KeyBackend, StoreGuard};
use serde::{Deserialize, Serialize};
use std::fmt;
use thiserror::Error;

/// Default automatic rotation period.
pub const DEFAULT_ROTATION_DAYS: u32 = 365;
/// Default waiting period before a scheduled deletion may be carried out.
pub const DEFAULT_DELETION_WAIT_DAYS: u32 = 30;
/// Shortest waiting period accepted.
pub const MIN_DELETION_WAIT_DAYS: u32 = 7;
/// Longest waiting period accepted.
pub const MAX_DELETION_WAIT_DAYS: u32 = 365;
/// Most versions a CMK may accumulate (a daily rotation for 27 years).
pub const MAX_VERSIONS: usize = 10_000;

const DAY_MS: u64 = 86_400_000;

/// Errors of the key hierarchy.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum KeyError {
    /// A key name that is not `tenant/application/environment`.
    #[error("invalid key name {name:?}: {reason}")]
    InvalidName {
        /// The name given.
        name: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// The HSM (PKCS#11 token) could not be used.
    #[error("HSM: {0}")]
    Hsm(#[from] kluis_hsm::HsmError),
    /// No such CMK.
    #[error("no master key named {0}")]
    NotFound(String),
    /// A CMK with that name exists.
    #[error("master key {0} already exists")]
    AlreadyExists(String),
    /// The CMK cannot be used or changed in its current state.
    #[error("master key {name} is {state}: {action} is not allowed")]
    WrongState {
        /// The key.
        name: String,
        /// Its state.
        state: String,
        /// What was attempted.
        action: &'static str,
    },
    /// The CMK (or the version a data key names) has been destroyed.
    #[error(
        "master key {name} version {version} was destroyed: data keys under it are unrecoverable"
    )]
    Destroyed {
        /// The key.
        name: String,
        /// The version.
        version: u32,
    },
    /// A wrapped data key names a version the CMK does not have.
    #[error("master key {name} has no version {version}")]
    NoSuchVersion {
        /// The key.
        name: String,
        /// The version.
        version: u32,
    },
    /// The deletion waiting period is not over.
    #[error(
        "master key {name} may be destroyed only after {}; now is {}",
        crate::audit::rfc3339_millis(*after_ms),
        crate::audit::rfc3339_millis(*now_ms)
    )]
    WaitingPeriod {
        /// The key.
        name: String,
        /// When destruction becomes possible.
        after_ms: u64,
        /// Now.
        now_ms: u64,
    },
    /// A parameter out of range.
    #[error("{0}")]
    InvalidArgument(String),
    /// A wrapped data key that does not parse or does not authenticate.
    #[error("wrapped data key is invalid: {0}")]
    BadWrappedKey(&'static str),
    /// The store or backend failed.
    #[error(transparent)]
    Store(#[from] kluis_keystore::StoreError),
    /// A stored record does not decode.
    #[error("stored record for {name} is corrupt: {detail}")]
    CorruptRecord {
        /// The key.
        name: String,
        /// What failed.
        detail: String,
    },
    /// The audit record of a change could not be written (or the audit
    /// anchor could not move along its chain), so the change was not made.
    #[error("audit: {0}")]
    Audit(String),
}

impl KeyError {
    /// Whether this is an outage of where keys and records live (the
    /// store's database, an HSM, the store lock not obtained in time)
    /// rather than a fact about the request: a key release then fails
    /// closed as `unavailable`, which a client may retry, not `denied`.
    pub fn is_outage(&self) -> bool {
        matches!(
            self,
            KeyError::Hsm(_)
                | KeyError::Store(
                    kluis_keystore::StoreError::Backend { .. }
                        | kluis_keystore::StoreError::Database { .. }
                        | kluis_keystore::StoreError::Locked { .. }
                )
        )
    }
}

/// A validated CMK name, `tenant/application/environment`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct KeyName(String);

impl KeyName {
    /// Parse and validate: three segments, each 1..=64 of `[a-z0-9._-]`,
    /// starting with a letter or digit.
    pub fn parse(name: &str) -> Result<Self, KeyError> {
        let invalid = |reason| KeyError::InvalidName {
            name: name.chars().take(200).collect(),
            reason,
        };
        let parts: Vec<&str> = name.split('/').collect();
        if parts.len() != 3 {
            return Err(invalid("expected tenant/application/environment"));
        }
        for part in parts {
            if part.is_empty() || part.len() > 64 {
                return Err(invalid("each segment must be 1 to 64 characters"));
            }
            if !part
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
            {
                return Err(invalid("segments may hold a-z, 0-9, '.', '_' and '-' only"));
            }
            if !part
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            {
                return Err(invalid("segments must start with a letter or a digit"));
            }
        }
        Ok(KeyName(name.to_owned()))
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for KeyName {
    type Error = KeyError;
    fn try_from(s: String) -> Result<Self, KeyError> {
        KeyName::parse(&s)
    }
}

impl From<KeyName> for String {
    fn from(k: KeyName) -> String {
        k.0
    }
}

impl fmt::Display for KeyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// State of a CMK.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum KeyState {
    /// Usable.
    Enabled,
    /// Not usable; can be enabled again.
    Disabled,
    /// Not usable; destroyed once `after_ms` has passed (unless cancelled).
    PendingDeletion {
        /// When destruction becomes possible.
        after_ms: u64,
    },
    /// Material gone.
    Destroyed {
        /// When.
        at_ms: u64,
    },
}

impl fmt::Display for KeyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyState::Enabled => f.write_str("enabled"),
            KeyState::Disabled => f.write_str("disabled"),
            KeyState::PendingDeletion { .. } => f.write_str("pending deletion"),
            KeyState::Destroyed { .. } => f.write_str("destroyed"),
        }
    }
}

/// State of one version of a CMK's material.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VersionState {
    /// The current version: wraps new data keys.
    Current,
    /// An older version: unwraps what it wrapped, never wraps.
    Retired,
    /// Material destroyed.
    Destroyed,
}

/// One version of a CMK.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CmkVersion {
    /// 1, 2, …
    pub version: u32,
    /// Creation time, Unix ms.
    pub created_ms: u64,
    /// The backend's id for the material.
    pub material_id: String,
    /// Its state.
    pub state: VersionState,
}

/// The metadata of a CMK. Holds no key material.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CmkRecord {
    /// Record format version.
    pub format: u8,
    /// The key's name.
    pub name: KeyName,
    /// Creation time, Unix ms.
    pub created_ms: u64,
    /// Automatic rotation period in days (0: never automatically).
    pub rotation_days: u32,
    /// Its state.
    pub state: KeyState,
    /// Every version ever created, oldest first.
    pub versions: Vec<CmkVersion>,
}

impl CmkRecord {
    /// The current version.
    pub fn current(&self) -> Option<&CmkVersion> {
        self.versions
            .iter()
            .rev()
            .find(|v| v.state == VersionState::Current)
    }

    /// Version `n`.
    pub fn version(&self, n: u32) -> Option<&CmkVersion> {
        self.versions.iter().find(|v| v.version == n)
    }

    /// True when the current version is older than the rotation period at `now_ms`.
    pub fn rotation_due(&self, now_ms: u64) -> bool {
        if self.rotation_days == 0 || self.state != KeyState::Enabled {
            return false;
        }
        self.current().is_some_and(|c| {
            now_ms.saturating_sub(c.created_ms)
                >= u64::from(self.rotation_days).saturating_mul(DAY_MS)
        })
    }

    fn wrong_state(&self, action: &'static str) -> KeyError {
        KeyError::WrongState {
            name: self.name.to_string(),
            state: self.state.to_string(),
            action,
        }
    }

    pub(crate) fn require_enabled(&self, action: &'static str) -> Result<(), KeyError> {
        match self.state {
            KeyState::Enabled => Ok(()),
            KeyState::Destroyed { .. } => Err(KeyError::Destroyed {
                name: self.name.to_string(),
                version: self.current().map_or(0, |v| v.version),
            }),
            _ => Err(self.wrong_state(action)),
        }
    }
}

/// A fresh material id for version `version` of `name`. The random part
/// makes ids unique even if an earlier attempt created material and then
/// failed to save the record: that orphan never blocks a retry.
fn material_id(name: &KeyName, version: u32) -> Result<String, KeyError> {
    use aws_lc_rs::rand::SecureRandom;
    let mut nonce = [0u8; 8];
    aws_lc_rs::rand::SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| KeyError::InvalidArgument("system randomness unavailable".to_owned()))?;
    Ok(format!(
        "cmk:{}:v{}:{}",
        name.as_str(),
        version,
        hex::encode(nonce)
    ))
}

/// Create a new CMK record with version 1, its material created in `backend`.
pub fn create(
    backend: &dyn KeyBackend,
    guard: &StoreGuard<'_>,
    name: KeyName,
    rotation_days: u32,
    now_ms: u64,
) -> Result<CmkRecord, KeyError> {
    if rotation_days > 3650 {
        return Err(KeyError::InvalidArgument(format!(
            "rotation period {rotation_days} days is longer than the maximum of 3650"
        )));
    }
    let material_id = material_id(&name, 1)?;
    backend.create_material(guard, &material_id)?;
    Ok(CmkRecord {
        format: 1,
        name,
        created_ms: now_ms,
        rotation_days,
        state: KeyState::Enabled,
        versions: vec![CmkVersion {
            version: 1,
            created_ms: now_ms,
            material_id,
            state: VersionState::Current,
        }],
    })
}

/// Add a version and make it current; older versions are retired.
pub fn rotate(
    backend: &dyn KeyBackend,
    guard: &StoreGuard<'_>,
    record: &mut CmkRecord,
    now_ms: u64,
) -> Result<u32, KeyError> {
    record.require_enabled("rotation")?;
    if record.versions.len() >= MAX_VERSIONS {
        return Err(KeyError::InvalidArgument(format!(
            "master key {} already has {MAX_VERSIONS} versions",
            record.name
        )));
    }
    let next = record
        .versions
        .iter()
        .map(|v| v.version)
        .max()
        .unwrap_or(0)
        .checked_add(1)
        .ok_or_else(|| KeyError::InvalidArgument("version counter exhausted".to_owned()))?;
    let material_id = material_id(&record.name, next)?;
    backend.create_material(guard, &material_id)?;
    for v in &mut record.versions {
        if v.state == VersionState::Current {
            v.state = VersionState::Retired;
        }
    }
    record.versions.push(CmkVersion {
        version: next,
        created_ms: now_ms,
        material_id,
        state: VersionState::Current,
    });
    Ok(next)
}

/// Disable an enabled key.
pub fn disable(record: &mut CmkRecord) -> Result<(), KeyError> {
    match record.state {
        KeyState::Enabled | KeyState::Disabled => {
            record.state = KeyState::Disabled;
            Ok(())
        }
        _ => Err(record.wrong_state("disabling")),
    }
}

/// Enable a disabled key.
pub fn enable(record: &mut CmkRecord) -> Result<(), KeyError> {
    match record.state {
        KeyState::Enabled | KeyState::Disabled => {
            record.state = KeyState::Enabled;
            Ok(())
        }
        _ => Err(record.wrong_state("enabling")),
    }
}

/// Schedule destruction after `wait_days` (7..=365). The key is unusable from now.
pub fn schedule_deletion(
    record: &mut CmkRecord,
    wait_days: u32,
    now_ms: u64,
) -> Result<u64, KeyError> {
    if !(MIN_DELETION_WAIT_DAYS..=MAX_DELETION_WAIT_DAYS).contains(&wait_days) {
        return Err(KeyError::InvalidArgument(format!(
            "waiting period must be {MIN_DELETION_WAIT_DAYS} to {MAX_DELETION_WAIT_DAYS} days, got {wait_days}"
        )));
    }
    match record.state {
        KeyState::Enabled | KeyState::Disabled => {
            let after_ms = now_ms.saturating_add(u64::from(wait_days).saturating_mul(DAY_MS));
            record.state = KeyState::PendingDeletion { after_ms };
            Ok(after_ms)
        }
        _ => Err(record.wrong_state("scheduling deletion")),
    }
}

/// Cancel a scheduled deletion; the key returns to `Disabled`.
pub fn cancel_deletion(record: &mut CmkRecord) -> Result<(), KeyError> {
    match record.state {
        KeyState::PendingDeletion { .. } => {
            record.state = KeyState::Disabled;
            Ok(())
        }
        _ => Err(record.wrong_state("cancelling deletion")),
    }
}

/// Destroy every version's material once the waiting period is over.
pub fn destroy(
    backend: &dyn KeyBackend,
    guard: &StoreGuard<'_>,
    record: &mut CmkRecord,
    now_ms: u64,
) -> Result<(), KeyError> {
    let KeyState::PendingDeletion { after_ms } = record.state else {
        return Err(record.wrong_state("destruction (schedule deletion first)"));
    };
    if now_ms < after_ms {
        return Err(KeyError::WaitingPeriod {
            name: record.name.to_string(),
            after_ms,
            now_ms,
        });
    }
    for v in &mut record.versions {
        if v.state != VersionState::Destroyed {
            backend.destroy_material(guard, &v.material_id)?;
            v.state = VersionState::Destroyed;
        }
    }
    record.state = KeyState::Destroyed { at_ms: now_ms };
    Ok(())
}

/// A 256-bit data key in the clear: the envelope's key type (zeroized on
/// drop, never printed).
pub use kluis_envelope::DataKey;

fn new_data_key() -> Result<DataKey, KeyError> {
    DataKey::generate()
        .map_err(|_| KeyError::InvalidArgument("system randomness unavailable".to_owned()))
}

/// A data key wrapped under one CMK version: travels with the data.
///
/// Encoding (all integers big-endian):
/// `b"KDK1"` ‖ u8 name length ‖ name (UTF-8) ‖ u32 version ‖ u16 length ‖
/// backend ciphertext. The backend authenticates the ciphertext with the AAD
/// `b"kluis-dk-v1"` ‖ u8 name length ‖ name ‖ u32 version, so a wrapped key
/// cannot be re-labelled with another key name or version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrappedDataKey {
    /// The CMK.
    pub key: KeyName,
    /// The CMK version that wrapped it.
    pub version: u32,
    /// Opaque backend ciphertext.
    pub ciphertext: Vec<u8>,
}

const WRAPPED_MAGIC: &[u8; 4] = b"KDK1";
/// Largest encoded wrapped key accepted.
pub const MAX_WRAPPED_LEN: usize = 1024;

impl WrappedDataKey {
    fn aad(key: &KeyName, version: u32) -> Vec<u8> {
        let name = key.as_str().as_bytes();
        let mut aad = b"kluis-dk-v1".to_vec();
        aad.push(u8::try_from(name.len()).unwrap_or(u8::MAX));
        aad.extend_from_slice(name);
        aad.extend_from_slice(&version.to_be_bytes());
        aad
    }

    /// Serialise.
    pub fn to_bytes(&self) -> Vec<u8> {
        let name = self.key.as_str().as_bytes();
        let mut out = WRAPPED_MAGIC.to_vec();
        // KeyName guarantees ≤ 194 bytes; ciphertexts are small.
        out.push(u8::try_from(name.len()).unwrap_or(u8::MAX));
        out.extend_from_slice(name);
        out.extend_from_slice(&self.version.to_be_bytes());
        out.extend_from_slice(
            &u16::try_from(self.ciphertext.len())
                .unwrap_or(u16::MAX)
                .to_be_bytes(),
        );
        out.extend_from_slice(&self.ciphertext);
        out
    }

    /// Parse, bounded and strict (no trailing bytes).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        if bytes.len() > MAX_WRAPPED_LEN {
            return Err(KeyError::BadWrappedKey("too long"));
        }
        let rest = bytes
            .strip_prefix(WRAPPED_MAGIC.as_slice())
            .ok_or(KeyError::BadWrappedKey("not a Kluis wrapped data key"))?;
        let (&name_len, rest) = rest
            .split_first()
            .ok_or(KeyError::BadWrappedKey("truncated"))?;
        let (name, rest) = split(rest, usize::from(name_len))?;
        let name = std::str::from_utf8(name)
            .map_err(|_| KeyError::BadWrappedKey("key name is not UTF-8"))?;
        let key = KeyName::parse(name).map_err(|_| KeyError::BadWrappedKey("invalid key name"))?;
        let (version, rest) = split(rest, 4)?;
        let version = u32::from_be_bytes(
            version
                .try_into()
                .map_err(|_| KeyError::BadWrappedKey("truncated"))?,
        );
        let (len, rest) = split(rest, 2)?;
        let len = u16::from_be_bytes(
            len.try_into()
                .map_err(|_| KeyError::BadWrappedKey("truncated"))?,
        );
        let (ciphertext, rest) = split(rest, usize::from(len))?;
        if !rest.is_empty() {
            return Err(KeyError::BadWrappedKey("trailing bytes"));
        }
        Ok(WrappedDataKey {
            key,
            version,
            ciphertext: ciphertext.to_vec(),
        })
    }
}

fn split(bytes: &[u8], n: usize) -> Result<(&[u8], &[u8]), KeyError> {
    if bytes.len() < n {
        return Err(KeyError::BadWrappedKey("truncated"));
    }
    Ok(bytes.split_at(n))
}

/// Generate a data key and wrap it under the CMK's current version.
pub fn generate_data_key(
    backend: &dyn KeyBackend,
    record: &CmkRecord,
) -> Result<(DataKey, WrappedDataKey), KeyError> {
    record.require_enabled("generating a data key")?;
    let current = record
        .current()
        .ok_or_else(|| record.wrong_state("generating a data key (no current version)"))?;
    let key = new_data_key()?;
    let aad = WrappedDataKey::aad(&record.name, current.version);
    let ciphertext = backend.wrap(&current.material_id, key.expose_secret(), &aad)?;
    Ok((
        key,
        WrappedDataKey {
            key: record.name.clone(),
            version: current.version,
            ciphertext,
        },
    ))
}

/// Unwrap a data key. The record must be the one the wrapped key names.
pub fn decrypt_data_key(
    backend: &dyn KeyBackend,
    record: &CmkRecord,
    wrapped: &WrappedDataKey,
) -> Result<DataKey, KeyError> {
    if record.name != wrapped.key {
        return Err(KeyError::BadWrappedKey("names another master key"));
    }
    let version = record
        .version(wrapped.version)
        .ok_or(KeyError::NoSuchVersion {
            name: record.name.to_string(),
            version: wrapped.version,
        })?;
    if version.state == VersionState::Destroyed {
        return Err(KeyError::Destroyed {
            name: record.name.to_string(),
            version: wrapped.version,
        });
    }
    record.require_enabled("decrypting a data key")?;
    let aad = WrappedDataKey::aad(&record.name, wrapped.version);
    let plain = backend
        .unwrap(&version.material_id, &wrapped.ciphertext, &aad)
        .map_err(|e| unwrap_error(e, record, wrapped.version))?;
    DataKey::from_slice(&plain)
        .map_err(|_| KeyError::BadWrappedKey("unwrapped key is not 32 bytes"))
}

/// What a failed unwrap says about the request. Only the backend's own
/// verdict on the bytes (they do not parse, or do not authenticate) makes
/// the wrapped key bad; material destroyed under the record is a destroyed
/// version; anything else (an HSM session lost, the database unreachable)
/// is the store's failure, passed on as it is, so that a key release is
/// refused as `unavailable` and the audit log records an outage, not a
/// tampered key.
fn unwrap_error(e: kluis_keystore::StoreError, record: &CmkRecord, version: u32) -> KeyError {
    use kluis_keystore::StoreError;
    match e {
        StoreError::UnwrapFailed { reason, .. } => KeyError::BadWrappedKey(reason),
        StoreError::TooLarge { .. } => KeyError::BadWrappedKey("larger than any wrapped data key"),
        StoreError::MaterialDestroyed { .. } => KeyError::Destroyed {
            name: record.name.to_string(),
            version,
        },
        other => KeyError::Store(other),
    }
}

/// Move a wrapped data key to the CMK's current version without exposing it.
pub fn rewrap(
    backend: &dyn KeyBackend,
    record: &CmkRecord,
    wrapped: &WrappedDataKey,
) -> Result<WrappedDataKey, KeyError> {
    let key = decrypt_data_key(backend, record, wrapped)?;
    let current = record
        .current()
        .ok_or_else(|| record.wrong_state("rewrapping (no current version)"))?;
    let aad = WrappedDataKey::aad(&record.name, current.version);
    let ciphertext = backend.wrap(&current.material_id, key.expose_secret(), &aad)?;
    Ok(WrappedDataKey {
        key: record.name.clone(),
        version: current.version,
        ciphertext,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use kluis_keystore::StoreError;
    use zeroize::Zeroizing;

    /// A backend whose unwrap fails with a chosen error.
    struct Failing(fn() -> StoreError);

    impl KeyBackend for Failing {
        fn name(&self) -> &'static str {
            "failing"
        }
        fn create_material(&self, _: &StoreGuard<'_>, _: &str) -> Result<(), StoreError> {
            Ok(())
        }
        fn wrap(&self, _: &str, _: &[u8], _: &[u8]) -> Result<Vec<u8>, StoreError> {
            Err((self.0)())
        }
        fn unwrap(&self, _: &str, _: &[u8], _: &[u8]) -> Result<Zeroizing<Vec<u8>>, StoreError> {
            Err((self.0)())
        }
        fn destroy_material(&self, _: &StoreGuard<'_>, _: &str) -> Result<(), StoreError> {
            Ok(())
        }
    }

    fn record() -> CmkRecord {
        CmkRecord {
            format: 1,
            name: KeyName::parse("t/a/prod").unwrap(),
            created_ms: 0,
            rotation_days: 0,
            state: KeyState::Enabled,
            versions: vec![CmkVersion {
                version: 1,
                created_ms: 0,
                material_id: "cmk:t/a/prod:v1:00".to_owned(),
                state: VersionState::Current,
            }],
        }
    }

    fn decrypt_with(error: fn() -> StoreError) -> KeyError {
        let record = record();
        let wrapped = WrappedDataKey {
            key: record.name.clone(),
            version: 1,
            ciphertext: vec![1; 60],
        };
        match decrypt_data_key(&Failing(error), &record, &wrapped) {
            Ok(_) => panic!("a failing backend unwrapped a key"),
            Err(e) => e,
        }
    }

    #[test]
    fn an_outage_while_unwrapping_is_an_outage_not_a_bad_key() {
        let database = decrypt_with(|| StoreError::Database {
            target: "postgresql://kluis@db/kluis".to_owned(),
            action: "read a record from",
            reason: "connection reset".to_owned(),
        });
        assert!(
            matches!(database, KeyError::Store(StoreError::Database { .. })),
            "{database:?}"
        );
        assert!(database.is_outage());
        let backend = decrypt_with(|| StoreError::Backend {
            backend: "pkcs11",
            reason: "the session was closed".to_owned(),
        });
        assert!(backend.is_outage(), "{backend:?}");
    }

    #[test]
    fn bytes_that_do_not_authenticate_are_a_bad_wrapped_key() {
        let bad = decrypt_with(|| StoreError::UnwrapFailed {
            id: "cmk:t/a/prod:v1:00".to_owned(),
            reason: "does not authenticate",
        });
        assert!(
            matches!(bad, KeyError::BadWrappedKey("does not authenticate")),
            "{bad:?}"
        );
        assert!(!bad.is_outage());
        let destroyed = decrypt_with(|| StoreError::MaterialDestroyed {
            id: "cmk:t/a/prod:v1:00".to_owned(),
        });
        assert!(
            matches!(destroyed, KeyError::Destroyed { version: 1, .. }),
            "{destroyed:?}"
        );
    }
}
