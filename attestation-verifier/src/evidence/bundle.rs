//! Evidence bundles (one decision, checkable offline years later) and
//! crypto-shredding receipts: their formats, how the verifier builds them,
//! and their offline verification. The formats are described for third
//! parties in `docs/evidence.md`.

use super::merkle::{verify_inclusion, TreeHash};
use super::note::{verify_checkpoint, Checkpoint};
use super::tree::{decode_proof, prove_records, record_leaf, EVIDENCE_VERSION};
use super::EvidenceError;
use crate::audit::{rfc3339_millis, Actor, AuditLog, AuditRecord, Decision};
use crate::broker::{is_sha256_hex, parse_release_reason, WITHDRAWAL_RULE};
use crate::keys::{CmkRecord, KeyName, KeyState, VersionState};
use crate::kms::{policy_sha256, Kms, POLICY_REASON_PREFIX};
use crate::policy::{KeyPolicy, Operation};
use base64::{engine::general_purpose::STANDARD, Engine as _};
use kluis_attestation::{parse_unverified, TrustAnchor, UnixMillis, Verifier, VerifyOptions};
use kluis_proto::VerifierIdentity;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// Format name of an evidence bundle.
pub const BUNDLE_FORMAT: &str = "kluis-evidence-bundle";
/// Format name of a shredding receipt.
pub const RECEIPT_FORMAT: &str = "kluis-shredding-receipt";
/// The label that starts the message a receipt's signature covers.
pub const RECEIPT_LABEL: &[u8] = b"kluis-shredding-receipt/v1\n";
/// Largest bundle or receipt read.
pub const MAX_EVIDENCE_LEN: usize = 4 * 1024 * 1024;

/// The policy in force at a decision, and the audit record that set it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundledPolicy {
    /// The policy text, exactly as set.
    pub text: String,
    /// The canonical JSON line of the `policy.set` record whose reason is
    /// `policy sha256 <SHA-256 of text>`.
    pub set_record: String,
    /// Its inclusion proof in the bundle's checkpoint (hex).
    pub set_proof: Vec<String>,
}

/// The job authorisation a decision was made under.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundledAuthorisation {
    /// Lowercase hex SHA-256 of `signed`.
    pub id: String,
    /// The signed authorisation bytes (base64), as issued.
    pub signed: String,
}

/// The refusal that withdrew an allowed key release before any key was
/// sent ([`crate::broker::WITHDRAWAL_RULE`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundledWithdrawal {
    /// The canonical JSON line of the refused `key.release` record.
    pub record: String,
    /// Its inclusion proof in the bundle's checkpoint (hex).
    pub proof: Vec<String>,
}

/// An evidence bundle: everything needed to re-check one audited decision
/// offline. Every field is checked by [`verify_evidence`]; none is merely
/// informative.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvidenceBundle {
    /// [`BUNDLE_FORMAT`].
    pub format: String,
    /// [`EVIDENCE_VERSION`].
    pub version: u32,
    /// The signed checkpoint the proofs lead to.
    pub checkpoint: String,
    /// The canonical JSON line of the audit record (it carries the
    /// attestation document as received, base64).
    pub record: String,
    /// The record's inclusion proof (hex).
    pub proof: Vec<String>,
    /// The policy in force, for a key release; `null` otherwise.
    pub policy: Option<BundledPolicy>,
    /// The job authorisation, if the record names one; `null` otherwise.
    pub authorisation: Option<BundledAuthorisation>,
    /// For an allowed key release that was withdrawn: the refusal that
    /// withdrew it, if the log held one when the bundle was built. Left out
    /// of the file when there is none, so bundles written before this field
    /// existed keep their one encoding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub withdrawal: Option<BundledWithdrawal>,
}

/// The signed statement of a shredding receipt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiptBody {
    /// The destroyed key.
    pub key: String,
    /// The versions whose material was destroyed.
    pub versions_destroyed: Vec<u32>,
    /// When the key was destroyed (RFC 3339).
    pub destroyed_at: String,
    /// The same, Unix milliseconds.
    pub destroyed_at_ms: u64,
    /// The `key.destroy` audit record's sequence number.
    pub record_seq: u64,
    /// Its chain hash (hex).
    pub record_hash: String,
    /// The size of the checkpoint after it.
    pub checkpoint_size: u64,
    /// That checkpoint's root (base64).
    pub checkpoint_root: String,
    /// The verifier identity that signs (SEC1 hex).
    pub verifier_public_key: String,
}

