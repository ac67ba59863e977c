//! `cargo nvs mfg generate`: one NVS image per device from a config CSV and a values CSV, as
//! ESP-IDF's `mfg_gen.py generate` makes them (same inputs, same file names, same bytes).
//!
//! Each device's image is built from the generator CSV mfg_gen would write for it, fed to the
//! same CSV front end `cargo nvs generate` uses, so every image equals the reference generator's
//! on that CSV by construction. Unlike mfg_gen, nothing is written until every device has been
//! built: images go to a staging folder inside `--out-dir` and are moved into place at the end.

mod input;

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use nvs_build::format::encryption::XtsKey;
use nvs_build::format::{PartitionSize, Version};
use nvs_build::{FileBase, ImageInput, InputError};
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use self::input::{ConfigRow, DeviceRow, Values, bind_columns, device_csv, read_config};
use super::generate::{parse_version, warn_if_read_only};
use super::keys::load_key;
use crate::fsutil::{write_atomic, write_secret};
use crate::size::parse_size;
use crate::{CliError, CliResult};

/// Mass manufacturing: per-device NVS images from a config and a values CSV (ESP-IDF's
/// mfg_gen.py).
#[derive(clap::Args)]
pub struct MfgArgs {
    #[command(subcommand)]
    command: MfgCommand,
}

#[derive(clap::Subcommand)]
enum MfgCommand {
    Generate(MfgGenerateArgs),
}

/// Generate one NVS image per device row of the values file.
///
/// Writes `<out-dir>/bin/<PREFIX>[-NNNN]-<FILEID>.bin`, byte-identical to mfg_gen.py's, plus
/// `manifest.csv` and `manifest.json` (device, values line, image, SHA-256, key file). Accepts
/// mfg_gen's `generate CONF VALUES PREFIX SIZE` and its option spellings (`--prefix_num`,
/// `--outdir`).
///
/// Encodings: mfg_gen's (string, binary, hex2bin, base64, u8, i8, u16, u32, i32, u64, i64) and
/// also i16, which mfg_gen rejects by mistake although the generator supports it. Unlike mfg_gen,
/// no intermediate csv/ files are written, existing images and keys are never overwritten, and
/// nothing is written unless every device's image builds.
#[derive(clap::Args)]
#[command(disable_version_flag = true)]
pub struct MfgGenerateArgs {
    /// mfg_gen's positional form: config CSV, values CSV, file name prefix, partition size.
    #[arg(value_name = "CONF VALUES PREFIX SIZE", num_args = 0..=4)]
    positional: Vec<String>,
    /// Config CSV, no header: `name,namespace,` and `key,type,encoding[,REPEAT]` rows.
    #[arg(long, alias = "conf", value_name = "CONF.csv")]
    config: Option<PathBuf>,
    /// Values CSV: a header naming every config key (in config order; other columns are
    /// metadata), then one row per device. A REPEAT key's value is taken from the first row.
    #[arg(long, value_name = "VALUES.csv")]
    values: Option<PathBuf>,
    /// File name prefix of every image.
    #[arg(long, value_name = "NAME")]
    prefix: Option<String>,
    /// Partition size (hex like 0x6000, or decimal).
    #[arg(long, value_name = "SIZE")]
    size: Option<String>,
    /// Values column that names each image (a serial number); default: 1, 2, 3… by row.
    #[arg(long, value_name = "COLUMN")]
    fileid: Option<String>,
    /// Insert a counter in the names: from START, zero-padded to LEN digits.
    #[arg(long = "prefix-num", alias = "prefix_num", num_args = 2, value_names = ["START", "LEN"])]
    prefix_num: Option<Vec<u64>>,
    /// NVS format version: 2 has multi-page blobs (default), 1 is the legacy format.
    #[arg(long, value_name = "1|2", default_value = "2", value_parser = parse_version)]
    version: Version,
    /// Encrypt every image with its own fresh key, written to keys/keys-<name>.bin (0600).
    #[arg(long, conflicts_with = "inputkey")]
    keygen: bool,
    /// Encrypt every image with the key in this nvs_keys file.
    #[arg(long, value_name = "KEYS.bin")]
    inputkey: Option<PathBuf>,
    /// Output folder [default: the current directory].
    #[arg(long = "out-dir", aliases = ["outdir", "out_dir"], value_name = "DIR")]
    out_dir: Option<PathBuf>,
    /// fsync every file written (slower; for when power may fail right after the run).
    #[arg(long)]
    sync: bool,
}

