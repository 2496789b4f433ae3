//! The reader against the format description: PCRs derived independently
//! here, the builder's bytes checked field by field, every corruption a typed
//! error of its own, and no input that panics.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation
)]

use kluis_eif::{measure, EifBuilder, EifError, Measurements, SectionType, FLAG_ARM64};
use proptest::prelude::*;
use sha2::{Digest, Sha384};
use std::io::{Cursor, Read, Seek, SeekFrom};

// ------------------------------------------------------------ independent reference

/// `SHA-384(48 zero bytes || SHA-384(parts concatenated))`.
fn reference_pcr(parts: &[&[u8]]) -> [u8; 48] {
    let mut inner = Sha384::new();
    for part in parts {
        inner.update(part);
    }
    let inner = inner.finalize();
    let mut outer = Sha384::new();
    outer.update([0u8; 48]);
    outer.update(inner);
    outer.finalize().into()
}

/// CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320), bit by bit.
fn reference_crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes(b[at..at + 2].try_into().unwrap())
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}
fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

const COUNT: usize = 26;
const OFFSETS: usize = 28;
const SIZES: usize = 28 + 32 * 8;
const CRC: usize = 544;

fn offset_of(eif: &[u8], i: usize) -> usize {
    be64(eif, OFFSETS + 8 * i) as usize
}

/// The CRC over everything but its own field, written back (so a test
/// corrupts exactly one thing).
fn fix_crc(eif: &mut [u8]) {
    let mut covered = eif[..CRC].to_vec();
    covered.extend_from_slice(&eif[CRC + 4..]);
    let crc = reference_crc32(&covered);
    eif[CRC..CRC + 4].copy_from_slice(&crc.to_be_bytes());
}

/// A CBOR encoder for the signature section, written from RFC 8949: an array
/// with one map of two text keys, byte strings as arrays of integers (the
/// reference tooling's serde encoding) or as CBOR byte strings.
fn cbor_head(major: u8, len: usize, out: &mut Vec<u8>) {
    let m = major << 5;
    match len {
        0..=23 => out.push(m | len as u8),
        24..=0xff => out.extend_from_slice(&[m | 24, len as u8]),
        0x100..=0xffff => {
            out.push(m | 25);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.push(m | 26);
            out.extend_from_slice(&(len as u32).to_be_bytes());
        }
    }
}
fn cbor_text(s: &str, out: &mut Vec<u8>) {
    cbor_head(3, s.len(), out);
    out.extend_from_slice(s.as_bytes());
}
fn cbor_bytes(b: &[u8], as_ints: bool, out: &mut Vec<u8>) {
    if as_ints {
        cbor_head(4, b.len(), out);
        for &x in b {
            cbor_head(0, usize::from(x), out);
        }
    } else {
        cbor_head(2, b.len(), out);
        out.extend_from_slice(b);
    }
}
fn signature_section(cert_pem: &[u8], cose: &[u8], as_ints: bool) -> Vec<u8> {
    let mut out = vec![0x81, 0xa2];
    cbor_text("signing_certificate", &mut out);
    cbor_bytes(cert_pem, as_ints, &mut out);
    cbor_text("signature", &mut out);
    cbor_bytes(cose, as_ints, &mut out);
    out
}

// ------------------------------------------------------------ fixtures

const KERNEL: &[u8] = b"\x7fELF pretend bzImage \x00\x01\x02";
const CMDLINE: &[u8] = b"reboot=k panic=30 pci=off nomodules console=ttyS0";
const BOOTSTRAP: &[u8] = b"070701 bootstrap initramfs (init, nsm driver)";
const APP: &[u8] = b"070701 application initramfs (the docker image's layers)";
const APP2: &[u8] = b"070701 a second application ramdisk";
const COSE: &[u8] = &[0xd2, 0x84, 0x44, 0xa1, 0x01, 0x38, 0x22, 0xa0, 0x40, 0x40];

