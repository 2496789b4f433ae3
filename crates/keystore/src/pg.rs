//! The store in PostgreSQL: one database holds one store's records, its
//! audit log and its challenge nonces, shared by every verifier replica.
//!
//! Why the blocking `postgres` client (tokio-postgres under its own small
//! runtime) and `r2d2`: the store, the key backends and the key broker are
//! synchronous (the service runs each decision on a blocking thread), and a
//! decision must not hop between runtimes; `r2d2` is the maintained pool for
//! blocking clients. sqlx would bring its own async runtime and query macros
//! that need a database at build time.
//!
//! What is where:
//! - `kluis_schema`: the migrations applied ([`Database::migrate`], run by
//!   `init`); every open checks the version ([`Database::check_schema`]) and
//!   refuses one it does not know, newer or older.
//! - `kluis_store_meta`, `kluis_records`: as `store.meta` and `records/` of
//!   a directory store. A record row holds its kind, its name tag (an HMAC
//!   of kind and id under a key derived from the root secret, not the id)
//!   and the same AES-256-GCM body a record file holds.
//! - the audit log and the nonces: see the verifier.
//!
//! Mutual exclusion: [`Store::lock`](crate::Store::lock) on a database store
//! takes a session-level advisory lock on a connection of its own, and every
//! write under that guard goes through that connection. If the connection
//! is lost, the server releases the lock and the guard's writes fail: a
//! replica that lost the lock cannot write behind another's back.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr as _;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use postgres::config::{Host, SslMode};
use postgres::{Client, Config};
use r2d2_postgres::PostgresConnectionManager;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::StoreError;

/// The schema version this build reads and writes.
pub const SCHEMA_VERSION: i32 = 2;

/// A pooled connection to the store's database.
pub type PooledClient = r2d2::PooledConnection<PostgresConnectionManager<MakeRustlsConnect>>;

/// Advisory lock keys (any 64-bit constants, fixed forever): the store's
/// mutation lock and the migration lock.
const STORE_LOCK_KEY: i64 = 0x6b6c_7569_7300_0001;
const MIGRATION_LOCK_KEY: i64 = 0x6b6c_7569_7300_0002;

/// Most connections one process keeps to the database.
const POOL_SIZE: u32 = 16;
/// How long a command waits for a connection from the pool.
const POOL_WAIT: Duration = Duration::from_secs(3);
/// Defaults applied when the URL does not set them.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Unacknowledged data on the socket for this long ends the connection: a
/// replica cut off from the database notices within about this time.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(5);
/// Server-side bound on one statement.
const STATEMENT_TIMEOUT_MS: u32 = 30_000;
/// Largest store setting or metadata read from the database.
const MAX_SETTING_LEN: u64 = 64 * 1024;

/// `limit + 1` as the `int4` a `substring(… for n)` takes: reading one byte
/// more than allowed tells the reader the value is too long.
fn bound(limit: u64) -> i32 {
    i32::try_from(limit.saturating_add(1)).unwrap_or(i32::MAX)
}

/// How long [`Database::lock`] waits for another holder.
const LOCK_TIMEOUT_MS: u32 = 60_000;

struct Migration {
    version: i32,
    description: &'static str,
    sql: &'static str,
}

/// Every migration, in order; a released one is never edited.
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "store records, audit log with one head row, challenge nonces",
        sql: include_str!("migrations/0001_initial.sql"),
    },
    Migration {
        version: 2,
        description: "an authenticator on each audit record",
        sql: include_str!("migrations/0002_audit_row_mac.sql"),
    },
];

/// A connection pool to the database of one store.
///
/// Cloning shares the pool. `Debug` and every message name the database as
/// `postgresql://user@host:port/dbname`, never with its password.
#[derive(Clone)]
pub struct Database {
    inner: Arc<Inner>,
}

struct Inner {
    pool: r2d2::Pool<PostgresConnectionManager<MakeRustlsConnect>>,
    config: Config,
    tls: MakeRustlsConnect,
    target: String,
}

impl fmt::Debug for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Database")
            .field("target", &self.inner.target)
            .finish_non_exhaustive()
    }
}

