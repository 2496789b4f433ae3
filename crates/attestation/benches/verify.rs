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
//! - `parts/*`: the pieces of a cached verification of the real document, each on
//!   its own: `one_p384_verify` is one ECDSA P-384/SHA-384 verification by the
//!   crate's own crypto backend (the document's COSE signature under its leaf
//!   key), `decode_document` the COSE and payload decoding, `parse_leaf` the
//!   leaf certificate under the verifier's rules.
//!
//! At the end it prints what a cached verification costs in units of one P-384
//! verification of the same build, and how much of it the parts explain.

// A benchmark may fail loudly on a broken set-up.
#![allow(clippy::expect_used)]

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
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

/// One COSE signature check of `doc` by the crate's own backend: the leaf's
/// SEC1 key, the Sig_structure and the raw signature, taken apart in advance so
/// that only the verification is timed.
struct CoseCheck {
    leaf_key: Vec<u8>,
    tbs: Vec<u8>,
    signature: Vec<u8>,
}

impl CoseCheck {
    fn of(doc: &[u8]) -> Self {
        use coset::CborSerializable;
        use x509_parser::prelude::FromDer;
        let parsed = kluis_attestation::parse_unverified(doc).expect("document decodes");
        let (_, leaf) =
            x509_parser::certificate::X509Certificate::from_der(&parsed.document.certificate)
                .expect("leaf parses");
        let leaf_key = leaf.public_key().subject_public_key.data.to_vec();
        let sign1 = coset::CoseSign1::from_slice(doc).expect("COSE_Sign1");
        let check = CoseCheck {
            leaf_key,
            tbs: sign1.tbs_data(b""),
            signature: sign1.signature,
        };
        assert!(check.verify(), "the document's own signature verifies");
        check
    }

    #[cfg(feature = "aws-lc")]
    fn verify(&self) -> bool {
        use aws_lc_rs::signature::{UnparsedPublicKey, ECDSA_P384_SHA384_FIXED};
        UnparsedPublicKey::new(&ECDSA_P384_SHA384_FIXED, &self.leaf_key)
            .verify(&self.tbs, &self.signature)
            .is_ok()
    }

    #[cfg(all(feature = "rustcrypto", not(feature = "aws-lc")))]
    fn verify(&self) -> bool {
        use p384::ecdsa::{signature::Verifier as _, Signature, VerifyingKey};
        let (Ok(key), Ok(sig)) = (
            VerifyingKey::from_sec1_bytes(&self.leaf_key),
            Signature::from_slice(&self.signature),
        ) else {
            return false;
        };
        key.verify(&self.tbs, &sig).is_ok()
    }
}

/// Mean time of `f` over `iters` calls, after as many calls of warm-up.
fn mean_time(iters: u32, mut f: impl FnMut()) -> std::time::Duration {
    for _ in 0..iters {
        f();
    }
    let start = std::time::Instant::now();
    for _ in 0..iters {
        f();
    }
    start.elapsed().checked_div(iters).unwrap_or_default()
}

fn bench_parts(c: &mut Criterion) {
    let Some((doc, at)) = real_document() else {
        eprintln!("SKIPPED part benchmarks: ../shared/vectors/nitro-real is absent");
        return;
    };
    let cose = CoseCheck::of(&doc);
    let leaf_der = kluis_attestation::parse_unverified(&doc)
        .expect("decodes")
        .document
        .certificate;
    let options = VerifyOptions::at(UnixMillis(at));
    let cached = Verifier::new(TrustAnchor::aws_nitro_root_g1().expect("built-in root"));
    cached.verify(&doc, &options).expect("verifies");

    let mut group = c.benchmark_group("parts");
    group.throughput(Throughput::Elements(1));
    group.bench_function(BenchmarkId::from_parameter("one_p384_verify"), |b| {
        b.iter(|| assert!(black_box(&cose).verify()))
    });
    group.bench_function(BenchmarkId::from_parameter("decode_document"), |b| {
        b.iter(|| kluis_attestation::parse_unverified(black_box(&doc)).expect("decodes"))
    });
    group.bench_function(BenchmarkId::from_parameter("parse_leaf"), |b| {
        b.iter(|| kluis_attestation::check_certificate(black_box(&leaf_der)).expect("parses"))
    });
    group.finish();

    // The summary criterion does not print: the cached verification in units of
    // one verification, and what the parts leave unexplained. Means of plain
    // loops, interleaved so that a change of clock speed hits all of them.
    let (mut one, mut full, mut decode, mut leaf) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..5 {
        one.push(mean_time(400, || assert!(cose.verify())));
        full.push(mean_time(200, || {
            cached.verify(&doc, &options).expect("verifies");
        }));
        decode.push(mean_time(400, || {
            kluis_attestation::parse_unverified(&doc).expect("decodes");
        }));
        leaf.push(mean_time(400, || {
            kluis_attestation::check_certificate(&leaf_der).expect("parses");
        }));
    }
    let median = |v: &mut Vec<std::time::Duration>| {
        v.sort();
        v.get(v.len() / 2)
            .copied()
            .unwrap_or_default()
            .as_secs_f64()
            * 1e6
    };
    let (one, full, decode, leaf) = (
        median(&mut one),
        median(&mut full),
        median(&mut decode),
        median(&mut leaf),
    );
    let rest = full - 2.0 * one - decode - leaf;
    println!(
        "cached verification of the real document: {full:.0} µs = {:.2} P-384 verifications \
         of {one:.0} µs; two verifications {:.0} µs, document decoding {decode:.0} µs, \
         leaf parsing {leaf:.0} µs, unexplained {rest:.0} µs",
        full / one,
        2.0 * one
    );
}

criterion_group!(benches, bench_real, bench_sim, bench_parts);
criterion_main!(benches);
