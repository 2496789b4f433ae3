//! Throw-away SoftHSM2 tokens for these tests.
#![allow(dead_code, clippy::unwrap_used)]

use kluis_hsm::{softhsm, TokenConfig};

pub const PIN: &str = softhsm::THROWAWAY_PIN;

/// A fresh token; `None` when SoftHSM2 is absent (and not required).
pub fn token(prefix: &str) -> Option<TokenConfig> {
    softhsm::throwaway_token(prefix).unwrap()
}
