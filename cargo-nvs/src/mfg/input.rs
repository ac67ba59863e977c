//! mfg_gen's inputs: the config CSV (`key,type,encoding[,REPEAT]`, no header), the values CSV
//! (a header of key names, one row per device), and each device's equivalent generator CSV.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use crate::fsutil::FileError;
use nvs_build::Location;

/// Why a config or values CSV cannot be used; every message names the file and line.
#[derive(Debug, thiserror::Error)]
pub enum ValuesError {
    /// What is wrong at a place in the file, and how to fix it.
    #[error("{0}")]
    Invalid(String),
    /// What is wrong at a line of the config file (which holds no values).
    #[error(transparent)]
    Config(nvs_build::InputError),
    /// What is wrong at a line of the values file (per-device values: the line is never shown).
    #[error(transparent)]
    Values(nvs_build::InputError),
    #[error(transparent)]
    File(#[from] FileError),
    /// The CSV reader's own error at a line.
    #[error("{}:{line}: {source}", path.display())]
    Csv {
        path: PathBuf,
        line: usize,
        #[source]
        source: csv::Error,
    },
}

/// mfg_gen's encodings, plus `i16`, which mfg_gen forgets in its list (and so refuses) although
/// the generator supports it.
const ENCODINGS: [&str; 12] = [
    "string", "binary", "hex2bin", "base64", "u8", "i8", "u16", "i16", "u32", "i32", "u64", "i64",
];

/// One config row, with the fields mfg_gen writes to the device CSV (REPEAT removed).
#[derive(Debug)]
pub struct ConfigRow {
    pub line: usize,
    pub key: String,
    pub ty: String,
    pub encoding: String,
    /// The values column this data row takes its value from (`None` for namespaces).
    pub column: Option<usize>,
    pub repeat: bool,
}

impl ConfigRow {
    pub fn is_namespace(&self) -> bool {
        self.ty == "namespace"
    }
}

/// An error at `path:line`, about `key` when given.
fn at(
    path: &Path,
    line: usize,
    key: Option<&str>,
    message: impl Into<String>,
) -> nvs_build::InputError {
    nvs_build::InputError::new(Some(Location::line(path, line)), key, message)
}

fn refuse_bom(path: &Path, bytes: &[u8]) -> Result<(), ValuesError> {
    if bytes.starts_with(b"\xEF\xBB\xBF") {
        return Err(ValuesError::Values(at(
            path,
            1,
            None,
            "the file starts with a UTF-8 byte-order mark (BOM), which mfg_gen reads as part of \
             the first name; save it as UTF-8 without BOM",
        )));
    }
    Ok(())
}

/// Reads the next record; errors name the file line.
fn read_record<R: BufRead>(
    reader: &mut csv::Reader<LineFilter<R>>,
    record: &mut csv::StringRecord,
    path: &Path,
) -> Result<bool, ValuesError> {
    reader.read_record(record).map_err(|e| {
        let offset = e.position().map_or(0, |p| p.byte());
        csv_error(path, reader.get_mut().line_at(offset), e)
    })
}

fn csv_error(path: &Path, line: usize, e: csv::Error) -> ValuesError {
    match e.kind() {
        csv::ErrorKind::Utf8 { .. } => ValuesError::Values(at(
            path,
            line,
            None,
            "the file is not valid UTF-8; save it as UTF-8",
        )),
        // Our own line-length refusal names its line.
        csv::ErrorKind::Io(io) if io.kind() == std::io::ErrorKind::InvalidData => {
            ValuesError::Invalid(format!("{}: {io}", path.display()))
        }
        _ => ValuesError::Csv {
            path: path.to_owned(),
            line,
            source: e,
        },
    }
}

fn reader<R: Read>(input: R) -> csv::Reader<R> {
    csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(input)
}

/// Reads and checks the config file.
pub fn read_config(path: &Path) -> Result<Vec<ConfigRow>, ValuesError> {
    let bytes = nvs_build::read_limited(path, nvs_build::MAX_INPUT_BYTES)
        .map_err(|e| FileError::new("read the config file", path, e))?;
    refuse_bom(path, &bytes)?;
    let mut rows = Vec::new();
    let mut seen_namespace = false;
    let mut input = reader(LineFilter::new(bytes.as_slice()));
    let mut record = csv::StringRecord::new();
    while read_record(&mut input, &mut record, path)? {
        let offset = record.position().map_or(0, |p| p.byte());
        let line = input.get_mut().line_at(offset);
        let config =
            |key: Option<&str>, message: String| ValuesError::Config(at(path, line, key, message));
        let repeat = record.len() == 4 && &record[3] == "REPEAT";
        if record.len() != 3 && !repeat {
            return Err(config(
                None,
                format!(
                    "the row has {} field(s); config rows are `key,type,encoding` (data, \
                     optionally followed by `,REPEAT`) or `name,namespace,`",
                    record.len()
                ),
            ));
        }
        let (key, ty, encoding) = (&record[0], &record[1], &record[2]);
        match ty {
            "namespace" if repeat => {
                return Err(config(
                    None,
                    format!("namespace `{key}`: REPEAT applies to data rows only"),
                ));
            }
            "namespace" => seen_namespace = true,
            "data" | "file" => {
                if !ENCODINGS.contains(&encoding) {
                    return Err(config(
                        Some(key),
                        format!(
                            "invalid encoding `{encoding}`; use one of {}",
                            ENCODINGS.join(", ")
                        ),
                    ));
                }
                if !seen_namespace {
                    return Err(config(
                        None,
                        format!(
                            "key `{key}` comes before any namespace row; start the file with \
                             `name,namespace,`"
                        ),
                    ));
                }
            }
            _ => {
                return Err(config(
                    Some(key),
                    format!("invalid type `{ty}`; use data, file or namespace"),
                ));
            }
        }
        rows.push(ConfigRow {
            line,
            key: key.to_owned(),
            ty: ty.to_owned(),
            encoding: encoding.to_owned(),
            column: None,
            repeat,
        });
    }
    if rows.is_empty() {
        return Err(ValuesError::Invalid(format!(
            "{}: the config file is empty; it needs `name,namespace,` and `key,type,encoding` rows",
            path.display()
        )));
    }
    Ok(rows)
}

/// Matches config keys to header columns: every config key, in config order (as mfg_gen
/// requires); other columns are metadata.
pub fn bind_columns(
    config_path: &Path,
    rows: &mut [ConfigRow],
    values_path: &Path,
    header: &[String],
) -> Result<(), ValuesError> {
    let mut next = 0;
    for row in rows.iter_mut().filter(|r| !r.is_namespace()) {
        let found = header[next..].iter().position(|h| *h == row.key);
        let Some(offset) = found else {
            let why = if header.contains(&row.key) {
                "is in the header, but not in config order (config keys must appear in the same order)"
            } else {
                "is not a column of the values file's header"
            };
            return Err(ValuesError::Config(at(
                config_path,
                row.line,
                None,
                format!(
                    "key `{}` {why} (header at {}:1)",
                    row.key,
                    values_path.display()
                ),
            )));
        };
        row.column = Some(next + offset);
        next += offset + 1;
    }
    Ok(())
}

/// The values file, read one record at a time.
pub struct Values {
    pub path: PathBuf,
    pub header: Vec<String>,
    pub header_line: usize,
    reader: csv::Reader<LineFilter<BufReader<File>>>,
    record: csv::StringRecord,
}

/// Drops whitespace-only lines, as mfg_gen does before parsing (even inside a quoted field,
/// where it shortens the value), and maps offsets in what it passes on back to the file's line
/// numbers. Only the lines the csv reader has read ahead are remembered.
pub struct LineFilter<R> {
    inner: R,
    line: Vec<u8>,
    pos: usize,
    emitted: u64,
    lines_read: usize,
    /// (offset in the filtered stream, 1-based line in the file) of lines passed on.
    starts: VecDeque<(u64, usize)>,
}

impl<R: BufRead> LineFilter<R> {
    pub fn new(inner: R) -> Self {
        LineFilter {
            inner,
            line: Vec::new(),
            pos: 0,
            emitted: 0,
            lines_read: 0,
            starts: VecDeque::new(),
        }
    }

