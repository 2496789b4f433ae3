//! Serde helpers that enforce length bounds *while* decoding, and write byte
//! fields as CBOR byte strings.
//!
//! Used as `#[serde(deserialize_with = "bounded::bytes::<_, MAX>")]` and
//! friends. A list longer than its bound fails at the first element past it,
//! so a hostile message cannot make the decoder build a large structure.

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::ser::Serializer;
use std::fmt;
use std::marker::PhantomData;

/// Serialize a byte vector or array as one CBOR byte string.
pub(crate) fn ser_bytes<S: Serializer, T: AsRef<[u8]>>(
    value: &T,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_bytes(value.as_ref())
}

struct BytesVisitor<const MAX: usize>;

impl<'de, const MAX: usize> Visitor<'de> for BytesVisitor<MAX> {
    type Value = Vec<u8>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a byte string of at most {MAX} bytes")
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
        if v.len() > MAX {
            return Err(E::invalid_length(v.len(), &self));
        }
        Ok(v.to_vec())
    }

    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
        if v.len() > MAX {
            return Err(E::invalid_length(v.len(), &self));
        }
        Ok(v)
    }
}

/// A byte string of at most `MAX` bytes.
pub(crate) fn bytes<'de, D: Deserializer<'de>, const MAX: usize>(
    deserializer: D,
) -> Result<Vec<u8>, D::Error> {
    deserializer.deserialize_byte_buf(BytesVisitor::<MAX>)
}

/// A byte string of exactly `N` bytes.
pub(crate) fn array<'de, D: Deserializer<'de>, const N: usize>(
    deserializer: D,
) -> Result<[u8; N], D::Error> {
    struct ArrayVisitor<const N: usize>;
    impl<'de, const N: usize> Visitor<'de> for ArrayVisitor<N> {
        type Value = [u8; N];
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "a byte string of exactly {N} bytes")
        }
        fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<[u8; N], E> {
            <[u8; N]>::try_from(v).map_err(|_| E::invalid_length(v.len(), &self))
        }
    }
    deserializer.deserialize_bytes(ArrayVisitor::<N>)
}

/// A UTF-8 text string of at most `MAX` bytes.
pub(crate) fn string<'de, D: Deserializer<'de>, const MAX: usize>(
    deserializer: D,
) -> Result<String, D::Error> {
    struct StringVisitor<const MAX: usize>;
    impl<'de, const MAX: usize> Visitor<'de> for StringVisitor<MAX> {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "a text string of at most {MAX} bytes")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
            if v.len() > MAX {
                return Err(E::invalid_length(v.len(), &self));
            }
            Ok(v.to_owned())
        }
        fn visit_string<E: de::Error>(self, v: String) -> Result<String, E> {
            if v.len() > MAX {
                return Err(E::invalid_length(v.len(), &self));
            }
            Ok(v)
        }
    }
    deserializer.deserialize_string(StringVisitor::<MAX>)
}

/// A list of at most `MAX` elements; fails on the first element past the bound.
pub(crate) fn vec<'de, D, T, const MAX: usize>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: de::Deserialize<'de>,
{
    struct VecVisitor<T, const MAX: usize>(PhantomData<T>);
    impl<'de, T: de::Deserialize<'de>, const MAX: usize> Visitor<'de> for VecVisitor<T, MAX> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "a list of at most {MAX} elements")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let hint = seq.size_hint().unwrap_or(0);
            if hint > MAX {
                return Err(de::Error::invalid_length(hint, &self));
            }
            let mut out = Vec::with_capacity(hint);
            while let Some(item) = seq.next_element()? {
                if out.len() >= MAX {
                    return Err(de::Error::invalid_length(
                        out.len().saturating_add(1),
                        &self,
                    ));
                }
                out.push(item);
            }
            Ok(out)
        }
    }
    deserializer.deserialize_seq(VecVisitor::<T, MAX>(PhantomData))
}
