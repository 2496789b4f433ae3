//! The one accept loop of the project's stream services (the enclave's job
//! service, the parent's relay): accept until shut down, at most `limit`
//! connections handled at once (further ones wait in the listener's
//! backlog, never in memory), a failed accept retried after a short pause,
//! every connection's task aborted at shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::{BoxStream, Listener};

/// Pause after a failed accept (out of file descriptors, say), so a
/// persistent failure does not spin.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// Serve `listener` until `shutdown` completes. Each accepted connection is
/// handed to `handler` with its peer's address and the permit that counts it
/// against `limit` (at least 1); the connection counts until the handler
/// drops the permit (it may do so before it finishes, to hand the
/// connection over to another bound). Connections still running at
/// shutdown are aborted.
pub async fn serve<H, F>(
    listener: &Listener,
    limit: usize,
    shutdown: impl Future<Output = ()>,
    mut handler: H,
) where
    H: FnMut(BoxStream, String, OwnedSemaphorePermit) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(limit.max(1)));
    let mut tasks = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            p = Arc::clone(&slots).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                tasks.spawn(handler(stream, peer, permit));
            }
            Err(e) => {
                drop(permit);
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_RETRY).await;
            }
        }
        while tasks.try_join_next().is_some() {}
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::Address;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::AsyncWriteExt;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn at_most_limit_connections_are_handled_and_shutdown_aborts_them() {
        let listener = Listener::bind(&Address::Tcp("127.0.0.1:0".into()))
            .await
            .unwrap();
        let address = listener.local_address().unwrap();
        let Address::Tcp(addr) = address else {
            panic!("tcp")
        };
        let live = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel::<()>();
        let stop = Arc::new(tokio::sync::Notify::new());
        let server = {
            let (live, most, stop) = (Arc::clone(&live), Arc::clone(&most), Arc::clone(&stop));
            tokio::spawn(async move {
                serve(
                    &listener,
                    2,
                    stop.notified(),
                    move |_stream, _peer, permit| {
                        let (live, most, started) =
                            (Arc::clone(&live), Arc::clone(&most), started_tx.clone());
                        async move {
                            let now = live.fetch_add(1, Ordering::SeqCst) + 1;
                            most.fetch_max(now, Ordering::SeqCst);
                            let _ = started.send(());
                            // Held until shutdown aborts it.
                            std::future::pending::<()>().await;
                            drop(permit);
                        }
                    },
                )
                .await;
            })
        };
        let mut clients = Vec::new();
        for _ in 0..5 {
            let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
            c.write_all(b"x").await.unwrap();
            clients.push(c);
        }
        // Two are handled; the others wait in the backlog. (The pause is a
        // window for a third to be wrongly handled, not synchronisation.)
        started.recv().await.unwrap();
        started.recv().await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(most.load(Ordering::SeqCst), 2);
        stop.notify_one();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("shutdown ends the loop")
            .unwrap();
        assert_eq!(most.load(Ordering::SeqCst), 2);
    }
}
