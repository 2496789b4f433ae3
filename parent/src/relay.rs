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

impl From<Address> for VerifierTarget {
    fn from(address: Address) -> Self {
        VerifierTarget::plain(address)
    }
}
use tokio::io::AsyncWriteExt;

use crate::hook::{read_raw_frame, Channel, Direction, FrameHook};

/// Largest frame relayed (the verifier's limit).
pub const MAX_RELAY_FRAME_LEN: usize = 128 * 1024;
/// Most relayed connections at once.
pub const MAX_RELAY_CONNECTIONS: usize = 64;
/// A relayed connection idle this long (or a peer that stops reading for
/// this long) is closed.
pub const RELAY_IDLE: Duration = Duration::from_secs(60);

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
            Some((connector, name)) => Ok(Box::new(connector.connect(name.clone(), stream).await?)),
        }
    }
}

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
        let write = async {
            for out in hook.on_frame(Channel::Verifier, direction, frame) {
                to.write_all(&out).await?;
            }
            to.flush().await
        };
        match tokio::time::timeout(RELAY_IDLE, write).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => return,
        }
    }
    let _ = to.shutdown().await;
}

/// Relay one enclave connection to the verifier.
pub async fn relay_connection(
    enclave: BoxStream,
    verifier: &VerifierTarget,
    hook: Arc<dyn FrameHook>,
) {
    let upstream = match tokio::time::timeout(Duration::from_secs(10), verifier.connect()).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::warn!(verifier = %verifier.address, error = %e, "verifier unreachable");
            return;
        }
        Err(_) => {
            tracing::warn!(verifier = %verifier.address, "verifier did not answer the connection");
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
    verifier: impl Into<VerifierTarget>,
    hook: Arc<dyn FrameHook>,
    shutdown: impl Future<Output = ()>,
) {
    let verifier: VerifierTarget = verifier.into();
    // Beyond the bound, enclaves' connections wait in the backlog.
    kluis_transport::serve(
        &listener,
        MAX_RELAY_CONNECTIONS,
        shutdown,
        |stream, peer, permit| {
            tracing::debug!(%peer, "relaying to the verifier");
            let verifier = verifier.clone();
            let hook = Arc::clone(&hook);
            async move {
                relay_connection(stream, &verifier, hook).await;
                drop(permit);
            }
        },
    )
    .await;
}
