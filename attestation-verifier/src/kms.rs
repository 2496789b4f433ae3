//! The key hierarchy made persistent: master-key records, policies,
//! administrators and the verifier's identity in the encrypted store, key
//! material in a [`KeyBackend`].
//!
//! Every mutation takes the store's cross-process lock, reads the current
//! record, applies a pure transition from [`crate::keys`], and writes it back
//! atomically before the lock is released: concurrent commands serialise and
//! a crash leaves either the old or the new record.
//!
//! # Audit first
//!
//! With an audit log bound ([`Kms::bind_audit`], as every command and the
//! service do), a change is made only after its audit record is on disk:
//! under the lock, the transition is first planned on a copy with no side
//! effect (checking its preconditions and learning the resulting version);
//! then an *intent* (which record it changes, and a digest of that record
//! before) is written to the store, the `allowed` audit record is appended
//! (fsync'd) and anchored, the intent is marked recorded, and only then are
//! the material and the record written and the intent removed. If the
//! audit record cannot be written, nothing changes. If the process dies
//! between the audit record and the change, the next change or command
//! start ([`Kms::resolve_interrupted`]) finds the intent, compares the
//! record with its digest, and when the change did not take effect appends
//! a `refused` record saying that the allowed one is void. So a crash
//! leaves a change either audited and in force, or audited as interrupted.
//! A recorded destruction is the exception: it may have destroyed some
//! material before it stopped, so it is finished, never voided. A key
//! release reads the intent too ([`Kms::release_withdrawn`]).
//!
//! The audit anchor (the log head kept in the store, authenticated) only
//! moves forward along the chain it anchors: [`Kms::anchor_audit`] checks
//! that the log holds the anchored record where it was anchored before
//! moving it. Only [`Kms::reset_audit_anchor`] (the audited operator
//! recovery) moves it elsewhere.

mod job_authorisation;
pub use job_authorisation::{
    admit_run, AuthorisationRecord, AuthorisationRefusal, Revocation, RunRefusal,
    KIND_AUTHORISATION,
};

use crate::audit::{Actor, AuditAnchor, AuditError, AuditLog, Decision, NewRecord};
use crate::auth::AdminRecord;
use crate::keys::{self, CmkRecord, DataKey, KeyError, KeyName, WrappedDataKey};
use kluis_hsm::{HsmStoreConfig, Pkcs11Backend, Token};
use kluis_keystore::{KeyBackend, LocalBackend, RootSecret, Store, StoreError, StoreGuard};
use sha2::Digest as _;
use std::path::Path;
use std::sync::Arc;

const KIND_CMK: &str = "cmk";
const KIND_POLICY: &str = "policy";
/// Every policy text ever set, by `<key>@<sha256 hex of the text>`.
const KIND_POLICY_VERSION: &str = "policy-version";
/// How a `policy.set` audit record names the policy it set.
pub const POLICY_REASON_PREFIX: &str = "policy sha256 ";
const KIND_ADMIN: &str = "admin";
const KIND_SYSTEM: &str = "system";
const ID_IDENTITY: &str = "verifier-identity";
/// In HSM mode: the public key of the identity key pair in the token.
const ID_IDENTITY_IN_TOKEN: &str = "verifier-identity-in-token";
const ID_AUDIT_HEAD: &str = "audit-head";
const ID_INTENT: &str = "intent";

/// A change begun but not known to be in force (see the module
/// documentation).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Intent {
    operation: String,
    key_id: Option<String>,
    key_version: Option<u32>,
    /// The record the change writes.
    kind: String,
    id: String,
    /// SHA-256 of that record's plaintext before the change (`None`: absent).
    before: Option<String>,
    /// When the change began, Unix ms.
    time_ms: u64,
    /// The change's `allowed` record was written and anchored (the intent
    /// is rewritten with this set before anything changes). Only a recorded
    /// destruction is finished when interrupted; any other is voided.
    #[serde(default)]
    recorded: bool,
}

/// The audit log a [`Kms`] writes each change's record to, and who acts.
#[derive(Debug, Clone)]
struct AuditBinding {
    log: Arc<AuditLog>,
    actor: Actor,
}

/// What a change is, for its audit record.
struct Change<'a> {
    operation: &'a str,
    key: Option<&'a KeyName>,
    reason: Option<String>,
    /// For a change to a job authorisation: its id, purpose and case, in
    /// the record's hashed `job` field.
    job: Option<crate::audit::JobContext>,
}

/// A backend that does nothing: transitions are planned with it before
/// their audit record is written, so planning has no side effect.
struct DryRun;

