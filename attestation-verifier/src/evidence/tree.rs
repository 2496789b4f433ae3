//! The tree over a live log: checkpoints, inclusion and consistency proofs,
//! each computed by one pass over the records (see the [module
//! documentation](super) for the cost).

use super::merkle::{
    consistency_ranges, inclusion_ranges, leaf_hash, verify_consistency, Frontier, RangeHasher,
    TreeHash,
};
use super::note::{origin_for, verify_checkpoint, Checkpoint};
use super::EvidenceError;
use crate::audit::{AuditAnchor, AuditLog, AuditRecord};
use crate::kms::Kms;
use base64::{engine::general_purpose::STANDARD, Engine as _};
use kluis_proto::VerifierIdentity;
use serde::{Deserialize, Serialize};

/// Format name of an inclusion proof document.
pub const INCLUSION_FORMAT: &str = "kluis-inclusion-proof";
/// Format name of a consistency proof document.
pub const CONSISTENCY_FORMAT: &str = "kluis-consistency-proof";
/// Version of the proof documents, bundles and receipts this code writes.
pub const EVIDENCE_VERSION: u32 = 1;

/// The leaf of a record: `SHA-256(0x00 || record.hash)`.
pub fn record_leaf(record: &AuditRecord) -> TreeHash {
    leaf_hash(&record.hash)
}

/// A signed checkpoint and what it says.
#[derive(Debug, Clone)]
pub struct SignedCheckpoint {
    /// The checkpoint.
    pub checkpoint: Checkpoint,
    /// The signed note.
    pub note: String,
}

/// One pass over the first `size` records: the root, the hashes of each of
/// `proofs` (leaf ranges), the root of the first `prefix` records, and the
/// records asked for by seq.
struct Pass {
    root: TreeHash,
    proofs: Vec<Vec<TreeHash>>,
    prefix_root: Option<TreeHash>,
    records: Vec<Option<AuditRecord>>,
}

