//! File system helpers: atomic durable writes, bounded reads, shredding.
//!
//! Every file this crate creates is created with `O_CREAT | O_EXCL`
//! (`create_new`) and mode 0600, every directory with mode 0700. A file is
//! put into place by writing a temporary file in the same directory, fsyncing
//! it, renaming (or linking) it over the target and fsyncing the directory,
//! so that a process killed at any instant leaves either the old or the new
//! file, and a write that returned survives a crash.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read as _, Seek as _, SeekFrom, Write as _};
use std::os::unix::fs::{
    DirBuilderExt as _, FileTypeExt as _, MetadataExt as _, OpenOptionsExt as _,
};
use std::path::Path;

use crate::StoreError;

/// Suffix of temporary files (a write in progress, or one a crash interrupted).
pub(crate) const TEMP_SUFFIX: &str = ".tmp";
/// Suffix of a record being deleted: renamed out of the way, then overwritten
/// and removed. One found on open is finished off.
pub(crate) const SHRED_SUFFIX: &str = ".del";

/// Mode of every file the store creates.
pub(crate) const FILE_MODE: u32 = 0o600;
/// Mode of every directory the store creates.
pub(crate) const DIR_MODE: u32 = 0o700;

/// `n` random bytes as lowercase hex.
pub(crate) fn random_hex(n: usize) -> Result<String, StoreError> {
    let mut bytes = vec![0u8; n];
    aws_lc_rs::rand::fill(&mut bytes).map_err(|_| StoreError::Crypto("drawing random bytes"))?;
    Ok(hex::encode(bytes))
}

/// Whether `name` is one of our temporary or half-deleted files.
pub(crate) fn is_leftover(name: &str) -> bool {
    name.starts_with('.') && (name.ends_with(TEMP_SUFFIX) || name.ends_with(SHRED_SUFFIX))
}

/// fsync a directory, so that the entries created, renamed or removed in it
/// are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|handle| handle.sync_all())
        .map_err(|err| StoreError::io("sync the directory", dir, err))
}

/// Creates `path` (mode 0700) unless it exists, and makes the new entry
/// durable by syncing the parent. Returns whether it was created.
pub(crate) fn ensure_private_dir(path: &Path) -> Result<bool, StoreError> {
    match fs::DirBuilder::new().mode(DIR_MODE).create(path) {
        Ok(()) => {
            // A bare relative name's parent is "": the current directory.
            let parent = match path.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => parent,
                _ => Path::new("."),
            };
            sync_dir(parent)?;
            Ok(true)
        }
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
            let meta =
                fs::symlink_metadata(path).map_err(|err| StoreError::io("inspect", path, err))?;
            if meta.is_dir() {
                Ok(false)
            } else {
                Err(StoreError::io(
                    "use as a directory",
                    path,
                    io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        "exists and is not a directory",
                    ),
                ))
            }
        }
        Err(err) => Err(StoreError::io("create the directory", path, err)),
    }
}

/// Whether [`write_atomic`] may replace an existing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Existing {
    /// Replace it (rename over it).
    Replace,
    /// Keep it and report `false` (link, which never overwrites).
    Keep,
}

/// Writes `contents` to `dir/name` atomically and durably: a new temporary
/// file `dir/.name.<random>.tmp` (O_EXCL, mode 0600), write, fsync, rename
/// (or link) into place, fsync of `dir`.
///
/// Returns `false` only with [`Existing::Keep`] when `dir/name` already
/// existed (it is left untouched).
pub(crate) fn write_atomic(
    dir: &Path,
    name: &str,
    contents: &[u8],
    existing: Existing,
) -> Result<bool, StoreError> {
    let target = dir.join(name);
    let temp = dir.join(format!(".{name}.{}{TEMP_SUFFIX}", random_hex(8)?));

    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(&temp)
            .map_err(|err| StoreError::io("create", &temp, err))?;
        file.write_all(contents)
            .map_err(|err| StoreError::io("write", &temp, err))?;
        file.sync_all()
            .map_err(|err| StoreError::io("sync", &temp, err))?;
        drop(file);
        match existing {
            Existing::Replace => {
                fs::rename(&temp, &target)
                    .map_err(|err| StoreError::io("replace", &target, err))?;
                Ok(true)
            }
            Existing::Keep => match fs::hard_link(&temp, &target) {
                Ok(()) => Ok(true),
                Err(err) if err.kind() == io::ErrorKind::AlreadyExists => Ok(false),
                Err(err) => Err(StoreError::io("create", &target, err)),
            },
        }
    })();
    // Already gone after a rename; after a link or a failure, remove it.
    match fs::remove_file(&temp) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) if result.is_ok() => return Err(StoreError::io("remove", &temp, err)),
        Err(_) => {}
    }
    let written = result?;
    sync_dir(dir)?;
    Ok(written)
}

/// Why [`read_bounded`] did not return the contents.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// There is no such file.
    NotFound,
    /// The path is a symbolic link, a directory, a FIFO, a device…
    NotRegular,
    /// The file is larger than the limit; nothing was read.
    TooLarge(u64),
    /// Another I/O error.
    Io(io::Error),
}

