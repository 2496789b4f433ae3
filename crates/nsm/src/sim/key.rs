//! P-384 signing keys held by the simulator.

use std::fmt;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    EcdsaKeyPair, KeyPair as _, ECDSA_P384_SHA384_ASN1_SIGNING, ECDSA_P384_SHA384_FIXED_SIGNING,
};
use zeroize::Zeroizing;

use super::SimError;

/// A P-384 key pair: signs certificates (DER signatures, through rcgen) and
/// COSE messages (fixed-length `r || s` signatures).
///
/// The PKCS#8 encoding is kept in a zeroizing buffer; aws-lc frees (and
/// clears) its own copies when the key pairs drop.
pub(crate) struct P384Key {
    pkcs8: Zeroizing<Vec<u8>>,
    der_signer: EcdsaKeyPair,
    fixed_signer: EcdsaKeyPair,
}

impl fmt::Debug for P384Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("P384Key")
            .field("public_key", &HexPrefix(self.public_key()))
            .field("private_key", &"<redacted>")
            .finish()
    }
}

/// Prints the first bytes of a public key, enough to tell keys apart.
struct HexPrefix<'a>(&'a [u8]);

impl fmt::Debug for HexPrefix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0.iter().take(12) {
            write!(f, "{byte:02x}")?;
        }
        f.write_str("..")
    }
}

impl P384Key {
    /// A fresh random key.
    pub(crate) fn generate() -> Result<Self, SimError> {
        let document =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P384_SHA384_ASN1_SIGNING, &SystemRandom::new())
                .map_err(|_| SimError::Crypto("generating a P-384 key"))?;
        Self::from_pkcs8(document.as_ref())
    }

    /// Parses a PKCS#8 (RFC 5208/5958) P-384 private key.
    pub(crate) fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, SimError> {
        let der_signer = EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_ASN1_SIGNING, pkcs8)
            .map_err(|_| SimError::Crypto("parsing a P-384 PKCS#8 private key"))?;
        let fixed_signer = EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, pkcs8)
            .map_err(|_| SimError::Crypto("parsing a P-384 PKCS#8 private key"))?;
        Ok(Self {
            pkcs8: Zeroizing::new(pkcs8.to_vec()),
            der_signer,
            fixed_signer,
        })
    }

    /// The PKCS#8 encoding of the private key.
    pub(crate) fn pkcs8(&self) -> &Zeroizing<Vec<u8>> {
        &self.pkcs8
    }

    /// The uncompressed public point (`04 || x || y`, 97 bytes).
    pub(crate) fn public_key(&self) -> &[u8] {
        self.fixed_signer.public_key().as_ref()
    }

    /// Signs `message` with ECDSA P-384 SHA-384, returning the 96-byte `r || s`.
    pub(crate) fn sign_fixed(&self, message: &[u8]) -> Result<Vec<u8>, SimError> {
        let signature = self
            .fixed_signer
            .sign(&SystemRandom::new(), message)
            .map_err(|_| SimError::Crypto("signing with ECDSA P-384"))?;
        Ok(signature.as_ref().to_vec())
    }
}

impl rcgen::PublicKeyData for P384Key {
    fn der_bytes(&self) -> &[u8] {
        self.public_key()
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P384_SHA384
    }
}

impl rcgen::SigningKey for P384Key {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.der_signer
            .sign(&SystemRandom::new(), msg)
            .map(|signature| signature.as_ref().to_vec())
            .map_err(|_| rcgen::Error::RingUnspecified)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts_the_private_key() {
        let key = P384Key::generate().unwrap();
        let debug = format!("{key:?}");
        assert!(debug.contains("<redacted>"));
        assert!(!debug.contains(&format!("{:?}", key.pkcs8().as_slice())));
        assert_eq!(key.public_key().len(), 97);
    }

    #[test]
    fn pkcs8_round_trips() {
        let key = P384Key::generate().unwrap();
        let again = P384Key::from_pkcs8(key.pkcs8()).unwrap();
        assert_eq!(key.public_key(), again.public_key());
        assert_eq!(key.sign_fixed(b"m").unwrap().len(), 96);
    }

    #[test]
    fn rejects_garbage_and_other_curves() {
        assert!(P384Key::from_pkcs8(b"not a key").is_err());
        let p256 = EcdsaKeyPair::generate_pkcs8(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            &SystemRandom::new(),
        )
        .unwrap();
        assert!(P384Key::from_pkcs8(p256.as_ref()).is_err());
    }
}
