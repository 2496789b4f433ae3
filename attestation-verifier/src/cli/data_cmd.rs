//! `data encrypt` / `data decrypt`: the controller's own tools for the
//! streaming envelope (application administrators).
//!
//! Output is written to a temporary file next to the destination and renamed
//! into place only when the whole stream has been processed and authenticated:
//! a failed or interrupted decryption never leaves a file that looks complete.
//! An existing output is refused unless `--force`, and then only a regular
//! file is replaced (never a FIFO, device, directory or symbolic link). The
//! output is written to a file with no name (`O_TMPFILE`, mode 0600) and
//! linked into place at the end: a run that is interrupted or killed
//! leaves nothing behind (a decryption's plaintext prefix included). On a
//! file system without unnamed files, a named temporary file
//! (`.kluis-partial-<name>-<random>`, mode 0600) is used instead; it is
//! locked while it is written, and one left by a killed run is removed by
//! the next run for the same output.

use crate::audit::Decision;
use crate::auth::Permission;
use crate::cli::session::{Failure, Session, StoreArgs};
use crate::cli::verify_cmd::{emit, now_ms};
use crate::keys::{KeyName, WrappedDataKey};
use anyhow::{anyhow, Context};
use clap::Subcommand;
use kluis_envelope::{EnvelopeHeader, EnvelopeReader, EnvelopeWriter, WrappedKey};
use serde_json::json;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, Subcommand)]
pub(crate) enum DataCommand {
    /// Encrypt IN to OUT under a fresh data key wrapped by master key --key.
    Encrypt {
        /// The master key.
        #[arg(long)]
        key: String,
        /// Plaintext input (`-` for stdin).
        input: PathBuf,
        /// Envelope output (`-` for stdout).
        output: PathBuf,
        /// Replace OUT if it is an existing regular file.
        #[arg(long)]
        force: bool,
    },
    /// Make a new secret for an enclave workload (for example the
    /// pseudonymisation key) under master key --key, and write only its
    /// wrapped form to OUT: the plaintext secret exists only inside attested
    /// enclaves that the key's policy admits. Hand OUT to `parent run --secret`.
    NewSecret {
        /// The master key.
        #[arg(long)]
        key: String,
        /// Where the wrapped secret goes (refused if it exists).
        output: PathBuf,
    },
    /// Decrypt envelope IN to OUT (the key comes from the envelope's header).
    Decrypt {
        /// Envelope input (`-` for stdin).
        input: PathBuf,
        /// Plaintext output (`-` for stdout). A file appears only once the
        /// whole envelope authenticated; on stdout, plaintext streams out as it
        /// authenticates segment by segment, so a consumer must check the exit
        /// status before trusting that it saw everything.
        output: PathBuf,
        /// Replace OUT if it is an existing regular file.
        #[arg(long)]
        force: bool,
    },
}

fn open_input(path: &Path) -> anyhow::Result<Box<dyn Read>> {
    if path.as_os_str() == "-" {
        return Ok(Box::new(std::io::stdin().lock()));
    }
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    Ok(Box::new(std::io::BufReader::with_capacity(1 << 20, file)))
}

/// Where output goes: stdout, or a temporary file renamed into place on success.
enum Output {
    Stdout,
    /// A file with no name in `dest`'s directory, linked in on success.
    Unnamed {
        file: std::fs::File,
        dest: PathBuf,
        force: bool,
    },
    File {
        temp: tempfile::NamedTempFile,
        dest: PathBuf,
        force: bool,
    },
}

/// Refuse an output path that exists, unless `force` and it is a regular
/// file. Checked before any key is used, and again at the rename.
fn check_output(path: &Path, force: bool) -> anyhow::Result<()> {
    if path.as_os_str() == "-" {
        return Ok(());
    }
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(anyhow!(e).context(format!("checking {}", path.display()))),
        Ok(m) if !m.file_type().is_file() => Err(anyhow!(
            "{} exists and is not a regular file (a link, FIFO, device or directory): it is never replaced",
            path.display()
        )),
        Ok(_) if !force => Err(anyhow!(
            "{} exists; pass --force to replace it",
            path.display()
        )),
        Ok(_) => Ok(()),
    }
}

fn partial_prefix(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!(".kluis-partial-{name}-")
}

