//! Running a job again on another verifier replica, and only when that is
//! safe.
//!
//! The relay ([`crate::relay`]) fails over by itself only while a replica
//! has answered nothing. When a replica fails after it issued the enclave's
//! challenge, the exchange is lost: the challenge is good only there. The
//! enclave then fails the job (`verifier_unavailable`), and the whole job —
//! so the whole key-release exchange, with a fresh challenge from another
//! replica, a fresh ephemeral key and a fresh attestation document — may be
//! run again, **but only if no key request reached any replica** while it
//! ran. A key request that reached a replica may have been decided there
//! (audited as allowed, a run of an authorisation counted, keys sealed)
//! with its answer lost; running the job again would make a second,
//! separately audited request (and spend another run of the
//! authorisation), so the parent never does that by itself and says why.
//!
//! The rule, checked on the relay's counters ([`Verifiers::stats`]) taken
//! before and after the attempt: the job failed with
//! `verifier_unavailable`, some replica ended an exchange it had answered
//! (`failed_after_answer` grew), and no frame other than a challenge
//! request was sent to any replica (`key_requests` did not grow). The relay
//! counts a key request before writing it and a replica's end before the
//! enclave can see it, so the counters are up to date when the job's
//! failure arrives. At most one attempt per replica.

use std::path::Path;

use kluis_proto::job::FailureKind;
use kluis_transport::BoxStream;

use crate::job::{run_job, run_job_on, JobReport, JobRun, Progress, RunError};
use crate::relay::{ReplicaStats, Verifiers};

/// Whether a job that failed with `error` may run again, given the relay's
/// counters before (`before`) and after (`after`) the attempt.
pub fn may_run_again(error: &RunError, before: &[ReplicaStats], after: &[ReplicaStats]) -> bool {
    let total = |stats: &[ReplicaStats], field: fn(&ReplicaStats) -> u64| -> u64 {
        stats.iter().map(field).fold(0u64, u64::saturating_add)
    };
    error.enclave_kind() == Some(FailureKind::VerifierUnavailable)
        && before.len() == after.len()
        && total(after, |s| s.failed_after_answer) > total(before, |s| s.failed_after_answer)
        && total(after, |s| s.key_requests) == total(before, |s| s.key_requests)
}

/// Run `job` through a relay to `verifiers` that runs in this process,
/// running it again (with a new input from `open_input`) after a replica
/// failed mid-exchange, as the module documentation says. `first` is a
/// connection already made to the enclave for the first attempt (later
/// attempts connect once each).
pub async fn run_job_failing_over<R>(
    job: &JobRun,
    verifiers: &Verifiers,
    first: Option<BoxStream>,
    mut open_input: impl FnMut() -> std::io::Result<R>,
    output: &Path,
    mut progress: impl FnMut(&Progress),
) -> Result<JobReport, RunError>
where
    R: Into<crate::job::JobInput>,
{
    let attempts = verifiers.len().max(1);
    let mut first = first;
    let mut attempt = 1usize;
    loop {
        let before = verifiers.stats();
        let input = open_input().map_err(|source| RunError::Io {
            context: "opening the input".to_owned(),
            source,
        })?;
        let result = match first.take() {
            Some(stream) => run_job_on(job, stream, input, output, &mut progress).await,
            None => run_job(job, input, output, &mut progress).await,
        };
        let error = match result {
            Ok(report) => return Ok(report),
            Err(e) => e,
        };
        let after = verifiers.stats();
        if attempt < attempts && may_run_again(&error, &before, &after) {
            tracing::warn!(%error, attempt,
                "a verifier replica failed after issuing the challenge and before any key \
                 request reached it; running the job again on the next replica");
            attempt = attempt.saturating_add(1);
            continue;
        }
        let total = |stats: &[ReplicaStats]| -> u64 {
            stats
                .iter()
                .map(|s| s.key_requests)
                .fold(0u64, u64::saturating_add)
        };
        if error.enclave_kind() == Some(FailureKind::VerifierUnavailable)
            && total(&after) > total(&before)
        {
            return Err(RunError::AnswerLost(Box::new(error)));
        }
        return Err(error);
    }
}
