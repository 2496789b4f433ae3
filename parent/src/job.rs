//! Running a job: stream the encrypted input into the enclave, take the
//! encrypted output back, and present it only when the enclave says the job
//! is done.
//!
//! The parent holds no key and sees ciphertext only. The output goes to a
//! temporary file beside the destination and is renamed into place (after
//! an fsync) only on `Done`; on any failure the temporary file is removed
//! and an earlier file at the destination is left as it was. Even without
//! this care an interrupted output could not pass for complete: it lacks the
//! envelope's authenticated final segment.

use kluis_proto::job::FailureKind;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kluis_proto::job::{
    finish_data_frame, JobCounts, JobEvent, JobRequest, JobSpec, DATA_FRAME_HEADER_LEN,
    JOB_MAX_FRAME_LEN, MAX_CHUNK_LEN,
};
use kluis_transport::Address;
use tokio::io::AsyncWriteExt;

use crate::hook::{read_raw_frame_into, Channel, Direction, FrameHook};

/// Input bytes per `Data` frame.
pub const INPUT_CHUNK: usize = 512 * 1024;

/// Why a job did not produce an output.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// The enclave could not be reached.
    #[error("cannot reach the enclave at {address}: {source}")]
    Connect {
        /// Where.
        address: String,
        /// Why.
        source: std::io::Error,
    },
    /// Nothing accepted a connection at the enclave's address in the time
    /// given ([`crate::connect::connect_patiently`]).
    #[error(
        "the enclave at {address} did not accept a connection within {waited:.0?} \
         (last error: {source}); is it running (`nitro-cli describe-enclaves`), with this \
         CID and the image's LISTEN_PORT? An enclave that fails at start-up shows why only \
         when rerun with --debug-mode --attach-console"
    )]
    EnclaveNotListening {
        /// Where.
        address: String,
        /// How long the parent tried.
        waited: Duration,
        /// The last attempt's error.
        source: std::io::Error,
    },
    /// The enclave failed the job and said why.
    #[error("the enclave failed the job ({kind}): {reason}")]
    Failed {
        /// Why, as a stable kind.
        kind: FailureKind,
        /// Its message.
        reason: String,
    },
    /// The enclave went away before saying the job was done.
    #[error("the enclave closed the connection before the job was done")]
    Incomplete,
    /// Nothing arrived from the enclave for too long.
    #[error("no word from the enclave for {0:?}")]
    Timeout(Duration),
    /// The enclave spoke out of turn.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Reading the input or writing the output failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
    /// The job failed after its key request reached a verifier replica whose
    /// answer was lost: not run again automatically
    /// ([`crate::failover`]).
    #[error(
        "{0}; the key request reached a verifier replica and its answer was lost, so the \
         job is not run again automatically (the request may have been decided and audited \
         there, and counted as a run of its authorisation): check the verifier's audit log \
         before running it again"
    )]
    AnswerLost(Box<RunError>),
}

impl RunError {
    /// The enclave's failure kind, if it sent one.
    pub fn enclave_kind(&self) -> Option<FailureKind> {
        match self {
            RunError::Failed { kind, .. } => Some(*kind),
            RunError::AnswerLost(inner) => inner.enclave_kind(),
            _ => None,
        }
    }
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> RunError {
    let context = context.into();
    move |source| RunError::Io { context, source }
}

/// What the caller is told while a job runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    /// Input envelope bytes sent.
    pub sent: u64,
    /// Output envelope bytes received.
    pub received: u64,
    /// The enclave's last counts.
    pub counts: JobCounts,
    /// Since the start.
    pub elapsed: Duration,
}

/// How a job ended well.
#[derive(Debug, Clone)]
pub struct JobReport {
    /// The enclave's counts.
    pub counts: JobCounts,
    /// Input envelope bytes sent.
    pub input_bytes: u64,
    /// Output envelope bytes written.
    pub output_bytes: u64,
    /// The CMK (id, version) the output's data key is wrapped under.
    pub output_key: Option<(String, u32)>,
    /// Where the output is.
    pub output: PathBuf,
    /// How long it took.
    pub elapsed: Duration,
}

/// Options of one job.
#[derive(Clone)]
pub struct JobRun {
    /// Where the enclave takes jobs.
    pub enclave: Address,
    /// The job.
    pub spec: JobSpec,
    /// What the parent does to the frames (tests); pass-through in production.
    pub hook: Arc<dyn FrameHook>,
    /// Fail when the enclave says nothing this long.
    pub idle_timeout: Duration,
}

impl std::fmt::Debug for JobRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobRun")
            .field("enclave", &self.enclave)
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

fn frame_of(message: &JobRequest) -> Result<Vec<u8>, RunError> {
    kluis_proto::job::encode_job_frame(message).map_err(|e| RunError::Protocol(e.to_string()))
}

