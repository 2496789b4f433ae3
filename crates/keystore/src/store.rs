//! The store directory: encrypted records, atomic durable writes, locking.

use std::fmt;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::crypto::{AuditRowKey, StoreKeys, NAME_TAG_LEN};
use crate::fsutil::{self, Existing, FileIdentity, ReadError};
use crate::meta::{Meta, META_FILE};
use crate::pg::{Database, DbLock};
use crate::secret::RootSecret;
use crate::StoreError;

/// Largest record value, bytes (1 MiB).
pub const MAX_RECORD_LEN: usize = 1 << 20;
/// Longest record id, bytes.
pub const MAX_ID_LEN: usize = 1024;
/// Longest record kind, bytes.
pub const MAX_KIND_LEN: usize = 64;
/// Most records `list` returns for one kind.
pub const MAX_LIST_LEN: usize = 1 << 20;

/// The version byte that starts every record file.
const RECORD_VERSION: u8 = 1;
/// Sub-directory holding one directory per record kind.
const RECORDS_DIR: &str = "records";
/// The lock file.
const LOCK_FILE: &str = "lock";
/// Extension of record files.
const RECORD_EXT: &str = ".rec";
/// A decoded record: its id and its value.
type Record = (String, Zeroizing<Vec<u8>>);

/// How often a reader tries a record that changed while it read it.
const READ_ATTEMPTS: u32 = 4;
/// Domain label at the start of every record's associated data.
const RECORD_AAD_LABEL: &[u8] = b"kluis-store-v1\0";

/// Largest record file: version, nonce, id length, id, value, tag.
const MAX_RECORD_FILE_LEN: u64 = (1 + 12 + 2 + MAX_ID_LEN + MAX_RECORD_LEN + 16) as u64;

/// An open key store.
///
/// ```text
/// dir/                        0700
///   store.meta                0600  plaintext JSON: format, KDF, salt, key check
///   lock                      0600  empty; flock(2)ed by Store::lock
///   records/                  0700
///     <kind>/                 0700
///       <hex name tag>.rec    0600  1 version byte || 12-byte nonce || AES-256-GCM
/// ```
///
/// The name tag is HMAC-SHA256 (a key derived from the root secret) over the
/// kind and the id, so the directory reveals neither ids nor their number per
/// kind beyond the file count. A record's plaintext is `u16 id length || id ||
/// value`; its associated data is `"kluis-store-v1\0" || version || u8 kind
/// length || kind || name tag`, and on reading, the id inside must hash to the
/// file's name and equal the id asked for. A record copied or renamed to
/// another id or kind therefore fails to open.
///
/// Reading needs no lock: records are replaced by rename, so a reader sees the
/// old or the new one. Every mutation takes a [`StoreGuard`] from
/// [`Store::lock`], an exclusive lock on `dir/lock` that serialises processes.
///
/// A store can live in a PostgreSQL database instead ([`Store::init_database`],
/// [`Store::open_database`]): the same records, sealed the same way, in
/// table rows keyed by kind and name tag, with the lock an advisory lock
/// (see [`crate::pg`]).
pub struct Store {
    /// The directory, or for a database store its target
    /// (`postgresql://user@host:port/dbname`), as messages name it.
    dir: PathBuf,
    keys: StoreKeys,
    db: Option<Database>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.dir)
            .field("database", &self.db.is_some())
            .field("keys", &"<redacted>")
            .finish()
    }
}

/// An exclusive lock on a store, held until dropped.
///
/// The lock is `flock(2)` on a file descriptor of its own, so it excludes
/// other processes and other handles in this process alike. It is not
/// re-entrant: taking a second guard on the same store from the thread that
/// holds one blocks forever (`lock`) or fails (`try_lock`).
///
/// For a database store, the lock is a PostgreSQL advisory lock held by a
/// connection of its own, through which every write under the guard goes.
pub struct StoreGuard<'a> {
    store: &'a Store,
    held: Held,
}

/// What holds a [`StoreGuard`]'s lock.
enum Held {
    /// The `flock(2)`ed lock file (released when closed).
    File(#[allow(dead_code)] File),
    /// The database connection holding the advisory lock.
    Database(Box<DbLock>),
}

impl fmt::Debug for StoreGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreGuard")
            .field("dir", &self.store.dir)
            .finish_non_exhaustive()
    }
}

