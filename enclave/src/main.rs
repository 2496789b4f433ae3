//! The Kluis enclave application (see the `kluis_enclave` library).
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    kluis_enclave::cli::run_from(std::env::args_os())
}