/// A crypto-shredding receipt: a signed statement, the destroy record, its
/// inclusion proof and the checkpoint after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShreddingReceipt {
    /// [`RECEIPT_FORMAT`].
    pub format: String,
    /// [`EVIDENCE_VERSION`].
    pub version: u32,
    /// The compact JSON of a [`ReceiptBody`], exactly as signed.
    pub body: String,
    /// ECDSA P-384/SHA-384 over `RECEIPT_LABEL || body` by the verifier
    /// identity, raw `r || s`, base64.
    pub signature: String,
    /// The canonical JSON line of the `key.destroy` record.
    pub record: String,
    /// Its inclusion proof in `checkpoint` (hex).
    pub proof: Vec<String>,
    /// The signed checkpoint after the record.
    pub checkpoint: String,
}

// ------------------------------------------------------------------ building

fn line(record: &AuditRecord) -> Result<String, EvidenceError> {
    serde_json::to_string(record).map_err(|e| EvidenceError::Invalid(e.to_string()))
}

fn hexes(proof: &[TreeHash]) -> Vec<String> {
    proof.iter().map(hex::encode).collect()
}

/// The policy hash a `policy.set` record names, if it names one.
fn policy_hash_in(record: &AuditRecord) -> Option<&str> {
    record
        .reason
        .as_deref()?
        .strip_prefix(POLICY_REASON_PREFIX)
        .filter(|h| is_sha256_hex(h))
}

/// The policy hash an allowed key-release record names, if it names one
/// (records written before the broker named it do not).
fn release_policy_hash(record: &AuditRecord) -> Option<&str> {
    parse_release_reason(record.reason.as_deref()?)?.1
}

/// Whether `refusal` withdraws the allowed key release `release`: a later
/// refused `key.release` of the same request (the same attestation
/// document, whose nonce only that request could spend, the same enclave
/// and job) under [`WITHDRAWAL_RULE`], which the broker records for every
/// failure after a request's allowed records (a change seen by the
/// re-check, the store failing then, a later record of the request that
/// could not be written). A request is answered with its keys or with one
/// refusal, never both: one withdrawal withdraws every key of its request.
/// The rule is required: a refusal of a replay of the document (a spent
/// nonce the shared store could not check, say) carries the same document
/// and withdraws nothing.
fn withdraws(refusal: &AuditRecord, release: &AuditRecord) -> bool {
    withdrawable(release)
        && refusal.operation == "key.release"
        && refusal.decision == Decision::Refused
        && refusal.seq > release.seq
        && refusal
            .reason
            .as_deref()
            .and_then(|r| r.strip_prefix(WITHDRAWAL_RULE))
            .is_some_and(|rest| rest.starts_with(": "))
        && refusal.attestation_document == release.attestation_document
        && refusal.actor == release.actor
        && refusal.job == release.job
}

/// Whether a refusal can withdraw `record`: an allowed key release made
/// with an attestation document (see [`withdraws`]).
fn withdrawable(record: &AuditRecord) -> bool {
    record.decision == Decision::Allowed
        && release_operation(record).is_some()
        && record.attestation_document.is_some()
}

/// The authorisation id a record names (its hashed `job` field), if any.
pub fn authorisation_id_in(record: &AuditRecord) -> Option<String> {
    record.job.as_ref().map(|job| job.authorisation.clone())
}

/// The operation of a key-release record (`key.release.generate`, …).
fn release_operation(record: &AuditRecord) -> Option<Operation> {
    match record.operation.strip_prefix("key.release.")? {
        "generate" => Some(Operation::Generate),
        "decrypt" => Some(Operation::Decrypt),
        "derive-secret" => Some(Operation::DeriveSecret),
        _ => None,
    }
}

