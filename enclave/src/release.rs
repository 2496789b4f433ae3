//! The attested key request, through the parent's relay to the verifier.
//!
//! Per job: a fresh ephemeral P-384 key pair, a challenge from the verifier,
//! an attestation document from the NSM binding the ephemeral public key,
//! the challenge and the request hash, then the sealed answer, opened only
//! after its signature verified against the verifier key built into the
//! image. The parent relays all of it and can change none of it unnoticed.

use kluis_proto::job::FailureKind;
use std::sync::Arc;

use kluis_proto::client::{request_challenge, request_keys};
use kluis_proto::{
    request_hash, AuthorisationId, ClientError, EphemeralKeyPair, KeyOperation, KeyRequest,
    ReleasedKey, WireError,
};

use crate::job::JobError;
use crate::EnclaveContext;

/// Largest frame from the verifier (a response carries at most 64 sealed keys).
pub const VERIFIER_MAX_FRAME_LEN: usize = 128 * 1024;

fn client_error(e: ClientError) -> JobError {
    match e {
        ClientError::Refused(code) => JobError::new(
            FailureKind::KeyReleaseRefused,
            format!("the verifier refused the key request ({code})"),
        ),
        ClientError::Wire(WireError::Frame(f)) => JobError::new(
            FailureKind::VerifierUnavailable,
            format!("talking to the verifier through the parent: {f}"),
        ),
        ClientError::Wire(WireError::Message(m)) => JobError::new(
            FailureKind::KeyReleaseInvalid,
            format!("a malformed verifier answer: {m}"),
        ),
        ClientError::Open(o) => JobError::new(
            FailureKind::KeyReleaseInvalid,
            format!("the verifier's answer did not verify: {o}"),
        ),
        other => JobError::new(FailureKind::KeyReleaseInvalid, other.to_string()),
    }
}

/// Ask the verifier for the keys of `ops` (answers in the same order), under
/// the job authorisation `authorisation` if there is one: its id is part of
/// the request, and so of the request hash the attestation document
/// carries in `user_data`.
pub async fn release_keys(
    ctx: &Arc<EnclaveContext>,
    ops: Vec<KeyOperation>,
    authorisation: Option<AuthorisationId>,
) -> Result<Vec<ReleasedKey>, JobError> {
    let request = KeyRequest::new(ops)
        .map_err(|e| JobError::new(FailureKind::BadJob, format!("key request: {e}")))?
        .with_authorisation(authorisation);
    let exchange = async {
        let mut stream = kluis_transport::connect(&ctx.verifier).await.map_err(|e| {
            JobError::new(
                FailureKind::VerifierUnavailable,
                format!("connecting to the verifier via {}: {e}", ctx.verifier),
            )
        })?;
        let challenge = request_challenge(&mut stream, VERIFIER_MAX_FRAME_LEN)
            .await
            .map_err(client_error)?;
        let ephemeral = EphemeralKeyPair::generate()
            .map_err(|e| JobError::new(FailureKind::Internal, format!("ephemeral key: {e}")))?;
        let hash = request_hash(&request);
        let public_key = ephemeral.public_key_sec1();
        let nsm = Arc::clone(&ctx.nsm);
        let document = tokio::task::spawn_blocking(move || {
            kluis_nsm::attest(
                &*nsm,
                Some(&hash),
                Some(&challenge.nonce),
                Some(&public_key),
            )
        })
        .await
        .map_err(|_| JobError::new(FailureKind::Internal, "attestation task failed"))?
        .map_err(|e| JobError::new(FailureKind::Nsm, format!("attestation: {e}")))?;
        request_keys(
            &mut stream,
            VERIFIER_MAX_FRAME_LEN,
            &document,
            &request,
            &ephemeral,
            &ctx.verifier_public_key,
        )
        .await
        .map_err(client_error)
    };
    tokio::time::timeout(ctx.key_release_timeout, exchange)
        .await
        .map_err(|_| {
            JobError::new(
                FailureKind::VerifierUnavailable,
                format!(
                    "no answer from the verifier within {}s",
                    ctx.key_release_timeout.as_secs()
                ),
            )
        })?
}
