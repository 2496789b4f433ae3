//! Property tests: random sizes, segment sizes and chunkings round-trip, also
//! when sealed into room the sink lends; any single change or truncation is
//! rejected. Then the lending contract's edges.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation
)]

mod common;
use common::*;
use kluis_envelope::{
    DecryptError, EnvelopeHeader, EnvelopeReader, EnvelopeWriter, WriteInPlace, MIN_SEGMENT_SIZE,
};
use proptest::prelude::*;
use std::io::{BufRead, Read, Write};

fn sealed_in_chunks(plaintext: &[u8], segment_size: u32, chunk: usize) -> Vec<u8> {
    let mut writer =
        EnvelopeWriter::with_segment_size(Vec::new(), &key(), wrapped(), segment_size).unwrap();
    for piece in plaintext.chunks(chunk.max(1)) {
        writer.write_all(piece).unwrap();
    }
    writer.finish().unwrap()
}

fn read_in_chunks(envelope: &[u8], chunk: usize) -> Result<Vec<u8>, DecryptError> {
    let mut reader = EnvelopeReader::new(envelope, &key())?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; chunk.max(1)];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => return Err(*e.into_inner().unwrap().downcast::<DecryptError>().unwrap()),
        }
    }
}

/// A sink that lends room as `lends` says, in turn (and when asked for more
/// than `most` bytes, never): what a frame-building writer does.
struct Lender {
    out: Vec<u8>,
    lends: Vec<bool>,
    asked: usize,
    most: usize,
    /// Room lent and not yet committed: (start, len).
    lent: Option<(usize, usize)>,
    committed: usize,
}

