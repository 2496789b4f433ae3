//! The README's first command: `kluis-demo` runs the whole system (verifier,
//! enclave on the simulated NSM, parent) as separate processes and exits 0
//! only when every step behaved as it must.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

#[test]
fn the_demo_runs_end_to_end_and_cleans_up() {
    let keep = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kluis-demo"))
        .args(["--records", "300", "--keep"])
        .arg(keep.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    for expected in [
        "300 records",
        "what it saw: ciphertext only",
        "refused: the verifier released no key",
        "valid offline: allowed",
        "receipt valid offline:",
        "demo OK",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
    // The result it checked is there, and pseudonymised.
    let result = std::fs::read_to_string(keep.path().join("pseudonymised.csv")).unwrap();
    let input = std::fs::read_to_string(keep.path().join("benefits.csv")).unwrap();
    assert_eq!(result.lines().count(), input.lines().count());
    let first_nrn = input.lines().nth(1).unwrap().split(',').next().unwrap();
    assert!(!result.contains(first_nrn));
    // No process it started is left: its children's logs are closed and no
    // `kluis-demo enclave run` or `kluis-demo verifier serve` of this demo survives.
    let dir = keep.path().display().to_string();
    let survivors = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .filter(|cmd| String::from_utf8_lossy(cmd).contains(&dir))
        .count();
    assert_eq!(survivors, 0, "the demo left processes behind");
}
