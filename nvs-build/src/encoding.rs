//! Text encodings of values, parsed exactly as Espressif's generator parses them (Python's
//! `int()`, `binascii.a2b_hex` and the lenient `binascii.a2b_base64`), so that every input the
//! reference accepts gives the same bytes. Errors are plain messages; callers add the location.

use crate::format::Value;

/// The value encodings of the Espressif CSV format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    U64,
    I64,
    String,
    Hex2bin,
    Base64,
    Binary,
    /// ESP-IDF 6.1's float: Cargo metadata only (Espressif's CSV format has no float type).
    F32,
    /// ESP-IDF 6.1's double: Cargo metadata only.
    F64,
}

impl Encoding {
    pub const NAMES: &'static str =
        "u8, i8, u16, i16, u32, i32, u64, i64, string, hex2bin, base64, binary";

    pub fn from_name(name: &str) -> Option<Encoding> {
        Some(match name {
            "u8" => Encoding::U8,
            "i8" => Encoding::I8,
            "u16" => Encoding::U16,
            "i16" => Encoding::I16,
            "u32" => Encoding::U32,
            "i32" => Encoding::I32,
            "u64" => Encoding::U64,
            "i64" => Encoding::I64,
            "string" => Encoding::String,
            "hex2bin" => Encoding::Hex2bin,
            "base64" => Encoding::Base64,
            "binary" => Encoding::Binary,
            _ => return None,
        })
    }

    pub fn is_integer(self) -> bool {
        !matches!(
            self,
            Encoding::String
                | Encoding::Hex2bin
                | Encoding::Base64
                | Encoding::Binary
                | Encoding::F32
                | Encoding::F64
        )
    }

    pub fn is_float(self) -> bool {
        matches!(self, Encoding::F32 | Encoding::F64)
    }

    /// Decodes a file's contents, as the reference does for `file` rows (Python `bytes`
    /// semantics): strings must be UTF-8; integers and hex take ASCII only, with ASCII
    /// whitespace around them; base64 is decoded; binary is taken as is.
    pub fn decode_file(self, raw: &[u8]) -> Result<Value, String> {
        match self {
            Encoding::Binary => Ok(Value::Blob(raw.to_vec())),
            Encoding::Hex2bin => decode_hex_digits(trim_bytes(raw)).map(Value::Blob),
            Encoding::Base64 => decode_base64(raw).map(Value::Blob),
            Encoding::F32 | Encoding::F64 => match std::str::from_utf8(trim_bytes(raw)) {
                Ok(text) => self.decode(text),
                Err(_) => Err("the file does not hold a number in ASCII".to_owned()),
            },
            Encoding::String => std::str::from_utf8(raw)
                .map(|t| Value::String(t.to_owned()))
                .map_err(|_| "the file is not valid UTF-8, so it cannot be read as a string; use `binary` for raw bytes".to_owned()),
            integer => {
                let digits = std::str::from_utf8(trim_bytes(raw)).ok().filter(|t| t.is_ascii());
                match digits {
                    Some(text) => integer_value(integer, parse_python_int(text)?),
                    None => Err("the file does not hold a base-10 integer in ASCII digits".to_owned()),
                }
            }
        }
    }

    /// Decodes `text` (a CSV cell or a metadata value: Python `str` semantics).
    pub fn decode(self, text: &str) -> Result<Value, String> {
        match self {
            Encoding::String => Ok(Value::String(text.to_owned())),
            Encoding::Hex2bin => decode_hex(text).map(Value::Blob),
            Encoding::Base64 => decode_base64(text.as_bytes()).map(Value::Blob),
            Encoding::Binary => Ok(Value::Blob(text.as_bytes().to_vec())),
            Encoding::F32 => parse_float::<f32>(text, "f32").map(Value::F32),
            Encoding::F64 => parse_float::<f64>(text, "f64").map(Value::F64),
            integer => integer_value(integer, parse_python_int(text)?),
        }
    }
}

/// A float as Rust (and TOML) spell it: `1.5`, `-2e-3`, `inf`. NaN is refused, as ESP-IDF's
/// `nvs_set_float`/`nvs_set_double` refuse it; so is a finite number the type cannot hold
/// (rather than storing infinity).
fn parse_float<T: std::str::FromStr + Copy + Into<f64>>(
    text: &str,
    name: &str,
) -> Result<T, String> {
    let invalid =
        || format!("the value is not a number (write it like 1.5, -2e-3 or inf) for {name}");
    let value: T = text.trim().parse().map_err(|_| invalid())?;
    let wide: f64 = value.into();
    if wide.is_nan() {
        return Err(format!(
            "the value is NaN, which ESP-IDF's nvs_set_{} refuses; give a number",
            if name == "f32" { "float" } else { "double" }
        ));
    }
    if wide.is_infinite() && !text.to_ascii_lowercase().contains("inf") {
        return Err(format!("the value is out of range for {name}"));
    }
    Ok(value)
}

