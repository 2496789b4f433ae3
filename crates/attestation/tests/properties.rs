//! Property tests: payload round trips, and "no single-byte change of a valid
//! document is accepted".

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing
)]

use ciborium::value::Value;
use kluis_attestation::{TrustAnchor, UnixMillis, Verifier, VerifyOptions};
mod support;

use proptest::prelude::*;
use std::collections::BTreeMap;
use std::sync::OnceLock;
use support::forge::{encode, ChainSpec, Forged};

const NOW_S: i64 = 1_750_000_000;
const NOW_MS: u64 = 1_750_000_000_000;

fn chain() -> &'static (Forged, Verifier) {
    static CHAIN: OnceLock<(Forged, Verifier)> = OnceLock::new();
    CHAIN.get_or_init(|| {
        let forged = ChainSpec::aws_like(NOW_S).forge();
        let verifier = Verifier::new(TrustAnchor::dangerous_from_der(&forged.root_der).unwrap());
        (forged, verifier)
    })
}

fn text(s: &str) -> Value {
    Value::Text(s.to_owned())
}

fn optional(v: &Option<Vec<u8>>) -> Value {
    v.as_ref().map_or(Value::Null, |b| Value::Bytes(b.clone()))
}

fn field() -> impl Strategy<Value = Option<Vec<u8>>> {
    proptest::option::of(proptest::collection::vec(any::<u8>(), 0..=1024))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever the fields, indefinite or definite map, what was signed is what
    /// the verifier reports.
    #[test]
    fn payload_round_trip(
        module_id in "[a-z0-9-]{1,64}",
        timestamp in (NOW_MS - 3_000_000)..=NOW_MS,
        pcrs in proptest::collection::btree_map(0u8..32, prop_oneof![
            proptest::collection::vec(any::<u8>(), 32),
            proptest::collection::vec(any::<u8>(), 48),
            proptest::collection::vec(any::<u8>(), 64),
        ], 1..=32),
        public_key in field(),
        user_data in field(),
        nonce in field(),
        indefinite in any::<bool>(),
    ) {
        let (forged, verifier) = chain();
        let payload = Value::Map(vec![
            (text("module_id"), text(&module_id)),
            (text("digest"), text("SHA384")),
            (text("timestamp"), Value::Integer(timestamp.into())),
            (text("pcrs"), Value::Map(pcrs.iter().map(|(i, v)| (Value::Integer((*i).into()), Value::Bytes(v.clone()))).collect())),
            (text("certificate"), Value::Bytes(forged.leaf_der.clone())),
            (text("cabundle"), Value::Array(forged.cabundle.iter().cloned().map(Value::Bytes).collect())),
            (text("public_key"), optional(&public_key)),
            (text("user_data"), optional(&user_data)),
            (text("nonce"), optional(&nonce)),
        ]);
        let mut bytes = encode(&payload);
        if indefinite {
            prop_assert_eq!(bytes[0], 0xa9);
            bytes[0] = 0xbf;
            bytes.push(0xff);
        }
        let doc = forged.sign(&bytes);
        let verified = verifier.verify(&doc, &VerifyOptions::at(UnixMillis(NOW_MS))).unwrap();
        let d = verified.document();
        prop_assert_eq!(&d.module_id, &module_id);
        prop_assert_eq!(d.timestamp_ms, timestamp);
        prop_assert_eq!(&d.pcrs, &pcrs.into_iter().collect::<BTreeMap<_, _>>());
        prop_assert_eq!(&d.public_key, &public_key);
        prop_assert_eq!(&d.user_data, &user_data);
        prop_assert_eq!(&d.nonce, &nonce);
    }

    /// Any single-byte change of a valid document is rejected, never accepted
    /// and never a panic.
    #[test]
    fn single_byte_change_is_rejected(index in any::<prop::sample::Index>(), delta in 1u8..=255) {
        let (forged, verifier) = chain();
        let doc = forged.sign(&encode(&Value::Map(forged.payload(NOW_MS, Some(b"n")))));
        let mut changed = doc.clone();
        let i = index.index(changed.len());
        changed[i] = changed[i].wrapping_add(delta);
        prop_assert!(verifier.verify(&changed, &VerifyOptions::at(UnixMillis(NOW_MS))).is_err(),
            "byte {} changed by {} was accepted", i, delta);
    }
}

/// Exhaustively: every position of a real document, flipped one bit, is rejected.
#[test]
#[cfg_attr(
    kluis_vectors_absent,
    ignore = "SKIPPED: no real Nitro vectors (../shared/vectors/nitro-real)"
)]
fn every_bit_flip_position_of_a_real_document_is_rejected() {
    let vectors = support::load_real_vectors();
    let v = vectors.iter().find(|v| v.file == "yawn-1.cbor").unwrap();
    let verifier = Verifier::new(TrustAnchor::aws_nitro_root_g1().unwrap());
    let options = VerifyOptions::at(UnixMillis(v.at_ms));
    verifier.verify(&v.bytes, &options).unwrap();
    for i in 0..v.bytes.len() {
        let mut changed = v.bytes.clone();
        changed[i] ^= 0x01;
        assert!(
            verifier.verify(&changed, &options).is_err(),
            "bit flip at {i} accepted"
        );
    }
}
