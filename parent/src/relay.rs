//! The relay between the enclave and the verifier.
//!
//! The enclave cannot reach the network; it connects to the parent (vsock
//! CID 3), and the parent connects onward to the controller's verifier and
//! moves whole frames both ways. It can read, drop, change or invent frames
//! (it is an attacker), and none of that gets it a key: the verifier only
//! answers attested requests and seals keys to the enclave's ephemeral key,
//! and the enclave only accepts answers signed by the verifier key in its
//! image.
//!
//! # Several verifier replicas
//!
//! The relay may be given several replicas of the verifier ([`Verifiers`]).
//! The enclave opens one connection per key-release exchange (challenge,
//! attestation, release), and the relay carries each such connection to one
//! replica. A challenge nonce is issued by one replica and is good only
//! there (replicas share no nonces yet), so the rule is:
//!
//! - **Before an answer**: the relay tries the replicas in turn, starting
//!   with the one that last answered, each at most once per connection. It
//!   moves on to the next on a *connection error*: the connection (TCP, and
//!   TLS when configured) could not be made within the connect timeout, or
//!   the replica closed, reset or broke the connection, or stayed silent for
//!   [`Verifiers::with_answer_timeout`] after a request, **before a single
//!   whole frame came back**. The frames the enclave sent until then are
//!   re-sent to the next replica only if every one of them is a challenge
//!   request (at most [`MAX_REPLAYED_FRAMES`]); a challenge request carries
//!   nothing and the nonce the failed replica may have issued was never
//!   seen by the enclave. Anything else (a key request) is never re-sent:
//!   the connection is closed instead.
//! - **After an answer**: once a frame of a replica has been passed to the
//!   enclave, the exchange belongs to that replica. If it fails now, the
//!   relay closes the enclave's connection and sends nothing anywhere else:
//!   the enclave's challenge is good only on the failed replica, and a key
//!   request already sent may have been decided (audited, a run counted)
//!   with its answer lost. The replica is marked so that the next exchange
//!   starts with the next replica. Restarting the whole exchange is the
//!   job's to do: [`crate::failover`] runs a job again only when no key
//!   request reached any replica.
//! - A malformed frame from a replica is not a connection error: the
//!   connection is closed and nothing is retried.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kluis_transport::{Address, BoxStream, Listener};
use tokio::io::AsyncWriteExt;

use crate::hook::{read_raw_frame, Channel, Direction, FrameHook};

/// Largest frame relayed (the verifier's limit).
pub const MAX_RELAY_FRAME_LEN: usize = 128 * 1024;
/// Most relayed connections at once.
pub const MAX_RELAY_CONNECTIONS: usize = 64;
/// A relayed connection idle this long (or a peer that stops reading for
/// this long) is closed.
pub const RELAY_IDLE: Duration = Duration::from_secs(60);
/// The longest one relayed connection lives, however often its peers
/// speak: an exchange is a challenge and a key request, seconds long, and a
/// peer trickling a frame a minute keeps no slot for longer than this.
pub const MAX_EXCHANGE: Duration = Duration::from_secs(600);

impl From<Address> for VerifierTarget {
    fn from(address: Address) -> Self {
        VerifierTarget::plain(address)
    }
}

/// Where the verifier is: its address and, when it serves TLS, how to check
/// its certificate. TLS here protects the controller's network and the
/// verifier's service from third parties; the parent itself, which ends the
/// TLS connection, still sees only sealed key requests and answers.
#[derive(Clone)]
pub struct VerifierTarget {
    /// The verifier's address.
    pub address: Address,
    /// TLS: the connector (trusting the controller's CA) and the name the
    /// verifier's certificate must carry.
    pub tls: Option<(
        tokio_rustls::TlsConnector,
        rustls::pki_types::ServerName<'static>,
    )>,
}

impl std::fmt::Debug for VerifierTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifierTarget")
            .field("address", &self.address)
            .field("tls", &self.tls.as_ref().map(|(_, name)| name.to_str()))
            .finish()
    }
}

impl VerifierTarget {
    /// Plain TCP (a private link) to `address`.
    pub fn plain(address: Address) -> Self {
        VerifierTarget { address, tls: None }
    }

