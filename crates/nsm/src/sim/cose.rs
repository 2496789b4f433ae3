//! The COSE_Sign1 encoding the NSM uses (RFC 9052), as test tooling.
//!
//! The real module emits an *untagged* COSE_Sign1 array
//! `[protected, unprotected, payload, signature]` whose protected header is
//! the CBOR map `{1: -35}` (alg ES384), whose unprotected header is an empty
//! map, and whose signature is the 96-byte `r || s` of ECDSA P-384 SHA-384
//! over the `Sig_structure` built by [`sig_structure`].

use ciborium::Value;

use super::SimError;

/// The protected header of every NSM document: the CBOR map `{1: -35}`
/// (`alg: ES384`).
pub const PROTECTED_ES384: [u8; 4] = [0xa1, 0x01, 0x38, 0x22];

fn encode(value: &Value) -> Result<Vec<u8>, SimError> {
    let mut out = Vec::new();
    ciborium::into_writer(value, &mut out).map_err(|err| SimError::Cbor(err.to_string()))?;
    Ok(out)
}

/// The bytes that are signed: the CBOR array
/// `["Signature1", protected, h'' (no external AAD), payload]`.
pub fn sig_structure(protected: &[u8], payload: &[u8]) -> Result<Vec<u8>, SimError> {
    encode(&Value::Array(vec![
        Value::Text("Signature1".to_owned()),
        Value::Bytes(protected.to_vec()),
        Value::Bytes(Vec::new()),
        Value::Bytes(payload.to_vec()),
    ]))
}

/// Encodes an untagged COSE_Sign1 with an empty unprotected header.
pub fn encode_sign1(
    protected: &[u8],
    payload: &[u8],
    signature: &[u8],
) -> Result<Vec<u8>, SimError> {
    encode(&Value::Array(vec![
        Value::Bytes(protected.to_vec()),
        Value::Map(Vec::new()),
        Value::Bytes(payload.to_vec()),
        Value::Bytes(signature.to_vec()),
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protected_header_is_alg_es384() {
        let header: Value = ciborium::from_reader(PROTECTED_ES384.as_slice()).unwrap();
        assert_eq!(
            header,
            Value::Map(vec![(
                Value::Integer(1.into()),
                Value::Integer((-35).into())
            )])
        );
    }

    #[test]
    fn sig_structure_bytes() {
        let bytes = sig_structure(&PROTECTED_ES384, b"p").unwrap();
        let mut expected = vec![0x84, 0x6a];
        expected.extend_from_slice(b"Signature1");
        expected.extend_from_slice(&[0x44, 0xa1, 0x01, 0x38, 0x22, 0x40, 0x41, b'p']);
        assert_eq!(bytes, expected);
    }

    #[test]
    fn sign1_is_an_untagged_array_of_four() {
        let bytes = encode_sign1(&PROTECTED_ES384, b"p", &[0; 96]).unwrap();
        assert_eq!(
            bytes.get(..6),
            Some([0x84, 0x44, 0xa1, 0x01, 0x38, 0x22].as_slice())
        );
        assert_eq!(bytes.get(6), Some(&0xa0));
    }
}