impl KeyBackend for DryRun {
    fn name(&self) -> &'static str {
        "dry-run"
    }
    fn create_material(&self, _: &StoreGuard<'_>, _: &str) -> Result<(), StoreError> {
        Ok(())
    }
    fn wrap(&self, id: &str, _: &[u8], _: &[u8]) -> Result<Vec<u8>, StoreError> {
        Err(StoreError::MaterialNotFound { id: id.to_owned() })
    }
    fn unwrap(
        &self,
        id: &str,
        _: &[u8],
        _: &[u8],
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, StoreError> {
        Err(StoreError::MaterialNotFound { id: id.to_owned() })
    }
    fn destroy_material(&self, _: &StoreGuard<'_>, _: &str) -> Result<(), StoreError> {
        Ok(())
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn audit_error(e: impl std::fmt::Display) -> KeyError {
    KeyError::Audit(e.to_string())
}

/// The SHA-256 (lowercase hex) of a policy text, as audit records name it.
pub fn policy_sha256(text: &str) -> String {
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

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
    audit: Option<AuditBinding>,
    hsm: Option<Hsm>,
}

/// A store in HSM mode: its token and `hsm.json`.
struct Hsm {
    token: Arc<Token>,
    config: HsmStoreConfig,
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
        if HsmStoreConfig::read(dir)?.is_some() {
            return Err(KeyError::InvalidArgument(format!(
                "the store {} keeps its keys in an HSM: open it with the token's PIN \
                 (--hsm-pin-file FILE or KLUIS_HSM_PIN), not a root secret",
                dir.display()
            )));
        }
        let store = Arc::new(Store::open(dir, secret)?);
        Ok(Self::with_local_backend(store))
    }

    /// Create a new store in the PostgreSQL database `db` (applying its
    /// schema migrations first), shared by every replica that opens it.
    pub fn init_database(
        db: kluis_keystore::Database,
        secret: RootSecret,
    ) -> Result<Self, KeyError> {
        let store = Arc::new(Store::init_database(db, secret)?);
        Ok(Self::with_local_backend(store))
    }

    /// Open the store in the PostgreSQL database `db`.
    pub fn open_database(
        db: kluis_keystore::Database,
        secret: RootSecret,
    ) -> Result<Self, KeyError> {
        if Self::database_hsm_config(&db)?.is_some() {
            return Err(KeyError::InvalidArgument(format!(
                "the store in {} keeps its keys in an HSM: open it with the token's PIN \
                 (--hsm-pin-file FILE or KLUIS_HSM_PIN), not a root secret",
                db.target()
            )));
        }
        let store = Arc::new(Store::open_database(db, secret)?);
        Ok(Self::with_local_backend(store))
    }

    /// Create a new store in the database `db` whose master keys, record
    /// root and identity key live in `token` (as [`Kms::init_hsm`]; the
    /// token settings are kept in the database). Every replica reaches the
    /// same token (a network HSM partition).
    pub fn init_hsm_database(
        db: kluis_keystore::Database,
        token: Arc<Token>,
    ) -> Result<Self, KeyError> {
        let (config, root) = HsmStoreConfig::create(&token)?;
        let json = config.to_json()?;
        let store = Arc::new(Store::init_database_with(
            db,
            RootSecret::from_key_bytes(root),
            Some((HsmStoreConfig::DATABASE_SETTING, &json)),
        )?);
        Ok(Self::with_token(store, token, config))
    }

    /// Whether the store in `db` keeps its keys in an HSM.
    pub fn is_hsm_database(db: &kluis_keystore::Database) -> Result<bool, KeyError> {
        Ok(Self::database_hsm_config(db)?.is_some())
    }

    fn database_hsm_config(
        db: &kluis_keystore::Database,
    ) -> Result<Option<HsmStoreConfig>, KeyError> {
        db.check_schema()?;
        match db.config(HsmStoreConfig::DATABASE_SETTING)? {
            Some(text) => Ok(Some(HsmStoreConfig::parse(&text, db.target())?)),
            None => Ok(None),
        }
    }

    /// Open a store in the database `db` whose keys are in an HSM: the token
    /// its settings name, logged in with `pin`, unwraps the store's root.
    pub fn open_hsm_database(
        db: kluis_keystore::Database,
        pin: zeroize::Zeroizing<String>,
    ) -> Result<Self, KeyError> {
        let config = Self::database_hsm_config(&db)?.ok_or_else(|| {
            KeyError::InvalidArgument(format!(
                "the store in {} is not in HSM mode: open it with its root secret",
                db.target()
            ))
        })?;
        let token = Arc::new(Token::open(&config.token_config(), pin)?);
        let root = config.unwrap_root(&token)?;
        let store = Arc::new(Store::open_database(db, RootSecret::from_key_bytes(root))?);
        Ok(Self::with_token(store, token, config))
    }

    fn with_local_backend(store: Arc<Store>) -> Self {
        let backend: Arc<dyn KeyBackend> = Arc::new(LocalBackend::new(Arc::clone(&store)));
        Kms {
            store,
            backend,
            audit: None,
            hsm: None,
        }
    }

    /// Create a new store in `dir` whose master keys, record-encryption
    /// root and identity key live in `token` (see [`kluis_hsm`]). The store
    /// remembers the token in `dir/hsm.json`; there is no root key file.
    /// The identity key pair is generated in the token; record it with
    /// [`Kms::record_token_identity`] once the audit log is bound.
    pub fn init_hsm(dir: &Path, token: Arc<Token>) -> Result<Self, KeyError> {
        let (config, root) = HsmStoreConfig::create(&token)?;
        let store = Arc::new(Store::init(dir, RootSecret::from_key_bytes(root))?);
        config.write_new(store.path())?;
        Ok(Self::with_token(store, token, config))
    }

    /// Whether `dir` is a store in HSM mode (it has `hsm.json`).
    pub fn is_hsm_store(dir: &Path) -> Result<bool, KeyError> {
        Ok(HsmStoreConfig::read(dir)?.is_some())
    }

    /// Open a store in HSM mode: the token named in `dir/hsm.json`, logged
    /// in with `pin`, unwraps the store's root.
    pub fn open_hsm(dir: &Path, pin: zeroize::Zeroizing<String>) -> Result<Self, KeyError> {
        let config = HsmStoreConfig::read(dir)?.ok_or_else(|| {
            KeyError::InvalidArgument(format!(
                "the store {} is not in HSM mode (no hsm.json): open it with its root secret",
                dir.display()
            ))
        })?;
        let token = Arc::new(Token::open(&config.token_config(), pin)?);
        let root = config.unwrap_root(&token)?;
        let store = Arc::new(Store::open(dir, RootSecret::from_key_bytes(root))?);
        Ok(Self::with_token(store, token, config))
    }

    fn with_token(store: Arc<Store>, token: Arc<Token>, config: HsmStoreConfig) -> Self {
        let backend: Arc<dyn KeyBackend> =
            Arc::new(Pkcs11Backend::new(Arc::clone(&token), Arc::clone(&store)));
        Kms {
            store,
            backend,
            audit: None,
            hsm: Some(Hsm { token, config }),
        }
    }

    /// The name of the key backend: `"local"` or `"pkcs11"`.
    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    /// The token of a store in HSM mode.
    pub fn token(&self) -> Option<&Arc<Token>> {
        self.hsm.as_ref().map(|hsm| &hsm.token)
    }

    /// Write every change's audit record to `log`, as `actor`, before
    /// making it (see the module documentation). Without a binding (tests
    /// of the hierarchy alone) changes are not audited.
    pub fn bind_audit(&mut self, log: Arc<AuditLog>, actor: Actor) {
        self.audit = Some(AuditBinding { log, actor });
    }

    /// Who the audit records of further changes name.
    pub fn set_audit_actor(&mut self, actor: Actor) {
        if let Some(binding) = &mut self.audit {
            binding.actor = actor;
        }
    }

    /// The bound audit log.
    pub fn audit_log(&self) -> Option<&Arc<AuditLog>> {
        self.audit.as_ref().map(|b| &b.log)
    }

    /// Append `record` to the bound log and anchor it (under the store lock,
    /// so that commands do not interleave).
    pub fn append_audit(&self, record: NewRecord) -> Result<AuditAnchor, KeyError> {
        let binding = self
            .audit
            .as_ref()
            .ok_or_else(|| KeyError::Audit("no audit log is bound".to_owned()))?;
        let guard = self.lock()?;
        let anchor = binding.log.append_anchor(record).map_err(audit_error)?;
        self.advance_anchor(&guard, &binding.log, &anchor)?;
        Ok(anchor)
    }

    fn digest(&self, kind: &str, id: &str) -> Result<Option<String>, KeyError> {
        Ok(self
            .store
            .get(kind, id)?
            .map(|bytes| hex::encode(sha2::Sha256::digest(bytes.as_slice()))))
    }

    /// Under the lock, before a change of record `kind/id`: the intent,
    /// then the durable audit record. Nothing without a binding.
    fn journal(
        &self,
        guard: &StoreGuard<'_>,
        kind: &str,
        id: &str,
        change: Change<'_>,
        version: Option<u32>,
    ) -> Result<(), KeyError> {
        let Some(binding) = &self.audit else {
            return Ok(());
        };
        let time_ms = now_ms();
        let intent = Intent {
            operation: change.operation.to_owned(),
            key_id: change.key.map(ToString::to_string),
            key_version: version,
            kind: kind.to_owned(),
            id: id.to_owned(),
            before: self.digest(kind, id)?,
            time_ms,
            recorded: false,
        };
        self.put_json(guard, KIND_SYSTEM, ID_INTENT, &intent)?;
        let appended = binding.log.append_job(
            NewRecord {
                time_ms,
                actor: binding.actor.clone(),
                operation: change.operation.to_owned(),
                key_id: intent.key_id.clone(),
                key_version: version,
                decision: Decision::Allowed,
                reason: change.reason,
                attestation_document: None,
            },
            change.job,
        );
        match appended {
            Ok(anchor) => {
                self.advance_anchor(guard, &binding.log, &anchor)?;
                self.put_json(
                    guard,
                    KIND_SYSTEM,
                    ID_INTENT,
                    &Intent {
                        recorded: true,
                        ..intent
                    },
                )
            }
            // A record refused before anything was written: nothing was
            // recorded, so nothing may change.
            Err(e @ AuditError::InvalidRecord { .. }) => {
                let _ = self.store.delete(guard, KIND_SYSTEM, ID_INTENT);
                Err(audit_error(e))
            }
            // Any other failure may come after the record was written (a
            // database commit whose answer was lost, a line written whose
            // sync failed): nothing changes, and the record allowing it,
            // if it is there, is voided now, or by the next command if the
            // log cannot take that either (the intent stays until then).
            Err(e) => {
                self.journal_failed(guard);
                Err(audit_error(e))
            }
        }
    }

    /// After a change: it is in force, the intent goes. (If removing it
    /// fails, the next resolution finds the change in force and only
    /// removes it.)
    fn journal_done(&self, guard: &StoreGuard<'_>) {
        if self.audit.is_some() {
            if let Err(e) = self.store.delete(guard, KIND_SYSTEM, ID_INTENT) {
                tracing::warn!(error = %e, "could not remove the change intent");
            }
        }
    }

    /// After a change failed once its record was written: resolve now.
    fn journal_failed(&self, guard: &StoreGuard<'_>) {
        if let Err(e) = self.resolve_locked(guard) {
            tracing::error!(error = %e, "could not resolve an interrupted change");
        }
    }

    fn resolve_locked(&self, guard: &StoreGuard<'_>) -> Result<(), KeyError> {
        let Some(binding) = &self.audit else {
            return Ok(());
        };
        let Some(intent) = self.get_json::<Intent>(KIND_SYSTEM, ID_INTENT)? else {
            return Ok(());
        };
        let begun = crate::audit::rfc3339_millis(intent.time_ms);
        if self.digest(&intent.kind, &intent.id)? == intent.before {
            if intent.operation == "key.destroy" && intent.kind == KIND_CMK && intent.recorded {
                // A destruction that stopped part way (a crash, the token
                // failing on one version) may already have destroyed
                // material: it is never voided, it is finished, and its
                // record stands. If it cannot be finished now, the record
                // says what is known, and the intent goes (it must not block
                // every later command).
                if let Err(e) = self.finish_destruction(guard, binding, &intent) {
                    tracing::error!(error = %e, "could not finish an interrupted destruction");
                    self.record_resolution(
                        guard,
                        binding,
                        &intent,
                        Decision::Refused,
                        format!(
                            "interrupted: the destruction begun at {begun} stopped part way \
                             and could not be finished ({e}); some versions' material may \
                             be destroyed: run key destroy again"
                        ),
                    )?;
                }
            } else {
                self.record_resolution(
                    guard,
                    binding,
                    &intent,
                    Decision::Refused,
                    format!(
                        "interrupted: the change begun at {begun} did not take effect; \
                         the record allowing it is void"
                    ),
                )?;
            }
        }
        self.store.delete(guard, KIND_SYSTEM, ID_INTENT)?;
        Ok(())
    }

    /// The system's record of how the interrupted change `intent` was
    /// resolved (same operation, key and version), anchored.
    fn record_resolution(
        &self,
        guard: &StoreGuard<'_>,
        binding: &AuditBinding,
        intent: &Intent,
        decision: Decision,
        reason: String,
    ) -> Result<(), KeyError> {
        let anchor = binding
            .log
            .append_anchor(NewRecord {
                time_ms: now_ms(),
                actor: Actor::System,
                operation: intent.operation.clone(),
                key_id: intent.key_id.clone(),
                key_version: intent.key_version,
                decision,
                reason: Some(reason),
                attestation_document: None,
            })
            .map_err(audit_error)?;
        self.advance_anchor(guard, &binding.log, &anchor)
    }

    /// Completes the interrupted `key.destroy` of `intent`: a record saying
    /// so, every version's material destroyed (destroying destroyed
    /// material succeeds), the key's record written as destroyed. The
    /// caller removes the intent, and records a failure if there is one.
    fn finish_destruction(
        &self,
        guard: &StoreGuard<'_>,
        binding: &AuditBinding,
        intent: &Intent,
    ) -> Result<(), KeyError> {
        let name = KeyName::parse(&intent.id)?;
        let mut record = self.key(&name)?;
        // The destruction was admitted (its waiting period over, by the
        // clock of the command that began it) before its intent was
        // written: it is not judged again by another clock.
        let at_ms = match record.state {
            keys::KeyState::PendingDeletion { after_ms } => intent.time_ms.max(after_ms),
            _ => intent.time_ms,
        };
        // Audit first: the record that it is being finished, then the
        // material, then the key's record. (Interrupted again, it is
        // finished again, under one more such record.)
        let begun = crate::audit::rfc3339_millis(intent.time_ms);
        self.record_resolution(
            guard,
            binding,
            intent,
            Decision::Allowed,
            format!(
                "completed: the destruction begun at {begun} was interrupted, \
                 and is finished now: every version's material destroyed"
            ),
        )?;
        keys::destroy(self.backend.as_ref(), guard, &mut record, at_ms)?;
        self.put_json(guard, KIND_CMK, name.as_str(), &record)
    }

    /// Resolve a change that a crash interrupted after its audit record
    /// (see the module documentation). Commands call this at start.
    pub fn resolve_interrupted(&self) -> Result<(), KeyError> {
        let guard = self.lock()?;
        self.resolve_locked(&guard)
    }

    /// The store lock for a change: an interrupted change is resolved first.
    fn change_lock(&self) -> Result<StoreGuard<'_>, KeyError> {
        let guard = self.lock()?;
        self.resolve_locked(&guard)?;
        Ok(guard)
    }

    /// Write `value` as record `kind/id` after its audit record.
    fn put_audited<T: serde::Serialize>(
        &self,
        guard: &StoreGuard<'_>,
        kind: &str,
        id: &str,
        value: &T,
        change: Change<'_>,
    ) -> Result<(), KeyError> {
        self.journal(guard, kind, id, change, None)?;
        match self.put_json(guard, kind, id, value) {
            Ok(()) => {
                self.journal_done(guard);
                Ok(())
            }
            Err(e) => {
                self.journal_failed(guard);
                Err(e)
            }
        }
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
        decode_json(kind, id, self.store.get(kind, id)?)
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

    /// Apply `change` to a key's record under the lock and save it, after
    /// its audit record (`operation`, with the version `version` picks).
    /// The transition is planned first with no side effect; when `always`
    /// is false and the plan changes nothing, nothing is written or audited.
    fn modify<T>(
        &self,
        name: &KeyName,
        operation: &str,
        reason: Option<String>,
        always: bool,
        version: impl Fn(&T) -> Option<u32>,
        change: impl Fn(&dyn KeyBackend, &StoreGuard<'_>, &mut CmkRecord) -> Result<T, KeyError>,
    ) -> Result<(T, CmkRecord), KeyError> {
        let guard = self.change_lock()?;
        let original = self.key(name)?;
        if self.audit.is_some() {
            let mut planned = original.clone();
            let out = change(&DryRun, &guard, &mut planned)?;
            if !always && planned == original {
                return Ok((out, original));
            }
            let what = Change {
                operation,
                key: Some(name),
                reason,
                job: None,
            };
            self.journal(&guard, KIND_CMK, name.as_str(), what, version(&out))?;
        }
        let mut record = original;
        let result = change(self.backend.as_ref(), &guard, &mut record).and_then(|out| {
            self.put_json(&guard, KIND_CMK, name.as_str(), &record)
                .map(|()| out)
        });
        match result {
            Ok(out) => {
                self.journal_done(&guard);
                Ok((out, record))
            }
            Err(e) => {
                self.journal_failed(&guard);
                Err(e)
            }
        }
    }

    /// Create a master key.
    pub fn create_key(
        &self,
        name: &KeyName,
        rotation_days: u32,
        now_ms: u64,
    ) -> Result<CmkRecord, KeyError> {
        let guard = self.change_lock()?;
        if self.store.get(KIND_CMK, name.as_str())?.is_some() {
            return Err(KeyError::AlreadyExists(name.to_string()));
        }
        // Plan (checks the arguments), record, then create the material.
        keys::create(&DryRun, &guard, name.clone(), rotation_days, now_ms)?;
        let change = Change {
            operation: "key.create",
            key: Some(name),
            reason: None,
            job: None,
        };
        self.journal(&guard, KIND_CMK, name.as_str(), change, Some(1))?;
        let result = keys::create(
            self.backend.as_ref(),
            &guard,
            name.clone(),
            rotation_days,
            now_ms,
        )
        .and_then(|record| {
            self.put_json(&guard, KIND_CMK, name.as_str(), &record)
                .map(|()| record)
        });
        match result {
            Ok(record) => {
                self.journal_done(&guard);
                Ok(record)
            }
            Err(e) => {
                self.journal_failed(&guard);
                Err(e)
            }
        }
    }

    /// Rotate a master key on demand; returns the new version.
    pub fn rotate_key(&self, name: &KeyName, now_ms: u64) -> Result<u32, KeyError> {
        self.modify(
            name,
            "key.rotate",
            None,
            true,
            |v| Some(*v),
            |b, g, r| keys::rotate(b, g, r, now_ms),
        )
        .map(|(v, _)| v)
    }

    /// Rotate every enabled key whose rotation is due; returns `(name, new version)`.
    pub fn rotate_due(&self, now_ms: u64) -> Result<Vec<(KeyName, u32)>, KeyError> {
        let mut rotated = Vec::new();
        for record in self.keys()? {
            if record.rotation_due(now_ms) {
                let (version, _) =
                    self.rotate_if_due(&record.name, "rotation period elapsed", now_ms)?;
                if let Some(v) = version {
                    rotated.push((record.name.clone(), v));
                }
            }
        }
        Ok(rotated)
    }

    /// Rotate `name` if its rotation is still due once the lock is held
    /// (another process may have rotated it meanwhile): the new version, if
    /// any, and the record as it now is. Audited as `key.rotate` with
    /// `reason` only when it rotates.
    fn rotate_if_due(
        &self,
        name: &KeyName,
        reason: &str,
        now_ms: u64,
    ) -> Result<(Option<u32>, CmkRecord), KeyError> {
        self.modify(
            name,
            "key.rotate",
            Some(reason.to_owned()),
            false,
            |v| *v,
            |b, g, r| {
                if r.rotation_due(now_ms) {
                    keys::rotate(b, g, r, now_ms).map(Some)
                } else {
                    Ok(None)
                }
            },
        )
    }

    /// Disable a key.
    pub fn disable_key(&self, name: &KeyName) -> Result<CmkRecord, KeyError> {
        self.modify(
            name,
            "key.disable",
            None,
            true,
            |()| None,
            |_, _, r| keys::disable(r),
        )
        .map(|(_, r)| r)
    }

    /// Enable a key.
    pub fn enable_key(&self, name: &KeyName) -> Result<CmkRecord, KeyError> {
        self.modify(
            name,
            "key.enable",
            None,
            true,
            |()| None,
            |_, _, r| keys::enable(r),
        )
        .map(|(_, r)| r)
    }

    /// Schedule a key's destruction after `wait_days`; returns when it becomes possible.
    pub fn schedule_deletion(
        &self,
        name: &KeyName,
        wait_days: u32,
        now_ms: u64,
    ) -> Result<u64, KeyError> {
        self.modify(
            name,
            "key.schedule_deletion",
            Some(format!("waiting period {wait_days} days")),
            true,
            |_| None,
            |_, _, r| keys::schedule_deletion(r, wait_days, now_ms),
        )
        .map(|(a, _)| a)
    }

    /// Cancel a scheduled deletion.
    pub fn cancel_deletion(&self, name: &KeyName) -> Result<CmkRecord, KeyError> {
        self.modify(
            name,
            "key.cancel_deletion",
            None,
            true,
            |()| None,
            |_, _, r| keys::cancel_deletion(r),
        )
        .map(|(_, r)| r)
    }

    /// Destroy a key whose waiting period is over: its material is gone.
    pub fn destroy_key(&self, name: &KeyName, now_ms: u64) -> Result<CmkRecord, KeyError> {
        self.modify(
            name,
            "key.destroy",
            None,
            true,
            |()| None,
            |b, g, r| keys::destroy(b, g, r, now_ms),
        )
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
            self.rotate_if_due(name, "rotation period elapsed (on use)", now_ms)?
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

    /// Store a key's policy (already validated by the caller). Its audit
    /// record names the policy's hash (`policy sha256 <hex>`, see
    /// [`policy_sha256`]), and every version set is kept
    /// ([`Kms::policy_version`]), so the policy in force at any record can
    /// be recovered later for an evidence bundle.
    pub fn set_policy(&self, name: &KeyName, policy: &StoredPolicy) -> Result<(), KeyError> {
        let guard = self.change_lock()?;
        // The key must exist: a policy for nothing is a typo.
        self.key(name)?;
        let digest = policy_sha256(&policy.text);
        let change = Change {
            operation: "policy.set",
            key: Some(name),
            reason: Some(format!("{POLICY_REASON_PREFIX}{digest}")),
            job: None,
        };
        let version_id = format!("{}@{digest}", name.as_str());
        if self.store.get(KIND_POLICY_VERSION, &version_id)?.is_none() {
            // Kept before the change is recorded: an unused copy is harmless.
            self.put_json(&guard, KIND_POLICY_VERSION, &version_id, policy)?;
        }
        self.put_audited(&guard, KIND_POLICY, name.as_str(), policy, change)
    }

    /// A policy that was set for `name`, by the SHA-256 (lowercase hex) of
    /// its text, as its `policy.set` audit record names it.
    pub fn policy_version(
        &self,
        name: &KeyName,
        sha256_hex: &str,
    ) -> Result<Option<StoredPolicy>, KeyError> {
        let kept: Option<StoredPolicy> = self.get_json(
            KIND_POLICY_VERSION,
            &format!("{}@{sha256_hex}", name.as_str()),
        )?;
        if kept.is_some() {
            return Ok(kept);
        }
        // Stores older than the kept versions: the current policy, if it is
        // that one.
        Ok(self
            .policy(name)?
            .filter(|p| policy_sha256(&p.text) == sha256_hex))
    }

    /// A key's policy, if one was set.
    pub fn policy(&self, name: &KeyName) -> Result<Option<StoredPolicy>, KeyError> {
        self.get_json(KIND_POLICY, name.as_str())
    }

    /// For a key release whose allowed records were just written: why it
    /// no longer stands, if it does not. The release was decided on reads
    /// made before those records (the key's state, its policy, the job's
    /// authorisation). Every change writes its intent, then its audit
    /// record, then the change; so a change whose record comes before the
    /// release's is, by now, either in force or still an intent. Either way
    /// it is seen here, and a key released after a `key.disable`,
    /// `policy.set` or `job.revoke` in the log never leaves. Rotation does
    /// not withdraw a release: the versions it was decided on stay usable.
    ///
    /// `decrypted` is the version a decrypt release unwrapped (`None` for a
    /// generate release); `decided_policy` the SHA-256 of the policy it was
    /// decided under (empty: none).
    pub fn release_withdrawn(
        &self,
        name: &KeyName,
        decrypted: Option<u32>,
        decided_policy: &str,
        authorisation: Option<&kluis_proto::AuthorisationId>,
    ) -> Result<Option<String>, KeyError> {
        let authorisation_hex = authorisation.map(kluis_proto::AuthorisationId::to_hex);
        // Read together: one round trip when the store is a database.
        let mut wanted = vec![
            (KIND_SYSTEM, ID_INTENT),
            (KIND_CMK, name.as_str()),
            (KIND_POLICY, name.as_str()),
        ];
        if let Some(hex) = &authorisation_hex {
            wanted.push((KIND_AUTHORISATION, hex.as_str()));
        }
        let raw = self.store.get_many(&wanted)?;
        let bytes = |kind: &str, id: &str| {
            wanted
                .iter()
                .position(|w| *w == (kind, id))
                .and_then(|i| raw.get(i))
                .and_then(Option::as_ref)
        };
        let json = |kind: &str, id: &str| bytes(kind, id).cloned();
        let intent: Option<Intent> =
            decode_json(KIND_SYSTEM, ID_INTENT, json(KIND_SYSTEM, ID_INTENT))?;
        let record: Option<CmkRecord> =
            decode_json(KIND_CMK, name.as_str(), json(KIND_CMK, name.as_str()))?;
        let policy: Option<StoredPolicy> =
            decode_json(KIND_POLICY, name.as_str(), json(KIND_POLICY, name.as_str()))?;
        let authorisation: Option<AuthorisationRecord> = match &authorisation_hex {
            Some(hex) => decode_json(KIND_AUTHORISATION, hex, json(KIND_AUTHORISATION, hex))?,
            None => None,
        };
        if let Some(intent) = intent {
            let on_key =
                intent.key_id.as_deref() == Some(name.as_str()) && intent.operation != "key.rotate";
            let on_authorisation = intent.kind == KIND_AUTHORISATION
                && authorisation_hex.as_deref() == Some(intent.id.as_str());
            // Under way: the record it changes is still as it was. Once the
            // change is in force (or the intent is a leftover of one that
            // is), the checks below see the record itself.
            let unchanged = bytes(&intent.kind, &intent.id)
                .map(|b| hex::encode(sha2::Sha256::digest(b.as_slice())))
                == intent.before;
            if (on_key || on_authorisation) && unchanged {
                return Ok(Some(format!(
                    "{} was under way when the release was recorded",
                    intent.operation
                )));
            }
        }
        let record = record.ok_or_else(|| KeyError::NotFound(name.to_string()))?;
        if let Err(e) = record.require_enabled("key release") {
            return Ok(Some(e.to_string()));
        }
        if let Some(version) = decrypted {
            let usable = record
                .version(version)
                .is_some_and(|v| v.state != keys::VersionState::Destroyed);
            if !usable {
                return Ok(Some(format!("version {version} was destroyed")));
            }
        }
        let digest = policy.map(|p| policy_sha256(&p.text)).unwrap_or_default();
        if digest != decided_policy {
            return Ok(Some(format!(
                "its policy changed (now sha256 {})",
                if digest.is_empty() { "none" } else { &digest }
            )));
        }
        if let Some(r) = authorisation.and_then(|a| a.revoked) {
            return Ok(Some(format!(
                "the job's authorisation was revoked by {}",
                r.by
            )));
        }
        Ok(None)
    }

    /// Add an administrator; refuses to replace one.
    pub fn add_admin(&self, record: &AdminRecord) -> Result<(), KeyError> {
        self.add_admin_then(record, "", || Ok(()))
    }

    /// Add an administrator (audited with `reason`), running `then` (which
    /// writes their credential) after the audit record and before the
    /// record is stored: if `then` fails, no administrator is added.
    pub fn add_admin_then(
        &self,
        record: &AdminRecord,
        reason: &str,
        then: impl FnOnce() -> Result<(), KeyError>,
    ) -> Result<(), KeyError> {
        let guard = self.change_lock()?;
        if self.store.get(KIND_ADMIN, &record.name)?.is_some() {
            return Err(KeyError::InvalidArgument(format!(
                "administrator {} already exists",
                record.name
            )));
        }
        let change = Change {
            operation: "admin.create",
            key: None,
            reason: (!reason.is_empty()).then(|| reason.to_owned()),
            job: None,
        };
        self.journal(&guard, KIND_ADMIN, &record.name, change, None)?;
        match then().and_then(|()| self.put_json(&guard, KIND_ADMIN, &record.name, record)) {
            Ok(()) => {
                self.journal_done(&guard);
                Ok(())
            }
            Err(e) => {
                self.journal_failed(&guard);
                Err(e)
            }
        }
    }

    /// An administrator's stored verifier.
    pub fn admin(&self, name: &str) -> Result<Option<AdminRecord>, KeyError> {
        if crate::auth::validate_name(name).is_err() {
            return Ok(None);
        }
        self.get_json(KIND_ADMIN, name)
    }

    /// The verifier identity: the PKCS#8 key in the store, or in HSM mode
    /// the token's key pair, whose public key must be the one recorded (in
    /// the encrypted store) when it was created. `None` if not created.
    pub fn identity(&self) -> Result<Option<kluis_proto::VerifierIdentity>, KeyError> {
        match &self.hsm {
            None => {
                let Some(pkcs8) = self.identity_pkcs8()? else {
                    return Ok(None);
                };
                kluis_proto::VerifierIdentity::from_pkcs8_der(&pkcs8)
                    .map(Some)
                    .map_err(|e| KeyError::InvalidArgument(format!("verifier identity: {e}")))
            }
            Some(hsm) => {
                let Some(recorded) = self.store.get(KIND_SYSTEM, ID_IDENTITY_IN_TOKEN)? else {
                    return Ok(None);
                };
                let identity = hsm.config.identity(Arc::clone(&hsm.token))?;
                if identity.public_key_sec1().as_slice() != recorded.as_slice() {
                    return Err(KeyError::InvalidArgument(
                        "the token's identity key is not the one this store recorded \
                         (hsm.json points at another key)"
                            .to_owned(),
                    ));
                }
                Ok(Some(identity))
            }
        }
    }

    /// In HSM mode: record (audited, once) the identity key pair that
    /// [`Kms::init_hsm`] generated in the token; returns its public key.
    pub fn record_token_identity(&self) -> Result<[u8; 97], KeyError> {
        let hsm = self
            .hsm
            .as_ref()
            .ok_or_else(|| KeyError::InvalidArgument("the store is not in HSM mode".to_owned()))?;
        let public = hsm
            .token
            .p384_public(hsm.config.identity_key_id.as_bytes())?;
        self.set_identity_record(ID_IDENTITY_IN_TOKEN, &public)?;
        Ok(public)
    }

    /// The verifier identity key (PKCS#8), if created.
    pub fn identity_pkcs8(&self) -> Result<Option<zeroize::Zeroizing<Vec<u8>>>, KeyError> {
        Ok(self.store.get(KIND_SYSTEM, ID_IDENTITY)?)
    }

    /// Store the verifier identity key (PKCS#8) once.
    pub fn set_identity_pkcs8(&self, pkcs8: &[u8]) -> Result<(), KeyError> {
        if self.hsm.is_some() {
            return Err(KeyError::InvalidArgument(
                "in HSM mode the identity key is generated in the token".to_owned(),
            ));
        }
        self.set_identity_record(ID_IDENTITY, pkcs8)
    }

    fn set_identity_record(&self, id: &str, value: &[u8]) -> Result<(), KeyError> {
        let guard = self.change_lock()?;
        if self.store.get(KIND_SYSTEM, ID_IDENTITY)?.is_some()
            || self.store.get(KIND_SYSTEM, ID_IDENTITY_IN_TOKEN)?.is_some()
        {
            return Err(KeyError::InvalidArgument(
                "the verifier identity already exists".to_owned(),
            ));
        }
        let change = Change {
            operation: "identity.create",
            key: None,
            reason: None,
            job: None,
        };
        self.journal(&guard, KIND_SYSTEM, id, change, None)?;
        match self.store.put(&guard, KIND_SYSTEM, id, value) {
            Ok(()) => {
                self.journal_done(&guard);
                Ok(())
            }
            Err(e) => {
                self.journal_failed(&guard);
                Err(e.into())
            }
        }
    }

    /// The audit log head last anchored in the store.
    pub fn audit_anchor(&self) -> Result<Option<AuditAnchor>, KeyError> {
        self.get_json(KIND_SYSTEM, ID_AUDIT_HEAD)
    }

    /// Under the lock: check that `log` holds the current anchor where it
    /// was anchored (refused otherwise), then move the anchor to `new`, a
    /// head of `log`, if it is ahead: the anchor moves along its own chain,
    /// never past a gap.
    fn advance_anchor(
        &self,
        guard: &StoreGuard<'_>,
        log: &AuditLog,
        new: &AuditAnchor,
    ) -> Result<(), KeyError> {
        let current: Option<AuditAnchor> = self.get_json(KIND_SYSTEM, ID_AUDIT_HEAD)?;
        if let Some(current) = current {
            // Checked even when the anchor stays: this is how a running
            // service notices a log damaged under it.
            log.check_anchor(&current).map_err(|e| match e {
                // A database log that cannot be read now is an outage, not
                // a damaged log.
                crate::audit::AuditError::Unavailable { target, source } => {
                    KeyError::Store(StoreError::Database {
                        target,
                        action: "read the audit log in",
                        reason: source.to_string(),
                    })
                }
                e => KeyError::Audit(format!(
                    "the audit log does not continue from the anchored head {current}: {e}"
                )),
            })?;
            if current.seq >= new.seq {
                return Ok(());
            }
        }
        self.put_json(guard, KIND_SYSTEM, ID_AUDIT_HEAD, new)
    }

    /// Anchor the durable head of `log` (see [`AuditLog::durable_anchor`]);
    /// refused when `log` does not continue from the current anchor.
    pub fn anchor_audit(&self, log: &AuditLog) -> Result<(), KeyError> {
        let Some(new) = log.durable_anchor() else {
            return Ok(());
        };
        let guard = self.lock()?;
        self.advance_anchor(&guard, log, &new)
    }

    /// Operator recovery only (`audit recover`, itself audited): anchor
    /// `new` whatever was anchored before.
    pub fn reset_audit_anchor(
        &self,
        guard: &StoreGuard<'_>,
        new: &AuditAnchor,
    ) -> Result<(), KeyError> {
        self.put_json(guard, KIND_SYSTEM, ID_AUDIT_HEAD, new)
    }
}

/// A stored record's JSON, decoded.
fn decode_json<T: serde::de::DeserializeOwned>(
    kind: &str,
    id: &str,
    bytes: Option<zeroize::Zeroizing<Vec<u8>>>,
) -> Result<Option<T>, KeyError> {
    match bytes {
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;
    use crate::audit::AuditFilter;

    const T: u64 = 1_767_225_600_000;

    /// A directory store with its audit log bound, and one key made at `T`.
    fn store_with_key() -> (tempfile::TempDir, Kms, Arc<AuditLog>, KeyName) {
        let dir = tempfile::tempdir().unwrap();
        let secret = RootSecret::from_key_bytes(zeroize::Zeroizing::new([7u8; 32]));
        let mut kms = Kms::init(&dir.path().join("store"), secret).unwrap();
        let log = Arc::new(AuditLog::open(dir.path().join("audit.log")).unwrap());
        kms.bind_audit(Arc::clone(&log), Actor::System);
        let name = KeyName::parse("agency/app/prod").unwrap();
        kms.create_key(&name, 0, T).unwrap();
        (dir, kms, log, name)
    }

    /// A destruction that stopped after destroying the first version's
    /// material (a crash, or the token failing on the second) is finished
    /// when resolved, never recorded as having had no effect.
    #[test]
    fn an_interrupted_destruction_is_finished_not_voided() {
        let (_dir, kms, log, name) = store_with_key();
        kms.rotate_key(&name, T).unwrap();
        // Scheduled by a clock far ahead of this machine's: the destruction
        // was admitted by that clock, and is finished without asking again.
        let far = now_ms() + 3_650 * 86_400_000;
        let after = kms.schedule_deletion(&name, 7, far).unwrap();

        // The destruction's intent and record are written, the first
        // version's material is destroyed, and then it stops.
        {
            let guard = kms.lock().unwrap();
            let record = kms.key(&name).unwrap();
            let change = Change {
                operation: "key.destroy",
                key: Some(&name),
                reason: None,
                job: None,
            };
            kms.journal(&guard, KIND_CMK, name.as_str(), change, None)
                .unwrap();
            kms.backend
                .destroy_material(&guard, &record.versions[0].material_id)
                .unwrap();
        }
        let digest = kms
            .policy(&name)
            .unwrap()
            .map(|p| policy_sha256(&p.text))
            .unwrap_or_default();
        let why = kms.release_withdrawn(&name, None, &digest, None).unwrap();
        assert!(
            why.unwrap().contains("key.destroy"),
            "no release while it is under way"
        );

        kms.resolve_interrupted().unwrap();
        let record = kms.key(&name).unwrap();
        assert!(
            matches!(record.state, keys::KeyState::Destroyed { .. }),
            "{record:?}"
        );
        assert!(record
            .versions
            .iter()
            .all(|v| v.state == keys::VersionState::Destroyed));
        let records = log.records(&AuditFilter::default()).unwrap();
        let last = records.last().unwrap();
        assert_eq!(last.operation, "key.destroy");
        assert_eq!(last.decision, Decision::Allowed);
        assert!(
            last.reason.as_deref().unwrap().starts_with("completed"),
            "{last:?}"
        );
        assert!(!records.iter().any(|r| r
            .reason
            .as_deref()
            .is_some_and(|x| x.contains("did not take effect"))));
        assert!(after > now_ms());
    }

    /// A destruction whose `allowed` record was never written (a crash
    /// between its intent and its record) destroyed nothing, and is voided.
    #[test]
    fn an_unrecorded_destruction_is_voided_and_destroys_nothing() {
        let (_dir, kms, log, name) = store_with_key();
        let (data_key, wrapped) = kms.generate_data_key(&name, T).unwrap();
        kms.schedule_deletion(&name, 7, T).unwrap();
        {
            let guard = kms.lock().unwrap();
            let intent = Intent {
                operation: "key.destroy".to_owned(),
                key_id: Some(name.to_string()),
                key_version: None,
                kind: KIND_CMK.to_owned(),
                id: name.to_string(),
                before: kms.digest(KIND_CMK, name.as_str()).unwrap(),
                time_ms: now_ms(),
                recorded: false,
            };
            kms.put_json(&guard, KIND_SYSTEM, ID_INTENT, &intent)
                .unwrap();
        }
        kms.resolve_interrupted().unwrap();
        let record = kms.key(&name).unwrap();
        assert!(
            matches!(record.state, keys::KeyState::PendingDeletion { .. }),
            "{record:?}"
        );
        kms.cancel_deletion(&name).unwrap();
        kms.enable_key(&name).unwrap();
        assert_eq!(
            kms.decrypt_data_key(&wrapped).unwrap().expose_secret(),
            data_key.expose_secret(),
            "nothing was destroyed"
        );
        let records = log.records(&AuditFilter::default()).unwrap();
        assert!(records.iter().any(|r| r.operation == "key.destroy"
            && r.decision == Decision::Refused
            && r.reason
                .as_deref()
                .is_some_and(|x| x.contains("did not take effect"))));
    }
}
