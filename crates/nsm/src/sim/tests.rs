#![allow(clippy::arithmetic_side_effects)]

use aws_lc_rs::digest::{digest, SHA384};
use aws_lc_rs::signature::{UnparsedPublicKey, ECDSA_P384_SHA384_ASN1, ECDSA_P384_SHA384_FIXED};
use ciborium::Value;
use x509_parser::certificate::X509Certificate;
use x509_parser::der_parser::oid::Oid;
use x509_parser::oid_registry::{OID_KEY_TYPE_EC_PUBLIC_KEY, OID_SIG_ECDSA_WITH_SHA384};

use super::*;
use crate::{attest, describe_nsm, describe_pcr, extend_pcr, get_random, lock_pcr, lock_pcrs, Nsm};

const T0: u64 = 1_700_000_000_123;
const HOUR_S: i64 = 3_600;

fn sim_at(unix_ms: u64) -> (SimulatedNsm, Arc<FixedClock>) {
    let clock = Arc::new(FixedClock::new(unix_ms));
    let nsm = SimulatedNsm::new(SimConfig::default().with_clock(clock.clone())).unwrap();
    (nsm, clock)
}

fn sim() -> SimulatedNsm {
    sim_at(T0).0
}

fn error_of(response: Response) -> String {
    match response {
        Response::Error(code) => format!("{code:?}"),
        other => panic!("expected an error, got {other:?}"),
    }
}

/// A decoded COSE_Sign1 and its payload.
struct Parsed {
    protected: Vec<u8>,
    unprotected: Value,
    payload_bytes: Vec<u8>,
    signature: Vec<u8>,
    payload: Vec<(Value, Value)>,
}

fn parse(document: &[u8]) -> Parsed {
    let Value::Array(items) = ciborium::from_reader::<Value, _>(document).unwrap() else {
        panic!("not an array")
    };
    let [Value::Bytes(protected), unprotected, Value::Bytes(payload_bytes), Value::Bytes(signature)] =
        <[Value; 4]>::try_from(items).unwrap()
    else {
        panic!("unexpected COSE_Sign1 shape")
    };
    let Value::Map(payload) = ciborium::from_reader::<Value, _>(payload_bytes.as_slice()).unwrap()
    else {
        panic!("payload is not a map")
    };
    Parsed {
        protected,
        unprotected,
        payload_bytes,
        signature,
        payload,
    }
}

impl Parsed {
    fn field(&self, key: &str) -> &Value {
        &self
            .payload
            .iter()
            .find(|(k, _)| k.as_text() == Some(key))
            .unwrap_or_else(|| panic!("no field {key}"))
            .1
    }

    fn bytes(&self, key: &str) -> &[u8] {
        self.field(key).as_bytes().unwrap()
    }

    fn certs(&self) -> Vec<Vec<u8>> {
        self.field("cabundle")
            .as_array()
            .unwrap()
            .iter()
            .map(|cert| cert.as_bytes().unwrap().clone())
            .collect()
    }

    fn pcr(&self, index: u64) -> Vec<u8> {
        self.field("pcrs")
            .as_map()
            .unwrap()
            .iter()
            .find(|(k, _)| k.as_integer() == Some(index.into()))
            .unwrap()
            .1
            .as_bytes()
            .unwrap()
            .clone()
    }
}

fn x509(der: &[u8]) -> X509Certificate<'_> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    assert!(rest.is_empty());
    cert
}

/// Verifies `cert`'s signature with `issuer`'s key (ecdsa-with-SHA384, P-384).
fn assert_signed_by(cert: &X509Certificate<'_>, issuer: &X509Certificate<'_>) {
    assert_eq!(
        cert.signature_algorithm.algorithm,
        OID_SIG_ECDSA_WITH_SHA384
    );
    assert_eq!(cert.issuer(), issuer.subject());
    UnparsedPublicKey::new(
        &ECDSA_P384_SHA384_ASN1,
        issuer.public_key().subject_public_key.data.as_ref(),
    )
    .verify(
        cert.tbs_certificate.as_ref(),
        cert.signature_value.data.as_ref(),
    )
    .unwrap();
}

