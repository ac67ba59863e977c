//! `$OUT_DIR/nvs/manifest.json` (schema `nvs-build/manifest/v1`): the one type that the build
//! script writes and `cargo nvs` reads. serde_json is beyond nvs-build's crate budget, so the
//! writer is by hand and the reader is a small JSON parser: objects, arrays, strings, unsigned
//! integers, `true`, `false` and `null` — everything the writer writes, in any layout and key
//! order, and nothing else.

use std::path::{Path, PathBuf};

use crate::GeneratedImage;
use crate::metadata::Metadata;

/// What a build put into `$OUT_DIR/nvs`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Manifest {
    /// The package's Cargo.toml (its `[package.metadata.nvs]` made the images); `None` in
    /// manifests of older nvs-build versions.
    pub manifest_path: Option<PathBuf>,
    /// The partition table the images were placed by (`None`: ESP-IDF's default).
    pub partition_table: Option<PathBuf>,
    /// One per partition of the metadata, in its order (`partitions` in the file).
    pub images: Vec<ManifestImage>,
}

/// One partition of the manifest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ManifestImage {
    pub name: String,
    pub offset: u32,
    pub size: u32,
    pub factory: bool,
    pub encrypted: bool,
    /// A key comes from the environment or per device (the image may hold secrets); false
    /// in manifests of older nvs-build versions, which do not record it.
    pub secret: bool,
    pub keys_file: Option<PathBuf>,
    /// The image, unless the partition was skipped.
    pub file: Option<PathBuf>,
    /// Why the partition was skipped.
    pub skipped: Option<String>,
}

/// Why a text is not a manifest [`Manifest::parse`] can use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ManifestError {
    /// Not JSON (or JSON beyond what the writer writes: fractions, signs, deep nesting).
    Json {
        /// Byte offset of the problem.
        at: usize,
        what: &'static str,
    },
    /// JSON, but not of schema `nvs-build/manifest/v1`.
    Schema,
    /// The schema, with a field missing or out of range.
    Malformed {
        /// The field, as `partitions[1].offset`.
        field: String,
    },
}

impl std::fmt::Display for ManifestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ManifestError::Json { at, what } => write!(f, "{what} at byte {at}"),
            ManifestError::Schema => write!(f, "not of schema `{}`", Manifest::SCHEMA),
            ManifestError::Malformed { field } => write!(f, "`{field}` is missing or invalid"),
        }
    }
}

impl std::error::Error for ManifestError {}

impl Manifest {
    /// The `schema` the file names.
    pub const SCHEMA: &'static str = "nvs-build/manifest/v1";
    /// Its name in `$OUT_DIR/nvs`.
    pub const FILE_NAME: &'static str = "manifest.json";

    /// `$OUT_DIR/nvs/manifest.json` of `out_dir` (`$OUT_DIR`).
    pub fn path_in(out_dir: &Path) -> PathBuf {
        out_dir.join("nvs").join(Manifest::FILE_NAME)
    }

    /// The manifest of `images`, made from `metadata`.
    pub(crate) fn of(metadata: &Metadata, images: &[GeneratedImage]) -> Manifest {
        Manifest {
            manifest_path: Some(metadata.manifest_path.clone()),
            partition_table: metadata.table_source.path().map(Path::to_path_buf),
            images: images
                .iter()
                .map(|image| ManifestImage {
                    name: image.partition.clone(),
                    offset: image.offset,
                    size: image.size,
                    factory: image.factory,
                    encrypted: image.encrypted,
                    secret: image.secret,
                    keys_file: image.keys_file.clone(),
                    file: image.path.clone(),
                    skipped: image.skipped.clone(),
                })
                .collect(),
        }
    }