    /// TLS to `address`, trusting the CA certificates in `ca_pem` and
    /// expecting the certificate to name `server_name`.
    pub fn tls(address: Address, ca_pem: &[u8], server_name: &str) -> Result<Self, String> {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem) {
            let cert = cert.map_err(|e| format!("CA certificate: {e}"))?;
            roots
                .add(cert)
                .map_err(|e| format!("CA certificate: {e}"))?;
        }
        if roots.is_empty() {
            return Err("no CA certificate in the file".to_owned());
        }
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(server_name.to_owned())
            .map_err(|e| format!("server name {server_name:?}: {e}"))?;
        Ok(VerifierTarget {
            address,
            tls: Some((
                tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)),
                name,
            )),
        })
    }

    async fn connect(&self) -> std::io::Result<BoxStream> {
        let stream = kluis_transport::connect(&self.address).await?;
        match &self.tls {
            None => Ok(stream),
            Some((connector, name)) => Ok(Box::new(TlsToVerifier(
                connector.connect(name.clone(), stream).await?,
            ))),
        }
    }
}

/// A TLS connection to a verifier replica, as a [`kluis_transport::Stream`]
/// (whose bytes are not the socket's: it has none to offer).
struct TlsToVerifier(tokio_rustls::client::TlsStream<BoxStream>);

impl kluis_transport::Stream for TlsToVerifier {
    fn socket(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }
}

impl tokio::io::AsyncRead for TlsToVerifier {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for TlsToVerifier {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Default time a connection to one replica may take (TCP and TLS).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default time a replica may take to send its first frame after a request.
pub const DEFAULT_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Most verifier replicas one relay takes.
pub const MAX_REPLICAS: usize = 16;
/// Most challenge requests an enclave connection may have sent before a
/// failover and still have re-sent to the next replica (the verifier holds
/// at most 4 open challenges per connection).
pub const MAX_REPLAYED_FRAMES: usize = 4;

/// Why a list of replicas was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifiersError {
    /// No replica at all.
    #[error("no verifier address given")]
    Empty,
    /// More than [`MAX_REPLICAS`].
    #[error("{0} verifier addresses given; at most {MAX_REPLICAS} are supported")]
    TooMany(usize),
    /// The same address twice.
    #[error("verifier address {0} given twice")]
    Duplicate(String),
}

/// What happened on one replica, counted since the relay started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplicaStats {
    /// Connections that could not be made (refused, unreachable, timed out,
    /// TLS handshake failed).
    pub connect_failures: u64,
    /// Connections that failed before the replica sent its first frame (the
    /// relay then moved on, or gave up when a key request had been sent).
    pub failed_before_answer: u64,
    /// Exchanges the replica answered (its first frame went to the enclave).
    pub answered: u64,
    /// Answered exchanges that the replica ended before the enclave did
    /// (closed, reset or broke): never continued elsewhere.
    pub failed_after_answer: u64,
    /// Frames other than challenge requests (key requests) the relay sent
    /// to the replica (counted before they are written).
    pub key_requests: u64,
    /// Challenge requests the relay re-sent to this replica after another one
    /// failed before answering.
    pub replayed: u64,
}

#[derive(Default)]
struct Counters {
    connect_failures: AtomicU64,
    failed_before_answer: AtomicU64,
    answered: AtomicU64,
    failed_after_answer: AtomicU64,
    key_requests: AtomicU64,
    replayed: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

struct Replica {
    target: VerifierTarget,
    counters: Counters,
}

/// The verifier replicas a relay carries exchanges to, in order of
/// preference, and what happened on each (shared by clones).
#[derive(Clone)]
pub struct Verifiers {
    replicas: Arc<[Replica]>,
    /// The replica the next exchange tries first: the last one that
    /// answered, or the one after the last that failed.
    preferred: Arc<AtomicUsize>,
    connect_timeout: Duration,
    answer_timeout: Duration,
}

impl std::fmt::Debug for Verifiers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifiers")
            .field(
                "replicas",
                &self.replicas.iter().map(|r| &r.target).collect::<Vec<_>>(),
            )
            .field("connect_timeout", &self.connect_timeout)
            .field("answer_timeout", &self.answer_timeout)
            .finish_non_exhaustive()
    }
}

