//! Every tampering case of the format, each with its distinct error, and the
//! guarantee that no plaintext of an unauthenticated segment is released.
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
use kluis_envelope::{DecryptError, EnvelopeHeader, EnvelopeReader, HeaderError};
use std::io::Read;

/// A 5-segment envelope (the last one partial) and its layout.
fn five() -> (Vec<u8>, usize, Vec<std::ops::Range<usize>>) {
    let envelope = seal(&data(4 * S + 100), S32);
    let (h, segs) = layout(&envelope);
    assert_eq!(segs.len(), 5);
    (envelope, h, segs)
}

fn err(envelope: &[u8]) -> DecryptError {
    match open(envelope) {
        Ok(_) => panic!("tampered envelope decrypted"),
        Err((e, _)) => e,
    }
}

// ---- wrong key and header ----

#[test]
fn wrong_key() {
    let (envelope, ..) = five();
    assert!(matches!(
        open_with(&other_key(), &envelope),
        Err((DecryptError::WrongKey, _))
    ));
    let mut input = envelope.as_slice();
    let header = EnvelopeHeader::read_from(&mut input).unwrap();
    assert!(matches!(
        EnvelopeReader::with_header(input, header, &other_key()),
        Err(DecryptError::WrongKey)
    ));
}

#[test]
fn every_header_byte_is_protected() {
    let (envelope, header_len, _) = five();
    let id_len = "agency-a/app-x/prod".len();
    let salt_at = 21 + id_len + 60;
    for pos in 0..header_len {
        for mask in [0x01u8, 0x80] {
            let mut t = envelope.clone();
            t[pos] ^= mask;
            let e = err(&t);
            let ok = match pos {
                0..=7 => matches!(e, DecryptError::Header(HeaderError::BadMagic { .. })),
                8 => matches!(
                    e,
                    DecryptError::Header(HeaderError::UnsupportedVersion { .. })
                ),
                9 => matches!(
                    e,
                    DecryptError::Header(HeaderError::UnsupportedAlgorithm { .. })
                ),
                // Segment size: either out of range, or in range and caught by the tag.
                10..=13 => matches!(
                    e,
                    DecryptError::Header(HeaderError::SegmentSize { .. })
                        | DecryptError::HeaderTampered
                ),
                // Lengths: the parse goes wrong somewhere, or the tag catches it.
                14..=16 => matches!(
                    e,
                    DecryptError::Header(_) | DecryptError::HeaderTampered | DecryptError::WrongKey
                ),
                // CMK id: invalid UTF-8 or a control character, else the tag.
                p if p < 17 + id_len => matches!(
                    e,
                    DecryptError::Header(
                        HeaderError::CmkIdNotUtf8 { .. }
                            | HeaderError::CmkIdControlCharacter { .. }
                    ) | DecryptError::HeaderTampered
                ),
                // CMK version and wrapped key: the tag.
                p if p < salt_at => matches!(e, DecryptError::HeaderTampered),
                // Salt and commitment: the commitment no longer matches.
                p if p < salt_at + 64 => matches!(e, DecryptError::WrongKey),
                // The tag itself.
                _ => matches!(e, DecryptError::HeaderTampered),
            };
            assert!(ok, "byte {pos} ^ {mask:#04x}: {e:?}");
        }
    }
}

#[test]
fn in_range_segment_size_change_is_caught_by_the_tag() {
    let (mut envelope, ..) = five();
    envelope[10..14].copy_from_slice(&2048u32.to_be_bytes());
    assert!(matches!(err(&envelope), DecryptError::HeaderTampered));
}

#[test]
fn header_of_another_stream_under_the_same_key() {
    let (envelope, h, _) = five();
    let other = seal(&data(4 * S + 100), S32);
    let (oh, _) = layout(&other);
    let mut spliced = other[..oh].to_vec();
    spliced.extend_from_slice(&envelope[h..]);
    // The header is genuine, so it authenticates; segment 0 is not its own.
    assert!(matches!(err(&spliced), DecryptError::Forged { index: 0 }));
}

#[test]
fn header_truncated() {
    let (envelope, h, _) = five();
    for cut in [0, 1, 8, 16, 17, 40, h - 1] {
        let e = err(&envelope[..cut]);
        assert!(
            matches!(e, DecryptError::Header(HeaderError::Truncated { .. })),
            "cut at {cut}: {e:?}"
        );
    }
}

