//! The verifier on PostgreSQL, with 1 and 3 replicas: durable audit
//! appends per second and key releases per second over loopback TCP, each
//! with p50/p99 latency, beside the directory store measured in the same run.
//!
//! `KLUIS_TEST_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test \
//!  cargo bench -p attestation-verifier --bench replicas`
//!
//! Each replica is a broker with its own connection pool and its own
//! listener, in this process (replicas on one machine share its two cores
//! with the clients and the database server, so this measures the write
//! path's serialisation, not a scale-out). The bench makes a database of its
//! own and drops it. `KLUIS_BENCH_RELEASES` (default 2000) and
//! `KLUIS_BENCH_APPENDS` (default 4000) bound the work.

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

use attestation_verifier::audit::{Actor, AuditLog, Decision, NewRecord};
use attestation_verifier::broker::{Broker, BrokerConfig};
use attestation_verifier::keys::KeyName;
use attestation_verifier::kms::{Kms, StoredPolicy};
use attestation_verifier::policy::KeyPolicy;
use attestation_verifier::service::{self, ServiceConfig};
use kluis_attestation::{TrustAnchor, UnixMillis, Verifier, VerifyOptions};
use kluis_keystore::pg::scratch::{self, ScratchDatabase};
use kluis_keystore::{Database, RootSecret, Store};
use kluis_nsm::sim::{SimConfig, SimRoot, SimulatedNsm};
use kluis_proto::VerifierIdentity;
use std::sync::Arc;
use std::time::{Duration, Instant};

const KEY: &str = "bench/app/prod";
const IMAGE: &[u8] = b"bench enclave";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn secret() -> RootSecret {
    RootSecret::from_key_bytes(zeroize::Zeroizing::new([9u8; 32]))
}

/// A key-release-sized record: a simulated attestation document of a few KiB.
fn release_record() -> NewRecord {
    let nsm = SimulatedNsm::new(SimConfig::default().with_image(IMAGE.to_vec(), None)).unwrap();
    let verifier = Verifier::new(TrustAnchor::dangerous_from_der(nsm.root().root_der()).unwrap());
    let doc = kluis_nsm::attest(&nsm, Some(&[1; 48]), Some(&[2; 32]), Some(&[4; 97])).unwrap();
    let verified = verifier
        .verify(&doc, &VerifyOptions::at(UnixMillis(now_ms())))
        .unwrap();
    NewRecord {
        time_ms: now_ms(),
        actor: Actor::enclave(&verified),
        operation: "key.release.generate".to_owned(),
        key_id: Some(KEY.to_owned()),
        key_version: Some(1),
        decision: Decision::Allowed,
        reason: None,
        attestation_document: Some(doc),
    }
}

