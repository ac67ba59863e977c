//! The CSV form, read row by row the way `gen_esp32part.py` reads it, then placed (blank offsets
//! filled in). The whole-table checks are in the parent module.

use std::path::Path;

use super::{
    BOOTLOADER_RECOVERY, CsvOptions, PRIMARY, Partition, PartitionKind, PartitionTable,
    SUBTYPE_UNDEFINED, TABLE_KEYWORDS_HINT, TABLE_SECTOR, TYPE_KEYWORDS, partition_label,
};
use crate::error::{Error, Location};

const FIELDS: usize = 6;
const FLAG_HINT: &str = "flags are `encrypted` and `readonly`, separated by `:` without spaces \
                         (e.g. encrypted:readonly)";
const NUMBER_HINT: &str = "write a decimal or 0x-prefixed hex number, optionally followed by K \
                           (×1024) or M (×1024²), e.g. 0x9000, 24K or 1M";

/// A field of a line: its trimmed text and the 1-based column where that text starts.
#[derive(Clone, Copy)]
struct Field<'a> {
    text: &'a str,
    column: usize,
}

/// What the Size column asks for.
#[derive(Clone, Copy)]
enum Size {
    Bytes(u64),
    /// `-N`: the partition ends at address N.
    EndAt(u64),
}

struct Row {
    partition: Partition,
    /// `None`: to be placed after the previous row.
    offset: Option<u64>,
    offset_column: usize,
    size: Size,
    size_column: usize,
}

pub(super) fn parse(
    path: &Path,
    text: &str,
    options: &CsvOptions,
) -> Result<PartitionTable, Error> {
    if let Some(bootloader) = options.primary_bootloader_offset {
        if bootloader >= options.table_offset {
            return Err(Error::new(
                Some(Location::file(path)),
                None,
                format!(
                    "the primary bootloader offset {bootloader:#x} is not below the partition \
                     table offset {:#x}; the bootloader sits before the table, so check both \
                     settings",
                    options.table_offset
                ),
            ));
        }
    }
    // Newer ESP-IDF reads BOM-prefixed CSV files too (its tests include one).
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut rows = Vec::new();
    for (index, raw) in lines(text).enumerate() {
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        rows.push(parse_row(path, index + 1, raw, options)?);
    }
    place(path, rows, options)
}

/// Python's `str.splitlines()`, so that line numbers match `gen_esp32part.py`'s.
fn lines(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(text);
    std::iter::from_fn(move || {
        let current = rest?;
        if current.is_empty() {
            rest = None;
            return None;
        }
        match current.char_indices().find(|(_, c)| is_line_break(*c)) {
            Some((at, c)) => {
                let mut next = at + c.len_utf8();
                if c == '\r' && current[next..].starts_with('\n') {
                    next += 1;
                }
                rest = Some(&current[next..]);
                Some(&current[..at])
            }
            None => {
                rest = None;
                Some(current)
            }
        }
    })
}

fn is_line_break(c: char) -> bool {
    matches!(
        c,
        '\n' | '\r'
            | '\x0b'
            | '\x0c'
            | '\x1c'
            | '\x1d'
            | '\x1e'
            | '\u{85}'
            | '\u{2028}'
            | '\u{2029}'
    )
}

fn split_fields(raw: &str) -> Vec<Field<'_>> {
    let mut fields = Vec::new();
    let mut start = 0;
    for piece in raw.split(',') {
        let lead = piece.len() - piece.trim_start().len();
        fields.push(Field {
            text: piece.trim(),
            column: raw[..start + lead].chars().count() + 1,
        });
        start += piece.len() + 1;
    }
    fields
}

