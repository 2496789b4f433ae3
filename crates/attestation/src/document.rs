//! The attestation document: the COSE_Sign1 payload, decoded and checked against
//! the AWS format, widened to what real Nitro Secure Modules emit.
//!
//! AWS documents `user_data` and `nonce` up to 512 bytes and `public_key` as
//! 1..=1024 bytes. Real documents show absent optional fields as CBOR null, empty
//! byte strings, and values up to 1024 bytes; all of that is accepted here.

use crate::cbor::{describe_key, type_name};
use crate::error::PayloadError;
use ciborium::value::Value;
use std::collections::BTreeMap;

/// Upper bound for `module_id` (AWS gives no bound; real ids are ~40 bytes).
pub const MAX_MODULE_ID_LEN: usize = 256;
/// Upper bound for one DER certificate, as AWS documents it.
pub const MAX_CERT_LEN: usize = 1024;
/// Upper bound for `public_key`, `user_data` and `nonce` each.
pub const MAX_OPTIONAL_FIELD_LEN: usize = 1024;
/// Highest PCR index plus one.
pub const PCR_COUNT: u8 = 32;

/// A parsed attestation document. Produced by parsing only; whether it can be
/// trusted is what [`crate::VerifiedAttestation`] says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttestationDocument {
    /// The enclave's module id, e.g. `i-0123…-enc0123…`.
    pub module_id: String,
    /// Always `"SHA384"` after parsing.
    pub digest: String,
    /// Milliseconds since the Unix epoch, as the NSM stated it.
    pub timestamp_ms: u64,
    /// PCR index to value.
    pub pcrs: BTreeMap<u8, Vec<u8>>,
    /// DER of the leaf (signing) certificate.
    pub certificate: Vec<u8>,
    /// DER of the CA bundle, root first.
    pub cabundle: Vec<Vec<u8>>,
    /// `None` when absent or null; `Some(empty)` when an empty byte string.
    pub public_key: Option<Vec<u8>>,
    /// `None` when absent or null; `Some(empty)` when an empty byte string.
    pub user_data: Option<Vec<u8>>,
    /// `None` when absent or null; `Some(empty)` when an empty byte string.
    pub nonce: Option<Vec<u8>>,
}

impl AttestationDocument {
    /// The value of PCR `index`, if the document carries it.
    pub fn pcr(&self, index: u8) -> Option<&[u8]> {
        self.pcrs.get(&index).map(Vec::as_slice)
    }

    /// True when PCR0, PCR1 and PCR2 are all zero: the NSM reports this for
    /// enclaves started in debug mode, whose memory the parent can read.
    /// Fails closed: a document that lacks any of the three counts as debug
    /// mode too, since nothing then proves which image runs.
    pub fn is_debug_mode(&self) -> bool {
        [0u8, 1, 2]
            .iter()
            .all(|i| self.pcrs.get(i).is_none_or(|v| v.iter().all(|&b| b == 0)))
    }

    /// Decode and check a payload that has already passed strict CBOR decoding.
    pub(crate) fn from_value(value: Value) -> Result<Self, PayloadError> {
        let Value::Map(entries) = value else {
            return Err(PayloadError::NotAMap {
                found: type_name(&value),
            });
        };
        let mut fields = Fields::default();
        for (key, value) in entries {
            let name = match &key {
                Value::Text(t) => t.as_str(),
                other => {
                    return Err(PayloadError::UnknownField {
                        field: describe_key(other),
                    })
                }
            };
            // Duplicates were rejected by the strict decoder.
            let slot = match name {
                "module_id" => &mut fields.module_id,
                "digest" => &mut fields.digest,
                "timestamp" => &mut fields.timestamp,
                "pcrs" => &mut fields.pcrs,
                "certificate" => &mut fields.certificate,
                "cabundle" => &mut fields.cabundle,
                "public_key" => &mut fields.public_key,
                "user_data" => &mut fields.user_data,
                "nonce" => &mut fields.nonce,
                _ => {
                    return Err(PayloadError::UnknownField {
                        field: describe_key(&key),
                    })
                }
            };
            *slot = Some(value);
        }

        let module_id = text("module_id", required("module_id", fields.module_id)?)?;
        check_len("module_id", module_id.len(), 1, MAX_MODULE_ID_LEN)?;

        let digest = text("digest", required("digest", fields.digest)?)?;
        if digest != "SHA384" {
            return Err(PayloadError::UnsupportedDigest {
                found: digest.chars().take(32).collect(),
            });
        }

        let timestamp_ms = match required("timestamp", fields.timestamp)? {
            Value::Integer(i) => match u64::try_from(i) {
                Ok(0) | Err(_) => {
                    return Err(PayloadError::Timestamp {
                        found: i128::from(i).to_string(),
                    })
                }
                Ok(t) => t,
            },
            other => return Err(wrong_type("timestamp", "unsigned integer", &other)),
        };

        let pcrs = pcrs(required("pcrs", fields.pcrs)?)?;

        let certificate = bytes("certificate", required("certificate", fields.certificate)?)?;
        check_len("certificate", certificate.len(), 1, MAX_CERT_LEN)?;

        let cabundle = match required("cabundle", fields.cabundle)? {
            Value::Array(items) => {
                check_len("cabundle", items.len(), 1, usize::from(u8::MAX))?;
                let mut out = Vec::with_capacity(items.len());
                for item in items {
                    let cert = bytes("cabundle", item)?;
                    check_len("cabundle", cert.len(), 1, MAX_CERT_LEN)?;
                    out.push(cert);
                }
                out
            }
            other => return Err(wrong_type("cabundle", "array", &other)),
        };

        Ok(AttestationDocument {
            module_id,
            digest,
            timestamp_ms,
            pcrs,
            certificate,
            cabundle,
            public_key: optional_bytes("public_key", fields.public_key)?,
            user_data: optional_bytes("user_data", fields.user_data)?,
            nonce: optional_bytes("nonce", fields.nonce)?,
        })
    }
}