fn pass(
    log: &AuditLog,
    size: u64,
    proofs: &[Vec<(u64, u64)>],
    prefix: Option<u64>,
    want: &[u64],
) -> Result<Pass, EvidenceError> {
    let mut hashers: Vec<RangeHasher> = proofs
        .iter()
        .map(|ranges| RangeHasher::new(ranges, None))
        .collect();
    let mut all = RangeHasher::new(&[], prefix);
    let mut records: Vec<Option<AuditRecord>> = vec![None; want.len()];
    if size > 0 {
        log.scan(|record| {
            let leaf = record_leaf(record);
            all.push(leaf);
            for h in &mut hashers {
                h.push(leaf);
            }
            for (slot, seq) in records.iter_mut().zip(want) {
                if record.seq == *seq {
                    *slot = Some(record.clone());
                }
            }
            all.size() < size
        })?;
    }
    if all.size() != size {
        return Err(EvidenceError::NoSuchRecord {
            seq: size,
            size: all.size(),
        });
    }
    let proofs = hashers
        .iter()
        .map(|h| {
            h.proof()
                .ok_or_else(|| EvidenceError::Unavailable("a proof range was not read".into()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Pass {
        root: all.root(),
        proofs,
        prefix_root: all.prefix_root(),
        records,
    })
}

fn sign(
    identity: &VerifierIdentity,
    size: u64,
    root: TreeHash,
) -> Result<SignedCheckpoint, EvidenceError> {
    let checkpoint = Checkpoint {
        origin: origin_for(&identity.public_key_sec1()),
        size,
        root,
    };
    let note = checkpoint.sign(identity)?;
    Ok(SignedCheckpoint { checkpoint, note })
}

/// A checkpoint of the log as it is now, signed by `identity`.
pub fn checkpoint(
    log: &AuditLog,
    identity: &VerifierIdentity,
) -> Result<SignedCheckpoint, EvidenceError> {
    let size = log.head().seq;
    let p = pass(log, size, &[], None, &[])?;
    sign(identity, size, p.root)
}

/// A record and its inclusion proof (leaf to root).
pub type ProvedRecord = (AuditRecord, Vec<TreeHash>);

/// Where the key store keeps the frontier of the tree (a derived value:
/// losing it costs one full read of the log).
pub const KIND_TREE: &str = "audit-tree";
const ID_FRONTIER: &str = "frontier";

/// The frontier of the tree as kept in the store: the record it ends with
/// (where it is in the file) and the subtree roots.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeptFrontier {
    end: AuditAnchor,
    nodes: Vec<String>,
}

fn load_frontier(kms: &Kms) -> Option<(AuditAnchor, Frontier)> {
    let bytes = kms.store().get(KIND_TREE, ID_FRONTIER).ok()??;
    let kept: KeptFrontier = serde_json::from_slice(&bytes).ok()?;
    let nodes = decode_proof(&kept.nodes).ok()?;
    let frontier = Frontier::from_parts(kept.end.seq, nodes)?;
    kept.end.len?;
    Some((kept.end, frontier))
}

fn save_frontier(kms: &Kms, end: &AuditAnchor, frontier: &Frontier) {
    let kept = KeptFrontier {
        end: *end,
        nodes: frontier.nodes().iter().map(hex::encode).collect(),
    };
    let saved = serde_json::to_vec(&kept)
        .map_err(|e| e.to_string())
        .and_then(|bytes| {
            let guard = kms.lock().map_err(|e| e.to_string())?;
            kms.store()
                .put(&guard, KIND_TREE, ID_FRONTIER, &bytes)
                .map_err(|e| e.to_string())
        });
    if let Err(e) = saved {
        tracing::warn!("could not keep the audit tree's frontier (the next checkpoint reads the whole log): {e}");
    }
}

/// A checkpoint of the log as it is now, signed by `identity`, reading only
/// the records appended since the last checkpoint: the frontier of the tree
/// at that point is kept in the key store (authenticated like every store
/// record), with the position of the record it ends with, which must still
/// be where it was (else, after a rollback or a rewrite, the whole log is
/// read again). Cost: `O(new records)` reads and hashes, `O(log n)` memory.
pub fn checkpoint_incremental(
    kms: &Kms,
    log: &AuditLog,
    identity: &VerifierIdentity,
) -> Result<SignedCheckpoint, EvidenceError> {
    let (from, mut frontier) =
        load_frontier(kms).unwrap_or((AuditAnchor::GENESIS, Frontier::new()));
    let end = match log.scan_after(&from, |r| frontier.push(record_leaf(r))) {
        Ok(end) => end,
        Err(_) if from.seq > 0 => {
            // The kept position is gone: start again from the first record.
            frontier = Frontier::new();
            log.scan_after(&AuditAnchor::GENESIS, |r| frontier.push(record_leaf(r)))?
        }
        Err(e) => return Err(e.into()),
    };
    if end != from {
        save_frontier(kms, &end, &frontier);
    }
    sign(identity, end.seq, frontier.root())
}

/// Records `seqs` of the log with their inclusion proofs in one checkpoint
/// of the log as it is now.
pub fn prove_records(
    log: &AuditLog,
    identity: &VerifierIdentity,
    seqs: &[u64],
) -> Result<(SignedCheckpoint, Vec<ProvedRecord>), EvidenceError> {
    let size = log.head().seq;
    let mut ranges = Vec::with_capacity(seqs.len());
    for &seq in seqs {
        if seq == 0 || seq > size {
            return Err(EvidenceError::NoSuchRecord { seq, size });
        }
        ranges.push(inclusion_ranges(seq.saturating_sub(1), size)?);
    }
    let p = pass(log, size, &ranges, None, seqs)?;
    let signed = sign(identity, size, p.root)?;
    let mut out = Vec::with_capacity(seqs.len());
    for ((record, proof), &seq) in p.records.into_iter().zip(p.proofs).zip(seqs) {
        let record = record.ok_or(EvidenceError::NoSuchRecord { seq, size })?;
        out.push((record, proof));
    }
    Ok((signed, out))
}

/// An inclusion proof document (`audit prove`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InclusionProofDoc {
    /// [`INCLUSION_FORMAT`].
    pub format: String,
    /// [`EVIDENCE_VERSION`].
    pub version: u32,
    /// The record's sequence number (leaf index + 1).
    pub seq: u64,
    /// The record's chain hash (hex), the leaf data.
    pub record_hash: String,
    /// The leaf hash (hex).
    pub leaf_hash: String,
    /// Leaves in the tree (= the checkpoint's size).
    pub tree_size: u64,
    /// The proof, leaf to root (hex).
    pub proof: Vec<String>,
    /// The signed checkpoint.
    pub checkpoint: String,
}

/// The inclusion proof of record `seq` in a checkpoint of the log now.
pub fn prove(
    log: &AuditLog,
    identity: &VerifierIdentity,
    seq: u64,
) -> Result<InclusionProofDoc, EvidenceError> {
    let (signed, mut proved) = prove_records(log, identity, &[seq])?;
    let (record, proof) = proved.pop().ok_or(EvidenceError::NoSuchRecord {
        seq,
        size: signed.checkpoint.size,
    })?;
    Ok(InclusionProofDoc {
        format: INCLUSION_FORMAT.to_owned(),
        version: EVIDENCE_VERSION,
        seq,
        record_hash: hex::encode(record.hash),
        leaf_hash: hex::encode(record_leaf(&record)),
        tree_size: signed.checkpoint.size,
        proof: proof.iter().map(hex::encode).collect(),
        checkpoint: signed.note,
    })
}

/// A consistency proof document (`audit consistency`): the proof that the
/// tree of an old checkpoint is a prefix of the tree of `checkpoint`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsistencyProofDoc {
    /// [`CONSISTENCY_FORMAT`].
    pub format: String,
    /// [`EVIDENCE_VERSION`].
    pub version: u32,
    /// The old checkpoint's size.
    pub old_size: u64,
    /// The new checkpoint's size.
    pub new_size: u64,
    /// The proof (hex).
    pub proof: Vec<String>,
    /// The new signed checkpoint.
    pub checkpoint: String,
}

