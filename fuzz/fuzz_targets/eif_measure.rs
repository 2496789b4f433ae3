//! Any bytes as an enclave image file: measurements or a typed error, never a
//! panic, a hang or an allocation sized by the input's claims. And whatever is
//! measured has the PCRs of an independent reading of the format: the section
//! table walked here, PCR = SHA-384(48 zero bytes || SHA-384(data)), with PCR0
//! over the kernel, command line and every ramdisk, PCR1 over the kernel,
//! command line and first ramdisk, PCR2 over the other ramdisks, in file order.
#![no_main]

use sha2::{Digest, Sha384};

fn be(data: &[u8], at: usize, len: usize) -> u64 {
    data[at..at + len].iter().fold(0, |acc, b| (acc << 8) | u64::from(*b))
}

fn pcr(parts: &[&[u8]]) -> [u8; 48] {
    let mut inner = Sha384::new();
    for part in parts {
        inner.update(part);
    }
    let mut outer = Sha384::new();
    outer.update([0u8; 48]);
    outer.update(inner.finalize());
    outer.finalize().into()
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(m) = kluis_eif::measure(std::io::Cursor::new(data)) else {
        return;
    };
    let count = be(data, 26, 2) as usize;
    let (mut all, mut boot, mut app) = (Vec::new(), Vec::new(), Vec::new());
    let mut ramdisks = 0;
    for i in 0..count {
        let offset = be(data, 28 + 8 * i, 8) as usize;
        let size = be(data, 284 + 8 * i, 8) as usize;
        let body = &data[offset + 12..offset + 12 + size];
        match be(data, offset, 2) {
            1 | 2 => {
                all.push(body);
                boot.push(body);
            }
            3 => {
                all.push(body);
                if ramdisks == 0 {
                    boot.push(body);
                } else {
                    app.push(body);
                }
                ramdisks += 1;
            }
            _ => {}
        }
    }
    assert!(ramdisks >= 1, "measured without a ramdisk");
    assert_eq!(m.pcr0, pcr(&all), "PCR0");
    assert_eq!(m.pcr1, pcr(&boot), "PCR1");
    assert_eq!(m.pcr2, pcr(&app), "PCR2");
});
