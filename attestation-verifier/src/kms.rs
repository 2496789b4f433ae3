//! The key hierarchy made persistent: master-key records, policies,
//! administrators and the verifier's identity in the encrypted store, key
//! material in a [`KeyBackend`].
//!
//! Every mutation takes the store's cross-process lock, reads the current
//! record, applies a pure transition from [`crate::keys`], and writes it back
//! atomically before the lock is released: concurrent commands serialise and
//! a crash leaves either the old or the new record.

use crate::auth::AdminRecord;
use crate::keys::{self, CmkRecord, DataKey, KeyError, KeyName, WrappedDataKey};
use kluis_keystore::{KeyBackend, LocalBackend, RootSecret, Store, StoreGuard};
use std::path::Path;
use std::sync::Arc;

const KIND_CMK: &str = "cmk";
const KIND_POLICY: &str = "policy";
const KIND_ADMIN: &str = "admin";
const KIND_SYSTEM: &str = "system";
const ID_IDENTITY: &str = "verifier-identity";
const ID_AUDIT_HEAD: &str = "audit-head";

/// A policy as stored: the text the administrator set, and its format.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredPolicy {
    /// `toml` or `json`.
    pub format: String,
    /// The policy text, validated when it was set.
    pub text: String,
    /// Who set it.
    pub set_by: String,
    /// When, Unix ms.
    pub set_ms: u64,
}

/// The persistent key hierarchy.
pub struct Kms {
    store: Arc<Store>,
    backend: Arc<dyn KeyBackend>,
}

impl std::fmt::Debug for Kms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kms")
            .field("store", &self.store.path())
            .field("backend", &self.backend.name())
            .finish()
    }
}

impl Kms {
    /// Create a new store in `dir` (which must be empty or absent).
    pub fn init(dir: &Path, secret: RootSecret) -> Result<Self, KeyError> {
        let store = Arc::new(Store::init(dir, secret)?);
        Ok(Self::with_local_backend(store))
    }

    /// Open an existing store.
    pub fn open(dir: &Path, secret: RootSecret) -> Result<Self, KeyError> {
        let store = Arc::new(Store::open(dir, secret)?);
        Ok(Self::with_local_backend(store))
    }

    fn with_local_backend(store: Arc<Store>) -> Self {
        let backend: Arc<dyn KeyBackend> = Arc::new(LocalBackend::new(Arc::clone(&store)));
        Kms { store, backend }
    }

