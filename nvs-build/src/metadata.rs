//! `[package.metadata.nvs]` in Cargo.toml → resolved partition specs.
//!
//! The manifest is parsed with spans, so every error points at `Cargo.toml:LINE:COL` and names
//! the offending key. Declaration order is preserved: a partition's listed CSV files come
//! first, then its inline namespaces and keys in the order written.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::chip::ChipValue;
use crate::encoding::Encoding;
use crate::error::{Error, Location, read_input_text};
use crate::format::Version;
use crate::table::{NvsPartitionError, Partition, PartitionTable};

type Key<'i> = Spanned<Cow<'i, str>>;
type Val<'i> = Spanned<DeValue<'i>>;

/// The NVS configuration of one package.
#[derive(Clone, Debug)]
pub struct Metadata {
    pub manifest_path: PathBuf,
    /// Relative paths in the metadata (and in its CSV files) resolve against this folder.
    pub manifest_dir: PathBuf,
    pub table: PartitionTable,
    pub table_source: TableSource,
    /// The espflash.toml that was consulted (beside the manifest or one folder up), if any.
    pub espflash_config: Option<PathBuf>,
    pub partitions: Vec<PartitionSpec>,
}

/// Where the partition table came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TableSource {
    /// `partition-table = "…"` in the metadata.
    Metadata(PathBuf),
    /// `[idf] partition_table` in espflash.toml.
    EspflashToml { config: PathBuf, table: PathBuf },
    /// `partitions.csv` beside Cargo.toml.
    Conventional(PathBuf),
    /// None configured: ESP-IDF's default single-app table, as espflash uses.
    BuiltInDefault,
}

impl TableSource {
    /// The table file, if there is one (for `rerun-if-changed`).
    pub fn path(&self) -> Option<&Path> {
        match self {
            TableSource::Metadata(p) | TableSource::Conventional(p) => Some(p),
            TableSource::EspflashToml { table, .. } => Some(table),
            TableSource::BuiltInDefault => None,
        }
    }
}

/// One NVS partition to generate.
#[derive(Clone, Debug)]
pub struct PartitionSpec {
    pub name: String,
    pub at: Location,
    pub offset: u32,
    pub size: u32,
    /// Factory data (read-only): the table flags it `readonly` or the metadata says so.
    /// Everything else is user data, kept when the device is re-flashed.
    pub factory: bool,
    pub version: Version,
    /// The oldest ESP-IDF the firmware reading this partition may use (`idf-version`, as
    /// (major, minor)); `None` when not given. Float types need 6.1.
    pub idf_version: Option<(u32, u32)>,
    /// CSV files in the Espressif format, in order, with where they were listed.
    pub csv: Vec<(PathBuf, Location)>,
    pub namespaces: Vec<NamespaceSpec>,
    pub encryption: Option<(EncryptionSpec, Location)>,
}

impl PartitionSpec {
    /// Every key written in the metadata, namespace by namespace.
    pub fn entries(&self) -> impl Iterator<Item = &EntrySpec> {
        self.namespaces.iter().flat_map(|ns| &ns.entries)
    }

    /// Whether a key takes its value from the chip.
    pub fn has_chip_values(&self) -> bool {
        self.entries()
            .any(|e| matches!(e.source, ValueSource::Chip { .. }))
    }

    /// The first per-device key without a `dev` value: the partition has no development image.
    pub fn missing_dev(&self) -> Option<&EntrySpec> {
        self.entries()
            .find(|e| matches!(&e.source, ValueSource::PerDevice { dev: None, .. }))
    }

    /// Whether a key takes its value from the environment or per device: such values are
    /// often secrets (passwords, device keys), so the image's file is kept private (mode 0600
    /// on Unix). CSV rows have no such sources.
    pub fn holds_secrets(&self) -> bool {
        self.entries().any(|e| {
            matches!(
                e.source,
                ValueSource::Env { .. } | ValueSource::PerDevice { .. }
            )
        })
    }
}

/// How a partition is encrypted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EncryptionSpec {
    /// With the key in this nvs_keys file.
    KeyFile(PathBuf),
    /// With keys derived from this HMAC key file (HMAC scheme).
    HmacKey(PathBuf),
}