impl StoreGuard<'_> {
    /// The store this guard locks.
    pub fn store(&self) -> &Store {
        self.store
    }

    /// Fails with [`StoreError::ForeignGuard`] unless this guard locks
    /// `store` (a backend checks the guard it is handed is its own store's).
    pub fn check_locks(&self, store: &Store) -> Result<(), StoreError> {
        if std::ptr::eq(self.store, store) {
            Ok(())
        } else {
            Err(StoreError::ForeignGuard {
                path: store.path().to_owned(),
            })
        }
    }
}

impl Store {
    /// Creates a new store in `dir` (created with mode 0700 if missing), for
    /// `secret`, and opens it.
    ///
    /// Refuses a directory that holds anything but the leftovers of an
    /// interrupted `init` ([`StoreError::NotEmpty`]). For a passphrase, this
    /// runs Argon2id once.
    pub fn init(dir: impl AsRef<Path>, secret: RootSecret) -> Result<Self, StoreError> {
        let dir = dir.as_ref();
        fsutil::ensure_private_dir(dir)?;
        let dir = fs::canonicalize(dir).map_err(|err| StoreError::io("resolve", dir, err))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock_file = open_lock_file(&lock_path, true)?;
        lock_file
            .lock()
            .map_err(|err| StoreError::io("lock", &lock_path, err))?;

        // Under the lock: only what an interrupted init leaves may be here.
        let records = dir.join(RECORDS_DIR);
        for entry in fs::read_dir(&dir).map_err(|err| StoreError::io("list", &dir, err))? {
            let entry = entry.map_err(|err| StoreError::io("list", &dir, err))?;
            let name = entry.file_name();
            let acceptable = match name.to_str() {
                Some(LOCK_FILE) => true,
                Some(RECORDS_DIR) => is_empty_dir(&records)?,
                Some(other) => fsutil::is_leftover(other),
                None => false,
            };
            if !acceptable {
                return Err(StoreError::NotEmpty { path: dir });
            }
        }
        fsutil::clean_leftovers(&dir, 0)?;
        sync_file(&lock_file, &lock_path)?;
        fsutil::sync_dir(&dir)?;

        let (meta, keys) = Meta::create(&secret)?;
        drop(secret);
        fsutil::ensure_private_dir(&records)?;
        // store.meta goes last: a directory without it is not a store.
        if !fsutil::write_atomic(&dir, META_FILE, &meta.to_json()?, Existing::Keep)? {
            return Err(StoreError::NotEmpty { path: dir });
        }
        drop(lock_file);
        Ok(Self {
            dir,
            keys,
            db: None,
        })
    }

