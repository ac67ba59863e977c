//! ESP-IDF partition tables, CSV and binary, read and checked the way ESP-IDF's
//! `components/partition_table/gen_esp32part.py` (v1.4, ESP-IDF 5.x) reads and checks them.
//!
//! This is the project's authority on where NVS partitions live. The rules it follows:
//!
//! - CSV: one partition a line, `Name, Type, SubType, Offset, Size, Flags`; fields split on `,`
//!   (no quoting) and trimmed; lines whose first non-blank character is `#` are comments (a `#`
//!   after content is not a comment); blank lines are skipped; missing trailing fields are empty.
//! - Types and subtypes by keyword (any letter case) or number; numbers are decimal, `0x` hex,
//!   `0o` octal or `0b` binary, with an optional `K` (1024) or `M` (1024²) suffix. An empty data
//!   subtype means `undefined` (0x06); an app needs a subtype.
//! - A blank offset is filled in: the end of the previous row, rounded up to 0x10000 for apps and
//!   0x1000 for every other type; the first row starts after the table sector
//!   (`table_offset + 0x1000`). Rows must be in flash order. A negative size `-N` means "up to
//!   address N".
//! - `bootloader` and `partition_table` rows take their offset and size from the configuration
//!   (the table offset, the bootloader offsets in [`CsvOptions`]), not from the row.
//! - Checks: offsets aligned (apps 0x10000, others 0x1000), app sizes multiples of 0x1000, no
//!   partition below the end of the table sector (except the primary bootloader and table
//!   entries), no overlaps, unique names, at most one `data/ota` and one `data/tee_ota`, each
//!   0x2000 bytes, `readonly` not on `data/ota` or `data/coredump`.
//!
//! Stricter than `gen_esp32part.py`, where it would silently do something else: names over 16
//! bytes (it truncates them), empty names, size 0, non-empty fields after the sixth (it ignores
//! them), type or subtype 0xFF (ESP-IDF's "any" wildcard), more partitions than fit in the binary
//! with its MD5 entry (94), `$VARIABLE`s (it expands them from the environment; a build must not
//! depend on that), and a table offset that is not a multiple of 0x1000.

use std::collections::HashMap;
use std::path::Path;

use crate::error::{Error, Location};

mod binary;
mod md5;
mod text;

/// The flash sector the table occupies: nothing but the table may start below its end.
const TABLE_SECTOR: u32 = 0x1000;
/// `data/ota` and `data/tee_ota` partitions hold two 4 KiB selection sectors.
const OTADATA_SIZE: u32 = 0x2000;
const SUBTYPE_UNDEFINED: u8 = 0x06;

/// A partition's type byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PartitionKind {
    /// `app` (0x00).
    App,
    /// `data` (0x01).
    Data,
    /// `bootloader` (0x02).
    Bootloader,
    /// `partition_table` (0x03).
    PartitionTable,
    /// Any other type byte (0x40-0xFE are for applications; 0x04-0x3F are reserved by ESP-IDF).
    /// Build it with [`PartitionKind::from_byte`] so that 0x00-0x03 get their own variants.
    Other(u8),
}

impl PartitionKind {
    pub fn from_byte(byte: u8) -> PartitionKind {
        match byte {
            0x00 => PartitionKind::App,
            0x01 => PartitionKind::Data,
            0x02 => PartitionKind::Bootloader,
            0x03 => PartitionKind::PartitionTable,
            other => PartitionKind::Other(other),
        }
    }

    pub fn byte(self) -> u8 {
        match self {
            PartitionKind::App => 0x00,
            PartitionKind::Data => 0x01,
            PartitionKind::Bootloader => 0x02,
            PartitionKind::PartitionTable => 0x03,
            PartitionKind::Other(byte) => byte,
        }
    }

