//! `job`: controller-signed job authorisations (purpose binding).
//!
//! An application administrator issues them (`job authorise`) and revokes
//! them (`job revoke`): authorising a job is deciding which processing the
//! keys serve, the application administrator's half of the separation of
//! duties (the key administrator manages the keys themselves, and cannot
//! authorise jobs). Both are audited before they take effect. `job list`
//! and `job show` need either role.

use crate::auth::Permission;
use crate::cli::report::rfc3339_millis;
use crate::cli::verify_cmd::{emit, now_ms};
use crate::keys::KeyName;
use crate::kms::AuthorisationRecord;
use anyhow::anyhow;
use clap::Subcommand;
use kluis_proto::authorisation::{AUTHORISATION_NONCE_LEN, AUTHORISATION_VERSION};
use kluis_proto::{AuthorisationId, JobAuthorisation, SignedAuthorisation};
use serde_json::{json, Value};
use std::path::PathBuf;

use crate::cli::session::*;

/// Longest validity an authorisation may be given (a year).
const MAX_VALIDITY_MS: u64 = 366 * 24 * 3600 * 1000;
/// Longest revocation reason, in bytes.
const MAX_REVOKE_REASON: usize = 1024;

#[derive(Debug, Subcommand)]
pub(crate) enum JobCommand {
    /// Issue a signed authorisation for one job (application administrators).
    ///
    /// The enclave runs exactly this job under it, and the verifier releases
    /// only the keys it names, until it expires, is revoked or has used its
    /// runs (one run = one key request of a job).
    Authorise {
        /// The workload SPEC, as for `parent run --job`
        /// (identity, reencrypt, pseudonymise:column=N,…, aggregate:by=N,…, exec:PROGRAM,…).
        #[arg(long, value_name = "SPEC")]
        workload: String,
        /// The master key the input is under.
        #[arg(long, value_name = "KEY")]
        input_key: String,
        /// The master key the output is generated under.
        #[arg(long, value_name = "KEY")]
        output_key: String,
        /// The master key of each workload secret, in the job's order.
        #[arg(long = "secret-key", value_name = "KEY")]
        secret_keys: Vec<String>,
        /// Why the data is processed (recorded in every audit record of the job).
        #[arg(long)]
        purpose: String,
        /// The controller's case reference.
        #[arg(long = "case", value_name = "REF")]
        case: String,
        /// Expiry: an RFC 3339 time, or a duration from now (`90m`, `12h`, `30d`).
        #[arg(long, value_name = "TIME")]
        expires: String,
        /// How many runs it allows (default: any number until it expires).
        #[arg(long, value_name = "N")]
        max_runs: Option<u64>,
        /// Where to write the signed authorisation (must not exist).
        #[arg(long, value_name = "AUTH")]
        out: PathBuf,
    },
    /// Revoke an authorisation: no run is admitted after this.
    Revoke {
        /// Its id (64 hex digits, as `job authorise` printed it).
        #[arg(long, value_name = "HASH")]
        id: String,
        /// Why (recorded).
        #[arg(long, default_value = "revoked by an administrator")]
        reason: String,
    },
    /// List the authorisations issued, with their run counts and state.
    List,
    /// Show one authorisation.
    Show {
        /// Its id.
        #[arg(long, value_name = "HASH")]
        id: String,
    },
}

/// `TIME`: RFC 3339, or a positive duration from `now_ms`.
fn parse_expiry(text: &str, now_ms: u64) -> Result<u64, Failure> {
    let usage = |m: String| Failure::Usage(anyhow!(m));
    if let Ok(t) = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
    {
        return u64::try_from(t.unix_timestamp_nanos() / 1_000_000)
            .map_err(|_| usage(format!("--expires {text:?} is before 1970")));
    }
    let split = text.len().saturating_sub(1);
    let (number, unit) = (text.get(..split), text.get(split..));
    let unit_ms: u64 = match unit {
        Some("s") => 1000,
        Some("m") => 60_000,
        Some("h") => 3_600_000,
        Some("d") => 86_400_000,
        _ => 0,
    };
    let n: u64 = number
        .and_then(|n| n.parse().ok())
        .filter(|n| *n > 0 && unit_ms > 0)
        .ok_or_else(|| {
            usage(format!(
                "--expires {text:?}: an RFC 3339 time or a duration such as 90m, 12h, 30d"
            ))
        })?;
    Ok(now_ms.saturating_add(n.saturating_mul(unit_ms)))
}

