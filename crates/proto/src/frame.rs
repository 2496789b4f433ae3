//! Frames: the unit both links carry (enclave ↔ parent over vsock, parent ↔
//! verifier over TCP/TLS). One codec for every reader and writer of the
//! project: the verifier service, the parent's relay and job runner, and the
//! enclave.
//!
//! ```text
//! frame = length:u32-be || version:u8 || kind:u8 || body
//! ```
//!
//! `length` counts the version byte, the kind byte and the body (not
//! itself), so it is at least 2. It is checked against the endpoint's limit
//! (default [`DEFAULT_MAX_FRAME_LEN`], 64 KiB) before any buffer is
//! allocated. `version` is [`PROTOCOL_VERSION`]. `kind` is a [`FrameKind`]:
//! a [`FrameKind::Message`] body is one CBOR item (see [`crate::message`]);
//! a [`FrameKind::Data`] body is raw bytes (the job protocol's envelope
//! chunks), which never go through CBOR: a relay or a job runner moves them
//! without parsing them, and they are framed in place.
//!
//! Checking is separate from reading (the shape of mini-redis's
//! `Frame::check`): [`check_head`] judges the six header bytes, sans IO;
//! [`read_raw_frame`] and [`read_raw_frame_sync`] drive it over tokio and
//! `std::io` streams and return whole frames; [`split_frame`] takes a whole
//! frame apart again. [`read_frame`]/[`write_frame`] (and their `_sync`
//! forms) carry message frames for [`crate::message`].

use crate::error::{FrameError, FramePart};
use std::io::{ErrorKind, Read, Write};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The protocol version this implementation speaks, the byte after the
/// length. Version 2 added the kind byte and raw data frames; a peer of
/// version 1 is refused with [`FrameError::BadVersion`].
pub const PROTOCOL_VERSION: u8 = 2;

/// Default limit for a frame's length (version, kind and body), in bytes.
pub const DEFAULT_MAX_FRAME_LEN: usize = 64 * 1024;

/// Size of the length prefix.
pub const LENGTH_PREFIX_LEN: usize = 4;

/// Size of a frame's header: length prefix, version, kind.
pub const FRAME_HEADER_LEN: usize = LENGTH_PREFIX_LEN + 2;

/// What a frame's body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameKind {
    /// One CBOR message.
    Message,
    /// Raw bytes (a chunk of an envelope on a job connection).
    Data,
}

impl FrameKind {
    fn byte(self) -> u8 {
        match self {
            FrameKind::Message => 0,
            FrameKind::Data => 1,
        }
    }

    fn from_byte(byte: u8) -> Result<Self, FrameError> {
        match byte {
            0 => Ok(FrameKind::Message),
            1 => Ok(FrameKind::Data),
            found => Err(FrameError::BadKind { found }),
        }
    }
}

impl std::fmt::Display for FrameKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FrameKind::Message => "message",
            FrameKind::Data => "data",
        })
    }
}

/// A frame's checked header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHead {
    /// What the body is.
    pub kind: FrameKind,
    /// The body's length.
    pub body_len: usize,
}

impl FrameHead {
    /// The whole frame's length, header included.
    pub fn frame_len(&self) -> usize {
        self.body_len.saturating_add(FRAME_HEADER_LEN)
    }
}