#[derive(Clone, Debug)]
pub struct NamespaceSpec {
    pub name: String,
    pub at: Location,
    pub entries: Vec<EntrySpec>,
}

/// One key with its encoding and where its value comes from.
#[derive(Clone, Debug)]
pub struct EntrySpec {
    pub key: String,
    pub at: Location,
    pub encoding: Encoding,
    pub source: ValueSource,
}

/// Where a value comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ValueSource {
    /// Written in the manifest (as text in the encoding's spelling).
    Text(String),
    /// A TOML integer.
    Integer(i128),
    /// A file's contents (path relative to the manifest's folder).
    File(PathBuf),
    /// An environment variable, with an optional fallback.
    Env {
        var: String,
        default: Option<String>,
    },
    /// Filled in per device by mass production (`column` of the values file); `dev` is used
    /// for development builds and flashing.
    PerDevice { column: String, dev: Option<String> },
    /// Taken from the chip at flash time (mass production); `dev` is used for development
    /// builds and `cargo nvs generate`.
    Chip {
        value: crate::chip::ChipValue,
        dev: String,
    },
}

impl Metadata {
    /// Reads `[package.metadata.nvs]` from a manifest. Returns `Ok(None)` when the package has
    /// no such table.
    pub fn from_manifest(manifest_path: &Path) -> Result<Option<Metadata>, Error> {
        let text = read_input_text(manifest_path, "manifest")?;
        Metadata::parse(manifest_path, &text)
    }

    /// Parses manifest text (`manifest_path` names it in errors and anchors relative paths).
    pub fn parse(manifest_path: &Path, text: &str) -> Result<Option<Metadata>, Error> {
        let doc = Doc::new(manifest_path, text);
        let root = DeTable::parse(text).map_err(|e| {
            let at = e.span().map(|s| doc.location(s.start));
            Error::new(
                at.or_else(|| Some(Location::file(manifest_path))),
                None,
                format!("invalid TOML: {}", e.message()),
            )
        })?;
        let Some(nvs) = lookup(root.get_ref(), "package")
            .and_then(|(_, v)| v.get_ref().as_table())
            .and_then(|t| lookup(t, "metadata"))
            .and_then(|(_, v)| v.get_ref().as_table())
            .and_then(|t| lookup(t, "nvs"))
        else {
            return Ok(None);
        };
        let manifest_dir = manifest_path
            .parent()
            .map(Path::to_owned)
            .unwrap_or_default();
        let nvs_table = doc.table(nvs.1, "package.metadata.nvs")?;
        // `mfg` ([package.metadata.nvs.mfg]: the mass-production ledger) belongs to cargo-nvs,
        // which reads and checks it; image building ignores it.
        doc.only_keys(
            nvs_table,
            &[
                "partition-table",
                "partition-table-offset",
                "partitions",
                "mfg",
            ],
        )?;

        let offset_override = match lookup(nvs_table, "partition-table-offset") {
            Some((_, v)) => Some(doc.u32_value(v, "partition-table-offset")?),
            None => None,
        };
        let configured = match lookup(nvs_table, "partition-table") {
            Some((_, v)) => Some(manifest_dir.join(doc.string(v, "partition-table")?)),
            None => None,
        };
        let (table, table_source, espflash_config) =
            load_table(&manifest_dir, configured, offset_override)?;

        let mut partitions = Vec::new();
        if let Some((_, parts)) = lookup(nvs_table, "partitions") {
            for (name, spec) in doc.table(parts, "partitions")? {
                partitions.push(doc.partition(name, spec, &table, &table_source)?);
            }
        }
        Ok(Some(Metadata {
            manifest_path: manifest_path.to_owned(),
            manifest_dir,
            table,
            table_source,
            espflash_config,
            partitions,
        }))
    }
}