fn parse_row(path: &Path, line: usize, raw: &str, options: &CsvOptions) -> Result<Row, Error> {
    let at = |column: usize, message: String| {
        Error::new(Some(Location::column(path, line, column)), None, message)
    };
    let fields = split_fields(raw);
    let end_column = raw.chars().count() + 1;
    let field = |index: usize| {
        fields.get(index).copied().unwrap_or(Field {
            text: "",
            column: end_column,
        })
    };

    if let Some(variable) = environment_variable(raw) {
        let column = raw[..variable].chars().count() + 1;
        return Err(at(
            column,
            "ESP-IDF would replace this `$VARIABLE` with an environment variable, which this \
             reader does not do (the build must not depend on the environment); write the value"
                .to_owned(),
        ));
    }
    if let Some(extra) = fields.iter().skip(FIELDS).find(|f| !f.text.is_empty()) {
        return Err(at(
            extra.column,
            format!(
                "this line has {} fields, but a partition has at most 6: Name, Type, SubType, \
                 Offset, Size, Flags (ESP-IDF ignores the rest); remove `{}`{}",
                fields.len(),
                extra.text,
                comment_hint(extra.text)
            ),
        ));
    }

    let name = field(0);
    if fields.len() == 1 && name.text.split_whitespace().nth(1).is_some() {
        return Err(at(
            name.column,
            "the fields of this line are separated by spaces; fields must be separated by \
             commas (Name, Type, SubType, Offset, Size, Flags)"
                .to_owned(),
        ));
    }
    if name.text.is_empty() {
        return Err(at(
            name.column,
            "the partition has no name; write one in the first column (Name)".to_owned(),
        ));
    }
    if name.text.len() > 16 {
        return Err(at(
            name.column,
            format!(
                "partition name `{}` is {} bytes long, but names have at most 16 bytes (ESP-IDF \
                 would cut it to `{}`); shorten it",
                name.text,
                name.text.len(),
                String::from_utf8_lossy(&name.text.as_bytes()[..16])
            ),
        ));
    }
    if name.text.contains('\0') {
        return Err(at(
            name.column,
            "the partition name contains a NUL character, which ends names in the binary table; \
             remove it"
                .to_owned(),
        ));
    }
    let label = format!("partition `{}`", name.text);

    let ty = field(1);
    if ty.text.is_empty() {
        return Err(at(
            ty.column,
            format!("{label} has no type; write {TABLE_KEYWORDS_HINT} in the second column (Type)"),
        ));
    }
    let type_byte = parse_byte(ty.text, TYPE_KEYWORDS).map_err(|problem| {
        at(
            ty.column,
            format!(
                "{label}: type `{}` {problem}; use {TABLE_KEYWORDS_HINT}",
                ty.text
            ),
        )
    })?;
    let kind = PartitionKind::from_byte(type_byte);

    let sub = field(2);
    let keywords = kind.subtype_keywords();
    let subtype = if sub.text.is_empty() {
        if kind == PartitionKind::App {
            return Err(at(
                sub.column,
                format!(
                    "{label} is an app and needs a subtype; write {} in the third column (SubType)",
                    subtype_hint(kind)
                ),
            ));
        }
        SUBTYPE_UNDEFINED
    } else {
        parse_byte(sub.text, keywords).map_err(|problem| {
            at(
                sub.column,
                format!(
                    "{label}: subtype `{}` {problem} for type {}; use {}",
                    sub.text,
                    kind.keyword()
                        .map_or_else(|| format!("{:#04x}", kind.byte()), str::to_owned),
                    subtype_hint(kind)
                ),
            )
        })?
    };

    let is = |k: PartitionKind, s: u8| kind == k && subtype == s;
    let bootloader_size = || -> Result<u64, Error> {
        let bootloader = needs_bootloader_offset(
            options.primary_bootloader_offset,
            ("primary", PRIMARY_SETTING),
            ty,
            &label,
            &at,
        )?;
        Ok(u64::from(options.table_offset) - u64::from(bootloader))
    };

    let offset_field = field(3);
    let offset = if is(PartitionKind::Bootloader, PRIMARY) {
        Some(u64::from(needs_bootloader_offset(
            options.primary_bootloader_offset,
            ("primary", PRIMARY_SETTING),
            ty,
            &label,
            &at,
        )?))
    } else if is(PartitionKind::Bootloader, BOOTLOADER_RECOVERY) {
        Some(u64::from(needs_bootloader_offset(
            options.recovery_bootloader_offset,
            ("recovery", RECOVERY_SETTING),
            ty,
            &label,
            &at,
        )?))
    } else if is(PartitionKind::PartitionTable, PRIMARY) {
        Some(u64::from(options.table_offset))
    } else if offset_field.text.is_empty() {
        None
    } else {
        let value = parse_number(offset_field.text).map_err(|problem| {
            at(
                offset_field.column,
                format!(
                    "{label}: offset `{}` {problem}; {NUMBER_HINT}",
                    offset_field.text
                ),
            )
        })?;
        match u32::try_from(value) {
            Ok(offset) => Some(u64::from(offset)),
            Err(_) => {
                return Err(at(
                    offset_field.column,
                    format!(
                        "{label}: offset `{}` is outside flash addresses (0 to 0xffffffff); \
                         use an address inside the flash, or leave it empty",
                        offset_field.text
                    ),
                ));
            }
        }
    };

    let size_field = field(4);
    let size = if kind == PartitionKind::Bootloader {
        Size::Bytes(bootloader_size()?)
    } else if kind == PartitionKind::PartitionTable {
        Size::Bytes(u64::from(TABLE_SECTOR))
    } else if size_field.text.is_empty() {
        return Err(at(
            size_field.column,
            format!(
                "{label} has no size; write one in the fifth column (Size), e.g. 0x6000 or 24K"
            ),
        ));
    } else {
        let value = parse_number(size_field.text).map_err(|problem| {
            at(
                size_field.column,
                format!(
                    "{label}: size `{}` {problem}; {NUMBER_HINT}",
                    size_field.text
                ),
            )
        })?;
        let magnitude = u32::try_from(value.unsigned_abs()).map_err(|_| {
            at(
                size_field.column,
                format!(
                    "{label}: size `{}` is more than the 4 GiB flash addresses can reach; \
                     make it smaller",
                    size_field.text
                ),
            )
        })?;
        if value < 0 {
            Size::EndAt(u64::from(magnitude))
        } else {
            Size::Bytes(u64::from(magnitude))
        }
    };

    let flags = field(5);
    let mut encrypted = false;
    let mut readonly = false;
    // Each flag exactly as written: `gen_esp32part.py` trims the column, not the flags.
    for flag in flags.text.split(':') {
        match flag {
            "" => {}
            "encrypted" => encrypted = true,
            "readonly" => readonly = true,
            other => {
                return Err(at(
                    flags.column,
                    format!(
                        "{label}: unknown flag `{other}`; {FLAG_HINT}{}",
                        comment_hint(other)
                    ),
                ));
            }
        }
    }

    Ok(Row {
        partition: Partition {
            name: name.text.to_owned(),
            kind,
            subtype,
            offset: 0,
            size: 0,
            encrypted,
            readonly,
            line: Some(line),
        },
        offset,
        offset_column: offset_field.column,
        size,
        size_column: size_field.column,
    })
}

