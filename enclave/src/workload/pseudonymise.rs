//! `pseudonymise`: one column replaced by a keyed hash, and the Belgian
//! national register number check.

use aws_lc_rs::hmac;
use zeroize::Zeroizing;

use super::{records, split_ending, Counts, Workload, WorkloadError};

/// Replace column `column` by HMAC-SHA256(secret, value) in lowercase hex.
pub struct Pseudonymise {
    key: hmac::Key,
    column: u32,
    delimiter: u8,
    skip_header: bool,
    check_national_number: bool,
    seen: u64,
}

impl std::fmt::Debug for Pseudonymise {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pseudonymise")
            .field("key", &"[redacted]")
            .field("column", &self.column)
            .finish_non_exhaustive()
    }
}

impl Pseudonymise {
    /// A pseudonymiser keyed by `secret` (AWS-LC cleanses the key schedule
    /// when it is dropped).
    pub fn new(
        secret: &[u8],
        column: u32,
        delimiter: u8,
        skip_header: bool,
        check_national_number: bool,
    ) -> Self {
        Pseudonymise {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
            column,
            delimiter,
            skip_header,
            check_national_number,
            seen: 0,
        }
    }
}

/// Check a Belgian national register number (rijksregisternummer /
/// numéro de registre national): 11 digits after removing `.`, `-` and
/// spaces; the last two are 97 minus the first nine taken as a number, mod
/// 97 — with a `2` prefixed for people born in or after 2000.
pub fn check_national_number(value: &[u8]) -> Result<(), &'static str> {
    let mut digits = [0u8; 11];
    let mut n = 0usize;
    for &b in value {
        match b {
            b'.' | b'-' | b' ' => {}
            b'0'..=b'9' => {
                let slot = digits.get_mut(n).ok_or("more than 11 digits")?;
                *slot = b.wrapping_sub(b'0');
                n = n.saturating_add(1);
            }
            _ => return Err("a character other than digits, '.', '-' or ' '"),
        }
    }
    if n != 11 {
        return Err("fewer than 11 digits");
    }
    let mut base: u64 = 0;
    for d in digits.iter().take(9) {
        base = base.saturating_mul(10).saturating_add(u64::from(*d));
    }
    let check = digits.iter().skip(9).fold(0u64, |acc, d| {
        acc.saturating_mul(10).saturating_add(u64::from(*d))
    });
    let expected_1900 = 97u64.saturating_sub(base % 97);
    let expected_2000 = 97u64.saturating_sub((2_000_000_000u64.saturating_add(base)) % 97);
    if check == expected_1900 || check == expected_2000 {
        Ok(())
    } else {
        Err("wrong check digits")
    }
}

impl Workload for Pseudonymise {
    fn process(&mut self, batch: &[u8], out: &mut Vec<u8>) -> Result<Counts, WorkloadError> {
        let mut counts = Counts::default();
        let column = usize::try_from(self.column).unwrap_or(usize::MAX);
        for record in records(batch) {
            self.seen = self.seen.saturating_add(1);
            counts.records_in = counts.records_in.saturating_add(1);
            counts.records_out = counts.records_out.saturating_add(1);
            if self.skip_header && self.seen == 1 {
                out.extend_from_slice(record);
                continue;
            }
            let (body, ending) = split_ending(record);
            if body.is_empty() {
                // A blank line stays blank.
                out.extend_from_slice(record);
                continue;
            }
            if body.contains(&b'"') {
                return Err(WorkloadError::QuotedField { record: self.seen });
            }
            let fields = body.split(|b| *b == self.delimiter).count();
            if column >= fields {
                return Err(WorkloadError::MissingColumn {
                    record: self.seen,
                    column: self.column,
                    found: fields,
                });
            }
            for (i, field) in body.split(|b| *b == self.delimiter).enumerate() {
                if i > 0 {
                    out.push(self.delimiter);
                }
                if i == column {
                    // With the check, the 11 digits are hashed, so
                    // `85.07.30-033.28` and `85073003328` are one person.
                    let mut digits = Zeroizing::new([0u8; 11]);
                    let value: &[u8] = if self.check_national_number {
                        check_national_number(field).map_err(|why| {
                            WorkloadError::NotANationalNumber {
                                record: self.seen,
                                column: self.column,
                                why,
                            }
                        })?;
                        for (slot, d) in digits
                            .iter_mut()
                            .zip(field.iter().filter(|b| b.is_ascii_digit()))
                        {
                            *slot = *d;
                        }
                        digits.as_slice()
                    } else {
                        field.trim_ascii()
                    };
                    let tag = hmac::sign(&self.key, value);
                    let mut hexed = Zeroizing::new([0u8; 64]);
                    hex::encode_to_slice(tag.as_ref(), hexed.as_mut_slice()).map_err(|_| {
                        WorkloadError::BadParameters("pseudonym encoding".to_owned())
                    })?;
                    out.extend_from_slice(hexed.as_slice());
                } else {
                    out.extend_from_slice(field);
                }
            }
            out.extend_from_slice(ending);
        }
        Ok(counts)
    }
}
