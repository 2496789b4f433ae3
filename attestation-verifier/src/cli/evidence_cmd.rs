//! Evidence commands: the store-side `audit checkpoint|prove|consistency|
//! evidence` and shredding receipts (`key destroy --receipt`, `key
//! receipt`), and the offline `evidence verify|verify-consistency`, which
//! need no store, credential or network. Formats: `docs/evidence.md`.

use crate::auth::Permission;
use crate::cli::input::read_bounded;
use crate::cli::session::{load_identity, Failure, Session, StoreArgs};
use crate::cli::verify_cmd::emit;
use crate::evidence::{self, ConsistencyProofDoc, EvidenceError, MAX_EVIDENCE_LEN};
use crate::keys::{CmkRecord, KeyName};
use anyhow::{anyhow, Context};
use clap::Subcommand;
use kluis_attestation::TrustAnchor;
use serde_json::json;
use std::path::{Path, PathBuf};

/// Largest root PEM or identity file read.
const MAX_SMALL_FILE: usize = 64 * 1024;

/// An evidence failure: what is not intact or not there is a refusal
/// (exit 1); I/O is exit 2.
pub(crate) fn evidence_failure(e: EvidenceError) -> Failure {
    match e.kind() {
        "io" => Failure::Usage(anyhow!(std::io::Error::other(e.to_string()))),
        kind => Failure::Refused(kind.to_owned(), e.to_string()),
    }
}

/// Refuses an output path that exists (checked before anything changes).
pub(crate) fn check_new_output(path: &Path) -> Result<(), Failure> {
    if std::fs::symlink_metadata(path).is_ok() {
        return Err(Failure::Usage(anyhow!(
            "{} exists: evidence files are never replaced",
            path.display()
        )));
    }
    Ok(())
}

/// Writes a new file (never replacing one), synced.
pub(crate) fn write_new_file(path: &Path, contents: &[u8]) -> Result<(), Failure> {
    Ok(crate::cli::output::write_new(
        path,
        contents,
        crate::cli::output::Access::Default,
    )?)
}

fn to_json_line<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, Failure> {
    evidence::encode_evidence(value).map_err(|e| Failure::Usage(anyhow!(e)))
}

/// `audit checkpoint`: prints the signed note.
pub(crate) fn checkpoint(session: &Session) -> Result<(), Failure> {
    let identity = load_identity(&session.kms)?;
    let signed = evidence::checkpoint_incremental(&session.kms, &session.audit, &identity)
        .map_err(evidence_failure)?;
    // A failed write makes the command fail (see `print_out`).
    crate::cli::print_out(&signed.note);
    Ok(())
}

/// `audit prove --seq N`.
pub(crate) fn prove(session: &Session, seq: u64) -> Result<(), Failure> {
    let identity = load_identity(&session.kms)?;
    let doc = evidence::prove(&session.audit, &identity, seq).map_err(evidence_failure)?;
    emit(&json!(doc));
    Ok(())
}

/// `audit consistency --from OLD`.
pub(crate) fn consistency(session: &Session, from: &Path) -> Result<(), Failure> {
    let old = read_text(from, evidence::note::MAX_NOTE_LEN, "the old checkpoint")?;
    let identity = load_identity(&session.kms)?;
    let doc = evidence::consistency(&session.audit, &identity, &old).map_err(evidence_failure)?;
    emit(&json!(doc));
    Ok(())
}

/// `audit evidence --seq N --out BUNDLE`.
pub(crate) fn bundle(session: &Session, seq: u64, out: &Path) -> Result<(), Failure> {
    check_new_output(out)?;
    let identity = load_identity(&session.kms)?;
    let bundle = evidence::build_bundle(&session.kms, &session.audit, &identity, seq)
        .map_err(evidence_failure)?;
    write_new_file(out, &to_json_line(&bundle)?)?;
    emit(&json!({
        "status": "written",
        "out": out.display().to_string(),
        "seq": seq,
        "policy": bundle.policy.is_some(),
        "authorisation": bundle.authorisation.is_some(),
    }));
    Ok(())
}