fn builder() -> EifBuilder {
    EifBuilder::new(KERNEL, CMDLINE)
        .metadata(br#"{"ImageName":"test"}"#)
        .ramdisk(BOOTSTRAP)
        .ramdisk(APP)
}

fn eif() -> Vec<u8> {
    builder().build().unwrap()
}

fn measured(eif: &[u8]) -> Result<Measurements, EifError> {
    measure(Cursor::new(eif))
}

fn err(eif: &[u8]) -> EifError {
    measured(eif).expect_err("this EIF must be refused")
}

struct Signer {
    pem: String,
    der: Vec<u8>,
}

fn signer() -> Signer {
    let key =
        rcgen::generate_simple_self_signed(vec!["enclave-signer.example".to_owned()]).unwrap();
    Signer {
        pem: key.cert.pem(),
        der: key.cert.der().to_vec(),
    }
}

// ------------------------------------------------------------ the builder against the format

#[test]
fn builder_writes_the_documented_layout() {
    let eif = eif();
    assert_eq!(&eif[0..4], b".eif");
    assert_eq!(be16(&eif, 4), 4, "version");
    assert_eq!(be16(&eif, 6), 0, "flags: x86_64");
    assert_eq!(be16(&eif, COUNT), 5);
    // kernel, cmdline, metadata, ramdisks, in that order, contiguous from 548.
    let expected: [(u16, &[u8]); 5] = [
        (1, KERNEL),
        (2, CMDLINE),
        (5, br#"{"ImageName":"test"}"#),
        (3, BOOTSTRAP),
        (3, APP),
    ];
    let mut at = 548usize;
    for (i, (code, data)) in expected.iter().enumerate() {
        assert_eq!(offset_of(&eif, i), at, "offset of section {i}");
        assert_eq!(be64(&eif, SIZES + 8 * i) as usize, data.len());
        assert_eq!(be16(&eif, at), *code, "type of section {i}");
        assert_eq!(be16(&eif, at + 2), 0, "flags of section {i}");
        assert_eq!(be64(&eif, at + 4) as usize, data.len());
        assert_eq!(&eif[at + 12..at + 12 + data.len()], *data);
        at += 12 + data.len();
    }
    assert_eq!(at, eif.len());
    for i in 5..32 {
        assert_eq!(offset_of(&eif, i), 0);
        assert_eq!(be64(&eif, SIZES + 8 * i), 0);
    }
    assert_eq!(be32(&eif, 540), 0, "unused");
    let mut covered = eif[..CRC].to_vec();
    covered.extend_from_slice(&eif[CRC + 4..]);
    assert_eq!(be32(&eif, CRC), reference_crc32(&covered));
}

#[test]
fn crc_implementations_agree_on_the_check_value() {
    // The CRC-32 check value of "123456789".
    assert_eq!(reference_crc32(b"123456789"), 0xCBF4_3926);
    let mut h = crc32fast::Hasher::new();
    h.update(b"123456789");
    assert_eq!(h.finalize(), 0xCBF4_3926);
}

// ------------------------------------------------------------ PCRs

#[test]
fn pcrs_match_the_independent_computation() {
    let m = measured(&eif()).unwrap();
    assert_eq!(m.pcr0, reference_pcr(&[KERNEL, CMDLINE, BOOTSTRAP, APP]));
    assert_eq!(m.pcr1, reference_pcr(&[KERNEL, CMDLINE, BOOTSTRAP]));
    assert_eq!(m.pcr2, reference_pcr(&[APP]));
    assert_eq!(m.pcr8, None);
    assert!(!m.is_signed());
    assert_eq!(m.version, 4);
    let kinds: Vec<SectionType> = m.sections.iter().map(|s| s.kind).collect();
    assert_eq!(
        kinds,
        [
            SectionType::Kernel,
            SectionType::Cmdline,
            SectionType::Metadata,
            SectionType::Ramdisk,
            SectionType::Ramdisk
        ]
    );
}

#[test]
fn pcr2_covers_every_ramdisk_after_the_first_and_is_empty_without_one() {
    let three = builder().ramdisk(APP2).build().unwrap();
    let m = measured(&three).unwrap();
    assert_eq!(
        m.pcr0,
        reference_pcr(&[KERNEL, CMDLINE, BOOTSTRAP, APP, APP2])
    );
    assert_eq!(m.pcr1, reference_pcr(&[KERNEL, CMDLINE, BOOTSTRAP]));
    assert_eq!(m.pcr2, reference_pcr(&[APP, APP2]));

    let one = EifBuilder::new(KERNEL, CMDLINE)
        .ramdisk(BOOTSTRAP)
        .build()
        .unwrap();
    let m = measured(&one).unwrap();
    assert_eq!(m.pcr0, m.pcr1);
    assert_eq!(m.pcr2, reference_pcr(&[]));
}

#[test]
fn a_kernel_byte_changes_pcr0_and_pcr1_only() {
    let base = measured(&eif()).unwrap();
    let mut kernel = KERNEL.to_vec();
    kernel[3] ^= 0x01;
    let changed = EifBuilder::new(&kernel, CMDLINE)
        .metadata(br#"{"ImageName":"test"}"#)
        .ramdisk(BOOTSTRAP)
        .ramdisk(APP)
        .build()
        .unwrap();
    let m = measured(&changed).unwrap();
    assert_ne!(m.pcr0, base.pcr0);
    assert_ne!(m.pcr1, base.pcr1);
    assert_eq!(m.pcr2, base.pcr2);
}

#[test]
fn the_command_line_and_bootstrap_are_in_pcr0_and_pcr1_only() {
    let base = measured(&eif()).unwrap();
    let cmdline = EifBuilder::new(KERNEL, b"console=ttyS1")
        .ramdisk(BOOTSTRAP)
        .ramdisk(APP)
        .build()
        .unwrap();
    let m = measured(&cmdline).unwrap();
    assert_ne!(m.pcr0, base.pcr0);
    assert_ne!(m.pcr1, base.pcr1);
    assert_eq!(m.pcr2, base.pcr2);

    let bootstrap = EifBuilder::new(KERNEL, CMDLINE)
        .ramdisk(b"another bootstrap")
        .ramdisk(APP)
        .build()
        .unwrap();
    let m = measured(&bootstrap).unwrap();
    assert_ne!(m.pcr0, base.pcr0);
    assert_ne!(m.pcr1, base.pcr1);
    assert_eq!(m.pcr2, base.pcr2);
}

#[test]
fn an_application_byte_changes_pcr0_and_pcr2_only() {
    let base = measured(&eif()).unwrap();
    let mut app = APP.to_vec();
    *app.last_mut().unwrap() ^= 0x80;
    let changed = EifBuilder::new(KERNEL, CMDLINE)
        .metadata(br#"{"ImageName":"test"}"#)
        .ramdisk(BOOTSTRAP)
        .ramdisk(&app)
        .build()
        .unwrap();
    let m = measured(&changed).unwrap();
    assert_ne!(m.pcr0, base.pcr0);
    assert_eq!(m.pcr1, base.pcr1);
    assert_ne!(m.pcr2, base.pcr2);
}

#[test]
fn metadata_version_and_flags_are_not_measured() {
    let base = measured(&eif()).unwrap();
    let other = EifBuilder::new(KERNEL, CMDLINE)
        .metadata(br#"{"ImageName":"renamed","BuildTime":"later"}"#)
        .ramdisk(BOOTSTRAP)
        .ramdisk(APP)
        .version(3)
        .flags(FLAG_ARM64)
        .build()
        .unwrap();
    let m = measured(&other).unwrap();
    assert_eq!((m.pcr0, m.pcr1, m.pcr2), (base.pcr0, base.pcr1, base.pcr2));
    assert_eq!((m.version, m.flags), (3, FLAG_ARM64));
    let without = EifBuilder::new(KERNEL, CMDLINE)
        .ramdisk(BOOTSTRAP)
        .ramdisk(APP)
        .build()
        .unwrap();
    assert_eq!(measured(&without).unwrap().pcr0, base.pcr0);
}

#[test]
fn a_signed_image_has_pcr8_of_the_certificate_and_the_same_pcr0_to_2() {
    let signer = signer();
    let unsigned = measured(&eif()).unwrap();
    let signed = builder()
        .signature(signer.pem.as_bytes(), COSE)
        .unwrap()
        .build()
        .unwrap();
    let m = measured(&signed).unwrap();
    assert_eq!(m.pcr8, Some(reference_pcr(&[&signer.der])));
    assert!(m.is_signed());
    assert_eq!(
        (m.pcr0, m.pcr1, m.pcr2),
        (unsigned.pcr0, unsigned.pcr1, unsigned.pcr2)
    );
    assert_eq!(m.sections.last().unwrap().kind, SectionType::Signature);
}

#[test]
fn the_signature_section_is_the_serde_style_cbor_and_byte_strings_are_read_too() {
    let signer = signer();
    let signed = builder()
        .signature(signer.pem.as_bytes(), COSE)
        .unwrap()
        .build()
        .unwrap();
    // The builder's section is exactly the hand-encoded one.
    let last = offset_of(&signed, 5);
    assert_eq!(be16(&signed, last), 4);
    assert_eq!(
        &signed[last + 12..],
        signature_section(signer.pem.as_bytes(), COSE, true).as_slice()
    );
    // The same certificate as CBOR byte strings gives the same PCR8.
    let section = signature_section(signer.pem.as_bytes(), COSE, false);
    let b = builder();
    let mut sections = b.sections();
    sections.push((SectionType::Signature, &section));
    let eif = b.build_with_sections(&sections).unwrap();
    assert_eq!(
        measured(&eif).unwrap().pcr8,
        Some(reference_pcr(&[&signer.der]))
    );
    // Text around the PEM block does not matter; only the DER is measured.
    let noisy = format!("Certificate:\n  subject: enclave signer\n{}", signer.pem);
    let eif = builder()
        .signature(noisy.as_bytes(), COSE)
        .unwrap()
        .build()
        .unwrap();
    assert_eq!(
        measured(&eif).unwrap().pcr8,
        Some(reference_pcr(&[&signer.der]))
    );
}

// ------------------------------------------------------------ known answers

/// Images written by the reference implementation; see `tests/vectors/README.md`.
#[test]
fn reference_vectors() {
    const PCR0: &str = "98d898cc6dffce3d2c676e68f204297a2328410b89090afe2a151492ab48e3400e9e7aaa4d37611db0f7c91159764f9e";
    const PCR1: &str = "de7f1019e55acf21774ab1fb9f5ad279f3aed6e40d1219af560216de7653ab9fda3d10d367d48563a84e08bff7f69f15";
    const PCR2: &str = "857475dd5d7ad58a45d51a2bf35160874b8e8ee1b10f9c6bec119d5759800e8f95fc151cfec8f10752c80f05bafbe247";
    const PCR8: &str = "375e97bf321ab20ab952353c85b3b632bc5d7be9dd55de19c5ef7ef227a49b6f0c55df2dabb2ead56023249f17b80d19";
    let (kernel, cmdline, bootstrap, app): (&[u8], &[u8], &[u8], &[u8]) = (
        b"reference kernel bytes",
        b"console=ttyS0",
        b"reference bootstrap ramdisk",
        b"reference application ramdisk",
    );
    // The description's formula gives the reference builder's values...
    assert_eq!(
        hex::encode(reference_pcr(&[kernel, cmdline, bootstrap, app])),
        PCR0
    );
    assert_eq!(
        hex::encode(reference_pcr(&[kernel, cmdline, bootstrap])),
        PCR1
    );
    assert_eq!(hex::encode(reference_pcr(&[app])), PCR2);

    // ...and so does the reader, for both files.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors");
    let unsigned = std::fs::read(dir.join("reference-unsigned.eif")).unwrap();
    let m = measured(&unsigned).unwrap();
    assert_eq!(
        (
            hex::encode(m.pcr0),
            hex::encode(m.pcr1),
            hex::encode(m.pcr2)
        ),
        (PCR0.to_owned(), PCR1.to_owned(), PCR2.to_owned())
    );
    assert_eq!(m.pcr8, None);
    let signed = std::fs::read(dir.join("reference-signed.eif")).unwrap();
    let m = measured(&signed).unwrap();
    assert_eq!(hex::encode(m.pcr0), PCR0);
    assert_eq!(hex::encode(m.pcr8.unwrap()), PCR8);
    let kinds: Vec<SectionType> = m.sections.iter().map(|s| s.kind).collect();
    assert_eq!(
        kinds,
        [
            SectionType::Kernel,
            SectionType::Cmdline,
            SectionType::Metadata,
            SectionType::Ramdisk,
            SectionType::Ramdisk,
            SectionType::Signature
        ]
    );

    // Our builder, given the same sections, writes a byte-identical file.
    let section = |i: usize| {
        let at = offset_of(&signed, i);
        let len = be64(&signed, at + 4) as usize;
        signed[at + 12..at + 12 + len].to_vec()
    };
    let b = EifBuilder::new(kernel, cmdline);
    let rebuilt = b
        .build_with_sections(&[
            (SectionType::Kernel, kernel),
            (SectionType::Cmdline, cmdline),
            (SectionType::Metadata, &section(2)),
            (SectionType::Ramdisk, bootstrap),
            (SectionType::Ramdisk, app),
            (SectionType::Signature, &section(5)),
        ])
        .unwrap();
    assert_eq!(rebuilt, signed);
}

// ------------------------------------------------------------ the policy fragment

#[test]
fn the_policy_fragment_has_the_verifier_format() {
    let m = measured(&eif()).unwrap();
    let text = m.policy_fragment("enclave-v1").unwrap();
    let expected = format!(
        "[[measurements]]\nname = \"enclave-v1\"\npcr0 = \"{}\"\npcr1 = \"{}\"\npcr2 = \"{}\"\n",
        hex::encode(m.pcr0),
        hex::encode(m.pcr1),
        hex::encode(m.pcr2)
    );
    assert_eq!(text, expected);

    let signer = signer();
    let signed = builder()
        .signature(signer.pem.as_bytes(), COSE)
        .unwrap()
        .build()
        .unwrap();
    let m = measured(&signed).unwrap();
    let text = m.policy_fragment("signed \"v2\" \\ prod").unwrap();
    let parsed: toml::Value = toml::from_str(&text).unwrap();
    let set = &parsed["measurements"][0];
    assert_eq!(set["name"].as_str(), Some("signed \"v2\" \\ prod"));
    assert_eq!(
        set["pcr8"].as_str(),
        Some(hex::encode(m.pcr8.unwrap()).as_str())
    );
    assert_eq!(set["pcr0"].as_str().unwrap().len(), 96);
    assert_eq!(set.as_table().unwrap().len(), 5);
}

#[test]
fn policy_fragment_names_follow_the_policy_rules() {
    let m = measured(&eif()).unwrap();
    for bad in ["", "tab\there", "new\nline", &"x".repeat(129)] {
        let e = m.policy_fragment(bad).unwrap_err();
        assert_eq!(e.name, bad);
    }
    assert!(m.policy_fragment(&"x".repeat(128)).is_ok());
    assert!(m.policy_fragment("ünïcode ✓").is_ok());
}

// ------------------------------------------------------------ refusals, one error each

#[test]
fn a_short_file_is_a_truncated_header() {
    for len in [0, 1, 4, 547] {
        let e = err(&eif()[..len]);
        assert!(
            matches!(e, EifError::HeaderTruncated { len: l } if l == len as u64),
            "{e}"
        );
    }
}

#[test]
fn bad_magic() {
    let mut eif = eif();
    eif[1] = b'E';
    fix_crc(&mut eif);
    assert!(matches!(err(&eif), EifError::BadMagic { found } if &found == b".Eif"));
}

#[test]
fn bad_versions() {
    for version in [0u16, 1, 5, 0xffff] {
        let mut eif = eif();
        put16(&mut eif, 4, version);
        fix_crc(&mut eif);
        let e = err(&eif);
        assert!(
            matches!(e, EifError::UnsupportedVersion { found } if found == version),
            "{e}"
        );
    }
    for version in [2u16, 3, 4] {
        let eif = builder().version(version).build().unwrap();
        assert!(measured(&eif).is_ok());
    }
}

#[test]
fn too_many_sections() {
    let mut eif = eif();
    put16(&mut eif, COUNT, 33);
    fix_crc(&mut eif);
    assert!(matches!(err(&eif), EifError::TooManySections { found: 33 }));
    // The builder refuses too.
    let ramdisks = vec![(SectionType::Ramdisk, BOOTSTRAP); 33];
    assert!(matches!(
        builder().build_with_sections(&ramdisks),
        Err(EifError::TooManySections { found: 33 })
    ));
}

#[test]
fn a_section_out_of_the_file() {
    let mut eif = eif();
    let len = eif.len() as u64;
    put64(&mut eif, OFFSETS + 8 * 3, len + 100);
    fix_crc(&mut eif);
    let e = err(&eif);
    assert!(
        matches!(e, EifError::SectionOutOfFile { index: 3, .. }),
        "{e}"
    );
    // An offset and size that overflow 64 bits.
    let mut eif2 = self::eif();
    put64(&mut eif2, SIZES + 8 * 4, u64::MAX - 5);
    fix_crc(&mut eif2);
    let e = err(&eif2);
    assert!(
        matches!(e, EifError::SectionOutOfFile { index: 4, .. }),
        "{e}"
    );
}

#[test]
fn overlapping_sections() {
    // Section 2 pointed back into section 1.
    let mut eif = eif();
    let o = offset_of(&eif, 2) as u64;
    put64(&mut eif, OFFSETS + 16, o - 4);
    fix_crc(&mut eif);
    let e = err(&eif);
    assert!(
        matches!(e, EifError::SectionOverlap { index: 2, .. }),
        "{e}"
    );
    // The first section inside the header.
    let mut eif = self::eif();
    put64(&mut eif, OFFSETS, 0);
    fix_crc(&mut eif);
    let e = err(&eif);
    assert!(
        matches!(
            e,
            EifError::SectionOverlap {
                index: 0,
                offset: 0,
                previous_end: 548
            }
        ),
        "{e}"
    );
    // A size that runs into the next section.
    let mut eif = self::eif();
    let s = be64(&eif, SIZES);
    put64(&mut eif, SIZES, s + 1);
    fix_crc(&mut eif);
    let e = err(&eif);
    assert!(
        matches!(e, EifError::SectionOverlap { index: 1, .. }),
        "{e}"
    );
}

#[test]
fn a_gap_between_sections() {
    let mut eif = eif();
    let s = be64(&eif, SIZES + 8 * 2);
    put64(&mut eif, SIZES + 8 * 2, s - 1);
    fix_crc(&mut eif);
    let e = err(&eif);
    assert!(matches!(e, EifError::SectionGap { index: 3, .. }), "{e}");
}

#[test]
fn a_truncated_file() {
    let full = eif();
    let cut = &full[..full.len() - 5];
    let e = err(cut);
    assert!(
        matches!(e, EifError::Truncated { index: 4, file_len, .. } if file_len == cut.len() as u64),
        "{e}"
    );
}

#[test]
fn trailing_bytes() {
    let mut eif = eif();
    eif.extend_from_slice(b"extra");
    fix_crc(&mut eif);
    assert!(matches!(err(&eif), EifError::TrailingData { .. }));
}

#[test]
fn a_bad_crc() {
    let mut eif = eif();
    let at = offset_of(&eif, 0) + 12;
    eif[at] ^= 0x01; // one kernel byte
    let e = err(&eif);
    assert!(matches!(e, EifError::CrcMismatch { .. }), "{e}");
    let mut eif = self::eif();
    eif[CRC + 3] ^= 0x01; // the CRC itself
    assert!(matches!(err(&eif), EifError::CrcMismatch { .. }));
    let mut eif = self::eif();
    eif[540] = 1; // the unused field is covered too
    assert!(matches!(err(&eif), EifError::CrcMismatch { .. }));
}

#[test]
fn invalid_and_unknown_section_types() {
    for code in [0u16, 6, 0xffff] {
        let mut eif = eif();
        let at = offset_of(&eif, 3);
        put16(&mut eif, at, code);
        fix_crc(&mut eif);
        let e = err(&eif);
        assert!(
            matches!(e, EifError::BadSectionType { index: 3, code: c } if c == code),
            "{e}"
        );
    }
}

#[test]
fn a_section_header_that_disagrees_with_the_table() {
    let mut eif = eif();
    let at = offset_of(&eif, 1);
    let size = be64(&eif, at + 4);
    put64(&mut eif, at + 4, size + 1);
    fix_crc(&mut eif);
    let e = err(&eif);
    assert!(
        matches!(e, EifError::SectionSizeMismatch { index: 1, .. }),
        "{e}"
    );
}

#[test]
fn missing_and_duplicate_sections() {
    let b = builder();
    type Sections<'a> = Vec<(SectionType, &'a [u8])>;
    let cases: Vec<(Sections, &str)> = vec![
        (
            vec![
                (SectionType::Cmdline, CMDLINE),
                (SectionType::Ramdisk, BOOTSTRAP),
            ],
            "missing kernel",
        ),
        (
            vec![
                (SectionType::Kernel, KERNEL),
                (SectionType::Ramdisk, BOOTSTRAP),
            ],
            "missing cmdline",
        ),
        (
            vec![
                (SectionType::Kernel, KERNEL),
                (SectionType::Cmdline, CMDLINE),
            ],
            "missing ramdisk",
        ),
        (vec![], "missing kernel"),
        (
            vec![
                (SectionType::Kernel, KERNEL),
                (SectionType::Cmdline, CMDLINE),
                (SectionType::Kernel, KERNEL),
                (SectionType::Ramdisk, BOOTSTRAP),
            ],
            "duplicate kernel 2",
        ),
        (
            vec![
                (SectionType::Kernel, KERNEL),
                (SectionType::Cmdline, CMDLINE),
                (SectionType::Ramdisk, BOOTSTRAP),
                (SectionType::Metadata, b"{}"),
                (SectionType::Metadata, b"{}"),
            ],
            "duplicate metadata 4",
        ),
    ];
    for (sections, expected) in cases {
        let eif = b.build_with_sections(&sections).unwrap();
        let got = match err(&eif) {
            EifError::MissingSection { kind } => format!("missing {kind}"),
            EifError::DuplicateSection { kind, index } => format!("duplicate {kind} {index}"),
            other => panic!("{expected}: {other}"),
        };
        assert_eq!(got, expected);
    }
}

#[test]
fn bad_signature_sections() {
    let signer = signer();
    let pem = signer.pem.as_bytes();
    let mut trailing = signature_section(pem, COSE, true);
    trailing.push(0);
    let mut no_signature = vec![0x81, 0xa1];
    cbor_text("signing_certificate", &mut no_signature);
    cbor_bytes(pem, true, &mut no_signature);
    let mut out_of_range = vec![0x81, 0xa2];
    cbor_text("signing_certificate", &mut out_of_range);
    out_of_range.extend_from_slice(&[0x81, 0x19, 0x01, 0x00]); // [256]
    cbor_text("signature", &mut out_of_range);
    cbor_bytes(COSE, true, &mut out_of_range);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("not cbor", vec![0xff, 0x00]),
        ("empty", vec![]),
        ("empty array", vec![0x80]),
        ("not an array", vec![0xa0]),
        ("trailing", trailing),
        ("no signature", no_signature),
        ("out of range", out_of_range),
    ];
    let b = builder();
    for (what, section) in cases {
        let mut sections = b.sections();
        sections.push((SectionType::Signature, &section));
        let eif = b.build_with_sections(&sections).unwrap();
        let e = err(&eif);
        assert!(matches!(e, EifError::BadSignature { .. }), "{what}: {e}");
    }
}

#[test]
fn bad_signing_certificates() {
    let signer = signer();
    let key_pem = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
    let not_x509 = "-----BEGIN CERTIFICATE-----\nAAECAwQ=\n-----END CERTIFICATE-----\n";
    let mut long_der = signer.der.clone();
    long_der.push(0);
    let trailing = pem::encode(&pem::Pem::new("CERTIFICATE", long_der));
    for (what, cert) in [
        ("not pem", "just text".to_owned()),
        ("a key", key_pem.to_owned()),
        ("not x509", not_x509.to_owned()),
        ("trailing", trailing),
    ] {
        let eif = builder()
            .signature(cert.as_bytes(), COSE)
            .unwrap()
            .build()
            .unwrap();
        let e = err(&eif);
        assert!(matches!(e, EifError::BadCertificate { .. }), "{what}: {e}");
    }
}

/// A file of `len` bytes whose first bytes are `prefix` and the rest zeros,
/// generated on the fly: a huge file that costs nothing.
struct Virtual {
    prefix: Vec<u8>,
    len: u64,
    pos: u64,
    read: u64,
}

impl Read for Virtual {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.len.saturating_sub(self.pos);
        let n = (buf.len() as u64).min(left) as usize;
        for (i, b) in buf[..n].iter_mut().enumerate() {
            let at = self.pos as usize + i;
            *b = self.prefix.get(at).copied().unwrap_or(0);
        }
        self.pos += n as u64;
        self.read += n as u64;
        Ok(n)
    }
}

impl Seek for Virtual {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        self.pos = match to {
            SeekFrom::Start(p) => p,
            SeekFrom::End(d) => self.len.checked_add_signed(d).unwrap(),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d).unwrap(),
        };
        Ok(self.pos)
    }
}