/// Finds the partition table: the metadata's, espflash.toml's, `partitions.csv`, or ESP-IDF's
/// default single-app table.
fn load_table(
    manifest_dir: &Path,
    configured: Option<PathBuf>,
    offset_override: Option<u32>,
) -> Result<(PartitionTable, TableSource, Option<PathBuf>), Error> {
    // espflash.toml counts even when the metadata names the table: its table offset is the
    // one espflash will flash the table at.
    let espflash = espflash_table(manifest_dir)?;
    let (config, espflash_path, espflash_offset) = match espflash {
        Some((config, table, offset)) => (Some(config), table, offset),
        None => (None, None, None),
    };
    let source = match (configured, espflash_path, &config) {
        (Some(path), _, _) => TableSource::Metadata(path),
        (None, Some(table), Some(config)) => TableSource::EspflashToml {
            config: config.clone(),
            table,
        },
        _ => conventional_or_default(manifest_dir),
    };
    let offset = offset_override
        .or(espflash_offset)
        .unwrap_or(PartitionTable::DEFAULT_OFFSET);
    let table = match source.path() {
        Some(path) => PartitionTable::load(path, offset)?,
        None => PartitionTable::default_single_app_at(offset)?,
    };
    Ok((table, source, config))
}

fn conventional_or_default(manifest_dir: &Path) -> TableSource {
    let conventional = manifest_dir.join("partitions.csv");
    if conventional.is_file() {
        TableSource::Conventional(conventional)
    } else {
        TableSource::BuiltInDefault
    }
}

/// espflash.toml beside the manifest or one folder up (where espflash looks, relative to the
/// package rather than the current directory): its `[idf]` (or `[idf_format_args]`)
/// `partition_table` and `partition_table_offset`.
#[allow(clippy::type_complexity)]
fn espflash_table(
    manifest_dir: &Path,
) -> Result<Option<(PathBuf, Option<PathBuf>, Option<u32>)>, Error> {
    let candidates = [Some(manifest_dir), manifest_dir.parent()];
    let Some(config) = candidates
        .iter()
        .flatten()
        .map(|d| d.join("espflash.toml"))
        .find(|p| p.is_file())
    else {
        return Ok(None);
    };
    let text = read_input_text(&config, "espflash.toml")?;
    let doc = Doc::new(&config, &text);
    let root = DeTable::parse(&text).map_err(|e| {
        let at = e.span().map(|s| doc.location(s.start));
        Error::new(
            at.or_else(|| Some(Location::file(&config))),
            None,
            format!("invalid TOML: {}", e.message()),
        )
    })?;
    let idf = lookup(root.get_ref(), "idf").or_else(|| lookup(root.get_ref(), "idf_format_args"));
    let Some(idf) = idf.and_then(|(_, v)| v.get_ref().as_table()) else {
        return Ok(Some((config, None, None)));
    };
    let dir = config.parent().map(Path::to_owned).unwrap_or_default();
    let table = match lookup(idf, "partition_table") {
        Some((_, v)) => Some(dir.join(doc.string(v, "partition_table")?)),
        None => None,
    };
    let offset = match lookup(idf, "partition_table_offset") {
        Some((_, v)) => Some(doc.u32_value(v, "partition_table_offset")?),
        None => None,
    };
    Ok(Some((config, table, offset)))
}

fn lookup<'a, 'i>(table: &'a DeTable<'i>, name: &str) -> Option<(&'a Key<'i>, &'a Val<'i>)> {
    table.iter().find(|(k, _)| k.get_ref() == name)
}

/// The manifest text, for turning spans into locations.
struct Doc<'a> {
    path: &'a Path,
    text: &'a str,
    /// Byte offset of the start of every line: a location is a binary search, so the
    /// locations of n keys cost O(n log n), not O(n²).
    line_starts: Vec<usize>,
}

const ENCODINGS: &str =
    "u8, i8, u16, i16, u32, i32, u64, i64, f32, f64, string, hex, base64, binary, file";

/// The first ESP-IDF release whose nvs_flash has `NVS_TYPE_FLOAT`/`NVS_TYPE_DOUBLE`
/// (v6.1-beta1; v6.0.1 and v6.0.2 do not have them). Older firmware skips such entries.
pub const FLOAT_IDF_VERSION: (u32, u32) = (6, 1);

