//! The signature section: a CBOR array of PCR signatures, each a map
//! `{"signing_certificate": <PEM bytes>, "signature": <COSE_Sign1 bytes>}`.
//!
//! The reference tooling writes it with serde's default encoding of a
//! `Vec<PcrSignature>` whose fields are `Vec<u8>`: the byte strings come out
//! as CBOR *arrays of unsigned integers*, not CBOR byte strings. Both forms
//! are read here. Only the first entry's certificate is measured (PCR8),
//! which is what the reference reader does; the COSE signature is not
//! verified here (the Nitro tooling checks it when an enclave is started).

use crate::error::EifError;
use ciborium::value::Value;
use std::io::Cursor;

/// Most PCR signatures a signature section may list.
const MAX_ENTRIES: usize = 32;
const CERTIFICATE_KEY: &str = "signing_certificate";
const SIGNATURE_KEY: &str = "signature";

fn bad(reason: impl Into<String>) -> EifError {
    EifError::BadSignature {
        reason: reason.into(),
    }
}

/// Encodes a signature section with one entry, the way the reference
/// tooling does (byte strings as arrays of integers).
pub(crate) fn encode_section(
    certificate_pem: &[u8],
    cose_sign1: &[u8],
) -> Result<Vec<u8>, EifError> {
    let as_ints = |bytes: &[u8]| Value::Array(bytes.iter().map(|&b| Value::from(b)).collect());
    let entry = Value::Map(vec![
        (
            Value::Text(CERTIFICATE_KEY.to_owned()),
            as_ints(certificate_pem),
        ),
        (Value::Text(SIGNATURE_KEY.to_owned()), as_ints(cose_sign1)),
    ]);
    let mut out = Vec::new();
    ciborium::ser::into_writer(&Value::Array(vec![entry]), &mut out)
        .map_err(|e| bad(format!("encoding: {e}")))?;
    Ok(out)
}

/// A byte string given either as a CBOR byte string or as an array of
/// integers 0..=255.
fn bytes_of(value: &Value, field: &str) -> Result<Vec<u8>, EifError> {
    match value {
        Value::Bytes(b) => Ok(b.clone()),
        Value::Array(items) => items
            .iter()
            .map(|item| {
                item.as_integer()
                    .and_then(|i| u8::try_from(i).ok())
                    .ok_or_else(|| bad(format!("{field} holds something other than bytes")))
            })
            .collect(),
        _ => Err(bad(format!(
            "{field} is neither a byte string nor an array of bytes"
        ))),
    }
}

/// The DER of the signing certificate of the first PCR signature.
pub(crate) fn signing_certificate_der(section: &[u8]) -> Result<Vec<u8>, EifError> {
    let mut cursor = Cursor::new(section);
    let value: Value =
        ciborium::de::from_reader(&mut cursor).map_err(|e| bad(format!("not CBOR: {e}")))?;
    if usize::try_from(cursor.position()).ok() != Some(section.len()) {
        return Err(bad("trailing bytes after the CBOR value"));
    }
    let Value::Array(entries) = value else {
        return Err(bad("not an array of PCR signatures"));
    };
    if entries.len() > MAX_ENTRIES {
        return Err(bad(format!(
            "{} PCR signatures, at most {MAX_ENTRIES} are accepted",
            entries.len()
        )));
    }
    let Some(first) = entries.first() else {
        return Err(bad("the array of PCR signatures is empty"));
    };
    let Value::Map(fields) = first else {
        return Err(bad("the first PCR signature is not a map"));
    };
    let mut certificate = None;
    let mut signature = None;
    for (key, value) in fields {
        let slot = match key.as_text() {
            Some(CERTIFICATE_KEY) => &mut certificate,
            Some(SIGNATURE_KEY) => &mut signature,
            // Unknown fields are ignored, as the reference reader does.
            _ => continue,
        };
        if slot.is_some() {
            return Err(bad(format!("field {key:?} appears twice")));
        }
        *slot = Some(value);
    }
    let certificate = certificate.ok_or_else(|| bad(format!("no {CERTIFICATE_KEY} field")))?;
    let signature = signature.ok_or_else(|| bad(format!("no {SIGNATURE_KEY} field")))?;
    bytes_of(signature, SIGNATURE_KEY)?;
    certificate_der(&bytes_of(certificate, CERTIFICATE_KEY)?)
}

/// The first PEM certificate block, decoded, checked to be one X.509
/// certificate in DER with nothing after it.
fn certificate_der(pem_bytes: &[u8]) -> Result<Vec<u8>, EifError> {
    let bad_cert = |reason: String| EifError::BadCertificate { reason };
    let blocks = pem::parse_many(pem_bytes).map_err(|e| bad_cert(format!("not PEM: {e}")))?;
    let block = blocks
        .into_iter()
        .find(|b| matches!(b.tag(), "CERTIFICATE" | "X509 CERTIFICATE"))
        .ok_or_else(|| bad_cert("no PEM CERTIFICATE block".to_owned()))?;
    let der = block.into_contents();
    match x509_parser::parse_x509_certificate(&der) {
        Ok(([], _)) => Ok(der),
        Ok(_) => Err(bad_cert(
            "trailing bytes after the certificate's DER".to_owned(),
        )),
        Err(e) => Err(bad_cert(format!("not an X.509 certificate: {e}"))),
    }
}
