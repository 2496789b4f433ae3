//! The Kluis enclave application.
//!
//! Today it carries the simulated NSM's command line (`enclave nsm-sim ...`),
//! used in tests and local runs to produce attestation documents without a
//! Nitro Enclave. The enclave service itself will be further subcommands.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod nsm_sim;

/// Exit code for every failure (bad input, unusable paths, ...), as for usage errors.
const EXIT_FAILURE: u8 = 2;

/// The Kluis enclave application.
#[derive(Debug, Parser)]
#[command(name = "enclave", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// A SIMULATED Nitro Secure Module, for tests and local runs only.
    ///
    /// Its documents chain to a local simulated root, never to AWS's.
    #[command(name = "nsm-sim", subcommand)]
    NsmSim(nsm_sim::NsmSimCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::NsmSim(command) => nsm_sim::run(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line: the error and its causes, joined.
            let message = format!("{err:#}").replace('\n', " ");
            eprintln!("error: {message}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}