fn parse_id(text: &str) -> Result<AuthorisationId, Failure> {
    AuthorisationId::from_hex(text.trim()).ok_or_else(|| {
        Failure::Usage(anyhow!(
            "--id {text:?}: 64 lowercase hex digits (SHA-256 of the signed authorisation)"
        ))
    })
}

fn key_name(flag: &str, name: &str) -> Result<KeyName, Failure> {
    KeyName::parse(name).map_err(|e| Failure::Usage(anyhow!("{flag} {name:?}: {e}")))
}

/// The JSON of an authorisation and its state.
fn describe(signed: &SignedAuthorisation, record: Option<&AuthorisationRecord>) -> Value {
    let a = signed.authorisation();
    let mut v = json!({
        "id": signed.id().to_hex(),
        "issuer": a.issuer,
        "issued": rfc3339_millis(a.issued_at_ms),
        "expires": rfc3339_millis(a.expires_at_ms),
        "workload": a.workload,
        "input_key": a.input_key,
        "output_key": a.output_key,
        "secret_keys": a.secret_keys,
        "purpose": a.purpose,
        "case": a.case,
        "max_runs": a.max_runs,
    });
    if let (Some(record), Some(map)) = (record, v.as_object_mut()) {
        map.insert("runs".into(), json!(record.runs));
        map.insert(
            "last_run".into(),
            record.last_run_ms.map_or(Value::Null, rfc3339_millis),
        );
        map.insert(
            "revoked".into(),
            record.revoked.as_ref().map_or(
                Value::Null,
                |r| json!({ "by": r.by, "at": rfc3339_millis(r.time_ms), "reason": r.reason }),
            ),
        );
    }
    v
}