/// Where each bootloader offset comes from in ESP-IDF, for the messages.
const PRIMARY_SETTING: &str = "`--primary-bootloader-offset`, CONFIG_BOOTLOADER_OFFSET_IN_FLASH: \
                               0x1000 on ESP32 and ESP32-S2, 0x0 on most newer chips";
const RECOVERY_SETTING: &str = "`--recovery-bootloader-offset`, CONFIG_BOOTLOADER_RECOVERY_OFFSET";

fn needs_bootloader_offset(
    offset: Option<u32>,
    (which, setting): (&str, &str),
    ty: Field<'_>,
    label: &str,
    at: &dyn Fn(usize, String) -> Error,
) -> Result<u32, Error> {
    offset.ok_or_else(|| {
        at(
            ty.column,
            format!(
                "{label} is a bootloader entry, whose place comes from the {which} bootloader \
                 offset rather than from this line, and that offset was not given ({setting}); \
                 provide it"
            ),
        )
    })
}

/// Fills in blank offsets and resolves `-N` sizes, in row order, as `gen_esp32part.py` does:
/// each row must start at or after the end of the previous one.
fn place(path: &Path, rows: Vec<Row>, options: &CsvOptions) -> Result<PartitionTable, Error> {
    let table_end = u64::from(options.table_offset) + u64::from(TABLE_SECTOR);
    let mut last_end = table_end;
    let mut previous: Option<(String, usize)> = None;
    let mut partitions = Vec::with_capacity(rows.len());
    for row in rows {
        let mut partition = row.partition;
        let line = partition.line.unwrap_or(0);
        let at = |column: usize, message: String| {
            Error::new(Some(Location::column(path, line, column)), None, message)
        };
        let label = partition_label(&partition);

        if partition.is_fixed_system_entry() {
            // Offset and size come from the configuration; they take no part in placement.
            partition.offset = row.offset.and_then(|o| u32::try_from(o).ok()).unwrap_or(0);
            if let Size::Bytes(size) = row.size {
                partition.size = u32::try_from(size).unwrap_or(u32::MAX);
            }
            partitions.push(partition);
            continue;
        }

        let offset = match row.offset {
            Some(offset) if offset < last_end => {
                let message = match &previous {
                    None => format!(
                        "{label} starts at {offset:#x}, inside the partition table sector \
                         ({:#x}..{table_end:#x}); start it at {table_end:#x} or later, or leave \
                         its Offset empty to have it placed automatically",
                        options.table_offset
                    ),
                    Some((name, previous_line)) => format!(
                        "{label} starts at {offset:#x}, before the end of partition `{name}` \
                         (line {previous_line}) at {last_end:#x}; list partitions in flash order \
                         without overlaps: start it at {last_end:#x} or later, or leave its \
                         Offset empty to have it placed automatically"
                    ),
                };
                return Err(at(row.offset_column, message));
            }
            Some(offset) => offset,
            None => {
                let align = u64::from(partition.kind.offset_alignment());
                last_end.div_ceil(align) * align
            }
        };
        let Ok(offset32) = u32::try_from(offset) else {
            return Err(at(
                row.offset_column,
                format!(
                    "{label} would start at {offset:#x}, beyond the 4 GiB that flash addresses \
                     can reach; make the partitions before it smaller"
                ),
            ));
        };
        let size = match row.size {
            Size::Bytes(size) => size,
            Size::EndAt(end) if end > offset => end - offset,
            Size::EndAt(end) => {
                return Err(at(
                    row.size_column,
                    format!(
                        "{label}: size -{end:#x} means \"up to address {end:#x}\", but the \
                         partition starts at {offset:#x}; use an end address above its start, \
                         or a positive size"
                    ),
                ));
            }
        };
        partition.offset = offset32;
        // Sizes were checked to fit in 32 bits; the whole-table checks report an end past 4 GiB.
        partition.size = u32::try_from(size).unwrap_or(u32::MAX);
        last_end = offset + size;
        previous = Some((partition.name.clone(), line));
        partitions.push(partition);
    }
    Ok(PartitionTable { partitions })
}

