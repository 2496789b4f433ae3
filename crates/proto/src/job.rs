//! The job protocol between the parent and the enclave.
//!
//! One connection per job (vsock in production, TCP or a Unix socket in
//! simulation), in the frames of [`crate::frame`] with
//! [`JOB_MAX_FRAME_LEN`] as the limit:
//!
//! ```text
//! parent  → enclave   JobRequest::Start(spec)
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
//! is deliberately limited to ciphertext and counts: `Progress` and `Done`
//! disclose how many records were read and written, which the operator
//! needs for progress and which the envelope's length mostly discloses
//! anyway. A `Failed` reason names what went wrong (an error kind and its
//! message); it never carries key bytes or record contents.
//!
//! The output is an envelope whose final segment is authenticated: an output
//! cut short by a failure, a kill or a hostile parent can never decrypt as
//! complete, whatever the parent does with it. The parent presents an output
//! file only after `Done`.

use crate::bounded::{self, ser_bytes};
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
    /// The next bytes of the input envelope.
    Data(
        #[serde(
            serialize_with = "ser_bytes",
            deserialize_with = "bounded::bytes::<_, MAX_CHUNK_LEN>"
        )]
        Vec<u8>,
    ),
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
    /// The next bytes of the output envelope.
    Data(
        #[serde(
            serialize_with = "ser_bytes",
            deserialize_with = "bounded::bytes::<_, MAX_CHUNK_LEN>"
        )]
        Vec<u8>,
    ),
    /// Counts so far.
    Progress(JobCounts),
    /// The output envelope is complete (its final segment was sent).
    Done(JobCounts),
    /// The job failed; the output sent so far is not complete and must be
    /// discarded.
    Failed {
        /// A stable kind (e.g. `key_release_refused`, `input_tampered`).
        #[serde(deserialize_with = "bounded::string::<_, MAX_TEXT_LEN>")]
        kind: String,
        /// What happened, without secrets.
        #[serde(deserialize_with = "bounded::string::<_, MAX_TEXT_LEN>")]
        reason: String,
    },
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
    /// A name for logs and the audit trail.
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
