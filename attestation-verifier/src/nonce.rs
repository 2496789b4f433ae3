//! Challenge nonces: issued by the verifier, single use, short-lived.
//!
//! Pure: time is an argument, randomness comes from the caller. Bounded: at
//! most `capacity` nonces are outstanding; when full, expired ones are swept,
//! and if none has expired the verifier refuses to issue more (a flood of
//! challenge requests cannot grow memory). Used nonces are remembered until
//! they would have expired, so a replay is reported as a replay, not as an
//! unknown nonce.

use std::collections::HashMap;
use thiserror::Error;

/// Nonce length in bytes.
pub const NONCE_LEN: usize = 32;

/// Why a nonce was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum NonceError {
    /// The document carries no nonce, or one of the wrong length.
    #[error("document has no {NONCE_LEN}-byte nonce")]
    Missing,
    /// This verifier never issued it (or has restarted since).
    #[error("nonce was not issued by this verifier")]
    Unknown,
    /// Issued, but its lifetime is over.
    #[error("nonce expired")]
    Expired,
    /// Issued and already used once.
    #[error("nonce already used (replay)")]
    Reused,
    /// Too many outstanding challenges.
    #[error("too many outstanding challenges")]
    Full,
    /// The shared nonce table (a replicated verifier's database) cannot be
    /// reached: nothing is issued or redeemed.
    #[error("the shared nonce store is unavailable")]
    Unavailable,
}

impl NonceError {
    /// Stable name for the audit log.
    pub fn as_str(self) -> &'static str {
        match self {
            NonceError::Missing => "nonce_missing",
            NonceError::Unknown => "nonce_unknown",
            NonceError::Expired => "nonce_expired",
            NonceError::Reused => "nonce_reused",
            NonceError::Full => "nonce_capacity",
            NonceError::Unavailable => "nonce_store_unavailable",
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Slot {
    Open { expires_ms: u64 },
    Used { expires_ms: u64 },
}

impl Slot {
    fn expires_ms(self) -> u64 {
        match self {
            Slot::Open { expires_ms } | Slot::Used { expires_ms } => expires_ms,
        }
    }
}

/// The set of outstanding and recently used nonces.
#[derive(Debug)]
pub struct NonceStore {
    slots: HashMap<[u8; NONCE_LEN], Slot>,
    lifetime_ms: u64,
    capacity: usize,
}

impl NonceStore {
    /// A store whose nonces live `lifetime_ms` and of which at most `capacity`
    /// are tracked at once.
    pub fn new(lifetime_ms: u64, capacity: usize) -> Self {
        NonceStore {
            slots: HashMap::new(),
            lifetime_ms,
            capacity,
        }
    }

    fn sweep(&mut self, now_ms: u64) {
        self.slots.retain(|_, slot| slot.expires_ms() > now_ms);
    }

    /// Register `nonce` (fresh random bytes from the caller) as issued at
    /// `now_ms`; returns its expiry.
    pub fn issue(&mut self, nonce: [u8; NONCE_LEN], now_ms: u64) -> Result<u64, NonceError> {
        if self.slots.len() >= self.capacity {
            self.sweep(now_ms);
            if self.slots.len() >= self.capacity {
                return Err(NonceError::Full);
            }
        }
        let expires_ms = now_ms.saturating_add(self.lifetime_ms);
        self.slots.insert(nonce, Slot::Open { expires_ms });
        Ok(expires_ms)
    }

    /// Use `nonce` once. Succeeds only for an issued, unexpired, unused nonce.
    pub fn consume(&mut self, nonce: Option<&[u8]>, now_ms: u64) -> Result<(), NonceError> {
        let key: [u8; NONCE_LEN] = nonce
            .and_then(|n| n.try_into().ok())
            .ok_or(NonceError::Missing)?;
        match self.slots.get(&key).copied() {
            None => Err(NonceError::Unknown),
            Some(Slot::Used { .. }) => Err(NonceError::Reused),
            Some(Slot::Open { expires_ms }) if now_ms >= expires_ms => {
                self.slots.remove(&key);
                Err(NonceError::Expired)
            }
            Some(Slot::Open { expires_ms }) => {
                self.slots.insert(key, Slot::Used { expires_ms });
                Ok(())
            }
        }
    }

    /// Withdraw an issued nonce that was never used (its connection closed).
    /// A used nonce stays remembered until it would have expired.
    pub fn withdraw(&mut self, nonce: &[u8; NONCE_LEN]) {
        if let Some(Slot::Open { .. }) = self.slots.get(nonce) {
            self.slots.remove(nonce);
        }
    }

    /// Whether `nonce` was issued and is neither used nor expired at `now_ms`.
    pub fn is_open(&self, nonce: &[u8; NONCE_LEN], now_ms: u64) -> bool {
        matches!(self.slots.get(nonce), Some(Slot::Open { expires_ms }) if now_ms < *expires_ms)
    }

    /// Nonces tracked (outstanding or recently used).
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// True when none is tracked.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_use_and_expiry() {
        let mut store = NonceStore::new(1_000, 10);
        let n = [1u8; 32];
        assert_eq!(store.issue(n, 100), Ok(1_100));
        assert_eq!(store.consume(Some(&n), 200), Ok(()));
        assert_eq!(store.consume(Some(&n), 300), Err(NonceError::Reused));
        let m = [2u8; 32];
        store.issue(m, 100).unwrap();
        assert_eq!(store.consume(Some(&m), 1_100), Err(NonceError::Expired));
        assert_eq!(store.consume(Some(&m), 1_000), Err(NonceError::Unknown));
        assert_eq!(
            store.consume(Some(&[3u8; 32]), 100),
            Err(NonceError::Unknown)
        );
        assert_eq!(store.consume(None, 100), Err(NonceError::Missing));
        assert_eq!(
            store.consume(Some(&[1u8; 31]), 100),
            Err(NonceError::Missing)
        );
    }

    #[test]
    fn withdrawn_nonces_are_gone_but_used_ones_stay_remembered() {
        let mut store = NonceStore::new(1_000, 10);
        store.issue([1; 32], 0).unwrap();
        store.issue([2; 32], 0).unwrap();
        store.consume(Some(&[2; 32]), 1).unwrap();
        store.withdraw(&[1; 32]);
        store.withdraw(&[2; 32]);
        assert_eq!(store.consume(Some(&[1; 32]), 2), Err(NonceError::Unknown));
        assert_eq!(store.consume(Some(&[2; 32]), 2), Err(NonceError::Reused));
    }

    #[test]
    fn bounded() {
        let mut store = NonceStore::new(1_000, 2);
        store.issue([1; 32], 0).unwrap();
        store.issue([2; 32], 0).unwrap();
        assert_eq!(store.issue([3; 32], 10), Err(NonceError::Full));
        // After expiry the sweep makes room.
        assert!(store.issue([3; 32], 1_000).is_ok());
        assert_eq!(store.len(), 1);
    }
}
