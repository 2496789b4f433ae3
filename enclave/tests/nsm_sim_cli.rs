//! `enclave nsm-sim` end to end: the binary, a temporary state directory.

// Test code: a failed expectation is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::Path;
use std::process::{Command, Output, Stdio};

use ciborium::Value;

fn enclave(args: &[&str], env_state: Option<&Path>) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_enclave"));
    command
        .args(args)
        .env_remove("KLUIS_NSM_SIM_DIR")
        .env_remove("XDG_STATE_HOME")
        .stdin(Stdio::null());
    if let Some(dir) = env_state {
        command.env("KLUIS_NSM_SIM_DIR", dir);
    }
    command.output().unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

fn assert_ok(output: &Output) {
    assert!(
        output.status.success(),
        "status {:?}, stderr: {}",
        output.status,
        stderr(output)
    );
    assert!(stderr(output).contains("SIMULATED Nitro Secure Module"));
}

/// Exit code 2 and a single `error:` line after the warning, no panic.
fn assert_fails_with(output: &Output, expected: &str) {
    assert_eq!(output.status.code(), Some(2), "stderr: {}", stderr(output));
    let stderr = stderr(output);
    assert!(!stderr.contains("panicked"), "{stderr}");
    let errors: Vec<_> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(errors[0].contains(expected), "{stderr}");
}

fn payload(document: &[u8]) -> Vec<(Value, Value)> {
    let Value::Array(items) = ciborium::from_reader::<Value, _>(document).unwrap() else {
        panic!("not a COSE_Sign1 array")
    };
    let payload = items[2].as_bytes().unwrap();
    let Value::Map(map) = ciborium::from_reader::<Value, _>(payload.as_slice()).unwrap() else {
        panic!("payload not a map")
    };
    map
}

fn field<'a>(map: &'a [(Value, Value)], key: &str) -> &'a Value {
    &map.iter()
        .find(|(k, _)| k.as_text() == Some(key))
        .unwrap()
        .1
}

fn pcr(map: &[(Value, Value)], index: u8) -> Vec<u8> {
    field(map, "pcrs")
        .as_map()
        .unwrap()
        .iter()
        .find(|(k, _)| k.as_integer() == Some(index.into()))
        .unwrap()
        .1
        .as_bytes()
        .unwrap()
        .clone()
}

#[test]
fn init_then_export_root() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let state_arg = state.to_str().unwrap();

    let first = enclave(&["nsm-sim", "init", "--state", state_arg], None);
    assert_ok(&first);
    let text = stdout(&first);
    assert!(text.contains("simulated NSM root created"), "{text}");
    assert!(text.contains(state_arg), "{text}");
    let fingerprint = text
        .lines()
        .find_map(|l| l.strip_prefix("SHA-256 fingerprint: "))
        .unwrap()
        .to_owned();
    assert_eq!(fingerprint.len(), 64);

    // Through the environment variable this time: the same root is loaded.
    let second = enclave(&["nsm-sim", "init"], Some(&state));
    assert_ok(&second);
    assert!(stdout(&second).contains("simulated NSM root loaded"));
    assert!(stdout(&second).contains(&fingerprint));

    let exported = enclave(&["nsm-sim", "export-root", "--state", state_arg], None);
    assert_ok(&exported);
    let pem = stdout(&exported);
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
    assert!(!pem.contains("PRIVATE"));
    assert_eq!(
        pem,
        std::fs::read_to_string(state.join("root-cert.pem")).unwrap()
    );

    let out = dir.path().join("root.pem");
    let to_file = enclave(
        &[
            "nsm-sim",
            "export-root",
            "--state",
            state_arg,
            "--out",
            out.to_str().unwrap(),
        ],
        None,
    );
    assert_ok(&to_file);
    assert_eq!(std::fs::read_to_string(&out).unwrap(), pem);
    assert!(stdout(&to_file).is_empty());
}

#[test]
fn export_root_without_init_fails() {
    let dir = tempfile::tempdir().unwrap();
    let output = enclave(
        &[
            "nsm-sim",
            "export-root",
            "--state",
            dir.path().to_str().unwrap(),
        ],
        None,
    );
    assert_fails_with(&output, "run `enclave nsm-sim init` first");
}

#[test]
fn attest_writes_a_document_chained_to_the_state_root() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let out = dir.path().join("doc.cbor");
    let pcr3 = "33".repeat(48);
    let output = enclave(
        &[
            "nsm-sim",
            "attest",
            "--nonce",
            "0a0b",
            "--user-data",
            "",
            "--pcr",
            &format!("3={pcr3}"),
            "--module-id",
            "i-1111111111111111-enc2222222222222222",
            "--out",
            out.to_str().unwrap(),
        ],
        Some(&state),
    );
    assert_ok(&output);
    let document = std::fs::read(&out).unwrap();
    assert_eq!(document.first(), Some(&0x84));
    let map = payload(&document);
    assert_eq!(field(&map, "nonce").as_bytes().unwrap(), &[0x0a, 0x0b]);
    assert_eq!(
        field(&map, "user_data").as_bytes().unwrap(),
        &Vec::<u8>::new()
    );
    assert_eq!(field(&map, "public_key"), &Value::Null);
    assert_eq!(
        field(&map, "module_id").as_text(),
        Some("i-1111111111111111-enc2222222222222222")
    );
    assert_eq!(pcr(&map, 3), [0x33; 48]);

    // The cabundle starts with the persisted root.
    let root = kluis_nsm::sim::SimRoot::load(&state).unwrap();
    let cabundle = field(&map, "cabundle").as_array().unwrap();
    assert_eq!(cabundle.len(), 4);
    assert_eq!(cabundle[0].as_bytes().unwrap(), root.root_der());
}

