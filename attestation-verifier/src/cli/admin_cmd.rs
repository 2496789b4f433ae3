//! The administrative commands: `init`, `admin`, `key`, `policy`, `identity`,
//! `audit` (the session they share is in `session`). Every mutation is
//! authenticated, role-checked and audited before it takes effect.

use crate::audit::{Actor, AuditError, AuditFilter, AuditLog, Decision, NewRecord};
use crate::auth::{self, Permission, Role};
use crate::cli::verify_cmd::{emit, now_ms};
use crate::keys::{
    CmkRecord, KeyName, KeyState, DEFAULT_DELETION_WAIT_DAYS, DEFAULT_ROTATION_DAYS,
};
use crate::kms::{Kms, StoredPolicy};
use crate::policy::KeyPolicy;
use anyhow::{anyhow, Context};
use clap::{Args, Subcommand};
use kluis_keystore::RootSecret;
use kluis_proto::VerifierIdentity;
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::cli::session::*;

// ---------------------------------------------------------------- init

#[derive(Debug, Args)]
pub(crate) struct InitArgs {
    /// Directory to write the first key-admin and app-admin credentials to
    /// (files `key-admin.credential` and `app-admin.credential`, mode 0600).
    #[arg(long, value_name = "DIR")]
    credentials_out: PathBuf,
    /// Generate the root key file given by --root-key-file if it does not exist.
    #[arg(long, conflicts_with = "hsm_module")]
    generate_root_key: bool,
    /// Keep the master keys, the store's root and the verifier identity in
    /// a PKCS#11 token: the module (shared library) to load. Needs
    /// --hsm-token and the user PIN (--hsm-pin-file or KLUIS_HSM_PIN); the
    /// store remembers both in hsm.json, later commands need only the PIN.
    #[arg(long, value_name = "PATH", requires = "hsm_token")]
    hsm_module: Option<PathBuf>,
    /// The label of the (initialised) token to use with --hsm-module.
    #[arg(long, value_name = "LABEL", requires = "hsm_module")]
    hsm_token: Option<String>,
}

/// What a failed `init` made, removed again on drop unless disarmed.
#[derive(Default)]
struct InitCleanup {
    files: Vec<PathBuf>,
    store: Option<PathBuf>,
    done: bool,
}

impl Drop for InitCleanup {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        for file in &self.files {
            let _ = std::fs::remove_file(file);
        }
        if let Some(store) = &self.store {
            let _ = std::fs::remove_dir_all(store);
        }
    }
}

/// Creates `path`'s missing parent directories (mode 0700 for new ones).
fn create_parents(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    Ok(())
}

pub(crate) fn init(store: &StoreArgs, args: &InitArgs) -> Result<(), Failure> {
    let mut cleanup = InitCleanup::default();
    // Check every output before making anything.
    for role in [Role::KeyAdmin, Role::AppAdmin] {
        let path = args
            .credentials_out
            .join(format!("{}.credential", role.as_str()));
        if std::fs::symlink_metadata(&path).is_ok() {
            return Err(Failure::Usage(anyhow!(
                "{} exists; init writes new credentials and replaces nothing",
                path.display()
            )));
        }
    }
    // A directory, or a PostgreSQL database (schema migrations applied
    // first) holding the store, its audit log and its nonces.
    let db = store.database()?;
    let dir = match &db {
        Some(_) => None,
        None => {
            let dir = store.dir()?;
            if std::fs::symlink_metadata(dir).is_err() {
                create_parents(dir)?;
                cleanup.store = Some(dir.to_path_buf());
            }
            Some(dir)
        }
    };
    let name = match (&db, dir) {
        (Some(db), _) => db.target().to_owned(),
        (None, Some(dir)) => dir.display().to_string(),
        (None, None) => return Err(Failure::Usage(anyhow!("no store"))),
    };
    let token = open_init_token(store, args, Path::new(&name))?;
    let secret = match token {
        Some(_) => None,
        None => Some(match (&store.root_key_file, args.generate_root_key) {
            (Some(path), true) if !path.exists() => {
                create_parents(path)?;
                let secret = RootSecret::generate_key_file(path)
                    .with_context(|| format!("generating the root key file {}", path.display()))?;
                cleanup.files.push(path.clone());
                secret
            }
            _ => store.secret()?,
        }),
    };
    std::fs::create_dir_all(&args.credentials_out)
        .with_context(|| format!("creating {}", args.credentials_out.display()))?;
    let creating = || format!("creating the store {name}");
    let mut kms = match (db, dir, token, secret) {
        (Some(db), _, Some(token), _) => {
            Kms::init_hsm_database(db, token).with_context(creating)?
        }
        (Some(db), _, None, Some(secret)) => {
            let kms = Kms::init_database(db, secret).with_context(creating)?;
            // A store in a database is not removed on a later failure: its
            // root key must outlive it.
            cleanup
                .files
                .retain(|f| Some(f) != store.root_key_file.as_ref());
            kms
        }
        (None, Some(dir), Some(token), _) => Kms::init_hsm(dir, token).with_context(creating)?,
        (None, Some(dir), None, Some(secret)) => Kms::init(dir, secret).with_context(creating)?,
        _ => return Err(Failure::Usage(anyhow!("no store"))),
    };
    init_contents(store, args, &mut kms, &name, &mut cleanup)?;
    cleanup.done = true;
    to_stderr!("store created; build the verifier public key above into the enclave image");
    Ok(())
}

