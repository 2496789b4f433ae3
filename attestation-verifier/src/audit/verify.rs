//! Reading and verifying a log offline, record by record.

#[allow(unused_imports)]
use super::*;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

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

pub(super) fn verify_chain(
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

pub(super) fn records_from_reader(
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

/// Calls `f` with each record of the log file at `path`, in order, checking
/// the chain as it reads, until `f` returns `false`. See [`AuditLog::scan`].
pub fn scan_file(
    path: impl AsRef<Path>,
    f: impl FnMut(&AuditRecord) -> bool,
) -> Result<(), AuditError> {
    let path = path.as_ref();
    let file = File::open(path).map_err(|e| AuditError::io(path, e))?;
    scan_from_reader(BufReader::with_capacity(TAIL_CHUNK, file), path, f)
}

pub(super) fn scan_from_reader(
    reader: impl BufRead,
    source: &Path,
    mut f: impl FnMut(&AuditRecord) -> bool,
) -> Result<(), AuditError> {
    let mut chain = ChainReader::new(reader, source);
    while let Some(record) = chain.next_record()? {
        if !f(&record) {
            break;
        }
    }
    Ok(())
}

/// Reads records one line at a time (never more than [`MAX_LINE_LEN`] + 1
/// bytes in memory) and checks each link of the chain.
pub(super) struct ChainReader<'a, R> {
    reader: R,
    source: &'a Path,
    /// Bytes of complete lines read.
    pub(super) consumed: u64,
    line_no: u64,
    pub(super) head: AuditHead,
    pub(super) buf: Vec<u8>,
    canonical: Vec<u8>,
}

impl<'a, R: BufRead> ChainReader<'a, R> {
    fn new(reader: R, source: &'a Path) -> Self {
        Self::resume(reader, source, AuditHead::GENESIS)
    }

    /// Continues a chain whose last record is `head` (on line `head.seq`).
    pub(super) fn resume(reader: R, source: &'a Path, head: AuditHead) -> Self {
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

    pub(super) fn next_record(&mut self) -> Result<Option<AuditRecord>, AuditError> {
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
pub(super) fn check_line(
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
pub(super) fn check_self(
    line: &[u8],
    record: &AuditRecord,
    canonical: &mut Vec<u8>,
) -> Result<(), Problem> {
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