    /// The CSV keyword of the type, when it has one.
    pub fn keyword(self) -> Option<&'static str> {
        TYPE_KEYWORDS
            .iter()
            .find(|(_, byte)| *byte == self.byte())
            .map(|(name, _)| *name)
    }

    /// The subtype keywords ESP-IDF knows for this type.
    pub fn subtype_keywords(self) -> &'static [(&'static str, u8)] {
        match PartitionKind::from_byte(self.byte()) {
            PartitionKind::App => APP_SUBTYPES,
            PartitionKind::Data => DATA_SUBTYPES,
            PartitionKind::Bootloader => BOOTLOADER_SUBTYPES,
            PartitionKind::PartitionTable => TABLE_SUBTYPES,
            PartitionKind::Other(_) => &[],
        }
    }

    /// Where a partition of this type may start: the app loader maps flash in 64 KiB pages,
    /// everything else is erased in 4 KiB sectors.
    pub fn offset_alignment(self) -> u32 {
        if self.byte() == 0x00 { 0x10000 } else { 0x1000 }
    }
}

const TYPE_KEYWORDS: &[(&str, u8)] = &[
    ("app", 0x00),
    ("data", 0x01),
    ("bootloader", 0x02),
    ("partition_table", 0x03),
];

const APP_SUBTYPES: &[(&str, u8)] = &[
    ("factory", 0x00),
    ("ota_0", 0x10),
    ("ota_1", 0x11),
    ("ota_2", 0x12),
    ("ota_3", 0x13),
    ("ota_4", 0x14),
    ("ota_5", 0x15),
    ("ota_6", 0x16),
    ("ota_7", 0x17),
    ("ota_8", 0x18),
    ("ota_9", 0x19),
    ("ota_10", 0x1a),
    ("ota_11", 0x1b),
    ("ota_12", 0x1c),
    ("ota_13", 0x1d),
    ("ota_14", 0x1e),
    ("ota_15", 0x1f),
    ("test", 0x20),
    ("tee_0", 0x30),
    ("tee_1", 0x31),
];

const DATA_SUBTYPES: &[(&str, u8)] = &[
    ("ota", 0x00),
    ("phy", 0x01),
    ("nvs", 0x02),
    ("coredump", 0x03),
    ("nvs_keys", 0x04),
    ("efuse", 0x05),
    ("undefined", 0x06),
    ("esphttpd", 0x80),
    ("fat", 0x81),
    ("spiffs", 0x82),
    ("littlefs", 0x83),
    ("tee_ota", 0x90),
    ("tee_sec_stg", 0x91),
];

/// How the messages spell the Type column's choices.
const TABLE_KEYWORDS_HINT: &str =
    "app, data, bootloader, partition_table or a number 0x00-0xFE (0x40-0xFE for your own types)";

const BOOTLOADER_SUBTYPES: &[(&str, u8)] = &[("primary", 0x00), ("ota", 0x01), ("recovery", 0x02)];

const TABLE_SUBTYPES: &[(&str, u8)] = &[("primary", 0x00), ("ota", 0x01)];

const DATA_OTA: u8 = 0x00;
const DATA_NVS: u8 = 0x02;
const DATA_COREDUMP: u8 = 0x03;
const DATA_NVS_KEYS: u8 = 0x04;
const DATA_TEE_OTA: u8 = 0x90;
const PRIMARY: u8 = 0x00;
const BOOTLOADER_RECOVERY: u8 = 0x02;

/// One partition of a table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    /// At most 16 bytes of UTF-8.
    pub name: String,
    pub kind: PartitionKind,
    pub subtype: u8,
    pub offset: u32,
    pub size: u32,
    /// Flag bit 0: encrypted when flash encryption is on (apps always are).
    pub encrypted: bool,
    /// Flag bit 1: mounted read-only by ESP-IDF.
    pub readonly: bool,
    /// The CSV line it came from (1-based); `None` for binary tables and built-in ones.
    pub line: Option<usize>,
}

impl Partition {
    /// A `data/nvs` partition (type 0x01, subtype 0x02).
    pub fn is_nvs(&self) -> bool {
        self.kind.byte() == 0x01 && self.subtype == DATA_NVS
    }

    /// A `data/nvs_keys` partition (type 0x01, subtype 0x04), holding NVS encryption keys.
    pub fn is_nvs_keys(&self) -> bool {
        self.kind.byte() == 0x01 && self.subtype == DATA_NVS_KEYS
    }

    /// The type's CSV keyword, or the type byte as `0x40`.
    pub fn type_name(&self) -> String {
        match self.kind.keyword() {
            Some(name) => name.to_owned(),
            None => format!("{:#04x}", self.kind.byte()),
        }
    }

