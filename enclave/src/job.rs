//! One confidential job, from the enclave's side.
//!
//! ```text
//! parent ─Start, Data…, End─▶ input pump ─ciphertext─▶ [header] ─▶ key release (via the parent's relay)
//!                                                     │
//!                        decrypt + workload (thread) ─plaintext batches─▶ seal (thread) ─Data…─▶ event writer ─▶ parent
//! ```
//!
//! - The input pump and the event writer are async tasks; decryption with
//!   the workload, and sealing, are two blocking threads joined by a bounded
//!   channel, so the two AES-GCM passes run on two cores and every stage
//!   waits for the slower one (back-pressure end to end: a parent that sends
//!   faster than the enclave works blocks on its socket; one that reads
//!   slower stalls the enclave, never grows its memory).
//! - Memory per job is constant: a few chunks of ciphertext in channels,
//!   one segment of plaintext in the reader and writer, one batch in the
//!   workload.
//! - Plaintext lives only in zeroizing buffers; the data keys are
//!   [`DataKey`]s (zeroized on drop) and never leave this module.
//! - The job is `Done` only when the input envelope authenticated to its
//!   final segment, the parent said `End`, the workload finished and the
//!   output's final segment was sent. Any error before that sends `Failed`
//!   with a stable kind, and the output sent so far can never decrypt as
//!   complete (it lacks its final segment).
//! - The job is one owned task tree under one cancellation token: on any
//!   failure and at the deadline every part stops and is joined before
//!   `Failed` is written (see [`serve_job`]); nothing follows it.
//! - When a workload fails, the failure is reported after the whole input
//!   was read (`drain`), and progress is the input read so far, coarsely
//!   (`ProgressReporter`), so neither tells the parent where the data
//!   failed; the output, which stops growing within one frame of the
//!   failure, does (SECURITY.md, "What a hostile parent learns").

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use kluis_envelope::{
    DataKey, DecryptError, EnvelopeHeader, EnvelopeReader, EnvelopeWriter, WrappedKey, WriteInPlace,
};
use kluis_proto::job::{
    data_frame_header, FailureKind, JobCounts, JobEvent, JobRequest, JobSpec, WorkloadSpec,
    DATA_FRAME_HEADER_LEN, JOB_MAX_FRAME_LEN, MAX_CHUNK_LEN,
};
use kluis_proto::{KeyOperation, ReleasedKey, SignedAuthorisation, WireError};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use zeroize::Zeroizing;

pub use crate::pipeline::JobError;
use crate::pipeline::{
    cancelled, decrypt_error, drain, read_error, write_error, BatchSender, Cancel, Outgoing,
    ProgressReporter, ToSealer, READ_CHUNK,
};
use crate::workload::{self, Counts, RecordFramer};
use crate::{exec, release, EnclaveContext};

/// Ciphertext chunks in flight in each direction.
const CHANNEL_DEPTH: usize = 8;
/// Plaintext batches in flight between the workload and the sealer.
const BATCH_DEPTH: usize = 4;

/// From the input pump to the decryptor.
pub(crate) enum Input {
    /// A whole data frame from the parent: its payload (after
    /// [`DATA_FRAME_HEADER_LEN`] bytes of header) is the next ciphertext.
    /// The frame travels as it was read: no copy to strip the header.
    Chunk(Vec<u8>),
    /// The parent said `End`: the input is complete.
    End,
}

/// Reads ciphertext chunks from the input pump (blocking). The input ends
/// only with the parent's `End`; a pump that stops without it (the parent
/// closed, stalled or misbehaved) is an error, so the decryptor never
/// finishes, and the output never gets its final segment.
struct ChannelReader {
    rx: mpsc::Receiver<Input>,
    chunk: Vec<u8>,
    pos: usize,
    /// Consumed frames go back to the pump, which reads the next ones into
    /// them (ciphertext only; a frame with no room there is freed).
    spare: mpsc::Sender<Vec<u8>>,
    /// The parent's `End` came: the input stays at its end, however often
    /// it is asked (the decryptor looks, then reads).
    ended: bool,
}

impl ChannelReader {
    fn new(rx: mpsc::Receiver<Input>, spare: mpsc::Sender<Vec<u8>>) -> Self {
        ChannelReader {
            rx,
            chunk: Vec::new(),
            pos: 0,
            spare,
            ended: false,
        }
    }
}

impl std::io::BufRead for ChannelReader {
    /// The rest of the current frame's payload (the decryptor opens whole
    /// segments there, in place); empty at the parent's `End`.
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        while self.pos >= self.chunk.len() {
            if self.ended {
                return Ok(&[]);
            }
            match self.rx.blocking_recv() {
                Some(Input::Chunk(next)) => {
                    let used = std::mem::replace(&mut self.chunk, next);
                    let _ = self.spare.try_send(used);
                    self.pos = DATA_FRAME_HEADER_LEN;
                }
                Some(Input::End) => self.ended = true,
                None => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the input stopped without the parent's End",
                    ))
                }
            }
        }
        Ok(self.chunk.get(self.pos..).unwrap_or_default())
    }

    fn consume(&mut self, n: usize) {
        self.pos = self.pos.saturating_add(n).min(self.chunk.len());
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::io::BufRead;
        let available = self.fill_buf()?;
        let n = available.len().min(buf.len());
        if let (Some(dst), Some(src)) = (buf.get_mut(..n), available.get(..n)) {
            dst.copy_from_slice(src);
        }
        self.consume(n);
        Ok(n)
    }
}

