//! The byte layout of an EIF: constants, section types, and the parsing of
//! the fixed-size header. See the [crate documentation](crate) for the table.

use crate::error::EifError;
use std::fmt;

/// The first four bytes of every EIF: `.eif`.
pub const MAGIC: [u8; 4] = *b".eif";
/// Length of the EIF header.
pub const HEADER_LEN: usize = 548;
/// Length of a section header (type, flags, size).
pub const SECTION_HEADER_LEN: usize = 12;
/// Room in the header's section table.
pub const MAX_SECTIONS: usize = 32;
/// The newest format version (4: the metadata section was added).
pub const CURRENT_VERSION: u16 = 4;
/// The oldest version accepted: version 2 introduced the CRC-32, which this
/// reader always checks.
pub const MIN_VERSION: u16 = 2;
/// Header flag bit 0: the image is for aarch64 (clear: x86_64).
pub const FLAG_ARM64: u16 = 0x1;

/// Offset of the CRC-32 field, the last four bytes of the header; the CRC
/// covers every byte of the file except these four.
pub(crate) const CRC_OFFSET: usize = 544;
pub(crate) const HEADER_LEN_U64: u64 = 548;
pub(crate) const SECTION_HEADER_LEN_U64: u64 = 12;

/// The kind of an EIF section. Type code 0 ("invalid") is never a valid
/// section and has no variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SectionType {
    /// The Linux kernel image (code 1).
    Kernel,
    /// The kernel command line (code 2), without a trailing NUL.
    Cmdline,
    /// An initramfs (code 3). The first is the bootstrap ramdisk, the others
    /// carry the application.
    Ramdisk,
    /// The signature section (code 4): the signing certificate and a
    /// COSE_Sign1 over PCR0.
    Signature,
    /// Build metadata as JSON (code 5); not measured.
    Metadata,
}

impl SectionType {
    /// The type code written in section headers.
    pub fn code(self) -> u16 {
        match self {
            SectionType::Kernel => 1,
            SectionType::Cmdline => 2,
            SectionType::Ramdisk => 3,
            SectionType::Signature => 4,
            SectionType::Metadata => 5,
        }
    }

    /// The type for a code; `None` for 0 (invalid) and unknown codes.
    pub fn from_code(code: u16) -> Option<Self> {
        match code {
            1 => Some(SectionType::Kernel),
            2 => Some(SectionType::Cmdline),
            3 => Some(SectionType::Ramdisk),
            4 => Some(SectionType::Signature),
            5 => Some(SectionType::Metadata),
            _ => None,
        }
    }

    /// A lowercase name (`kernel`, `cmdline`, `ramdisk`, `signature`, `metadata`).
    pub fn as_str(self) -> &'static str {
        match self {
            SectionType::Kernel => "kernel",
            SectionType::Cmdline => "cmdline",
            SectionType::Ramdisk => "ramdisk",
            SectionType::Signature => "signature",
            SectionType::Metadata => "metadata",
        }
    }
}

impl fmt::Display for SectionType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One entry of the header's section table: where a section's 12-byte
/// header starts, and how many data bytes follow that header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TableEntry {
    pub offset: u64,
    pub size: u64,
}

/// The parsed EIF header (only the entries of the table that are in use).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Header {
    pub version: u16,
    pub flags: u16,
    pub entries: Vec<TableEntry>,
    pub crc32: u32,
}

/// Reads big-endian fields off the front of a byte slice.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn array<const N: usize>(&mut self) -> Result<[u8; N], EifError> {
        let Some((head, rest)) = self.0.split_first_chunk::<N>() else {
            return Err(EifError::HeaderTruncated {
                len: u64::try_from(self.0.len()).unwrap_or(u64::MAX),
            });
        };
        self.0 = rest;
        Ok(*head)
    }
    fn u16(&mut self) -> Result<u16, EifError> {
        self.array().map(u16::from_be_bytes)
    }
    fn u32(&mut self) -> Result<u32, EifError> {
        self.array().map(u32::from_be_bytes)
    }
    fn u64(&mut self) -> Result<u64, EifError> {
        self.array().map(u64::from_be_bytes)
    }
}

impl Header {
    /// Parses and checks the magic, the version and the section count.
    pub(crate) fn parse(bytes: &[u8; HEADER_LEN]) -> Result<Header, EifError> {
        let mut f = Fields(bytes);
        let magic: [u8; 4] = f.array()?;
        if magic != MAGIC {
            return Err(EifError::BadMagic { found: magic });
        }
        let version = f.u16()?;
        if !(MIN_VERSION..=CURRENT_VERSION).contains(&version) {
            return Err(EifError::UnsupportedVersion { found: version });
        }
        let flags = f.u16()?;
        let _default_mem = f.u64()?;
        let _default_cpus = f.u64()?;
        let _reserved = f.u16()?;
        let count = usize::from(f.u16()?);
        if count > MAX_SECTIONS {
            return Err(EifError::TooManySections {
                found: u64::try_from(count).unwrap_or(u64::MAX),
            });
        }
        let mut offsets = [0u64; MAX_SECTIONS];
        for slot in &mut offsets {
            *slot = f.u64()?;
        }
        let mut sizes = [0u64; MAX_SECTIONS];
        for slot in &mut sizes {
            *slot = f.u64()?;
        }
        let _unused = f.u32()?;
        let crc32 = f.u32()?;
        let entries = offsets
            .iter()
            .zip(sizes.iter())
            .take(count)
            .map(|(&offset, &size)| TableEntry { offset, size })
            .collect();
        Ok(Header {
            version,
            flags,
            entries,
            crc32,
        })
    }
}

/// Parses a 12-byte section header into its type code and size (the flags
/// are not used by the format).
pub(crate) fn parse_section_header(
    bytes: &[u8; SECTION_HEADER_LEN],
) -> Result<(u16, u64), EifError> {
    let mut f = Fields(bytes);
    let code = f.u16()?;
    let _flags = f.u16()?;
    let size = f.u64()?;
    Ok((code, size))
}

/// Encodes a section header (type code, zero flags, size).
pub(crate) fn section_header(code: u16, size: u64) -> [u8; SECTION_HEADER_LEN] {
    let mut out = [0u8; SECTION_HEADER_LEN];
    let flags = [0u8; 2];
    let fields = code
        .to_be_bytes()
        .into_iter()
        .chain(flags)
        .chain(size.to_be_bytes());
    for (slot, byte) in out.iter_mut().zip(fields) {
        *slot = byte;
    }
    out
}
