//! Flushing a job's output to disk while the job runs.
//!
//! A job's output is only reported done once it is on disk (`fsync`, then
//! the rename into place). Left to the end, that one `fsync` writes the
//! whole output back at once, with the job's processes idle: on the e2e
//! bench it was a fifth of the job's wall-clock time. [`WriteBehind`]
//! instead asks for the output written so far to be flushed every
//! [`STEP`] bytes, on a thread of its own, so the device works while the
//! enclave does; the final `fsync` finds little left to write. It also keeps
//! the dirty pages of a long job bounded.
//!
//! The flushes are `fdatasync(2)` (through std): Linux's `sync_file_range`
//! would only start write-back without waiting, but neither std nor rustix
//! offers it, and a flush that waits on a thread of its own serves as well
//! without `unsafe` (the crate forbids it).
//!
//! An error from one of these flushes is the job's error. The flushing
//! thread uses a duplicate of the output's descriptor, which shares its
//! open file description with the writer's; Linux reports a write-back
//! error once per open file description, so once the flushing thread has
//! seen it, the final `fsync` would succeed and the loss would go
//! unnoticed. [`WriteBehind::finish`] returns it instead.

use std::fs::File;
use std::io;
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::thread::JoinHandle;

/// Output bytes written between two flushes.
pub(crate) const STEP: u64 = 16 * 1024 * 1024;

/// Flushes of an output file, started as it is written.
pub(crate) struct WriteBehind {
    /// One flush request may wait while another runs; more would only
    /// repeat it (a flush covers everything written before it starts).
    requests: SyncSender<()>,
    flusher: JoinHandle<io::Result<u64>>,
    unflushed: u64,
}

impl WriteBehind {
    /// Start flushing `file` (through a duplicate of its descriptor) as it
    /// is written.
    pub(crate) fn start(file: &File) -> io::Result<Self> {
        let file = file.try_clone()?;
        let (requests, pending) = mpsc::sync_channel::<()>(1);
        let flusher = std::thread::Builder::new()
            .name("output-flush".into())
            .spawn(move || {
                let mut flushes = 0u64;
                while pending.recv().is_ok() {
                    file.sync_data()?;
                    flushes = flushes.saturating_add(1);
                }
                Ok(flushes)
            })?;
        Ok(Self {
            requests,
            flusher,
            unflushed: 0,
        })
    }

    /// `n` more bytes are in the file; never blocks.
    pub(crate) fn wrote(&mut self, n: u64) {
        self.unflushed = self.unflushed.saturating_add(n);
        if self.unflushed < STEP {
            return;
        }
        match self.requests.try_send(()) {
            // A request already waiting covers these bytes too; a flusher
            // that stopped has an error for `finish`.
            Ok(()) | Err(TrySendError::Full(())) | Err(TrySendError::Disconnected(())) => {
                self.unflushed = 0;
            }
        }
    }

    /// Wait for the flushes asked for so far; the first error any of them
    /// met, or how many ran. Blocks: call it where blocking is allowed,
    /// before the file's final `fsync`.
    pub(crate) fn finish(self) -> io::Result<u64> {
        drop(self.requests);
        self.flusher
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the output's flushing thread failed")))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]
    use super::*;
    use std::io::{Read, Seek, Write};

    #[test]
    fn the_output_is_flushed_as_it_grows_and_arrives_whole() {
        let mut file = tempfile::tempfile().unwrap();
        let mut behind = WriteBehind::start(&file).unwrap();
        let block = vec![0xa5u8; 1024 * 1024];
        let blocks = 3 * STEP / block.len() as u64 + 1;
        for _ in 0..blocks {
            file.write_all(&block).unwrap();
            behind.wrote(block.len() as u64);
        }
        let flushes = behind.finish().unwrap();
        // The first request always finds the channel empty; later ones may
        // merge into a waiting one.
        assert!((1..=3).contains(&flushes), "{flushes} flushes");
        file.rewind().unwrap();
        let mut back = Vec::new();
        file.read_to_end(&mut back).unwrap();
        assert_eq!(back.len() as u64, blocks * block.len() as u64);
        assert!(back.iter().all(|&b| b == 0xa5));
    }

    #[test]
    fn less_than_a_step_asks_for_no_flush() {
        let file = tempfile::tempfile().unwrap();
        let mut behind = WriteBehind::start(&file).unwrap();
        behind.wrote(STEP - 1);
        assert_eq!(behind.finish().unwrap(), 0);
    }

    #[test]
    fn a_failed_flush_is_the_callers_error() {
        // fdatasync(2) on a pipe fails (EINVAL): a stand-in for a device
        // error, which the final fsync on the shared open file description
        // would no longer report.
        let (_read, write) = rustix::pipe::pipe().unwrap();
        let file = File::from(write);
        let mut behind = WriteBehind::start(&file).unwrap();
        behind.wrote(STEP);
        assert!(behind.finish().is_err());
    }
}
