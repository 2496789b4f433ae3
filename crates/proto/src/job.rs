//! The job protocol between the parent and the enclave.
//!
//! One connection per job (vsock in production, TCP or a Unix socket in
//! simulation), in the frames of [`crate::frame`] with
//! [`JOB_MAX_FRAME_LEN`] as the limit:
//!
//! ```text
//! parent  → enclave   JobRequest::Start(spec)                     (spec.authorisation: optional)
//! parent  → enclave   JobRequest::Data(input envelope bytes) ...   (any number, any split)
//! parent  → enclave   JobRequest::End
//! enclave → parent    JobEvent::Data(output envelope bytes) ...    (interleaved with Progress)
//! enclave → parent    JobEvent::Done(summary) | JobEvent::Failed { reason }
//! ```
//!
//! The parent is an attacker. Everything it sends is bounded here while
//! decoding, and nothing it can send makes the enclave reveal a key or
//! plaintext: the input is an authenticated envelope and the keys come only
//! from the verifier, sealed and signed. What the enclave tells the parent
//! is deliberately limited to ciphertext and counts: `Progress` says how
//! much of the input the enclave has read (coarsely, which the parent knows
//! having sent it), and only `Done` discloses how many records were read
//! and written, which the operator needs and which the envelope's length
//! mostly discloses anyway. A `Failed` reason names what went wrong (an error kind and its
//! message); it never carries key bytes or record contents.
//!
//! The output is an envelope whose final segment is authenticated: an output
//! cut short by a failure, a kill or a hostile parent can never decrypt as
//! complete, whatever the parent does with it. The parent presents an output
//! file only after `Done`.

pub use crate::job_spec::{parse_workload, SpecError};

use crate::bounded::{self, ser_bytes};
use crate::frame::FrameKind;
use crate::message::{Message, MAX_KEY_ID_LEN, MAX_WRAPPED_KEY_LEN};
use serde::{Deserialize, Serialize};

/// Largest frame on a job connection: one data chunk plus its encoding.
pub const JOB_MAX_FRAME_LEN: usize = 1024 * 1024 + 1024;
/// Largest data chunk in one [`JobRequest::Data`] or [`JobEvent::Data`].
pub const MAX_CHUNK_LEN: usize = 1024 * 1024;
/// Most workload secrets one job may name.
pub const MAX_SECRETS: usize = 8;
/// Longest job id, program name, argument or failure reason.
pub const MAX_TEXT_LEN: usize = 1024;
/// Most arguments of an `exec` workload.
pub const MAX_ARGS: usize = 32;

/// What the parent sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum JobRequest {
    /// Start a job. Exactly once, first.
    Start(JobSpec),
    /// The next bytes of the input envelope. On the wire a raw data frame
    /// ([`crate::frame::FrameKind::Data`]), never CBOR.
    #[serde(skip)]
    Data(Vec<u8>),
    /// The input is complete.
    End,
}

/// What the enclave sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum JobEvent {
    /// The keys were released and processing began.
    Started {
        /// The CMK id the output is wrapped under.
        #[serde(deserialize_with = "bounded::string::<_, MAX_KEY_ID_LEN>")]
        output_key_id: String,
        /// Its version.
        output_key_version: u32,
    },
    /// The next bytes of the output envelope. On the wire a raw data frame
    /// ([`crate::frame::FrameKind::Data`]), never CBOR.
    #[serde(skip)]
    Data(Vec<u8>),
    /// How far the enclave has read the input: `bytes_in` only, rounded
    /// down to a coarse granule; the record counts are zero (they come
    /// with `Done`).
    Progress(JobCounts),
    /// The output envelope is complete (its final segment was sent).
    Done(JobCounts),
    /// The job failed; the output sent so far is not complete and must be
    /// discarded.
    Failed {
        /// Why, as a stable kind.
        kind: FailureKind,
        /// What happened, without secrets.
        #[serde(deserialize_with = "bounded::string::<_, MAX_TEXT_LEN>")]
        reason: String,
    },
}

