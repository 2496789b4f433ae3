//! Kluis wire protocol: frames, key-release messages, HPKE sealing and response
//! signatures.
//!
//! This crate is what the enclave and the attestation verifier share. The
//! parent relays its frames and sees nothing it can use: requests carry an
//! attestation document and key ids, responses carry keys only sealed to the
//! enclave's ephemeral key and signed by the verifier.
//!
//! # Key release
//!
//! 1. The enclave sends [`Request::Challenge`]; the verifier answers
//!    [`Response::Challenge`] with a single-use nonce.
//! 2. The enclave makes an [`EphemeralKeyPair`], builds a [`KeyRequest`], and
//!    asks the NSM for an attestation document with `public_key` =
//!    [`EphemeralKeyPair::public_key_sec1`], `nonce` = the challenge and
//!    `user_data` = [`request_hash`]. It sends [`Request::KeyRelease`].
//! 3. The verifier verifies the document (`kluis-attestation`), the nonce,
//!    `user_data == request_hash(request)` and the policy, audits, and answers
//!    [`Response::KeyRelease`] with [`seal_keys`]: HPKE base mode,
//!    DHKEM(P-384, HKDF-SHA384) / HKDF-SHA384 / AES-256-GCM to the document's
//!    public key, `info` binding the document hash and the request hash, then
//!    an ECDSA P-384 signature by its [`VerifierIdentity`] over a transcript of
//!    everything the enclave relies on.
//! 4. The enclave runs [`open_keys_for_request`]: the signature is checked
//!    against the verifier key pinned in its image *before* anything is
//!    decrypted, so a parent that impersonates the verifier cannot hand the
//!    enclave a key it knows.
//!
//! [`client`] does steps 1, 2 (the I/O) and 4 over a tokio stream.
//!
//! # Encodings
//!
//! - Frames: [`frame`] (`u32-be length || version || CBOR`, 64 KiB default limit).
//! - Messages: [`message`] (serde/CBOR, strict, bounded while decoding).
//! - Request hash, HPKE `info` and the signed transcript: [`binding`].
//! - Released-keys payload inside the HPKE box: [`keys`] (versioned CBOR).
//!
//! # Secrets
//!
//! Released keys are [`PlaintextKey`]s: boxed, zeroized on drop, redacted in
//! `Debug`, never in errors. The ephemeral private key and the verifier
//! identity key are AWS-LC keys, cleansed when freed and redacted; the former
//! cannot be exported at all, the latter only as zeroizing PKCS#8.
//!
//! # Crypto
//!
//! All P-384 arithmetic (ECDH, ECDSA) and the AEAD are AWS-LC's, through
//! `aws-lc-rs`. HPKE is a small hand-written module for the one suite the
//! protocol uses, tested for interoperability with the `hpke` crate.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod authorisation;
pub mod binding;
mod bounded;
pub mod client;
mod delegation;
mod error;
pub mod frame;
mod hpke_p384;
mod identity;
pub mod job;
mod job_spec;
pub mod keys;
pub mod message;
pub mod report;
mod seal;

#[cfg(test)]
mod tests;

pub use authorisation::{
    AuthorisationError, AuthorisationId, JobAuthorisation, SignedAuthorisation,
};
pub use binding::{hpke_info, request_hash, response_transcript};
pub use delegation::{delegation_message, DelegatedKey, DELEGATION_CLOCK_SKEW_MS};
pub use error::{
    ClientError, EphemeralKeyError, FrameError, FramePart, IdentityError, MessageError, OpenError,
    RequestError, SealError, WireError,
};
pub use frame::{
    read_frame, read_frame_sync, read_raw_frame, read_raw_frame_into, read_raw_frame_sync,
    write_frame, write_frame_sync, FrameKind, DEFAULT_MAX_FRAME_LEN, PROTOCOL_VERSION,
};
pub use identity::{IdentitySigner, VerifierIdentity, SHA384_LEN};
pub use keys::{check_released_keys, PlaintextKey, ReleasedKey, ResponseMismatch, PAYLOAD_VERSION};
pub use message::{
    read_message, read_message_sync, write_message, write_message_sync, ErrorCode, KeyOperation,
    KeyRequest, Message, ReleaseDelegation, Request, Response, SealedKeys,
};
pub use seal::{
    open_keys, open_keys_for_request, seal_keys, seal_keys_delegated, EphemeralKeyPair,
};
