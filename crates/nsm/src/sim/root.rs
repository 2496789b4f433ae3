//! The simulated root CA: generated once, persisted, loaded on later runs.

use std::fmt;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use aws_lc_rs::digest::{self, SHA256};
use rcgen::Issuer;
use zeroize::Zeroizing;

use super::chain::{self, Ca, Validity, ROOT_VALIDITY_S};
use super::clock::{Clock, SystemClock};
use super::key::P384Key;
use super::SimError;

/// File name of the root's private key (PKCS#8 PEM, mode 0600) in the state directory.
pub const ROOT_KEY_FILE: &str = "root-key.pem";
/// File name of the root's certificate (PEM) in the state directory.
pub const ROOT_CERT_FILE: &str = "root-cert.pem";

/// Whether [`SimRoot::load_or_create`] found a root or made one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootOrigin {
    /// A new root was generated and written to the state directory.
    Created,
    /// The root in the state directory was loaded.
    Loaded,
}

/// The simulated NSM's root CA (P-384, self-signed, CN=kluis-simulated-root,
/// O=Kluis Simulated NSM).
///
/// A verifier must never trust it by default: export it with
/// [`SimRoot::root_pem`] and configure it explicitly where a test or a local
/// run needs it. The private key is never printed; `Debug` shows only the
/// certificate's fingerprint and validity.
pub struct SimRoot {
    ca: Ca,
}

impl fmt::Debug for SimRoot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimRoot")
            .field("fingerprint_sha256", &self.fingerprint_hex())
            .field("not_before_unix", &self.ca.validity.not_before)
            .field("not_after_unix", &self.ca.validity.not_after)
            .field("private_key", &"<redacted>")
            .finish()
    }
}

impl SimRoot {
    /// Generates a fresh in-memory root, valid for 30 years from now (system clock).
    pub fn generate() -> Result<Self, SimError> {
        Self::generate_at(SystemClock.now_unix_ms())
    }

    /// Generates a fresh in-memory root, valid for 30 years from `unix_ms`.
    pub fn generate_at(unix_ms: u64) -> Result<Self, SimError> {
        let start = chain::unix_seconds(unix_ms)?;
        let ca = chain::issue_root(Validity::starting(start, ROOT_VALIDITY_S)?)?;
        Ok(Self { ca })
    }

    /// Path of the private key file in `state_dir`.
    pub fn key_path(state_dir: &Path) -> PathBuf {
        state_dir.join(ROOT_KEY_FILE)
    }

    /// Path of the certificate file in `state_dir`.
    pub fn cert_path(state_dir: &Path) -> PathBuf {
        state_dir.join(ROOT_CERT_FILE)
    }

