use std::fmt;
use std::path::{Path, PathBuf};

use crate::format::FormatError;

/// Where in an input file something was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub path: PathBuf,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
}

impl Location {
    pub fn file(path: &Path) -> Location {
        Location {
            path: path.to_owned(),
            line: None,
            column: None,
        }
    }

    pub fn line(path: &Path, line: usize) -> Location {
        Location {
            path: path.to_owned(),
            line: Some(line),
            column: None,
        }
    }
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
pub struct InputError {
    pub location: Option<Location>,
    pub key: Option<String>,
    pub message: String,
    /// The format-level cause, when the format core refused the item.
    pub format: Option<FormatError>,
}

impl InputError {
    pub fn new(location: Option<Location>, key: Option<&str>, message: impl Into<String>) -> Self {
        InputError {
            location,
            key: key.map(str::to_owned),
            message: message.into(),
            format: None,
        }
    }

    pub fn from_format(location: Option<Location>, key: Option<&str>, err: FormatError) -> Self {
        InputError {
            location,
            key: key.map(str::to_owned),
            message: err.to_string(),
            format: Some(err),
        }
    }
}

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(location) = &self.location {
            write!(f, "{location}: ")?;
        }
        match &self.key {
            // Format messages already name the key.
            Some(key) if !self.message.contains(&format!("`{key}`")) => {
                write!(f, "key `{key}`: {}", self.message)
            }
            _ => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for InputError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.format.as_ref().map(|e| e as _)
    }
}