    /// The subtype's CSV keyword for this type, or the subtype byte as `0x15`.
    pub fn subtype_name(&self) -> String {
        match self
            .kind
            .subtype_keywords()
            .iter()
            .find(|(_, byte)| *byte == self.subtype)
        {
            Some((name, _)) => (*name).to_owned(),
            None => format!("{:#04x}", self.subtype),
        }
    }

    /// The first address after the partition (can be 2^32).
    pub fn end(&self) -> u64 {
        u64::from(self.offset) + u64::from(self.size)
    }

    fn is(&self, kind: PartitionKind, subtype: u8) -> bool {
        self.kind.byte() == kind.byte() && self.subtype == subtype
    }

    /// The primary bootloader and partition table entries describe what sits below the end of
    /// the table sector, so the placement rules skip them.
    fn is_fixed_system_entry(&self) -> bool {
        self.is(PartitionKind::Bootloader, PRIMARY)
            || self.is(PartitionKind::PartitionTable, PRIMARY)
    }
}

/// Settings `gen_esp32part.py` takes from the ESP-IDF configuration rather than the CSV.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct CsvOptions {
    /// Where the table is flashed (CONFIG_PARTITION_TABLE_OFFSET; `--offset`).
    pub table_offset: u32,
    /// Where the bootloader is flashed (CONFIG_BOOTLOADER_OFFSET_IN_FLASH;
    /// `--primary-bootloader-offset`); only tables with `bootloader` rows need it.
    pub primary_bootloader_offset: Option<u32>,
    /// Where the recovery bootloader is flashed (`--recovery-bootloader-offset`); only tables
    /// with a `bootloader, recovery` row need it.
    pub recovery_bootloader_offset: Option<u32>,
}

impl CsvOptions {
    pub fn new(table_offset: u32) -> CsvOptions {
        CsvOptions {
            table_offset,
            primary_bootloader_offset: None,
            recovery_bootloader_offset: None,
        }
    }

    pub fn with_primary_bootloader_offset(mut self, offset: u32) -> CsvOptions {
        self.primary_bootloader_offset = Some(offset);
        self
    }

    pub fn with_recovery_bootloader_offset(mut self, offset: u32) -> CsvOptions {
        self.recovery_bootloader_offset = Some(offset);
        self
    }
}

impl Default for CsvOptions {
    fn default() -> CsvOptions {
        CsvOptions::new(PartitionTable::DEFAULT_OFFSET)
    }
}

/// Why [`PartitionTable::nvs_partition`] found no NVS partition of that name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NvsPartitionError {
    /// The table has no partition of that name.
    Missing {
        name: String,
        /// The table, as the caller named it.
        table: String,
        /// The table's `data/nvs` partitions, in table order.
        nvs: Vec<String>,
    },
    /// The partition is not `data/nvs`.
    NotNvs {
        name: String,
        table: String,
        /// Its `type/subtype`, as the CSV spells them.
        kind: String,
    },
}

impl NvsPartitionError {
    /// The table's NVS partitions, comma separated, or "none".
    pub fn nvs_list(nvs: &[String]) -> String {
        if nvs.is_empty() {
            "none".to_owned()
        } else {
            nvs.join(", ")
        }
    }
}

impl std::fmt::Display for NvsPartitionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NvsPartitionError::Missing { name, table, nvs } => write!(
                f,
                "no partition `{name}` in {table} (its NVS partitions: {})",
                Self::nvs_list(nvs)
            ),
            NvsPartitionError::NotNvs { name, table, kind } => {
                write!(f, "partition `{name}` in {table} is {kind}, not data/nvs")
            }
        }
    }
}

impl std::error::Error for NvsPartitionError {}

/// A partition table, in the order of its CSV rows or binary entries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PartitionTable {
    pub partitions: Vec<Partition>,
}

/// ESP-IDF's `partitions_singleapp.csv` ("Single factory app, no OTA").
const SINGLE_APP_CSV: &str = "\
nvs,      data, nvs,     ,        0x6000,
phy_init, data, phy,     ,        0x1000,
factory,  app,  factory, ,        1M,
";

impl PartitionTable {
    /// Where ESP-IDF flashes the table unless configured otherwise.
    pub const DEFAULT_OFFSET: u32 = 0x8000;
    /// The length of the binary table: entries, the MD5 entry and 0xFF padding.
    pub const BINARY_SIZE: usize = 0xC00;
    /// Partitions that fit in [`Self::BINARY_SIZE`] with the MD5 entry and an end marker.
    pub const MAX_PARTITIONS: usize = 94;

