//! `enclave nsm-sim`: the simulated NSM's command line.

use std::ffi::OsString;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context as _, Result};
use clap::{Args, Subcommand};
use kluis_nsm::sim::{RootOrigin, SimConfig, SimRoot, SimulatedNsm, SystemClock};
use kluis_nsm::{Digest, MAX_INPUT_LEN, PCR_LEN};

/// Environment variable naming the simulator's state directory.
const STATE_DIR_ENV: &str = "KLUIS_NSM_SIM_DIR";

pub(crate) const WARNING: &str =
    "WARNING: this is a SIMULATED Nitro Secure Module, not a real enclave. \
Its documents chain to a local simulated root, never to AWS's; do not trust them in production.";

/// Subcommands of `enclave nsm-sim`.
#[derive(Debug, Subcommand)]
pub(crate) enum NsmSimCommand {
    /// Create (or load) the persistent simulated root; print its path and SHA-256 fingerprint.
    Init(StateArgs),
    /// Print the simulated root certificate (PEM), for a verifier told to trust it.
    ExportRoot {
        #[command(flatten)]
        state: StateArgs,
        /// Write the PEM to this file instead of standard output (an
        /// existing file is refused unless --force).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Replace an existing --out file.
        #[arg(long, requires = "out")]
        force: bool,
    },
    /// Produce an attestation document (raw COSE_Sign1 bytes).
    Attest(AttestArgs),
    /// Print what DescribeNSM answers, as JSON.
    Describe {
        #[command(flatten)]
        state: StateArgs,
        /// Module id to report.
        #[arg(long, value_name = "ID")]
        module_id: Option<String>,
    },
}

/// Where the simulator keeps its root.
#[derive(Debug, Args)]
pub(crate) struct StateArgs {
    /// State directory [default: $KLUIS_NSM_SIM_DIR, else $XDG_STATE_HOME/kluis/nsm-sim,
    /// else ~/.local/state/kluis/nsm-sim].
    #[arg(long, value_name = "DIR")]
    pub(crate) state: Option<PathBuf>,
}

/// Arguments of `enclave nsm-sim attest`.
#[derive(Debug, Args)]
pub(crate) struct AttestArgs {
    #[command(flatten)]
    state: StateArgs,
    /// Nonce (hex, at most 1024 bytes); absent means CBOR null.
    #[arg(long, value_name = "HEX")]
    nonce: Option<String>,
    /// User data (hex, at most 1024 bytes); absent means CBOR null.
    #[arg(long, value_name = "HEX")]
    user_data: Option<String>,
    /// Public key (hex, at most 1024 bytes); absent means CBOR null.
    #[arg(long, value_name = "HEX")]
    public_key: Option<String>,
    /// Simulate a debug-mode enclave: PCR0, PCR1 and PCR2 read as zeros.
    #[arg(long)]
    debug: bool,
    /// Boot value of a PCR among 0..=15: N=HEX with 48 bytes of hex (repeatable).
    #[arg(long = "pcr", value_name = "N=HEX")]
    pcrs: Vec<String>,
    /// Enclave image (any file) to measure into PCR0, PCR1 and PCR2.
    #[arg(long, value_name = "FILE")]
    image: Option<PathBuf>,
    /// Certificate (DER) the image was signed with, measured into PCR8.
    #[arg(long, value_name = "FILE", requires = "image")]
    signing_cert: Option<PathBuf>,
    /// Module id to report.
    #[arg(long, value_name = "ID")]
    module_id: Option<String>,
    /// Where to write the document; `-` for standard output. An existing
    /// file is refused unless --force.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Replace an existing --out file.
    #[arg(long)]
    force: bool,
}

/// Runs one `nsm-sim` subcommand.
pub(crate) fn run(command: NsmSimCommand) -> Result<()> {
    to_stderr!("{WARNING}");
    match command {
        NsmSimCommand::Init(state) => init(&state),
        NsmSimCommand::ExportRoot { state, out, force } => {
            export_root(&state, out.as_deref(), force)
        }
        NsmSimCommand::Attest(args) => attest(&args),
        NsmSimCommand::Describe { state, module_id } => describe(&state, module_id),
    }
}

/// The state directory: `--state`, else the environment's default.
pub(crate) fn state_dir(args: &StateArgs) -> Result<PathBuf> {
    if let Some(dir) = &args.state {
        return Ok(dir.clone());
    }
    default_state_dir(
        std::env::var_os(STATE_DIR_ENV),
        std::env::var_os("XDG_STATE_HOME"),
        std::env::var_os("HOME"),
    )
}

