//! The Espressif CSV format (`key,type,encoding,value`), read exactly as Espressif's generator
//! reads it: header by name, `#` comment lines, quoted fields, every encoding, `file` rows and
//! several files into one image.

use std::borrow::Cow;
use std::cell::RefCell;
use std::path::{Path, PathBuf};

use csv_core::ReadRecordResult;

use crate::encoding::{Encoding, decode_fill};
use crate::error::{Error, Location, read_input};
use crate::format::Value;
use crate::image::ImageInput;

const COLUMNS: [&str; 4] = ["key", "type", "encoding", "value"];
/// Python's csv module refuses longer fields (`csv.field_size_limit()`).
pub(crate) const MAX_FIELD_CHARS: usize = 131_072;

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
    pub fn add_csv_file(&mut self, path: &Path, files: &FileBase) -> Result<(), Error> {
        let bytes = read_input(path, "CSV file")?;
        self.note_file_read(path);
        self.add_csv(path, &bytes, files)
    }

    /// Adds the rows of CSV text; `path` names it in errors.
    pub fn add_csv(&mut self, path: &Path, bytes: &[u8], files: &FileBase) -> Result<(), Error> {
        if bytes.starts_with(b"\xEF\xBB\xBF") {
            return Err(Error::new(
                Some(Location::line(path, 1)),
                None,
                "the file starts with a UTF-8 byte-order mark (BOM), which hides the `key` column; \
                 save it as UTF-8 without BOM",
            ));
        }
        let text =
            crate::error::utf8_text(path, bytes, "the file is not valid UTF-8; save it as UTF-8")?;
        // Universal newlines, then drop lines starting with `#` before CSV parsing (as the
        // reference does, even inside a quoted multi-line field), remembering original numbers.
        let text: Cow<str> = if text.contains('\r') {
            Cow::Owned(text.replace("\r\n", "\n").replace('\r', "\n"))
        } else {
            Cow::Borrowed(text)
        };
        let has_comments = text.starts_with('#') || text.contains("\n#");
        let mut line_numbers = Vec::new();
        let kept: Cow<str> = if has_comments {
            let mut kept = String::with_capacity(text.len());
            for (number, line) in text.split_inclusive('\n').enumerate() {
                if !line.starts_with('#') {
                    kept.push_str(line);
                    line_numbers.push(number + 1);
                }
            }
            Cow::Owned(kept)
        } else {
            text
        };
        // Line `n` of the kept text is line `original_line(n)` of the file.
        let original_line = |n: usize| {
            if has_comments {
                line_numbers.get(n - 1).copied().unwrap_or(n)
            } else {
                n
            }
        };
        let mut columns: Option<[Option<usize>; 4]> = None;
        let mut header: Vec<String> = Vec::new();
        let mut header_line = original_line(1);
        if kept.starts_with('\n') {
            // A blank first line is an empty header to Python's DictReader (and every row then
            // lacks its columns); csv-core would skip it.
            columns = Some([None; 4]);
        }
        // One location, updated per row: rows allocate nothing unless they fail.
        let mut at = Location::line(path, 1);
        for_each_record(&kept, |filtered_line, record| {
            let line = original_line(filtered_line);
            at.line = Some(line);
            if let Some(long) = record
                .iter()
                .find(|f| f.len() > MAX_FIELD_CHARS && f.chars().count() > MAX_FIELD_CHARS)
            {
                return Err(Error::new(
                    Some(at.clone()),
                    None,
                    format!(
                        "a field of {} characters is longer than the {MAX_FIELD_CHARS} Espressif's generator can read; \
                         put large values in a file and use a `file` row",
                        long.chars().count()
                    ),
                ));
            }
            let Some(columns) = &columns else {
                // The first record of each file is its header; a later column of the same
                // name wins, as in Python's DictReader.
                let mut found = [None; 4];
                for (i, name) in record.iter().enumerate() {
                    if let Some(c) = COLUMNS.iter().position(|col| col == name) {
                        found[c] = Some(i);
                    }
                }
                columns = Some(found);
                header = record.iter().map(|f| f.to_string()).collect();
                header_line = line;
                return Ok(());
            };
            if let Some(missing) = COLUMNS.iter().zip(columns).find(|(_, c)| c.is_none()) {
                return Err(Error::new(
                    Some(Location::line(path, header_line)),
                    None,
                    format!(
                        "the header has no `{}` column (it has: {}); the first line must be `key,type,encoding,value`",
                        missing.0,
                        if header.is_empty() {
                            "nothing: the line is blank".to_owned()
                        } else {
                            header.join(",")
                        }
                    ),
                ));
            }
            let field = |c: usize| columns[c].and_then(|i| record.get(i).copied());
            self.add_row(&at, [field(0), field(1), field(2), field(3)], files)
        })?;
        Ok(())
    }

    fn add_row(
        &mut self,
        at: &Location,
        [key, ty, encoding, value]: [Option<&str>; 4],
        files: &FileBase,
    ) -> Result<(), Error> {
        let short = |what: &str, key: Option<&str>| {
            Error::new(
                Some(at.clone()),
                key,
                format!("the row has no `{what}` field; rows are `key,type,encoding,value`"),
            )
        };
        let key = key.ok_or_else(|| short("key", None))?;
        let ty = ty.ok_or_else(|| short("type", Some(key)))?;
        if ty == "namespace" {
            if crate::format::is_wifi_key(key) {
                return Err(Error::new(
                    Some(at.clone()),
                    Some(key),
                    "this Wi-Fi key name cannot be a namespace name (Espressif's generator treats it as a Wi-Fi value)",
                ));
            }
            return self.namespace(Some(at), key);
        }
        let encoding = encoding.ok_or_else(|| short("encoding", Some(key)))?;
        let value = value.ok_or_else(|| short("value", Some(key)))?;
        let err = |message: String| Error::new(Some(at.clone()), Some(key), message);

        // Mass production's extension: `@chip:mac` takes the chip's MAC, when one is set.
        if let (Some(mac), Some(chip), false) = (
            self.chip_mac(),
            crate::chip::ChipValue::from_cell(value),
            ty == "file",
        ) {
            let (value, text) = Encoding::from_name(encoding)
                .ok_or_else(|| chip.misfit())
                .and_then(|enc| chip.fill(enc, &mac))
                .map_err(|why| err(format!("{why} (encoding `{encoding}`)")))?;
            return self.add_from(Some(at), key, value, &text, Some(chip));
        }
        // The reference does not read files for the Wi-Fi station keys: the path is the value.
        let from_file = ty == "file" && !matches!(key, "sta.ssid" | "sta.pswd");
        let raw: Cow<[u8]> = if from_file {
            let path = files.resolve(value);
            let bytes = crate::error::read_limited(&path, crate::error::MAX_VALUE_FILE_BYTES)
                .map_err(|e| {
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
        if from_file && !raw.is_empty() {
            // The reference fails on this (it expects the cell's text).
            return Err(format!(
                "`{encoding}` pads the value written in the CSV; it cannot take a `file` row"
            ));
        }
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
    if from_file {
        return enc.decode_file(raw);
    }
    let text = std::str::from_utf8(raw).map_err(|_| "the value is not valid UTF-8".to_owned())?;
    enc.decode(text)
}

thread_local! {
    /// One csv-core reader per thread, reset for each file: building its DFA costs more than
    /// parsing a typical NVS CSV.
    static READER: RefCell<csv_core::Reader> = RefCell::new(csv_core::Reader::new());
}

/// Calls `f` with each record of `text` (Python's `excel` dialect: `,` and `"` with doubled
/// quotes; `\n` line ends) and the 1-based line of `text` it starts on. Blank lines are skipped.
fn for_each_record<E>(
    text: &str,
    mut f: impl FnMut(usize, &[&str]) -> Result<(), E>,
) -> Result<(), E> {
    READER.with(|reader| {
        let mut reader = reader.borrow_mut();
        reader.reset();
        let bytes = text.as_bytes();
        let (mut pos, mut line) = (0, 1);
        let mut out = vec![0u8; 256.max(text.len())];
        let mut ends = vec![0usize; 8];
        loop {
            // csv-core skips blank lines; skip them here so the line counted is the record's.
            while bytes.get(pos) == Some(&b'\n') {
                pos += 1;
                line += 1;
            }
            let start_line = line;
            let (mut nout, mut nend) = (0, 0);
            loop {
                // Empty input (at the end) tells csv-core the text is over.
                let (result, nin, o, e) =
                    reader.read_record(&bytes[pos..], &mut out[nout..], &mut ends[nend..]);
                line += bytes[pos..pos + nin]
                    .iter()
                    .filter(|&&b| b == b'\n')
                    .count();
                pos += nin;
                nout += o;
                nend += e;
                match result {
                    ReadRecordResult::InputEmpty => {}
                    ReadRecordResult::OutputFull => out.resize(out.len() * 2, 0),
                    ReadRecordResult::OutputEndsFull => ends.resize(ends.len() * 2, 0),
                    ReadRecordResult::Record => break,
                    ReadRecordResult::End => return Ok(()),
                }
            }
            // Fields split at ASCII bytes of valid UTF-8 text, so the record is valid UTF-8
            // and every field boundary is a character boundary.
            let record = std::str::from_utf8(&out[..nout]).unwrap_or_default();
            let mut bounds = [(0usize, 0usize); 8];
            let mut start = 0;
            if nend <= bounds.len() {
                for (bound, &end) in bounds.iter_mut().zip(&ends[..nend]) {
                    *bound = (start, end);
                    start = end;
                }
                let mut fields = [""; 8];
                for (field, &(a, b)) in fields.iter_mut().zip(&bounds[..nend]) {
                    *field = record.get(a..b).unwrap_or_default();
                }
                f(start_line, &fields[..nend])?;
            } else {
                let fields: Vec<&str> = ends[..nend]
                    .iter()
                    .map(|&end| {
                        let field = record.get(start..end).unwrap_or_default();
                        start = end;
                        field
                    })
                    .collect();
                f(start_line, &fields)?;
            }
        }
    })
}