/// For `init --hsm-module PATH --hsm-token LABEL`: the token, logged in.
fn open_init_token(
    store: &StoreArgs,
    args: &InitArgs,
    location: &Path,
) -> Result<Option<Arc<kluis_hsm::Token>>, Failure> {
    let (Some(module), Some(token)) = (&args.hsm_module, &args.hsm_token) else {
        return Ok(None);
    };
    if store.root_key_file.is_some()
        || store.passphrase_file.is_some()
        || store.passphrase_fd.is_some()
    {
        return Err(Failure::Usage(anyhow!(
            "a store in an HSM has no root key file or passphrase: drop them, or drop --hsm-module"
        )));
    }
    let config = kluis_hsm::TokenConfig {
        module: module.clone(),
        token: token.clone(),
    };
    let token = kluis_hsm::Token::open(&config, store.hsm_pin()?)
        .map_err(|e| crate::cli::session::hsm_failure(location, e.into()))?;
    Ok(Some(Arc::new(token)))
}

/// What `init` writes into a new store: the identity, the two first
/// administrators and their credentials, each audited.
fn init_contents(
    store: &StoreArgs,
    args: &InitArgs,
    kms: &mut Kms,
    store_name: &str,
    cleanup: &mut InitCleanup,
) -> Result<(), Failure> {
    let roles = [Role::KeyAdmin, Role::AppAdmin];
    let credential_path = |role: Role| {
        args.credentials_out
            .join(format!("{}.credential", role.as_str()))
    };
    let audit = Arc::new(store.audit_log(kms, None)?);
    kms.bind_audit(Arc::clone(&audit), Actor::System);
    let public_key = if kms.token().is_some() {
        kms.record_token_identity()?
    } else {
        let identity = VerifierIdentity::generate().map_err(|e| anyhow!("identity key: {e}"))?;
        let pkcs8 = identity
            .to_pkcs8_der()
            .map_err(|e| anyhow!("identity key: {e}"))?;
        kms.set_identity_pkcs8(&pkcs8)?;
        identity.public_key_sec1()
    };
    let now = now_ms();
    let mut created = Vec::new();
    for role in roles {
        let (record, credential) =
            auth::new_admin(role.as_str(), role, now).map_err(|e| anyhow!("{e}"))?;
        let path = credential_path(role);
        add_admin_with_credential(
            kms,
            &record,
            &format!("initial {} {}", role.as_str(), record.name),
            &path,
            credential.expose(),
        )?;
        cleanup.files.push(path.clone());
        created.push(json!({ "name": record.name, "role": role.as_str(), "credential_file": path.display().to_string() }));
    }
    emit(&json!({
        "store": store_name,
        "verifier_public_key": hex::encode(public_key),
        "key_backend": kms.backend_name(),
        "administrators": created,
    }));
    Ok(())
}