/// `logs` handles (one per replica), 8 threads on each, `total` appends.
fn appends(logs: &[Arc<AuditLog>], total: usize, record: &NewRecord) -> (f64, Vec<Duration>) {
    let threads_per_log = 8;
    let per_thread = total / (logs.len() * threads_per_log);
    let start = Instant::now();
    let handles: Vec<_> = logs
        .iter()
        .flat_map(|log| (0..threads_per_log).map(move |_| Arc::clone(log)))
        .map(|log| {
            let record = record.clone();
            std::thread::spawn(move || {
                (0..per_thread)
                    .map(|_| {
                        let t = Instant::now();
                        log.append(record.clone()).unwrap();
                        t.elapsed()
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut latencies: Vec<Duration> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let rate = latencies.len() as f64 / start.elapsed().as_secs_f64();
    latencies.sort();
    (rate, latencies)
}

fn set_policy(kms: &Kms) {
    let name = KeyName::parse(KEY).unwrap();
    kms.create_key(&name, 365, now_ms()).unwrap();
    let pcr0 = SimConfig::default()
        .with_image(IMAGE.to_vec(), None)
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
            set_ms: now_ms(),
        },
    )
    .unwrap();
}

/// Releases over loopback, `clients` clients spread over `brokers`.
fn releases(
    replicas: &[Arc<Broker>],
    root: Arc<SimRoot>,
    pinned: [u8; 97],
    total: usize,
    clients: usize,
) -> (f64, Vec<Duration>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // The brokers hold blocking database clients: they are used on blocking
    // threads only, and dropped outside the runtime.
    let brokers: Vec<Arc<Broker>> = replicas.to_vec();
    let (rate, all) = rt.block_on(async move {
        let mut addresses = Vec::new();
        let mut stops = Vec::new();
        let mut servers = Vec::new();
        for broker in &brokers {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            addresses.push(listener.local_addr().unwrap());
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            stops.push(stop_tx);
            servers.push(tokio::spawn(service::run(
                listener,
                Arc::clone(broker),
                ServiceConfig::default(),
                None,
                async {
                    let _ = stop_rx.await;
                },
            )));
        }
        let nsm = Arc::new(
            SimulatedNsm::new(
                SimConfig::default()
                    .with_root(root)
                    .with_image(IMAGE.to_vec(), None),
            )
            .unwrap(),
        );
        let per_client = total / clients;
        let started = Instant::now();
        let all = clients::run(&addresses, nsm, pinned, KEY, clients, per_client)
            .await
            .without_nsm;
        let rate = all.len() as f64 / started.elapsed().as_secs_f64();
        for stop in stops {
            let _ = stop.send(());
        }
        for server in servers {
            server.await.unwrap().unwrap();
        }
        (rate, all)
    });
    drop(rt);
    replicas[0].audit().verify(None).unwrap();
    (rate, all)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let Some(server) = scratch::server("bench replicas").unwrap() else {
        return;
    };
    let total_appends = env_usize("KLUIS_BENCH_APPENDS", 4000);
    let total_releases = env_usize("KLUIS_BENCH_RELEASES", 2000);
    let record = release_record();
    println!(
        "audit appends, {} B documents, {total_appends} per run, 8 threads per replica",
        record.attestation_document.as_ref().map_or(0, Vec::len)
    );
    {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(AuditLog::open(dir.path().join("audit.log")).unwrap());
        let (rate, lat) = appends(&[log], total_appends, &record);
        println!(
            "  directory store, 1 replica : {rate:>6.0} appends/s  p50 {:.2} ms  p99 {:.2} ms",
            percentile(&lat, 0.5),
            percentile(&lat, 0.99)
        );
    }
    for replicas in [1usize, 3] {
        let db = ScratchDatabase::create(&server).unwrap();
        drop(Store::init_database(Database::connect(db.url()).unwrap(), secret()).unwrap());
        let logs: Vec<Arc<AuditLog>> = (0..replicas)
            .map(|_| {
                let store =
                    Store::open_database(Database::connect(db.url()).unwrap(), secret()).unwrap();
                Arc::new(AuditLog::open_database(&store, None).unwrap())
            })
            .collect();
        let (rate, lat) = appends(&logs, total_appends, &record);
        let report = logs[0].verify(None).unwrap();
        println!(
            "  PostgreSQL, {replicas} replica(s)    : {rate:>6.0} appends/s  p50 {:.2} ms  p99 {:.2} ms  ({} records, chain intact)",
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            report.records
        );
    }

    let clients = 16;
    println!(
        "key releases over loopback, {total_releases} per run, {clients} clients, \
         latency without the simulated NSM's signing"
    );
    {
        let dir = tempfile::tempdir().unwrap();
        let kms = Kms::init(&dir.path().join("store"), secret()).unwrap();
        set_policy(&kms);
        let identity = VerifierIdentity::generate().unwrap();
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
        let (rate, lat) = releases(&[broker], root, pinned, total_releases, clients);
        println!(
            "  directory store, 1 replica : {rate:>6.0} releases/s  p50 {:.2} ms  p99 {:.2} ms",
            percentile(&lat, 0.5),
            percentile(&lat, 0.99)
        );
    }
    for replicas in [1usize, 3] {
        let db = ScratchDatabase::create(&server).unwrap();
        let identity = VerifierIdentity::generate().unwrap();
        {
            let kms = Kms::init_database(Database::connect(db.url()).unwrap(), secret()).unwrap();
            kms.set_identity_pkcs8(&identity.to_pkcs8_der().unwrap())
                .unwrap();
            set_policy(&kms);
        }
        let pinned = identity.public_key_sec1();
        let root = Arc::new(SimRoot::generate().unwrap());
        let brokers: Vec<Arc<Broker>> = (0..replicas)
            .map(|_| {
                let kms =
                    Kms::open_database(Database::connect(db.url()).unwrap(), secret()).unwrap();
                let audit = AuditLog::open_database(kms.store(), None).unwrap();
                let identity = kms.identity().unwrap().unwrap();
                let verifier =
                    Verifier::new(TrustAnchor::dangerous_from_der(root.root_der()).unwrap());
                Arc::new(Broker::new(
                    kms,
                    verifier,
                    identity,
                    audit,
                    BrokerConfig::default(),
                ))
            })
            .collect();
        let (rate, lat) = releases(&brokers, Arc::clone(&root), pinned, total_releases, clients);
        println!(
            "  PostgreSQL, {replicas} replica(s)    : {rate:>6.0} releases/s  p50 {:.2} ms  p99 {:.2} ms",
            percentile(&lat, 0.5),
            percentile(&lat, 0.99)
        );
    }
}
