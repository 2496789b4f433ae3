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
//! optional field is written, as `null` when absent — except `job`, added
//! later: a record of a job run under a controller-signed job authorisation
//! has, between `attestation_document` and `prev_hash`,
//! `"job":{"authorisation":"<64 hex>","purpose":"…","case":"…"}` (the
//! authorisation's id, SHA-256 of its signed bytes, and its purpose and
//! case reference), and every other record leaves the field out. No field holds key
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
//!  || [job]                              -- only when the record has one
//!  || prev_hash)                         -- 48 raw bytes
//!
//! job   = 0x4a || str(authorisation id, hex) || str(purpose) || str(case)
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
//! to the same bytes. (`job` is not `opt(…)`-tagged so that records from
//! before it keep their hashes; it is still unambiguous, as what follows the
//! document is either exactly the 48 bytes of `prev_hash` or `job` and
//! them.) The first record's `prev_hash` is 48 zero bytes.
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

mod db;
mod error;
mod handle;
mod log;
mod record;
mod verify;

pub use db::MAX_BATCH;
pub use error::*;
pub use handle::AuditLog;
pub use record::*;
pub use verify::*;