    /// The file line of the byte at `offset` of the filtered stream; offsets must not decrease
    /// between calls.
    fn line_at(&mut self, offset: u64) -> usize {
        while self.starts.len() > 1 && self.starts[1].0 <= offset {
            self.starts.pop_front();
        }
        self.starts.front().map_or(self.lines_read.max(1), |s| s.1)
    }
}

/// Python's `str.isspace()` for a line (with its line break); invalid UTF-8 is not blank.
fn is_blank_line(line: &[u8]) -> bool {
    std::str::from_utf8(line).is_ok_and(|text| {
        text.chars()
            .all(|c| c.is_whitespace() || ('\x1c'..='\x1f').contains(&c))
    })
}

/// Longest line of a values file: fields are at most 131,072 characters (Python's
/// `csv.field_size_limit()`, which mfg_gen's reader keeps), so a longer line is not a values
/// file; it is refused before it fills memory.
pub const MAX_VALUES_LINE: usize = 4 << 20;
/// Longest field mfg_gen's CSV reader accepts (Python's `csv.field_size_limit()`).
pub const MAX_FIELD_CHARS: usize = 131_072;

impl<R: BufRead> LineFilter<R> {
    /// `read_until(b'\n')` that stops with an error past [`MAX_VALUES_LINE`] bytes.
    fn read_line_capped(&mut self) -> std::io::Result<usize> {
        loop {
            let available = self.inner.fill_buf()?;
            if available.is_empty() {
                return Ok(self.line.len());
            }
            let (take, done) = match available.iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (available.len(), false),
            };
            if self.line.len() + take > MAX_VALUES_LINE {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "line {} is longer than {} MiB; a values file holds fields of at most {MAX_FIELD_CHARS} \
                         characters (mfg_gen's limit): put large values in files and use `file` rows",
                        self.lines_read + 1,
                        MAX_VALUES_LINE >> 20
                    ),
                ));
            }
            self.line.extend_from_slice(&available[..take]);
            self.inner.consume(take);
            if done {
                return Ok(self.line.len());
            }
        }
    }
}

