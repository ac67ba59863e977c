//! `cargo nvs partitions`: the partition table, which NVS partitions get which namespaces and
//! keys, and how full each image is.

use std::fmt::Write as _;
use std::process::ExitCode;

use nvs_build::metadata::{Metadata, PartitionSpec, TableSource};
use nvs_build::resolve::{Inputs, PartitionImage, build_partition};
use serde_json::{Value as Json, json};

use super::OutputFormat;
use super::error::CmdResult;
use cargo_nvs::project::PackageArgs;

/// Show the partition table and what goes into each NVS partition.
#[derive(clap::Args)]
#[command(after_help = "Example:\n  cargo nvs partitions --manifest-path firmware/Cargo.toml")]
pub struct PartitionsArgs {
    #[command(flatten)]
    package: PackageArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    format: OutputFormat,
}

/// What building one partition's image in memory gave.
enum Fill {
    /// Percent full, entries used and available, and the environment variables that were not
    /// set (the image was built with placeholders for them: an estimate).
    Percent(u32, usize, usize, Vec<String>),
    Skipped(String),
    Error(String),
}

/// Builds the image in memory to tell how full it is. Showing the table needs no secrets: an
/// environment variable that is not set gets a placeholder (never shown), and the fill is an
/// estimate.
fn fill(metadata: &Metadata, spec: &PartitionSpec) -> Fill {
    let missing = std::cell::RefCell::new(Vec::<String>::new());
    let build = |placeholders: bool| {
        let mut inputs = Inputs::new(|var| {
            std::env::var(var).ok().or_else(|| {
                missing.borrow_mut().push(var.to_owned());
                placeholders.then(|| "00".to_owned())
            })
        });
        build_partition(spec, &metadata.manifest_dir, &mut inputs)
    };
    let (result, estimated) = match build(false) {
        Err(_) if !missing.borrow().is_empty() => {
            missing.borrow_mut().clear();
            (build(true), true)
        }
        other => (other, false),
    };
    let mut unset = if estimated {
        missing.into_inner()
    } else {
        Vec::new()
    };
    unset.sort();
    unset.dedup();
    match result {
        Ok(PartitionImage::Built(b)) => {
            Fill::Percent(b.percent_full(), b.entries_used, b.entries_available, unset)
        }
        Ok(PartitionImage::Skipped { reason }) => Fill::Skipped(reason),
        Err(e) => Fill::Error(e.to_string()),
    }
}

/// `(estimated: $A, $B not set)`.
fn estimate_note(unset: &[String]) -> String {
    if unset.is_empty() {
        String::new()
    } else {
        format!(
            " (estimated: {} not set)",
            unset
                .iter()
                .map(|v| format!("${v}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

pub fn run(args: PartitionsArgs) -> CmdResult<ExitCode> {
    let project = args.package.find()?;
    let metadata = project.nvs_metadata()?;
    let table_name = match &metadata.table_source {
        TableSource::BuiltInDefault => {
            "ESP-IDF default single-app table (none configured)".to_owned()
        }
        source => source
            .path()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
    };
    let fills: Vec<(&PartitionSpec, Fill)> = metadata
        .partitions
        .iter()
        .map(|s| (s, fill(&metadata, s)))
        .collect();
    let mut failed = false;
    for (spec, fill) in &fills {
        if let Fill::Error(e) = fill {
            eprintln!("error: NVS partition `{}`: {e}", spec.name);
            failed = true;
        }
    }
    match args.format {
        OutputFormat::Json => {
            let table: Vec<Json> = metadata
                .table
                .partitions
                .iter()
                .map(|p| {
                    json!({
                        "name": p.name, "type": p.type_name(), "subtype": p.subtype_name(),
                        "offset": p.offset, "size": p.size, "encrypted": p.encrypted, "readonly": p.readonly,
                    })
                })
                .collect();
            let nvs: Vec<Json> = fills
                .iter()
                .map(|(spec, fill)| {
                    let (percent, status) = match fill {
                        Fill::Percent(p, _, _, unset) if unset.is_empty() => (json!(p), json!("ok")),
                        Fill::Percent(p, _, _, unset) => {
                            (json!(p), json!(format!("estimated{}", estimate_note(unset))))
                        }
                        Fill::Skipped(r) => (Json::Null, json!(format!("skipped: {r}"))),
                        Fill::Error(e) => (Json::Null, json!(format!("error: {e}"))),
                    };
                    json!({
                        "name": spec.name,
                        "offset": spec.offset,
                        "size": spec.size,
                        "factory": spec.factory,
                        "version": spec.version.number(),
                        "encrypted": spec.encryption.is_some(),
                        "csv": spec.csv.iter().map(|(p, _)| p.display().to_string()).collect::<Vec<_>>(),
                        "namespaces": spec.namespaces.iter().map(|ns| json!({
                            "name": ns.name,
                            "keys": ns.entries.iter().map(|e| json!({"key": e.key, "type": format!("{:?}", e.encoding).to_lowercase()})).collect::<Vec<_>>(),
                        })).collect::<Vec<_>>(),
                        "percent_full": percent,
                        "status": status,
                    })
                })
                .collect();
            let doc = json!({"schema": "cargo-nvs/partitions/v1", "partition_table": table_name, "partitions": table, "nvs": nvs});
            println!("{}", serde_json::to_string_pretty(&doc)?);
        }
        OutputFormat::Text => {
            let mut out = String::new();
            let _ = writeln!(out, "Partition table: {table_name}\n");
            let _ = writeln!(
                out,
                "  {:<16} {:<6} {:<10} {:>10} {:>10}  flags",
                "name", "type", "subtype", "offset", "size"
            );
            for p in &metadata.table.partitions {
                let mut flags = Vec::new();
                if p.encrypted {
                    flags.push("encrypted");
                }
                if p.readonly {
                    flags.push("readonly");
                }
                let _ = writeln!(
                    out,
                    "  {:<16} {:<6} {:<10} {:>#10x} {:>#10x}  {}",
                    p.name,
                    p.type_name(),
                    p.subtype_name(),
                    p.offset,
                    p.size,
                    flags.join(",")
                );
            }
            for (spec, fill) in &fills {
                let kind = if spec.factory {
                    "factory data"
                } else {
                    "user data"
                };
                let _ = writeln!(
                    out,
                    "\nNVS partition `{}` ({kind}, version {}):",
                    spec.name,
                    spec.version.number()
                );
                for (csv, _) in &spec.csv {
                    let _ = writeln!(out, "  csv {}", csv.display());
                }
                for ns in &spec.namespaces {
                    let keys: Vec<&str> = ns.entries.iter().map(|e| e.key.as_str()).collect();
                    let _ = writeln!(out, "  namespace {}: {}", ns.name, keys.join(", "));
                }
                let _ = match fill {
                    Fill::Percent(p, used, total, unset) => writeln!(
                        out,
                        "  {p}% full ({used} of {total} entries){}",
                        estimate_note(unset)
                    ),
                    Fill::Skipped(r) => writeln!(out, "  not generated: {r}"),
                    Fill::Error(_) => writeln!(out, "  not built (see the message on stderr)"),
                };
            }
            print!("{out}");
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
