//! The errors of reading, building and describing an EIF.

use crate::format::SectionType;

/// Why an EIF could not be measured (or built). Every malformed input is one
/// of these, never a panic; [`EifError::kind`] is a stable short name.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EifError {
    /// Reading (or seeking in) the input failed.
    #[error("reading the EIF: {0}")]
    Io(#[from] std::io::Error),
    /// The file is shorter than the fixed-size EIF header.
    #[error(
        "the file is {len} bytes long, shorter than the {} byte EIF header: it is truncated or not an EIF",
        crate::format::HEADER_LEN
    )]
    HeaderTruncated {
        /// The file's length.
        len: u64,
    },
    /// The first four bytes are not `.eif`.
    #[error(
        "bad magic {}: an EIF starts with \".eif\" (2e656966)",
        hex::encode(found)
    )]
    BadMagic {
        /// The first four bytes found.
        found: [u8; 4],
    },
    /// A format version this reader does not know.
    #[error(
        "EIF version {found} is not supported (supported: {}..={})",
        crate::format::MIN_VERSION,
        crate::format::CURRENT_VERSION
    )]
    UnsupportedVersion {
        /// The version in the header.
        found: u16,
    },
    /// The header announces more sections than its table has room for.
    #[error(
        "the header announces {found} sections, at most {} are possible",
        crate::format::MAX_SECTIONS
    )]
    TooManySections {
        /// The announced section count.
        found: u64,
    },
    /// A section's header would start (or its extent would end) beyond the
    /// end of the file or of the 64-bit range.
    #[error(
        "section {index} (offset {offset}, size {size}) lies outside the file of {file_len} bytes"
    )]
    SectionOutOfFile {
        /// The section's index in the header's table.
        index: usize,
        /// Its offset in the table.
        offset: u64,
        /// Its size in the table.
        size: u64,
        /// The file's length.
        file_len: u64,
    },
    /// A section starts before the previous section (or the header) ends.
    #[error("section {index} starts at offset {offset}, inside the header or the previous section, which ends at {previous_end}")]
    SectionOverlap {
        /// The section's index.
        index: usize,
        /// Its offset.
        offset: u64,
        /// Where the header or the previous section ends.
        previous_end: u64,
    },
    /// A section does not start right where the previous one (or the header)
    /// ends. EIFs are read both by offset and sequentially; a gap would let
    /// the two readings disagree, so it is refused.
    #[error("section {index} starts at offset {offset}, but the header or the previous section ends at {previous_end}: sections must follow each other without gaps")]
    SectionGap {
        /// The section's index.
        index: usize,
        /// Its offset.
        offset: u64,
        /// Where the header or the previous section ends.
        previous_end: u64,
    },
    /// A section starts inside the file but ends past its end.
    #[error("section {index} ends at offset {end}, past the end of the file ({file_len} bytes): the file is truncated")]
    Truncated {
        /// The section's index.
        index: usize,
        /// Where the section would end.
        end: u64,
        /// The file's length.
        file_len: u64,
    },
    /// Bytes follow the last section.
    #[error("the last section ends at offset {end} but the file is {file_len} bytes long: unexpected trailing data")]
    TrailingData {
        /// Where the last section ends.
        end: u64,
        /// The file's length.
        file_len: u64,
    },
    /// A section header names type 0 (invalid) or a type this reader does not know.
    #[error("section {index} has type {code}, which is {}", if *code == 0 { "the invalid type" } else { "unknown" })]
    BadSectionType {
        /// The section's index.
        index: usize,
        /// The type code found.
        code: u16,
    },
    /// A section header's size differs from the header table's.
    #[error(
        "section {index}: the header table says {table} bytes, the section header says {section}"
    )]
    SectionSizeMismatch {
        /// The section's index.
        index: usize,
        /// The size in the EIF header's table.
        table: u64,
        /// The size in the section's own header.
        section: u64,
    },
    /// A required section is absent (a kernel, a command line, a ramdisk).
    #[error("the EIF has no {kind} section")]
    MissingSection {
        /// The missing kind.
        kind: SectionType,
    },
    /// A section that may appear once appears again.
    #[error("section {index} is a second {kind} section; at most one is allowed")]
    DuplicateSection {
        /// The repeated kind.
        kind: SectionType,
        /// The index of the second one.
        index: usize,
    },
    /// The signature section is larger than this reader accepts.
    #[error("the signature section is {size} bytes, at most {max} are accepted")]
    SignatureTooLarge {
        /// Its size.
        size: u64,
        /// [`crate::MAX_SIGNATURE_SECTION_LEN`].
        max: usize,
    },
    /// The CRC-32 in the header does not match the file's contents.
    #[error("CRC-32 mismatch: the header says {stored:08x}, the contents give {computed:08x}; the file is corrupt")]
    CrcMismatch {
        /// The CRC stored in the header.
        stored: u32,
        /// The CRC computed over the file.
        computed: u32,
    },
    /// The signature section is not the CBOR structure the format defines.
    #[error("bad signature section: {reason}")]
    BadSignature {
        /// What is wrong.
        reason: String,
    },
    /// The signing certificate in the signature section is not a PEM X.509 certificate.
    #[error("bad signing certificate: {reason}")]
    BadCertificate {
        /// What is wrong.
        reason: String,
    },
    /// The input changed (or its length was misreported) while it was read.
    #[error("the EIF changed while it was read: {detail}")]
    Changed {
        /// What differed.
        detail: String,
    },
}

impl EifError {
    /// A stable short name of the error, for tests and tooling.
    pub fn kind(&self) -> &'static str {
        match self {
            EifError::Io(_) => "io",
            EifError::HeaderTruncated { .. } => "header_truncated",
            EifError::BadMagic { .. } => "bad_magic",
            EifError::UnsupportedVersion { .. } => "unsupported_version",
            EifError::TooManySections { .. } => "too_many_sections",
            EifError::SectionOutOfFile { .. } => "section_out_of_file",
            EifError::SectionOverlap { .. } => "section_overlap",
            EifError::SectionGap { .. } => "section_gap",
            EifError::Truncated { .. } => "truncated",
            EifError::TrailingData { .. } => "trailing_data",
            EifError::BadSectionType { .. } => "bad_section_type",
            EifError::SectionSizeMismatch { .. } => "section_size_mismatch",
            EifError::MissingSection { .. } => "missing_section",
            EifError::DuplicateSection { .. } => "duplicate_section",
            EifError::SignatureTooLarge { .. } => "signature_too_large",
            EifError::CrcMismatch { .. } => "crc_mismatch",
            EifError::BadSignature { .. } => "bad_signature",
            EifError::BadCertificate { .. } => "bad_certificate",
            EifError::Changed { .. } => "changed_while_reading",
        }
    }
}

/// A measurement-set name that the verifier's policy would refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad measurement set name {name:?}: {reason}")]
pub struct NameError {
    /// The name given.
    pub name: String,
    /// Why it is refused.
    pub reason: String,
}
