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

use kluis_proto::frame::{check_head, FrameKind, FRAME_HEADER_LEN};
use kluis_proto::job::{
    data_frame_header, finish_data_frame, JobCounts, JobEvent, JobRequest, JobSpec,
    DATA_FRAME_HEADER_LEN, JOB_MAX_FRAME_LEN, MAX_CHUNK_LEN,
};
use kluis_transport::Address;
use tokio::io::AsyncWriteExt;

use crate::hook::{read_raw_frame_into, Channel, Direction, FrameHook};
use crate::limit::{OutputGuard, OutputLimits};
use crate::writebehind::WriteBehind;
use crate::zerocopy::{Pipe, Socket};

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
    /// The output passed one of the job's [`OutputLimits`].
    #[error("{0}: the job was stopped, no output written")]
    OutputLimit(String),
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
    /// How much output the enclave may have the parent write.
    pub output_limits: OutputLimits,
}

impl std::fmt::Debug for JobRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobRun")
            .field("enclave", &self.enclave)
            .field("spec", &self.spec)
            .field("output_limits", &self.output_limits)
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

/// What a job reads its input from.
pub enum JobInput {
    /// A file: on a socket connection with no hook looking at the frames it
    /// goes to the enclave with `sendfile` (the `zerocopy` module), otherwise
    /// it is read like any reader.
    File(std::fs::File),
    /// Any other source, read on a blocking thread of its own.
    Reader(Box<dyn std::io::Read + Send>),
}

impl JobInput {
    /// Input from any reader.
    pub fn reader(reader: impl std::io::Read + Send + 'static) -> Self {
        JobInput::Reader(Box::new(reader))
    }

    fn into_reader(self) -> Box<dyn std::io::Read + Send> {
        match self {
            JobInput::File(file) => Box::new(file),
            JobInput::Reader(reader) => reader,
        }
    }
}

impl From<std::fs::File> for JobInput {
    fn from(file: std::fs::File) -> Self {
        JobInput::File(file)
    }
}

impl std::fmt::Debug for JobInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            JobInput::File(_) => "JobInput::File",
            JobInput::Reader(_) => "JobInput::Reader",
        })
    }
}

fn add_sent(sent: &std::sync::atomic::AtomicU64, n: usize) {
    sent.fetch_add(
        u64::try_from(n).unwrap_or(u64::MAX),
        std::sync::atomic::Ordering::Relaxed,
    );
}

