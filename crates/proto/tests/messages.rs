//! Messages through the public API: wire shapes, round trips, and bounded,
//! strict decoding of hostile CBOR.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing
)]

use kluis_proto::message::{
    MAX_ATTESTATION_DOCUMENT_LEN, MAX_KEY_ID_LEN, MAX_OPERATIONS, MAX_WRAPPED_KEY_LEN,
};
use kluis_proto::{
    read_message_sync, request_hash, write_message_sync, ErrorCode, FrameError, KeyOperation,
    KeyRequest, Message, MessageError, Request, RequestError, Response, SealedKeys, WireError,
    DEFAULT_MAX_FRAME_LEN,
};
use proptest::prelude::*;

fn cbor<T: serde::Serialize>(v: &T) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::ser::into_writer(v, &mut out).unwrap();
    out
}

/// Build CBOR by hand from a `ciborium::Value`, for shapes serde would never
/// write.
fn raw(v: ciborium::Value) -> Vec<u8> {
    cbor(&v)
}

fn t(s: &str) -> ciborium::Value {
    ciborium::Value::Text(s.into())
}

fn b(n: usize) -> ciborium::Value {
    ciborium::Value::Bytes(vec![0xab; n])
}

fn map(entries: Vec<(ciborium::Value, ciborium::Value)>) -> ciborium::Value {
    ciborium::Value::Map(entries)
}

fn key_release(doc: ciborium::Value, ops: Vec<ciborium::Value>) -> Vec<u8> {
    raw(map(vec![(
        t("key_release"),
        map(vec![
            (t("attestation_document"), doc),
            (
                t("request"),
                map(vec![(t("operations"), ciborium::Value::Array(ops))]),
            ),
        ]),
    )]))
}

fn gen_op(key_id: &str) -> ciborium::Value {
    map(vec![(
        t("generate_data_key"),
        map(vec![(t("key_id"), t(key_id))]),
    )])
}

fn bad_cbor(r: Result<Request, MessageError>) -> String {
    match r {
        Err(MessageError::BadCbor { detail, .. }) => detail,
        other => panic!("expected BadCbor, got {other:?}"),
    }
}

fn sample_request() -> Request {
    Request::KeyRelease {
        attestation_document: vec![0xd2; 4500],
        request: KeyRequest::new(vec![
            KeyOperation::GenerateDataKey {
                key_id: "agency-a/app-x/prod".into(),
            },
            KeyOperation::DecryptDataKey {
                wrapped: vec![1, 2, 3],
            },
            KeyOperation::GenerateSecret {
                key_id: "agency-a/app-x/prod".into(),
                label: "pseudonyms".into(),
            },
        ])
        .unwrap(),
    }
}

#[test]
fn wire_shapes() {
    // "challenge" as a CBOR text string.
    let mut expected = vec![0x69];
    expected.extend_from_slice(b"challenge");
    assert_eq!(Request::Challenge.encode().unwrap(), expected);
    assert_eq!(
        Response::Error {
            code: ErrorCode::Denied
        }
        .encode()
        .unwrap(),
        raw(map(vec![(t("error"), map(vec![(t("code"), t("denied"))]))]))
    );
    // Byte fields are byte strings, not arrays of integers.
    let doc = key_release(b(3), vec![gen_op("k")]);
    let Request::KeyRelease {
        attestation_document,
        ..
    } = Request::decode(&doc).unwrap()
    else {
        panic!()
    };
    assert_eq!(attestation_document, vec![0xab; 3]);
    let r = Request::KeyRelease {
        attestation_document: vec![0xab; 3],
        request: KeyRequest::new(vec![KeyOperation::GenerateDataKey { key_id: "k".into() }])
            .unwrap(),
    };
    assert_eq!(r.encode().unwrap(), doc);
    for (code, name) in [
        (ErrorCode::BadRequest, "bad_request"),
        (ErrorCode::Denied, "denied"),
        (ErrorCode::Unavailable, "unavailable"),
        (ErrorCode::Internal, "internal"),
    ] {
        assert_eq!(code.as_str(), name);
        assert_eq!(cbor(&code), raw(t(name)));
    }
}

