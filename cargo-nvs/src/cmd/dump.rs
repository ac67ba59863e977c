//! `cargo nvs dump IMAGE`: namespaces, keys, types and values, page states and every problem.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use nvs_build::format::{ItemValue, ParsedImage, Severity, Value, read_image};
use serde_json::{Value as Json, json};

use nvs_build::format::encryption::{XtsKey, decrypt_image};

use super::OutputFormat;
use super::keys::KeyInput;
use crate::{CliError, CliResult};

/// Show the contents of an NVS partition image and check it for damage.
///
/// Exits with status 1 when the image is damaged (an error-level problem was found).
#[derive(clap::Args)]
pub struct DumpArgs {
    /// The image file (generated, or read back from a device).
    image: PathBuf,
    /// Output format; `json` is stable and documented in the README.
    #[arg(long, value_enum, default_value_t)]
    format: OutputFormat,
    #[command(flatten)]
    key: KeyInput,
}

pub fn run(args: DumpArgs) -> CliResult<ExitCode> {
    let bytes = std::fs::read(&args.image)
        .map_err(|e| CliError(format!("cannot read `{}`: {e}", args.image.display())))?;
    let key = args.key.load()?;
    show(
        bytes,
        key.as_ref(),
        args.format,
        &format!("`{}`", args.image.display()),
    )
}

/// Decrypts (with `key`), parses and prints an image; exit status 1 when it is damaged.
/// `name` says where the image came from, in messages.
pub fn show(
    mut bytes: Vec<u8>,
    key: Option<&XtsKey>,
    format: OutputFormat,
    name: &str,
) -> CliResult<ExitCode> {
    if let Some(key) = key {
        decrypt_image(&mut bytes, key);
    }
    let parsed = read_image(&bytes);
    if parsed.looks_encrypted {
        return Err(CliError(match key {
            Some(_) => {
                format!("wrong key? after decrypting {name}, not one entry passes its CRC check")
            }
            None => format!(
                "{name} looks encrypted (not one entry passes its CRC check): pass --keys KEYS.bin or --hmac-key FILE"
            ),
        }));
    }
    match format {
        OutputFormat::Text => print!("{}", render_text(&parsed, bytes.len())),
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&render_json(&parsed, bytes.len()))?
        ),
    }
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

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
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

pub fn render_json(parsed: &ParsedImage, len: usize) -> Json {
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
    let items: Vec<Json> = parsed
        .items
        .iter()
        .map(|item| {
            let mut obj = json!({
                "namespace": item.namespace,
                "ns_index": item.ns_index,
                "key": item.key,
                "type": item.type_name(),
                "value": value_json(&item.value),
                "page": item.page,
                "entry": item.entry,
                "erased": item.erased,
            });
            if let ItemValue::Blob(blob) = &item.value {
                obj["size"] = json!(blob.data.len());
                obj["chunks"] = json!(blob.chunks);
                obj["chunk_start"] = json!(blob.chunk_start);
            }
            obj
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
    json!({
        "schema": "cargo-nvs/dump/v1",
        "size": len,
        "version": parsed.version().map(|v| v.number()),
        "damaged": parsed.is_damaged(),
        "pages": pages,
        "namespaces": parsed.namespaces.iter().map(|n| json!({"index": n.index, "name": n.name})).collect::<Vec<_>>(),
        "items": items,
        "problems": problems,
    })
}

pub fn render_text(parsed: &ParsedImage, len: usize) -> String {
    let mut out = String::new();
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
    for item in &parsed.items {
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
                format!("({} bytes{chunks}) {}", b.data.len(), hex(&b.data))
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
    out
}
