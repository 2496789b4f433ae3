//! [`AuditLog`]: the log in a file of the store directory, or in the
//! store's PostgreSQL database (shared by replicas).

use super::db::DbLog;
use super::log::FileLog;
#[allow(unused_imports)]
use super::*;
use std::path::Path;

/// An open, append-only audit log. Share it between threads (`Arc`).
///
/// It lives in a file ([`AuditLog::open`], [`AuditLog::open_anchored`]) or
/// in the store's database ([`AuditLog::open_database`]); both hold the same
/// records, verified by the same code. In a database, every committed record
/// is durable, so [`AuditLog::durable_head`] is always the head, and anchors
/// carry no file length.
#[derive(Debug)]
pub struct AuditLog {
    backing: Backing,
}

#[derive(Debug)]
enum Backing {
    File(FileLog),
    // Boxed: its keys make it many times the size of a file log.
    Database(Box<DbLog>),
}

impl AuditLog {
    /// Opens the log at `path`, creating it (mode 0600) if it does not exist.
    ///
    /// Refuses a file that group or others may write; under the file lock,
    /// removes an unfinished last line left by a crash (see the
    /// [module documentation](crate::audit)) and reads the last record to learn the
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
        Ok(AuditLog {
            backing: Backing::File(FileLog::open_anchored(path, anchor)?),
        })
    }

    /// Opens the log in the database of `store` (a database store), whose
    /// root authenticates the records this handle writes and reads; with
    /// `anchor`, refuses a log that no longer holds the anchored record
    /// unchanged.
    pub fn open_database(
        store: &kluis_keystore::Store,
        anchor: Option<&AuditAnchor>,
    ) -> Result<AuditLog, AuditError> {
        let db = store.database().ok_or_else(|| {
            AuditError::Failed(format!(
                "the store {} keeps no database: its log is a file",
                store.path().display()
            ))
        })?;
        Ok(AuditLog {
            backing: Backing::Database(Box::new(DbLog::open(
                db.clone(),
                store.audit_row_key(),
                anchor,
            )?)),
        })
    }

    /// The file, or the database's `postgresql://user@host:port/dbname`.
    pub fn path(&self) -> &Path {
        match &self.backing {
            Backing::File(log) => log.path(),
            Backing::Database(log) => log.path(),
        }
    }

    /// How many bytes of unfinished last lines (left by a crashed writer)
    /// this handle removed, at open or later (0 normally, and always in a
    /// database).
    pub fn recovered_tail_bytes(&self) -> u64 {
        match &self.backing {
            Backing::File(log) => log.recovered_tail_bytes(),
            Backing::Database(_) => 0,
        }
    }

    /// The last record this handle wrote or saw (at open, or appended by
    /// another handle before this handle's last append, verify or records
    /// call). In a file, an append that has written it may still be waiting
    /// for its fsync; the head that [`AuditLog::append`] returns is durable.
    pub fn head(&self) -> AuditHead {
        match &self.backing {
            Backing::File(log) => log.head(),
            Backing::Database(log) => log.head(),
        }
    }

    /// The head, if every record up to it is durable; `None` while an append
    /// to a file is still waiting for its fsync. Only a durable head may be
    /// anchored elsewhere: anchoring one that a crash could lose would make
    /// an honest log look truncated.
    pub fn durable_head(&self) -> Option<AuditHead> {
        match &self.backing {
            Backing::File(log) => log.durable_head(),
            Backing::Database(log) => Some(log.head()),
        }
    }

    /// [`AuditLog::durable_head`] as an anchor to keep in the store (for a
    /// file, with its length up to that record).
    pub fn durable_anchor(&self) -> Option<AuditAnchor> {
        match &self.backing {
            Backing::File(log) => log.durable_anchor(),
            Backing::Database(log) => Some(log.durable_anchor()),
        }
    }

    /// Checks that the chain this handle knows holds `anchor` (the head
    /// anchored in the store), where it was anchored: an anchor may only
    /// move from there forward along this chain. Reads what other handles
    /// appended first (see [`AuditLog::append`]); reads one record.
    pub fn check_anchor(&self, anchor: &AuditAnchor) -> Result<(), AuditError> {
        match &self.backing {
            Backing::File(log) => log.check_anchor(anchor),
            Backing::Database(log) => log.check_anchor(anchor),
        }
    }

    /// Appends a record and returns its head once it is durable.
    ///
    /// A file log refuses (and keeps refusing, until reopened) when the path
    /// no longer names the open file (checked before the write and again
    /// after the fsync that covers it), when the file shrank, or when what
    /// other handles appended does not chain onto this handle's head. A
    /// database log appends after the head row, whoever wrote it, in one
    /// transaction with the records other threads appended at the same time.
    pub fn append(&self, new: NewRecord) -> Result<AuditHead, AuditError> {
        self.append_anchor(new).map(|a| a.head())
    }

    /// [`AuditLog::append`], returning the new record as an anchor (with,
    /// for a file, the file length up to its line).
    pub fn append_anchor(&self, new: NewRecord) -> Result<AuditAnchor, AuditError> {
        self.append_job(new, None)
    }

    /// [`AuditLog::append_anchor`] for a record of a job run under a job
    /// authorisation (`job`: its id, purpose and case reference).
    pub fn append_job(
        &self,
        new: NewRecord,
        job: Option<JobContext>,
    ) -> Result<AuditAnchor, AuditError> {
        match &self.backing {
            Backing::File(log) => log.append_job(new, job),
            Backing::Database(log) => log.append_job(new, job),
        }
    }

    /// Verifies the whole chain: every record's hash, `prev_hash` and
    /// sequence number, that it ends with the head this handle knows (the
    /// head row, in a database), and, with `expected_head` (kept elsewhere,
    /// e.g. in the key store), that the chain reaches that head unchanged.
    /// Reports the first broken record. Appends may continue meanwhile;
    /// records written after the call started are not checked.
    pub fn verify(&self, expected_head: Option<&AuditHead>) -> Result<VerifyReport, AuditError> {
        match &self.backing {
            Backing::File(log) => log.verify(expected_head),
            Backing::Database(log) => {
                let head = log.snapshot()?;
                let report = verify_chain(log.reader(0, head.seq)?, expected_head, log.path())?;
                if report.head != head {
                    return Err(AuditError::ChangedOnDisk {
                        in_memory: head,
                        on_disk: report.head,
                    });
                }
                Ok(report)
            }
        }
    }

    /// The records that pass `filter`, in order, checking the chain as it
    /// reads (a broken chain is an error, not a shorter answer).
    pub fn records(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>, AuditError> {
        match &self.backing {
            Backing::File(log) => log.records(filter),
            Backing::Database(log) => {
                let head = log.snapshot()?;
                records_from_reader(log.reader(0, head.seq)?, filter, log.path())
            }
        }
    }

    /// Calls `f` with each record in order, checking the chain as it reads,
    /// until `f` returns `false` or the records written before the call
    /// end. One record in memory at a time (the Merkle tree over the log is
    /// computed this way, see [`crate::evidence`]).
    pub fn scan(&self, f: impl FnMut(&AuditRecord) -> bool) -> Result<(), AuditError> {
        match &self.backing {
            Backing::File(log) => log.scan(f),
            Backing::Database(log) => {
                let head = log.snapshot()?;
                scan_from_reader(log.reader(0, head.seq)?, log.path(), f)
            }
        }
    }

    /// Calls `f` with each record after `from` (a record of this log, found
    /// where it was anchored, as [`AuditLog::check_anchor`] checks; the
    /// empty log's [`AuditAnchor::GENESIS`] for all), in order, up to the
    /// records written before the call, checking the chain as it reads.
    /// Returns the anchor of the last record read (`from` if none), so a
    /// caller can continue from there later without reading the log again.
    pub fn scan_after(
        &self,
        from: &AuditAnchor,
        mut f: impl FnMut(&AuditRecord),
    ) -> Result<AuditAnchor, AuditError> {
        match &self.backing {
            Backing::File(log) => log.scan_after(from, f),
            Backing::Database(log) => {
                log.check_anchor(from)?;
                let head = log.snapshot()?;
                let mut chain =
                    ChainReader::resume(log.reader(from.seq, head.seq)?, log.path(), from.head());
                while let Some(record) = chain.next_record()? {
                    f(&record);
                }
                Ok(AuditAnchor {
                    seq: chain.head.seq,
                    hash: chain.head.hash,
                    len: None,
                })
            }
        }
    }
}