/// Writes the shredding receipt of a destroyed key to `out`.
pub(crate) fn receipt(session: &Session, key: &CmkRecord, out: &Path) -> Result<(), Failure> {
    let identity = load_identity(&session.kms)?;
    let receipt =
        evidence::build_receipt(&session.audit, &identity, key).map_err(evidence_failure)?;
    write_new_file(out, &to_json_line(&receipt)?)
}

/// `key receipt NAME --out FILE`: the receipt of a key destroyed earlier.
pub(crate) fn key_receipt(store: &StoreArgs, name: &str, out: &Path) -> Result<(), Failure> {
    check_new_output(out)?;
    let name = KeyName::parse(name).map_err(Failure::from)?;
    let session = Session::start(store, Permission::Read, "key.receipt")?;
    let key = session.kms.key(&name)?;
    receipt(&session, &key, out)?;
    emit(
        &json!({ "status": "written", "key": name.as_str(), "receipt": out.display().to_string() }),
    );
    Ok(())
}

// ------------------------------------------------------------------ offline

#[derive(Debug, Subcommand)]
pub(crate) enum EvidenceCommand {
    /// Verify an evidence bundle (`audit evidence`) or a shredding receipt
    /// (`key destroy --receipt`) offline: no store, credential or network.
    /// Exit 0 valid (JSON report), 1 invalid, 2 usage.
    Verify {
        /// The verifier's public key: its SEC1 hex, or a file holding it
        /// (the hex, or the JSON `attestation-verifier identity` prints).
        #[arg(long, value_name = "HEX_OR_FILE")]
        identity: String,
        /// Trust this PEM root certificate instead of the built-in AWS Nitro root G1.
        #[arg(long, value_name = "PEM")]
        root: Option<PathBuf>,
        /// The bundle or receipt.
        file: PathBuf,
    },
    /// Check offline that a new checkpoint extends an old one: both signed
    /// by the verifier identity, and the consistency proof (printed by
    /// `audit consistency --from OLD`) from one to the other.
    VerifyConsistency {
        /// The verifier's public key: its SEC1 hex or a file holding it.
        #[arg(long, value_name = "HEX_OR_FILE")]
        identity: String,
        /// The old checkpoint (a signed note, as `audit checkpoint` printed it).
        old: PathBuf,
        /// The output of `audit consistency --from OLD` (it carries the new
        /// checkpoint and the proof), or the new checkpoint itself (a signed
        /// note) with `--proof`.
        new: PathBuf,
        /// With NEW a signed note: the output of `audit consistency` that
        /// proves it (its checkpoint must say the same size and root).
        #[arg(long, value_name = "FILE")]
        proof: Option<PathBuf>,
    },
}

fn read_text(path: &Path, limit: usize, what: &str) -> Result<String, Failure> {
    let bytes = read_bounded(path, limit)
        .with_context(|| format!("reading {what} {}", path.display()))?
        .ok_or_else(|| anyhow!("{what} {} is larger than {limit} bytes", path.display()))?;
    String::from_utf8(bytes).map_err(|_| {
        Failure::Refused(
            "evidence_invalid".into(),
            format!("{what} {} is not UTF-8", path.display()),
        )
    })
}

/// The identity argument: SEC1 hex, or a file holding the hex or the JSON
/// of `attestation-verifier identity`.
fn parse_identity(arg: &str) -> Result<[u8; 97], Failure> {
    let from_hex = |text: &str| -> Option<[u8; 97]> {
        let bytes = hex::decode(text.trim()).ok()?;
        let key = <[u8; 97]>::try_from(bytes.as_slice()).ok()?;
        (key.first() == Some(&0x04)).then_some(key)
    };
    if let Some(key) = from_hex(arg) {
        return Ok(key);
    }
    let path = Path::new(arg);
    let bytes = read_bounded(path, MAX_SMALL_FILE)
        .with_context(|| format!("--identity: neither SEC1 hex nor a readable file: {arg}"))?
        .ok_or_else(|| anyhow!("--identity file {arg} is too large"))?;
    let text = String::from_utf8(bytes).map_err(|_| anyhow!("--identity file is not text"))?;
    let hex_text = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| {
            v.get("verifier_public_key")
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned)
        })
        .unwrap_or(text);
    from_hex(&hex_text).ok_or_else(|| {
        Failure::Usage(anyhow!(
            "--identity {arg}: not a P-384 public key (194 hex characters, starting 04)"
        ))
    })
}

