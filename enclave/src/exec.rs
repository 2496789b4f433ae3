//! `exec` workloads: a program shipped in the enclave image, with the job's
//! plaintext on its stdin and its stdout sealed as the output.
//!
//! Only programs in the image's workload directory run: the parent names
//! one by its file name (no path, no `..`), and the resolved file must be a
//! regular file inside that directory. The program runs inside the enclave
//! with an empty environment; its stderr is discarded (it could echo
//! plaintext, and the only place to send it is the parent). It must read
//! all its input and exit 0, or the job fails; how it failed (its exit
//! status, whether it read everything) depends on the plaintext and is not
//! told to the parent. It runs in its own process group, which is killed
//! when the job fails, ends or passes its deadline, so neither the program
//! nor anything it started outlives the job.

use kluis_proto::job::FailureKind;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kluis_envelope::EnvelopeReader;
use zeroize::Zeroizing;

use crate::pipeline::{BatchSender, Cancel, JobError, ProgressReporter, ToSealer};
use crate::workload::Counts;

const PIPE_CHUNK: usize = 256 * 1024;

/// A checked `exec` request.
#[derive(Debug, Clone)]
pub struct ExecPlan {
    program: PathBuf,
    args: Vec<String>,
    dir: PathBuf,
}

fn name_is_plain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Check that `program` names a regular file in `dir` and the arguments are
/// printable text.
pub fn check_request(
    dir: Option<&Path>,
    program: &str,
    args: &[String],
) -> Result<ExecPlan, JobError> {
    let dir = dir.ok_or_else(|| {
        JobError::new(
            FailureKind::ExecRefused,
            "this enclave has no workload directory: exec is off",
        )
    })?;
    if !name_is_plain(program) {
        return Err(JobError::new(
            FailureKind::ExecRefused,
            "a program is named by its plain file name (letters, digits, '.', '_', '-')",
        ));
    }
    if args
        .iter()
        .any(|a| a.chars().any(char::is_control) || a.len() > 1024)
    {
        return Err(JobError::new(
            FailureKind::ExecRefused,
            "arguments must be short printable text",
        ));
    }
    let dir = dir
        .canonicalize()
        .map_err(|e| JobError::new(FailureKind::ExecRefused, format!("workload directory: {e}")))?;
    let path = dir.join(program).canonicalize().map_err(|_| {
        JobError::new(
            FailureKind::ExecRefused,
            format!("no program {program:?} in the image"),
        )
    })?;
    let is_file = std::fs::metadata(&path)
        .map(|m| m.is_file())
        .unwrap_or(false);
    if !path.starts_with(&dir) || !is_file {
        return Err(JobError::new(
            FailureKind::ExecRefused,
            format!("{program:?} is not a program of the image"),
        ));
    }
    Ok(ExecPlan {
        program: path,
        args: args.to_vec(),
        dir,
    })
}

/// SIGKILL to the program's whole process group.
fn kill_group(pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Kills the program's process group unless it was waited for.
struct ChildGuard(Option<Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            kill_group(child.id());
            let _ = child.wait();
        }
    }
}

fn failed() -> JobError {
    JobError::new(
        FailureKind::Exec,
        "the program failed (how depends on the data and is withheld)",
    )
}

/// How often the watchdog looks at the job's cancellation.
const WATCH_EVERY: Duration = Duration::from_millis(50);

