//! The verifier's identity key: ECDSA P-384, signs every key-release response.
//! Its public half is built into the enclave image (and so covered by the PCR
//! measurements); the enclave accepts keys only under a signature by it.
//!
//! Signing is AWS-LC's ECDSA P-384/SHA-384 (randomized nonces; fixed-length
//! `r || s` signatures). Keys are stored as PKCS#8 v1 DER (`PrivateKeyInfo`
//! holding an RFC 5915 `ECPrivateKey` with the public key), the encoding the
//! `p384` crate wrote for identities made before the move to AWS-LC; both
//! read each other's.

use crate::error::IdentityError;
use crate::message::{P384_PUBLIC_KEY_LEN, SIGNATURE_LEN};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P384_SHA384_FIXED_SIGNING};
use aws_lc_rs::signature::{UnparsedPublicKey, ECDSA_P384_SHA384_FIXED};
use base64::Engine as _;
use std::fmt;
use std::sync::Arc;
use zeroize::Zeroizing;

/// PEM boundaries of a PKCS#8 private key (RFC 7468 §10).
const PEM_BEGIN: &str = "-----BEGIN PRIVATE KEY-----";
const PEM_END: &str = "-----END PRIVATE KEY-----";
/// Base64 characters per PEM line (RFC 7468 §2).
const PEM_LINE_LEN: usize = 64;
/// Longest PEM accepted: a P-384 PKCS#8 document is under 200 bytes of DER.
const MAX_PEM_LEN: usize = 4096;

/// A verifier identity key pair: either an AWS-LC key in this process
/// (cleansed when freed; it only leaves as zeroizing PKCS#8 and is never
/// shown by `Debug`), or a key held elsewhere — an HSM — that signs through
/// an [`IdentitySigner`] and never leaves it.
pub struct VerifierIdentity {
    key: KeyHolder,
    public: [u8; P384_PUBLIC_KEY_LEN],
}

enum KeyHolder {
    Local(EcdsaKeyPair),
    External(Arc<dyn IdentitySigner>),
}

/// A P-384 signing key kept outside this process (for instance in a PKCS#11
/// token), used through [`VerifierIdentity::external`].
pub trait IdentitySigner: Send + Sync {
    /// ECDSA P-384 over the SHA-384 `digest` the caller computed: raw
    /// `r || s`, 48 bytes each.
    fn sign_sha384_digest(
        &self,
        digest: &[u8; SHA384_LEN],
    ) -> Result<[u8; SIGNATURE_LEN], IdentityError>;
}

/// Length of a SHA-384 digest.
pub const SHA384_LEN: usize = 48;

impl VerifierIdentity {
    fn from_key_pair(key: EcdsaKeyPair) -> Option<Self> {
        let public: [u8; P384_PUBLIC_KEY_LEN] = key.public_key().as_ref().try_into().ok()?;
        if public.first() != Some(&0x04) {
            return None;
        }
        Some(VerifierIdentity {
            key: KeyHolder::Local(key),
            public,
        })
    }

    /// An identity whose private key is held by `signer` and never leaves
    /// it, with public key `public` (uncompressed SEC1). The pairing is
    /// checked: a test message signed by `signer` must verify under
    /// `public`, so a token holding another key is caught here and not at
    /// the enclave.
    pub fn external(
        public: [u8; P384_PUBLIC_KEY_LEN],
        signer: Arc<dyn IdentitySigner>,
    ) -> Result<Self, IdentityError> {
        let identity = VerifierIdentity {
            key: KeyHolder::External(signer),
            public,
        };
        let probe = b"kluis-identity-probe-v1\0pairing check";
        let signature = identity.sign(probe)?;
        UnparsedPublicKey::new(&ECDSA_P384_SHA384_FIXED, public)
            .verify(probe, &signature)
            .map_err(|_| IdentityError::Mismatch)?;
        Ok(identity)
    }

    /// Whether the private key is held outside this process.
    pub fn is_external(&self) -> bool {
        matches!(self.key, KeyHolder::External(_))
    }

    /// A new random identity key (from AWS-LC's random source).
    pub fn generate() -> Result<Self, IdentityError> {
        EcdsaKeyPair::generate(&ECDSA_P384_SHA384_FIXED_SIGNING)
            .ok()
            .and_then(Self::from_key_pair)
            .ok_or(IdentityError::Randomness)
    }

