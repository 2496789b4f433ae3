//! Reads AWS Nitro Enclave image files (EIF) and computes the PCRs that an
//! enclave started from them reports, so that a key policy can pin them
//! before the enclave ever runs.
//!
//! ```
//! # let eif = kluis_eif::EifBuilder::new(b"kernel", b"cmdline").ramdisk(b"init").build()?;
//! # let path = std::env::temp_dir().join(format!("kluis-eif-doc-{}.eif", std::process::id()));
//! # std::fs::write(&path, &eif)?;
//! let measured = kluis_eif::measure(std::fs::File::open(&path)?)?;
//! print!("{}", measured.policy_fragment("enclave-v1")?);
//! # std::fs::remove_file(&path)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Why a reader of our own
//!
//! The reference implementation, the `aws-nitro-enclaves-image-format`
//! crate, is not a dependency, not even for tests: its latest release
//! (0.8.1) depends unconditionally (no features to turn them off) on
//! `openssl` (system libssl), `aws-sdk-kms`, `aws-config` and a tokio
//! runtime for KMS signing, and pins `litemap` and `zerofrom` to exact
//! versions. This crate is written from the format's description below.
//! Its tests check the PCRs against values they derive independently from
//! that description, and against two small images written by the reference
//! implementation's builder (`tests/vectors/`), which this crate's builder
//! reproduces byte for byte.
//!
//! # Format
//!
//! All integers are big-endian. An EIF is a 548-byte header followed by its
//! sections, each a 12-byte section header and its data.
//!
//! | offset | size     | field                                                      |
//! |--------|----------|------------------------------------------------------------|
//! | 0      | 4        | magic `.eif` (`2e 65 69 66`)                               |
//! | 4      | 2        | version: 2..=4 accepted (2 added the CRC, 3 the signature, 4 the metadata section) |
//! | 6      | 2        | flags: bit 0 set for aarch64, clear for x86_64             |
//! | 8      | 8        | default memory                                             |
//! | 16     | 8        | default vCPU count                                         |
//! | 24     | 2        | reserved                                                   |
//! | 26     | 2        | section count *n*, at most 32                              |
//! | 28     | 32 × 8   | section offsets: where each section's header starts        |
//! | 284    | 32 × 8   | section sizes: each section's data length (header excluded) |
//! | 540    | 4        | unused                                                     |
//! | 544    | 4        | CRC-32 (IEEE, as zlib) of every byte of the file except these four |
//!
//! A section header is: type (2 bytes: 1 kernel, 2 command line, 3 ramdisk,
//! 4 signature, 5 metadata; 0 is "invalid"), flags (2 bytes, unused), data
//! size (8 bytes). The reference tooling writes the kernel, the command line
//! (without a trailing NUL), the metadata (JSON), the ramdisks, then the
//! signature, one after the other.
//!
//! [`measure`] accepts only an unambiguous layout: the first section starts
//! at offset 548, each next one where the previous one ends, the last one at
//! the end of the file, and every section header agrees with the table. It
//! requires exactly one kernel and one command line, at least one ramdisk, at
//! most one signature and one metadata section.
//!
//! # The PCRs
//!
//! Each PCR is a SHA-384 register extended once from zero:
//! `PCR = SHA-384(48 zero bytes || SHA-384(data))`, where *data* is the
//! concatenation, in file order, of the data (never the section headers) of:
//!
//! - **PCR0** (the image): the kernel, the command line and every ramdisk;
//! - **PCR1** (kernel and bootstrap): the kernel, the command line and the
//!   first ramdisk;
//! - **PCR2** (the application): every ramdisk after the first (for an image
//!   with one ramdisk, the digest of nothing);
//! - **PCR8** (the signer, signed images only): the DER encoding of the
//!   signing certificate, i.e. `SHA-384(zeros || SHA-384(certificate DER))`.
//!   The signature section is a CBOR array of `{signing_certificate: PEM,
//!   signature: COSE_Sign1}` maps; the first entry's certificate is measured.
//!
//! The metadata and signature sections are not in PCR0-2: signing an image
//! does not change them.

mod builder;
mod error;
mod format;
mod measure;
mod signature;

