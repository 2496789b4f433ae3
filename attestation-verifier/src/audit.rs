//! The audit log: append-only, hash-chained, one JSON record per line.
//!
//! Every administrative action and every key request (allowed or refused) is
//! appended as one [`AuditRecord`]. Each record carries the hash of the one
//! before it, so changing, deleting, inserting or reordering records breaks
//! the chain at the first record touched; [`AuditLog::verify`] (or
//! [`verify_file`] offline) recomputes every hash and reports that record.
//! Removing records from the *end* leaves a valid shorter chain: it is
//! detected against an [`AuditAnchor`] kept elsewhere (the key store keeps
//! it, authenticated: the head and the file length up to it) and passed to
//! `verify` as `expected_head`. Appending to such a log would build a new,
//! valid chain past the gap, so the commands and the service open the log
//! with [`AuditLog::open_anchored`], which refuses a log that does not hold
//! the anchored record where it was anchored; and the store moves its anchor
//! only along the chain it already anchors ([`AuditLog::check_anchor`]).
//!
//! # File format
//!
//! UTF-8, one record per line, each line ended by `\n`, at most
//! [`MAX_LINE_LEN`] bytes. A line is the compact JSON (no whitespace) of:
//!
//! ```json
//! {"seq":1,"time_ms":1767225600000,
//!  "actor":{"kind":"enclave","module_id":"i-0abc-enc0def","pcrs":{"0":"<hex>","8":"<hex>"},
//!           "document_sha384":"<96 hex>"},
//!  "operation":"key.generate","key_id":"agency-a/app-x/prod","key_version":3,
//!  "decision":"allowed","reason":null,"attestation_document":"<base64>",
//!  "prev_hash":"<96 hex>","hash":"<96 hex>"}
//! ```
//!
//! (shown wrapped; on disk it is one line) with the fields in exactly this
//! order: `seq` (1, 2, 3, … — equal to the line number), `time_ms` (Unix
//! milliseconds, from the caller's clock), `actor` (`{"kind":"admin","name",
//! "role"}`, `{"kind":"enclave","module_id","pcrs","document_sha384"}` with
//! `pcrs` an object from the decimal PCR index to its lowercase hex value, in
//! ascending index order, or `{"kind":"system"}`), `operation`, `key_id`
//! (string or `null`), `key_version` (integer or `null`), `decision`
//! (`"allowed"` or `"refused"`), `reason` (string or `null`: the rule that
//! failed and its detail), `attestation_document` (standard padded base64 of
//! the COSE bytes, or `null`; kept so a third party can re-verify it later),
//! `prev_hash` and `hash` (lowercase hex, 48 bytes). Hex is lowercase; every
//! optional field is written, as `null` when absent. No field holds key
//! material: the record types have no place for a key.
//!
//! # Hash canonicalisation
//!
//! `hash` is SHA-384 over a length-prefixed binary encoding of every other
//! field — not over the JSON text — so that it does not depend on a JSON
//! serialiser and a third party can recompute it in a few lines:
//!
//! ```text
//! u8(x)    = one byte
//! u32(x)   = 4 bytes, big-endian
//! u64(x)   = 8 bytes, big-endian
//! bytes(b) = u64(len(b)) || b
//! str(s)   = bytes(UTF-8 of s)
//! opt(x)   = 0x00 when absent, 0x01 || x when present
//!
//! hash = SHA-384(
//!     str("kluis-audit-v1")
//!  || u64(seq) || u64(time_ms)
//!  || actor
//!  || str(operation)
//!  || opt(str(key_id)) || opt(u32(key_version))
//!  || u8(decision)                       -- 0x01 allowed, 0x02 refused
//!  || opt(str(reason))
//!  || opt(bytes(attestation document))   -- the COSE bytes, not the base64
//!  || prev_hash)                         -- 48 raw bytes
//!
//! actor = 0x01 || str(name) || str(role)                            -- admin
//!       | 0x02 || str(module_id) || u64(n)
//!              || n × (u8(pcr index) || bytes(pcr value))           -- ascending index
//!              || document_sha384                                   -- enclave, 48 raw bytes
//!       | 0x03                                                      -- system
//! ```
//!
//! Every variable-length item is length-prefixed and every optional item or
//! variant is tagged, in a fixed order, so two different records never encode
//! to the same bytes. The first record's `prev_hash` is 48 zero bytes.
//!
//! Because the hash covers decoded values, the verifier also requires every
//! line to be exactly the canonical JSON of the record it parses to (the
//! encoding above: field order, lowercase hex, padded base64, explicit
//! `null`s, no whitespace). A change of any byte of the file therefore either
//! changes a hashed value or makes the line non-canonical or unparseable, and
//! is reported.
//!
//! # Durability and concurrency
//!
//! [`AuditLog::open`] reads only the last record of the file to learn the
//! head, and keeps the file open and the head in memory.
//! [`AuditLog::append`] writes the line and does not return before it is on
//! disk (`fdatasync`). Concurrent appends through one handle are ordered by
//! an internal mutex and share fsyncs (group commit): while one thread syncs,
//! the others write their lines, and the next sync covers them all.
//!
//! Several handles, in one process or several (the key-release service and
//! an administrator's command), may append to the same file. Each append
//! holds an exclusive `flock` on the file while it writes, and first compares
//! the file's length with the length it knows (one `fstat`): only when
//! another handle appended meanwhile does it read those new records, checking
//! that they chain onto its head, before chaining onto theirs. The fsync
//! happens after the lock is released. A file that shrank under an open
//! handle is refused ([`AuditError::FileShrank`]), and so is a path that no
//! longer names the open file (deleted or replaced: checked by device and
//! inode before each write and after each fsync, [`AuditError::Replaced`]).
//! A write or sync failure, or a damaged or replaced file, makes the handle
//! refuse further appends until the log is reopened. A symbolic link is
//! never followed ([`AuditError::Symlink`]).
//!
//! A crash while a line is being written can leave an unfinished last line.
//! Its append never returned, so the next `open` or append (under the lock)
//! removes it — at most [`MAX_LINE_LEN`] bytes, and only if it looks like the
//! start of a record or is zeros — and counts the bytes removed
//! ([`AuditLog::recovered_tail_bytes`]); the commands record that as an
//! `audit.tail_recovered` record.
//! [`verify_file`] reports such a line instead.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha384};
use std::collections::BTreeMap;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

/// Length of a record hash (SHA-384).
pub const HASH_LEN: usize = 48;
/// Longest line read or written, newline excluded. A record with the largest
/// allowed attestation document and reason fits well within it.
pub const MAX_LINE_LEN: usize = 256 * 1024;
/// Longest `operation`, admin `name`/`role` and enclave `module_id`, in bytes.
pub const MAX_NAME_LEN: usize = 256;
/// Longest `key_id`, in bytes.
pub const MAX_KEY_ID_LEN: usize = 1024;
/// Longest `reason`, in bytes.
pub const MAX_REASON_LEN: usize = 16 * 1024;
/// Largest attestation document kept in a record.
pub const MAX_ATTESTATION_DOCUMENT_LEN: usize = kluis_attestation::MAX_DOCUMENT_LEN;

