//! Reading untrusted input files with bounded memory.

use base64::Engine;
use std::io::Read;
use std::path::Path;

/// Open `path` for reading only if it is a regular file (checked before the
/// open, which would block on a FIFO, and of the file opened); returns it
/// with its mode bits.
pub(crate) fn open_regular(path: &Path) -> std::io::Result<(std::fs::File, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let not_regular = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file (a FIFO, device or directory is refused)",
        )
    };
    if !std::fs::metadata(path)?.is_file() {
        return Err(not_regular());
    }
    let file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(not_regular());
    }
    Ok((file, meta.permissions().mode() & 0o7777))
}

/// Read at most `limit` bytes from `path` (`-` is stdin). Returns `Ok(None)`
/// when the input is longer than `limit`, without reading the rest.
pub(crate) fn read_bounded(path: &Path, limit: usize) -> std::io::Result<Option<Vec<u8>>> {
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    // Sized up front for small inputs (credentials), so the buffer is never
    // reallocated and no stray copy of a secret is left behind on the heap.
    let mut buf = Vec::with_capacity(limit.saturating_add(1).min(64 * 1024));
    if path.as_os_str() == "-" {
        std::io::stdin().lock().take(cap).read_to_end(&mut buf)?;
    } else {
        std::fs::File::open(path)?.take(cap).read_to_end(&mut buf)?;
    }
    if buf.len() > limit {
        return Ok(None);
    }
    Ok(Some(buf))
}

/// A COSE document always starts with a non-ASCII byte (0x84 for an array of
/// four, 0xd2 for tag 18), so ASCII input is taken to be base64 of the document
/// (standard or URL-safe alphabet, padded or not, whitespace ignored). Input that
/// is neither is passed through unchanged and fails CBOR decoding.
pub(crate) fn decode_document_bytes(raw: Vec<u8>) -> Vec<u8> {
    let looks_textual = !raw.is_empty()
        && raw
            .iter()
            .all(|b| b.is_ascii_graphic() || b.is_ascii_whitespace());
    if !looks_textual {
        return raw;
    }
    let compact: Vec<u8> = raw
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    let engines = [
        base64::engine::general_purpose::STANDARD,
        base64::engine::general_purpose::STANDARD_NO_PAD,
        base64::engine::general_purpose::URL_SAFE,
        base64::engine::general_purpose::URL_SAFE_NO_PAD,
    ];
    for engine in engines {
        if let Ok(decoded) = engine.decode(&compact) {
            return decoded;
        }
    }
    raw
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_input_is_left_alone() {
        let doc = vec![0x84, 0x44, 0xa1, 0x01];
        assert_eq!(decode_document_bytes(doc.clone()), doc);
    }

    #[test]
    fn base64_input_is_decoded_in_any_common_form() {
        let doc = vec![0x84u8, 0x44, 0xa1, 0x01, 0x38, 0x22, 0xff];
        for text in [
            base64::engine::general_purpose::STANDARD.encode(&doc),
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&doc),
            format!(
                "{}\n",
                base64::engine::general_purpose::STANDARD.encode(&doc)
            ),
        ] {
            assert_eq!(decode_document_bytes(text.into_bytes()), doc);
        }
    }

    #[test]
    fn read_bounded_refuses_oversized_input() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("big");
        std::fs::write(&p, vec![0u8; 101]).unwrap();
        assert_eq!(read_bounded(&p, 100).unwrap(), None);
        assert_eq!(read_bounded(&p, 101).unwrap().unwrap().len(), 101);
    }
}
