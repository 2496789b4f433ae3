//! `kluis-demo`: the whole of Kluis on one machine, on the simulated NSM.
//!
//! This binary, and only this one, links all three programs: it runs the
//! controller's verifier and the enclave as child processes of itself (its
//! hidden `verifier` and `enclave` commands, the programs' real command
//! lines), and the parent's relay and job runner in-process. The production
//! programs are built separately: `parent` holds no verifier or enclave
//! code, and the enclave image holds no simulator.
#![forbid(unsafe_code)]
#![deny(clippy::print_stderr)]

/// `eprintln!` that cannot panic: a line for standard error that is closed
/// or full (`2>&1 | head`, `2>/dev/full`) is lost, and the program goes on
/// to its documented exit instead of a panic.
macro_rules! to_stderr {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

mod demo;

/// The verifier and the enclave run as children of this binary: they
/// allocate as their own programs do (every freed block wiped; see their
/// `main.rs`).
#[global_allocator]
static ALLOCATOR: secmem_alloc::zeroizing_alloc::ZeroizeAlloc<std::alloc::System> =
    secmem_alloc::zeroizing_alloc::ZeroizeAlloc::new(std::alloc::System);

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// The Kluis local demonstration, end to end on the simulated NSM: verifier,
/// keys and policy, enclave, an encrypted dataset pseudonymised through the
/// parent, decrypted and checked, audit verified. Exits 0 when every step
/// behaved as it must.
#[derive(Debug, Parser)]
#[command(
    name = "kluis-demo",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Keep the demo's files in this directory instead of a temporary one.
    #[arg(long, value_name = "DIR")]
    keep: Option<std::path::PathBuf>,
    /// Records in the sample dataset.
    #[arg(long, default_value_t = 1000)]
    records: u32,
    /// Keep the master keys, the store root and the verifier identity in a
    /// PKCS#11 token instead of the store: the SoftHSM2 module (for example
    /// /usr/lib/softhsm/libsofthsm2.so). The demo makes a throw-away token
    /// in its own directory.
    #[arg(long, value_name = "PATH")]
    hsm_module: Option<std::path::PathBuf>,
    /// Keep the verifier's store, audit log and challenge nonces in
    /// PostgreSQL: a server URL (e.g. postgresql://postgres@127.0.0.1:5432/test)
    /// on which the demo makes a database of its own, dropped at the end.
    #[arg(long, value_name = "URL")]
    database: Option<String>,
    /// Run this many verifier replicas on that database (needs --database);
    /// the first is killed with SIGKILL right after the first key release,
    /// and the rest of the demo is served by the others.
    #[arg(long, default_value_t = 1, value_name = "N")]
    replicas: usize,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The attestation verifier's command line (the demo runs it as a child).
    #[command(hide = true, disable_help_flag = true)]
    Verifier {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// The enclave's command line (the demo runs it as a child).
    #[command(hide = true, disable_help_flag = true)]
    Enclave {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Verifier { args }) => attestation_verifier::cli::run_from(
            std::iter::once(std::ffi::OsString::from("attestation-verifier")).chain(args),
        ),
        Some(Command::Enclave { args }) => kluis_enclave::cli::run_from(
            std::iter::once(std::ffi::OsString::from("enclave")).chain(args),
        ),
        None => match demo::run(
            cli.keep.as_deref(),
            cli.records,
            &demo::Deployment {
                hsm_module: cli.hsm_module.as_deref(),
                database: cli.database.as_deref(),
                replicas: cli.replicas,
            },
        ) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                to_stderr!(
                    "\ndemo FAILED: {}",
                    kluis_proto::report::error_text(e.as_ref()).replace('\n', " ")
                );
                if cli.keep.is_none() {
                    to_stderr!(
                        "(run with --keep DIR to keep the logs of the verifier and the enclave)"
                    );
                }
                ExitCode::FAILURE
            }
        },
    }
}