/// Builds the evidence bundle of record `seq`: the record, its inclusion
/// proof and a checkpoint of the log now; for a key release, the policy in
/// force (the last `policy.set` of the key before the record, whose text
/// the store keeps by hash) with its own proof, and the refusal that
/// withdrew it, if the log holds one; the authorisation the record names,
/// if the store holds it.
pub fn build_bundle(
    kms: &Kms,
    log: &AuditLog,
    identity: &VerifierIdentity,
    seq: u64,
) -> Result<EvidenceBundle, EvidenceError> {
    let size = log.head().seq;
    if seq == 0 || seq > size {
        return Err(EvidenceError::NoSuchRecord { seq, size });
    }
    // Pass 1: the record, and for each key the last policy.set before it,
    // and the last one that set each policy text (by hash); after it, for
    // an allowed release, the refusal that withdrew it, if any.
    let mut target: Option<AuditRecord> = None;
    let mut withdrawal: Option<AuditRecord> = None;
    let mut last_set: std::collections::BTreeMap<String, AuditRecord> = Default::default();
    let mut set_by_hash: std::collections::BTreeMap<(String, String), AuditRecord> =
        Default::default();
    log.scan(|r| {
        if let Some(release) = &target {
            if withdraws(r, release) {
                withdrawal = Some(r.clone());
                return false;
            }
            return true;
        }
        if r.seq == seq {
            target = Some(r.clone());
            // Only a withdrawable record makes the scan go on past it.
            return withdrawable(r);
        }
        if r.operation == "policy.set" && r.decision == Decision::Allowed {
            if let Some(key) = &r.key_id {
                last_set.insert(key.clone(), r.clone());
                if let Some(hash) = policy_hash_in(r) {
                    set_by_hash.insert((key.clone(), hash.to_owned()), r.clone());
                }
            }
        }
        true
    })?;
    let record = target.ok_or(EvidenceError::NoSuchRecord { seq, size })?;
    let needs_policy = release_operation(&record).is_some() && record.decision == Decision::Allowed;
    let set_record = match (&record.key_id, needs_policy) {
        (Some(key), true) => Some(match release_policy_hash(&record) {
            // The release names the policy that decided: the record that set it.
            Some(hash) => set_by_hash
                .remove(&(key.clone(), hash.to_owned()))
                .ok_or_else(|| {
                    EvidenceError::Unavailable(format!(
                        "no policy.set record of {key} with SHA-256 {hash} before seq {seq}"
                    ))
                })?,
            // Older records: the last policy set before the decision.
            None => last_set.remove(key).ok_or_else(|| {
                EvidenceError::Unavailable(format!(
                    "no policy.set record for {key} before seq {seq}: the policy in force is unknown"
                ))
            })?,
        }),
        _ => None,
    };
    let policy_text = match (&set_record, &record.key_id) {
        (Some(set), Some(key)) => {
            let digest = policy_hash_in(set).ok_or_else(|| {
                EvidenceError::Unavailable(format!(
                    "the policy.set record seq {} does not name the policy's hash \
                     (written by an older version): the policy in force cannot be proven",
                    set.seq
                ))
            })?;
            let name = KeyName::parse(key)
                .map_err(|e| EvidenceError::Unavailable(format!("key {key}: {e}")))?;
            let stored = kms
                .policy_version(&name, digest)
                .map_err(|e| EvidenceError::Unavailable(format!("the store: {e}")))?
                .ok_or_else(|| {
                    EvidenceError::Unavailable(format!(
                        "the store no longer holds the policy of {key} with SHA-256 {digest}"
                    ))
                })?;
            Some(stored.text)
        }
        _ => None,
    };
    let authorisation = match authorisation_id_in(&record) {
        None => None,
        Some(id) => {
            let parsed = kluis_proto::AuthorisationId::from_hex(&id).ok_or_else(|| {
                EvidenceError::Unavailable(format!(
                    "the record names a malformed authorisation id {id}"
                ))
            })?;
            let stored = kms
                .authorisation(&parsed)
                .map_err(|e| EvidenceError::Unavailable(format!("the store: {e}")))?;
            match stored {
                None => {
                    return Err(EvidenceError::Unavailable(format!(
                        "the store no longer holds authorisation {id}, which the record names"
                    )))
                }
                Some(stored) => Some(BundledAuthorisation {
                    id,
                    signed: STANDARD.encode(stored.signed_bytes().map_err(|e| {
                        EvidenceError::Unavailable(format!("the stored authorisation: {e}"))
                    })?),
                }),
            }
        }
    };
    // Pass 2: the proofs, in one checkpoint.
    let mut seqs = vec![seq];
    if let Some(set) = &set_record {
        seqs.push(set.seq);
    }
    if let Some(refusal) = &withdrawal {
        seqs.push(refusal.seq);
    }
    let (signed, proved) = prove_records(log, identity, &seqs)?;
    let mut proved = proved.into_iter();
    let (record, proof) = proved
        .next()
        .ok_or(EvidenceError::NoSuchRecord { seq, size })?;
    let policy = match policy_text {
        Some(text) => {
            let (set, set_proof) = proved
                .next()
                .ok_or(EvidenceError::NoSuchRecord { seq, size })?;
            Some(BundledPolicy {
                text,
                set_record: line(&set)?,
                set_proof: hexes(&set_proof),
            })
        }
        None => None,
    };
    let withdrawal = match withdrawal {
        Some(_) => {
            let (refusal, proof) = proved
                .next()
                .ok_or(EvidenceError::NoSuchRecord { seq, size })?;
            Some(BundledWithdrawal {
                record: line(&refusal)?,
                proof: hexes(&proof),
            })
        }
        None => None,
    };
    Ok(EvidenceBundle {
        format: BUNDLE_FORMAT.to_owned(),
        version: EVIDENCE_VERSION,
        checkpoint: signed.note,
        record: line(&record)?,
        proof: hexes(&proof),
        policy,
        authorisation,
        withdrawal,
    })
}

