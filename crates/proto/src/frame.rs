//! Frames: the unit both links carry (enclave ↔ parent over vsock, parent ↔
//! verifier over TCP/TLS).
//!
//! ```text
//! frame = length:u32-be || version:u8 || message
//! ```
//!
//! `length` counts the version byte and the message (not itself), so it is at
//! least 1. It is checked against the endpoint's limit (default
//! [`DEFAULT_MAX_FRAME_LEN`], 64 KiB) before any buffer is allocated. `version`
//! is [`PROTOCOL_VERSION`]; `message` is one CBOR item (see [`crate::message`]).
//!
//! The checks are sans-IO ([`parse_length_prefix`], [`check_version`],
//! [`encode_frame`]); [`read_frame`]/[`write_frame`] drive them over tokio
//! streams and [`read_frame_sync`]/[`write_frame_sync`] over `std::io`.

use crate::error::{FrameError, FramePart};
use std::io::{ErrorKind, Read, Write};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The protocol version this implementation speaks, the byte after the length.
pub const PROTOCOL_VERSION: u8 = 1;

/// Default limit for a frame's length (version byte plus message), in bytes.
pub const DEFAULT_MAX_FRAME_LEN: usize = 64 * 1024;

/// Size of the length prefix.
pub const LENGTH_PREFIX_LEN: usize = 4;

/// Check a length prefix against `max_frame_len` and return the number of bytes
/// that follow it (version byte plus message).
pub fn parse_length_prefix(
    prefix: [u8; LENGTH_PREFIX_LEN],
    max_frame_len: usize,
) -> Result<usize, FrameError> {
    let announced = u32::from_be_bytes(prefix);
    let len = usize::try_from(announced).map_err(|_| FrameError::TooLarge {
        found: u64::from(announced),
        max: max_frame_len,
    })?;
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > max_frame_len {
        return Err(FrameError::TooLarge {
            found: u64::from(announced),
            max: max_frame_len,
        });
    }
    Ok(len)
}

/// Check the version byte.
pub fn check_version(version: u8) -> Result<(), FrameError> {
    if version == PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(FrameError::BadVersion {
            expected: PROTOCOL_VERSION,
            found: version,
        })
    }
}

/// The complete frame for `message`: length prefix, version byte, message.
/// Refuses a frame the peer would refuse (longer than `max_frame_len`).
pub fn encode_frame(message: &[u8], max_frame_len: usize) -> Result<Vec<u8>, FrameError> {
    let too_large = || FrameError::TooLarge {
        found: u64::try_from(message.len())
            .unwrap_or(u64::MAX)
            .saturating_add(1),
        max: max_frame_len,
    };
    let len = message.len().checked_add(1).ok_or_else(too_large)?;
    if len > max_frame_len {
        return Err(too_large());
    }
    let prefix = u32::try_from(len).map_err(|_| too_large())?.to_be_bytes();
    let mut frame = Vec::with_capacity(len.saturating_add(LENGTH_PREFIX_LEN));
    frame.extend_from_slice(&prefix);
    frame.push(PROTOCOL_VERSION);
    frame.extend_from_slice(message);
    Ok(frame)
}

/// Read one frame and return its message (the bytes after the version byte).
///
/// A stream that ends before the first byte of a frame is [`FrameError::Closed`];
/// one that ends inside a frame is [`FrameError::Truncated`].
pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    max_frame_len: usize,
) -> Result<Vec<u8>, FrameError> {
    let mut prefix = [0u8; LENGTH_PREFIX_LEN];
    let got = read_full_async(reader, &mut prefix).await?;
    let len = after_prefix(prefix, got, max_frame_len)?;
    let mut version = [0u8; 1];
    let got = read_full_async(reader, &mut version).await?;
    let message_len = after_version(version, got, len)?;
    let mut message = vec![0u8; message_len];
    let got = read_full_async(reader, &mut message).await?;
    after_message(got, len)?;
    Ok(message)
}

/// Write one frame holding `message`, then flush.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    writer: &mut W,
    message: &[u8],
    max_frame_len: usize,
) -> Result<(), FrameError> {
    let frame = encode_frame(message, max_frame_len)?;
    writer.write_all(&frame).await?;
    writer.flush().await?;
    Ok(())
}

/// [`read_frame`] over a blocking `std::io::Read`.
pub fn read_frame_sync<R: Read>(
    reader: &mut R,
    max_frame_len: usize,
) -> Result<Vec<u8>, FrameError> {
    let mut prefix = [0u8; LENGTH_PREFIX_LEN];
    let got = read_full_sync(reader, &mut prefix)?;
    let len = after_prefix(prefix, got, max_frame_len)?;
    let mut version = [0u8; 1];
    let got = read_full_sync(reader, &mut version)?;
    let message_len = after_version(version, got, len)?;
    let mut message = vec![0u8; message_len];
    let got = read_full_sync(reader, &mut message)?;
    after_message(got, len)?;
    Ok(message)
}

