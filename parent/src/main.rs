//! `parent`: runs on the EC2 host, outside the enclave. It relays ciphertext
//! between the enclave and the verifier and runs jobs; it never holds a key.
//!
//! Today it carries the local demonstration (`parent demo`): the attestation
//! half of the key-release protocol, end to end, on the simulated NSM.
#![forbid(unsafe_code)]

mod demo;

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
    /// Run the local demonstration on the simulated NSM: an enclave attests with
    /// an ephemeral key and the verifier's nonce; the verifier checks the document
    /// against the (explicitly trusted) simulated root, then shows the attacks it
    /// refuses. Exits 0 when every step behaved as it must.
    Demo {
        /// Keep the demo's files (root certificate, document) in this directory
        /// instead of a temporary one.
        #[arg(long, value_name = "DIR")]
        keep: Option<std::path::PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo { keep } => demo::run(keep.as_deref()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}
