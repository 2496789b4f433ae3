//! The audit log in PostgreSQL, shared by every replica of a verifier.
//!
//! The records are the lines of the file format (one row per record,
//! `kluis_audit(seq, line)`), so a log read out of the database verifies
//! with the same code and the same offline tools (`audit export` writes
//! the file). The head of the chain is one row, `kluis_audit_head`; an
//! append locks it (`SELECT … FOR UPDATE`), seals its records onto it,
//! inserts them and moves it, in one transaction. That gives the records of
//! every replica one total order, and a record is answered for only once
//! that transaction has committed.
//!
//! Group commit: the threads of one process that append at once hand their
//! records to whichever of them finds no transaction running; it commits
//! them all in one transaction (at most [`MAX_BATCH`]). The head row is the
//! one serialisation point of every replica's writes (docs/deploy.md says
//! how far that goes and how it would be partitioned).
//!
//! Rows are append-only for the verifier's connections too (triggers refuse
//! `UPDATE`, `DELETE` and `TRUNCATE`); a database superuser can still
//! rewrite them, which the chain, the anchor in the store and the signed
//! checkpoints (docs/evidence.md) show.
//!
//! Adding is another matter: the chain's hashes take no key, so anyone who
//! can write the database could append records with valid hashes, move the
//! head row to them, and have every replica build on them and the next
//! checkpoint sign them. Each row therefore carries `mac`, an authenticator
//! under a key only holders of the store's root have ([`AuditRowKey`]),
//! and a verifier takes no record without a valid one: not as the record
//! it chains onto, nor as one it reads (verification, export, checkpoints,
//! evidence). Records from before authenticators existed (migration 2)
//! have none; they are accepted up to the first record that has one, and
//! up to the head at the time of the migration ([`DbLog::authenticated_from`]).

use super::*;
use kluis_keystore::pg::{reason, PooledClient};
use kluis_keystore::{AuditRowKey, Database};
use std::collections::HashMap;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

/// Most records one transaction appends.
pub const MAX_BATCH: usize = 256;
/// Rows read per query when reading the log: with each line read as at
/// most [`MAX_LINE_LEN`] bytes and one, a page holds at most 16 MiB.
const PAGE_ROWS: i64 = 64;

/// `MAX_LINE_LEN + 1` for `substring(line for …)`: a line longer than a
/// line can be is read only that far, and the chain reader refuses it.
fn line_bound() -> i32 {
    i32::try_from(MAX_LINE_LEN.saturating_add(1)).unwrap_or(i32::MAX)
}

/// The audit log in the store's database.
pub(super) struct DbLog {
    db: Database,
    key: AuditRowKey,
    /// Every record from this sequence number on must carry a valid
    /// authenticator.
    authenticated_from: u64,
    target: PathBuf,
    state: Mutex<DbState>,
    committed: Condvar,
}

impl std::fmt::Debug for DbLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DbLog")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

struct Pending {
    ticket: u64,
    new: NewRecord,
    job: Option<JobContext>,
}

#[derive(Default)]
struct DbState {
    /// The last head this handle committed or read.
    head: Option<AuditHead>,
    queue: Vec<Pending>,
    next_ticket: u64,
    /// A thread is committing a batch now.
    committing: bool,
    results: HashMap<u64, Result<AuditAnchor, AuditError>>,
}

impl DbLog {
    /// Opens the log in `db`; with `anchor`, refuses one that does not hold
    /// the anchored record (see [`AuditLog::open_anchored`]).
    pub(super) fn open(
        db: Database,
        key: AuditRowKey,
        anchor: Option<&AuditAnchor>,
    ) -> Result<Self, AuditError> {
        let mut log = DbLog {
            target: PathBuf::from(db.target()),
            db,
            key,
            authenticated_from: 1,
            state: Mutex::new(DbState::default()),
            committed: Condvar::new(),
        };
        log.authenticated_from = log.authenticated_from()?;
        let head = log.read_head()?;
        log.lock().head = Some(head);
        if let Some(anchor) = anchor {
            log.check_anchor(anchor)?;
        }
        Ok(log)
    }

    pub(super) fn path(&self) -> &Path {
        &self.target
    }

