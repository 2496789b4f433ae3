//! Released keys and the payload that carries them inside the HPKE box.
//!
//! ```text
//! payload = CBOR [ version: uint (= 1),
//!                  [ { "key_id": tstr, "version": uint, "wrapped": bstr,
//!                      "plaintext": bstr .size 32 }, … ] ]
//! ```
//!
//! The payload is encoded into a buffer sized exactly beforehand (so it never
//! reallocates and leaves copies behind) and zeroized after sealing; it is
//! decoded from a zeroizing buffer with a zeroizing scratch buffer.

use crate::bounded::{self, ser_bytes};
use crate::error::MessageError;
use crate::message::{
    map_de_error, KeyOperation, KeyRequest, MAX_KEY_ID_LEN, MAX_OPERATIONS, MAX_WRAPPED_KEY_LEN,
};
use serde::de::{self, Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde::ser::{SerializeTuple, Serializer};
use serde::{Deserialize, Serialize};
use std::fmt;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// Length of a released plaintext key or secret.
pub const PLAINTEXT_KEY_LEN: usize = 32;

/// Version of the released-keys payload inside the HPKE box.
pub const PAYLOAD_VERSION: u64 = 1;

/// A 32-byte secret (an AES-256 data key or a derived secret), zeroized on drop
/// and never shown by `Debug`.
///
/// Boxed, so that moving it moves a pointer and leaves no copy of the key on
/// the stack. Deliberately not `Clone`: every copy is an explicit
/// [`PlaintextKey::from_bytes`].
pub struct PlaintextKey(Box<[u8; PLAINTEXT_KEY_LEN]>);

impl PlaintextKey {
    /// Copy `bytes` into a new key. The caller zeroizes its own copy.
    pub fn from_bytes(bytes: &[u8; PLAINTEXT_KEY_LEN]) -> Self {
        let mut key = Box::new([0u8; PLAINTEXT_KEY_LEN]);
        key.copy_from_slice(bytes);
        PlaintextKey(key)
    }

    /// Copy `bytes` into a new key if it is exactly 32 bytes long.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != PLAINTEXT_KEY_LEN {
            return None;
        }
        let mut key = Box::new([0u8; PLAINTEXT_KEY_LEN]);
        key.copy_from_slice(bytes);
        Some(PlaintextKey(key))
    }

    /// The key bytes. Use them in place; do not copy them into unprotected
    /// memory.
    pub fn expose_secret(&self) -> &[u8; PLAINTEXT_KEY_LEN] {
        &self.0
    }
}

impl Drop for PlaintextKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl ZeroizeOnDrop for PlaintextKey {}

impl fmt::Debug for PlaintextKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PlaintextKey(<redacted>)")
    }
}

impl Serialize for PlaintextKey {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0[..])
    }
}

impl<'de> Deserialize<'de> for PlaintextKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = PlaintextKey;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a byte string of exactly {PLAINTEXT_KEY_LEN} bytes")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<PlaintextKey, E> {
                PlaintextKey::from_slice(v).ok_or_else(|| E::invalid_length(v.len(), &self))
            }
        }
        // `deserialize_bytes`: ciborium hands the bytes over from its scratch
        // buffer (ours, zeroizing) without an intermediate `Vec`.
        deserializer.deserialize_bytes(KeyVisitor)
    }
}

/// One released key, answering one [`KeyOperation`] of the request (in order).
///
/// - `generate_data_key`: `key_id`/`version` name the CMK version the new data
///   key is wrapped under, `wrapped` is that wrapped key (store it with the
///   data), `plaintext` the data key.
/// - `decrypt_data_key`: `wrapped` is the input, echoed; `key_id`/`version`
///   the CMK version it named; `plaintext` the data key.
/// - `generate_secret`: `key_id`/`version` the CMK version it was derived
///   from, `wrapped` empty, `plaintext` the secret.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleasedKey {
    /// The CMK id.
    #[serde(deserialize_with = "bounded::string::<_, MAX_KEY_ID_LEN>")]
    pub key_id: String,
    /// The CMK version.
    pub version: u32,
    /// The wrapped data key (empty for a derived secret).
    #[serde(
        serialize_with = "ser_bytes",
        deserialize_with = "bounded::bytes::<_, MAX_WRAPPED_KEY_LEN>"
    )]
    pub wrapped: Vec<u8>,
    /// The key itself.
    pub plaintext: PlaintextKey,
}

