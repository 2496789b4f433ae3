//! What every store-opening command shares: the store's arguments, opening
//! it (root secret or passphrase, the anchored audit log), an authenticated
//! and audited session, one failure type and exit-code rule, and the
//! helpers that write secrets to files. The commands themselves are in
//! `admin_cmd` (keys, policies, administrators, audit), `serve_cmd` and
//! `data_cmd`.

use crate::audit::{Actor, AuditAnchor, AuditError, AuditLog, Decision, NewRecord};
use crate::auth::{self, Admin, Credential, Permission};
use crate::cli::verify_cmd::{emit, now_ms};
use crate::cli::Outcome;
use crate::keys::{KeyError, KeyName};
use crate::kms::Kms;
use anyhow::{anyhow, Context};
use clap::Args;
use kluis_keystore::RootSecret;
use kluis_proto::VerifierIdentity;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use zeroize::Zeroizing;

/// Where the store is and how to open it.
#[derive(Debug, Args, Clone)]
pub(crate) struct StoreArgs {
    /// The store directory.
    #[arg(long, env = "KLUIS_STORE", value_name = "DIR", global = true)]
    pub store: Option<PathBuf>,
    /// Keep the store, its audit log and the challenge nonces in this
    /// PostgreSQL database instead of a directory, shared by every replica
    /// (docs/deploy.md). A password in the URL is visible to other users
    /// in the process list when given here: prefer KLUIS_DATABASE_URL.
    #[arg(
        long,
        env = "KLUIS_DATABASE_URL",
        value_name = "URL",
        global = true,
        hide_env_values = true
    )]
    pub database: Option<DatabaseUrl>,
    /// Reach the database over TLS, verified against the CA certificates in
    /// FILE (PEM): the server's certificate must name the URL's host. Without
    /// it, only a database on this machine is reached unencrypted (or one
    /// whose URL says sslmode=disable).
    #[arg(
        long,
        env = "KLUIS_DATABASE_CA_FILE",
        value_name = "FILE",
        global = true,
        requires = "database"
    )]
    pub database_ca: Option<PathBuf>,
    /// The root key file (32 random bytes, mode 0600). Alternatively a
    /// passphrase (Argon2id): --passphrase-file, --passphrase-fd, or
    /// KLUIS_STORE_PASSPHRASE (short commands only: it stays readable in
    /// /proc/PID/environ for the life of the process).
    #[arg(long, env = "KLUIS_ROOT_KEY_FILE", value_name = "FILE", global = true)]
    pub root_key_file: Option<PathBuf>,
    /// Read the store passphrase from FILE (a regular file, mode 0600 or
    /// 0400; one line).
    #[arg(
        long,
        env = "KLUIS_STORE_PASSPHRASE_FILE",
        value_name = "FILE",
        global = true,
        conflicts_with = "root_key_file"
    )]
    pub passphrase_file: Option<PathBuf>,
    /// Read the store passphrase from file descriptor N (until end of file),
    /// e.g. `--passphrase-fd 3 3< <(secret-tool lookup kluis store)`.
    #[arg(
        long,
        value_name = "N",
        global = true,
        conflicts_with_all = ["root_key_file", "passphrase_file"]
    )]
    pub passphrase_fd: Option<u32>,
    /// For a store whose keys are in an HSM: read the token's user PIN from
    /// FILE (a regular file, mode 0600 or 0400; one line). Alternatively
    /// KLUIS_HSM_PIN (short commands only: it stays readable in
    /// /proc/PID/environ for the life of the process). Never a command-line
    /// value.
    #[arg(long, env = "KLUIS_HSM_PIN_FILE", value_name = "FILE", global = true)]
    pub hsm_pin_file: Option<PathBuf>,
    /// The administrator credential file.
    #[arg(
        long,
        env = "KLUIS_CREDENTIAL_FILE",
        value_name = "FILE",
        global = true
    )]
    pub credential: Option<PathBuf>,
}

/// A database URL, which may hold a password: `Debug` never shows it.
#[derive(Clone)]
pub(crate) struct DatabaseUrl(String);

