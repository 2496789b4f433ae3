//! The relay between the enclave and the verifier.
//!
//! The enclave cannot reach the network; it connects to the parent (vsock
//! CID 3), and the parent connects onward to the controller's verifier and
//! moves whole frames both ways. It can read, drop, change or invent frames
//! (it is an attacker), and none of that gets it a key: the verifier only
//! answers attested requests and seals keys to the enclave's ephemeral key,
//! and the enclave only accepts answers signed by the verifier key in its
//! image.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use kluis_transport::{Address, BoxStream, Listener};
use tokio::io::AsyncWriteExt;
use tokio::task::JoinSet;

use crate::hook::{read_raw_frame, Channel, Direction, FrameHook};

/// Largest frame relayed (the verifier's limit).
pub const MAX_RELAY_FRAME_LEN: usize = 128 * 1024;
/// Most relayed connections at once.
pub const MAX_RELAY_CONNECTIONS: usize = 64;
/// A relayed connection idle this long is closed.
pub const RELAY_IDLE: Duration = Duration::from_secs(60);

async fn pump(
    mut from: tokio::io::ReadHalf<BoxStream>,
    mut to: tokio::io::WriteHalf<BoxStream>,
    direction: Direction,
    hook: Arc<dyn FrameHook>,
) {
    loop {
        let frame =
            match tokio::time::timeout(RELAY_IDLE, read_raw_frame(&mut from, MAX_RELAY_FRAME_LEN))
                .await
            {
                Ok(Ok(Some(frame))) => frame,
                Ok(Ok(None)) | Ok(Err(_)) | Err(_) => break,
            };
        for out in hook.on_frame(Channel::Verifier, direction, frame) {
            if to.write_all(&out).await.is_err() {
                return;
            }
        }
        if to.flush().await.is_err() {
            return;
        }
    }
    let _ = to.shutdown().await;
}

/// Relay one enclave connection to the verifier.
pub async fn relay_connection(enclave: BoxStream, verifier: &Address, hook: Arc<dyn FrameHook>) {
    let upstream =
        match tokio::time::timeout(Duration::from_secs(10), kluis_transport::connect(verifier))
            .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::warn!(%verifier, error = %e, "verifier unreachable");
                return;
            }
            Err(_) => {
                tracing::warn!(%verifier, "verifier did not answer the connection");
                return;
            }
        };
    let (enclave_read, enclave_write) = tokio::io::split(enclave);
    let (verifier_read, verifier_write) = tokio::io::split(upstream);
    let up = pump(
        enclave_read,
        verifier_write,
        Direction::FromEnclave,
        Arc::clone(&hook),
    );
    let down = pump(verifier_read, enclave_write, Direction::ToEnclave, hook);
    tokio::join!(up, down);
}

/// Relay every connection on `listener` to `verifier` until `shutdown`.
pub async fn serve(
    listener: Listener,
    verifier: Address,
    hook: Arc<dyn FrameHook>,
    shutdown: impl Future<Output = ()>,
) {
    let mut tasks = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "relay accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        while tasks.try_join_next().is_some() {}
        if tasks.len() >= MAX_RELAY_CONNECTIONS {
            tracing::warn!(%peer, "too many relayed connections; refusing one");
            continue;
        }
        tracing::debug!(%peer, "relaying to the verifier");
        let verifier = verifier.clone();
        let hook = Arc::clone(&hook);
        tasks.spawn(async move { relay_connection(stream, &verifier, hook).await });
    }
    tasks.abort_all();
}