impl ReleasedKey {
    /// Bounds check: key id 1..=255 bytes, wrapped key 0..=1024 bytes.
    /// Returns the offending field, its bounds and its length.
    pub(crate) fn check_bounds(&self) -> Result<(), (&'static str, usize, usize, usize)> {
        if self.key_id.is_empty() || self.key_id.len() > MAX_KEY_ID_LEN {
            return Err(("key_id", 1, MAX_KEY_ID_LEN, self.key_id.len()));
        }
        if self.wrapped.len() > MAX_WRAPPED_KEY_LEN {
            return Err(("wrapped", 0, MAX_WRAPPED_KEY_LEN, self.wrapped.len()));
        }
        Ok(())
    }
}

/// Released keys that do not answer a request operation by operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{detail}")]
pub struct ResponseMismatch {
    /// Which key differs and how (ids and lengths only, never key bytes).
    pub detail: String,
}

/// Check that `keys` answer `request` in order: as many keys as operations;
/// `generate_data_key` → same key id and a non-empty wrapped key;
/// `decrypt_data_key` → the same wrapped key echoed; `generate_secret` → same
/// key id and no wrapped key. The verifier checks this before sealing; the
/// enclave after opening ([`crate::open_keys_for_request`]).
pub fn check_released_keys(
    request: &KeyRequest,
    keys: &[ReleasedKey],
) -> Result<(), ResponseMismatch> {
    let ops = request.operations();
    if ops.len() != keys.len() {
        return Err(ResponseMismatch {
            detail: format!(
                "{} operation(s) requested, {} key(s) released",
                ops.len(),
                keys.len()
            ),
        });
    }
    for (index, (op, key)) in ops.iter().zip(keys).enumerate() {
        let problem = match op {
            KeyOperation::GenerateDataKey { key_id } if &key.key_id != key_id => Some(format!(
                "key id {:?} released for requested {:?}",
                key.key_id, key_id
            )),
            KeyOperation::GenerateDataKey { .. } if key.wrapped.is_empty() => {
                Some("a generated data key without its wrapped form".to_owned())
            }
            KeyOperation::DecryptDataKey { wrapped } if &key.wrapped != wrapped => Some(format!(
                "wrapped key of {} byte(s) released for the requested {} byte(s), or different bytes",
                key.wrapped.len(),
                wrapped.len()
            )),
            KeyOperation::GenerateSecret { key_id, .. } if &key.key_id != key_id => Some(format!(
                "key id {:?} released for requested {:?}",
                key.key_id, key_id
            )),
            KeyOperation::GenerateSecret { .. } if !key.wrapped.is_empty() => {
                Some("a derived secret with a wrapped key".to_owned())
            }
            _ => None,
        };
        if let Some(problem) = problem {
            return Err(ResponseMismatch {
                detail: format!("operation {index} ({}): {problem}", op.name()),
            });
        }
    }
    Ok(())
}

/// The payload as it is encoded: `[PAYLOAD_VERSION, keys]`.
struct PayloadRef<'a>(&'a [ReleasedKey]);

impl Serialize for PayloadRef<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut t = serializer.serialize_tuple(2)?;
        t.serialize_element(&PAYLOAD_VERSION)?;
        t.serialize_element(self.0)?;
        t.end()
    }
}

/// Counts bytes, to size the payload buffer exactly before encoding.
struct CountingWriter(usize);

impl std::io::Write for CountingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 = self.0.saturating_add(buf.len());
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const PAYLOAD_CONTEXT: &str = "released-keys payload";