impl<R: BufRead> Read for LineFilter<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.line.len() {
            self.line.clear();
            self.pos = 0;
            if self.read_line_capped()? == 0 {
                return Ok(0);
            }
            self.lines_read += 1;
            if is_blank_line(&self.line) {
                self.line.clear();
            } else {
                self.starts.push_back((self.emitted, self.lines_read));
            }
        }
        let n = buf.len().min(self.line.len() - self.pos);
        buf[..n].copy_from_slice(&self.line[self.pos..self.pos + n]);
        self.pos += n;
        self.emitted += n as u64;
        Ok(n)
    }
}

/// One device row of the values file.
pub struct DeviceRow {
    pub line: usize,
    pub fields: Vec<String>,
}

impl Values {
    pub fn open(path: &Path) -> Result<Values, ValuesError> {
        let file = File::open(path).map_err(|e| FileError::new("read the values file", path, e))?;
        let mut input = BufReader::with_capacity(1 << 16, file);
        let start = input.fill_buf().map_err(FileError::reading(path))?;
        if start.is_empty() {
            return Err(ValuesError::Invalid(format!(
                "{}: the values file is empty; it needs a header of key names and one row per device",
                path.display()
            )));
        }
        refuse_bom(path, start)?;
        let mut values = Values {
            path: path.to_owned(),
            header: Vec::new(),
            header_line: 1,
            reader: reader(LineFilter::new(input)),
            record: csv::StringRecord::new(),
        };
        let Some(header) = values.next_record()? else {
            return Err(ValuesError::Invalid(format!(
                "{}: the values file has no header row",
                path.display()
            )));
        };
        values.header_line = header.line;
        values.header = header.fields;
        Ok(values)
    }

    fn next_record(&mut self) -> Result<Option<DeviceRow>, ValuesError> {
        let mut row = DeviceRow {
            line: 0,
            fields: Vec::new(),
        };
        Ok(self.read_record_into(&mut row)?.then_some(row))
    }

    /// Reads the next record into `row`, reusing its strings; false at the end.
    fn read_record_into(&mut self, row: &mut DeviceRow) -> Result<bool, ValuesError> {
        let more = read_record(&mut self.reader, &mut self.record, &self.path)?;
        if !more {
            return Ok(false);
        }
        let offset = self.record.position().map_or(0, |p| p.byte());
        row.line = self.reader.get_mut().line_at(offset);
        if let Some(i) = self
            .record
            .iter()
            .position(|f| f.len() > MAX_FIELD_CHARS && f.chars().count() > MAX_FIELD_CHARS)
        {
            return Err(ValuesError::Values(at(
                &self.path,
                row.line,
                None,
                format!(
                    "field {} holds more than {MAX_FIELD_CHARS} characters, more than mfg_gen's \
                     CSV reader accepts; put large values in files and use `file` rows",
                    i + 1
                ),
            )));
        }
        row.fields.truncate(self.record.len());
        for (i, field) in self.record.iter().enumerate() {
            match row.fields.get_mut(i) {
                Some(old) => {
                    old.clear();
                    old.push_str(field);
                }
                None => row.fields.push(field.to_owned()),
            }
        }
        Ok(true)
    }

    /// The next device row, checked to have one field per header column.
    pub fn next_device(&mut self) -> Result<Option<DeviceRow>, ValuesError> {
        let mut row = DeviceRow {
            line: 0,
            fields: Vec::new(),
        };
        Ok(self.read_device_into(&mut row)?.then_some(row))
    }

