//! The Kluis enclave application, as a library.
//!
//! Inside a Nitro Enclave the `enclave` program listens for jobs from the
//! parent (vsock), asks the verifier for keys through the parent's relay
//! (vsock to CID 3), and turns an encrypted input envelope into an encrypted
//! output envelope without any plaintext or key leaving the enclave. See
//! [`job`] for one job's life, [`workload`] for what runs on the plaintext,
//! and [`release`] for the attested key request.
//!
//! The NSM is the real `/dev/nsm` unless the program is started with an
//! explicit simulation flag, which it then announces loudly.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use kluis_proto::job::FailureKind;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub mod cli;
pub mod exec;
pub mod job;
#[cfg(feature = "simulator")]
mod nsm_sim;
mod pipeline;
pub mod release;
pub mod server;
pub mod workload;

/// One job this image runs (its `allowed_jobs` configuration, measured with
/// the image). A job matches when its workload and output key are exactly
/// these, its secrets are data keys of exactly these master keys (in order),
/// and its input is under one of `input_keys` (any, if empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedJob {
    /// The workload, parameters included.
    pub workload: kluis_proto::job::WorkloadSpec,
    /// The master key the output must be under.
    pub output_key: String,
    /// The master keys of the job's secrets, in order.
    pub secret_keys: Vec<String>,
    /// The master keys the input may be under (empty: any the policy admits).
    pub input_keys: Vec<String>,
}

/// What every job of one enclave shares.
pub struct EnclaveContext {
    /// The NSM (device or simulator).
    pub nsm: Arc<dyn kluis_nsm::Nsm>,
    /// Where the verifier is reached (the parent's relay).
    pub verifier: kluis_transport::Address,
    /// The verifier's identity key, built into the image (SEC1, uncompressed).
    pub verifier_public_key: [u8; kluis_proto::message::P384_PUBLIC_KEY_LEN],
    /// The image's workload directory for `exec` jobs (`None`: exec is off).
    pub exec_dir: Option<PathBuf>,
    /// A job whose parent sends or reads nothing this long fails.
    pub idle_timeout: Duration,
    /// The whole key exchange must finish within this.
    pub key_release_timeout: Duration,
    /// The jobs this image runs; `None` runs any job the parent asks for (the
    /// keys' policies still decide which keys it gets). Production images set
    /// it: the parent chooses the job, and without this list it could ask an
    /// admitted image for a workload the controller did not intend (say,
    /// `identity` where `pseudonymise` was meant).
    pub allowed_jobs: Option<Vec<AllowedJob>>,
    /// An `exec` program running longer than this is killed and its job fails.
    pub exec_timeout: Duration,
    /// A job running longer than this from accept fails (whatever it is
    /// waiting for), and every part of it is stopped.
    pub job_timeout: Duration,
    /// A connection that has not sent a complete `Start` within this is
    /// closed (it never takes a job slot).
    pub start_timeout: Duration,
    /// Without `allowed_jobs`, which jobs the parent may choose.
    pub unlisted_jobs: UnlistedJobs,
    /// Run only jobs whose `Start` carries a job authorisation signed by the
    /// pinned verifier key (`require_authorisation = true` in the measured
    /// configuration; the keys' policies can require it on the verifier's
    /// side too).
    pub require_authorisation: bool,
    /// What the job service is doing (connections, jobs, threads).
    pub stats: Arc<server::ServiceStats>,
}

/// Which jobs an image without `allowed_jobs` runs.
///
/// A workload that can fail on the data (`pseudonymise` on a bad national
/// number, `aggregate` on a missing column or a non-number, any `exec`
/// program) makes its failure bit an oracle when the parent chooses its
/// parameters: by choosing a column, a delimiter or a grouping, a hostile
/// parent can test predicates on the plaintext one job at a time. Such an
/// image therefore runs only workloads whose outcome does not depend on the
/// plaintext, unless its measured configuration says otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnlistedJobs {
    /// Only `identity` and `reencrypt` (the default).
    #[default]
    DataIndependent,
    /// Any workload the parent asks for (tests, and images whose every
    /// workload is harmless on any parameters).
    Any,
}

