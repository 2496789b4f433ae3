//! Strict CBOR decoding on top of `ciborium`.
//!
//! `ciborium` decodes well-formed CBOR (definite and indefinite lengths) into a
//! [`Value`] tree and bounds its own recursion. It does not, by design, reject
//! trailing bytes or duplicate map keys, and it accepts any container size; those
//! rules are what this module adds, because an attestation document must have
//! exactly one meaning.

use crate::error::EncodingError;
use ciborium::value::Value;

/// Deepest nesting accepted. A Nitro document nests three levels (map → map →
/// bytes); anything near this limit is hostile. Kept small so decoding can never
/// exhaust a thread's stack, including small async-runtime stacks.
pub(crate) const MAX_DEPTH: usize = 16;

/// Largest map or array accepted anywhere. The payload map has 9 keys, `pcrs` at
/// most 32, `cabundle` a handful of certificates.
pub(crate) const MAX_ENTRIES: usize = 64;

/// Decode exactly one CBOR item from `bytes`, then enforce the strict rules.
///
/// Memory is bounded by the input: ciborium reads byte and text strings in chunks
/// as they arrive rather than trusting a declared length.
pub(crate) fn decode_strict(bytes: &[u8], context: &'static str) -> Result<Value, EncodingError> {
    let mut reader = bytes;
    let value: Value = ciborium::de::from_reader_with_recursion_limit(&mut reader, MAX_DEPTH)
        .map_err(|e| match e {
            ciborium::de::Error::RecursionLimitExceeded => EncodingError::TooDeep {
                context,
                limit: MAX_DEPTH,
            },
            ciborium::de::Error::Io(_) => EncodingError::Malformed {
                context,
                detail: "unexpected end of input".to_owned(),
            },
            ciborium::de::Error::Syntax(offset) => EncodingError::Malformed {
                context,
                detail: format!("syntax error at byte {offset}"),
            },
            ciborium::de::Error::Semantic(offset, msg) => EncodingError::Malformed {
                context,
                detail: match offset {
                    Some(o) => format!("{msg} at byte {o}"),
                    None => msg,
                },
            },
        })?;
    if !reader.is_empty() {
        return Err(EncodingError::TrailingBytes {
            context,
            count: reader.len(),
        });
    }
    check_tree(&value, context)?;
    Ok(value)
}

/// Walk the tree: no container larger than [`MAX_ENTRIES`], no duplicate map keys.
///
/// Iterative, so that its depth does not depend on the input (the decoder has
/// already bounded depth, but this keeps the guarantee local).
fn check_tree(root: &Value, context: &'static str) -> Result<(), EncodingError> {
    let mut stack: Vec<&Value> = vec![root];
    while let Some(value) = stack.pop() {
        match value {
            Value::Array(items) => {
                check_entries(items.len(), context)?;
                stack.extend(items.iter());
            }
            Value::Map(entries) => {
                check_entries(entries.len(), context)?;
                // Quadratic, but bounded by MAX_ENTRIES² = 4096 comparisons.
                for (i, (key, _)) in entries.iter().enumerate() {
                    if entries
                        .iter()
                        .skip(i.saturating_add(1))
                        .any(|(k, _)| k == key)
                    {
                        return Err(EncodingError::DuplicateKey {
                            context,
                            key: describe_key(key),
                        });
                    }
                }
                for (k, v) in entries {
                    stack.push(k);
                    stack.push(v);
                }
            }
            Value::Tag(_, inner) => stack.push(inner),
            _ => {}
        }
    }
    Ok(())
}

fn check_entries(found: usize, context: &'static str) -> Result<(), EncodingError> {
    if found > MAX_ENTRIES {
        return Err(EncodingError::TooManyEntries {
            context,
            found,
            limit: MAX_ENTRIES,
        });
    }
    Ok(())
}

/// Render a map key for an error message: short, never the whole value.
pub(crate) fn describe_key(key: &Value) -> String {
    match key {
        Value::Text(t) => {
            let mut s: String = t.chars().take(40).collect();
            if t.chars().count() > 40 {
                s.push('…');
            }
            format!("{s:?}")
        }
        Value::Integer(i) => i128::from(*i).to_string(),
        other => format!("<{}>", type_name(other)),
    }
}

/// The CBOR type of a value, for "expected X, found Y" messages.
pub(crate) fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Integer(_) => "integer",
        Value::Bytes(_) => "byte string",
        Value::Float(_) => "float",
        Value::Text(_) => "text string",
        Value::Bool(_) => "bool",
        Value::Null => "null",
        Value::Tag(_, _) => "tagged item",
        Value::Array(_) => "array",
        Value::Map(_) => "map",
        _ => "unknown CBOR item",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_definite_and_indefinite_maps_alike() {
        // {"a": 1} definite and indefinite.
        let definite = decode_strict(&[0xa1, 0x61, b'a', 0x01], "t").unwrap();
        let indefinite = decode_strict(&[0xbf, 0x61, b'a', 0x01, 0xff], "t").unwrap();
        assert_eq!(definite, indefinite);
    }

    #[test]
    fn rejects_trailing_bytes() {
        assert_eq!(
            decode_strict(&[0x01, 0x00], "t"),
            Err(EncodingError::TrailingBytes {
                context: "t",
                count: 1
            })
        );
    }

    #[test]
    fn rejects_duplicate_keys_even_nested() {
        // [ {"a": 1, "a": 2} ]
        let err = decode_strict(&[0x81, 0xa2, 0x61, b'a', 0x01, 0x61, b'a', 0x02], "t");
        assert!(
            matches!(err, Err(EncodingError::DuplicateKey { .. })),
            "{err:?}"
        );
    }

    #[test]
    fn rejects_deep_nesting_without_overflowing_the_stack() {
        let deep = vec![0x81u8; 100_000];
        assert!(matches!(
            decode_strict(&deep, "t"),
            Err(EncodingError::TooDeep { .. })
        ));
    }

    #[test]
    fn huge_declared_lengths_fail_without_allocating_them() {
        // A byte string claiming 2^62 bytes, and an array claiming 2^62 items.
        let mut bstr = vec![0x5b];
        bstr.extend_from_slice(&(1u64 << 62).to_be_bytes());
        assert!(matches!(
            decode_strict(&bstr, "t"),
            Err(EncodingError::Malformed { .. })
        ));
        let mut arr = vec![0x9b];
        arr.extend_from_slice(&(1u64 << 62).to_be_bytes());
        assert!(matches!(
            decode_strict(&arr, "t"),
            Err(EncodingError::Malformed { .. })
        ));
    }

    #[test]
    fn rejects_oversized_containers() {
        let mut arr = vec![0x98, 65];
        arr.extend(std::iter::repeat_n(0x00, 65));
        assert!(matches!(
            decode_strict(&arr, "t"),
            Err(EncodingError::TooManyEntries { found: 65, .. })
        ));
    }

    #[test]
    fn empty_input_is_malformed() {
        assert!(matches!(
            decode_strict(&[], "t"),
            Err(EncodingError::Malformed { .. })
        ));
    }
}
