//! Short-lived release keys certified by the verifier identity.
//!
//! A verifier whose identity key lives in an HSM would otherwise ask the
//! token for one ECDSA signature per key release; SoftHSM2 takes about a
//! millisecond of CPU for one (a network HSM, a round trip). Instead, the
//! identity certifies a fresh in-memory P-384 *release key* for a bounded
//! time (an hour by default) and that key signs the answers. The enclave
//! checks the certificate under its pinned identity key, the validity against
//! its own clock, and the answer under the release key. The release key is
//! an AWS-LC key that never leaves the verifier process and is never stored:
//! whoever can read the verifier's memory could also ask the logged-in
//! token for signatures, so it gives nothing new while it lives, and it
//! stops working by itself when it expires.

use crate::error::IdentityError;
use crate::identity::VerifierIdentity;
use crate::message::{ReleaseDelegation, P384_PUBLIC_KEY_LEN};
use std::fmt;

/// Domain label of the identity's signature over a release key.
const DELEGATION_LABEL: &[u8] = b"kluis-proto/v1 release-key delegation";

/// Length of [`delegation_message`]'s output.
const DELEGATION_MESSAGE_LEN: usize = 4 + DELEGATION_LABEL.len() + P384_PUBLIC_KEY_LEN + 8;

/// Slack allowed between the verifier's and the enclave's clocks when the
/// enclave checks a release key's validity, in milliseconds (two minutes).
pub const DELEGATION_CLOCK_SKEW_MS: u64 = 120_000;

/// The bytes the identity signs to certify `public_key` until
/// `not_after_ms`: `u32 label length || label || public_key || u64
/// not_after_ms`, big-endian.
pub fn delegation_message(public_key: &[u8; P384_PUBLIC_KEY_LEN], not_after_ms: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(DELEGATION_MESSAGE_LEN);
    let label_len = u32::try_from(DELEGATION_LABEL.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&label_len.to_be_bytes());
    out.extend_from_slice(DELEGATION_LABEL);
    out.extend_from_slice(public_key);
    out.extend_from_slice(&not_after_ms.to_be_bytes());
    out
}

/// A release key and the identity's certificate for it.
pub struct DelegatedKey {
    key: VerifierIdentity,
    delegation: ReleaseDelegation,
}

impl DelegatedKey {
    /// A fresh release key, certified by `identity` until `not_after_ms`.
    pub fn issue(identity: &VerifierIdentity, not_after_ms: u64) -> Result<Self, IdentityError> {
        let key = VerifierIdentity::generate()?;
        let public_key = key.public_key_sec1();
        let signature = identity.sign(&delegation_message(&public_key, not_after_ms))?;
        Ok(Self {
            key,
            delegation: ReleaseDelegation {
                public_key,
                not_after_ms,
                signature,
            },
        })
    }

    /// The certificate sent with every answer this key signs.
    pub fn delegation(&self) -> &ReleaseDelegation {
        &self.delegation
    }

    /// Unix milliseconds after which enclaves refuse its answers.
    pub fn not_after_ms(&self) -> u64 {
        self.delegation.not_after_ms
    }

    pub(crate) fn key(&self) -> &VerifierIdentity {
        &self.key
    }
}

impl fmt::Debug for DelegatedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DelegatedKey")
            .field(
                "public_key",
                &crate::error::hex(&self.delegation.public_key),
            )
            .field("not_after_ms", &self.delegation.not_after_ms)
            .field("private_key", &"<redacted>")
            .finish()
    }
}
