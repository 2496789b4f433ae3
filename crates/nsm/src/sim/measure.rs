//! PCR arithmetic and the simulator's stand-in for enclave image measurement.

use aws_lc_rs::digest::{self, SHA384};

use crate::PCR_LEN;

/// A PCR value that has never been extended.
pub const ZERO_PCR: [u8; PCR_LEN] = [0; PCR_LEN];

/// `SHA-384(old || data)`: what `ExtendPCR` does to a PCR.
pub fn extend(old: &[u8; PCR_LEN], data: &[u8]) -> [u8; PCR_LEN] {
    let mut context = digest::Context::new(&SHA384);
    context.update(old);
    context.update(data);
    to_pcr(context.finish().as_ref())
}

fn to_pcr(digest: &[u8]) -> [u8; PCR_LEN] {
    let mut pcr = ZERO_PCR;
    for (out, byte) in pcr.iter_mut().zip(digest) {
        *out = *byte;
    }
    pcr
}

fn labelled_hash(label: &[u8], data: &[u8]) -> [u8; PCR_LEN] {
    let mut context = digest::Context::new(&SHA384);
    context.update(label);
    context.update(data);
    to_pcr(context.finish().as_ref())
}

/// Label of each simulated image measurement: PCR0, PCR1, PCR2.
const IMAGE_LABELS: [&[u8]; 3] = [
    b"kluis-nsm-sim/pcr0/enclave-image\0",
    b"kluis-nsm-sim/pcr1/kernel-and-bootstrap\0",
    b"kluis-nsm-sim/pcr2/application\0",
];

/// PCR0, PCR1 and PCR2 the simulator reports for an enclave "image" (any bytes).
///
/// A real enclave measures distinct parts of its EIF into these PCRs; the
/// simulator derives all three from the whole image, each with its own label,
/// so they differ from each other but change together:
/// `PCRi = SHA-384(0^48 || SHA-384(label_i || image))`.
pub fn image_pcrs(image: &[u8]) -> [[u8; PCR_LEN]; 3] {
    IMAGE_LABELS.map(|label| extend(&ZERO_PCR, &labelled_hash(label, image)))
}

/// PCR8 for an image signed with the given signing certificate (DER), as the
/// real module computes it: `SHA-384(0^48 || SHA-384(certificate))`.
pub fn signer_pcr(signing_certificate: &[u8]) -> [u8; PCR_LEN] {
    extend(&ZERO_PCR, &labelled_hash(b"", signing_certificate))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_pcrs_are_deterministic_distinct_and_image_bound() {
        let a = image_pcrs(b"image a");
        assert_eq!(a, image_pcrs(b"image a"));
        assert_ne!(a, image_pcrs(b"image b"));
        assert_ne!(a[0], a[1]);
        assert_ne!(a[1], a[2]);
        assert!(a.iter().all(|pcr| *pcr != ZERO_PCR));
    }

    #[test]
    fn signer_pcr_is_extend_of_certificate_hash() {
        let cert_hash = digest::digest(&SHA384, b"cert");
        let mut manual = vec![0u8; 48];
        manual.extend_from_slice(cert_hash.as_ref());
        assert_eq!(
            signer_pcr(b"cert").as_slice(),
            digest::digest(&SHA384, &manual).as_ref()
        );
    }
}
