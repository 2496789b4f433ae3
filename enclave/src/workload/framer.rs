//! Cutting a byte stream into batches of whole records.

use zeroize::{Zeroize, Zeroizing};

use super::{WorkloadError, MAX_RECORD_LEN};

/// Cuts a byte stream into batches of whole records.
#[derive(Debug, Default)]
pub struct RecordFramer {
    carry: Zeroizing<Vec<u8>>,
}

impl RecordFramer {
    /// Feed `chunk`; run `f` on the whole records available (carry
    /// included). Keeps the unterminated tail for the next call.
    pub fn feed<F>(&mut self, chunk: &[u8], mut f: F) -> Result<(), WorkloadError>
    where
        F: FnMut(&[u8]) -> Result<(), WorkloadError>,
    {
        let Some(last_newline) = memchr::memrchr(b'\n', chunk) else {
            self.carry.extend_from_slice(chunk);
            return self.check_carry();
        };
        let (mut whole, tail) = chunk.split_at(last_newline.saturating_add(1));
        if !self.carry.is_empty() {
            // Complete the carried record with the chunk's first line; only
            // that one record is copied.
            let first_end =
                memchr::memchr(b'\n', whole).map_or(whole.len(), |i| i.saturating_add(1));
            let (first, rest) = whole.split_at(first_end);
            self.carry.extend_from_slice(first);
            self.check_carry()?;
            f(&self.carry)?;
            self.carry.zeroize();
            self.carry.clear();
            whole = rest;
        }
        if !whole.is_empty() {
            f(whole)?;
        }
        self.carry.extend_from_slice(tail);
        self.check_carry()
    }

    fn check_carry(&self) -> Result<(), WorkloadError> {
        if self.carry.len() > MAX_RECORD_LEN {
            return Err(WorkloadError::RecordTooLong {
                limit: MAX_RECORD_LEN,
            });
        }
        Ok(())
    }

    /// End of input: the unterminated last record, if any.
    pub fn finish<F>(&mut self, mut f: F) -> Result<(), WorkloadError>
    where
        F: FnMut(&[u8]) -> Result<(), WorkloadError>,
    {
        if self.carry.is_empty() {
            return Ok(());
        }
        let last = Zeroizing::new(std::mem::take(&mut *self.carry));
        f(&last)
    }
}
