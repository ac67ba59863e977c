//! The Espressif CSV format (`key,type,encoding,value`), read exactly as Espressif's generator
//! reads it: header by name, `#` comment lines, quoted fields, every encoding, `file` rows and
//! several files into one image.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use crate::encoding::{Encoding, decode_fill};
use crate::error::{InputError, Location};
use crate::format::Value;
use crate::image::ImageInput;

/// Key names that make the reference write extra Wi-Fi entries (quirk Q2).
const WIFI_KEYS: [&str; 5] = [
    "ap.ssid",
    "ap.passwd",
    "ap.authmode",
    "sta.ssid",
    "sta.pswd",
];
const COLUMNS: [&str; 4] = ["key", "type", "encoding", "value"];

/// How relative paths in `file` rows are resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileBase {
    /// Against the process's current directory, as Espressif's generator does.
    CurrentDir,
    /// Against this folder (Cargo metadata mode: the manifest's folder).
    Dir(PathBuf),
}

impl FileBase {
    fn resolve(&self, path: &str) -> PathBuf {
        match self {
            FileBase::CurrentDir => PathBuf::from(path),
            FileBase::Dir(dir) => dir.join(path),
        }
    }
}

impl ImageInput {
    /// Reads a CSV file and adds its rows.
    pub fn add_csv_file(&mut self, path: &Path, files: &FileBase) -> Result<(), InputError> {
        let bytes = std::fs::read(path).map_err(|e| {
            InputError::new(
                Some(Location::file(path)),
                None,
                format!("cannot read the CSV file: {e}"),
            )
        })?;
        self.note_file_read(path);
        self.add_csv(path, &bytes, files)
    }