#[test]
fn every_message_round_trips_through_a_frame() {
    let sealed = SealedKeys {
        document_sha384: [1; 48],
        request_hash: [2; 48],
        enc: [4; 97],
        ciphertext: vec![5; 200],
        signature: [6; 96],
        delegation: None,
    };
    let delegated = SealedKeys {
        delegation: Some(kluis_proto::ReleaseDelegation {
            public_key: [8; 97],
            not_after_ms: 1_767_225_600_000,
            signature: [9; 96],
        }),
        ..sealed.clone()
    };
    let responses = vec![
        Response::KeyRelease(Box::new(delegated)),
        Response::Challenge {
            nonce: [7; 32],
            expires_at_ms: u64::MAX,
        },
        Response::KeyRelease(Box::new(sealed)),
        Response::Error {
            code: ErrorCode::Unavailable,
        },
    ];
    let requests = vec![Request::Challenge, sample_request()];
    let mut buf = Vec::new();
    for r in &requests {
        write_message_sync(&mut buf, r, DEFAULT_MAX_FRAME_LEN).unwrap();
    }
    for r in &responses {
        write_message_sync(&mut buf, r, DEFAULT_MAX_FRAME_LEN).unwrap();
    }
    let mut reader = buf.as_slice();
    for r in &requests {
        assert_eq!(
            &read_message_sync::<Request, _>(&mut reader, DEFAULT_MAX_FRAME_LEN).unwrap(),
            r
        );
    }
    for r in &responses {
        assert_eq!(
            &read_message_sync::<Response, _>(&mut reader, DEFAULT_MAX_FRAME_LEN).unwrap(),
            r
        );
    }
    assert!(matches!(
        read_message_sync::<Request, _>(&mut reader, DEFAULT_MAX_FRAME_LEN),
        Err(WireError::Frame(FrameError::Closed))
    ));
}

#[test]
fn a_frame_holding_bad_cbor_is_a_message_error() {
    let mut buf = Vec::new();
    kluis_proto::write_frame_sync(&mut buf, b"\xff\xff", DEFAULT_MAX_FRAME_LEN).unwrap();
    assert!(matches!(
        read_message_sync::<Request, _>(&mut buf.as_slice(), DEFAULT_MAX_FRAME_LEN),
        Err(WireError::Message(MessageError::BadCbor { .. }))
    ));
}

#[test]
fn trailing_bytes_are_refused() {
    let mut bytes = Request::Challenge.encode().unwrap();
    bytes.push(0);
    assert_eq!(
        Request::decode(&bytes),
        Err(MessageError::TrailingBytes {
            context: "request",
            count: 1
        })
    );
}

#[test]
fn unknown_variants_fields_and_duplicates_are_refused() {
    bad_cbor(Request::decode(&raw(t("hello"))));
    bad_cbor(Request::decode(&raw(map(vec![
        (t("challenge"), ciborium::Value::Null),
        (t("challenge"), ciborium::Value::Null),
    ]))));
    // Unknown field beside the known ones.
    let bytes = raw(map(vec![(
        t("key_release"),
        map(vec![
            (t("attestation_document"), b(1)),
            (
                t("request"),
                map(vec![(
                    t("operations"),
                    ciborium::Value::Array(vec![gen_op("k")]),
                )]),
            ),
            (t("extra"), ciborium::Value::Bool(true)),
        ]),
    )]));
    bad_cbor(Request::decode(&bytes));
    // Duplicate field.
    let bytes = raw(map(vec![(
        t("key_release"),
        map(vec![
            (t("attestation_document"), b(1)),
            (t("attestation_document"), b(2)),
            (
                t("request"),
                map(vec![(
                    t("operations"),
                    ciborium::Value::Array(vec![gen_op("k")]),
                )]),
            ),
        ]),
    )]));
    bad_cbor(Request::decode(&bytes));
    // Unknown error code.
    assert!(Response::decode(&raw(map(vec![(
        t("error"),
        map(vec![(t("code"), t("teapot"))])
    )])))
    .is_err());
    // An operation with an unknown field.
    let op = map(vec![(
        t("generate_data_key"),
        map(vec![(t("key_id"), t("k")), (t("version"), t("3"))]),
    )]);
    bad_cbor(Request::decode(&key_release(b(1), vec![op])));
    // A byte field given as an array of integers.
    bad_cbor(Request::decode(&key_release(
        ciborium::Value::Array(vec![ciborium::Value::Integer(1.into())]),
        vec![gen_op("k")],
    )));
}

