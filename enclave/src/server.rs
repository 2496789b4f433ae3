//! The enclave's job service: accept jobs from the parent, a bounded number
//! at a time, until shut down.
//!
//! A connection goes through two bounded stages:
//!
//! 1. **Starting** (at most [`Limits::max_starting`] at once): it must send
//!    a complete `Start` within [`crate::EnclaveContext::start_timeout`], or
//!    it is closed. It holds no job slot while it does.
//! 2. **Running** (at most [`Limits::max_jobs`] at once): it holds a job
//!    slot from when it gets one (in arrival order) until every part of the
//!    job has stopped ([`crate::job::serve_job`]).
//!
//! The job's deadline runs from accept and covers both stages. Connections
//! beyond the bounds wait in the listener's backlog.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kluis_transport::{BoxStream, Listener};
use tokio::sync::Semaphore;

use crate::job::JobError;
use crate::EnclaveContext;
use kluis_proto::job::FailureKind;

/// What the service is doing now, for operators and tests.
#[derive(Debug, Default)]
pub struct ServiceStats {
    connections: AtomicUsize,
    jobs: AtomicUsize,
    threads: AtomicUsize,
}

impl ServiceStats {
    /// Connections accepted and not yet closed.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Jobs holding a slot (from the slot's grant until nothing of the job
    /// is left).
    pub fn jobs(&self) -> usize {
        self.jobs.load(Ordering::SeqCst)
    }

    /// Blocking threads of jobs (readers, workers, sealers) still alive.
    pub fn threads(&self) -> usize {
        self.threads.load(Ordering::SeqCst)
    }
}

/// Counts one against a gauge of [`ServiceStats`] for as long as it lives
/// (a connection, a job, a job's blocking thread).
pub(crate) struct Counted {
    stats: Arc<ServiceStats>,
    gauge: fn(&ServiceStats) -> &AtomicUsize,
}

impl Counted {
    fn up(stats: &Arc<ServiceStats>, gauge: fn(&ServiceStats) -> &AtomicUsize) -> Self {
        gauge(stats).fetch_add(1, Ordering::SeqCst);
        Counted {
            stats: Arc::clone(stats),
            gauge,
        }
    }

    /// A job's blocking thread.
    pub(crate) fn thread(stats: &Arc<ServiceStats>) -> Self {
        Self::up(stats, |s| &s.threads)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        (self.gauge)(&self.stats).fetch_sub(1, Ordering::SeqCst);
    }
}

/// The service's bounds.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most jobs at once.
    pub max_jobs: usize,
    /// Most connections at once that have not yet got a job slot.
    pub max_starting: usize,
}

impl Limits {
    /// `max_jobs` jobs, and twice as many connections starting (at least 8).
    pub fn for_jobs(max_jobs: usize) -> Self {
        let max_jobs = max_jobs.max(1);
        Limits {
            max_jobs,
            max_starting: max_jobs.saturating_mul(2).max(8),
        }
    }
}

/// Serve jobs on `listener` until `shutdown` completes, within `limits`.
/// Running jobs are abandoned at shutdown: their outputs lack a final
/// segment, so none can pass for complete.
pub async fn serve(
    listener: Listener,
    ctx: Arc<EnclaveContext>,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_jobs.max(1)));
    // The accept loop bounds the starting stage; a connection leaves it
    // (drops its permit) when it gets a job slot.
    kluis_transport::serve(
        &listener,
        limits.max_starting,
        shutdown,
        |stream, peer, starting| {
            let ctx = Arc::clone(&ctx);
            let slots = Arc::clone(&slots);
            async move {
                match serve_connection(stream, &ctx, slots, starting).await {
                    Ok(c) => tracing::info!(%peer, records_in = c.records_in, records_out = c.records_out, bytes_in = c.bytes_in, "job done"),
                    Err(e) => tracing::warn!(%peer, kind = e.kind.as_str(), "job failed: {}", e.message),
                }
            }
        },
    )
    .await;
}

/// The longest deadline a job can have (a year).
pub const MAX_JOB_TIMEOUT: Duration = Duration::from_secs(366 * 86_400);

/// One connection: its `Start`, a job slot, the job.
async fn serve_connection(
    stream: BoxStream,
    ctx: &Arc<EnclaveContext>,
    slots: Arc<Semaphore>,
    starting: kluis_transport::Slot,
) -> Result<kluis_proto::job::JobCounts, JobError> {
    let _connection = Counted::up(&ctx.stats, |s| &s.connections);
    let accepted = tokio::time::Instant::now();
    // (A deadline past what the clock can hold is no deadline: fail closed.)
    let deadline = accepted
        .checked_add(ctx.job_timeout.min(MAX_JOB_TIMEOUT))
        .unwrap_or(accepted);
    let timed_out = || {
        Err(JobError::new(
            FailureKind::JobTimeout,
            format!("the job ran longer than {}s", ctx.job_timeout.as_secs()),
        ))
    };
    let (mut reader, mut writer) = tokio::io::split(stream);
    let start = ctx.start_timeout.min(ctx.job_timeout);
    let spec = match crate::job::read_start(&mut reader, start).await {
        Ok(spec) => spec,
        Err(e) => {
            // A stalled or garbled start gets no slot; a parent that spoke
            // the protocol wrongly is told so.
            if e.kind != FailureKind::StartTimeout {
                crate::job::write_last(&mut writer, &Err(e.clone()), Duration::from_secs(1)).await;
            }
            return Err(e);
        }
    };
    // Wait for a slot (in arrival order) until the deadline.
    let slot = tokio::select! {
        s = slots.acquire_owned() => match s {
            Ok(s) => s,
            Err(_) => return Err(JobError::new(FailureKind::Internal, "the job slots are closed")),
        },
        () = tokio::time::sleep_until(deadline) => {
            let result = timed_out();
            crate::job::write_last(&mut writer, &result, Duration::from_secs(1)).await;
            return result;
        }
    };
    drop(starting);
    let job = Counted::up(&ctx.stats, |s| &s.jobs);
    let result = crate::job::serve_job(reader, writer, spec, Arc::clone(ctx), deadline).await;
    // Every part of the job has stopped: the slot is free again.
    drop(job);
    drop(slot);
    result
}
