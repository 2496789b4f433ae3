//! The key store's error type.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong in the key store.
///
/// Messages name the file, the rule and what was expected and found; they
/// never carry key material, passphrases or record contents.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A file system operation failed.
    #[error("could not {action} {}: {source}", path.display())]
    Io {
        /// What was being done ("create", "sync the directory", …).
        action: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },

    /// `Store::init` was given a directory that already holds something.
    #[error("refusing to initialise a store in {}: the directory is not empty", path.display())]
    NotEmpty {
        /// The directory.
        path: PathBuf,
    },

    /// The directory is not a key store (no `store.meta`).
    #[error("{} is not a key store: {reason}", path.display())]
    NotAStore {
        /// The directory.
        path: PathBuf,
        /// What is missing.
        reason: &'static str,
    },

    /// The store's database could not be reached, or refused a statement.
    #[error("could not {action} {target}: {reason}")]
    Database {
        /// The database, `postgresql://user@host:port/dbname` (no password).
        target: String,
        /// What was being done ("connect to", "write a record to", …).
        action: &'static str,
        /// The server's message and SQLSTATE, or the client's error.
        reason: String,
    },

    /// The database's schema is not the one this build knows.
    #[error(
        "the database {target} has schema version {found}, this build knows version {known}{}",
        if found < known { " (run `attestation-verifier migrate --database URL`)" } else { " (upgrade this replica)" }
    )]
    SchemaVersion {
        /// The database.
        target: String,
        /// The version found.
        found: i32,
        /// The version this build reads and writes.
        known: i32,
    },

    /// `store.meta` could not be parsed or breaks a rule.
    #[error("invalid store metadata in {}: {reason}", path.display())]
    InvalidMeta {
        /// The metadata file.
        path: PathBuf,
        /// What was expected and what was found.
        reason: String,
    },

    /// `store.meta` names a format version this build does not know.
    #[error("unsupported store format version: expected {expected}, found {found}")]
    UnsupportedVersion {
        /// The version this build reads.
        expected: u32,
        /// The version in the file.
        found: u64,
    },

    /// A KDF parameter is outside the range this build accepts (a hostile or
    /// corrupt `store.meta`, or a bad request).
    #[error("Argon2id parameter {param} out of range: expected {min}..={max}, found {found}")]
    KdfParamOutOfRange {
        /// `m_cost_kib`, `t_cost` or `p_cost`.
        param: &'static str,
        /// Smallest accepted value.
        min: u64,
        /// Largest accepted value.
        max: u64,
        /// The value given.
        found: u64,
    },

    /// The store was made with Argon2id parameters below the production floor
    /// and the root secret was not built with
    /// `RootSecret::dangerous_fast_kdf_for_tests`.
    #[error(
        "the store's Argon2id parameters are below the minimum (m_cost >= {min_m_cost_kib} KiB, \
         t_cost >= {min_t_cost}): found m_cost {m_cost_kib} KiB, t_cost {t_cost}"
    )]
    WeakKdfParams {
        /// The minimum memory cost, KiB.
        min_m_cost_kib: u32,
        /// The minimum number of passes.
        min_t_cost: u32,
        /// The memory cost in `store.meta`, KiB.
        m_cost_kib: u32,
        /// The number of passes in `store.meta`.
        t_cost: u32,
    },

    /// The root secret is of another kind than the one the store was made with.
    #[error("the store was initialised with a {expected} root secret, but a {found} was given")]
    SecretKindMismatch {
        /// The kind recorded in `store.meta`.
        expected: &'static str,
        /// The kind given.
        found: &'static str,
    },

    /// An empty passphrase was given.
    #[error("the passphrase is empty")]
    EmptyPassphrase,

    /// The key-check value did not open: the root secret is not this store's
    /// (or `store.meta` was altered).
    #[error(
        "wrong root secret: the key file or passphrase does not open this store \
         (or its store.meta was altered)"
    )]
    WrongRootSecret,

    /// A key file that group or others can access.
    #[error("refusing key file {}: mode {mode:04o} gives access to group or others (expected 0600 or 0400)", path.display())]
    InsecureKeyFile {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },

    /// A key file whose contents are not a key.
    #[error("invalid key file {}: {reason}", path.display())]
    InvalidKeyFile {
        /// The key file.
        path: PathBuf,
        /// What was expected (never the file's contents).
        reason: &'static str,
    },

    /// `RootSecret::generate_key_file` would overwrite an existing file.
    #[error("refusing to overwrite the existing key file {}", path.display())]
    KeyFileExists {
        /// The key file.
        path: PathBuf,
    },

    /// `try_lock` found the store locked by another process or handle.
    #[error("the store at {} is locked by another process or handle", path.display())]
    Locked {
        /// The lock file.
        path: PathBuf,
    },

    /// A mutation was given a guard of another store.
    #[error("the lock guard belongs to another store (expected the guard of {})", path.display())]
    ForeignGuard {
        /// The directory of the store the mutation was for.
        path: PathBuf,
    },

    /// A record kind that is not a plain lowercase name.
    #[error("invalid record kind {kind:?}: {reason}")]
    InvalidKind {
        /// The kind given.
        kind: String,
        /// The rule it breaks.
        reason: &'static str,
    },

    /// A record or material id that breaks the id rules.
    #[error("invalid id {id:?}: {reason}")]
    InvalidId {
        /// The id given (ids are names, not secrets).
        id: String,
        /// The rule it breaks.
        reason: &'static str,
    },

    /// A value, or a record file, larger than the limit.
    #[error("{what} too large: at most {limit} bytes, found {found}")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// The limit, bytes.
        limit: u64,
        /// The size found, bytes.
        found: u64,
    },

    /// A record file that does not decrypt or does not belong at its path.
    #[error("corrupt or tampered record {}: {reason}", path.display())]
    CorruptRecord {
        /// The record file.
        path: PathBuf,
        /// What failed.
        reason: &'static str,
    },

    /// Randomness, key derivation or encryption failed.
    #[error("cryptographic failure while {0}")]
    Crypto(&'static str),

    /// The key material does not exist.
    #[error("key material {id:?} does not exist")]
    MaterialNotFound {
        /// The material id.
        id: String,
    },

    /// `create_material` was asked for an id that already exists.
    #[error("key material {id:?} already exists")]
    MaterialExists {
        /// The material id.
        id: String,
    },

    /// The key material was destroyed (crypto-shredded).
    #[error("key material {id:?} was destroyed")]
    MaterialDestroyed {
        /// The material id.
        id: String,
    },

    /// A key backend (an HSM, for instance) failed.
    #[error("key backend {backend} failed: {reason}")]
    Backend {
        /// The backend's name (`KeyBackend::name`).
        backend: &'static str,
        /// What failed (never key material or credentials).
        reason: String,
    },

    /// A wrapped blob is malformed, was made under other material or with
    /// other associated data, or was altered.
    #[error("could not unwrap under key material {id:?}: {reason}")]
    UnwrapFailed {
        /// The material id.
        id: String,
        /// What failed.
        reason: &'static str,
    },
}

impl StoreError {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Self::Io {
            action,
            path: path.into(),
            source,
        }
    }
}
