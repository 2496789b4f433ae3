//! The controller's verifier and key broker, as a library: key hierarchy,
//! policy, audit, authentication and the key-release service. The
//! `attestation-verifier` binary is a thin command line over it.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

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