    /// Opens the store in `dir` with `secret`.
    ///
    /// A wrong secret gives [`StoreError::WrongRootSecret`]. If no other
    /// handle holds the lock, leftovers of interrupted writes and deletions
    /// are cleaned up.
    pub fn open(dir: impl AsRef<Path>, secret: RootSecret) -> Result<Self, StoreError> {
        let dir = dir.as_ref();
        let dir = fs::canonicalize(dir).map_err(|err| StoreError::io("open", dir, err))?;
        let meta = Meta::read(&dir)?;
        let keys = meta.unlock(&secret)?;
        drop(secret);
        let records = dir.join(RECORDS_DIR);
        match fs::symlink_metadata(&records) {
            Ok(found) if found.is_dir() => {}
            Ok(_) => {
                return Err(StoreError::NotAStore {
                    path: dir,
                    reason: "records is not a directory",
                })
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::NotAStore {
                    path: dir,
                    reason: "the records directory is missing",
                })
            }
            Err(err) => return Err(StoreError::io("inspect", &records, err)),
        }
        let store = Self {
            dir,
            keys,
            db: None,
        };
        // Creates the lock file if it went missing.
        drop(open_lock_file(&store.dir.join(LOCK_FILE), true)?);
        match store.try_lock() {
            Ok(guard) => store.clean_leftovers(&guard)?,
            Err(StoreError::Locked { .. }) => {}
            Err(err) => return Err(err),
        }
        Ok(store)
    }

    /// Creates a new store in the database `db` (applying its schema
    /// migrations first), for `secret`, and opens it. Refuses a database
    /// that already holds a store ([`StoreError::NotEmpty`]).
    pub fn init_database(db: Database, secret: RootSecret) -> Result<Self, StoreError> {
        Self::init_database_with(db, secret, None)
    }

    /// [`Store::init_database`], writing the store setting `(name, value)`
    /// in the same locked step (a store in an HSM keeps its token settings
    /// so, see [`Database::config`]).
    pub fn init_database_with(
        db: Database,
        secret: RootSecret,
        setting: Option<(&str, &[u8])>,
    ) -> Result<Self, StoreError> {
        db.migrate()?;
        let dir = db.target_path();
        let lock = db
            .lock(true)?
            .ok_or_else(|| StoreError::Locked { path: dir.clone() })?;
        if lock.holds_a_store()? {
            return Err(StoreError::NotEmpty { path: dir });
        }
        let (meta, keys) = Meta::create(&secret)?;
        drop(secret);
        if let Some((name, value)) = setting {
            lock.insert_config(name, value)?;
        }
        lock.insert_meta(&meta.to_json()?)?;
        drop(lock);
        Ok(Self {
            dir,
            keys,
            db: Some(db),
        })
    }

    /// Opens the store in the database `db` with `secret`; refuses a schema
    /// version this build does not know ([`StoreError::SchemaVersion`]).
    pub fn open_database(db: Database, secret: RootSecret) -> Result<Self, StoreError> {
        db.check_schema()?;
        let dir = db.target_path();
        let text = db.meta()?.ok_or_else(|| StoreError::NotAStore {
            path: dir.clone(),
            reason: "the database holds no store (run `attestation-verifier init --database URL`)",
        })?;
        let meta = Meta::parse(&text, &dir)?;
        let keys = meta.unlock(&secret)?;
        drop(secret);
        Ok(Self {
            dir,
            keys,
            db: Some(db),
        })
    }

    /// The store directory (absolute), or for a database store its target
    /// `postgresql://user@host:port/dbname`.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The database of a database store.
    pub fn database(&self) -> Option<&Database> {
        self.db.as_ref()
    }

    /// The key that authenticates the audit records verifiers of this store
    /// write into its database.
    pub fn audit_row_key(&self) -> AuditRowKey {
        self.keys.audit().clone()
    }

    /// Takes the store's exclusive lock, waiting for other holders.
    pub fn lock(&self) -> Result<StoreGuard<'_>, StoreError> {
        if let Some(db) = &self.db {
            let lock = db.lock(true)?.ok_or_else(|| StoreError::Locked {
                path: self.dir.clone(),
            })?;
            return Ok(StoreGuard {
                store: self,
                held: Held::Database(Box::new(lock)),
            });
        }
        let path = self.dir.join(LOCK_FILE);
        let file = open_lock_file(&path, false)?;
        file.lock()
            .map_err(|err| StoreError::io("lock", &path, err))?;
        Ok(StoreGuard {
            store: self,
            held: Held::File(file),
        })
    }

    /// Takes the store's exclusive lock if it is free; otherwise
    /// [`StoreError::Locked`].
    pub fn try_lock(&self) -> Result<StoreGuard<'_>, StoreError> {
        if let Some(db) = &self.db {
            return match db.lock(false)? {
                Some(lock) => Ok(StoreGuard {
                    store: self,
                    held: Held::Database(Box::new(lock)),
                }),
                None => Err(StoreError::Locked {
                    path: self.dir.clone(),
                }),
            };
        }
        let path = self.dir.join(LOCK_FILE);
        let file = open_lock_file(&path, false)?;
        match file.try_lock() {
            Ok(()) => Ok(StoreGuard {
                store: self,
                held: Held::File(file),
            }),
            Err(TryLockError::WouldBlock) => Err(StoreError::Locked { path }),
            Err(TryLockError::Error(err)) => Err(StoreError::io("lock", &path, err)),
        }
    }

    /// The value of record `id` of `kind`, or `None` if there is none.
    ///
    /// A record file larger than a record can be is refused without being
    /// read; one that does not authenticate, or that holds another id, gives
    /// [`StoreError::CorruptRecord`].
    pub fn get(&self, kind: &str, id: &str) -> Result<Option<Zeroizing<Vec<u8>>>, StoreError> {
        check_kind(kind)?;
        check_id(id)?;
        let tag = self.keys.name_tag(kind, id)?;
        let (path, record) = match &self.db {
            Some(db) => {
                let body = db.get_record(kind, &tag, MAX_RECORD_FILE_LEN)?;
                (self.dir.clone(), self.decode_row(kind, &tag, body)?)
            }
            None => {
                let path = self.record_path(kind, &tag);
                let record = self.read_record(kind, &tag, &path)?;
                (path, record)
            }
        };
        check_stored_id(id, path, record)
    }

    /// [`Store::get`] of several records at once: in one query when the
    /// store is in a database (a caller that must see them together, and
    /// soon, pays one round trip), one after the other in a directory.
    /// At most [`MAX_GET_MANY`] records.
    pub fn get_many(
        &self,
        wanted: &[(&str, &str)],
    ) -> Result<Vec<Option<Zeroizing<Vec<u8>>>>, StoreError> {
        if wanted.len() > MAX_GET_MANY {
            return Err(StoreError::TooLarge {
                what: "a batch of records to read",
                limit: u64::try_from(MAX_GET_MANY).unwrap_or(u64::MAX),
                found: u64::try_from(wanted.len()).unwrap_or(u64::MAX),
            });
        }
        let Some(db) = &self.db else {
            return wanted.iter().map(|(kind, id)| self.get(kind, id)).collect();
        };
        let mut tags = Vec::with_capacity(wanted.len());
        for (kind, id) in wanted {
            check_kind(kind)?;
            check_id(id)?;
            tags.push(self.keys.name_tag(kind, id)?);
        }
        let keys: Vec<(&str, &[u8])> = wanted
            .iter()
            .zip(&tags)
            .map(|((kind, _), tag)| (*kind, tag.as_slice()))
            .collect();
        let bodies = db.get_records(&keys, MAX_RECORD_FILE_LEN)?;
        wanted
            .iter()
            .zip(&tags)
            .zip(bodies)
            .map(|(((kind, id), tag), body)| {
                let record = self.decode_row(kind, tag, body)?;
                check_stored_id(id, self.dir.clone(), record)
            })
            .collect()
    }

    /// A record's row, as the database returned it, decoded.
    fn decode_row(
        &self,
        kind: &str,
        tag: &[u8; NAME_TAG_LEN],
        body: Option<Vec<u8>>,
    ) -> Result<Option<Record>, StoreError> {
        match body {
            Some(body) => {
                check_row_len(&body)?;
                Ok(Some(self.decode_record(kind, tag, &body, &self.dir)?))
            }
            None => Ok(None),
        }
    }

    /// Writes record `id` of `kind`, replacing any previous value, atomically
    /// and durably: when this returns, the record survives a crash; if the
    /// process dies before, the old value (or none) remains. A replaced
    /// record's old file is overwritten with zeros once the new one is in
    /// place. It is given a second name first (`.*.del`, durable before the
    /// replacement), so a crash or an error before the wipe leaves it to
    /// the next `open`, which finishes it as it finishes interrupted
    /// deletions; a crash before the replacement leaves a second name of
    /// the record still in place, which `open` only removes.
    pub fn put(
        &self,
        guard: &StoreGuard<'_>,
        kind: &str,
        id: &str,
        value: &[u8],
    ) -> Result<(), StoreError> {
        self.check_guard(guard)?;
        check_kind(kind)?;
        check_id(id)?;
        if value.len() > MAX_RECORD_LEN {
            return Err(StoreError::TooLarge {
                what: "record value",
                limit: MAX_RECORD_LEN as u64,
                found: u64::try_from(value.len()).unwrap_or(u64::MAX),
            });
        }
        let tag = self.keys.name_tag(kind, id)?;
        let id_len = u16::try_from(id.len()).map_err(|_| StoreError::InvalidId {
            id: id.to_owned(),
            reason: "too long",
        })?;
        let mut plain = Zeroizing::new(Vec::with_capacity(
            2usize.saturating_add(id.len()).saturating_add(value.len()),
        ));
        plain.extend_from_slice(&id_len.to_be_bytes());
        plain.extend_from_slice(id.as_bytes());
        plain.extend_from_slice(value);
        let sealed =
            self.keys
                .records()
                .seal(&[RECORD_VERSION], &record_aad(kind, &tag), &mut plain)?;
        if let Held::Database(lock) = &guard.held {
            return lock.put(kind, &tag, &sealed);
        }
        let kind_dir = self.kind_dir(kind);
        fsutil::ensure_private_dir(&kind_dir)?;
        let name = record_file_name(&tag);
        let old_path = kind_dir.join(&name);
        let doomed_name = format!(".{name}.{}{}", fsutil::random_hex(8)?, fsutil::SHRED_SUFFIX);
        let doomed = kind_dir.join(&doomed_name);
        let kept = match fs::hard_link(&old_path, &doomed) {
            Ok(()) => {
                fsutil::sync_dir(&kind_dir)?;
                true
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => false,
            Err(err) => {
                return Err(StoreError::io(
                    "keep the record to replace for wiping",
                    &old_path,
                    err,
                ))
            }
        };
        if let Err(err) = fsutil::write_atomic(&kind_dir, &name, &sealed, Existing::Replace) {
            // Still in place (the write failed before its rename): only its
            // second name goes. Replaced all the same (a sync after the
            // rename failed): it stays under that name for the next open
            // to wipe.
            if kept && fsutil::still_in_place(&kind_dir, &doomed_name, &doomed).unwrap_or(false) {
                let _ = fs::remove_file(&doomed);
            }
            return Err(err);
        }
        // The new record is in place and durable; wipe the old one's blocks.
        if kept {
            fsutil::shred_and_remove(&doomed, MAX_RECORD_FILE_LEN)?;
            fsutil::sync_dir(&kind_dir)?;
        }
        Ok(())
    }

    /// Deletes record `id` of `kind`; returns whether it existed.
    ///
    /// The record is first renamed out of its name (so it is gone atomically,
    /// and durably once this returns), then overwritten with zeros, synced and
    /// removed. A deletion a crash interrupts is finished on the next `open`.
    pub fn delete(&self, guard: &StoreGuard<'_>, kind: &str, id: &str) -> Result<bool, StoreError> {
        self.check_guard(guard)?;
        check_kind(kind)?;
        check_id(id)?;
        let tag = self.keys.name_tag(kind, id)?;
        if let Held::Database(lock) = &guard.held {
            return lock.delete(kind, &tag);
        }
        let kind_dir = self.kind_dir(kind);
        let name = record_file_name(&tag);
        let path = kind_dir.join(&name);
        let doomed = kind_dir.join(format!(
            ".{name}.{}{}",
            fsutil::random_hex(8)?,
            fsutil::SHRED_SUFFIX
        ));
        match fs::rename(&path, &doomed) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(err) => return Err(StoreError::io("delete", &path, err)),
        }
        fsutil::sync_dir(&kind_dir)?;
        fsutil::shred_and_remove(&doomed, MAX_RECORD_FILE_LEN)?;
        fsutil::sync_dir(&kind_dir)?;
        Ok(true)
    }

    /// The ids of every record of `kind`, sorted.
    ///
    /// Every record file is opened and checked, so a corrupt or misplaced
    /// record makes this fail rather than go unnoticed.
    pub fn list(&self, kind: &str) -> Result<Vec<String>, StoreError> {
        check_kind(kind)?;
        if let Some(db) = &self.db {
            return self.list_database(db, kind);
        }
        let kind_dir = self.kind_dir(kind);
        let entries = match fs::read_dir(&kind_dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(err) => return Err(StoreError::io("list", &kind_dir, err)),
        };
        let mut ids = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|err| StoreError::io("list", &kind_dir, err))?;
            let Some(tag) = entry.file_name().to_str().and_then(parse_record_file_name) else {
                // Temporary files, half-deleted records, anything not ours.
                continue;
            };
            if ids.len() >= MAX_LIST_LEN {
                return Err(StoreError::TooLarge {
                    what: "record list",
                    limit: MAX_LIST_LEN as u64,
                    found: u64::try_from(ids.len())
                        .unwrap_or(u64::MAX)
                        .saturating_add(1),
                });
            }
            // Gone meanwhile (deleted by another process): skip.
            if let Some((id, _value)) = self.read_record(kind, &tag, &entry.path())? {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        Ok(ids)
    }

    fn list_database(&self, db: &Database, kind: &str) -> Result<Vec<String>, StoreError> {
        let mut ids = Vec::new();
        db.for_each_record(
            kind,
            MAX_LIST_LEN.saturating_add(1),
            MAX_RECORD_FILE_LEN,
            |tag, body| {
                if ids.len() >= MAX_LIST_LEN {
                    return Err(StoreError::TooLarge {
                        what: "record list",
                        limit: MAX_LIST_LEN as u64,
                        found: u64::try_from(ids.len())
                            .unwrap_or(u64::MAX)
                            .saturating_add(1),
                    });
                }
                let tag: [u8; NAME_TAG_LEN] =
                    tag.try_into().map_err(|_| StoreError::CorruptRecord {
                        path: self.dir.clone(),
                        reason: "a record row's name tag has the wrong length",
                    })?;
                check_row_len(&body)?;
                let (id, _value) = self.decode_record(kind, &tag, &body, &self.dir)?;
                ids.push(id);
                Ok(())
            },
        )?;
        ids.sort_unstable();
        Ok(ids)
    }

    fn check_guard(&self, guard: &StoreGuard<'_>) -> Result<(), StoreError> {
        if std::ptr::eq(guard.store, self) {
            Ok(())
        } else {
            Err(StoreError::ForeignGuard {
                path: self.dir.clone(),
            })
        }
    }

    fn kind_dir(&self, kind: &str) -> PathBuf {
        self.dir.join(RECORDS_DIR).join(kind)
    }

    fn record_path(&self, kind: &str, tag: &[u8; NAME_TAG_LEN]) -> PathBuf {
        self.kind_dir(kind).join(record_file_name(tag))
    }

    /// Reads and opens the record file at `path`; `None` if there is none.
    ///
    /// Readers take no lock, and a writer overwrites a replaced or deleted
    /// record's old file with zeros after renaming it away. If a record fails
    /// to open and the file at `path` is no longer the one read, it was
    /// replaced meanwhile: read again (a few times) instead of reporting
    /// corruption.
    fn read_record(
        &self,
        kind: &str,
        tag: &[u8; NAME_TAG_LEN],
        path: &Path,
    ) -> Result<Option<Record>, StoreError> {
        let mut attempts_left = READ_ATTEMPTS;
        loop {
            attempts_left = attempts_left.saturating_sub(1);
            let Some((bytes, identity)) = read_record_file(path)? else {
                return Ok(None);
            };
            match self.decode_record(kind, tag, &bytes, path) {
                Ok(record) => return Ok(Some(record)),
                Err(err) => {
                    if attempts_left == 0 || fsutil::identity(path) == Some(identity) {
                        return Err(err);
                    }
                }
            }
        }
    }

    /// Opens a record file's bytes: checks the version byte, authenticates
    /// against the kind and name tag, and checks the id inside hashes to the
    /// name tag. Returns the id and the value.
    fn decode_record(
        &self,
        kind: &str,
        tag: &[u8; NAME_TAG_LEN],
        bytes: &[u8],
        path: &Path,
    ) -> Result<Record, StoreError> {
        let corrupt = |reason: &'static str| StoreError::CorruptRecord {
            path: path.to_owned(),
            reason,
        };
        let Some((&version, sealed)) = bytes.split_first() else {
            return Err(corrupt("empty file"));
        };
        if version != RECORD_VERSION {
            return Err(corrupt("unknown record version byte"));
        }
        let plain = self
            .keys
            .records()
            .open(&record_aad(kind, tag), sealed)
            .ok_or_else(|| {
                corrupt(
                    "does not authenticate (altered, truncated, moved from another name, \
                     or from another store)",
                )
            })?;
        let (len, rest) = plain
            .split_first_chunk::<2>()
            .ok_or_else(|| corrupt("too short for the id length"))?;
        let id_len = usize::from(u16::from_be_bytes(*len));
        let (id, value) = rest
            .split_at_checked(id_len)
            .ok_or_else(|| corrupt("too short for its id"))?;
        let id = std::str::from_utf8(id).map_err(|_| corrupt("the id is not UTF-8"))?;
        if self.keys.name_tag(kind, id)? != *tag {
            return Err(corrupt("holds an id that does not match its file name"));
        }
        Ok((id.to_owned(), Zeroizing::new(value.to_vec())))
    }

    fn clean_leftovers(&self, _guard: &StoreGuard<'_>) -> Result<(), StoreError> {
        fsutil::clean_leftovers(&self.dir, 0)?;
        let records = self.dir.join(RECORDS_DIR);
        let entries =
            fs::read_dir(&records).map_err(|err| StoreError::io("list", &records, err))?;
        for entry in entries {
            let entry = entry.map_err(|err| StoreError::io("list", &records, err))?;
            let is_dir = entry
                .file_type()
                .map_err(|err| StoreError::io("inspect", entry.path(), err))?
                .is_dir();
            if is_dir {
                fsutil::clean_leftovers(&entry.path(), MAX_RECORD_FILE_LEN)?;
            }
        }
        Ok(())
    }
}