fn assert_p384(cert: &X509Certificate<'_>) {
    let spki = cert.public_key();
    assert_eq!(spki.algorithm.algorithm, OID_KEY_TYPE_EC_PUBLIC_KEY);
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .unwrap()
        .as_oid()
        .unwrap();
    assert_eq!(curve, Oid::from(&[1, 3, 132, 0, 34]).unwrap());
    assert_eq!(spki.subject_public_key.data.len(), 97);
}

/// Checks the COSE signature the way a verifier does, with the leaf's key.
fn assert_cose_signature_valid(parsed: &Parsed) {
    let leaf_der = parsed.bytes("certificate");
    let leaf = x509(leaf_der);
    let mut sig_structure = Vec::new();
    ciborium::into_writer(
        &Value::Array(vec![
            Value::Text("Signature1".into()),
            Value::Bytes(parsed.protected.clone()),
            Value::Bytes(vec![]),
            Value::Bytes(parsed.payload_bytes.clone()),
        ]),
        &mut sig_structure,
    )
    .unwrap();
    UnparsedPublicKey::new(
        &ECDSA_P384_SHA384_FIXED,
        leaf.public_key().subject_public_key.data.as_ref(),
    )
    .verify(&sig_structure, &parsed.signature)
    .unwrap();
}

// ---- PCRs -----------------------------------------------------------------

#[test]
fn extend_is_sha384_of_old_and_data() {
    let nsm = sim();
    let first = extend_pcr(&nsm, 16, b"hello").unwrap();
    let mut manual = vec![0u8; 48];
    manual.extend_from_slice(b"hello");
    assert_eq!(first.as_slice(), digest(&SHA384, &manual).as_ref());

    let second = extend_pcr(&nsm, 16, b"world").unwrap();
    let mut manual = first.to_vec();
    manual.extend_from_slice(b"world");
    assert_eq!(second.as_slice(), digest(&SHA384, &manual).as_ref());

    let described = describe_pcr(&nsm, 16).unwrap();
    assert_eq!(described.value, second);
    assert!(!described.locked);
    assert_eq!(describe_pcr(&nsm, 17).unwrap().value, [0; 48]);
}

#[test]
fn boot_pcrs_are_locked_and_read_only() {
    let nsm = sim();
    for index in 0..16 {
        let pcr = describe_pcr(&nsm, index).unwrap();
        assert!(pcr.locked, "PCR{index}");
        assert!(matches!(
            extend_pcr(&nsm, index, b"x"),
            Err(NsmError::ReadOnlyIndex)
        ));
    }
    for index in 16..32 {
        assert!(!describe_pcr(&nsm, index).unwrap().locked, "PCR{index}");
    }
    let description = describe_nsm(&nsm).unwrap();
    assert_eq!(description.locked_pcrs, (0..16).collect());
}

#[test]
fn lock_pcr_makes_a_pcr_read_only_and_is_idempotent() {
    let nsm = sim();
    let value = extend_pcr(&nsm, 20, b"measure").unwrap();
    lock_pcr(&nsm, 20).unwrap();
    lock_pcr(&nsm, 20).unwrap();
    lock_pcr(&nsm, 3).unwrap();
    assert!(matches!(
        extend_pcr(&nsm, 20, b"more"),
        Err(NsmError::ReadOnlyIndex)
    ));
    let pcr = describe_pcr(&nsm, 20).unwrap();
    assert!(pcr.locked);
    assert_eq!(pcr.value, value);
    assert!(describe_nsm(&nsm).unwrap().locked_pcrs.contains(&20));
    extend_pcr(&nsm, 21, b"still open").unwrap();
}