/// Why a field is not a value.
#[derive(Debug, PartialEq, Eq)]
enum Problem {
    NotANumber,
    TooLarge,
    Unknown,
    /// 0xFF is ESP-IDF's "any type"/"any subtype" wildcard (and ESP-IDF documents 0x00-0xFE).
    OutOfRange,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Problem::NotANumber => "is not a number",
            Problem::TooLarge => "is too large",
            Problem::Unknown => "is not a known name",
            Problem::OutOfRange => "is outside 0x00-0xFE",
        })
    }
}

/// A type or subtype: a number if it reads as one (as `gen_esp32part.py` tries first), else a
/// keyword in any letter case.
fn parse_byte(text: &str, keywords: &[(&str, u8)]) -> Result<u8, Problem> {
    match parse_number(text) {
        Ok(value) => match u8::try_from(value) {
            Ok(byte) if byte != 0xff => Ok(byte),
            _ => Err(Problem::OutOfRange),
        },
        Err(Problem::NotANumber) => {
            let lower = text.to_lowercase();
            keywords
                .iter()
                .find(|(name, _)| *name == lower)
                .map(|(_, byte)| *byte)
                .ok_or(if keywords.is_empty() {
                    Problem::NotANumber
                } else {
                    Problem::Unknown
                })
        }
        Err(other) => Err(other),
    }
}