/// The input through the stream, every frame shown to the hook.
async fn send_input(
    input: JobInput,
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
    let InputFrames { mut frames, spare } = spawn_input_reader(input.into_reader());
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
        add_sent(&sent, n);
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

/// The input through the socket: a regular file with `sendfile` (only the
/// frame headers pass through this process), anything else as frames read
/// on a blocking thread.
async fn send_input_zero_copy(
    input: JobInput,
    socket: Arc<Socket>,
    spec: JobSpec,
    sent: Arc<std::sync::atomic::AtomicU64>,
) -> Result<(), RunError> {
    socket
        .write_all(&frame_of(&JobRequest::Start(spec))?)
        .await
        .map_err(io("sending the job"))?;
    let chunk = INPUT_CHUNK.min(MAX_CHUNK_LEN);
    // A regular file is sent from where its position stands (as a reader
    // would read it) to its length now; a file that grows meanwhile is sent
    // as it was, one that shrinks fails the job.
    let extent = match &input {
        JobInput::File(file) => match file.metadata() {
            Ok(meta) if meta.is_file() => Some((
                std::io::Seek::stream_position(&mut &*file).map_err(io("reading the input"))?,
                meta.len(),
            )),
            Ok(_) => None,
            Err(e) => return Err(io("reading the input")(e)),
        },
        JobInput::Reader(_) => None,
    };
    match (input, extent) {
        (JobInput::File(file), Some((start, len))) => {
            let mut offset = start;
            while offset < len {
                let n = usize::try_from(len.saturating_sub(offset))
                    .unwrap_or(usize::MAX)
                    .min(chunk);
                let head = data_frame_header(n).map_err(|e| RunError::Protocol(e.to_string()))?;
                socket
                    .write_all(&head)
                    .await
                    .map_err(io("sending the input"))?;
                socket
                    .send_file(&file, &mut offset, n)
                    .await
                    .map_err(io("sending the input"))?;
                add_sent(&sent, n);
            }
        }
        (input, _) => {
            let InputFrames { mut frames, spare } = spawn_input_reader(input.into_reader());
            while let Some(frame) = frames.recv().await {
                let frame = frame?;
                socket
                    .write_all(&frame)
                    .await
                    .map_err(io("sending the input"))?;
                add_sent(&sent, frame.len().saturating_sub(DATA_FRAME_HEADER_LEN));
                let _ = spare.try_send(frame);
            }
        }
    }
    socket
        .write_all(&frame_of(&JobRequest::End)?)
        .await
        .map_err(io("ending the input"))?;
    Ok(())
}

/// Run `job` on `input` (a file, or [`JobInput::reader`]); on success the
/// output is at `output`, replacing what was there in one rename (a failed
/// job leaves it as it was). `parent run` refuses an existing output
/// unless told to replace it.
pub async fn run_job(
    job: &JobRun,
    input: impl Into<JobInput>,
    output: &Path,
    progress: impl FnMut(&Progress),
) -> Result<JobReport, RunError> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, kluis_transport::connect(&job.enclave))
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no connection within {CONNECT_TIMEOUT:?}"),
            ))
        })
        .map_err(|source| RunError::Connect {
            address: job.enclave.to_string(),
            source,
        })?;
    run_job_on(job, stream, input, output, progress).await
}

/// How long [`run_job`] waits for its connection to the enclave (a vsock
/// connect to a CID that is not up can hang; an enclave that may still be
/// starting is waited for with [`crate::connect::connect_patiently`]).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The enclave's text as the operator's terminal and logs may show it:
/// control characters (escape sequences, carriage returns) are escaped, so
/// a hostile enclave cannot rewrite what is on the screen.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().collect()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// What the job has sent and heard so far.
struct Tally {
    state: Progress,
    output_key: Option<(String, u32)>,
    /// Input bytes sent, counted by the input's sender task.
    sent: Arc<std::sync::atomic::AtomicU64>,
    started: Instant,
}

impl Tally {
    /// Take in one message frame; `Some` when it says the job is done.
    fn message(&mut self, frame: &[u8]) -> Result<Option<JobCounts>, RunError> {
        // A hook in a test may have made anything of a frame: decode it
        // like any peer's.
        // The decoder's message can quote the enclave's bytes.
        let event = kluis_proto::job::decode_job_frame::<JobEvent>(frame)
            .map_err(|e| RunError::Protocol(printable(&e.to_string())))?;
        match event {
            JobEvent::Started {
                output_key_id,
                output_key_version,
            } => {
                self.output_key = Some((output_key_id, output_key_version));
                Ok(None)
            }
            // A data frame is never a message; one decoded as such is over
            // the chunk limit.
            JobEvent::Data(_) => Err(RunError::Protocol(
                "a data frame over the chunk limit".into(),
            )),
            JobEvent::Progress(counts) => {
                self.state.counts = counts;
                Ok(None)
            }
            JobEvent::Done(counts) => Ok(Some(counts)),
            JobEvent::Failed { kind, reason } => Err(RunError::Failed {
                kind,
                reason: printable(&reason),
            }),
            _ => Err(RunError::Protocol("an unknown event".into())),
        }
    }

    /// Report progress so far.
    fn tell(&mut self, progress: &mut impl FnMut(&Progress)) {
        self.state.sent = self.sent.load(std::sync::atomic::Ordering::Relaxed);
        self.state.elapsed = self.started.elapsed();
        progress(&self.state);
    }