#[test]
fn lock_pcrs_locks_the_range_below() {
    let nsm = sim();
    lock_pcrs(&nsm, 20).unwrap();
    let locked = describe_nsm(&nsm).unwrap().locked_pcrs;
    assert_eq!(locked, (0..20).collect());
    assert!(matches!(
        extend_pcr(&nsm, 19, b"x"),
        Err(NsmError::ReadOnlyIndex)
    ));
    extend_pcr(&nsm, 20, b"x").unwrap();

    lock_pcrs(&nsm, 0).unwrap();
    lock_pcrs(&nsm, 32).unwrap();
    assert_eq!(describe_nsm(&nsm).unwrap().locked_pcrs, (0..32).collect());
    assert!(matches!(
        extend_pcr(&nsm, 31, b"x"),
        Err(NsmError::ReadOnlyIndex)
    ));
}

#[test]
fn out_of_range_indices_are_invalid_index() {
    let nsm = sim();
    for index in [32, 33, u16::MAX] {
        assert_eq!(
            error_of(nsm.process(Request::DescribePCR { index })),
            "InvalidIndex"
        );
        assert_eq!(
            error_of(nsm.process(Request::ExtendPCR {
                index,
                data: vec![1]
            })),
            "InvalidIndex"
        );
        assert_eq!(
            error_of(nsm.process(Request::LockPCR { index })),
            "InvalidIndex"
        );
    }
    for range in [33, u16::MAX] {
        assert_eq!(
            error_of(nsm.process(Request::LockPCRs { range })),
            "InvalidIndex"
        );
    }
    // Nothing was locked by the failed requests.
    assert_eq!(describe_nsm(&nsm).unwrap().locked_pcrs.len(), 16);
}

#[test]
fn extend_data_limit_is_1024_bytes() {
    let nsm = sim();
    extend_pcr(&nsm, 16, &[0xab; 1024]).unwrap();
    let before = describe_pcr(&nsm, 16).unwrap().value;
    assert!(matches!(
        extend_pcr(&nsm, 16, &[0xab; 1025]),
        Err(NsmError::InputTooLarge)
    ));
    assert_eq!(describe_pcr(&nsm, 16).unwrap().value, before);
    extend_pcr(&nsm, 16, &[]).unwrap();
}

// ---- DescribeNSM and GetRandom ---------------------------------------------

#[test]
fn describe_nsm_reports_the_module() {
    let nsm = sim();
    let description = describe_nsm(&nsm).unwrap();
    assert_eq!(description.version, (1, 0, 0));
    assert_eq!(description.module_id, DEFAULT_MODULE_ID);
    assert_eq!(description.max_pcrs, 32);
    assert_eq!(description.digest, Digest::SHA384);
}

#[test]
fn get_random_returns_256_fresh_bytes() {
    let nsm = sim();
    let a = get_random(&nsm).unwrap();
    let b = get_random(&nsm).unwrap();
    assert_eq!(a.len(), 256);
    assert_ne!(*a, *b);
}

// ---- Attestation documents ------------------------------------------------

#[test]
fn document_is_an_untagged_es384_cose_sign1() {
    let nsm = sim();
    let document = attest(&nsm, Some(b"user"), Some(b"nonce"), Some(b"pk")).unwrap();
    assert_eq!(document.first(), Some(&0x84));
    let parsed = parse(&document);
    assert_eq!(parsed.protected, [0xa1, 0x01, 0x38, 0x22]);
    assert_eq!(parsed.unprotected, Value::Map(vec![]));
    assert_eq!(parsed.signature.len(), 96);
    assert_cose_signature_valid(&parsed);
}