/// Check a length prefix against `max_frame_len` and return the number of
/// bytes that follow it (version, kind and body).
pub fn parse_length_prefix(
    prefix: [u8; LENGTH_PREFIX_LEN],
    max_frame_len: usize,
) -> Result<usize, FrameError> {
    let announced = u32::from_be_bytes(prefix);
    let len = usize::try_from(announced).map_err(|_| FrameError::TooLarge {
        found: u64::from(announced),
        max: max_frame_len,
    })?;
    if len < 2 {
        return Err(FrameError::Empty { found: len });
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

/// Judge the header at the start of `buf`: `Ok(None)` while fewer than
/// [`FRAME_HEADER_LEN`] bytes are there, the checked header once they are,
/// an error for a length over `max_frame_len`, below 2, a version this side
/// does not speak or an unknown kind. Nothing is allocated.
pub fn check_head(buf: &[u8], max_frame_len: usize) -> Result<Option<FrameHead>, FrameError> {
    let Some((prefix, rest)) = buf.split_first_chunk::<LENGTH_PREFIX_LEN>() else {
        return Ok(None);
    };
    let len = parse_length_prefix(*prefix, max_frame_len)?;
    let [version, kind, ..] = rest else {
        return Ok(None);
    };
    check_version(*version)?;
    let kind = FrameKind::from_byte(*kind)?;
    Ok(Some(FrameHead {
        kind,
        body_len: len.saturating_sub(2),
    }))
}

/// The header of a frame of `kind` with a body of `body_len` bytes.
pub(crate) fn encode_head(
    kind: FrameKind,
    body_len: usize,
    max_frame_len: usize,
) -> Result<[u8; FRAME_HEADER_LEN], FrameError> {
    let too_large = || FrameError::TooLarge {
        found: u64::try_from(body_len)
            .unwrap_or(u64::MAX)
            .saturating_add(2),
        max: max_frame_len,
    };
    let len = body_len.checked_add(2).ok_or_else(too_large)?;
    if len > max_frame_len {
        return Err(too_large());
    }
    let [a, b, c, d] = u32::try_from(len).map_err(|_| too_large())?.to_be_bytes();
    Ok([a, b, c, d, PROTOCOL_VERSION, kind.byte()])
}

/// The complete frame of `kind` for `body`. Refuses a frame the peer would
/// refuse (longer than `max_frame_len`).
pub fn encode_frame(
    kind: FrameKind,
    body: &[u8],
    max_frame_len: usize,
) -> Result<Vec<u8>, FrameError> {
    let head = encode_head(kind, body.len(), max_frame_len)?;
    let mut frame = Vec::with_capacity(body.len().saturating_add(FRAME_HEADER_LEN));
    frame.extend_from_slice(&head);
    frame.extend_from_slice(body);
    Ok(frame)
}

/// Turn `buffer` — [`FRAME_HEADER_LEN`] reserved bytes, then the body — into
/// a whole frame of `kind`, in place (no copy of the body).
pub fn finish_frame_in_place(
    kind: FrameKind,
    mut buffer: Vec<u8>,
    max_frame_len: usize,
) -> Result<Vec<u8>, FrameError> {
    let body_len = buffer
        .len()
        .checked_sub(FRAME_HEADER_LEN)
        .ok_or(FrameError::Empty { found: 0 })?;
    let head = encode_head(kind, body_len, max_frame_len)?;
    if let Some(slot) = buffer.get_mut(..FRAME_HEADER_LEN) {
        slot.copy_from_slice(&head);
    }
    Ok(buffer)
}

/// Take a whole frame (as [`read_raw_frame`] returns it) apart: its kind and
/// body. `None` unless it is exactly one well-formed frame.
pub fn split_frame(frame: &[u8], max_frame_len: usize) -> Option<(FrameKind, &[u8])> {
    let head = check_head(frame, max_frame_len).ok()??;
    if head.frame_len() != frame.len() {
        return None;
    }
    Some((head.kind, frame.get(FRAME_HEADER_LEN..)?))
}

/// Read one whole frame (header included), checked before its body is
/// allocated.
///
/// A stream that ends before the first byte of a frame is
/// [`FrameError::Closed`]; one that ends inside a frame is
/// [`FrameError::Truncated`].
pub async fn read_raw_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    max_frame_len: usize,
) -> Result<Vec<u8>, FrameError> {
    let mut head = [0u8; FRAME_HEADER_LEN];
    let got = read_full_async(reader, &mut head).await?;
    let checked = after_head(&head, got, max_frame_len)?;
    let mut frame = vec![0u8; checked.frame_len()];
    if let Some(slot) = frame.get_mut(..FRAME_HEADER_LEN) {
        slot.copy_from_slice(&head);
    }
    let got = read_full_async(
        reader,
        frame.get_mut(FRAME_HEADER_LEN..).unwrap_or_default(),
    )
    .await?;
    after_body(got, checked)?;
    Ok(frame)
}

/// [`read_raw_frame`] into `frame`, whose allocation is reused: a loop that
/// reads many large frames (the parent's data path) then allocates, and
/// faults in fresh pages, only when a frame is larger than any before.
pub async fn read_raw_frame_into<R: AsyncRead + Unpin>(
    reader: &mut R,
    max_frame_len: usize,
    frame: &mut Vec<u8>,
) -> Result<(), FrameError> {
    let mut head = [0u8; FRAME_HEADER_LEN];
    let got = read_full_async(reader, &mut head).await?;
    let checked = after_head(&head, got, max_frame_len)?;
    // Shrinking or growing to the frame's length: only growth is
    // zero-filled; what the buffer held before is overwritten by the read
    // (or the frame is refused as truncated).
    frame.resize(checked.frame_len(), 0);
    if let Some(slot) = frame.get_mut(..FRAME_HEADER_LEN) {
        slot.copy_from_slice(&head);
    }
    let got = read_full_async(
        reader,
        frame.get_mut(FRAME_HEADER_LEN..).unwrap_or_default(),
    )
    .await?;
    after_body(got, checked)?;
    Ok(())
}

/// [`read_raw_frame`] over a blocking `std::io::Read`.
pub fn read_raw_frame_sync<R: Read>(
    reader: &mut R,
    max_frame_len: usize,
) -> Result<Vec<u8>, FrameError> {
    let mut head = [0u8; FRAME_HEADER_LEN];
    let got = read_full_sync(reader, &mut head)?;
    let checked = after_head(&head, got, max_frame_len)?;
    let mut frame = vec![0u8; checked.frame_len()];
    if let Some(slot) = frame.get_mut(..FRAME_HEADER_LEN) {
        slot.copy_from_slice(&head);
    }
    let got = read_full_sync(
        reader,
        frame.get_mut(FRAME_HEADER_LEN..).unwrap_or_default(),
    )?;
    after_body(got, checked)?;
    Ok(frame)
}

/// The body of a message frame.
fn message_body(mut frame: Vec<u8>) -> Result<Vec<u8>, FrameError> {
    match frame
        .get(LENGTH_PREFIX_LEN.saturating_add(1))
        .copied()
        .map(FrameKind::from_byte)
    {
        Some(Ok(FrameKind::Message)) => {
            frame.drain(..FRAME_HEADER_LEN);
            Ok(frame)
        }
        Some(Ok(found)) => Err(FrameError::UnexpectedKind {
            expected: FrameKind::Message,
            found,
        }),
        Some(Err(e)) => Err(e),
        None => Err(FrameError::Empty { found: 0 }),
    }
}

/// Read one message frame and return its body (a data frame here is an
/// error: the key-release link carries messages only).
pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    max_frame_len: usize,
) -> Result<Vec<u8>, FrameError> {
    message_body(read_raw_frame(reader, max_frame_len).await?)
}

