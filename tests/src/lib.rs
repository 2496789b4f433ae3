//! Shared helpers for Kluis's cross-crate integration tests.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::arithmetic_side_effects,
    clippy::panic,
    clippy::indexing_slicing,
    missing_debug_implementations
)]

pub mod world;