/// Converts a parsed integer into the typed value, checking the range of the type.
pub fn integer_value(encoding: Encoding, n: i128) -> Result<Value, String> {
    fn fit<T: TryFrom<i128>>(n: i128, min: i128, max: i128, name: &str) -> Result<T, String> {
        // The value itself is not echoed: errors must not leak what may be a secret.
        T::try_from(n).map_err(|_| format!("the value is out of range for {name} ({min}..={max})"))
    }
    Ok(match encoding {
        Encoding::U8 => Value::U8(fit(n, 0, u8::MAX.into(), "u8")?),
        Encoding::I8 => Value::I8(fit(n, i8::MIN.into(), i8::MAX.into(), "i8")?),
        Encoding::U16 => Value::U16(fit(n, 0, u16::MAX.into(), "u16")?),
        Encoding::I16 => Value::I16(fit(n, i16::MIN.into(), i16::MAX.into(), "i16")?),
        Encoding::U32 => Value::U32(fit(n, 0, u32::MAX.into(), "u32")?),
        Encoding::I32 => Value::I32(fit(n, i32::MIN.into(), i32::MAX.into(), "i32")?),
        Encoding::U64 => Value::U64(fit(n, 0, u64::MAX.into(), "u64")?),
        Encoding::I64 => Value::I64(fit(n, i64::MIN.into(), i64::MAX.into(), "i64")?),
        other => unreachable!("{other:?} is not an integer encoding"),
    })
}

/// Python's `str.strip()` whitespace: Unicode White_Space plus the separators 0x1C..=0x1F
/// (which `int()`, unlike `strip()`, does not skip).
fn is_python_strip_space(c: char) -> bool {
    c.is_whitespace() || ('\x1c'..='\x1f').contains(&c)
}

/// Python's `bytes.strip()`: ASCII whitespace including vertical tab.
fn trim_bytes(raw: &[u8]) -> &[u8] {
    let space = |b: &u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r' | b'\x0b' | b'\x0c');
    let start = raw.iter().position(|b| !space(b)).unwrap_or(raw.len());
    let end = raw.iter().rposition(|b| !space(b)).map_or(start, |i| i + 1);
    &raw[start..end]
}

/// First code points of the Unicode decimal-digit runs (category Nd, Unicode 14 as in Python
/// 3.11) other than ASCII: Python's `int()` reads digits from any of them.
const DIGIT_ZEROS: [u32; 65] = [
    0x660, 0x6f0, 0x7c0, 0x966, 0x9e6, 0xa66, 0xae6, 0xb66, 0xbe6, 0xc66, 0xce6, 0xd66, 0xde6,
    0xe50, 0xed0, 0xf20, 0x1040, 0x1090, 0x17e0, 0x1810, 0x1946, 0x19d0, 0x1a80, 0x1a90, 0x1b50,
    0x1bb0, 0x1c40, 0x1c50, 0xa620, 0xa8d0, 0xa900, 0xa9d0, 0xa9f0, 0xaa50, 0xabf0, 0xff10,
    0x104a0, 0x10d30, 0x11066, 0x110f0, 0x11136, 0x111d0, 0x112f0, 0x11450, 0x114d0, 0x11650,
    0x116c0, 0x11730, 0x118e0, 0x11950, 0x11c50, 0x11d50, 0x11da0, 0x16a60, 0x16ac0, 0x16b50,
    0x1d7ce, 0x1d7d8, 0x1d7e2, 0x1d7ec, 0x1d7f6, 0x1e140, 0x1e2f0, 0x1e950, 0x1fbf0,
];

/// The value of a decimal digit as Python's `int()` sees it.
fn python_digit(c: char) -> Option<u32> {
    if let Some(d) = c.to_digit(10) {
        return Some(d);
    }
    let c = c as u32;
    let i = DIGIT_ZEROS.partition_point(|&zero| zero <= c);
    let zero = *DIGIT_ZEROS.get(i.checked_sub(1)?)?;
    (c - zero < 10).then_some(c - zero)
}

/// Parses an integer the way Python's `int(text)` does in base 10: surrounding whitespace, an
/// optional sign and `_` between digits are accepted; `0x10`, `1.0` and the empty string are not.
pub fn parse_python_int(text: &str) -> Result<i128, String> {
    let invalid =
        || "the value is not a base-10 integer (write decimal digits, e.g. 42 or -7)".to_owned();
    let trimmed = text.trim_matches(char::is_whitespace);
    let (negative, digits) = match trimmed.as_bytes().first() {
        Some(b'-') => (true, &trimmed[1..]),
        Some(b'+') => (false, &trimmed[1..]),
        _ => (false, trimmed),
    };
    if digits.is_empty()
        || digits.starts_with('_')
        || digits.ends_with('_')
        || digits.contains("__")
    {
        return Err(invalid());
    }
    let mut n: i128 = 0;
    for c in digits.chars().filter(|&c| c != '_') {
        let d = python_digit(c).ok_or_else(invalid)?;
        // Saturate far beyond every NVS type; the range check reports it.
        n = n.saturating_mul(10).saturating_add(i128::from(d));
    }
    Ok(if negative { -n } else { n })
}