#[test]
fn not_an_envelope() {
    let e = err(b"PK\x03\x04 this is a zip file, not an envelope, and it is long enough");
    assert!(matches!(
        e,
        DecryptError::Header(HeaderError::BadMagic { .. })
    ));
    assert!(e.to_string().contains("KLUISENV"), "{e}");
}

// ---- truncation ----

#[test]
fn truncated_after_each_segment_boundary() {
    let (envelope, h, segs) = five();
    // Right after the header, and after each non-final segment.
    let cuts = std::iter::once(h).chain(segs[..4].iter().map(|r| r.end));
    for (complete, cut) in cuts.enumerate() {
        let (e, out) = open(&envelope[..cut]).unwrap_err();
        assert!(
            matches!(e, DecryptError::Truncated { complete_segments } if complete_segments == complete as u64),
            "cut at {cut}: {e:?}"
        );
        assert_eq!(
            out,
            data(4 * S + 100)[..complete * S],
            "only authenticated segments"
        );
    }
}

#[test]
fn truncated_inside_a_segment() {
    let (envelope, _, segs) = five();
    for (i, r) in segs.iter().enumerate() {
        for cut in [r.start + 1, r.start + 4, r.start + 10, r.end - 1] {
            let e = err(&envelope[..cut]);
            assert!(
                matches!(e, DecryptError::Truncated { complete_segments } if complete_segments == i as u64),
                "segment {i}, cut at {cut}: {e:?}"
            );
        }
    }
}

#[test]
fn truncated_with_the_new_last_segment_relabelled_final() {
    let (mut envelope, _, segs) = five();
    envelope.truncate(segs[2].end);
    flip_final(&mut envelope, &segs[2]);
    assert!(matches!(
        err(&envelope),
        DecryptError::Truncated {
            complete_segments: 2
        }
    ));
}

#[test]
fn every_proper_prefix_fails() {
    let envelope = seal(&data(2 * S + 10), S32);
    for cut in 0..envelope.len() {
        assert!(
            open(&envelope[..cut]).is_err(),
            "prefix of {cut} bytes accepted"
        );
    }
}

// ---- trailing data ----

#[test]
fn trailing_bytes() {
    let (envelope, ..) = five();
    for extra in [&b"\0"[..], b"garbage", &[0u8; 5000]] {
        let mut t = envelope.clone();
        t.extend_from_slice(extra);
        let (e, out) = open(&t).unwrap_err();
        assert!(
            matches!(e, DecryptError::TrailingData { final_index: 4 }),
            "{e:?}"
        );
        // The whole envelope authenticated; the error is about what follows.
        assert_eq!(out, data(4 * S + 100));
    }
}

#[test]
fn final_segment_repeated_at_the_end() {
    let (mut envelope, _, segs) = five();
    let last = envelope[segs[4].clone()].to_vec();
    envelope.extend_from_slice(&last);
    assert!(matches!(
        err(&envelope),
        DecryptError::TrailingData { final_index: 4 }
    ));
}

#[test]
fn final_segment_relabelled_non_final_to_append() {
    // A full final segment can be relabelled non-final; the appended data
    // must not be accepted.
    let envelope = seal(&data(3 * S), S32);
    let (_, segs) = layout(&envelope);
    assert_eq!(segs.len(), 3);
    let mut t = envelope.clone();
    flip_final(&mut t, &segs[2]);
    let appended = seal(b"appended", S32);
    let (oh, _) = layout(&appended);
    t.extend_from_slice(&appended[oh..]);
    let (e, out) = open(&t).unwrap_err();
    assert!(
        matches!(e, DecryptError::TrailingData { final_index: 2 }),
        "{e:?}"
    );
    assert_eq!(out, data(2 * S));
}

// ---- reordering, removal, duplication ----

#[test]
fn swapped_segments() {
    let (envelope, h, segs) = five();
    let s: Vec<&[u8]> = segs.iter().map(|r| &envelope[r.clone()]).collect();
    let t = assemble(&envelope[..h], &[s[0], s[2], s[1], s[3], s[4]]);
    let (e, out) = open(&t).unwrap_err();
    assert!(
        matches!(e, DecryptError::Reordered { index: 1, found: 2 }),
        "{e:?}"
    );
    assert_eq!(out, data(S), "segment 0 only");
}