    fn lock(&self) -> MutexGuard<'_, DbState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn error(&self, e: &postgres::Error) -> AuditError {
        AuditError::Unavailable {
            target: self.target.display().to_string(),
            source: io::Error::other(reason(e)),
        }
    }

    fn store_error(&self, e: &kluis_keystore::StoreError) -> AuditError {
        AuditError::Unavailable {
            target: self.target.display().to_string(),
            source: io::Error::other(e.to_string()),
        }
    }

    fn client(&self) -> Result<PooledClient, AuditError> {
        self.db.client().map_err(|e| self.store_error(&e))
    }

    /// The first sequence number whose record must carry an authenticator:
    /// the one after the head when authenticators began (migration 2; 1 on
    /// a store made since), or the first record that carries one, whichever
    /// is lower. The second bound does not depend on the migration's row,
    /// which the database's writers could change: once a verifier has
    /// written one authenticated record, no record after it is taken
    /// without one.
    fn authenticated_from(&self) -> Result<u64, AuditError> {
        let mut client = self.client()?;
        let row = client
            .query_one(
                "SELECT (SELECT through FROM kluis_audit_legacy), \
                        (SELECT min(seq) FROM kluis_audit WHERE mac IS NOT NULL)",
                &[],
            )
            .map_err(|e| self.error(&e))?;
        let through: Option<i64> = row.try_get(0).map_err(|e| self.error(&e))?;
        let first: Option<i64> = row.try_get(1).map_err(|e| self.error(&e))?;
        let through = through.and_then(|t| u64::try_from(t).ok()).ok_or_else(|| {
            AuditError::Failed(
                "the database's kluis_audit_legacy row is missing or negative: it was \
                     written outside Kluis"
                    .to_owned(),
            )
        })?;
        let first = first
            .and_then(|f| u64::try_from(f).ok())
            .unwrap_or(u64::MAX);
        Ok(through.saturating_add(1).min(first).max(1))
    }

    /// The head row.
    fn read_head(&self) -> Result<AuditHead, AuditError> {
        let mut client = self.client()?;
        let row = client
            .query_one("SELECT seq, hash FROM kluis_audit_head", &[])
            .map_err(|e| self.error(&e))?;
        self.head_from(
            row.try_get(0).map_err(|e| self.error(&e))?,
            row.try_get(1).map_err(|e| self.error(&e))?,
        )
    }

    fn head_from(&self, seq: i64, hash: Vec<u8>) -> Result<AuditHead, AuditError> {
        let broken = |problem: &str| AuditError::Failed(format!("the head row {problem}"));
        let seq = u64::try_from(seq).map_err(|_| broken("has a negative sequence number"))?;
        let hash: [u8; HASH_LEN] = hash
            .try_into()
            .map_err(|_| broken("has a hash of the wrong length"))?;
        Ok(AuditHead { seq, hash })
    }

    /// The last head this handle committed or read.
    pub(super) fn head(&self) -> AuditHead {
        self.lock().head.unwrap_or(AuditHead::GENESIS)
    }

    /// The current head (every committed record is durable), as an anchor.
    pub(super) fn durable_anchor(&self) -> AuditAnchor {
        let head = self.head();
        AuditAnchor {
            seq: head.seq,
            hash: head.hash,
            len: None,
        }
    }

    /// Checks that the log holds `anchor`'s record, unchanged.
    pub(super) fn check_anchor(&self, anchor: &AuditAnchor) -> Result<(), AuditError> {
        let head = self.snapshot()?;
        if head.seq < anchor.seq {
            return Err(AuditError::TruncatedTail {
                expected: anchor.head(),
                last: head,
            });
        }
        if anchor.seq == 0 {
            if anchor.hash != AuditHead::GENESIS.hash {
                return Err(AuditError::HeadMismatch {
                    expected: anchor.head(),
                    found: AuditHead::GENESIS,
                });
            }
            return Ok(());
        }
        let mut client = self.client()?;
        self.check_record_at(&mut *client, anchor.head())
    }

    /// Checks that the row at `head.seq` holds the record whose head is
    /// `head` (the genesis head needs no row).
    fn check_record_at(
        &self,
        client: &mut impl postgres::GenericClient,
        head: AuditHead,
    ) -> Result<(), AuditError> {
        if head.seq == 0 {
            if head.hash != AuditHead::GENESIS.hash {
                return Err(AuditError::HeadMismatch {
                    expected: head,
                    found: AuditHead::GENESIS,
                });
            }
            return Ok(());
        }
        let not_found = || AuditError::AnchorNotFound {
            expected: head,
            at: head.seq,
        };
        let seq = i64::try_from(head.seq).map_err(|_| not_found())?;
        let row = client
            .query_opt(
                "SELECT substring(line from 1 for $2), mac FROM kluis_audit WHERE seq = $1",
                &[&seq, &line_bound()],
            )
            .map_err(|e| self.error(&e))?
            .ok_or_else(not_found)?;
        let line: Vec<u8> = row.try_get(0).map_err(|e| self.error(&e))?;
        let mac: Option<Vec<u8>> = row.try_get(1).map_err(|e| self.error(&e))?;
        let record: AuditRecord = serde_json::from_slice(&line).map_err(|_| not_found())?;
        if record.head() != head {
            return Err(AuditError::HeadMismatch {
                expected: head,
                found: record.head(),
            });
        }
        if !authentic(
            &self.key,
            self.authenticated_from,
            head.seq,
            &line,
            mac.as_deref(),
        ) {
            return Err(AuditError::Unauthenticated { seq: head.seq });
        }
        Ok(())
    }

    /// Appends a record; returns once the transaction holding it committed.
    pub(super) fn append_job(
        &self,
        new: NewRecord,
        job: Option<JobContext>,
    ) -> Result<AuditAnchor, AuditError> {
        let mut st = self.lock();
        let ticket = st.next_ticket;
        st.next_ticket = st.next_ticket.wrapping_add(1);
        st.queue.push(Pending { ticket, new, job });
        loop {
            if let Some(result) = st.results.remove(&ticket) {
                return result;
            }
            if st.committing {
                st = self
                    .committed
                    .wait(st)
                    .unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            // Lead: commit what is queued (this thread's record among it).
            let take = st.queue.len().min(MAX_BATCH);
            let batch: Vec<Pending> = st.queue.drain(..take).collect();
            st.committing = true;
            drop(st);
            let tickets: Vec<u64> = batch.iter().map(|p| p.ticket).collect();
            let outcome = self.commit(batch);
            st = self.lock();
            st.committing = false;
            match outcome {
                Ok((head, results)) => {
                    st.head = Some(head);
                    st.results.extend(results);
                }
                Err(e) => {
                    for t in tickets {
                        st.results.insert(t, Err(e.again()));
                    }
                }
            }
            self.committed.notify_all();
        }
    }

    /// One transaction: lock the head row, seal `batch` onto it, insert,
    /// move the head. A record that cannot be sealed (too long) is answered
    /// with its error and takes no sequence number.
    #[allow(clippy::type_complexity)]
    fn commit(
        &self,
        batch: Vec<Pending>,
    ) -> Result<(AuditHead, Vec<(u64, Result<AuditAnchor, AuditError>)>), AuditError> {
        let mut client = self.client()?;
        let mut tx = client.transaction().map_err(|e| self.error(&e))?;
        let row = tx
            .query_one("SELECT seq, hash FROM kluis_audit_head FOR UPDATE", &[])
            .map_err(|e| self.error(&e))?;
        let start = self.head_from(
            row.try_get(0).map_err(|e| self.error(&e))?,
            row.try_get(1).map_err(|e| self.error(&e))?,
        )?;
        // The head row is only a pointer: new records are chained onto the
        // record it points at, never onto a hash written into it (by anyone
        // holding the database's credentials), which would break the chain
        // silently and let the audit anchor move past the break.
        self.check_record_at(&mut tx, start)?;
        let mut head = start;
        let mut seqs: Vec<i64> = Vec::with_capacity(batch.len());
        let mut lines: Vec<Vec<u8>> = Vec::with_capacity(batch.len());
        let mut macs: Vec<Vec<u8>> = Vec::with_capacity(batch.len());
        let mut results = Vec::with_capacity(batch.len());
        for Pending { ticket, new, job } in batch {
            let result = (|| {
                validate_new(&new)?;
                if let Some(job) = &job {
                    validate_job(job)?;
                }
                let (record, line) = AuditRecord::next_line(new, job, head)?;
                let seq_sql = i64::try_from(record.seq).map_err(|_| {
                    AuditError::Failed("the sequence number is exhausted".to_owned())
                })?;
                Ok((record.head(), seq_sql, line))
            })();
            match result {
                Ok((new_head, seq_sql, line)) => {
                    head = new_head;
                    seqs.push(seq_sql);
                    macs.push(self.key.tag(new_head.seq, &line).to_vec());
                    lines.push(line);
                    results.push((
                        ticket,
                        Ok(AuditAnchor {
                            seq: new_head.seq,
                            hash: new_head.hash,
                            len: None,
                        }),
                    ));
                }
                Err(e) => results.push((ticket, Err(e))),
            }
        }
        if head != start {
            tx.execute(
                "INSERT INTO kluis_audit (seq, line, mac) \
                 SELECT * FROM unnest($1::bigint[], $2::bytea[], $3::bytea[])",
                &[&seqs, &lines, &macs],
            )
            .map_err(|e| self.error(&e))?;
            let seq = i64::try_from(head.seq)
                .map_err(|_| AuditError::Failed("the sequence number is exhausted".to_owned()))?;
            tx.execute(
                "UPDATE kluis_audit_head SET seq = $1, hash = $2",
                &[&seq, &head.hash.as_slice()],
            )
            .map_err(|e| self.error(&e))?;
        }
        tx.commit().map_err(|e| self.error(&e))?;
        Ok((head, results))
    }

    /// The current head row (and remembers it).
    pub(super) fn snapshot(&self) -> Result<AuditHead, AuditError> {
        let head = self.read_head()?;
        let mut st = self.lock();
        if st.head.is_none_or(|known| known.seq <= head.seq) {
            st.head = Some(head);
        }
        Ok(head)
    }

    /// A reader of the lines of records `after + 1 ..= through`.
    pub(super) fn reader(
        &self,
        after: u64,
        through: u64,
    ) -> Result<BufReader<DbLines>, AuditError> {
        Ok(BufReader::with_capacity(
            TAIL_CHUNK,
            DbLines {
                client: self.client()?,
                key: self.key.clone(),
                authenticated_from: self.authenticated_from,
                next: after.saturating_add(1),
                through,
                buf: Vec::new(),
                pos: 0,
            },
        ))
    }
}