    /// The file's text: one line per partition.
    pub fn to_json(&self) -> String {
        let mut out = format!("{{\n  \"schema\": {},\n", json_string(Manifest::SCHEMA));
        out.push_str(&format!(
            "  \"manifest_path\": {},\n",
            json_opt_path(self.manifest_path.as_deref())
        ));
        out.push_str(&format!(
            "  \"partition_table\": {},\n",
            json_opt_path(self.partition_table.as_deref())
        ));
        out.push_str("  \"partitions\": [");
        for (i, image) in self.images.iter().enumerate() {
            out.push_str(if i == 0 { "\n" } else { ",\n" });
            out.push_str(&format!(
                "    {{\"name\": {}, \"offset\": {}, \"size\": {}, \"factory\": {}, \"encrypted\": {}, \"secret\": {}, \"keys_file\": {}, \"file\": {}, \"skipped\": {}}}",
                json_string(&image.name),
                image.offset,
                image.size,
                image.factory,
                image.encrypted,
                image.secret,
                json_opt_path(image.keys_file.as_deref()),
                json_opt_path(image.file.as_deref()),
                image.skipped.as_deref().map_or("null".to_owned(), json_string),
            ));
        }
        out.push_str("\n  ]\n}\n");
        out
    }

    /// Reads a manifest's text. Strict where a wrong value would put an image at the wrong
    /// address (`name`, `offset`, `size`, `factory`); `secret` and `encrypted` default to false,
    /// as older versions did not write them; unknown keys are ignored.
    pub fn parse(text: &str) -> Result<Manifest, ManifestError> {
        let doc = Parser::new(text).document()?;
        if doc.get("schema").and_then(Json::as_str) != Some(Manifest::SCHEMA) {
            return Err(ManifestError::Schema);
        }
        let malformed = |field: String| ManifestError::Malformed { field };
        let Some(Json::Array(partitions)) = doc.get("partitions") else {
            return Err(malformed("partitions".into()));
        };
        let mut images = Vec::with_capacity(partitions.len());
        for (i, p) in partitions.iter().enumerate() {
            let field = |name: &str| format!("partitions[{i}].{name}");
            let u32_of = |name: &str| {
                p.get(name)
                    .and_then(Json::as_u64)
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| malformed(field(name)))
            };
            let flag = |name: &str| p.get(name).and_then(Json::as_bool);
            images.push(ManifestImage {
                name: p
                    .get("name")
                    .and_then(Json::as_str)
                    .ok_or_else(|| malformed(field("name")))?
                    .to_owned(),
                offset: u32_of("offset")?,
                size: u32_of("size")?,
                factory: flag("factory").ok_or_else(|| malformed(field("factory")))?,
                encrypted: flag("encrypted").unwrap_or(false),
                secret: flag("secret").unwrap_or(false),
                keys_file: p.get("keys_file").and_then(Json::as_path),
                file: p.get("file").and_then(Json::as_path),
                skipped: p.get("skipped").and_then(Json::as_str).map(str::to_owned),
            });
        }
        Ok(Manifest {
            manifest_path: doc.get("manifest_path").and_then(Json::as_path),
            partition_table: doc.get("partition_table").and_then(Json::as_path),
            images,
        })
    }
}

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn json_opt_path(path: Option<&Path>) -> String {
    path.map_or("null".to_owned(), |p| json_string(&p.display().to_string()))
}

/// A JSON value of the kinds the writer writes.
#[derive(Debug, PartialEq)]
enum Json {
    Null,
    Bool(bool),
    Number(u64),
    String(String),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

impl Json {
    /// The value of `key` of an object (the last, if repeated).
    fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Object(members) => members.iter().rev().find(|(k, _)| k == key).map(|m| &m.1),
            _ => None,
        }
    }

    fn as_str(&self) -> Option<&str> {
        match self {
            Json::String(s) => Some(s),
            _ => None,
        }
    }

    fn as_path(&self) -> Option<PathBuf> {
        self.as_str().map(PathBuf::from)
    }

    fn as_u64(&self) -> Option<u64> {
        match self {
            Json::Number(n) => Some(*n),
            _ => None,
        }
    }

    fn as_bool(&self) -> Option<bool> {
        match self {
            Json::Bool(b) => Some(*b),
            _ => None,
        }
    }
}

/// Nesting deeper than this is no manifest (and would cost stack).
const MAX_DEPTH: usize = 8;

struct Parser<'t> {
    text: &'t str,
    at: usize,
}