pub fn run(args: MfgArgs) -> CliResult<ExitCode> {
    match args.command {
        MfgCommand::Generate(args) => generate(args),
    }
}

/// The run's settings, after the positional and named spellings are merged.
struct Plan {
    config: PathBuf,
    values: PathBuf,
    prefix: String,
    size: PartitionSize,
    version: Version,
    fileid: Option<String>,
    prefix_num: Option<(u64, usize)>,
    out_dir: PathBuf,
    sync: bool,
}

fn plan(args: &MfgGenerateArgs) -> CliResult<Plan> {
    let mut positional = args.positional.iter();
    let mut pick = |named: Option<String>, what: &str| -> CliResult<String> {
        match (positional.next(), named) {
            (Some(_), Some(_)) => Err(CliError(format!(
                "{what} is given both as an argument and as --{what}; give it once"
            ))),
            (Some(p), None) => Ok(p.clone()),
            (None, Some(n)) => Ok(n),
            (None, None) => Err(CliError(format!(
                "give --config, --values, --prefix and --size (or CONF VALUES PREFIX SIZE); \
                 {what} is missing"
            ))),
        }
    };
    let path_text = |p: &Option<PathBuf>| p.as_ref().map(|p| p.to_string_lossy().into_owned());
    let config = PathBuf::from(pick(path_text(&args.config), "config")?);
    let values = PathBuf::from(pick(path_text(&args.values), "values")?);
    let prefix = pick(args.prefix.clone(), "prefix")?;
    let size_text = pick(args.size.clone(), "size")?;
    let size = PartitionSize::new(parse_size(&size_text)?)
        .map_err(|e| CliError(format!("SIZE {size_text}: {e}")))?;
    check_name_part(&prefix).map_err(|why| CliError(format!("--prefix `{prefix}`: {why}")))?;
    let prefix_num = match args.prefix_num.as_deref() {
        // A counter wider than u64's 20 digits is only padding.
        Some(&[_, len]) if len > 20 => {
            return Err(CliError(format!(
                "--prefix-num LEN {len}: use at most 20 digits"
            )));
        }
        Some(&[start, len]) => Some((start, len as usize)),
        _ => None,
    };
    Ok(Plan {
        config,
        values,
        prefix,
        size,
        version: args.version,
        fileid: args.fileid.clone(),
        prefix_num,
        out_dir: args.out_dir.clone().unwrap_or_else(|| PathBuf::from(".")),
        sync: args.sync,
    })
}

/// Names become file names: refuse what would leave the folder or is not a name.
fn check_name_part(text: &str) -> Result<(), &'static str> {
    if text.is_empty() {
        return Err("it is empty");
    }
    if text.contains(['/', '\\', '\0']) || text == "." || text == ".." {
        return Err("it cannot be part of a file name (no `/`, `\\`, NUL, `.` or `..`)");
    }
    Ok(())
}

/// How images are encrypted.
enum Keys {
    Plain,
    Shared(XtsKey),
    PerDevice,
}

/// One device, as planned in the first pass.
struct Device {
    line: usize,
    id: String,
    name: String,
}

/// One device's results, as written to the staging folder.
struct Written {
    sha256: String,
    key_file: Option<String>,
}