#[test]
fn payload_fields_in_the_real_order_with_real_types() {
    let nsm = sim();
    let document = attest(&nsm, Some(b"user"), Some(b"nonce"), Some(b"pk")).unwrap();
    let parsed = parse(&document);
    // A definite-length map of 9 entries.
    assert_eq!(parsed.payload_bytes.first(), Some(&0xa9));
    let keys: Vec<_> = parsed
        .payload
        .iter()
        .map(|(k, _)| k.as_text().unwrap().to_owned())
        .collect();
    assert_eq!(
        keys,
        [
            "module_id",
            "digest",
            "timestamp",
            "pcrs",
            "certificate",
            "cabundle",
            "public_key",
            "user_data",
            "nonce"
        ]
    );
    assert_eq!(parsed.field("module_id").as_text(), Some(DEFAULT_MODULE_ID));
    assert_eq!(parsed.field("digest").as_text(), Some("SHA384"));
    assert_eq!(parsed.field("timestamp").as_integer(), Some(T0.into()));
    assert_eq!(parsed.bytes("user_data"), b"user");
    assert_eq!(parsed.bytes("nonce"), b"nonce");
    assert_eq!(parsed.bytes("public_key"), b"pk");

    let pcrs = parsed.field("pcrs").as_map().unwrap();
    assert_eq!(pcrs.len(), 16);
    for (index, (key, value)) in pcrs.iter().enumerate() {
        assert_eq!(key.as_integer(), Some(index.into()));
        assert_eq!(value.as_bytes().unwrap().len(), 48);
    }
    assert_eq!(parsed.certs().len(), 4);
}

#[test]
fn absent_fields_are_null_and_empty_fields_are_empty() {
    let nsm = sim();
    let parsed = parse(&attest(&nsm, None, None, None).unwrap());
    for key in ["public_key", "user_data", "nonce"] {
        assert_eq!(parsed.field(key), &Value::Null, "{key}");
    }
    let parsed = parse(&attest(&nsm, Some(b""), None, Some(b"")).unwrap());
    assert_eq!(parsed.bytes("user_data"), b"");
    assert_eq!(parsed.bytes("public_key"), b"");
    assert_eq!(parsed.field("nonce"), &Value::Null);
}

#[test]
fn attestation_fields_limit_is_1024_bytes_each() {
    let nsm = sim();
    let max = [7u8; 1024];
    let over = [7u8; 1025];
    let document = attest(&nsm, Some(&max), Some(&max), Some(&max)).unwrap();
    let parsed = parse(&document);
    assert_eq!(parsed.bytes("user_data").len(), 1024);
    assert_cose_signature_valid(&parsed);
    // The real module's response buffer is 0x3000 bytes; the largest document fits.
    assert!(document.len() < 0x3000 - 64, "{}", document.len());

    for (user_data, nonce, public_key) in [
        (Some(&over[..]), None, None),
        (None, Some(&over[..]), None),
        (None, None, Some(&over[..])),
    ] {
        assert!(matches!(
            attest(&nsm, user_data, nonce, public_key),
            Err(NsmError::InputTooLarge)
        ));
    }
    assert!(matches!(
        nsm.dangerous_attest_with_key(Some(&over), None, None),
        Err(SimError::Nsm(NsmError::InputTooLarge))
    ));
}