    /// The key with private scalar `scalar` (big-endian); for test vectors.
    #[cfg(test)]
    pub(crate) fn from_scalar(scalar: &[u8; 48]) -> Result<Self, IdentityError> {
        use aws_lc_rs::agreement::{PrivateKey, ECDH_P384};
        let invalid = || IdentityError::Pkcs8Decode {
            detail: "scalar out of range".to_owned(),
        };
        let public = PrivateKey::from_private_key(&ECDH_P384, scalar)
            .map_err(|_| invalid())?
            .compute_public_key()
            .map_err(|_| invalid())?;
        EcdsaKeyPair::from_private_key_and_public_key(
            &ECDSA_P384_SHA384_FIXED_SIGNING,
            scalar,
            public.as_ref(),
        )
        .ok()
        .and_then(Self::from_key_pair)
        .ok_or_else(invalid)
    }

    /// Read a PKCS#8 DER private key (EC, P-384).
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, IdentityError> {
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, der).map_err(|e| {
            IdentityError::Pkcs8Decode {
                detail: format!("AWS-LC rejected it: {e}"),
            }
        })?;
        Self::from_key_pair(key).ok_or_else(|| IdentityError::Pkcs8Decode {
            detail: "the public key is not an uncompressed P-384 point".to_owned(),
        })
    }

    /// Read a PKCS#8 PEM private key (`-----BEGIN PRIVATE KEY-----`).
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, IdentityError> {
        let pem_error = |detail: &str| IdentityError::Pkcs8Decode {
            detail: detail.to_owned(),
        };
        if pem.len() > MAX_PEM_LEN {
            return Err(IdentityError::Pkcs8Decode {
                detail: format!(
                    "PEM of {} bytes exceeds the maximum of {MAX_PEM_LEN}",
                    pem.len()
                ),
            });
        }
        let body = pem
            .trim()
            .strip_prefix(PEM_BEGIN)
            .ok_or_else(|| pem_error("PEM must begin with `-----BEGIN PRIVATE KEY-----`"))?
            .strip_suffix(PEM_END)
            .ok_or_else(|| pem_error("PEM must end with `-----END PRIVATE KEY-----`"))?;
        // Base64 of the key: zeroizing, sized up front so it never grows.
        let mut base64 = Zeroizing::new(Vec::with_capacity(body.len()));
        base64.extend(body.bytes().filter(|b| !b.is_ascii_whitespace()));
        let mut der = Zeroizing::new(vec![0u8; base64::decoded_len_estimate(base64.len())]);
        let len = base64::engine::general_purpose::STANDARD
            .decode_slice(&base64[..], &mut der[..])
            .map_err(|_| pem_error("PEM body is not valid base64"))?;
        der.truncate(len);
        Self::from_pkcs8_der(&der)
    }

    /// The private key as PKCS#8 DER, in a zeroizing buffer.
    pub fn to_pkcs8_der(&self) -> Result<Zeroizing<Vec<u8>>, IdentityError> {
        let KeyHolder::Local(key) = &self.key else {
            return Err(IdentityError::NotExportable);
        };
        // `Document` zeroizes itself on drop.
        let document = key.to_pkcs8v1().map_err(|_| IdentityError::Pkcs8Encode {
            detail: "AWS-LC could not serialise the key".to_owned(),
        })?;
        Ok(Zeroizing::new(document.as_ref().to_vec()))
    }

    /// The private key as PKCS#8 PEM (RFC 7468, 64-column lines, LF line
    /// endings), in a zeroizing string.
    pub fn to_pkcs8_pem(&self) -> Result<Zeroizing<String>, IdentityError> {
        let encode_error = || IdentityError::Pkcs8Encode {
            detail: "could not base64-encode the key".to_owned(),
        };
        let der = self.to_pkcs8_der()?;
        let base64_len = base64::encoded_len(der.len(), true).ok_or_else(encode_error)?;
        let mut base64 = Zeroizing::new(vec![0u8; base64_len]);
        let written = base64::engine::general_purpose::STANDARD
            .encode_slice(&der[..], &mut base64[..])
            .map_err(|_| encode_error())?;
        let base64 = base64.get(..written).ok_or_else(encode_error)?;

        let lines = written.div_ceil(PEM_LINE_LEN);
        let capacity = [PEM_BEGIN.len(), 1, written, lines, PEM_END.len(), 1]
            .iter()
            .fold(0usize, |acc, n| acc.saturating_add(*n));
        // Sized up front so the string never reallocates and leaves a copy.
        let mut pem = Zeroizing::new(String::with_capacity(capacity));
        pem.push_str(PEM_BEGIN);
        pem.push('\n');
        for line in base64.chunks(PEM_LINE_LEN) {
            for &b in line {
                pem.push(char::from(b));
            }
            pem.push('\n');
        }
        pem.push_str(PEM_END);
        pem.push('\n');
        Ok(pem)
    }

    /// The public key, uncompressed SEC1 (`0x04 || x || y`): what the enclave
    /// image pins.
    pub fn public_key_sec1(&self) -> [u8; P384_PUBLIC_KEY_LEN] {
        self.public
    }

    /// ECDSA P-384 over SHA-384 of `message` (randomized nonce); raw `r || s`.
    ///
    /// Every message the identity signs must start with a domain label of its
    /// own protocol (the release transcript, a checkpoint note's origin line,
    /// an authorisation's label), so that no signature made for one use can
    /// be presented as another.
    pub fn sign(&self, message: &[u8]) -> Result<[u8; SIGNATURE_LEN], IdentityError> {
        match &self.key {
            KeyHolder::Local(key) => {
                let signature = key
                    .sign(&SystemRandom::new(), message)
                    .map_err(|_| IdentityError::Sign)?;
                signature
                    .as_ref()
                    .try_into()
                    .map_err(|_| IdentityError::Sign)
            }
            KeyHolder::External(signer) => {
                let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA384, message);
                let digest: &[u8; SHA384_LEN] = digest
                    .as_ref()
                    .try_into()
                    .map_err(|_| IdentityError::Sign)?;
                signer.sign_sha384_digest(digest)
            }
        }
    }
}

