//! The `verify` / `inspect` command-line contract: exit codes, JSON shapes,
//! input forms. Drives the real binary.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing
)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_attestation-verifier"))
}

/// The real-vector folder. Tests that read it are compiled ignored (cargo test
/// prints "ignored, SKIPPED: ...") when it is absent at build time, unless
/// `KLUIS_REQUIRE_VECTORS=1` (see `crates/attestation/vectors_cfg.rs`); so
/// reaching this without it is a failure, never a silent pass.
fn vectors() -> PathBuf {
    let p = match std::env::var_os("KLUIS_NITRO_VECTORS") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/vectors/nitro-real"),
    };
    assert!(
        p.join("yawn-1.cbor").is_file(),
        "real Nitro vectors required (KLUIS_REQUIRE_VECTORS=1, or present at build time) \
         but {} has no yawn-1.cbor",
        p.display()
    );
    p
}

fn run(args: &[&str], stdin: Option<&[u8]>) -> (i32, serde_json::Value, String) {
    let mut child = bin()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        let mut pipe = child.stdin.take().unwrap();
        if let Some(bytes) = stdin {
            pipe.write_all(bytes).unwrap();
        }
    }
    let Output {
        status,
        stdout,
        stderr,
    } = child.wait_with_output().unwrap();
    let code = status.code().expect("terminated by a signal");
    let json = serde_json::from_slice(&stdout).unwrap_or(serde_json::Value::Null);
    (code, json, String::from_utf8_lossy(&stderr).into_owned())
}

const YAWN_AT: &str = "2025-01-06T16:07:05.472Z";

fn yawn(dir: &Path) -> String {
    dir.join("yawn-1.cbor").display().to_string()
}

#[test]
#[cfg_attr(
    kluis_vectors_absent,
    ignore = "SKIPPED: no real Nitro vectors (../shared/vectors/nitro-real)"
)]
fn accepted_document_prints_the_documented_fields() {
    let dir = vectors();
    let (code, json, stderr) = run(&["verify", "--at", YAWN_AT, &yawn(&dir)], None);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(json["module_id"], "i-0bee92034f3d60691-enc01943c5eaab3ad6a");
    assert_eq!(json["timestamp"], 1_736_179_625_472u64);
    assert_eq!(json["digest"], "SHA384");
    assert_eq!(json["pcrs"].as_object().unwrap().len(), 16);
    let pcr0 = json["pcrs"]["0"].as_str().unwrap();
    assert_eq!(pcr0.len(), 96);
    assert_eq!(pcr0, pcr0.to_lowercase());
    assert_eq!(json["public_key"].as_str().unwrap().len(), 2 * 294);
    assert!(json["user_data"].is_null());
    assert!(json["nonce"].is_null());
    assert!(json["certificate"]["subject"]
        .as_str()
        .unwrap()
        .contains("enc01943c5eaab3ad6a"));
    assert_eq!(json["certificate"]["not_after"], "2025-01-06T19:07:05Z");
    assert!(json["certificate"]["not_before"].is_string());
}

#[test]
#[cfg_attr(
    kluis_vectors_absent,
    ignore = "SKIPPED: no real Nitro vectors (../shared/vectors/nitro-real)"
)]
fn empty_fields_print_as_empty_strings() {
    let dir = vectors();
    let doc = dir.join("blocky-nitrite-1.cbor").display().to_string();
    let (code, json, stderr) = run(&["verify", "--at", "doc", &doc], None);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(json["user_data"], "");
    assert_eq!(json["nonce"], "");
}

