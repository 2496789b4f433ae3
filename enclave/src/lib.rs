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
#![deny(clippy::print_stderr)]
#![warn(missing_docs)]

use kluis_proto::job::FailureKind;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// `eprintln!` that cannot panic: a line for standard error that is closed
/// or full (`2>&1 | head`, `2>/dev/full`) is lost, and the program goes on
/// to its documented exit instead of a panic.
macro_rules! to_stderr {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

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

impl AllowedJob {
    /// Whether input under this master key may be this job's input.
    fn admits_input(&self, input_key: &str) -> bool {
        self.input_keys.is_empty() || self.input_keys.iter().any(|k| k == input_key)
    }
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

    /// Before key release: the input's master key, as the envelope's header
    /// names it, must be allowed. The header is not authenticated until the
    /// data key is released, so this only refuses early what
    /// [`EnclaveContext::check_released_keys`] would refuse anyway.
    pub fn check_input_key(
        &self,
        spec: &kluis_proto::job::JobSpec,
        input_key: &str,
    ) -> Result<(), job::JobError> {
        match self.candidates(spec) {
            None => Ok(()),
            Some(mut c) => {
                if c.any(|a| a.admits_input(input_key)) {
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

    /// After key release, before any use: one allowed job must admit both
    /// the input's master key and the secrets' master keys, as the verifier
    /// released them (a wrapped key names its master key, which only the
    /// verifier can read; the released answer says it). Each is checked
    /// against the same entry: an input allowed by one entry with secrets
    /// allowed by another is a job this image does not run (it would, for
    /// one, link pseudonyms across datasets the controller keeps apart).
    pub fn check_released_keys<'k>(
        &self,
        spec: &kluis_proto::job::JobSpec,
        input_key: &str,
        secrets: impl Iterator<Item = &'k str> + Clone,
    ) -> Result<(), job::JobError> {
        match self.candidates(spec) {
            None => Ok(()),
            Some(mut c) => {
                if c.any(|a| {
                    a.admits_input(input_key)
                        && a.secret_keys.iter().map(String::as_str).eq(secrets.clone())
                }) {
                    Ok(())
                } else {
                    Err(job::JobError::new(
                        FailureKind::JobNotAllowed,
                        "no job this image runs has this input's master key together with \
                         these secrets' master keys",
                    ))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use kluis_proto::job::{JobSpec, WorkloadSpec};

    /// An NSM that answers nothing: these checks never ask it.
    struct NoNsm;
    impl kluis_nsm::Nsm for NoNsm {
        fn process(&self, _: kluis_nsm::Request) -> kluis_nsm::Response {
            kluis_nsm::Response::Error(kluis_nsm::ErrorCode::InternalError)
        }
    }

    fn pseudonymise() -> WorkloadSpec {
        WorkloadSpec::Pseudonymise {
            column: 0,
            delimiter: b',',
            secret: 0,
            header: false,
            check_national_number: false,
        }
    }

    /// Two jobs that differ only in their input and their secret: dataset A
    /// is pseudonymised under A's key, dataset B under B's.
    fn context() -> EnclaveContext {
        let mut ctx = EnclaveContext::new(
            Arc::new(NoNsm),
            "tcp:127.0.0.1:1".parse().unwrap(),
            [4; kluis_proto::message::P384_PUBLIC_KEY_LEN],
        );
        let entry = |input: &str, secret: &str| AllowedJob {
            workload: pseudonymise(),
            output_key: "agency/research/prod".into(),
            secret_keys: vec![secret.into()],
            input_keys: vec![input.into()],
        };
        ctx.allowed_jobs = Some(vec![
            entry("agency/a/prod", "agency/pseudonym-a/prod"),
            entry("agency/b/prod", "agency/pseudonym-b/prod"),
        ]);
        ctx
    }

    fn spec() -> JobSpec {
        JobSpec {
            job_id: "j".into(),
            workload: pseudonymise(),
            output_key: "agency/research/prod".into(),
            secrets: vec![kluis_proto::job::WrappedSecret(vec![1; 40])],
            authorisation: None,
        }
    }

    #[test]
    fn the_input_and_the_secrets_must_be_allowed_by_the_same_job() {
        let ctx = context();
        let spec = spec();
        for (input, secret) in [
            ("agency/a/prod", "agency/pseudonym-a/prod"),
            ("agency/b/prod", "agency/pseudonym-b/prod"),
        ] {
            assert!(ctx.check_input_key(&spec, input).is_ok());
            ctx.check_released_keys(&spec, input, [secret].into_iter())
                .unwrap();
        }
        // Each key is allowed by some entry, but not together.
        for (input, secret) in [
            ("agency/a/prod", "agency/pseudonym-b/prod"),
            ("agency/b/prod", "agency/pseudonym-a/prod"),
        ] {
            assert!(ctx.check_input_key(&spec, input).is_ok());
            let err = ctx
                .check_released_keys(&spec, input, [secret].into_iter())
                .unwrap_err();
            assert_eq!(
                err.kind,
                FailureKind::JobNotAllowed,
                "{input} with {secret}"
            );
        }
        // An input no entry allows, before and after release.
        assert!(ctx.check_input_key(&spec, "agency/c/prod").is_err());
        assert!(ctx
            .check_released_keys(
                &spec,
                "agency/c/prod",
                ["agency/pseudonym-a/prod"].into_iter()
            )
            .is_err());
    }

    #[test]
    fn without_a_list_every_released_key_passes() {
        let mut ctx = context();
        ctx.allowed_jobs = None;
        ctx.check_released_keys(&spec(), "agency/c/prod", ["any/key/prod"].into_iter())
            .unwrap();
    }
}