/// A data frame's whole buffer: its header, then room for the largest chunk.
const FRAME_CAPACITY: usize = DATA_FRAME_HEADER_LEN.saturating_add(MAX_CHUNK_LEN);

/// Turns output ciphertext into `Data` frames (blocking), built in place:
/// the envelope writer seals each segment straight into the frame
/// ([`WriteInPlace`]), and the header goes in front when the frame is sent.
struct ChannelWriter {
    tx: mpsc::Sender<Outgoing>,
    /// The frame being built. It is always [`FRAME_CAPACITY`] long (a reused
    /// frame is never truncated, so never zero-filled again); its first
    /// `used` bytes (header room, then output) are what gets sent.
    buf: Vec<u8>,
    used: usize,
    sent: u64,
    /// Written frames come back here from the event writer.
    spare_tx: mpsc::Sender<Vec<u8>>,
    spare_rx: mpsc::Receiver<Vec<u8>>,
}

impl ChannelWriter {
    fn new(tx: mpsc::Sender<Outgoing>) -> Self {
        // Room for every frame that can be in flight, and the one written.
        let (spare_tx, spare_rx) = mpsc::channel(CHANNEL_DEPTH.saturating_add(1));
        let mut writer = ChannelWriter {
            tx,
            buf: Vec::new(),
            used: DATA_FRAME_HEADER_LEN,
            sent: 0,
            spare_tx,
            spare_rx,
        };
        writer.buf = writer.next_buffer();
        writer
    }

    /// A frame to fill: a written one back from the event writer (its old
    /// ciphertext is overwritten before it is sent again), or a new one.
    fn next_buffer(&mut self) -> Vec<u8> {
        let mut buf = self.spare_rx.try_recv().unwrap_or_default();
        buf.resize(FRAME_CAPACITY, 0);
        buf
    }

    fn send_buffer(&mut self) -> std::io::Result<()> {
        let payload = self.used.saturating_sub(DATA_FRAME_HEADER_LEN);
        if payload == 0 {
            return Ok(());
        }
        let header = data_frame_header(payload).map_err(std::io::Error::other)?;
        if let Some(slot) = self.buf.get_mut(..DATA_FRAME_HEADER_LEN) {
            slot.copy_from_slice(&header);
        }
        let next = self.next_buffer();
        let frame = std::mem::replace(&mut self.buf, next);
        let len = std::mem::replace(&mut self.used, DATA_FRAME_HEADER_LEN);
        self.sent = self
            .sent
            .saturating_add(u64::try_from(payload).unwrap_or(u64::MAX));
        self.tx
            .blocking_send(Outgoing::Frame {
                frame,
                len,
                spare: self.spare_tx.clone(),
            })
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "output closed"))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let free = self.buf.get_mut(self.used..).unwrap_or_default();
        let n = free.len().min(data.len());
        if let (Some(dst), Some(src)) = (free.get_mut(..n), data.get(..n)) {
            dst.copy_from_slice(src);
        }
        self.used = self.used.saturating_add(n);
        if self.used >= FRAME_CAPACITY {
            self.send_buffer()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send_buffer()
    }
}

impl WriteInPlace for ChannelWriter {
    fn room(&mut self, len: usize) -> std::io::Result<Option<&mut [u8]>> {
        if len > MAX_CHUNK_LEN {
            return Ok(None);
        }
        // A segment is never split across frames: a frame that cannot take
        // it whole goes now, a little short of full.
        if self.used.saturating_add(len) > FRAME_CAPACITY {
            self.send_buffer()?;
        }
        Ok(self.buf.get_mut(self.used..self.used.saturating_add(len)))
    }

    fn commit(&mut self, len: usize) -> std::io::Result<()> {
        self.used = self.used.saturating_add(len).min(FRAME_CAPACITY);
        if self.used >= FRAME_CAPACITY {
            self.send_buffer()?;
        }
        Ok(())
    }
}

/// Read the parent's `Start` within `timeout`. A connection that has not
/// sent a complete `Start` by then is closed without ever taking a job slot.
pub async fn read_start<R: AsyncRead + Unpin>(
    reader: &mut R,
    timeout: Duration,
) -> Result<JobSpec, JobError> {
    let first = tokio::time::timeout(
        timeout,
        kluis_proto::job::read_job_message::<JobRequest, _>(reader),
    )
    .await
    .map_err(|_| {
        JobError::new(
            FailureKind::StartTimeout,
            format!("no complete Start within {}s", timeout.as_secs()),
        )
    })?
    .map_err(|e| JobError::new(FailureKind::Protocol, format!("from the parent: {e}")))?;
    match first {
        JobRequest::Start(spec) => Ok(spec),
        _ => Err(JobError::new(
            FailureKind::Protocol,
            "the first message of a job must be Start",
        )),
    }
}

/// The last event of a job, written after every other part of the job has
/// stopped (so nothing ever follows it).
fn last_event(result: &Result<JobCounts, JobError>) -> JobEvent {
    match result {
        Ok(counts) => JobEvent::Done(*counts),
        Err(e) => JobEvent::Failed {
            kind: e.kind,
            reason: e
                .message
                .chars()
                .take(kluis_proto::job::MAX_TEXT_LEN / 4)
                .collect(),
        },
    }
}

