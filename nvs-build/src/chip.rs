//! Values taken from the chip being flashed (its MAC), and the "recipe" a device made from the
//! chip leaves behind: its rows in Espressif's CSV format with every value inline, except the
//! chip's, which stay `@chip:mac` / `@chip:mac-hex` until the station reads the MAC.
//!
//! Where such a value goes: `{ string = { chip = "mac", dev = "…" } }` in Cargo metadata, or a
//! cell `@chip:mac` in a CSV read with [`crate::ImageInput::set_chip_mac`] (mfg_gen mode and
//! recipes). Without a MAC (development builds, `cargo nvs generate`) the metadata's `dev`
//! value is used; a CSV read without a MAC keeps such cells as text, as Espressif's generator
//! does.

use crate::encoding::Encoding;
use crate::format::Value;

/// What a chip-derived value is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChipValue {
    /// The base MAC: upper-case hex, colon-separated (`AA:BB:CC:DD:EE:FF`) as a string; for
    /// `u64`, the 48-bit MAC as a big-endian number.
    Mac,
    /// The base MAC as 12 lower-case hex digits without separators (`aabbccddeeff`).
    MacHex,
}

/// The prefix of a CSV cell that a chip value fills in.
pub const CELL_PREFIX: &str = "@chip:";

impl ChipValue {
    /// Every spelling, for messages.
    pub const NAMES: &'static str = "mac, mac-hex";

    /// `mac` or `mac-hex`.
    pub fn from_name(name: &str) -> Option<ChipValue> {
        match name {
            "mac" => Some(ChipValue::Mac),
            "mac-hex" => Some(ChipValue::MacHex),
            _ => None,
        }
    }

    /// How the metadata spells it.
    pub fn name(self) -> &'static str {
        match self {
            ChipValue::Mac => "mac",
            ChipValue::MacHex => "mac-hex",
        }
    }

    /// `@chip:mac` → `Mac`; any other cell is not a chip value.
    pub fn from_cell(cell: &str) -> Option<ChipValue> {
        cell.strip_prefix(CELL_PREFIX)
            .and_then(ChipValue::from_name)
    }

    /// The CSV cell that stands for it (`@chip:mac`).
    pub fn cell(self) -> String {
        format!("{CELL_PREFIX}{}", self.name())
    }

    /// Whether a key of `encoding` can hold it: a string either spelling, a u64 the MAC.
    pub fn fits(self, encoding: Encoding) -> bool {
        matches!(
            (self, encoding),
            (_, Encoding::String) | (ChipValue::Mac, Encoding::U64)
        )
    }

    /// What it fills in for `mac` as a key of `encoding` (the value, and its text: decimal for
    /// u64), or why that encoding cannot hold it.
    pub fn fill(self, encoding: Encoding, mac: &Mac) -> Result<(Value, String), String> {
        match (self, encoding) {
            (ChipValue::Mac, Encoding::U64) => {
                Ok((Value::U64(mac.number()), mac.number().to_string()))
            }
            (ChipValue::Mac, Encoding::String) => Ok(string(mac.colon_upper())),
            (ChipValue::MacHex, Encoding::String) => Ok(string(mac.hex_lower())),
            _ => Err(self.misfit()),
        }
    }

    /// Why a key of another type cannot hold it.
    pub fn misfit(self) -> String {
        format!(
            "`{}` fills {}; not this encoding",
            self.cell(),
            self.allowed()
        )
    }

    /// The types that can hold it, for messages.
    pub fn allowed(self) -> &'static str {
        match self {
            ChipValue::Mac => "string or u64 keys",
            ChipValue::MacHex => "string keys",
        }
    }
}

/// A chip's base MAC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// The all-zero MAC: stands in for the chip's while a recipe is checked (every MAC spells
    /// the same length, so what fits with it fits with any).
    pub const ZERO: Mac = Mac([0; 6]);

    /// Reads `aa:bb:cc:dd:ee:ff` (either case, `:` or `-` between bytes) or `aabbccddeeff`.
    pub fn parse(text: &str) -> Option<Mac> {
        let digits: String = text
            .trim()
            .chars()
            .filter(|c| !matches!(c, ':' | '-'))
            .collect();
        let separators = text.trim().len() - digits.len();
        if digits.len() != 12 || !(separators == 0 || separators == 5) {
            return None;
        }
        let mut mac = [0u8; 6];
        for (i, byte) in mac.iter_mut().enumerate() {
            *byte = u8::from_str_radix(digits.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Mac(mac))
    }

    /// `AA:BB:CC:DD:EE:FF`.
    pub fn colon_upper(&self) -> String {
        let parts: Vec<String> = self.0.iter().map(|b| format!("{b:02X}")).collect();
        parts.join(":")
    }

    /// `aabbccddeeff`.
    pub fn hex_lower(&self) -> String {
        crate::encoding::hex(&self.0)
    }

    /// The 48-bit MAC as a number, first byte most significant.
    pub fn number(&self) -> u64 {
        self.0.iter().fold(0u64, |n, &b| (n << 8) | u64::from(b))
    }
}