/// Builds the receipt of `key`'s destruction (its last allowed
/// `key.destroy` record), signed by `identity`, with a checkpoint of the
/// log now.
pub fn build_receipt(
    log: &AuditLog,
    identity: &VerifierIdentity,
    key: &CmkRecord,
) -> Result<ShreddingReceipt, EvidenceError> {
    let KeyState::Destroyed { at_ms } = key.state else {
        return Err(EvidenceError::Unavailable(format!(
            "{} is not destroyed",
            key.name
        )));
    };
    let name = key.name.to_string();
    let mut found = None;
    log.scan(|r| {
        if r.operation == "key.destroy"
            && r.decision == Decision::Allowed
            && r.key_id.as_deref() == Some(name.as_str())
        {
            found = Some(r.seq);
        }
        true
    })?;
    let seq = found.ok_or_else(|| {
        EvidenceError::Unavailable(format!("no key.destroy record for {name} in the log"))
    })?;
    let (signed, mut proved) = prove_records(log, identity, &[seq])?;
    let (record, proof) = proved.pop().ok_or(EvidenceError::NoSuchRecord {
        seq,
        size: signed.checkpoint.size,
    })?;
    let body = ReceiptBody {
        key: name,
        versions_destroyed: key
            .versions
            .iter()
            .filter(|v| v.state == VersionState::Destroyed)
            .map(|v| v.version)
            .collect(),
        destroyed_at: rfc3339_millis(at_ms),
        destroyed_at_ms: at_ms,
        record_seq: record.seq,
        record_hash: hex::encode(record.hash),
        checkpoint_size: signed.checkpoint.size,
        checkpoint_root: STANDARD.encode(signed.checkpoint.root),
        verifier_public_key: hex::encode(identity.public_key_sec1()),
    };
    let body = serde_json::to_string(&body).map_err(|e| EvidenceError::Invalid(e.to_string()))?;
    let mut message = RECEIPT_LABEL.to_vec();
    message.extend_from_slice(body.as_bytes());
    let signature = identity
        .sign(&message)
        .map_err(|e| EvidenceError::Sign(e.to_string()))?;
    Ok(ShreddingReceipt {
        format: RECEIPT_FORMAT.to_owned(),
        version: EVIDENCE_VERSION,
        body,
        signature: STANDARD.encode(signature),
        record: line(&record)?,
        proof: hexes(&proof),
        checkpoint: signed.note,
    })
}

