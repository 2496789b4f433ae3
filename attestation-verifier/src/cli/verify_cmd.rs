//! `verify` and `inspect`.

use crate::cli::input::{decode_document_bytes, read_bounded};
use crate::cli::report;
use crate::cli::Outcome;
use clap::Args;
use kluis_attestation::{
    describe_certificate, parse_unverified, TrustAnchor, UnixMillis, Verifier, VerifyError,
    VerifyOptions, MAX_DOCUMENT_LEN,
};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Largest root PEM file read.
const MAX_PEM_LEN: usize = 64 * 1024;

#[derive(Debug, Args)]
pub(crate) struct VerifyArgs {
    /// Trust this PEM root certificate instead of the built-in AWS Nitro root G1.
    #[arg(long, value_name = "PEM")]
    root: Option<PathBuf>,
    /// Verify as of this RFC 3339 time (e.g. 2024-11-30T16:22:48.387Z), or `doc`
    /// for the document's own timestamp. Default: now.
    #[arg(long, value_name = "TIME")]
    at: Option<String>,
    /// Require the document's nonce to equal these bytes (hex).
    #[arg(long, value_name = "HEX")]
    nonce: Option<String>,
    /// Require the document to be at most this many seconds old at the
    /// verification time.
    #[arg(long, value_name = "SECONDS")]
    max_age: Option<u64>,
    /// The document: a file of raw COSE bytes or their base64, or `-` for stdin.
    doc: PathBuf,
}

/// Print one JSON value on stdout. A closed stdout is not worth a panic.
pub(crate) fn emit(value: &Value) {
    crate::cli::print_out(&format!("{value}\n"));
}

/// A usage or I/O failure: exit 2, a JSON error on stdout, a line on stderr.
fn fail(kind: &str, message: String) -> Outcome {
    emit(&report::error_object(kind, &message));
    to_stderr!("error: {message}");
    Outcome::Failed
}

fn reject(err: &VerifyError) -> Outcome {
    emit(&report::rejection(err));
    to_stderr!("rejected ({}): {err}", err.kind());
    Outcome::Rejected
}

/// Read the document; `Err` is the outcome to return.
fn read_document(path: &Path) -> Result<Vec<u8>, Outcome> {
    // Base64 text is 4/3 the size of the bytes, plus line breaks.
    let limit = MAX_DOCUMENT_LEN.saturating_mul(2);
    match read_bounded(path, limit) {
        Ok(Some(raw)) => Ok(decode_document_bytes(raw)),
        Ok(None) => Err(reject(&VerifyError::TooLarge {
            // A file's size; for a stream, the most that was read.
            found: std::fs::metadata(path)
                .ok()
                .filter(std::fs::Metadata::is_file)
                .and_then(|m| usize::try_from(m.len()).ok())
                .unwrap_or(limit.saturating_add(1)),
            limit: MAX_DOCUMENT_LEN,
        })),
        Err(e) => Err(fail(
            "io_error",
            format!("cannot read document {}: {e}", path.display()),
        )),
    }
}

fn parse_hex(what: &str, s: &str) -> Result<Vec<u8>, Outcome> {
    hex::decode(s.trim()).map_err(|e| fail("usage", format!("{what} is not valid hex: {e}")))
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn parse_time(s: &str) -> Result<u64, Outcome> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|e| fail("usage", format!("--at {s:?} is not an RFC 3339 time: {e}")))?;
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000)
        .map_err(|_| fail("usage", format!("--at {s:?} is before 1970")))
}

fn load_anchor(root: Option<&Path>) -> Result<TrustAnchor, Outcome> {
    match root {
        None => TrustAnchor::aws_nitro_root_g1()
            .map_err(|e| fail("root", format!("built-in root unusable: {e}"))),
        Some(path) => {
            let pem = match read_bounded(path, MAX_PEM_LEN) {
                Ok(Some(pem)) => pem,
                Ok(None) => {
                    return Err(fail(
                        "root",
                        format!("{} is larger than {MAX_PEM_LEN} bytes", path.display()),
                    ))
                }
                Err(e) => {
                    return Err(fail(
                        "io_error",
                        format!("cannot read root {}: {e}", path.display()),
                    ))
                }
            };
            TrustAnchor::dangerous_from_pem(&pem)
                .map_err(|e| fail("root", format!("{}: {e}", path.display())))
        }
    }
}

pub(crate) fn run(args: &VerifyArgs) -> Outcome {
    match try_run(args) {
        Ok(outcome) | Err(outcome) => outcome,
    }
}

fn try_run(args: &VerifyArgs) -> Result<Outcome, Outcome> {
    let anchor = load_anchor(args.root.as_deref())?;
    let nonce = args
        .nonce
        .as_deref()
        .map(|n| parse_hex("--nonce", n))
        .transpose()?;
    let doc = read_document(&args.doc)?;

    let at = match args.at.as_deref() {
        None => now_ms(),
        Some("doc") => match parse_unverified(&doc) {
            Ok(parsed) => parsed.document.timestamp_ms,
            Err(e) => return Ok(reject(&e)),
        },
        Some(s) => parse_time(s)?,
    };
    let mut options = VerifyOptions::at(UnixMillis(at));
    if let Some(nonce) = nonce {
        options = options.expect_nonce(nonce);
    }
    if let Some(secs) = args.max_age {
        options = options.max_age(Duration::from_secs(secs));
    }

    let verifier = Verifier::with_cache_capacity(anchor, 0);
    match verifier.verify(&doc, &options) {
        Ok(verified) => {
            let mut out = report::document_fields(verified.document());
            out.insert(
                "document_sha384".into(),
                json!(hex::encode(verified.document_sha384())),
            );
            out.insert(
                "root_sha256".into(),
                json!(hex::encode(verified.root_sha256())),
            );
            out.insert(
                "verified_at".into(),
                report::rfc3339_millis(verified.verified_at().0),
            );
            out.insert("certificate".into(), report::certificate(verified.leaf()));
            emit(&Value::Object(out));
            to_stderr!("accepted: {}", verified.document().module_id);
            Ok(Outcome::Accepted)
        }
        Err(e) => Ok(reject(&e)),
    }
}

pub(crate) fn inspect(path: &Path) -> Outcome {
    let doc = match read_document(path) {
        Ok(doc) => doc,
        Err(outcome) => return outcome,
    };
    let parsed = match parse_unverified(&doc) {
        Ok(p) => p,
        Err(e) => return reject(&e),
    };
    let describe = |der: &[u8]| match describe_certificate(der) {
        Ok(s) => report::certificate(&s),
        Err(e) => json!({ "error": e.to_string(), "der_len": der.len() }),
    };
    let mut out = report::document_fields(&parsed.document);
    out.insert(
        "document_sha384".into(),
        json!(hex::encode(parsed.document_sha384)),
    );
    out.insert("signature".into(), json!(hex::encode(&parsed.signature)));
    out.insert("certificate".into(), describe(&parsed.document.certificate));
    out.insert(
        "cabundle".into(),
        Value::Array(
            parsed
                .document
                .cabundle
                .iter()
                .map(|c| describe(c))
                .collect(),
        ),
    );
    out.insert(
        "note".into(),
        json!("inspected without verification: nothing here is trusted"),
    );
    emit(&Value::Object(out));
    Outcome::Accepted
}
