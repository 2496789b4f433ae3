//! Kluis stream transports.
//!
//! The enclave and the parent talk over vsock on a Nitro host and over TCP or
//! a Unix socket everywhere else (tests, the local demo). Everything above
//! this crate sees one byte stream ([`Stream`]) and one framing
//! (`kluis-proto`); only opening the stream differs, and that is all this
//! crate does, so the vsock path stays as thin as it can be.
//!
//! Addresses are written `tcp:HOST:PORT`, `unix:PATH` or `vsock:CID:PORT`
//! (`vsock:any:PORT` to listen on any CID; the parent is CID 3 as seen from
//! an enclave on Nitro). A bare `HOST:PORT` means TCP.
//!
//! `vsock-unix:PATH:PORT` connects to vsock port `PORT` of a virtual machine
//! whose vsock device is served by a user-space backend in Unix-socket mode
//! (`vhost-device-vsock`, Firecracker): connect to the backend's socket
//! `PATH`, send `CONNECT PORT\n`, read `OK <n>\n`, then the stream is the
//! guest's. It is for connecting only; the guest's connections to the host
//! arrive on the Unix socket `PATH_PORT`, which a `unix:` listener takes.
//! The VM test (`tests/vm/`) uses it; a Nitro host uses `vsock:`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod serve;

pub use serve::{serve, serve_gated, Closing, Slot};

use std::fmt;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The CID of the parent instance, as an enclave addresses it.
pub const PARENT_CID: u32 = 3;
/// The wildcard CID for listening.
pub const CID_ANY: u32 = u32::MAX;

/// Longest answer line read from a `vsock-unix:` backend (`OK ` and a
/// 32-bit number fit many times over).
const HANDSHAKE_MAX_LINE: usize = 64;
/// How long a `vsock-unix:` backend may take to answer `CONNECT`.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A bidirectional byte stream of any transport.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {
    /// The socket beneath the stream, when its bytes are the socket's own
    /// (none under TLS): for moving bulk bytes between it and a file in the
    /// kernel (`sendfile`, `splice`) instead of through user memory.
    fn socket(&self) -> Option<BorrowedFd<'_>>;
}

impl Stream for tokio::net::TcpStream {
    fn socket(&self) -> Option<BorrowedFd<'_>> {
        Some(self.as_fd())
    }
}

impl Stream for tokio::net::UnixStream {
    fn socket(&self) -> Option<BorrowedFd<'_>> {
        Some(self.as_fd())
    }
}

impl Stream for tokio_vsock::VsockStream {
    fn socket(&self) -> Option<BorrowedFd<'_>> {
        Some(self.as_fd())
    }
}

/// A boxed [`Stream`].
pub type BoxStream = Box<dyn Stream>;

/// Where to listen or connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// TCP, `host:port` (resolved when used).
    Tcp(String),
    /// A Unix domain socket path.
    Unix(PathBuf),
    /// vsock: context id and port.
    Vsock {
        /// The context id ([`CID_ANY`] to listen on any).
        cid: u32,
        /// The port.
        port: u32,
    },
    /// A guest's vsock port behind a user-space vsock backend's Unix socket
    /// (`CONNECT PORT` handshake); connect only.
    VsockUnix {
        /// The backend's Unix socket.
        path: PathBuf,
        /// The guest's vsock port.
        port: u32,
    },
}

/// An address that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "bad address {input:?}: {reason} (expected tcp:HOST:PORT, unix:PATH, vsock:CID:PORT or vsock-unix:PATH:PORT)"
)]
pub struct AddressError {
    input: String,
    reason: &'static str,
}

impl FromStr for Address {
    type Err = AddressError;