#[test]
#[cfg_attr(
    kluis_vectors_absent,
    ignore = "SKIPPED: no real Nitro vectors (../shared/vectors/nitro-real)"
)]
fn rejection_is_exit_1_with_a_stable_kind() {
    let dir = vectors();
    let (code, json, stderr) = run(&["verify", &yawn(&dir)], None); // today: expired
    assert_eq!(code, 1);
    assert_eq!(json["error"]["kind"], "chain_expired");
    assert!(json["error"]["message"]
        .as_str()
        .unwrap()
        .contains("expired"));
    assert_eq!(stderr.lines().count(), 1, "one line on stderr: {stderr}");

    let neg = dir
        .join("negative-veracruz-1-sigflip.cbor")
        .display()
        .to_string();
    let (code, json, _) = run(&["verify", "--at", "doc", &neg], None);
    assert_eq!(code, 1);
    assert_eq!(json["error"]["kind"], "signature_invalid");
}

#[test]
#[cfg_attr(
    kluis_vectors_absent,
    ignore = "SKIPPED: no real Nitro vectors (../shared/vectors/nitro-real)"
)]
fn nonce_and_max_age_are_checked() {
    let dir = vectors();
    let doc = dir.join("veracruz-1.cbor").display().to_string();
    let (code, json, stderr) = run(&["verify", "--at", "doc", &doc], None);
    assert_eq!(code, 0, "{stderr}");
    let nonce = json["nonce"].as_str().unwrap().to_owned();
    assert_eq!(
        run(&["verify", "--at", "doc", "--nonce", &nonce, &doc], None).0,
        0
    );
    assert_eq!(
        run(
            &[
                "verify",
                "--at",
                "doc",
                "--nonce",
                &nonce.to_uppercase(),
                &doc
            ],
            None
        )
        .0,
        0
    );
    let (code, json, _) = run(&["verify", "--at", "doc", "--nonce", "00", &doc], None);
    assert_eq!(
        (code, json["error"]["kind"].as_str()),
        (1, Some("nonce_mismatch"))
    );

    let at = json_time_plus(&doc, 10_000);
    assert_eq!(
        run(&["verify", "--at", &at, "--max-age", "60", &doc], None).0,
        0
    );
    let (code, json, _) = run(&["verify", "--at", &at, "--max-age", "5", &doc], None);
    assert_eq!(
        (code, json["error"]["kind"].as_str()),
        (1, Some("document_too_old"))
    );
}

/// The document's own time plus `ms`, as RFC 3339.
fn json_time_plus(doc: &str, ms: i64) -> String {
    let (_, json, _) = run(&["verify", "--at", "doc", doc], None);
    let ts = json["timestamp"].as_i64().unwrap() + ms;
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ts) * 1_000_000).unwrap();
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

#[test]
#[cfg_attr(
    kluis_vectors_absent,
    ignore = "SKIPPED: no real Nitro vectors (../shared/vectors/nitro-real)"
)]
fn stdin_and_base64_are_accepted() {
    let dir = vectors();
    let raw = std::fs::read(dir.join("yawn-1.cbor")).unwrap();
    assert_eq!(run(&["verify", "--at", YAWN_AT, "-"], Some(&raw)).0, 0);
    use base64::Engine;
    let text = base64::engine::general_purpose::STANDARD.encode(&raw);
    assert_eq!(
        run(&["verify", "--at", YAWN_AT, "-"], Some(text.as_bytes())).0,
        0
    );
}

#[test]
fn usage_and_io_errors_are_exit_2() {
    let (code, json, _) = run(&["verify", "/nonexistent/doc.cbor"], None);
    assert_eq!(
        (code, json["error"]["kind"].as_str()),
        (2, Some("io_error"))
    );
    let dir = tempfile::tempdir().unwrap();
    let doc = dir.path().join("d");
    std::fs::write(&doc, [0x84]).unwrap();
    let doc = doc.display().to_string();
    assert_eq!(run(&["verify", "--nonce", "zz", &doc], None).0, 2);
    assert_eq!(run(&["verify", "--at", "yesterday", &doc], None).0, 2);
    assert_eq!(run(&["verify", "--max-age", "-1", &doc], None).0, 2);
    assert_eq!(
        run(&["verify", "--root", "/nonexistent.pem", &doc], None).0,
        2
    );
    assert_eq!(run(&["verify"], None).0, 2);
    assert_eq!(run(&["frobnicate"], None).0, 2);
}

