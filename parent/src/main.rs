//! `parent`: runs on the EC2 host, outside the enclave. It relays the
//! enclave's verifier traffic and runs jobs; it never holds a key.
#![forbid(unsafe_code)]

#[cfg(feature = "demo")]
mod demo;
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
    Run(run_cmd::RunArgs),
    /// Relay enclave connections to the verifier (a long-running service).
    Relay(run_cmd::RelayArgs),
    /// The local demonstration, end to end on the simulated NSM: verifier,
    /// keys and policy, enclave, an encrypted dataset pseudonymised through
    /// the parent, decrypted and checked, audit verified. Exits 0 when every
    /// step behaved as it must.
    #[cfg(feature = "demo")]
    Demo {
        /// Keep the demo's files in this directory instead of a temporary one.
        #[arg(long, value_name = "DIR")]
        keep: Option<std::path::PathBuf>,
        /// Records in the sample dataset.
        #[arg(long, default_value_t = 1000)]
        records: u32,
    },
    /// The attestation verifier's command line (the demo runs it as a child).
    #[cfg(feature = "demo")]
    #[command(hide = true, disable_help_flag = true)]
    Verifier {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// The enclave's command line (the demo runs it as a child).
    #[cfg(feature = "demo")]
    #[command(hide = true, disable_help_flag = true)]
    Enclave {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
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
        #[cfg(feature = "demo")]
        Command::Demo { keep, records } => demo::run(keep.as_deref(), records),
        #[cfg(feature = "demo")]
        Command::Verifier { args } => {
            return attestation_verifier::cli::run_from(
                std::iter::once(std::ffi::OsString::from("attestation-verifier")).chain(args),
            )
        }
        #[cfg(feature = "demo")]
        Command::Enclave { args } => {
            return kluis_enclave::cli::run_from(
                std::iter::once(std::ffi::OsString::from("enclave")).chain(args),
            )
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}