/// Write a job's final event (bounded: a parent that does not read gets
/// nothing), then close the stream.
pub(crate) async fn write_last<W: AsyncWrite + Unpin>(
    writer: &mut W,
    result: &Result<JobCounts, JobError>,
    timeout: Duration,
) {
    use tokio::io::AsyncWriteExt;
    let event = last_event(result);
    let _ = tokio::time::timeout(timeout, async {
        let _ = kluis_proto::job::write_job_message(writer, &event).await;
        let _ = writer.shutdown().await;
    })
    .await;
}

/// Cancels its job when dropped.
struct CancelOnDrop(Cancel);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// Serve one job whose `Start` was read, until `deadline` at the latest, and
/// return how it ended (also sent to the parent, when the connection still
/// works).
///
/// The job is one owned task tree. On any failure, and at the deadline,
/// every part of it is cancelled and joined before this returns: the input
/// pump stops reading, the event writer stops writing (queued output is
/// dropped), the worker and sealer threads end (their channels close and
/// they poll the cancellation), an `exec` program's process group is
/// killed. Only then is `Failed` written, so nothing follows it, and the
/// output sent before it lacks its final segment. The caller's job slot is
/// freed when this returns, that is, when nothing of the job is left.
pub async fn serve_job<R, W>(
    reader: R,
    writer: W,
    spec: JobSpec,
    ctx: Arc<EnclaveContext>,
    deadline: tokio::time::Instant,
) -> Result<JobCounts, JobError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let cancel = Cancel::new();
    // A job abandoned at shutdown (its task dropped, not finished) is
    // cancelled all the same: the threads it started see that and stop, and
    // an `exec` program's group is killed, not left running.
    let _cancel_if_dropped = CancelOnDrop(cancel.clone());
    let (events_tx, events_rx) = mpsc::channel::<Outgoing>(CHANNEL_DEPTH);
    let event_writer = tokio::spawn(write_events(
        writer,
        events_rx,
        ctx.idle_timeout,
        cancel.clone(),
    ));
    let job = run(reader, spec, &ctx, events_tx, cancel.clone());
    tokio::pin!(job);
    // A parent that trickles input keeps resetting the idle timeout; the
    // deadline (from accept) bounds how long it can hold a slot.
    let result = tokio::select! {
        r = &mut job => r,
        () = tokio::time::sleep_until(deadline) => {
            cancel.cancel();
            // Every part watches the cancellation: this returns promptly,
            // and only once every thread of the job has ended.
            let _ = job.await;
            Err(JobError::new(
                FailureKind::JobTimeout,
                format!("the job ran longer than {}s", ctx.job_timeout.as_secs()),
            ))
        }
    };
    if result.is_err() {
        cancel.cancel();
    }
    let (writer, written) = match event_writer.await {
        Ok((writer, written)) => (Some(writer), written),
        Err(_) => (None, Err(WriterEnd::Broken)),
    };
    let whole = written_whole(&written);
    let result = match written {
        Ok(()) => result,
        // The parent did not take the whole output: whatever `run` thought,
        // the job did not complete.
        Err(WriterEnd::Failed(e)) => result.and(Err(JobError::new(
            FailureKind::OutputClosed,
            format!("sending to the parent: {e}"),
        ))),
        Err(WriterEnd::Broken) => result.and(Err(JobError::new(
            FailureKind::OutputClosed,
            "the job stopped in the middle of a frame",
        ))),
    };
    // A frame cut short (or a writer gone) leaves a stream that cannot
    // carry another frame; closing it tells the parent enough.
    if let (Some(mut writer), true) = (writer, whole) {
        write_last(
            &mut writer,
            &result,
            LAST_EVENT_TIMEOUT.min(ctx.idle_timeout),
        )
        .await;
    }
    result
}

/// How long the final event may take to write.
const LAST_EVENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the event writer stopped early.
enum WriterEnd {
    /// Writing failed (the parent stopped reading or closed).
    Failed(WireError),
    /// Cancelled in the middle of a frame: the stream is unusable.
    Broken,
}

fn written_whole(written: &Result<(), WriterEnd>) -> bool {
    !matches!(written, Err(WriterEnd::Broken))
}

/// Forwards the job's output frames and events to the parent until the
/// channel closes (every producer is done) or the job is cancelled (then
/// whatever is queued is dropped). Returns the stream for the final event.
async fn write_events<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut events: mpsc::Receiver<Outgoing>,
    timeout: Duration,
    cancel: Cancel,
) -> (W, Result<(), WriterEnd>) {
    use tokio::io::AsyncWriteExt;
    loop {
        let outgoing = tokio::select! {
            biased;
            () = cancel.cancelled() => return (writer, Ok(())),
            next = events.recv() => match next {
                Some(o) => o,
                None => return (writer, Ok(())),
            },
        };
        let write = async {
            match outgoing {
                Outgoing::Event(event) => {
                    kluis_proto::job::write_job_message(&mut writer, &event).await
                }
                Outgoing::Frame { frame, len, spare } => {
                    let whole = frame.get(..len).ok_or_else(|| {
                        kluis_proto::FrameError::Io(std::io::Error::other(
                            "a data frame longer than its buffer",
                        ))
                    })?;
                    writer
                        .write_all(whole)
                        .await
                        .map_err(kluis_proto::FrameError::Io)?;
                    writer.flush().await.map_err(kluis_proto::FrameError::Io)?;
                    let _ = spare.try_send(frame);
                    Ok(())
                }
            }
        };
        let outcome = tokio::select! {
            biased;
            () = cancel.cancelled() => None,
            r = tokio::time::timeout(timeout, write) => Some(r),
        };
        match outcome {
            None => return (writer, Err(WriterEnd::Broken)),
            Some(Ok(Ok(()))) => {}
            Some(Ok(Err(e))) => return (writer, Err(WriterEnd::Failed(e))),
            Some(Err(_)) => {
                return (
                    writer,
                    Err(WriterEnd::Failed(WireError::Frame(
                        kluis_proto::FrameError::Io(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "the parent stopped reading",
                        )),
                    ))),
                )
            }
        }
    }
}

