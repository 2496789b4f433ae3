//! Full verification throughput on one core.
//!
//! `cargo bench -p kluis-attestation --bench verify` prints, per scenario, the time
//! per document and documents per second (criterion's `elem/s`):
//!
//! - `real/no_cache`: a real AWS document, every one of the five signatures
//!   checked every time (what a verifier without the link cache does).
//! - `real/link_cache`: the same document with the CA-link cache on: the three
//!   CA links are cache hits; the leaf link and the COSE signature are still
//!   verified (2 ECDSA verifications).
//! - `sim/fresh_leaf_per_doc`: documents from one simulated host, each with its own
//!   leaf certificate as a real NSM issues them, cache on: the production case.

// A benchmark may fail loudly on a broken set-up.
#![allow(clippy::expect_used)]

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kluis_attestation::{TrustAnchor, UnixMillis, Verifier, VerifyOptions};
use std::hint::black_box;
use std::path::PathBuf;

/// A real document and the time to verify it at (yawn-1: eu-central-1, 2025).
fn real_document() -> Option<(Vec<u8>, u64)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/vectors/nitro-real");
    let doc = std::fs::read(dir.join("yawn-1.cbor")).ok()?;
    Some((doc, 1_736_179_625_472)) // 2025-01-06T16:07:05.472Z, from its manifest
}

fn bench_real(c: &mut Criterion) {
    let Some((doc, at)) = real_document() else {
        eprintln!("SKIPPED real-document benchmarks: ../shared/vectors/nitro-real is absent");
        return;
    };
    let options = VerifyOptions::at(UnixMillis(at));
    let mut group = c.benchmark_group("real");
    group.throughput(Throughput::Elements(1));

    let anchor = TrustAnchor::aws_nitro_root_g1().expect("built-in root");
    let uncached = Verifier::with_cache_capacity(anchor.clone(), 0);
    uncached
        .verify(&doc, &options)
        .expect("real document verifies");
    group.bench_function("no_cache", |b| {
        b.iter(|| {
            uncached
                .verify(black_box(&doc), &options)
                .expect("verifies")
        })
    });

    let cached = Verifier::new(anchor);
    cached
        .verify(&doc, &options)
        .expect("real document verifies");
    group.bench_function("link_cache", |b| {
        b.iter(|| cached.verify(black_box(&doc), &options).expect("verifies"))
    });
    group.finish();
}

fn bench_sim(c: &mut Criterion) {
    use kluis_nsm::sim::{FixedClock, SimConfig, SimulatedNsm};
    use std::sync::Arc;
    const T0: u64 = 1_767_225_600_000;
    let nsm = SimulatedNsm::new(SimConfig::default().with_clock(Arc::new(FixedClock::new(T0))))
        .expect("simulator");
    // Each document has its own leaf, like a real NSM's.
    let docs: Vec<Vec<u8>> = (0..256u16)
        .map(|i| kluis_nsm::attest(&nsm, None, Some(&i.to_be_bytes()), None).expect("attest"))
        .collect();
    let anchor = TrustAnchor::dangerous_from_der(nsm.root().root_der()).expect("sim root");
    let options = VerifyOptions::at(UnixMillis(T0));

    let mut group = c.benchmark_group("sim");
    group.throughput(Throughput::Elements(1));
    for (name, capacity) in [
        (
            "fresh_leaf_per_doc",
            kluis_attestation::DEFAULT_CACHE_CAPACITY,
        ),
        ("fresh_leaf_no_cache", 0),
    ] {
        let verifier = Verifier::with_cache_capacity(anchor.clone(), capacity);
        let mut next = docs.iter().cycle();
        group.bench_function(name, |b| {
            b.iter(|| {
                let doc = next.next().expect("cycle");
                verifier.verify(black_box(doc), &options).expect("verifies")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_real, bench_sim);
criterion_main!(benches);