impl std::str::FromStr for DatabaseUrl {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(DatabaseUrl(s.to_owned()))
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DatabaseUrl(<redacted>)")
    }
}

/// A command failure: refused (exit 1) or usage/I/O (exit 2).
pub(crate) enum Failure {
    Refused(String, String),
    Usage(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Usage(e)
    }
}

impl From<KeyError> for Failure {
    fn from(e: KeyError) -> Self {
        match &e {
            KeyError::Store(_) | KeyError::CorruptRecord { .. } | KeyError::Audit(_) => {
                Failure::Usage(anyhow!(e))
            }
            _ => Failure::Refused(key_error_kind(&e).to_owned(), e.to_string()),
        }
    }
}

pub(crate) fn key_error_kind(e: &KeyError) -> &'static str {
    match e {
        KeyError::InvalidName { .. } => "invalid_key_name",
        KeyError::NotFound(_) => "key_not_found",
        KeyError::AlreadyExists(_) => "key_exists",
        KeyError::WrongState { .. } => "wrong_state",
        KeyError::Destroyed { .. } => "key_destroyed",
        KeyError::NoSuchVersion { .. } => "no_such_version",
        KeyError::WaitingPeriod { .. } => "waiting_period",
        KeyError::InvalidArgument(_) => "invalid_argument",
        KeyError::BadWrappedKey(_) => "bad_wrapped_key",
        _ => "store_error",
    }
}

/// The one exit-code rule of every command: 0 done; 1 refused — by a
/// decision (credential, root secret, role, key state, policy) or because
/// what was checked is not intact (a tampered audit log, a bad envelope);
/// 2 usage (bad arguments, an output that exists) or I/O (a file missing or
/// unreadable, a full disk). Failures print `{"error": {"kind", "message"}}`
/// on stdout; the kind of an exit 2 is `usage` or `io`.
pub(crate) fn finish(result: Result<(), Failure>) -> Outcome {
    match result {
        Ok(()) => Outcome::Accepted,
        Err(Failure::Refused(kind, message)) => {
            emit(&json!({ "error": { "kind": kind, "message": message } }));
            to_stderr!("refused ({kind}): {message}");
            Outcome::Rejected
        }
        Err(Failure::Usage(e)) => {
            let kind = if e.chain().any(|c| c.is::<std::io::Error>()) {
                "io"
            } else {
                "usage"
            };
            let message = kluis_proto::report::error_text(e.as_ref());
            emit(&json!({ "error": { "kind": kind, "message": message } }));
            to_stderr!("error: {message}");
            Outcome::Failed
        }
    }
}

impl StoreArgs {
    pub(crate) fn dir(&self) -> anyhow::Result<&Path> {
        if self.database.is_some() {
            return Err(anyhow!(
                "this command works on a store directory, and the store is in a database (--database)"
            ));
        }
        self.store.as_deref().ok_or_else(|| {
            anyhow!("no store: pass --store DIR (or set KLUIS_STORE), or --database URL (or KLUIS_DATABASE_URL)")
        })
    }

    /// The store's database, connected, if the store is in one.
    pub(crate) fn database(&self) -> Result<Option<kluis_keystore::Database>, Failure> {
        let Some(DatabaseUrl(url)) = &self.database else {
            return Ok(None);
        };
        let ca = match &self.database_ca {
            Some(path) => Some(
                crate::cli::input::read_bounded(path, 256 * 1024)
                    .with_context(|| format!("reading {}", path.display()))?
                    .ok_or_else(|| anyhow!("{} is too large for a CA file", path.display()))?,
            ),
            None => None,
        };
        kluis_keystore::Database::connect_tls(url, ca.as_deref())
            .map(Some)
            .map_err(|e| Failure::Usage(anyhow!(e)))
    }