impl Database {
    /// Connects to the database at `url` (a `postgresql://` URL or a
    /// `key=value` connection string), checking that it answers. The URL's
    /// own settings win; otherwise a 5 s connect timeout, a 5 s TCP user
    /// timeout with keepalives, and a 30 s statement timeout apply.
    ///
    /// Without `ca_pem`, only a server on this machine (loopback or a Unix
    /// socket) is reached unencrypted; any other needs TLS, or
    /// `sslmode=disable` in the URL to accept an unencrypted connection
    /// knowingly. See [`Database::connect_tls`].
    pub fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_tls(url, None)
    }

    /// [`Database::connect`] over TLS verified against the CA
    /// certificates in `ca_pem` (PEM): the server's certificate must chain
    /// to one of them and name the host of the URL (`host`; `hostaddr` may
    /// give the address to connect to). TLS is then required, whatever the
    /// URL's `sslmode` (`disable` is refused).
    pub fn connect_tls(url: &str, ca_pem: Option<&[u8]>) -> Result<Self, StoreError> {
        let mut config = Config::from_str(url).map_err(|e| StoreError::Database {
            target: "the database URL".to_owned(),
            action: "parse",
            reason: e.to_string(),
        })?;
        let target = describe(&config);
        let refuse = |reason: String| StoreError::Database {
            target: target.clone(),
            action: "connect to",
            reason,
        };
        let roots = match ca_pem {
            Some(pem) => {
                if config.get_ssl_mode() == SslMode::Disable {
                    return Err(refuse(
                        "a CA file was given for TLS, and the URL says sslmode=disable".to_owned(),
                    ));
                }
                config.ssl_mode(SslMode::Require);
                ca_roots(pem).map_err(refuse)?
            }
            None => {
                match config.get_ssl_mode() {
                    SslMode::Require => {
                        return Err(refuse(
                            "sslmode=require needs the CA that signed the server's certificate \
                             (--database-ca FILE)"
                                .to_owned(),
                        ))
                    }
                    SslMode::Disable => {}
                    _ if is_local(&config) => {}
                    _ => {
                        return Err(refuse(
                            "the server is not on this machine: pass --database-ca FILE for \
                             TLS, or put sslmode=disable in the URL to accept an unencrypted \
                             connection"
                                .to_owned(),
                        ))
                    }
                }
                // On this machine, or knowingly unencrypted.
                config.ssl_mode(SslMode::Disable);
                rustls::RootCertStore::empty()
            }
        };
        let tls_config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| refuse(format!("TLS configuration: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let tls = MakeRustlsConnect::new(tls_config);
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_tcp_user_timeout().is_none() {
            config.tcp_user_timeout(TCP_USER_TIMEOUT);
        }
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(5));
        if config.get_application_name().is_none() {
            config.application_name("kluis-attestation-verifier");
        }
        let options = format!(
            "{} -c statement_timeout={STATEMENT_TIMEOUT_MS}",
            config.get_options().unwrap_or_default()
        );
        config.options(options.trim());
        // One connection first, for a clear error (the pool would retry
        // until its timeout and keep only the last message).
        let probe = config
            .connect(tls.clone())
            .map_err(|e| StoreError::Database {
                target: target.clone(),
                action: "connect to",
                reason: reason(&e),
            })?;
        drop(probe);
        let manager = PostgresConnectionManager::new(config.clone(), tls.clone());
        let pool = r2d2::Pool::builder()
            .max_size(POOL_SIZE)
            .min_idle(Some(1))
            .connection_timeout(POOL_WAIT)
            // One round trip per checkout: a connection that died while
            // idle (a database restart, a partition) is replaced before it
            // fails a request, so service resumes cleanly after an outage.
            .test_on_check_out(true)
            .build_unchecked(manager);
        Ok(Database {
            inner: Arc::new(Inner {
                pool,
                config,
                tls,
                target,
            }),
        })
    }

    /// `postgresql://user@host:port/dbname`, for messages.
    pub fn target(&self) -> &str {
        &self.inner.target
    }

    /// The target as a path, for the store's errors that name one.
    pub(crate) fn target_path(&self) -> PathBuf {
        PathBuf::from(&self.inner.target)
    }

    /// A connection from the pool.
    pub fn client(&self) -> Result<PooledClient, StoreError> {
        self.inner.pool.get().map_err(|e| StoreError::Database {
            target: self.inner.target.clone(),
            action: "get a connection to",
            reason: e.to_string(),
        })
    }

    /// A [`StoreError::Database`] for `action` on this database.
    pub fn error(&self, action: &'static str, e: &postgres::Error) -> StoreError {
        StoreError::Database {
            target: self.inner.target.clone(),
            action,
            reason: reason(e),
        }
    }

    /// Applies the migrations this build knows and the database lacks, in
    /// one transaction under an advisory lock (replicas may run this at
    /// once). Returns the versions applied. Refuses a database whose schema
    /// is newer than this build's.
    pub fn migrate(&self) -> Result<Vec<i32>, StoreError> {
        let mut client = self.client()?;
        let mut tx = client
            .transaction()
            .map_err(|e| self.error("migrate", &e))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY])
            .map_err(|e| self.error("lock for migration", &e))?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS kluis_schema (
                 version     INTEGER PRIMARY KEY,
                 description TEXT NOT NULL,
                 applied_at  TIMESTAMPTZ NOT NULL DEFAULT now()
             )",
        )
        .map_err(|e| self.error("create the schema table in", &e))?;
        let current: Option<i32> = tx
            .query_one("SELECT max(version) FROM kluis_schema", &[])
            .map_err(|e| self.error("read the schema version of", &e))?
            .try_get(0)
            .map_err(|e| self.error("read the schema version of", &e))?;
        let current = current.unwrap_or(0);
        if current > SCHEMA_VERSION {
            return Err(StoreError::SchemaVersion {
                target: self.inner.target.clone(),
                found: current,
                known: SCHEMA_VERSION,
            });
        }
        let mut applied = Vec::new();
        for migration in MIGRATIONS.iter().filter(|m| m.version > current) {
            tx.batch_execute(migration.sql)
                .map_err(|e| self.error("apply a migration to", &e))?;
            tx.execute(
                "INSERT INTO kluis_schema (version, description) VALUES ($1, $2)",
                &[&migration.version, &migration.description],
            )
            .map_err(|e| self.error("record a migration in", &e))?;
            applied.push(migration.version);
        }
        tx.commit()
            .map_err(|e| self.error("commit the migrations to", &e))?;
        Ok(applied)
    }

    /// The schema version of the database; `None` if it has no Kluis schema.
    pub fn schema_version(&self) -> Result<Option<i32>, StoreError> {
        let mut client = self.client()?;
        let exists: bool = client
            .query_one("SELECT to_regclass('kluis_schema') IS NOT NULL", &[])
            .map_err(|e| self.error("inspect", &e))?
            .try_get(0)
            .map_err(|e| self.error("inspect", &e))?;
        if !exists {
            return Ok(None);
        }
        let version: Option<i32> = client
            .query_one("SELECT max(version) FROM kluis_schema", &[])
            .map_err(|e| self.error("read the schema version of", &e))?
            .try_get(0)
            .map_err(|e| self.error("read the schema version of", &e))?;
        Ok(version)
    }

    /// Fails unless the database's schema is the one this build knows
    /// ([`StoreError::SchemaVersion`]: a replica neither writes a schema it
    /// does not know nor one a newer replica migrated past it).
    pub fn check_schema(&self) -> Result<(), StoreError> {
        match self.schema_version()? {
            Some(SCHEMA_VERSION) => Ok(()),
            None => Err(StoreError::NotAStore {
                path: self.target_path(),
                reason: "the database has no Kluis schema (run `attestation-verifier init --database URL`)",
            }),
            Some(found) => Err(StoreError::SchemaVersion {
                target: self.inner.target.clone(),
                found,
                known: SCHEMA_VERSION,
            }),
        }
    }

    /// The text of the store's metadata, if a store was initialised here.
    ///
    /// Every value is read through `substring(… for limit + 1)`: a row
    /// someone made larger than it can be (the table's checks can be
    /// dropped) is refused by its reader without being loaded whole.
    pub(crate) fn meta(&self) -> Result<Option<Vec<u8>>, StoreError> {
        let mut client = self.client()?;
        let row = client
            .query_opt(
                "SELECT substring(meta from 1 for $1) FROM kluis_store_meta",
                &[&bound(MAX_SETTING_LEN)],
            )
            .map_err(|e| self.error("read the store metadata of", &e))?;
        row.map(|row| row.try_get(0))
            .transpose()
            .map_err(|e| self.error("read the store metadata of", &e))
    }

    /// The store setting `name` (see `kluis_store_config`), if written.
    /// At most 64 KiB and one byte are read (the caller refuses more).
    pub fn config(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let mut client = self.client()?;
        let row = client
            .query_opt(
                "SELECT substring(value from 1 for $2) FROM kluis_store_config WHERE name = $1",
                &[&name, &bound(MAX_SETTING_LEN)],
            )
            .map_err(|e| self.error("read the store settings of", &e))?;
        row.map(|row| row.try_get(0))
            .transpose()
            .map_err(|e| self.error("read the store settings of", &e))
    }

    /// The body of record `(kind, tag)`, at most `max_body` bytes and one
    /// (the caller refuses more).
    pub(crate) fn get_record(
        &self,
        kind: &str,
        tag: &[u8],
        max_body: u64,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let mut client = self.client()?;
        let row = client
            .query_opt(
                "SELECT substring(body from 1 for $3) FROM kluis_records \
                 WHERE kind = $1 AND tag = $2",
                &[&kind, &tag, &bound(max_body)],
            )
            .map_err(|e| self.error("read a record from", &e))?;
        row.map(|row| row.try_get(0))
            .transpose()
            .map_err(|e| self.error("read a record from", &e))
    }

    /// The bodies (at most `max_body` bytes and one) of the records
    /// `wanted` (kind, tag), in one query: `None` where there is none.
    pub(crate) fn get_records(
        &self,
        wanted: &[(&str, &[u8])],
        max_body: u64,
    ) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let kinds: Vec<&str> = wanted.iter().map(|(k, _)| *k).collect();
        let tags: Vec<&[u8]> = wanted.iter().map(|(_, t)| *t).collect();
        let mut client = self.client()?;
        let rows = client
            .query(
                "SELECT w.i, substring(r.body from 1 for $3) \
                 FROM unnest($1::text[], $2::bytea[]) WITH ORDINALITY AS w(kind, tag, i) \
                 JOIN kluis_records r ON r.kind = w.kind AND r.tag = w.tag \
                 LIMIT $4",
                // One row per wanted record while (kind, tag) is the key; a
                // table altered to hold more reads one row past that, which
                // is refused below.
                &[
                    &kinds,
                    &tags,
                    &bound(max_body),
                    &i64::try_from(wanted.len().saturating_add(1)).unwrap_or(i64::MAX),
                ],
            )
            .map_err(|e| self.error("read records from", &e))?;
        let mut out: Vec<Option<Vec<u8>>> = wanted.iter().map(|_| None).collect();
        for row in rows {
            let i: i64 = row
                .try_get(0)
                .map_err(|e| self.error("read records from", &e))?;
            let slot = usize::try_from(i)
                .ok()
                .and_then(|i| i.checked_sub(1))
                .and_then(|i| out.get_mut(i))
                .ok_or_else(|| StoreError::Database {
                    target: self.inner.target.clone(),
                    action: "read records from",
                    reason: "the database answered a row no one asked for".to_owned(),
                })?;
            if slot.is_some() {
                // Two rows for one (kind, tag): the table lost its key.
                return Err(StoreError::Database {
                    target: self.inner.target.clone(),
                    action: "read records from",
                    reason: "the database holds a record twice".to_owned(),
                });
            }
            *slot = Some(
                row.try_get(1)
                    .map_err(|e| self.error("read records from", &e))?,
            );
        }
        Ok(out)
    }

    /// Calls `each` with the tag and body (at most `max_body` bytes and one)
    /// of every record of `kind`, one row in memory at a time, at most
    /// `limit` rows and one (the caller refuses a list that long).
    pub(crate) fn for_each_record(
        &self,
        kind: &str,
        limit: usize,
        max_body: u64,
        mut each: impl FnMut(Vec<u8>, Vec<u8>) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        use postgres::fallible_iterator::FallibleIterator as _;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let max_body = bound(max_body);
        let mut client = self.client()?;
        let params: [&(dyn postgres::types::ToSql + Sync); 3] = [&kind, &limit, &max_body];
        let mut rows = client
            .query_raw(
                "SELECT tag, substring(body from 1 for $3) FROM kluis_records \
                 WHERE kind = $1 ORDER BY tag LIMIT $2",
                params,
            )
            .map_err(|e| self.error("list the records of", &e))?;
        while let Some(row) = rows
            .next()
            .map_err(|e| self.error("list the records of", &e))?
        {
            let cells = row.try_get(0).and_then(|tag| Ok((tag, row.try_get(1)?)));
            let (tag, body) = cells.map_err(|e| self.error("list the records of", &e))?;
            each(tag, body)?;
        }
        Ok(())
    }

    /// Takes the store's advisory lock on a connection of its own, waiting
    /// up to a minute for another holder ([`StoreError::Locked`] then);
    /// with `wait` false, `None` if another holds it.
    pub(crate) fn lock(&self, wait: bool) -> Result<Option<DbLock>, StoreError> {
        let mut client = self
            .inner
            .config
            .connect(self.inner.tls.clone())
            .map_err(|e| self.error("connect to", &e))?;
        if wait {
            client
                .batch_execute(&format!(
                    "SET lock_timeout = {LOCK_TIMEOUT_MS}; \
                     SET statement_timeout = {}",
                    LOCK_TIMEOUT_MS.saturating_add(STATEMENT_TIMEOUT_MS)
                ))
                .map_err(|e| self.error("configure a lock on", &e))?;
            if let Err(e) = client.execute("SELECT pg_advisory_lock($1)", &[&STORE_LOCK_KEY]) {
                if e.code() == Some(&postgres::error::SqlState::LOCK_NOT_AVAILABLE) {
                    return Err(StoreError::Locked {
                        path: self.target_path(),
                    });
                }
                return Err(self.error("lock the store in", &e));
            }
        } else {
            let taken: bool = client
                .query_one("SELECT pg_try_advisory_lock($1)", &[&STORE_LOCK_KEY])
                .map_err(|e| self.error("lock the store in", &e))?
                .try_get(0)
                .map_err(|e| self.error("lock the store in", &e))?;
            if !taken {
                return Ok(None);
            }
        }
        Ok(Some(DbLock {
            client: Mutex::new(client),
            db: self.clone(),
        }))
    }
}

