//! `parent run` against an enclave that is not (yet) listening: it keeps
//! trying for `--enclave-wait` seconds, says so, and then fails with a
//! message that says what to check, leaving no output.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::arithmetic_side_effects
)]

use std::process::Command;

/// `parent run` of `input` in a fresh directory, to an enclave at a Unix
/// socket there (`listen` gets the socket's path first), with `extra`
/// arguments: what it printed, whether it left an output, and what
/// `listen` returned. Whatever happened, the parent has left no partial
/// output behind.
fn run_on_socket<T>(
    input: &[u8],
    extra: &[&str],
    listen: impl FnOnce(&std::path::Path) -> T,
) -> (std::process::Output, bool, T) {
    let dir = tempfile::tempdir().unwrap();
    let input_path = dir.path().join("input.kenv");
    std::fs::write(&input_path, input).unwrap();
    let output = dir.path().join("output.kenv");
    let socket = dir.path().join("enclave.sock");
    let listening = listen(&socket);
    let out = Command::new(env!("CARGO_BIN_EXE_parent"))
        .args(["run", "--enclave"])
        .arg(format!("unix:{}", socket.display()))
        .arg("--input")
        .arg(&input_path)
        .arg("--output")
        .arg(&output)
        .args(["--output-key", "a/b/c"])
        .args(extra)
        .output()
        .unwrap();
    let partial: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(".kluis-partial-"))
        .collect();
    assert!(partial.is_empty(), "left behind: {partial:?}");
    (out, output.exists(), listening)
}

#[test]
fn run_waits_for_the_enclave_then_fails_clearly() {
    let (out, output_exists, ()) = run_on_socket(
        b"not read: the enclave is never reached",
        &["--enclave-wait", "1"],
        |_| (),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("waiting for the enclave at unix:"),
        "{stderr}"
    );
    assert!(
        stderr.contains("did not accept a connection within"),
        "{stderr}"
    );
    assert!(stderr.contains("nitro-cli describe-enclaves"), "{stderr}");
    assert!(!output_exists);
}

/// An enclave that takes the connection and then never ends the job: the
/// parent gives up at `--job-timeout`, whatever the idle timeout, and
/// leaves no output.
#[test]
fn run_gives_up_at_the_job_deadline() {
    let started = std::time::Instant::now();
    let (out, output_exists, held) = run_on_socket(
        b"sent to an enclave that never answers",
        &["--idle-timeout", "600", "--job-timeout", "1"],
        |socket| {
            let listener = std::os::unix::net::UnixListener::bind(socket).unwrap();
            std::thread::spawn(move || {
                use std::io::Read as _;
                let (mut stream, _) = listener.accept().unwrap();
                // Read whatever comes, answer nothing, until the parent goes.
                let mut buf = [0u8; 4096];
                while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
            })
        },
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("did not finish within 1 s"), "{stderr}");
    assert!(started.elapsed() < std::time::Duration::from_secs(600));
    assert!(!output_exists);
    held.join().unwrap();
}

fn parent(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_parent"))
        .args(args)
        .output()
        .unwrap()
}

/// Bad `--verifier` lists are refused with a clear message, before
/// anything listens (exit 1, never a panic).
#[test]
fn relay_refuses_bad_verifier_lists_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("unix:{}", dir.path().join("relay.sock").display());
    let many = (1..=17)
        .map(|p| format!("127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    for (verifiers, expected) in [
        (
            vec!["--verifier", "127.0.0.1:7300,127.0.0.1:7300"],
            "given twice",
        ),
        (
            vec![
                "--verifier",
                "127.0.0.1:7300",
                "--verifier",
                "tcp:127.0.0.1:7300",
            ],
            "given twice",
        ),
        (vec!["--verifier", "127.0.0.1:7300,"], "empty --verifier"),
        (vec!["--verifier", many.as_str()], "at most 16"),
    ] {
        let mut args = vec!["relay", "--listen", listen.as_str()];
        args.extend(verifiers);
        let out = parent(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    // No --verifier at all: a usage error.
    let out = parent(&["relay", "--listen", listen.as_str()]);
    assert_eq!(out.status.code(), Some(2));
}

/// `parent run` takes several replicas (repeated and comma-separated) and
/// starts its relay with them; here the enclave never listens.
#[test]
fn run_takes_several_verifiers() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input.kenv");
    std::fs::write(&input, b"not read").unwrap();
    let output = dir.path().join("output.kenv");
    let enclave = format!("unix:{}", dir.path().join("enclave.sock").display());
    let relay = format!("unix:{}", dir.path().join("relay.sock").display());
    let out = Command::new(env!("CARGO_BIN_EXE_parent"))
        .args(["run", "--enclave", enclave.as_str()])
        .args(["--verifier", "127.0.0.1:7300,127.0.0.1:7301"])
        .args([
            "--verifier",
            "127.0.0.1:7302",
            "--verifier-connect-timeout",
            "1",
        ])
        .args(["--relay-listen", relay.as_str()])
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .args(["--output-key", "a/b/c", "--enclave-wait", "0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("did not accept a connection within"),
        "{stderr}"
    );
    assert!(!output.exists());

    // A connect timeout of 0 is refused by the parser.
    let out = parent(&[
        "relay",
        "--listen",
        relay.as_str(),
        "--verifier",
        "127.0.0.1:7300",
        "--verifier-connect-timeout",
        "0",
    ]);
    assert_eq!(out.status.code(), Some(2));
}

/// An existing output is refused before anything runs, unless `--replace`
/// is given (then the job goes ahead, here to find no enclave).
#[test]
fn run_refuses_an_existing_output_unless_told_to_replace_it() {
    let earlier = |socket: &std::path::Path| {
        std::fs::write(socket.with_file_name("output.kenv"), b"an earlier result").unwrap();
    };
    let (out, output_exists, ()) = run_on_socket(b"not read", &["--enclave-wait", "1"], earlier);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(output_exists);
    assert!(stderr.contains("already exists"), "{stderr}");
    assert!(!stderr.contains("waiting for the enclave"), "{stderr}");

    let (out, _, ()) = run_on_socket(b"not read", &["--enclave-wait", "1", "--replace"], earlier);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(!stderr.contains("already exists"), "{stderr}");
    assert!(
        stderr.contains("did not accept a connection within"),
        "{stderr}"
    );
}

/// An enclave that takes the connection and sends output without end: a
/// data frame of 1 MiB after another, never `Done`.
fn flooding_enclave(socket: &std::path::Path) -> std::thread::JoinHandle<u64> {
    let listener = std::os::unix::net::UnixListener::bind(socket).unwrap();
    std::thread::spawn(move || {
        use std::io::{Read as _, Write as _};
        let (mut stream, _) = listener.accept().unwrap();
        let mut reader = stream.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while matches!(reader.read(&mut buf), Ok(n) if n > 0) {}
        });
        let payload = vec![0x5a; kluis_proto::job::MAX_CHUNK_LEN];
        let header = kluis_proto::job::data_frame_header(payload.len()).unwrap();
        let mut sent = 0u64;
        // Until the parent hangs up (or 1 GiB, a bound for a broken test).
        while sent < 1 << 30 {
            if stream.write_all(&header).is_err() || stream.write_all(&payload).is_err() {
                break;
            }
            sent += payload.len() as u64;
        }
        sent
    })
}