    pub(crate) fn secret(&self) -> anyhow::Result<RootSecret> {
        if let Some(path) = &self.root_key_file {
            return RootSecret::from_key_file(path)
                .with_context(|| format!("root key file {}", path.display()));
        }
        if let Some(path) = &self.passphrase_file {
            let (file, mode) = crate::cli::input::open_regular(path)
                .with_context(|| format!("passphrase file {}", path.display()))?;
            if mode & 0o077 != 0 {
                return Err(anyhow!(
                    "passphrase file {} has mode {mode:04o}: group and others must have no access (chmod 600)",
                    path.display()
                ));
            }
            return passphrase_from(file)
                .with_context(|| format!("passphrase file {}", path.display()));
        }
        if let Some(fd) = self.passphrase_fd {
            let path = format!("/dev/fd/{fd}");
            let file = std::fs::File::open(&path)
                .with_context(|| format!("passphrase file descriptor {fd}"))?;
            return passphrase_from(file)
                .with_context(|| format!("passphrase file descriptor {fd}"));
        }
        match std::env::var("KLUIS_STORE_PASSPHRASE") {
            Ok(p) if !p.is_empty() => {
                // Do not leave the passphrase in this process's environment.
                std::env::remove_var("KLUIS_STORE_PASSPHRASE");
                Ok(RootSecret::from_passphrase(Zeroizing::new(p))?)
            }
            _ => Err(anyhow!(
                "no root secret: pass --root-key-file FILE (or KLUIS_ROOT_KEY_FILE) or set KLUIS_STORE_PASSPHRASE"
            )),
        }
    }

    /// The HSM user PIN: `--hsm-pin-file` or `KLUIS_HSM_PIN` (removed from
    /// this process's environment once read, so children do not inherit it;
    /// `/proc/PID/environ` still shows the initial environment).
    pub(crate) fn hsm_pin(&self) -> anyhow::Result<Zeroizing<String>> {
        if let Some(path) = &self.hsm_pin_file {
            let (file, mode) = crate::cli::input::open_regular(path)
                .with_context(|| format!("HSM PIN file {}", path.display()))?;
            if mode & 0o077 != 0 {
                return Err(anyhow!(
                    "HSM PIN file {} has mode {mode:04o}: group and others must have no access (chmod 600)",
                    path.display()
                ));
            }
            return one_line_secret(file, kluis_hsm::MAX_PIN_LEN, "the HSM PIN")
                .with_context(|| format!("HSM PIN file {}", path.display()));
        }
        match std::env::var("KLUIS_HSM_PIN") {
            Ok(pin) if !pin.is_empty() => {
                std::env::remove_var("KLUIS_HSM_PIN");
                Ok(Zeroizing::new(pin))
            }
            _ => Err(anyhow!(
                "the store keeps its keys in an HSM: pass --hsm-pin-file FILE (or KLUIS_HSM_PIN_FILE) or set KLUIS_HSM_PIN"
            )),
        }
    }

    /// Open the store; a wrong root secret or HSM PIN is a refusal (exit 1).
    pub(crate) fn open(&self) -> Result<Kms, Failure> {
        if let Some(db) = self.database()? {
            let target = db.target().to_owned();
            if Kms::is_hsm_database(&db).map_err(|e| Failure::Usage(anyhow!(e)))? {
                return Kms::open_hsm_database(db, self.hsm_pin()?)
                    .map_err(|e| hsm_failure(Path::new(&target), e));
            }
            return match Kms::open_database(db, self.secret()?) {
                Ok(kms) => Ok(kms),
                Err(KeyError::Store(kluis_keystore::StoreError::WrongRootSecret)) => {
                    Err(Failure::Refused(
                        "root_secret_rejected".into(),
                        format!("the root secret does not open the store in {target}"),
                    ))
                }
                Err(e) => Err(Failure::Usage(
                    anyhow!(e).context(format!("opening the store in {target}")),
                )),
            };
        }
        let dir = self.dir()?;
        if Kms::is_hsm_store(dir).map_err(|e| Failure::Usage(anyhow!(e)))? {
            return Kms::open_hsm(dir, self.hsm_pin()?).map_err(|e| hsm_failure(dir, e));
        }
        match Kms::open(dir, self.secret()?) {
            Ok(kms) => Ok(kms),
            Err(KeyError::Store(kluis_keystore::StoreError::WrongRootSecret)) => {
                Err(Failure::Refused(
                    "root_secret_rejected".into(),
                    format!("the root secret does not open the store {}", dir.display()),
                ))
            }
            Err(e) => Err(Failure::Usage(
                anyhow!(e).context(format!("opening the store {}", dir.display())),
            )),
        }
    }