    /// Reads the next device row into `row` (reusing its strings), checked to have one field per
    /// header column; false at the end.
    pub fn read_device_into(&mut self, row: &mut DeviceRow) -> Result<bool, ValuesError> {
        if !self.read_record_into(row)? {
            return Ok(false);
        }
        if row.fields.len() != self.header.len() {
            let detail = if row.fields.len() < self.header.len() {
                format!("column `{}` has no value", self.header[row.fields.len()])
            } else {
                format!(
                    "{} field(s) after the last column `{}`",
                    row.fields.len() - self.header.len(),
                    self.header.last().map_or("", String::as_str)
                )
            };
            return Err(ValuesError::Values(at(
                &self.path,
                row.line,
                None,
                format!(
                    "the row has {} field(s) but the header (line {}) has {}: {detail}",
                    row.fields.len(),
                    self.header_line,
                    self.header.len()
                ),
            )));
        }
        Ok(true)
    }
}

/// Line breaks normalised to `\n`, as the generator's universal-newline read sees them, so
/// that lines can be counted.
fn normalised(field: &str) -> std::borrow::Cow<'_, str> {
    if field.contains('\r') {
        field.replace("\r\n", "\n").replace('\r', "\n").into()
    } else {
        field.into()
    }
}

/// The generator CSV mfg_gen writes for one device (`key,type,encoding,value`; namespace rows
/// with an empty value), and the line each config row starts on in it. A `csv::Writer` quotes
/// as Python's `csv.writer` does: a field holding `,` `"` or a line break.
pub fn device_csv<'v>(
    rows: &[ConfigRow],
    value: impl Fn(&ConfigRow) -> &'v str,
    starts: &mut Vec<usize>,
) -> String {
    let mut out = csv::WriterBuilder::new()
        .buffer_capacity(256)
        .from_writer(Vec::with_capacity(256));
    // Writing to memory cannot fail.
    let written = "a csv::Writer over a Vec";
    out.write_record(["key", "type", "encoding", "value"])
        .expect(written);
    starts.clear();
    let mut line = 2;
    for row in rows {
        starts.push(line);
        out.flush().expect(written);
        let begin = out.get_ref().len();
        let value = if row.is_namespace() { "" } else { value(row) };
        out.write_record([
            &*normalised(&row.key),
            &*normalised(&row.ty),
            &*normalised(&row.encoding),
            &*normalised(value),
        ])
        .expect(written);
        out.flush().expect(written);
        line += out.get_ref()[begin..]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
    }
    let bytes = out.into_inner().expect(written);
    String::from_utf8(bytes).expect("the CSV of UTF-8 fields")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(key: &str, ty: &str, encoding: &str) -> ConfigRow {
        ConfigRow {
            line: 1,
            key: key.into(),
            ty: ty.into(),
            encoding: encoding.into(),
            column: None,
            repeat: false,
        }
    }

    #[test]
    fn device_csv_quotes_like_python_and_counts_lines() {
        let rows = [
            row("app", "namespace", ""),
            row("a", "data", "string"),
            row("b", "data", "string"),
        ];
        let mut starts = Vec::new();
        let csv = device_csv(
            &rows,
            |r| {
                if r.key == "a" {
                    "x,\"y\"\r\nz"
                } else {
                    "plain"
                }
            },
            &mut starts,
        );
        assert_eq!(
            csv,
            "key,type,encoding,value\napp,namespace,,\na,data,string,\"x,\"\"y\"\"\nz\"\nb,data,string,plain\n"
        );
        assert_eq!(starts, [2, 3, 5]);
    }

    #[test]
    fn blank_lines_are_dropped_even_in_quotes_and_lines_keep_their_numbers() {
        let text = b"a,b\n\n  \r\n1,\"x\n\n \ny\"\n\n2,z\n";
        let mut input = reader(LineFilter::new(&text[..]));
        let mut record = csv::StringRecord::new();
        let mut seen = Vec::new();
        while read_record(&mut input, &mut record, Path::new("v.csv")).unwrap() {
            let offset = record.position().unwrap().byte();
            let line = input.get_mut().line_at(offset);
            seen.push((line, record.iter().map(str::to_owned).collect::<Vec<_>>()));
        }
        let row = |line, fields: &[&str]| (line, fields.iter().map(|f| f.to_string()).collect());
        assert_eq!(
            seen,
            [
                row(1, &["a", "b"]),
                row(4, &["1", "x\ny"]),
                row(9, &["2", "z"])
            ]
        );
    }
}
