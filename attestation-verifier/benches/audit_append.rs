//! Throughput of durable audit appends of key-release-sized records (a
//! simulated attestation document of a few KiB each), from 1, 2, 8 and 32
//! threads sharing one log (group commit), and the time to verify the chain.
//!
//! `cargo bench -p attestation-verifier --bench audit_append`; set
//! `KLUIS_AUDIT_BENCH_DIR` to measure on a given disk, `KLUIS_AUDIT_BENCH_N`
//! for the appends per run (default 2000).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_precision_loss,
    clippy::arithmetic_side_effects
)]

use std::sync::Arc;

use attestation_verifier::audit::{Actor, AuditLog, Decision, NewRecord};
use kluis_attestation::{TrustAnchor, UnixMillis, Verifier, VerifyOptions};
use kluis_nsm::sim::{FixedClock, SimConfig, SimulatedNsm};

const T0: u64 = 1_767_225_600_000;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let total: u64 = std::env::var("KLUIS_AUDIT_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let dir = match std::env::var_os("KLUIS_AUDIT_BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d).unwrap(),
        None => tempfile::tempdir().unwrap(),
    };
    let nsm = SimulatedNsm::new(
        SimConfig::default()
            .with_image(b"enclave image".to_vec(), Some(b"signer".to_vec()))
            .with_clock(Arc::new(FixedClock::new(T0))),
    )
    .unwrap();
    let verifier = Verifier::new(TrustAnchor::dangerous_from_der(nsm.root().root_der()).unwrap());
    let doc = kluis_nsm::attest(&nsm, Some(&[1; 48]), Some(&[2; 32]), Some(&[4; 97])).unwrap();
    let verified = verifier
        .verify(&doc, &VerifyOptions::at(UnixMillis(T0)))
        .unwrap();
    let record = NewRecord {
        time_ms: T0,
        actor: Actor::enclave(&verified),
        operation: "key.generate".to_owned(),
        key_id: Some("agency-a/app-x/prod".to_owned()),
        key_version: Some(3),
        decision: Decision::Allowed,
        reason: None,
        attestation_document: Some(doc.clone()),
    };
    println!(
        "durable audit appends, {} B documents, {total} appends per run",
        doc.len()
    );
    let path = dir.path().join("audit.log");
    for threads in [1u64, 2, 8, 32] {
        let _ = std::fs::remove_file(&path);
        let log = Arc::new(AuditLog::open(&path).unwrap());
        let per_thread = total / threads;
        let start = std::time::Instant::now();
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let log = Arc::clone(&log);
                let record = record.clone();
                std::thread::spawn(move || {
                    for _ in 0..per_thread {
                        log.append(record.clone()).unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let elapsed = start.elapsed();
        let n = per_thread * threads;
        let start = std::time::Instant::now();
        assert_eq!(log.verify(None).unwrap().records, n);
        let verify = start.elapsed();
        println!(
            "{threads:>2} threads: {n} appends in {elapsed:.2?}: {:>6.0} appends/s; chain verified in {verify:.2?}",
            n as f64 / elapsed.as_secs_f64()
        );
    }
}