// ------------------------------------------------------------------ verifying

fn invalid(message: impl Into<String>) -> EvidenceError {
    EvidenceError::Invalid(message.into())
}

/// Parses a record line and checks that it is canonical and that its hash
/// is the hash of its contents.
fn parse_record(line: &str, what: &str) -> Result<AuditRecord, EvidenceError> {
    let record: AuditRecord = serde_json::from_str(line)
        .map_err(|e| invalid(format!("{what}: not an audit record: {e}")))?;
    let canonical = serde_json::to_string(&record).map_err(|e| invalid(e.to_string()))?;
    if canonical != line {
        return Err(invalid(format!("{what}: not in canonical form")));
    }
    if record.compute_hash() != record.hash {
        return Err(invalid(format!(
            "{what}: its hash is not the hash of its contents"
        )));
    }
    Ok(record)
}

fn check_included(
    record: &AuditRecord,
    proof: &[String],
    checkpoint: &Checkpoint,
    what: &str,
) -> Result<(), EvidenceError> {
    let proof = decode_proof(proof)?;
    verify_inclusion(
        record.seq.saturating_sub(1),
        checkpoint.size,
        &record_leaf(record),
        &proof,
        &checkpoint.root,
    )
    .map_err(|e| {
        invalid(format!(
            "{what} (seq {}) is not in the checkpoint's log: {e}",
            record.seq
        ))
    })?;
    if record.seq == 0 {
        return Err(invalid(format!("{what} has seq 0")));
    }
    Ok(())
}

fn checkpoint_json(c: &Checkpoint) -> Value {
    json!({ "origin": c.origin, "size": c.size, "root": STANDARD.encode(c.root) })
}

/// Verifies an evidence bundle or a shredding receipt (told apart by its
/// `format`), offline: no store, credential or network. `identity` is the
/// verifier's public key (SEC1); `anchor` the root the attestation document
/// must chain to (the AWS Nitro root unless configured otherwise). Returns
/// the JSON report `evidence verify` prints.
pub fn verify_evidence(
    bytes: &[u8],
    identity: &[u8; 97],
    anchor: TrustAnchor,
) -> Result<Value, EvidenceError> {
    if bytes.len() > MAX_EVIDENCE_LEN {
        return Err(invalid("larger than the largest evidence file accepted"));
    }
    #[derive(Deserialize)]
    struct Head {
        format: String,
    }
    let head: Head =
        serde_json::from_slice(bytes).map_err(|e| invalid(format!("not an evidence file: {e}")))?;
    // One encoding per file (compact JSON and one newline, as
    // `encode_evidence` writes it): whitespace added or removed anywhere is
    // a changed file, and refused like any other change.
    let canonical = |value: &dyn erased::Encode| -> Result<(), EvidenceError> {
        if value.encode()? == bytes {
            Ok(())
        } else {
            Err(invalid(
                "not in its one encoding (compact JSON followed by one newline): the file was changed",
            ))
        }
    };
    match head.format.as_str() {
        BUNDLE_FORMAT => {
            let bundle: EvidenceBundle = serde_json::from_slice(bytes)
                .map_err(|e| invalid(format!("malformed bundle: {e}")))?;
            canonical(&bundle)?;
            verify_bundle(&bundle, identity, anchor)
        }
        RECEIPT_FORMAT => {
            let receipt: ShreddingReceipt = serde_json::from_slice(bytes)
                .map_err(|e| invalid(format!("malformed receipt: {e}")))?;
            canonical(&receipt)?;
            verify_receipt(&receipt, identity)
        }
        other => Err(invalid(format!("unknown evidence format {other:?}"))),
    }
}

/// The bytes of an evidence file (bundle or receipt): compact JSON and one
/// newline. [`verify_evidence`] accepts exactly these bytes.
pub fn encode_evidence<T: Serialize>(value: &T) -> Result<Vec<u8>, EvidenceError> {
    let mut bytes = serde_json::to_vec(value)
        .map_err(|e| EvidenceError::Unavailable(format!("encoding evidence: {e}")))?;
    bytes.push(b'\n');
    Ok(bytes)
}

