//! `aggregate`: counts (and sums) per value of a column, bounded.

use std::collections::BTreeMap;

use zeroize::{Zeroize, Zeroizing};

use super::{records, split_ending, Counts, Workload, WorkloadError, MAX_GROUPS, MAX_GROUP_BYTES};

/// A group key: plaintext, so zeroized when dropped and never printed.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct GroupKey(Vec<u8>);

impl Drop for GroupKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// Count records, and optionally sum an integer column, per value of a
/// column. Output: `value<delim>count[<delim>sum]` lines sorted by value,
/// after a header line naming the columns.
pub struct Aggregate {
    by: u32,
    sum: Option<u32>,
    delimiter: u8,
    skip_header: bool,
    seen: u64,
    groups: BTreeMap<GroupKey, (u64, i128)>,
    group_bytes: usize,
}

impl std::fmt::Debug for Aggregate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Aggregate")
            .field("by", &self.by)
            .field("sum", &self.sum)
            .field("groups", &self.groups.len())
            .finish_non_exhaustive()
    }
}

impl Aggregate {
    /// An aggregation by column `by`, summing column `sum`.
    pub fn new(by: u32, sum: Option<u32>, delimiter: u8, skip_header: bool) -> Self {
        Aggregate {
            by,
            sum,
            delimiter,
            skip_header,
            seen: 0,
            groups: BTreeMap::new(),
            group_bytes: 0,
        }
    }

    fn field<'a>(&self, body: &'a [u8], column: u32) -> Result<&'a [u8], WorkloadError> {
        let index = usize::try_from(column).unwrap_or(usize::MAX);
        body.split(|b| *b == self.delimiter)
            .nth(index)
            .ok_or_else(|| WorkloadError::MissingColumn {
                record: self.seen,
                column,
                found: body.split(|b| *b == self.delimiter).count(),
            })
    }
}

fn parse_integer(field: &[u8]) -> Option<i128> {
    let text = std::str::from_utf8(field).ok()?.trim();
    text.parse::<i128>().ok()
}

impl Workload for Aggregate {
    fn process(&mut self, batch: &[u8], _out: &mut Vec<u8>) -> Result<Counts, WorkloadError> {
        let mut counts = Counts::default();
        for record in records(batch) {
            self.seen = self.seen.saturating_add(1);
            counts.records_in = counts.records_in.saturating_add(1);
            if self.skip_header && self.seen == 1 {
                continue;
            }
            let (body, _) = split_ending(record);
            if body.is_empty() {
                continue;
            }
            let key = self.field(body, self.by)?;
            let add = match self.sum {
                None => 0,
                Some(column) => {
                    parse_integer(self.field(body, column)?).ok_or(WorkloadError::NotAnInteger {
                        record: self.seen,
                        column,
                    })?
                }
            };
            let at_limit = self.groups.len() >= MAX_GROUPS
                || self.group_bytes.saturating_add(key.len()) > MAX_GROUP_BYTES;
            let group = GroupKey(key.to_vec());
            let entry = match self.groups.get_mut(&group) {
                Some(entry) => entry,
                None if at_limit => return Err(WorkloadError::TooManyGroups { limit: MAX_GROUPS }),
                None => {
                    self.group_bytes = self.group_bytes.saturating_add(group.0.len());
                    self.groups.entry(group).or_insert((0, 0))
                }
            };
            entry.0 = entry.0.saturating_add(1);
            entry.1 = entry.1.checked_add(add).ok_or(WorkloadError::Overflow {
                column: self.sum.unwrap_or(0),
            })?;
        }
        Ok(counts)
    }

    fn finish(&mut self, out: &mut Vec<u8>) -> Result<Counts, WorkloadError> {
        let d = char::from(self.delimiter);
        let header = match self.sum {
            Some(c) => format!("group{d}count{d}sum_of_column_{c}\n"),
            None => format!("group{d}count\n"),
        };
        out.extend_from_slice(header.as_bytes());
        let mut written = 1u64;
        for (key, (count, sum)) in std::mem::take(&mut self.groups) {
            out.extend_from_slice(&key.0);
            let mut line = Zeroizing::new(match self.sum {
                Some(_) => format!("{d}{count}{d}{sum}\n"),
                None => format!("{d}{count}\n"),
            });
            out.extend_from_slice(line.as_bytes());
            line.zeroize();
            written = written.saturating_add(1);
        }
        Ok(Counts {
            records_in: 0,
            records_out: written,
        })
    }
}