#[test]
fn chain_is_shaped_like_aws() {
    let nsm = sim();
    let parsed = parse(&attest(&nsm, None, None, None).unwrap());
    let certs = parsed.certs();
    let [root_der, regional_der, zonal_der, instance_der] =
        <[Vec<u8>; 4]>::try_from(certs).unwrap();
    assert_eq!(root_der, nsm.root().root_der());
    let root = x509(&root_der);
    let regional = x509(&regional_der);
    let zonal = x509(&zonal_der);
    let instance = x509(&instance_der);
    let leaf = x509(parsed.bytes("certificate"));

    assert_signed_by(&root, &root);
    assert_signed_by(&regional, &root);
    assert_signed_by(&zonal, &regional);
    assert_signed_by(&instance, &zonal);
    assert_signed_by(&leaf, &instance);

    for (cert, path_len) in [
        (&root, None),
        (&regional, Some(2)),
        (&zonal, Some(1)),
        (&instance, Some(0)),
    ] {
        let constraints = cert.basic_constraints().unwrap().unwrap();
        assert!(constraints.critical);
        assert!(constraints.value.ca);
        assert_eq!(constraints.value.path_len_constraint, path_len);
        let usage = cert.key_usage().unwrap().unwrap();
        assert!(usage.critical);
        assert!(usage.value.key_cert_sign());
    }
    for cert in [&root, &regional, &zonal] {
        let usage = cert.key_usage().unwrap().unwrap().value;
        assert!(usage.crl_sign() && usage.digital_signature());
    }

    let constraints = leaf.basic_constraints().unwrap().unwrap();
    assert!(constraints.critical);
    assert!(!constraints.value.ca);
    let usage = leaf.key_usage().unwrap().unwrap();
    assert!(usage.critical);
    assert!(usage.value.digital_signature());
    assert!(!usage.value.key_cert_sign());

    for cert in [&root, &regional, &zonal, &instance, &leaf] {
        assert_p384(cert);
        let subject = cert.subject().to_string();
        assert!(subject.contains("O=Kluis Simulated NSM"), "{subject}");
    }
    assert!(root
        .subject()
        .to_string()
        .contains("CN=kluis-simulated-root"));
    assert!(leaf
        .subject()
        .to_string()
        .contains(&format!("CN={DEFAULT_MODULE_ID}.")));
}

#[test]
fn validity_follows_the_clock() {
    let nsm = sim();
    let signed = nsm.dangerous_attest_with_key(None, None, None).unwrap();
    let t0 = i64::try_from(T0 / 1000).unwrap();
    let leaf = x509(signed.leaf.certificate_der());
    assert_eq!(leaf.validity().not_before.timestamp(), t0);
    assert_eq!(leaf.validity().not_after.timestamp(), t0 + 3 * HOUR_S);

    let expected_days = [30 * 365, 30, 7, 3];
    for (der, days) in signed.leaf.cabundle().iter().zip(expected_days) {
        let cert = x509(der);
        assert_eq!(cert.validity().not_before.timestamp(), t0);
        assert_eq!(
            cert.validity().not_after.timestamp(),
            t0 + days * 24 * HOUR_S
        );
    }
}

#[test]
fn documents_at_any_time_reissue_the_cas_when_needed() {
    let (nsm, clock) = sim_at(T0);
    let first = nsm.cabundle();

    // Within the instance CA's period: same chain, fresh leaf.
    clock.advance(60 * 60 * 1000);
    let a = parse(&attest(&nsm, None, None, None).unwrap());
    let b = parse(&attest(&nsm, None, None, None).unwrap());
    assert_eq!(a.certs(), first);
    assert_ne!(a.bytes("certificate"), b.bytes("certificate"));
    assert_eq!(
        a.field("timestamp").as_integer(),
        Some((T0 + 3_600_000).into())
    );

    // A leaf that would outlive the instance CA (3 days) forces new CAs.
    clock.set(T0 + (3 * 24 - 2) * 3_600_000);
    let later = parse(&attest(&nsm, None, None, None).unwrap());
    let later_certs = later.certs();
    assert_eq!(later_certs.first(), first.first());
    assert_ne!(later_certs.get(3), first.get(3));
    let instance = x509(later_certs.get(3).unwrap());
    let leaf = x509(later.bytes("certificate"));
    assert!(instance.validity().not_before <= leaf.validity().not_before);
    assert!(leaf.validity().not_after <= instance.validity().not_after);
    assert_signed_by(&leaf, &instance);
    assert_cose_signature_valid(&later);

    // Going back in time before the CAs' start also re-issues them.
    clock.set(T0 - 86_400_000);
    let earlier = parse(&attest(&nsm, None, None, None).unwrap());
    let earlier_certs = earlier.certs();
    let instance = x509(earlier_certs.get(3).unwrap());
    assert_eq!(
        instance.validity().not_before.timestamp(),
        i64::try_from((T0 - 86_400_000) / 1000).unwrap()
    );
}

// ---- Boot PCR configuration ----------------------------------------------

