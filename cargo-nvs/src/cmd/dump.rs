//! `cargo nvs dump IMAGE`: namespaces, keys, types and values, page states and every problem.

use std::fmt::Write as _;
use std::io::Write as IoWrite;
use std::path::PathBuf;
use std::process::ExitCode;

use nvs_build::format::{Item, ItemValue, ParsedImage, Severity, Value, read_image};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use serde_json::{Value as Json, json};

use nvs_build::format::encryption::{XtsKey, decrypt_image};

use super::OutputFormat;
use super::error::{CmdError, CmdResult};
use cargo_nvs::flashing::segments::table_in_flash;
use cargo_nvs::fsutil::FileError;
use cargo_nvs::hex::hex;
use cargo_nvs::keys::KeyInput;
use cargo_nvs::size::parse_offset;
use nvs_build::table::PartitionTable;

/// Show the contents of an NVS partition image and check it for damage.
///
/// Exits with status 1 when the image is damaged (an error-level problem was found).
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  cargo nvs dump target/nvs/my-app/nvs.bin\n  cargo nvs dump nvs_encr.bin --keys keys/keys.bin --format json"
)]
pub struct DumpArgs {
    /// The image file (generated, or read back from a device).
    image: PathBuf,
    /// Output format; `json` is stable and documented in the README.
    #[arg(long, value_enum, default_value_t)]
    format: OutputFormat,
    #[command(flatten)]
    key: KeyInput,
    /// IMAGE is a full-flash dump: show this NVS partition of it (found in the partition table
    /// inside the dump, or in --partition-table).
    #[arg(long, value_name = "NAME")]
    partition: Option<String>,
    /// Partition table to find --partition in [default: the one inside the dump].
    #[arg(long, value_name = "FILE", requires = "partition")]
    partition_table: Option<PathBuf>,
    /// Where the table is inside the dump [default: 0x8000].
    #[arg(long, value_name = "OFFSET", value_parser = parse_offset, requires = "partition")]
    partition_table_offset: Option<u32>,
}

pub fn run(args: DumpArgs) -> CmdResult<ExitCode> {
    let mut bytes = nvs_build::read_limited(&args.image, nvs_build::MAX_INPUT_BYTES)
        .map_err(FileError::reading(&args.image))?;
    let key = args.key.load()?;
    let mut name = format!("`{}`", args.image.display());
    if let Some(wanted) = &args.partition {
        let offset = args
            .partition_table_offset
            .unwrap_or(PartitionTable::DEFAULT_OFFSET);
        let table = match &args.partition_table {
            Some(path) => PartitionTable::load(path, offset)?,
            None => {
                let at = offset as usize;
                let Some(raw) = bytes.get(at..(at + PartitionTable::BINARY_SIZE).min(bytes.len()))
                else {
                    return Err(CmdError::Unusable(format!(
                        "{name} is {} bytes long and ends before its partition table at {offset:#x}: is it \
                         a full-flash dump? (give --partition-table FILE for another table)",
                        bytes.len()
                    )));
                };
                table_in_flash(raw, offset, &name)?
            }
        };
        let partition = table.nvs_partition(wanted, "the partition table")?;
        let (start, end) = (partition.offset as usize, partition.end() as usize);
        if bytes.len() < end {
            return Err(CmdError::Unusable(format!(
                "{name} is {} bytes long and ends before partition `{wanted}` ({:#x}..{end:#x}): \
                 the dump is truncated, or not of the whole flash",
                bytes.len(),
                partition.offset
            )));
        }
        bytes.truncate(end);
        bytes.drain(..start);
        name = format!("partition `{wanted}` of {name}");
    }
    show(bytes, key.as_ref(), args.format, &name)
}

