//! The `attestation-verifier` command line, as a library so that other
//! programs (the local demonstration, `kluis-demo`) can run exactly the
//! commands an operator runs.
//!
//! Exit codes, one rule for every command (see `session::finish`): 0
//! accepted/done, 1 rejected/refused (a decision, or something checked is
//! not intact), 2 usage or I/O error, with `{"error": {"kind", "message"}}`
//! on stdout. Never a panic.

mod admin_cmd;
mod data_cmd;
mod evidence_cmd;
mod input;
mod job_cmd;
mod output;
mod report;
mod serve_cmd;
mod session;
mod verify_cmd;

use clap::{Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

/// Kluis attestation verifier.
#[derive(Debug, Parser)]
#[command(name = "attestation-verifier", version, about)]
struct Cli {
    #[command(flatten)]
    store: session::StoreArgs,
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
    /// Create a store: root secret, verifier identity, audit log, and the first
    /// key-admin and app-admin credentials.
    Init(admin_cmd::InitArgs),
    /// Apply the schema migrations this build knows to the store's
    /// database (--database URL); `init` does this for a new one.
    Migrate,
    /// Administrators.
    #[command(subcommand)]
    Admin(admin_cmd::AdminCommand),
    /// Customer master keys (key administrators).
    #[command(subcommand)]
    Key(admin_cmd::KeyCommand),
    /// Key policies (application administrators).
    #[command(subcommand)]
    Policy(admin_cmd::PolicyCommand),
    /// Print the verifier's public identity key (to build into the enclave image).
    Identity,
    /// The audit log.
    #[command(subcommand)]
    Audit(admin_cmd::AuditCommand),
    /// Controller-signed job authorisations (application administrators).
    #[command(subcommand)]
    Job(job_cmd::JobCommand),
    /// Run the key-release service.
    Serve(serve_cmd::ServeArgs),
    /// Encrypt or decrypt data on the controller side (streaming envelope).
    #[command(subcommand)]
    Data(data_cmd::DataCommand),
    /// Check evidence offline (bundles, shredding receipts, checkpoints):
    /// no store, credential or network.
    #[command(subcommand)]
    Evidence(evidence_cmd::EvidenceCommand),
}

/// Logs go to stderr, filtered by RUST_LOG (default: warnings). They never
/// carry key material or credentials.
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

/// A usage error on standard output, the rule of every other failure:
/// exit 2.
fn usage_error(message: &str) -> ExitCode {
    verify_cmd::emit(&serde_json::json!({ "error": { "kind": "usage", "message": message } }));
    let _ = std::io::stdout().flush();
    ExitCode::from(2)
}

/// A usage error as one line: clap's message up to its usage section (a
/// missing argument is named on the lines after the first).
fn usage_message(text: &str) -> String {
    text.lines()
        .take_while(|line| !line.trim().is_empty() && !line.starts_with("Usage:"))
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The outcome of a command, mapped to the documented exit codes.
pub(crate) enum Outcome {
    Accepted,
    Rejected,
    Failed,
}

/// Set when writing to standard output failed during this run.
static STDOUT_FAILED: AtomicBool = AtomicBool::new(false);

/// Writes `text` to standard output. A failure (a full disk behind a
/// redirect, a closed pipe) is remembered, and the command then exits 2:
/// output that did not reach its reader whole (a checkpoint, a record
/// listing, a proof) must never look like success. Returns whether it was
/// written (a listing stops at the first failure).
pub(crate) fn print_out(text: &str) -> bool {
    let written = std::io::stdout().lock().write_all(text.as_bytes()).is_ok();
    if !written {
        STDOUT_FAILED.store(true, Ordering::SeqCst);
    }
    written
}

/// Run the command line on `args` (the first item is the program name) and
/// return the process exit code: 0 accepted/done, 1 rejected/refused, 2 usage
/// or I/O error.
pub fn run_from<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            if !e.use_stderr() {
                // --help, --version
                return ExitCode::SUCCESS;
            }
            // Usage errors follow the rule of every other failure.
            return usage_error(&usage_message(&e.to_string()));
        }
    };
    let store = &cli.store;
    if store.store.is_some() && store.database.is_some() {
        // Either may come from the environment (a quick start exports
        // KLUIS_STORE): say so, rather than name only the options.
        let message = "error: a store directory (--store or KLUIS_STORE) and a database \
                       (--database or KLUIS_DATABASE_URL) are both given: use one (unset \
                       KLUIS_STORE to use a database)";
        to_stderr!("{message}");
        return usage_error(message);
    }
    init_logging();
    let outcome = match &cli.command {
        Command::Verify(args) => verify_cmd::run(args),
        Command::Inspect { doc } => verify_cmd::inspect(doc),
        Command::Init(args) => session::finish(admin_cmd::init(store, args)),
        Command::Migrate => session::finish(admin_cmd::migrate(store)),
        Command::Admin(c) => session::finish(admin_cmd::admin(store, c)),
        Command::Key(c) => session::finish(admin_cmd::key(store, c)),
        Command::Policy(c) => session::finish(admin_cmd::policy(store, c)),
        Command::Identity => session::finish(admin_cmd::identity(store)),
        Command::Audit(c) => session::finish(admin_cmd::audit(store, c)),
        Command::Job(c) => session::finish(job_cmd::job(store, c)),
        Command::Serve(args) => session::finish(serve_cmd::serve(store, args)),
        Command::Data(c) => session::finish(data_cmd::data(store, c)),
        Command::Evidence(c) => session::finish(evidence_cmd::evidence(c)),
    };
    // Flush explicitly: a closed stdout must not turn into a panic.
    let flushed = std::io::stdout().flush();
    if (flushed.is_err() || STDOUT_FAILED.load(Ordering::SeqCst))
        && matches!(outcome, Outcome::Accepted)
    {
        // What the command did (a change, if it makes one) is done; only
        // its report is lost. A refusal stays a refusal (exit 1).
        to_stderr!(
            "error: the output could not be written in full to standard output \
             (whatever the command changes was changed)"
        );
        return ExitCode::from(2);
    }
    match outcome {
        Outcome::Accepted => ExitCode::SUCCESS,
        Outcome::Rejected => ExitCode::from(1),
        Outcome::Failed => ExitCode::from(2),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_debug_print_of_the_arguments_never_shows_the_database_password() {
        let cli = Cli::try_parse_from([
            "attestation-verifier",
            "--database",
            "postgresql://kluis:s3cr3t-pw@db.example/kluis",
            "migrate",
        ])
        .unwrap();
        let printed = format!("{cli:?}");
        assert!(!printed.contains("s3cr3t-pw"), "{printed}");
        assert!(printed.contains("DatabaseUrl(<redacted>)"), "{printed}");
    }

    #[test]
    fn a_usage_error_names_what_is_missing_on_one_line() {
        let e = Cli::try_parse_from(["attestation-verifier", "key", "rotate"]).unwrap_err();
        let message = usage_message(&e.to_string());
        assert!(
            message.starts_with("error: the following required arguments were not provided:"),
            "{message}"
        );
        assert!(message.ends_with("provided: <NAME>"), "{message}");
        assert!(
            !message.contains('\n') && !message.contains("Usage:"),
            "{message}"
        );
    }
}
