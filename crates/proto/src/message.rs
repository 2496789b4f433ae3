//! Messages: what travels inside frames, as CBOR through serde.
//!
//! Enums are externally tagged with snake_case names: `Request::Challenge` is
//! the CBOR text `"challenge"`, `Request::KeyRelease { .. }` is the map
//! `{"key_release": {"attestation_document": h'…', "request": {"operations":
//! [{"generate_data_key": {"key_id": "…"}}, …]}}}`. Byte fields are CBOR byte
//! strings. Decoding is strict and bounded: unknown fields and variants,
//! duplicate fields, trailing bytes and nesting deeper than [`MAX_DEPTH`] are
//! refused, and every list, byte and text string is bounded while it is being
//! decoded. A [`KeyRequest`] is validated as it is decoded, so a decoded
//! request is always within bounds.

use crate::authorisation::AuthorisationId;
use crate::bounded::{self, ser_bytes};
use crate::error::{MessageError, RequestError, WireError};
use crate::frame;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};

/// Length of a challenge nonce.
pub const NONCE_LEN: usize = 32;
/// Length of a SHA-384 hash (document hash, request hash).
pub const HASH_LEN: usize = 48;
/// Length of an uncompressed SEC1 P-384 public key (`0x04 || x || y`); also the
/// HPKE `enc` of DHKEM(P-384).
pub const P384_PUBLIC_KEY_LEN: usize = 97;
/// Length of a raw (`r || s`) P-384 ECDSA signature.
pub const SIGNATURE_LEN: usize = 96;
/// Most operations one key request may carry.
pub const MAX_OPERATIONS: usize = 64;
/// Longest key id (a CMK id such as `agency-a/app-x/prod`), in bytes.
pub const MAX_KEY_ID_LEN: usize = 255;
/// Longest secret-derivation label, in bytes.
pub const MAX_LABEL_LEN: usize = 255;
/// Longest wrapped data key, in bytes.
pub const MAX_WRAPPED_KEY_LEN: usize = 1024;
/// Longest attestation document accepted in a request, in bytes (the
/// attestation crate's own limit is the same).
pub const MAX_ATTESTATION_DOCUMENT_LEN: usize = 32 * 1024;
/// Longest sealed ciphertext (HPKE ciphertext with its 16-byte tag), in bytes.
/// A full request (64 operations with the longest fields) seals to about 87 KiB;
/// responses that large need a frame limit above the 64 KiB default.
pub const MAX_SEALED_CIPHERTEXT_LEN: usize = 128 * 1024;
/// Deepest CBOR nesting a message decoder accepts (valid messages nest 6 deep).
pub const MAX_DEPTH: usize = 16;

/// A request from the enclave to the verifier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum Request {
    /// Ask for a fresh nonce to put in the attestation document.
    Challenge,
    /// Ask for keys.
    KeyRelease {
        /// The COSE_Sign1 attestation document from the NSM: `public_key` is the
        /// enclave's ephemeral key, `nonce` the challenge, `user_data` the
        /// [`crate::request_hash`] of `request`.
        #[serde(
            serialize_with = "ser_bytes",
            deserialize_with = "bounded::bytes::<_, MAX_ATTESTATION_DOCUMENT_LEN>"
        )]
        attestation_document: Vec<u8>,
        /// What is asked for.
        request: KeyRequest,
    },
}

/// A response from the verifier to the enclave.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum Response {
    /// A nonce, single use, valid until `expires_at_ms`.
    Challenge {
        /// The nonce.
        #[serde(
            serialize_with = "ser_bytes",
            deserialize_with = "bounded::array::<_, NONCE_LEN>"
        )]
        nonce: [u8; NONCE_LEN],
        /// Expiry, in milliseconds since the Unix epoch (the verifier's clock).
        expires_at_ms: u64,
    },
    /// The keys, sealed to the enclave's ephemeral key and signed (boxed: it
    /// is ten times the size of the other variants).
    KeyRelease(Box<SealedKeys>),
    /// A refusal or failure, deliberately coarse.
    Error {
        /// What kind.
        code: ErrorCode,
    },
}