impl<'d> Doc<'d> {
    fn new(path: &'d Path, text: &'d str) -> Doc<'d> {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Doc {
            path,
            text,
            line_starts,
        }
    }

    fn location(&self, offset: usize) -> Location {
        let offset = offset.min(self.text.len());
        let line = self.line_starts.partition_point(|&start| start <= offset);
        let start = self.line_starts[line - 1];
        let column = self
            .text
            .get(start..offset)
            .map_or(0, |l| l.chars().count())
            + 1;
        Location::column(self.path, line, column)
    }

    fn at<T>(&self, spanned: &Spanned<T>) -> Location {
        self.location(spanned.span().start)
    }

    fn error<T>(
        &self,
        spanned: &Spanned<T>,
        key: Option<&str>,
        message: impl Into<String>,
    ) -> Error {
        let span = spanned.span();
        let length = self
            .text
            .get(span.start..span.end.max(span.start))
            .map_or(0, |t| t.chars().count());
        Error::new(Some(self.at(spanned)), key, message).with_span_length(length)
    }

    fn table<'a, 'i>(&self, value: &'a Val<'i>, what: &str) -> Result<&'a DeTable<'i>, Error> {
        value.get_ref().as_table().ok_or_else(|| {
            self.error(
                value,
                None,
                format!(
                    "`{what}` must be a table, not a {}",
                    value.get_ref().type_str()
                ),
            )
        })
    }

    fn string<'a>(&self, value: &'a Val<'_>, what: &str) -> Result<&'a str, Error> {
        value.get_ref().as_str().ok_or_else(|| {
            self.error(
                value,
                None,
                format!(
                    "`{what}` must be a string, not a {}",
                    value.get_ref().type_str()
                ),
            )
        })
    }

    fn integer(&self, value: &Val<'_>, what: &str) -> Result<i128, Error> {
        let int = value.get_ref().as_integer().ok_or_else(|| {
            self.error(
                value,
                None,
                format!(
                    "`{what}` must be an integer, not a {}",
                    value.get_ref().type_str()
                ),
            )
        })?;
        i128::from_str_radix(int.as_str(), int.radix())
            .map_err(|_| self.error(value, None, format!("`{what}` is too large")))
    }

    fn u32_value(&self, value: &Val<'_>, what: &str) -> Result<u32, Error> {
        let n = self.integer(value, what)?;
        u32::try_from(n).map_err(|_| {
            self.error(
                value,
                None,
                format!("`{what}` must be between 0 and 0xffffffff"),
            )
        })
    }

    fn bool_value(&self, value: &Val<'_>, what: &str) -> Result<bool, Error> {
        value.get_ref().as_bool().ok_or_else(|| {
            self.error(
                value,
                None,
                format!(
                    "`{what}` must be true or false, not a {}",
                    value.get_ref().type_str()
                ),
            )
        })
    }

    /// Refuses keys other than `allowed`, naming the first unknown one.
    fn only_keys(&self, table: &DeTable<'_>, allowed: &[&str]) -> Result<(), Error> {
        match table
            .iter()
            .find(|(k, _)| !allowed.contains(&k.get_ref().as_ref()))
        {
            Some((k, _)) => Err(self.error(
                k,
                Some(k.get_ref()),
                format!(
                    "unknown field `{}`; expected one of: {}",
                    k.get_ref(),
                    allowed.join(", ")
                ),
            )),
            None => Ok(()),
        }
    }

    fn partition(
        &self,
        name: &Key<'_>,
        spec: &Val<'_>,
        table: &PartitionTable,
        source: &TableSource,
    ) -> Result<PartitionSpec, Error> {
        let at = self.at(name);
        let part_name = name.get_ref().as_ref();
        let fields = self.table(spec, part_name)?;
        self.only_keys(
            fields,
            &[
                "read-only",
                "version",
                "idf-version",
                "csv",
                "namespaces",
                "encryption",
            ],
        )?;
        let partition = find_nvs_partition(table, source, part_name)
            .map_err(|msg| self.error(name, Some(part_name), msg))?;

        let read_only = match lookup(fields, "read-only") {
            Some((_, v)) => self.bool_value(v, "read-only")?,
            None => false,
        };
        let version = match lookup(fields, "version") {
            Some((_, v)) => match self.integer(v, "version")? {
                1 => Version::V1,
                2 => Version::V2,
                _ => return Err(self.error(v, Some("version"), "`version` must be 1 or 2")),
            },
            None => Version::V2,
        };
        let idf_version = match lookup(fields, "idf-version") {
            Some((_, v)) => Some(self.idf_version(v)?),
            None => None,
        };
        let manifest_dir = self.path.parent().unwrap_or(Path::new(""));
        let mut csv = Vec::new();
        if let Some((_, list)) = lookup(fields, "csv") {
            let items = list.get_ref().as_array().ok_or_else(|| {
                self.error(
                    list,
                    Some("csv"),
                    "`csv` must be a list of file names, e.g. csv = [\"nvs/factory.csv\"]",
                )
            })?;
            for item in items.iter() {
                csv.push((manifest_dir.join(self.string(item, "csv")?), self.at(item)));
            }
        }
        let mut namespaces = Vec::new();
        if let Some((_, list)) = lookup(fields, "namespaces") {
            for (ns_name, entries) in self.table(list, "namespaces")? {
                namespaces.push(self.namespace(ns_name, entries)?);
            }
        }
        // Firmware older than 6.1 skips float entries: the key would silently be missing.
        if idf_version.is_none_or(|v| v < FLOAT_IDF_VERSION) {
            if let Some(entry) = namespaces
                .iter()
                .flat_map(|ns| &ns.entries)
                .find(|e| e.encoding.is_float())
            {
                return Err(Error::new(
                    Some(entry.at.clone()),
                    Some(&entry.key),
                    format!(
                        "f32/f64 need ESP-IDF 6.1 or newer on the device (older nvs_flash skips these \
                         entries, so the key would be missing): add `idf-version = \"6.1\"` to partition \
                         `{part_name}` if its firmware is built with 6.1 or newer{}",
                        match idf_version {
                            Some((major, minor)) => format!(" (it says {major}.{minor})"),
                            None => String::new(),
                        }
                    ),
                ));
            }
        }
        let encryption = match lookup(fields, "encryption") {
            Some((_, v)) => Some((self.encryption(v, manifest_dir)?, self.at(v))),
            None => None,
        };
        // The device mounts a partition under three pages only read-only, and only when the
        // table says so: refuse to build user data it could never write.
        if partition.size < 0x3000 && !partition.readonly {
            return Err(self.error(
                name,
                Some(part_name),
                format!(
                    "partition `{part_name}` is {:#x} bytes, smaller than 0x3000: flag it `readonly` in the partition \
                     table (the device mounts such partitions read-only), or make it at least 0x3000",
                    partition.size
                ),
            ));
        }
        Ok(PartitionSpec {
            name: part_name.to_owned(),
            at,
            offset: partition.offset,
            size: partition.size,
            factory: read_only || partition.readonly,
            version,
            idf_version,
            csv,
            namespaces,
            encryption,
        })
    }

    /// `idf-version = "6.1"` (also "6.1.2", "v6.1"): major and minor.
    fn idf_version(&self, value: &Val<'_>) -> Result<(u32, u32), Error> {
        let text = self.string(value, "idf-version")?;
        let mut parts = text.strip_prefix('v').unwrap_or(text).split('.');
        let mut number = || parts.next().and_then(|p| p.parse::<u32>().ok());
        match (number(), number()) {
            (Some(major), Some(minor)) => Ok((major, minor)),
            _ => Err(self.error(
                value,
                Some("idf-version"),
                "`idf-version` is the ESP-IDF release the firmware is built with, e.g. \"6.1\" or \"5.5.2\"",
            )),
        }
    }

    fn encryption(&self, value: &Val<'_>, manifest_dir: &Path) -> Result<EncryptionSpec, Error> {
        let fields = self.table(value, "encryption")?;
        self.only_keys(fields, &["keys", "hmac-key"])?;
        match (lookup(fields, "keys"), lookup(fields, "hmac-key")) {
            (Some((_, v)), None) => Ok(EncryptionSpec::KeyFile(manifest_dir.join(self.string(v, "keys")?))),
            (None, Some((_, v))) => Ok(EncryptionSpec::HmacKey(manifest_dir.join(self.string(v, "hmac-key")?))),
            _ => Err(self.error(
                value,
                Some("encryption"),
                "give exactly one of `keys = \"nvs_keys.bin\"` (an nvs_keys file) or `hmac-key = \"hmac_key.bin\"` (HMAC scheme)",
            )),
        }
    }

    fn namespace(&self, name: &Key<'_>, entries: &Val<'_>) -> Result<NamespaceSpec, Error> {
        let ns_name = name.get_ref().as_ref();
        let mut spec = NamespaceSpec {
            name: ns_name.to_owned(),
            at: self.at(name),
            entries: Vec::new(),
        };
        for (key, value) in self.table(entries, ns_name)? {
            spec.entries.push(self.entry(key, value)?);
        }
        Ok(spec)
    }

    /// One key: a bare string, or `{ TYPE = VALUE }` where VALUE is a literal or
    /// `{ env = … }`, `{ file = … }`, `{ per-device = …, dev = … }`.
    fn entry(&self, key: &Key<'_>, value: &Val<'_>) -> Result<EntrySpec, Error> {
        let name = key.get_ref().as_ref();
        let entry = |encoding, source| EntrySpec {
            key: name.to_owned(),
            at: self.at(key),
            encoding,
            source,
        };
        let fail = |at: &Val<'_>, msg: String| self.error(at, Some(name), msg);
        let typed = match value.get_ref() {
            DeValue::String(s) => {
                return Ok(entry(Encoding::String, ValueSource::Text(s.to_string())));
            }
            DeValue::Table(t) if t.len() == 1 => t.iter().next().expect("one entry"),
            DeValue::Integer(_) => {
                return Err(fail(
                    value,
                    format!(
                        "give the integer type, e.g. {name} = {{ u8 = 3 }} (one of u8, i8, u16, i16, u32, i32, u64, i64)"
                    ),
                ));
            }
            other => {
                return Err(fail(
                    value,
                    format!(
                        "expected a string or a one-key table such as {{ u8 = 3 }}, not a {}; types: {ENCODINGS}",
                        other.type_str()
                    ),
                ));
            }
        };
        let (ty, inner) = typed;
        let manifest_dir = self.path.parent().unwrap_or(Path::new(""));
        if ty.get_ref() == "file" {
            let path = inner.get_ref().as_str().ok_or_else(|| {
                fail(
                    inner,
                    "`file` takes a path, e.g. { file = \"certs/device.der\" }".into(),
                )
            })?;
            return Ok(entry(
                Encoding::Binary,
                ValueSource::File(manifest_dir.join(path)),
            ));
        }
        let encoding = match ty.get_ref().as_ref() {
            "hex" | "hex2bin" => Encoding::Hex2bin,
            "f32" => Encoding::F32,
            "f64" => Encoding::F64,
            other => Encoding::from_name(other).ok_or_else(|| {
                self.error(
                    ty,
                    Some(name),
                    format!("unknown type `{other}`; use one of {ENCODINGS}"),
                )
            })?,
        };
        let source = match inner.get_ref() {
            DeValue::String(s) => ValueSource::Text(s.to_string()),
            DeValue::Integer(_) if encoding.is_integer() => {
                ValueSource::Integer(self.integer(inner, name)?)
            }
            // TOML spells floats as Rust parses them (`1.5`, `1e-3`, `inf`, `nan`); the value
            // is parsed once, straight into the partition's type.
            DeValue::Float(f) if encoding.is_float() => ValueSource::Text(f.as_str().to_owned()),
            DeValue::Integer(_) if encoding.is_float() => {
                ValueSource::Text(self.integer(inner, name)?.to_string())
            }
            DeValue::Table(fields) => self.source(name, encoding, inner, fields, manifest_dir)?,
            other => {
                return Err(fail(
                    inner,
                    format!(
                        "`{}` takes {}, not a {}",
                        ty.get_ref(),
                        if encoding.is_integer() {
                            "an integer"
                        } else if encoding.is_float() {
                            "a number"
                        } else {
                            "a string"
                        },
                        other.type_str()
                    ),
                ));
            }
        };
        Ok(entry(encoding, source))
    }

    fn source(
        &self,
        name: &str,
        encoding: Encoding,
        at: &Val<'_>,
        fields: &DeTable<'_>,
        manifest_dir: &Path,
    ) -> Result<ValueSource, Error> {
        let text = |v: &Val<'_>, what: &str| -> Result<String, Error> {
            match v.get_ref() {
                DeValue::String(s) => Ok(s.to_string()),
                DeValue::Integer(_) => Ok(self.integer(v, what)?.to_string()),
                other => Err(self.error(
                    v,
                    Some(name),
                    format!(
                        "`{what}` must be a string or an integer, not a {}",
                        other.type_str()
                    ),
                )),
            }
        };
        if let Some((_, var)) = lookup(fields, "env") {
            self.only_keys(fields, &["env", "default"])?;
            let default = match lookup(fields, "default") {
                Some((_, v)) => Some(text(v, "default")?),
                None => None,
            };
            return Ok(ValueSource::Env {
                var: self.string(var, "env")?.to_owned(),
                default,
            });
        }
        if let Some((_, path)) = lookup(fields, "file") {
            self.only_keys(fields, &["file"])?;
            return Ok(ValueSource::File(
                manifest_dir.join(self.string(path, "file")?),
            ));
        }
        if let Some((_, column)) = lookup(fields, "per-device") {
            self.only_keys(fields, &["per-device", "dev"])?;
            let dev = match lookup(fields, "dev") {
                Some((_, v)) => Some(text(v, "dev")?),
                None => None,
            };
            return Ok(ValueSource::PerDevice {
                column: self.string(column, "per-device")?.to_owned(),
                dev,
            });
        }
        if let Some((_, chip)) = lookup(fields, "chip") {
            self.only_keys(fields, &["chip", "dev"])?;
            let spelled = self.string(chip, "chip")?;
            let value = ChipValue::from_name(spelled).ok_or_else(|| {
                self.error(
                    chip,
                    Some(name),
                    format!(
                        "unknown chip value `{spelled}`; use one of {} (`mac`: AA:BB:CC:DD:EE:FF, or for u64 the MAC as a number; `mac-hex`: aabbccddeeff)",
                        ChipValue::NAMES
                    ),
                )
            })?;
            if !value.fits(encoding) {
                return Err(self.error(
                    chip,
                    Some(name),
                    format!(
                        "chip value `{}` fills {}, not `{}`",
                        value.name(),
                        value.allowed(),
                        encoding_name(encoding)
                    ),
                ));
            }
            let Some((_, dev)) = lookup(fields, "dev") else {
                let example = match (value, encoding) {
                    (_, Encoding::U64) => "0",
                    (ChipValue::Mac, _) => "\"00:00:00:00:00:00\"",
                    (ChipValue::MacHex, _) => "\"000000000000\"",
                };
                return Err(self.error(
                    at,
                    Some(name),
                    format!(
                        "a value from the chip needs a `dev` value for development builds and `cargo nvs generate`: add `dev = {example}`, e.g. {{ chip = \"{}\", dev = {example} }}",
                        value.name()
                    ),
                ));
            };
            return Ok(ValueSource::Chip {
                value,
                dev: text(dev, "dev")?,
            });
        }
        Err(self.error(
            at,
            Some(name),
            "expected a value, { env = \"VAR\" }, { file = \"path\" }, { per-device = \"column\", dev = … } or { chip = \"mac\", dev = … }",
        ))
    }
}