/// How the input pump ended without an error.
enum PumpEnd {
    /// The parent said `End`.
    End,
    /// The decryptor stopped taking input (it reports why).
    Abandoned,
    /// The job was cancelled.
    Cancelled,
}

/// Reads the rest of the input from the parent: `Data` until `End`.
/// Frames are read into buffers the decryptor has finished with (`spare`),
/// so the data path allocates and faults in a few frame buffers once.
async fn pump_input<R: AsyncRead + Unpin>(
    mut reader: R,
    tx: mpsc::Sender<Input>,
    mut spare: mpsc::Receiver<Vec<u8>>,
    idle: Duration,
    cancel: Cancel,
) -> Result<PumpEnd, JobError> {
    loop {
        let mut message = spare.try_recv().unwrap_or_default();
        let read = tokio::time::timeout(
            idle,
            kluis_proto::read_raw_frame_into(&mut reader, JOB_MAX_FRAME_LEN, &mut message),
        );
        let read = tokio::select! {
            biased;
            () = cancel.cancelled() => return Ok(PumpEnd::Cancelled),
            m = read => m,
        };
        read.map_err(|_| {
            JobError::new(
                FailureKind::IdleTimeout,
                format!("no input from the parent for {}s", idle.as_secs()),
            )
        })?
        .map_err(|e| match e {
            kluis_proto::FrameError::Closed => JobError::new(
                FailureKind::InputClosed,
                "the parent closed the connection before the end of the input",
            ),
            e => JobError::new(FailureKind::Protocol, format!("from the parent: {e}")),
        })?;
        // Data frames go on whole (the decryptor skips their header); only
        // message frames are decoded.
        if kluis_proto::job::data_payload(&message).is_some() {
            let sent = tokio::select! {
                biased;
                () = cancel.cancelled() => return Ok(PumpEnd::Cancelled),
                s = tx.send(Input::Chunk(message)) => s,
            };
            if sent.is_err() {
                return Ok(PumpEnd::Abandoned);
            }
            continue;
        }
        let message = kluis_proto::job::decode_job_frame::<JobRequest>(&message)
            .map_err(|e| JobError::new(FailureKind::Protocol, format!("from the parent: {e}")))?;
        let (item, last) = match message {
            JobRequest::Data(_) => {
                // data_payload refused it (a payload over the chunk limit).
                return Err(JobError::new(
                    FailureKind::Protocol,
                    "a data frame over the chunk limit",
                ));
            }
            JobRequest::End => (Input::End, true),
            JobRequest::Start(_) => {
                return Err(JobError::new(
                    FailureKind::Protocol,
                    "a second Start in one job",
                ))
            }
            _ => return Err(JobError::new(FailureKind::Protocol, "an unknown request")),
        };
        let sent = tokio::select! {
            biased;
            () = cancel.cancelled() => return Ok(PumpEnd::Cancelled),
            s = tx.send(item) => s,
        };
        if sent.is_err() {
            return Ok(PumpEnd::Abandoned);
        }
        if last {
            return Ok(PumpEnd::End);
        }
    }
}

/// The operations of the key request: the input's data key, the job's
/// secrets, a fresh output data key (in this order).
fn key_operations(header: &EnvelopeHeader, spec: &JobSpec) -> Vec<KeyOperation> {
    let mut ops = Vec::with_capacity(spec.secrets.len().saturating_add(2));
    ops.push(KeyOperation::DecryptDataKey {
        wrapped: header.wrapped_key().wrapped_bytes().to_vec(),
    });
    for secret in &spec.secrets {
        ops.push(KeyOperation::DecryptDataKey {
            wrapped: secret.0.clone(),
        });
    }
    ops.push(KeyOperation::GenerateDataKey {
        key_id: spec.output_key.clone(),
    });
    ops
}

fn data_key(key: &ReleasedKey) -> Result<DataKey, JobError> {
    DataKey::from_slice(key.plaintext.expose_secret()).map_err(|_| {
        JobError::new(
            FailureKind::KeyReleaseInvalid,
            "a released key of the wrong length",
        )
    })
}

