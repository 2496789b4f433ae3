//! What the stages of a job share: the hand-off to the sealer, the
//! cancellation, failure kinds, coarse progress, draining the input. Both
//! the in-process pipeline ([`crate::job`]) and `exec` ([`crate::exec`])
//! build on it, so neither depends on the other's internals.

use std::io::Read;
use std::time::{Duration, Instant};

use kluis_envelope::{DecryptError, EncryptError};
use kluis_proto::job::{FailureKind, JobCounts, JobEvent};
use tokio::sync::mpsc;
use zeroize::Zeroizing;

/// Plaintext read from the input envelope at a time.
pub(crate) const READ_CHUNK: usize = 256 * 1024;
/// From the workload to the sealer.
pub(crate) enum ToSealer {
    /// Plaintext to seal.
    Batch(Zeroizing<Vec<u8>>),
    /// The workload completed: seal the final segment. Without this the
    /// output is never finished, so it can never decrypt as complete.
    Finish,
}

pub(crate) type BatchSender = std::sync::mpsc::SyncSender<ToSealer>;
/// How often progress is reported at most.
pub(crate) const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Why a job failed: a stable kind and a message without secrets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct JobError {
    /// Stable kind, sent to the parent.
    pub kind: FailureKind,
    /// What happened.
    pub message: String,
}

impl JobError {
    pub(crate) fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        JobError {
            kind,
            message: message.into(),
        }
    }
}

pub(crate) fn decrypt_error(e: &DecryptError) -> JobError {
    let kind = match e {
        DecryptError::WrongKey => FailureKind::InputWrongKey,
        DecryptError::Truncated { .. } => FailureKind::InputTruncated,
        DecryptError::Header(_) => FailureKind::InputHeader,
        DecryptError::Io(_) => FailureKind::InputIo,
        _ => FailureKind::InputTampered,
    };
    JobError::new(kind, format!("input envelope: {e}"))
}

pub(crate) fn read_error(e: &std::io::Error) -> JobError {
    match DecryptError::from_io(e) {
        Some(d) => decrypt_error(d),
        None => JobError::new(FailureKind::InputIo, format!("reading the input: {e}")),
    }
}

pub(crate) fn write_error(e: &std::io::Error) -> JobError {
    match EncryptError::from_io(e) {
        Some(EncryptError::Io(_)) | None => JobError::new(
            FailureKind::OutputClosed,
            "the parent stopped taking output".to_owned(),
        ),
        Some(other) => JobError::new(FailureKind::Output, format!("sealing the output: {other}")),
    }
}

/// What goes to the parent: an event, or an output `Data` frame built in
/// place (its first `len` bytes; the buffer is longer) with where its buffer
/// goes once written (back to the sealer, for the next frame: the data path
/// allocates and faults in its frame buffers once, not once per megabyte; a
/// buffer with no room there is freed).
pub(crate) enum Outgoing {
    Event(JobEvent),
    Frame {
        frame: Vec<u8>,
        len: usize,
        spare: mpsc::Sender<Vec<u8>>,
    },
}

/// Cancels every part of one job at once: the input pump, the event writer,
/// the key exchange, the worker and sealer threads and an `exec` program's
/// process group all watch it (async parts await it; blocking threads poll
/// it between chunks, and their channels close under them).
pub(crate) type Cancel = tokio_util::sync::CancellationToken;

pub(crate) fn cancelled() -> JobError {
    JobError::new(FailureKind::Cancelled, "the job was stopped")
}

/// How often progress is reported, and its granularity: the parent learns
/// how much of the input the enclave has authenticated, rounded down to
/// this many bytes, and never a record count before `Done` (record counts
/// over time would tell it where records of a kind are).
pub(crate) const PROGRESS_GRANULE: u64 = 1024 * 1024;

/// Sends coarse `Progress` events from a blocking stage.
pub(crate) struct ProgressReporter<'a> {
    events: &'a mpsc::Sender<Outgoing>,
    last: Instant,
    reported: u64,
}

impl<'a> ProgressReporter<'a> {
    pub(crate) fn new(events: &'a mpsc::Sender<Outgoing>) -> Self {
        ProgressReporter {
            events,
            last: Instant::now(),
            reported: 0,
        }
    }

    /// `bytes_in` plaintext bytes have been read and authenticated so far.
    /// The report depends only on how far the input has been read (which
    /// the parent knows, having sent it) and on time: never on what the
    /// workload made of it, and it goes on unchanged after a workload
    /// failure until the input ends.
    pub(crate) fn input_read(&mut self, bytes_in: u64) {
        let coarse = bytes_in.saturating_sub(bytes_in.checked_rem(PROGRESS_GRANULE).unwrap_or(0));
        if self.last.elapsed() < PROGRESS_EVERY || coarse == self.reported {
            return;
        }
        self.last = Instant::now();
        self.reported = coarse;
        let _ = self
            .events
            .try_send(Outgoing::Event(JobEvent::Progress(JobCounts {
                records_in: 0,
                records_out: 0,
                bytes_in: coarse,
                bytes_out: 0,
            })));
    }
}

/// After a workload failure: read (and so authenticate) the rest of the
/// input to its end, reporting progress as before, so that neither the
/// time of the failure nor the progress tells the parent where in the
/// input it happened. (The output does: it stops growing within one output
/// frame of the failure; SECURITY.md says what a parent learns.) An input
/// error found on the way wins (the parent caused it and may know it).
pub(crate) fn drain<R: Read>(
    reader: &mut R,
    mut bytes_in: u64,
    progress: &mut ProgressReporter<'_>,
    cancel: &Cancel,
) -> Result<u64, JobError> {
    let mut scratch = Zeroizing::new(vec![0u8; READ_CHUNK]);
    loop {
        if cancel.is_cancelled() {
            return Err(cancelled());
        }
        let n = reader.read(&mut scratch).map_err(|e| read_error(&e))?;
        if n == 0 {
            return Ok(bytes_in);
        }
        bytes_in = bytes_in.saturating_add(u64::try_from(n).unwrap_or(u64::MAX));
        progress.input_read(bytes_in);
    }
}