impl std::fmt::Display for Mac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.colon_upper())
    }
}

/// One row of a recipe, as the image was assembled.
#[derive(Clone, PartialEq)]
pub enum RecipeRow {
    /// A namespace opened (or continued).
    Namespace(String),
    /// A value added: the decoded value, the text the input spelled it as (the reference's
    /// Wi-Fi helper reads it) and, for a chip value, which.
    Data {
        /// The key.
        key: String,
        /// The value (for a chip value: the one the stand-in MAC gave).
        value: Value,
        /// How the input spelled it.
        text: String,
        /// The chip value it is, if it is one.
        chip: Option<ChipValue>,
    },
}

impl std::fmt::Debug for RecipeRow {
    // Values may be secrets: a debug print names keys only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecipeRow::Namespace(name) => f.debug_tuple("Namespace").field(name).finish(),
            RecipeRow::Data { key, chip, .. } => f
                .debug_struct("Data")
                .field("key", key)
                .field("chip", chip)
                .finish_non_exhaustive(),
        }
    }
}

/// A string value and its text.
fn string(text: String) -> (Value, String) {
    (Value::String(text.clone()), text)
}

/// The longest CSV field the reference (and our CSV reader) accept.
use crate::csv_input::MAX_FIELD_CHARS as MAX_FIELD;

/// The rows as a CSV in Espressif's format (`key,type,encoding,value`), every value inline,
/// preceded by `comments` (each written as a `# ` line, which both generators skip). Building
/// it again (with [`crate::ImageInput::set_chip_mac`] and device string lengths allowed) gives
/// the same image; with the chip's MAC written into the `@chip:` cells, Espressif's generator
/// gives it too. Refused (key, why): values a CSV cannot spell so that they read back the same.
pub fn recipe_csv(rows: &[RecipeRow], comments: &[String]) -> Result<String, (String, String)> {
    let mut csv = String::new();
    for comment in comments {
        for line in comment.lines() {
            csv.push_str("# ");
            csv.push_str(line);
            csv.push('\n');
        }
    }
    csv.push_str("key,type,encoding,value\n");
    for row in rows {
        let (key, kind, encoding, cell) = match row {
            RecipeRow::Namespace(name) => {
                if crate::format::is_wifi_key(name) {
                    return Err((
                        name.clone(),
                        "a namespace named like a Wi-Fi key cannot be written to a CSV".into(),
                    ));
                }
                (name, "namespace", "", String::new())
            }
            RecipeRow::Data {
                key,
                value,
                text,
                chip,
            } => {
                let (encoding, cell) = match (chip, value) {
                    (Some(chip), Value::String(_)) => ("string", chip.cell()),
                    (Some(chip), Value::U64(_)) => ("u64", chip.cell()),
                    (Some(chip), _) => {
                        return Err((
                            key.clone(),
                            format!("`{}` fills {}", chip.cell(), chip.allowed()),
                        ));
                    }
                    (None, value) => inline(key, value)?,
                };
                if chip.is_none() && ChipValue::from_cell(&cell).is_some() {
                    return Err((
                        key.clone(),
                        format!(
                            "the value `{cell}` would be taken for the chip's; it cannot be stored beside chip values"
                        ),
                    ));
                }
                // The reference's Wi-Fi helper reads the text as written: it must stay so.
                if chip.is_none() && crate::format::is_wifi_key(key) && cell != *text {
                    return Err((
                        key.clone(),
                        "this Wi-Fi key's value is not written as the text it came from (a file, or another spelling); write it inline".into(),
                    ));
                }
                (key, "data", encoding, cell)
            }
        };
        if cell.len() > MAX_FIELD {
            return Err((
                key.clone(),
                format!("the value is longer than the {MAX_FIELD} characters a CSV field may hold"),
            ));
        }
        csv.push_str(&quote(key));
        csv.push(',');
        csv.push_str(kind);
        csv.push(',');
        csv.push_str(encoding);
        csv.push(',');
        csv.push_str(&quote(&cell));
        csv.push('\n');
    }
    Ok(csv)
}