/// `bytes` in lower-case hex: the one encoder of nvs-build and cargo-nvs (digests, keys, dumps).
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(2 * bytes.len());
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    out
}

/// `hex2bin`: outer whitespace stripped, then pairs of hex digits (either case, no `0x`).
pub fn decode_hex(text: &str) -> Result<Vec<u8>, String> {
    decode_hex_digits(text.trim_matches(is_python_strip_space).as_bytes())
}

/// Value of each byte as a hex digit, 0xFF for non-digits.
const HEX_VALUES: [u8; 256] = {
    let mut table = [0xFF; 256];
    let mut i = 0;
    while i < 10 {
        table[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        table[b'a' as usize + i] = 10 + i as u8;
        table[b'A' as usize + i] = 10 + i as u8;
        i += 1;
    }
    table
};

fn decode_hex_digits(text: &[u8]) -> Result<Vec<u8>, String> {
    if text.len() % 2 != 0 {
        return Err(format!(
            "hex data has an odd number of digits ({}); hex2bin needs two digits per byte",
            text.len()
        ));
    }
    // Positions, not characters, in errors: the value may be a secret.
    let digit = |i: usize| -> Result<u8, String> {
        match HEX_VALUES[usize::from(text[i])] {
            0xFF => Err(format!(
                "character {} of the hex data is not a hex digit (hex2bin takes 0-9, a-f, A-F)",
                i + 1
            )),
            d => Ok(d),
        }
    };
    let mut out = Vec::with_capacity(text.len() / 2);
    for i in 0..text.len() / 2 {
        out.push((digit(2 * i)? << 4) | digit(2 * i + 1)?);
    }
    Ok(out)
}

/// `base64`, as lenient as Python 3.11's `binascii.a2b_base64`: characters outside the
/// alphabet are skipped, and decoding stops at the first complete padding.
pub fn decode_base64(text: &[u8]) -> Result<Vec<u8>, String> {
    fn sextet(c: u8) -> Option<u8> {
        match c {
            b'A'..=b'Z' => Some(c - b'A'),
            b'a'..=b'z' => Some(c - b'a' + 26),
            b'0'..=b'9' => Some(c - b'0' + 52),
            b'+' => Some(62),
            b'/' => Some(63),
            _ => None,
        }
    }
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut quad_pos = 0;
    let mut left: u32 = 0;
    let mut pads = 0;
    for &c in text {
        if c == b'=' {
            if quad_pos >= 2 {
                pads += 1;
                if quad_pos + pads >= 4 {
                    return Ok(out);
                }
            }
            continue;
        }
        let Some(v) = sextet(c) else { continue };
        pads = 0;
        let v = u32::from(v);
        match quad_pos {
            0 => {
                left = v;
                quad_pos = 1;
            }
            1 => {
                out.push(((left << 2) | (v >> 4)) as u8);
                left = v & 0x0F;
                quad_pos = 2;
            }
            2 => {
                out.push(((left << 4) | (v >> 2)) as u8);
                left = v & 0x03;
                quad_pos = 3;
            }
            _ => {
                out.push(((left << 6) | v) as u8);
                quad_pos = 0;
            }
        }
    }
    match quad_pos {
        0 => Ok(out),
        1 => Err(
            "base64 data has one character too many (its length is 1 more than a multiple of 4)"
                .into(),
        ),
        _ => Err("base64 data has incorrect padding (end it with `=` or `==`)".into()),
    }
}

/// The reference's undocumented `blob_fill(N;0xPP)` / `blob_sz_fill(N;0xPP)` encodings (quirk
/// Q4): the value padded with byte PP to N bytes, the latter with a u32 length in front.
/// Returns `None` when `encoding` is not one of them.
pub fn decode_fill(encoding: &str, value: &[u8]) -> Option<Result<Vec<u8>, String>> {
    let (sized, rest) = if let Some(rest) = encoding.strip_prefix("blob_sz_fill") {
        (true, rest)
    } else if let Some(rest) = encoding.strip_prefix("blob_fill") {
        (false, rest)
    } else {
        return None;
    };
    Some(parse_fill_args(rest).and_then(|(len, pad)| {
        if value.len() > len {
            return Err(format!(
                "value is {} bytes long, more than the {len} bytes of `{encoding}`",
                value.len()
            ));
        }
        let mut data = Vec::with_capacity(len + 4);
        if sized {
            data.extend_from_slice(&(value.len() as u32).to_le_bytes());
        }
        data.extend_from_slice(value);
        data.resize(data.len() + len - value.len(), pad);
        Ok(data)
    }))
}

/// Parses `(N;0xPP)` at the start of `rest` (trailing text is ignored, as in the reference).
fn parse_fill_args(rest: &str) -> Result<(usize, u8), String> {
    let bad = || {
        format!(
            "invalid fill encoding `...{rest}`: write blob_fill(N;0xPP) or blob_sz_fill(N;0xPP), e.g. blob_fill(16;0xff)"
        )
    };
    let inner = rest.strip_prefix('(').ok_or_else(bad)?;
    let digits_end = inner
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(inner.len());
    if digits_end == 0 {
        return Err(bad());
    }
    let len: usize = inner[..digits_end].parse().map_err(|_| bad())?;
    let tail = &inner[digits_end..];
    let hex = tail.strip_prefix(";0x").ok_or_else(bad)?;
    if hex.len() < 3
        || !hex.as_bytes()[..2].iter().all(u8::is_ascii_hexdigit)
        || hex.as_bytes()[2] != b')'
    {
        return Err(bad());
    }
    let pad = u8::from_str_radix(&hex[..2], 16).map_err(|_| bad())?;
    // Stay well within what a partition can hold before allocating.
    if len > 16 * 1024 * 1024 {
        return Err(format!(
            "fill length {len} is larger than any NVS partition"
        ));
    }
    Ok((len, pad))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_int() {
        assert_eq!(parse_python_int(" +42 "), Ok(42));
        assert_eq!(parse_python_int("-1_000"), Ok(-1000));
        assert_eq!(parse_python_int("007"), Ok(7));
        assert_eq!(parse_python_int("\t-0\n"), Ok(0));
        assert_eq!(parse_python_int("\u{a0}\u{661}\u{662}"), Ok(12));
        assert_eq!(parse_python_int("\u{1d7ce}\u{1d7d9}"), Ok(1));
        assert!(parse_python_int("\x1c12").is_err());
        assert_eq!(Encoding::U8.decode_file(b"\x0b12\n"), Ok(Value::U8(12)));
        assert!(Encoding::U8.decode_file("\u{a0}12".as_bytes()).is_err());
        assert!(Encoding::U8.decode_file("\u{661}".as_bytes()).is_err());
        for bad in [
            "", " ", "0x10", "1.0", "_1", "1_", "1__0", "+-1", "- 1", "1 2",
        ] {
            assert!(parse_python_int(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ranges() {
        assert_eq!(Encoding::U8.decode("255"), Ok(Value::U8(255)));
        assert!(Encoding::U8.decode("256").is_err());
        assert_eq!(
            Encoding::I64.decode("-9223372036854775808"),
            Ok(Value::I64(i64::MIN))
        );
        assert!(Encoding::U64.decode("-1").is_err());
    }

    #[test]
    fn hex_both_ways() {
        assert_eq!(hex(&[0, 0xff, 0x10, 0xa5]), "00ff10a5");
        assert_eq!(decode_hex(" 00fF10\n\x1c"), Ok(vec![0, 0xff, 0x10]));
        assert!(decode_hex("abc").is_err());
        assert!(decode_hex("zz").is_err());
        assert_eq!(decode_hex(""), Ok(vec![]));
        assert_eq!(
            Encoding::Hex2bin.decode_file(b"\x0b0102\n"),
            Ok(Value::Blob(vec![1, 2]))
        );
        assert!(Encoding::Hex2bin.decode_file(b"\x1c0102").is_err());
    }

    #[test]
    fn base64_leniency() {
        assert_eq!(decode_base64(b"aGVsbG8="), Ok(b"hello".to_vec()));
        assert_eq!(decode_base64(b"aGVs\nbG8="), Ok(b"hello".to_vec()));
        assert_eq!(decode_base64(b"@@@"), Ok(vec![]));
        assert_eq!(decode_base64(b"aGk=trailing"), Ok(b"hi".to_vec()));
        assert!(decode_base64(b"aGVsbG8").is_err());
        assert!(decode_base64(b"a").is_err());
    }

    #[test]
    fn fill() {
        assert_eq!(
            decode_fill("blob_fill(4;0xaa)", b"x"),
            Some(Ok(vec![b'x', 0xaa, 0xaa, 0xaa]))
        );
        assert_eq!(
            decode_fill("blob_sz_fill(2;0x00)xyz", b"x"),
            Some(Ok(vec![1, 0, 0, 0, b'x', 0]))
        );
        assert!(decode_fill("blob_fill(1;0xaa)", b"xy").unwrap().is_err());
        assert!(decode_fill("blob_fill(1;aa)", b"").unwrap().is_err());
        assert_eq!(decode_fill("hex2bin", b""), None);
    }
}