    fn from_str(input: &str) -> Result<Self, AddressError> {
        let err = |reason| AddressError {
            input: input.to_owned(),
            reason,
        };
        if let Some(rest) = input.strip_prefix("unix:") {
            if rest.is_empty() {
                return Err(err("empty socket path"));
            }
            return Ok(Address::Unix(PathBuf::from(rest)));
        }
        if let Some(rest) = input.strip_prefix("vsock-unix:") {
            let (path, port) = rest.rsplit_once(':').ok_or_else(|| err("missing port"))?;
            if path.is_empty() {
                return Err(err("empty socket path"));
            }
            let port = port.parse().map_err(|_| err("port is not a number"))?;
            return Ok(Address::VsockUnix {
                path: PathBuf::from(path),
                port,
            });
        }
        if let Some(rest) = input.strip_prefix("vsock:") {
            let (cid, port) = rest.split_once(':').ok_or_else(|| err("missing port"))?;
            let cid = match cid {
                "any" => CID_ANY,
                "parent" => PARENT_CID,
                n => n.parse().map_err(|_| err("CID is not a number"))?,
            };
            let port = port.parse().map_err(|_| err("port is not a number"))?;
            return Ok(Address::Vsock { cid, port });
        }
        let rest = input.strip_prefix("tcp:").unwrap_or(input);
        let (host, port) = rest.rsplit_once(':').ok_or_else(|| err("missing port"))?;
        if host.is_empty() {
            return Err(err("empty host"));
        }
        port.parse::<u16>()
            .map_err(|_| err("port is not a number 0..=65535"))?;
        Ok(Address::Tcp(rest.to_owned()))
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Tcp(a) => write!(f, "tcp:{a}"),
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
            Address::Vsock { cid, port } if *cid == CID_ANY => write!(f, "vsock:any:{port}"),
            Address::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
            Address::VsockUnix { path, port } => {
                write!(f, "vsock-unix:{}:{port}", path.display())
            }
        }
    }
}

/// Who is on the other end of an accepted connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// A TCP peer's address and port.
    Tcp(std::net::SocketAddr),
    /// A Unix-socket peer, named by the listening path (peers are unnamed).
    Unix(PathBuf),
    /// A vsock peer's context id and port.
    Vsock {
        /// Context id.
        cid: u32,
        /// Port.
        port: u32,
    },
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Tcp(addr) => write!(f, "{addr}"),
            Peer::Unix(path) => write!(f, "unix:{}", path.display()),
            Peer::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
        }
    }
}

/// A listener on any transport.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(tokio::net::TcpListener),
    /// Unix socket (the path is removed when the listener is dropped).
    Unix(tokio::net::UnixListener, UnixPathGuard),
    /// vsock.
    Vsock(tokio_vsock::VsockListener),
}

/// Removes a Unix socket path when dropped.
#[derive(Debug)]
pub struct UnixPathGuard(PathBuf);

impl Drop for UnixPathGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Listener {
    /// Listen on `address`. A Unix socket path that exists is refused
    /// unless it is a socket (then it is replaced: a stale one from an
    /// earlier run).
    pub async fn bind(address: &Address) -> std::io::Result<Listener> {
        match address {
            Address::Tcp(a) => Ok(Listener::Tcp(tokio::net::TcpListener::bind(a).await?)),
            Address::Unix(path) => {
                use std::os::unix::fs::FileTypeExt;
                if let Ok(meta) = std::fs::symlink_metadata(path) {
                    if !meta.file_type().is_socket() {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::AlreadyExists,
                            format!("{} exists and is not a socket", path.display()),
                        ));
                    }
                    std::fs::remove_file(path)?;
                }
                let listener = tokio::net::UnixListener::bind(path)?;
                Ok(Listener::Unix(listener, UnixPathGuard(path.clone())))
            }
            Address::Vsock { cid, port } => Ok(Listener::Vsock(tokio_vsock::VsockListener::bind(
                tokio_vsock::VsockAddr::new(*cid, *port),
            )?)),
            Address::VsockUnix { path, port } => Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                format!(
                    "vsock-unix: is for connecting; the guest's connections to port {port} \
                     arrive on unix:{}_{port}",
                    path.display()
                ),
            )),
        }
    }

    /// The address actually bound (with the real port for `tcp:...:0`).
    pub fn local_address(&self) -> std::io::Result<Address> {
        match self {
            Listener::Tcp(l) => Ok(Address::Tcp(l.local_addr()?.to_string())),
            Listener::Unix(_, guard) => Ok(Address::Unix(guard.0.clone())),
            Listener::Vsock(l) => {
                let a = l.local_addr()?;
                Ok(Address::Vsock {
                    cid: a.cid(),
                    port: a.port(),
                })
            }
        }
    }

    /// Accept one connection; also returns who connected.
    pub async fn accept(&self) -> std::io::Result<(BoxStream, Peer)> {
        match self {
            Listener::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Ok((Box::new(s), Peer::Tcp(peer)))
            }
            Listener::Unix(l, guard) => {
                let (s, _) = l.accept().await?;
                Ok((Box::new(s), Peer::Unix(guard.0.clone())))
            }
            Listener::Vsock(l) => {
                let (s, peer) = l.accept().await?;
                Ok((
                    Box::new(s),
                    Peer::Vsock {
                        cid: peer.cid(),
                        port: peer.port(),
                    },
                ))
            }
        }
    }
}