#[test]
fn garbage_is_a_rejection_never_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    for (i, bytes) in [
        vec![],
        vec![0x84],
        vec![0xff; 100],
        vec![0x81; 100_000],
        b"not base64 at all !!".to_vec(),
        vec![0x84; 70_000],
    ]
    .iter()
    .enumerate()
    {
        let p = dir.path().join(format!("g{i}"));
        std::fs::write(&p, bytes).unwrap();
        let (code, json, stderr) = run(&["verify", &p.display().to_string()], None);
        assert_eq!(code, 1, "input {i}: {stderr}");
        assert!(json["error"]["kind"].is_string(), "input {i}");
    }
}

#[test]
fn simulated_root_is_trusted_only_when_given() {
    let dir = tempfile::tempdir().unwrap();
    let nsm = kluis_nsm::sim::SimulatedNsm::new(kluis_nsm::sim::SimConfig::default()).unwrap();
    let doc = kluis_nsm::attest(&nsm, None, Some(&[1, 2, 3]), None).unwrap();
    let doc_path = dir.path().join("doc.cbor");
    std::fs::write(&doc_path, &doc).unwrap();
    let root_path = dir.path().join("root.pem");
    std::fs::write(&root_path, nsm.root().root_pem()).unwrap();
    let doc_arg = doc_path.display().to_string();

    let (code, json, _) = run(&["verify", &doc_arg], None);
    assert_eq!(
        (code, json["error"]["kind"].as_str()),
        (1, Some("chain_untrusted_root"))
    );
    let root_arg = root_path.display().to_string();
    let (code, json, stderr) = run(
        &["verify", "--root", &root_arg, "--nonce", "010203", &doc_arg],
        None,
    );
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(json["nonce"], "010203");
}

#[test]
#[cfg_attr(
    kluis_vectors_absent,
    ignore = "SKIPPED: no real Nitro vectors (../shared/vectors/nitro-real)"
)]
fn inspect_shows_the_whole_chain_without_judging() {
    let dir = vectors();
    // Expired today and signature-flipped: inspect still prints it.
    let neg = dir
        .join("negative-veracruz-1-sigflip.cbor")
        .display()
        .to_string();
    let (code, json, stderr) = run(&["inspect", &neg], None);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(json["cabundle"].as_array().unwrap().len(), 4);
    assert_eq!(
        json["cabundle"][0]["subject"],
        "C=US, O=Amazon, OU=AWS, CN=aws.nitro-enclaves"
    );
    assert_eq!(json["cabundle"][1]["path_len"], 2);
    assert!(json["module_id"].is_string());
    assert_eq!(json["signature"].as_str().unwrap().len(), 192);
}

/// The program is built with the wiping allocator of its `main.rs` (every
/// freed block wiped; tested in `enclave/tests/freed_heap.rs`): its code is
/// in the binary, which links the crate for nothing else.
#[test]
fn the_verifier_program_allocates_through_the_wiping_allocator() {
    let binary = std::fs::read(env!("CARGO_BIN_EXE_attestation-verifier")).unwrap();
    assert!(binary.windows(12).any(|w| w == b"ZeroizeAlloc"));
}

/// A document file far over the limit is rejected naming its own size,
/// not the bytes a bounded read took.
#[test]
fn an_oversized_document_is_rejected_with_its_size() {
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.cbor");
    std::fs::write(&big, vec![0x84u8; 3 << 20]).unwrap();
    let (code, json, stderr) = run(&["verify", big.to_str().unwrap()], None);
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(json["error"]["kind"], "document_too_large", "{json}");
    let message = json["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(&format!("{} bytes", 3 << 20)), "{json}");
}