/// Why a job failed, as the enclave tells the parent: a stable kind (its
/// `snake_case` name on the wire and in logs). The detail that depends on
/// the data never travels; the kinds name stages and causes the parent
/// knows or caused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum FailureKind {
    /// The image does not run this job (its allowed jobs, or a
    /// data-dependent workload on an image without a list).
    JobNotAllowed,
    /// The job's specification is unusable.
    BadJob,
    /// The job's authorisation is malformed, not signed by the pinned
    /// verifier key, or for another job.
    AuthorisationInvalid,
    /// The verifier refused the key request (the reason is in its audit).
    KeyReleaseRefused,
    /// The verifier's answer did not verify (impostor, replay, tampering).
    KeyReleaseInvalid,
    /// The verifier could not be reached through the parent.
    VerifierUnavailable,
    /// The NSM failed.
    Nsm,
    /// The input envelope was altered.
    InputTampered,
    /// The input envelope ended early.
    InputTruncated,
    /// The input is not under the released data key.
    InputWrongKey,
    /// The input envelope's header is malformed.
    InputHeader,
    /// Reading the input failed.
    InputIo,
    /// The parent closed the connection before the end of the input.
    InputClosed,
    /// The parent sent nothing for too long.
    IdleTimeout,
    /// The parent did not send a complete `Start` in time.
    StartTimeout,
    /// The job passed its deadline.
    JobTimeout,
    /// The parent broke the job protocol.
    Protocol,
    /// The workload refused the input (why depends on the data: withheld).
    Workload,
    /// The `exec` program failed (how depends on the data: withheld).
    Exec,
    /// The `exec` program passed its deadline.
    ExecTimeout,
    /// The `exec` program is not one of the image's.
    ExecRefused,
    /// Sealing the output failed.
    Output,
    /// The parent stopped taking output.
    OutputClosed,
    /// The job was stopped (another part of it failed first).
    Cancelled,
    /// Something inside the enclave failed.
    Internal,
    /// A kind this build does not know (from a newer enclave).
    #[serde(other)]
    Unknown,
}

impl FailureKind {
    /// The stable name (as on the wire).
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::JobNotAllowed => "job_not_allowed",
            FailureKind::BadJob => "bad_job",
            FailureKind::AuthorisationInvalid => "authorisation_invalid",
            FailureKind::KeyReleaseRefused => "key_release_refused",
            FailureKind::KeyReleaseInvalid => "key_release_invalid",
            FailureKind::VerifierUnavailable => "verifier_unavailable",
            FailureKind::Nsm => "nsm",
            FailureKind::InputTampered => "input_tampered",
            FailureKind::InputTruncated => "input_truncated",
            FailureKind::InputWrongKey => "input_wrong_key",
            FailureKind::InputHeader => "input_header",
            FailureKind::InputIo => "input_io",
            FailureKind::InputClosed => "input_closed",
            FailureKind::IdleTimeout => "idle_timeout",
            FailureKind::StartTimeout => "start_timeout",
            FailureKind::JobTimeout => "job_timeout",
            FailureKind::Protocol => "protocol",
            FailureKind::Workload => "workload",
            FailureKind::Exec => "exec",
            FailureKind::ExecTimeout => "exec_timeout",
            FailureKind::ExecRefused => "exec_refused",
            FailureKind::Output => "output",
            FailureKind::OutputClosed => "output_closed",
            FailureKind::Cancelled => "cancelled",
            FailureKind::Internal => "internal",
            FailureKind::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for FailureKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Counts of a job (see the module notes on what they disclose).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobCounts {
    /// Records read.
    pub records_in: u64,
    /// Records written.
    pub records_out: u64,
    /// Plaintext bytes read.
    pub bytes_in: u64,
    /// Plaintext bytes written.
    pub bytes_out: u64,
}

/// A job: what to run, and which keys it may ask for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// A name for the enclave's log (the verifier never sees it).
    #[serde(deserialize_with = "bounded::string::<_, MAX_TEXT_LEN>")]
    pub job_id: String,
    /// The workload.
    pub workload: WorkloadSpec,
    /// The CMK the output's fresh data key is generated under.
    #[serde(deserialize_with = "bounded::string::<_, MAX_KEY_ID_LEN>")]
    pub output_key: String,
    /// Wrapped data keys the workload needs as secrets (for example the
    /// pseudonymisation key), released by the verifier like any data key.
    #[serde(deserialize_with = "bounded::vec::<_, WrappedSecret, MAX_SECRETS>")]
    pub secrets: Vec<WrappedSecret>,
    /// The signed job authorisation the job runs under
    /// ([`crate::authorisation`]), as issued by the verifier. Absent on the
    /// wire when `None` (the job protocol of older builds); an enclave of an
    /// older build refuses a `Start` that carries one as an unknown field.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "ser_opt_bytes",
        deserialize_with = "de_authorisation"
    )]
    pub authorisation: Option<Vec<u8>>,
}

