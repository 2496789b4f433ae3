//! The byte strings that bind a response to its request: the request hash, the
//! HPKE `info`, and the signed response transcript.
//!
//! All three use one unambiguous encoding: a sequence of length-prefixed
//! fields, `lp(x) = u32-be(len(x)) || x`, starting with a distinct ASCII
//! domain-separation label, so that no byte string can be read as two different
//! field sequences and no value of one kind can be replayed as another.
//!
//! ```text
//! request_hash = SHA-384(
//!     lp("kluis-proto/v1 key-request")
//!  || u32-be(number of operations)
//!  || for each operation, in order:
//!       0x01 || lp(key_id)                  generate_data_key
//!       0x02 || lp(wrapped)                 decrypt_data_key
//!       0x03 || lp(key_id) || lp(label)     generate_secret
//! )                                         (key ids and labels as UTF-8)
//!
//! A request made under a job authorisation ([`crate::authorisation`])
//! starts differently, so that its hash never equals that of a request
//! without one, and binds the authorisation's id:
//!
//! request_hash = SHA-384(
//!     lp("kluis-proto/v1 authorised key-request")
//!  || lp(authorisation id)                  32 bytes, SHA-256 of the signed authorisation
//!  || u32-be(number of operations) || operations as above)
//!
//! hpke_info = lp("kluis-proto/v1 key-release hpke-info")
//!          || lp(document_sha384) || lp(request_hash)
//!
//! transcript = lp("kluis-proto/v1 key-release response")
//!           || lp(suite)                    0x0011 0x0002 0x0002 (KEM, KDF, AEAD ids)
//!           || lp(document_sha384)          48 bytes
//!           || lp(request_hash)             48 bytes
//!           || lp(recipient_public_key)     97 bytes, the enclave's ephemeral key
//!           || lp(enc)                      97 bytes
//!           || lp(ciphertext)               HPKE ciphertext with tag
//! signature  = ECDSA-P384-SHA384(verifier identity key, transcript), raw r || s
//! ```
//!
//! Every field is bounded far below 4 GiB by the types and checks that come
//! before these functions, so the `u32` prefixes never saturate.

use crate::message::{KeyOperation, KeyRequest, HASH_LEN, P384_PUBLIC_KEY_LEN};
use sha2::{Digest, Sha384};

/// Domain-separation label of the request hash.
pub const REQUEST_HASH_LABEL: &[u8] = b"kluis-proto/v1 key-request";
/// Domain-separation label of the hash of a request made under a job
/// authorisation.
pub const AUTHORISED_REQUEST_HASH_LABEL: &[u8] = b"kluis-proto/v1 authorised key-request";
/// Domain-separation label of the HPKE `info`.
pub const HPKE_INFO_LABEL: &[u8] = b"kluis-proto/v1 key-release hpke-info";
/// Domain-separation label of the signed response transcript.
pub const TRANSCRIPT_LABEL: &[u8] = b"kluis-proto/v1 key-release response";
/// HPKE suite: KEM DHKEM(P-384, HKDF-SHA384) = 0x0011, KDF HKDF-SHA384 =
/// 0x0002, AEAD AES-256-GCM = 0x0002 (RFC 9180 §7).
pub const HPKE_SUITE_ID: [u8; 6] = [0x00, 0x11, 0x00, 0x02, 0x00, 0x02];

const TAG_GENERATE_DATA_KEY: u8 = 0x01;
const TAG_DECRYPT_DATA_KEY: u8 = 0x02;
const TAG_GENERATE_SECRET: u8 = 0x03;

/// Where encoded fields go: a buffer, or straight into a hash.
pub(crate) trait Sink {
    fn put(&mut self, bytes: &[u8]);
}

impl Sink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

impl Sink for Sha384 {
    fn put(&mut self, bytes: &[u8]) {
        self.update(bytes);
    }
}

fn put_u32<S: Sink>(sink: &mut S, n: usize) {
    sink.put(&u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes());
}

pub(crate) fn put_lp<S: Sink>(sink: &mut S, bytes: &[u8]) {
    put_u32(sink, bytes.len());
    sink.put(bytes);
}

/// The request hash: SHA-384 of the canonical encoding of `request` (see the
/// module documentation). The enclave puts exactly these 48 bytes in the
/// attestation document's `user_data`; the verifier recomputes the hash from
/// the request it received and requires `user_data` to equal it byte for byte.
/// It depends only on the operations (and the authorisation id, when there
/// is one), not on how their CBOR was written.
pub fn request_hash(request: &KeyRequest) -> [u8; HASH_LEN] {
    let mut h = Sha384::new();
    match request.authorisation() {
        None => put_lp(&mut h, REQUEST_HASH_LABEL),
        Some(id) => {
            put_lp(&mut h, AUTHORISED_REQUEST_HASH_LABEL);
            put_lp(&mut h, &id.0);
        }
    }
    put_u32(&mut h, request.operations().len());
    for op in request.operations() {
        match op {
            KeyOperation::GenerateDataKey { key_id } => {
                h.put(&[TAG_GENERATE_DATA_KEY]);
                put_lp(&mut h, key_id.as_bytes());
            }
            KeyOperation::DecryptDataKey { wrapped } => {
                h.put(&[TAG_DECRYPT_DATA_KEY]);
                put_lp(&mut h, wrapped);
            }
            KeyOperation::GenerateSecret { key_id, label } => {
                h.put(&[TAG_GENERATE_SECRET]);
                put_lp(&mut h, key_id.as_bytes());
                put_lp(&mut h, label.as_bytes());
            }
        }
    }
    h.finalize().into()
}

