//! `attestation-verifier`: run by the data controller, on its own premises.
//!
//! Verifies Nitro attestation documents against the pinned AWS root (this
//! issue's scope), and will hold the key hierarchy, policy and audit log.
//!
//! Exit codes: 0 accepted, 1 rejected, 2 usage or I/O error. Never a panic.
#![forbid(unsafe_code)]

mod input;
mod report;
mod verify_cmd;

use clap::{Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

/// Kluis attestation verifier.
#[derive(Debug, Parser)]
#[command(name = "attestation-verifier", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Verify an attestation document (COSE_Sign1) against the pinned root.
    ///
    /// Exit 0 and a JSON report on stdout when accepted; exit 1 and
    /// {"error": {"kind", "message"}} when rejected; exit 2 on usage or I/O errors.
    Verify(verify_cmd::VerifyArgs),
    /// Print what a document says, and its whole certificate chain, without
    /// judging it. For operators; never a basis for trust.
    Inspect {
        /// The document: a file of raw COSE bytes or their base64, or `-` for stdin.
        doc: PathBuf,
    },
}

/// The outcome of a command, mapped to the documented exit codes.
pub(crate) enum Outcome {
    Accepted,
    Rejected,
    Failed,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Verify(args) => verify_cmd::run(&args),
        Command::Inspect { doc } => verify_cmd::inspect(&doc),
    };
    // Flush explicitly: a closed stdout must not turn into a panic.
    let _ = std::io::stdout().flush();
    match outcome {
        Outcome::Accepted => ExitCode::SUCCESS,
        Outcome::Rejected => ExitCode::from(1),
        Outcome::Failed => ExitCode::from(2),
    }
}