#[test]
fn image_measurement_sets_pcr0_1_2_and_signer_sets_pcr8() {
    let config = SimConfig::default()
        .with_image(b"enclave image".to_vec(), Some(b"signing cert".to_vec()))
        .with_boot_pcr(3, [3; 48])
        .with_boot_pcr(4, [4; 48]);
    let nsm = SimulatedNsm::new(config).unwrap();
    let expected = measure::image_pcrs(b"enclave image");
    let parsed = parse(&attest(&nsm, None, None, None).unwrap());
    for (index, value) in (0..3).zip(expected) {
        assert_eq!(parsed.pcr(index), value);
        assert_eq!(
            describe_pcr(&nsm, u16::try_from(index).unwrap())
                .unwrap()
                .value,
            value
        );
    }
    assert_eq!(parsed.pcr(3), [3; 48]);
    assert_eq!(parsed.pcr(4), [4; 48]);
    assert_eq!(parsed.pcr(8), measure::signer_pcr(b"signing cert"));
    for index in [5, 6, 7, 9, 15] {
        assert_eq!(parsed.pcr(index), [0; 48], "PCR{index}");
    }
}

#[test]
fn explicit_boot_pcrs_override_the_image() {
    let config = SimConfig::default()
        .with_image(b"image".to_vec(), None)
        .with_boot_pcr(0, [0xaa; 48]);
    let nsm = SimulatedNsm::new(config).unwrap();
    assert_eq!(describe_pcr(&nsm, 0).unwrap().value, [0xaa; 48]);
    assert_eq!(
        describe_pcr(&nsm, 1).unwrap().value,
        measure::image_pcrs(b"image")[1]
    );
    assert_eq!(describe_pcr(&nsm, 8).unwrap().value, [0; 48]);
}

#[test]
fn debug_mode_zeroes_pcr0_1_2_only() {
    let config = SimConfig::default()
        .with_image(b"image".to_vec(), Some(b"signer".to_vec()))
        .with_boot_pcr(1, [1; 48])
        .with_boot_pcr(3, [3; 48])
        .with_boot_pcr(4, [4; 48])
        .with_debug(true);
    let nsm = SimulatedNsm::new(config).unwrap();
    let parsed = parse(&attest(&nsm, None, None, None).unwrap());
    for index in 0..3 {
        assert_eq!(parsed.pcr(index), [0; 48], "PCR{index}");
    }
    assert_eq!(parsed.pcr(3), [3; 48]);
    assert_eq!(parsed.pcr(4), [4; 48]);
    assert_eq!(parsed.pcr(8), measure::signer_pcr(b"signer"));
}

#[test]
fn invalid_configurations_are_refused() {
    let cases = [
        SimConfig::default().with_boot_pcr(16, [0; 48]),
        SimConfig::default().with_module_id(""),
        SimConfig::default().with_module_id("x".repeat(129)),
        SimConfig::default().with_module_id("i-1\n-enc2"),
    ];
    for config in cases {
        let err = SimulatedNsm::new(config).unwrap_err();
        assert!(matches!(err, SimError::InvalidConfig(_)), "{err}");
    }
}

#[test]
fn module_id_and_shared_root_are_used() {
    let root = Arc::new(SimRoot::generate_at(T0).unwrap());
    let config = SimConfig::default()
        .with_root(root.clone())
        .with_module_id("i-0123456789abcdef0-enc0123456789abcdef");
    let nsm = SimulatedNsm::new(config).unwrap();
    let parsed = parse(&attest(&nsm, None, None, None).unwrap());
    assert_eq!(
        parsed.field("module_id").as_text(),
        Some("i-0123456789abcdef0-enc0123456789abcdef")
    );
    assert_eq!(parsed.certs().first().unwrap(), root.root_der());
    let instance_der = parsed.certs().get(3).unwrap().clone();
    let instance = x509(&instance_der);
    assert!(instance
        .subject()
        .to_string()
        .contains("CN=i-0123456789abcdef0."));
}

