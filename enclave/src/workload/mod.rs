//! Workloads: what a job does to the plaintext, inside the enclave.
//!
//! In-process workloads implement [`Workload`]: they see batches of whole
//! records (newline-terminated; the last record of a stream may lack its
//! newline) and append their output to a zeroizing buffer. The job runner
//! does the framing, so a workload never sees a record cut in two and never
//! holds more than one batch. `exec` workloads run a program from the image
//! instead (see [`crate::exec`]).
//!
//! Built-ins:
//! - [`Identity`]: records out as they came in (the benchmark's workload).
//! - [`Reencrypt`]: the bytes unchanged under a fresh data key: data-key
//!   rotation without touching content.
//! - [`Pseudonymise`]: one column replaced by HMAC-SHA256 under a secret the
//!   verifier releases (hex, 64 characters): the same person gets the same
//!   pseudonym within one secret, and nobody without the secret can link a
//!   pseudonym to a national register number (a dictionary attack over the
//!   ~10^11 numbers needs the key).
//! - [`Aggregate`]: count (and sum a column) per value of a column.

use kluis_proto::job::WorkloadSpec;

mod aggregate;
mod framer;
mod pseudonymise;

pub use aggregate::Aggregate;
pub use framer::RecordFramer;
pub use pseudonymise::{check_national_number, Pseudonymise};

/// Longest record accepted (bytes, newline included).
pub const MAX_RECORD_LEN: usize = 1024 * 1024;
/// Most distinct groups an [`Aggregate`] keeps.
pub const MAX_GROUPS: usize = 1_000_000;

/// Records read and written by one call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Records consumed.
    pub records_in: u64,
    /// Records produced.
    pub records_out: u64,
}

impl Counts {
    /// Add `other` to these counts.
    pub fn add(&mut self, other: Counts) {
        self.records_in = self.records_in.saturating_add(other.records_in);
        self.records_out = self.records_out.saturating_add(other.records_out);
    }
}

/// Why a workload refused its input. Messages name positions and rules,
/// never record contents.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WorkloadError {
    /// A record has fewer columns than the workload needs.
    #[error("record {record}: no column {column} (the record has {found} column(s))")]
    MissingColumn {
        /// Record number (1-based, header included).
        record: u64,
        /// The column asked for.
        column: u32,
        /// Columns present.
        found: usize,
    },
    /// A value is not a valid national register number.
    #[error("record {record}: column {column} is not a valid national register number ({why})")]
    NotANationalNumber {
        /// Record number (1-based).
        record: u64,
        /// The column.
        column: u32,
        /// Which rule failed (length, digits, check digits).
        why: &'static str,
    },
    /// A value to sum is not an integer.
    #[error("record {record}: column {column} is not an integer")]
    NotAnInteger {
        /// Record number (1-based).
        record: u64,
        /// The column.
        column: u32,
    },
    /// A sum left the range of 128-bit integers.
    #[error("the sum of column {column} overflowed")]
    Overflow {
        /// The column.
        column: u32,
    },
    /// More groups than [`MAX_GROUPS`], or more than [`MAX_GROUP_BYTES`] of
    /// group values.
    #[error("more than {limit} groups, or more than 64 MiB of group values")]
    TooManyGroups {
        /// The limit.
        limit: usize,
    },
    /// A record longer than [`MAX_RECORD_LEN`].
    #[error("a record longer than {limit} bytes")]
    RecordTooLong {
        /// The limit.
        limit: usize,
    },
    /// A field holds a quote: quoted CSV is not parsed, so the field
    /// boundaries could be wrong (and a value could escape pseudonymisation).
    #[error("record {record}: a quoted field")]
    QuotedField {
        /// Record number (1-based).
        record: u64,
    },
    /// The job's parameters are unusable.
    #[error("bad workload parameters: {0}")]
    BadParameters(String),
}

impl WorkloadError {
    /// A stable name (for the enclave's debug log; the parent is told less).
    pub fn kind(&self) -> &'static str {
        match self {
            WorkloadError::MissingColumn { .. } => "missing_column",
            WorkloadError::NotANationalNumber { .. } => "not_a_national_number",
            WorkloadError::NotAnInteger { .. } => "not_an_integer",
            WorkloadError::Overflow { .. } => "overflow",
            WorkloadError::TooManyGroups { .. } => "too_many_groups",
            WorkloadError::RecordTooLong { .. } => "record_too_long",
            WorkloadError::QuotedField { .. } => "quoted_field",
            WorkloadError::BadParameters(_) => "bad_parameters",
        }
    }
}

