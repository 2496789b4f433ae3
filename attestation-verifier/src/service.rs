//! The key-release service: frames over TCP (optionally TLS), bounded.
//!
//! Shaped like mini-redis: the caller binds the listener (tests use port 0) and
//! passes a shutdown future; handlers are generic over `AsyncRead +
//! AsyncWrite`; connections and in-flight requests are capped by semaphores;
//! idle connections time out; on shutdown the listener stops accepting and
//! in-flight requests finish (up to a grace period).
//!
//! Against one client starving the others: a peer address may hold at most
//! [`ServiceConfig::max_connections_per_peer`] connections; a new
//! connection must complete its first frame within
//! [`ServiceConfig::first_frame_timeout`]; and
//! [`ServiceConfig::reserved_connections`] of the slots are kept for peers
//! that hold no other connection. A connection beyond these limits is
//! closed at once (the client retries) rather than queued behind the flood.
//! A connection holds at most [`MAX_OPEN_CHALLENGES_PER_CONNECTION`]
//! challenges; a slot is freed only when its own nonce is used or expires,
//! or when the connection closes (its open nonces are withdrawn).
//!
//! Broker work (signature checks, disk writes for the audit log) runs on the
//! blocking pool so it never stalls the reactor.

use crate::broker::Broker;
use kluis_proto::{
    read_message, write_message, ErrorCode, FrameError, Request, Response, WireError,
};
use kluis_transport::{Listener, Peer};
use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Limits of the service.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Most connections served at once; further ones wait in the backlog.
    pub max_connections: usize,
    /// Most requests processed at once across all connections.
    pub max_in_flight: usize,
    /// Largest frame accepted.
    pub max_frame_len: usize,
    /// A connection idle this long is closed.
    pub idle_timeout: Duration,
    /// How long shutdown waits for in-flight work.
    pub shutdown_grace: Duration,
    /// Most connections one peer address may hold at once.
    pub max_connections_per_peer: usize,
    /// Of `max_connections`, how many are kept for peers holding no other
    /// connection (so a few busy peers cannot take every slot).
    pub reserved_connections: usize,
    /// A new connection must finish its TLS handshake and send its first
    /// complete frame within this.
    pub first_frame_timeout: Duration,
    /// A request not decided within this (waiting for a slot included) is
    /// answered `unavailable`: a store that hangs (a database cut off
    /// behind a proxy that still acknowledges) stops releases within a
    /// bounded time. The decision may still finish later; its keys are then
    /// never sent, and its audit record, if written, stands.
    pub decision_timeout: Duration,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            max_connections: 256,
            max_in_flight: 32,
            // A key request carries a ~5 KiB document and up to 64 wrapped keys.
            max_frame_len: 128 * 1024,
            idle_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
            max_connections_per_peer: 16,
            reserved_connections: 32,
            first_frame_timeout: Duration::from_secs(5),
            decision_timeout: Duration::from_secs(15),
        }
    }
}

/// Optional TLS for the listener.
pub type TlsAcceptor = tokio_rustls::TlsAcceptor;

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn random_nonce() -> Option<[u8; 32]> {
    use aws_lc_rs::rand::SecureRandom;
    let mut nonce = [0u8; 32];
    aws_lc_rs::rand::SystemRandom::new().fill(&mut nonce).ok()?;
    Some(nonce)
}

/// Connections held per peer address.
#[derive(Debug, Default)]
struct PeerTable(Mutex<HashMap<IpAddr, usize>>);

/// One connection counted against its peer; uncounted on drop.
struct PeerSlot {
    table: Arc<PeerTable>,
    ip: IpAddr,
}