    /// The underlying store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Take the store lock.
    pub fn lock(&self) -> Result<StoreGuard<'_>, KeyError> {
        Ok(self.store.lock()?)
    }

    fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        kind: &str,
        id: &str,
    ) -> Result<Option<T>, KeyError> {
        match self.store.get(kind, id)? {
            None => Ok(None),
            Some(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| KeyError::CorruptRecord {
                        name: format!("{kind}/{id}"),
                        detail: e.to_string(),
                    })
            }
        }
    }

    fn put_json<T: serde::Serialize>(
        &self,
        guard: &StoreGuard<'_>,
        kind: &str,
        id: &str,
        value: &T,
    ) -> Result<(), KeyError> {
        let bytes = zeroize::Zeroizing::new(serde_json::to_vec(value).map_err(|e| {
            KeyError::CorruptRecord {
                name: format!("{kind}/{id}"),
                detail: e.to_string(),
            }
        })?);
        Ok(self.store.put(guard, kind, id, &bytes)?)
    }

    /// Load a master key's record.
    pub fn key(&self, name: &KeyName) -> Result<CmkRecord, KeyError> {
        self.get_json(KIND_CMK, name.as_str())?
            .ok_or_else(|| KeyError::NotFound(name.to_string()))
    }

    /// Every master key, by name.
    pub fn keys(&self) -> Result<Vec<CmkRecord>, KeyError> {
        let mut out = Vec::new();
        for id in self.store.list(KIND_CMK)? {
            let name = KeyName::parse(&id)?;
            out.push(self.key(&name)?);
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Apply `change` to a key's record under the lock and save it.
    fn modify<T>(
        &self,
        name: &KeyName,
        change: impl FnOnce(&dyn KeyBackend, &StoreGuard<'_>, &mut CmkRecord) -> Result<T, KeyError>,
    ) -> Result<(T, CmkRecord), KeyError> {
        let guard = self.lock()?;
        let mut record = self.key(name)?;
        let out = change(self.backend.as_ref(), &guard, &mut record)?;
        self.put_json(&guard, KIND_CMK, name.as_str(), &record)?;
        Ok((out, record))
    }

    /// Create a master key.
    pub fn create_key(
        &self,
        name: &KeyName,
        rotation_days: u32,
        now_ms: u64,
    ) -> Result<CmkRecord, KeyError> {
        let guard = self.lock()?;
        if self.store.get(KIND_CMK, name.as_str())?.is_some() {
            return Err(KeyError::AlreadyExists(name.to_string()));
        }
        let record = keys::create(
            self.backend.as_ref(),
            &guard,
            name.clone(),
            rotation_days,
            now_ms,
        )?;
        self.put_json(&guard, KIND_CMK, name.as_str(), &record)?;
        Ok(record)
    }

    /// Rotate a master key on demand; returns the new version.
    pub fn rotate_key(&self, name: &KeyName, now_ms: u64) -> Result<u32, KeyError> {
        self.modify(name, |b, g, r| keys::rotate(b, g, r, now_ms))
            .map(|(v, _)| v)
    }

    /// Rotate every enabled key whose rotation is due; returns `(name, new version)`.
    pub fn rotate_due(&self, now_ms: u64) -> Result<Vec<(KeyName, u32)>, KeyError> {
        let mut rotated = Vec::new();
        for record in self.keys()? {
            if record.rotation_due(now_ms) {
                let (version, _) = self.modify(&record.name, |b, g, r| {
                    // Re-check under the lock: another process may have rotated.
                    if r.rotation_due(now_ms) {
                        keys::rotate(b, g, r, now_ms).map(Some)
                    } else {
                        Ok(None)
                    }
                })?;
                if let Some(v) = version {
                    rotated.push((record.name.clone(), v));
                }
            }
        }
        Ok(rotated)
    }

    /// Disable a key.
    pub fn disable_key(&self, name: &KeyName) -> Result<CmkRecord, KeyError> {
        self.modify(name, |_, _, r| keys::disable(r))
            .map(|(_, r)| r)
    }

    /// Enable a key.
    pub fn enable_key(&self, name: &KeyName) -> Result<CmkRecord, KeyError> {
        self.modify(name, |_, _, r| keys::enable(r)).map(|(_, r)| r)
    }

    /// Schedule a key's destruction after `wait_days`; returns when it becomes possible.
    pub fn schedule_deletion(
        &self,
        name: &KeyName,
        wait_days: u32,
        now_ms: u64,
    ) -> Result<u64, KeyError> {
        self.modify(name, |_, _, r| {
            keys::schedule_deletion(r, wait_days, now_ms)
        })
        .map(|(a, _)| a)
    }

    /// Cancel a scheduled deletion.
    pub fn cancel_deletion(&self, name: &KeyName) -> Result<CmkRecord, KeyError> {
        self.modify(name, |_, _, r| keys::cancel_deletion(r))
            .map(|(_, r)| r)
    }

    /// Destroy a key whose waiting period is over: its material is gone.
    pub fn destroy_key(&self, name: &KeyName, now_ms: u64) -> Result<CmkRecord, KeyError> {
        self.modify(name, |b, g, r| keys::destroy(b, g, r, now_ms))
            .map(|(_, r)| r)
    }

    /// Generate a data key under the key's current version, rotating the key
    /// first if its rotation is due (the check "when the key is used").
    pub fn generate_data_key(
        &self,
        name: &KeyName,
        now_ms: u64,
    ) -> Result<(DataKey, WrappedDataKey), KeyError> {
        let record = self.key(name)?;
        let record = if record.rotation_due(now_ms) {
            self.modify(name, |b, g, r| {
                if r.rotation_due(now_ms) {
                    keys::rotate(b, g, r, now_ms).map(|_| ())
                } else {
                    Ok(())
                }
            })?
            .1
        } else {
            record
        };
        keys::generate_data_key(self.backend.as_ref(), &record)
    }

    /// Unwrap a data key (for an attested enclave or the controller's own tools).
    pub fn decrypt_data_key(&self, wrapped: &WrappedDataKey) -> Result<DataKey, KeyError> {
        let record = self.key(&wrapped.key)?;
        keys::decrypt_data_key(self.backend.as_ref(), &record, wrapped)
    }

    /// Move a wrapped data key to its key's current version.
    pub fn rewrap(&self, wrapped: &WrappedDataKey) -> Result<WrappedDataKey, KeyError> {
        let record = self.key(&wrapped.key)?;
        keys::rewrap(self.backend.as_ref(), &record, wrapped)
    }

    /// Store a key's policy (already validated by the caller).
    pub fn set_policy(&self, name: &KeyName, policy: &StoredPolicy) -> Result<(), KeyError> {
        let guard = self.lock()?;
        // The key must exist: a policy for nothing is a typo.
        self.key(name)?;
        self.put_json(&guard, KIND_POLICY, name.as_str(), policy)
    }

    /// A key's policy, if one was set.
    pub fn policy(&self, name: &KeyName) -> Result<Option<StoredPolicy>, KeyError> {
        self.get_json(KIND_POLICY, name.as_str())
    }

    /// Add an administrator; refuses to replace one.
    pub fn add_admin(&self, record: &AdminRecord) -> Result<(), KeyError> {
        let guard = self.lock()?;
        if self.store.get(KIND_ADMIN, &record.name)?.is_some() {
            return Err(KeyError::InvalidArgument(format!(
                "administrator {} already exists",
                record.name
            )));
        }
        self.put_json(&guard, KIND_ADMIN, &record.name, record)
    }

    /// An administrator's stored verifier.
    pub fn admin(&self, name: &str) -> Result<Option<AdminRecord>, KeyError> {
        if crate::auth::validate_name(name).is_err() {
            return Ok(None);
        }
        self.get_json(KIND_ADMIN, name)
    }

    /// The verifier identity key (PKCS#8), if created.
    pub fn identity_pkcs8(&self) -> Result<Option<zeroize::Zeroizing<Vec<u8>>>, KeyError> {
        Ok(self.store.get(KIND_SYSTEM, ID_IDENTITY)?)
    }

    /// Store the verifier identity key (PKCS#8) once.
    pub fn set_identity_pkcs8(&self, pkcs8: &[u8]) -> Result<(), KeyError> {
        let guard = self.lock()?;
        if self.store.get(KIND_SYSTEM, ID_IDENTITY)?.is_some() {
            return Err(KeyError::InvalidArgument(
                "the verifier identity already exists".to_owned(),
            ));
        }
        Ok(self.store.put(&guard, KIND_SYSTEM, ID_IDENTITY, pkcs8)?)
    }

    /// The audit log head last anchored in the store.
    pub fn audit_head(&self) -> Result<Option<crate::audit::AuditHead>, KeyError> {
        self.get_json(KIND_SYSTEM, ID_AUDIT_HEAD)
    }

    /// Anchor the audit log head in the store (authenticated, so truncating
    /// the log's tail is detected). Only ever moves forward: processes that
    /// anchor concurrently cannot move it back.
    pub fn set_audit_head(&self, head: &crate::audit::AuditHead) -> Result<(), KeyError> {
        let guard = self.lock()?;
        let current: Option<crate::audit::AuditHead> = self.get_json(KIND_SYSTEM, ID_AUDIT_HEAD)?;
        if current.is_some_and(|c| c.seq >= head.seq) {
            return Ok(());
        }
        self.put_json(&guard, KIND_SYSTEM, ID_AUDIT_HEAD, head)
    }
}