/// Refuses a record row longer than a record can be.
fn check_row_len(body: &[u8]) -> Result<(), StoreError> {
    let found = u64::try_from(body.len()).unwrap_or(u64::MAX);
    if found > MAX_RECORD_FILE_LEN {
        return Err(StoreError::TooLarge {
            what: "record row",
            limit: MAX_RECORD_FILE_LEN,
            found,
        });
    }
    Ok(())
}

/// The most records [`Store::get_many`] reads at once.
pub const MAX_GET_MANY: usize = 16;

/// A record's value, if it holds the id it was asked for (its file name or
/// row is a keyed hash of the id, and the id is inside, authenticated).
fn check_stored_id(
    id: &str,
    path: PathBuf,
    record: Option<Record>,
) -> Result<Option<Zeroizing<Vec<u8>>>, StoreError> {
    let Some((stored_id, value)) = record else {
        return Ok(None);
    };
    if stored_id != id {
        return Err(StoreError::CorruptRecord {
            path,
            reason: "the record holds another id than the one asked for",
        });
    }
    Ok(Some(value))
}

/// Reads a record file with the record bound; `None` if it does not exist.
fn read_record_file(path: &Path) -> Result<Option<(Vec<u8>, FileIdentity)>, StoreError> {
    match fsutil::read_bounded_identified(path, MAX_RECORD_FILE_LEN) {
        Ok(read) => Ok(Some(read)),
        Err(ReadError::NotFound) => Ok(None),
        Err(ReadError::NotRegular) => Err(StoreError::CorruptRecord {
            path: path.to_owned(),
            reason: "not a regular file",
        }),
        Err(ReadError::TooLarge(found)) => Err(StoreError::TooLarge {
            what: "record file",
            limit: MAX_RECORD_FILE_LEN,
            found,
        }),
        Err(ReadError::Io(err)) => Err(StoreError::io("read", path, err)),
    }
}