/// How the metadata spells an encoding.
fn encoding_name(encoding: Encoding) -> &'static str {
    match encoding {
        Encoding::U8 => "u8",
        Encoding::I8 => "i8",
        Encoding::U16 => "u16",
        Encoding::I16 => "i16",
        Encoding::U32 => "u32",
        Encoding::I32 => "i32",
        Encoding::U64 => "u64",
        Encoding::I64 => "i64",
        Encoding::String => "string",
        Encoding::Hex2bin => "hex",
        Encoding::Base64 => "base64",
        Encoding::Binary => "binary",
        Encoding::F32 => "f32",
        Encoding::F64 => "f64",
    }
}

/// The table's data/nvs partition called `name`, or why there is none.
fn find_nvs_partition<'t>(
    table: &'t PartitionTable,
    source: &TableSource,
    name: &str,
) -> Result<&'t Partition, String> {
    let table_name = match source.path() {
        Some(path) => format!("`{}`", path.display()),
        None => "ESP-IDF's default table (no partition table is configured)".to_owned(),
    };
    table.nvs_partition(name, &table_name).map_err(|e| match e {
        // A metadata error says what to do about it.
        NvsPartitionError::Missing { name, table, nvs } => format!(
            "partition `{name}` is not in the partition table {table} (its NVS partitions: {}); add it to the table or fix the name",
            NvsPartitionError::nvs_list(&nvs)
        ),
        not_nvs => not_nvs.to_string(),
    })
}