/// Frames of input handed from the reader thread to the sender at once: two,
/// so that one is read while the other is sent.
const INPUT_FRAMES_IN_FLIGHT: usize = 2;

/// Reads `input` on a blocking thread straight into data-frame buffers (one
/// copy, from the file into the frame; no runtime buffer between them, and
/// no hand-off to the blocking pool per read, as an async file would make)
/// and hands the frames over. Sent frames come back through the returned
/// sender for reuse, so the data path allocates a few frame buffers once.
/// The thread stops at the end of the input, at a read error (handed over
/// as the last item), or when [`InputFrames::frames`] is dropped.
fn spawn_input_reader<R: std::io::Read + Send + 'static>(mut input: R) -> InputFrames {
    let chunk = INPUT_CHUNK.min(MAX_CHUNK_LEN);
    let (frames_tx, frames_rx) = tokio::sync::mpsc::channel(INPUT_FRAMES_IN_FLIGHT);
    let (spare_tx, mut spare_rx) =
        tokio::sync::mpsc::channel::<Vec<u8>>(INPUT_FRAMES_IN_FLIGHT.saturating_add(1));
    tokio::task::spawn_blocking(move || {
        let mut read_frame = |buf: &mut Vec<u8>| -> std::io::Result<usize> {
            // Only a buffer that grows is zero-filled (a new one): the bytes
            // of a reused one are overwritten by the read, and only what was
            // read is sent.
            buf.resize(DATA_FRAME_HEADER_LEN.saturating_add(chunk), 0);
            let mut n = 0usize;
            while n < chunk {
                let into = buf
                    .get_mut(DATA_FRAME_HEADER_LEN.saturating_add(n)..)
                    .unwrap_or_default();
                match input.read(into) {
                    Ok(0) => break,
                    Ok(got) => n = n.saturating_add(got),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            buf.truncate(DATA_FRAME_HEADER_LEN.saturating_add(n));
            Ok(n)
        };
        loop {
            let mut buf = spare_rx.try_recv().unwrap_or_default();
            let item = match read_frame(&mut buf) {
                Ok(0) => return,
                Ok(_) => finish_data_frame(buf).map_err(|e| RunError::Protocol(e.to_string())),
                Err(e) => Err(RunError::Io {
                    context: "reading the input".into(),
                    source: e,
                }),
            };
            let last = item.is_err();
            if frames_tx.blocking_send(item).is_err() || last {
                return;
            }
        }
    });
    InputFrames {
        frames: frames_rx,
        spare: spare_tx,
    }
}

/// The two ends [`spawn_input_reader`] gives.
struct InputFrames {
    /// Data frames of the input, in order; an error is the last item.
    frames: tokio::sync::mpsc::Receiver<Result<Vec<u8>, RunError>>,
    /// Where sent frame buffers go back to the reader.
    spare: tokio::sync::mpsc::Sender<Vec<u8>>,
}

async fn send_input<R: std::io::Read + Send + 'static>(
    input: R,
    mut to_enclave: tokio::io::WriteHalf<kluis_transport::BoxStream>,
    spec: JobSpec,
    hook: Arc<dyn FrameHook>,
    sent: Arc<std::sync::atomic::AtomicU64>,
) -> Result<tokio::io::WriteHalf<kluis_transport::BoxStream>, RunError> {
    let write = |frame: Vec<u8>| hook.on_frame(Channel::Job, Direction::ToEnclave, frame);
    for f in write(frame_of(&JobRequest::Start(spec))?) {
        to_enclave
            .write_all(&f)
            .await
            .map_err(io("sending the job"))?;
    }
    let InputFrames { mut frames, spare } = spawn_input_reader(input);
    while let Some(frame) = frames.recv().await {
        let frame = frame?;
        let n = frame.len().saturating_sub(DATA_FRAME_HEADER_LEN);
        for f in write(frame) {
            to_enclave
                .write_all(&f)
                .await
                .map_err(io("sending the input"))?;
            // A hook that passes frames through hands the buffer back.
            let _ = spare.try_send(f);
        }
        sent.fetch_add(
            u64::try_from(n).unwrap_or(u64::MAX),
            std::sync::atomic::Ordering::Relaxed,
        );
    }
    for f in write(frame_of(&JobRequest::End)?) {
        to_enclave
            .write_all(&f)
            .await
            .map_err(io("ending the input"))?;
    }
    to_enclave.flush().await.map_err(io("sending the input"))?;
    Ok(to_enclave)
}