/// Run the program over the decrypted input; its output goes to the sealer.
/// The program's process group is killed at its deadline and when the job
/// is cancelled. If the program fails, the rest of the input is still read
/// before the failure is reported (its timing says nothing about where).
pub(crate) fn run<R: Read + Send>(
    input: &mut EnvelopeReader<R>,
    plan: &ExecPlan,
    batches: &BatchSender,
    deadline: Duration,
    progress: &mut ProgressReporter<'_>,
    cancel: &Cancel,
) -> Result<(Counts, u64), JobError> {
    let mut child = ChildGuard(Some(
        Command::new(&plan.program)
            .args(&plan.args)
            .env_clear()
            .current_dir(&plan.dir)
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| JobError::new(FailureKind::Exec, format!("starting the program: {e}")))?,
    ));
    let running = child
        .0
        .as_mut()
        .ok_or_else(|| JobError::new(FailureKind::Internal, "no child"))?;
    let mut stdin = running
        .stdin
        .take()
        .ok_or_else(|| JobError::new(FailureKind::Internal, "no stdin"))?;
    let mut stdout = running
        .stdout
        .take()
        .ok_or_else(|| JobError::new(FailureKind::Internal, "no stdout"))?;

    // The deadline and the job's cancellation: a watchdog kills the group
    // unless the program ends first.
    let pid = running.id();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let timed_out = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchdog = {
        let timed_out = std::sync::Arc::clone(&timed_out);
        let cancel = cancel.clone();
        let until = std::time::Instant::now().checked_add(deadline);
        std::thread::spawn(move || loop {
            if cancel.is_cancelled() {
                kill_group(pid);
                return;
            }
            let left = until.map_or(WATCH_EVERY, |u| {
                u.saturating_duration_since(std::time::Instant::now())
            });
            if left.is_zero() {
                timed_out.store(true, std::sync::atomic::Ordering::SeqCst);
                kill_group(pid);
                return;
            }
            match done_rx.recv_timeout(left.min(WATCH_EVERY)) {
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                // Done (or the sender dropped): the program was waited for.
                _ => return,
            }
        })
    };
    // Set when the input fails to decrypt (truncated, altered): the
    // program is killed before it can see an end of input, and nothing more
    // it wrote is sent.
    let input_failed = std::sync::atomic::AtomicBool::new(false);
    let input_failed = &input_failed;
    let (fed, produced) = std::thread::scope(|scope| {
        let feeder = scope.spawn(move || -> Result<(u64, u64), JobError> {
            let mut buf = Zeroizing::new(vec![0u8; PIPE_CHUNK]);
            let mut records = 0u64;
            let mut bytes = 0u64;
            let mut last = b'\n';
            loop {
                if cancel.is_cancelled() {
                    return Err(JobError::new(FailureKind::Cancelled, "the job was stopped"));
                }
                let n = match input.read(&mut buf) {
                    Ok(n) => n,
                    Err(e) => {
                        // Its standard input is still open: the program
                        // cannot take a prefix the parent chose for the
                        // whole input and finish on it.
                        input_failed.store(true, std::sync::atomic::Ordering::SeqCst);
                        kill_group(pid);
                        return Err(crate::pipeline::read_error(&e));
                    }
                };
                let Some(chunk) = buf.get(..n).filter(|c| !c.is_empty()) else {
                    break;
                };
                records = records.saturating_add(crate::workload::count_newlines(chunk));
                bytes = bytes.saturating_add(u64::try_from(chunk.len()).unwrap_or(u64::MAX));
                last = chunk.last().copied().unwrap_or(last);
                progress.input_read(bytes);
                if stdin.write_all(chunk).is_err() {
                    // The program stopped reading (it failed, or was
                    // killed): read the rest before saying so.
                    drop(stdin);
                    crate::pipeline::drain(input, bytes, progress, cancel)?;
                    return Err(failed());
                }
            }
            drop(stdin);
            Ok((records.saturating_add(u64::from(last != b'\n')), bytes))
        });
        let mut records_out = 0u64;
        let mut last = b'\n';
        let produced = loop {
            let mut buf = Zeroizing::new(vec![0u8; PIPE_CHUNK]);
            match stdout.read(&mut buf) {
                Ok(0) => break Ok(records_out.saturating_add(u64::from(last != b'\n'))),
                Ok(_) if input_failed.load(std::sync::atomic::Ordering::SeqCst) => {
                    break Err(failed())
                }
                Ok(n) => {
                    buf.truncate(n);
                    records_out = records_out.saturating_add(crate::workload::count_newlines(&buf));
                    last = buf.last().copied().unwrap_or(last);
                    if batches.send(ToSealer::Batch(buf)).is_err() {
                        break Err(JobError::new(
                            FailureKind::OutputClosed,
                            "the sealer stopped",
                        ));
                    }
                }
                Err(_) => break Err(failed()),
            }
        };
        drop(stdout);
        if produced.is_err() {
            // The feeder may be blocked on a program that no longer reads.
            kill_group(pid);
        }
        let fed = feeder
            .join()
            .unwrap_or_else(|_| Err(JobError::new(FailureKind::Internal, "feeder failed")));
        (fed, produced)
    });
    // The program may still be running with its output closed: the
    // watchdog stays on until it has ended, so the deadline and the job's
    // cancellation still kill it. It is not reaped yet: until it is, its id
    // is still its group's, never another's.
    if let Ok(id) = i32::try_from(pid) {
        use nix::sys::wait::{waitid, Id, WaitPidFlag};
        while let Err(nix::errno::Errno::EINTR) = waitid(
            Id::Pid(nix::unistd::Pid::from_raw(id)),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT,
        ) {}
    }
    drop(done_tx);
    let _ = watchdog.join();
    // Whatever it started goes with it.
    kill_group(pid);
    if timed_out.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(JobError::new(
            FailureKind::ExecTimeout,
            format!("the program ran longer than {}s", deadline.as_secs()),
        ));
    }
    // The input's error (tampering, truncation) explains more than the
    // program's reaction to it.
    let (records_in, bytes_in) = fed?;
    let records_out = produced?;
    let mut running = child
        .0
        .take()
        .ok_or_else(|| JobError::new(FailureKind::Internal, "no child"))?;
    let status = running.wait().map_err(|_| failed())?;
    if !status.success() {
        return Err(failed());
    }
    Ok((
        Counts {
            records_in,
            records_out,
        },
        bytes_in,
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn only_plain_names_inside_the_directory_run() {
        let dir = tempfile::tempdir().unwrap();
        let prog = dir.path().join("upper.sh");
        std::fs::write(&prog, "#!/bin/sh\ntr a-z A-Z\n").unwrap();
        let outside = tempfile::NamedTempFile::new().unwrap();
        assert!(check_request(Some(dir.path()), "upper.sh", &[]).is_ok());
        for bad in ["", "../x", "/bin/sh", ".hidden", "a/b", "missing"] {
            let err = check_request(Some(dir.path()), bad, &[]).unwrap_err();
            assert_eq!(err.kind, FailureKind::ExecRefused, "{bad:?}");
        }
        // A symlink out of the directory is refused.
        std::os::unix::fs::symlink(outside.path(), dir.path().join("link")).unwrap();
        assert_eq!(
            check_request(Some(dir.path()), "link", &[])
                .unwrap_err()
                .kind,
            FailureKind::ExecRefused
        );
        assert_eq!(
            check_request(None, "upper.sh", &[]).unwrap_err().kind,
            FailureKind::ExecRefused
        );
        assert_eq!(
            check_request(Some(dir.path()), "upper.sh", &["a\nb".into()])
                .unwrap_err()
                .kind,
            FailureKind::ExecRefused
        );
    }
}