#[allow(clippy::ref_option)] // serde's `with` passes `&Option<T>`
fn ser_opt_bytes<S: serde::Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(bytes) => s.serialize_bytes(bytes),
        None => s.serialize_none(),
    }
}

fn de_authorisation<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
    bounded::bytes::<_, { crate::authorisation::MAX_AUTHORISATION_LEN }>(d).map(Some)
}

/// A workload secret in its wrapped form (safe to hand to the parent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WrappedSecret(
    #[serde(
        serialize_with = "ser_bytes",
        deserialize_with = "bounded::bytes::<_, MAX_WRAPPED_KEY_LEN>"
    )]
    pub Vec<u8>,
);

/// Which workload, with its parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum WorkloadSpec {
    /// Records out as they came in (newline-separated records).
    Identity,
    /// Data-key rotation: the same bytes under a fresh data key.
    Reencrypt,
    /// Replace one column of delimited records by a keyed hash of it.
    Pseudonymise {
        /// The column (0-based).
        column: u32,
        /// The field delimiter (one ASCII byte, `,` by default).
        delimiter: u8,
        /// Which secret of the job is the hash key.
        secret: u32,
        /// Pass the first record through unchanged (a header line).
        header: bool,
        /// Check that every value is a valid Belgian national register
        /// number (11 digits, mod-97 check) before hashing.
        check_national_number: bool,
    },
    /// Count records (and optionally sum a column) grouped by a column.
    Aggregate {
        /// The grouping column (0-based).
        by: u32,
        /// The column to sum (integers), if any.
        sum: Option<u32>,
        /// The field delimiter.
        delimiter: u8,
        /// Skip the first record (a header line).
        header: bool,
    },
    /// Run a program shipped in the enclave image, plaintext on its
    /// stdin/stdout, inside the enclave.
    Exec {
        /// The program's name in the image's workload directory (no path).
        #[serde(deserialize_with = "bounded::string::<_, MAX_TEXT_LEN>")]
        program: String,
        /// Its arguments.
        #[serde(deserialize_with = "bounded::vec::<_, String, MAX_ARGS>")]
        args: Vec<String>,
    },
}

impl WorkloadSpec {
    /// A stable name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            WorkloadSpec::Identity => "identity",
            WorkloadSpec::Reencrypt => "reencrypt",
            WorkloadSpec::Pseudonymise { .. } => "pseudonymise",
            WorkloadSpec::Aggregate { .. } => "aggregate",
            WorkloadSpec::Exec { .. } => "exec",
        }
    }
}

impl crate::message::private::Sealed for JobRequest {}
impl crate::message::private::Sealed for JobEvent {}

impl Message for JobRequest {
    const CONTEXT: &'static str = "job request";
}

impl Message for JobEvent {
    const CONTEXT: &'static str = "job event";
}

/// Bytes reserved in front of a payload by [`finish_data_frame`]: the frame
/// header.
pub const DATA_FRAME_HEADER_LEN: usize = crate::frame::FRAME_HEADER_LEN;

fn chunk_too_large(len: usize) -> crate::FrameError {
    crate::FrameError::TooLarge {
        found: u64::try_from(len).unwrap_or(u64::MAX),
        max: MAX_CHUNK_LEN,
    }
}

/// The whole data frame for `payload` (at most [`MAX_CHUNK_LEN`]).
pub fn data_frame(payload: &[u8]) -> Result<Vec<u8>, crate::FrameError> {
    if payload.len() > MAX_CHUNK_LEN {
        return Err(chunk_too_large(payload.len()));
    }
    crate::frame::encode_frame(FrameKind::Data, payload, JOB_MAX_FRAME_LEN)
}

/// Turn `buffer` — [`DATA_FRAME_HEADER_LEN`] reserved bytes, then the
/// payload — into a data frame, in place: the data path of a job moves
/// gigabytes, and its payloads are never copied to be framed.
pub fn finish_data_frame(buffer: Vec<u8>) -> Result<Vec<u8>, crate::FrameError> {
    let payload = buffer.len().saturating_sub(DATA_FRAME_HEADER_LEN);
    if payload > MAX_CHUNK_LEN {
        return Err(chunk_too_large(payload));
    }
    crate::frame::finish_frame_in_place(FrameKind::Data, buffer, JOB_MAX_FRAME_LEN)
}

