//! The verifier's identity key: ECDSA P-384, signs every key-release response.
//! Its public half is built into the enclave image (and so covered by the PCR
//! measurements); the enclave accepts keys only under a signature by it.

use crate::error::IdentityError;
use crate::message::{P384_PUBLIC_KEY_LEN, SIGNATURE_LEN};
use p384::ecdsa::signature::DigestSigner;
use p384::ecdsa::{Signature, SigningKey};
use p384::pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding};
use rand_core::{OsRng, RngCore};
use sha2::Sha384;
use std::fmt;
use zeroize::Zeroizing;

/// Length of a P-384 private scalar.
const SCALAR_LEN: usize = 48;

/// A verifier identity key pair. The private key is zeroized on drop, only
/// leaves as zeroizing PKCS#8, and is never shown by `Debug`.
pub struct VerifierIdentity {
    key: SigningKey,
}

impl VerifierIdentity {
    /// A new random identity key (from the operating system's random source).
    pub fn generate() -> Result<Self, IdentityError> {
        // A uniformly random 48-byte string is a valid scalar except with
        // probability about 2^-190; retry a few times rather than loop forever.
        for _ in 0..8 {
            let mut bytes = Zeroizing::new([0u8; SCALAR_LEN]);
            OsRng
                .try_fill_bytes(&mut bytes[..])
                .map_err(|_| IdentityError::Randomness)?;
            if let Ok(identity) = Self::from_scalar(&bytes) {
                return Ok(identity);
            }
        }
        Err(IdentityError::Randomness)
    }

    /// The key with private scalar `scalar` (big-endian); for test vectors.
    pub(crate) fn from_scalar(scalar: &[u8; SCALAR_LEN]) -> Result<Self, IdentityError> {
        SigningKey::from_slice(scalar)
            .map(|key| VerifierIdentity { key })
            .map_err(|_| IdentityError::Pkcs8Decode {
                detail: "scalar out of range".to_owned(),
            })
    }

    /// Read a PKCS#8 DER private key (EC, P-384).
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, IdentityError> {
        SigningKey::from_pkcs8_der(der)
            .map(|key| VerifierIdentity { key })
            .map_err(|e| IdentityError::Pkcs8Decode {
                detail: e.to_string(),
            })
    }

    /// Read a PKCS#8 PEM private key (`-----BEGIN PRIVATE KEY-----`).
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, IdentityError> {
        SigningKey::from_pkcs8_pem(pem)
            .map(|key| VerifierIdentity { key })
            .map_err(|e| IdentityError::Pkcs8Decode {
                detail: e.to_string(),
            })
    }

    /// The private key as PKCS#8 DER, in a zeroizing buffer.
    pub fn to_pkcs8_der(&self) -> Result<Zeroizing<Vec<u8>>, IdentityError> {
        let doc = self
            .key
            .to_pkcs8_der()
            .map_err(|e| IdentityError::Pkcs8Encode {
                detail: e.to_string(),
            })?;
        Ok(Zeroizing::new(doc.as_bytes().to_vec()))
    }

    /// The private key as PKCS#8 PEM, in a zeroizing string.
    pub fn to_pkcs8_pem(&self) -> Result<Zeroizing<String>, IdentityError> {
        self.key
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| IdentityError::Pkcs8Encode {
                detail: e.to_string(),
            })
    }

    /// The public key, uncompressed SEC1 (`0x04 || x || y`): what the enclave
    /// image pins.
    pub fn public_key_sec1(&self) -> [u8; P384_PUBLIC_KEY_LEN] {
        let point = self.key.verifying_key().to_encoded_point(false);
        let mut out = [0u8; P384_PUBLIC_KEY_LEN];
        if let Some(bytes) = point.as_bytes().get(..P384_PUBLIC_KEY_LEN) {
            out.copy_from_slice(bytes);
        }
        out
    }

    /// Sign a SHA-384 state (RFC 6979 deterministic ECDSA); raw `r || s`.
    pub(crate) fn sign_digest(&self, digest: Sha384) -> Result<[u8; SIGNATURE_LEN], IdentityError> {
        let signature: Signature = self
            .key
            .try_sign_digest(digest)
            .map_err(|_| IdentityError::Sign)?;
        let mut out = [0u8; SIGNATURE_LEN];
        let bytes = signature.to_bytes();
        if bytes.len() != SIGNATURE_LEN {
            return Err(IdentityError::Sign);
        }
        out.copy_from_slice(&bytes);
        Ok(out)
    }
}

impl fmt::Debug for VerifierIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifierIdentity")
            .field("public_key", &crate::error::hex(&self.public_key_sec1()))
            .field("private_key", &"<redacted>")
            .finish()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

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