/// Whether the row of record `seq` holding `line` may be taken under
/// `key`: it carries a valid authenticator, or comes from before
/// `authenticated_from`, when they began.
fn authentic(
    key: &AuditRowKey,
    authenticated_from: u64,
    seq: u64,
    line: &[u8],
    mac: Option<&[u8]>,
) -> bool {
    seq < authenticated_from || mac.is_some_and(|mac| key.verify(seq, line, mac))
}

/// The records of the database log as the lines of a log file, read a page
/// of rows at a time. A gap in the sequence numbers ends the lines there, so
/// the chain check reports what follows as broken or the tail as missing. A
/// row without a valid authenticator (where one is due) is an error: what
/// it holds was not written by a verifier of this store.
pub(super) struct DbLines {
    client: PooledClient,
    key: AuditRowKey,
    authenticated_from: u64,
    next: u64,
    through: u64,
    buf: Vec<u8>,
    pos: usize,
}

impl DbLines {
    fn fill(&mut self) -> io::Result<()> {
        self.buf.clear();
        self.pos = 0;
        if self.next > self.through {
            return Ok(());
        }
        let from = i64::try_from(self.next).map_err(io::Error::other)?;
        let through = i64::try_from(self.through).map_err(io::Error::other)?;
        let rows = self
            .client
            .query(
                "SELECT seq, substring(line from 1 for $4), mac FROM kluis_audit \
                 WHERE seq >= $1 AND seq <= $2 ORDER BY seq LIMIT $3",
                &[&from, &through, &PAGE_ROWS, &line_bound()],
            )
            .map_err(|e| io::Error::other(reason(&e)))?;
        for row in rows {
            let seq: i64 = row.try_get(0).map_err(|e| io::Error::other(reason(&e)))?;
            if u64::try_from(seq).ok() != Some(self.next) {
                // A missing row: stop here.
                self.through = 0;
                break;
            }
            let line: Vec<u8> = row.try_get(1).map_err(|e| io::Error::other(reason(&e)))?;
            let mac: Option<Vec<u8>> = row.try_get(2).map_err(|e| io::Error::other(reason(&e)))?;
            // One row is one line: a row holding a newline would be read as
            // several records, of which only the first is its own.
            if line.contains(&b'\n') {
                return Err(io::Error::other(format!(
                    "audit record {} in the database spans several lines: it was not written \
                     by a verifier",
                    self.next
                )));
            }
            // Its bytes are authenticated before anything parses them.
            if !authentic(
                &self.key,
                self.authenticated_from,
                self.next,
                &line,
                mac.as_deref(),
            ) {
                return Err(io::Error::other(AuditError::Unauthenticated {
                    seq: self.next,
                }));
            }
            self.buf.extend_from_slice(&line);
            self.buf.push(b'\n');
            self.next = self.next.saturating_add(1);
        }
        if self.buf.is_empty() {
            self.through = 0;
        }
        Ok(())
    }
}

impl Read for DbLines {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.buf.len() {
            self.fill()?;
        }
        let available = self.buf.get(self.pos..).unwrap_or_default();
        let n = available.len().min(out.len());
        if let (Some(dst), Some(src)) = (out.get_mut(..n), available.get(..n)) {
            dst.copy_from_slice(src);
        }
        self.pos = self.pos.saturating_add(n);
        Ok(n)
    }
}