fn output_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Remove temporary files a killed run left for `path` (they may hold a
/// plaintext prefix): those no running process holds locked.
fn remove_stale_partials(path: &Path) {
    let prefix = partial_prefix(path);
    let Ok(entries) = std::fs::read_dir(output_dir(path)) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with(&prefix) {
            continue;
        }
        let stale = entry.path();
        let Ok(file) = std::fs::OpenOptions::new().read(true).open(&stale) else {
            continue;
        };
        if file.try_lock().is_ok() && std::fs::remove_file(&stale).is_ok() {
            to_stderr!("removed {} left by an interrupted run", stale.display());
        }
    }
}

impl Output {
    fn create(path: &Path, force: bool) -> anyhow::Result<Output> {
        if path.as_os_str() == "-" {
            return Ok(Output::Stdout);
        }
        check_output(path, force)?;
        remove_stale_partials(path);
        let dir = output_dir(path);
        use rustix::fs::{Mode, OFlags};
        match rustix::fs::open(
            dir,
            OFlags::TMPFILE | OFlags::WRONLY | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        ) {
            Ok(fd) => {
                return Ok(Output::Unnamed {
                    file: std::fs::File::from(fd),
                    dest: path.to_path_buf(),
                    force,
                })
            }
            // No unnamed files here (EOPNOTSUPP; EISDIR on old kernels):
            // a named temporary file.
            Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::ISDIR) => {}
            Err(e) => {
                return Err(anyhow!(std::io::Error::from(e))
                    .context(format!("creating a temporary file in {}", dir.display())))
            }
        }
        let temp = tempfile::Builder::new()
            .prefix(&partial_prefix(path))
            .tempfile_in(dir)
            .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
        // Held until the file is renamed or removed: marks it as in use.
        temp.as_file()
            .lock()
            .with_context(|| format!("locking {}", temp.path().display()))?;
        Ok(Output::File {
            temp,
            dest: path.to_path_buf(),
            force,
        })
    }

    fn writer(&mut self) -> Box<dyn Write + '_> {
        match self {
            Output::Stdout => Box::new(std::io::stdout().lock()),
            Output::Unnamed { file, .. } => {
                Box::new(std::io::BufWriter::with_capacity(1 << 20, file))
            }
            Output::File { temp, .. } => Box::new(std::io::BufWriter::with_capacity(
                1 << 20,
                temp.as_file_mut(),
            )),
        }
    }

    /// Make the output visible: fsync and rename (a failure drops the temp file).
    fn commit(self) -> anyhow::Result<()> {
        match self {
            Output::Stdout => Ok(std::io::stdout().flush()?),
            Output::Unnamed { file, dest, force } => {
                file.sync_all()?;
                let dir = output_dir(&dest);
                // The file's own name in /proc links it without privileges
                // (a link from the descriptor itself needs one).
                use std::os::fd::AsRawFd as _;
                let fd_path = format!("/proc/self/fd/{}", file.as_raw_fd());
                let link = |to: &Path| {
                    rustix::fs::linkat(
                        rustix::fs::CWD,
                        fd_path.as_str(),
                        rustix::fs::CWD,
                        to,
                        rustix::fs::AtFlags::SYMLINK_FOLLOW,
                    )
                    .map_err(|e| {
                        anyhow!(
                            "linking the output into {}: {}",
                            to.display(),
                            std::io::Error::from(e)
                        )
                    })
                };
                if force {
                    // Linked under a name of its own, then renamed over the
                    // destination (a link never replaces a file).
                    let temp = tempfile::Builder::new()
                        .prefix(&partial_prefix(&dest))
                        .make_in(dir, |path| link(path).map_err(std::io::Error::other))
                        .with_context(|| format!("linking the output into {}", dir.display()))?;
                    check_output(&dest, true)?;
                    temp.persist(&dest)
                        .map_err(|e| anyhow!("renaming into {}: {}", dest.display(), e.error))?;
                } else {
                    // Refuses a file that appeared meanwhile (EEXIST).
                    link(&dest)?;
                }
                std::fs::File::open(dir).and_then(|d| d.sync_all()).ok();
                Ok(())
            }
            Output::File { temp, dest, force } => {
                temp.as_file().sync_all()?;
                if force {
                    check_output(&dest, true)?;
                    temp.persist(&dest)
                        .map_err(|e| anyhow!("renaming into {}: {}", dest.display(), e.error))?;
                } else {
                    // Refuses a file that appeared meanwhile.
                    temp.persist_noclobber(&dest)
                        .map_err(|e| anyhow!("renaming into {}: {}", dest.display(), e.error))?;
                }
                Ok(())
            }
        }
    }
}