/// The store's advisory lock and the connection that holds it; writes
/// under the lock go through this connection.
pub(crate) struct DbLock {
    client: Mutex<Client>,
    db: Database,
}

impl DbLock {
    fn client(&self) -> MutexGuard<'_, Client> {
        self.client.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether a store was initialised in the database (metadata or any
    /// record present).
    pub(crate) fn holds_a_store(&self) -> Result<bool, StoreError> {
        let row = self
            .client()
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM kluis_store_meta) \
                     OR EXISTS (SELECT 1 FROM kluis_records) \
                     OR EXISTS (SELECT 1 FROM kluis_store_config)",
                &[],
            )
            .map_err(|e| self.db.error("inspect", &e))?;
        row.try_get(0).map_err(|e| self.db.error("inspect", &e))
    }

    pub(crate) fn insert_config(&self, name: &str, value: &[u8]) -> Result<(), StoreError> {
        self.client()
            .execute(
                "INSERT INTO kluis_store_config (name, value) VALUES ($1, $2)",
                &[&name, &value],
            )
            .map_err(|e| self.db.error("write the store settings to", &e))?;
        Ok(())
    }

    pub(crate) fn insert_meta(&self, meta: &[u8]) -> Result<(), StoreError> {
        self.client()
            .execute("INSERT INTO kluis_store_meta (meta) VALUES ($1)", &[&meta])
            .map_err(|e| self.db.error("write the store metadata to", &e))?;
        Ok(())
    }

    /// Inserts or replaces record `(kind, tag)`; committed when this returns.
    pub(crate) fn put(&self, kind: &str, tag: &[u8], body: &[u8]) -> Result<(), StoreError> {
        self.client()
            .execute(
                "INSERT INTO kluis_records (kind, tag, body) VALUES ($1, $2, $3) \
                 ON CONFLICT (kind, tag) DO UPDATE SET body = EXCLUDED.body",
                &[&kind, &tag, &body],
            )
            .map_err(|e| self.db.error("write a record to", &e))?;
        Ok(())
    }

    /// Deletes record `(kind, tag)`; whether it existed.
    pub(crate) fn delete(&self, kind: &str, tag: &[u8]) -> Result<bool, StoreError> {
        let deleted = self
            .client()
            .execute(
                "DELETE FROM kluis_records WHERE kind = $1 AND tag = $2",
                &[&kind, &tag],
            )
            .map_err(|e| self.db.error("delete a record from", &e))?;
        Ok(deleted > 0)
    }
}