/// [`write_frame`] over a blocking `std::io::Write`.
pub fn write_frame_sync<W: Write>(
    writer: &mut W,
    message: &[u8],
    max_frame_len: usize,
) -> Result<(), FrameError> {
    let frame = encode_frame(message, max_frame_len)?;
    writer.write_all(&frame)?;
    writer.flush()?;
    Ok(())
}

fn after_prefix(
    prefix: [u8; LENGTH_PREFIX_LEN],
    got: usize,
    max_frame_len: usize,
) -> Result<usize, FrameError> {
    match got {
        0 => Err(FrameError::Closed),
        LENGTH_PREFIX_LEN => parse_length_prefix(prefix, max_frame_len),
        found => Err(FrameError::Truncated {
            part: FramePart::LengthPrefix,
            expected: LENGTH_PREFIX_LEN,
            found,
        }),
    }
}

/// Returns the message length (frame length minus the version byte).
fn after_version(version: [u8; 1], got: usize, len: usize) -> Result<usize, FrameError> {
    if got != 1 {
        return Err(FrameError::Truncated {
            part: FramePart::Body,
            expected: len,
            found: 0,
        });
    }
    let [v] = version;
    check_version(v)?;
    Ok(len.saturating_sub(1))
}

fn after_message(got: usize, len: usize) -> Result<(), FrameError> {
    let found = got.saturating_add(1);
    if found == len {
        Ok(())
    } else {
        Err(FrameError::Truncated {
            part: FramePart::Body,
            expected: len,
            found,
        })
    }
}