/// Largest column number a job may name.
pub const MAX_COLUMN: u32 = 4096;
/// Most bytes of group values an [`Aggregate`] keeps.
pub const MAX_GROUP_BYTES: usize = 64 * 1024 * 1024;

/// Whether the workload's success can depend on the plaintext (so that its
/// failure bit tells something about the data). `identity` and `reencrypt`
/// fail only on an input the parent damaged, which it knows anyway.
pub fn fails_on_data(spec: &WorkloadSpec) -> bool {
    match spec {
        WorkloadSpec::Identity | WorkloadSpec::Reencrypt => false,
        // Pseudonymise, aggregate, exec, and anything added later: assume
        // the worst.
        _ => true,
    }
}

/// Check a workload's parameters before any key is asked for.
pub fn check_spec(spec: &WorkloadSpec, secrets: usize) -> Result<(), WorkloadError> {
    let delimiter = |d: u8| {
        if d == b'\n' || d == b'\r' || d == b'"' || !d.is_ascii() {
            Err(WorkloadError::BadParameters(
                "the delimiter must be one ASCII character other than CR, LF or '\"'".to_owned(),
            ))
        } else {
            Ok(())
        }
    };
    let column = |c: u32| {
        if c > MAX_COLUMN {
            Err(WorkloadError::BadParameters(format!(
                "column {c} is beyond {MAX_COLUMN}"
            )))
        } else {
            Ok(())
        }
    };
    // Every secret a job brings is released to the enclave (and audited as
    // released): a job may bring only the secrets its workload uses.
    let no_secrets = || {
        if secrets == 0 {
            Ok(())
        } else {
            Err(WorkloadError::BadParameters(format!(
                "{} uses no secret, {secrets} given",
                spec.name()
            )))
        }
    };
    match spec {
        WorkloadSpec::Identity | WorkloadSpec::Reencrypt | WorkloadSpec::Exec { .. } => {
            no_secrets()
        }
        WorkloadSpec::Pseudonymise {
            column: c,
            delimiter: d,
            secret,
            ..
        } => {
            column(*c)?;
            delimiter(*d)?;
            if usize::try_from(*secret).map_or(true, |s| s >= secrets) {
                return Err(WorkloadError::BadParameters(format!(
                    "secret {secret} named, {secrets} given"
                )));
            }
            if secrets != 1 {
                return Err(WorkloadError::BadParameters(format!(
                    "pseudonymise uses one secret, {secrets} given"
                )));
            }
            Ok(())
        }
        WorkloadSpec::Aggregate {
            by,
            sum,
            delimiter: d,
            ..
        } => {
            column(*by)?;
            if let Some(s) = sum {
                column(*s)?;
            }
            delimiter(*d)?;
            no_secrets()
        }
        _ => Err(WorkloadError::BadParameters(
            "a workload this enclave does not know".to_owned(),
        )),
    }
}

/// An in-process workload.
pub trait Workload: Send {
    /// Process `batch`, whole records only, appending output to `out`.
    fn process(&mut self, batch: &[u8], out: &mut Vec<u8>) -> Result<Counts, WorkloadError>;

    /// The input is complete: append any final output.
    fn finish(&mut self, out: &mut Vec<u8>) -> Result<Counts, WorkloadError> {
        let _ = out;
        Ok(Counts::default())
    }

    /// Whether the output is the input, byte for byte: the job runner then
    /// skips record framing and copying and only counts records.
    fn is_passthrough(&self) -> bool {
        false
    }
}

/// Newlines in `bytes` (a loop the compiler vectorises; record counting
/// runs over every byte of a job).
pub fn count_newlines(bytes: &[u8]) -> u64 {
    // Byte-wide counters over blocks of at most 255 bytes cannot overflow,
    // and compile to 16 or 32 bytes per instruction.
    bytes
        .chunks(255)
        .map(|block| {
            let n = block
                .iter()
                .fold(0u8, |acc, b| acc.wrapping_add(u8::from(*b == b'\n')));
            u64::from(n)
        })
        .fold(0u64, u64::saturating_add)
}

