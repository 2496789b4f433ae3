//! The live log: open, anchor checks, appends with group commit, tail recovery.

#[allow(unused_imports)]
use super::*;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

/// The audit log in a file (see [`AuditLog`], which dispatches to it).
#[derive(Debug)]
pub(super) struct FileLog {
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
pub(super) struct State {
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

impl FileLog {
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
    ) -> Result<FileLog, AuditError> {
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
        Ok(FileLog {
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

    /// [`AuditLog::append_anchor`] for a record of a job run under a job
    /// authorisation (`job`: its id, purpose and case reference).
    pub fn append_job(
        &self,
        new: NewRecord,
        job: Option<JobContext>,
    ) -> Result<AuditAnchor, AuditError> {
        validate_new(&new)?;
        if let Some(job) = &job {
            validate_job(job)?;
        }
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
        let (record, mut line) = AuditRecord::next_line(new, job, st.head)?;
        let seq = record.seq;
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

    /// Calls `f` with each record in order, checking the chain as it reads,
    /// until `f` returns `false` or the records written before the call
    /// end. One record in memory at a time (the Merkle tree over the log is
    /// computed this way, see [`crate::evidence`]).
    pub fn scan(&self, f: impl FnMut(&AuditRecord) -> bool) -> Result<(), AuditError> {
        let (_, len) = self.snapshot()?;
        scan_from_reader(self.reader(len), &self.path, f)
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
        self.check_anchor(from)?;
        let (_, len) = self.snapshot()?;
        let start = from.len.ok_or(AuditError::AnchorNotFound {
            expected: from.head(),
            at: 0,
        })?;
        let reader = BufReader::with_capacity(
            TAIL_CHUNK,
            PositionalReader {
                file: &self.file,
                pos: start,
                end: len,
            },
        );
        let mut chain = ChainReader::resume(reader, &self.path, from.head());
        while let Some(record) = chain.next_record()? {
            f(&record);
        }
        Ok(AuditAnchor {
            seq: chain.head.seq,
            hash: chain.head.hash,
            len: Some(start.saturating_add(chain.consumed)),
        })
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

/// Opens the log file, refusing a symbolic link (checked before the open,
/// and after it by device and inode, so a link swapped in meanwhile is
/// refused too) and anything but a regular file.
pub(super) fn open_or_create(path: &Path) -> Result<(File, bool), AuditError> {
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
pub(super) fn check_continues(
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

pub(super) fn sync_parent_dir(path: &Path) -> Result<(), AuditError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(|e| AuditError::io(parent, e))
}

pub(super) enum TailError {
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
pub(super) fn read_tail(file: &File, file_len: u64) -> Result<(AuditHead, u64), TailError> {
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
pub(super) fn rfind_newline(file: &File, before: u64, floor: u64) -> io::Result<Option<u64>> {
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
pub(super) fn looks_like_torn_record(torn: &[u8]) -> bool {
    const START: &[u8] = b"{\"seq\":";
    torn.starts_with(START) || START.starts_with(torn) || torn.iter().all(|&b| b == 0)
}

/// The error for a file whose tail is not sound: a full read finds the first
/// broken record.
pub(super) fn locate_break(file: &File, file_len: u64, path: &Path) -> AuditError {
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
pub(super) struct FileLock<'a>(&'a File);

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
pub(super) struct PositionalReader<'a> {
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