async fn run<R: AsyncRead + Unpin + Send + 'static>(
    reader: R,
    spec: JobSpec,
    ctx: &Arc<EnclaveContext>,
    events: mpsc::Sender<Outgoing>,
    cancel: Cancel,
) -> Result<JobCounts, JobError> {
    // Debug formatting: the id comes from the parent and may hold anything.
    tracing::info!(job = ?spec.job_id, workload = spec.workload.name(), "job started");
    // Everything that can be checked before keys are asked for is.
    ctx.check_allowed(&spec)?;
    let authorisation = check_authorisation(&spec, ctx)?;
    workload::check_spec(&spec.workload, spec.secrets.len())
        .map_err(|e| JobError::new(FailureKind::BadJob, e.to_string()))?;
    let exec_plan = match &spec.workload {
        WorkloadSpec::Exec { program, args } => {
            Some(exec::check_request(ctx.exec_dir.as_deref(), program, args)?)
        }
        _ => None,
    };

    let (input_tx, input_rx) = mpsc::channel::<Input>(CHANNEL_DEPTH);
    // Room for every frame in flight, and the one being read.
    let (spare_tx, spare_rx) = mpsc::channel::<Vec<u8>>(CHANNEL_DEPTH.saturating_add(1));
    let pump = tokio::spawn(pump_input(
        reader,
        input_tx,
        spare_rx,
        ctx.idle_timeout,
        cancel.clone(),
    ));
    let input = ChannelReader::new(input_rx, spare_tx);
    let outcome = process(
        &spec,
        authorisation.as_ref(),
        exec_plan,
        ctx,
        input,
        events,
        &cancel,
    )
    .await;
    if outcome.is_err() {
        // The pump stops too (if it has not already).
        cancel.cancel();
    }
    // On success the decryptor saw the parent's `End`, so the pump has
    // ended; otherwise it ends on the cancellation. Either way it is joined.
    let pumped = pump
        .await
        .unwrap_or_else(|_| Err(JobError::new(FailureKind::Internal, "input pump failed")));
    match (outcome, pumped) {
        (Ok(counts), Ok(PumpEnd::End)) => Ok(counts),
        (Ok(_), Ok(_)) => Err(JobError::new(
            FailureKind::Protocol,
            "the input envelope ended but the parent did not end the input",
        )),
        // A misbehaving parent explains most failures better than their
        // symptom (a truncated envelope because it closed the connection).
        (_, Err(pump_error)) => Err(pump_error),
        (Err(e), Ok(_)) => Err(e),
    }
}

/// Await `f` unless the job is cancelled first.
async fn unless_cancelled<T>(
    cancel: &Cancel,
    f: impl std::future::Future<Output = Result<T, JobError>>,
) -> Result<T, JobError> {
    tokio::select! {
        biased;
        () = cancel.cancelled() => Err(cancelled()),
        r = f => r,
    }
}

/// The job's authorisation, if it has one: signed by the verifier key
/// pinned in this image, and for exactly this job (workload with its
/// parameters, output key, number of secrets). The input's key is compared
/// once the header is read, the secrets' keys once released.
fn check_authorisation(
    spec: &JobSpec,
    ctx: &EnclaveContext,
) -> Result<Option<SignedAuthorisation>, JobError> {
    let Some(bytes) = &spec.authorisation else {
        if ctx.require_authorisation {
            return Err(JobError::new(
                FailureKind::AuthorisationInvalid,
                "this image runs only jobs with a job authorisation, and the job has none",
            ));
        }
        return Ok(None);
    };
    let invalid = |e: kluis_proto::AuthorisationError| {
        JobError::new(FailureKind::AuthorisationInvalid, e.to_string())
    };
    let signed = SignedAuthorisation::verify(bytes, &ctx.verifier_public_key).map_err(invalid)?;
    signed.authorisation().check_job(spec).map_err(invalid)?;
    tracing::info!(authorisation = %signed.id(), "job authorised");
    Ok(Some(signed))
}

