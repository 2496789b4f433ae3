//! The Kluis enclave application (see the `kluis_enclave` library).
#![forbid(unsafe_code)]

/// Every block this process frees is wiped first, and a block that grows is
/// moved by allocate, copy, wipe and free: plaintext, keys and the buffers
/// they passed through leave nothing in freed heap, whichever code
/// allocated them (`Zeroizing` covers only the values that are dropped, not
/// the old block a growing `Vec` leaves behind). `exec` programs are
/// processes of their own.
#[global_allocator]
static ALLOCATOR: secmem_alloc::zeroizing_alloc::ZeroizeAlloc<std::alloc::System> =
    secmem_alloc::zeroizing_alloc::ZeroizeAlloc::new(std::alloc::System);

fn main() -> std::process::ExitCode {
    kluis_enclave::cli::run_from(std::env::args_os())
}