/// Connect to `address`.
pub async fn connect(address: &Address) -> std::io::Result<BoxStream> {
    match address {
        Address::Tcp(a) => {
            let s = tokio::net::TcpStream::connect(a).await?;
            let _ = s.set_nodelay(true);
            Ok(Box::new(s))
        }
        Address::Unix(path) => Ok(Box::new(tokio::net::UnixStream::connect(path).await?)),
        Address::Vsock { cid, port } => Ok(Box::new(
            tokio_vsock::VsockStream::connect(tokio_vsock::VsockAddr::new(*cid, *port)).await?,
        )),
        Address::VsockUnix { path, port } => {
            let mut stream = tokio::net::UnixStream::connect(path).await?;
            tokio::time::timeout(HANDSHAKE_TIMEOUT, vsock_unix_handshake(&mut stream, *port))
                .await
                .map_err(|_| {
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!(
                            "vsock backend {} did not answer CONNECT {port} within {}s",
                            path.display(),
                            HANDSHAKE_TIMEOUT.as_secs()
                        ),
                    )
                })??;
            Ok(Box::new(stream))
        }
    }
}

/// The client side of the Unix-socket vsock handshake (Firecracker's hybrid
/// vsock, `vhost-device-vsock`'s `uds-path`): sends `CONNECT PORT\n` and
/// expects `OK <decimal>\n`. Reads one byte at a time, so nothing of the
/// guest's stream after the newline is consumed, and at most
/// [`HANDSHAKE_MAX_LINE`] bytes.
async fn vsock_unix_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    port: u32,
) -> std::io::Result<()> {
    let refused = |detail: String| {
        std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            format!("vsock backend refused CONNECT {port}: {detail}"),
        )
    };
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await?;
    stream.flush().await?;
    let mut line = Vec::with_capacity(HANDSHAKE_MAX_LINE);
    loop {
        let byte = match stream.read_u8().await {
            Ok(b) => b,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                return Err(refused(format!(
                    "closed after {:?}",
                    String::from_utf8_lossy(&line)
                )))
            }
            Err(e) => return Err(e),
        };
        if byte == b'\n' {
            break;
        }
        if line.len() >= HANDSHAKE_MAX_LINE {
            return Err(refused(format!(
                "answer longer than {HANDSHAKE_MAX_LINE} bytes"
            )));
        }
        line.push(byte);
    }
    match line.strip_prefix(b"OK ") {
        Some(n) if !n.is_empty() && n.iter().all(u8::is_ascii_digit) => Ok(()),
        _ => Err(refused(format!(
            "answer {:?}",
            String::from_utf8_lossy(&line)
        ))),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn addresses_parse_and_print() {
        for (text, printed) in [
            ("tcp:127.0.0.1:5000", "tcp:127.0.0.1:5000"),
            ("127.0.0.1:5000", "tcp:127.0.0.1:5000"),
            ("tcp:[::1]:80", "tcp:[::1]:80"),
            ("unix:/tmp/x.sock", "unix:/tmp/x.sock"),
            ("vsock:3:8001", "vsock:3:8001"),
            ("vsock:parent:8001", "vsock:3:8001"),
            ("vsock:any:5000", "vsock:any:5000"),
            (
                "vsock-unix:/run/vm.vsock:5000",
                "vsock-unix:/run/vm.vsock:5000",
            ),
            (
                "vsock-unix:/odd:dir/v.sock:7",
                "vsock-unix:/odd:dir/v.sock:7",
            ),
        ] {
            assert_eq!(text.parse::<Address>().unwrap().to_string(), printed);
        }
        for bad in [
            "",
            "tcp:",
            "tcp:host",
            "tcp::80",
            "tcp:h:99999",
            "unix:",
            "vsock:3",
            "vsock:x:1",
            "vsock:3:y",
            "vsock-unix:",
            "vsock-unix:/v.sock",
            "vsock-unix::5000",
            "vsock-unix:/v.sock:x",
            "vsock-unix:/v.sock:99999999999",
        ] {
            assert!(bad.parse::<Address>().is_err(), "{bad:?} parsed");
        }
    }

    async fn echo_once(listener: Listener) {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).await.unwrap();
        s.write_all(&buf).await.unwrap();
    }

    #[tokio::test]
    async fn tcp_and_unix_carry_bytes() {
        let dir = tempfile::tempdir().unwrap();
        for address in [
            Address::Tcp("127.0.0.1:0".into()),
            Address::Unix(dir.path().join("s.sock")),
        ] {
            let listener = Listener::bind(&address).await.unwrap();
            let bound = listener.local_address().unwrap();
            let server = tokio::spawn(echo_once(listener));
            let mut c = connect(&bound).await.unwrap();
            c.write_all(b"hello").await.unwrap();
            let mut back = [0u8; 5];
            c.read_exact(&mut back).await.unwrap();
            assert_eq!(&back, b"hello");
            server.await.unwrap();
        }
    }

    #[tokio::test]
    async fn unix_listener_refuses_to_replace_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("not-a-socket");
        std::fs::write(&path, b"keep me").unwrap();
        let err = Listener::bind(&Address::Unix(path.clone()))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path).unwrap(), b"keep me");
    }

    /// A fake backend: reads the `CONNECT` line, answers `answer`, then
    /// echoes five bytes if the answer was a good one.
    async fn fake_backend(listener: tokio::net::UnixListener, answer: &'static [u8]) -> Vec<u8> {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut request = Vec::new();
        loop {
            let b = s.read_u8().await.unwrap();
            request.push(b);
            if b == b'\n' {
                break;
            }
        }
        s.write_all(answer).await.unwrap();
        if answer.starts_with(b"OK ") {
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await.unwrap();
            s.write_all(&buf).await.unwrap();
        }
        request
    }

    #[tokio::test]
    async fn vsock_unix_handshake_then_stream() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.vsock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        // The answer and the guest's first bytes may arrive together: the
        // handshake must not swallow what follows the newline.
        let server = tokio::spawn(fake_backend(listener, b"OK 1073741824\n"));
        let address: Address = format!("vsock-unix:{}:5000", path.display())
            .parse()
            .unwrap();
        let mut c = connect(&address).await.unwrap();
        c.write_all(b"hello").await.unwrap();
        let mut back = [0u8; 5];
        c.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"hello");
        assert_eq!(server.await.unwrap(), b"CONNECT 5000\n");
    }

    #[tokio::test]
    async fn vsock_unix_handshake_refusals() {
        let dir = tempfile::tempdir().unwrap();
        for (case, answer) in [
            ("closed", &b""[..]),
            ("no newline then closed", b"OK 5000"),
            ("failure", b"FAILURE\n"),
            ("no number", b"OK \n"),
            ("not a number", b"OK x5\n"),
            ("lowercase", b"ok 5000\n"),
            ("too long", &[b'9'; 200][..]),
        ] {
            let path = dir.path().join(format!("{}.sock", case.replace(' ', "-")));
            let listener = tokio::net::UnixListener::bind(&path).unwrap();
            let server = tokio::spawn(async move {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut line = [0u8; 13]; // "CONNECT 5000\n"
                s.read_exact(&mut line).await.unwrap();
                let _ = s.write_all(answer).await;
            });
            let address = Address::VsockUnix {
                path: path.clone(),
                port: 5000,
            };
            let err = match connect(&address).await {
                Ok(_) => panic!("{case}: handshake accepted"),
                Err(e) => e,
            };
            assert_eq!(
                err.kind(),
                std::io::ErrorKind::ConnectionRefused,
                "{case}: {err}"
            );
            server.await.unwrap();
        }
    }

    #[tokio::test]
    async fn vsock_unix_silent_backend_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("silent.sock");
        let _listener = tokio::net::UnixListener::bind(&path).unwrap();
        let address = Address::VsockUnix { path, port: 1 };
        tokio::time::pause();
        let err = match connect(&address).await {
            Ok(_) => panic!("a silent backend was accepted"),
            Err(e) => e,
        };
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
    }

    #[tokio::test]
    async fn vsock_unix_does_not_listen() {
        let err = Listener::bind(&Address::VsockUnix {
            path: PathBuf::from("/nonexistent/vm.vsock"),
            port: 8001,
        })
        .await
        .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::Unsupported);
        assert!(
            err.to_string().contains("/nonexistent/vm.vsock_8001"),
            "{err}"
        );
    }
}