    pub(crate) fn audit_path(&self) -> anyhow::Result<PathBuf> {
        Ok(self.dir()?.join("audit.log"))
    }

    /// The audit log of `kms`'s store (its file, or its database), which
    /// must continue from `anchor` (the head anchored in the store): a
    /// damaged log is refused (`audit_broken`, exit 1) until an operator
    /// runs `audit recover` (a file) or restores the database.
    pub(crate) fn audit_log(
        &self,
        kms: &Kms,
        anchor: Option<&AuditAnchor>,
    ) -> Result<AuditLog, Failure> {
        if let Some(db) = kms.store().database() {
            let target = PathBuf::from(db.target());
            return AuditLog::open_database(kms.store(), anchor)
                .map_err(|e| audit_failure(&target, e));
        }
        let path = self.audit_path()?;
        AuditLog::open_anchored(&path, anchor).map_err(|e| audit_failure(&path, e))
    }

    pub(crate) fn credential(&self) -> Result<Credential, Failure> {
        let Some(path) = &self.credential else {
            return Err(Failure::Refused(
                "credential_missing".into(),
                auth::AuthError::Missing.to_string(),
            ));
        };
        let (file, mode) = crate::cli::input::open_regular(path)
            .with_context(|| format!("reading credential {}", path.display()))?;
        if mode & 0o077 != 0 {
            return Err(Failure::Usage(anyhow!(
                "credential file {} has mode {mode:04o}: group and others must have no access (chmod 600)",
                path.display()
            )));
        }
        // Wiped on every path out, the refusals included.
        let mut text = Zeroizing::new(Vec::with_capacity(4097));
        std::io::Read::read_to_end(&mut std::io::Read::take(file, 4097), &mut text)
            .with_context(|| format!("reading credential {}", path.display()))?;
        if text.len() > 4096 {
            return Err(Failure::Usage(anyhow!(
                "credential file {} is too large",
                path.display()
            )));
        }
        let text =
            std::str::from_utf8(&text).map_err(|_| anyhow!("credential file is not text"))?;
        Ok(Credential::new(Zeroizing::new(text.to_owned())))
    }
}

/// A store in HSM mode that cannot be opened: a PIN the token refused or
/// locked is a refusal (exit 1); anything else (module, token, session) is
/// exit 2.
pub(crate) fn hsm_failure(dir: &Path, e: KeyError) -> Failure {
    use kluis_hsm::HsmError;
    match e {
        KeyError::Hsm(
            e @ (HsmError::WrongPin { .. }
            | HsmError::PinLocked { .. }
            | HsmError::PinFinalTry { .. }),
        ) => Failure::Refused("hsm_pin_rejected".into(), e.to_string()),
        e => Failure::Usage(anyhow!(e).context(format!("opening the store {}", dir.display()))),
    }
}

/// An audit log that cannot be opened: damaged (exit 1, `audit_broken`)
/// or unreadable (exit 2).
pub(crate) fn audit_failure(path: &Path, e: AuditError) -> Failure {
    match e {
        AuditError::Io { .. } | AuditError::Unavailable { .. } => Failure::Usage(
            anyhow!(e).context(format!("opening the audit log {}", path.display())),
        ),
        e => Failure::Refused(
            "audit_broken".into(),
            format!(
                "{e}{}; nothing is done until an administrator runs `attestation-verifier audit recover --reason TEXT`",
                e.broken_seq()
                    .map(|s| format!(" (first broken record: seq {s})"))
                    .unwrap_or_default()
            ),
        ),
    }
}

/// A passphrase read from `source`: at most 4 KiB, UTF-8, one line (a final
/// newline is not part of it).
pub(crate) fn passphrase_from(source: impl std::io::Read) -> anyhow::Result<RootSecret> {
    let line = one_line_secret(source, 4096, "the passphrase")?;
    Ok(RootSecret::from_passphrase(line)?)
}

