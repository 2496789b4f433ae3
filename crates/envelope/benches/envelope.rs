//! Envelope throughput on one core, beside raw AES-256-GCM.
//!
//! `cargo bench -p kluis-envelope` reports, for 64 MiB of plaintext, criterion's
//! `thrpt` in GiB/s (criterion's "GiB" is 2^30 bytes):
//!
//! - `raw_aes256gcm/seal`, `raw_aes256gcm/open`: AWS-LC AES-256-GCM over the
//!   whole 64 MiB buffer in place under one nonce: the ceiling.
//! - `envelope/encrypt`: `EnvelopeWriter` with 64 KiB segments, `write_all` of
//!   the plaintext into a reused `Vec`, then `finish`.
//! - `envelope/decrypt_1mib_reads`: `EnvelopeReader` over the envelope, read
//!   into a reused 1 MiB buffer (segments decrypt straight into it).
//! - `envelope/decrypt_8kib_reads`: the same with 8 KiB reads (what
//!   `std::io::copy` does), through the reader's plaintext buffer.

// A benchmark may fail loudly on a broken set-up.
#![allow(
    clippy::expect_used,
    clippy::cast_possible_truncation,
    clippy::arithmetic_side_effects
)]

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kluis_envelope::{DataKey, EnvelopeReader, EnvelopeWriter, WrappedKey};
use std::hint::black_box;
use std::io::{Read, Write};

const LEN: usize = 64 * 1024 * 1024;

fn plaintext() -> Vec<u8> {
    (0..LEN).map(|i| (i as u8) ^ ((i >> 11) as u8)).collect()
}

fn bench_raw(c: &mut Criterion) {
    let mut group = c.benchmark_group("raw_aes256gcm");
    group.throughput(Throughput::Bytes(LEN as u64));
    group.sample_size(10);
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[7; 32]).expect("key"));
    let mut buf = plaintext();
    group.bench_function("seal", |b| {
        b.iter(|| {
            let nonce = Nonce::assume_unique_for_key([1; 12]);
            black_box(
                key.seal_in_place_separate_tag(nonce, Aad::empty(), &mut buf)
                    .expect("seal"),
            )
        })
    });
    // A valid ciphertext to open repeatedly (open in place would overwrite it).
    let mut sealed = plaintext();
    let tag = key
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key([2; 12]),
            Aad::empty(),
            &mut sealed,
        )
        .expect("seal");
    let mut out = vec![0u8; LEN];
    group.bench_function("open", |b| {
        b.iter(|| {
            key.open_separate_gather(
                Nonce::assume_unique_for_key([2; 12]),
                Aad::empty(),
                &sealed,
                tag.as_ref(),
                &mut out,
            )
            .expect("open");
            black_box(&out);
        })
    });
    group.finish();
}

fn bench_envelope(c: &mut Criterion) {
    let mut group = c.benchmark_group("envelope");
    group.throughput(Throughput::Bytes(LEN as u64));
    group.sample_size(10);
    let key = DataKey::from_bytes([7; 32]);
    let wrapped = WrappedKey::new("bench/app/prod", 1, vec![0xAA; 60]).expect("wrapped key");
    let plaintext = plaintext();

    let mut out = Vec::with_capacity(LEN + LEN / 1024 + 4096);
    group.bench_function("encrypt", |b| {
        b.iter(|| {
            out.clear();
            let mut writer = EnvelopeWriter::new(&mut out, &key, wrapped.clone()).expect("writer");
            writer.write_all(&plaintext).expect("write");
            writer.finish().expect("finish");
        })
    });

    let envelope = out.clone();
    let mut buf = vec![0u8; 1024 * 1024];
    group.bench_function("decrypt_1mib_reads", |b| {
        b.iter(|| {
            let mut reader = EnvelopeReader::new(envelope.as_slice(), &key).expect("reader");
            let mut total = 0;
            loop {
                let n = reader.read(&mut buf).expect("read");
                if n == 0 {
                    break;
                }
                total += n;
            }
            assert_eq!(total, LEN);
        })
    });
    let mut small = vec![0u8; 8 * 1024];
    group.bench_function("decrypt_8kib_reads", |b| {
        b.iter(|| {
            let mut reader = EnvelopeReader::new(envelope.as_slice(), &key).expect("reader");
            let mut total = 0;
            loop {
                let n = reader.read(&mut small).expect("read");
                if n == 0 {
                    break;
                }
                total += n;
            }
            assert_eq!(total, LEN);
        })
    });
    group.finish();
}

criterion_group!(benches, bench_raw, bench_envelope);
criterion_main!(benches);