/// The domain-separation label that starts the hashed encoding.
const DOMAIN: &[u8] = b"kluis-audit-v1";
/// How far back `open` looks for the start of the last line, per read.
const TAIL_CHUNK: usize = 64 * 1024;
/// The PCRs an enclave actor records (those a policy can pin).
const ACTOR_PCRS: [u8; 6] = [0, 1, 2, 3, 4, 8];

/// The end of the chain: the sequence number and hash of the last record.
/// `seq` 0 with a zero hash is the empty log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AuditHead {
    /// Sequence number of the last record (0 for an empty log).
    pub seq: u64,
    /// Its hash (48 zero bytes for an empty log).
    #[serde(with = "hex48")]
    pub hash: [u8; HASH_LEN],
}

impl AuditHead {
    /// The head of an empty log.
    pub const GENESIS: AuditHead = AuditHead {
        seq: 0,
        hash: [0; HASH_LEN],
    };
}

impl fmt::Display for AuditHead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "seq {} (hash {})", self.seq, hex::encode(self.hash))
    }
}

/// A head anchored outside the log (in the key store): the head, and the
/// length of the file up to the end of its line, so that a later reader can
/// check in one read that the file still holds that record where it was.
/// `len` is absent in anchors written by older versions; they are checked
/// by reading the chain from the start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AuditAnchor {
    /// Sequence number of the anchored record (0 for an empty log).
    pub seq: u64,
    /// Its hash (48 zero bytes for an empty log).
    #[serde(with = "hex48")]
    pub hash: [u8; HASH_LEN],
    /// Bytes of the file up to and including the record's newline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub len: Option<u64>,
}

impl AuditAnchor {
    /// The empty log.
    pub const GENESIS: AuditAnchor = AuditAnchor {
        seq: 0,
        hash: [0; HASH_LEN],
        len: Some(0),
    };

    /// The anchored head.
    pub fn head(&self) -> AuditHead {
        AuditHead {
            seq: self.seq,
            hash: self.hash,
        }
    }
}

impl fmt::Display for AuditAnchor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.head().fmt(f)
    }
}

/// Unix milliseconds as RFC 3339 UTC (the number itself when out of range),
/// for messages and records.
pub fn rfc3339_millis(ms: u64) -> String {
    let nanos = i128::from(ms).saturating_mul(1_000_000);
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{ms} (Unix ms)"))
}

/// The outcome a record reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// The action was allowed.
    Allowed,
    /// The action was refused.
    Refused,
}

impl Decision {
    fn tag(self) -> u8 {
        match self {
            Decision::Allowed => 1,
            Decision::Refused => 2,
        }
    }
}

/// Who acted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Actor {
    /// An authenticated administrator.
    Admin {
        /// The administrator's name.
        name: String,
        /// The role they acted in (key or application administrator).
        role: String,
    },
    /// An attested enclave.
    Enclave {
        /// The NSM module id from the attestation document.
        module_id: String,
        /// PCR values from the document, by index.
        #[serde(with = "pcr_map")]
        pcrs: BTreeMap<u8, Vec<u8>>,
        /// SHA-384 of the COSE bytes of the attestation document.
        #[serde(with = "hex48")]
        document_sha384: [u8; HASH_LEN],
    },
    /// The service itself (start-up, recovery, scheduled rotation).
    System,
}

impl Actor {
    /// The enclave that `attestation` proves: its module id, PCRs 0, 1, 2, 3,
    /// 4 and 8 (those a policy can pin; the full document can be kept in the
    /// record's `attestation_document`) and the document hash.
    pub fn enclave(attestation: &kluis_attestation::VerifiedAttestation) -> Actor {
        let document = attestation.document();
        let pcrs = ACTOR_PCRS
            .iter()
            .filter_map(|&i| document.pcr(i).map(|v| (i, v.to_vec())))
            .collect();
        Actor::Enclave {
            module_id: document.module_id.clone(),
            pcrs,
            document_sha384: *attestation.document_sha384(),
        }
    }

    /// What kind of actor this is.
    pub fn kind(&self) -> ActorKind {
        match self {
            Actor::Admin { .. } => ActorKind::Admin,
            Actor::Enclave { .. } => ActorKind::Enclave,
            Actor::System => ActorKind::System,
        }
    }
}

/// The kind of an [`Actor`], for filtering.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActorKind {
    /// [`Actor::Admin`].
    Admin,
    /// [`Actor::Enclave`].
    Enclave,
    /// [`Actor::System`].
    System,
}

/// A record to append: everything but the chain fields, which the log fills.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRecord {
    /// When, in Unix milliseconds (from the caller's clock).
    pub time_ms: u64,
    /// Who.
    pub actor: Actor,
    /// What, e.g. `key.generate`, `key.rotate`, `policy.set` (1..=256 bytes).
    pub operation: String,
    /// The customer master key concerned, if any.
    pub key_id: Option<String>,
    /// Its version, if one is concerned.
    pub key_version: Option<u32>,
    /// Allowed or refused.
    pub decision: Decision,
    /// Why (for a refusal: the rule that failed and its detail).
    pub reason: Option<String>,
    /// The COSE bytes of the enclave's attestation document, kept so a third
    /// party can re-verify it; its SHA-384 must equal the enclave actor's
    /// `document_sha384`.
    pub attestation_document: Option<Vec<u8>>,
}

/// One record of the log, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRecord {
    /// Sequence number, from 1, equal to the record's line number.
    pub seq: u64,
    /// When, in Unix milliseconds.
    pub time_ms: u64,
    /// Who.
    pub actor: Actor,
    /// What.
    pub operation: String,
    /// The customer master key concerned, if any.
    pub key_id: Option<String>,
    /// Its version, if one is concerned.
    pub key_version: Option<u32>,
    /// Allowed or refused.
    pub decision: Decision,
    /// Why.
    pub reason: Option<String>,
    /// The COSE bytes of the attestation document (base64 in the file).
    #[serde(with = "opt_base64")]
    pub attestation_document: Option<Vec<u8>>,
    /// The previous record's hash (zeros for the first record).
    #[serde(with = "hex48")]
    pub prev_hash: [u8; HASH_LEN],
    /// SHA-384 of the canonical encoding (see the [module documentation](self)).
    #[serde(with = "hex48")]
    pub hash: [u8; HASH_LEN],
}

impl AuditRecord {
    fn seal(new: NewRecord, seq: u64, prev_hash: [u8; HASH_LEN]) -> AuditRecord {
        let mut record = AuditRecord {
            seq,
            time_ms: new.time_ms,
            actor: new.actor,
            operation: new.operation,
            key_id: new.key_id,
            key_version: new.key_version,
            decision: new.decision,
            reason: new.reason,
            attestation_document: new.attestation_document,
            prev_hash,
            hash: [0; HASH_LEN],
        };
        record.hash = record.compute_hash();
        record
    }