/// One line of at most `max` bytes of UTF-8 from `source` (a final newline
/// is not part of it), in zeroizing memory.
fn one_line_secret(
    source: impl std::io::Read,
    max: usize,
    what: &str,
) -> anyhow::Result<Zeroizing<String>> {
    use std::io::Read;
    let limit = max.saturating_add(1);
    let mut bytes = Zeroizing::new(Vec::with_capacity(limit));
    source
        .take(u64::try_from(limit).unwrap_or(u64::MAX))
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading {what}"))?;
    if bytes.len() > max {
        return Err(anyhow!("{what} is longer than {max} bytes"));
    }
    let text = std::str::from_utf8(&bytes).map_err(|_| anyhow!("{what} is not UTF-8"))?;
    let line = text.strip_suffix('\n').unwrap_or(text);
    let line = line.strip_suffix('\r').unwrap_or(line);
    if line.is_empty() {
        return Err(anyhow!("{what} is empty"));
    }
    Ok(Zeroizing::new(line.to_owned()))
}

/// An opened store, audit log and authenticated administrator.
pub(crate) struct Session {
    pub kms: Kms,
    pub audit: Arc<AuditLog>,
    pub admin: Admin,
}

/// Open the store and its audit log (which must continue from the anchored
/// head), bind them (changes are audited first), record a torn last line
/// that was removed, and resolve a change a crash interrupted.
pub(crate) fn open_audited(args: &StoreArgs) -> Result<(Kms, Arc<AuditLog>), Failure> {
    let mut kms = args.open()?;
    let anchor = kms.audit_anchor()?;
    let audit = Arc::new(args.audit_log(&kms, anchor.as_ref())?);
    kms.bind_audit(Arc::clone(&audit), Actor::System);
    let removed = audit.recovered_tail_bytes();
    if removed > 0 {
        kms.append_audit(NewRecord {
            time_ms: now_ms(),
            actor: Actor::System,
            operation: "audit.tail_recovered".to_owned(),
            key_id: None,
            key_version: None,
            decision: Decision::Allowed,
            reason: Some(format!(
                "removed an unfinished last line of {removed} bytes (an append interrupted by a crash) after seq {}",
                audit.head().seq
            )),
            attestation_document: None,
        })?;
    }
    kms.resolve_interrupted()?;
    Ok((kms, audit))
}

impl Session {
    /// Open, authenticate, and check `permission`; failures are audited.
    pub(crate) fn start(
        args: &StoreArgs,
        permission: Permission,
        action: &str,
    ) -> Result<Session, Failure> {
        let (mut kms, audit) = open_audited(args)?;
        let credential = args.credential()?;
        let claimed = credential
            .claimed_name()
            .unwrap_or("<malformed>")
            .to_owned();
        let record = kms.admin(&claimed)?;
        let admin = match auth::authenticate(&credential, record.as_ref()) {
            Ok(admin) => admin,
            Err(e) => {
                audit_refusal(
                    &kms,
                    Actor::System,
                    action,
                    format!("authentication failed for {claimed:?}"),
                )?;
                return Err(Failure::Refused(
                    "credential_rejected".into(),
                    e.to_string(),
                ));
            }
        };
        if let Err(e) = admin.require(permission, action) {
            audit_refusal(&kms, admin_actor(&admin), action, e.to_string())?;
            return Err(Failure::Refused("forbidden".into(), e.to_string()));
        }
        kms.set_audit_actor(admin_actor(&admin));
        Ok(Session { kms, audit, admin })
    }

    /// Append an audit record for this administrator and anchor the head.
    pub(crate) fn record(
        &self,
        operation: &str,
        key: Option<&KeyName>,
        version: Option<u32>,
        decision: Decision,
        reason: Option<String>,
    ) -> Result<(), Failure> {
        self.kms.append_audit(NewRecord {
            time_ms: now_ms(),
            actor: admin_actor(&self.admin),
            operation: operation.to_owned(),
            key_id: key.map(ToString::to_string),
            key_version: version,
            decision,
            reason,
            attestation_document: None,
        })?;
        Ok(())
    }