pub use builder::EifBuilder;
pub use error::{EifError, NameError};
pub use format::{
    SectionType, CURRENT_VERSION, FLAG_ARM64, HEADER_LEN, MAGIC, MAX_SECTIONS, MIN_VERSION,
    SECTION_HEADER_LEN,
};
pub use measure::measure;

/// Length of a PCR: SHA-384.
pub const PCR_LEN: usize = 48;
/// Largest signature section accepted. Real ones are a few kilobytes (a PEM
/// certificate and a COSE_Sign1, their bytes written as CBOR integers).
pub const MAX_SIGNATURE_SECTION_LEN: usize = 256 * 1024;
/// Longest measurement-set name, in bytes (the verifier's policy limit).
pub const MAX_NAME_LEN: usize = 128;

/// A PCR value.
pub type Pcr = [u8; PCR_LEN];

/// Where a section is and what it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SectionInfo {
    /// Its type.
    pub kind: SectionType,
    /// Where its 12-byte header starts.
    pub offset: u64,
    /// Its data length.
    pub size: u64,
}

/// What an enclave started from an EIF reports, plus a description of the
/// file. See the [crate documentation](crate) for what each PCR covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Measurements {
    /// PCR0: the enclave image (kernel, command line, every ramdisk).
    pub pcr0: Pcr,
    /// PCR1: the kernel, command line and bootstrap ramdisk.
    pub pcr1: Pcr,
    /// PCR2: the application (every ramdisk after the first).
    pub pcr2: Pcr,
    /// PCR8: the signing certificate; `None` for an unsigned image (whose
    /// enclave reports zeros).
    pub pcr8: Option<Pcr>,
    /// The header's format version.
    pub version: u16,
    /// The header's flags ([`FLAG_ARM64`]).
    pub flags: u16,
    /// The sections in file order.
    pub sections: Vec<SectionInfo>,
}

impl Measurements {
    /// The measurements as a `[[measurements]]` entry of the verifier's key
    /// policy (TOML), named `name`; PCR values in lowercase hex, `pcr8` only
    /// for a signed image:
    ///
    /// ```toml
    /// [[measurements]]
    /// name = "enclave-v1"
    /// pcr0 = "…"
    /// pcr1 = "…"
    /// pcr2 = "…"
    /// pcr8 = "…"
    /// ```
    ///
    /// The name must be what the policy accepts: non-empty, at most
    /// [`MAX_NAME_LEN`] bytes, no control characters.
    pub fn policy_fragment(&self, name: &str) -> Result<String, NameError> {
        check_name(name)?;
        let mut out = String::from("[[measurements]]\n");
        out.push_str("name = ");
        out.push_str(&toml_basic_string(name));
        out.push('\n');
        let pcrs = [
            ("pcr0", Some(&self.pcr0)),
            ("pcr1", Some(&self.pcr1)),
            ("pcr2", Some(&self.pcr2)),
            ("pcr8", self.pcr8.as_ref()),
        ];
        for (key, value) in pcrs {
            if let Some(value) = value {
                out.push_str(key);
                out.push_str(" = \"");
                out.push_str(&hex::encode(value));
                out.push_str("\"\n");
            }
        }
        Ok(out)
    }

    /// Whether the image has a signature section (and so a PCR8).
    pub fn is_signed(&self) -> bool {
        self.pcr8.is_some()
    }
}

fn check_name(name: &str) -> Result<(), NameError> {
    let reason = if name.is_empty() {
        "it is empty".to_owned()
    } else if name.len() > MAX_NAME_LEN {
        format!(
            "it is {} bytes long, at most {MAX_NAME_LEN} are allowed",
            name.len()
        )
    } else if name.chars().any(char::is_control) {
        "it contains control characters".to_owned()
    } else {
        return Ok(());
    };
    Err(NameError {
        name: name.to_owned(),
        reason,
    })
}

/// A TOML basic string. Control characters never reach here (the name check
/// refuses them), so only the quote and the backslash need escaping.
fn toml_basic_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len().saturating_add(2));
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            other => out.push(other),
        }
    }
    out.push('"');
    out
}