pub(crate) fn count_records(batch: &[u8]) -> u64 {
    let newlines = count_newlines(batch);
    let unterminated = !batch.is_empty() && batch.last() != Some(&b'\n');
    newlines.saturating_add(u64::from(unterminated))
}

/// Records out as they came in.
#[derive(Debug, Default)]
pub struct Identity;

impl Workload for Identity {
    fn process(&mut self, batch: &[u8], out: &mut Vec<u8>) -> Result<Counts, WorkloadError> {
        out.extend_from_slice(batch);
        let n = count_records(batch);
        Ok(Counts {
            records_in: n,
            records_out: n,
        })
    }

    fn is_passthrough(&self) -> bool {
        true
    }
}

/// The bytes unchanged (under the job's fresh output key): data-key rotation.
#[derive(Debug, Default)]
pub struct Reencrypt;

impl Workload for Reencrypt {
    fn process(&mut self, batch: &[u8], out: &mut Vec<u8>) -> Result<Counts, WorkloadError> {
        Identity.process(batch, out)
    }

    fn is_passthrough(&self) -> bool {
        true
    }
}

/// Split `batch` into records: each with its newline, if it had one.
pub(crate) fn records(batch: &[u8]) -> impl Iterator<Item = &[u8]> {
    batch.split_inclusive(|b| *b == b'\n')
}

/// `record` without its line ending (`\n` or `\r\n`), and the ending.
pub(crate) fn split_ending(record: &[u8]) -> (&[u8], &[u8]) {
    let cut = if record.ends_with(b"\r\n") {
        2
    } else if record.ends_with(b"\n") {
        1
    } else {
        0
    };
    record.split_at(record.len().saturating_sub(cut))
}

/// Secrets a workload may use, in the job's order.
pub type Secrets<'a> = &'a [kluis_proto::PlaintextKey];

