//! Errors, one enum per stage: making a key, parsing a header, encrypting,
//! decrypting.
//!
//! Messages say what was expected and what was found. None carries key material
//! or plaintext: the only bytes an error may show are the (public) magic bytes
//! of a header that is not an envelope.

use crate::header::{
    ALGORITHM_AES256GCM_STREAM, FORMAT_VERSION, MAGIC, MAX_CMK_ID_LEN, MAX_SEGMENT_SIZE,
    MAX_WRAPPED_KEY_LEN, MIN_SEGMENT_SIZE,
};
use std::io;
use thiserror::Error;

/// Lowercase hex, for the magic bytes in messages.
fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// A data key could not be made.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The key bytes have the wrong length.
    #[error("a data key is {expected} bytes, found {found}")]
    Length {
        /// 32.
        expected: usize,
        /// The length given.
        found: usize,
    },
    /// The operating system's random generator failed.
    #[error("the system random generator failed")]
    Random,
}

/// The bytes are not a valid version-1 envelope header, or header fields given
/// to a writer are out of bounds. Needs no key.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum HeaderError {
    /// Reading the header failed.
    #[error("reading the envelope header: {0}")]
    Io(#[source] io::Error),
    /// The input ended inside the header.
    #[error("envelope header truncated: the {part} needs {expected} bytes, found {found}")]
    Truncated {
        /// Which part of the header was being read.
        part: &'static str,
        /// Bytes that part needs.
        expected: usize,
        /// Bytes available before the end.
        found: usize,
    },
    /// The first eight bytes are not `KLUISENV`.
    #[error("not a Kluis envelope: expected magic {} (\"KLUISENV\"), found {}", hex(MAGIC), hex(.found))]
    BadMagic {
        /// The eight bytes found.
        found: [u8; 8],
    },
    /// A format version this build does not read.
    #[error(
        "unsupported envelope format version {found} (this build reads version {FORMAT_VERSION})"
    )]
    UnsupportedVersion {
        /// The version byte found.
        found: u8,
    },
    /// An algorithm id this build does not know.
    #[error("unsupported envelope algorithm id {found} (this build knows {ALGORITHM_AES256GCM_STREAM}: AES-256-GCM STREAM)")]
    UnsupportedAlgorithm {
        /// The algorithm byte found.
        found: u8,
    },
    /// The segment size is outside the allowed range.
    #[error("segment size must be {MIN_SEGMENT_SIZE}..={MAX_SEGMENT_SIZE} bytes, found {found}")]
    SegmentSize {
        /// The segment size found or requested.
        found: u32,
    },
    /// The CMK id is empty or longer than 255 bytes.
    #[error("CMK id must be 1..={MAX_CMK_ID_LEN} bytes of UTF-8, found {found} bytes")]
    CmkIdLength {
        /// Its length in bytes.
        found: usize,
    },
    /// The CMK id is not UTF-8.
    #[error("CMK id is not valid UTF-8 (invalid byte at offset {offset})")]
    CmkIdNotUtf8 {
        /// Offset of the first invalid byte.
        offset: usize,
    },
    /// The CMK id contains a control character (it is routed and logged).
    #[error("CMK id contains a control character (U+{code:04X}) at byte offset {offset}")]
    CmkIdControlCharacter {
        /// The character's code point.
        code: u32,
        /// Its byte offset.
        offset: usize,
    },
    /// The wrapped data key is empty or longer than 1 KiB.
    #[error("wrapped data key must be 1..={MAX_WRAPPED_KEY_LEN} bytes, found {found}")]
    WrappedKeyLength {
        /// Its length in bytes.
        found: usize,
    },
}

/// Encrypting into an envelope failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum EncryptError {
    /// The header fields given are out of bounds.
    #[error(transparent)]
    Header(#[from] HeaderError),
    /// Writing to the underlying sink failed.
    #[error("writing the envelope: {0}")]
    Io(#[source] io::Error),
    /// The random generator failed while drawing the stream salt.
    #[error("the system random generator failed")]
    Random,
    /// The stream would need more segments than one stream may have.
    #[error(
        "an envelope holds at most {max_segments} segments; write the rest into a new envelope"
    )]
    TooManySegments {
        /// The limit (2^32 in production).
        max_segments: u64,
    },
    /// The cryptographic library refused an operation (not expected to happen).
    #[error("the cryptographic library failed while sealing")]
    Crypto,
    /// Data was written after `finish`/`shutdown`.
    #[error("the envelope is already finished")]
    Finished,
    /// An earlier error ended this writer; its output is incomplete.
    #[error("an earlier error ended this envelope writer")]
    Failed,
}