fn generate(args: MfgGenerateArgs) -> CliResult<ExitCode> {
    let plan = plan(&args)?;
    let keys = match (&args.inputkey, args.keygen) {
        (Some(path), _) => Keys::Shared(load_key(path)?),
        (None, true) => Keys::PerDevice,
        (None, false) => Keys::Plain,
    };
    warn_if_read_only(plan.size);
    let mut rows = read_config(&plan.config)?;
    let mut values = Values::open(&plan.values)?;
    bind_columns(&plan.config, &mut rows, &plan.values, &values.header)?;
    let fileid_column = match &plan.fileid {
        Some(column) => Some(
            values
                .header
                .iter()
                .position(|h| h == column)
                .ok_or_else(|| {
                    CliError(format!(
                        "{}:{}: --fileid column `{column}` is not in the header (it has: {})",
                        plan.values.display(),
                        values.header_line,
                        values.header.join(",")
                    ))
                })?,
        ),
        None => {
            eprintln!(
                "warning: without --fileid, images are numbered 1, 2, 3… by row, and the numbers \
                 start again in every batch; name them by a unique column (--fileid serial_no)"
            );
            None
        }
    };

    // Pass 1: check every row, name every device and refuse duplicates before writing anything.
    let mut devices = Vec::new();
    let mut first_row: Option<Vec<String>> = None;
    let mut ids: HashMap<String, usize> = HashMap::new();
    let mut counter = plan.prefix_num.map_or(0, |(start, _)| start);
    while let Some(row) = values.next_device()? {
        let first = first_row.get_or_insert_with(|| row.fields.clone());
        let id = match fileid_column {
            // The id comes from the row as mfg_gen completes it (REPEAT values from row 1).
            Some(c) if rows.iter().any(|r| r.repeat && r.column == Some(c)) => first[c].clone(),
            Some(c) => row.fields[c].clone(),
            None => (devices.len() + 1).to_string(),
        };
        let at = || format!("{}:{}", plan.values.display(), row.line);
        if let Err(why) = check_name_part(&id) {
            return Err(CliError(format!(
                "{}: column `{}`: the device id {why}",
                at(),
                plan.fileid.as_deref().unwrap_or_default()
            )));
        }
        if let Some(previous) = ids.insert(id.clone(), row.line) {
            return Err(CliError(format!(
                "{}: column `{}`: device id `{id}` is already used at line {previous}; ids must \
                 be unique (nothing was written)",
                at(),
                plan.fileid.as_deref().unwrap_or_default()
            )));
        }
        let name = match plan.prefix_num {
            Some((_, len)) => format!("{}-{counter:0len$}-{id}", plan.prefix),
            None => format!("{}-{id}", plan.prefix),
        };
        counter = counter
            .checked_add(1)
            .ok_or_else(|| CliError("--prefix-num START: the counter overflows".into()))?;
        devices.push(Device {
            line: row.line,
            id,
            name,
        });
    }
    let Some(first_row) = first_row else {
        return Err(CliError(format!(
            "{}: the values file has a header but no device rows",
            plan.values.display()
        )));
    };
    for device in &devices {
        let mut targets = vec![bin_path(&plan.out_dir, &device.name)];
        if matches!(keys, Keys::PerDevice) {
            targets.push(key_path(&plan.out_dir, &device.name));
        }
        if let Some(existing) = targets.iter().find(|p| p.exists()) {
            return Err(CliError(format!(
                "`{}` (device `{}`, {}:{}) already exists; images are never overwritten (use a \
                 new --out-dir or remove it)",
                existing.display(),
                device.id,
                plan.values.display(),
                device.line
            )));
        }
    }

    let out_dir_existed = plan.out_dir.exists();
    let staging = plan
        .out_dir
        .join(format!(".mfg-staging-{}", std::process::id()));
    std::fs::create_dir_all(staging.join("bin"))
        .and_then(|()| std::fs::create_dir_all(staging.join("keys")))
        .map_err(|e| {
            CliError(format!(
                "cannot write to out-dir `{}`: {e}",
                plan.out_dir.display()
            ))
        })?;
    let result = build_all(&plan, &rows, &first_row, &keys, &devices, &staging)
        .and_then(|written| publish(&plan, &devices, &written, &staging));
    let _ = std::fs::remove_dir_all(&staging);
    if result.is_err() && !out_dir_existed {
        // Only removes the folder this run created, and only while it is empty.
        let _ = std::fs::remove_dir(&plan.out_dir);
    }
    result?;
    Ok(ExitCode::SUCCESS)
}

fn bin_path(out_dir: &Path, name: &str) -> PathBuf {
    out_dir.join("bin").join(format!("{name}.bin"))
}

fn key_path(out_dir: &Path, name: &str) -> PathBuf {
    out_dir.join("keys").join(format!("keys-{name}.bin"))
}