mod erased {
    /// A value [`super::encode_evidence`] can encode, as a trait object.
    pub(super) trait Encode {
        fn encode(&self) -> Result<Vec<u8>, super::EvidenceError>;
    }
    impl<T: serde::Serialize> Encode for T {
        fn encode(&self) -> Result<Vec<u8>, super::EvidenceError> {
            super::encode_evidence(self)
        }
    }
}

/// Verifies a parsed bundle (see [`verify_evidence`]).
pub fn verify_bundle(
    bundle: &EvidenceBundle,
    identity: &[u8; 97],
    anchor: TrustAnchor,
) -> Result<Value, EvidenceError> {
    if bundle.format != BUNDLE_FORMAT || bundle.version != EVIDENCE_VERSION {
        return Err(invalid(format!(
            "not a {BUNDLE_FORMAT} version {EVIDENCE_VERSION}"
        )));
    }
    let checkpoint = verify_checkpoint(&bundle.checkpoint, identity)?.checkpoint;
    let record = parse_record(&bundle.record, "the record")?;
    check_included(&record, &bundle.proof, &checkpoint, "the record")?;

    // The attestation document, re-verified at its own time.
    let mut attestation = None;
    if let Some(document) = &record.attestation_document {
        let Actor::Enclave {
            module_id,
            pcrs,
            document_sha384,
        } = &record.actor
        else {
            return Err(invalid(
                "the record keeps a document but its actor is no enclave",
            ));
        };
        let parsed = parse_unverified(document)
            .map_err(|e| invalid(format!("the attestation document: {e}")))?;
        let at = parsed.document.timestamp_ms;
        let verified = Verifier::with_cache_capacity(anchor, 0)
            .verify(document, &VerifyOptions::at(UnixMillis(at)))
            .map_err(|e| {
                invalid(format!(
                    "the attestation document does not verify at its own time: {e}"
                ))
            })?;
        let doc = verified.document();
        if verified.document_sha384() != document_sha384 || &doc.module_id != module_id {
            return Err(invalid("the record's enclave is not the document's"));
        }
        for (index, value) in pcrs {
            if doc.pcr(*index) != Some(value.as_slice()) {
                return Err(invalid(format!(
                    "the record's PCR{index} is not the document's"
                )));
            }
        }
        attestation = Some(verified);
    }

    // The policy in force, and the decision recomputed from it.
    let operation = release_operation(&record);
    let mut policy_sha = None;
    let mut policy_set_seq = None;
    let mut policy_named_by_record = false;
    let mut recomputed = Value::Null;
    match (&bundle.policy, operation, record.decision) {
        (Some(policy), _, _) => {
            let set = parse_record(&policy.set_record, "the policy.set record")?;
            check_included(
                &set,
                &policy.set_proof,
                &checkpoint,
                "the policy.set record",
            )?;
            let digest = policy_sha256(&policy.text);
            if set.operation != "policy.set"
                || set.decision != Decision::Allowed
                || set.key_id.is_none()
                || set.key_id != record.key_id
                || set.seq >= record.seq
                || policy_hash_in(&set) != Some(digest.as_str())
                || release_policy_hash(&record).is_some_and(|named| named != digest)
            {
                return Err(invalid(
                    "the bundled policy is not the one the record names, set by an earlier \
                     policy.set record of the key",
                ));
            }
            let (Some(op), Some(verified)) = (operation, &attestation) else {
                return Err(invalid(
                    "a policy is bundled for a record that is no key release",
                ));
            };
            let parsed = KeyPolicy::from_json_str(&policy.text)
                .or_else(|_| KeyPolicy::from_toml_str(&policy.text))
                .map_err(|e| invalid(format!("the bundled policy does not parse: {e}")))?;
            let evaluated = parsed
                .evaluate(verified, op, UnixMillis(record.time_ms))
                .map_err(|r| (r.rule.as_str().to_owned(), r.detail));
            // A policy that requires an authorisation allows only a job
            // that ran under one (the record's hashed `job` field).
            let evaluated = evaluated.and_then(|m| {
                if parsed.require_authorisation() && record.job.is_none() {
                    Err((
                        "authorisation_required".to_owned(),
                        "the policy requires a job authorisation and the record names none"
                            .to_owned(),
                    ))
                } else {
                    Ok(m)
                }
            });
            match evaluated {
                Ok(m) => {
                    if let Some(reason) = &record.reason {
                        if let Some((set_name, _)) = parse_release_reason(reason) {
                            if set_name != m.set_name {
                                return Err(invalid(format!(
                                    "the record says measurement set {set_name:?}, the policy matches {:?}",
                                    m.set_name
                                )));
                            }
                        }
                    }
                    recomputed = json!("allowed");
                }
                Err((rule, detail)) => {
                    recomputed = json!({ "refused": rule, "detail": detail });
                }
            }
            if record.decision == Decision::Allowed && recomputed != json!("allowed") {
                return Err(invalid(format!(
                    "the record allowed the release but the bundled policy refuses it: {recomputed}"
                )));
            }
            policy_named_by_record = release_policy_hash(&record).is_some();
            policy_sha = Some(digest);
            policy_set_seq = Some(set.seq);
        }
        (None, Some(_), Decision::Allowed) => {
            return Err(invalid("a key release without the policy in force"));
        }
        (None, _, _) => {}
    }

    // The authorisation, if bundled.
    let mut authorisation = Value::Null;
    match (&bundle.authorisation, authorisation_id_in(&record)) {
        (Some(a), named) => {
            let bytes = STANDARD
                .decode(&a.signed)
                .map_err(|_| invalid("the authorisation is not base64"))?;
            let digest = hex::encode(Sha256::digest(&bytes));
            if digest != a.id || named.as_deref() != Some(digest.as_str()) {
                return Err(invalid(
                    "the bundled authorisation is not the one the record names",
                ));
            }
            // Issued by this verifier, and the purpose and case the record
            // carries are its own.
            let signed =
                kluis_proto::SignedAuthorisation::verify(&bytes, identity).map_err(|_| {
                    invalid("the bundled authorisation is not signed by the verifier identity")
                })?;
            // The record's key in its role, at a time the authorisation
            // was valid.
            let a_ = signed.authorisation();
            let key = record.key_id.as_deref().unwrap_or_default();
            let named_in_role = match release_operation(&record) {
                Some(Operation::Generate) => a_.output_key == key,
                Some(Operation::Decrypt) => {
                    a_.input_key == key || a_.secret_keys.iter().any(|k| k == key)
                }
                // An authorised job asks for no other operation.
                Some(Operation::DeriveSecret) => false,
                None => true,
            };
            if !named_in_role {
                return Err(invalid(format!(
                    "the bundled authorisation does not name key {key:?} for {}",
                    record.operation
                )));
            }
            if record.time_ms > a_.expires_at_ms {
                return Err(invalid(
                    "the record is later than the bundled authorisation's expiry",
                ));
            }
            let job = record.job.as_ref();
            if job.map(|j| (j.purpose.as_str(), j.case.as_str()))
                != Some((
                    signed.authorisation().purpose.as_str(),
                    signed.authorisation().case.as_str(),
                ))
            {
                return Err(invalid(
                    "the record's purpose and case are not the bundled authorisation's",
                ));
            }
            authorisation = json!(a.id);
        }
        (None, Some(id)) => {
            return Err(invalid(format!(
                "the record names authorisation {id}, which the bundle does not carry"
            )))
        }
        (None, None) => {}
    }

    // The withdrawal, if bundled: a later refusal of the same request, in
    // the same tree.
    let mut withdrawn_by = Value::Null;
    if let Some(w) = &bundle.withdrawal {
        let refusal = parse_record(&w.record, "the withdrawal record")?;
        check_included(&refusal, &w.proof, &checkpoint, "the withdrawal record")?;
        if !withdraws(&refusal, &record) {
            return Err(invalid(
                "the bundled withdrawal is not a later refusal of the record's own request",
            ));
        }
        withdrawn_by = json!({
            "seq": refusal.seq,
            "record_hash": hex::encode(refusal.hash),
            "time": rfc3339_millis(refusal.time_ms),
            "reason": refusal.reason,
        });
    }

    let document = attestation.as_ref().map(|a| a.document());
    Ok(json!({
        "status": "valid",
        "kind": "decision",
        "seq": record.seq,
        "record_hash": hex::encode(record.hash),
        "time": rfc3339_millis(record.time_ms),
        "operation": record.operation,
        "decision": record.decision,
        "recomputed_decision": recomputed,
        "reason": record.reason,
        "key": record.key_id,
        "key_version": record.key_version,
        "purpose": record.job.as_ref().map(|j| j.purpose.clone()),
        "case": record.job.as_ref().map(|j| j.case.clone()),
        "authorisation": authorisation,
        "module_id": document.map(|d| d.module_id.clone()),
        "pcrs": document.map(|d| d.pcrs.iter().map(|(i, v)| (i.to_string(), json!(hex::encode(v)))).collect::<serde_json::Map<_, _>>()),
        "document_time": document.map(|d| rfc3339_millis(d.timestamp_ms)),
        "document_sha384": attestation.as_ref().map(|a| hex::encode(a.document_sha384())),
        "root_sha256": attestation.as_ref().map(|a| hex::encode(a.root_sha256())),
        "policy_sha256": policy_sha,
        "policy_set_seq": policy_set_seq,
        "policy_named_by_record": policy_named_by_record,
        "withdrawn_by": withdrawn_by,
        "checkpoint": checkpoint_json(&checkpoint),
    }))
}

