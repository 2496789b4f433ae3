//! A small EIF writer for tests and tooling.
//!
//! It lays sections out the way the reference tooling (`nitro-cli
//! build-enclave`) does — kernel, command line, metadata, ramdisks,
//! signature — with a correct header and CRC-32, entirely in memory. It is
//! not a replacement for `nitro-cli build-enclave`: it does not check that
//! the kernel boots, and it does not sign (the caller supplies the
//! COSE_Sign1 bytes of a signed image, which [`crate::measure`] does not
//! verify).

use crate::error::EifError;
use crate::format::{
    section_header, SectionType, CRC_OFFSET, CURRENT_VERSION, HEADER_LEN_U64, MAGIC, MAX_SECTIONS,
    SECTION_HEADER_LEN_U64,
};
use crate::signature;

/// Builds a small EIF in memory. For tests and tooling; see the module
/// documentation.
///
/// ```
/// let eif = kluis_eif::EifBuilder::new(b"kernel", b"console=ttyS0")
///     .ramdisk(b"bootstrap initramfs")
///     .ramdisk(b"application initramfs")
///     .build()?;
/// let measured = kluis_eif::measure(std::io::Cursor::new(&eif))?;
/// assert!(measured.pcr8.is_none());
/// # Ok::<(), kluis_eif::EifError>(())
/// ```
#[derive(Debug, Clone)]
pub struct EifBuilder {
    version: u16,
    flags: u16,
    default_mem: u64,
    default_cpus: u64,
    kernel: Vec<u8>,
    cmdline: Vec<u8>,
    metadata: Option<Vec<u8>>,
    ramdisks: Vec<Vec<u8>>,
    signature: Option<Vec<u8>>,
}

impl EifBuilder {
    /// An image with this kernel and command line (give the command line
    /// without a trailing NUL, as the reference tooling stores it), version
    /// [`CURRENT_VERSION`], flags 0 (x86_64), 1 GiB and 2 vCPUs by default.
    pub fn new(kernel: &[u8], cmdline: &[u8]) -> Self {
        EifBuilder {
            version: CURRENT_VERSION,
            flags: 0,
            default_mem: 1024 * 1024 * 1024,
            default_cpus: 2,
            kernel: kernel.to_vec(),
            cmdline: cmdline.to_vec(),
            metadata: None,
            ramdisks: Vec::new(),
            signature: None,
        }
    }

    /// Appends a ramdisk. The first is the bootstrap ramdisk (PCR1), the
    /// others the application (PCR2).
    #[must_use]
    pub fn ramdisk(mut self, ramdisk: &[u8]) -> Self {
        self.ramdisks.push(ramdisk.to_vec());
        self
    }

    /// Sets the metadata section (JSON in real images; not measured).
    #[must_use]
    pub fn metadata(mut self, metadata: &[u8]) -> Self {
        self.metadata = Some(metadata.to_vec());
        self
    }

    /// Adds a signature section holding this PEM signing certificate and
    /// these COSE_Sign1 bytes (not produced or checked here).
    pub fn signature(
        mut self,
        certificate_pem: &[u8],
        cose_sign1: &[u8],
    ) -> Result<Self, EifError> {
        self.signature = Some(signature::encode_section(certificate_pem, cose_sign1)?);
        Ok(self)
    }

    /// Sets the format version written in the header.
    #[must_use]
    pub fn version(mut self, version: u16) -> Self {
        self.version = version;
        self
    }

    /// Sets the header flags ([`crate::FLAG_ARM64`] for aarch64).
    #[must_use]
    pub fn flags(mut self, flags: u16) -> Self {
        self.flags = flags;
        self
    }

    /// The sections, in the order [`EifBuilder::build`] writes them.
    pub fn sections(&self) -> Vec<(SectionType, &[u8])> {
        let mut out = vec![
            (SectionType::Kernel, self.kernel.as_slice()),
            (SectionType::Cmdline, self.cmdline.as_slice()),
        ];
        if let Some(metadata) = &self.metadata {
            out.push((SectionType::Metadata, metadata.as_slice()));
        }
        out.extend(
            self.ramdisks
                .iter()
                .map(|r| (SectionType::Ramdisk, r.as_slice())),
        );
        if let Some(signature) = &self.signature {
            out.push((SectionType::Signature, signature.as_slice()));
        }
        out
    }

    /// The EIF's bytes.
    pub fn build(&self) -> Result<Vec<u8>, EifError> {
        self.build_with_sections(&self.sections())
    }

    /// An EIF with this builder's header fields and exactly `sections`, in
    /// this order, whatever they are (a test can build images that
    /// [`crate::measure`] refuses, e.g. without a kernel). Section types are
    /// given as raw codes so that invalid ones can be written too.
    pub fn build_with_sections(
        &self,
        sections: &[(SectionType, &[u8])],
    ) -> Result<Vec<u8>, EifError> {
        let raw: Vec<(u16, &[u8])> = sections.iter().map(|(k, d)| (k.code(), *d)).collect();
        self.build_raw(&raw)
    }

    /// Like [`EifBuilder::build_with_sections`] with raw type codes.
    pub fn build_raw(&self, sections: &[(u16, &[u8])]) -> Result<Vec<u8>, EifError> {
        if sections.len() > MAX_SECTIONS {
            return Err(EifError::TooManySections {
                found: u64::try_from(sections.len()).unwrap_or(u64::MAX),
            });
        }
        let count = u16::try_from(sections.len()).unwrap_or(u16::MAX);
        let mut offsets = Vec::with_capacity(MAX_SECTIONS);
        let mut sizes = Vec::with_capacity(MAX_SECTIONS);
        let mut body = Vec::new();
        let mut offset = HEADER_LEN_U64;
        for (index, (code, data)) in sections.iter().enumerate() {
            let size = u64::try_from(data.len()).unwrap_or(u64::MAX);
            offsets.push(offset);
            sizes.push(size);
            body.extend_from_slice(&section_header(*code, size));
            body.extend_from_slice(data);
            offset = offset
                .checked_add(SECTION_HEADER_LEN_U64)
                .and_then(|o| o.checked_add(size))
                .ok_or(EifError::SectionOutOfFile {
                    index,
                    offset,
                    size,
                    file_len: u64::MAX,
                })?;
        }
        offsets.resize(MAX_SECTIONS, 0);
        sizes.resize(MAX_SECTIONS, 0);

        let mut out = Vec::with_capacity(body.len().saturating_add(crate::HEADER_LEN));
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.version.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.extend_from_slice(&self.default_mem.to_be_bytes());
        out.extend_from_slice(&self.default_cpus.to_be_bytes());
        out.extend_from_slice(&0u16.to_be_bytes()); // reserved
        out.extend_from_slice(&count.to_be_bytes());
        for value in offsets.iter().chain(sizes.iter()) {
            out.extend_from_slice(&value.to_be_bytes());
        }
        out.extend_from_slice(&0u32.to_be_bytes()); // unused
        debug_assert_eq!(out.len(), CRC_OFFSET);
        let mut crc = crc32fast::Hasher::new();
        crc.update(&out);
        crc.update(&body);
        out.extend_from_slice(&crc.finalize().to_be_bytes());
        out.extend_from_slice(&body);
        Ok(out)
    }
}
