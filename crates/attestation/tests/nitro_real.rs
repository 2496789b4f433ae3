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
use kluis_tests::load_real_vectors;

fn len_of(field: &Option<Vec<u8>>) -> serde_json::Value {
    match field {
        None => serde_json::Value::Null,
        Some(b) => serde_json::Value::String(format!("{} bytes", b.len())),
    }
}

#[test]
fn real_documents_verify_per_manifest() {
    let Some(vectors) = load_real_vectors("real_documents_verify_per_manifest") else {
        return;
    };
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
fn real_documents_rejected_an_hour_after_the_leaf_expired() {
    let Some(vectors) = load_real_vectors("real_documents_rejected_after_expiry") else {
        return;
    };
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
fn real_documents_rejected_under_another_root() {
    let Some(vectors) = load_real_vectors("real_documents_rejected_under_another_root") else {
        return;
    };
    let sim_root = kluis_nsm::sim::SimRoot::generate().unwrap();
    let verifier = Verifier::new(TrustAnchor::dangerous_from_der(sim_root.root_der()).unwrap());
    for v in &vectors {
        let err = verifier
            .verify(&v.bytes, &VerifyOptions::at(UnixMillis(v.at_ms)))
            .expect_err(&v.file);
        assert_eq!(err.kind(), "chain_untrusted_root", "{}: {err}", v.file);
    }
}
