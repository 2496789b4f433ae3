//! Only decides whether the real-vector tests run (see
//! `crates/attestation/vectors_cfg.rs`); the binary does not depend on it.
include!("../crates/attestation/vectors_cfg.rs");

fn main() {
    emit_vectors_cfg("../../shared/vectors/nitro-real");
}