/// Decrypting an envelope failed. Every variant means: do not trust any of
/// this stream beyond the plaintext already returned, and treat the stream as
/// incomplete.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum DecryptError {
    /// The header is malformed (see [`HeaderError`]).
    #[error(transparent)]
    Header(#[from] HeaderError),
    /// Reading from the underlying source failed.
    #[error("reading the envelope: {0}")]
    Io(#[source] io::Error),
    /// The data key does not match the header's key commitment: the wrong key,
    /// or the header's salt or commitment was altered.
    #[error("wrong data key: the key does not match the envelope's key commitment")]
    WrongKey,
    /// The key is right but the header's authentication tag does not match its
    /// bytes: a header field was changed.
    #[error("envelope header was modified: its authentication tag does not match")]
    HeaderTampered,
    /// The stream ended before its final segment: the envelope was truncated
    /// (also when a non-final segment was relabelled final).
    #[error("envelope truncated: it ends after {complete_segments} complete segment(s) without the final segment")]
    Truncated {
        /// Segments that authenticated before the end.
        complete_segments: u64,
    },
    /// Bytes follow the final segment, or the final segment was relabelled
    /// non-final so that more could be appended.
    #[error("trailing data after the final segment (segment {final_index})")]
    TrailingData {
        /// Index of the stream's real final segment.
        final_index: u64,
    },
    /// A later segment of this stream sits at this position: segments were
    /// removed or reordered.
    #[error("segment {index} is out of order: found segment {found} of this stream in its place")]
    Reordered {
        /// Position where the segment was expected.
        index: u64,
        /// The index the segment authenticates as.
        found: u64,
    },
    /// An earlier segment of this stream is repeated at this position.
    #[error("segment {index} is a duplicate of segment {copy_of}")]
    Duplicated {
        /// Position of the repeat.
        index: u64,
        /// The segment it repeats.
        copy_of: u64,
    },
    /// The segment does not authenticate as any nearby segment of this stream:
    /// it was modified, or spliced in from another stream.
    #[error("segment {index} failed authentication: modified, or taken from another stream")]
    Forged {
        /// Position of the segment.
        index: u64,
    },
    /// A segment's length word is impossible for this stream.
    #[error("segment {index}: {} segment of {found} plaintext bytes is not allowed with segment size {segment_size}{}", if *.is_final { "final" } else { "non-final" }, if *.is_final { " (an empty final segment is allowed only as the first)" } else { " (a non-final segment is exactly the segment size)" })]
    SegmentLength {
        /// Position of the segment.
        index: u64,
        /// Whether the word says final.
        is_final: bool,
        /// The plaintext length it states.
        found: u32,
        /// The stream's segment size.
        segment_size: u32,
    },
    /// The stream claims more segments than one stream may have.
    #[error("an envelope holds at most {max_segments} segments")]
    TooManySegments {
        /// The limit (2^32 in production).
        max_segments: u64,
    },
    /// The cryptographic library failed (not an authentication failure).
    #[error("the cryptographic library failed while opening")]
    Crypto,
    /// An earlier error ended this reader.
    #[error("an earlier error ended this envelope reader")]
    Failed,
}

impl DecryptError {
    /// A stable machine-readable name, for logs, audit records and exit codes.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Header(_) => "malformed_header",
            Self::Io(_) => "io",
            Self::WrongKey => "wrong_key",
            Self::HeaderTampered => "header_tampered",
            Self::Truncated { .. } => "truncated",
            Self::TrailingData { .. } => "trailing_data",
            Self::Reordered { .. } => "reordered",
            Self::Duplicated { .. } => "duplicated",
            Self::Forged { .. } => "forged_segment",
            Self::SegmentLength { .. } => "bad_segment_length",
            Self::TooManySegments { .. } => "too_many_segments",
            Self::Crypto => "crypto",
            Self::Failed => "failed",
        }
    }

    /// The envelope error inside an `io::Error` returned by
    /// [`EnvelopeReader`](crate::EnvelopeReader)'s `Read` implementation (or
    /// the async reader's), if it is one.
    pub fn from_io(error: &io::Error) -> Option<&DecryptError> {
        error.get_ref()?.downcast_ref::<DecryptError>()
    }
}

impl EncryptError {
    /// The envelope error inside an `io::Error` returned by
    /// [`EnvelopeWriter`](crate::EnvelopeWriter)'s `Write` implementation (or
    /// the async writer's), if it is one.
    pub fn from_io(error: &io::Error) -> Option<&EncryptError> {
        error.get_ref()?.downcast_ref::<EncryptError>()
    }
}

impl From<DecryptError> for io::Error {
    fn from(error: DecryptError) -> Self {
        match error {
            DecryptError::Io(e) | DecryptError::Header(HeaderError::Io(e)) => e,
            e @ (DecryptError::Truncated { .. }
            | DecryptError::Header(HeaderError::Truncated { .. })) => {
                io::Error::new(io::ErrorKind::UnexpectedEof, e)
            }
            e => io::Error::new(io::ErrorKind::InvalidData, e),
        }
    }
}

impl From<EncryptError> for io::Error {
    fn from(error: EncryptError) -> Self {
        match error {
            EncryptError::Io(e) => e,
            e @ EncryptError::Header(_) => io::Error::new(io::ErrorKind::InvalidInput, e),
            e => io::Error::other(e),
        }
    }
}