/// `gen_esp32part.py`'s numbers: Python's `int(text, 0)` after one optional `K`/`M` suffix (any
/// case).
fn parse_number(text: &str) -> Result<i128, Problem> {
    let (body, multiplier) = match text.as_bytes().last() {
        Some(b'k' | b'K') => (&text[..text.len() - 1], 1024),
        Some(b'm' | b'M') => (&text[..text.len() - 1], 1024 * 1024),
        _ => (text, 1),
    };
    python_int(body)?
        .checked_mul(multiplier)
        .ok_or(Problem::TooLarge)
}

/// Python's `int(text, 0)` for ASCII digits: optional sign, `0x`/`0o`/`0b` prefixes, single `_`
/// between digits (and after a prefix), no leading zeros on decimal numbers other than zero.
fn python_int(text: &str) -> Result<i128, Problem> {
    let text = text.trim();
    let (negative, unsigned) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    let prefix = unsigned.get(..2).map(str::to_ascii_lowercase);
    let (radix, digits, prefixed) = match prefix.as_deref() {
        Some("0x") => (16, &unsigned[2..], true),
        Some("0o") => (8, &unsigned[2..], true),
        Some("0b") => (2, &unsigned[2..], true),
        _ => (10, unsigned, false),
    };
    let digits = match digits.strip_prefix('_') {
        Some(rest) if prefixed => rest,
        _ => digits,
    };
    if digits.is_empty()
        || digits.ends_with('_')
        || digits.starts_with('_')
        || digits.contains("__")
    {
        return Err(Problem::NotANumber);
    }
    let mut value: i128 = 0;
    let mut seen_nonzero = false;
    let mut leading_zero = false;
    for (i, c) in digits.chars().filter(|&c| c != '_').enumerate() {
        let digit = c.to_digit(radix).ok_or(Problem::NotANumber)?;
        if i == 0 && digit == 0 {
            leading_zero = true;
        }
        seen_nonzero |= digit != 0;
        value = value
            .checked_mul(i128::from(radix))
            .and_then(|v| v.checked_add(i128::from(digit)))
            .ok_or(Problem::TooLarge)?;
    }
    // Python refuses `010` (ambiguous with C octal) but takes `0` and `00`.
    if radix == 10 && leading_zero && seen_nonzero {
        return Err(Problem::NotANumber);
    }
    Ok(if negative { -value } else { value })
}

/// The byte index of a `$NAME` or `${` that Python's `os.path.expandvars` would expand.
fn environment_variable(raw: &str) -> Option<usize> {
    raw.match_indices('$').map(|(i, _)| i).find(|&i| {
        raw[i + 1..]
            .chars()
            .next()
            .is_some_and(|c| c == '{' || c == '_' || c.is_ascii_alphanumeric())
    })
}

fn subtype_hint(kind: PartitionKind) -> String {
    let mut names = Vec::new();
    for (name, _) in kind.subtype_keywords() {
        match name.strip_prefix("ota_") {
            Some("0") => names.push("ota_0..ota_15"),
            Some(_) => {}
            None => names.push(name),
        }
    }
    if names.is_empty() {
        "a number 0x00-0xFE".to_owned()
    } else {
        format!("one of {}, or a number 0x00-0xFE", names.join(", "))
    }
}