/// The header of a data frame of `payload_len` bytes, for a sender that
/// moves the payload itself (the parent sends its input with `sendfile`).
pub fn data_frame_header(
    payload_len: usize,
) -> Result<[u8; DATA_FRAME_HEADER_LEN], crate::FrameError> {
    if payload_len > MAX_CHUNK_LEN {
        return Err(chunk_too_large(payload_len));
    }
    crate::frame::encode_head(FrameKind::Data, payload_len, JOB_MAX_FRAME_LEN)
}

/// The payload of a whole data frame (header included), without copying;
/// `None` for any other frame, or a payload over [`MAX_CHUNK_LEN`].
pub fn data_payload(frame: &[u8]) -> Option<&[u8]> {
    match crate::frame::split_frame(frame, JOB_MAX_FRAME_LEN)? {
        (FrameKind::Data, payload) if payload.len() <= MAX_CHUNK_LEN => Some(payload),
        _ => None,
    }
}

/// One side of the job protocol: requests travel parent → enclave, events
/// enclave → parent. `Data` is a raw data frame; everything else a message.
pub trait JobMessage: Message + Sized {
    /// The `Data` variant's payload, if this is one.
    fn data(&self) -> Option<&[u8]>;
    /// The `Data` variant for `payload`.
    fn from_data(payload: Vec<u8>) -> Self;
}

impl JobMessage for JobRequest {
    fn data(&self) -> Option<&[u8]> {
        match self {
            JobRequest::Data(d) => Some(d),
            _ => None,
        }
    }
    fn from_data(payload: Vec<u8>) -> Self {
        JobRequest::Data(payload)
    }
}

impl JobMessage for JobEvent {
    fn data(&self) -> Option<&[u8]> {
        match self {
            JobEvent::Data(d) => Some(d),
            _ => None,
        }
    }
    fn from_data(payload: Vec<u8>) -> Self {
        JobEvent::Data(payload)
    }
}

/// The whole frame of a job message.
pub fn encode_job_frame<M: JobMessage>(message: &M) -> Result<Vec<u8>, crate::WireError> {
    match message.data() {
        Some(payload) => Ok(data_frame(payload)?),
        None => Ok(crate::frame::encode_frame(
            FrameKind::Message,
            &message.encode()?,
            JOB_MAX_FRAME_LEN,
        )?),
    }
}

/// Decode a whole frame (as [`crate::frame::read_raw_frame`] returns it)
/// of the job protocol.
pub fn decode_job_frame<M: JobMessage>(frame: &[u8]) -> Result<M, crate::WireError> {
    let (kind, body) = match crate::frame::check_head(frame, JOB_MAX_FRAME_LEN)? {
        Some(head) if head.frame_len() == frame.len() => (
            head.kind,
            frame
                .get(crate::frame::FRAME_HEADER_LEN..)
                .unwrap_or_default(),
        ),
        _ => {
            return Err(crate::FrameError::Truncated {
                part: crate::error::FramePart::Body,
                expected: frame.len(),
                found: frame.len(),
            }
            .into())
        }
    };
    match kind {
        FrameKind::Data if body.len() <= MAX_CHUNK_LEN => Ok(M::from_data(body.to_vec())),
        FrameKind::Data => Err(chunk_too_large(body.len()).into()),
        FrameKind::Message => Ok(M::decode(body)?),
    }
}

/// Read one job message.
pub async fn read_job_message<M: JobMessage, R: tokio::io::AsyncRead + Unpin>(
    reader: &mut R,
) -> Result<M, crate::WireError> {
    let frame = crate::frame::read_raw_frame(reader, JOB_MAX_FRAME_LEN).await?;
    decode_job_frame(&frame)
}

