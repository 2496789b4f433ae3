//! The `--job SPEC` syntax of `parent run` (shared with the enclave's
//! `allowed_jobs`, so it lives in `kluis_proto::job`).

pub use kluis_proto::job::{parse_workload as parse, SpecError};
