//! The one way the commands write an output file: a new file (never over
//! an existing one, never through a symbolic link), synced with its
//! directory entry before the command reports it, and removed again if
//! writing it failed, so no half-written file is left behind.

use anyhow::{anyhow, Context};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Who may read the file.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Access {
    /// The default for new files (the umask applies).
    Default,
    /// The owner only (mode 0600): credentials, secrets.
    OwnerOnly,
}

/// Writes `contents` to the new file `path` (see the module documentation).
pub(crate) fn write_new(path: &Path, contents: &[u8], access: Access) -> anyhow::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    if let Access::OwnerOnly = access {
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .with_context(|| format!("creating {} (it must not exist)", path.display()))?;
    if let Err(e) = file.write_all(contents).and_then(|()| file.sync_all()) {
        drop(file);
        let _ = std::fs::remove_file(path);
        return Err(anyhow!(e).context(format!("writing {}", path.display())));
    }
    // The directory entry too: a crash must not lose a file already reported.
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn writes_once_never_over_a_file_and_owner_only_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        write_new(&path, b"one", Access::OwnerOnly).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let err = write_new(&path, b"two", Access::Default).unwrap_err();
        assert!(format!("{err:#}").contains("must not exist"), "{err:#}");
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
        // Through a symbolic link: refused, the target untouched.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(write_new(&link, b"three", Access::Default).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
    }
}