    /// Reads a CSV table. `path` names it in errors; `table_offset` is where the table is
    /// flashed ([`Self::DEFAULT_OFFSET`] unless configured otherwise).
    pub fn parse_csv(path: &Path, text: &str, table_offset: u32) -> Result<Self, Error> {
        Self::parse_csv_with(path, text, &CsvOptions::new(table_offset))
    }

    /// Reads a CSV table with all of `gen_esp32part.py`'s settings (needed for tables with
    /// `bootloader` rows).
    pub fn parse_csv_with(path: &Path, text: &str, options: &CsvOptions) -> Result<Self, Error> {
        check_table_offset(path, options.table_offset)?;
        let table = text::parse(path, text, options)?;
        table.verify(path, options.table_offset)?;
        Ok(table)
    }

    /// Reads a binary table, checking it as flashed at [`Self::DEFAULT_OFFSET`].
    pub fn parse_binary(path: &Path, bytes: &[u8]) -> Result<Self, Error> {
        Self::parse_binary_at(path, bytes, Self::DEFAULT_OFFSET)
    }

    /// Reads a binary table flashed at `table_offset`. Bytes after the end marker are ignored;
    /// a table without the MD5 entry (CONFIG_PARTITION_TABLE_MD5 off) is accepted.
    pub fn parse_binary_at(path: &Path, bytes: &[u8], table_offset: u32) -> Result<Self, Error> {
        check_table_offset(path, table_offset)?;
        let table = binary::parse(path, bytes)?;
        table.verify(path, table_offset)?;
        Ok(table)
    }

    /// Reads a table file: binary if it starts with the entry magic 0xAA 0x50, else CSV.
    pub fn load(path: &Path, table_offset: u32) -> Result<Self, Error> {
        Self::load_with(path, &CsvOptions::new(table_offset))
    }

    /// [`Self::load`] with all of `gen_esp32part.py`'s settings.
    pub fn load_with(path: &Path, options: &CsvOptions) -> Result<Self, Error> {
        let bytes = crate::error::read_input(path, "partition table")?;
        if bytes.starts_with(&binary::ENTRY_MAGIC) {
            return Self::parse_binary_at(path, &bytes, options.table_offset);
        }
        let text = crate::error::utf8_text(
            path,
            &bytes,
            "the partition table is neither a binary table (which starts with 0xAA 0x50) nor \
             UTF-8 text; save the CSV as UTF-8",
        )?;
        Self::parse_csv_with(path, text, options)
    }

    /// ESP-IDF's default table, "Single factory app, no OTA", at the default table offset:
    /// `nvs` 0x9000+0x6000, `phy_init` 0xf000+0x1000, `factory` 0x10000+1M.
    pub fn default_single_app() -> Self {
        let partition = |name: &str, kind, subtype, offset, size| Partition {
            name: name.to_owned(),
            kind,
            subtype,
            offset,
            size,
            encrypted: false,
            readonly: false,
            line: None,
        };
        PartitionTable {
            partitions: vec![
                partition("nvs", PartitionKind::Data, DATA_NVS, 0x9000, 0x6000),
                partition("phy_init", PartitionKind::Data, 0x01, 0xf000, 0x1000),
                partition("factory", PartitionKind::App, 0x00, 0x10000, 0x10_0000),
            ],
        }
    }

    /// ESP-IDF's default table with the table at `table_offset`: its CSV leaves the offsets
    /// blank, so the partitions move with the table.
    pub fn default_single_app_at(table_offset: u32) -> Result<Self, Error> {
        let mut table = Self::parse_csv(
            Path::new("<ESP-IDF partitions_singleapp.csv>"),
            SINGLE_APP_CSV,
            table_offset,
        )?;
        for partition in &mut table.partitions {
            partition.line = None;
        }
        Ok(table)
    }

    pub fn find(&self, name: &str) -> Option<&Partition> {
        self.partitions.iter().find(|p| p.name == name)
    }