async fn process(
    spec: &JobSpec,
    authorisation: Option<&SignedAuthorisation>,
    exec_plan: Option<exec::ExecPlan>,
    ctx: &Arc<EnclaveContext>,
    input: ChannelReader,
    events: mpsc::Sender<Outgoing>,
    cancel: &Cancel,
) -> Result<JobCounts, JobError> {
    // The header names the input's wrapped data key. The reading thread
    // ends when the input does, or when the pump stops (cancellation).
    let stats = Arc::clone(&ctx.stats);
    let (mut input, header) = tokio::task::spawn_blocking(move || {
        let _counted = crate::server::Counted::thread(&stats);
        let mut input = input;
        let header = EnvelopeHeader::read_from(&mut input);
        (input, header)
    })
    .await
    .map_err(|_| JobError::new(FailureKind::Internal, "header reader failed"))?;
    if cancel.is_cancelled() {
        return Err(cancelled());
    }
    let header = header.map_err(|e| decrypt_error(&DecryptError::Header(e)))?;

    ctx.check_input_key(spec, header.cmk_id())?;
    if let Some(a) = authorisation {
        if a.authorisation().input_key != header.cmk_id() {
            return Err(JobError::new(
                FailureKind::AuthorisationInvalid,
                format!(
                    "the input is under {:?}; the authorisation names {:?}",
                    header.cmk_id(),
                    a.authorisation().input_key
                ),
            ));
        }
    }
    let ops = key_operations(&header, spec);
    let released = unless_cancelled(
        cancel,
        release::release_keys(ctx, ops, authorisation.map(SignedAuthorisation::id)),
    )
    .await?;
    let (input_key, rest) = released
        .split_first()
        .ok_or_else(|| JobError::new(FailureKind::KeyReleaseInvalid, "no keys released"))?;
    let (output_key, secrets) = rest
        .split_last()
        .ok_or_else(|| JobError::new(FailureKind::KeyReleaseInvalid, "no output key released"))?;
    // The header's key name was read before it could be authenticated; the
    // released key says which master key the wrapped key is really under.
    // A header that names another was altered: nothing is used.
    if input_key.key_id != header.cmk_id() {
        return Err(JobError::new(
            FailureKind::InputTampered,
            format!(
                "the input's header names master key {:?}, but its data key is under {:?}",
                header.cmk_id(),
                input_key.key_id
            ),
        ));
    }
    ctx.check_released_keys(
        spec,
        &input_key.key_id,
        secrets.iter().map(|k| k.key_id.as_str()),
    )?;
    let input_key = data_key(input_key)?;
    let output_data_key = data_key(output_key)?;
    let wrapped_output = WrappedKey::new(
        output_key.key_id.clone(),
        output_key.version,
        output_key.wrapped.clone(),
    )
    .map_err(|e| JobError::new(FailureKind::KeyReleaseInvalid, format!("output key: {e}")))?;
    if let Some(a) = authorisation {
        // The verifier enforces this too; the enclave does not rely on it.
        let named = a.authorisation().secret_keys.iter().map(String::as_str);
        if !named.eq(secrets.iter().map(|k| k.key_id.as_str())) {
            return Err(JobError::new(
                FailureKind::AuthorisationInvalid,
                "the job's secrets are not data keys of the master keys the authorisation names",
            ));
        }
    }
    let secrets: Vec<kluis_proto::PlaintextKey> = secrets
        .iter()
        .filter_map(|k| kluis_proto::PlaintextKey::from_slice(k.plaintext.expose_secret()))
        .collect();
    drop(released);

    let started = JobEvent::Started {
        output_key_id: wrapped_output.cmk_id().to_owned(),
        output_key_version: wrapped_output.cmk_version(),
    };
    unless_cancelled(cancel, async {
        events.send(Outgoing::Event(started)).await.map_err(|_| {
            JobError::new(
                FailureKind::OutputClosed,
                "the parent stopped taking output",
            )
        })
    })
    .await?;

    let workload = workload::build(&spec.workload, &secrets)
        .map_err(|e| JobError::new(FailureKind::BadJob, e.to_string()))?;
    drop(secrets);

    // The worker and the sealer end when the job is cancelled: the worker
    // polls the cancellation between chunks and its input closes under it
    // (the pump stops); the sealer's batches stop, and its output channel
    // closes under it (the event writer stops).
    let (batch_tx, batch_rx) = std::sync::mpsc::sync_channel::<ToSealer>(BATCH_DEPTH);
    let (recycle_tx, recycle_rx) =
        std::sync::mpsc::sync_channel::<Zeroizing<Vec<u8>>>(BATCH_DEPTH.saturating_add(2));
    let seal_events = events.clone();
    let seal_cancel = cancel.clone();
    let seal_stats = Arc::clone(&ctx.stats);
    let sealer = tokio::task::spawn_blocking(move || {
        let _counted = crate::server::Counted::thread(&seal_stats);
        seal_stage(
            batch_rx,
            recycle_tx,
            &output_data_key,
            wrapped_output,
            seal_events,
            &seal_cancel,
        )
    });
    let progress_events = events;
    let exec_timeout = ctx.exec_timeout;
    let work_cancel = cancel.clone();
    let work_stats = Arc::clone(&ctx.stats);
    let worker = tokio::task::spawn_blocking(move || -> Result<(Counts, u64), JobError> {
        let _counted = crate::server::Counted::thread(&work_stats);
        let mut reader = EnvelopeReader::with_header(&mut input, header, &input_key)
            .map_err(|e| decrypt_error(&e))?
            .in_place();
        drop(input_key);
        let mut progress = ProgressReporter::new(&progress_events);
        let counts = match (workload, exec_plan) {
            (Some(w), _) => work_stage(
                &mut reader,
                w,
                &batch_tx,
                &recycle_rx,
                &mut progress,
                &work_cancel,
            ),
            (None, Some(plan)) => exec::run(
                &mut reader,
                &plan,
                &batch_tx,
                exec_timeout,
                &mut progress,
                &work_cancel,
            ),
            (None, None) => Err(JobError::new(FailureKind::Internal, "no workload")),
        }?;
        if work_cancel.is_cancelled() {
            return Err(cancelled());
        }
        batch_tx
            .send(ToSealer::Finish)
            .map_err(|_| JobError::new(FailureKind::OutputClosed, "the sealer stopped"))?;
        Ok(counts)
    });
    let worked = worker
        .await
        .map_err(|_| JobError::new(FailureKind::Internal, "workload thread failed"));
    if !matches!(worked, Ok(Ok(_))) {
        // The sealer may be blocked handing output to the event writer.
        cancel.cancel();
    }
    let sealed = sealer
        .await
        .map_err(|_| JobError::new(FailureKind::Internal, "sealing thread failed"))?;
    let (counts, bytes_in) = worked??;
    let (bytes_out, _envelope_bytes) = sealed?;
    Ok(JobCounts {
        records_in: counts.records_in,
        records_out: counts.records_out,
        bytes_in,
        bytes_out,
    })
}

