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
//! an enclave). A bare `HOST:PORT` means TCP.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod serve;

pub use serve::serve;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use tokio::io::{AsyncRead, AsyncWrite};

/// The CID of the parent instance, as an enclave addresses it.
pub const PARENT_CID: u32 = 3;
/// The wildcard CID for listening.
pub const CID_ANY: u32 = u32::MAX;

/// A bidirectional byte stream of any transport.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

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
}

/// An address that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad address {input:?}: {reason} (expected tcp:HOST:PORT, unix:PATH or vsock:CID:PORT)")]
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

    /// Accept one connection; also returns a printable peer name.
    pub async fn accept(&self) -> std::io::Result<(BoxStream, String)> {
        match self {
            Listener::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Ok((Box::new(s), peer.to_string()))
            }
            Listener::Unix(l, guard) => {
                let (s, _) = l.accept().await?;
                Ok((Box::new(s), format!("unix:{}", guard.0.display())))
            }
            Listener::Vsock(l) => {
                let (s, peer) = l.accept().await?;
                Ok((Box::new(s), format!("vsock:{}:{}", peer.cid(), peer.port())))
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
}
