//! Constant memory, black-box: the reader never reads more than one segment
//! ahead of the plaintext it has returned, and never past the envelope.
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
use kluis_envelope::{EnvelopeReader, EnvelopeWriter, SEGMENT_OVERHEAD};
use std::cell::Cell;
use std::io::Read;
use std::rc::Rc;

/// Counts the bytes read through it.
struct Counting<R> {
    inner: R,
    count: Rc<Cell<usize>>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.set(self.count.get() + n);
        Ok(n)
    }
}

/// An endless plaintext source, for a stream far larger than any buffer.
struct Endless(u64, u64);

impl Read for Endless {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.1 - self.0) as usize;
        for (i, b) in buf[..n].iter_mut().enumerate() {
            *b = (self.0 + i as u64) as u8;
        }
        self.0 += n as u64;
        Ok(n)
    }
}

#[test]
fn reader_reads_at_most_one_segment_ahead() {
    for read_size in [1, 100, S - 1, S, 3 * S] {
        let plaintext = data(20 * S + 77);
        let envelope = seal(&plaintext, S32);
        let (header_len, _) = layout(&envelope);
        let count = Rc::new(Cell::new(0));
        let source = Counting {
            inner: envelope.as_slice(),
            count: count.clone(),
        };
        let mut reader = EnvelopeReader::new(source, &key()).unwrap();
        assert_eq!(count.get(), header_len, "the header read is exact");
        let mut returned = 0usize;
        let mut buf = vec![0u8; read_size];
        loop {
            let n = reader.read(&mut buf).unwrap();
            returned += n;
            // Ciphertext consumed beyond what the returned plaintext accounts
            // for: at most the segment in progress plus the 1-byte end probe.
            let accounted = header_len + returned + returned.div_ceil(S) * SEGMENT_OVERHEAD;
            assert!(
                count.get() <= accounted + S + SEGMENT_OVERHEAD + 1,
                "read size {read_size}: consumed {} with {returned} returned",
                count.get()
            );
            if n == 0 {
                break;
            }
        }
        assert_eq!(returned, plaintext.len());
    }
}

#[test]
fn a_stream_much_larger_than_the_buffers() {
    // 64 MiB through 1 KiB segments: 65 536 segments, one buffer each side.
    const LEN: u64 = 64 * 1024 * 1024;
    let mut envelope = Vec::new();
    let mut writer =
        EnvelopeWriter::with_segment_size(&mut envelope, &key(), wrapped(), S32).unwrap();
    std::io::copy(&mut Endless(0, LEN), &mut writer).unwrap();
    writer.finish().unwrap();
    let mut reader = EnvelopeReader::new(envelope.as_slice(), &key()).unwrap();
    let mut buf = vec![0u8; 4096];
    let mut offset = 0u64;
    loop {
        let n = reader.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        for (i, &b) in buf[..n].iter().enumerate() {
            assert_eq!(b, (offset + i as u64) as u8);
        }
        offset += n as u64;
    }
    assert_eq!(offset, LEN);
}