impl Verifiers {
    /// The replicas, tried in this order (1 to [`MAX_REPLICAS`], each address
    /// once).
    pub fn new(targets: Vec<VerifierTarget>) -> Result<Self, VerifiersError> {
        if targets.is_empty() {
            return Err(VerifiersError::Empty);
        }
        if targets.len() > MAX_REPLICAS {
            return Err(VerifiersError::TooMany(targets.len()));
        }
        for (i, t) in targets.iter().enumerate() {
            if targets.iter().take(i).any(|u| u.address == t.address) {
                return Err(VerifiersError::Duplicate(t.address.to_string()));
            }
        }
        Ok(Verifiers {
            replicas: targets
                .into_iter()
                .map(|target| Replica {
                    target,
                    counters: Counters::default(),
                })
                .collect(),
            preferred: Arc::new(AtomicUsize::new(0)),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            answer_timeout: DEFAULT_ANSWER_TIMEOUT,
        })
    }

    /// How long a connection to one replica may take (at least 10 ms).
    #[must_use]
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout.max(Duration::from_millis(10));
        self
    }

    /// How long a replica may stay silent after a request before its first
    /// frame, before the relay moves on (at least 10 ms).
    #[must_use]
    pub fn with_answer_timeout(mut self, timeout: Duration) -> Self {
        self.answer_timeout = timeout.max(Duration::from_millis(10));
        self
    }

    /// How many replicas.
    pub fn len(&self) -> usize {
        self.replicas.len()
    }

    /// Never true (there is at least one replica).
    pub fn is_empty(&self) -> bool {
        self.replicas.is_empty()
    }

    /// The replicas' addresses, in order.
    pub fn addresses(&self) -> Vec<Address> {
        self.replicas
            .iter()
            .map(|r| r.target.address.clone())
            .collect()
    }

    /// What happened on each replica, in order.
    pub fn stats(&self) -> Vec<ReplicaStats> {
        self.replicas
            .iter()
            .map(|r| {
                let c = &r.counters;
                ReplicaStats {
                    connect_failures: c.connect_failures.load(Ordering::Relaxed),
                    failed_before_answer: c.failed_before_answer.load(Ordering::Relaxed),
                    answered: c.answered.load(Ordering::Relaxed),
                    failed_after_answer: c.failed_after_answer.load(Ordering::Relaxed),
                    key_requests: c.key_requests.load(Ordering::Relaxed),
                    replayed: c.replayed.load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    fn first(&self) -> usize {
        self.preferred
            .load(Ordering::Relaxed)
            .checked_rem(self.len())
            .unwrap_or(0)
    }

    fn answered_by(&self, index: usize) {
        self.preferred.store(index, Ordering::Relaxed);
    }

    /// `index` failed: unless another exchange already moved the
    /// preference, the next exchange starts with the replica after it.
    fn failed(&self, index: usize) {
        let next = index.saturating_add(1).checked_rem(self.len()).unwrap_or(0);
        let _ = self
            .preferred
            .compare_exchange(index, next, Ordering::Relaxed, Ordering::Relaxed);
    }
}

impl From<VerifierTarget> for Verifiers {
    fn from(target: VerifierTarget) -> Self {
        Verifiers {
            replicas: Arc::new([Replica {
                target,
                counters: Counters::default(),
            }]),
            preferred: Arc::new(AtomicUsize::new(0)),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            answer_timeout: DEFAULT_ANSWER_TIMEOUT,
        }
    }
}

impl From<Address> for Verifiers {
    fn from(address: Address) -> Self {
        Verifiers::from(VerifierTarget::plain(address))
    }
}

/// Whether `frame` (a whole frame, as relayed) is a challenge request, the
/// one request that may be re-sent to another replica.
fn is_challenge_request(frame: &[u8]) -> bool {
    use kluis_proto::message::{Message, Request};
    match kluis_proto::frame::split_frame(frame, MAX_RELAY_FRAME_LEN) {
        Some((kluis_proto::frame::FrameKind::Message, body)) => {
            matches!(Request::decode(body), Ok(Request::Challenge))
        }
        _ => false,
    }
}

/// Reads the enclave's frames, passes each through the hook once, and hands
/// the results on (so that no frame is lost when the relay changes replica).
async fn read_enclave(
    mut from: tokio::io::ReadHalf<BoxStream>,
    to: tokio::sync::mpsc::Sender<Vec<u8>>,
    hook: Arc<dyn FrameHook>,
) {
    loop {
        let frame =
            match tokio::time::timeout(RELAY_IDLE, read_raw_frame(&mut from, MAX_RELAY_FRAME_LEN))
                .await
            {
                Ok(Ok(Some(frame))) => frame,
                Ok(Ok(None)) | Ok(Err(_)) | Err(_) => return,
            };
        for out in hook.on_frame(Channel::Verifier, Direction::FromEnclave, frame) {
            if to.send(out).await.is_err() {
                return;
            }
        }
    }
}

/// How the opening of an exchange on one replica ended.
enum Opening {
    /// The replica's first frame.
    Answered(Vec<u8>),
    /// A connection error before any answer (see the module documentation).
    Failed(String),
    /// The replica sent something that is not a frame: not retried.
    Malformed(String),
    /// The enclave went away before sending anything: nothing to do.
    EnclaveGone,
}

/// The enclave's side of one connection, as the replicas see it.
struct EnclaveSide {
    frames: tokio::sync::mpsc::Receiver<Vec<u8>>,
    /// Frames sent to a replica so far, all challenge requests, while
    /// `replayable`.
    sent: Vec<Vec<u8>>,
    /// False once a frame that may not be re-sent was sent.
    replayable: bool,
    /// Frames sent to the replica of the exchange, all kinds.
    sent_frames: u64,
    /// The enclave has closed its side (or stopped sending).
    closed: bool,
}

impl EnclaveSide {
    async fn send(
        &mut self,
        replica: &Replica,
        to: &mut tokio::io::WriteHalf<BoxStream>,
        frame: Vec<u8>,
    ) -> std::io::Result<()> {
        let challenge = is_challenge_request(&frame);
        if !challenge {
            bump(&replica.counters.key_requests);
        }
        self.sent_frames = self.sent_frames.saturating_add(1);
        if challenge && self.replayable && self.sent.len() < MAX_REPLAYED_FRAMES {
            self.sent.push(frame.clone());
        } else {
            self.replayable = false;
            self.sent = Vec::new();
        }
        write_frame(to, &frame).await
    }
}

async fn write_frame(
    to: &mut tokio::io::WriteHalf<BoxStream>,
    frame: &[u8],
) -> std::io::Result<()> {
    match tokio::time::timeout(RELAY_IDLE, async {
        to.write_all(frame).await?;
        to.flush().await
    })
    .await
    {
        Ok(r) => r,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

/// Carry the enclave's requests to `replica` until its first frame comes
/// back, re-sending what the enclave sent to a replica that failed.
async fn open_exchange(
    enclave: &mut EnclaveSide,
    replica: &Replica,
    from: &mut tokio::io::ReadHalf<BoxStream>,
    to: &mut tokio::io::WriteHalf<BoxStream>,
    answer_timeout: Duration,
) -> Opening {
    let replay = enclave.sent.clone();
    if !replay.is_empty() {
        bump(&replica.counters.replayed);
    }
    for frame in &replay {
        if let Err(e) = write_frame(to, frame).await {
            return Opening::Failed(format!("sending: {e}"));
        }
    }
    if enclave.closed {
        let _ = to.shutdown().await;
    }
    // One read of the replica's first frame, kept across the loop (a frame
    // read is not cancellation safe); its deadline starts with the first
    // request the replica got.
    let answer = read_raw_frame(from, MAX_RELAY_FRAME_LEN);
    tokio::pin!(answer);
    let mut deadline = (!replay.is_empty())
        .then(|| tokio::time::Instant::now().checked_add(answer_timeout))
        .flatten();
    loop {
        let silence = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            read = &mut answer => return match read {
                Ok(Some(frame)) => Opening::Answered(frame),
                Ok(None) => Opening::Failed("closed the connection before answering".into()),
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    Opening::Malformed(e.to_string())
                }
                Err(e) => Opening::Failed(format!("connection broken before answering: {e}")),
            },
            frame = enclave.frames.recv(), if !enclave.closed => match frame {
                Some(frame) => {
                    if let Err(e) = enclave.send(replica, to, frame).await {
                        return Opening::Failed(format!("sending: {e}"));
                    }
                    if deadline.is_none() {
                        deadline = tokio::time::Instant::now().checked_add(answer_timeout);
                    }
                }
                None => {
                    enclave.closed = true;
                    if enclave.sent.is_empty() && enclave.replayable {
                        return Opening::EnclaveGone;
                    }
                    let _ = to.shutdown().await;
                }
            },
            () = silence => {
                return Opening::Failed(format!("no answer within {answer_timeout:?}"));
            }
        }
    }
}

/// Relay one enclave connection (one key-release exchange) to the first
/// replica that answers, as the module documentation describes.
pub async fn relay_connection(enclave: BoxStream, verifiers: &Verifiers, hook: Arc<dyn FrameHook>) {
    // At the limit both sides are dropped, so closed.
    if tokio::time::timeout(MAX_EXCHANGE, relay_exchange(enclave, verifiers, hook))
        .await
        .is_err()
    {
        tracing::warn!(limit = ?MAX_EXCHANGE, "a relayed exchange ran past its limit; closed");
    }
}

async fn relay_exchange(enclave: BoxStream, verifiers: &Verifiers, hook: Arc<dyn FrameHook>) {
    let (enclave_read, enclave_write) = tokio::io::split(enclave);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let reader_hook = Arc::clone(&hook);
    let reader = async move {
        tokio::select! {
            () = read_enclave(enclave_read, tx, reader_hook) => {}
            _ = stop_rx => {}
        }
    };
    let carry = async {
        carry(rx, enclave_write, verifiers, hook).await;
        let _ = stop_tx.send(());
    };
    tokio::join!(reader, carry);
}

async fn carry(
    frames: tokio::sync::mpsc::Receiver<Vec<u8>>,
    mut enclave_write: tokio::io::WriteHalf<BoxStream>,
    verifiers: &Verifiers,
    hook: Arc<dyn FrameHook>,
) {
    let mut enclave = EnclaveSide {
        frames,
        sent: Vec::new(),
        replayable: true,
        sent_frames: 0,
        closed: false,
    };
    let first = verifiers.first();
    let count = verifiers.len();
    for attempt in 0..count {
        let index = first
            .saturating_add(attempt)
            .checked_rem(count)
            .unwrap_or(0);
        let Some(replica) = verifiers.replicas.get(index) else {
            break;
        };
        let address = &replica.target.address;
        let upstream =
            match tokio::time::timeout(verifiers.connect_timeout, replica.target.connect()).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::warn!(verifier = %address, error = %e, "verifier replica unreachable");
                    bump(&replica.counters.connect_failures);
                    verifiers.failed(index);
                    continue;
                }
                Err(_) => {
                    tracing::warn!(verifier = %address, timeout = ?verifiers.connect_timeout,
                        "verifier replica did not accept the connection in time");
                    bump(&replica.counters.connect_failures);
                    verifiers.failed(index);
                    continue;
                }
            };
        let (mut from, mut to) = tokio::io::split(upstream);
        let opening = open_exchange(
            &mut enclave,
            replica,
            &mut from,
            &mut to,
            verifiers.answer_timeout,
        )
        .await;
        match opening {
            Opening::Answered(frame) => {
                bump(&replica.counters.answered);
                verifiers.answered_by(index);
                let upstream = from.unsplit(to);
                carry_answered(
                    enclave,
                    frame,
                    &mut enclave_write,
                    upstream,
                    verifiers,
                    index,
                    &hook,
                )
                .await;
                return;
            }
            Opening::Failed(why) => {
                bump(&replica.counters.failed_before_answer);
                verifiers.failed(index);
                if !enclave.replayable {
                    tracing::warn!(verifier = %address, reason = %why,
                        "verifier replica failed after a key request was sent to it; \
                         not re-sent to another replica");
                    return;
                }
                tracing::warn!(verifier = %address, reason = %why,
                    "verifier replica failed before answering; trying the next");
            }
            Opening::Malformed(why) => {
                tracing::warn!(verifier = %address, reason = %why,
                    "verifier replica sent a malformed frame");
                return;
            }
            Opening::EnclaveGone => return,
        }
    }
    tracing::warn!(
        replicas = count,
        "no verifier replica answered this exchange"
    );
    let _ = enclave_write.shutdown().await;
}

/// Carry an exchange the replica `index` has answered (`first` is its
/// first frame) to its end.
async fn carry_answered(
    mut enclave: EnclaveSide,
    first: Vec<u8>,
    enclave_write: &mut tokio::io::WriteHalf<BoxStream>,
    upstream: BoxStream,
    verifiers: &Verifiers,
    index: usize,
    hook: &Arc<dyn FrameHook>,
) {
    let Some(replica) = verifiers.replicas.get(index) else {
        return;
    };
    let (mut from, mut to) = tokio::io::split(upstream);
    let enclave_closed = AtomicBool::new(enclave.closed);
    // Requests sent to the replica and answers it gave (each request has
    // one answer; `first` answered one of the opening's), and when the last
    // request went (milliseconds since `began`).
    let requests = AtomicU64::new(enclave.sent_frames);
    let answers = AtomicU64::new(0);
    let began = tokio::time::Instant::now();
    let since_began = || u64::try_from(began.elapsed().as_millis()).unwrap_or(u64::MAX);
    let last_request_ms = AtomicU64::new(0);
    let up = async {
        if !enclave.closed {
            while let Some(frame) = enclave.frames.recv().await {
                requests.fetch_add(1, Ordering::Relaxed);
                last_request_ms.store(since_began(), Ordering::Relaxed);
                if enclave.send(replica, &mut to, frame).await.is_err() {
                    return;
                }
            }
            enclave_closed.store(true, Ordering::Relaxed);
            let _ = to.shutdown().await;
        }
    };
    let down = async {
        let mut next = Some(first);
        loop {
            let frame = match next.take() {
                Some(f) => f,
                None => match tokio::time::timeout(
                    RELAY_IDLE,
                    read_raw_frame(&mut from, MAX_RELAY_FRAME_LEN),
                )
                .await
                {
                    Ok(Ok(Some(frame))) => frame,
                    Ok(Ok(None)) | Ok(Err(_)) => {
                        // Counted before the enclave can learn of it (its
                        // side is shut below), so that a job failing for it
                        // sees the count (`crate::failover`). Any key request
                        // this replica got was counted when it was sent,
                        // before its end could be seen here; none is sent
                        // after it (`up` stops with this side).
                        if !enclave_closed.load(Ordering::Relaxed) {
                            tracing::warn!(verifier = %replica.target.address,
                                "verifier replica ended an exchange it had answered; \
                                 not continued elsewhere");
                            bump(&replica.counters.failed_after_answer);
                            verifiers.failed(index);
                        }
                        break;
                    }
                    Err(_) => {
                        // Silent while a request waits for its answer: the
                        // replica is stuck (a stalled store or HSM), and
                        // later exchanges go elsewhere first. A request
                        // sent within the last RELAY_IDLE is waited for
                        // its full time. Silent while the enclave is quiet
                        // is no fault of the replica.
                        if requests.load(Ordering::Relaxed) > answers.load(Ordering::Relaxed) {
                            let waited = since_began()
                                .saturating_sub(last_request_ms.load(Ordering::Relaxed));
                            if u128::from(waited) < RELAY_IDLE.as_millis() {
                                continue;
                            }
                            tracing::warn!(verifier = %replica.target.address, timeout = ?RELAY_IDLE,
                                "verifier replica did not answer a request in time");
                            verifiers.failed(index);
                        }
                        break;
                    }
                },
            };
            answers.fetch_add(1, Ordering::Relaxed);
            let mut failed = false;
            for out in hook.on_frame(Channel::Verifier, Direction::ToEnclave, frame) {
                if write_frame(enclave_write, &out).await.is_err() {
                    failed = true;
                    break;
                }
            }
            if failed {
                break;
            }
        }
        let _ = enclave_write.shutdown().await;
    };
    // When the replica's side ends, nothing more goes to it: a key request
    // still on its way from the enclave (which now sees the exchange end and
    // fails its job) is dropped here, never sent to a replica, so a job run
    // again for it (`crate::failover`) makes the only request that reaches
    // one. When the enclave's side ends first, the replica's answers are
    // still carried back.
    tokio::pin!(up, down);
    tokio::select! {
        () = &mut down => {}
        () = &mut up => down.await,
    }
}

/// Relay every connection on `listener` to `verifiers` (one replica, an
/// [`Address`] or a [`VerifierTarget`], converts) until `shutdown`.
pub async fn serve(
    listener: Listener,
    verifiers: impl Into<Verifiers>,
    hook: Arc<dyn FrameHook>,
    shutdown: impl Future<Output = ()>,
) {
    let verifiers: Verifiers = verifiers.into();
    // Beyond the bound, enclaves' connections wait in the backlog.
    kluis_transport::serve(
        &listener,
        MAX_RELAY_CONNECTIONS,
        shutdown,
        |stream, peer, permit| {
            tracing::debug!(%peer, "relaying to the verifier");
            let verifiers = verifiers.clone();
            let hook = Arc::clone(&hook);
            async move {
                relay_connection(stream, &verifiers, hook).await;
                drop(permit);
            }
        },
    )
    .await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use kluis_proto::message::{write_message_sync, Request};

    fn target(port: u16) -> VerifierTarget {
        VerifierTarget::plain(Address::Tcp(format!("127.0.0.1:{port}")))
    }

    #[test]
    fn a_list_of_replicas_is_bounded_and_has_each_address_once() {
        assert_eq!(
            Verifiers::new(Vec::new()).map(|_| ()).unwrap_err(),
            VerifiersError::Empty
        );
        let err = Verifiers::new(vec![target(1), target(2), target(1)])
            .map(|_| ())
            .unwrap_err();
        assert_eq!(err, VerifiersError::Duplicate("tcp:127.0.0.1:1".into()));
        assert!(err.to_string().contains("given twice"), "{err}");
        let many = (1..=u16::try_from(MAX_REPLICAS).unwrap().saturating_add(1))
            .map(target)
            .collect();
        assert_eq!(
            Verifiers::new(many).map(|_| ()).unwrap_err(),
            VerifiersError::TooMany(MAX_REPLICAS.saturating_add(1))
        );
        let two = Verifiers::new(vec![target(1), target(2)]).unwrap();
        assert_eq!(two.len(), 2);
        assert_eq!(two.stats(), vec![ReplicaStats::default(); 2]);
    }

    #[test]
    fn the_preference_moves_past_a_failed_replica_and_stays_with_one_that_answered() {
        let three = Verifiers::new(vec![target(1), target(2), target(3)]).unwrap();
        assert_eq!(three.first(), 0);
        three.failed(0);
        assert_eq!(three.first(), 1);
        // A failure of a replica that is no longer preferred changes nothing.
        three.failed(0);
        assert_eq!(three.first(), 1);
        three.failed(1);
        three.failed(2);
        assert_eq!(three.first(), 0, "wraps around");
        three.answered_by(2);
        assert_eq!(three.first(), 2);
    }

    #[test]
    fn only_a_challenge_request_counts_as_one() {
        let mut challenge = Vec::new();
        write_message_sync(&mut challenge, &Request::Challenge, MAX_RELAY_FRAME_LEN).unwrap();
        assert!(is_challenge_request(&challenge));
        // Trailing bytes, a cut frame, another kind of frame: not one.
        let mut longer = challenge.clone();
        longer.push(0);
        assert!(!is_challenge_request(&longer));
        assert!(!is_challenge_request(
            challenge.get(..challenge.len() - 1).unwrap()
        ));
        let data = kluis_proto::job::finish_data_frame(
            [
                vec![0u8; kluis_proto::job::DATA_FRAME_HEADER_LEN],
                b"challenge".to_vec(),
            ]
            .concat(),
        )
        .unwrap();
        assert!(!is_challenge_request(&data));
        assert!(!is_challenge_request(b""));
    }
}