impl From<io::Error> for ReadError {
    fn from(err: io::Error) -> Self {
        if err.kind() == io::ErrorKind::NotFound {
            Self::NotFound
        } else {
            Self::Io(err)
        }
    }
}

/// Reads a regular file of at most `limit` bytes.
///
/// The size is checked (on the open handle) before anything is allocated or
/// read, and the read itself stops one byte past the limit, so a file that
/// grows meanwhile, or a sparse file of 100 GiB, is refused without being
/// read. Symbolic links, FIFOs and devices are refused without being opened
/// for reading (a FIFO would block).
pub(crate) fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>, ReadError> {
    read_bounded_identified(path, limit).map(|(contents, _)| contents)
}

/// A file's identity: device and inode numbers.
pub(crate) type FileIdentity = (u64, u64);

/// [`read_bounded`], also returning the identity of the file read.
pub(crate) fn read_bounded_identified(
    path: &Path,
    limit: u64,
) -> Result<(Vec<u8>, FileIdentity), ReadError> {
    let before = fs::symlink_metadata(path)?;
    let kind = before.file_type();
    if !kind.is_file() || kind.is_symlink() || kind.is_fifo() {
        return Err(ReadError::NotRegular);
    }
    let file = File::open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(ReadError::NotRegular);
    }
    let contents = read_limited(file, meta.len(), limit)?;
    Ok((contents, (meta.dev(), meta.ino())))
}

/// Reads `reader`, whose length is said to be `claimed_len`: refused before
/// any byte is read or allocated when that is over `limit`, and refused after
/// at most `limit + 1` bytes when it delivers more than claimed.
fn read_limited<R: io::Read>(
    reader: R,
    claimed_len: u64,
    limit: u64,
) -> Result<Vec<u8>, ReadError> {
    if claimed_len > limit {
        return Err(ReadError::TooLarge(claimed_len));
    }
    let capacity = usize::try_from(claimed_len).map_err(|_| ReadError::TooLarge(claimed_len))?;
    let mut contents = Vec::with_capacity(capacity);
    reader
        .take(limit.saturating_add(1))
        .read_to_end(&mut contents)?;
    let read = u64::try_from(contents.len()).unwrap_or(u64::MAX);
    if read > limit {
        return Err(ReadError::TooLarge(read));
    }
    Ok(contents)
}

/// The identity of the file now at `path` (not following a symbolic link),
/// or `None` if there is none.
pub(crate) fn identity(path: &Path) -> Option<FileIdentity> {
    fs::symlink_metadata(path)
        .ok()
        .map(|meta| (meta.dev(), meta.ino()))
}

/// Overwrites the first `limit` bytes of an open file with zeros and fsyncs
/// it.
///
/// This is best effort against someone who later reads the raw disk: a
/// journaling or copy-on-write file system, or an SSD, may keep old blocks.
pub(crate) fn zero_file(file: &mut File, limit: u64) -> io::Result<()> {
    let len = file.metadata()?.len().min(limit);
    file.seek(SeekFrom::Start(0))?;
    let zeros = [0u8; 8192];
    let mut left = len;
    while left > 0 {
        let n = left.min(8192);
        let chunk = zeros
            .get(..usize::try_from(n).unwrap_or(8192))
            .unwrap_or(&zeros);
        file.write_all(chunk)?;
        left = left.saturating_sub(n);
    }
    file.sync_all()
}

/// Opens an existing regular file for overwriting; `None` if there is none
/// (or it is not a regular file, which is never overwritten).
pub(crate) fn open_for_shredding(path: &Path) -> Result<Option<File>, StoreError> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_file() => {}
        Ok(_) => return Ok(None),
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(StoreError::io("inspect", path, err)),
    }
    match OpenOptions::new().write(true).open(path) {
        Ok(file) => Ok(Some(file)),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(StoreError::io("open", path, err)),
    }
}

/// Overwrites a file with zeros (see [`zero_file`]), fsyncs it, and removes
/// it. The caller syncs the directory.
pub(crate) fn shred_and_remove(path: &Path, limit: u64) -> Result<(), StoreError> {
    if let Some(mut file) = open_for_shredding(path)? {
        zero_file(&mut file, limit).map_err(|err| StoreError::io("shred", path, err))?;
    }
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(StoreError::io("remove", path, err)),
    }
}

/// Whether `.NAME.RANDOM.del` (at `path`) is a second name of the file
/// still at `NAME` in `dir`: a record given that name to be wiped once
/// replaced, when the replacement never happened. Its bytes are the record's
/// and must not be wiped; only the second name goes.
pub(crate) fn still_in_place(dir: &Path, leftover: &str, path: &Path) -> Result<bool, StoreError> {
    use std::os::unix::fs::MetadataExt as _;
    let Some(record) = leftover
        .strip_prefix('.')
        .and_then(|rest| rest.strip_suffix(SHRED_SUFFIX))
        .and_then(|rest| rest.rsplit_once('.'))
        .map(|(record, _random)| record)
    else {
        return Ok(false);
    };
    let same = |a: &fs::Metadata, b: &fs::Metadata| a.dev() == b.dev() && a.ino() == b.ino();
    match (
        fs::symlink_metadata(dir.join(record)),
        fs::symlink_metadata(path),
    ) {
        (Ok(live), Ok(doomed)) => Ok(live.is_file() && same(&live, &doomed)),
        (Err(err), _) if err.kind() == io::ErrorKind::NotFound => Ok(false),
        (Err(err), _) => Err(StoreError::io("inspect", dir.join(record), err)),
        (_, Err(err)) => Err(StoreError::io("inspect", path, err)),
    }
}

