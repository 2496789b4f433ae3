//! What can go wrong with a log, and what verification reports.

#[allow(unused_imports)]
use super::*;
use std::io;
use std::path::Path;

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

pub(super) fn seq_hint(expected: u64, found: u64) -> &'static str {
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
    /// The database that holds the log cannot be reached, or refused the
    /// statement: an outage (a key release answers `unavailable`), not a
    /// damaged log.
    #[error("audit log in {target}: {source}")]
    Unavailable {
        /// The database (`postgresql://user@host:port/dbname`).
        target: String,
        /// What failed.
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
    /// A record in the database carries no valid authenticator: it was
    /// written by someone who can write the database but does not hold the
    /// store's root, not by a verifier of this store.
    #[error(
        "audit record {seq} in the database has no valid authenticator: it was not written by a \
         verifier of this store (someone wrote the database directly); the log is not trusted \
         past it"
    )]
    Unauthenticated {
        /// Its sequence number.
        seq: u64,
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

    /// The same error again, for each of the appends a failed group
    /// commit answers (an error is not `Clone`: its `io::Error` is not).
    pub(super) fn again(&self) -> AuditError {
        match self {
            AuditError::Unavailable { target, source } => AuditError::Unavailable {
                target: target.clone(),
                source: io::Error::new(source.kind(), source.to_string()),
            },
            AuditError::Io { path, source } => AuditError::Io {
                path: path.clone(),
                source: io::Error::new(source.kind(), source.to_string()),
            },
            // What the database holds is wrong: said as it is, to every
            // append of the batch (the next batch checks again).
            AuditError::HeadMismatch { expected, found } => AuditError::HeadMismatch {
                expected: *expected,
                found: *found,
            },
            AuditError::AnchorNotFound { expected, at } => AuditError::AnchorNotFound {
                expected: *expected,
                at: *at,
            },
            AuditError::Unauthenticated { seq } => AuditError::Unauthenticated { seq: *seq },
            other => AuditError::Failed(other.to_string()),
        }
    }

    pub(super) fn io(path: &Path, source: io::Error) -> AuditError {
        AuditError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}