/// Build the in-process workload for `spec` (`exec` is not in-process: `None`).
pub fn build(
    spec: &WorkloadSpec,
    secrets: Secrets<'_>,
) -> Result<Option<Box<dyn Workload>>, WorkloadError> {
    check_spec(spec, secrets.len())?;
    let check_delimiter = |d: u8| {
        if d == b'\n' || d == b'\r' || !d.is_ascii() {
            Err(WorkloadError::BadParameters(
                "the delimiter must be one ASCII character other than CR or LF".to_owned(),
            ))
        } else {
            Ok(d)
        }
    };
    Ok(Some(match spec {
        WorkloadSpec::Identity => Box::new(Identity),
        WorkloadSpec::Reencrypt => Box::new(Reencrypt),
        WorkloadSpec::Pseudonymise {
            column,
            delimiter,
            secret,
            header,
            check_national_number,
        } => {
            let index = usize::try_from(*secret).unwrap_or(usize::MAX);
            let key = secrets.get(index).ok_or_else(|| {
                WorkloadError::BadParameters(format!(
                    "secret {secret} named, {} given",
                    secrets.len()
                ))
            })?;
            Box::new(Pseudonymise::new(
                key.expose_secret(),
                *column,
                check_delimiter(*delimiter)?,
                *header,
                *check_national_number,
            ))
        }
        WorkloadSpec::Aggregate {
            by,
            sum,
            delimiter,
            header,
        } => Box::new(Aggregate::new(
            *by,
            *sum,
            check_delimiter(*delimiter)?,
            *header,
        )),
        WorkloadSpec::Exec { .. } => return Ok(None),
        _ => {
            return Err(WorkloadError::BadParameters(
                "a workload this enclave does not know".to_owned(),
            ))
        }
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use aws_lc_rs::hmac;

    fn run(w: &mut dyn Workload, input: &[u8], chunk: usize) -> (Vec<u8>, Counts) {
        let mut framer = RecordFramer::default();
        let mut out = Vec::new();
        let mut total = Counts::default();
        for piece in input.chunks(chunk.max(1)) {
            framer
                .feed(piece, |batch| {
                    total.add(w.process(batch, &mut out)?);
                    Ok(())
                })
                .unwrap();
        }
        framer
            .finish(|batch| {
                total.add(w.process(batch, &mut out)?);
                Ok(())
            })
            .unwrap();
        total.add(w.finish(&mut out).unwrap());
        (out, total)
    }

    #[test]
    fn identity_is_exact_for_any_chunking() {
        let input = b"a,1\nbb,2\r\n\nlast-without-newline";
        for chunk in [1, 2, 3, 7, 100] {
            let (out, counts) = run(&mut Identity, input, chunk);
            assert_eq!(out, input, "chunk {chunk}");
            assert_eq!(counts.records_in, 4);
            assert_eq!(counts.records_out, 4);
        }
    }

    #[test]
    fn newline_counting_matches_a_plain_count() {
        for len in [0usize, 1, 254, 255, 256, 511, 4096, 100_000] {
            let bytes: Vec<u8> = (0..len)
                .map(|i| if i % 7 == 0 { b'\n' } else { b'x' })
                .collect();
            let plain = bytes.iter().filter(|b| **b == b'\n').count() as u64;
            assert_eq!(count_newlines(&bytes), plain, "len {len}");
        }
        assert_eq!(count_newlines(&[b'\n'; 1000]), 1000);
    }

    #[test]
    fn national_numbers_check() {
        // 85.07.30-033.28: 850730033 mod 97 = 69, 97 - 69 = 28.
        assert_eq!(check_national_number(b"85.07.30-033.28"), Ok(()));
        assert_eq!(check_national_number(b"85073003328"), Ok(()));
        // Born in 2000 or later: check digits over 2 followed by the nine digits.
        let base = 10_203_045u64; // 01.02.03-045 -> 010203045
        let check = 97 - (2_000_000_000 + base) % 97;
        let text = format!("{base:09}{check:02}");
        assert_eq!(check_national_number(text.as_bytes()), Ok(()));
        assert_eq!(
            check_national_number(b"85073003329"),
            Err("wrong check digits")
        );
        assert_eq!(
            check_national_number(b"8507300332"),
            Err("fewer than 11 digits")
        );
        assert!(check_national_number(b"8507300332x").is_err());
        assert_eq!(
            check_national_number(b"850730033281"),
            Err("more than 11 digits")
        );
    }

    #[test]
    fn pseudonymise_replaces_only_its_column_and_is_deterministic() {
        let input = b"nrn,town\n85073003328,Gent\n85073003328,Luik\n";
        let mut w = Pseudonymise::new(&[9u8; 32], 0, b',', true, true);
        let (out, counts) = run(&mut w, input, 5);
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "nrn,town");
        let p1 = lines[1].split(',').next().unwrap();
        let p2 = lines[2].split(',').next().unwrap();
        assert_eq!(p1.len(), 64);
        assert_eq!(p1, p2, "same person, same pseudonym");
        assert!(lines[1].ends_with(",Gent") && lines[2].ends_with(",Luik"));
        assert!(!text.contains("85073003328"));
        let expected = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, &[9u8; 32]),
            b"85073003328",
        );
        assert_eq!(p1, hex::encode(expected.as_ref()));
        assert_eq!(counts.records_out, 3);

        // Another secret: unrelated pseudonyms.
        let mut other = Pseudonymise::new(&[8u8; 32], 0, b',', true, true);
        let (out2, _) = run(&mut other, input, 64);
        assert_ne!(String::from_utf8(out2).unwrap(), text);
    }

    #[test]
    fn pseudonymise_refuses_bad_numbers_and_missing_columns() {
        let mut w = Pseudonymise::new(&[1u8; 32], 0, b',', false, true);
        let err = w.process(b"85073003329,x\n", &mut Vec::new()).unwrap_err();
        assert!(matches!(
            err,
            WorkloadError::NotANationalNumber { record: 1, .. }
        ));
        let mut w = Pseudonymise::new(&[1u8; 32], 3, b',', false, false);
        let err = w.process(b"a,b\n", &mut Vec::new()).unwrap_err();
        assert_eq!(
            err,
            WorkloadError::MissingColumn {
                record: 1,
                column: 3,
                found: 2
            }
        );
        // No record content in the message.
        assert!(!err.to_string().contains("a,b"));
    }

    #[test]
    fn aggregate_counts_and_sums_by_group() {
        let input = b"town;amount\nGent;10\nLuik;5\nGent;-3\nAalst;7";
        let mut w = Aggregate::new(0, Some(1), b';', true);
        let (out, counts) = run(&mut w, input, 4);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "group;count;sum_of_column_1\nAalst;1;7\nGent;2;7\nLuik;1;5\n"
        );
        assert_eq!(counts.records_in, 5);
        assert_eq!(counts.records_out, 4);
        let mut w = Aggregate::new(0, Some(1), b';', false);
        let err = w.process(b"Gent;ten\n", &mut Vec::new()).unwrap_err();
        assert!(matches!(
            err,
            WorkloadError::NotAnInteger {
                record: 1,
                column: 1
            }
        ));
    }

    #[test]
    fn pseudonymise_normalises_numbers_keeps_blank_lines_and_refuses_quotes() {
        let mut w = Pseudonymise::new(&[9u8; 32], 0, b',', false, true);
        let (out, _) = run(&mut w, b"85.07.30-033.28,a\n\n85073003328,b\r\n", 3);
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.split('\n').collect();
        assert_eq!(lines[1], "", "a blank line stays blank");
        assert_eq!(lines[0][..64], lines[2][..64], "one person, one pseudonym");
        assert!(lines[2].ends_with(",b\r"));
        let mut w = Pseudonymise::new(&[9u8; 32], 1, b',', false, false);
        let err = w
            .process(b"\"Doe, John\",85073003328\n", &mut Vec::new())
            .unwrap_err();
        assert_eq!(err, WorkloadError::QuotedField { record: 1 });
        // Without the check, surrounding spaces do not change the pseudonym.
        let mut a = Vec::new();
        let mut b = Vec::new();
        Pseudonymise::new(&[1u8; 32], 0, b',', false, false)
            .process(b" x ,1\n", &mut a)
            .unwrap();
        Pseudonymise::new(&[1u8; 32], 0, b',', false, false)
            .process(b"x,1\n", &mut b)
            .unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn specs_are_checked_before_keys() {
        let p = |column, delimiter, secret| WorkloadSpec::Pseudonymise {
            column,
            delimiter,
            secret,
            header: false,
            check_national_number: false,
        };
        assert!(check_spec(&p(0, b',', 0), 1).is_ok());
        assert!(check_spec(&p(0, b',', 1), 1).is_err());
        assert!(check_spec(&p(MAX_COLUMN + 1, b',', 0), 1).is_err());
        assert!(check_spec(&p(0, b'"', 0), 1).is_err());
        assert!(check_spec(&WorkloadSpec::Identity, 0).is_ok());
        // Secrets the workload would not use are never asked for.
        assert!(check_spec(&p(0, b',', 0), 2).is_err());
        assert!(check_spec(&p(0, b',', 0), 0).is_err());
        for spec in [
            WorkloadSpec::Identity,
            WorkloadSpec::Reencrypt,
            WorkloadSpec::Exec {
                program: "upper".into(),
                args: vec![],
            },
            WorkloadSpec::Aggregate {
                by: 0,
                sum: None,
                delimiter: b',',
                header: false,
            },
        ] {
            assert!(check_spec(&spec, 0).is_ok(), "{spec:?}");
            assert!(check_spec(&spec, 1).is_err(), "{spec:?}");
        }
    }

    #[test]
    fn framer_bounds_records() {
        let mut framer = RecordFramer::default();
        let big = vec![b'x'; MAX_RECORD_LEN + 1];
        let err = framer.feed(&big, |_| Ok(())).unwrap_err();
        assert_eq!(
            err,
            WorkloadError::RecordTooLong {
                limit: MAX_RECORD_LEN
            }
        );
    }

    #[test]
    fn build_checks_parameters() {
        let spec = WorkloadSpec::Pseudonymise {
            column: 0,
            delimiter: b',',
            secret: 1,
            header: false,
            check_national_number: false,
        };
        assert!(matches!(
            build(&spec, &[]),
            Err(WorkloadError::BadParameters(_))
        ));
        let spec = WorkloadSpec::Aggregate {
            by: 0,
            sum: None,
            delimiter: b'\n',
            header: false,
        };
        assert!(build(&spec, &[]).is_err());
        assert!(build(&WorkloadSpec::Identity, &[]).unwrap().is_some());
    }
}