    /// The `data/nvs_keys` partition (the flash-encryption scheme's NVS keys), if any.
    pub fn nvs_keys(&self) -> Option<&Partition> {
        self.partitions.iter().find(|p| p.is_nvs_keys())
    }

    /// The `data/nvs` partitions, in table order.
    pub fn nvs_partitions(&self) -> impl Iterator<Item = &Partition> {
        self.partitions.iter().filter(|p| p.is_nvs())
    }

    /// The `data/nvs` partition called `name`; `table_name` (`` `partitions.csv` ``, "the
    /// partition table", …) names this table in the error, which lists its NVS partitions.
    pub fn nvs_partition(
        &self,
        name: &str,
        table_name: &str,
    ) -> Result<&Partition, NvsPartitionError> {
        match self.find(name) {
            Some(partition) if partition.is_nvs() => Ok(partition),
            Some(partition) => Err(NvsPartitionError::NotNvs {
                name: name.to_owned(),
                table: table_name.to_owned(),
                kind: format!("{}/{}", partition.type_name(), partition.subtype_name()),
            }),
            None => Err(NvsPartitionError::Missing {
                name: name.to_owned(),
                table: table_name.to_owned(),
                nvs: self.nvs_partitions().map(|p| p.name.clone()).collect(),
            }),
        }
    }

    /// The end of the partition that ends last: the flash size the table needs.
    pub fn flash_end(&self) -> u64 {
        self.partitions
            .iter()
            .map(Partition::end)
            .max()
            .unwrap_or(0)
    }

    /// The binary table as `gen_esp32part.py` writes it: 32-byte entries, the MD5 entry
    /// (0xEB 0xEB, 14 × 0xFF, MD5 of the entries), 0xFF up to [`Self::BINARY_SIZE`].
    ///
    /// Tables from the parsers always fit. A table built by hand is written as given: names
    /// are cut at 16 bytes (as `gen_esp32part.py` does), and with more than
    /// [`Self::MAX_PARTITIONS`] partitions the result is longer than `BINARY_SIZE` and has no
    /// end marker, which ESP-IDF refuses.
    pub fn to_binary(&self) -> Vec<u8> {
        binary::write(self)
    }