    /// Run `f`, a use of a key that changes nothing (the data commands),
    /// and audit its outcome before the key is used: allowed with the
    /// version `f` reports, or refused with the error.
    pub(crate) fn used<T>(
        &self,
        operation: &str,
        key: &KeyName,
        f: impl FnOnce(&Kms) -> Result<(T, Option<u32>), KeyError>,
    ) -> Result<T, Failure> {
        match f(&self.kms) {
            Ok((value, version)) => {
                self.record(operation, Some(key), version, Decision::Allowed, None)?;
                Ok(value)
            }
            Err(e) => {
                self.record(
                    operation,
                    Some(key),
                    None,
                    Decision::Refused,
                    Some(format!("{}: {e}", key_error_kind(&e))),
                )?;
                Err(e.into())
            }
        }
    }

    /// Run the change `f`, which the bound store audits before it takes
    /// effect; audit a refusal (a change that did not happen) after.
    pub(crate) fn audited<T>(
        &self,
        operation: &str,
        key: &KeyName,
        f: impl FnOnce(&Kms) -> Result<T, KeyError>,
    ) -> Result<T, Failure> {
        match f(&self.kms) {
            Ok(value) => Ok(value),
            Err(KeyError::Audit(e)) => Err(Failure::Usage(anyhow!(
                "{operation} was not done: its audit record could not be written: {e}"
            ))),
            Err(e) => {
                self.record(
                    operation,
                    Some(key),
                    None,
                    Decision::Refused,
                    Some(format!("{}: {e}", key_error_kind(&e))),
                )?;
                Err(e.into())
            }
        }
    }
}

pub(crate) fn admin_actor(admin: &Admin) -> Actor {
    Actor::Admin {
        name: admin.name.clone(),
        role: admin.role.as_str().to_owned(),
    }
}

pub(crate) fn audit_refusal(
    kms: &Kms,
    actor: Actor,
    action: &str,
    reason: String,
) -> Result<(), Failure> {
    kms.append_audit(NewRecord {
        time_ms: now_ms(),
        actor,
        operation: action.to_owned(),
        key_id: None,
        key_version: None,
        decision: Decision::Refused,
        reason: Some(reason),
        attestation_document: None,
    })?;
    Ok(())
}

pub(crate) fn write_secret_file(path: &Path, contents: &str) -> anyhow::Result<()> {
    let mut line = Zeroizing::new(Vec::with_capacity(contents.len().saturating_add(1)));
    line.extend_from_slice(contents.as_bytes());
    line.push(b'\n');
    crate::cli::output::write_new(path, &line, crate::cli::output::Access::OwnerOnly)
}

/// Add an administrator and write their credential to `path`: the audit
/// record first, then the credential file, then the stored verifier; if the
/// file cannot be written, no administrator is added (and the name stays
/// free).
pub(crate) fn add_admin_with_credential(
    kms: &Kms,
    record: &auth::AdminRecord,
    reason: &str,
    path: &Path,
    credential: &str,
) -> Result<(), Failure> {
    let mut write_error = None;
    let added = kms.add_admin_then(record, reason, || {
        write_secret_file(path, credential).map_err(|e| {
            let message = kluis_proto::report::error_text(e.as_ref());
            write_error = Some(e);
            KeyError::InvalidArgument(message)
        })
    });
    match (added, write_error) {
        (Ok(()), _) => Ok(()),
        (Err(_), Some(e)) => Err(Failure::Usage(e)),
        (Err(e), None) => Err(e.into()),
    }
}

/// The verifier identity: the store's key, or the token's in HSM mode.
pub(crate) fn load_identity(kms: &Kms) -> Result<VerifierIdentity, Failure> {
    kms.identity()
        .map_err(|e| Failure::Usage(anyhow!("verifier identity: {e}")))?
        .ok_or_else(|| Failure::Usage(anyhow!("the store has no verifier identity")))
}