fn load_root(root: Option<&Path>) -> Result<TrustAnchor, Failure> {
    match root {
        None => TrustAnchor::aws_nitro_root_g1()
            .map_err(|e| Failure::Usage(anyhow!("built-in root unusable: {e}"))),
        Some(path) => {
            let pem = read_bounded(path, MAX_SMALL_FILE)
                .with_context(|| format!("reading root {}", path.display()))?
                .ok_or_else(|| anyhow!("{} is too large", path.display()))?;
            TrustAnchor::dangerous_from_pem(&pem)
                .map_err(|e| Failure::Usage(anyhow!("root {}: {e}", path.display())))
        }
    }
}

pub(crate) fn evidence(command: &EvidenceCommand) -> Result<(), Failure> {
    match command {
        EvidenceCommand::Verify {
            identity,
            root,
            file,
        } => {
            let identity = parse_identity(identity)?;
            let anchor = load_root(root.as_deref())?;
            let bytes = read_bounded(file, MAX_EVIDENCE_LEN)
                .with_context(|| format!("reading {}", file.display()))?
                .ok_or_else(|| {
                    Failure::Refused(
                        "evidence_invalid".into(),
                        format!("{} is larger than any evidence file", file.display()),
                    )
                })?;
            let report =
                evidence::verify_evidence(&bytes, &identity, anchor).map_err(evidence_failure)?;
            emit(&report);
        }
        EvidenceCommand::VerifyConsistency {
            identity,
            old,
            new,
            proof,
        } => {
            let identity = parse_identity(identity)?;
            let old_note = read_text(old, evidence::note::MAX_NOTE_LEN, "the old checkpoint")?;
            let proof_file = proof.as_deref().unwrap_or(new);
            let proof_text = read_text(proof_file, MAX_EVIDENCE_LEN, "the consistency proof")?;
            let mut doc: ConsistencyProofDoc = serde_json::from_str(&proof_text).map_err(|e| {
                // A checkpoint where the proof was expected: say how to give both.
                let hint = if proof.is_none() && proof_text.contains("\n\n\u{2014} ") {
                    " (this is a checkpoint: give the output of `audit consistency --from OLD` \
                     instead, or this checkpoint with --proof FILE)"
                } else {
                    ""
                };
                Failure::Refused(
                    "evidence_invalid".into(),
                    format!(
                        "{}: not a consistency proof document: {e}{hint}",
                        proof_file.display()
                    ),
                )
            })?;
            if proof.is_some() {
                // NEW is the checkpoint the witness was given: the proof must
                // be about the same tree (its own note may carry another
                // signature over the same text).
                let new_note = read_text(new, evidence::note::MAX_NOTE_LEN, "the new checkpoint")?;
                let body = |note: &str| note.rsplit_once("\n\n").map(|(b, _)| b.to_owned());
                if body(&new_note).is_none() || body(&new_note) != body(&doc.checkpoint) {
                    return Err(Failure::Refused(
                        "evidence_invalid".into(),
                        "the proof's checkpoint is not the new checkpoint given".into(),
                    ));
                }
                doc.checkpoint = new_note;
            }
            let verified = evidence::verify_consistency_offline(&old_note, &doc, &identity)
                .map_err(evidence_failure)?;
            emit(&json!({
                "status": "consistent",
                "origin": verified.new.origin,
                "old_size": verified.old.size,
                "new_size": verified.new.size,
                "new_root": base64::Engine::encode(
                    &base64::engine::general_purpose::STANDARD,
                    verified.new.root
                ),
            }));
        }
    }
    Ok(())
}