#[test]
fn request_bounds_are_enforced_while_decoding() {
    // Operations: 64 fine, 65 and 0 refused.
    let ops = |n: usize| (0..n).map(|_| gen_op("k")).collect::<Vec<_>>();
    assert!(Request::decode(&key_release(b(1), ops(MAX_OPERATIONS))).is_ok());
    bad_cbor(Request::decode(&key_release(b(1), ops(MAX_OPERATIONS + 1))));
    let d = bad_cbor(Request::decode(&key_release(b(1), ops(0))));
    assert!(d.contains("at least one operation"), "{d}");
    // Attestation document: 32 KiB fine, one more refused.
    assert!(Request::decode(&key_release(b(MAX_ATTESTATION_DOCUMENT_LEN), ops(1))).is_ok());
    bad_cbor(Request::decode(&key_release(
        b(MAX_ATTESTATION_DOCUMENT_LEN + 1),
        ops(1),
    )));
    // Key ids: 1..=255 bytes, no control characters.
    assert!(Request::decode(&key_release(
        b(1),
        vec![gen_op(&"k".repeat(MAX_KEY_ID_LEN))]
    ))
    .is_ok());
    bad_cbor(Request::decode(&key_release(
        b(1),
        vec![gen_op(&"k".repeat(MAX_KEY_ID_LEN + 1))],
    )));
    bad_cbor(Request::decode(&key_release(b(1), vec![gen_op("")])));
    bad_cbor(Request::decode(&key_release(b(1), vec![gen_op("a\nb")])));
    // Wrapped keys: 1..=1024 bytes.
    let dec = |n: usize| {
        map(vec![(
            t("decrypt_data_key"),
            map(vec![(t("wrapped"), b(n))]),
        )])
    };
    assert!(Request::decode(&key_release(b(1), vec![dec(MAX_WRAPPED_KEY_LEN)])).is_ok());
    bad_cbor(Request::decode(&key_release(
        b(1),
        vec![dec(MAX_WRAPPED_KEY_LEN + 1)],
    )));
    bad_cbor(Request::decode(&key_release(b(1), vec![dec(0)])));
}

#[test]
fn request_validation_errors_are_specific() {
    assert_eq!(KeyRequest::new(vec![]), Err(RequestError::Empty));
    let many = vec![KeyOperation::GenerateDataKey { key_id: "k".into() }; 65];
    assert_eq!(
        KeyRequest::new(many),
        Err(RequestError::TooManyOperations {
            found: 65,
            limit: 64
        })
    );
    assert_eq!(
        KeyRequest::new(vec![KeyOperation::GenerateSecret {
            key_id: "k".into(),
            label: "".into()
        }]),
        Err(RequestError::FieldLength {
            index: 0,
            field: "label",
            max: 255,
            found: 0
        })
    );
    assert_eq!(
        KeyRequest::new(vec![
            KeyOperation::GenerateDataKey { key_id: "k".into() },
            KeyOperation::GenerateDataKey {
                key_id: "k\u{7f}".into()
            }
        ]),
        Err(RequestError::ControlCharacter {
            index: 1,
            field: "key_id"
        })
    );
}

#[test]
fn challenge_nonce_must_be_32_bytes() {
    let challenge = |n: usize| {
        raw(map(vec![(
            t("challenge"),
            map(vec![
                (t("nonce"), b(n)),
                (t("expires_at_ms"), ciborium::Value::Integer(1.into())),
            ]),
        )]))
    };
    assert!(Response::decode(&challenge(32)).is_ok());
    for n in [0, 31, 33] {
        assert!(
            matches!(
                Response::decode(&challenge(n)),
                Err(MessageError::BadCbor { .. })
            ),
            "{n}"
        );
    }
}

#[test]
fn sealed_keys_fields_have_exact_lengths() {
    let sealed = |enc: usize, sig: usize| {
        raw(map(vec![(
            t("key_release"),
            map(vec![
                (t("document_sha384"), b(48)),
                (t("request_hash"), b(48)),
                (t("enc"), b(enc)),
                (t("ciphertext"), b(32)),
                (t("signature"), b(sig)),
            ]),
        )]))
    };
    assert!(Response::decode(&sealed(97, 96)).is_ok());
    for (e, s) in [(96, 96), (98, 96), (65, 96), (97, 95), (97, 72), (97, 97)] {
        assert!(Response::decode(&sealed(e, s)).is_err(), "{e} {s}");
    }
}