/// Fill `buf` unless the stream ends first; returns the bytes read.
async fn read_full_async<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut [u8],
) -> Result<usize, std::io::Error> {
    let mut filled = 0usize;
    while let Some(rest) = buf.get_mut(filled..) {
        if rest.is_empty() {
            break;
        }
        match reader.read(rest).await {
            Ok(0) => break,
            Ok(n) => filled = filled.saturating_add(n),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Fill `buf` unless the stream ends first; returns the bytes read.
fn read_full_sync<R: Read>(reader: &mut R, buf: &mut [u8]) -> Result<usize, std::io::Error> {
    let mut filled = 0usize;
    while let Some(rest) = buf.get_mut(filled..) {
        if rest.is_empty() {
            break;
        }
        match reader.read(rest) {
            Ok(0) => break,
            Ok(n) => filled = filled.saturating_add(n),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects
    )]
    use super::*;
    use proptest::prelude::*;

    fn frame_of(len: u32, version: u8, message: &[u8]) -> Vec<u8> {
        let mut v = len.to_be_bytes().to_vec();
        v.push(version);
        v.extend_from_slice(message);
        v
    }

    #[test]
    fn round_trip_sync() {
        let mut buf = Vec::new();
        write_frame_sync(&mut buf, b"hello", DEFAULT_MAX_FRAME_LEN).unwrap();
        assert_eq!(buf, frame_of(6, 1, b"hello"));
        let got = read_frame_sync(&mut buf.as_slice(), DEFAULT_MAX_FRAME_LEN).unwrap();
        assert_eq!(got, b"hello");
    }

    #[tokio::test]
    async fn round_trip_async_two_frames() {
        let mut buf = Vec::new();
        write_frame(&mut buf, b"one", 64).await.unwrap();
        write_frame(&mut buf, b"", 64).await.unwrap();
        let mut r = buf.as_slice();
        assert_eq!(read_frame(&mut r, 64).await.unwrap(), b"one");
        assert_eq!(read_frame(&mut r, 64).await.unwrap(), b"");
        assert!(matches!(
            read_frame(&mut r, 64).await,
            Err(FrameError::Closed)
        ));
    }

    #[test]
    fn exactly_max_is_accepted_one_over_is_refused() {
        let max = 1000;
        let message = vec![7u8; max - 1];
        let frame = encode_frame(&message, max).unwrap();
        assert_eq!(
            read_frame_sync(&mut frame.as_slice(), max).unwrap(),
            message
        );

        let message = vec![7u8; max];
        assert!(matches!(
            encode_frame(&message, max),
            Err(FrameError::TooLarge {
                found: 1001,
                max: 1000
            })
        ));
        let frame = frame_of(1001, 1, &message);
        assert!(matches!(
            read_frame_sync(&mut frame.as_slice(), max),
            Err(FrameError::TooLarge {
                found: 1001,
                max: 1000
            })
        ));
    }

    #[test]
    fn default_max_is_64_kib() {
        let message = vec![0u8; DEFAULT_MAX_FRAME_LEN - 1];
        let frame = encode_frame(&message, DEFAULT_MAX_FRAME_LEN).unwrap();
        assert_eq!(frame.len(), DEFAULT_MAX_FRAME_LEN + 4);
        assert!(read_frame_sync(&mut frame.as_slice(), DEFAULT_MAX_FRAME_LEN).is_ok());
        let message = vec![0u8; DEFAULT_MAX_FRAME_LEN];
        assert!(matches!(
            encode_frame(&message, DEFAULT_MAX_FRAME_LEN),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn huge_announced_length_is_refused_before_reading() {
        // u32::MAX announced, nothing follows: must be TooLarge, not an
        // allocation or a wait for 4 GiB.
        let frame = u32::MAX.to_be_bytes();
        assert!(matches!(
            read_frame_sync(&mut frame.as_slice(), DEFAULT_MAX_FRAME_LEN),
            Err(FrameError::TooLarge { found, .. }) if found == u64::from(u32::MAX)
        ));
    }

    #[test]
    fn zero_length_is_refused() {
        let frame = 0u32.to_be_bytes();
        assert!(matches!(
            read_frame_sync(&mut frame.as_slice(), DEFAULT_MAX_FRAME_LEN),
            Err(FrameError::Empty)
        ));
    }

    #[test]
    fn version_only_frame_is_an_empty_message() {
        let frame = frame_of(1, 1, b"");
        assert_eq!(
            read_frame_sync(&mut frame.as_slice(), DEFAULT_MAX_FRAME_LEN).unwrap(),
            b""
        );
    }

    #[test]
    fn bad_version_is_refused() {
        for v in [0u8, 2, 0xff] {
            let frame = frame_of(3, v, b"ab");
            assert!(matches!(
                read_frame_sync(&mut frame.as_slice(), DEFAULT_MAX_FRAME_LEN),
                Err(FrameError::BadVersion { expected: 1, found }) if found == v
            ));
        }
    }

    #[test]
    fn truncated_prefix_and_body() {
        for cut in 1..4 {
            let frame = frame_of(3, 1, b"ab");
            assert!(matches!(
                read_frame_sync(&mut &frame[..cut], DEFAULT_MAX_FRAME_LEN),
                Err(FrameError::Truncated { part: FramePart::LengthPrefix, expected: 4, found }) if found == cut
            ));
        }
        let frame = frame_of(3, 1, b"ab");
        assert!(matches!(
            read_frame_sync(&mut &frame[..4], DEFAULT_MAX_FRAME_LEN),
            Err(FrameError::Truncated {
                part: FramePart::Body,
                expected: 3,
                found: 0
            })
        ));
        assert!(matches!(
            read_frame_sync(&mut &frame[..6], DEFAULT_MAX_FRAME_LEN),
            Err(FrameError::Truncated {
                part: FramePart::Body,
                expected: 3,
                found: 2
            })
        ));
    }

    #[test]
    fn empty_stream_is_closed() {
        assert!(matches!(
            read_frame_sync(&mut &[][..], DEFAULT_MAX_FRAME_LEN),
            Err(FrameError::Closed)
        ));
    }

    /// A reader that hands out one byte per call and is interrupted in between.
    struct Dribble<'a> {
        data: &'a [u8],
        interrupt: bool,
    }

    impl Read for Dribble<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.interrupt = !self.interrupt;
            if self.interrupt {
                return Err(std::io::Error::from(ErrorKind::Interrupted));
            }
            match (self.data.split_first(), buf.first_mut()) {
                (Some((b, rest)), Some(slot)) => {
                    *slot = *b;
                    self.data = rest;
                    Ok(1)
                }
                _ => Ok(0),
            }
        }
    }

    #[test]
    fn short_reads_and_interrupts_are_retried() {
        let frame = encode_frame(b"slowly", 64).unwrap();
        let mut r = Dribble {
            data: &frame,
            interrupt: false,
        };
        assert_eq!(read_frame_sync(&mut r, 64).unwrap(), b"slowly");
    }

    proptest! {
        #[test]
        fn prop_round_trip(messages in proptest::collection::vec(
            proptest::collection::vec(any::<u8>(), 0..2048), 1..8)) {
            let mut buf = Vec::new();
            for m in &messages {
                write_frame_sync(&mut buf, m, 4096).unwrap();
            }
            let mut r = buf.as_slice();
            for m in &messages {
                prop_assert_eq!(&read_frame_sync(&mut r, 4096).unwrap(), m);
            }
            prop_assert!(matches!(read_frame_sync(&mut r, 4096), Err(FrameError::Closed)));
        }

        #[test]
        fn prop_any_truncation_is_detected(
            message in proptest::collection::vec(any::<u8>(), 0..512),
            cut in any::<proptest::sample::Index>(),
        ) {
            let frame = encode_frame(&message, 4096).unwrap();
            let cut = cut.index(frame.len());
            let result = read_frame_sync(&mut &frame[..cut], 4096);
            if cut == 0 {
                prop_assert!(matches!(result, Err(FrameError::Closed)));
            } else {
                prop_assert!(matches!(result, Err(FrameError::Truncated { .. })), "{:?}", result);
            }
        }

        #[test]
        fn prop_arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64),
                                            max in 0usize..128) {
            let _ = read_frame_sync(&mut bytes.as_slice(), max);
        }

        #[test]
        fn prop_async_matches_sync(message in proptest::collection::vec(any::<u8>(), 0..1024)) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let mut a = Vec::new();
            rt.block_on(write_frame(&mut a, &message, 2048)).unwrap();
            let mut s = Vec::new();
            write_frame_sync(&mut s, &message, 2048).unwrap();
            prop_assert_eq!(&a, &s);
            let back = rt.block_on(read_frame(&mut a.as_slice(), 2048)).unwrap();
            prop_assert_eq!(back, message);
        }
    }
}