#[test]
fn removed_middle_segment() {
    let (envelope, h, segs) = five();
    let s: Vec<&[u8]> = segs.iter().map(|r| &envelope[r.clone()]).collect();
    let t = assemble(&envelope[..h], &[s[0], s[1], s[3], s[4]]);
    assert!(matches!(
        err(&t),
        DecryptError::Reordered { index: 2, found: 3 }
    ));
}

#[test]
fn final_segment_moved_forward() {
    let (envelope, h, segs) = five();
    let s: Vec<&[u8]> = segs.iter().map(|r| &envelope[r.clone()]).collect();
    let t = assemble(&envelope[..h], &[s[0], s[4]]);
    assert!(matches!(
        err(&t),
        DecryptError::Reordered { index: 1, found: 4 }
    ));
}

#[test]
fn duplicated_segment() {
    let (envelope, h, segs) = five();
    let s: Vec<&[u8]> = segs.iter().map(|r| &envelope[r.clone()]).collect();
    let t = assemble(&envelope[..h], &[s[0], s[1], s[1], s[2], s[3], s[4]]);
    let (e, out) = open(&t).unwrap_err();
    assert!(
        matches!(
            e,
            DecryptError::Duplicated {
                index: 2,
                copy_of: 1
            }
        ),
        "{e:?}"
    );
    assert_eq!(out, data(2 * S));
}

#[test]
fn far_reordering_is_still_detected() {
    let envelope = seal(&data(30 * S), S32);
    let (h, segs) = layout(&envelope);
    let s: Vec<&[u8]> = segs.iter().map(|r| &envelope[r.clone()]).collect();
    let mut order = s.clone();
    order.swap(1, 25);
    let e = err(&assemble(&envelope[..h], &order));
    // Beyond the diagnosis window it is reported as a forgery; still an error.
    assert!(matches!(e, DecryptError::Forged { index: 1 }), "{e:?}");
}

// ---- splicing and modification ----

#[test]
fn segment_spliced_from_another_stream_with_the_same_key() {
    let (envelope, h, segs) = five();
    let other = seal(&data(4 * S + 100), S32);
    let (_, osegs) = layout(&other);
    let s: Vec<&[u8]> = segs.iter().map(|r| &envelope[r.clone()]).collect();
    let o2 = &other[osegs[2].clone()];
    let t = assemble(&envelope[..h], &[s[0], s[1], o2, s[3], s[4]]);
    let (e, out) = open(&t).unwrap_err();
    assert!(matches!(e, DecryptError::Forged { index: 2 }), "{e:?}");
    assert_eq!(out, data(2 * S));
}

#[test]
fn tail_spliced_from_another_stream() {
    let (envelope, _, segs) = five();
    let other = seal(&data(4 * S + 100), S32);
    let (_, osegs) = layout(&other);
    let mut t = envelope[..segs[3].start].to_vec();
    t.extend_from_slice(&other[osegs[3].start..]);
    assert!(matches!(err(&t), DecryptError::Forged { index: 3 }));
}

#[test]
fn modified_ciphertext_and_tag() {
    let (envelope, _, segs) = five();
    for (i, r) in segs.iter().enumerate() {
        for pos in [
            r.start + 4,
            r.start + 100,
            r.end - 17,
            r.end - 16,
            r.end - 1,
        ] {
            let mut t = envelope.clone();
            t[pos] ^= 0x04;
            let e = err(&t);
            assert!(
                matches!(e, DecryptError::Forged { index } if index == i as u64),
                "segment {i} byte {pos}: {e:?}"
            );
        }
    }
}

#[test]
fn impossible_length_words() {
    let (envelope, _, segs) = five();
    // A non-final segment shorter than the segment size.
    let mut t = envelope.clone();
    t[segs[1].start + 3] ^= 0x01;
    assert!(matches!(
        err(&t),
        DecryptError::SegmentLength {
            index: 1,
            is_final: false,
            found: 1025,
            segment_size: 1024
        }
    ));
    // A final segment longer than the segment size.
    let mut t = envelope.clone();
    t[segs[4].start..segs[4].start + 4].copy_from_slice(&(0x8000_0000u32 | 5000).to_be_bytes());
    assert!(matches!(
        err(&t),
        DecryptError::SegmentLength {
            index: 4,
            is_final: true,
            found: 5000,
            ..
        }
    ));
    // Reserved high bits set.
    let mut t = envelope.clone();
    t[segs[0].start] |= 0x40;
    assert!(matches!(
        err(&t),
        DecryptError::SegmentLength { index: 0, .. }
    ));
}