    /// Adds the rows of CSV text; `path` names it in errors.
    pub fn add_csv(
        &mut self,
        path: &Path,
        bytes: &[u8],
        files: &FileBase,
    ) -> Result<(), InputError> {
        if bytes.starts_with(b"\xEF\xBB\xBF") {
            return Err(InputError::new(
                Some(Location::line(path, 1)),
                None,
                "the file starts with a UTF-8 byte-order mark (BOM), which hides the `key` column; \
                 save it as UTF-8 without BOM",
            ));
        }
        let text = std::str::from_utf8(bytes).map_err(|e| {
            let line = 1 + bytes[..e.valid_up_to()]
                .iter()
                .filter(|&&b| b == b'\n')
                .count();
            InputError::new(
                Some(Location::line(path, line)),
                None,
                "the file is not valid UTF-8; save it as UTF-8",
            )
        })?;
        // Universal newlines, then drop lines starting with `#` before CSV parsing (as the
        // reference does, even inside a quoted multi-line field), remembering original numbers.
        let text = text.replace("\r\n", "\n").replace('\r', "\n");
        let mut kept = String::with_capacity(text.len());
        let mut line_numbers = Vec::new();
        for (number, line) in text.split_inclusive('\n').enumerate() {
            if !line.starts_with('#') {
                kept.push_str(line);
                line_numbers.push(number + 1);
            }
        }
        let original_line = |filtered: u64| -> usize {
            let i = (filtered as usize).saturating_sub(1);
            line_numbers.get(i).copied().unwrap_or(i + 1)
        };

        let mut reader = csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .from_reader(kept.as_bytes());
        let mut columns: Option<[Option<usize>; 4]> = None;
        let mut header = csv::StringRecord::new();
        let mut header_line = 1;
        let mut record = csv::StringRecord::new();
        loop {
            match reader.read_record(&mut record) {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    let line = e.position().map_or(1, |p| original_line(p.line()));
                    return Err(InputError::new(
                        Some(Location::line(path, line)),
                        None,
                        format!("malformed CSV: {e}"),
                    ));
                }
            }
            let line = record.position().map_or(1, |p| original_line(p.line()));
            let at = Location::line(path, line);
            let Some(columns) = &columns else {
                // The first record of each file is its header; a later column of the same
                // name wins, as in Python's DictReader.
                let mut found = [None; 4];
                for (i, name) in record.iter().enumerate() {
                    if let Some(c) = COLUMNS.iter().position(|&col| col == name) {
                        found[c] = Some(i);
                    }
                }
                columns = Some(found);
                header = record.clone();
                header_line = line;
                continue;
            };
            if let Some(missing) = COLUMNS.iter().zip(columns).find(|(_, c)| c.is_none()) {
                let found: Vec<&str> = header.iter().collect();
                return Err(InputError::new(
                    Some(Location::line(path, header_line)),
                    None,
                    format!(
                        "the header has no `{}` column (it has: {}); the first line must be `key,type,encoding,value`",
                        missing.0,
                        found.join(",")
                    ),
                ));
            }
            let field = |c: usize| columns[c].and_then(|i| record.get(i));
            self.add_row(at, [field(0), field(1), field(2), field(3)], files)?;
        }
        Ok(())
    }

    fn add_row(
        &mut self,
        at: Location,
        [key, ty, encoding, value]: [Option<&str>; 4],
        files: &FileBase,
    ) -> Result<(), InputError> {
        let short = |what: &str, key: Option<&str>| {
            InputError::new(
                Some(at.clone()),
                key,
                format!("the row has no `{what}` field; rows are `key,type,encoding,value`"),
            )
        };
        let key = key.ok_or_else(|| short("key", None))?;
        let ty = ty.ok_or_else(|| short("type", Some(key)))?;
        if ty == "namespace" {
            if WIFI_KEYS.contains(&key) {
                return Err(InputError::new(
                    Some(at),
                    Some(key),
                    "this Wi-Fi key name cannot be a namespace name (Espressif's generator treats it as a Wi-Fi value)",
                ));
            }
            return self.namespace(Some(at), key);
        }
        let encoding = encoding.ok_or_else(|| short("encoding", Some(key)))?;
        let value = value.ok_or_else(|| short("value", Some(key)))?;
        let err = |message: String| InputError::new(Some(at.clone()), Some(key), message);

        // The reference does not read files for the Wi-Fi station keys: the path is the value.
        let from_file = ty == "file" && !matches!(key, "sta.ssid" | "sta.pswd");
        let raw: Cow<[u8]> = if from_file {
            let path = files.resolve(value);
            let bytes = std::fs::read(&path).map_err(|e| {
                err(format!(
                    "cannot read file `{}`: {e} (relative paths resolve against {})",
                    path.display(),
                    match files {
                        FileBase::CurrentDir => "the current directory".to_owned(),
                        FileBase::Dir(dir) => format!("`{}`", dir.display()),
                    }
                ))
            })?;
            self.note_file_read(&path);
            Cow::Owned(bytes)
        } else {
            Cow::Borrowed(value.as_bytes())
        };
        let decoded = decode_value(encoding, &raw, from_file).map_err(err)?;
        self.add(Some(at), key, decoded, value)
    }
}

/// Decodes one value given its encoding cell and raw bytes (the cell, or a file's contents).
fn decode_value(encoding: &str, raw: &[u8], from_file: bool) -> Result<Value, String> {
    if let Some(filled) = decode_fill(encoding, raw) {
        return filled.map(Value::Blob);
    }
    let exact = Encoding::from_name(encoding);
    let enc = match exact {
        Some(enc) => enc,
        None => match Encoding::from_name(&encoding.to_lowercase()) {
            // The reference decodes by the exact spelling but picks the type after
            // lower-casing: `STRING` loses its NUL, `HEX2BIN`/`BASE64` store the text (Q3).
            Some(Encoding::String | Encoding::Hex2bin | Encoding::Base64) => {
                return Err(format!(
                    "encoding `{encoding}` must be written in lower case (`{}`); Espressif's generator \
                     would store this value undecoded",
                    encoding.to_lowercase()
                ));
            }
            Some(lower) => lower,
            None => {
                return Err(format!(
                    "unknown encoding `{encoding}`; use one of {}, blob_fill(N;0xPP), blob_sz_fill(N;0xPP)",
                    Encoding::NAMES
                ));
            }
        },
    };
    if enc == Encoding::Binary && !from_file && !raw.is_ascii() {
        // The reference records the character count as the size but writes the UTF-8 bytes:
        // the device would reject the item (quirk Q6).
        return Err(
            "`binary` values written in the CSV must be ASCII (Espressif's generator would write a \
             corrupt size for other characters); use hex2bin or a `file` row"
                .into(),
        );
    }
    enc.decode_bytes(raw)
}
