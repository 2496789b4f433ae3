//! Conformance with the documented format: an independent decoder written
//! from the crate documentation (offsets, labels, key schedule, nonces)
//! opens what the crate writes, and a stored vector keeps the format from
//! drifting unnoticed.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation
)]

mod common;
use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use aws_lc_rs::{digest, hkdf, hmac};
use common::*;

struct Len(usize);
impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

fn expand(prk: &hkdf::Prk, info: &[&[u8]], len: usize) -> Vec<u8> {
    let mut out = vec![0; len];
    prk.expand(info, Len(len)).unwrap().fill(&mut out).unwrap();
    out
}

/// Decodes an envelope following only the documented format.
fn spec_decode(dk: &[u8; 32], env: &[u8]) -> (String, u32, Vec<u8>, Vec<u8>) {
    assert_eq!(&env[0..8], b"KLUISENV");
    assert_eq!(env[8], 1, "version");
    assert_eq!(env[9], 1, "algorithm");
    let s = u32::from_be_bytes(env[10..14].try_into().unwrap()) as usize;
    let n = env[14] as usize;
    let m = u16::from_be_bytes(env[15..17].try_into().unwrap()) as usize;
    let cmk_id = String::from_utf8(env[17..17 + n].to_vec()).unwrap();
    let cmk_version = u32::from_be_bytes(env[17 + n..21 + n].try_into().unwrap());
    let wrapped = env[21 + n..21 + n + m].to_vec();
    let salt = &env[21 + n + m..53 + n + m];
    let commitment = &env[53 + n + m..85 + n + m];
    let tag = &env[85 + n + m..117 + n + m];
    let header = &env[..117 + n + m];

    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(dk);
    assert_eq!(
        expand(&prk, &[b"kluis-envelope/v1 key commitment"], 32),
        commitment
    );
    let kh = expand(&prk, &[b"kluis-envelope/v1 header tag key"], 32);
    hmac::verify(
        &hmac::Key::new(hmac::HMAC_SHA256, &kh),
        &env[..85 + n + m],
        tag,
    )
    .expect("header tag");
    let h = digest::digest(&digest::SHA256, header);
    let okm = expand(&prk, &[b"kluis-envelope/v1 segment key", h.as_ref()], 39);
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &okm[..32]).unwrap());
    let prefix = &okm[32..39];

    let mut plaintext = Vec::new();
    let mut pos = header.len();
    let mut i: u32 = 0;
    loop {
        let word = u32::from_be_bytes(env[pos..pos + 4].try_into().unwrap());
        let f = word >> 31;
        let l = (word & 0x7fff_ffff) as usize;
        assert!(l <= s && (f == 1 || l == s));
        let mut nonce = [0u8; 12];
        nonce[..7].copy_from_slice(prefix);
        nonce[7..11].copy_from_slice(&i.to_be_bytes());
        nonce[11] = f as u8;
        let mut body = env[pos + 4..pos + 4 + l + 16].to_vec();
        let pt = key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&env[pos..pos + 4]),
                &mut body,
            )
            .expect("segment authenticates");
        plaintext.extend_from_slice(pt);
        pos += 4 + l + 16;
        if f == 1 {
            break;
        }
        i += 1;
    }
    assert_eq!(pos, env.len(), "the envelope ends with its final segment");
    (cmk_id, cmk_version, wrapped, plaintext)
}

#[test]
fn the_documented_format_decodes_what_the_crate_writes() {
    for len in [0, 1, S, 3 * S + 5] {
        let envelope = seal(&data(len), S32);
        let (id, version, wrapped_bytes, plaintext) = spec_decode(key().expose_secret(), &envelope);
        assert_eq!(id, "agency-a/app-x/prod");
        assert_eq!(version, 7);
        assert_eq!(wrapped_bytes, vec![0xAA; 60]);
        assert_eq!(plaintext, data(len));
    }
}

/// A version-1 envelope made once by this crate (key 0x42 × 32, segment size
/// 1024, 2600 bytes of `common::data`). If this stops decrypting, the format
/// changed: bump the version instead.
const VECTOR_HEX: &str = include_str!("vectors/v1-s1024-2600.hex");

fn vector() -> Vec<u8> {
    let hex: String = VECTOR_HEX.split_whitespace().collect();
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn stored_vector_still_decrypts() {
    let envelope = vector();
    assert_eq!(open(&envelope).unwrap(), data(2600));
    let (_, _, _, plaintext) = spec_decode(key().expose_secret(), &envelope);
    assert_eq!(plaintext, data(2600));
}

/// Regenerates the vector: `cargo test -p kluis-envelope --test spec -- --ignored`.
#[test]
#[ignore = "writes tests/vectors; run by hand only when the format version changes"]
fn regenerate_vector() {
    let envelope = seal(&data(2600), S32);
    let hex: String = envelope.iter().map(|b| format!("{b:02x}")).collect();
    let lines: Vec<&str> = hex
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("v1-s1024-2600.hex"), lines.join("\n") + "\n").unwrap();
}