impl Drop for DbLock {
    fn drop(&mut self) {
        // Closing the connection releases the lock too; unlocking first
        // frees it without waiting for the server to notice the close.
        let _ = self
            .client()
            .execute("SELECT pg_advisory_unlock($1)", &[&STORE_LOCK_KEY]);
    }
}

/// The CA certificates of a PEM bundle.
fn ca_roots(pem: &[u8]) -> Result<rustls::RootCertStore, String> {
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| format!("the database CA file: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("the database CA file: {e}"))?;
    }
    if roots.is_empty() {
        return Err("the database CA file holds no certificate".to_owned());
    }
    Ok(roots)
}

/// Whether every host of `config` is on this machine: a Unix socket, or a
/// loopback address (`hostaddr` when given, else `host`).
fn is_local(config: &Config) -> bool {
    let addrs = config.get_hostaddrs();
    if !addrs.is_empty() {
        return addrs.iter().all(std::net::IpAddr::is_loopback);
    }
    let hosts = config.get_hosts();
    !hosts.is_empty()
        && hosts.iter().all(|host| match host {
            Host::Unix(_) => true,
            Host::Tcp(name) => {
                name == "localhost"
                    || name
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
        })
}

/// A database error for a message: the server's message and SQLSTATE
/// (never its DETAIL, which can quote row values), or the client's error.
pub fn reason(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        // Not the server's answer (no connection, TLS, a dropped link):
        // the error and its causes ("error connecting to server" alone
        // says nothing of why), each said once.
        None => std::iter::successors(Some(e as &dyn std::error::Error), |c| c.source())
            .map(ToString::to_string)
            .fold(String::new(), |text, cause| match text.as_str() {
                "" => cause,
                _ if text.contains(&cause) => text,
                _ => format!("{text}: {cause}"),
            }),
    }
}