impl PeerTable {
    /// Count a connection from `ip` unless it holds `max` already; returns
    /// the slot and how many it held before.
    fn take(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<(PeerSlot, usize)> {
        let mut map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let held = map.entry(ip).or_insert(0);
        if *held >= max {
            return None;
        }
        let before = *held;
        *held = held.saturating_add(1);
        Some((
            PeerSlot {
                table: Arc::clone(self),
                ip,
            },
            before,
        ))
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut map = self
            .table
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(held) = map.get_mut(&self.ip) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// Serve until `shutdown` completes, then drain.
pub async fn run(
    listener: TcpListener,
    broker: Arc<Broker>,
    config: ServiceConfig,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let reserved = config
        .reserved_connections
        .min(config.max_connections.saturating_sub(1));
    let general = Arc::new(Semaphore::new(
        config.max_connections.saturating_sub(reserved).max(1),
    ));
    let reserve = Arc::new(Semaphore::new(reserved));
    let peers = Arc::new(PeerTable::default());
    let in_flight = Arc::new(Semaphore::new(config.max_in_flight));
    let per_peer = config.max_connections_per_peer.max(1);
    // A connection is admitted when its address holds fewer than its share
    // and a slot is free; the reserve is for addresses holding no other
    // connection, so a few busy peers cannot take every slot. Refused
    // connections are closed at once.
    let gate = |peer: &Peer| -> Option<(PeerSlot, OwnedSemaphorePermit)> {
        let Peer::Tcp(addr) = peer else {
            return None;
        };
        let (peer_slot, held) = peers.take(addr.ip(), per_peer)?;
        let permit = match Arc::clone(&general).try_acquire_owned() {
            Ok(p) => p,
            Err(_) if held == 0 => Arc::clone(&reserve).try_acquire_owned().ok()?,
            Err(_) => return None,
        };
        Some((peer_slot, permit))
    };
    let drain = config.shutdown_grace;
    kluis_transport::serve_gated(
        Listener::Tcp(listener),
        shutdown,
        drain,
        gate,
        |stream, peer, admitted, closing| {
            let broker = Arc::clone(&broker);
            let in_flight = Arc::clone(&in_flight);
            let config = config.clone();
            let tls = tls.clone();
            async move {
                let result = match tls {
                    None => serve_connection(stream, broker, in_flight, &config, closing).await,
                    Some(acceptor) => {
                        match tokio::time::timeout(
                            config.first_frame_timeout,
                            acceptor.accept(stream),
                        )
                        .await
                        {
                            Ok(Ok(tls_stream)) => {
                                serve_connection(tls_stream, broker, in_flight, &config, closing)
                                    .await
                            }
                            Ok(Err(e)) => Err(ConnectionEnd::Io(e.to_string())),
                            Err(_) => Err(ConnectionEnd::Idle),
                        }
                    }
                };
                if let Err(end) = result {
                    tracing::debug!(%peer, "connection ended: {end:?}");
                }
                drop(admitted);
            }
        },
    )
    .await;
    Ok(())
}

/// Why a connection ended other than by the peer closing it (for logs).
#[derive(Debug)]
pub enum ConnectionEnd {
    /// The service is shutting down.
    Closed,
    /// No request within the idle timeout.
    Idle,
    /// A transport or framing error.
    Io(String),
}

/// Most challenges one connection may hold open at once. Together with the
/// connection limit this bounds what one peer can take of the nonce store, so
/// a flood of challenges cannot lock other enclaves out.
pub const MAX_OPEN_CHALLENGES_PER_CONNECTION: usize = 4;

/// Write one response, bounded in time (a peer that stops reading cannot hold
/// a connection slot) and abandoned on shutdown.
async fn send<S: AsyncWrite + Unpin>(
    stream: &mut S,
    response: &Response,
    config: &ServiceConfig,
    closing: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<(), ConnectionEnd> {
    tokio::select! {
        _ = closing.changed() => Err(ConnectionEnd::Closed),
        written = tokio::time::timeout(
            config.idle_timeout,
            write_message(stream, response, config.max_frame_len),
        ) => match written {
            Err(_) => Err(ConnectionEnd::Idle),
            Ok(Err(e)) => Err(ConnectionEnd::Io(e.to_string())),
            Ok(Ok(())) => Ok(()),
        },
    }
}

/// Serve one connection: request, answer, until the peer closes. Challenges
/// this connection left unused are withdrawn when it ends.
pub async fn serve_connection<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    broker: Arc<Broker>,
    in_flight: Arc<Semaphore>,
    config: &ServiceConfig,
    mut closing: tokio::sync::watch::Receiver<bool>,
) -> Result<(), ConnectionEnd> {
    let mut open_challenges: Vec<[u8; 32]> = Vec::new();
    let result = connection_loop(
        &mut stream,
        &broker,
        &in_flight,
        config,
        &mut closing,
        &mut open_challenges,
    )
    .await;
    if !open_challenges.is_empty() {
        // May reach the store's database: not on the runtime's threads.
        let broker = Arc::clone(&broker);
        let _ = tokio::task::spawn_blocking(move || {
            broker.withdraw_challenges(&open_challenges);
        })
        .await;
    }
    result
}

async fn connection_loop<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    broker: &Arc<Broker>,
    in_flight: &Arc<Semaphore>,
    config: &ServiceConfig,
    closing: &mut tokio::sync::watch::Receiver<bool>,
    open_challenges: &mut Vec<[u8; 32]>,
) -> Result<(), ConnectionEnd> {
    let bad_request = Response::Error {
        code: ErrorCode::BadRequest,
    };
    // The first frame must come soon; later ones within the idle timeout.
    let mut deadline = config.first_frame_timeout;
    loop {
        if *closing.borrow() {
            return Err(ConnectionEnd::Closed);
        }
        let next = tokio::select! {
            _ = closing.changed() => return Err(ConnectionEnd::Closed),
            next = tokio::time::timeout(
                deadline,
                read_message::<Request, _>(stream, config.max_frame_len),
            ) => next,
        };
        deadline = config.idle_timeout;
        let request = match next {
            Err(_) => return Err(ConnectionEnd::Idle),
            Ok(Err(WireError::Frame(FrameError::Closed))) => return Ok(()),
            Ok(Err(WireError::Frame(e))) => {
                // Framing is lost: answer once, then close.
                tracing::debug!("bad frame: {e}");
                let _ = send(stream, &bad_request, config, closing).await;
                return Err(ConnectionEnd::Io(e.to_string()));
            }
            Ok(Err(e)) => {
                tracing::debug!("bad message: {e}");
                send(stream, &bad_request, config, closing).await?;
                continue;
            }
            Ok(Ok(request)) => request,
        };
        if let Request::Challenge = &request {
            // Only a used or expired nonce frees its slot.
            broker.retain_open_challenges(open_challenges, now_ms());
            if open_challenges.len() >= MAX_OPEN_CHALLENGES_PER_CONNECTION {
                let busy = Response::Error {
                    code: ErrorCode::Unavailable,
                };
                send(stream, &busy, config, closing).await?;
                continue;
            }
        }
        let decided = tokio::time::timeout(config.decision_timeout, async {
            let Ok(permit) = Arc::clone(in_flight).acquire_owned().await else {
                return Err(ConnectionEnd::Closed);
            };
            let broker = Arc::clone(broker);
            // The permit goes with the blocking work: a decision that hangs
            // keeps its slot, so hung decisions never exceed max_in_flight.
            let joined = tokio::task::spawn_blocking(move || {
                let response = broker.handle(request, now_ms(), &random_nonce);
                drop(permit);
                response
            })
            .await;
            Ok(joined.unwrap_or(Response::Error {
                code: ErrorCode::Internal,
            }))
        })
        .await;
        let response = match decided {
            Ok(Ok(response)) => response,
            Ok(Err(end)) => return Err(end),
            Err(_) => {
                tracing::error!(
                    timeout = ?config.decision_timeout,
                    "a request was not decided in time; answering unavailable"
                );
                Response::Error {
                    code: ErrorCode::Unavailable,
                }
            }
        };
        if let Response::Challenge { nonce, .. } = &response {
            open_challenges.push(*nonce);
        }
        send(stream, &response, config, closing).await?;
    }
}
