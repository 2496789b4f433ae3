//! The enclave's job service: accept jobs from the parent, a bounded number
//! at a time, until shut down.

use std::future::Future;
use std::sync::Arc;

use kluis_transport::Listener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::EnclaveContext;

/// Serve jobs on `listener` until `shutdown` completes; at most `max_jobs`
/// at once (further connections wait in the backlog). Running jobs are
/// abandoned at shutdown: their outputs lack a final segment, so none can
/// pass for complete.
pub async fn serve(
    listener: Listener,
    ctx: Arc<EnclaveContext>,
    max_jobs: usize,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(max_jobs.max(1)));
    let mut jobs = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = Arc::clone(&slots).acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let ctx = Arc::clone(&ctx);
        jobs.spawn(async move {
            match crate::job::serve_job(stream, ctx).await {
                Ok(c) => tracing::info!(%peer, records_in = c.records_in, records_out = c.records_out, bytes_in = c.bytes_in, "job done"),
                Err(e) => tracing::warn!(%peer, kind = e.kind, "job failed: {}", e.message),
            }
            drop(permit);
        });
        while jobs.try_join_next().is_some() {}
    }
    jobs.abort_all();
}