/// Verifies a parsed shredding receipt (see [`verify_evidence`]).
pub fn verify_receipt(
    receipt: &ShreddingReceipt,
    identity: &[u8; 97],
) -> Result<Value, EvidenceError> {
    use aws_lc_rs::signature::{UnparsedPublicKey, ECDSA_P384_SHA384_FIXED};
    if receipt.format != RECEIPT_FORMAT || receipt.version != EVIDENCE_VERSION {
        return Err(invalid(format!(
            "not a {RECEIPT_FORMAT} version {EVIDENCE_VERSION}"
        )));
    }
    let signature = STANDARD
        .decode(&receipt.signature)
        .map_err(|_| invalid("the signature is not base64"))?;
    let mut message = RECEIPT_LABEL.to_vec();
    message.extend_from_slice(receipt.body.as_bytes());
    UnparsedPublicKey::new(&ECDSA_P384_SHA384_FIXED, identity)
        .verify(&message, &signature)
        .map_err(|_| invalid("the receipt's signature by the verifier identity does not verify"))?;
    let body: ReceiptBody = serde_json::from_str(&receipt.body)
        .map_err(|e| invalid(format!("the receipt body: {e}")))?;
    let checkpoint = verify_checkpoint(&receipt.checkpoint, identity)?.checkpoint;
    let record = parse_record(&receipt.record, "the key.destroy record")?;
    check_included(
        &record,
        &receipt.proof,
        &checkpoint,
        "the key.destroy record",
    )?;
    if record.operation != "key.destroy"
        || record.decision != Decision::Allowed
        || record.key_id.as_deref() != Some(body.key.as_str())
        || record.seq != body.record_seq
        || hex::encode(record.hash) != body.record_hash
        || body.checkpoint_size != checkpoint.size
        || body.checkpoint_root != STANDARD.encode(checkpoint.root)
        || body.verifier_public_key != hex::encode(identity)
        || body.destroyed_at != rfc3339_millis(body.destroyed_at_ms)
    {
        return Err(invalid(
            "the receipt's statement does not match its record and checkpoint",
        ));
    }
    Ok(json!({
        "status": "valid",
        "kind": "shredding_receipt",
        "key": body.key,
        "versions_destroyed": body.versions_destroyed,
        "destroyed_at": body.destroyed_at,
        "seq": record.seq,
        "record_hash": body.record_hash,
        "record_time": rfc3339_millis(record.time_ms),
        "actor": record.actor,
        "checkpoint": checkpoint_json(&checkpoint),
    }))
}
