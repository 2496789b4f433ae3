//! How much output a job may write on the host.
//!
//! The enclave decides how much output a job has, and the parent takes the
//! enclave to be as hostile as anything else it talks to: a compromised or
//! runaway workload (an `exec` program, say) could otherwise stream output
//! until the host's file system is full, and everything else on the host
//! with it. [`OutputLimits`] bounds that in two ways, checked before each
//! data frame is written:
//!
//! - a cap on the output's size (`--max-output`), for an operator who knows
//!   what a job should produce;
//! - a reserve of free space on the output's file system (`--keep-free`),
//!   which needs no such knowledge. It is read from the file system every
//!   [`CHECK_EVERY`] bytes of output, so a job can end up to that much,
//!   plus the blocks allocated ahead of the writes, inside the reserve.
//!
//! A job stopped by either gets [`RunError::OutputLimit`] and, like any
//! failed job, leaves no output behind (its partial file is removed).

use std::os::fd::AsFd;

use crate::job::RunError;

/// Output bytes between two readings of the file system's free space.
pub const CHECK_EVERY: u64 = 16 * 1024 * 1024;

/// The bounds on one job's output. The default bounds nothing; `parent
/// run` sets `keep_free` to 1 GiB unless told otherwise.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutputLimits {
    /// The most output bytes (the envelope's, as written) the job may have.
    pub max_bytes: Option<u64>,
    /// The free bytes the output's file system must keep (to an
    /// unprivileged process); 0: not checked.
    pub keep_free: u64,
}

/// [`OutputLimits`] applied to one output, as it grows.
pub(crate) struct OutputGuard<F> {
    limits: OutputLimits,
    file: F,
    written: u64,
    /// `written` when the free space is next read.
    next_check: u64,
}

impl<F: AsFd> OutputGuard<F> {
    /// A guard for `file` (the output being written, or a descriptor of
    /// it), with its file system read at once.
    pub(crate) fn new(limits: OutputLimits, file: F) -> Result<Self, RunError> {
        let guard = Self {
            limits,
            file,
            written: 0,
            next_check: CHECK_EVERY,
        };
        guard.check_free()?;
        Ok(guard)
    }

    /// `n` more bytes are about to be written: an error if that is more
    /// than the limits allow.
    pub(crate) fn admit(&mut self, n: usize) -> Result<(), RunError> {
        let after = self
            .written
            .saturating_add(u64::try_from(n).unwrap_or(u64::MAX));
        if let Some(max) = self.limits.max_bytes {
            if after > max {
                return Err(RunError::OutputLimit(format!(
                    "the enclave sent more than the {max} output bytes --max-output allows"
                )));
            }
        }
        self.written = after;
        if self.written >= self.next_check {
            self.next_check = self.written.saturating_add(CHECK_EVERY);
            self.check_free()?;
        }
        Ok(())
    }

    fn check_free(&self) -> Result<(), RunError> {
        let keep = self.limits.keep_free;
        if keep == 0 {
            return Ok(());
        }
        let stats = rustix::fs::fstatvfs(&self.file).map_err(|e| RunError::Io {
            context: "reading the free space of the output's file system".into(),
            source: e.into(),
        })?;
        let free = stats.f_bavail.saturating_mul(stats.f_frsize);
        if free < keep {
            return Err(RunError::OutputLimit(format!(
                "the output's file system has {free} bytes free, less than the {keep} \
                 --keep-free keeps (after {} output bytes)",
                self.written
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    fn file() -> std::fs::File {
        tempfile::tempfile().unwrap()
    }

    #[test]
    fn the_cap_admits_up_to_its_size_and_not_a_byte_more() {
        let limits = OutputLimits {
            max_bytes: Some(100),
            keep_free: 0,
        };
        let mut guard = OutputGuard::new(limits, file()).unwrap();
        guard.admit(60).unwrap();
        guard.admit(40).unwrap();
        let Err(RunError::OutputLimit(why)) = guard.admit(1) else {
            panic!("the 101st byte was admitted")
        };
        assert!(why.contains("--max-output"), "{why}");
    }

    #[test]
    fn no_limits_admit_anything() {
        let mut guard = OutputGuard::new(OutputLimits::default(), file()).unwrap();
        for _ in 0..4 {
            guard.admit(usize::MAX).unwrap();
        }
    }

    #[test]
    fn a_reserve_the_file_system_cannot_keep_stops_the_job_at_once_and_as_it_grows() {
        let free = {
            let stats = rustix::fs::fstatvfs(file()).unwrap();
            stats.f_bavail.saturating_mul(stats.f_frsize)
        };
        // More than the file system has: refused before any output.
        let too_much = OutputLimits {
            max_bytes: None,
            keep_free: free.saturating_mul(2).max(1),
        };
        let Err(RunError::OutputLimit(why)) = OutputGuard::new(too_much, file()) else {
            panic!("an impossible reserve was accepted")
        };
        assert!(why.contains("--keep-free"), "{why}");

        // A reserve it can keep: admitted, and read again once the output
        // passes each step (a reserve raised meanwhile is then refused).
        let fine = OutputLimits {
            max_bytes: None,
            keep_free: 1,
        };
        let mut guard = OutputGuard::new(fine, file()).unwrap();
        guard.admit(1000).unwrap();
        guard.limits.keep_free = u64::MAX;
        guard.admit(1000).unwrap(); // not read again before the step
        let step = usize::try_from(CHECK_EVERY).unwrap();
        assert!(matches!(guard.admit(step), Err(RunError::OutputLimit(_))));
    }
}
