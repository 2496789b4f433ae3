//! Evidence a third party can check offline: the audit log as a Merkle
//! tree, signed checkpoints, inclusion and consistency proofs, evidence
//! bundles for one decision, and crypto-shredding receipts.
//!
//! # The tree over the audit log
//!
//! Beside the SHA-384 hash chain ([`crate::audit`]), the records form a
//! Merkle tree hashed as RFC 9162 §2.1 (Certificate Transparency): leaf `i`
//! (from 0) is record `seq = i + 1`, and its leaf data is the record's
//! 48-byte chain `hash`:
//!
//! ```text
//! leaf(record) = SHA-256(0x00 || record.hash)        -- record.hash: 48 raw bytes
//! node(l, r)   = SHA-256(0x01 || l || r)
//! ```
//!
//! The chain hash is the leaf data because it already commits to every
//! field of the record through the documented canonical encoding (so a
//! verifier recomputes it from the record in a few lines, independent of a
//! JSON serialiser), it has a fixed size, and it commits to the records
//! before it too: a tree over chain hashes cannot hold a record out of its
//! chain.
//!
//! The tree code is written here (a few hundred lines, tested against the
//! transparency-dev/merkle vectors) rather than taken from `ct-merkle` 0.3:
//! its tree keeps every leaf in memory, its helpers for larger trees expect
//! random access to stored node hashes (the log is a sequential file), and
//! it is built on `digest` 0.11 while the workspace's SHA-2 is 0.10 (a
//! second hash stack for a few functions).
//!
//! A checkpoint ([`note`]) is the C2SP `tlog-checkpoint` body — origin,
//! size, base64 root — in a C2SP signed note, signed by the verifier
//! identity. A witness that keeps checkpoints asks for a consistency proof
//! from its last one to the current one: a log that was rolled back
//! (a store restored from a backup) is smaller than the checkpoint, and a
//! log that was rewritten (a record changed and the chain recomputed, with
//! the anchor in the store moved to match) has another root over the same
//! prefix; both are reported ([`EvidenceError::RolledBack`],
//! [`EvidenceError::Rewritten`]) and no proof verifies.
//!
//! # Cost
//!
//! [`checkpoint_incremental`] (what `audit checkpoint` runs) reads only the
//! records appended since the last checkpoint: the tree's frontier is kept
//! in the key store with the position of the record it ends with. A full
//! checkpoint ([`checkpoint`]) or a proof is one sequential pass over the log
//! (each record parsed, its chain link and hash checked, one SHA-256 per
//! leaf and one per node), holding `O(log n)` hashes ([`merkle::Frontier`],
//! [`merkle::RangeHasher`]) and one record at a time; memory does not grow
//! with the log. A bundle or a receipt is two passes (find the records,
//! then prove them). Offline verification needs no log at all: `O(log n)`
//! hashes and one signature. Figures: `docs/evidence.md`.

pub mod bundle;
pub mod merkle;
pub mod note;
pub mod tree;

pub use bundle::*;
pub use tree::*;

use crate::audit::AuditError;

/// Why evidence could not be made or does not verify.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EvidenceError {
    /// The audit log could not be read or is damaged.
    #[error("audit log: {0}")]
    Audit(#[from] AuditError),
    /// A proof could not be made or does not verify.
    #[error("Merkle proof: {0}")]
    Merkle(#[from] merkle::MerkleError),
    /// A checkpoint is malformed or not signed by the verifier identity.
    #[error("checkpoint: {0}")]
    Note(#[from] note::NoteError),
    /// The log holds fewer records than a checkpoint it signed: it was
    /// truncated or rolled back.
    #[error(
        "the log was rolled back: the checkpoint covers {checkpoint_size} records, \
         the log now holds {log_size}"
    )]
    RolledBack {
        /// Records the old checkpoint covers.
        checkpoint_size: u64,
        /// Records the log holds now.
        log_size: u64,
    },
    /// The first records of the log no longer hash to a checkpoint's root:
    /// a record was changed, removed or inserted.
    #[error(
        "the log was rewritten: its first {size} records hash to {found}, \
         the checkpoint signed {expected}"
    )]
    Rewritten {
        /// Records the old checkpoint covers.
        size: u64,
        /// The root the checkpoint signed (base64).
        expected: String,
        /// The root of those records now (base64).
        found: String,
    },
    /// No record with that sequence number.
    #[error("no audit record with seq {seq} (the log holds {size})")]
    NoSuchRecord {
        /// The sequence number asked for.
        seq: u64,
        /// Records in the log.
        size: u64,
    },
    /// What the evidence needs cannot be found (e.g. the policy in force).
    #[error("{0}")]
    Unavailable(String),
    /// The evidence is not valid: something does not verify or does not
    /// match.
    #[error("{0}")]
    Invalid(String),
    /// Signing failed.
    #[error("signing: {0}")]
    Sign(String),
}

impl EvidenceError {
    /// A short machine-readable kind, for the command line's JSON errors.
    pub fn kind(&self) -> &'static str {
        match self {
            EvidenceError::Audit(AuditError::Io { .. } | AuditError::Unavailable { .. }) => "io",
            EvidenceError::Audit(_) => "audit_broken",
            EvidenceError::Merkle(_) => "proof_invalid",
            EvidenceError::Note(_) => "checkpoint_invalid",
            EvidenceError::RolledBack { .. } => "log_rolled_back",
            EvidenceError::Rewritten { .. } => "log_rewritten",
            EvidenceError::NoSuchRecord { .. } => "no_such_record",
            EvidenceError::Unavailable(_) => "evidence_unavailable",
            EvidenceError::Invalid(_) => "evidence_invalid",
            EvidenceError::Sign(_) => "sign_failed",
        }
    }
}