#[derive(Default)]
struct Fields {
    module_id: Option<Value>,
    digest: Option<Value>,
    timestamp: Option<Value>,
    pcrs: Option<Value>,
    certificate: Option<Value>,
    cabundle: Option<Value>,
    public_key: Option<Value>,
    user_data: Option<Value>,
    nonce: Option<Value>,
}

fn required(field: &'static str, value: Option<Value>) -> Result<Value, PayloadError> {
    value.ok_or(PayloadError::MissingField { field })
}

fn wrong_type(field: &'static str, expected: &'static str, found: &Value) -> PayloadError {
    PayloadError::WrongType {
        field,
        expected,
        found: type_name(found),
    }
}

fn check_len(
    field: &'static str,
    found: usize,
    min: usize,
    max: usize,
) -> Result<(), PayloadError> {
    if found < min || found > max {
        return Err(PayloadError::Length {
            field,
            min,
            max,
            found,
        });
    }
    Ok(())
}

fn text(field: &'static str, value: Value) -> Result<String, PayloadError> {
    match value {
        Value::Text(t) => Ok(t),
        other => Err(wrong_type(field, "text string", &other)),
    }
}

fn bytes(field: &'static str, value: Value) -> Result<Vec<u8>, PayloadError> {
    match value {
        Value::Bytes(b) => Ok(b),
        other => Err(wrong_type(field, "byte string", &other)),
    }
}

fn optional_bytes(
    field: &'static str,
    value: Option<Value>,
) -> Result<Option<Vec<u8>>, PayloadError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bytes(b)) => {
            check_len(field, b.len(), 0, MAX_OPTIONAL_FIELD_LEN)?;
            Ok(Some(b))
        }
        Some(other) => Err(wrong_type(field, "byte string or null", &other)),
    }
}

fn pcrs(value: Value) -> Result<BTreeMap<u8, Vec<u8>>, PayloadError> {
    let Value::Map(entries) = value else {
        return Err(wrong_type("pcrs", "map", &value));
    };
    check_len("pcrs", entries.len(), 1, usize::from(PCR_COUNT))?;
    let mut out = BTreeMap::new();
    for (key, value) in entries {
        let index = match &key {
            Value::Integer(i) => match u8::try_from(*i) {
                Ok(idx) if idx < PCR_COUNT => idx,
                _ => {
                    return Err(PayloadError::PcrIndex {
                        found: i128::from(*i).to_string(),
                    })
                }
            },
            other => {
                return Err(PayloadError::PcrIndex {
                    found: format!("<{}>", type_name(other)),
                })
            }
        };
        let bytes = bytes("pcrs", value)?;
        if ![32, 48, 64].contains(&bytes.len()) {
            return Err(PayloadError::PcrLength {
                index,
                found: bytes.len(),
            });
        }
        out.insert(index, bytes);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_pcrs(pcrs: &[(u8, u8)]) -> AttestationDocument {
        AttestationDocument {
            module_id: "m".into(),
            digest: "SHA384".into(),
            timestamp_ms: 1,
            pcrs: pcrs.iter().map(|&(i, b)| (i, vec![b; 48])).collect(),
            certificate: vec![1],
            cabundle: vec![vec![1]],
            public_key: None,
            user_data: None,
            nonce: None,
        }
    }

    #[test]
    fn debug_mode_is_zero_pcr0_to_2_and_fails_closed_when_they_are_missing() {
        assert!(!with_pcrs(&[(0, 1), (1, 1), (2, 1)]).is_debug_mode());
        assert!(with_pcrs(&[(0, 0), (1, 0), (2, 0), (3, 9)]).is_debug_mode());
        assert!(!with_pcrs(&[(0, 0), (1, 1), (2, 0)]).is_debug_mode());
        assert!(
            with_pcrs(&[(8, 5)]).is_debug_mode(),
            "no PCR0-2: nothing proves the image"
        );
        assert!(with_pcrs(&[(0, 0), (2, 0)]).is_debug_mode());
    }
}