/// Decrypts (with `key`), parses and prints an image; exit status 1 when it is damaged.
/// `name` says where the image came from, in messages.
pub fn show(
    mut bytes: Vec<u8>,
    key: Option<&XtsKey>,
    format: OutputFormat,
    name: &str,
) -> CmdResult<ExitCode> {
    if let Some(key) = key {
        decrypt_image(&mut bytes, key);
    }
    let parsed = read_image(&bytes);
    let len = bytes.len();
    // The parsed items hold their own copies of the data.
    drop(bytes);
    if parsed.looks_encrypted {
        return Err(CmdError::Unusable(match key {
            Some(_) => {
                format!("wrong key? after decrypting {name}, not one entry passes its CRC check")
            }
            None => format!(
                "{name} looks encrypted (not one entry passes its CRC check): pass --keys KEYS.bin or --hmac-key FILE"
            ),
        }));
    }
    // Streamed to stdout: a 64 MiB image's hex would otherwise be held twice more in memory.
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(1 << 16, stdout.lock());
    let written = match format {
        OutputFormat::Text => write_text(&mut out, &parsed, len),
        OutputFormat::Json => serde_json::to_writer_pretty(
            &mut out,
            &DumpJson {
                parsed: &parsed,
                len,
            },
        )
        .map_err(std::io::Error::from)
        .and_then(|()| writeln!(out)),
    };
    written
        .and_then(|()| out.flush())
        .map_err(|source| CmdError::Output {
            what: "dump",
            source,
        })?;
    if parsed.is_damaged() {
        let errors = parsed
            .problems
            .iter()
            .filter(|p| p.severity == Severity::Error)
            .count();
        eprintln!("error: {name} is damaged: {errors} problem(s) found");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn value_json(value: &ItemValue) -> Json {
    match value {
        ItemValue::Value(v) => match v {
            Value::U8(n) => json!(n),
            Value::I8(n) => json!(n),
            Value::U16(n) => json!(n),
            Value::I16(n) => json!(n),
            Value::U32(n) => json!(n),
            Value::I32(n) => json!(n),
            Value::U64(n) => json!(n),
            Value::I64(n) => json!(n),
            // The shortest text that reads back as the same f32 (`0.1`, not 0.100000001…).
            Value::F32(x) => float_json(x.is_finite(), || x.to_string().parse().ok()),
            Value::F64(x) => float_json(x.is_finite(), || Some(*x)),
            Value::String(s) => json!(s),
            Value::Blob(b) => json!(hex(b)),
        },
        ItemValue::Blob(blob) => json!(hex(&blob.data)),
        ItemValue::Unreadable => Json::Null,
    }
}

/// A JSON number; NaN and the infinities, which JSON cannot hold, are `null`.
fn float_json(finite: bool, value: impl FnOnce() -> Option<f64>) -> Json {
    match value().filter(|_| finite) {
        Some(x) => json!(x),
        None => Json::Null,
    }
}

/// The `cargo-nvs/dump/v1` document, serialized as it is written (keys in alphabetical order,
/// as a `serde_json::Map` orders them, so the output is the same as when it was built whole).
pub struct DumpJson<'a> {
    pub parsed: &'a ParsedImage,
    pub len: usize,
}

impl Serialize for DumpJson<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let parsed = self.parsed;
        let pages: Vec<Json> = parsed
            .pages
            .iter()
            .map(|p| {
                json!({
                    "index": p.index,
                    "state": p.state.name(),
                    "sequence": p.sequence,
                    "version": p.version.map(|v| v.number()),
                    "written": p.written,
                    "erased": p.erased,
                    "empty": p.empty,
                })
            })
            .collect();
        let problems: Vec<Json> = parsed
            .problems
            .iter()
            .map(|p| {
                json!({
                    "severity": match p.severity { Severity::Error => "error", Severity::Warning => "warning" },
                    "page": p.page,
                    "entry": p.entry,
                    "message": p.message,
                })
            })
            .collect();
        let namespaces: Vec<Json> = parsed
            .namespaces
            .iter()
            .map(|n| json!({"index": n.index, "name": n.name}))
            .collect();
        let mut map = serializer.serialize_map(Some(8))?;
        map.serialize_entry("damaged", &parsed.is_damaged())?;
        map.serialize_entry("items", &Items(&parsed.items))?;
        map.serialize_entry("namespaces", &namespaces)?;
        map.serialize_entry("pages", &pages)?;
        map.serialize_entry("problems", &problems)?;
        map.serialize_entry("schema", "cargo-nvs/dump/v1")?;
        map.serialize_entry("size", &self.len)?;
        map.serialize_entry("version", &parsed.version().map(|v| v.number()))?;
        map.end()
    }
}

struct Items<'a>(&'a [Item]);

impl Serialize for Items<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.0.len()))?;
        for item in self.0 {
            seq.serialize_element(&ItemJson(item))?;
        }
        seq.end()
    }
}

struct ItemJson<'a>(&'a Item);