    /// The bytes `hash` is computed over (see the [module documentation](self)).
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let document_len = self.attestation_document.as_ref().map_or(0, Vec::len);
        let reason_len = self.reason.as_ref().map_or(0, String::len);
        let mut e = Encoder(Vec::with_capacity(
            512_usize
                .saturating_add(document_len)
                .saturating_add(reason_len),
        ));
        e.bytes(DOMAIN);
        e.u64(self.seq);
        e.u64(self.time_ms);
        match &self.actor {
            Actor::Admin { name, role } => {
                e.u8(1);
                e.bytes(name.as_bytes());
                e.bytes(role.as_bytes());
            }
            Actor::Enclave {
                module_id,
                pcrs,
                document_sha384,
            } => {
                e.u8(2);
                e.bytes(module_id.as_bytes());
                e.u64(u64::try_from(pcrs.len()).unwrap_or(u64::MAX));
                for (index, value) in pcrs {
                    e.u8(*index);
                    e.bytes(value);
                }
                e.raw(document_sha384);
            }
            Actor::System => e.u8(3),
        }
        e.bytes(self.operation.as_bytes());
        e.opt(self.key_id.as_deref(), |e, v| e.bytes(v.as_bytes()));
        e.opt(self.key_version, |e, v| e.raw(&v.to_be_bytes()));
        e.u8(self.decision.tag());
        e.opt(self.reason.as_deref(), |e, v| e.bytes(v.as_bytes()));
        e.opt(self.attestation_document.as_deref(), |e, v| e.bytes(v));
        e.raw(&self.prev_hash);
        e.0
    }

    /// SHA-384 of [`AuditRecord::canonical_bytes`].
    pub fn compute_hash(&self) -> [u8; HASH_LEN] {
        Sha384::digest(self.canonical_bytes()).into()
    }

    /// This record as a chain head.
    pub fn head(&self) -> AuditHead {
        AuditHead {
            seq: self.seq,
            hash: self.hash,
        }
    }
}

struct Encoder(Vec<u8>);

impl Encoder {
    fn raw(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u64(&mut self, v: u64) {
        self.raw(&v.to_be_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u64(u64::try_from(b.len()).unwrap_or(u64::MAX));
        self.raw(b);
    }
    fn opt<T>(&mut self, v: Option<T>, f: impl FnOnce(&mut Self, T)) {
        match v {
            None => self.u8(0),
            Some(v) => {
                self.u8(1);
                f(self, v);
            }
        }
    }
}

/// Which records [`AuditLog::records`] returns; `None` fields match anything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// Only records about this key.
    pub key_id: Option<String>,
    /// Only records of this operation.
    pub operation: Option<String>,
    /// Only records with this decision.
    pub decision: Option<Decision>,
    /// Only records with `time_ms >= since_ms`.
    pub since_ms: Option<u64>,
    /// Only records with `time_ms < until_ms`.
    pub until_ms: Option<u64>,
    /// Only records by this kind of actor.
    pub actor_kind: Option<ActorKind>,
}

impl AuditFilter {
    /// Whether `record` passes the filter.
    pub fn matches(&self, record: &AuditRecord) -> bool {
        self.key_id
            .as_ref()
            .is_none_or(|k| record.key_id.as_ref() == Some(k))
            && self
                .operation
                .as_ref()
                .is_none_or(|o| &record.operation == o)
            && self.decision.is_none_or(|d| record.decision == d)
            && self.since_ms.is_none_or(|t| record.time_ms >= t)
            && self.until_ms.is_none_or(|t| record.time_ms < t)
            && self.actor_kind.is_none_or(|k| record.actor.kind() == k)
    }
}

/// A successful verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifyReport {
    /// How many records the chain holds.
    pub records: u64,
    /// Its last record.
    pub head: AuditHead,
}

/// What is wrong with a broken record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Problem {
    /// The line is longer than [`MAX_LINE_LEN`]; it was not read into memory.
    #[error("the line is longer than {max} bytes")]
    LineTooLong {
        /// [`MAX_LINE_LEN`].
        max: usize,
    },
    /// The last line has no newline: a write was interrupted.
    #[error("unfinished last line: {bytes} bytes without a newline")]
    TornLine {
        /// Its length.
        bytes: u64,
    },
    /// The line is not a record (bad JSON, unknown or missing field, bad hex
    /// or base64).
    #[error("the line is not a record: {0}")]
    Unparseable(String),
    /// The line parses but is not the canonical JSON of its record.
    #[error(
        "the line is not in canonical form (its bytes differ from the record's canonical JSON)"
    )]
    NotCanonical,
    /// A sequence number out of place: a record deleted, duplicated,
    /// inserted or moved.
    #[error("seq {found} where {expected} was expected ({})", seq_hint(*.expected, *.found))]
    SeqMismatch {
        /// The sequence number this line must carry.
        expected: u64,
        /// The one it carries.
        found: u64,
    },
    /// `prev_hash` is not the previous record's hash.
    #[error("prev_hash {found} is not the previous record's hash {expected}")]
    PrevHashMismatch {
        /// The previous record's hash, hex.
        expected: String,
        /// This record's `prev_hash`, hex.
        found: String,
    },
    /// `hash` does not match the record's contents.
    #[error("hash {recorded} does not match the record's contents, which hash to {computed}")]
    HashMismatch {
        /// The `hash` field, hex.
        recorded: String,
        /// The recomputed hash, hex.
        computed: String,
    },
}

fn seq_hint(expected: u64, found: u64) -> &'static str {
    if found > expected {
        "records are missing before it, or it was moved"
    } else {
        "a duplicated or reordered record"
    }
}

/// Errors of the audit log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// An I/O error on the log file.
    #[error("audit log {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The file is shorter than the records this handle knows: records were
    /// removed from its end while it was open.
    #[error(
        "audit log {path} shrank while open, from {known} to {found} bytes: records were removed"
    )]
    FileShrank {
        /// The file.
        path: String,
        /// The length this handle knows.
        known: u64,
        /// The length found.
        found: u64,
    },
    /// The file is not a regular file, or group or others may write it.
    #[error("audit log {path} has mode {mode:o}: it must be a regular file that only its owner may write")]
    InsecureFile {
        /// The file.
        path: String,
        /// Its mode bits.
        mode: u32,
    },
    /// A record to append breaks a bound (nothing was written).
    #[error("the record to append is invalid: {field}: {reason}")]
    InvalidRecord {
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The first broken record of the chain.
    #[error("audit log broken at line {line} (seq {seq}): {problem}")]
    Broken {
        /// 1-based line number.
        line: u64,
        /// The sequence number the line must carry (equal to `line`).
        seq: u64,
        /// What is wrong.
        problem: Problem,
    },
    /// The chain is intact but ends before the expected head: records were
    /// removed from the end.
    #[error("the audit log ends at {last} but the expected head is {expected}: records were removed from its end")]
    TruncatedTail {
        /// The head kept elsewhere.
        expected: AuditHead,
        /// The last record of the file.
        last: AuditHead,
    },
    /// The record at the expected head's sequence number has another hash:
    /// the chain was rewritten.
    #[error("the record with seq {} has hash {} but the expected head is {expected}: the log was rewritten", .found.seq, hex::encode(.found.hash))]
    HeadMismatch {
        /// The head kept elsewhere.
        expected: AuditHead,
        /// The record found at that sequence number.
        found: AuditHead,
    },
    /// The file no longer ends with the record this handle last wrote.
    #[error("the audit log file changed while open: it ends at {on_disk}, this handle last wrote {in_memory}")]
    ChangedOnDisk {
        /// The head this handle keeps.
        in_memory: AuditHead,
        /// The last record in the file.
        on_disk: AuditHead,
    },
    /// A write or sync failed earlier, or the file was found damaged or
    /// replaced; the log must be reopened.
    #[error("the audit log refuses appends after an earlier failure ({0}); reopen it")]
    Failed(String),
    /// The record anchored in the store is not where it was anchored: the
    /// log was truncated and written again, or rewritten.
    #[error("the anchored record {expected} is not the line ending at byte {at} of the audit log: records were removed or rewritten since it was anchored")]
    AnchorNotFound {
        /// The anchored head.
        expected: AuditHead,
        /// Where its line ended.
        at: u64,
    },
    /// The path no longer names the file this handle has open (deleted,
    /// renamed or replaced while open): records would go where nobody reads.
    #[error("audit log {path} was {what} while open; refusing to append to a file that is no longer the log")]
    Replaced {
        /// The file.
        path: String,
        /// `deleted` or `replaced by another file`.
        what: &'static str,
    },
    /// The path is a symbolic link (not followed).
    #[error("audit log {path} is a symbolic link; give the real path")]
    Symlink {
        /// The file.
        path: String,
    },
}