    /// The checks `gen_esp32part.py` makes on a whole table (and ours), after parsing.
    fn verify(&self, path: &Path, table_offset: u32) -> Result<(), Error> {
        let fail = |index: usize, message: String| {
            let partition = &self.partitions[index];
            match partition.line {
                Some(line) => Error::new(Some(Location::line(path, line)), None, message),
                // Binary tables have no lines: name the entry instead.
                None => Error::new(
                    Some(Location::file(path)),
                    None,
                    format!("entry {}: {message}", index + 1),
                ),
            }
        };

        if self.partitions.len() > Self::MAX_PARTITIONS {
            return Err(fail(
                Self::MAX_PARTITIONS,
                format!(
                    "the table has {} partitions, but a partition table holds at most {} \
                     (0xC00 bytes with the MD5 entry and the end marker); merge or remove \
                     partitions",
                    self.partitions.len(),
                    Self::MAX_PARTITIONS
                ),
            ));
        }

        for (index, p) in self.partitions.iter().enumerate() {
            let label = partition_label(p);
            let align = p.kind.offset_alignment();
            if p.offset % align != 0 {
                let what = if p.kind.byte() == 0x00 {
                    "app partitions must start at a multiple of 0x10000 (64 KiB)"
                } else {
                    "partitions must start at a multiple of 0x1000 (a 4 KiB flash sector)"
                };
                let down = p.offset - p.offset % align;
                return Err(fail(
                    index,
                    format!(
                        "{label} starts at {:#x}, but {what}; move it to {:#x} or {:#x}, or leave \
                         its Offset empty to have it placed automatically",
                        p.offset,
                        down,
                        u64::from(down) + u64::from(align)
                    ),
                ));
            }
            if p.size == 0 {
                return Err(fail(
                    index,
                    format!("{label} has size 0; give it a size (e.g. 0x1000 or 4K)"),
                ));
            }
            if p.kind.byte() == 0x00 && p.size % 0x1000 != 0 {
                return Err(fail(
                    index,
                    format!(
                        "{label} has size {:#x}, but app partition sizes must be multiples of \
                         0x1000 (4 KiB); use {:#x}",
                        p.size,
                        (u64::from(p.size) + 0xfff) & !0xfff
                    ),
                ));
            }
            if p.end() > 1 << 32 {
                return Err(fail(
                    index,
                    format!(
                        "{label} ends at {:#x}, beyond the 4 GiB that flash addresses can reach; \
                         make it smaller or start it lower",
                        p.end()
                    ),
                ));
            }
            if p.readonly
                && (p.is(PartitionKind::Data, DATA_OTA) || p.is(PartitionKind::Data, DATA_COREDUMP))
            {
                return Err(fail(
                    index,
                    format!(
                        "{label} is data/{} and ESP-IDF always writes to those, so it cannot be \
                         `readonly`; remove the flag",
                        p.subtype_name()
                    ),
                ));
            }
        }

        let mut first_with_name: HashMap<&str, usize> = HashMap::new();
        for (index, p) in self.partitions.iter().enumerate() {
            if let Some(&first) = first_with_name.get(p.name.as_str()) {
                let previous = match self.partitions[first].line {
                    Some(line) => format!("line {line}"),
                    None => format!("entry {}", first + 1),
                };
                return Err(fail(
                    index,
                    format!(
                        "partition name `{}` is already used ({previous}); names must be unique, \
                         rename one of them",
                        p.name
                    ),
                ));
            }
            first_with_name.insert(&p.name, index);
        }

        let table_end = u64::from(table_offset) + u64::from(TABLE_SECTOR);
        let mut by_offset: Vec<usize> = (0..self.partitions.len()).collect();
        by_offset.sort_by_key(|&i| self.partitions[i].offset);
        let mut previous: Option<usize> = None;
        for &index in &by_offset {
            let p = &self.partitions[index];
            if u64::from(p.offset) < table_end && !p.is_fixed_system_entry() {
                return Err(fail(
                    index,
                    format!(
                        "{} starts at {:#x}, below the end of the partition table sector \
                         ({table_offset:#x}..{table_end:#x}); start it at {table_end:#x} or later",
                        partition_label(p),
                        p.offset
                    ),
                ));
            }
            if let Some(prev) = previous {
                let q = &self.partitions[prev];
                if u64::from(p.offset) < q.end() {
                    let place = match q.line {
                        Some(line) => format!("line {line}"),
                        None => format!("entry {}", prev + 1),
                    };
                    return Err(fail(
                        index,
                        format!(
                            "{} at {:#x} overlaps {} ({place}) at {:#x}..{:#x}; move one of them \
                             or make it smaller",
                            partition_label(p),
                            p.offset,
                            partition_label(q),
                            q.offset,
                            q.end()
                        ),
                    ));
                }
            }
            previous = Some(index);
        }

        for (subtype, what) in [
            (DATA_OTA, "otadata (data/ota)"),
            (DATA_TEE_OTA, "TEE otadata (data/tee_ota)"),
        ] {
            let mut found = self
                .partitions
                .iter()
                .enumerate()
                .filter(|(_, p)| p.is(PartitionKind::Data, subtype));
            let first = found.next();
            if let (Some((_, first)), Some((index, second))) = (first, found.next()) {
                return Err(fail(
                    index,
                    format!(
                        "{} is a second {what} partition after `{}`, but a table can have only \
                         one; remove one of them",
                        partition_label(second),
                        first.name
                    ),
                ));
            }
            if let Some((index, p)) = first {
                if p.size != OTADATA_SIZE {
                    return Err(fail(
                        index,
                        format!(
                            "{what} partitions must be exactly 0x2000 bytes (8 KiB), but `{}` has \
                             {:#x}; set its size to 0x2000",
                            p.name, p.size
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

fn partition_label(p: &Partition) -> String {
    format!("partition `{}`", p.name)
}

fn check_table_offset(path: &Path, table_offset: u32) -> Result<(), Error> {
    if table_offset % TABLE_SECTOR != 0 {
        return Err(Error::new(
            Some(Location::file(path)),
            None,
            format!(
                "the partition table offset {table_offset:#x} is not a multiple of 0x1000 (a 4 KiB \
                 flash sector); set CONFIG_PARTITION_TABLE_OFFSET (or the offset given) to e.g. \
                 {:#x}",
                table_offset - table_offset % TABLE_SECTOR
            ),
        ));
    }
    Ok(())
}