/// The consistency proof from `old_note` (a checkpoint this verifier
/// signed, checked first) to a checkpoint of the log now. A log smaller
/// than the old checkpoint, or whose first records no longer hash to its
/// root, is reported as rolled back or rewritten.
pub fn consistency(
    log: &AuditLog,
    identity: &VerifierIdentity,
    old_note: &str,
) -> Result<ConsistencyProofDoc, EvidenceError> {
    let old = verify_checkpoint(old_note, &identity.public_key_sec1())?.checkpoint;
    let size = log.head().seq;
    if old.size > size {
        return Err(EvidenceError::RolledBack {
            checkpoint_size: old.size,
            log_size: size,
        });
    }
    let ranges = consistency_ranges(old.size, size)?;
    let p = pass(log, size, &[ranges], Some(old.size), &[])?;
    let prefix = p.prefix_root.ok_or_else(|| {
        EvidenceError::Unavailable("the old checkpoint's prefix was not read".into())
    })?;
    if prefix != old.root {
        return Err(EvidenceError::Rewritten {
            size: old.size,
            expected: STANDARD.encode(old.root),
            found: STANDARD.encode(prefix),
        });
    }
    let proof = p.proofs.into_iter().next().unwrap_or_default();
    let signed = sign(identity, size, p.root)?;
    Ok(ConsistencyProofDoc {
        format: CONSISTENCY_FORMAT.to_owned(),
        version: EVIDENCE_VERSION,
        old_size: old.size,
        new_size: size,
        proof: proof.iter().map(hex::encode).collect(),
        checkpoint: signed.note,
    })
}

/// Decodes proof hashes (lowercase hex, 32 bytes each).
pub(crate) fn decode_proof(proof: &[String]) -> Result<Vec<TreeHash>, EvidenceError> {
    if proof.len() > super::merkle::MAX_PROOF_LEN {
        return Err(EvidenceError::Invalid("the proof is too long".into()));
    }
    proof
        .iter()
        .map(|h| {
            let lowercase = h
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            hex::decode(h)
                .ok()
                .filter(|_| lowercase)
                .and_then(|b| <TreeHash>::try_from(b.as_slice()).ok())
                .ok_or_else(|| {
                    EvidenceError::Invalid("a proof hash is not 32 bytes of lowercase hex".into())
                })
        })
        .collect()
}

/// What `evidence verify-consistency` established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedConsistency {
    /// The old checkpoint.
    pub old: Checkpoint,
    /// The new checkpoint.
    pub new: Checkpoint,
}

/// Offline: checks that `old_note` and the new checkpoint in `doc` are both
/// signed by the verifier whose identity is `public_key`, and that the
/// proof shows the old tree is a prefix of the new one.
pub fn verify_consistency_offline(
    old_note: &str,
    doc: &ConsistencyProofDoc,
    public_key: &[u8; 97],
) -> Result<VerifiedConsistency, EvidenceError> {
    if doc.format != CONSISTENCY_FORMAT || doc.version != EVIDENCE_VERSION {
        return Err(EvidenceError::Invalid(format!(
            "not a {CONSISTENCY_FORMAT} version {EVIDENCE_VERSION} document"
        )));
    }
    let old = verify_checkpoint(old_note, public_key)?.checkpoint;
    let new = verify_checkpoint(&doc.checkpoint, public_key)?.checkpoint;
    if doc.old_size != old.size || doc.new_size != new.size {
        return Err(EvidenceError::Invalid(format!(
            "the proof is for sizes {} -> {}, the checkpoints have {} -> {}",
            doc.old_size, doc.new_size, old.size, new.size
        )));
    }
    if old.size > new.size {
        return Err(EvidenceError::RolledBack {
            checkpoint_size: old.size,
            log_size: new.size,
        });
    }
    let proof = decode_proof(&doc.proof)?;
    verify_consistency(old.size, new.size, &old.root, &new.root, &proof).map_err(|e| {
        if old.size == new.size {
            EvidenceError::Rewritten {
                size: old.size,
                expected: STANDARD.encode(old.root),
                found: STANDARD.encode(new.root),
            }
        } else {
            EvidenceError::Merkle(e)
        }
    })?;
    Ok(VerifiedConsistency { old, new })
}
