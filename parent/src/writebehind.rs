//! Storing a job's output while the job runs: its blocks allocated ahead of
//! the writes, its pages flushed behind them.
//!
//! A job's output is only reported done once it is on disk (`fsync`, then
//! the rename into place). Left to the end, that one `fsync` writes the
//! whole output back at once, with the job's processes idle: on the e2e
//! bench it was a fifth of the job's wall-clock time. [`WriteBehind`]
//! instead has the output written so far flushed every [`STEP`] bytes, on
//! a thread of its own, so the device works while the enclave does; the
//! final `fsync` finds little left to write. It also keeps the dirty pages
//! of a long job bounded.
//!
//! The same thread keeps the file's blocks allocated [`AHEAD`] bytes past
//! what has been written (`fallocate(2)`, which extends the file): writes
//! then land in blocks the file system has already found, instead of each
//! page reserving its own (ext4's delayed allocation was a sixth of the
//! parent's CPU). [`WriteBehind::finish`] cuts the file back to the bytes
//! written. Allocation is only an optimisation: a file system without
//! `fallocate`, or one short of space for the look-ahead, just stops being
//! asked, and the writes allocate as they would have.
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
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::thread::JoinHandle;

use rustix::fs::FallocateFlags;

/// Output bytes written between two flushes.
pub(crate) const STEP: u64 = 16 * 1024 * 1024;
/// How far past the bytes written the file's blocks are kept allocated.
pub(crate) const AHEAD: u64 = 4 * STEP;

/// Flushes and allocation of an output file, as it is written.
pub(crate) struct WriteBehind {
    /// How much has been written, at each step. One request may wait while
    /// another is served; more would only repeat it (a flush covers
    /// everything written before it starts).
    requests: SyncSender<u64>,
    flusher: JoinHandle<io::Result<Flushed>>,
    written: u64,
    unflushed: u64,
}

impl WriteBehind {
    /// Start allocating and flushing `file` (through a duplicate of its
    /// descriptor), which must be empty, as it is written.
    pub(crate) fn start(file: &File) -> io::Result<Self> {
        let file = file.try_clone()?;
        let (requests, pending) = mpsc::sync_channel::<u64>(1);
        let flusher = std::thread::Builder::new()
            .name("output-flush".into())
            .spawn(move || serve(&file, &pending))?;
        Ok(Self {
            requests,
            flusher,
            written: 0,
            unflushed: 0,
        })
    }

    /// `n` more bytes are in the file; never blocks.
    pub(crate) fn wrote(&mut self, n: u64) {
        self.written = self.written.saturating_add(n);
        self.unflushed = self.unflushed.saturating_add(n);
        if self.unflushed < STEP {
            return;
        }
        match self.requests.try_send(self.written) {
            // A request already waiting covers these bytes too; a flusher
            // that stopped has an error for `finish`.
            Ok(()) | Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.unflushed = 0;
            }
        }
    }

    /// Wait for the flushes asked for so far, cut `file` (the one written,
    /// at its position: never opened for appending) back to the bytes
    /// written, and `fsync` it. The first error met, or what the flushing
    /// thread did. Blocks.
    pub(crate) fn finish(self, file: &File) -> io::Result<Flushed> {
        drop(self.requests);
        let flushed = self
            .flusher
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the output's flushing thread failed")))?;
        file.set_len(self.written)?;
        file.sync_all()?;
        Ok(flushed)
    }
}

/// What the flushing thread did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Flushed {
    /// Flushes run before the final `fsync`.
    pub(crate) flushes: u64,
    /// Bytes of the file allocated ahead, at most.
    pub(crate) allocated: u64,
}

/// The flushing thread: allocates the first stretch, then, for each mark,
/// allocates ahead of it and flushes behind it.
fn serve(file: &File, pending: &Receiver<u64>) -> io::Result<Flushed> {
    let mut ahead = Ahead::default();
    ahead.reach(file, 0);
    let mut flushes = 0u64;
    while let Ok(written) = pending.recv() {
        ahead.reach(file, written);
        file.sync_data()?;
        flushes = flushes.saturating_add(1);
    }
    Ok(Flushed {
        flushes,
        allocated: ahead.allocated,
    })
}

/// The file's blocks allocated so far (its length, once extended).
#[derive(Default)]
struct Ahead {
    allocated: u64,
    /// `fallocate` failed once (not supported, or no room for the
    /// look-ahead): not asked again.
    stopped: bool,
}

impl Ahead {
    /// Keep blocks allocated [`AHEAD`] bytes past `written`.
    fn reach(&mut self, file: &File, written: u64) {
        let target = written.saturating_add(AHEAD);
        if self.stopped || self.allocated >= target {
            return;
        }
        let len = target.saturating_sub(self.allocated);
        match rustix::fs::fallocate(file, FallocateFlags::empty(), self.allocated, len) {
            Ok(()) => self.allocated = target,
            Err(_) => self.stopped = true,
        }
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
        let flushed = behind.finish(&file).unwrap();
        // The first request always finds the channel empty; later ones may
        // merge into a waiting one.
        assert!((1..=3).contains(&flushed.flushes), "{flushed:?}");
        // Blocks were allocated ahead of the writes (the temporary
        // directory's file system supports fallocate, as ext4, xfs, btrfs
        // and tmpfs do), and the file was cut back to what was written.
        assert!(flushed.allocated >= STEP + AHEAD, "{flushed:?}");
        assert_eq!(file.metadata().unwrap().len(), blocks * block.len() as u64);
        file.rewind().unwrap();
        let mut back = Vec::new();
        file.read_to_end(&mut back).unwrap();
        assert_eq!(back.len() as u64, blocks * block.len() as u64);
        assert!(back.iter().all(|&b| b == 0xa5));
    }

    #[test]
    fn a_short_output_is_cut_back_to_its_bytes() {
        let mut file = tempfile::tempfile().unwrap();
        let mut behind = WriteBehind::start(&file).unwrap();
        file.write_all(b"some output").unwrap();
        behind.wrote(11);
        let flushed = behind.finish(&file).unwrap();
        assert_eq!(flushed.flushes, 0);
        assert_eq!(flushed.allocated, AHEAD);
        assert_eq!(file.metadata().unwrap().len(), 11);
        file.rewind().unwrap();
        let mut back = String::new();
        file.read_to_string(&mut back).unwrap();
        assert_eq!(back, "some output");
    }

    #[test]
    fn a_failed_flush_is_the_callers_error() {
        // fdatasync(2) on a pipe fails (EINVAL): a stand-in for a device
        // error, which the final fsync on the shared open file description
        // would no longer report. (fallocate fails on a pipe too, and is
        // then not asked again: allocation is only an optimisation.)
        let (_read, write) = rustix::pipe::pipe().unwrap();
        let file = File::from(write);
        let mut behind = WriteBehind::start(&file).unwrap();
        behind.wrote(STEP);
        assert!(behind.finish(&file).is_err());
    }
}