pub(crate) fn data(store: &StoreArgs, command: &DataCommand) -> Result<(), Failure> {
    match command {
        DataCommand::Encrypt {
            key,
            input,
            output,
            force,
        } => {
            let name = KeyName::parse(key)?;
            check_output(output, *force)?;
            let session = Session::start(store, Permission::UseData, "data.encrypt")?;
            let (dk, wrapped) = session.used("data.encrypt", &name, |k| {
                k.generate_data_key(&name, now_ms()).map(|(dk, w)| {
                    let v = w.version;
                    ((dk, w), Some(v))
                })
            })?;
            let header_key = WrappedKey::new(name.as_str(), wrapped.version, wrapped.to_bytes())
                .map_err(|e| anyhow!("envelope header: {e}"))?;
            let mut reader = open_input(input)?;
            let mut out = Output::create(output, *force)?;
            let bytes = {
                let mut writer = EnvelopeWriter::new(out.writer(), &dk, header_key)
                    .map_err(|e| anyhow!("{e}"))?;
                let n = std::io::copy(&mut reader, &mut writer).context("encrypting")?;
                writer
                    .finish()
                    .map_err(|e| anyhow!("{e}"))?
                    .flush()
                    .context("writing")?;
                n
            };
            out.commit()?;
            if output.as_os_str() != "-" {
                emit(
                    &json!({ "key": name.as_str(), "version": wrapped.version, "plaintext_bytes": bytes, "output": output.display().to_string() }),
                );
            }
        }
        DataCommand::NewSecret { key, output } => {
            let name = KeyName::parse(key)?;
            let session = Session::start(store, Permission::UseData, "data.new_secret")?;
            let (secret, wrapped) = session.used("data.new_secret", &name, |k| {
                k.generate_data_key(&name, now_ms()).map(|(dk, w)| {
                    let v = w.version;
                    ((dk, w), Some(v))
                })
            })?;
            // The plaintext is not needed here: drop (zeroize) it at once.
            drop(secret);
            let bytes = wrapped.to_bytes();
            crate::cli::output::write_new(output, &bytes, crate::cli::output::Access::Default)?;
            emit(
                &json!({ "key": name.as_str(), "version": wrapped.version, "wrapped_secret": output.display().to_string() }),
            );
        }
        DataCommand::Decrypt {
            input,
            output,
            force,
        } => {
            check_output(output, *force)?;
            let session = Session::start(store, Permission::UseData, "data.decrypt")?;
            let mut reader = open_input(input)?;
            let header = EnvelopeHeader::read_from(&mut reader)
                .map_err(|e| Failure::Refused("bad_envelope".into(), e.to_string()))?;
            let wrapped = WrappedDataKey::from_bytes(header.wrapped_key().wrapped_bytes())?;
            if wrapped.key.as_str() != header.cmk_id() || wrapped.version != header.cmk_version() {
                return Err(Failure::Refused(
                    "bad_envelope".into(),
                    "header names another key than its wrapped data key".into(),
                ));
            }
            let name = wrapped.key.clone();
            let dk = session.used("data.decrypt", &name, |k| {
                k.decrypt_data_key(&wrapped)
                    .map(|dk| (dk, Some(wrapped.version)))
            })?;
            let mut out = Output::create(output, *force)?;
            let result = {
                let mut plain =
                    EnvelopeReader::with_header(reader, header, &dk).map_err(|e| anyhow!("{e}"))?;
                let mut sink = out.writer();
                let copied = std::io::copy(&mut plain, &mut sink);
                let flushed = sink.flush();
                drop(sink);
                match (copied, flushed) {
                    (Ok(n), Ok(())) => plain.finish().map(|_| n).map_err(|e| e.to_string()),
                    (Err(e), _) | (_, Err(e)) => Err(e.to_string()),
                }
            };
            match result {
                Ok(bytes) => {
                    out.commit()?;
                    if output.as_os_str() != "-" {
                        emit(
                            &json!({ "key": name.as_str(), "version": wrapped.version, "plaintext_bytes": bytes, "output": output.display().to_string() }),
                        );
                    }
                }
                Err(e) => {
                    // The temporary file is dropped (deleted) with `out`.
                    session.record(
                        "data.decrypt",
                        Some(&name),
                        Some(wrapped.version),
                        Decision::Refused,
                        Some(format!("envelope rejected: {e}")),
                    )?;
                    return Err(Failure::Refused("envelope_rejected".into(), e));
                }
            }
        }
    }
    Ok(())
}