/// Write one message frame holding `message`, then flush.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    writer: &mut W,
    message: &[u8],
    max_frame_len: usize,
) -> Result<(), FrameError> {
    let frame = encode_frame(FrameKind::Message, message, max_frame_len)?;
    writer.write_all(&frame).await?;
    writer.flush().await?;
    Ok(())
}

/// [`read_frame`] over a blocking `std::io::Read`.
pub fn read_frame_sync<R: Read>(
    reader: &mut R,
    max_frame_len: usize,
) -> Result<Vec<u8>, FrameError> {
    message_body(read_raw_frame_sync(reader, max_frame_len)?)
}

/// [`write_frame`] over a blocking `std::io::Write`.
pub fn write_frame_sync<W: Write>(
    writer: &mut W,
    message: &[u8],
    max_frame_len: usize,
) -> Result<(), FrameError> {
    let frame = encode_frame(FrameKind::Message, message, max_frame_len)?;
    writer.write_all(&frame)?;
    writer.flush()?;
    Ok(())
}

fn after_head(
    head: &[u8; FRAME_HEADER_LEN],
    got: usize,
    max_frame_len: usize,
) -> Result<FrameHead, FrameError> {
    if got == 0 {
        return Err(FrameError::Closed);
    }
    // Judge what arrived first: a bad length or version is reported as
    // such even when the stream then ended.
    match check_head(head.get(..got).unwrap_or_default(), max_frame_len)? {
        Some(checked) => Ok(checked),
        None if got < LENGTH_PREFIX_LEN => Err(FrameError::Truncated {
            part: FramePart::LengthPrefix,
            expected: LENGTH_PREFIX_LEN,
            found: got,
        }),
        None => {
            let [a, b, c, d, ..] = *head;
            Err(FrameError::Truncated {
                part: FramePart::Body,
                expected: usize::try_from(u32::from_be_bytes([a, b, c, d])).unwrap_or(usize::MAX),
                found: got.saturating_sub(LENGTH_PREFIX_LEN),
            })
        }
    }
}

