use std::fmt;

use super::layout::ItemType;

/// A typed NVS value, as a front end hands it to the [`ImageBuilder`](super::ImageBuilder).
///
/// Floats compare by their bits (so `Value` is `Eq`, and a NaN read from an image equals
/// itself).
#[derive(Clone, Debug)]
pub enum Value {
    /// A `u8`.
    U8(u8),
    /// A `i8`.
    I8(i8),
    /// A `u16`.
    U16(u16),
    /// A `i16`.
    I16(i16),
    /// A `u32`.
    U32(u32),
    /// A `i32`.
    I32(i32),
    /// A `u64`.
    U64(u64),
    /// A `i64`.
    I64(i64),
    /// An IEEE 754 single (ESP-IDF 6.1's `NVS_TYPE_FLOAT`).
    F32(f32),
    /// An IEEE 754 double (ESP-IDF 6.1's `NVS_TYPE_DOUBLE`).
    F64(f64),
    /// A string; the image stores its UTF-8 bytes plus a terminating NUL.
    String(String),
    /// A blob: multi-page chunks under format version 2, a legacy `BLOB` under version 1.
    Blob(Vec<u8>),
}

impl PartialEq for Value {
    fn eq(&self, other: &Value) -> bool {
        match (self, other) {
            (Value::U8(a), Value::U8(b)) => a == b,
            (Value::I8(a), Value::I8(b)) => a == b,
            (Value::U16(a), Value::U16(b)) => a == b,
            (Value::I16(a), Value::I16(b)) => a == b,
            (Value::U32(a), Value::U32(b)) => a == b,
            (Value::I32(a), Value::I32(b)) => a == b,
            (Value::U64(a), Value::U64(b)) => a == b,
            (Value::I64(a), Value::I64(b)) => a == b,
            (Value::F32(a), Value::F32(b)) => a.to_bits() == b.to_bits(),
            (Value::F64(a), Value::F64(b)) => a.to_bits() == b.to_bits(),
            (Value::String(a), Value::String(b)) => a == b,
            (Value::Blob(a), Value::Blob(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for Value {}

impl Value {
    /// The item type a primitive or string value is stored as (blobs depend on the version).
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => ItemType::U8.name(),
            Value::I8(_) => ItemType::I8.name(),
            Value::U16(_) => ItemType::U16.name(),
            Value::I16(_) => ItemType::I16.name(),
            Value::U32(_) => ItemType::U32.name(),
            Value::I32(_) => ItemType::I32.name(),
            Value::U64(_) => ItemType::U64.name(),
            Value::I64(_) => ItemType::I64.name(),
            Value::F32(_) => ItemType::F32.name(),
            Value::F64(_) => ItemType::F64.name(),
            Value::String(_) => "string",
            Value::Blob(_) => "blob",
        }
    }

    /// Little-endian bytes and type of a primitive, `None` for strings and blobs.
    pub(crate) fn primitive(&self) -> Option<(ItemType, [u8; 8], usize)> {
        let mut data = [0xFFu8; 8];
        let (ty, bytes): (ItemType, &[u8]) = match self {
            Value::U8(v) => (ItemType::U8, &v.to_le_bytes()[..]),
            Value::I8(v) => (ItemType::I8, &v.to_le_bytes()[..]),
            Value::U16(v) => (ItemType::U16, &v.to_le_bytes()[..]),
            Value::I16(v) => (ItemType::I16, &v.to_le_bytes()[..]),
            Value::U32(v) => (ItemType::U32, &v.to_le_bytes()[..]),
            Value::I32(v) => (ItemType::I32, &v.to_le_bytes()[..]),
            Value::U64(v) => (ItemType::U64, &v.to_le_bytes()[..]),
            Value::I64(v) => (ItemType::I64, &v.to_le_bytes()[..]),
            Value::F32(v) => (ItemType::F32, &v.to_le_bytes()[..]),
            Value::F64(v) => (ItemType::F64, &v.to_le_bytes()[..]),
            Value::String(_) | Value::Blob(_) => return None,
        };
        data[..bytes.len()].copy_from_slice(bytes);
        Some((ty, data, bytes.len()))
    }

    /// Decodes a primitive from the 8-byte data field of an entry.
    pub(crate) fn decode_primitive(ty: ItemType, data: &[u8; 8]) -> Option<Value> {
        let word = [data[0], data[1], data[2], data[3]];
        Some(match ty {
            ItemType::U8 => Value::U8(data[0]),
            ItemType::I8 => Value::I8(data[0] as i8),
            ItemType::U16 => Value::U16(u16::from_le_bytes([data[0], data[1]])),
            ItemType::I16 => Value::I16(i16::from_le_bytes([data[0], data[1]])),
            ItemType::U32 => Value::U32(u32::from_le_bytes(word)),
            ItemType::I32 => Value::I32(i32::from_le_bytes(word)),
            ItemType::U64 => Value::U64(u64::from_le_bytes(*data)),
            ItemType::I64 => Value::I64(i64::from_le_bytes(*data)),
            ItemType::F32 => Value::F32(f32::from_le_bytes(word)),
            ItemType::F64 => Value::F64(f64::from_le_bytes(*data)),
            _ => return None,
        })
    }

    /// The value as text, as the reference's Wi-Fi helper sees a CSV value.
    pub(crate) fn source_text(&self) -> String {
        match self {
            Value::U8(v) => v.to_string(),
            Value::I8(v) => v.to_string(),
            Value::U16(v) => v.to_string(),
            Value::I16(v) => v.to_string(),
            Value::U32(v) => v.to_string(),
            Value::I32(v) => v.to_string(),
            Value::U64(v) => v.to_string(),
            Value::I64(v) => v.to_string(),
            // The shortest spelling that reads back exactly: `1.5`, `0.1`, `2.0`, `-2.5e300`,
            // `inf`, `NaN`.
            Value::F32(v) => format!("{v:?}"),
            Value::F64(v) => format!("{v:?}"),
            Value::String(s) => s.clone(),
            Value::Blob(b) => String::from_utf8_lossy(b).into_owned(),
        }
    }
}

/// Integers in decimal, strings quoted, blobs in hex.
impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::String(s) => write!(f, "{s:?}"),
            Value::Blob(bytes) => f.write_str(&crate::hex(bytes)),
            other => f.write_str(&other.source_text()),
        }
    }
}