    fn received(&mut self, n: usize) {
        self.state.received = self
            .state
            .received
            .saturating_add(u64::try_from(n).unwrap_or(u64::MAX));
    }
}

/// What the enclave's side of the connection failing means for the job.
fn enclave_side_error(e: std::io::Error) -> RunError {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => {
            RunError::Incomplete
        }
        _ => RunError::Protocol(format!("from the enclave: {e}")),
    }
}

/// After `Done`: the output's writer (a blocking task that ends with the
/// output's final fsync) and the input's sender (the enclave read `End`, so
/// it has finished or is about to) must both have succeeded.
async fn conclude<T>(
    writer: tokio::task::JoinHandle<std::io::Result<()>>,
    mut sender: tokio::task::JoinHandle<Result<T, RunError>>,
    idle: Duration,
) -> Result<(), RunError> {
    let written = match writer.await {
        Ok(r) => r.map_err(io("writing the output")),
        Err(_) => Err(RunError::Protocol("the output writer failed".into())),
    };
    let sent = match tokio::time::timeout(idle, &mut sender).await {
        Ok(Ok(Ok(_))) => Ok(()),
        Ok(Ok(Err(e))) => Err(e),
        Ok(Err(_)) => Err(RunError::Protocol("the input sender failed".into())),
        Err(_) => {
            // It is stopped, not left holding the input and the connection.
            sender.abort();
            Err(RunError::Timeout(idle))
        }
    };
    sent.and(written)
}

/// [`run_job`] over a connection already made to `job.enclave` (by
/// [`crate::connect::connect_patiently`], say).
pub async fn run_job_on(
    job: &JobRun,
    stream: kluis_transport::BoxStream,
    input: impl Into<JobInput>,
    output: &Path,
    mut progress: impl FnMut(&Progress),
) -> Result<JobReport, RunError> {
    let input = input.into();
    let mut tally = Tally {
        state: Progress::default(),
        output_key: None,
        sent: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        started: Instant::now(),
    };
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
    // In production no hook looks at the frames, and the bulk bytes move in
    // the kernel; a test's hook sees every frame whole.
    let socket = match stream.socket() {
        Some(fd) if job.hook.passes_through() => {
            Some(Socket::duplicate(fd).map_err(io("using the connection to the enclave"))?)
        }
        _ => None,
    };
    let outcome = match socket {
        Some(socket) => {
            let outcome = exchange_zero_copy(
                job,
                Arc::new(socket),
                input,
                partial_file,
                &mut tally,
                &mut progress,
            )
            .await;
            // The stream's own descriptor stayed open until now.
            drop(stream);
            outcome
        }
        None => exchange_copying(job, stream, input, partial_file, &mut tally, &mut progress).await,
    };
    let counts = match outcome {
        Ok(counts) => counts,
        Err(e) => {
            let _ = std::fs::remove_file(&partial_path);
            return Err(e);
        }
    };
    partial_path.persist(output).map_err(|e| RunError::Io {
        context: format!("moving the output into place at {}", output.display()),
        source: e.error,
    })?;
    // The rename is durable only once the directory is: a job is reported
    // done only then. A file system that cannot sync a directory at all
    // (EINVAL, ENOTSUP: some network and FUSE file systems) is not an error.
    let synced = std::fs::File::open(&dir).and_then(|d| d.sync_all());
    if let Err(e) = synced {
        let unsupported = [rustix::io::Errno::INVAL, rustix::io::Errno::NOTSUP]
            .iter()
            .any(|errno| e.raw_os_error() == Some(errno.raw_os_error()));
        if !unsupported {
            return Err(RunError::Io {
                context: format!(
                    "syncing the directory of the output {} after moving it into place \
                     (the output is whole and in place; it may not survive a crash)",
                    output.display()
                ),
                source: e,
            });
        }
    }
    tally.state.counts = counts;
    tally.tell(&mut progress);
    Ok(JobReport {
        counts,
        input_bytes: tally.state.sent,
        output_bytes: tally.state.received,
        output_key: tally.output_key,
        output: output.to_path_buf(),
        elapsed: tally.state.elapsed,
    })
}

