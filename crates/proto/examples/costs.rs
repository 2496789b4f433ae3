//! Per-call cost of the key-release crypto, in release builds:
//! `cargo run --release -q -p kluis-proto --example costs`.
//!
//! The three calls on a release's critical path: the enclave's ephemeral key
//! pair, the verifier's `seal_keys` (HPKE seal + ECDSA sign) and the enclave's
//! `open_keys_for_request` (ECDSA verify + HPKE open).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::arithmetic_side_effects
)]

use kluis_proto::{
    open_keys_for_request, request_hash, seal_keys, EphemeralKeyPair, KeyOperation, KeyRequest,
    PlaintextKey, ReleasedKey, VerifierIdentity,
};
use std::time::{Duration, Instant};

const ROUNDS: u32 = 200;

fn per_call(mut f: impl FnMut()) -> Duration {
    f(); // warm up
    let start = Instant::now();
    for _ in 0..ROUNDS {
        f();
    }
    start.elapsed() / ROUNDS
}

fn main() {
    let identity = VerifierIdentity::generate().unwrap();
    let ephemeral = EphemeralKeyPair::generate().unwrap();
    let request = KeyRequest::new(vec![KeyOperation::GenerateDataKey {
        key_id: "a/b/c".into(),
    }])
    .unwrap();
    let hash = request_hash(&request);
    let document = [1u8; 48];
    let keys = || {
        vec![ReleasedKey {
            key_id: "a/b/c".into(),
            version: 1,
            wrapped: vec![1; 60],
            plaintext: PlaintextKey::from_bytes(&[2; 32]),
        }]
    };
    let sealed = seal_keys(
        &ephemeral.public_key_sec1(),
        &document,
        &hash,
        &keys(),
        &identity,
    )
    .unwrap();

    let keygen = per_call(|| {
        EphemeralKeyPair::generate().unwrap();
    });
    let seal = per_call(|| {
        seal_keys(
            &ephemeral.public_key_sec1(),
            &document,
            &hash,
            &keys(),
            &identity,
        )
        .unwrap();
    });
    let open = per_call(|| {
        open_keys_for_request(
            &sealed,
            &ephemeral,
            &identity.public_key_sec1(),
            &document,
            &request,
        )
        .unwrap();
    });
    println!("ephemeral keygen      {keygen:?}");
    println!("seal (hpke + sign)    {seal:?}");
    println!("open (verify + hpke)  {open:?}");
    println!("sum                   {:?}", keygen + seal + open);
}