impl Write for Lender {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        assert!(self.lent.is_none(), "write while room is lent");
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl WriteInPlace for Lender {
    fn room(&mut self, len: usize) -> std::io::Result<Option<&mut [u8]>> {
        let lend = self.lends[self.asked % self.lends.len()] && len <= self.most;
        self.asked += 1;
        if !lend {
            return Ok(None);
        }
        let start = self.out.len();
        // Stale bytes, as in a reused buffer.
        self.out.resize(start + len, 0xEE);
        self.lent = Some((start, len));
        Ok(Some(&mut self.out[start..]))
    }
    fn commit(&mut self, len: usize) -> std::io::Result<()> {
        let (_, lent) = self.lent.take().expect("commit without room");
        assert_eq!(lent, len);
        self.committed += 1;
        Ok(())
    }
}

/// Reads `envelope` through a `BufReader` of `capacity` bytes, in reads of
/// `chunk` bytes, opening segments in place; also returns how many bytes
/// were consumed straight from the buffer.
fn read_in_place(
    envelope: &[u8],
    capacity: usize,
    chunk: usize,
) -> (Result<Vec<u8>, String>, usize) {
    struct Counting<R> {
        inner: R,
        consumed: usize,
    }
    impl<R: Read> Read for Counting<R> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.inner.read(buf)
        }
    }
    impl<R: BufRead> BufRead for Counting<R> {
        fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
            self.inner.fill_buf()
        }
        fn consume(&mut self, n: usize) {
            self.consumed += n;
            self.inner.consume(n);
        }
    }
    let mut input = Counting {
        inner: std::io::BufReader::with_capacity(capacity, envelope),
        consumed: 0,
    };
    let header = match EnvelopeHeader::read_from(&mut input) {
        Ok(h) => h,
        Err(e) => return (Err(format!("{:?}", DecryptError::Header(e))), 0),
    };
    let mut reader = match EnvelopeReader::with_header(&mut input, header, &key()) {
        Ok(r) => r.in_place(),
        Err(e) => return (Err(format!("{e:?}")), 0),
    };
    let mut out = Vec::new();
    let mut buf = vec![0u8; chunk];
    let result = loop {
        match reader.read(&mut buf) {
            Ok(0) => break Ok(out),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => {
                break Err(format!(
                    "{:?}",
                    e.into_inner().unwrap().downcast::<DecryptError>().unwrap()
                ))
            }
        }
    };
    drop(reader);
    (result, input.consumed)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Opening segments where the source holds them gives the same
    /// plaintext, or the same error, as reading them into the reader's
    /// buffer: for intact, altered and cut envelopes, whatever the buffer
    /// and read sizes.
    #[test]
    fn in_place_reading_agrees_with_buffered_reading(
        len in 0usize..20_000,
        capacity in 1usize..12_000,
        chunk in 1usize..12_000,
        change in prop::option::of((any::<prop::sample::Index>(), 1u8..=255)),
        cut in prop::option::of(any::<prop::sample::Index>()),
    ) {
        let mut envelope = seal(&data(len), S32);
        if let Some((at, delta)) = change {
            let at = at.index(envelope.len());
            envelope[at] = envelope[at].wrapping_add(delta);
        }
        if let Some(at) = cut {
            envelope.truncate(at.index(envelope.len()));
        }
        let buffered = read_in_chunks(&envelope, chunk).map_err(|e| format!("{e:?}"));
        let (in_place, _) = read_in_place(&envelope, capacity, chunk);
        prop_assert_eq!(in_place, buffered);
    }

    /// Sealing into lent room gives an envelope of the same length that
    /// reads back the same, however the lending and the writes fall.
    #[test]
    fn round_trip_in_place(
        len in 0usize..40_000,
        segment_size in MIN_SEGMENT_SIZE..=8192,
        write_chunk in 1usize..20_000,
        lends in prop::collection::vec(any::<bool>(), 1..8),
        most in 0usize..10_000,
    ) {
        let plaintext = data(len);
        let sink = Lender { out: Vec::new(), lends, asked: 0, most, lent: None, committed: 0 };
        let mut writer = EnvelopeWriter::with_segment_size(sink, &key(), wrapped(), segment_size)
            .unwrap()
            .in_place();
        for piece in plaintext.chunks(write_chunk) {
            writer.write_all(piece).unwrap();
        }
        let sink = writer.finish().unwrap();
        prop_assert!(sink.lent.is_none());
        let envelope = sink.out;
        let (_, header_len) = EnvelopeHeader::from_bytes(&envelope).unwrap();
        prop_assert_eq!(
            envelope.len() as u64,
            kluis_envelope::envelope_len(header_len, segment_size, len as u64).unwrap()
        );
        prop_assert_eq!(read_in_chunks(&envelope, 4096).unwrap(), plaintext);
    }

    #[test]
    fn round_trip(
        len in 0usize..40_000,
        segment_size in MIN_SEGMENT_SIZE..=8192,
        write_chunk in 1usize..10_000,
        read_chunk in 1usize..10_000,
    ) {
        let plaintext = data(len);
        let envelope = sealed_in_chunks(&plaintext, segment_size, write_chunk);
        let (header, header_len) = EnvelopeHeader::from_bytes(&envelope).unwrap();
        prop_assert_eq!(header.segment_size(), segment_size);
        prop_assert_eq!(
            envelope.len() as u64,
            kluis_envelope::envelope_len(header_len, segment_size, len as u64).unwrap()
        );
        prop_assert_eq!(read_in_chunks(&envelope, read_chunk).unwrap(), plaintext);
    }

    #[test]
    fn any_byte_change_is_rejected(
        len in 0usize..6_000,
        position in any::<prop::sample::Index>(),
        delta in 1u8..=255,
    ) {
        let mut envelope = seal(&data(len), S32);
        let at = position.index(envelope.len());
        envelope[at] = envelope[at].wrapping_add(delta);
        prop_assert!(read_in_chunks(&envelope, 4096).is_err());
    }

    #[test]
    fn any_truncation_or_extension_is_rejected(
        len in 0usize..6_000,
        cut in any::<prop::sample::Index>(),
        extra in prop::collection::vec(any::<u8>(), 1..64),
    ) {
        let envelope = seal(&data(len), S32);
        let at = cut.index(envelope.len());
        prop_assert!(read_in_chunks(&envelope[..at], 4096).is_err());
        let mut longer = envelope.clone();
        longer.extend_from_slice(&extra);
        prop_assert!(
            matches!(read_in_chunks(&longer, 4096), Err(DecryptError::TrailingData { .. })),
            "extension"
        );
    }
}

