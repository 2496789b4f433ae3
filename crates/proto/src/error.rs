//! Errors, one enum per stage: framing, message decoding, request validation,
//! identity keys, sealing (verifier side), opening (enclave side), and the
//! client exchange that strings them together.
//!
//! Every error says what was expected and what was found. None carries key
//! material or plaintext: the only bytes ever rendered are public hashes.

use thiserror::Error;

/// Lower-case hex of public bytes (hashes), for messages.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len().saturating_mul(2));
    for b in bytes {
        for nibble in [b >> 4, b & 0x0f] {
            if let Some(&d) = DIGITS.get(usize::from(nibble)) {
                out.push(char::from(d));
            }
        }
    }
    out
}

/// Which part of a frame was being read when the stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FramePart {
    /// The 4-byte big-endian length prefix.
    LengthPrefix,
    /// The version and kind bytes and the body the prefix announced.
    Body,
}

impl std::fmt::Display for FramePart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FramePart::LengthPrefix => "length prefix",
            FramePart::Body => "body",
        })
    }
}

/// A failure to read or write one frame.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The stream ended cleanly at a frame boundary (the peer closed).
    #[error("connection closed before a frame began")]
    Closed,
    /// The stream ended inside a frame.
    #[error("frame truncated: expected {expected} byte(s) of {part}, stream ended after {found}")]
    Truncated {
        /// What was being read.
        part: FramePart,
        /// Bytes the frame needed.
        expected: usize,
        /// Bytes that arrived.
        found: usize,
    },
    /// The length prefix (or a frame to be written) exceeds the endpoint's limit.
    /// Checked before anything is allocated.
    #[error("frame of {found} byte(s) exceeds the maximum of {max}")]
    TooLarge {
        /// The announced (or requested) frame length.
        found: u64,
        /// The endpoint's limit.
        max: usize,
    },
    /// A length prefix below 2: not even the version and kind bytes.
    #[error("frame length is {found}; expected at least 2 bytes (protocol version and kind)")]
    Empty {
        /// The announced length.
        found: usize,
    },
    /// The version byte is not one this implementation speaks (a peer of
    /// another release: upgrade both sides together).
    #[error("unsupported protocol version {found}; this side speaks version {expected} (upgrade the enclave, the parent and the verifier together)")]
    BadVersion {
        /// The version supported.
        expected: u8,
        /// The version found.
        found: u8,
    },
    /// The kind byte names no frame kind.
    #[error("unknown frame kind {found}")]
    BadKind {
        /// The kind found.
        found: u8,
    },
    /// A frame of a kind this stream does not carry here (raw data on the
    /// key-release link, say).
    #[error("a {found} frame where a {expected} frame was expected")]
    UnexpectedKind {
        /// The kind expected.
        expected: crate::frame::FrameKind,
        /// The kind found.
        found: crate::frame::FrameKind,
    },
    /// The underlying stream failed.
    #[error("I/O error on the frame stream: {0}")]
    Io(#[from] std::io::Error),
}

/// A failure to encode or decode a CBOR message (inside a frame, or the
/// released-keys payload inside the HPKE box).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum MessageError {
    /// Not CBOR, or CBOR of the wrong shape, or a bound exceeded while decoding.
    #[error("{context}: bad CBOR ({detail})")]
    BadCbor {
        /// Which message was being decoded.
        context: &'static str,
        /// What the decoder reported.
        detail: String,
    },
    /// A complete CBOR item followed by more bytes.
    #[error("{context}: {count} trailing byte(s) after the CBOR item")]
    TrailingBytes {
        /// Which message was being decoded.
        context: &'static str,
        /// How many bytes followed.
        count: usize,
    },
    /// Nesting deeper than any valid message.
    #[error("{context}: CBOR nested deeper than {limit} levels")]
    TooDeep {
        /// Which message was being decoded.
        context: &'static str,
        /// The limit.
        limit: usize,
    },
    /// Encoding failed (a bug or an out-of-memory condition, never input).
    #[error("{context}: could not encode CBOR ({detail})")]
    Encode {
        /// Which message was being encoded.
        context: &'static str,
        /// What the encoder reported.
        detail: String,
    },
}

