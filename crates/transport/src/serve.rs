//! The one accept loop of the project's stream services: the enclave's job
//! service, the parent's relay and the verifier's key-release service.
//!
//! It accepts until shut down and retries a failed accept after a short pause
//! (out of file descriptors, say), so a persistent failure does not spin. How
//! a connection is admitted is the caller's choice:
//! - [`serve`]: at most `limit` connections at once. Further ones wait in the
//!   listener's backlog, never in memory. Every connection still running at
//!   shutdown is aborted.
//! - [`serve_gated`]: each accepted connection is admitted or refused (closed
//!   at once) by a gate that sees its peer, e.g. per-address limits with a
//!   reserve for newcomers. At shutdown the listener is closed, the
//!   connections are told through [`Closing`], and they get `drain` to finish
//!   before they are aborted.

use std::borrow::Borrow;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::{BoxStream, Listener, Peer};

/// Pause after a failed accept, so a persistent failure does not spin.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// A connection's place under [`serve`]'s limit. The connection counts until
/// this is dropped, which the handler may do before it finishes, to hand the
/// connection over to another bound.
#[derive(Debug)]
pub struct Slot(#[allow(dead_code)] Option<OwnedSemaphorePermit>);

/// Becomes `true` when the service shuts down: a connection that is idle
/// should close, and one in the middle of a request should finish it.
pub type Closing = tokio::sync::watch::Receiver<bool>;

/// Serve `listener` until `shutdown` completes. Each accepted connection is
/// handed to `handler` with its peer and the [`Slot`] that counts it against
/// `limit` (at least 1). Connections still running at shutdown are aborted.
pub async fn serve<H, F>(
    listener: &Listener,
    limit: usize,
    shutdown: impl Future<Output = ()>,
    mut handler: H,
) where
    H: FnMut(BoxStream, Peer, Slot) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(limit.max(1)));
    accept_loop(
        listener,
        shutdown,
        Duration::ZERO,
        Some(slots),
        |_: &Peer| Some(()),
        |stream, peer, slot, (), _closing| handler(stream, peer, slot),
    )
    .await;
}

/// Serve `listener` until `shutdown` completes, admitting each accepted
/// connection by `gate`. `gate` sees its peer and returns what the
/// connection holds while it runs (its admission, dropped when it ends), or
/// `None` to refuse it (it is closed at once). At shutdown the listener is
/// closed, [`Closing`] turns `true`, and connections get `drain` to end
/// before they are aborted.
pub async fn serve_gated<G, P, H, F>(
    listener: Listener,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
    gate: G,
    mut handler: H,
) where
    G: FnMut(&Peer) -> Option<P>,
    H: FnMut(BoxStream, Peer, P, Closing) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    accept_loop(
        listener,
        shutdown,
        drain,
        None,
        gate,
        |stream, peer, _slot, admitted, closing| handler(stream, peer, admitted, closing),
    )
    .await;
}

/// The loop itself. With `slots`, a slot is taken before each accept (so
/// the excess waits in the backlog); then `gate` admits or refuses.
async fn accept_loop<L, G, P, H, F>(
    listener: L,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
    slots: Option<Arc<Semaphore>>,
    mut gate: G,
    mut handler: H,
) where
    L: Borrow<Listener>,
    G: FnMut(&Peer) -> Option<P>,
    H: FnMut(BoxStream, Peer, Slot, P, Closing) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let mut tasks = JoinSet::new();
    let (closing_tx, closing) = tokio::sync::watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let slot = match &slots {
            None => Slot(None),
            Some(slots) => tokio::select! {
                () = &mut shutdown => break,
                p = Arc::clone(slots).acquire_owned() => match p {
                    Ok(p) => Slot(Some(p)),
                    Err(_) => break,
                },
            },
        };
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            a = listener.borrow().accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => match gate(&peer) {
                Some(admitted) => {
                    tasks.spawn(handler(stream, peer, slot, admitted, closing.clone()));
                }
                None => tracing::debug!(%peer, "connection refused"),
            },
            Err(e) => {
                drop(slot);
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_RETRY).await;
            }
        }
        // Reap finished connections so the set does not grow.
        while tasks.try_join_next().is_some() {}
    }
    // New connections are refused from here on (for an owned listener).
    drop(listener);
    let _ = closing_tx.send(true);
    if !drain.is_zero() && !tasks.is_empty() {
        tracing::info!("shutting down: waiting for {} connection(s)", tasks.len());
        let _ =
            tokio::time::timeout(drain, async { while tasks.join_next().await.is_some() {} }).await;
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
                    move |_stream, _peer, permit: Slot| {
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_gate_refuses_and_shutdown_drains_what_it_admitted() {
        use tokio::io::AsyncReadExt;
        let listener = Listener::bind(&Address::Tcp("127.0.0.1:0".into()))
            .await
            .unwrap();
        let Address::Tcp(addr) = listener.local_address().unwrap() else {
            panic!("tcp")
        };
        let admitted = Arc::new(AtomicUsize::new(0));
        let finished = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(tokio::sync::Notify::new());
        let server = {
            let (admitted, finished, stop) = (
                Arc::clone(&admitted),
                Arc::clone(&finished),
                Arc::clone(&stop),
            );
            tokio::spawn(async move {
                serve_gated(
                    listener,
                    stop.notified(),
                    Duration::from_secs(5),
                    // Only the first connection is admitted.
                    move |_peer: &Peer| {
                        (admitted.fetch_add(1, Ordering::SeqCst) == 0).then_some(())
                    },
                    move |mut stream, _peer, (), mut closing| {
                        let finished = Arc::clone(&finished);
                        async move {
                            // Works until told the service is closing, then
                            // finishes (the drain lets it).
                            let _ = closing.changed().await;
                            let _ = stream.write_all(b"bye").await;
                            finished.fetch_add(1, Ordering::SeqCst);
                        }
                    },
                )
                .await;
            })
        };
        let mut first = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let mut second = tokio::net::TcpStream::connect(&addr).await.unwrap();
        // The refused one is closed at once.
        let mut buf = [0u8; 8];
        let n = tokio::time::timeout(Duration::from_secs(5), second.read(&mut buf))
            .await
            .unwrap()
            .unwrap_or(0);
        assert_eq!(n, 0);
        stop.notify_one();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("shutdown ends the loop")
            .unwrap();
        // The admitted one was told, and finished before the loop returned.
        assert_eq!(finished.load(Ordering::SeqCst), 1);
        let mut got = Vec::new();
        first.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"bye");
    }
}