/// The HPKE `info` for a response to `document_sha384` and `request_hash`.
pub fn hpke_info(document_sha384: &[u8; HASH_LEN], request_hash: &[u8; HASH_LEN]) -> Vec<u8> {
    let mut info = Vec::with_capacity(HPKE_INFO_LABEL.len().saturating_add(112));
    put_lp(&mut info, HPKE_INFO_LABEL);
    put_lp(&mut info, document_sha384);
    put_lp(&mut info, request_hash);
    info
}

/// The fields the verifier signs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TranscriptFields<'a> {
    pub document_sha384: &'a [u8; HASH_LEN],
    pub request_hash: &'a [u8; HASH_LEN],
    pub recipient_public_key: &'a [u8; P384_PUBLIC_KEY_LEN],
    pub enc: &'a [u8; P384_PUBLIC_KEY_LEN],
    pub ciphertext: &'a [u8],
}

pub(crate) fn write_transcript<S: Sink>(sink: &mut S, f: &TranscriptFields<'_>) {
    put_lp(sink, TRANSCRIPT_LABEL);
    put_lp(sink, &HPKE_SUITE_ID);
    put_lp(sink, f.document_sha384);
    put_lp(sink, f.request_hash);
    put_lp(sink, f.recipient_public_key);
    put_lp(sink, f.enc);
    put_lp(sink, f.ciphertext);
}

/// The transcript bytes, in a buffer of exactly their length: what ECDSA
/// P-384/SHA-384 signs and verifies.
pub(crate) fn transcript_bytes(f: &TranscriptFields<'_>) -> Vec<u8> {
    // 7 length prefixes, the label, the suite and 4 fixed-size fields: far
    // below `usize::MAX` with the ciphertext bounded by the caller.
    let len = [
        7 * 4,
        TRANSCRIPT_LABEL.len(),
        HPKE_SUITE_ID.len(),
        2 * HASH_LEN,
        2 * P384_PUBLIC_KEY_LEN,
        f.ciphertext.len(),
    ]
    .iter()
    .fold(0usize, |acc, n| acc.saturating_add(*n));
    let mut out = Vec::with_capacity(len);
    write_transcript(&mut out, f);
    out
}

