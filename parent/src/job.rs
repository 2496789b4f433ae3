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
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

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

async fn send_input<R: AsyncRead + Unpin>(
    mut input: R,
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
    let chunk = INPUT_CHUNK.min(MAX_CHUNK_LEN);
    // One frame buffer, reused: a hook that passes frames through hands it
    // back after each write, so the data path allocates (and faults in
    // fresh pages) once, not once per frame.
    let mut spare: Option<Vec<u8>> = None;
    loop {
        // Read a whole chunk straight into a frame buffer (big frames, one copy).
        let mut buf = spare.take().unwrap_or_default();
        // Only a buffer that grows is zero-filled (the first): the bytes of
        // a reused one are overwritten by the read, and only what was read
        // is sent.
        buf.resize(DATA_FRAME_HEADER_LEN.saturating_add(chunk), 0);
        let mut n = 0usize;
        while n < chunk {
            let got = input
                .read(
                    buf.get_mut(DATA_FRAME_HEADER_LEN.saturating_add(n)..)
                        .unwrap_or_default(),
                )
                .await
                .map_err(io("reading the input"))?;
            if got == 0 {
                break;
            }
            n = n.saturating_add(got);
        }
        if n == 0 {
            break;
        }
        buf.truncate(DATA_FRAME_HEADER_LEN.saturating_add(n));
        let frame = finish_data_frame(buf).map_err(|e| RunError::Protocol(e.to_string()))?;
        for f in write(frame) {
            to_enclave
                .write_all(&f)
                .await
                .map_err(io("sending the input"))?;
            spare = Some(f);
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
    R: AsyncRead + Unpin + Send + 'static,
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
    R: AsyncRead + Unpin + Send + 'static,
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