#[test]
fn attest_to_stdout_with_image_and_debug() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("image.bin");
    std::fs::write(&image, b"an enclave image").unwrap();
    let run = |debug: bool| {
        let mut args = vec![
            "nsm-sim",
            "attest",
            "--image",
            image.to_str().unwrap(),
            "--out",
            "-",
        ];
        if debug {
            args.push("--debug");
        }
        let output = enclave(&args, Some(&dir.path().join("state")));
        assert_ok(&output);
        payload(&output.stdout)
    };
    let normal = run(false);
    let debug = run(true);
    assert_ne!(pcr(&normal, 0), [0; 48]);
    assert_eq!(pcr(&normal, 0), pcr(&run(false), 0));
    for index in 0..3 {
        assert_eq!(pcr(&debug, index), [0; 48]);
    }
}

#[test]
fn describe_prints_json() {
    let dir = tempfile::tempdir().unwrap();
    let output = enclave(&["nsm-sim", "describe"], Some(dir.path()));
    assert_ok(&output);
    let json: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(json["max_pcrs"], 32);
    assert_eq!(json["digest"], "SHA384");
    assert_eq!(json["simulated"], true);
    assert_eq!(json["locked_pcrs"].as_array().unwrap().len(), 16);
    assert!(json["module_id"].as_str().unwrap().starts_with("i-"));
}

#[test]
fn bad_input_is_a_one_line_error_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let out = dir.path().join("doc.cbor");
    let out_arg = out.to_str().unwrap();
    let too_long = "00".repeat(1025);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--nonce", "xyz"], "--nonce: invalid hex"),
        (vec!["--user-data", "abc"], "--user-data: invalid hex"),
        (
            vec!["--public-key", &too_long],
            "--public-key: 1025 bytes, the NSM accepts at most 1024",
        ),
        (vec!["--pcr", "16=00"], "only the boot PCRs"),
        (vec!["--pcr", "2=abcd"], "a PCR is 48 bytes"),
        (
            vec!["--image", "/nonexistent/image"],
            "--image: cannot read",
        ),
        (vec!["--module-id", ""], "the module id is empty"),
    ];
    for (extra, expected) in cases {
        let mut args = vec!["nsm-sim", "attest", "--out", out_arg];
        args.extend(extra);
        let output = enclave(&args, Some(&state));
        assert_fails_with(&output, expected);
        assert!(!out.exists());
    }
    // Input errors are caught before the state directory is touched.
    assert!(!state.exists());

    let unwritable = enclave(
        &["nsm-sim", "attest", "--out", "/nonexistent/dir/doc.cbor"],
        Some(&state),
    );
    assert_fails_with(&unwritable, "cannot write /nonexistent/dir/doc.cbor");

    let blocker = dir.path().join("file");
    std::fs::write(&blocker, b"").unwrap();
    let bad_state = enclave(
        &[
            "nsm-sim",
            "init",
            "--state",
            blocker.join("s").to_str().unwrap(),
        ],
        None,
    );
    assert_fails_with(&bad_state, "cannot create the state directory");

    // Clap's own usage errors use exit code 2 as well.
    let missing_out = enclave(&["nsm-sim", "attest"], Some(&state));
    assert_eq!(missing_out.status.code(), Some(2));
}

/// `enclave run` with its log redirected to a file (here a pipe) writes no
/// terminal colour codes into it.
#[test]
fn redirected_run_logs_have_no_colour_codes() {
    use std::io::BufRead;
    let state = tempfile::tempdir().unwrap();
    // A point on the curve (P-384's base point): the enclave refuses others.
    let key = "04aa87ca22be8b05378eb1c71ef320ad746e1d3b628ba79b9859f741e082542a385502f25dbf55296c3a545e3872760ab7\
               3617de4a96262c6f5d9e98bf9292dc29f8f41dbd289a147ce9da3113b5f0b8c00a60b1ce1d7e819d7a431d7c90ea0e5f";
    let mut child = Command::new(env!("CARGO_BIN_EXE_enclave"))
        .args([
            "run",
            "--simulate-nsm",
            "--listen",
            "tcp:127.0.0.1:0",
            "--verifier",
            "tcp:127.0.0.1:9",
            "--verifier-key",
            key,
        ])
        .arg("--sim-state")
        .arg(state.path())
        .env_remove("NO_COLOR")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut log = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while let Ok(line) =
        rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
    {
        let done = line.contains("enclave service started");
        log.push(line);
        if done {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let log = log.join("\n");
    assert!(log.contains("SIMULATED NSM"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a redirected log: {log:?}"
    );
}

/// An existing `--out` is refused (exit 2, left as it was) unless `--force`
/// is given, for a document and for the root alike.
#[test]
fn an_existing_out_is_replaced_only_with_force() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let state_arg = state.to_str().unwrap();
    assert!(enclave(&["nsm-sim", "init", "--state", state_arg], None)
        .status
        .success());
    let out = dir.path().join("important.txt");
    let out_arg = out.to_str().unwrap();
    for command in [
        &[
            "nsm-sim", "attest", "--nonce", "00", "--state", state_arg, "--out", out_arg,
        ][..],
        &[
            "nsm-sim",
            "export-root",
            "--state",
            state_arg,
            "--out",
            out_arg,
        ][..],
    ] {
        std::fs::write(&out, b"keep me").unwrap();
        let refused = enclave(command, None);
        assert_eq!(refused.status.code(), Some(2), "{command:?}");
        assert!(stderr(&refused).contains("--force"), "{}", stderr(&refused));
        assert_eq!(std::fs::read(&out).unwrap(), b"keep me");
        let forced = enclave(&[command, &["--force"]].concat(), None);
        assert!(forced.status.success(), "{}", stderr(&forced));
        assert_ne!(std::fs::read(&out).unwrap(), b"keep me");
    }
}