/// Why the verifier did not release keys. Coarse by design: the enclave (and
/// the parent relaying it) never learns which policy rule failed; the operator
/// reads that in the audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The request was malformed or inconsistent (bad frame, bad attestation,
    /// request hash mismatch, unknown or expired nonce).
    BadRequest,
    /// Policy refused.
    Denied,
    /// The verifier cannot serve now (overloaded, store locked); retry later.
    Unavailable,
    /// The verifier failed.
    Internal,
}

impl ErrorCode {
    /// The wire name (`bad_request`, `denied`, `unavailable`, `internal`).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Denied => "denied",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One thing an enclave asks for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum KeyOperation {
    /// A new data key under the current version of CMK `key_id`: released in
    /// plaintext (sealed) and wrapped (to store with the data).
    GenerateDataKey {
        /// The CMK id.
        #[serde(deserialize_with = "bounded::string::<_, MAX_KEY_ID_LEN>")]
        key_id: String,
    },
    /// The plaintext of a wrapped data key (the CMK id and version are named
    /// inside `wrapped`).
    DecryptDataKey {
        /// The wrapped data key, as stored with the data.
        #[serde(
            serialize_with = "ser_bytes",
            deserialize_with = "bounded::bytes::<_, MAX_WRAPPED_KEY_LEN>"
        )]
        wrapped: Vec<u8>,
    },
    /// A secret derived from CMK `key_id` for `label` (for example the
    /// pseudonymisation secret of an application).
    GenerateSecret {
        /// The CMK id.
        #[serde(deserialize_with = "bounded::string::<_, MAX_KEY_ID_LEN>")]
        key_id: String,
        /// What the secret is for; different labels give unrelated secrets.
        #[serde(deserialize_with = "bounded::string::<_, MAX_LABEL_LEN>")]
        label: String,
    },
}

impl KeyOperation {
    /// A stable name for logs: `generate_data_key`, `decrypt_data_key`,
    /// `generate_secret`.
    pub fn name(&self) -> &'static str {
        match self {
            KeyOperation::GenerateDataKey { .. } => "generate_data_key",
            KeyOperation::DecryptDataKey { .. } => "decrypt_data_key",
            KeyOperation::GenerateSecret { .. } => "generate_secret",
        }
    }
}

/// A validated list of operations: 1..=[`MAX_OPERATIONS`], key ids and labels
/// 1..=255 bytes without control characters, wrapped keys
/// 1..=[`MAX_WRAPPED_KEY_LEN`] bytes. Only [`KeyRequest::new`] and decoding
/// (which calls it) make one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "KeyRequestWire")]
pub struct KeyRequest {
    operations: Vec<KeyOperation>,
    /// The job authorisation the request is made under (absent on the wire
    /// when `None`, so a verifier of an older build still reads requests
    /// without one; one with it is refused by such a verifier as an unknown
    /// field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    authorisation: Option<AuthorisationId>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyRequestWire {
    #[serde(deserialize_with = "bounded::vec::<_, KeyOperation, MAX_OPERATIONS>")]
    operations: Vec<KeyOperation>,
    #[serde(default)]
    authorisation: Option<AuthorisationId>,
}

impl TryFrom<KeyRequestWire> for KeyRequest {
    type Error = RequestError;
    fn try_from(wire: KeyRequestWire) -> Result<Self, RequestError> {
        Ok(KeyRequest::new(wire.operations)?.with_authorisation(wire.authorisation))
    }
}

fn check_text(
    index: usize,
    field: &'static str,
    value: &str,
    max: usize,
) -> Result<(), RequestError> {
    if value.is_empty() || value.len() > max {
        return Err(RequestError::FieldLength {
            index,
            field,
            max,
            found: value.len(),
        });
    }
    if value.chars().any(char::is_control) {
        return Err(RequestError::ControlCharacter { index, field });
    }
    Ok(())
}