pub(crate) fn job(store: &StoreArgs, command: &JobCommand) -> Result<(), Failure> {
    match command {
        JobCommand::Authorise {
            workload,
            input_key,
            output_key,
            secret_keys,
            purpose,
            case,
            expires,
            max_runs,
            out,
        } => {
            let now = now_ms();
            let workload = kluis_proto::job::parse_workload(workload)
                .map_err(|e| Failure::Usage(anyhow!("--workload: {e}")))?;
            let expires_at_ms = parse_expiry(expires, now)?;
            if expires_at_ms <= now {
                return Err(Failure::Usage(anyhow!("--expires {expires:?} is past")));
            }
            if expires_at_ms.saturating_sub(now) > MAX_VALIDITY_MS {
                return Err(Failure::Usage(anyhow!(
                    "--expires {expires:?}: at most a year from now"
                )));
            }
            let mut keys = vec![
                key_name("--input-key", input_key)?,
                key_name("--output-key", output_key)?,
            ];
            for k in secret_keys {
                keys.push(key_name("--secret-key", k)?);
            }
            let session = Session::start(store, Permission::ManagePolicy, "job.authorise")?;
            for key in &keys {
                // Refused (and audited) like any use of a missing key.
                if let Err(e) = session.kms.key(key) {
                    session.record(
                        "job.authorise",
                        Some(key),
                        None,
                        crate::audit::Decision::Refused,
                        Some(format!("{}: {e}", key_error_kind(&e))),
                    )?;
                    return Err(e.into());
                }
            }
            let mut nonce = [0u8; AUTHORISATION_NONCE_LEN];
            aws_lc_rs::rand::fill(&mut nonce)
                .map_err(|_| Failure::Usage(anyhow!("no randomness for the nonce")))?;
            let authorisation = JobAuthorisation {
                version: AUTHORISATION_VERSION,
                nonce,
                issuer: session.admin.name.clone(),
                issued_at_ms: now,
                expires_at_ms,
                workload,
                input_key: input_key.clone(),
                output_key: output_key.clone(),
                secret_keys: secret_keys.clone(),
                purpose: purpose.clone(),
                case: case.clone(),
                max_runs: *max_runs,
            };
            if let Err(e) = authorisation.validate() {
                session.record(
                    "job.authorise",
                    None,
                    None,
                    crate::audit::Decision::Refused,
                    Some(e.to_string()),
                )?;
                return Err(Failure::Refused(
                    "invalid_authorisation".into(),
                    e.to_string(),
                ));
            }
            let identity = load_identity(&session.kms)?;
            let signed = authorisation
                .sign(&identity)
                .map_err(|e| Failure::Usage(anyhow!("{e}")))?;
            // The file first (a name that exists refuses before anything is
            // recorded), then the audited record; if that fails the file
            // goes, so no unrecorded authorisation is left.
            crate::cli::output::write_new(
                out,
                signed.bytes(),
                crate::cli::output::Access::Default,
            )?;
            let summary = format!(
                "authorisation {}: {} on input {} to output {}, secrets [{}], purpose {:?}, case {:?}, expires {}, max runs {}",
                signed.id(),
                authorisation.workload.name(),
                authorisation.input_key,
                authorisation.output_key,
                authorisation.secret_keys.join(", "),
                authorisation.purpose,
                authorisation.case,
                crate::audit::rfc3339_millis(expires_at_ms),
                max_runs.map_or_else(|| "unlimited".to_owned(), |n| n.to_string()),
            );
            if let Err(e) = session.kms.store_authorisation(&signed, summary) {
                let _ = std::fs::remove_file(out);
                return Err(e.into());
            }
            let mut v = describe(&signed, None);
            if let Some(map) = v.as_object_mut() {
                map.insert("out".into(), json!(out.display().to_string()));
            }
            emit(&v);
        }
        JobCommand::Revoke { id, reason } => {
            let id = parse_id(id)?;
            if reason.trim().is_empty() || reason.len() > MAX_REVOKE_REASON {
                return Err(Failure::Usage(anyhow!(
                    "--reason: 1..={MAX_REVOKE_REASON} bytes"
                )));
            }
            let session = Session::start(store, Permission::ManagePolicy, "job.revoke")?;
            let revoked =
                session
                    .kms
                    .revoke_authorisation(&id, &session.admin.name, reason, now_ms());
            match revoked {
                Ok(_) => emit(&json!({ "id": id.to_hex(), "revoked": true, "reason": reason })),
                Err(crate::keys::KeyError::Audit(e)) => {
                    return Err(Failure::Usage(anyhow!(
                        "job.revoke was not done: its audit record could not be written: {e}"
                    )))
                }
                Err(e) => {
                    session.record(
                        "job.revoke",
                        None,
                        None,
                        crate::audit::Decision::Refused,
                        Some(format!("authorisation {id}: {e}")),
                    )?;
                    return Err(e.into());
                }
            }
        }
        JobCommand::List => {
            let session = Session::start(store, Permission::Read, "job.list")?;
            let identity = load_identity(&session.kms)?;
            let mut out = Vec::new();
            for (id, record) in session.kms.authorisations()? {
                let signed = record.signed_bytes().map_err(Failure::from).and_then(|b| {
                    SignedAuthorisation::verify(&b, &identity.public_key_sec1())
                        .map_err(|e| Failure::Usage(anyhow!("authorisation {id}: {e}")))
                })?;
                out.push(describe(&signed, Some(&record)));
            }
            emit(&json!({ "authorisations": out }));
        }
        JobCommand::Show { id } => {
            let id = parse_id(id)?;
            let session = Session::start(store, Permission::Read, "job.show")?;
            let identity = load_identity(&session.kms)?;
            let record = session.kms.authorisation(&id)?.ok_or_else(|| {
                Failure::Refused(
                    "authorisation_unknown".into(),
                    format!("no authorisation {id}"),
                )
            })?;
            let signed =
                SignedAuthorisation::verify(&record.signed_bytes()?, &identity.public_key_sec1())
                    .map_err(|e| Failure::Usage(anyhow!("authorisation {id}: {e}")))?;
            emit(&describe(&signed, Some(&record)));
        }
    }
    Ok(())
}