fn describe(config: &Config) -> String {
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(host)) => host.clone(),
        Some(Host::Unix(path)) => path.display().to_string(),
        None => "localhost".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().unwrap_or("");
    let db = config.get_dbname().unwrap_or(user);
    format!("postgresql://{user}@{host}:{port}/{db}")
}

/// Throwaway databases for tests: each test gets a database of its own on
/// the server `KLUIS_TEST_DATABASE_URL` names, dropped when it ends.
pub mod scratch {
    use super::*;

    /// The variable naming the test server (a `postgresql://` URL of a
    /// role that may create databases).
    pub const SERVER_VAR: &str = "KLUIS_TEST_DATABASE_URL";
    /// Set to `1` (as CI does) to make a missing server a failure.
    pub const REQUIRE_VAR: &str = "KLUIS_REQUIRE_DATABASE";

    /// The test server's URL. Without one, prints a loud `SKIPPED` line
    /// naming `test` and returns `None`, or, with `KLUIS_REQUIRE_DATABASE=1`,
    /// an error.
    pub fn server(test: &str) -> Result<Option<String>, String> {
        match std::env::var(SERVER_VAR) {
            Ok(url) if !url.is_empty() => Ok(Some(url)),
            _ if std::env::var(REQUIRE_VAR).as_deref() == Ok("1") => Err(format!(
                "{test}: {SERVER_VAR} is not set, and {REQUIRE_VAR}=1 requires the PostgreSQL tests to run"
            )),
            _ => {
                eprintln!(
                    "SKIPPED {test}: no PostgreSQL server ({SERVER_VAR} is not set, e.g. \
                     postgresql://postgres@127.0.0.1:5432/test)"
                );
                Ok(None)
            }
        }
    }