fn default_state_dir(
    explicit: Option<OsString>,
    xdg_state_home: Option<OsString>,
    home: Option<OsString>,
) -> Result<PathBuf> {
    let non_empty = |value: Option<OsString>| value.filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = non_empty(explicit) {
        return Ok(dir);
    }
    // The XDG spec ignores relative values.
    if let Some(dir) = non_empty(xdg_state_home).filter(|dir| dir.is_absolute()) {
        return Ok(dir.join("kluis").join("nsm-sim"));
    }
    if let Some(home) = non_empty(home) {
        return Ok(home.join(".local/state/kluis/nsm-sim"));
    }
    bail!("cannot find a state directory: pass --state DIR or set {STATE_DIR_ENV}")
}

/// Loads the root in `dir` or creates it, saying so on stderr when `announce`.
pub(crate) fn load_or_create(dir: &Path, announce: bool) -> Result<(Arc<SimRoot>, RootOrigin)> {
    let (root, origin) = SimRoot::load_or_create(dir, &SystemClock)?;
    if announce && origin == RootOrigin::Created {
        to_stderr!(
            "created a new simulated root in {} (SHA-256 {})",
            dir.display(),
            root.fingerprint_hex()
        );
    }
    Ok((Arc::new(root), origin))
}

fn init(state: &StateArgs) -> Result<()> {
    let dir = state_dir(state)?;
    let (root, origin) = load_or_create(&dir, false)?;
    let verb = match origin {
        RootOrigin::Created => "created",
        RootOrigin::Loaded => "loaded",
    };
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "simulated NSM root {verb}\nstate directory:     {}\nroot certificate:    {}\nSHA-256 fingerprint: {}",
        dir.display(),
        SimRoot::cert_path(&dir).display(),
        root.fingerprint_hex()
    )
    .and_then(|()| out.flush())
    .context("writing to standard output")?;
    Ok(())
}

fn export_root(state: &StateArgs, out: Option<&Path>, force: bool) -> Result<()> {
    let dir = state_dir(state)?;
    if !SimRoot::key_path(&dir).exists() {
        bail!(
            "no simulated root in {}: run `enclave nsm-sim init` first",
            dir.display()
        );
    }
    let root = SimRoot::load(&dir)?;
    write_output(out, root.root_pem().as_bytes(), force)
}

/// Writes `bytes` to `out`, or to standard output when `out` is `None` or
/// `-`. An existing file is replaced only with `force`.
fn write_output(out: Option<&Path>, bytes: &[u8], force: bool) -> Result<()> {
    match out {
        Some(path) if path != Path::new("-") => {
            let mut options = std::fs::OpenOptions::new();
            options.write(true);
            if force {
                options.create(true).truncate(true);
            } else {
                options.create_new(true);
            }
            let mut file = options.open(path).map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    anyhow::anyhow!(
                        "{} exists: remove it, choose another --out, or give --force",
                        path.display()
                    )
                } else {
                    anyhow::Error::new(e).context(format!("cannot write {}", path.display()))
                }
            })?;
            file.write_all(bytes)
                .with_context(|| format!("cannot write {}", path.display()))
        }
        _ => {
            let mut stdout = std::io::stdout().lock();
            stdout
                .write_all(bytes)
                .and_then(|()| stdout.flush())
                .context("cannot write to standard output")
        }
    }
}

/// Parses an optional hex field of at most [`MAX_INPUT_LEN`] bytes.
fn hex_field(flag: &str, value: Option<&str>) -> Result<Option<Vec<u8>>> {
    let Some(value) = value else {
        return Ok(None);
    };
    let digits = value.strip_prefix("0x").unwrap_or(value);
    let bytes = hex::decode(digits).map_err(|err| anyhow!("{flag}: invalid hex: {err}"))?;
    if bytes.len() > MAX_INPUT_LEN {
        bail!(
            "{flag}: {} bytes, the NSM accepts at most {MAX_INPUT_LEN}",
            bytes.len()
        );
    }
    Ok(Some(bytes))
}

/// Parses `--pcr N=HEX`.
fn pcr_arg(value: &str) -> Result<(u16, [u8; PCR_LEN])> {
    let (index, digits) = value
        .split_once('=')
        .ok_or_else(|| anyhow!("--pcr {value:?}: expected N=HEX"))?;
    let index: u16 = index
        .trim()
        .parse()
        .map_err(|_| anyhow!("--pcr {value:?}: {index:?} is not a PCR number"))?;
    if index > 15 {
        bail!("--pcr {index}: only the boot PCRs 0..=15 can be set");
    }
    let digits = digits.strip_prefix("0x").unwrap_or(digits);
    let bytes = hex::decode(digits).map_err(|err| anyhow!("--pcr {index}: invalid hex: {err}"))?;
    let pcr = <[u8; PCR_LEN]>::try_from(bytes.as_slice()).map_err(|_| {
        anyhow!(
            "--pcr {index}: {} bytes, a PCR is {PCR_LEN} bytes ({} hex digits)",
            bytes.len(),
            PCR_LEN.saturating_mul(2)
        )
    })?;
    Ok((index, pcr))
}

