//! Throw-away SoftHSM2 tokens, for the tests and the demo. Not for
//! production: a production token is initialised by its security officer
//! with the vendor's tools (see docs/hsm.md).

use std::path::{Path, PathBuf};

use cryptoki::session::UserType;
use cryptoki::types::AuthPin;

use crate::token::{load_module, TokenConfig};
use crate::HsmError;

/// Where Debian's `softhsm2` package installs the module.
pub const DEFAULT_SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// The SoftHSM2 module named by `KLUIS_TEST_PKCS11_MODULE`, or Debian's if
/// it is installed; `None` when neither exists.
pub fn find_module() -> Option<PathBuf> {
    let path = std::env::var_os("KLUIS_TEST_PKCS11_MODULE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOFTHSM_MODULE));
    path.is_file().then_some(path)
}

/// Writes `dir/softhsm2.conf` keeping tokens in `dir/tokens` and points
/// `SOFTHSM2_CONF` at it. SoftHSM2 reads the variable when the module is
/// first initialised in a process, so call this before anything loads the
/// module, while the process has one thread (it sets an environment
/// variable).
pub fn use_private_token_dir(dir: &Path) -> Result<(), HsmError> {
    let io = |action, path: &Path, source| HsmError::Io {
        action,
        path: path.to_owned(),
        source,
    };
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens).map_err(|e| io("creating", &tokens, e))?;
    let conf = dir.join("softhsm2.conf");
    let text = format!(
        "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
        tokens.display()
    );
    std::fs::write(&conf, text).map_err(|e| io("writing", &conf, e))?;
    std::env::set_var("SOFTHSM2_CONF", &conf);
    Ok(())
}

/// Initialises a new token labelled `label` on a free SoftHSM2 slot, with
/// security-officer PIN `so_pin` and user PIN `user_pin`.
pub fn init_token(
    module: &Path,
    label: &str,
    so_pin: &str,
    user_pin: &str,
) -> Result<TokenConfig, HsmError> {
    // One free slot at a time: two threads would pick the same one.
    static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _serial = INIT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let ctx = load_module(module)?;
    let slots = ctx
        .get_slots_with_token()
        .map_err(|e| HsmError::op("listing slots", e))?;
    let free = slots.into_iter().find(|slot| {
        ctx.get_token_info(*slot)
            .map(|info| !info.token_initialized())
            .unwrap_or(false)
    });
    let Some(slot) = free else {
        return Err(HsmError::Config(
            "no free slot to initialise a token on".to_owned(),
        ));
    };
    let so = AuthPin::from(so_pin);
    ctx.init_token(slot, &so, label)
        .map_err(|e| HsmError::op("initialising the token", e))?;
    // SoftHSM2 moves an initialised token to a new slot id: find it again.
    let slot = ctx
        .get_slots_with_initialized_token()
        .map_err(|e| HsmError::op("listing slots", e))?
        .into_iter()
        .find(|slot| {
            ctx.get_token_info(*slot)
                .map(|info| info.label().trim_end() == label)
                .unwrap_or(false)
        })
        .ok_or(HsmError::Unexpected("the new token is not listed"))?;
    let session = ctx
        .open_rw_session(slot)
        .map_err(|e| HsmError::op("opening a session", e))?;
    session
        .login(UserType::So, Some(&so))
        .map_err(|e| HsmError::op("logging in as security officer", e))?;
    session
        .init_pin(&AuthPin::from(user_pin))
        .map_err(|e| HsmError::op("setting the user PIN", e))?;
    session
        .logout()
        .map_err(|e| HsmError::op("logging out", e))?;
    Ok(TokenConfig {
        module: module.to_owned(),
        token: label.to_owned(),
    })
}

/// The user PIN of the tokens [`throwaway_token`] makes.
pub const THROWAWAY_PIN: &str = "1234-user";
/// Their security-officer PIN.
const THROWAWAY_SO_PIN: &str = "5678-so";

/// A new SoftHSM2 token with a unique label starting with `prefix` and user
/// PIN [`THROWAWAY_PIN`], in a private token directory made (with
/// [`use_private_token_dir`]) on the first call in this process.
///
/// `None`, after printing `SKIPPED` on stderr, when SoftHSM2 is not
/// installed — unless `KLUIS_REQUIRE_SOFTHSM=1` (CI), which makes that an
/// error.
pub fn throwaway_token(prefix: &str) -> Result<Option<TokenConfig>, HsmError> {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::OnceLock;
    static MODULE: OnceLock<Result<Option<PathBuf>, String>> = OnceLock::new();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let module = MODULE.get_or_init(|| {
        let Some(module) = find_module() else {
            if std::env::var("KLUIS_REQUIRE_SOFTHSM").as_deref() == Ok("1") {
                return Err(
                    "KLUIS_REQUIRE_SOFTHSM=1 but there is no SoftHSM2 module (apt install softhsm2)"
                        .to_owned(),
                );
            }
            eprintln!("SKIPPED: SoftHSM2 is not installed (apt install softhsm2); the PKCS#11 tests did not run");
            return Ok(None);
        };
        let mut suffix = [0u8; 8];
        aws_lc_rs::rand::fill(&mut suffix).map_err(|_| "no randomness".to_owned())?;
        let dir = std::env::temp_dir().join(format!(
            "kluis-softhsm-{}-{}",
            std::process::id(),
            hex::encode(suffix)
        ));
        std::fs::create_dir(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        use_private_token_dir(&dir).map_err(|e| e.to_string())?;
        Ok(Some(module))
    });
    let module = match module {
        Ok(Some(module)) => module,
        Ok(None) => return Ok(None),
        Err(e) => return Err(HsmError::Config(e.clone())),
    };
    let label = format!(
        "{}-{}",
        prefix.chars().take(20).collect::<String>(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    init_token(module, &label, THROWAWAY_SO_PIN, THROWAWAY_PIN).map(Some)
}