/// A frame or message failure while exchanging messages.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum WireError {
    /// Framing failed.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The frame held no valid message.
    #[error(transparent)]
    Message(#[from] MessageError),
}

/// A key request outside the protocol's bounds.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum RequestError {
    /// No operations.
    #[error("a key request needs at least one operation, found none")]
    Empty,
    /// More operations than the limit.
    #[error("a key request holds at most {limit} operations, found {found}")]
    TooManyOperations {
        /// Operations found.
        found: usize,
        /// The limit.
        limit: usize,
    },
    /// A text field (key id, label) with a bad length.
    #[error("operation {index}: `{field}` must be 1..={max} bytes, found {found}")]
    FieldLength {
        /// Index of the operation.
        index: usize,
        /// The field.
        field: &'static str,
        /// Maximum length.
        max: usize,
        /// Length found.
        found: usize,
    },
    /// A text field holding a control character.
    #[error("operation {index}: `{field}` must not contain control characters")]
    ControlCharacter {
        /// Index of the operation.
        index: usize,
        /// The field.
        field: &'static str,
    },
}

/// A failure of the verifier identity key.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The operating system's random source failed.
    #[error("the system random source failed")]
    Randomness,
    /// The PKCS#8 document is not a P-384 private key.
    #[error("not a PKCS#8 EC P-384 private key ({detail})")]
    Pkcs8Decode {
        /// What the decoder reported (never key bytes).
        detail: String,
    },
    /// Encoding the key as PKCS#8 failed.
    #[error("could not encode the key as PKCS#8 ({detail})")]
    Pkcs8Encode {
        /// What the encoder reported.
        detail: String,
    },
    /// Signing failed.
    #[error("ECDSA P-384 signing failed")]
    Sign,
    /// An external signer failed (an HSM: a lost session, a missing key).
    #[error("the external signer failed: {detail}")]
    External {
        /// What the signer reported (never key material or a PIN).
        detail: String,
    },
    /// An external signer's signature does not verify under the public key
    /// it was paired with.
    #[error("the external signer does not hold the private key of the given public key")]
    Mismatch,
    /// The private key is held by an external signer and cannot be exported.
    #[error("the identity key is held by an external signer and cannot be exported")]
    NotExportable,
}

/// A failure to make an enclave ephemeral key pair.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum EphemeralKeyError {
    /// The operating system's random source failed.
    #[error("the system random source failed")]
    Randomness,
}

