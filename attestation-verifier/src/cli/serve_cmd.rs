//! `serve`: the key-release service.

use crate::auth::Permission;
use crate::broker::{Broker, BrokerConfig};
use crate::cli::session::{load_identity, Failure, Session, StoreArgs};
use crate::cli::verify_cmd::emit;
use crate::service::{self, ServiceConfig};
use anyhow::{anyhow, Context};
use clap::Args;
use kluis_attestation::{TrustAnchor, Verifier};
use serde_json::json;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on, e.g. 0.0.0.0:7300 (port 0 picks a free port; the
    /// bound address is printed as JSON on stdout).
    #[arg(long, value_name = "ADDR")]
    listen: String,
    /// Trust attestation documents from this root instead of AWS Nitro root G1:
    /// for the simulated NSM only. Never in production.
    #[arg(long, value_name = "PEM")]
    dangerous_nsm_root: Option<PathBuf>,
    /// TLS certificate chain (PEM); with --tls-key, serve TLS 1.3/1.2 with rustls.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Most connections at once.
    #[arg(long, default_value_t = 256)]
    max_connections: usize,
    /// Most requests processed at once.
    #[arg(long, default_value_t = 32)]
    max_in_flight: usize,
    /// Most connections from one address at once (every enclave behind one
    /// parent relay shares its address).
    #[arg(long, default_value_t = 16)]
    max_connections_per_peer: usize,
    /// Upper bound on attestation document age, whatever a policy allows.
    #[arg(long, default_value_t = 300, value_name = "SECONDS")]
    max_document_age: u64,
}

fn tls_acceptor(cert: &PathBuf, key: &PathBuf) -> anyhow::Result<service::TlsAcceptor> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing {}", cert.display()))?;
    let key =
        PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading {}", key.display()))?;
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("TLS configuration")?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Listen on `addr` with a deep accept queue (4096, capped by the kernel's
/// somaxconn): with the default of 1024, a flood of connection attempts
/// from one address (each closed at once by the per-address limit) can fill
/// the queue so that other clients' SYNs are dropped and retried a second
/// later.
async fn bind(addr: &str) -> std::io::Result<tokio::net::TcpListener> {
    let mut last = None;
    for addr in tokio::net::lookup_host(addr).await? {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        match socket.bind(addr).and_then(|()| socket.listen(4096)) {
            Ok(listener) => return Ok(listener),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::AddrNotAvailable, "no address to bind")
    }))
}

pub(crate) fn serve(store: &StoreArgs, args: &ServeArgs) -> Result<(), Failure> {
    let session = Session::start(store, Permission::Serve, "service.start")?;
    let identity = load_identity(&session.kms)?;
    let anchor = match &args.dangerous_nsm_root {
        None => TrustAnchor::aws_nitro_root_g1().map_err(|e| anyhow!("built-in root: {e}"))?,
        Some(path) => {
            let pem = crate::cli::input::read_bounded(path, 64 * 1024)
                .with_context(|| format!("reading {}", path.display()))?
                .ok_or_else(|| anyhow!("{} is too large", path.display()))?;
            tracing::warn!(
                "trusting a non-AWS attestation root ({}): simulation only",
                path.display()
            );
            TrustAnchor::dangerous_from_pem(&pem).map_err(|e| anyhow!("{}: {e}", path.display()))?
        }
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => Some(tls_acceptor(c, k)?),
        _ => None,
    };
    session.record(
        "service.start",
        None,
        None,
        crate::audit::Decision::Allowed,
        Some(format!("listen {} root {}", args.listen, anchor.subject())),
    )?;
    let Session { mut kms, audit, .. } = session;
    // Changes the service makes itself (rotation on use) are the system's.
    kms.set_audit_actor(crate::audit::Actor::System);
    let broker = Arc::new(Broker::new(
        kms,
        Verifier::new(anchor),
        identity,
        audit,
        BrokerConfig {
            max_document_age: Duration::from_secs(args.max_document_age),
            ..BrokerConfig::default()
        },
    ));
    let config = ServiceConfig {
        max_connections: args.max_connections.max(1),
        max_in_flight: args.max_in_flight.max(1),
        max_connections_per_peer: args.max_connections_per_peer.max(1),
        ..ServiceConfig::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let result: anyhow::Result<()> = runtime.block_on(async {
        let listener = bind(&args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        let local = listener.local_addr()?;
        emit(&json!({ "listening": local.to_string(), "tls": tls.is_some() }));
        // Once a second and at exit: anchor the audit head in the store
        // (the broker stops if the log no longer continues from it), and
        // write the summary of unauthenticated refusals when one is due.
        let anchor_broker = Arc::clone(&broker);
        let anchoring = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let b = Arc::clone(&anchor_broker);
                let _ = tokio::task::spawn_blocking(move || {
                    b.flush_noise(crate::cli::verify_cmd::now_ms(), false);
                    b.anchor_audit_head();
                })
                .await;
            }
        });
        let shutdown = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {},
            }
            tracing::info!("shutdown requested");
        };
        service::run(listener, Arc::clone(&broker), config, tls, shutdown).await?;
        anchoring.abort();
        Ok(())
    });
    result?;
    broker.flush_noise(crate::cli::verify_cmd::now_ms(), true);
    broker.anchor_audit_head();
    if let Some(reason) = broker.halted() {
        return Err(Failure::Refused(
            "audit_broken".into(),
            format!("key releases were stopped: {reason}"),
        ));
    }
    to_stderr!("stopped");
    Ok(())
}
