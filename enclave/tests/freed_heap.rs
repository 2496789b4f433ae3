//! The enclave program's allocator leaves no plaintext in freed heap: a
//! buffer that grew (moved to larger blocks) and was dropped is found
//! nowhere in the process's memory. This binary allocates exactly as the
//! `enclave` program does (its `main.rs`), and the program is checked to
//! carry that allocator; `freed_heap_control.rs` runs the same search with
//! the plain system allocator and finds the secret, so this search can
//! fail.

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

mod support;

#[global_allocator]
static ALLOCATOR: secmem_alloc::zeroizing_alloc::ZeroizeAlloc<std::alloc::System> =
    secmem_alloc::zeroizing_alloc::ZeroizeAlloc::new(std::alloc::System);

#[test]
fn a_grown_and_dropped_buffer_leaves_nothing_in_freed_heap() {
    // Under the allocator's mmap threshold, so its blocks are not unmapped
    // when freed (glibc keeps the small ones aside, where the control finds
    // them).
    support::heap::grow_and_drop_a_secret(64 * 1024);
    assert_eq!(support::heap::marker_copies(), 0);
}

/// The `enclave` program is built with this allocator: its code is in the
/// binary (the crate is linked for nothing else).
#[test]
fn the_enclave_program_allocates_through_the_wiping_allocator() {
    let binary = std::fs::read(env!("CARGO_BIN_EXE_enclave")).unwrap();
    assert!(memchr::memmem::find(&binary, b"ZeroizeAlloc").is_some());
}