#[test]
fn final_segment_length_changed_within_bounds() {
    // Shortening the final segment's length word moves the tag boundary.
    let (mut envelope, _, segs) = five();
    let at = segs[4].start;
    envelope[at..at + 4].copy_from_slice(&(0x8000_0000u32 | 99).to_be_bytes());
    let e = err(&envelope);
    assert!(
        matches!(
            e,
            DecryptError::Forged { index: 4 } | DecryptError::TrailingData { .. }
        ),
        "{e:?}"
    );
}

#[test]
fn every_single_bit_flip_is_rejected() {
    let envelope = seal(&data(2 * S + 300), S32);
    for pos in 0..envelope.len() {
        for bit in 0..8 {
            let mut t = envelope.clone();
            t[pos] ^= 1 << bit;
            assert!(open(&t).is_err(), "bit {bit} of byte {pos} accepted");
        }
    }
}

// ---- plaintext release ----

#[test]
fn no_plaintext_from_a_segment_that_fails() {
    let (mut envelope, _, segs) = five();
    envelope[segs[1].start + 50] ^= 0x01;

    // A buffer large enough for direct decryption: it must come back zeroed,
    // not holding unauthenticated plaintext.
    let mut reader = EnvelopeReader::new(envelope.as_slice(), &key()).unwrap();
    let mut buf = vec![0xEEu8; 4 * S];
    assert_eq!(reader.read(&mut buf).unwrap(), S);
    assert_eq!(buf[..S], data(S)[..]);
    buf.fill(0xEE);
    let e = reader.read(&mut buf).unwrap_err();
    assert!(matches!(
        DecryptError::from_io(&e),
        Some(DecryptError::Forged { index: 1 })
    ));
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
    assert!(
        buf[..S].iter().all(|&b| b == 0),
        "the failed segment's bytes were zeroed"
    );
    // The reader stays failed.
    let again = reader.read(&mut buf).unwrap_err();
    assert!(matches!(
        DecryptError::from_io(&again),
        Some(DecryptError::Failed)
    ));
    assert!(!reader.is_complete());

    // Small reads: exactly segment 0, then the error.
    let mut reader = EnvelopeReader::new(envelope.as_slice(), &key()).unwrap();
    let mut got = Vec::new();
    let mut small = [0u8; 10];
    let e = loop {
        match reader.read(&mut small) {
            Ok(0) => panic!("clean end of a tampered stream"),
            Ok(n) => got.extend_from_slice(&small[..n]),
            Err(e) => break e,
        }
    };
    assert_eq!(got, data(S));
    assert!(matches!(
        DecryptError::from_io(&e),
        Some(DecryptError::Forged { index: 1 })
    ));
}

#[test]
fn truncation_is_an_unexpected_eof() {
    let (envelope, _, segs) = five();
    let mut reader = EnvelopeReader::new(&envelope[..segs[3].end], &key()).unwrap();
    let mut out = Vec::new();
    let e = reader.read_to_end(&mut out).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
    assert_eq!(out.len(), 4 * S);
}

#[test]
fn finish_reports_tampering_in_unread_segments() {
    let (mut envelope, _, segs) = five();
    envelope[segs[3].start + 9] ^= 0x10;
    let mut reader = EnvelopeReader::new(envelope.as_slice(), &key()).unwrap();
    let mut first = [0u8; 10];
    reader.read_exact(&mut first).unwrap();
    assert!(matches!(
        reader.finish(),
        Err(DecryptError::Forged { index: 3 })
    ));
}

#[test]
fn errors_have_stable_kinds_and_no_secrets() {
    let (envelope, _, segs) = five();
    let mut t = envelope.clone();
    t.truncate(segs[2].end);
    let e = err(&t);
    assert_eq!(e.kind(), "truncated");
    assert_eq!(
        e.to_string(),
        "envelope truncated: it ends after 3 complete segment(s) without the final segment"
    );
    let wrong = open_with(&other_key(), &envelope).unwrap_err().0;
    assert_eq!(wrong.kind(), "wrong_key");
    let shown = format!("{wrong} {wrong:?}");
    assert!(!shown.contains("66") && !shown.contains("42"), "{shown}");
}