/// Decrypt, frame into records, run the workload, pass batches on; returns
/// the counts and the plaintext bytes read. A workload failure is reported
/// only once the whole input has been read ([`drain`]).
fn work_stage<R: Read>(
    reader: &mut EnvelopeReader<R>,
    mut workload: Box<dyn workload::Workload>,
    batches: &BatchSender,
    recycled: &std::sync::mpsc::Receiver<Zeroizing<Vec<u8>>>,
    progress: &mut ProgressReporter<'_>,
    cancel: &Cancel,
) -> Result<(Counts, u64), JobError> {
    let passthrough = workload.is_passthrough();
    let mut framer = RecordFramer::default();
    let mut totals = Counts::default();
    let mut bytes_in = 0u64;
    let mut last_byte = b'\n';
    let send = |batch: Zeroizing<Vec<u8>>| {
        batches
            .send(ToSealer::Batch(batch))
            .map_err(|_| JobError::new(FailureKind::OutputClosed, "the sealer stopped"))
    };
    // Buffers come back from the sealer for reuse: plaintext is overwritten
    // by the next chunk rather than freed, and every buffer is zeroized
    // (whole capacity) when the job drops it.
    let take_buffer = |len: usize| {
        let mut b = recycled
            .try_recv()
            .unwrap_or_else(|_| Zeroizing::new(Vec::new()));
        // Only newly exposed bytes are written; the rest is overwritten by
        // the next read (and zeroized with the buffer).
        b.resize(len, 0);
        b
    };
    // What went wrong depends on the plaintext (a column count, a record
    // number, which check failed): the parent is told only that it failed,
    // and only after the whole input was read.
    let workload_error = |e: workload::WorkloadError| {
        tracing::debug!(kind = e.kind(), "workload refused the input");
        JobError::new(
            FailureKind::Workload,
            "the workload refused the input (the reason depends on the data and is withheld)",
        )
    };
    let mut scratch = Zeroizing::new(vec![0u8; READ_CHUNK]);
    loop {
        if cancel.is_cancelled() {
            return Err(cancelled());
        }
        if passthrough {
            let mut buf = take_buffer(READ_CHUNK);
            let n = read_full(reader, &mut buf)?;
            if n == 0 {
                break;
            }
            buf.truncate(n);
            bytes_in = bytes_in.saturating_add(u64::try_from(n).unwrap_or(u64::MAX));
            let records = workload::count_newlines(&buf);
            last_byte = buf.last().copied().unwrap_or(last_byte);
            totals.records_in = totals.records_in.saturating_add(records);
            totals.records_out = totals.records_out.saturating_add(records);
            send(buf)?;
        } else {
            let n = reader.read(&mut scratch).map_err(|e| read_error(&e))?;
            if n == 0 {
                break;
            }
            bytes_in = bytes_in.saturating_add(u64::try_from(n).unwrap_or(u64::MAX));
            let mut out = take_buffer(0);
            let fed = framer.feed(scratch.get(..n).unwrap_or_default(), |batch| {
                totals.add(workload.process(batch, &mut out)?);
                Ok(())
            });
            if let Err(e) = fed {
                drain(reader, bytes_in, progress, cancel)?;
                return Err(workload_error(e));
            }
            if !out.is_empty() {
                send(out)?;
            }
        }
        progress.input_read(bytes_in);
    }
    if passthrough && last_byte != b'\n' {
        // The last record had no newline.
        totals.records_in = totals.records_in.saturating_add(1);
        totals.records_out = totals.records_out.saturating_add(1);
    }
    let mut out = Zeroizing::new(Vec::new());
    framer
        .finish(|batch| {
            totals.add(workload.process(batch, &mut out)?);
            Ok(())
        })
        .map_err(workload_error)?;
    totals.add(workload.finish(&mut out).map_err(workload_error)?);
    if !out.is_empty() {
        send(out)?;
    }
    Ok((totals, bytes_in))
}

/// Fill `buf` from the envelope (fewer bytes only at its end).
fn read_full<R: Read>(reader: &mut EnvelopeReader<R>, buf: &mut [u8]) -> Result<usize, JobError> {
    let mut n = 0usize;
    while n < buf.len() {
        let got = reader
            .read(buf.get_mut(n..).unwrap_or_default())
            .map_err(|e| read_error(&e))?;
        if got == 0 {
            break;
        }
        n = n.saturating_add(got);
    }
    Ok(n)
}