fn read_file(flag: &str, path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{flag}: cannot read {}", path.display()))
}

fn attest(args: &AttestArgs) -> Result<()> {
    // Check every input before touching the state directory.
    let user_data = hex_field("--user-data", args.user_data.as_deref())?;
    let nonce = hex_field("--nonce", args.nonce.as_deref())?;
    let public_key = hex_field("--public-key", args.public_key.as_deref())?;
    let mut config = SimConfig::default().with_debug(args.debug);
    for value in &args.pcrs {
        let (index, pcr) = pcr_arg(value)?;
        config = config.with_boot_pcr(index, pcr);
    }
    if let Some(image) = &args.image {
        let signing_cert = match &args.signing_cert {
            Some(path) => Some(read_file("--signing-cert", path)?),
            None => None,
        };
        config = config.with_image(read_file("--image", image)?, signing_cert);
    }
    if let Some(module_id) = &args.module_id {
        config = config.with_module_id(module_id.clone());
    }
    config.validate()?;

    let dir = state_dir(&args.state)?;
    let (root, _) = load_or_create(&dir, true)?;
    let nsm = SimulatedNsm::new(config.with_root(root))?;
    let document = kluis_nsm::attest(
        &nsm,
        user_data.as_deref(),
        nonce.as_deref(),
        public_key.as_deref(),
    )
    .context("the simulated NSM refused the attestation request")?;
    write_output(Some(&args.out), &document, args.force)?;
    if args.out != Path::new("-") {
        to_stderr!(
            "wrote a {}-byte attestation document to {}",
            document.len(),
            args.out.display()
        );
    }
    Ok(())
}

fn describe(state: &StateArgs, module_id: Option<String>) -> Result<()> {
    let mut config = SimConfig::default();
    if let Some(module_id) = module_id {
        config = config.with_module_id(module_id);
    }
    config.validate()?;
    let dir = state_dir(state)?;
    let (root, _) = load_or_create(&dir, true)?;
    let nsm = SimulatedNsm::new(config.with_root(root))?;
    let description = kluis_nsm::describe_nsm(&nsm)?;
    let digest = match description.digest {
        Digest::SHA256 => "SHA256",
        Digest::SHA384 => "SHA384",
        Digest::SHA512 => "SHA512",
    };
    let json = serde_json::json!({
        "simulated": true,
        "version_major": description.version.0,
        "version_minor": description.version.1,
        "version_patch": description.version.2,
        "module_id": description.module_id,
        "max_pcrs": description.max_pcrs,
        "locked_pcrs": description.locked_pcrs,
        "digest": digest,
    });
    let mut text = serde_json::to_string_pretty(&json).context("cannot encode JSON")?;
    text.push('\n');
    write_output(None, text.as_bytes(), false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_dir_precedence() {
        let os = |s: &str| Some(OsString::from(s));
        assert_eq!(
            default_state_dir(os("/explicit"), os("/xdg"), os("/home/u")).unwrap(),
            PathBuf::from("/explicit")
        );
        assert_eq!(
            default_state_dir(os(""), os("/xdg"), os("/home/u")).unwrap(),
            PathBuf::from("/xdg/kluis/nsm-sim")
        );
        assert_eq!(
            default_state_dir(None, os("relative"), os("/home/u")).unwrap(),
            PathBuf::from("/home/u/.local/state/kluis/nsm-sim")
        );
        assert!(default_state_dir(None, None, None).is_err());
    }

    #[test]
    fn hex_fields() {
        assert_eq!(hex_field("--nonce", None).unwrap(), None);
        assert_eq!(hex_field("--nonce", Some("")).unwrap(), Some(vec![]));
        assert_eq!(
            hex_field("--nonce", Some("0xA0ff")).unwrap(),
            Some(vec![0xa0, 0xff])
        );
        let err = hex_field("--nonce", Some("zz")).unwrap_err().to_string();
        assert!(err.starts_with("--nonce: invalid hex"), "{err}");
        assert!(hex_field("--nonce", Some(&"00".repeat(1024))).is_ok());
        let err = hex_field("--user-data", Some(&"00".repeat(1025)))
            .unwrap_err()
            .to_string();
        assert_eq!(err, "--user-data: 1025 bytes, the NSM accepts at most 1024");
    }

    #[test]
    fn pcr_args() {
        let hex48 = "ab".repeat(48);
        assert_eq!(pcr_arg(&format!("3={hex48}")).unwrap(), (3, [0xab; 48]));
        for bad in [
            format!("16={hex48}"),
            format!("x={hex48}"),
            hex48.clone(),
            "3=abcd".to_owned(),
            "3=zz".to_owned(),
        ] {
            assert!(pcr_arg(&bad).is_err(), "{bad}");
        }
    }
}
