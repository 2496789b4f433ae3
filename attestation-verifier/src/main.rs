//! `attestation-verifier`: run by the data controller, on its own premises.
//!
//! Verifies Nitro attestation documents against the pinned AWS root, holds the
//! key hierarchy, policy and audit log, and serves key release. The command
//! line lives in the library ([`attestation_verifier::cli`]).
//!
//! Exit codes: 0 accepted/done, 1 rejected/refused, 2 usage or I/O error.
//! Never a panic.
#![forbid(unsafe_code)]

/// Every block this process frees is wiped first, and a block that grows is
/// moved by allocate, copy, wipe and free: data keys, unwrapped master keys
/// and credentials leave nothing in freed heap (see the enclave's
/// `main.rs`).
#[global_allocator]
static ALLOCATOR: secmem_alloc::zeroizing_alloc::ZeroizeAlloc<std::alloc::System> =
    secmem_alloc::zeroizing_alloc::ZeroizeAlloc::new(std::alloc::System);

fn main() -> std::process::ExitCode {
    attestation_verifier::cli::run_from(std::env::args_os())
}