#[test]
fn a_huge_signature_section_is_refused_before_it_is_read() {
    let b = builder();
    let mut sections = b.sections();
    sections.push((SectionType::Signature, b""));
    let mut prefix = b.build_with_sections(&sections).unwrap();
    let sig_at = offset_of(&prefix, 5);
    let huge = 1u64 << 40;
    put64(&mut prefix, SIZES + 8 * 5, huge);
    put64(&mut prefix, sig_at + 4, huge);
    let len = prefix.len() as u64 + huge;
    let mut file = Virtual {
        prefix,
        len,
        pos: 0,
        read: 0,
    };
    let e = measure(&mut file).unwrap_err();
    assert!(
        matches!(e, EifError::SignatureTooLarge { size, .. } if size == huge),
        "{e}"
    );
    assert!(file.read < 2048, "read {} bytes", file.read);
}

/// A reader whose length (as `seek(End)` tells it) is not what it returns.
struct Lying {
    data: Vec<u8>,
    claimed_len: u64,
    pos: u64,
}

impl Read for Lying {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let start = (self.pos as usize).min(self.data.len());
        let n = buf.len().min(self.data.len() - start);
        buf[..n].copy_from_slice(&self.data[start..start + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for Lying {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        self.pos = match to {
            SeekFrom::Start(p) => p,
            SeekFrom::End(d) => self.claimed_len.checked_add_signed(d).unwrap(),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d).unwrap(),
        };
        Ok(self.pos)
    }
}

#[test]
fn a_file_that_changes_length_while_read_is_reported() {
    let full = eif();
    let shrunk = Lying {
        data: full[..full.len() - 3].to_vec(),
        claimed_len: full.len() as u64,
        pos: 0,
    };
    let e = measure(shrunk).unwrap_err();
    assert!(matches!(e, EifError::Changed { .. }), "{e}");
    let mut longer = full.clone();
    longer.extend_from_slice(b"more");
    let grown = Lying {
        data: longer,
        claimed_len: full.len() as u64,
        pos: 0,
    };
    let e = measure(grown).unwrap_err();
    assert!(matches!(e, EifError::Changed { .. }), "{e}");
}

#[test]
fn sections_larger_than_a_read_chunk() {
    let kernel: Vec<u8> = (0..300_001u32).map(|i| (i % 251) as u8).collect();
    let app: Vec<u8> = (0..140_000u32).map(|i| (i % 13) as u8).collect();
    let eif = EifBuilder::new(&kernel, CMDLINE)
        .ramdisk(BOOTSTRAP)
        .ramdisk(&app)
        .build()
        .unwrap();
    let m = measured(&eif).unwrap();
    assert_eq!(m.pcr0, reference_pcr(&[&kernel, CMDLINE, BOOTSTRAP, &app]));
    assert_eq!(m.pcr1, reference_pcr(&[&kernel, CMDLINE, BOOTSTRAP]));
    assert_eq!(m.pcr2, reference_pcr(&[&app]));
}

#[test]
fn measuring_starts_at_the_beginning_whatever_the_position() {
    let eif = eif();
    let mut cursor = Cursor::new(&eif);
    cursor.seek(SeekFrom::Start(100)).unwrap();
    assert_eq!(measure(cursor).unwrap(), measured(&eif).unwrap());
}

// ------------------------------------------------------------ no panics

fn signed_eif() -> Vec<u8> {
    static SIGNED: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    SIGNED
        .get_or_init(|| {
            let signer = signer();
            builder()
                .signature(signer.pem.as_bytes(), COSE)
                .unwrap()
                .build()
                .unwrap()
        })
        .clone()
}

#[test]
fn every_truncation_is_an_error() {
    let full = signed_eif();
    for len in 0..full.len() {
        let e = err(&full[..len]);
        assert!(!e.to_string().is_empty());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any corruption of a valid signed image (a few bytes changed, a CRC
    /// fixed up or not) gives measurements or a typed error, never a panic.
    #[test]
    fn corruptions_never_panic(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        fix in any::<bool>(),
    ) {
        let mut eif = signed_eif();
        for (at, byte) in &edits {
            let i = at.index(eif.len());
            eif[i] = *byte;
        }
        if fix {
            fix_crc(&mut eif);
        }
        match measured(&eif) {
            Ok(m) => prop_assert_eq!(m.pcr0.len(), 48),
            Err(e) => prop_assert!(!e.kind().is_empty()),
        }
    }

    /// Arbitrary bytes behind a valid magic and version never panic.
    #[test]
    fn arbitrary_bytes_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let mut file = b".eif\x00\x04".to_vec();
        file.extend_from_slice(&tail);
        let _ = measured(&file);
    }
}
