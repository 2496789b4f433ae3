//! `parent`: runs on the EC2 host, outside the enclave. It relays the
//! enclave's verifier traffic and runs jobs; it never holds a key.
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

mod run_cmd;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Kluis parent (relay and job runner on the EC2 host).
#[derive(Debug, Parser)]
#[command(name = "parent", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a job: stream the encrypted input through the enclave and write
    /// the encrypted output, relaying the enclave's key request to the verifier.
    Run(Box<run_cmd::RunArgs>),
    /// Relay enclave connections to the verifier (a long-running service).
    Relay(run_cmd::RelayArgs),
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A log line standard error cannot take is lost, not reported
        // through `eprintln!` (which would panic on a closed stderr).
        .log_internal_errors(false)
        // Colours only for a terminal: never escape codes in a log file.
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none(),
        )
        .try_init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => {
            init_logging();
            run_cmd::run(&args)
        }
        Command::Relay(args) => {
            init_logging();
            run_cmd::relay(&args)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            to_stderr!(
                "error: {}",
                kluis_proto::report::error_text(e.as_ref()).replace('\n', " ")
            );
            ExitCode::FAILURE
        }
    }
}
