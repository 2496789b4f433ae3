//! The streaming reader: validates an EIF and computes its PCRs in constant
//! memory.

use crate::error::EifError;
use crate::format::{
    parse_section_header, Header, SectionType, TableEntry, CRC_OFFSET, HEADER_LEN, HEADER_LEN_U64,
    SECTION_HEADER_LEN, SECTION_HEADER_LEN_U64,
};
use crate::signature;
use crate::{Measurements, Pcr, SectionInfo, MAX_SIGNATURE_SECTION_LEN, PCR_LEN};
use sha2::{Digest, Sha384};
use std::io::{ErrorKind, Read, Seek, SeekFrom};

/// Bytes read at a time while hashing a section.
const CHUNK: usize = 64 * 1024;

/// The TPM-style extend of a register that starts at zero:
/// `SHA-384(48 zero bytes || digest)`.
pub(crate) fn extend_from_zero(digest: &[u8]) -> Pcr {
    let mut hasher = Sha384::new();
    hasher.update([0u8; PCR_LEN]);
    hasher.update(digest);
    hasher.finalize().into()
}

/// Validates the EIF that `reader` holds (from its start to its end) and
/// computes PCR0, PCR1, PCR2 and, for a signed image, PCR8.
///
/// Memory stays constant whatever the sections' sizes: sections are hashed
/// in 64 KiB chunks, and only the signature section (at most
/// [`MAX_SIGNATURE_SECTION_LEN`] bytes) is held whole. Every structural
/// problem and the CRC-32 are checked; see [`EifError`] for the list.
///
/// The input is read twice (section headers first, then everything in
/// order); an input that changes in between is reported, not measured.
pub fn measure<R: Read + Seek>(mut reader: R) -> Result<Measurements, EifError> {
    let file_len = reader.seek(SeekFrom::End(0))?;
    if file_len < HEADER_LEN_U64 {
        return Err(EifError::HeaderTruncated { len: file_len });
    }
    reader.seek(SeekFrom::Start(0))?;
    let mut header_bytes = [0u8; HEADER_LEN];
    read_exact(&mut reader, &mut header_bytes, "the header")?;
    let header = Header::parse(&header_bytes)?;
    check_layout(&header.entries, file_len)?;

    // First pass: the section headers only, so that the set of sections is
    // known to be acceptable before anything is hashed.
    let mut sections = Vec::with_capacity(header.entries.len());
    for (index, entry) in header.entries.iter().enumerate() {
        reader.seek(SeekFrom::Start(entry.offset))?;
        let kind = read_section_header(&mut reader, index, entry)?;
        sections.push(SectionInfo {
            kind,
            offset: entry.offset,
            size: entry.size,
        });
    }
    check_sections(&sections)?;

    // Second pass: every byte after the header, in file order (the layout
    // check made the sections contiguous), through the CRC and the hashers.
    let mut crc = crc32fast::Hasher::new();
    crc.update(header_bytes.get(..CRC_OFFSET).unwrap_or_default());
    let mut image = Sha384::new();
    let mut bootstrap = Sha384::new();
    let mut application = Sha384::new();
    let mut signature_section: Option<Vec<u8>> = None;
    let mut ramdisks_seen = 0usize;
    let mut buf = vec![0u8; CHUNK];
    reader.seek(SeekFrom::Start(HEADER_LEN_U64))?;
    for (index, section) in sections.iter().enumerate() {
        let mut section_header = [0u8; SECTION_HEADER_LEN];
        read_exact(&mut reader, &mut section_header, "a section header")?;
        let (code, size) = parse_section_header(&section_header)?;
        if code != section.kind.code() || size != section.size {
            return Err(EifError::Changed {
                detail: format!("the header of section {index} differs between two reads"),
            });
        }
        crc.update(&section_header);
        match section.kind {
            SectionType::Kernel | SectionType::Cmdline => {
                stream(&mut reader, size, &mut buf, |chunk| {
                    crc.update(chunk);
                    image.update(chunk);
                    bootstrap.update(chunk);
                })?;
            }
            SectionType::Ramdisk => {
                // The first ramdisk is the bootstrap (PCR1), the others the
                // application (PCR2); all of them are in the image (PCR0).
                let target = if ramdisks_seen == 0 {
                    &mut bootstrap
                } else {
                    &mut application
                };
                stream(&mut reader, size, &mut buf, |chunk| {
                    crc.update(chunk);
                    image.update(chunk);
                    target.update(chunk);
                })?;
                ramdisks_seen = ramdisks_seen.saturating_add(1);
            }
            SectionType::Signature => {
                // Bounded by check_sections.
                let capacity = usize::try_from(size).unwrap_or(MAX_SIGNATURE_SECTION_LEN);
                let mut bytes = Vec::with_capacity(capacity.min(MAX_SIGNATURE_SECTION_LEN));
                stream(&mut reader, size, &mut buf, |chunk| {
                    crc.update(chunk);
                    if bytes.len().saturating_add(chunk.len()) <= MAX_SIGNATURE_SECTION_LEN {
                        bytes.extend_from_slice(chunk);
                    }
                })?;
                signature_section = Some(bytes);
            }
            SectionType::Metadata => {
                stream(&mut reader, size, &mut buf, |chunk| crc.update(chunk))?;
            }
        }
    }
    // The layout check made the last section end at the file's end; a file
    // that grew since is noticed here.
    let mut probe = [0u8; 1];
    if read_some(&mut reader, &mut probe)? != 0 {
        return Err(EifError::Changed {
            detail: "the file grew while it was read".to_owned(),
        });
    }

    let computed = crc.finalize();
    if computed != header.crc32 {
        return Err(EifError::CrcMismatch {
            stored: header.crc32,
            computed,
        });
    }

    let pcr8 = match &signature_section {
        Some(section) => {
            let certificate = signature::signing_certificate_der(section)?;
            Some(extend_from_zero(&Sha384::digest(&certificate)))
        }
        None => None,
    };
    Ok(Measurements {
        pcr0: extend_from_zero(&image.finalize()),
        pcr1: extend_from_zero(&bootstrap.finalize()),
        pcr2: extend_from_zero(&application.finalize()),
        pcr8,
        version: header.version,
        flags: header.flags,
        sections,
    })
}