/// Encode the payload into a zeroizing buffer whose capacity is exactly its
/// length (it never grows, so no stale copy is left in freed memory).
pub(crate) fn encode_payload(keys: &[ReleasedKey]) -> Result<Zeroizing<Vec<u8>>, MessageError> {
    let encode_error = |e: ciborium::ser::Error<std::io::Error>| MessageError::Encode {
        context: PAYLOAD_CONTEXT,
        detail: e.to_string(),
    };
    let mut counter = CountingWriter(0);
    ciborium::ser::into_writer(&PayloadRef(keys), &mut counter).map_err(encode_error)?;
    let mut out = Zeroizing::new(Vec::with_capacity(counter.0));
    ciborium::ser::into_writer(&PayloadRef(keys), &mut *out).map_err(encode_error)?;
    Ok(out)
}

/// A decoded payload: the keys, or the version that could not be read.
pub(crate) enum DecodedPayload {
    V1(Vec<ReleasedKey>),
    Unsupported(u64),
}

impl<'de> Deserialize<'de> for DecodedPayload {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyList(Vec<ReleasedKey>);
        impl<'de> Deserialize<'de> for KeyList {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                bounded::vec::<_, ReleasedKey, MAX_OPERATIONS>(d).map(KeyList)
            }
        }

        struct PayloadVisitor;
        impl<'de> Visitor<'de> for PayloadVisitor {
            type Value = DecodedPayload;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an array [version, keys]")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<DecodedPayload, A::Error> {
                let version: u64 = seq
                    .next_element()?
                    .ok_or_else(|| de::Error::invalid_length(0, &self))?;
                if version != PAYLOAD_VERSION {
                    while seq.next_element::<IgnoredAny>()?.is_some() {}
                    return Ok(DecodedPayload::Unsupported(version));
                }
                let keys: KeyList = seq
                    .next_element()?
                    .ok_or_else(|| de::Error::invalid_length(1, &self))?;
                if seq.next_element::<IgnoredAny>()?.is_some() {
                    return Err(de::Error::invalid_length(3, &self));
                }
                Ok(DecodedPayload::V1(keys.0))
            }
        }
        deserializer.deserialize_seq(PayloadVisitor)
    }
}

/// Scratch space for decoding the payload; holds key bytes transiently.
const PAYLOAD_SCRATCH_LEN: usize = 4096;