impl AuditError {
    /// The sequence number of the first broken record, for a broken chain.
    pub fn broken_seq(&self) -> Option<u64> {
        match self {
            AuditError::Broken { seq, .. } => Some(*seq),
            _ => None,
        }
    }

    fn io(path: &Path, source: io::Error) -> AuditError {
        AuditError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

/// An open, append-only audit log. Share it between threads (`Arc`).
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: File,
    /// Device and inode of `file`: each append checks that `path` still
    /// names it.
    dev: u64,
    ino: u64,
    state: Mutex<State>,
    synced: Condvar,
}

#[derive(Debug)]
struct State {
    /// The last record written (not necessarily synced yet).
    head: AuditHead,
    /// Bytes of complete lines in the file.
    len: u64,
    /// The last sequence number known to be on disk.
    synced_seq: u64,
    /// The file length up to the end of record `synced_seq`.
    synced_len: u64,
    /// A thread is syncing now.
    syncing: bool,
    /// Why the log refuses appends, after a failure.
    failed: Option<String>,
    /// Bytes of unfinished lines removed (see the module documentation).
    recovered_tail_bytes: u64,
}

impl AuditLog {
    /// Opens the log at `path`, creating it (mode 0600) if it does not exist.
    ///
    /// Refuses a file that group or others may write; under the file lock,
    /// removes an unfinished last line left by a crash (see the
    /// [module documentation](self)) and reads the last record to learn the
    /// head. It does not verify the whole chain; call [`AuditLog::verify`]
    /// with the head kept elsewhere for that.
    pub fn open(path: impl AsRef<Path>) -> Result<AuditLog, AuditError> {
        Self::open_anchored(path, None)
    }