impl KeyRequest {
    /// Validate `operations` into a request.
    pub fn new(operations: Vec<KeyOperation>) -> Result<Self, RequestError> {
        if operations.is_empty() {
            return Err(RequestError::Empty);
        }
        if operations.len() > MAX_OPERATIONS {
            return Err(RequestError::TooManyOperations {
                found: operations.len(),
                limit: MAX_OPERATIONS,
            });
        }
        for (index, op) in operations.iter().enumerate() {
            match op {
                KeyOperation::GenerateDataKey { key_id } => {
                    check_text(index, "key_id", key_id, MAX_KEY_ID_LEN)?;
                }
                KeyOperation::DecryptDataKey { wrapped } => {
                    if wrapped.is_empty() || wrapped.len() > MAX_WRAPPED_KEY_LEN {
                        return Err(RequestError::FieldLength {
                            index,
                            field: "wrapped",
                            max: MAX_WRAPPED_KEY_LEN,
                            found: wrapped.len(),
                        });
                    }
                }
                KeyOperation::GenerateSecret { key_id, label } => {
                    check_text(index, "key_id", key_id, MAX_KEY_ID_LEN)?;
                    check_text(index, "label", label, MAX_LABEL_LEN)?;
                }
            }
        }
        Ok(KeyRequest {
            operations,
            authorisation: None,
        })
    }

    /// The same request, made under the job authorisation `id` (bound into
    /// [`crate::request_hash`]).
    pub fn with_authorisation(mut self, id: Option<AuthorisationId>) -> Self {
        self.authorisation = id;
        self
    }

    /// The job authorisation the request is made under, if any.
    pub fn authorisation(&self) -> Option<&AuthorisationId> {
        self.authorisation.as_ref()
    }

    /// The operations, in order. Released keys answer them in the same order.
    pub fn operations(&self) -> &[KeyOperation] {
        &self.operations
    }

    /// Give up the validation for the list.
    pub fn into_operations(self) -> Vec<KeyOperation> {
        self.operations
    }
}

/// Keys sealed to an enclave's ephemeral key and signed by the verifier.
///
/// Made by [`crate::seal_keys`], opened by [`crate::open_keys`]. The two hashes
/// are echoed so that the enclave can tell a response to another document or
/// request from a forgery; they are covered by the signature and bound into the
/// HPKE key schedule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealedKeys {
    /// SHA-384 of the attestation document the keys were released against.
    #[serde(
        serialize_with = "ser_bytes",
        deserialize_with = "bounded::array::<_, HASH_LEN>"
    )]
    pub document_sha384: [u8; HASH_LEN],
    /// [`crate::request_hash`] of the request they answer.
    #[serde(
        serialize_with = "ser_bytes",
        deserialize_with = "bounded::array::<_, HASH_LEN>"
    )]
    pub request_hash: [u8; HASH_LEN],
    /// HPKE encapsulated key (uncompressed SEC1 P-384 point).
    #[serde(
        serialize_with = "ser_bytes",
        deserialize_with = "bounded::array::<_, P384_PUBLIC_KEY_LEN>"
    )]
    pub enc: [u8; P384_PUBLIC_KEY_LEN],
    /// HPKE ciphertext of the released-keys payload, with its 16-byte tag.
    #[serde(
        serialize_with = "ser_bytes",
        deserialize_with = "bounded::bytes::<_, MAX_SEALED_CIPHERTEXT_LEN>"
    )]
    pub ciphertext: Vec<u8>,
    /// ECDSA P-384/SHA-384 signature (raw `r || s`) by the verifier identity
    /// key over the response transcript.
    #[serde(
        serialize_with = "ser_bytes",
        deserialize_with = "bounded::array::<_, SIGNATURE_LEN>"
    )]
    pub signature: [u8; SIGNATURE_LEN],
    /// When the answer is signed not by the identity itself but by a
    /// short-lived release key the identity certified (a verifier whose
    /// identity lives in an HSM): that certificate. Absent otherwise, and
    /// then not encoded at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delegation: Option<ReleaseDelegation>,
}

/// A release key certified by the verifier identity: the identity's
/// signature over `lp("kluis-proto/v1 release-key delegation") || public_key
/// || u64 not_after_ms` (big-endian). See [`crate::DelegatedKey`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseDelegation {
    /// The release key (uncompressed SEC1 P-384).
    #[serde(
        serialize_with = "ser_bytes",
        deserialize_with = "bounded::array::<_, P384_PUBLIC_KEY_LEN>"
    )]
    pub public_key: [u8; P384_PUBLIC_KEY_LEN],
    /// Unix milliseconds after which the enclave refuses answers it signed.
    pub not_after_ms: u64,
    /// The identity's signature (raw `r || s`).
    #[serde(
        serialize_with = "ser_bytes",
        deserialize_with = "bounded::array::<_, SIGNATURE_LEN>"
    )]
    pub signature: [u8; SIGNATURE_LEN],
}