/// Removes the leftovers of interrupted writes (`.*.tmp`) and finishes
/// interrupted deletions and replacements (`.*.del`) in `dir`. Returns how
/// many were removed.
pub(crate) fn clean_leftovers(dir: &Path, shred_limit: u64) -> Result<usize, StoreError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(err) => return Err(StoreError::io("list", dir, err)),
    };
    let mut removed = 0usize;
    for entry in entries {
        let entry = entry.map_err(|err| StoreError::io("list", dir, err))?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if !is_leftover(&name) {
            continue;
        }
        let path = entry.path();
        if name.ends_with(SHRED_SUFFIX) && !still_in_place(dir, &name, &path)? {
            shred_and_remove(&path, shred_limit)?;
        } else {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => return Err(StoreError::io("remove", &path, err)),
            }
        }
        removed = removed.saturating_add(1);
    }
    if removed > 0 {
        sync_dir(dir)?;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    /// An endless reader that counts the bytes taken from it.
    struct Counting<'a>(&'a std::cell::Cell<u64>);

    impl io::Read for Counting<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            buf.fill(0x5a);
            self.0.set(
                self.0
                    .get()
                    .saturating_add(u64::try_from(buf.len()).unwrap()),
            );
            Ok(buf.len())
        }
    }

    #[test]
    fn an_oversized_claim_is_refused_without_reading_a_byte() {
        let taken = std::cell::Cell::new(0);
        let err = read_limited(Counting(&taken), 64 << 30, 1024).unwrap_err();
        assert!(
            matches!(err, ReadError::TooLarge(n) if n == 64 << 30),
            "{err:?}"
        );
        assert_eq!(taken.get(), 0, "bytes read before refusing");
    }

    #[test]
    fn a_source_longer_than_claimed_is_read_one_byte_past_the_limit_only() {
        let taken = std::cell::Cell::new(0);
        let err = read_limited(Counting(&taken), 10, 1024).unwrap_err();
        assert!(matches!(err, ReadError::TooLarge(1025)), "{err:?}");
        // `take` may ask the reader for less than a whole buffer, never more.
        assert_eq!(taken.get(), 1025);
        let within = read_limited(&b"exactly the claim"[..], 17, 1024).unwrap();
        assert_eq!(within, b"exactly the claim");
    }

    #[test]
    fn atomic_write_creates_0600_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        assert!(write_atomic(dir.path(), "f", b"one", Existing::Replace).unwrap());
        assert!(write_atomic(dir.path(), "f", b"two", Existing::Replace).unwrap());
        assert_eq!(fs::read(dir.path().join("f")).unwrap(), b"two");
        let mode = fs::metadata(dir.path().join("f"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!write_atomic(dir.path(), "f", b"three", Existing::Keep).unwrap());
        assert_eq!(fs::read(dir.path().join("f")).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["f"]);
    }

    #[test]
    fn bounded_read_refuses_large_sparse_files_and_fifos() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        let file = File::create(&path).unwrap();
        file.set_len(100 << 30).unwrap();
        assert!(matches!(
            read_bounded(&path, 1 << 20),
            Err(ReadError::TooLarge(n)) if n == 100 << 30
        ));
        fs::write(&path, b"12345").unwrap();
        assert_eq!(read_bounded(&path, 5).unwrap(), b"12345");
        assert!(matches!(
            read_bounded(&path, 4),
            Err(ReadError::TooLarge(5))
        ));
        assert!(matches!(
            read_bounded(&dir.path().join("missing"), 4),
            Err(ReadError::NotFound)
        ));
        std::os::unix::fs::symlink(&path, dir.path().join("link")).unwrap();
        assert!(matches!(
            read_bounded(&dir.path().join("link"), 5),
            Err(ReadError::NotRegular)
        ));
        assert!(matches!(
            read_bounded(dir.path(), 5),
            Err(ReadError::NotRegular)
        ));
        // A FIFO is refused without opening it (opening would block).
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        assert!(matches!(read_bounded(&fifo, 5), Err(ReadError::NotRegular)));
    }

    #[test]
    fn clean_leftovers_removes_temp_and_shreds_deleted() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(".a.0011.tmp"), b"x").unwrap();
        fs::write(dir.path().join(".b.0011.del"), b"y").unwrap();
        fs::write(dir.path().join("keep.rec"), b"z").unwrap();
        assert_eq!(clean_leftovers(dir.path(), 1 << 20).unwrap(), 2);
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["keep.rec"]);
    }
}