// ---- Test tooling ---------------------------------------------------------

#[test]
fn mutated_payload_can_be_resigned_with_the_leaf() {
    let nsm = sim();
    let signed = nsm
        .dangerous_attest_with_key(Some(b"u"), Some(b"n"), None)
        .unwrap();
    let original = parse(&signed.document);
    assert_eq!(original.payload_bytes, signed.payload);
    assert_eq!(original.bytes("certificate"), signed.leaf.certificate_der());
    assert_eq!(original.certs(), signed.leaf.cabundle());

    // Swap the nonce, re-encode and re-sign: the signature verifies.
    let mut payload = original.payload.clone();
    for (key, value) in &mut payload {
        if key.as_text() == Some("nonce") {
            *value = Value::Bytes(b"other".to_vec());
        }
    }
    let mut payload_bytes = Vec::new();
    ciborium::into_writer(&Value::Map(payload), &mut payload_bytes).unwrap();
    let forged = signed.leaf.dangerous_sign_payload(&payload_bytes).unwrap();
    let reparsed = parse(&forged);
    assert_eq!(reparsed.bytes("nonce"), b"other");
    assert_cose_signature_valid(&reparsed);

    // The exported key is the leaf's key.
    let pkcs8 = signed.leaf.dangerous_private_key_pkcs8();
    let key = aws_lc_rs::signature::EcdsaKeyPair::from_pkcs8(
        &aws_lc_rs::signature::ECDSA_P384_SHA384_FIXED_SIGNING,
        &pkcs8,
    )
    .unwrap();
    use aws_lc_rs::signature::KeyPair as _;
    assert_eq!(key.public_key().as_ref(), signed.leaf.public_key());
    let raw = signed.leaf.dangerous_sign(b"msg").unwrap();
    UnparsedPublicKey::new(&ECDSA_P384_SHA384_FIXED, signed.leaf.public_key())
        .verify(b"msg", &raw)
        .unwrap();
}

#[test]
fn dangerous_sign_payload_wraps_any_bytes() {
    let (nsm, clock) = sim_at(T0);
    clock.advance(5_000);
    let signed = nsm.dangerous_sign_payload(&[0xa0]).unwrap();
    assert_eq!(signed.timestamp_ms, T0 + 5_000);
    assert_eq!(signed.payload, [0xa0]);
    let Value::Array(items) =
        ciborium::from_reader::<Value, _>(signed.document.as_slice()).unwrap()
    else {
        panic!()
    };
    assert_eq!(items.get(2), Some(&Value::Bytes(vec![0xa0])));
    let leaf = x509(signed.leaf.certificate_der());
    assert_signed_by(&leaf, &x509(signed.leaf.cabundle().get(3).unwrap()));

    // A leaf issued on its own can sign a payload built around it.
    let leaf = nsm.dangerous_issue_leaf().unwrap();
    let document = leaf.dangerous_sign_payload(b"anything").unwrap();
    assert_eq!(document.first(), Some(&0x84));
}

#[test]
fn debug_output_has_no_key_material() {
    let nsm = sim();
    let signed = nsm.dangerous_attest_with_key(None, None, None).unwrap();
    let pkcs8 = signed.leaf.dangerous_private_key_pkcs8();
    let debug = format!("{nsm:?} {signed:?}");
    assert!(debug.contains("<redacted>"));
    assert!(!debug.contains(&format!("{:?}", pkcs8.as_slice())));
}

#[test]
fn simulator_is_shareable_between_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<SimulatedNsm>();
    let nsm = Arc::new(sim());
    let handles: Vec<_> = (0..4u16)
        .map(|i| {
            let nsm = Arc::clone(&nsm);
            std::thread::spawn(move || {
                extend_pcr(&*nsm, 16 + i, b"x").unwrap();
                attest(&*nsm, None, None, None).unwrap()
            })
        })
        .collect();
    for handle in handles {
        assert_cose_signature_valid(&parse(&handle.join().unwrap()));
    }
}