fn open_lock_file(path: &Path, create: bool) -> Result<File, StoreError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .mode(fsutil::FILE_MODE)
        .open(path)
        .map_err(|err| StoreError::io("open the lock file", path, err))
}

fn sync_file(file: &File, path: &Path) -> Result<(), StoreError> {
    file.sync_all()
        .map_err(|err| StoreError::io("sync", path, err))
}

fn is_empty_dir(path: &Path) -> Result<bool, StoreError> {
    if !fs::symlink_metadata(path)
        .map_err(|err| StoreError::io("inspect", path, err))?
        .is_dir()
    {
        return Ok(false);
    }
    let mut entries = fs::read_dir(path).map_err(|err| StoreError::io("list", path, err))?;
    Ok(entries.next().is_none())
}

fn record_aad(kind: &str, tag: &[u8; NAME_TAG_LEN]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(
        RECORD_AAD_LABEL
            .len()
            .saturating_add(2)
            .saturating_add(kind.len())
            .saturating_add(NAME_TAG_LEN),
    );
    aad.extend_from_slice(RECORD_AAD_LABEL);
    aad.push(RECORD_VERSION);
    // check_kind bounds kind to 64 bytes.
    aad.push(u8::try_from(kind.len()).unwrap_or(u8::MAX));
    aad.extend_from_slice(kind.as_bytes());
    aad.extend_from_slice(tag);
    aad
}

