//! The data key: 32 secret bytes that zeroize on drop and never print.

use crate::error::KeyError;
use std::fmt;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// An AES-256 data key (DK): the secret from which every per-stream key of an
/// envelope is derived.
///
/// The bytes are overwritten with zeros when the value is dropped (clones
/// included), and `Debug` prints `DataKey(<redacted>)`. There is deliberately no
/// `PartialEq` (a non-constant-time comparison of keys is never needed) and no
/// `Display`.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct DataKey([u8; DataKey::LEN]);

impl DataKey {
    /// Length of a data key in bytes.
    pub const LEN: usize = 32;

    /// Takes ownership of 32 key bytes.
    ///
    /// The array is moved into the key; if the caller keeps another copy (a
    /// `let` binding that is not moved, a buffer it came from), zeroizing that
    /// copy is the caller's job. Prefer [`DataKey::from_slice`] from a
    /// `Zeroizing` buffer.
    pub fn from_bytes(bytes: [u8; DataKey::LEN]) -> Self {
        Self(bytes)
    }

    /// Copies 32 key bytes out of a slice (for instance a
    /// `Zeroizing<Vec<u8>>` released by the key broker).
    ///
    /// # Errors
    /// [`KeyError::Length`] when the slice is not exactly 32 bytes long.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, KeyError> {
        let mut key = Self([0; DataKey::LEN]);
        if bytes.len() != DataKey::LEN {
            return Err(KeyError::Length {
                expected: DataKey::LEN,
                found: bytes.len(),
            });
        }
        key.0.copy_from_slice(bytes);
        Ok(key)
    }

    /// A fresh random key from the operating system's generator (AWS-LC's
    /// `SystemRandom`).
    ///
    /// # Errors
    /// [`KeyError::Random`] if the generator fails.
    pub fn generate() -> Result<Self, KeyError> {
        let mut key = Self([0; DataKey::LEN]);
        aws_lc_rs::rand::fill(&mut key.0).map_err(|_| KeyError::Random)?;
        Ok(key)
    }

    /// The key bytes. Named so that every use stands out in review.
    pub fn expose_secret(&self) -> &[u8; DataKey::LEN] {
        &self.0
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted() {
        let key = DataKey::from_bytes([0xAB; 32]);
        let shown = format!("{key:?} {key:#?}");
        assert!(!shown.contains("171"), "{shown}");
        assert!(!shown.to_lowercase().contains("ab"), "{shown}");
        assert!(shown.contains("redacted"));
    }

    #[test]
    fn from_slice_checks_length() {
        assert!(matches!(
            DataKey::from_slice(&[1; 31]),
            Err(KeyError::Length {
                expected: 32,
                found: 31
            })
        ));
        assert!(DataKey::from_slice(&[1; 33]).is_err());
        let key = DataKey::from_slice(&[7; 32]).unwrap();
        assert_eq!(key.expose_secret(), &[7; 32]);
    }

    #[test]
    fn generated_keys_differ() {
        let a = DataKey::generate().unwrap();
        let b = DataKey::generate().unwrap();
        assert_ne!(a.expose_secret(), b.expose_secret());
    }

    #[test]
    fn zeroize_clears_the_bytes() {
        let mut key = DataKey::from_bytes([9; 32]);
        key.zeroize();
        assert_eq!(key.expose_secret(), &[0; 32]);
    }
}