/// Pass 2: reads the values again, record by record, and builds and stages the images in
/// parallel, a chunk at a time.
fn build_all(
    plan: &Plan,
    rows: &[ConfigRow],
    first_row: &[String],
    keys: &Keys,
    devices: &[Device],
    staging: &Path,
) -> CliResult<Vec<Written>> {
    const CHUNK: usize = 1024;
    let mut values = Values::open(&plan.values)?;
    let mut written = Vec::with_capacity(devices.len());
    let started = Instant::now();
    let terminal = std::io::stderr().is_terminal();
    let mut warned_repeat = false;
    let mut chunk: Vec<DeviceRow> = Vec::with_capacity(CHUNK);
    for batch in devices.chunks(CHUNK) {
        chunk.clear();
        for _ in batch {
            let row = values.next_device()?.ok_or_else(|| {
                CliError(format!(
                    "{} changed while it was being read",
                    plan.values.display()
                ))
            })?;
            chunk.push(row);
        }
        if !warned_repeat {
            warned_repeat = warn_ignored_repeats(plan, rows, first_row, &chunk, &values.header);
        }
        let results: Vec<CliResult<Written>> = batch
            .par_iter()
            .zip(chunk.par_iter())
            .map(|(device, row)| build_device(plan, rows, first_row, keys, device, row, staging))
            .collect();
        for result in results {
            written.push(result?);
        }
        if terminal {
            eprint!("\r{}", progress(written.len(), devices.len(), started));
        }
    }
    if terminal {
        eprint!("\r");
    }
    eprintln!("{}", progress(written.len(), devices.len(), started));
    Ok(written)
}

fn progress(done: usize, total: usize, started: Instant) -> String {
    let seconds = started.elapsed().as_secs_f64().max(1e-6);
    format!(
        "{done}/{total} devices built in {seconds:.2} s ({:.0} devices/s)",
        done as f64 / seconds
    )
}

/// mfg_gen takes a REPEAT key's value from the first device row and ignores later cells; say so
/// once when a later cell holds something else (values are never printed).
fn warn_ignored_repeats(
    plan: &Plan,
    rows: &[ConfigRow],
    first_row: &[String],
    chunk: &[DeviceRow],
    header: &[String],
) -> bool {
    for row in chunk {
        for config in rows.iter().filter(|r| r.repeat) {
            let c = config.column.unwrap_or_default();
            if !row.fields[c].is_empty() && row.fields[c] != first_row[c] {
                eprintln!(
                    "warning: {}:{}: column `{}` is REPEAT in the config: only the first device \
                     row's value is used, later values are ignored",
                    plan.values.display(),
                    row.line,
                    header[c]
                );
                return true;
            }
        }
    }
    false
}