/// Run `job` on `input`; on success the output is at `output`.
pub async fn run_job<R>(
    job: &JobRun,
    input: R,
    output: &Path,
    progress: impl FnMut(&Progress),
) -> Result<JobReport, RunError>
where
    R: std::io::Read + Send + 'static,
{
    let stream = kluis_transport::connect(&job.enclave)
        .await
        .map_err(|source| RunError::Connect {
            address: job.enclave.to_string(),
            source,
        })?;
    run_job_on(job, stream, input, output, progress).await
}

/// [`run_job`] over a connection already made to `job.enclave` (by
/// [`crate::connect::connect_patiently`], say).
pub async fn run_job_on<R>(
    job: &JobRun,
    stream: kluis_transport::BoxStream,
    input: R,
    output: &Path,
    mut progress: impl FnMut(&Progress),
) -> Result<JobReport, RunError>
where
    R: std::io::Read + Send + 'static,
{
    let started = Instant::now();
    let dir = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let partial = tempfile::Builder::new()
        .prefix(".kluis-partial-")
        .tempfile_in(&dir)
        .map_err(io(format!(
            "creating a temporary file in {}",
            dir.display()
        )))?;
    let (partial_file, partial_path) = partial.into_parts();
    // The output is written by a blocking thread, straight from the data
    // frames (checked as such before they are sent here).
    let (out_tx, mut out_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
    // Written frames come back for reuse (at most the channel's worth, plus
    // the one being read, are ever allocated).
    let (spare_tx, mut spare_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(9);
    let writer = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        use std::io::Write;
        let mut file = partial_file;
        while let Some(frame) = out_rx.blocking_recv() {
            file.write_all(frame.get(DATA_FRAME_HEADER_LEN..).unwrap_or_default())?;
            let _ = spare_tx.try_send(frame);
        }
        file.sync_all()
    });

    let (mut from_enclave, to_enclave) = tokio::io::split(stream);
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sender = tokio::spawn(send_input(
        input,
        to_enclave,
        job.spec.clone(),
        Arc::clone(&job.hook),
        Arc::clone(&sent),
    ));

    let mut state = Progress::default();
    let mut output_key = None;
    let result: Result<JobCounts, RunError> = async {
        loop {
            let mut frame = spare_rx.try_recv().unwrap_or_default();
            let more = tokio::time::timeout(
                job.idle_timeout,
                read_raw_frame_into(&mut from_enclave, JOB_MAX_FRAME_LEN, &mut frame),
            )
            .await
            .map_err(|_| RunError::Timeout(job.idle_timeout))?
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => {
                    RunError::Incomplete
                }
                _ => RunError::Protocol(format!("from the enclave: {e}")),
            })?;
            if !more {
                return Err(RunError::Incomplete);
            }
            for frame in job
                .hook
                .on_frame(Channel::Job, Direction::FromEnclave, frame)
            {
                if let Some(payload) = kluis_proto::job::data_payload(&frame) {
                    // The data path: hand the frame to the writer as it is.
                    state.received = state
                        .received
                        .saturating_add(u64::try_from(payload.len()).unwrap_or(u64::MAX));
                    out_tx.send(frame).await.map_err(|_| RunError::Io {
                        context: "writing the output".into(),
                        source: std::io::Error::other("the output writer stopped"),
                    })?;
                    continue;
                }
                // Everything else is a message frame (a hook in a test may
                // have made anything of it: decode it like any peer's).
                let event = kluis_proto::job::decode_job_frame::<JobEvent>(&frame)
                    .map_err(|e| RunError::Protocol(e.to_string()))?;
                match event {
                    JobEvent::Started {
                        output_key_id,
                        output_key_version,
                    } => {
                        output_key = Some((output_key_id, output_key_version));
                    }
                    JobEvent::Data(_) => {
                        // data_payload refused it: over the chunk limit.
                        return Err(RunError::Protocol(
                            "a data frame over the chunk limit".into(),
                        ));
                    }
                    JobEvent::Progress(counts) => state.counts = counts,
                    JobEvent::Done(counts) => return Ok(counts),
                    JobEvent::Failed { kind, reason } => {
                        return Err(RunError::Failed { kind, reason })
                    }
                    _ => return Err(RunError::Protocol("an unknown event".into())),
                }
            }
            state.sent = sent.load(std::sync::atomic::Ordering::Relaxed);
            state.elapsed = started.elapsed();
            progress(&state);
        }
    }
    .await;
    let counts = match result {
        Ok(counts) => counts,
        Err(e) => {
            sender.abort();
            drop(out_tx);
            let _ = writer.await;
            let _ = std::fs::remove_file(&partial_path);
            // An input error explains a failure better than its echo.
            return Err(e);
        }
    };
    drop(out_tx);
    let written = match writer.await {
        Ok(r) => r.map_err(io("writing the output")),
        Err(_) => Err(RunError::Protocol("the output writer failed".into())),
    };
    // The enclave said Done, so it read End: the sender is finished or about to be.
    let sent_all = match tokio::time::timeout(job.idle_timeout, sender).await {
        Ok(Ok(Ok(_))) => Ok(()),
        Ok(Ok(Err(e))) => Err(e),
        Ok(Err(_)) => Err(RunError::Protocol("the input sender failed".into())),
        Err(_) => Err(RunError::Timeout(job.idle_timeout)),
    };
    if let Err(e) = sent_all.and(written) {
        let _ = std::fs::remove_file(&partial_path);
        return Err(e);
    }
    partial_path.persist(output).map_err(|e| RunError::Io {
        context: format!("moving the output into place at {}", output.display()),
        source: e.error,
    })?;
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    state.counts = counts;
    state.sent = sent.load(std::sync::atomic::Ordering::Relaxed);
    state.elapsed = started.elapsed();
    progress(&state);
    Ok(JobReport {
        counts,
        input_bytes: state.sent,
        output_bytes: state.received,
        output_key,
        output: output.to_path_buf(),
        elapsed: started.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::panic,
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects,
        clippy::cast_possible_truncation
    )]
    use super::*;

    /// Every frame the reader hands over, until it stops.
    async fn drain(mut input: InputFrames) -> Vec<Result<Vec<u8>, RunError>> {
        let mut out = Vec::new();
        while let Some(item) = input.frames.recv().await {
            out.push(item);
        }
        out
    }

    #[tokio::test]
    async fn the_input_becomes_data_frames_of_whole_chunks_in_order() {
        let chunk = INPUT_CHUNK.min(MAX_CHUNK_LEN);
        let input: Vec<u8> = (0..chunk * 5 / 2).map(|i| (i % 251) as u8).collect();
        let frames = drain(spawn_input_reader(std::io::Cursor::new(input.clone()))).await;
        let payloads: Vec<Vec<u8>> = frames
            .into_iter()
            .map(|f| {
                kluis_proto::job::data_payload(&f.unwrap())
                    .unwrap()
                    .to_vec()
            })
            .collect();
        let sizes: Vec<usize> = payloads.iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![chunk, chunk, chunk / 2]);
        assert_eq!(payloads.concat(), input);

        // An empty input is no frame at all.
        let none = drain(spawn_input_reader(std::io::Cursor::new(Vec::new()))).await;
        assert!(none.is_empty());
    }

    /// Hands out `good` bytes in small reads (one of them interrupted),
    /// then fails; says on a channel when it is dropped.
    struct Flaky {
        good: usize,
        interrupted: bool,
        dropped: std::sync::mpsc::Sender<()>,
    }

    impl std::io::Read for Flaky {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if !self.interrupted {
                self.interrupted = true;
                return Err(std::io::ErrorKind::Interrupted.into());
            }
            if self.good == 0 {
                return Err(std::io::Error::other("disk on fire"));
            }
            let n = buf.len().min(self.good).min(1000);
            buf[..n].fill(7);
            self.good -= n;
            Ok(n)
        }
    }

    impl Drop for Flaky {
        fn drop(&mut self) {
            let _ = self.dropped.send(());
        }
    }

    #[tokio::test]
    async fn a_read_error_is_the_last_item_and_names_the_input() {
        let chunk = INPUT_CHUNK.min(MAX_CHUNK_LEN);
        let (dropped, was_dropped) = std::sync::mpsc::channel();
        let flaky = Flaky {
            good: chunk + 10,
            interrupted: false,
            dropped,
        };
        let mut items = drain(spawn_input_reader(flaky)).await;
        // The whole chunk read before the error is sent; the 10 bytes
        // after it are not (the job fails, so nothing partial matters).
        assert_eq!(items.len(), 2);
        match items.pop().unwrap() {
            Err(RunError::Io { context, source }) => {
                assert_eq!(context, "reading the input");
                assert_eq!(source.to_string(), "disk on fire");
            }
            other => panic!("expected the read error, got {other:?}"),
        }
        let first = items.pop().unwrap().unwrap();
        assert_eq!(
            kluis_proto::job::data_payload(&first).unwrap(),
            vec![7u8; chunk]
        );
        // The thread has ended and let go of the input.
        was_dropped
            .recv_timeout(Duration::from_secs(10))
            .expect("the reader thread let go of the input");
    }

    #[tokio::test]
    async fn the_reader_stops_when_nobody_takes_its_frames() {
        let (dropped, was_dropped) = std::sync::mpsc::channel();
        let endless = Flaky {
            good: usize::MAX,
            interrupted: true,
            dropped,
        };
        let mut input = spawn_input_reader(endless);
        assert!(input.frames.recv().await.unwrap().is_ok());
        drop(input);
        was_dropped
            .recv_timeout(Duration::from_secs(10))
            .expect("the reader thread stopped after its receiver was dropped");
    }
}
