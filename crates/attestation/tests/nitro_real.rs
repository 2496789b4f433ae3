//! Every real Nitro document in `../shared/vectors/nitro-real/` verified per its
//! manifest: accepted at its own time with the fields the manifest lists,
//! rejected an hour after its leaf expired, and the negative one rejected.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing
)]

use kluis_attestation::{TrustAnchor, UnixMillis, Verifier, VerifyOptions};
mod support;

use support::load_real_vectors;

fn len_of(field: &Option<Vec<u8>>) -> serde_json::Value {
    match field {
        None => serde_json::Value::Null,
        Some(b) => serde_json::Value::String(format!("{} bytes", b.len())),
    }
}

#[test]
#[cfg_attr(
    kluis_vectors_absent,
    ignore = "SKIPPED: no real Nitro vectors (../shared/vectors/nitro-real)"
)]
fn real_documents_verify_per_manifest() {
    let vectors = load_real_vectors();
    let verifier = Verifier::new(TrustAnchor::aws_nitro_root_g1().unwrap());
    let mut accepted = 0;
    for v in &vectors {
        let result = verifier.verify(&v.bytes, &VerifyOptions::at(UnixMillis(v.at_ms)));
        if !v.expect_accept {
            let err = result.expect_err(&v.file);
            assert_eq!(err.kind(), "signature_invalid", "{}: {err}", v.file);
            continue;
        }
        let verified = result.unwrap_or_else(|e| panic!("{}: {e}", v.file));
        let doc = verified.document();
        assert_eq!(doc.module_id, v.entry["module_id"], "{}", v.file);
        assert_eq!(
            doc.timestamp_ms,
            v.entry["timestamp_ms"].as_u64().unwrap(),
            "{}",
            v.file
        );
        assert_eq!(
            hex::encode(doc.pcr(0).unwrap()),
            v.entry["pcr0"],
            "{}",
            v.file
        );
        assert_eq!(doc.is_debug_mode(), v.entry["debug_mode"], "{}", v.file);
        assert_eq!(
            len_of(&doc.public_key),
            v.entry["public_key_len"],
            "{}",
            v.file
        );
        assert_eq!(
            len_of(&doc.user_data),
            v.entry["user_data_len"],
            "{}",
            v.file
        );
        assert_eq!(len_of(&doc.nonce), v.entry["nonce_len"], "{}", v.file);
        accepted += 1;
    }
    assert!(accepted >= 1);
}

#[test]
#[cfg_attr(
    kluis_vectors_absent,
    ignore = "SKIPPED: no real Nitro vectors (../shared/vectors/nitro-real)"
)]
fn real_documents_rejected_an_hour_after_the_leaf_expired() {
    let vectors = load_real_vectors();
    let verifier = Verifier::new(TrustAnchor::aws_nitro_root_g1().unwrap());
    for v in vectors.iter().filter(|v| v.expect_accept) {
        let later = UnixMillis(v.valid_until_ms + 3_600_000);
        let err = verifier
            .verify(&v.bytes, &VerifyOptions::at(later))
            .expect_err(&v.file);
        assert_eq!(err.kind(), "chain_expired", "{}: {err}", v.file);
    }
}

#[test]
#[cfg_attr(
    kluis_vectors_absent,
    ignore = "SKIPPED: no real Nitro vectors (../shared/vectors/nitro-real)"
)]
fn real_documents_rejected_under_another_root() {
    let vectors = load_real_vectors();
    let sim_root = kluis_nsm::sim::SimRoot::generate().unwrap();
    let verifier = Verifier::new(TrustAnchor::dangerous_from_der(sim_root.root_der()).unwrap());
    for v in &vectors {
        let err = verifier
            .verify(&v.bytes, &VerifyOptions::at(UnixMillis(v.at_ms)))
            .expect_err(&v.file);
        assert_eq!(err.kind(), "chain_untrusted_root", "{}: {err}", v.file);
    }
}

/// The simulator's documents have the shape of a real one: the same payload
/// keys in the same order, the same protected and unprotected headers, the
/// same chain length. (Moved here from the simulator's unit tests, where a
/// missing file was silently a pass.)
#[test]
#[cfg_attr(
    kluis_vectors_absent,
    ignore = "SKIPPED: no real Nitro vectors (../shared/vectors/nitro-real)"
)]
fn simulated_document_is_shaped_like_a_real_one() {
    use ciborium::value::Value;
    use kluis_nsm::sim::{SimConfig, SimulatedNsm};

    /// Protected header bytes, unprotected header, payload keys, cabundle length.
    fn shape(document: &[u8]) -> (Vec<u8>, Value, Vec<Value>, usize) {
        let Value::Array(items) = ciborium::from_reader::<Value, _>(document).unwrap() else {
            panic!("not an array")
        };
        let [Value::Bytes(protected), unprotected, Value::Bytes(payload), Value::Bytes(_)] =
            <[Value; 4]>::try_from(items).unwrap()
        else {
            panic!("not a COSE_Sign1")
        };
        let Value::Map(payload) = ciborium::from_reader::<Value, _>(payload.as_slice()).unwrap()
        else {
            panic!("payload is not a map")
        };
        let cabundle = payload
            .iter()
            .find(|(k, _)| *k == Value::Text("cabundle".into()))
            .and_then(|(_, v)| v.as_array())
            .map_or(0, Vec::len);
        let keys = payload.into_iter().map(|(k, _)| k).collect();
        (protected, unprotected, keys, cabundle)
    }

    let real = load_real_vectors()
        .into_iter()
        .find(|v| v.file == "evervault-1.cbor")
        .expect("evervault-1.cbor is in the manifest");
    let nsm = SimulatedNsm::new(SimConfig::default()).unwrap();
    let ours = kluis_nsm::attest(&nsm, None, Some(b"n"), None).unwrap();
    let (real_protected, real_unprotected, real_keys, real_chain) = shape(&real.bytes);
    let (protected, unprotected, keys, chain) = shape(&ours);
    assert_eq!(keys, real_keys);
    assert_eq!(protected, real_protected);
    assert_eq!(unprotected, real_unprotected);
    assert_eq!(chain, real_chain);
    assert_eq!(chain, 4);
}