fn build_device(
    plan: &Plan,
    rows: &[ConfigRow],
    first_row: &[String],
    keys: &Keys,
    device: &Device,
    row: &DeviceRow,
    staging: &Path,
) -> CliResult<Written> {
    let mut starts = Vec::with_capacity(rows.len());
    let csv = device_csv(
        rows,
        |config| {
            let c = config.column.unwrap_or_default();
            if config.repeat {
                first_row[c].clone()
            } else {
                row.fields[c].clone()
            }
        },
        &mut starts,
    );
    let mut image = ImageInput::new(plan.size, plan.version);
    let located = |e: InputError| locate(plan, rows, &starts, device, e);
    image
        .add_csv(&plan.values, csv.as_bytes(), &FileBase::CurrentDir)
        .map_err(located)?;
    let device_key = match keys {
        Keys::PerDevice => Some(XtsKey::generate()?),
        _ => None,
    };
    let bytes = match (keys, &device_key) {
        (Keys::Shared(key), _) | (_, Some(key)) => image.finish_encrypted(key),
        _ => image.finish(),
    }
    .map_err(located)?;
    let bin = bin_path(staging, &device.name);
    write_atomic(&bin, &bytes, None)
        .map_err(|e| CliError(format!("cannot write `{}`: {e}", bin.display())))?;
    let key_file = match &device_key {
        Some(key) => {
            let path = key_path(staging, &device.name);
            write_secret(&path, &key.to_key_file(), false)
                .map_err(|e| CliError(format!("cannot write `{}`: {e}", path.display())))?;
            Some(format!("keys/keys-{}.bin", device.name))
        }
        None => None,
    };
    Ok(Written {
        sha256: hex(&Sha256::digest(&bytes)),
        key_file,
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Turns an error about the device's generator CSV into one about the inputs: the values row
/// and column for data, the config line for namespaces.
fn locate(
    plan: &Plan,
    rows: &[ConfigRow],
    starts: &[usize],
    device: &Device,
    e: InputError,
) -> CliError {
    let device_at = format!(
        "{}:{}: device `{}`",
        plan.values.display(),
        device.line,
        device.id
    );
    let line = e.location().and_then(|l| l.line);
    let row = line.and_then(|line| starts.iter().rposition(|&s| s <= line).map(|i| &rows[i]));
    let message = e.message();
    match row {
        Some(row) if row.is_namespace() => CliError(format!(
            "{}:{}: namespace `{}`: {message} (building {device_at})",
            plan.config.display(),
            row.line,
            row.key
        )),
        Some(row) => CliError(format!(
            "{device_at}, column `{}` ({} at {}:{}): {message}",
            row.key,
            row.encoding,
            plan.config.display(),
            row.line
        )),
        None => CliError(format!("{device_at}: {message}")),
    }
}

/// Moves the staged files into place (key files never replace existing ones) and writes the
/// manifests.
fn publish(plan: &Plan, devices: &[Device], written: &[Written], staging: &Path) -> CliResult<()> {
    let io = |path: &Path, e: std::io::Error| {
        CliError(format!("cannot write `{}`: {e}", path.display()))
    };
    let bin_dir = plan.out_dir.join("bin");
    std::fs::create_dir_all(&bin_dir).map_err(|e| io(&bin_dir, e))?;
    let keys_dir = plan.out_dir.join("keys");
    if written.iter().any(|w| w.key_file.is_some()) {
        std::fs::create_dir_all(&keys_dir).map_err(|e| io(&keys_dir, e))?;
    }
    let mut moved = Vec::new();
    for (device, w) in devices.iter().zip(written) {
        if w.key_file.is_some() {
            let (from, to) = (
                key_path(staging, &device.name),
                key_path(&plan.out_dir, &device.name),
            );
            std::fs::hard_link(&from, &to).map_err(|e| io(&to, e))?;
            moved.push(to);
        }
        let (from, to) = (
            bin_path(staging, &device.name),
            bin_path(&plan.out_dir, &device.name),
        );
        std::fs::rename(&from, &to).map_err(|e| io(&to, e))?;
        moved.push(to);
    }

    let mut csv = String::from("device,line,image,sha256,key_file\n");
    let mut json = Vec::with_capacity(devices.len());
    for (device, w) in devices.iter().zip(written) {
        let image = format!("bin/{}.bin", device.name);
        let key_file = w.key_file.clone().unwrap_or_default();
        let cells = [
            device.id.as_str(),
            &device.line.to_string(),
            &image,
            &w.sha256,
            &key_file,
        ];
        let quoted: Vec<String> = cells.iter().map(|c| csv_cell(c)).collect();
        csv.push_str(&quoted.join(","));
        csv.push('\n');
        json.push(serde_json::json!({
            "device": device.id,
            "line": device.line,
            "image": image,
            "sha256": w.sha256,
            "key_file": w.key_file,
        }));
    }
    let manifest = serde_json::json!({
        "config": plan.config.display().to_string(),
        "values": plan.values.display().to_string(),
        "prefix": plan.prefix,
        "size": plan.size.bytes(),
        "version": plan.version.number(),
        "devices": json,
    });
    let csv_path = plan.out_dir.join("manifest.csv");
    write_atomic(&csv_path, csv.as_bytes(), None).map_err(|e| io(&csv_path, e))?;
    let json_path = plan.out_dir.join("manifest.json");
    let mut json_text = serde_json::to_string_pretty(&manifest)?;
    json_text.push('\n');
    write_atomic(&json_path, json_text.as_bytes(), None).map_err(|e| io(&json_path, e))?;
    moved.extend([csv_path, json_path]);

    if plan.sync {
        for path in moved.iter().chain([&bin_dir, &keys_dir, &plan.out_dir]) {
            if path.exists() {
                std::fs::File::open(path)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| io(path, e))?;
            }
        }
    }
    eprintln!(
        "Created {} NVS image(s) in `{}`{} and manifest.csv/.json",
        devices.len(),
        bin_dir.display(),
        if written.iter().any(|w| w.key_file.is_some()) {
            format!(", their keys in `{}`", keys_dir.display())
        } else {
            String::new()
        }
    );
    Ok(())
}

fn csv_cell(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_owned()
    }
}
