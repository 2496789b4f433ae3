//! A process-wide throw-away SoftHSM2 token directory for these tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

use kluis_hsm::{softhsm, TokenConfig};

pub const PIN: &str = "1234-user";
pub const SO_PIN: &str = "5678-so";

/// The module, with `SOFTHSM2_CONF` pointing at a private token directory;
/// `None` (after saying SKIPPED) when SoftHSM2 is not installed, unless
/// `KLUIS_REQUIRE_SOFTHSM=1` (CI), which makes that a failure.
pub fn module() -> Option<PathBuf> {
    static MODULE: OnceLock<Option<PathBuf>> = OnceLock::new();
    MODULE
        .get_or_init(|| {
            let Some(module) = softhsm::find_module() else {
                if std::env::var("KLUIS_REQUIRE_SOFTHSM").as_deref() == Ok("1") {
                    panic!("KLUIS_REQUIRE_SOFTHSM=1 but no SoftHSM2 module (apt install softhsm2)");
                }
                eprintln!("SKIPPED: SoftHSM2 is not installed (apt install softhsm2)");
                return None;
            };
            let dir = tempfile::tempdir().unwrap().keep();
            softhsm::use_private_token_dir(&dir).unwrap();
            Some(module)
        })
        .clone()
}

/// A fresh token with a unique label.
pub fn token(prefix: &str) -> Option<TokenConfig> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let module = module()?;
    let label = format!("{prefix}-{}", NEXT.fetch_add(1, Ordering::Relaxed));
    Some(softhsm::init_token(&module, &label, SO_PIN, PIN).unwrap())
}