    /// Loads the root persisted in `state_dir`, or generates one (valid for 30
    /// years from `clock`'s time) and persists it there.
    ///
    /// The directory is created with mode 0700 if missing. The key is written
    /// with mode 0600, atomically (temporary file, fsync, link into place), and
    /// never replaces an existing key: of two processes racing to create a
    /// root, both end up with the one whose key landed first. If the key exists
    /// but the certificate does not (an interrupted first run), a certificate
    /// is issued again for the existing key.
    pub fn load_or_create(
        state_dir: &Path,
        clock: &dyn Clock,
    ) -> Result<(Self, RootOrigin), SimError> {
        let key_path = Self::key_path(state_dir);
        let cert_path = Self::cert_path(state_dir);
        if key_path.exists() && cert_path.exists() {
            return Ok((Self::load(state_dir)?, RootOrigin::Loaded));
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .map_err(|err| SimError::io("create the state directory", state_dir, err))?;

        let validity =
            Validity::starting(chain::unix_seconds(clock.now_unix_ms())?, ROOT_VALIDITY_S)?;
        let fresh = chain::issue_root(validity)?;
        let key_pem = encode_private_key(fresh.issuer.key());
        let key_written = write_atomic(state_dir, ROOT_KEY_FILE, key_pem.as_bytes(), 0o600, false)?;
        let root = if key_written {
            fresh
        } else {
            // Another run created the key first (or an earlier run was
            // interrupted after writing it): use that key.
            drop(fresh);
            let key = read_key(&key_path)?;
            if let Ok(root) = Self::load(state_dir) {
                return Ok((root, RootOrigin::Loaded));
            }
            chain::issue_root_with_key(validity, key)?
        };
        write_atomic(
            state_dir,
            ROOT_CERT_FILE,
            pem_certificate(&root.der).as_bytes(),
            0o644,
            true,
        )?;
        Ok((Self { ca: root }, RootOrigin::Created))
    }

    /// Loads the root persisted in `state_dir`.
    ///
    /// Refuses a key file that group or others can access, a key that is not
    /// P-384, and a certificate that does not belong to the key.
    pub fn load(state_dir: &Path) -> Result<Self, SimError> {
        let key_path = Self::key_path(state_dir);
        let cert_path = Self::cert_path(state_dir);
        let key = read_key(&key_path)?;
        let cert_pem = fs::read_to_string(&cert_path)
            .map_err(|err| SimError::io("read the simulated root certificate", &cert_path, err))?;
        let invalid = |reason: String| SimError::InvalidRoot {
            path: cert_path.clone(),
            reason,
        };
        let parsed = pem::parse(cert_pem.as_bytes()).map_err(|err| invalid(err.to_string()))?;
        if parsed.tag() != "CERTIFICATE" {
            return Err(invalid(format!(
                "expected a CERTIFICATE PEM block, found {}",
                parsed.tag()
            )));
        }
        let der = parsed.into_contents();
        let (rest, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|err| invalid(format!("not an X.509 certificate: {err}")))?;
        if !rest.is_empty() {
            return Err(invalid("trailing bytes after the certificate".to_owned()));
        }
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key() {
            return Err(invalid(format!(
                "the certificate does not belong to the key in {}",
                key_path.display()
            )));
        }
        let validity = Validity {
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
        };
        let issuer = Issuer::from_ca_cert_der(&der.as_slice().into(), key)
            .map_err(|err| invalid(err.to_string()))?;
        Ok(Self {
            ca: Ca {
                der,
                issuer,
                validity,
            },
        })
    }

    /// The root certificate, DER.
    pub fn root_der(&self) -> &[u8] {
        &self.ca.der
    }

    /// The root certificate, PEM.
    pub fn root_pem(&self) -> String {
        pem_certificate(&self.ca.der)
    }

    /// SHA-256 of the root certificate's DER.
    pub fn fingerprint_sha256(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (dst, src) in out
            .iter_mut()
            .zip(digest::digest(&SHA256, &self.ca.der).as_ref())
        {
            *dst = *src;
        }
        out
    }

    /// [`SimRoot::fingerprint_sha256`] as lowercase hex.
    pub fn fingerprint_hex(&self) -> String {
        self.fingerprint_sha256()
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect()
    }

    /// Start of the root's validity, seconds since the Unix epoch.
    pub fn not_before_unix(&self) -> i64 {
        self.ca.validity.not_before
    }

    /// End of the root's validity, seconds since the Unix epoch.
    pub fn not_after_unix(&self) -> i64 {
        self.ca.validity.not_after
    }

    pub(crate) fn ca(&self) -> &Ca {
        &self.ca
    }
}

/// The key as a PKCS#8 PEM block; every copy of the key is zeroized on drop.
fn encode_private_key(key: &P384Key) -> Zeroizing<String> {
    let block = pem::Pem::new("PRIVATE KEY", key.pkcs8().to_vec());
    let text = Zeroizing::new(pem::encode(&block));
    drop(Zeroizing::new(block.into_contents()));
    text
}

fn pem_certificate(der: &[u8]) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))
}

/// Reads and parses the root key, refusing a file others can access.
fn read_key(path: &Path) -> Result<P384Key, SimError> {
    let metadata =
        fs::metadata(path).map_err(|err| SimError::io("read the simulated root key", path, err))?;
    let mode = metadata.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(SimError::InsecureKeyFile {
            path: path.to_owned(),
            mode,
        });
    }
    let text = Zeroizing::new(
        fs::read_to_string(path)
            .map_err(|err| SimError::io("read the simulated root key", path, err))?,
    );
    let invalid = |reason: &str| SimError::InvalidRoot {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    // Never put the key's text into an error message.
    let parsed = pem::parse(text.as_bytes()).map_err(|_| invalid("not a PEM file"))?;
    if parsed.tag() != "PRIVATE KEY" {
        return Err(invalid("expected a PKCS#8 PRIVATE KEY PEM block"));
    }
    let der = Zeroizing::new(parsed.into_contents());
    P384Key::from_pkcs8(&der).map_err(|_| invalid("not a P-384 PKCS#8 private key"))
}