impl std::fmt::Debug for EnclaveContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnclaveContext")
            .field("verifier", &self.verifier)
            .field(
                "verifier_public_key",
                &hex::encode(self.verifier_public_key),
            )
            .field("exec_dir", &self.exec_dir)
            .finish_non_exhaustive()
    }
}

impl EnclaveContext {
    /// A context with default timeouts (idle 60 s, key release 30 s, start
    /// 10 s, job a day), no allowed-jobs list and only data-independent
    /// workloads.
    pub fn new(
        nsm: Arc<dyn kluis_nsm::Nsm>,
        verifier: kluis_transport::Address,
        verifier_public_key: [u8; kluis_proto::message::P384_PUBLIC_KEY_LEN],
    ) -> Self {
        EnclaveContext {
            nsm,
            verifier,
            verifier_public_key,
            exec_dir: None,
            idle_timeout: Duration::from_secs(60),
            key_release_timeout: Duration::from_secs(30),
            allowed_jobs: None,
            exec_timeout: Duration::from_secs(3600),
            job_timeout: Duration::from_secs(24 * 3600),
            start_timeout: Duration::from_secs(10),
            unlisted_jobs: UnlistedJobs::DataIndependent,
            require_authorisation: false,
            stats: Arc::new(server::ServiceStats::default()),
        }
    }

    fn candidates<'a>(
        &'a self,
        spec: &'a kluis_proto::job::JobSpec,
    ) -> Option<impl Iterator<Item = &'a AllowedJob> + 'a> {
        let allowed = self.allowed_jobs.as_ref()?;
        Some(allowed.iter().filter(move |a| {
            a.workload == spec.workload
                && a.output_key == spec.output_key
                && a.secret_keys.len() == spec.secrets.len()
        }))
    }

    /// Before anything else: the workload, output key and number of secrets
    /// must match an allowed job; without a list, the workload must be one
    /// the image lets the parent choose ([`UnlistedJobs`]).
    pub fn check_allowed(&self, spec: &kluis_proto::job::JobSpec) -> Result<(), job::JobError> {
        match self.candidates(spec).map(|mut c| c.next().is_some()) {
            None if self.unlisted_jobs == UnlistedJobs::DataIndependent
                && workload::fails_on_data(&spec.workload) =>
            {
                Err(job::JobError::new(
                    FailureKind::JobNotAllowed,
                    format!(
                        "this image lists no allowed jobs, and {} can fail on the data: \
                         a parent-chosen {} would make its failure an oracle on the plaintext",
                        spec.workload.name(),
                        spec.workload.name()
                    ),
                ))
            }
            None | Some(true) => Ok(()),
            Some(false) => Err(job::JobError::new(
                FailureKind::JobNotAllowed,
                format!(
                    "this image does not run {} with output key {:?} and {} secret(s)",
                    spec.workload.name(),
                    spec.output_key,
                    spec.secrets.len()
                ),
            )),
        }
    }

    /// Before key release: the input's master key must be allowed.
    pub fn check_input_key(
        &self,
        spec: &kluis_proto::job::JobSpec,
        input_key: &str,
    ) -> Result<(), job::JobError> {
        match self.candidates(spec) {
            None => Ok(()),
            Some(mut c) => {
                if c.any(|a| a.input_keys.is_empty() || a.input_keys.iter().any(|k| k == input_key))
                {
                    Ok(())
                } else {
                    Err(job::JobError::new(
                        FailureKind::JobNotAllowed,
                        format!("this image does not run that job on input under {input_key:?}"),
                    ))
                }
            }
        }
    }

    /// After key release, before any use: the secrets must be data keys of
    /// the allowed master keys (the wrapped form names its key, which only
    /// the verifier can read; the released answer says it).
    pub fn check_secret_keys<'k>(
        &self,
        spec: &kluis_proto::job::JobSpec,
        released: impl Iterator<Item = &'k str> + Clone,
    ) -> Result<(), job::JobError> {
        match self.candidates(spec) {
            None => Ok(()),
            Some(mut c) => {
                if c.any(|a| {
                    a.secret_keys
                        .iter()
                        .map(String::as_str)
                        .eq(released.clone())
                }) {
                    Ok(())
                } else {
                    Err(job::JobError::new(
                        FailureKind::JobNotAllowed,
                        "the job's secrets are not data keys of the master keys this image allows",
                    ))
                }
            }
        }
    }
}
