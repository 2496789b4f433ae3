//! The enclave's side of the key-release exchange over one stream (vsock to
//! the parent in production, which relays to the verifier).
//!
//! ```text
//! let challenge = request_challenge(&mut stream, max).await?;
//! let ephemeral = EphemeralKeyPair::generate()?;
//! let request = KeyRequest::new(ops)?;
//! let document = nsm.attest(public_key = ephemeral.public_key_sec1(),
//!                           nonce = challenge.nonce,
//!                           user_data = request_hash(&request));
//! let keys = request_keys(&mut stream, max, &document, &request, &ephemeral, PINNED).await?;
//! ```

use crate::error::ClientError;
use crate::keys::ReleasedKey;
use crate::message::{read_message, write_message, KeyRequest, Request, Response, NONCE_LEN};
use crate::seal::{open_keys_for_request, EphemeralKeyPair};
use sha2::{Digest, Sha384};
use tokio::io::{AsyncRead, AsyncWrite};

/// A challenge from the verifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Challenge {
    /// The nonce to put in the attestation document.
    pub nonce: [u8; NONCE_LEN],
    /// When the verifier stops accepting it (ms since the Unix epoch, the
    /// verifier's clock; informational inside the enclave).
    pub expires_at_ms: u64,
}

fn kind(response: &Response) -> &'static str {
    match response {
        Response::Challenge { .. } => "challenge",
        Response::KeyRelease(_) => "key_release",
        Response::Error { .. } => "error",
    }
}

/// Ask for a challenge.
pub async fn request_challenge<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    max_frame_len: usize,
) -> Result<Challenge, ClientError> {
    write_message(stream, &Request::Challenge, max_frame_len).await?;
    match read_message::<Response, _>(stream, max_frame_len).await? {
        Response::Challenge {
            nonce,
            expires_at_ms,
        } => Ok(Challenge {
            nonce,
            expires_at_ms,
        }),
        Response::Error { code } => Err(ClientError::Refused(code)),
        other => Err(ClientError::UnexpectedResponse {
            expected: "challenge",
            found: kind(&other),
        }),
    }
}

/// Send `attestation_document` with `request`, and open the answer: the
/// signature is checked against `pinned_verifier_public_key_sec1` (from the
/// enclave image) before anything is decrypted, the response must name
/// SHA-384 of exactly the document sent and the hash of `request`, and the
/// keys must answer the request operation by operation.
pub async fn request_keys<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    max_frame_len: usize,
    attestation_document: &[u8],
    request: &KeyRequest,
    ephemeral: &EphemeralKeyPair,
    pinned_verifier_public_key_sec1: &[u8],
) -> Result<Vec<ReleasedKey>, ClientError> {
    let document_sha384: [u8; 48] = Sha384::digest(attestation_document).into();
    let message = Request::KeyRelease {
        attestation_document: attestation_document.to_vec(),
        request: request.clone(),
    };
    write_message(stream, &message, max_frame_len).await?;
    match read_message::<Response, _>(stream, max_frame_len).await? {
        Response::KeyRelease(sealed) => Ok(open_keys_for_request(
            &sealed,
            ephemeral,
            pinned_verifier_public_key_sec1,
            &document_sha384,
            request,
        )?),
        Response::Error { code } => Err(ClientError::Refused(code)),
        other => Err(ClientError::UnexpectedResponse {
            expected: "key_release",
            found: kind(&other),
        }),
    }
}