impl<'t> Parser<'t> {
    fn new(text: &'t str) -> Parser<'t> {
        Parser { text, at: 0 }
    }

    fn error(&self, what: &'static str) -> ManifestError {
        ManifestError::Json { at: self.at, what }
    }

    /// One value and nothing but white space after it.
    fn document(mut self) -> Result<Json, ManifestError> {
        let value = self.value(0)?;
        self.skip_space();
        if self.at != self.text.len() {
            return Err(self.error("text after the JSON value"));
        }
        Ok(value)
    }

    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.at).copied()
    }

    fn skip_space(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    fn eat(&mut self, byte: u8) -> bool {
        self.skip_space();
        let found = self.peek() == Some(byte);
        if found {
            self.at += 1;
        }
        found
    }

    fn value(&mut self, depth: usize) -> Result<Json, ManifestError> {
        if depth > MAX_DEPTH {
            return Err(self.error("nesting too deep"));
        }
        self.skip_space();
        match self.peek() {
            Some(b'{') => {
                self.at += 1;
                let mut members = Vec::new();
                if self.eat(b'}') {
                    return Ok(Json::Object(members));
                }
                loop {
                    self.skip_space();
                    if self.peek() != Some(b'"') {
                        return Err(self.error("expected a key"));
                    }
                    let key = self.string()?;
                    if !self.eat(b':') {
                        return Err(self.error("expected `:`"));
                    }
                    members.push((key, self.value(depth + 1)?));
                    if self.eat(b'}') {
                        return Ok(Json::Object(members));
                    }
                    if !self.eat(b',') {
                        return Err(self.error("expected `,` or `}`"));
                    }
                }
            }
            Some(b'[') => {
                self.at += 1;
                let mut items = Vec::new();
                if self.eat(b']') {
                    return Ok(Json::Array(items));
                }
                loop {
                    items.push(self.value(depth + 1)?);
                    if self.eat(b']') {
                        return Ok(Json::Array(items));
                    }
                    if !self.eat(b',') {
                        return Err(self.error("expected `,` or `]`"));
                    }
                }
            }
            Some(b'"') => self.string().map(Json::String),
            Some(b'0'..=b'9') => {
                let start = self.at;
                while matches!(self.peek(), Some(b'0'..=b'9')) {
                    self.at += 1;
                }
                let digits = &self.text[start..self.at];
                if (digits.len() > 1 && digits.starts_with('0'))
                    || matches!(self.peek(), Some(b'.' | b'e' | b'E'))
                {
                    return Err(self.error("not an unsigned integer"));
                }
                digits
                    .parse()
                    .map(Json::Number)
                    .map_err(|_| self.error("number too large"))
            }
            _ => {
                for (word, value) in [
                    ("true", Json::Bool(true)),
                    ("false", Json::Bool(false)),
                    ("null", Json::Null),
                ] {
                    if self.text[self.at..].starts_with(word) {
                        self.at += word.len();
                        return Ok(value);
                    }
                }
                Err(self.error("expected a JSON value"))
            }
        }
    }

    /// A string; `self.at` is at its opening quote.
    fn string(&mut self) -> Result<String, ManifestError> {
        self.at += 1;
        let mut out = String::new();
        loop {
            let rest = &self.text[self.at..];
            let Some(special) = rest.find(|c: char| c == '"' || c == '\\' || c < ' ') else {
                return Err(self.error("unterminated string"));
            };
            out.push_str(&rest[..special]);
            self.at += special;
            match self.peek() {
                Some(b'"') => {
                    self.at += 1;
                    return Ok(out);
                }
                Some(b'\\') => {
                    self.at += 1;
                    let escaped = match self.peek() {
                        Some(b'"') => '"',
                        Some(b'\\') => '\\',
                        Some(b'/') => '/',
                        Some(b'b') => '\u{8}',
                        Some(b'f') => '\u{c}',
                        Some(b'n') => '\n',
                        Some(b'r') => '\r',
                        Some(b't') => '\t',
                        Some(b'u') => {
                            self.at += 1;
                            let unit = self.hex4()?;
                            let code = if (0xD800..0xDC00).contains(&unit)
                                && self.text[self.at..].starts_with("\\u")
                            {
                                self.at += 2;
                                let low = self.hex4()?;
                                if !(0xDC00..0xE000).contains(&low) {
                                    return Err(self.error("unpaired surrogate"));
                                }
                                0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00)
                            } else {
                                unit
                            };
                            out.push(char::from_u32(code).ok_or(self.error("unpaired surrogate"))?);
                            continue;
                        }
                        _ => return Err(self.error("invalid escape")),
                    };
                    self.at += 1;
                    out.push(escaped);
                }
                _ => return Err(self.error("control character in a string")),
            }
        }
    }

    fn hex4(&mut self) -> Result<u32, ManifestError> {
        let digits = self
            .text
            .get(self.at..self.at + 4)
            .filter(|d| d.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or(self.error("invalid \\u escape"))?;
        self.at += 4;
        Ok(u32::from_str_radix(digits, 16).expect("four hex digits"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            manifest_path: Some(PathBuf::from("/p/Cargo.toml")),
            partition_table: None,
            images: vec![
                ManifestImage {
                    name: "fctry".into(),
                    offset: 0x9000,
                    size: 0x6000,
                    factory: true,
                    encrypted: true,
                    secret: true,
                    keys_file: Some("/o/nvs/nvs_keys.bin".into()),
                    file: Some("/o/nvs/fctry \"a\\b\u{1}\u{e9}\u{1F600}.bin".into()),
                    skipped: None,
                },
                ManifestImage {
                    name: "nvs".into(),
                    offset: 0xF000,
                    size: u32::MAX,
                    skipped: Some("no `dev` value".into()),
                    ..ManifestImage::default()
                },
            ],
        }
    }

    #[test]
    fn reads_what_it_writes() {
        let manifest = sample();
        assert_eq!(Manifest::parse(&manifest.to_json()), Ok(manifest));
        let empty = Manifest::default();
        assert_eq!(Manifest::parse(&empty.to_json()), Ok(empty));
    }

    #[test]
    fn the_layout_as_written() {
        let text = sample().to_json();
        assert!(text.starts_with(
            "{\n  \"schema\": \"nvs-build/manifest/v1\",\n  \"manifest_path\": \"/p/Cargo.toml\",\n  \"partition_table\": null,\n  \"partitions\": [\n    {\"name\": \"fctry\", \"offset\": 36864, "
        ));
        assert!(text.contains(r#"fctry \"a\\b\u0001é😀.bin"#), "{text}");
        assert!(text.ends_with("\"skipped\": \"no `dev` value\"}\n  ]\n}\n"));
    }

    #[test]
    fn any_layout_and_older_manifests() {
        let text = r#" { "partitions" : [ { "size":24576,"offset":36864,"name":"nvs","factory":false,
            "file":"a\u00e9\ud83d\ude00\/b","extra":[1,{"x":null}] } ] ,"schema":"nvs-build/manifest/v1"}"#;
        let manifest = Manifest::parse(text).unwrap();
        assert_eq!(manifest.manifest_path, None);
        let image = &manifest.images[0];
        assert_eq!(
            (image.offset, image.size, image.secret),
            (0x9000, 0x6000, false)
        );
        assert_eq!(image.file.as_deref(), Some(Path::new("aé😀/b")));
    }

    #[test]
    fn refusals() {
        let json = |text: &str| matches!(Manifest::parse(text), Err(ManifestError::Json { .. }));
        for bad in [
            "",
            "{",
            r#"{"a":1,}"#,
            r#"{"a":-1}"#,
            r#"{"a":1.5}"#,
            r#"{"a":01}"#,
            r#"{"a":18446744073709551616}"#,
            r#"{"a":"\x"}"#,
            r#"{"a":"\ud800"}"#,
            "{\"a\":\"\n\"}",
            r#"{} {}"#,
            "[[[[[[[[[[[[]]]]]]]]]]]]",
            "tru",
        ] {
            assert!(json(bad), "{bad:?}");
        }
        assert_eq!(
            Manifest::parse(r#"{"schema":"nvs-build/manifest/v2"}"#),
            Err(ManifestError::Schema)
        );
        let malformed = |partition: &str| {
            Manifest::parse(&format!(
                r#"{{"schema":"nvs-build/manifest/v1","partitions":[{partition}]}}"#
            ))
            .unwrap_err()
            .to_string()
        };
        assert!(
            malformed(r#"{"name":"nvs","offset":4294967296,"size":1,"factory":false}"#)
                .contains("partitions[0].offset")
        );
        assert!(malformed(r#"{"name":"nvs","offset":1,"size":1}"#).contains("factory"));
        assert!(malformed(r#"{"offset":1,"size":1,"factory":true}"#).contains("name"));
    }
}