/// Writes `contents` to `dir/name` atomically: a new temporary file with
/// `mode`, fsync, then into place, then fsync of the directory.
///
/// With `replace`, an existing file is replaced (rename). Without it, an
/// existing file is kept and `Ok(false)` returned (link, which never
/// overwrites).
fn write_atomic(
    dir: &Path,
    name: &str,
    contents: &[u8],
    mode: u32,
    replace: bool,
) -> Result<bool, SimError> {
    let target = dir.join(name);
    let mut suffix = [0u8; 8];
    aws_lc_rs::rand::fill(&mut suffix).map_err(|_| SimError::Crypto("naming a temporary file"))?;
    let suffix: String = suffix.iter().map(|byte| format!("{byte:02x}")).collect();
    let temp = dir.join(format!(".{name}.{suffix}.tmp"));

    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&temp)
            .map_err(|err| SimError::io("create", &temp, err))?;
        // The umask can only clear bits; set the mode exactly all the same.
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|err| SimError::io("set the permissions of", &temp, err))?;
        file.write_all(contents)
            .map_err(|err| SimError::io("write", &temp, err))?;
        file.sync_all()
            .map_err(|err| SimError::io("sync", &temp, err))?;
        if replace {
            fs::rename(&temp, &target).map_err(|err| SimError::io("replace", &target, err))?;
            Ok(true)
        } else {
            match fs::hard_link(&temp, &target) {
                Ok(()) => Ok(true),
                Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
                Err(err) => Err(SimError::io("create", &target, err)),
            }
        }
    })();
    // Gone already after a rename; after a link (or a failure) remove it.
    let _ = fs::remove_file(&temp);
    let written = result?;
    fs::File::open(dir)
        .and_then(|handle| handle.sync_all())
        .map_err(|err| SimError::io("sync the directory", dir, err))?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::clock::FixedClock;

    #[test]
    fn persists_and_reloads_the_same_root() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("nested/state");
        let clock = FixedClock::new(1_700_000_000_000);
        let (created, origin) = SimRoot::load_or_create(&state, &clock).unwrap();
        assert_eq!(origin, RootOrigin::Created);
        assert_eq!(created.not_before_unix(), 1_700_000_000);
        assert_eq!(created.not_after_unix(), 1_700_000_000 + ROOT_VALIDITY_S);

        let key_mode = fs::metadata(SimRoot::key_path(&state))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(key_mode & 0o777, 0o600);
        let dir_mode = fs::metadata(&state).unwrap().permissions().mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        // No temporary files left behind.
        let mut names: Vec<_> = fs::read_dir(&state)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, [ROOT_CERT_FILE, ROOT_KEY_FILE]);

        clock.advance(86_400_000);
        let (loaded, origin) = SimRoot::load_or_create(&state, &clock).unwrap();
        assert_eq!(origin, RootOrigin::Loaded);
        assert_eq!(loaded.root_der(), created.root_der());
        assert_eq!(loaded.fingerprint_sha256(), created.fingerprint_sha256());
        assert_eq!(loaded.root_pem(), created.root_pem());
        assert_eq!(
            fs::read_to_string(SimRoot::cert_path(&state)).unwrap(),
            created.root_pem()
        );
        assert_eq!(
            loaded.ca().issuer.key().public_key(),
            created.ca().issuer.key().public_key()
        );
    }

    #[test]
    fn reissues_a_missing_certificate_for_the_existing_key() {
        let dir = tempfile::tempdir().unwrap();
        let (first, _) = SimRoot::load_or_create(dir.path(), &SystemClock).unwrap();
        fs::remove_file(SimRoot::cert_path(dir.path())).unwrap();
        let (second, origin) = SimRoot::load_or_create(dir.path(), &SystemClock).unwrap();
        assert_eq!(origin, RootOrigin::Created);
        assert_eq!(
            first.ca().issuer.key().public_key(),
            second.ca().issuer.key().public_key()
        );
        let reloaded = SimRoot::load(dir.path()).unwrap();
        assert_eq!(reloaded.root_der(), second.root_der());
    }

    #[test]
    fn refuses_a_key_readable_by_others() {
        let dir = tempfile::tempdir().unwrap();
        SimRoot::load_or_create(dir.path(), &SystemClock).unwrap();
        let key_path = SimRoot::key_path(dir.path());
        fs::set_permissions(&key_path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = SimRoot::load(dir.path()).unwrap_err();
        assert!(
            matches!(err, SimError::InsecureKeyFile { mode: 0o644, .. }),
            "{err}"
        );
    }

    #[test]
    fn refuses_a_certificate_of_another_key() {
        let dir = tempfile::tempdir().unwrap();
        SimRoot::load_or_create(dir.path(), &SystemClock).unwrap();
        let other = SimRoot::generate().unwrap();
        fs::write(SimRoot::cert_path(dir.path()), other.root_pem()).unwrap();
        let err = SimRoot::load(dir.path()).unwrap_err();
        assert!(matches!(err, SimError::InvalidRoot { .. }), "{err}");
        assert!(err.to_string().contains("does not belong"), "{err}");
    }

    #[test]
    fn corrupt_key_error_does_not_echo_the_file() {
        let dir = tempfile::tempdir().unwrap();
        SimRoot::load_or_create(dir.path(), &SystemClock).unwrap();
        let key_path = SimRoot::key_path(dir.path());
        fs::write(&key_path, "SECRET-MATERIAL").unwrap();
        fs::set_permissions(&key_path, fs::Permissions::from_mode(0o600)).unwrap();
        let err = SimRoot::load(dir.path()).unwrap_err();
        assert!(!format!("{err} {err:?}").contains("SECRET-MATERIAL"));
    }

    #[test]
    fn debug_never_shows_the_key() {
        let root = SimRoot::generate().unwrap();
        let debug = format!("{root:?}");
        assert!(debug.contains(&root.fingerprint_hex()));
        assert!(debug.contains("<redacted>"));
        let key_pem = pem::encode(&pem::Pem::new(
            "PRIVATE KEY",
            root.ca().issuer.key().pkcs8().to_vec(),
        ));
        let body_line = key_pem.lines().nth(1).unwrap();
        assert!(!debug.contains(body_line));
    }

    #[test]
    fn unwritable_state_dir_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        fs::write(&blocker, b"").unwrap();
        let err = SimRoot::load_or_create(&blocker.join("state"), &SystemClock).unwrap_err();
        assert!(matches!(err, SimError::Io { .. }), "{err}");
        assert!(err.to_string().contains("state directory"), "{err}");
    }
}
