//! Looks for a secret in this process's freed heap: a marker is written
//! into a growing buffer, which is then dropped, and every private writable
//! mapping of the process is read back through `/proc/self/mem` (plain file
//! I/O, no `unsafe`) and searched for it.
//!
//! The marker is never held whole anywhere but in the buffer under test:
//! the search compares against its complement, byte by byte. The calling
//! thread's own stack is not searched (the marker's bytes pass through it
//! while the buffer is filled).

use std::io::BufRead;
use std::os::unix::fs::FileExt;

/// The complement of the marker: the marker is `!MASK[i]`.
const MASK: [u8; 48] = *b"\x94\x93\x8a\x96\x8c\xdf\x99\x8d\x9a\x9a\x9b\xd2\x97\x9a\x9e\x8f\xdf\x92\x9e\x8d\x94\x9a\x8d\xc5\xdf\x9e\xdf\x8c\x9a\x9c\x8d\x9a\x8b\xdf\x8b\x97\x9e\x8b\xdf\x88\x9e\x8c\xdf\x98\x8d\x90\x88\x91";

fn is_marker(window: &[u8]) -> bool {
    window.len() == MASK.len() && window.iter().zip(MASK.iter()).all(|(b, m)| *b == !*m)
}

/// A buffer of secret-looking records, grown from nothing to `len` bytes
/// one record at a time (so it is moved to larger blocks several times),
/// then dropped.
pub fn grow_and_drop_a_secret(len: usize) {
    let mut buf: Vec<u8> = Vec::new();
    while buf.len() < len {
        // A record: some filler, then the marker, away from the block's
        // first bytes (where a freed block keeps the allocator's links).
        buf.extend(std::iter::repeat_n(b'.', 40));
        buf.extend(MASK.iter().map(|m| !*m));
    }
    std::hint::black_box(&buf);
    drop(buf);
}

/// How many places in this process's private writable memory hold the
/// marker, outside the calling thread's stack.
pub fn marker_copies() -> usize {
    let here = 0u8;
    let here = std::ptr::addr_of!(here) as usize;
    let maps = std::fs::File::open("/proc/self/maps").unwrap();
    let mem = std::fs::File::open("/proc/self/mem").unwrap();
    let mut regions = Vec::new();
    for line in std::io::BufReader::new(maps).lines() {
        let line = line.unwrap();
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        let name = fields.nth(3).unwrap_or("");
        if !perms.starts_with("rw") || !perms.ends_with('p') || name.starts_with("[v") {
            continue;
        }
        let (start, end) = range.split_once('-').unwrap();
        let start = usize::from_str_radix(start, 16).unwrap();
        let end = usize::from_str_radix(end, 16).unwrap();
        if (start..end).contains(&here) {
            continue;
        }
        regions.push((start, end));
    }
    let mut copies = 0;
    let mut chunk = vec![0u8; 1 << 20];
    for (start, end) in regions {
        let mut at = start;
        while at < end {
            let n = (end - at).min(chunk.len());
            let Ok(read) = mem.read_at(&mut chunk[..n], at as u64) else {
                break;
            };
            if read == 0 {
                break;
            }
            // A marker across two chunks is missed; records repeat it, so
            // a buffer left whole is found many times over.
            copies += chunk[..read]
                .windows(MASK.len())
                .filter(|w| is_marker(w))
                .count();
            at += read;
        }
    }
    copies
}
