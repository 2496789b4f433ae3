//! The Kluis parent, as a library: it runs on the EC2 host, outside the
//! enclave, and is treated as an attacker. It relays the enclave's verifier
//! traffic ([`relay`]) and runs jobs ([`job`]), moving ciphertext only; it
//! never holds a key.
//!
//! [`hook`] is the seam through which tests see every byte the parent
//! carries and play a hostile parent.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod connect;
pub mod failover;
pub mod hook;
pub mod job;
pub mod limit;
pub mod relay;
pub mod spec;
mod writebehind;
mod zerocopy;