/// A hostile enclave's endless output stops at `--max-output`, and an
/// output's file system that cannot keep `--keep-free` refuses the job:
/// each fails clearly and leaves nothing in the output's directory.
#[test]
fn run_stops_output_at_its_limits() {
    let cases: [(&[&str], &str); 2] = [
        (
            &["--max-output", "3M"],
            "3145728 output bytes --max-output allows",
        ),
        (&["--keep-free", "1048576T"], "--keep-free keeps"),
    ];
    for (limit, expected) in cases {
        let (out, output_exists, flood) = run_on_socket(b"ignored", limit, flooding_enclave);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{limit:?}: {stderr}");
        assert!(stderr.contains(expected), "{limit:?}: {stderr}");
        assert!(stderr.contains("no output written"), "{stderr}");
        assert!(!output_exists);
        let sent = flood.join().unwrap();
        assert!(sent < 1 << 30, "the parent read on past its limit");
    }

    // Sizes the parser refuses: a usage error.
    for bad in ["3X", "", "K", "99999999999T", "-1"] {
        let out = parent(&[
            "run",
            "--enclave",
            "unix:/nonexistent",
            "--input",
            "i",
            "--output",
            "o",
            "--output-key",
            "a/b/c",
            "--max-output",
            bad,
        ]);
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
    }
}

/// Standard error that cannot be written is no panic (exit 101): the
/// failure is still exit 1.
#[test]
fn run_with_standard_error_full_fails_without_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_parent"))
        .args(["run", "--enclave"])
        .arg(format!("unix:{}", dir.path().join("none.sock").display()))
        .arg("--input")
        .arg(dir.path().join("missing.kenv"))
        .arg("--output")
        .arg(dir.path().join("out.kenv"))
        .args(["--output-key", "a/b/c", "--enclave-wait", "0"])
        .stderr(full)
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(1));
}

/// Inputs and outputs a job could not use are refused before anything
/// connects (a job must not run, and spend a run of its authorisation, only
/// to fail at its end): a missing input, a directory for either, a missing
/// output directory, and an output that is the input.
#[test]
fn run_refuses_unusable_paths_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.kenv");
    std::fs::write(&input, b"envelope").unwrap();
    let d = dir.path().display().to_string();
    let i = input.display().to_string();
    let cases: [(&str, String, &[&str], &str); 5] = [
        (
            "missing input",
            format!("{d}/absent.kenv"),
            &[],
            "the input",
        ),
        ("input a directory", d.clone(), &[], "is a directory"),
        (
            "output a directory",
            i.clone(),
            &["--replace"],
            "is a directory",
        ),
        ("no output directory", i.clone(), &[], "does not exist"),
        ("output is input", i.clone(), &["--replace"], "is the input"),
    ];
    for (what, input_arg, extra, expected) in cases {
        let output = match what {
            "output a directory" => d.clone(),
            "no output directory" => format!("{d}/nowhere/out.kenv"),
            "output is input" => format!("{d}/./in.kenv"),
            _ => format!("{d}/out.kenv"),
        };
        let out = parent(
            &[
                &[
                    "run",
                    "--enclave",
                    "unix:/nonexistent/enclave.sock",
                    "--input",
                ][..],
                &[input_arg.as_str(), "--output", output.as_str()],
                &["--output-key", "a/b/c", "--enclave-wait", "0"],
                extra,
            ]
            .concat(),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what}: {stderr}");
        assert!(stderr.contains(expected), "{what}: {stderr}");
        assert!(
            !stderr.contains("enclave"),
            "{what}: it tried to connect: {stderr}"
        );
    }
    assert_eq!(std::fs::read(&input).unwrap(), b"envelope");
}