/// Write one job message, then flush.
pub async fn write_job_message<M: JobMessage, W: tokio::io::AsyncWrite + Unpin>(
    writer: &mut W,
    message: &M,
) -> Result<(), crate::WireError> {
    use tokio::io::AsyncWriteExt;
    let frame = encode_job_frame(message)?;
    writer
        .write_all(&frame)
        .await
        .map_err(crate::FrameError::Io)?;
    writer.flush().await.map_err(crate::FrameError::Io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::indexing_slicing,
        clippy::cast_possible_truncation
    )]
    use super::*;

    #[test]
    fn data_travels_in_raw_frames_and_everything_else_in_messages() {
        for len in [0usize, 1, 23, 24, 255, 65_536, MAX_CHUNK_LEN] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let request = encode_job_frame(&JobRequest::Data(payload.clone())).unwrap();
            let event = encode_job_frame(&JobEvent::Data(payload.clone())).unwrap();
            assert_eq!(request, event, "len {len}");
            assert_eq!(request.len(), len + DATA_FRAME_HEADER_LEN);
            assert_eq!(&request[DATA_FRAME_HEADER_LEN..], payload.as_slice());
            assert_eq!(data_frame(&payload).unwrap(), request, "len {len}");
            let mut buffer = vec![0u8; DATA_FRAME_HEADER_LEN];
            buffer.extend_from_slice(&payload);
            assert_eq!(finish_data_frame(buffer).unwrap(), request, "len {len}");
            assert_eq!(
                data_frame_header(len).unwrap(),
                request[..DATA_FRAME_HEADER_LEN],
                "len {len}"
            );
            assert_eq!(data_payload(&request), Some(payload.as_slice()));
            assert_eq!(
                decode_job_frame::<JobRequest>(&request).unwrap(),
                JobRequest::Data(payload.clone())
            );
        }
        assert!(data_frame(&vec![0u8; MAX_CHUNK_LEN + 1]).is_err());
        let mut big = vec![0u8; DATA_FRAME_HEADER_LEN];
        big.extend_from_slice(&vec![0u8; MAX_CHUNK_LEN + 1]);
        assert!(finish_data_frame(big).is_err());
        assert!(data_frame_header(MAX_CHUNK_LEN + 1).is_err());
        // Data never goes through CBOR.
        assert!(JobRequest::Data(vec![1]).encode().is_err());
        assert!(JobEvent::Data(vec![1]).encode().is_err());
        // Other messages are message frames, and not mistaken for data.
        let end = encode_job_frame(&JobRequest::End).unwrap();
        assert_eq!(data_payload(&end), None);
        assert_eq!(
            decode_job_frame::<JobRequest>(&end).unwrap(),
            JobRequest::End
        );
        let mut wrong_len = data_frame(b"abc").unwrap();
        wrong_len.push(0);
        assert_eq!(data_payload(&wrong_len), None);
        assert!(decode_job_frame::<JobRequest>(&wrong_len).is_err());
    }

    #[test]
    fn job_messages_round_trip_and_refuse_oversized_fields() {
        let spec = JobSpec {
            job_id: "j".into(),
            workload: WorkloadSpec::Exec {
                program: "p".into(),
                args: vec!["-x".into()],
            },
            output_key: "a/b/c".into(),
            secrets: vec![WrappedSecret(vec![1, 2, 3])],
            authorisation: Some(vec![9; 40]),
        };
        let start = JobRequest::Start(spec);
        assert_eq!(JobRequest::decode(&start.encode().unwrap()).unwrap(), start);
        let too_many = JobRequest::Start(JobSpec {
            job_id: "j".into(),
            workload: WorkloadSpec::Identity,
            output_key: "a/b/c".into(),
            secrets: vec![WrappedSecret(vec![1]); MAX_SECRETS + 1],
            authorisation: None,
        });
        assert!(JobRequest::decode(&too_many.encode().unwrap()).is_err());
        let long_reason = JobEvent::Failed {
            kind: FailureKind::Workload,
            reason: "r".repeat(MAX_TEXT_LEN + 1),
        };
        assert!(JobEvent::decode(&long_reason.encode().unwrap()).is_err());
    }

    #[test]
    fn failure_kinds_are_stable_names_on_the_wire() {
        for kind in [
            FailureKind::JobNotAllowed,
            FailureKind::KeyReleaseRefused,
            FailureKind::InputTampered,
            FailureKind::JobTimeout,
            FailureKind::Workload,
            FailureKind::OutputClosed,
        ] {
            let event = JobEvent::Failed {
                kind,
                reason: String::new(),
            };
            let bytes = event.encode().unwrap();
            // The kind travels as its snake_case name.
            assert!(
                bytes
                    .windows(kind.as_str().len())
                    .any(|w| w == kind.as_str().as_bytes()),
                "{kind}"
            );
            assert_eq!(JobEvent::decode(&bytes).unwrap(), event);
        }
        // A kind from a newer enclave decodes as Unknown, not as an error.
        let newer = JobEvent::Failed {
            kind: FailureKind::Workload,
            reason: String::new(),
        }
        .encode()
        .unwrap();
        let mut renamed = newer.clone();
        let at = renamed.windows(8).position(|w| w == b"workload").unwrap();
        renamed[at + 4..at + 8].copy_from_slice(b"lost");
        assert_eq!(
            JobEvent::decode(&renamed).unwrap(),
            JobEvent::Failed {
                kind: FailureKind::Unknown,
                reason: String::new()
            }
        );
    }
}