fn record_file_name(tag: &[u8; NAME_TAG_LEN]) -> String {
    let mut name = hex::encode(tag);
    name.push_str(RECORD_EXT);
    name
}

fn parse_record_file_name(name: &str) -> Option<[u8; NAME_TAG_LEN]> {
    let stem = name.strip_suffix(RECORD_EXT)?;
    if stem.len() != NAME_TAG_LEN.saturating_mul(2) || stem.bytes().any(|b| b.is_ascii_uppercase())
    {
        return None;
    }
    let mut tag = [0u8; NAME_TAG_LEN];
    hex::decode_to_slice(stem, &mut tag).ok()?;
    Some(tag)
}

/// A kind is a directory name: 1 to 64 of `a-z 0-9 _ -`, starting with a
/// letter or digit.
fn check_kind(kind: &str) -> Result<(), StoreError> {
    let invalid = |reason: &'static str| StoreError::InvalidKind {
        kind: kind.to_owned(),
        reason,
    };
    if kind.is_empty() || kind.len() > MAX_KIND_LEN {
        return Err(invalid("expected 1 to 64 bytes"));
    }
    if !kind
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    {
        return Err(invalid("expected only a-z, 0-9, '_' and '-'"));
    }
    if !kind
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return Err(invalid("expected a letter or digit first"));
    }
    Ok(())
}

