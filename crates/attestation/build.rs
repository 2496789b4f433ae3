//! Only decides whether the real-vector tests run (see `vectors_cfg.rs`); the
//! library itself does not depend on anything here.
include!("vectors_cfg.rs");

fn main() {
    emit_vectors_cfg("../../../shared/vectors/nitro-real");
}
