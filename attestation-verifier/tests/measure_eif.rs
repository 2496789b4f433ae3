//! `attestation-verifier policy measure-eif`: the binary measures an EIF built
//! here, without any store or credential, and its output is a measurement set
//! that the policy parser accepts with the PCRs kluis-eif computes.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing
)]

use attestation_verifier::policy::KeyPolicy;
use std::path::Path;
use std::process::Command;

struct Output {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs the binary with no store, root key, passphrase or credential in
/// its environment, from an empty working directory.
fn run(cwd: &Path, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_attestation-verifier"))
        .current_dir(cwd)
        .env_remove("KLUIS_STORE")
        .env_remove("KLUIS_ROOT_KEY_FILE")
        .env_remove("KLUIS_CREDENTIAL_FILE")
        .env_remove("KLUIS_STORE_PASSPHRASE")
        .args(["policy", "measure-eif"])
        .args(args)
        .output()
        .unwrap();
    Output {
        code: out.status.code().expect("killed by a signal"),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

fn builder() -> kluis_eif::EifBuilder {
    kluis_eif::EifBuilder::new(b"pretend kernel", b"console=ttyS0")
        .metadata(br#"{"ImageName":"kluis-enclave"}"#)
        .ramdisk(b"bootstrap ramdisk")
        .ramdisk(b"application ramdisk")
}

fn write_eif(dir: &Path, file: &str, bytes: &[u8]) -> (String, kluis_eif::Measurements) {
    let path = dir.join(file);
    std::fs::write(&path, bytes).unwrap();
    let measured = kluis_eif::measure(std::fs::File::open(&path).unwrap()).unwrap();
    (path.display().to_string(), measured)
}

/// The fragment completed into a whole policy, as an administrator would.
fn as_policy(fragment: &str) -> KeyPolicy {
    let text = format!("operations = [\"decrypt\"]\nmax_document_age_seconds = 300\n\n{fragment}");
    KeyPolicy::from_toml_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

#[test]
fn prints_a_policy_entry_with_the_image_pcrs() {
    let dir = tempfile::tempdir().unwrap();
    let (eif, measured) = write_eif(dir.path(), "enclave.eif", &builder().build().unwrap());

    let out = run(dir.path(), &[&eif, "--name", "enclave-v1"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout.starts_with("[[measurements]]\n"),
        "{}",
        out.stdout
    );
    assert!(!out.stdout.contains("pcr8"));
    assert!(out.stderr.contains("not signed"), "{}", out.stderr);

    let policy = as_policy(&out.stdout);
    let set = &policy.measurements()[0];
    assert_eq!(set.name, "enclave-v1");
    assert_eq!(set.pcr0, Some(measured.pcr0));
    assert_eq!(set.pcr1, Some(measured.pcr1));
    assert_eq!(set.pcr2, Some(measured.pcr2));
    assert_eq!(set.pcr8, None);

    // Without --name the set is named after the file.
    let out = run(dir.path(), &[&eif]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(as_policy(&out.stdout).measurements()[0].name, "enclave");

    // Nothing was created next to the image or in the working directory.
    let entries: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(entries.len(), 1);
}

#[test]
fn a_signed_image_pins_pcr8_and_out_writes_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let signer =
        rcgen::generate_simple_self_signed(vec!["enclave-signer.example".to_owned()]).unwrap();
    let signed = builder()
        .signature(signer.cert.pem().as_bytes(), b"cose-sign1 bytes")
        .unwrap()
        .build()
        .unwrap();
    let (eif, measured) = write_eif(dir.path(), "signed.eif", &signed);
    assert!(measured.pcr8.is_some());

    let fragment = dir.path().join("fragment.toml");
    let fragment_arg = fragment.display().to_string();
    let out = run(
        dir.path(),
        &[&eif, "--name", "signed-v2", "--out", &fragment_arg],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let summary: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(summary["signed"], true);
    assert_eq!(summary["pcr0"], hex::encode(measured.pcr0));

    let text = std::fs::read_to_string(&fragment).unwrap();
    let policy = as_policy(&text);
    let set = &policy.measurements()[0];
    assert_eq!(set.name, "signed-v2");
    assert_eq!(set.pcr0, Some(measured.pcr0));
    assert_eq!(set.pcr8, measured.pcr8);

    // An existing file is not overwritten.
    let again = run(
        dir.path(),
        &[&eif, "--name", "signed-v2", "--out", &fragment_arg],
    );
    assert_eq!(again.code, 2, "{}", again.stderr);
    assert_eq!(std::fs::read_to_string(&fragment).unwrap(), text);
}

#[test]
fn a_corrupt_image_is_refused_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = builder().build().unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    let corrupt = dir.path().join("corrupt.eif");
    std::fs::write(&corrupt, &bytes).unwrap();
    let out = run(dir.path(), &[corrupt.to_str().unwrap()]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    let error: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(error["error"]["kind"], "eif_crc_mismatch");

    let missing = dir.path().join("missing.eif").display().to_string();
    assert_eq!(run(dir.path(), &[&missing]).code, 2);

    let good = dir.path().join("good.eif");
    std::fs::write(&good, builder().build().unwrap()).unwrap();
    let out = run(dir.path(), &[good.to_str().unwrap(), "--name", "bad\tname"]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("--name"), "{}", out.stderr);
}