/// The job with every frame read whole and shown to the hook; the output
/// is written by a blocking thread. Returns once the output is on disk
/// (fsync) and the input all sent.
async fn exchange_copying(
    job: &JobRun,
    stream: kluis_transport::BoxStream,
    input: JobInput,
    partial_file: std::fs::File,
    tally: &mut Tally,
    progress: &mut impl FnMut(&Progress),
) -> Result<JobCounts, RunError> {
    let mut guard = OutputGuard::new(
        job.output_limits,
        partial_file.try_clone().map_err(io("writing the output"))?,
    )?;
    // The output is written by a blocking thread, straight from the data
    // frames (checked as such before they are sent here).
    let (out_tx, mut out_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
    // Written frames come back for reuse (at most the channel's worth, plus
    // the one being read, are ever allocated).
    let (spare_tx, mut spare_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(9);
    let writer = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        use std::io::Write;
        let mut file = partial_file;
        let mut behind = WriteBehind::start(&file)?;
        while let Some(frame) = out_rx.blocking_recv() {
            let payload = frame.get(DATA_FRAME_HEADER_LEN..).unwrap_or_default();
            file.write_all(payload)?;
            behind.wrote(u64::try_from(payload.len()).unwrap_or(u64::MAX));
            let _ = spare_tx.try_send(frame);
        }
        behind.finish(&file).map(drop)
    });

    let (mut from_enclave, to_enclave) = tokio::io::split(stream);
    let sender = tokio::spawn(send_input(
        input,
        to_enclave,
        job.spec.clone(),
        Arc::clone(&job.hook),
        Arc::clone(&tally.sent),
    ));

    let result: Result<JobCounts, RunError> = async {
        loop {
            let mut frame = spare_rx.try_recv().unwrap_or_default();
            tokio::time::timeout(
                job.idle_timeout,
                read_raw_frame_into(&mut from_enclave, JOB_MAX_FRAME_LEN, &mut frame),
            )
            .await
            .map_err(|_| RunError::Timeout(job.idle_timeout))?
            .map_err(enclave_side_error)?
            .then_some(())
            .ok_or(RunError::Incomplete)?;
            for frame in job
                .hook
                .on_frame(Channel::Job, Direction::FromEnclave, frame)
            {
                if let Some(payload) = kluis_proto::job::data_payload(&frame) {
                    // The data path: hand the frame to the writer as it is.
                    guard.admit(payload.len())?;
                    tally.received(payload.len());
                    out_tx.send(frame).await.map_err(|_| RunError::Io {
                        context: "writing the output".into(),
                        source: std::io::Error::other("the output writer stopped"),
                    })?;
                    continue;
                }
                if let Some(counts) = tally.message(&frame)? {
                    return Ok(counts);
                }
            }
            tally.tell(progress);
        }
    }
    .await;
    let counts = match result {
        Ok(counts) => counts,
        Err(e) => {
            sender.abort();
            drop(out_tx);
            let _ = writer.await;
            // An input error explains a failure better than its echo.
            return Err(e);
        }
    };
    drop(out_tx);
    conclude(writer, sender, job.idle_timeout).await?;
    Ok(counts)
}

