//! The simulator's clock, injectable so tests can produce documents at any time.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// A source of the current time, in milliseconds since the Unix epoch.
///
/// The simulator reads the time only through this trait: document
/// timestamps, leaf certificate validity and CA certificate validity all
/// follow it.
pub trait Clock: Send + Sync + fmt::Debug {
    /// The current time in milliseconds since the Unix epoch.
    fn now_unix_ms(&self) -> u64;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_unix_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
            // A clock set before 1970 reads as the epoch.
            .unwrap_or(0)
    }
}

/// A clock that stands still until it is set or advanced: for tests.
#[derive(Debug, Default)]
pub struct FixedClock {
    now_ms: AtomicU64,
}

impl FixedClock {
    /// A clock that reads `unix_ms` until changed.
    pub const fn new(unix_ms: u64) -> Self {
        Self {
            now_ms: AtomicU64::new(unix_ms),
        }
    }

    /// Sets the time.
    pub fn set(&self, unix_ms: u64) {
        self.now_ms.store(unix_ms, Ordering::SeqCst);
    }

    /// Moves the time forward by `ms` milliseconds (saturating).
    pub fn advance(&self, ms: u64) {
        // fetch_update only fails when the closure returns None, which it never does.
        let _ = self
            .now_ms
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |now| {
                Some(now.saturating_add(ms))
            });
    }
}

impl Clock for FixedClock {
    fn now_unix_ms(&self) -> u64 {
        self.now_ms.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_clock_is_settable() {
        let clock = FixedClock::new(1_000);
        assert_eq!(clock.now_unix_ms(), 1_000);
        clock.advance(500);
        assert_eq!(clock.now_unix_ms(), 1_500);
        clock.set(42);
        assert_eq!(clock.now_unix_ms(), 42);
        clock.set(u64::MAX);
        clock.advance(1);
        assert_eq!(clock.now_unix_ms(), u64::MAX);
    }

    #[test]
    fn system_clock_is_after_2024() {
        assert!(SystemClock.now_unix_ms() > 1_704_067_200_000);
    }
}