fn after_body(got: usize, head: FrameHead) -> Result<(), FrameError> {
    if got == head.body_len {
        Ok(())
    } else {
        Err(FrameError::Truncated {
            part: FramePart::Body,
            expected: head.body_len.saturating_add(2),
            found: got.saturating_add(2),
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

    fn frame_of(len: u32, version: u8, kind: u8, body: &[u8]) -> Vec<u8> {
        let mut v = len.to_be_bytes().to_vec();
        v.push(version);
        v.push(kind);
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn round_trip_sync() {
        let mut buf = Vec::new();
        write_frame_sync(&mut buf, b"hello", DEFAULT_MAX_FRAME_LEN).unwrap();
        assert_eq!(buf, frame_of(7, 2, 0, b"hello"));
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

    #[tokio::test]
    async fn a_reused_buffer_holds_exactly_each_frame_read_into_it() {
        let mut stream = Vec::new();
        write_frame(&mut stream, &[7u8; 300], 1024).await.unwrap();
        write_frame(&mut stream, b"ab", 1024).await.unwrap();
        let mut r = stream.as_slice();
        let mut buf = Vec::new();
        let mut fresh = stream.as_slice();
        read_raw_frame_into(&mut r, 1024, &mut buf).await.unwrap();
        let big = read_raw_frame(&mut fresh, 1024).await.unwrap();
        assert_eq!(buf, big);
        let capacity = buf.capacity();
        // A shorter frame after a longer one: no leftover bytes, same
        // allocation.
        read_raw_frame_into(&mut r, 1024, &mut buf).await.unwrap();
        let small = read_raw_frame(&mut fresh, 1024).await.unwrap();
        assert_eq!(buf, small);
        assert_eq!(buf.capacity(), capacity);
        assert!(matches!(
            read_raw_frame_into(&mut r, 1024, &mut buf).await,
            Err(FrameError::Closed)
        ));
        // A truncated body is an error, not a short frame.
        let cut = stream.get(..stream.len().saturating_sub(1)).unwrap();
        let mut r = cut;
        read_raw_frame_into(&mut r, 1024, &mut buf).await.unwrap();
        assert!(read_raw_frame_into(&mut r, 1024, &mut buf).await.is_err());
    }

    #[test]
    fn data_frames_are_raw_and_built_in_place() {
        let body = vec![0xA5u8; 70_000];
        let mut buffer = vec![0u8; FRAME_HEADER_LEN];
        buffer.extend_from_slice(&body);
        let frame = finish_frame_in_place(FrameKind::Data, buffer, 1 << 20).unwrap();
        assert_eq!(
            frame,
            encode_frame(FrameKind::Data, &body, 1 << 20).unwrap()
        );
        assert_eq!(&frame[..6], &[0, 1, 0x11, 0x72, 2, 1]);
        assert_eq!(
            split_frame(&frame, 1 << 20),
            Some((FrameKind::Data, &body[..]))
        );
        // A raw reader returns it whole; a message reader refuses it.
        assert_eq!(
            read_raw_frame_sync(&mut frame.as_slice(), 1 << 20).unwrap(),
            frame
        );
        assert!(matches!(
            read_frame_sync(&mut frame.as_slice(), 1 << 20),
            Err(FrameError::UnexpectedKind {
                expected: FrameKind::Message,
                found: FrameKind::Data
            })
        ));
        // Not exactly one frame: not split.
        assert_eq!(split_frame(&frame[..frame.len() - 1], 1 << 20), None);
        let mut two = frame.clone();
        two.push(0);
        assert_eq!(split_frame(&two, 1 << 20), None);
    }

    #[test]
    fn check_head_needs_six_bytes_and_judges_them() {
        let frame = encode_frame(FrameKind::Message, b"abc", 64).unwrap();
        for cut in 0..FRAME_HEADER_LEN {
            assert_eq!(check_head(&frame[..cut], 64).unwrap(), None, "{cut}");
        }
        assert_eq!(
            check_head(&frame, 64).unwrap(),
            Some(FrameHead {
                kind: FrameKind::Message,
                body_len: 3
            })
        );
        assert!(matches!(
            check_head(&frame_of(5, 2, 9, b"abc"), 64),
            Err(FrameError::BadKind { found: 9 })
        ));
        assert!(matches!(
            check_head(&frame_of(65, 2, 0, b""), 64),
            Err(FrameError::TooLarge { found: 65, max: 64 })
        ));
    }

    #[test]
    fn exactly_max_is_accepted_one_over_is_refused() {
        let max = 1000;
        let message = vec![7u8; max - 2];
        let frame = encode_frame(FrameKind::Message, &message, max).unwrap();
        assert_eq!(
            read_frame_sync(&mut frame.as_slice(), max).unwrap(),
            message
        );

        let message = vec![7u8; max - 1];
        assert!(matches!(
            encode_frame(FrameKind::Message, &message, max),
            Err(FrameError::TooLarge {
                found: 1001,
                max: 1000
            })
        ));
        let frame = frame_of(1001, 2, 0, &message);
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
        let message = vec![0u8; DEFAULT_MAX_FRAME_LEN - 2];
        let frame = encode_frame(FrameKind::Message, &message, DEFAULT_MAX_FRAME_LEN).unwrap();
        assert_eq!(frame.len(), DEFAULT_MAX_FRAME_LEN + 4);
        assert!(read_frame_sync(&mut frame.as_slice(), DEFAULT_MAX_FRAME_LEN).is_ok());
        let message = vec![0u8; DEFAULT_MAX_FRAME_LEN - 1];
        assert!(matches!(
            encode_frame(FrameKind::Message, &message, DEFAULT_MAX_FRAME_LEN),
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
    fn lengths_below_two_are_refused() {
        for len in [0u32, 1] {
            let frame = len.to_be_bytes();
            assert!(matches!(
                read_frame_sync(&mut frame.as_slice(), DEFAULT_MAX_FRAME_LEN),
                Err(FrameError::Empty { found }) if found == len as usize
            ));
        }
    }

    #[test]
    fn header_only_frame_is_an_empty_message() {
        let frame = frame_of(2, 2, 0, b"");
        assert_eq!(
            read_frame_sync(&mut frame.as_slice(), DEFAULT_MAX_FRAME_LEN).unwrap(),
            b""
        );
    }

    #[test]
    fn other_versions_are_refused_with_a_clear_error() {
        for v in [0u8, 1, 3, 0xff] {
            let frame = frame_of(4, v, 0, b"ab");
            let err = read_frame_sync(&mut frame.as_slice(), DEFAULT_MAX_FRAME_LEN).unwrap_err();
            assert!(
                matches!(err, FrameError::BadVersion { expected: 2, found } if found == v),
                "{err:?}"
            );
            assert!(err.to_string().contains("upgrade"), "{err}");
        }
        // A version-1 peer's frame (length, version 1, CBOR at once).
        let mut v1 = 3u32.to_be_bytes().to_vec();
        v1.extend_from_slice(&[1, 0xA0, 0x00]);
        assert!(matches!(
            read_frame_sync(&mut v1.as_slice(), DEFAULT_MAX_FRAME_LEN),
            Err(FrameError::BadVersion { found: 1, .. })
        ));
    }

    #[test]
    fn truncated_prefix_head_and_body() {
        let frame = frame_of(4, 2, 0, b"ab");
        for cut in 1..4 {
            assert!(matches!(
                read_frame_sync(&mut &frame[..cut], DEFAULT_MAX_FRAME_LEN),
                Err(FrameError::Truncated { part: FramePart::LengthPrefix, expected: 4, found }) if found == cut
            ));
        }
        for cut in 4..6 {
            assert!(matches!(
                read_frame_sync(&mut &frame[..cut], DEFAULT_MAX_FRAME_LEN),
                Err(FrameError::Truncated { part: FramePart::Body, expected: 4, found }) if found == cut - 4
            ));
        }
        assert!(matches!(
            read_frame_sync(&mut &frame[..7], DEFAULT_MAX_FRAME_LEN),
            Err(FrameError::Truncated {
                part: FramePart::Body,
                expected: 4,
                found: 3
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
        let frame = encode_frame(FrameKind::Message, b"slowly", 64).unwrap();
        let mut r = Dribble {
            data: &frame,
            interrupt: false,
        };
        assert_eq!(read_frame_sync(&mut r, 64).unwrap(), b"slowly");
    }

    proptest! {
        #[test]
        fn prop_round_trip(frames in proptest::collection::vec(
            (any::<bool>(), proptest::collection::vec(any::<u8>(), 0..2048)), 1..8)) {
            let mut buf = Vec::new();
            for (data, body) in &frames {
                let kind = if *data { FrameKind::Data } else { FrameKind::Message };
                buf.extend_from_slice(&encode_frame(kind, body, 4096).unwrap());
            }
            let mut r = buf.as_slice();
            for (data, body) in &frames {
                let kind = if *data { FrameKind::Data } else { FrameKind::Message };
                let raw = read_raw_frame_sync(&mut r, 4096).unwrap();
                prop_assert_eq!(split_frame(&raw, 4096), Some((kind, body.as_slice())));
            }
            prop_assert!(matches!(read_raw_frame_sync(&mut r, 4096), Err(FrameError::Closed)));
        }

        #[test]
        fn prop_any_truncation_is_detected(
            message in proptest::collection::vec(any::<u8>(), 0..512),
            cut in any::<proptest::sample::Index>(),
        ) {
            let frame = encode_frame(FrameKind::Message, &message, 4096).unwrap();
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
            let _ = read_raw_frame_sync(&mut bytes.as_slice(), max);
            let _ = check_head(&bytes, max);
            let _ = split_frame(&bytes, max);
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
            let raw = rt.block_on(read_raw_frame(&mut s.as_slice(), 2048)).unwrap();
            prop_assert_eq!(raw, s);
        }
    }
}