/// An id is any UTF-8 string of 1 to 1024 bytes without control characters.
pub(crate) fn check_id(id: &str) -> Result<(), StoreError> {
    let invalid = |reason: &'static str| StoreError::InvalidId {
        id: id.chars().take(64).collect(),
        reason,
    };
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(invalid("expected 1 to 1024 bytes"));
    }
    if id.chars().any(char::is_control) {
        return Err(invalid("control characters are not allowed"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn key_secret() -> RootSecret {
        RootSecret::from_key_bytes(Zeroizing::new([9u8; 32]))
    }

    #[test]
    fn store_and_guard_are_send_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Store>();
        assert_send_sync::<StoreGuard<'static>>();
    }

    #[test]
    fn kind_and_id_rules() {
        for good in ["material", "cmk", "a", "x_1-2"] {
            check_kind(good).unwrap();
        }
        for bad in [
            "",
            "Material",
            "-x",
            "_x",
            "a/b",
            "..",
            ".x",
            "a b",
            &"k".repeat(65),
        ] {
            assert!(check_kind(bad).is_err(), "{bad:?}");
        }
        for good in [
            "agency-a/app-x/prod",
            "é",
            "../../etc/passwd",
            &"i".repeat(1024),
        ] {
            check_id(good).unwrap();
        }
        for bad in ["", "a\nb", "\0", &"i".repeat(1025)] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn stored_id_is_checked_against_the_request() {
        // A record sealed for name tag T but holding id B (which does not hash
        // to T) is refused even though it authenticates: only possible with
        // the key, so build it here.
        let dir = tempfile::tempdir().unwrap();
        let store = Store::init(dir.path().join("s"), key_secret()).unwrap();
        let tag = store.keys.name_tag("k", "a").unwrap();
        let mut plain = Vec::new();
        plain.extend_from_slice(&1u16.to_be_bytes());
        plain.extend_from_slice(b"b");
        plain.extend_from_slice(b"value");
        let sealed = store
            .keys
            .records()
            .seal(&[RECORD_VERSION], &record_aad("k", &tag), &mut plain)
            .unwrap();
        let kind_dir = store.kind_dir("k");
        fsutil::ensure_private_dir(&kind_dir).unwrap();
        fs::write(kind_dir.join(record_file_name(&tag)), sealed).unwrap();
        let err = store.get("k", "a").unwrap_err();
        assert!(
            matches!(err, StoreError::CorruptRecord { reason, .. } if reason.contains("does not match")),
            "{err}"
        );
        assert!(store.list("k").is_err());
    }

    #[test]
    fn foreign_guard_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = Store::init(dir.path().join("a"), key_secret()).unwrap();
        let b = Store::init(dir.path().join("b"), key_secret()).unwrap();
        let guard = b.lock().unwrap();
        assert!(matches!(
            a.put(&guard, "k", "x", b"v"),
            Err(StoreError::ForeignGuard { .. })
        ));
        assert!(matches!(
            a.delete(&guard, "k", "x"),
            Err(StoreError::ForeignGuard { .. })
        ));
    }
}