impl fmt::Debug for VerifierIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifierIdentity")
            .field("public_key", &crate::error::hex(&self.public_key_sec1()))
            .field(
                "private_key",
                &match self.key {
                    KeyHolder::Local(_) => "<redacted>",
                    KeyHolder::External(_) => "<held by an external signer>",
                },
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects
    )]
    use super::*;
    use aws_lc_rs::signature::{UnparsedPublicKey, ECDSA_P384_SHA384_FIXED};
    use p384::ecdsa::signature::{Signer as _, Verifier as _};
    use p384::pkcs8::{DecodePrivateKey as _, EncodePrivateKey as _, LineEnding};

    fn verify_with_aws_lc(public: &[u8], message: &[u8], signature: &[u8]) -> bool {
        UnparsedPublicKey::new(&ECDSA_P384_SHA384_FIXED, public)
            .verify(message, signature)
            .is_ok()
    }

    fn verify_with_p384(public: &[u8], message: &[u8], signature: &[u8]) -> bool {
        let key = p384::ecdsa::VerifyingKey::from_sec1_bytes(public).unwrap();
        let signature = p384::ecdsa::Signature::from_slice(signature).unwrap();
        key.verify(message, &signature).is_ok()
    }

    /// Identities the verifier stored before the move to AWS-LC were written
    /// by `p384`'s `to_pkcs8_der`/`to_pkcs8_pem`: they load, keep their
    /// public key, and sign what both implementations verify.
    #[test]
    fn identities_stored_by_the_p384_implementation_load() {
        for _ in 0..16 {
            let old = p384::ecdsa::SigningKey::random(&mut rand_core::OsRng);
            let old_public = old.verifying_key().to_encoded_point(false);
            let old_der = old.to_pkcs8_der().unwrap();
            let old_pem = old.to_pkcs8_pem(LineEnding::LF).unwrap();

            let from_der = VerifierIdentity::from_pkcs8_der(old_der.as_bytes()).unwrap();
            let from_pem = VerifierIdentity::from_pkcs8_pem(&old_pem).unwrap();
            for id in [&from_der, &from_pem] {
                assert_eq!(id.public_key_sec1()[..], old_public.as_bytes()[..]);
                let message = b"transcript";
                let signature = id.sign(message).unwrap();
                assert!(verify_with_aws_lc(
                    &id.public_key_sec1(),
                    message,
                    &signature
                ));
                assert!(verify_with_p384(old_public.as_bytes(), message, &signature));
                assert!(!verify_with_aws_lc(
                    &id.public_key_sec1(),
                    b"other",
                    &signature
                ));
            }
            // What the old key signs verifies under the loaded identity's key.
            let old_signature: p384::ecdsa::Signature = old.sign(b"m");
            assert!(verify_with_aws_lc(
                &from_der.public_key_sec1(),
                b"m",
                &old_signature.to_bytes()
            ));
        }
    }

    /// The encodings are the same: for one scalar, both write the same PKCS#8
    /// DER and PEM, so an identity written now also loads in the `p384`
    /// implementation (a rollback keeps working).
    #[test]
    fn pkcs8_encoding_is_the_p384_encoding() {
        for scalar in [[0x22u8; 48], [0x01; 48], {
            let mut s = [0u8; 48];
            s[47] = 1;
            s
        }] {
            let old = p384::ecdsa::SigningKey::from_slice(&scalar).unwrap();
            let new = VerifierIdentity::from_scalar(&scalar).unwrap();
            assert_eq!(
                new.to_pkcs8_der().unwrap()[..],
                old.to_pkcs8_der().unwrap().as_bytes()[..]
            );
            assert_eq!(
                new.to_pkcs8_pem().unwrap().as_str(),
                old.to_pkcs8_pem(LineEnding::LF).unwrap().as_str()
            );
        }
        for _ in 0..16 {
            let new = VerifierIdentity::generate().unwrap();
            let der = new.to_pkcs8_der().unwrap();
            let old = p384::ecdsa::SigningKey::from_pkcs8_der(&der).unwrap();
            assert_eq!(
                old.verifying_key().to_encoded_point(false).as_bytes()[..],
                new.public_key_sec1()[..]
            );
            let pem = new.to_pkcs8_pem().unwrap();
            assert!(p384::ecdsa::SigningKey::from_pkcs8_pem(&pem).is_ok());
        }
    }

    #[test]
    fn signatures_are_randomized_and_verify() {
        let id = VerifierIdentity::generate().unwrap();
        let a = id.sign(b"message").unwrap();
        let b = id.sign(b"message").unwrap();
        assert_ne!(a, b);
        for sig in [a, b] {
            assert!(verify_with_aws_lc(&id.public_key_sec1(), b"message", &sig));
            assert!(verify_with_p384(&id.public_key_sec1(), b"message", &sig));
        }
    }

    #[test]
    fn pem_edge_cases() {
        let id = VerifierIdentity::generate().unwrap();
        let pem = id.to_pkcs8_pem().unwrap();
        // CRLF and surrounding whitespace are accepted.
        let crlf = format!("\n  {}  \n", pem.replace('\n', "\r\n"));
        assert_eq!(
            VerifierIdentity::from_pkcs8_pem(&crlf)
                .unwrap()
                .public_key_sec1(),
            id.public_key_sec1()
        );
        // Wrong label, bad base64, a truncated body, and oversized input are not.
        for bad in [
            pem.replace("PRIVATE KEY", "EC PRIVATE KEY"),
            pem.replace('A', "*"),
            pem.replacen(&pem.lines().nth(1).unwrap().to_string(), "", 1),
            format!("{}{}", pem.as_str(), " ".repeat(MAX_PEM_LEN)),
            String::new(),
        ] {
            assert!(
                matches!(
                    VerifierIdentity::from_pkcs8_pem(&bad),
                    Err(IdentityError::Pkcs8Decode { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn pkcs8_round_trips() {
        let id = VerifierIdentity::generate().unwrap();
        let der = id.to_pkcs8_der().unwrap();
        let back = VerifierIdentity::from_pkcs8_der(&der).unwrap();
        assert_eq!(back.public_key_sec1(), id.public_key_sec1());
        let pem = id.to_pkcs8_pem().unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        let back = VerifierIdentity::from_pkcs8_pem(&pem).unwrap();
        assert_eq!(back.public_key_sec1(), id.public_key_sec1());
        assert_eq!(id.public_key_sec1()[0], 4);
    }

    #[test]
    fn two_identities_differ() {
        let a = VerifierIdentity::generate().unwrap();
        let b = VerifierIdentity::generate().unwrap();
        assert_ne!(a.public_key_sec1(), b.public_key_sec1());
    }

    #[test]
    fn garbage_pkcs8_is_refused() {
        assert!(matches!(
            VerifierIdentity::from_pkcs8_der(b"\x30\x03\x02\x01\x00"),
            Err(IdentityError::Pkcs8Decode { .. })
        ));
        assert!(VerifierIdentity::from_pkcs8_pem("not pem").is_err());
        // A P-256 key is not a P-384 identity.
        let p256_pkcs8_prefix = [0x30u8, 0x41, 0x02, 0x01, 0x00, 0x30, 0x13, 0x06, 0x07];
        assert!(VerifierIdentity::from_pkcs8_der(&p256_pkcs8_prefix).is_err());
    }

    #[test]
    fn debug_is_redacted() {
        let id = VerifierIdentity::from_scalar(&[7u8; 48]).unwrap();
        let der = id.to_pkcs8_der().unwrap();
        let s = format!("{id:?}");
        assert!(s.contains("<redacted>"));
        assert!(!s.contains(&crate::error::hex(&[7u8; 48])));
        assert!(!s.contains(&crate::error::hex(&der)));
    }
}