/// Seal plaintext batches into the output envelope; returns (plaintext
/// bytes, envelope bytes).
fn seal_stage(
    batches: std::sync::mpsc::Receiver<ToSealer>,
    recycle: std::sync::mpsc::SyncSender<Zeroizing<Vec<u8>>>,
    key: &DataKey,
    wrapped: WrappedKey,
    events: mpsc::Sender<Outgoing>,
    cancel: &Cancel,
) -> Result<(u64, u64), JobError> {
    let sink = ChannelWriter::new(events);
    let mut writer = EnvelopeWriter::new(sink, key, wrapped)
        .map_err(|e| JobError::new(FailureKind::Output, format!("starting the output: {e}")))?
        .in_place();
    let mut plaintext = 0u64;
    loop {
        match batches.recv() {
            Ok(ToSealer::Batch(_)) if cancel.is_cancelled() => return Err(cancelled()),
            Ok(ToSealer::Batch(batch)) => {
                writer.write_all(&batch).map_err(|e| write_error(&e))?;
                plaintext =
                    plaintext.saturating_add(u64::try_from(batch.len()).unwrap_or(u64::MAX));
                // Back to the worker; dropped (zeroized) if the pool is full.
                let _ = recycle.try_send(batch);
            }
            // Never a final segment for a cancelled job.
            Ok(ToSealer::Finish) if cancel.is_cancelled() => return Err(cancelled()),
            Ok(ToSealer::Finish) => break,
            // The workload failed: leave the output without its final
            // segment (and send nothing more).
            Err(_) => {
                return Err(JobError::new(
                    FailureKind::Cancelled,
                    "the workload did not complete",
                ))
            }
        }
    }
    let mut sink = writer
        .finish()
        .map_err(|e| JobError::new(FailureKind::Output, format!("finishing the output: {e}")))?;
    sink.flush().map_err(|e| write_error(&e))?;
    Ok((plaintext, sink.sent))
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects,
        clippy::cast_possible_truncation
    )]
    use super::*;
    use kluis_envelope::{decrypt_to_vec, DEFAULT_SEGMENT_SIZE, SEGMENT_OVERHEAD};

    /// The decryptor's input: frame payloads in order, then the end, which
    /// stays the end however often it is looked at (the decryptor looks
    /// with `fill_buf`, then reads) and is never taken for a pump that
    /// stopped without `End`.
    #[test]
    fn the_input_reads_as_the_payloads_then_stays_at_its_end() {
        use std::io::BufRead;
        let (tx, rx) = mpsc::channel(4);
        let (spare, _spares) = mpsc::channel(4);
        let frame = |payload: &[u8]| {
            let mut f = vec![0u8; DATA_FRAME_HEADER_LEN];
            f.extend_from_slice(payload);
            f
        };
        tx.try_send(Input::Chunk(frame(b"abc"))).unwrap();
        tx.try_send(Input::Chunk(frame(b"defg"))).unwrap();
        tx.try_send(Input::End).unwrap();
        drop(tx);
        let mut input = ChannelReader::new(rx, spare);
        assert_eq!(input.fill_buf().unwrap(), b"abc");
        input.consume(2);
        let mut buf = [0u8; 8];
        assert_eq!(input.read(&mut buf).unwrap(), 1);
        assert_eq!(&buf[..1], b"c");
        assert_eq!(input.read(&mut buf).unwrap(), 4);
        assert_eq!(&buf[..4], b"defg");
        assert!(input.fill_buf().unwrap().is_empty());
        assert!(input.fill_buf().unwrap().is_empty());
        assert_eq!(input.read(&mut buf).unwrap(), 0);
    }

    /// A pump that stops without `End` is an error, not an end.
    #[test]
    fn an_input_without_end_is_an_error() {
        use std::io::BufRead;
        let (tx, rx) = mpsc::channel::<Input>(1);
        let (spare, _spares) = mpsc::channel(1);
        drop(tx);
        let mut input = ChannelReader::new(rx, spare);
        let err = input.fill_buf().unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
    }

    /// The sealer's frames: each segment sealed into a frame whole (none
    /// split across two), no frame over the chunk limit, and together the
    /// envelope of the plaintext.
    #[test]
    fn output_frames_carry_whole_segments_sealed_in_place() {
        let (tx, mut rx) = mpsc::channel(64);
        let key = DataKey::generate().unwrap();
        let wrapped = WrappedKey::new("t/app/prod", 1, vec![1; 32]).unwrap();
        let plaintext: Vec<u8> = (0..3 * MAX_CHUNK_LEN + 123)
            .map(|i| (i % 251) as u8)
            .collect();
        let mut writer = EnvelopeWriter::new(ChannelWriter::new(tx), &key, wrapped)
            .unwrap()
            .in_place();
        let header_len = writer.header().as_bytes().len();
        for piece in plaintext.chunks(READ_CHUNK) {
            writer.write_all(piece).unwrap();
        }
        let mut sink = writer.finish().unwrap();
        sink.flush().unwrap();
        let sent = sink.sent;
        drop(sink);

        let segment = DEFAULT_SEGMENT_SIZE as usize + SEGMENT_OVERHEAD;
        let mut payloads = Vec::new();
        while let Ok(outgoing) = rx.try_recv() {
            let Outgoing::Frame { frame, len, .. } = outgoing else {
                panic!("an event from the sealer's sink");
            };
            let payload = kluis_proto::job::data_payload(&frame[..len]).unwrap();
            assert!(payload.len() <= MAX_CHUNK_LEN);
            payloads.push(payload.to_vec());
        }
        assert!(payloads.len() >= 4, "{} frames", payloads.len());
        // Whole segments only, the header in front of the first.
        assert_eq!((payloads[0].len() - header_len) % segment, 0);
        for middle in &payloads[1..payloads.len() - 1] {
            assert_eq!(middle.len() % segment, 0, "a segment split across frames");
        }
        let envelope = payloads.concat();
        assert_eq!(envelope.len() as u64, sent);
        assert_eq!(*decrypt_to_vec(&key, &envelope).unwrap(), plaintext);
    }
}