#[test]
fn hostile_lengths_fail_fast_without_allocating() {
    // An operations array announcing 2^64-1 entries, then nothing.
    let mut bytes = key_release(b(1), vec![]);
    let pos = bytes.len() - 1;
    assert_eq!(bytes[pos], 0x80); // empty array
    bytes[pos] = 0x9b;
    bytes.extend_from_slice(&[0xff; 8]);
    bad_cbor(Request::decode(&bytes));

    // A byte string announcing 2^64-1 bytes.
    let mut bytes = raw(map(vec![(
        t("key_release"),
        map(vec![(t("attestation_document"), b(0))]),
    )]));
    let pos = bytes.len() - 1;
    assert_eq!(bytes[pos], 0x40);
    bytes[pos] = 0x5b;
    bytes.extend_from_slice(&[0xff; 8]);
    bytes.extend_from_slice(&[0; 100]);
    bad_cbor(Request::decode(&bytes));

    // A map announcing 2^32 entries.
    let mut bytes = vec![0xba, 0xff, 0xff, 0xff, 0xff];
    bytes.extend_from_slice(&[0x60; 16]);
    assert!(Request::decode(&bytes).is_err());
}

#[test]
fn deep_nesting_does_not_overflow_the_stack() {
    // 100 000 nested arrays where a byte string belongs, and at the top.
    let depth = 100_000;
    let mut nested = vec![0x81u8; depth];
    nested.push(0x00);
    assert!(Request::decode(&nested).is_err());
    assert!(Response::decode(&nested).is_err());
    let mut bytes = raw(map(vec![(
        t("key_release"),
        map(vec![(t("attestation_document"), b(0))]),
    )]));
    bytes.pop();
    bytes.extend_from_slice(&nested);
    assert!(Request::decode(&bytes).is_err());
    // Deep maps: refused (by type, or by the depth limit) without recursion
    // proportional to the input.
    let mut deep_maps = [0xa1u8, 0x60].repeat(depth);
    deep_maps.push(0x00);
    assert!(Response::decode(&deep_maps).is_err());
}

fn arb_text(max: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("[a-zA-Z0-9/._\\-é€]{{1,{}}}", max.min(40)))
        .unwrap()
        .prop_filter("byte length", move |s| !s.is_empty() && s.len() <= max)
}

fn arb_op() -> impl Strategy<Value = KeyOperation> {
    prop_oneof![
        arb_text(MAX_KEY_ID_LEN).prop_map(|key_id| KeyOperation::GenerateDataKey { key_id }),
        proptest::collection::vec(any::<u8>(), 1..=64)
            .prop_map(|wrapped| KeyOperation::DecryptDataKey { wrapped }),
        (arb_text(MAX_KEY_ID_LEN), arb_text(255))
            .prop_map(|(key_id, label)| KeyOperation::GenerateSecret { key_id, label }),
    ]
}

proptest! {
    #[test]
    fn prop_requests_round_trip_and_keep_their_hash(
        ops in proptest::collection::vec(arb_op(), 1..=MAX_OPERATIONS),
        doc in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let request = KeyRequest::new(ops).unwrap();
        let message = Request::KeyRelease { attestation_document: doc, request: request.clone() };
        let mut buf = Vec::new();
        write_message_sync(&mut buf, &message, DEFAULT_MAX_FRAME_LEN).unwrap();
        let back: Request = read_message_sync(&mut buf.as_slice(), DEFAULT_MAX_FRAME_LEN).unwrap();
        prop_assert_eq!(&back, &message);
        let Request::KeyRelease { request: back_request, .. } = back else { panic!() };
        prop_assert_eq!(request_hash(&back_request), request_hash(&request));
    }

    #[test]
    fn prop_arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Request::decode(&bytes);
        let _ = Response::decode(&bytes);
    }

    #[test]
    fn prop_mutated_requests_decode_to_valid_requests_or_fail(
        flips in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let mut bytes = sample_request().encode().unwrap();
        for (i, x) in flips {
            let i = i.index(bytes.len());
            bytes[i] ^= x;
        }
        if let Ok(Request::KeyRelease { request, .. }) = Request::decode(&bytes) {
            // Whatever decodes is within bounds.
            prop_assert!(KeyRequest::new(request.operations().to_vec()).is_ok());
        }
    }
}