    /// A database created for one test on the server, dropped (with every
    /// connection to it) when this is dropped.
    #[derive(Debug)]
    pub struct ScratchDatabase {
        server: String,
        name: String,
        url: String,
    }

    impl ScratchDatabase {
        /// Creates an empty database with a random name on `server`.
        pub fn create(server: &str) -> Result<Self, String> {
            let mut random = [0u8; 8];
            aws_lc_rs::rand::fill(&mut random).map_err(|_| "no randomness".to_owned())?;
            let name = format!("kluis_t_{}", hex::encode(random));
            let mut client = Client::connect(server, postgres::NoTls)
                .map_err(|e| format!("connecting to the test server: {}", reason(&e)))?;
            client
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .map_err(|e| format!("creating database {name}: {}", reason(&e)))?;
            let url = with_dbname(server, &name)?;
            Ok(ScratchDatabase {
                server: server.to_owned(),
                name,
                url,
            })
        }

        /// Its URL.
        pub fn url(&self) -> &str {
            &self.url
        }

        /// Its name.
        pub fn name(&self) -> &str {
            &self.name
        }
    }

    impl Drop for ScratchDatabase {
        fn drop(&mut self) {
            if let Ok(mut client) = Client::connect(&self.server, postgres::NoTls) {
                let _ = client.batch_execute(&format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    self.name
                ));
            }
        }
    }

    /// `server` (a `postgresql://` or `postgres://` URL) with its database
    /// name replaced by `name`.
    pub fn with_dbname(server: &str, name: &str) -> Result<String, String> {
        let (base, query) = match server.split_once('?') {
            Some((base, query)) => (base, Some(query)),
            None => (server, None),
        };
        let authority_start = base
            .find("://")
            .map(|i| i.saturating_add(3))
            .ok_or_else(|| format!("{SERVER_VAR} must be a postgresql:// URL"))?;
        let (authority, rest) = base.split_at(authority_start);
        let host_part = rest.split_once('/').map_or(rest, |(host, _)| host);
        let mut url = format!("{authority}{host_part}/{name}");
        if let Some(query) = query {
            url.push('?');
            url.push_str(query);
        }
        Ok(url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_never_shows_the_password() {
        let config = Config::from_str("postgresql://kluis:s3cret-pw@db.example:6543/state")
            .unwrap_or_else(|_| Config::new());
        let target = describe(&config);
        assert_eq!(target, "postgresql://kluis@db.example:6543/state");
        assert!(!target.contains("s3cret"));
    }

    #[test]
    fn a_bad_url_is_a_clear_error_without_the_url() {
        let err = Database::connect("postgresql://u:hunter2@host:notaport/db")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("could not parse the database URL"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn scratch_urls_replace_only_the_database_name() {
        assert_eq!(
            scratch::with_dbname("postgresql://postgres@127.0.0.1:5432/test", "x").ok(),
            Some("postgresql://postgres@127.0.0.1:5432/x".to_owned())
        );
        assert_eq!(
            scratch::with_dbname("postgres://u:p@h?sslmode=disable", "x").ok(),
            Some("postgres://u:p@h/x?sslmode=disable".to_owned())
        );
        assert!(scratch::with_dbname("host=h dbname=d", "x").is_err());
    }

    #[test]
    fn migrations_are_numbered_in_order_up_to_the_schema_version() {
        let versions: Vec<i32> = MIGRATIONS.iter().map(|m| m.version).collect();
        let expected: Vec<i32> = (1..=SCHEMA_VERSION).collect();
        assert_eq!(versions, expected);
    }
}
