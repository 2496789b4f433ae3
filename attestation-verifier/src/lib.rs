//! The controller's verifier and key broker, as a library: key hierarchy,
//! policy, audit, authentication and the key-release service. The
//! `attestation-verifier` binary is a thin command line over it.
#![forbid(unsafe_code)]
#![deny(clippy::print_stderr)]
#![warn(missing_docs)]

/// `eprintln!` that cannot panic: a line for standard error that is closed
/// or full (`2>&1 | head`, `2>/dev/full`) is lost, and the program goes on
/// to its documented exit instead of a panic.
macro_rules! to_stderr {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

pub mod audit;
pub mod auth;
pub mod broker;
pub mod cli;
pub mod evidence;
pub mod keys;
pub mod kms;
pub mod nonce;
pub mod nonce_db;
pub mod policy;
pub mod service;
