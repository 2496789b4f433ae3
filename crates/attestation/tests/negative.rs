//! One case per verifier rule: a document that breaks exactly that rule, signed
//! for real, and the error kind it must produce. Plus the positive edges the
//! rules must still let through (tag 18, indefinite maps, null and 1024-byte
//! optional fields).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing
)]

use ciborium::value::Value;
use kluis_attestation::{TrustAnchor, UnixMillis, Verifier, VerifyError, VerifyOptions};
mod support;

use rcgen::{BasicConstraints, IsCa, KeyUsagePurpose};
use std::sync::OnceLock;
use std::time::Duration;
use support::forge::{encode, ChainSpec, Forged};

const NOW_S: i64 = 1_750_000_000;
const NOW_MS: u64 = 1_750_000_000_000;

struct Case {
    name: &'static str,
    doc: Vec<u8>,
    /// The trust anchor (the forged root unless the case changes it).
    root: Vec<u8>,
    options: VerifyOptions,
    expect: Result<(), &'static str>,
}

fn run(cases: Vec<Case>) {
    let mut failures = Vec::new();
    for case in &cases {
        let verifier = Verifier::new(TrustAnchor::dangerous_from_der(&case.root).unwrap());
        let got = verifier.verify(&case.doc, &case.options).map(|_| ());
        let ok = match (&got, case.expect) {
            (Ok(()), Ok(())) => true,
            (Err(e), Err(kind)) => e.kind() == kind,
            _ => false,
        };
        if !ok {
            failures.push(format!(
                "{}: expected {:?}, got {:?}",
                case.name,
                case.expect,
                got.as_ref()
                    .map_err(|e: &VerifyError| format!("{} ({e})", e.kind()))
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The chain cases again, on one verifier (trusting the good root) that has
/// already accepted good documents, so the CA links those share with a case
/// are in its link cache: the service's situation. Each rejection must be the
/// same, and a good document must still verify after each. Returns how many
/// cases ran (those under the good root; the others cannot chain to it).
fn run_warm(cases: &[Case]) -> usize {
    let good = good();
    let verifier = Verifier::new(TrustAnchor::dangerous_from_der(&good.root_der).unwrap());
    let good_docs: Vec<Vec<u8>> = [Some(&b"warm-1"[..]), None]
        .into_iter()
        .map(|nonce| good.sign(&encode(&Value::Map(good.payload(NOW_MS, nonce)))))
        .collect();
    let accept_good = |when: &str| {
        for doc in &good_docs {
            if let Err(e) = verifier.verify(doc, &at_now()) {
                panic!("good document refused {when}: {e}");
            }
        }
    };
    accept_good("before the cases");
    let mut failures = Vec::new();
    let mut ran = 0;
    for case in cases.iter().filter(|c| c.root == good.root_der) {
        ran += 1;
        let got = verifier.verify(&case.doc, &case.options).map(|_| ());
        let ok = match (&got, case.expect) {
            (Ok(()), Ok(())) => true,
            (Err(e), Err(kind)) => e.kind() == kind,
            _ => false,
        };
        if !ok {
            failures.push(format!(
                "{} (warm): expected {:?}, got {:?}",
                case.name,
                case.expect,
                got.as_ref().map_err(|e| e.kind())
            ));
        }
        accept_good(&format!("after {}", case.name));
    }
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    ran
}

fn at_now() -> VerifyOptions {
    VerifyOptions::at(UnixMillis(NOW_MS))
}

fn text(s: &str) -> Value {
    Value::Text(s.to_owned())
}

/// The good chain every case starts from; a chain case reuses its
/// certificates above the one it changes.
fn good() -> &'static Forged {
    static GOOD: OnceLock<Forged> = OnceLock::new();
    GOOD.get_or_init(|| ChainSpec::aws_like(NOW_S).forge())
}

/// A correct forged document, the chain, and its payload entries.
fn base() -> (Forged, Vec<(Value, Value)>) {
    let forged = good().clone();
    let payload = forged.payload(NOW_MS, Some(b"nonce-1"));
    (forged, payload)
}

/// Sign a payload built from `base()` after `edit` changed its entries.
fn payload_case(
    name: &'static str,
    expect: Result<(), &'static str>,
    edit: impl FnOnce(&mut Vec<(Value, Value)>),
) -> Case {
    let (forged, mut payload) = base();
    edit(&mut payload);
    let doc = forged.sign(&encode(&Value::Map(payload)));
    Case {
        name,
        doc,
        root: forged.root_der.clone(),
        options: at_now(),
        expect,
    }
}

fn set(payload: &mut [(Value, Value)], key: &str, value: Value) {
    let slot = payload.iter_mut().find(|(k, _)| *k == text(key)).unwrap();
    slot.1 = value;
}

fn remove(payload: &mut Vec<(Value, Value)>, key: &str) {
    payload.retain(|(k, _)| *k != text(key));
}

/// Build a chain with one knob turned, sign a normal payload with it.
fn chain_case(name: &'static str, expect: &'static str, edit: impl FnOnce(&mut ChainSpec)) -> Case {
    let mut spec = ChainSpec::aws_like(NOW_S);
    edit(&mut spec);
    let forged = spec.forge_reusing(Some(good()));
    let doc = forged.sign(&encode(&Value::Map(forged.payload(NOW_MS, None))));
    Case {
        name,
        doc,
        root: forged.root_der.clone(),
        options: at_now(),
        expect: Err(expect),
    }
}

/// Decode a COSE document into its four parts.
fn parts(doc: &[u8]) -> Vec<Value> {
    match ciborium::from_reader::<Value, _>(doc).unwrap() {
        Value::Array(a) => a,
        other => panic!("not an array: {other:?}"),
    }
}

#[test]
fn envelope_rules() {
    let (forged, payload) = base();
    let payload_bytes = encode(&Value::Map(payload));
    let good = forged.sign(&payload_bytes);
    let root = forged.root_der.clone();
    let case = |name, doc: Vec<u8>, expect| Case {
        name,
        doc,
        root: root.clone(),
        options: at_now(),
        expect,
    };

    let mut trailing = good.clone();
    trailing.push(0x00);

    let tagged18 = encode(&Value::Tag(18, Box::new(Value::Array(parts(&good)))));
    let tagged17 = encode(&Value::Tag(17, Box::new(Value::Array(parts(&good)))));

    // alg ES256 (-7): {1: -7}
    let es256 = forged.sign_with_protected(&[0xa1, 0x01, 0x26], &payload_bytes);
    // {1: -35, 4: h'00'} (alg plus a kid)
    let with_kid =
        forged.sign_with_protected(&[0xa2, 0x01, 0x38, 0x22, 0x04, 0x41, 0x00], &payload_bytes);
    // {1: -35} followed by a stray byte inside the protected bstr
    let protected_trailing =
        forged.sign_with_protected(&[0xa1, 0x01, 0x38, 0x22, 0x00], &payload_bytes);
    // empty protected header
    let no_alg = forged.sign_with_protected(&[0xa0], &payload_bytes);

    let mut p = parts(&good);
    if let Value::Bytes(sig) = &mut p[3] {
        sig.pop();
    }
    let short_sig = encode(&Value::Array(p));

    let mut p = parts(&good);
    p[2] = Value::Null;
    let detached = encode(&Value::Array(p));

    let mut p = parts(&good);
    p.pop();
    let three = encode(&Value::Array(p));

    // Unprotected header {4: h'01', 4: h'02'} with a duplicate key.
    let mut dup = vec![0x84];
    dup.extend_from_slice(&encode(&Value::Bytes(vec![0xa1, 0x01, 0x38, 0x22])));
    dup.extend_from_slice(&[0xa2, 0x04, 0x41, 0x01, 0x04, 0x41, 0x02]);
    let p = parts(&good);
    dup.extend_from_slice(&encode(&p[2]));
    dup.extend_from_slice(&encode(&p[3]));

    // Unprotected header {4: h'01'}: not signed, so not allowed.
    let mut unprotected = parts(&good);
    unprotected[1] = Value::Map(vec![(Value::Integer(4.into()), Value::Bytes(vec![1]))]);
    let unprotected = encode(&Value::Array(unprotected));

    let mut flipped = parts(&good);
    if let Value::Bytes(sig) = &mut flipped[3] {
        sig[10] ^= 0x01;
    }
    let bad_sig = encode(&Value::Array(flipped));

    // Signed by a key that is not the leaf's.
    let other = ChainSpec::aws_like(NOW_S).forge();
    let wrong_signer = {
        let tbs =
            kluis_nsm::sim::cose::sig_structure(&[0xa1, 0x01, 0x38, 0x22], &payload_bytes).unwrap();
        let sig = other.raw_signature(&tbs);
        kluis_nsm::sim::cose::encode_sign1(&[0xa1, 0x01, 0x38, 0x22], &payload_bytes, &sig).unwrap()
    };

    let mut deep = vec![0x81u8; 5000];
    deep.push(0x00);

    run(vec![
        case("well-formed document", good.clone(), Ok(())),
        case("tag 18 is accepted", tagged18, Ok(())),
        case("trailing byte", trailing, Err("cbor_trailing_bytes")),
        case("other tag", tagged17, Err("cose_unexpected_tag")),
        case("alg ES256", es256, Err("cose_algorithm")),
        case("alg plus other header", with_kid, Err("cose_algorithm")),
        case("no alg", no_alg, Err("cose_algorithm")),
        case(
            "trailing byte in protected header",
            protected_trailing,
            Err("cbor_trailing_bytes"),
        ),
        case("95-byte signature", short_sig, Err("cose_signature_length")),
        case("detached payload", detached, Err("cose_detached_payload")),
        case("array of three", three, Err("cose_structure")),
        case("duplicate header key", dup, Err("cbor_duplicate_key")),
        case(
            "non-empty unprotected header",
            unprotected,
            Err("cose_unprotected_header"),
        ),
        case("flipped signature bit", bad_sig, Err("signature_invalid")),
        case(
            "signed by another key",
            wrong_signer,
            Err("signature_invalid"),
        ),
        case("deep nesting", deep, Err("cbor_too_deep")),
        case(
            "too large",
            vec![0x84; 40 * 1024],
            Err("document_too_large"),
        ),
        case("empty input", Vec::new(), Err("cbor_malformed")),
        case(
            "not CBOR at all",
            b"hello world".to_vec(),
            Err("cbor_trailing_bytes"),
        ),
    ]);
}

#[test]
fn payload_rules() {
    let mut cases = vec![
        payload_case("baseline", Ok(()), |_| {}),
        payload_case("optional fields null", Ok(()), |p| {
            set(p, "nonce", Value::Null);
        }),
        payload_case("optional fields absent", Ok(()), |p| {
            remove(p, "nonce");
            remove(p, "user_data");
            remove(p, "public_key");
        }),
        payload_case("optional fields empty", Ok(()), |p| {
            set(p, "public_key", Value::Bytes(vec![]));
            set(p, "user_data", Value::Bytes(vec![]));
        }),
        payload_case("optional fields at 1024 bytes", Ok(()), |p| {
            set(p, "public_key", Value::Bytes(vec![1; 1024]));
            set(p, "user_data", Value::Bytes(vec![2; 1024]));
        }),
        payload_case("PCRs of 32 and 64 bytes", Ok(()), |p| {
            set(
                p,
                "pcrs",
                Value::Map(vec![
                    (Value::Integer(0.into()), Value::Bytes(vec![0; 32])),
                    (Value::Integer(31.into()), Value::Bytes(vec![0; 64])),
                ]),
            );
        }),
        payload_case("unknown field", Err("payload_unknown_field"), |p| {
            p.push((text("extra"), Value::Bool(true)));
        }),
        payload_case("integer key", Err("payload_unknown_field"), |p| {
            p.push((Value::Integer(1.into()), Value::Bool(true)));
        }),
        payload_case("duplicate key", Err("cbor_duplicate_key"), |p| {
            p.push((text("nonce"), Value::Bytes(vec![1])));
        }),
        payload_case("digest SHA256", Err("payload_unsupported_digest"), |p| {
            set(p, "digest", text("SHA256"));
        }),
        payload_case("digest as bytes", Err("payload_wrong_type"), |p| {
            set(p, "digest", Value::Bytes(b"SHA384".to_vec()));
        }),
        payload_case("timestamp zero", Err("payload_timestamp"), |p| {
            set(p, "timestamp", Value::Integer(0.into()));
        }),
        payload_case("timestamp negative", Err("payload_timestamp"), |p| {
            set(p, "timestamp", Value::Integer((-5).into()));
        }),
        payload_case("timestamp as text", Err("payload_wrong_type"), |p| {
            set(p, "timestamp", text("1750000000000"));
        }),
        payload_case("empty module_id", Err("payload_field_length"), |p| {
            set(p, "module_id", text(""));
        }),
        payload_case("module_id as bytes", Err("payload_wrong_type"), |p| {
            set(p, "module_id", Value::Bytes(b"i-1".to_vec()));
        }),
        payload_case("PCR index 32", Err("payload_pcr_index"), |p| {
            set(
                p,
                "pcrs",
                Value::Map(vec![(Value::Integer(32.into()), Value::Bytes(vec![0; 48]))]),
            );
        }),
        payload_case("PCR index negative", Err("payload_pcr_index"), |p| {
            set(
                p,
                "pcrs",
                Value::Map(vec![(
                    Value::Integer((-1).into()),
                    Value::Bytes(vec![0; 48]),
                )]),
            );
        }),
        payload_case("PCR index as text", Err("payload_pcr_index"), |p| {
            set(
                p,
                "pcrs",
                Value::Map(vec![(text("0"), Value::Bytes(vec![0; 48]))]),
            );
        }),
        payload_case("PCR of 47 bytes", Err("payload_pcr_length"), |p| {
            set(
                p,
                "pcrs",
                Value::Map(vec![(Value::Integer(0.into()), Value::Bytes(vec![0; 47]))]),
            );
        }),
        payload_case("no PCRs", Err("payload_field_length"), |p| {
            set(p, "pcrs", Value::Map(vec![]));
        }),
        payload_case("pcrs as array", Err("payload_wrong_type"), |p| {
            set(p, "pcrs", Value::Array(vec![]));
        }),
        payload_case("empty certificate", Err("payload_field_length"), |p| {
            set(p, "certificate", Value::Bytes(vec![]));
        }),
        payload_case(
            "certificate over 1024 bytes",
            Err("payload_field_length"),
            |p| {
                set(p, "certificate", Value::Bytes(vec![0x30; 1025]));
            },
        ),
        payload_case("empty cabundle", Err("payload_field_length"), |p| {
            set(p, "cabundle", Value::Array(vec![]));
        }),
        payload_case("cabundle entry empty", Err("payload_field_length"), |p| {
            set(p, "cabundle", Value::Array(vec![Value::Bytes(vec![])]));
        }),
        payload_case("cabundle entry as text", Err("payload_wrong_type"), |p| {
            set(p, "cabundle", Value::Array(vec![text("cert")]));
        }),
        payload_case(
            "public_key over 1024 bytes",
            Err("payload_field_length"),
            |p| {
                set(p, "public_key", Value::Bytes(vec![0; 1025]));
            },
        ),
        payload_case(
            "user_data over 1024 bytes",
            Err("payload_field_length"),
            |p| {
                set(p, "user_data", Value::Bytes(vec![0; 1025]));
            },
        ),
        payload_case("nonce over 1024 bytes", Err("payload_field_length"), |p| {
            set(p, "nonce", Value::Bytes(vec![0; 1025]));
        }),
        payload_case("user_data as text", Err("payload_wrong_type"), |p| {
            set(p, "user_data", text("hello"));
        }),
    ];
    for (name, field) in [
        ("missing module_id", "module_id"),
        ("missing digest", "digest"),
        ("missing timestamp", "timestamp"),
        ("missing pcrs", "pcrs"),
        ("missing certificate", "certificate"),
        ("missing cabundle", "cabundle"),
    ] {
        cases.push(payload_case(name, Err("payload_missing_field"), |p| {
            remove(p, field)
        }));
    }

    // Payload that is an array, not a map.
    let (forged, _) = base();
    cases.push(Case {
        name: "payload is an array",
        doc: forged.sign(&encode(&Value::Array(vec![]))),
        root: forged.root_der.clone(),
        options: at_now(),
        expect: Err("payload_not_a_map"),
    });
    // Trailing byte inside the payload bstr.
    let (forged, payload) = base();
    let mut bytes = encode(&Value::Map(payload));
    bytes.push(0x00);
    cases.push(Case {
        name: "trailing byte in payload",
        doc: forged.sign(&bytes),
        root: forged.root_der.clone(),
        options: at_now(),
        expect: Err("cbor_trailing_bytes"),
    });
    // The same payload as an indefinite-length map, as some NSM versions emit.
    let (forged, payload) = base();
    let mut bytes = encode(&Value::Map(payload));
    assert_eq!(bytes[0], 0xa9);
    bytes[0] = 0xbf;
    bytes.push(0xff);
    cases.push(Case {
        name: "indefinite-length payload map",
        doc: forged.sign(&bytes),
        root: forged.root_der.clone(),
        options: at_now(),
        expect: Ok(()),
    });
    run(cases);
}

#[test]
fn chain_rules() {
    let (forged, payload) = base();
    let other_root = ChainSpec::aws_like(NOW_S).forge().root_der;
    let mut cases = vec![Case {
        name: "root not pinned",
        doc: forged.sign(&encode(&Value::Map(payload.clone()))),
        root: other_root,
        options: at_now(),
        expect: Err("chain_untrusted_root"),
    }];

    // Too many certificates: the bundle repeated.
    let mut long = payload.clone();
    let mut bundle: Vec<Value> = forged.cabundle.iter().cloned().map(Value::Bytes).collect();
    bundle.extend(forged.cabundle.iter().cloned().map(Value::Bytes));
    set(&mut long, "cabundle", Value::Array(bundle));
    cases.push(Case {
        name: "chain too long",
        doc: forged.sign(&encode(&Value::Map(long))),
        root: forged.root_der.clone(),
        options: at_now(),
        expect: Err("chain_too_long"),
    });

    // A cabundle entry that is not a certificate.
    let mut garbage = payload.clone();
    let mut bundle: Vec<Value> = forged.cabundle.iter().cloned().map(Value::Bytes).collect();
    bundle[2] = Value::Bytes(vec![0x30, 0x03, 0x02, 0x01, 0x01]);
    set(&mut garbage, "cabundle", Value::Array(bundle));
    cases.push(Case {
        name: "malformed intermediate",
        doc: forged.sign(&encode(&Value::Map(garbage))),
        root: forged.root_der.clone(),
        options: at_now(),
        expect: Err("chain_certificate_malformed"),
    });

    // The leaf's signature algorithm rewritten from ecdsa-with-SHA384 to -SHA256.
    let sha384_oid = [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03];
    let mut leaf = forged.leaf_der.clone();
    let mut patched = 0;
    for i in 0..leaf.len() - sha384_oid.len() {
        if leaf[i..i + sha384_oid.len()] == sha384_oid {
            leaf[i + 7] = 0x02;
            patched += 1;
        }
    }
    assert_eq!(patched, 2, "tbs and outer algorithm identifiers");
    let mut sha256 = payload.clone();
    set(&mut sha256, "certificate", Value::Bytes(leaf));
    cases.push(Case {
        name: "ecdsa-with-SHA256",
        doc: forged.sign(&encode(&Value::Map(sha256))),
        root: forged.root_der.clone(),
        options: at_now(),
        expect: Err("chain_signature_algorithm"),
    });

    cases.extend([
        chain_case(
            "regional signed by a stranger",
            "chain_bad_signature",
            |s| s.certs[1].signed_by_stranger = true,
        ),
        chain_case("leaf signed by a stranger", "chain_bad_signature", |s| {
            let l = s.leaf();
            s.certs[l].signed_by_stranger = true
        }),
        chain_case("issuer name mismatch", "chain_issuer_mismatch", |s| {
            s.certs[2].wrong_issuer_name = true
        }),
        chain_case("zonal not a CA", "chain_not_a_ca", |s| {
            s.certs[2].is_ca = IsCa::ExplicitNoCa
        }),
        chain_case("instance without basicConstraints", "chain_not_a_ca", |s| {
            s.certs[3].is_ca = IsCa::NoCa
        }),
        chain_case("regional path length 1", "chain_path_length", |s| {
            s.certs[1].is_ca = IsCa::Ca(BasicConstraints::Constrained(1))
        }),
        chain_case("root path length 1", "chain_path_length", |s| {
            s.certs[0].is_ca = IsCa::Ca(BasicConstraints::Constrained(1))
        }),
        chain_case("instance without keyCertSign", "chain_key_usage", |s| {
            s.certs[3].key_usages = vec![KeyUsagePurpose::DigitalSignature]
        }),
        chain_case("leaf is a CA", "chain_leaf_is_ca", |s| {
            let l = s.leaf();
            s.certs[l].is_ca = IsCa::Ca(BasicConstraints::Constrained(0))
        }),
        chain_case("leaf without digitalSignature", "chain_key_usage", |s| {
            let l = s.leaf();
            s.certs[l].key_usages = vec![KeyUsagePurpose::KeyAgreement]
        }),
        chain_case("leaf without keyUsage", "chain_key_usage", |s| {
            let l = s.leaf();
            s.certs[l].key_usages = vec![]
        }),
        chain_case("P-256 instance key", "chain_key_type", |s| {
            s.certs[3].key_alg = &rcgen::PKCS_ECDSA_P256_SHA256
        }),
        chain_case(
            "unknown critical extension",
            "chain_critical_extension",
            |s| s.certs[2].unknown_critical_extension = true,
        ),
        chain_case("expired zonal", "chain_expired", |s| {
            s.certs[2].not_after = NOW_S - 1
        }),
        chain_case("leaf not yet valid", "chain_not_yet_valid", |s| {
            let l = s.leaf();
            s.certs[l].not_before = NOW_S + 10
        }),
        chain_case("expired root", "chain_expired", |s| {
            s.certs[0].not_after = NOW_S - 1
        }),
    ]);
    // Under a different root: "root not pinned" (its anchor is another root)
    // and the two cases that change the root itself.
    let cold_only = ["root not pinned", "root path length 1", "expired root"];
    let ran = run_warm(&cases);
    assert_eq!(
        ran,
        cases.len() - cold_only.len(),
        "cases on the warm verifier"
    );
    for case in &cases {
        assert_eq!(
            case.root != good().root_der,
            cold_only.contains(&case.name),
            "{}",
            case.name
        );
    }
    run(cases);
}

#[test]
fn freshness_rules() {
    let (forged, payload) = base();
    let doc = forged.sign(&encode(&Value::Map(payload)));
    let mut no_nonce_payload = forged.payload(NOW_MS, None);
    set(&mut no_nonce_payload, "nonce", Value::Null);
    let no_nonce = forged.sign(&encode(&Value::Map(no_nonce_payload)));
    let root = forged.root_der.clone();
    let case = |name, doc: &Vec<u8>, options, expect| Case {
        name,
        doc: doc.clone(),
        root: root.clone(),
        options,
        expect,
    };
    let five_min = Duration::from_secs(300);
    run(vec![
        case(
            "right nonce",
            &doc,
            at_now().expect_nonce(b"nonce-1".to_vec()),
            Ok(()),
        ),
        case(
            "wrong nonce",
            &doc,
            at_now().expect_nonce(b"nonce-2".to_vec()),
            Err("nonce_mismatch"),
        ),
        case(
            "no nonce",
            &no_nonce,
            at_now().expect_nonce(b"nonce-1".to_vec()),
            Err("nonce_missing"),
        ),
        case(
            "within max age",
            &doc,
            VerifyOptions::at(UnixMillis(NOW_MS + 299_000)).max_age(five_min),
            Ok(()),
        ),
        case(
            "older than max age",
            &doc,
            VerifyOptions::at(UnixMillis(NOW_MS + 301_000)).max_age(five_min),
            Err("document_too_old"),
        ),
        case(
            "from the future",
            &doc,
            VerifyOptions::at(UnixMillis(NOW_MS - 61_000)).max_age(five_min),
            Err("document_from_future"),
        ),
        case(
            "within clock skew",
            &doc,
            VerifyOptions::at(UnixMillis(NOW_MS - 59_000)).max_age(five_min),
            Ok(()),
        ),
    ]);
}
