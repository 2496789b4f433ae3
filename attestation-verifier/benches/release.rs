//! Key-release throughput and latency over loopback TCP.
//!
//! `cargo bench -p attestation-verifier --bench release` starts the service on
//! 127.0.0.1 (a temporary store, one master key with a policy admitting the
//! simulated enclave) and runs `CLIENTS` concurrent enclave clients, each doing
//! full round trips: challenge → attestation by the simulated NSM → key release
//! → signature check and HPKE open. Client and server share the machine's two
//! cores. It prints releases per second and p50/p90/p99 latency, with and
//! without the simulated NSM's signing time (a real NSM signs in hardware).
//! Bounded: it stops after `KLUIS_BENCH_RELEASES` releases (default 3000).
//!
//! `KLUIS_BENCH_BACKEND=pkcs11` keeps the master key, the store root and the
//! identity key in a throw-away SoftHSM2 token instead of the store; the
//! bench first prints data-key wraps and unwraps per second through the
//! backend alone.

// A benchmark may fail loudly on a broken set-up.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_precision_loss
)]

#[path = "support/clients.rs"]
mod clients;

use attestation_verifier::audit::AuditLog;
use attestation_verifier::broker::{Broker, BrokerConfig};
use attestation_verifier::keys::KeyName;
use attestation_verifier::kms::{Kms, StoredPolicy};
use attestation_verifier::policy::KeyPolicy;
use attestation_verifier::service::{self, ServiceConfig};
use kluis_attestation::{TrustAnchor, Verifier};
use kluis_keystore::RootSecret;
use kluis_nsm::sim::{SimConfig, SimRoot, SimulatedNsm};
use kluis_proto::VerifierIdentity;
use std::sync::Arc;
use std::time::{Duration, Instant};

const KEY: &str = "bench/app/prod";
fn clients() -> usize {
    std::env::var("KLUIS_BENCH_CLIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn main() {
    let total: usize = std::env::var("KLUIS_BENCH_RELEASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    let dir = tempfile::tempdir().unwrap();
    let backend = std::env::var("KLUIS_BENCH_BACKEND").unwrap_or_else(|_| "local".to_owned());
    let (kms, identity) = match backend.as_str() {
        "local" => {
            let kms = Kms::init(
                &dir.path().join("store"),
                RootSecret::from_key_bytes(zeroize::Zeroizing::new([9u8; 32])),
            )
            .unwrap();
            (kms, VerifierIdentity::generate().unwrap())
        }
        "pkcs11" => {
            let config = kluis_hsm::softhsm::throwaway_token("bench")
                .unwrap()
                .expect("KLUIS_BENCH_BACKEND=pkcs11 needs SoftHSM2 (apt install softhsm2)");
            let token = kluis_hsm::Token::open(
                &config,
                zeroize::Zeroizing::new(kluis_hsm::softhsm::THROWAWAY_PIN.to_owned()),
            )
            .unwrap();
            let kms = Kms::init_hsm(&dir.path().join("store"), Arc::new(token)).unwrap();
            kms.record_token_identity().unwrap();
            let identity = kms.identity().unwrap().unwrap();
            (kms, identity)
        }
        other => panic!("KLUIS_BENCH_BACKEND must be local or pkcs11, not {other:?}"),
    };
    let name = KeyName::parse(KEY).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    kms.create_key(&name, 365, now).unwrap();
    {
        // The backend alone, one thread: wrap (generate) and unwrap.
        let n = 2000;
        let t = Instant::now();
        let wrapped: Vec<_> = (0..n)
            .map(|_| kms.generate_data_key(&name, now).unwrap().1)
            .collect();
        let wrap = t.elapsed();
        let t = Instant::now();
        for w in &wrapped {
            kms.decrypt_data_key(w).unwrap();
        }
        let unwrap = t.elapsed();
        let signs = 500;
        let t = Instant::now();
        for i in 0..signs {
            identity
                .sign(format!("kluis-bench\0{i}").as_bytes())
                .unwrap();
        }
        let sign = t.elapsed();
        println!(
            "key backend {:?}, one thread: {:.0} data-key wraps/s, {:.0} unwraps/s, {:.0} identity signatures/s",
            kms.backend_name(),
            n as f64 / wrap.as_secs_f64(),
            n as f64 / unwrap.as_secs_f64(),
            signs as f64 / sign.as_secs_f64()
        );
    }
    let image = b"bench enclave".to_vec();
    let pcr0 = SimConfig::default()
        .with_image(image.clone(), None)
        .boot_pcr_values()[0];
    let policy = KeyPolicy::from_toml_str(&format!(
        "operations = [\"generate\"]\nmax_document_age_seconds = 60\n[[measurements]]\nname = \"bench\"\npcr0 = \"{}\"\n",
        hex::encode(pcr0)
    ))
    .unwrap();
    kms.set_policy(
        &name,
        &StoredPolicy {
            format: "json".into(),
            text: serde_json::to_string(&policy).unwrap(),
            set_by: "bench".into(),
            set_ms: now,
        },
    )
    .unwrap();
    let pinned = identity.public_key_sec1();
    let root = Arc::new(SimRoot::generate().unwrap());
    let verifier = Verifier::new(TrustAnchor::dangerous_from_der(root.root_der()).unwrap());
    let audit = AuditLog::open(dir.path().join("audit.log")).unwrap();
    let broker = Arc::new(Broker::new(
        kms,
        verifier,
        identity,
        audit,
        BrokerConfig::default(),
    ));

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(service::run(listener, Arc::clone(&broker), ServiceConfig::default(), None, async {
            let _ = stop_rx.await;
        }));
        let nsm = Arc::new(SimulatedNsm::new(SimConfig::default().with_root(root).with_image(image, None)).unwrap());

        let started = Instant::now();
        let clients = clients();
        let per_client = total / clients;
        let latencies = clients::run(&[addr], nsm, pinned, KEY, clients, per_client).await;
        let (all, all_wo) = (latencies.total, latencies.without_nsm);
        let wall = started.elapsed();
        stop_tx.send(()).unwrap();
        server.await.unwrap().unwrap();
        let n = all.len();
        println!("key release over loopback ({backend} backend): {n} releases, {clients} concurrent clients, 2 cores shared by clients and server");
        println!("  throughput        {:.0} releases/s", n as f64 / wall.as_secs_f64());
        println!(
            "  latency           p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms",
            percentile(&all, 0.5).as_secs_f64() * 1e3,
            percentile(&all, 0.9).as_secs_f64() * 1e3,
            percentile(&all, 0.99).as_secs_f64() * 1e3
        );
        println!(
            "  without NSM sign  p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms",
            percentile(&all_wo, 0.5).as_secs_f64() * 1e3,
            percentile(&all_wo, 0.9).as_secs_f64() * 1e3,
            percentile(&all_wo, 0.99).as_secs_f64() * 1e3
        );
        broker.audit().verify(None).unwrap();
        println!("  audit log         {} records, chain intact", n);
    });
}