fn lender(lends: bool, most: usize) -> Lender {
    Lender {
        out: Vec::new(),
        lends: vec![lends],
        asked: 0,
        most,
        lent: None,
        committed: 0,
    }
}

#[test]
fn every_segment_goes_into_lent_room_when_there_is_room() {
    let plaintext = data(5 * S + 100);
    let mut writer =
        EnvelopeWriter::with_segment_size(lender(true, usize::MAX), &key(), wrapped(), S32)
            .unwrap()
            .in_place();
    writer.write_all(&plaintext).unwrap();
    let header_len = writer.header().as_bytes().len();
    let sink = writer.finish().unwrap();
    // Five full segments and the final one; only the header was written.
    assert_eq!(sink.committed, 6);
    assert_eq!(sink.asked, 6);
    let (_, parsed_len) = EnvelopeHeader::from_bytes(&sink.out).unwrap();
    assert_eq!(parsed_len, header_len);
    assert_eq!(read_in_chunks(&sink.out, 4096).unwrap(), plaintext);
}

#[test]
fn without_in_place_no_room_is_asked_for() {
    let mut writer =
        EnvelopeWriter::with_segment_size(lender(true, usize::MAX), &key(), wrapped(), S32)
            .unwrap();
    writer.write_all(&data(3 * S)).unwrap();
    let sink = writer.finish().unwrap();
    assert_eq!((sink.asked, sink.committed), (0, 0));
    assert_eq!(read_in_chunks(&sink.out, 4096).unwrap(), data(3 * S));
}

/// A sink whose lending goes wrong as `fault` says.
#[derive(Clone, Copy, Debug)]
enum Fault {
    RoomFails,
    CommitFails,
    WrongLength,
}

struct Faulty {
    out: Vec<u8>,
    fault: Fault,
}

impl Write for Faulty {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl WriteInPlace for Faulty {
    fn room(&mut self, len: usize) -> std::io::Result<Option<&mut [u8]>> {
        let start = self.out.len();
        match self.fault {
            Fault::RoomFails => Err(std::io::Error::other("no room today")),
            Fault::CommitFails => {
                self.out.resize(start + len, 0);
                Ok(Some(&mut self.out[start..]))
            }
            Fault::WrongLength => {
                self.out.resize(start + len - 1, 0);
                Ok(Some(&mut self.out[start..]))
            }
        }
    }
    fn commit(&mut self, _len: usize) -> std::io::Result<()> {
        match self.fault {
            Fault::CommitFails => Err(std::io::Error::other("gone")),
            _ => Ok(()),
        }
    }
}

#[test]
fn a_lending_failure_fails_the_output_for_good() {
    for fault in [Fault::RoomFails, Fault::CommitFails, Fault::WrongLength] {
        let sink = Faulty {
            out: Vec::new(),
            fault,
        };
        let mut writer = EnvelopeWriter::with_segment_size(sink, &key(), wrapped(), S32)
            .unwrap()
            .in_place();
        // The first full segment followed by more input is sealed at once.
        let first = writer.write(&data(2 * S));
        assert!(first.is_err(), "{fault:?}: {first:?}");
        // Nothing more is accepted, and the output never gets a final segment.
        assert!(writer.write(b"more").is_err(), "{fault:?}");
        assert!(writer.finish().is_err(), "{fault:?}");
    }
}

#[test]
fn whole_segments_in_the_source_are_opened_where_they_lie() {
    let plaintext = data(20 * S + 7);
    let envelope = seal(&plaintext, S32);
    // A buffer of four segments and reads of two: most segments lie whole
    // in the buffer.
    let (result, consumed) = read_in_place(&envelope, 4 * (S + 20), 2 * S);
    assert_eq!(result.unwrap(), plaintext);
    assert!(
        consumed > envelope.len() / 2,
        "{consumed} of {} bytes opened in place",
        envelope.len()
    );
    // Reads smaller than a segment go through the reader's buffer; only the
    // short final segment fits them.
    let (result, consumed) = read_in_place(&envelope, 4 * (S + 20), S - 1);
    assert_eq!(result.unwrap(), plaintext);
    assert_eq!(consumed, kluis_envelope::SEGMENT_OVERHEAD + 7);
}
