//! Connecting to an enclave that may still be starting.
//!
//! `nitro-cli run-enclave` returns as soon as the enclave's init reports in,
//! before the enclave program is listening; a job started right after it
//! would find nothing there. [`connect_patiently`] retries for a bounded time
//! and then says what to check.

use std::time::{Duration, Instant};

use kluis_transport::{Address, BoxStream};

use crate::job::RunError;

/// First pause between attempts; it doubles up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(100);
/// Longest pause between attempts.
const MAX_PAUSE: Duration = Duration::from_secs(2);

/// Connect to `address`, retrying any failure until `patience` has passed
/// (zero: one attempt). `waiting` is called after each failed attempt that
/// will be retried, with the error and the time waited so far.
pub async fn connect_patiently(
    address: &Address,
    patience: Duration,
    mut waiting: impl FnMut(&std::io::Error, Duration),
) -> Result<BoxStream, RunError> {
    let started = Instant::now();
    let deadline = started.checked_add(patience).unwrap_or(started);
    let mut pause = FIRST_PAUSE;
    loop {
        // One attempt may take no longer than what is left (at least a
        // moment): a vsock connect to a CID that is not up can hang.
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(FIRST_PAUSE);
        let error = match tokio::time::timeout(left, kluis_transport::connect(address)).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(e)) => e,
            Err(_) => std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"),
        };
        let now = Instant::now();
        if now >= deadline {
            return Err(RunError::EnclaveNotListening {
                address: address.to_string(),
                waited: now.saturating_duration_since(started),
                source: error,
            });
        }
        waiting(&error, now.saturating_duration_since(started));
        tokio::time::sleep(pause.min(deadline.saturating_duration_since(now))).await;
        pause = pause.saturating_mul(2).min(MAX_PAUSE);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    /// The enclave starts listening while the parent waits (here: when the
    /// parent reports its first failed attempt): the job connects.
    #[tokio::test]
    async fn an_enclave_that_starts_listening_late_is_reached() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("enclave.sock");
        let address: Address = format!("unix:{}", path.display()).parse().unwrap();
        let mut listener = None;
        let mut failures = 0;
        let stream = connect_patiently(&address, Duration::from_secs(30), |error, _| {
            failures += 1;
            assert_eq!(error.kind(), std::io::ErrorKind::NotFound, "{error}");
            if listener.is_none() {
                listener = Some(tokio::net::UnixListener::bind(&path).unwrap());
            }
        })
        .await
        .unwrap();
        assert_eq!(failures, 1);
        let (_accepted, _) = listener.unwrap().accept().await.unwrap();
        drop(stream);
    }

    /// Nothing ever listens: a bounded wait, then an error that names the
    /// address, the time waited and the last failure.
    #[tokio::test]
    async fn an_enclave_that_never_listens_is_an_error_after_the_patience() {
        let dir = tempfile::tempdir().unwrap();
        let address: Address = format!("unix:{}", dir.path().join("none.sock").display())
            .parse()
            .unwrap();
        let mut failures = 0;
        let err = connect_patiently(&address, Duration::from_millis(400), |_, _| failures += 1)
            .await
            .map(|_| ())
            .unwrap_err();
        assert!(failures >= 1, "no retry");
        assert!(
            matches!(&err, RunError::EnclaveNotListening { waited, .. } if *waited >= Duration::from_millis(400)),
            "{err}"
        );
        let message = err.to_string();
        assert!(message.contains("none.sock"), "{message}");
        assert!(message.contains("describe-enclaves"), "{message}");

        // Zero patience: one attempt, no retry.
        let mut failures = 0;
        let err = connect_patiently(&address, Duration::ZERO, |_, _| failures += 1)
            .await
            .map(|_| ())
            .unwrap_err();
        assert_eq!(failures, 0);
        assert!(matches!(err, RunError::EnclaveNotListening { .. }), "{err}");
    }
}