    /// Like [`AuditLog::open`], and with `anchor` (the head anchored in the
    /// key store) refuses a log that does not continue from it: the record
    /// must still be where it was anchored, and every record after it must
    /// chain onto it ([`AuditError::TruncatedTail`],
    /// [`AuditError::AnchorNotFound`], [`AuditError::Broken`]). Checked
    /// under the file lock before anything is removed, so that no process
    /// appends to a log whose anchored records are gone (appending would
    /// otherwise build a new, valid chain past the gap).
    pub fn open_anchored(
        path: impl AsRef<Path>,
        anchor: Option<&AuditAnchor>,
    ) -> Result<AuditLog, AuditError> {
        let path = path.as_ref();
        let (file, created) = open_or_create(path)?;
        let meta = file.metadata().map_err(|e| AuditError::io(path, e))?;
        if !meta.is_file() || meta.mode() & 0o022 != 0 {
            return Err(AuditError::InsecureFile {
                path: path.display().to_string(),
                mode: meta.mode(),
            });
        }
        if created {
            sync_parent_dir(path)?;
        }
        let lock = FileLock::acquire(&file).map_err(|e| AuditError::io(path, e))?;
        let file_len = file.metadata().map_err(|e| AuditError::io(path, e))?.len();
        let (head, len) = read_tail(&file, file_len).map_err(|e| match e {
            TailError::Io(e) => AuditError::io(path, e),
            TailError::Broken => locate_break(&file, file_len, path),
        })?;
        if let Some(anchor) = anchor {
            check_continues(&file, path, anchor, head, len, true)?;
        }
        let recovered_tail_bytes = file_len.saturating_sub(len);
        if recovered_tail_bytes > 0 {
            file.set_len(len).map_err(|e| AuditError::io(path, e))?;
            file.sync_all().map_err(|e| AuditError::io(path, e))?;
        }
        drop(lock);
        Ok(AuditLog {
            path: path.to_owned(),
            dev: meta.dev(),
            ino: meta.ino(),
            file,
            state: Mutex::new(State {
                head,
                len,
                synced_seq: head.seq,
                synced_len: len,
                syncing: false,
                failed: None,
                recovered_tail_bytes,
            }),
            synced: Condvar::new(),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many bytes of unfinished last lines (left by a crashed writer)
    /// this handle removed, at open or later (0 normally).
    pub fn recovered_tail_bytes(&self) -> u64 {
        self.lock().recovered_tail_bytes
    }

    /// The last record this handle wrote or saw (at open, or appended by
    /// another handle before this handle's last append, verify or records
    /// call). An append that has written it may still be waiting for its
    /// fsync; the head that [`AuditLog::append`] returns is on disk.
    pub fn head(&self) -> AuditHead {
        self.lock().head
    }

    /// The head, if every record up to it is on disk (fsync done); `None`
    /// while an append is still waiting for its fsync. Only a durable head may
    /// be anchored elsewhere: anchoring one that a crash could lose would make
    /// an honest log look truncated.
    pub fn durable_head(&self) -> Option<AuditHead> {
        let st = self.lock();
        (st.synced_seq >= st.head.seq).then_some(st.head)
    }

    /// [`AuditLog::durable_head`] with the file length up to it, to be
    /// anchored in the store.
    pub fn durable_anchor(&self) -> Option<AuditAnchor> {
        let st = self.lock();
        (st.synced_seq >= st.head.seq).then_some(AuditAnchor {
            seq: st.head.seq,
            hash: st.head.hash,
            len: Some(st.synced_len),
        })
    }

    /// Checks that the chain this handle knows holds `anchor` (the head
    /// anchored in the store), where it was anchored: an anchor may only
    /// move from there forward along this chain. Reads what other handles
    /// appended first (see [`AuditLog::append`]); reads one line.
    pub fn check_anchor(&self, anchor: &AuditAnchor) -> Result<(), AuditError> {
        let mut st = self.lock();
        if let Some(reason) = &st.failed {
            return Err(AuditError::Failed(reason.clone()));
        }
        let _file_lock =
            FileLock::acquire(&self.file).map_err(|e| AuditError::io(&self.path, e))?;
        self.refresh(&mut st)?;
        check_continues(&self.file, &self.path, anchor, st.head, st.len, false)
    }

    /// Whether `path` still names the file this handle has open.
    fn check_same_file(&self) -> Result<(), AuditError> {
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if m.dev() == self.dev && m.ino() == self.ino => Ok(()),
            Ok(_) => Err(AuditError::Replaced {
                path: self.path.display().to_string(),
                what: "replaced by another file",
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(AuditError::Replaced {
                path: self.path.display().to_string(),
                what: "deleted",
            }),
            Err(e) => Err(AuditError::io(&self.path, e)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while the lock is held; should it ever, the state is
        // still consistent (each field is updated by one assignment).
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends a record and returns its head once it is on disk.
    ///
    /// Refuses (and keeps refusing, until reopened) when the path no longer
    /// names the open file (checked before the write and again after the
    /// fsync that covers it), when the file shrank, or when what other
    /// handles appended does not chain onto this handle's head.
    pub fn append(&self, new: NewRecord) -> Result<AuditHead, AuditError> {
        self.append_anchor(new).map(|a| a.head())
    }

    /// [`AuditLog::append`], returning the new record as an anchor (with
    /// the file length up to its line).
    pub fn append_anchor(&self, new: NewRecord) -> Result<AuditAnchor, AuditError> {
        validate_new(&new)?;
        let mut st = self.lock();
        if let Some(reason) = &st.failed {
            return Err(AuditError::Failed(reason.clone()));
        }
        // Other handles append under the same lock; pick up what they wrote.
        let file_lock = FileLock::acquire(&self.file).map_err(|e| AuditError::io(&self.path, e))?;
        if let Err(e) = self.check_same_file() {
            st.failed = Some(e.to_string());
            return Err(e);
        }
        self.refresh(&mut st)?;
        let seq = st
            .head
            .seq
            .checked_add(1)
            .ok_or_else(|| AuditError::Failed("the sequence number is exhausted".to_owned()))?;
        let record = AuditRecord::seal(new, seq, st.head.hash);
        let mut line = serde_json::to_vec(&record).map_err(|e| AuditError::InvalidRecord {
            field: "record",
            reason: e.to_string(),
        })?;
        if line.len() > MAX_LINE_LEN {
            return Err(AuditError::InvalidRecord {
                field: "record",
                reason: format!(
                    "its line would be {} bytes, at most {MAX_LINE_LEN} are allowed",
                    line.len()
                ),
            });
        }
        line.push(b'\n');
        if let Err(e) = (&self.file).write_all(&line) {
            // Remove a partial line so that the file stays a valid chain.
            if let Err(e2) = self.file.set_len(st.len) {
                st.failed = Some(format!(
                    "a write failed ({e}) and the partial line could not be removed ({e2})"
                ));
            }
            return Err(AuditError::io(&self.path, e));
        }
        drop(file_lock);
        st.len = st
            .len
            .saturating_add(u64::try_from(line.len()).unwrap_or(u64::MAX));
        st.head = record.head();
        let mine = AuditAnchor {
            seq: record.seq,
            hash: record.hash,
            len: Some(st.len),
        };
        // Group commit: one thread syncs everything written so far while the
        // others wait; whoever finds nobody syncing becomes the syncer.
        loop {
            if st.synced_seq >= seq {
                return Ok(mine);
            }
            if let Some(reason) = &st.failed {
                return Err(AuditError::Failed(reason.clone()));
            }
            if st.syncing {
                st = self.synced.wait(st).unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            st.syncing = true;
            let target = st.head.seq;
            let target_len = st.len;
            drop(st);
            let result = match self.file.sync_data() {
                Err(e) => Err(AuditError::io(&self.path, e)),
                // What was synced must still be the log at its path.
                Ok(()) => self.check_same_file(),
            };
            st = self.lock();
            st.syncing = false;
            match result {
                Ok(()) => {
                    if target > st.synced_seq {
                        st.synced_seq = target;
                        st.synced_len = target_len;
                    }
                }
                Err(e) => {
                    st.failed = Some(format!("{e}"));
                    self.synced.notify_all();
                    return Err(e);
                }
            }
            self.synced.notify_all();
        }
    }

    /// Verifies the whole chain as this handle has written it: every record's
    /// hash, `prev_hash` and sequence number, that the file ends with the head
    /// this handle keeps, and, with `expected_head` (kept elsewhere, e.g. in
    /// the key store), that the chain reaches that head unchanged. Reports the
    /// first broken record. Appends may continue meanwhile; records written
    /// after the call started are not checked.
    pub fn verify(&self, expected_head: Option<&AuditHead>) -> Result<VerifyReport, AuditError> {
        let (head, len) = self.snapshot()?;
        let report = verify_chain(self.reader(len), expected_head, &self.path)?;
        if report.head != head {
            return Err(AuditError::ChangedOnDisk {
                in_memory: head,
                on_disk: report.head,
            });
        }
        Ok(report)
    }

    /// The records that pass `filter`, in order, checking the chain as it
    /// reads (a broken chain is an error, not a shorter answer).
    pub fn records(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>, AuditError> {
        let (_, len) = self.snapshot()?;
        records_from_reader(self.reader(len), filter, &self.path)
    }

    /// The head and length of the file, including what other handles
    /// appended.
    fn snapshot(&self) -> Result<(AuditHead, u64), AuditError> {
        let mut st = self.lock();
        let _file_lock =
            FileLock::acquire(&self.file).map_err(|e| AuditError::io(&self.path, e))?;
        self.refresh(&mut st)?;
        Ok((st.head, st.len))
    }

    /// With the file lock held: if the file grew, read the records other
    /// handles appended, checking that they chain onto `st.head`, and move the
    /// head to the last of them; remove an unfinished line a crashed writer
    /// left.
    fn refresh(&self, st: &mut State) -> Result<(), AuditError> {
        let result = self.refresh_inner(st);
        if let Err(e) = &result {
            if !matches!(e, AuditError::Io { .. }) {
                // A damaged file: no further appends through this handle.
                st.failed = Some(e.to_string());
            }
        }
        result
    }

    fn refresh_inner(&self, st: &mut State) -> Result<(), AuditError> {
        let len = self
            .file
            .metadata()
            .map_err(|e| AuditError::io(&self.path, e))?
            .len();
        if len == st.len {
            return Ok(());
        }
        if len < st.len {
            return Err(AuditError::FileShrank {
                path: self.path.display().to_string(),
                known: st.len,
                found: len,
            });
        }
        let reader = BufReader::with_capacity(
            TAIL_CHUNK,
            PositionalReader {
                file: &self.file,
                pos: st.len,
                end: len,
            },
        );
        let mut chain = ChainReader::resume(reader, &self.path, st.head);
        let mut good_len = st.len;
        loop {
            match chain.next_record() {
                Ok(Some(_)) => good_len = st.len.saturating_add(chain.consumed),
                Ok(None) => break,
                Err(AuditError::Broken {
                    problem: Problem::TornLine { .. },
                    ..
                }) if looks_like_torn_record(&chain.buf) => {
                    self.file
                        .set_len(good_len)
                        .and_then(|()| self.file.sync_all())
                        .map_err(|e| AuditError::io(&self.path, e))?;
                    st.recovered_tail_bytes = st
                        .recovered_tail_bytes
                        .saturating_add(len.saturating_sub(good_len));
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        st.head = chain.head;
        st.len = good_len;
        Ok(())
    }

    fn reader(&self, len: u64) -> BufReader<PositionalReader<'_>> {
        BufReader::with_capacity(
            TAIL_CHUNK,
            PositionalReader {
                file: &self.file,
                pos: 0,
                end: len,
            },
        )
    }
}

/// Verifies the log file at `path` (offline: it need not be open, and is
/// not locked or modified). See [`AuditLog::verify`]; an unfinished last line
/// is reported as [`Problem::TornLine`].
pub fn verify_file(
    path: impl AsRef<Path>,
    expected_head: Option<&AuditHead>,
) -> Result<VerifyReport, AuditError> {
    let path = path.as_ref();
    let file = File::open(path).map_err(|e| AuditError::io(path, e))?;
    verify_chain(
        BufReader::with_capacity(TAIL_CHUNK, file),
        expected_head,
        path,
    )
}

/// Verifies a log read from `reader` (see [`verify_file`]).
pub fn verify_reader(
    reader: impl BufRead,
    expected_head: Option<&AuditHead>,
) -> Result<VerifyReport, AuditError> {
    verify_chain(reader, expected_head, Path::new("(reader)"))
}

fn verify_chain(
    reader: impl BufRead,
    expected_head: Option<&AuditHead>,
    source: &Path,
) -> Result<VerifyReport, AuditError> {
    let mut chain = ChainReader::new(reader, source);
    while let Some(record) = chain.next_record()? {
        if let Some(expected) = expected_head {
            if record.seq == expected.seq && record.hash != expected.hash {
                return Err(AuditError::HeadMismatch {
                    expected: *expected,
                    found: record.head(),
                });
            }
        }
    }
    let head = chain.head;
    if let Some(expected) = expected_head {
        if head.seq < expected.seq {
            return Err(AuditError::TruncatedTail {
                expected: *expected,
                last: head,
            });
        }
        if expected.seq == 0 && expected.hash != AuditHead::GENESIS.hash {
            return Err(AuditError::HeadMismatch {
                expected: *expected,
                found: AuditHead::GENESIS,
            });
        }
    }
    Ok(VerifyReport {
        records: head.seq,
        head,
    })
}

/// The records of the log file at `path` that pass `filter`, checking the
/// chain as it reads.
pub fn read_records(
    path: impl AsRef<Path>,
    filter: &AuditFilter,
) -> Result<Vec<AuditRecord>, AuditError> {
    let path = path.as_ref();
    let file = File::open(path).map_err(|e| AuditError::io(path, e))?;
    records_from_reader(BufReader::with_capacity(TAIL_CHUNK, file), filter, path)
}

fn records_from_reader(
    reader: impl BufRead,
    filter: &AuditFilter,
    source: &Path,
) -> Result<Vec<AuditRecord>, AuditError> {
    let mut chain = ChainReader::new(reader, source);
    let mut out = Vec::new();
    while let Some(record) = chain.next_record()? {
        if filter.matches(&record) {
            out.push(record);
        }
    }
    Ok(out)
}

/// Reads records one line at a time (never more than [`MAX_LINE_LEN`] + 1
/// bytes in memory) and checks each link of the chain.
struct ChainReader<'a, R> {
    reader: R,
    source: &'a Path,
    /// Bytes of complete lines read.
    consumed: u64,
    line_no: u64,
    head: AuditHead,
    buf: Vec<u8>,
    canonical: Vec<u8>,
}

impl<'a, R: BufRead> ChainReader<'a, R> {
    fn new(reader: R, source: &'a Path) -> Self {
        Self::resume(reader, source, AuditHead::GENESIS)
    }

    /// Continues a chain whose last record is `head` (on line `head.seq`).
    fn resume(reader: R, source: &'a Path, head: AuditHead) -> Self {
        ChainReader {
            reader,
            source,
            consumed: 0,
            line_no: head.seq,
            head,
            buf: Vec::new(),
            canonical: Vec::new(),
        }
    }

    fn next_record(&mut self) -> Result<Option<AuditRecord>, AuditError> {
        self.buf.clear();
        let cap = u64::try_from(MAX_LINE_LEN)
            .unwrap_or(u64::MAX)
            .saturating_add(1);
        let n = (&mut self.reader)
            .take(cap)
            .read_until(b'\n', &mut self.buf)
            .map_err(|e| AuditError::io(self.source, e))?;
        if n == 0 {
            return Ok(None);
        }
        self.line_no = self.line_no.saturating_add(1);
        let expected_seq = self.head.seq.saturating_add(1);
        let broken = |problem| AuditError::Broken {
            line: self.line_no,
            seq: expected_seq,
            problem,
        };
        if self.buf.last() == Some(&b'\n') {
            self.buf.pop();
        } else if self.buf.len() > MAX_LINE_LEN {
            return Err(broken(Problem::LineTooLong { max: MAX_LINE_LEN }));
        } else {
            return Err(broken(Problem::TornLine {
                bytes: u64::try_from(n).unwrap_or(u64::MAX),
            }));
        }
        let record = check_line(&self.buf, &self.head, &mut self.canonical).map_err(broken)?;
        self.head = record.head();
        self.consumed = self
            .consumed
            .saturating_add(u64::try_from(n).unwrap_or(u64::MAX));
        Ok(Some(record))
    }
}

/// Checks one line (without its newline) as the successor of `prev`.
fn check_line(
    line: &[u8],
    prev: &AuditHead,
    canonical: &mut Vec<u8>,
) -> Result<AuditRecord, Problem> {
    let record: AuditRecord =
        serde_json::from_slice(line).map_err(|e| Problem::Unparseable(e.to_string()))?;
    let expected_seq = prev.seq.saturating_add(1);
    if record.seq != expected_seq {
        return Err(Problem::SeqMismatch {
            expected: expected_seq,
            found: record.seq,
        });
    }
    check_self(line, &record, canonical)?;
    if record.prev_hash != prev.hash {
        return Err(Problem::PrevHashMismatch {
            expected: hex::encode(prev.hash),
            found: hex::encode(record.prev_hash),
        });
    }
    Ok(record)
}

/// Checks a record's own hash and that `line` is its canonical JSON.
fn check_self(line: &[u8], record: &AuditRecord, canonical: &mut Vec<u8>) -> Result<(), Problem> {
    let computed = record.compute_hash();
    if computed != record.hash {
        return Err(Problem::HashMismatch {
            recorded: hex::encode(record.hash),
            computed: hex::encode(computed),
        });
    }
    canonical.clear();
    serde_json::to_writer(&mut *canonical, record)
        .map_err(|e| Problem::Unparseable(e.to_string()))?;
    if canonical.as_slice() != line {
        return Err(Problem::NotCanonical);
    }
    Ok(())
}

fn validate_new(new: &NewRecord) -> Result<(), AuditError> {
    fn check(field: &'static str, len: usize, max: usize) -> Result<(), AuditError> {
        if len > max {
            return Err(AuditError::InvalidRecord {
                field,
                reason: format!("{len} bytes, at most {max} are allowed"),
            });
        }
        Ok(())
    }
    if new.operation.is_empty() {
        return Err(AuditError::InvalidRecord {
            field: "operation",
            reason: "empty".to_owned(),
        });
    }
    check("operation", new.operation.len(), MAX_NAME_LEN)?;
    if let Some(key_id) = &new.key_id {
        check("key_id", key_id.len(), MAX_KEY_ID_LEN)?;
    }
    if let Some(reason) = &new.reason {
        check("reason", reason.len(), MAX_REASON_LEN)?;
    }
    if let Some(document) = &new.attestation_document {
        check(
            "attestation_document",
            document.len(),
            MAX_ATTESTATION_DOCUMENT_LEN,
        )?;
    }
    match &new.actor {
        Actor::Admin { name, role } => {
            check("actor.name", name.len(), MAX_NAME_LEN)?;
            check("actor.role", role.len(), MAX_NAME_LEN)?;
        }
        Actor::Enclave {
            module_id,
            pcrs,
            document_sha384,
        } => {
            check("actor.module_id", module_id.len(), MAX_NAME_LEN)?;
            for (index, value) in pcrs {
                if *index >= kluis_attestation::PCR_COUNT || ![32, 48, 64].contains(&value.len()) {
                    return Err(AuditError::InvalidRecord {
                        field: "actor.pcrs",
                        reason: format!(
                            "PCR{index} of {} bytes: indices are 0..32, values 32, 48 or 64 bytes",
                            value.len()
                        ),
                    });
                }
            }
            if let Some(document) = &new.attestation_document {
                let digest: [u8; HASH_LEN] = Sha384::digest(document).into();
                if digest != *document_sha384 {
                    return Err(AuditError::InvalidRecord {
                        field: "attestation_document",
                        reason: format!(
                            "its SHA-384 is {}, the actor's document_sha384 is {}",
                            hex::encode(digest),
                            hex::encode(document_sha384)
                        ),
                    });
                }
            }
        }
        Actor::System => {}
    }
    Ok(())
}

/// Opens the log file, refusing a symbolic link (checked before the open,
/// and after it by device and inode, so a link swapped in meanwhile is
/// refused too) and anything but a regular file.
fn open_or_create(path: &Path) -> Result<(File, bool), AuditError> {
    let symlink = || AuditError::Symlink {
        path: path.display().to_string(),
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => return Err(symlink()),
        Ok(m) if !m.is_file() => {
            return Err(AuditError::InsecureFile {
                path: path.display().to_string(),
                mode: m.mode(),
            })
        }
        _ => {}
    }
    let mut options = OpenOptions::new();
    options.read(true).append(true).mode(0o600);
    let (file, created) = match options.clone().create_new(true).open(path) {
        Ok(file) => (file, true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => options
            .open(path)
            .map(|f| (f, false))
            .map_err(|e| AuditError::io(path, e))?,
        Err(e) => return Err(AuditError::io(path, e)),
    };
    let opened = file.metadata().map_err(|e| AuditError::io(path, e))?;
    let at_path = std::fs::symlink_metadata(path).map_err(|e| AuditError::io(path, e))?;
    if at_path.file_type().is_symlink()
        || at_path.dev() != opened.dev()
        || at_path.ino() != opened.ino()
    {
        return Err(symlink());
    }
    Ok((file, created))
}

/// Checks that the chain in `file[..len]`, whose last record is `head`,
/// holds `anchor`'s record at the place it was anchored, and (with
/// `verify_rest`) that every record after it chains onto it up to `head`.
fn check_continues(
    file: &File,
    path: &Path,
    anchor: &AuditAnchor,
    head: AuditHead,
    len: u64,
    verify_rest: bool,
) -> Result<(), AuditError> {
    if anchor.seq == 0 {
        if anchor.hash != AuditHead::GENESIS.hash {
            return Err(AuditError::HeadMismatch {
                expected: anchor.head(),
                found: AuditHead::GENESIS,
            });
        }
        return Ok(());
    }
    if head.seq < anchor.seq {
        return Err(AuditError::TruncatedTail {
            expected: anchor.head(),
            last: head,
        });
    }
    let Some(at) = anchor.len else {
        // An anchor without its position: find the record by reading the
        // chain from the start.
        let report = verify_chain(
            BufReader::with_capacity(
                TAIL_CHUNK,
                PositionalReader {
                    file,
                    pos: 0,
                    end: len,
                },
            ),
            Some(&anchor.head()),
            path,
        )?;
        if report.head != head {
            return Err(AuditError::ChangedOnDisk {
                in_memory: head,
                on_disk: report.head,
            });
        }
        return Ok(());
    };
    let not_found = || AuditError::AnchorNotFound {
        expected: anchor.head(),
        at,
    };
    if at == 0 || at > len {
        return Err(not_found());
    }
    let newline = at.saturating_sub(1);
    let mut last = [0u8; 1];
    file.read_exact_at(&mut last, newline)
        .map_err(|e| AuditError::io(path, e))?;
    if last != [b'\n'] {
        return Err(not_found());
    }
    let window = u64::try_from(MAX_LINE_LEN)
        .unwrap_or(u64::MAX)
        .saturating_add(1);
    let start = rfind_newline(file, newline, newline.saturating_sub(window))
        .map_err(|e| AuditError::io(path, e))?
        .map_or(0, |p| p.saturating_add(1));
    let line_len = usize::try_from(newline.saturating_sub(start)).map_err(|_| not_found())?;
    if line_len > MAX_LINE_LEN {
        return Err(not_found());
    }
    let mut line = vec![0; line_len];
    file.read_exact_at(&mut line, start)
        .map_err(|e| AuditError::io(path, e))?;
    let record: AuditRecord = serde_json::from_slice(&line).map_err(|_| not_found())?;
    if record.seq != anchor.seq
        || record.hash != anchor.hash
        || check_self(&line, &record, &mut Vec::new()).is_err()
    {
        return Err(not_found());
    }
    if verify_rest {
        let reader = BufReader::with_capacity(
            TAIL_CHUNK,
            PositionalReader {
                file,
                pos: at,
                end: len,
            },
        );
        let mut chain = ChainReader::resume(reader, path, anchor.head());
        while chain.next_record()?.is_some() {}
        if chain.head != head {
            return Err(AuditError::ChangedOnDisk {
                in_memory: head,
                on_disk: chain.head,
            });
        }
    }
    Ok(())
}

fn sync_parent_dir(path: &Path) -> Result<(), AuditError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(|e| AuditError::io(parent, e))
}

enum TailError {
    Io(io::Error),
    /// The last complete line is not a sound record, or the unfinished tail
    /// does not look like one: find the first break by a full read.
    Broken,
}

impl From<io::Error> for TailError {
    fn from(e: io::Error) -> Self {
        TailError::Io(e)
    }
}

/// The head (last complete record, whose own hash is checked) and the length
/// of the file up to the end of its last complete line.
fn read_tail(file: &File, file_len: u64) -> Result<(AuditHead, u64), TailError> {
    let max_line = u64::try_from(MAX_LINE_LEN).unwrap_or(u64::MAX);
    // A line (newline excluded) is at most `max_line` bytes, so the newline
    // before it is at most `max_line + 1` bytes back.
    let window = max_line.saturating_add(1);
    // The unfinished part after the last newline, if any.
    let end = match rfind_newline(file, file_len, file_len.saturating_sub(window))? {
        Some(pos) => pos.saturating_add(1),
        None => 0,
    };
    let torn_len = file_len.saturating_sub(end);
    if torn_len > max_line {
        return Err(TailError::Broken);
    }
    if torn_len > 0 {
        let mut torn = vec![0; usize::try_from(torn_len).map_err(|_| TailError::Broken)?];
        file.read_exact_at(&mut torn, end)?;
        if !looks_like_torn_record(&torn) {
            return Err(TailError::Broken);
        }
    }
    if end == 0 {
        return Ok((AuditHead::GENESIS, 0));
    }
    let last_newline = end.saturating_sub(1);
    let start = match rfind_newline(file, last_newline, last_newline.saturating_sub(window))? {
        Some(pos) => pos.saturating_add(1),
        None => 0,
    };
    let line_len = last_newline.saturating_sub(start);
    if line_len > max_line {
        return Err(TailError::Broken);
    }
    let mut line = vec![0; usize::try_from(line_len).map_err(|_| TailError::Broken)?];
    file.read_exact_at(&mut line, start)?;
    let record: AuditRecord = serde_json::from_slice(&line).map_err(|_| TailError::Broken)?;
    if record.seq == 0 || check_self(&line, &record, &mut Vec::new()).is_err() {
        return Err(TailError::Broken);
    }
    Ok((record.head(), end))
}

/// The position of the last `\n` in `[floor, before)`.
fn rfind_newline(file: &File, before: u64, floor: u64) -> io::Result<Option<u64>> {
    let mut chunk = vec![0u8; TAIL_CHUNK];
    let chunk_len = u64::try_from(TAIL_CHUNK).unwrap_or(u64::MAX);
    let mut hi = before;
    while hi > floor {
        let lo = hi.saturating_sub(chunk_len).max(floor);
        let n = usize::try_from(hi.saturating_sub(lo)).unwrap_or(TAIL_CHUNK);
        let buf = chunk.get_mut(..n).unwrap_or_default();
        file.read_exact_at(buf, lo)?;
        if let Some(i) = buf.iter().rposition(|&b| b == b'\n') {
            return Ok(Some(
                lo.saturating_add(u64::try_from(i).unwrap_or(u64::MAX)),
            ));
        }
        hi = lo;
    }
    Ok(None)
}

/// Whether an unfinished last line can be an interrupted append: a prefix of
/// a record, or zeros (a size extended before the data reached the disk).
fn looks_like_torn_record(torn: &[u8]) -> bool {
    const START: &[u8] = b"{\"seq\":";
    torn.starts_with(START) || START.starts_with(torn) || torn.iter().all(|&b| b == 0)
}

/// The error for a file whose tail is not sound: a full read finds the first
/// broken record.
fn locate_break(file: &File, file_len: u64, path: &Path) -> AuditError {
    let reader = BufReader::with_capacity(
        TAIL_CHUNK,
        PositionalReader {
            file,
            pos: 0,
            end: file_len,
        },
    );
    match verify_chain(reader, None, path) {
        Err(e) => e,
        // The last line is unsound, so a full read cannot succeed; say so
        // rather than open a log whose head is unknown.
        Ok(report) => AuditError::Broken {
            line: report.records.saturating_add(1),
            seq: report.records.saturating_add(1),
            problem: Problem::Unparseable("the end of the file is not a record".to_owned()),
        },
    }
}

/// An exclusive `flock` on the log file, released on drop. It orders
/// appends of handles in different processes (and of different handles in
/// one process); threads sharing a handle are ordered by its mutex.
struct FileLock<'a>(&'a File);

impl<'a> FileLock<'a> {
    fn acquire(file: &'a File) -> io::Result<Self> {
        file.lock()?;
        Ok(FileLock(file))
    }
}

impl Drop for FileLock<'_> {
    fn drop(&mut self) {
        // Closing the file releases the lock too; an unlock error leaves
        // nothing to undo.
        let _ = self.0.unlock();
    }
}

/// Reads `[pos, end)` of a file with positional reads, so it neither moves
/// nor races with the append handle's writes.
struct PositionalReader<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl Read for PositionalReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = usize::try_from(self.end.saturating_sub(self.pos)).unwrap_or(usize::MAX);
        let want = buf.len().min(left);
        let Some(buf) = buf.get_mut(..want) else {
            return Ok(0);
        };
        if buf.is_empty() {
            return Ok(0);
        }
        let n = self.file.read_at(buf, self.pos)?;
        self.pos = self
            .pos
            .saturating_add(u64::try_from(n).unwrap_or(u64::MAX));
        Ok(n)
    }
}

fn strict_hex(text: &str) -> Result<Vec<u8>, String> {
    if !text
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err("hex must be lowercase 0-9a-f".to_owned());
    }
    hex::decode(text).map_err(|e| e.to_string())
}

mod hex48 {
    use super::HASH_LEN;
    use serde::{de::Error as _, Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &[u8; HASH_LEN], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; HASH_LEN], D::Error> {
        let text = String::deserialize(d)?;
        let bytes = super::strict_hex(&text).map_err(D::Error::custom)?;
        <[u8; HASH_LEN]>::try_from(bytes.as_slice()).map_err(|_| {
            D::Error::custom(format!("expected {HASH_LEN} bytes, found {}", bytes.len()))
        })
    }
}

mod pcr_map {
    use serde::{de::Error as _, ser::SerializeMap, Deserialize, Deserializer, Serializer};
    use std::collections::BTreeMap;

    pub(super) fn serialize<S: Serializer>(
        v: &BTreeMap<u8, Vec<u8>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(v.len()))?;
        for (index, value) in v {
            map.serialize_entry(&index.to_string(), &hex::encode(value))?;
        }
        map.end()
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<u8, Vec<u8>>, D::Error> {
        // Keys are read as strings: inside the internally tagged `Actor`,
        // serde buffers the map and would not turn "0" into a number.
        let raw = BTreeMap::<String, String>::deserialize(d)?;
        let mut out = BTreeMap::new();
        for (key, value) in raw {
            let index: u8 = key
                .parse()
                .ok()
                .filter(|i: &u8| i.to_string() == key)
                .ok_or_else(|| D::Error::custom(format!("bad PCR index {key:?}")))?;
            let bytes = super::strict_hex(&value).map_err(D::Error::custom)?;
            out.insert(index, bytes);
        }
        Ok(out)
    }
}

mod opt_base64 {
    use base64::{engine::general_purpose::STANDARD, Engine as _};
    use serde::{de::Error as _, Deserialize, Deserializer, Serializer};

    #[allow(clippy::ref_option)] // serde's `with` passes `&Option<T>`
    pub(super) fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(bytes) => s.serialize_some(&STANDARD.encode(bytes)),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Vec<u8>>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|text| STANDARD.decode(text).map_err(D::Error::custom))
            .transpose()
    }
}