/// The job with the bulk bytes moved in the kernel ([`crate::zerocopy`]):
/// the output's data frames are spliced from the socket into the file, the
/// enclave's messages are read whole. Returns once the output is on disk
/// (fsync) and the input all sent.
async fn exchange_zero_copy(
    job: &JobRun,
    socket: Arc<Socket>,
    input: JobInput,
    partial_file: std::fs::File,
    tally: &mut Tally,
    progress: &mut impl FnMut(&Progress),
) -> Result<JobCounts, RunError> {
    let pipe = Pipe::new().map_err(io("making a pipe for the output"))?;
    let mut guard = OutputGuard::new(job.output_limits, &partial_file)?;
    let mut behind = WriteBehind::start(&partial_file).map_err(io("writing the output"))?;
    let sender = tokio::spawn(send_input_zero_copy(
        input,
        Arc::clone(&socket),
        job.spec.clone(),
        Arc::clone(&tally.sent),
    ));
    let idle = job.idle_timeout;
    let result: Result<JobCounts, RunError> = async {
        loop {
            let mut raw_head = [0u8; FRAME_HEADER_LEN];
            tokio::time::timeout(idle, socket.read_exact(&mut raw_head))
                .await
                .map_err(|_| RunError::Timeout(idle))?
                .map_err(enclave_side_error)?;
            let head = check_head(&raw_head, JOB_MAX_FRAME_LEN)
                .map_err(|e| RunError::Protocol(format!("from the enclave: {e}")))?
                .ok_or_else(|| RunError::Protocol("a short frame header".into()))?;
            match head.kind {
                FrameKind::Data if head.body_len <= MAX_CHUNK_LEN => {
                    guard.admit(head.body_len)?;
                    tokio::time::timeout(
                        idle,
                        socket.splice_to_file(&pipe, &partial_file, head.body_len),
                    )
                    .await
                    .map_err(|_| RunError::Timeout(idle))?
                    .map_err(|e| match e.kind() {
                        std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => {
                            RunError::Incomplete
                        }
                        _ => io("writing the output")(e),
                    })?;
                    tally.received(head.body_len);
                    behind.wrote(u64::try_from(head.body_len).unwrap_or(u64::MAX));
                }
                FrameKind::Data => {
                    return Err(RunError::Protocol(
                        "a data frame over the chunk limit".into(),
                    ))
                }
                FrameKind::Message => {
                    let mut frame = vec![0u8; head.frame_len()];
                    if let Some(slot) = frame.get_mut(..FRAME_HEADER_LEN) {
                        slot.copy_from_slice(&raw_head);
                    }
                    tokio::time::timeout(
                        idle,
                        socket.read_exact(frame.get_mut(FRAME_HEADER_LEN..).unwrap_or_default()),
                    )
                    .await
                    .map_err(|_| RunError::Timeout(idle))?
                    .map_err(enclave_side_error)?;
                    if let Some(counts) = tally.message(&frame)? {
                        return Ok(counts);
                    }
                }
            }
            tally.tell(progress);
        }
    }
    .await;
    let counts = match result {
        Ok(counts) => counts,
        Err(e) => {
            sender.abort();
            return Err(e);
        }
    };
    let writer = tokio::task::spawn_blocking(move || behind.finish(&partial_file).map(drop));
    conclude(writer, sender, idle).await?;
    Ok(counts)
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

    /// The enclave's failure text reaches the operator with its control
    /// characters escaped: no escape sequence or carriage return survives.
    #[test]
    fn an_enclave_s_failure_text_cannot_drive_the_terminal() {
        let mut tally = Tally {
            state: Progress::default(),
            output_key: None,
            sent: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            started: Instant::now(),
        };
        let hostile = "job failed\x1b]0;owned\x07\r\x1b[2Jall good\u{9b}31m";
        let frame = kluis_proto::job::encode_job_frame(&JobEvent::Failed {
            kind: FailureKind::Internal,
            reason: hostile.to_owned(),
        })
        .unwrap();
        let Err(RunError::Failed { reason, .. }) = tally.message(&frame) else {
            panic!("not a failure")
        };
        assert!(!reason.chars().any(char::is_control), "{reason:?}");
        assert!(reason.starts_with("job failed\\u{1b}]0;owned"), "{reason}");
        assert!(reason.contains("all good"));
    }

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

    /// Passes frames on unchanged, but says it looks at them: the job runs
    /// with every frame in user memory, as under a test's hook.
    struct Looking;

    impl FrameHook for Looking {
        fn on_frame(&self, _: Channel, _: Direction, frame: Vec<u8>) -> Vec<Vec<u8>> {
            vec![frame]
        }
    }

    /// What the scripted enclave does after the parent's `End`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Script {
        /// Started, two data frames, progress, Done.
        Good,
        /// As `Good`, with more output than the write-behind's step between
        /// the two frames (as many full frames as that takes).
        Long,
        /// Announces 1,000 bytes of data, sends 10, closes.
        CutInData,
        /// A whole data frame one byte over the chunk limit.
        OverLimit,
        /// A header of another protocol version.
        OtherVersion,
        /// Failed.
        Fails,
    }

    const OUT_A: usize = 300 * 1024 + 5;
    const OUT_B: usize = 3;
    /// The long script's middle: a little over one write-behind step.
    const LONG_FRAMES: usize = crate::writebehind::STEP as usize / MAX_CHUNK_LEN + 1;

    /// What the script sends as output, in order.
    fn expected_output(script: Script) -> Vec<u8> {
        let mut expected = output_bytes(OUT_A, 1);
        if script == Script::Long {
            for i in 0..LONG_FRAMES {
                expected.extend_from_slice(&output_bytes(MAX_CHUNK_LEN, i as u8));
            }
        }
        expected.extend_from_slice(&output_bytes(OUT_B, 2));
        expected
    }

    fn output_bytes(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// Reads the job and its whole input, answers as `script` says; returns
    /// the input's data bytes.
    async fn scripted_enclave(mut s: tokio::net::UnixStream, script: Script) -> Vec<u8> {
        use kluis_proto::job::{data_frame, decode_job_frame, encode_job_frame};
        let start = kluis_proto::frame::read_raw_frame(&mut s, JOB_MAX_FRAME_LEN)
            .await
            .unwrap();
        assert!(matches!(
            decode_job_frame::<JobRequest>(&start).unwrap(),
            JobRequest::Start(_)
        ));
        let mut input = Vec::new();
        loop {
            let frame = kluis_proto::frame::read_raw_frame(&mut s, JOB_MAX_FRAME_LEN)
                .await
                .unwrap();
            if let Some(payload) = kluis_proto::job::data_payload(&frame) {
                input.extend_from_slice(payload);
                continue;
            }
            assert_eq!(
                decode_job_frame::<JobRequest>(&frame).unwrap(),
                JobRequest::End
            );
            break;
        }
        let event = |e: &JobEvent| encode_job_frame(e).unwrap();
        let counts = JobCounts {
            records_in: 1,
            records_out: 2,
            bytes_in: 3,
            bytes_out: 4,
        };
        s.write_all(&event(&JobEvent::Started {
            output_key_id: "out".into(),
            output_key_version: 7,
        }))
        .await
        .unwrap();
        match script {
            Script::Good | Script::Long => {
                s.write_all(&data_frame(&output_bytes(OUT_A, 1)).unwrap())
                    .await
                    .unwrap();
                if script == Script::Long {
                    for i in 0..LONG_FRAMES {
                        s.write_all(&data_frame(&output_bytes(MAX_CHUNK_LEN, i as u8)).unwrap())
                            .await
                            .unwrap();
                    }
                }
                s.write_all(&event(&JobEvent::Progress(counts)))
                    .await
                    .unwrap();
                s.write_all(&data_frame(&output_bytes(OUT_B, 2)).unwrap())
                    .await
                    .unwrap();
                s.write_all(&event(&JobEvent::Done(counts))).await.unwrap();
            }
            Script::CutInData => {
                let frame = data_frame(&[9u8; 1000]).unwrap();
                s.write_all(&frame[..DATA_FRAME_HEADER_LEN + 10])
                    .await
                    .unwrap();
            }
            Script::OverLimit => {
                let mut head = data_frame_header(MAX_CHUNK_LEN).unwrap();
                // The length prefix counts version, kind and body: one more.
                let len = u32::from_be_bytes(head[..4].try_into().unwrap()) + 1;
                head[..4].copy_from_slice(&len.to_be_bytes());
                // The parent may stop reading at the header.
                let _ = s.write_all(&head).await;
                let _ = s.write_all(&vec![0u8; MAX_CHUNK_LEN + 1]).await;
            }
            Script::OtherVersion => {
                let mut head = data_frame_header(10).unwrap();
                head[4] = head[4].wrapping_add(1);
                s.write_all(&head).await.unwrap();
                s.write_all(&[0u8; 10]).await.unwrap();
            }
            Script::Fails => {
                s.write_all(&event(&JobEvent::Failed {
                    kind: FailureKind::Workload,
                    reason: "no".into(),
                }))
                .await
                .unwrap();
            }
        }
        let _ = s.shutdown().await;
        input
    }

    /// The kernel's path (pass-through hook on a socket) and the copying
    /// path (a hook that looks at frames) give the same output, report and
    /// errors, and a failed job leaves nothing behind.
    #[tokio::test]
    async fn both_exchanges_agree_on_output_and_failures() {
        for hook in [
            Arc::new(crate::hook::PassThrough) as Arc<dyn FrameHook>,
            Arc::new(Looking),
        ] {
            let zero_copy = hook.passes_through();
            for script in [
                Script::Good,
                Script::Long,
                Script::CutInData,
                Script::OverLimit,
                Script::OtherVersion,
                Script::Fails,
            ] {
                let dir = tempfile::tempdir().unwrap();
                let input_path = dir.path().join("input");
                let input = output_bytes(INPUT_CHUNK * 2 + 11, 5);
                std::fs::write(&input_path, &input).unwrap();
                let (ours, theirs) = tokio::net::UnixStream::pair().unwrap();
                let enclave = tokio::spawn(scripted_enclave(theirs, script));
                let job = JobRun {
                    enclave: "unix:/nonexistent".parse().unwrap(),
                    spec: JobSpec {
                        job_id: "t".into(),
                        workload: kluis_proto::job::WorkloadSpec::Identity,
                        output_key: "out".into(),
                        secrets: vec![],
                        authorisation: None,
                    },
                    hook: Arc::clone(&hook),
                    idle_timeout: Duration::from_secs(20),
                    output_limits: OutputLimits::default(),
                };
                let output = dir.path().join("output");
                let result = run_job_on(
                    &job,
                    Box::new(ours),
                    std::fs::File::open(&input_path).unwrap(),
                    &output,
                    |_| {},
                )
                .await;
                let what = format!("{script:?}, zero copy {zero_copy}");
                assert_eq!(enclave.await.unwrap(), input, "{what}");
                match (script, result) {
                    (Script::Good | Script::Long, Ok(report)) => {
                        let expected = expected_output(script);
                        assert_eq!(std::fs::read(&output).unwrap(), expected, "{what}");
                        assert_eq!(report.input_bytes, input.len() as u64, "{what}");
                        assert_eq!(report.output_bytes, expected.len() as u64, "{what}");
                        assert_eq!(report.output_key, Some(("out".into(), 7)), "{what}");
                        assert_eq!(report.counts.bytes_out, 4, "{what}");
                    }
                    (Script::CutInData, Err(RunError::Incomplete))
                    | (Script::OverLimit | Script::OtherVersion, Err(RunError::Protocol(_)))
                    | (
                        Script::Fails,
                        Err(RunError::Failed {
                            kind: FailureKind::Workload,
                            ..
                        }),
                    ) => {
                        let left: Vec<_> = std::fs::read_dir(dir.path())
                            .unwrap()
                            .map(|e| e.unwrap().file_name())
                            .collect();
                        assert_eq!(left, vec![std::ffi::OsString::from("input")], "{what}");
                    }
                    (_, other) => panic!("{what}: {other:?}"),
                }
            }
        }
    }
}