impl Serialize for ItemJson<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let item = self.0;
        let blob = match &item.value {
            ItemValue::Blob(blob) => Some(blob),
            _ => None,
        };
        let mut map = serializer.serialize_map(None)?;
        if let Some(blob) = blob {
            map.serialize_entry("chunk_start", &blob.chunk_start)?;
            map.serialize_entry("chunks", &blob.chunks)?;
        }
        map.serialize_entry("entry", &item.entry)?;
        map.serialize_entry("erased", &item.erased)?;
        map.serialize_entry("key", &item.key)?;
        map.serialize_entry("namespace", &item.namespace)?;
        map.serialize_entry("ns_index", &item.ns_index)?;
        map.serialize_entry("page", &item.page)?;
        if let Some(blob) = blob {
            map.serialize_entry("size", &blob.data.len())?;
        }
        map.serialize_entry("type", item.type_name())?;
        match &item.value {
            ItemValue::Value(Value::Blob(bytes)) => {
                map.serialize_entry("value", &HexJson(bytes))?
            }
            ItemValue::Blob(blob) => map.serialize_entry("value", &HexJson(&blob.data))?,
            other => map.serialize_entry("value", &value_json(other))?,
        }
        map.end()
    }
}

/// Lower-case hex, written piece by piece into the output.
struct HexJson<'a>(&'a [u8]);

impl Serialize for HexJson<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&HexDisplay(self.0))
    }
}

struct HexDisplay<'a>(&'a [u8]);

impl std::fmt::Display for HexDisplay<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut buf = [0u8; 1024];
        for chunk in self.0.chunks(buf.len() / 2) {
            for (pair, b) in buf.chunks_exact_mut(2).zip(chunk) {
                pair[0] = HEX[usize::from(b >> 4)];
                pair[1] = HEX[usize::from(b & 0xF)];
            }
            // ASCII hex digits only.
            f.write_str(std::str::from_utf8(&buf[..chunk.len() * 2]).unwrap_or_default())?;
        }
        Ok(())
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// The text dump, written item by item.
pub fn write_text(out: &mut impl IoWrite, parsed: &ParsedImage, len: usize) -> std::io::Result<()> {
    let mut text = String::new();
    render_header(&mut text, parsed, len);
    out.write_all(text.as_bytes())?;
    for item in &parsed.items {
        text.clear();
        render_item(&mut text, item);
        out.write_all(text.as_bytes())?;
    }
    text.clear();
    render_problems(&mut text, parsed);
    out.write_all(text.as_bytes())
}

fn render_header(out: &mut String, parsed: &ParsedImage, len: usize) {
    let version = parsed
        .version()
        .map_or("?".to_owned(), |v| v.number().to_string());
    let _ = writeln!(
        out,
        "NVS image: {len} bytes ({len:#x}), {} page(s), format version {version}",
        parsed.pages.len()
    );
    let _ = writeln!(out, "\nPages:");
    for p in &parsed.pages {
        match p.sequence {
            Some(seq) => {
                let _ = writeln!(
                    out,
                    "  {:>3}  {:<13} seq {seq:<4} written {:>3}  erased {:>3}  empty {:>3}",
                    p.index,
                    p.state.name(),
                    p.written,
                    p.erased,
                    p.empty
                );
            }
            None => {
                let _ = writeln!(out, "  {:>3}  {}", p.index, p.state.name());
            }
        }
    }
    let _ = writeln!(out, "\nNamespaces:");
    for n in &parsed.namespaces {
        let _ = writeln!(out, "  {:>3}  {}", n.index, n.name);
    }
    let _ = writeln!(out, "\nItems:");
}

fn render_item(out: &mut String, item: &Item) {
    {
        let ns = item
            .namespace
            .clone()
            .unwrap_or_else(|| format!("#{}", item.ns_index));
        let value = match &item.value {
            ItemValue::Value(v) => v.to_string(),
            ItemValue::Blob(b) => {
                let chunks = b
                    .chunks
                    .map_or(String::new(), |c| format!(", {c} chunk(s)"));
                format!("({} bytes{chunks}) {}", b.data.len(), HexDisplay(&b.data))
            }
            ItemValue::Unreadable => "<unreadable>".to_owned(),
        };
        let erased = if item.erased { " (erased)" } else { "" };
        let _ = writeln!(
            out,
            "  {ns}:{:<15} {:<7} {value}{erased}",
            item.key,
            item.type_name()
        );
    }
}

fn render_problems(out: &mut String, parsed: &ParsedImage) {
    if parsed.problems.is_empty() {
        let _ = writeln!(out, "\nNo problems found.");
    } else {
        let _ = writeln!(out, "\nProblems:");
        for p in &parsed.problems {
            let severity = match p.severity {
                Severity::Error => "error",
                Severity::Warning => "warning",
            };
            let at = match (p.page, p.entry) {
                (Some(page), Some(entry)) => format!("page {page}, entry {entry}: "),
                (Some(page), None) => format!("page {page}: "),
                _ => String::new(),
            };
            let _ = writeln!(out, "  {severity}: {at}{}", p.message);
        }
    }
}