/// The transcript bytes the verifier signs, for third parties that re-verify
/// a response (an auditor holding the response and the verifier public key).
pub fn response_transcript(
    document_sha384: &[u8; HASH_LEN],
    request_hash: &[u8; HASH_LEN],
    recipient_public_key: &[u8; P384_PUBLIC_KEY_LEN],
    enc: &[u8; P384_PUBLIC_KEY_LEN],
    ciphertext: &[u8],
) -> Vec<u8> {
    transcript_bytes(&TranscriptFields {
        document_sha384,
        request_hash,
        recipient_public_key,
        enc,
        ciphertext,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    fn req(ops: Vec<KeyOperation>) -> KeyRequest {
        KeyRequest::new(ops).unwrap()
    }

    #[test]
    fn request_hash_known_answer() {
        // Recomputed by hand from the documented encoding.
        let r = req(vec![
            KeyOperation::GenerateDataKey {
                key_id: "agency-a/app-x/prod".into(),
            },
            KeyOperation::DecryptDataKey {
                wrapped: vec![0xaa, 0xbb],
            },
            KeyOperation::GenerateSecret {
                key_id: "k".into(),
                label: "pseudonyms".into(),
            },
        ]);
        let mut expected = Vec::new();
        expected.extend_from_slice(&26u32.to_be_bytes());
        expected.extend_from_slice(b"kluis-proto/v1 key-request");
        expected.extend_from_slice(&3u32.to_be_bytes());
        expected.push(1);
        expected.extend_from_slice(&19u32.to_be_bytes());
        expected.extend_from_slice(b"agency-a/app-x/prod");
        expected.push(2);
        expected.extend_from_slice(&2u32.to_be_bytes());
        expected.extend_from_slice(&[0xaa, 0xbb]);
        expected.push(3);
        expected.extend_from_slice(&1u32.to_be_bytes());
        expected.extend_from_slice(b"k");
        expected.extend_from_slice(&10u32.to_be_bytes());
        expected.extend_from_slice(b"pseudonyms");
        let direct: [u8; 48] = Sha384::digest(&expected).into();
        assert_eq!(request_hash(&r), direct);
        // Pinned, so that any change to the encoding is a deliberate one.
        assert_eq!(
            crate::error::hex(&request_hash(&r)),
            "b51f2bc9c6cd3b92438022fec8cbee9ac49ca6140ff6265c\
             32ced72a5fc7999c9ea7dcab5f3dc4bd5bfb6c46dc632c71"
        );
    }

    #[test]
    fn request_hash_separates_field_boundaries_and_order() {
        let a = req(vec![KeyOperation::GenerateSecret {
            key_id: "ab".into(),
            label: "c".into(),
        }]);
        let b = req(vec![KeyOperation::GenerateSecret {
            key_id: "a".into(),
            label: "bc".into(),
        }]);
        assert_ne!(request_hash(&a), request_hash(&b));

        let x = KeyOperation::GenerateDataKey { key_id: "x".into() };
        let y = KeyOperation::GenerateDataKey { key_id: "y".into() };
        assert_ne!(
            request_hash(&req(vec![x.clone(), y.clone()])),
            request_hash(&req(vec![y.clone(), x.clone()]))
        );
        // Same bytes, different operation kind.
        assert_ne!(
            request_hash(&req(vec![KeyOperation::GenerateDataKey {
                key_id: "x".into()
            }])),
            request_hash(&req(vec![KeyOperation::DecryptDataKey {
                wrapped: b"x".to_vec()
            }]))
        );
        assert_ne!(
            request_hash(&req(vec![x.clone()])),
            request_hash(&req(vec![x.clone(), x]))
        );
    }

    #[test]
    fn request_hash_binds_the_authorisation() {
        use crate::authorisation::AuthorisationId;
        let ops = vec![KeyOperation::GenerateDataKey { key_id: "k".into() }];
        let plain = req(ops.clone());
        let a = req(ops.clone()).with_authorisation(Some(AuthorisationId([1; 32])));
        let b = req(ops).with_authorisation(Some(AuthorisationId([2; 32])));
        assert_ne!(request_hash(&plain), request_hash(&a));
        assert_ne!(request_hash(&a), request_hash(&b));
        let mut expected = Vec::new();
        expected.extend_from_slice(&37u32.to_be_bytes());
        expected.extend_from_slice(b"kluis-proto/v1 authorised key-request");
        expected.extend_from_slice(&32u32.to_be_bytes());
        expected.extend_from_slice(&[1; 32]);
        expected.extend_from_slice(&1u32.to_be_bytes());
        expected.push(1);
        expected.extend_from_slice(&1u32.to_be_bytes());
        expected.extend_from_slice(b"k");
        let direct: [u8; 48] = Sha384::digest(&expected).into();
        assert_eq!(request_hash(&a), direct);
    }

    #[test]
    fn info_layout() {
        let info = hpke_info(&[1u8; 48], &[2u8; 48]);
        assert_eq!(info.len(), 4 + HPKE_INFO_LABEL.len() + 4 + 48 + 4 + 48);
        assert_eq!(&info[..4], &36u32.to_be_bytes());
        assert_eq!(&info[4..40], HPKE_INFO_LABEL);
        assert_eq!(&info[40..44], &48u32.to_be_bytes());
        assert_eq!(&info[44..92], &[1u8; 48]);
        assert_eq!(&info[96..], &[2u8; 48]);
    }

    #[test]
    fn transcript_layout_and_exact_buffer() {
        let t = response_transcript(&[1; 48], &[2; 48], &[3; 97], &[4; 97], b"ct");
        assert_eq!(
            t.len(),
            4 + TRANSCRIPT_LABEL.len() + 4 + 6 + 4 + 48 + 4 + 48 + 4 + 97 + 4 + 97 + 4 + 2
        );
        assert_eq!(t.len(), t.capacity());
        assert!(t.ends_with(&[0, 0, 0, 2, b'c', b't']));
        let mut expected = Vec::new();
        for field in [
            TRANSCRIPT_LABEL,
            &HPKE_SUITE_ID[..],
            &[1; 48][..],
            &[2; 48][..],
            &[3; 97][..],
            &[4; 97][..],
            b"ct",
        ] {
            expected.extend_from_slice(&u32::try_from(field.len()).unwrap().to_be_bytes());
            expected.extend_from_slice(field);
        }
        assert_eq!(t, expected);
        // Pinned, so that any change to the encoding is a deliberate one.
        assert_eq!(
            crate::error::hex(&Sha384::digest(&t)),
            TRANSCRIPT_DIGEST_KNOWN_ANSWER
        );
    }

    /// SHA-384 of the transcript above, computed outside Rust from the
    /// documented layout.
    const TRANSCRIPT_DIGEST_KNOWN_ANSWER: &str = "\
        6d79b3d6b7c069fa395f142c21183b37a969ba6a92c7bc96\
        7c521bdfe7917a106306afec0690bf269ca420f43ca65d89";
}