/// Decode a payload strictly (no trailing bytes), with a zeroizing scratch
/// buffer. Only ever called on bytes that authenticated.
pub(crate) fn decode_payload(bytes: &[u8]) -> Result<DecodedPayload, MessageError> {
    let mut scratch = Zeroizing::new(vec![0u8; PAYLOAD_SCRATCH_LEN]);
    let mut reader = bytes;
    let decoded: DecodedPayload =
        ciborium::de::from_reader_with_buffer(&mut reader, &mut scratch[..])
            .map_err(|e| map_de_error(e, PAYLOAD_CONTEXT, 256))?;
    if !reader.is_empty() {
        return Err(MessageError::TrailingBytes {
            context: PAYLOAD_CONTEXT,
            count: reader.len(),
        });
    }
    Ok(decoded)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic, clippy::indexing_slicing)]
    use super::*;

    fn key(id: &str, b: u8) -> ReleasedKey {
        ReleasedKey {
            key_id: id.into(),
            version: 3,
            wrapped: vec![b; 5],
            plaintext: PlaintextKey::from_bytes(&[b; 32]),
        }
    }

    #[test]
    fn debug_never_shows_key_bytes() {
        let k = ReleasedKey {
            wrapped: vec![1; 5],
            ..key("a", 0x5a)
        };
        let s = format!("{k:?} {:?}", k.plaintext);
        assert!(s.contains("<redacted>"));
        assert!(!s.contains("90"), "{s}"); // 0x5a = 90
    }

    #[test]
    fn payload_round_trip_and_exact_capacity() {
        let keys = vec![key("a", 1), key("bb", 2)];
        let bytes = encode_payload(&keys).unwrap();
        assert_eq!(bytes.len(), bytes.capacity());
        assert_eq!(bytes[0], 0x82); // array(2)
        assert_eq!(bytes[1], 0x01); // version 1
        let DecodedPayload::V1(back) = decode_payload(&bytes).unwrap() else {
            panic!("version")
        };
        assert_eq!(back.len(), 2);
        assert_eq!(back[1].key_id, "bb");
        assert_eq!(back[1].version, 3);
        assert_eq!(back[1].wrapped, vec![2; 5]);
        assert_eq!(back[1].plaintext.expose_secret(), &[2; 32]);
    }

    #[test]
    fn payload_other_version_is_reported() {
        let bytes = encode_cbor_value(&(2u64, "whatever", 7u8));
        assert!(matches!(
            decode_payload(&bytes),
            Ok(DecodedPayload::Unsupported(2))
        ));
    }

    #[test]
    fn payload_trailing_and_extra_elements_refused() {
        let mut bytes = encode_payload(&[key("a", 1)]).unwrap().to_vec();
        bytes.push(0);
        assert!(matches!(
            decode_payload(&bytes),
            Err(MessageError::TrailingBytes { count: 1, .. })
        ));
        let mut bytes = encode_payload(&[key("a", 1)]).unwrap().to_vec();
        bytes[0] = 0x83; // claim three elements
        bytes.push(0);
        assert!(matches!(
            decode_payload(&bytes),
            Err(MessageError::BadCbor { .. })
        ));
    }

    #[test]
    fn payload_wrong_key_length_refused() {
        #[derive(Serialize)]
        struct Bad {
            key_id: &'static str,
            version: u32,
            #[serde(serialize_with = "ser_bytes")]
            wrapped: Vec<u8>,
            #[serde(serialize_with = "ser_bytes")]
            plaintext: Vec<u8>,
        }
        for n in [0usize, 31, 33] {
            let bytes = encode_cbor_value(&(
                1u64,
                vec![Bad {
                    key_id: "a",
                    version: 1,
                    wrapped: vec![],
                    plaintext: vec![0; n],
                }],
            ));
            assert!(
                matches!(decode_payload(&bytes), Err(MessageError::BadCbor { .. })),
                "{n}"
            );
        }
    }

    #[test]
    fn payload_too_many_keys_refused() {
        let keys: Vec<_> = (0..=MAX_OPERATIONS).map(|_| key("a", 1)).collect();
        let bytes = encode_payload(&keys).unwrap();
        assert!(matches!(
            decode_payload(&bytes),
            Err(MessageError::BadCbor { .. })
        ));
    }

    fn encode_cbor_value<T: Serialize>(v: &T) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::ser::into_writer(v, &mut out).unwrap();
        out
    }

    #[test]
    fn released_keys_must_answer_the_request() {
        let request = KeyRequest::new(vec![
            KeyOperation::GenerateDataKey { key_id: "a".into() },
            KeyOperation::DecryptDataKey {
                wrapped: vec![2; 5],
            },
            KeyOperation::GenerateSecret {
                key_id: "c".into(),
                label: "l".into(),
            },
        ])
        .unwrap();
        let good = || {
            vec![
                key("a", 1),
                key("b", 2),
                ReleasedKey {
                    wrapped: vec![],
                    ..key("c", 3)
                },
            ]
        };
        check_released_keys(&request, &good()).unwrap();

        let mut k = good();
        k.pop();
        assert!(check_released_keys(&request, &k).is_err());
        let mut k = good();
        k[0].key_id = "other".into();
        assert!(check_released_keys(&request, &k).is_err());
        let mut k = good();
        k[0].wrapped.clear();
        assert!(check_released_keys(&request, &k).is_err());
        let mut k = good();
        k[1].wrapped[0] ^= 1;
        assert!(check_released_keys(&request, &k).is_err());
        let mut k = good();
        k[2].wrapped.push(1);
        assert!(check_released_keys(&request, &k).is_err());
        let mut k = good();
        k.swap(0, 1);
        let e = check_released_keys(&request, &k).unwrap_err();
        assert!(
            e.detail.starts_with("operation 0 (generate_data_key)"),
            "{e}"
        );
    }
}