/// `migrate`: apply the schema migrations this build knows to the store's
/// database (`init --database` does this too). Replicas of an older build
/// refuse the migrated schema; upgrade them first or together.
pub(crate) fn migrate(store: &StoreArgs) -> Result<(), Failure> {
    let Some(db) = store.database()? else {
        return Err(Failure::Usage(anyhow!(
            "migrate works on a database: pass --database URL (or set KLUIS_DATABASE_URL)"
        )));
    };
    let applied = db.migrate().map_err(|e| Failure::Usage(anyhow!(e)))?;
    emit(&json!({
        "database": db.target(),
        "applied": applied,
        "schema_version": kluis_keystore::pg::SCHEMA_VERSION,
    }));
    Ok(())
}

// ---------------------------------------------------------------- admin

#[derive(Debug, Subcommand)]
pub(crate) enum AdminCommand {
    /// Add an administrator of your own role; writes their credential to --out (0600).
    Add {
        /// key-admin or app-admin.
        #[arg(long)]
        role: String,
        /// Their name.
        #[arg(long)]
        name: String,
        /// Where to write the new credential.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

pub(crate) fn admin(store: &StoreArgs, command: &AdminCommand) -> Result<(), Failure> {
    let AdminCommand::Add { role, name, out } = command;
    let role = Role::parse(role).ok_or_else(|| anyhow!("--role must be key-admin or app-admin"))?;
    let session = Session::start(store, Permission::AddAdmin(role), "admin.create")?;
    let (record, credential) = auth::new_admin(name, role, now_ms())
        .map_err(|e| Failure::Refused("invalid_name".into(), e.to_string()))?;
    // Check the output before changing anything.
    if std::fs::symlink_metadata(out).is_ok() {
        return Err(Failure::Usage(anyhow!(
            "{} exists; the credential is written to a new file only",
            out.display()
        )));
    }
    add_admin_with_credential(
        &session.kms,
        &record,
        &format!("{} {}", role.as_str(), record.name),
        out,
        credential.expose(),
    )?;
    emit(
        &json!({ "name": record.name, "role": role.as_str(), "credential_file": out.display().to_string() }),
    );
    Ok(())
}

// ---------------------------------------------------------------- key

#[derive(Debug, Subcommand)]
pub(crate) enum KeyCommand {
    /// Create a master key `tenant/application/environment`.
    Create {
        /// The key name.
        name: String,
        /// Automatic rotation period in days (0: only on demand).
        #[arg(long, default_value_t = DEFAULT_ROTATION_DAYS)]
        rotation_days: u32,
    },
    /// Rotate a key now, or every key whose rotation is due (--due).
    Rotate {
        /// The key name.
        #[arg(required_unless_present = "due")]
        name: Option<String>,
        /// Rotate every key whose rotation period has passed.
        #[arg(long, conflicts_with = "name")]
        due: bool,
    },
    /// List master keys.
    List,
    /// Show a master key with all its versions.
    Show {
        /// The key name.
        name: String,
    },
    /// Disable a key (it cannot be used until enabled).
    Disable {
        /// The key name.
        name: String,
    },
    /// Enable a disabled key.
    Enable {
        /// The key name.
        name: String,
    },
    /// Schedule destruction after a waiting period (7 to 365 days).
    ScheduleDeletion {
        /// The key name.
        name: String,
        /// Waiting period in days.
        #[arg(long, default_value_t = DEFAULT_DELETION_WAIT_DAYS)]
        days: u32,
    },
    /// Cancel a scheduled deletion (the key becomes disabled).
    CancelDeletion {
        /// The key name.
        name: String,
    },
    /// Destroy a key whose waiting period is over: everything under it becomes unreadable.
    Destroy {
        /// The key name.
        name: String,
        /// Also write a shredding receipt signed by the verifier identity to
        /// FILE (which must not exist): the key, the versions destroyed, the
        /// `key.destroy` audit record, its inclusion proof and the signed
        /// checkpoint after it. `evidence verify` checks it offline.
        #[arg(long, value_name = "FILE")]
        receipt: Option<PathBuf>,
    },
    /// Write the shredding receipt of a key destroyed earlier (as
    /// `key destroy --receipt` does), with a checkpoint of the log now.
    Receipt {
        /// The key name.
        name: String,
        /// Where to write it (must not exist).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

fn key_json(record: &CmkRecord) -> Value {
    let (state, extra) = match record.state {
        KeyState::PendingDeletion { after_ms } => (
            "pending_deletion",
            json!({ "destroy_after": crate::cli::report::rfc3339_millis(after_ms) }),
        ),
        KeyState::Destroyed { at_ms } => (
            "destroyed",
            json!({ "destroyed_at": crate::cli::report::rfc3339_millis(at_ms) }),
        ),
        KeyState::Enabled => ("enabled", Value::Null),
        KeyState::Disabled => ("disabled", Value::Null),
    };
    json!({
        "name": record.name.as_str(),
        "state": state,
        "state_detail": extra,
        "created": crate::cli::report::rfc3339_millis(record.created_ms),
        "rotation_days": record.rotation_days,
        "current_version": record.current().map(|v| v.version),
        "versions": record.versions.iter().map(|v| json!({
            "version": v.version,
            "created": crate::cli::report::rfc3339_millis(v.created_ms),
            "state": v.state,
        })).collect::<Vec<_>>(),
    })
}

fn parse_name(name: &str) -> Result<KeyName, Failure> {
    KeyName::parse(name).map_err(Failure::from)
}

pub(crate) fn key(store: &StoreArgs, command: &KeyCommand) -> Result<(), Failure> {
    let now = now_ms();
    match command {
        KeyCommand::List => {
            let session = Session::start(store, Permission::Read, "key.list")?;
            let keys = session.kms.keys()?;
            emit(&json!(keys.iter().map(key_json).collect::<Vec<_>>()));
        }
        KeyCommand::Show { name } => {
            let session = Session::start(store, Permission::Read, "key.show")?;
            emit(&key_json(&session.kms.key(&parse_name(name)?)?));
        }
        KeyCommand::Create {
            name,
            rotation_days,
        } => {
            let name = parse_name(name)?;
            let session = Session::start(store, Permission::ManageKeys, "key.create")?;
            let record = session.audited("key.create", &name, |k| {
                k.create_key(&name, *rotation_days, now)
            })?;
            emit(&key_json(&record));
        }
        KeyCommand::Rotate {
            name: Some(name), ..
        } => {
            let name = parse_name(name)?;
            let session = Session::start(store, Permission::ManageKeys, "key.rotate")?;
            let version = session.audited("key.rotate", &name, |k| k.rotate_key(&name, now))?;
            emit(&json!({ "name": name.as_str(), "current_version": version }));
        }
        KeyCommand::Rotate { name: None, .. } => {
            let session = Session::start(store, Permission::ManageKeys, "key.rotate")?;
            // Each rotation is audited (reason: rotation period elapsed)
            // before it takes effect.
            let rotated = session.kms.rotate_due(now)?;
            emit(&json!(rotated
                .iter()
                .map(|(n, v)| json!({ "name": n.as_str(), "current_version": v }))
                .collect::<Vec<_>>()));
        }
        KeyCommand::Disable { name } => {
            let name = parse_name(name)?;
            let session = Session::start(store, Permission::ManageKeys, "key.disable")?;
            let record = session.audited("key.disable", &name, |k| k.disable_key(&name))?;
            emit(&key_json(&record));
        }
        KeyCommand::Enable { name } => {
            let name = parse_name(name)?;
            let session = Session::start(store, Permission::ManageKeys, "key.enable")?;
            let record = session.audited("key.enable", &name, |k| k.enable_key(&name))?;
            emit(&key_json(&record));
        }
        KeyCommand::ScheduleDeletion { name, days } => {
            let name = parse_name(name)?;
            let session = Session::start(store, Permission::ManageKeys, "key.schedule_deletion")?;
            session.audited("key.schedule_deletion", &name, |k| {
                k.schedule_deletion(&name, *days, now)
            })?;
            emit(&key_json(&session.kms.key(&name)?));
        }
        KeyCommand::CancelDeletion { name } => {
            let name = parse_name(name)?;
            let session = Session::start(store, Permission::ManageKeys, "key.cancel_deletion")?;
            let record =
                session.audited("key.cancel_deletion", &name, |k| k.cancel_deletion(&name))?;
            emit(&key_json(&record));
        }
        KeyCommand::Destroy { name, receipt } => {
            let name = parse_name(name)?;
            if let Some(out) = receipt {
                crate::cli::evidence_cmd::check_new_output(out)?;
            }
            let session = Session::start(store, Permission::ManageKeys, "key.destroy")?;
            let record = session.audited("key.destroy", &name, |k| k.destroy_key(&name, now))?;
            if let Some(out) = receipt {
                crate::cli::evidence_cmd::receipt(&session, &record, out).map_err(|e| match e {
                    Failure::Usage(e) => Failure::Usage(e.context(format!(
                        "{name} was destroyed, but its receipt was not written \
                         (write it with `key receipt {name} --out FILE`)"
                    ))),
                    refused => refused,
                })?;
            }
            let mut out = key_json(&record);
            if let (Some(path), Some(fields)) = (receipt, out.as_object_mut()) {
                fields.insert("receipt".into(), json!(path.display().to_string()));
            }
            emit(&out);
        }
        KeyCommand::Receipt { name, out } => {
            crate::cli::evidence_cmd::key_receipt(store, name, out)?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- policy

#[derive(Debug, Subcommand)]
pub(crate) enum PolicyCommand {
    /// Set a key's policy from a TOML or JSON file (validated first).
    Set {
        /// The key name.
        name: String,
        /// The policy file (.toml or .json).
        file: PathBuf,
    },
    /// Show a key's policy.
    Show {
        /// The key name.
        name: String,
    },
    /// Compute PCR0, PCR1, PCR2 (and PCR8 for a signed image) of an enclave
    /// image file and print them as a `[[measurements]]` entry for a policy
    /// file (TOML). A pure computation: needs no store or credential.
    MeasureEif {
        /// The enclave image file, as built by `nitro-cli build-enclave`.
        eif: PathBuf,
        /// The measurement set's name (default: the file name without its extension).
        #[arg(long)]
        name: Option<String>,
        /// Write the entry to FILE (which must not exist) instead of stdout,
        /// and print a JSON summary.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

pub(crate) fn policy(store: &StoreArgs, command: &PolicyCommand) -> Result<(), Failure> {
    match command {
        // First, and without a session: nothing here opens the store.
        PolicyCommand::MeasureEif { eif, name, out } => {
            measure_eif(eif, name.as_deref(), out.as_deref())?;
        }
        PolicyCommand::Set { name, file } => {
            let name = parse_name(name)?;
            let session = Session::start(store, Permission::ManagePolicy, "policy.set")?;
            let policy = match KeyPolicy::from_file(file) {
                Ok(p) => p,
                // Reading the file failed: I/O (exit 2), not a refusal.
                Err(e @ crate::policy::PolicyError::Io { .. }) => {
                    return Err(Failure::Usage(
                        anyhow!(std::io::Error::other(e.to_string()))
                            .context("reading the policy file"),
                    ));
                }
                Err(e) => {
                    session.record(
                        "policy.set",
                        Some(&name),
                        None,
                        Decision::Refused,
                        Some(format!("{}: {e}", e.kind())),
                    )?;
                    return Err(Failure::Refused(
                        format!("policy_{}", e.kind()),
                        e.to_string(),
                    ));
                }
            };
            let text = serde_json::to_string(&policy).map_err(|e| anyhow!("{e}"))?;
            let stored = StoredPolicy {
                format: "json".to_owned(),
                text,
                set_by: session.admin.name.clone(),
                set_ms: now_ms(),
            };
            session.audited("policy.set", &name, |k| k.set_policy(&name, &stored))?;
            emit(&json!({ "name": name.as_str(), "policy": policy }));
        }
        PolicyCommand::Show { name } => {
            let name = parse_name(name)?;
            let session = Session::start(store, Permission::Read, "policy.show")?;
            match session.kms.policy(&name)? {
                None => emit(
                    &json!({ "name": name.as_str(), "policy": null, "note": "no policy: no enclave may use this key" }),
                ),
                Some(s) => {
                    let policy: Value =
                        serde_json::from_str(&s.text).map_err(|e| anyhow!("stored policy: {e}"))?;
                    emit(
                        &json!({ "name": name.as_str(), "policy": policy, "set_by": s.set_by, "set": crate::cli::report::rfc3339_millis(s.set_ms) }),
                    );
                }
            }
        }
    }
    Ok(())
}

/// `policy measure-eif`: the PCRs of an EIF as a policy entry.
fn measure_eif(eif: &Path, name: Option<&str>, out: Option<&Path>) -> Result<(), Failure> {
    let name = match name {
        Some(name) => name.to_owned(),
        None => eif
            .file_stem()
            .and_then(|stem| stem.to_str())
            .map(str::to_owned)
            .ok_or_else(|| {
                anyhow!(
                    "cannot name the measurement set after {}: pass --name",
                    eif.display()
                )
            })?,
    };
    let file =
        std::fs::File::open(eif).with_context(|| format!("opening the EIF {}", eif.display()))?;
    let measured = match kluis_eif::measure(file) {
        Ok(measured) => measured,
        Err(kluis_eif::EifError::Io(e)) => {
            return Err(Failure::Usage(
                anyhow!(e).context(format!("reading the EIF {}", eif.display())),
            ))
        }
        Err(e) => {
            return Err(Failure::Refused(
                format!("eif_{}", e.kind()),
                format!("{}: {e}", eif.display()),
            ))
        }
    };
    let fragment = measured
        .policy_fragment(&name)
        .map_err(|e| anyhow!("{e} (choose another with --name)"))?;
    // What is printed must be what `policy set` accepts.
    KeyPolicy::from_toml_str(&format!(
        "operations = []\nmax_document_age_seconds = 300\n{fragment}"
    ))
    .map_err(|e| anyhow!("the computed entry is not a valid policy entry: {e}"))?;
    match out {
        Some(path) => {
            crate::cli::output::write_new(
                path,
                fragment.as_bytes(),
                crate::cli::output::Access::Default,
            )?;
            emit(&json!({
                "eif": eif.display().to_string(),
                "name": name,
                "out": path.display().to_string(),
                "signed": measured.is_signed(),
                "pcr0": hex::encode(measured.pcr0),
                "pcr1": hex::encode(measured.pcr1),
                "pcr2": hex::encode(measured.pcr2),
                "pcr8": measured.pcr8.map(hex::encode),
            }));
        }
        None => {
            let mut stdout = std::io::stdout().lock();
            stdout
                .write_all(fragment.as_bytes())
                .and_then(|()| stdout.flush())
                .context("writing to stdout")?;
        }
    }
    if !measured.is_signed() {
        to_stderr!(
            "note: {} is not signed, so the entry pins PCR0-2 but not PCR8 (the signer)",
            eif.display()
        );
    }
    Ok(())
}

// ---------------------------------------------------------------- identity, audit

pub(crate) fn identity(store: &StoreArgs) -> Result<(), Failure> {
    let session = Session::start(store, Permission::Read, "identity.show")?;
    let identity = load_identity(&session.kms)?;
    emit(&json!({ "verifier_public_key": hex::encode(identity.public_key_sec1()) }));
    Ok(())
}

#[derive(Debug, Subcommand)]
pub(crate) enum AuditCommand {
    /// Check the hash chain (and the head anchored in the store); name the first broken record.
    Verify,
    /// List records, optionally filtered.
    Show {
        /// Only records about this key.
        #[arg(long)]
        key: Option<String>,
        /// Only this operation (e.g. key.create, key.release).
        #[arg(long)]
        operation: Option<String>,
        /// Only `allowed` or `refused`.
        #[arg(long)]
        decision: Option<String>,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// After damage that `audit verify` reports (records removed or
    /// changed): move the damaged log aside (kept, as
    /// audit.log.damaged-<time>) and start a new one whose first record,
    /// `audit.recover`, names the damage, the old file's SHA-384 and the
    /// anchored head, and your reason. Key administrators only. Until then
    /// every command and `serve` refuse to run.
    Recover {
        /// Why (recorded), e.g. a ticket reference.
        #[arg(long)]
        reason: String,
    },
    /// Print a checkpoint of the log (C2SP tlog-checkpoint in a signed
    /// note, signed by the verifier identity) for witnesses to keep.
    Checkpoint,
    /// Print the inclusion proof of record N in a checkpoint of the log now (JSON).
    Prove {
        /// The record's sequence number.
        #[arg(long)]
        seq: u64,
    },
    /// Print the consistency proof from an old checkpoint to one of the log
    /// now (JSON); exit 1 if the log was rolled back or rewritten since.
    Consistency {
        /// The old checkpoint (a signed note file).
        #[arg(long, value_name = "OLD_CHECKPOINT_FILE")]
        from: PathBuf,
    },
    /// Write the evidence bundle of record N: the record (with the
    /// attestation document as received), the policy in force, the
    /// authorisation if any, the inclusion proof and a signed checkpoint.
    Evidence {
        /// The record's sequence number.
        #[arg(long)]
        seq: u64,
        /// Where to write the bundle (must not exist).
        #[arg(long, value_name = "BUNDLE")]
        out: PathBuf,
    },
}

/// Most bytes of an operator's recovery reason.
const MAX_RECOVER_REASON: usize = 1024;

fn recover(store: &StoreArgs, reason: &str) -> Result<(), Failure> {
    if reason.trim().is_empty() || reason.len() > MAX_RECOVER_REASON {
        return Err(Failure::Usage(anyhow!(
            "--reason must say why, in 1 to {MAX_RECOVER_REASON} bytes"
        )));
    }
    let kms = store.open()?;
    let credential = store.credential()?;
    let claimed = credential
        .claimed_name()
        .unwrap_or("<malformed>")
        .to_owned();
    let record = kms.admin(&claimed)?;
    // The damaged log cannot take a record yet: the refusal is reported
    // here only.
    let admin = auth::authenticate(&credential, record.as_ref())
        .map_err(|e| Failure::Refused("credential_rejected".into(), e.to_string()))?;
    admin
        .require(Permission::ManageKeys, "audit.recover")
        .map_err(|e| Failure::Refused("forbidden".into(), e.to_string()))?;
    let path = store.audit_path()?;
    let guard = kms.lock()?;
    let anchor = kms.audit_anchor()?;
    let damage = match crate::audit::verify_file(&path, anchor.map(|a| a.head()).as_ref()) {
        Ok(report) => {
            return Err(Failure::Refused(
                "audit_intact".into(),
                format!(
                "the audit log is intact ({} records, anchored head reached): nothing to recover",
                report.records
            ),
            ))
        }
        Err(AuditError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            "the audit log is missing".to_owned()
        }
        Err(e) => e.to_string(),
    };
    let moved = if std::fs::symlink_metadata(&path).is_ok() {
        let (size, digest) = file_sha384(&path)?;
        let name = format!("audit.log.damaged-{}", now_ms());
        let target = path.with_file_name(&name);
        std::fs::rename(&path, &target)
            .with_context(|| format!("moving {} to {}", path.display(), target.display()))?;
        format!("the damaged log was moved to {name} ({size} bytes, SHA-384 {digest})")
    } else {
        "there was no log file".to_owned()
    };
    let log = AuditLog::open(&path).map_err(|e| audit_failure(&path, e))?;
    let anchored = anchor.map_or_else(|| "none".to_owned(), |a| a.to_string());
    let new = log
        .append_anchor(NewRecord {
            time_ms: now_ms(),
            actor: admin_actor(&admin),
            operation: "audit.recover".to_owned(),
            key_id: None,
            key_version: None,
            decision: Decision::Allowed,
            reason: Some(format!(
                "{damage}; {moved}; the anchored head was {anchored}; reason: {reason}"
            )),
            attestation_document: None,
        })
        .map_err(|e| anyhow!("writing the recovery record: {e}"))?;
    kms.reset_audit_anchor(&guard, &new)?;
    drop(guard);
    emit(&json!({
        "status": "recovered",
        "damage": damage,
        "moved": moved,
        "previous_anchor": anchored,
        "head": new.to_string(),
    }));
    Ok(())
}

/// Size and SHA-384 (hex) of a file, read in bounded chunks.
fn file_sha384(path: &Path) -> anyhow::Result<(u64, String)> {
    use sha2::{Digest, Sha384};
    use std::io::Read;
    let mut file =
        std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut hasher = Sha384::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        let Some(chunk) = buf.get(..n).filter(|c| !c.is_empty()) else {
            break;
        };
        hasher.update(chunk);
        size = size.saturating_add(u64::try_from(n).unwrap_or(u64::MAX));
    }
    Ok((size, hex::encode(hasher.finalize())))
}

pub(crate) fn audit(store: &StoreArgs, command: &AuditCommand) -> Result<(), Failure> {
    if let AuditCommand::Recover { reason } = command {
        return recover(store, reason);
    }
    let session = Session::start(store, Permission::Read, "audit.read")?;
    match command {
        AuditCommand::Recover { .. } => {}
        AuditCommand::Checkpoint => crate::cli::evidence_cmd::checkpoint(&session)?,
        AuditCommand::Prove { seq } => crate::cli::evidence_cmd::prove(&session, *seq)?,
        AuditCommand::Consistency { from } => {
            crate::cli::evidence_cmd::consistency(&session, from)?;
        }
        AuditCommand::Evidence { seq, out } => {
            crate::cli::evidence_cmd::bundle(&session, *seq, out)?;
        }
        AuditCommand::Verify => {
            let head = session.kms.audit_anchor()?.map(|a| a.head());
            match session.audit.verify(head.as_ref()) {
                Ok(report) => emit(
                    &json!({ "status": "intact", "records": report.records, "head": report.head.to_string() }),
                ),
                Err(e) => {
                    return Err(Failure::Refused(
                        "audit_broken".into(),
                        format!(
                            "{e}{}",
                            e.broken_seq()
                                .map(|s| format!(" (first broken record: seq {s})"))
                                .unwrap_or_default()
                        ),
                    ))
                }
            }
        }
        AuditCommand::Show {
            key,
            operation,
            decision,
            json,
        } => {
            let decision = match decision.as_deref() {
                None => None,
                Some("allowed") => Some(Decision::Allowed),
                Some("refused") => Some(Decision::Refused),
                Some(other) => {
                    return Err(Failure::Usage(anyhow!(
                        "--decision must be allowed or refused, not {other:?}"
                    )))
                }
            };
            let filter = AuditFilter {
                key_id: key.clone(),
                operation: operation.clone(),
                decision,
                ..AuditFilter::default()
            };
            // One record in memory at a time, however long the log.
            session
                .audit
                .scan(|r| !filter.matches(r) || crate::cli::print_out(&show_line(r, *json)))
                .map_err(|e| anyhow!("audit log: {e}"))?;
        }
    }
    Ok(())
}

/// One record as `audit show` prints it: a JSON line, or a table row.
fn show_line(r: &crate::audit::AuditRecord, json: bool) -> String {
    if json {
        return format!("{}\n", serde_json::to_string(r).unwrap_or_default());
    }
    let actor = match &r.actor {
        Actor::Admin { name, role } => format!("{name} ({role})"),
        Actor::Enclave { module_id, .. } => format!("enclave {module_id}"),
        Actor::System => "system".to_owned(),
    };
    format!(
        "{:>6}  {}  {:<28} {:<8} {:<24} {}{}\n",
        r.seq,
        crate::cli::report::rfc3339_millis(r.time_ms)
            .as_str()
            .unwrap_or_default(),
        r.operation,
        match r.decision {
            Decision::Allowed => "allowed",
            Decision::Refused => "REFUSED",
        },
        r.key_id.as_deref().unwrap_or("-"),
        actor,
        r.reason
            .as_deref()
            .map(|x| format!("  [{x}]"))
            .unwrap_or_default(),
    )
}