/// A message that travels in a frame: [`Request`] or [`Response`].
pub trait Message: Serialize + DeserializeOwned + private::Sealed {
    /// Name used in error messages.
    const CONTEXT: &'static str;

    /// The CBOR encoding.
    fn encode(&self) -> Result<Vec<u8>, MessageError> {
        encode_cbor(self, Self::CONTEXT)
    }

    /// Decode exactly one message from `bytes`, strictly and within bounds.
    fn decode(bytes: &[u8]) -> Result<Self, MessageError> {
        decode_cbor(bytes, Self::CONTEXT)
    }
}

pub(crate) mod private {
    pub trait Sealed {}
    impl Sealed for super::Request {}
    impl Sealed for super::Response {}
}

impl Message for Request {
    const CONTEXT: &'static str = "request";
}

impl Message for Response {
    const CONTEXT: &'static str = "response";
}

pub(crate) fn encode_cbor<T: Serialize + ?Sized>(
    value: &T,
    context: &'static str,
) -> Result<Vec<u8>, MessageError> {
    let mut out = Vec::new();
    ciborium::ser::into_writer(value, &mut out).map_err(|e| MessageError::Encode {
        context,
        detail: e.to_string(),
    })?;
    Ok(out)
}

pub(crate) fn map_de_error<E: std::fmt::Debug>(
    e: ciborium::de::Error<E>,
    context: &'static str,
    limit: usize,
) -> MessageError {
    match e {
        ciborium::de::Error::RecursionLimitExceeded => MessageError::TooDeep { context, limit },
        ciborium::de::Error::Io(_) => MessageError::BadCbor {
            context,
            detail: "unexpected end of input".to_owned(),
        },
        ciborium::de::Error::Syntax(offset) => MessageError::BadCbor {
            context,
            detail: format!("syntax error at byte {offset}"),
        },
        ciborium::de::Error::Semantic(offset, msg) => MessageError::BadCbor {
            context,
            detail: match offset {
                Some(o) => format!("{msg} (at byte {o})"),
                None => msg,
            },
        },
    }
}

pub(crate) fn decode_cbor<T: DeserializeOwned>(
    bytes: &[u8],
    context: &'static str,
) -> Result<T, MessageError> {
    let mut reader = bytes;
    let value = ciborium::de::from_reader_with_recursion_limit(&mut reader, MAX_DEPTH)
        .map_err(|e| map_de_error(e, context, MAX_DEPTH))?;
    if !reader.is_empty() {
        return Err(MessageError::TrailingBytes {
            context,
            count: reader.len(),
        });
    }
    Ok(value)
}

/// Read one frame and decode the message in it.
pub async fn read_message<M: Message, R: AsyncRead + Unpin>(
    reader: &mut R,
    max_frame_len: usize,
) -> Result<M, WireError> {
    let bytes = frame::read_frame(reader, max_frame_len).await?;
    Ok(M::decode(&bytes)?)
}

/// Encode `message` and write it as one frame.
pub async fn write_message<M: Message, W: AsyncWrite + Unpin>(
    writer: &mut W,
    message: &M,
    max_frame_len: usize,
) -> Result<(), WireError> {
    let bytes = message.encode()?;
    frame::write_frame(writer, &bytes, max_frame_len).await?;
    Ok(())
}

/// [`read_message`] over a blocking `std::io::Read`.
pub fn read_message_sync<M: Message, R: std::io::Read>(
    reader: &mut R,
    max_frame_len: usize,
) -> Result<M, WireError> {
    let bytes = frame::read_frame_sync(reader, max_frame_len)?;
    Ok(M::decode(&bytes)?)
}

/// [`write_message`] over a blocking `std::io::Write`.
pub fn write_message_sync<M: Message, W: std::io::Write>(
    writer: &mut W,
    message: &M,
    max_frame_len: usize,
) -> Result<(), WireError> {
    let bytes = message.encode()?;
    frame::write_frame_sync(writer, &bytes, max_frame_len)?;
    Ok(())
}