/// A failure to seal keys (verifier side).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum SealError {
    /// The recipient key is not an uncompressed SEC1 P-384 point on the curve.
    #[error("recipient public key must be an uncompressed SEC1 P-384 point ({expected} bytes, 0x04 prefix, on the curve), found {found} byte(s)")]
    RecipientKey {
        /// 97.
        expected: usize,
        /// Length found.
        found: usize,
    },
    /// No keys, or more than a request can ask for.
    #[error("a response releases 1..={limit} keys, found {found}")]
    KeyCount {
        /// Keys given.
        found: usize,
        /// The limit.
        limit: usize,
    },
    /// A released key has a field out of bounds.
    #[error("released key {index}: `{field}` must be {min}..={max} bytes, found {found}")]
    KeyField {
        /// Index of the key.
        index: usize,
        /// The field.
        field: &'static str,
        /// Minimum length.
        min: usize,
        /// Maximum length.
        max: usize,
        /// Length found.
        found: usize,
    },
    /// The encoded payload exceeds the ciphertext limit.
    #[error("released-keys payload of {found} bytes exceeds the limit of {max}")]
    PayloadTooLarge {
        /// Payload length.
        found: usize,
        /// The limit.
        max: usize,
    },
    /// The operating system's random source failed.
    #[error("the system random source failed")]
    Randomness,
    /// Encoding the payload failed.
    #[error(transparent)]
    Encode(#[from] MessageError),
    /// The HPKE library refused (a bug, never input).
    #[error("HPKE sealing failed: {detail}")]
    Hpke {
        /// What the library reported.
        detail: String,
    },
    /// Signing the transcript failed.
    #[error(transparent)]
    Sign(#[from] IdentityError),
}

/// A failure to open sealed keys (enclave side).
///
/// Checked in this order: structure, pinned key, signature, bindings, HPKE,
/// payload. Nothing is decrypted unless the signature verified.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum OpenError {
    /// A field of the sealed box has an impossible length.
    #[error("sealed keys malformed: `{field}` must be {min}..={max} bytes, found {found}")]
    Malformed {
        /// The field.
        field: &'static str,
        /// Minimum length.
        min: usize,
        /// Maximum length.
        max: usize,
        /// Length found.
        found: usize,
    },
    /// The pinned verifier key is not a valid P-384 SEC1 public key (a build or
    /// configuration error, not the peer's fault).
    #[error("the pinned verifier public key is not a valid SEC1 P-384 point")]
    PinnedKey,
    /// The signature does not verify under the pinned verifier key over this
    /// enclave's public key and the received fields: the response was not made
    /// by the pinned verifier for this session, or was altered on the way.
    #[error("response signature does not verify under the pinned verifier key")]
    BadSignature,
    /// The answer is signed by a release key whose certificate does not
    /// verify under the pinned verifier key.
    #[error("the release key's delegation does not verify under the pinned verifier key")]
    BadDelegation,
    /// The answer is signed by a release key past its validity (by this
    /// enclave's clock, with [`crate::DELEGATION_CLOCK_SKEW_MS`] of slack).
    #[error(
        "the release key expired at {not_after_ms} (Unix ms); the enclave's clock says {now_ms}"
    )]
    DelegationExpired {
        /// The key's end of validity.
        not_after_ms: u64,
        /// The enclave's time.
        now_ms: u64,
    },
    /// A validly signed response for another attestation document (a replay,
    /// or a response to an earlier attempt).
    #[error("response is for attestation document {found}, expected {expected} (SHA-384)")]
    DocumentMismatch {
        /// Hex SHA-384 of the document this enclave sent.
        expected: String,
        /// Hex SHA-384 the response names.
        found: String,
    },
    /// A validly signed response for another key request.
    #[error("response is for key request {found}, expected {expected} (request hash)")]
    RequestMismatch {
        /// Hex request hash of this enclave's request.
        expected: String,
        /// Hex request hash the response names.
        found: String,
    },
    /// The signature verified but the HPKE box does not open with this
    /// enclave's key and bindings.
    #[error("sealed keys do not decrypt with this enclave's ephemeral key and bindings")]
    Decrypt,
    /// The decrypted payload is not a valid released-keys list.
    #[error("released-keys payload malformed: {detail}")]
    Payload {
        /// What was wrong (never key bytes).
        detail: String,
    },
    /// The decrypted payload has a version this implementation does not read.
    #[error("released-keys payload version {found} is not supported; expected {expected}")]
    PayloadVersion {
        /// The version supported.
        expected: u64,
        /// The version found.
        found: u64,
    },
    /// The released keys do not answer the request operation by operation.
    #[error("released keys do not match the request: {detail}")]
    ResponseMismatch {
        /// Which key differs and how (ids and lengths only).
        detail: String,
    },
}

/// A failure of a client exchange with the verifier (through the parent).
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ClientError {
    /// Sending or receiving failed.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The verifier refused, with a coarse code.
    #[error("the verifier refused: {0}")]
    Refused(crate::message::ErrorCode),
    /// The verifier answered with a response of the wrong kind.
    #[error("expected a {expected} response, found {found}")]
    UnexpectedResponse {
        /// The kind expected.
        expected: &'static str,
        /// The kind found.
        found: &'static str,
    },
    /// The sealed keys did not open.
    #[error(transparent)]
    Open(#[from] OpenError),
}