/// A value as an encoding and a cell that decodes back to it.
fn inline(key: &str, value: &Value) -> Result<(&'static str, String), (String, String)> {
    Ok(match value {
        Value::U8(n) => ("u8", n.to_string()),
        Value::I8(n) => ("i8", n.to_string()),
        Value::U16(n) => ("u16", n.to_string()),
        Value::I16(n) => ("i16", n.to_string()),
        Value::U32(n) => ("u32", n.to_string()),
        Value::I32(n) => ("i32", n.to_string()),
        Value::U64(n) => ("u64", n.to_string()),
        Value::I64(n) => ("i64", n.to_string()),
        Value::F32(_) | Value::F64(_) => {
            return Err((
                key.to_owned(),
                "f32/f64 have no spelling in Espressif's CSV format, so they cannot be in a partition with chip values".into(),
            ));
        }
        Value::String(s) => {
            // Universal newlines and `#` lines are handled before CSV parsing, even inside
            // quotes: such text would not read back the same.
            if s.contains('\r') || s.contains("\n#") {
                return Err((
                    key.to_owned(),
                    "a string with a carriage return, or a line starting with `#`, cannot be written to a CSV so that it reads back the same".into(),
                ));
            }
            ("string", s.clone())
        }
        Value::Blob(bytes) => ("hex2bin", crate::encoding::hex(bytes)),
    })
}

/// A CSV field as Python's `excel` dialect reads it back.
fn quote(field: &str) -> String {
    if field.contains([',', '"', '\n']) {
        format!("\"{}\"", field.replace('"', "\"\""))
    } else {
        field.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_in_every_spelling() {
        let mac = Mac::parse("a4:cf:12:0B:1c:FE").unwrap();
        assert_eq!(mac.0, [0xa4, 0xcf, 0x12, 0x0b, 0x1c, 0xfe]);
        assert_eq!(mac.colon_upper(), "A4:CF:12:0B:1C:FE");
        assert_eq!(mac.hex_lower(), "a4cf120b1cfe");
        assert_eq!(mac.number(), 0xa4cf120b1cfe);
        assert_eq!(Mac::parse("a4cf120b1cfe"), Some(mac));
        assert_eq!(Mac::parse("a4-cf-12-0b-1c-fe"), Some(mac));
        for bad in [
            "",
            "a4:cf:12:0b:1c",
            "a4:cf:12:0b:1c:fe:00",
            "g4cf120b1cfe",
            "a4:cf120b1cfe",
        ] {
            assert_eq!(Mac::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn chip_values_fill_strings_and_u64_only() {
        let mac = Mac([1, 2, 3, 0xaa, 0xbb, 0xcc]);
        assert_eq!(
            ChipValue::Mac.fill(Encoding::String, &mac).unwrap().1,
            "01:02:03:AA:BB:CC"
        );
        assert_eq!(
            ChipValue::MacHex.fill(Encoding::String, &mac).unwrap().1,
            "010203aabbcc"
        );
        assert_eq!(
            ChipValue::Mac.fill(Encoding::U64, &mac).unwrap().1,
            "1108163083212"
        );
        assert!(ChipValue::MacHex.fill(Encoding::U64, &mac).is_err());
        assert!(ChipValue::Mac.fill(Encoding::U32, &mac).is_err());
        assert_eq!(
            ChipValue::from_cell("@chip:mac-hex"),
            Some(ChipValue::MacHex)
        );
        assert_eq!(ChipValue::from_cell("@chip:serial"), None);
        assert_eq!(ChipValue::from_cell("mac"), None);
    }

    #[test]
    fn recipes_quote_and_refuse_what_would_not_read_back() {
        let data = |key: &str, value: Value, text: &str, chip| RecipeRow::Data {
            key: key.into(),
            value,
            text: text.into(),
            chip,
        };
        let rows = vec![
            RecipeRow::Namespace("ns".into()),
            data("a", Value::String("x,\"y\"\nz".into()), "", None),
            data("b", Value::Blob(vec![0, 0xff]), "", None),
            data("c", Value::I16(-5), "", None),
            data("d", Value::U64(0), "", Some(ChipValue::Mac)),
        ];
        assert_eq!(
            recipe_csv(&rows, &["made by a test".into()]).unwrap(),
            "# made by a test\nkey,type,encoding,value\nns,namespace,,\na,data,string,\"x,\"\"y\"\"\nz\"\n\
             b,data,hex2bin,00ff\nc,data,i16,-5\nd,data,u64,@chip:mac\n"
        );
        for bad in [
            data("f", Value::F32(1.0), "1", None),
            data("s", Value::String("a\n# b".into()), "", None),
            data("s", Value::String("@chip:mac".into()), "@chip:mac", None),
            data("ap.passwd", Value::String("pw".into()), "pw.txt", None),
            data("n", Value::U32(1), "", Some(ChipValue::Mac)),
        ] {
            assert!(
                recipe_csv(&[RecipeRow::Namespace("ns".into()), bad.clone()], &[]).is_err(),
                "{bad:?}"
            );
        }
    }
}
