use std::fmt;
use std::path::{Path, PathBuf};

use crate::format::FormatError;

/// Where in an input file something was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    /// The file.
    pub path: PathBuf,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
}

impl Location {
    /// The whole file.
    pub fn file(path: &Path) -> Location {
        Location {
            path: path.to_owned(),
            line: None,
            column: None,
        }
    }

    /// A line of a file (1-based).
    pub fn line(path: &Path, line: usize) -> Location {
        Location {
            path: path.to_owned(),
            line: Some(line),
            column: None,
        }
    }

    /// A line and column of a file (both 1-based).
    pub fn column(path: &Path, line: usize, column: usize) -> Location {
        Location {
            path: path.to_owned(),
            line: Some(line),
            column: Some(column),
        }
    }
}

/// `bytes` as UTF-8 text; the error (`message`) names the line of the first invalid byte.
pub(crate) fn utf8_text<'a>(path: &Path, bytes: &'a [u8], message: &str) -> Result<&'a str, Error> {
    std::str::from_utf8(bytes).map_err(|e| {
        let line = 1 + bytes[..e.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        Error::new(Some(Location::line(path, line)), None, message)
    })
}

/// Reads an input file; the error names the file and says which input it is (`what`).
pub(crate) fn read_input(path: &Path, what: &str) -> Result<Vec<u8>, Error> {
    read_input_max(path, what, MAX_INPUT_BYTES)
}

/// [`read_input`] with a smaller cap (key files, value files).
pub(crate) fn read_input_max(path: &Path, what: &str, limit: u64) -> Result<Vec<u8>, Error> {
    read_limited(path, limit).map_err(|e| {
        Error::new(
            Some(Location::file(path)),
            None,
            format!("cannot read the {what}: {e}"),
        )
    })
}

/// Largest input read whole (CSV files, manifests, partition tables, images): twice the
/// largest ESP flash (128 MiB), so a mistaken `/dev/zero` or disk image stops with an error
/// instead of filling memory.
pub const MAX_INPUT_BYTES: u64 = 256 << 20;
/// Largest file a single value comes from: no NVS value exceeds 508,000 bytes, even as hex.
pub const MAX_VALUE_FILE_BYTES: u64 = 16 << 20;
/// Largest key file: an nvs_keys partition image is 4 KiB, an HMAC key 32 bytes.
pub const MAX_KEY_FILE_BYTES: u64 = 1 << 20;

/// Reads a whole file of at most `limit` bytes; a longer one (or an endless device such as
/// `/dev/zero`) is an `InvalidData` error after reading `limit + 1` bytes at most.
pub fn read_limited(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    let hint = file.metadata().map_or(0, |m| m.len());
    if hint > limit {
        return Err(too_large(limit));
    }
    let mut bytes = Vec::with_capacity(hint as usize);
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(too_large(limit));
    }
    Ok(bytes)
}

fn too_large(limit: u64) -> std::io::Error {
    let size = if limit >= 1 << 20 {
        format!("{} MiB", limit >> 20)
    } else {
        format!("{limit} bytes")
    };
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("it is larger than {size}, more than this input can be (is it the right file?)"),
    )
}

/// [`read_input`] for text files.
pub(crate) fn read_input_text(path: &Path, what: &str) -> Result<String, Error> {
    String::from_utf8(read_input(path, what)?).map_err(|_| {
        Error::new(
            Some(Location::file(path)),
            None,
            format!("the {what} is not valid UTF-8"),
        )
    })
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        Ok(())
    }
}

/// An error in the inputs of an image (a CSV file, Cargo metadata, a partition table or a file
/// they name), with the place it was found and the key concerned.
#[derive(Debug)]
pub struct Error(Box<Details>);

#[derive(Debug)]
struct Details {
    location: Option<Location>,
    key: Option<String>,
    message: String,
    format: Option<FormatError>,
    span_length: Option<usize>,
}

impl Error {
    #[doc(hidden)]
    pub fn new(location: Option<Location>, key: Option<&str>, message: impl Into<String>) -> Self {
        Error(Box::new(Details {
            location,
            key: key.map(str::to_owned),
            message: message.into(),
            format: None,
            span_length: None,
        }))
    }

    #[doc(hidden)]
    pub fn from_format(location: Option<Location>, key: Option<&str>, err: FormatError) -> Self {
        let mut e = Error::new(location, key, err.to_string());
        e.0.format = Some(err);
        e
    }

    /// The same error with the length of the offending text, in characters from the location's
    /// column.
    #[doc(hidden)]
    pub fn with_span_length(mut self, characters: usize) -> Self {
        self.0.span_length = Some(characters);
        self
    }

    /// The same error with `note` appended to its message.
    pub fn with_note(mut self, note: &str) -> Self {
        self.0.message.push_str(note);
        self
    }

    /// Where in which input file, when the error concerns one.
    pub fn location(&self) -> Option<&Location> {
        self.0.location.as_ref()
    }

    /// The key concerned, when there is one.
    pub fn key(&self) -> Option<&str> {
        self.0.key.as_deref()
    }

    /// How many characters the offending text spans from the location's column, when known
    /// (Cargo metadata: the key or value concerned), so that a caller can underline it.
    pub fn span_length(&self) -> Option<usize> {
        self.0.span_length
    }

    /// The message without location and key.
    pub fn message(&self) -> &str {
        &self.0.message
    }

    /// The format-level cause, when the format core refused the item.
    pub fn format_error(&self) -> Option<&FormatError> {
        self.0.format.as_ref()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(location) = &self.0.location {
            write!(f, "{location}: ")?;
        }
        match (&self.0.key, &self.0.format) {
            // Format-core messages name the key themselves.
            (Some(key), None) => write!(f, "key `{key}`: {}", self.0.message),
            _ => f.write_str(&self.0.message),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.format.as_ref().map(|e| e as _)
    }
}