/// Checks that the sections lie in the file, one after the other in table
/// order, from the end of the header to the end of the file.
fn check_layout(entries: &[TableEntry], file_len: u64) -> Result<(), EifError> {
    let mut previous_end = HEADER_LEN_U64;
    for (index, entry) in entries.iter().enumerate() {
        let out_of_file = EifError::SectionOutOfFile {
            index,
            offset: entry.offset,
            size: entry.size,
            file_len,
        };
        let Some(data_start) = entry.offset.checked_add(SECTION_HEADER_LEN_U64) else {
            return Err(out_of_file);
        };
        if data_start > file_len {
            return Err(out_of_file);
        }
        if entry.offset < previous_end {
            return Err(EifError::SectionOverlap {
                index,
                offset: entry.offset,
                previous_end,
            });
        }
        if entry.offset > previous_end {
            return Err(EifError::SectionGap {
                index,
                offset: entry.offset,
                previous_end,
            });
        }
        let Some(end) = data_start.checked_add(entry.size) else {
            return Err(out_of_file);
        };
        if end > file_len {
            return Err(EifError::Truncated {
                index,
                end,
                file_len,
            });
        }
        previous_end = end;
    }
    if previous_end < file_len {
        return Err(EifError::TrailingData {
            end: previous_end,
            file_len,
        });
    }
    Ok(())
}

fn read_section_header<R: Read>(
    reader: &mut R,
    index: usize,
    entry: &TableEntry,
) -> Result<SectionType, EifError> {
    let mut bytes = [0u8; SECTION_HEADER_LEN];
    read_exact(reader, &mut bytes, "a section header")?;
    let (code, size) = parse_section_header(&bytes)?;
    let kind = SectionType::from_code(code).ok_or(EifError::BadSectionType { index, code })?;
    if size != entry.size {
        return Err(EifError::SectionSizeMismatch {
            index,
            table: entry.size,
            section: size,
        });
    }
    Ok(kind)
}

/// One kernel, one command line, at least one ramdisk, at most one signature
/// and one metadata section; a signature section of bounded size.
fn check_sections(sections: &[SectionInfo]) -> Result<(), EifError> {
    let mut seen: Vec<SectionType> = Vec::with_capacity(sections.len());
    for (index, section) in sections.iter().enumerate() {
        let single = section.kind != SectionType::Ramdisk;
        if single && seen.contains(&section.kind) {
            return Err(EifError::DuplicateSection {
                kind: section.kind,
                index,
            });
        }
        if section.kind == SectionType::Signature
            && section.size > u64::try_from(MAX_SIGNATURE_SECTION_LEN).unwrap_or(u64::MAX)
        {
            return Err(EifError::SignatureTooLarge {
                size: section.size,
                max: MAX_SIGNATURE_SECTION_LEN,
            });
        }
        seen.push(section.kind);
    }
    for kind in [
        SectionType::Kernel,
        SectionType::Cmdline,
        SectionType::Ramdisk,
    ] {
        if !seen.contains(&kind) {
            return Err(EifError::MissingSection { kind });
        }
    }
    Ok(())
}

/// Reads exactly `size` bytes in chunks of `buf`'s size and hands each to `sink`.
fn stream<R: Read>(
    reader: &mut R,
    size: u64,
    buf: &mut [u8],
    mut sink: impl FnMut(&[u8]),
) -> Result<(), EifError> {
    let mut remaining = size;
    while remaining > 0 {
        let want = usize::try_from(remaining).map_or(buf.len(), |r| r.min(buf.len()));
        let Some(window) = buf.get_mut(..want) else {
            return Err(EifError::Changed {
                detail: "internal chunk size".to_owned(),
            });
        };
        let n = read_some(reader, window)?;
        if n == 0 {
            return Err(EifError::Changed {
                detail: "the file ended before its last section".to_owned(),
            });
        }
        let Some(chunk) = window.get(..n) else {
            return Err(EifError::Io(std::io::Error::other(
                "the reader returned more bytes than asked for",
            )));
        };
        sink(chunk);
        remaining = remaining.saturating_sub(u64::try_from(n).unwrap_or(u64::MAX));
    }
    Ok(())
}

/// One `read`, retried on interruption.
fn read_some<R: Read>(reader: &mut R, buf: &mut [u8]) -> Result<usize, EifError> {
    loop {
        match reader.read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(EifError::Io(e)),
        }
    }
}

/// `read_exact`, where an early end means the file shrank after its length
/// was taken.
fn read_exact<R: Read>(reader: &mut R, buf: &mut [u8], what: &str) -> Result<(), EifError> {
    reader.read_exact(buf).map_err(|e| {
        if e.kind() == ErrorKind::UnexpectedEof {
            EifError::Changed {
                detail: format!("the file ended while reading {what}"),
            }
        } else {
            EifError::Io(e)
        }
    })
}
