//! The control of `freed_heap.rs`: with the plain system allocator, the
//! same grown and dropped buffer is still in freed heap, so the search
//! there finds what it looks for.

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

mod support;

#[test]
fn the_system_allocator_leaves_the_buffer_in_freed_heap() {
    support::heap::grow_and_drop_a_secret(64 * 1024);
    assert!(support::heap::marker_copies() > 0);
}