fn comment_hint(text: &str) -> &'static str {
    if text.contains('#') {
        "; `#` starts a comment only at the beginning of a line"
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_like_python_int_base_0() {
        for (text, value) in [
            ("0", 0),
            ("00", 0),
            ("0x9000", 0x9000),
            ("0X9000", 0x9000),
            ("0x_9000", 0x9000),
            ("0x9_000", 0x9000),
            ("36864", 36864),
            ("+5", 5),
            ("-2", -2),
            ("0o17", 15),
            ("0b101", 5),
            (" 7 ", 7),
        ] {
            assert_eq!(python_int(text), Ok(value), "{text}");
        }
        for text in [
            "", "010", "0x", "_1", "1_", "1__0", "0x__1", "1.0", "ten", "0x1g", "--1",
        ] {
            assert_eq!(python_int(text), Err(Problem::NotANumber), "{text}");
        }
        assert_eq!(
            python_int("0x1_0000_0000_0000_0000_0000_0000_0000_0000"),
            Err(Problem::TooLarge)
        );
    }

    #[test]
    fn suffixes_multiply_once() {
        assert_eq!(parse_number("24K"), Ok(24 * 1024));
        assert_eq!(parse_number("1m"), Ok(1 << 20));
        assert_eq!(parse_number("0x10k"), Ok(16 * 1024));
        assert_eq!(parse_number("-2M"), Ok(-(2 << 20)));
        assert_eq!(parse_number("4 K"), Ok(4096));
        assert_eq!(parse_number("1kk"), Err(Problem::NotANumber));
        assert_eq!(parse_number("K"), Err(Problem::NotANumber));
    }

    #[test]
    fn keywords_in_any_case_numbers_first() {
        assert_eq!(parse_byte("DATA", TYPE_KEYWORDS), Ok(1));
        assert_eq!(parse_byte("0x40", TYPE_KEYWORDS), Ok(0x40));
        assert_eq!(parse_byte("0xff", TYPE_KEYWORDS), Err(Problem::OutOfRange));
        assert_eq!(parse_byte("256", TYPE_KEYWORDS), Err(Problem::OutOfRange));
        assert_eq!(parse_byte("-1", TYPE_KEYWORDS), Err(Problem::OutOfRange));
        assert_eq!(parse_byte("apps", TYPE_KEYWORDS), Err(Problem::Unknown));
        assert_eq!(parse_byte("x", &[]), Err(Problem::NotANumber));
    }

    #[test]
    fn lines_split_like_python_splitlines() {
        let split: Vec<&str> = lines("a\r\nb\rc\nd\u{2028}e\x0cf\n").collect();
        assert_eq!(split, ["a", "b", "c", "d", "e", "f"]);
        assert_eq!(lines("").count(), 0);
        assert_eq!(lines("\n\n").collect::<Vec<_>>(), ["", ""]);
        assert_eq!(lines("x").collect::<Vec<_>>(), ["x"]);
    }

    #[test]
    fn field_columns_point_at_the_text() {
        let fields = split_fields("  nvs, data ,,é, 4K");
        let columns: Vec<(&str, usize)> = fields.iter().map(|f| (f.text, f.column)).collect();
        assert_eq!(
            columns,
            [("nvs", 3), ("data", 8), ("", 14), ("é", 15), ("4K", 18)]
        );
    }

    #[test]
    fn subtype_hints_are_readable() {
        assert_eq!(
            subtype_hint(PartitionKind::App),
            "one of factory, ota_0..ota_15, test, tee_0, tee_1, or a number 0x00-0xFE"
        );
        assert_eq!(
            subtype_hint(PartitionKind::Other(0x40)),
            "a number 0x00-0xFE"
        );
    }
}
