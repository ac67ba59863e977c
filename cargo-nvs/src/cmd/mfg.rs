//! `cargo nvs mfg generate`: one NVS image per device from a config CSV and a values CSV, as
//! ESP-IDF's `mfg_gen.py generate` makes them (same inputs, same file names, same bytes).
//!
//! Each device's image is built from the generator CSV mfg_gen would write for it, fed to the
//! same CSV front end `cargo nvs generate` uses, so every image equals the reference generator's
//! on that CSV by construction. Unlike mfg_gen, nothing is written until every device's image
//! has been built once in memory; then each image is built again, written to a temporary file,
//! renamed into place and recorded in the ledger (one transaction), so an interrupted run leaves
//! only complete images under final names and `--resume` finishes it.
//!
//! `mfg flash` and `mfg log` (in `flash.rs`) flash issued devices and export the production log.

mod flash;
mod input;
mod ledger;

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use nvs_build::format::encryption::XtsKey;
use nvs_build::format::{PartitionSize, Version};
use nvs_build::{FileBase, ImageInput, InputError};
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use self::input::{ConfigRow, DeviceRow, Values, bind_columns, device_csv, read_config};
use self::ledger::{Issued, Ledger, SqliteLedger};
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
    Flash(Box<flash::MfgFlashArgs>),
    Log(flash::MfgLogArgs),
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
///
/// Every device id and its image's SHA-256 go to the ledger (`<out-dir>/ledger.sqlite`, or
/// --ledger) as the image is finalized; an id issued by an earlier run is refused (unless
/// --allow-reissue). Each image appears complete under its final name or not at all, so a run
/// that was interrupted is finished with --resume.
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
    /// The ledger of issued device ids (SQLite; may be shared by several out dirs)
    /// [default: <out-dir>/ledger.sqlite].
    #[arg(long, value_name = "PATH")]
    ledger: Option<PathBuf>,
    /// Finish an interrupted run: devices whose image exists and is in the ledger with the same
    /// SHA-256 are kept (not issued again); the others are generated.
    #[arg(long)]
    resume: bool,
    /// Issue device ids that the ledger says were issued before (new images replace their
    /// entries).
    #[arg(long)]
    allow_reissue: bool,
}

pub fn run(args: MfgArgs) -> CliResult<ExitCode> {
    match args.command {
        MfgCommand::Generate(args) => generate(args),
        MfgCommand::Flash(args) => flash::run(*args),
        MfgCommand::Log(args) => flash::log(args),
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
    ledger: PathBuf,
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
    let out_dir = args.out_dir.clone().unwrap_or_else(|| PathBuf::from("."));
    Ok(Plan {
        ledger: args
            .ledger
            .clone()
            .unwrap_or_else(|| out_dir.join("ledger.sqlite")),
        config,
        values,
        prefix,
        size,
        version: args.version,
        fileid: args.fileid.clone(),
        prefix_num,
        out_dir,
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
    /// Its key in the ledger: the id, or the image name when ids are row numbers.
    ledger_id: String,
}

/// What the run does with a device.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Action {
    /// Build, write and record it.
    Build,
    /// Build, write and record it, replacing a leftover of an interrupted run that the ledger
    /// does not know (an image or key that was written but not recorded).
    Replace,
    /// Finished by an earlier run: keep it.
    Keep,
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
                 start again in every batch; name them by a unique column (--fileid serial_no). \
                 The ledger records them by image name (`{}-…1`) and so cannot tell them from \
                 another batch's with the same names",
                plan.prefix
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
        let ledger_id = if fileid_column.is_some() {
            id.clone()
        } else {
            name.clone()
        };
        devices.push(Device {
            line: row.line,
            id,
            name,
            ledger_id,
        });
    }
    let Some(first_row) = first_row else {
        return Err(CliError(format!(
            "{}: the values file has a header but no device rows",
            plan.values.display()
        )));
    };

    // Pass 2: build every image in memory (nothing is written) so that bad input writes nothing;
    // keep the SHA-256 of the images that come out the same every time.
    let expected = build_all(&plan, &rows, &first_row, &keys, &devices, None)?;

    // Pass 3: what to do with each device, refusing existing files and issued ids.
    let existing_ledger = SqliteLedger::open_existing(&plan.ledger)?;
    let mut actions = Vec::with_capacity(devices.len());
    for (device, expected) in devices.iter().zip(&expected) {
        let issued = match &existing_ledger {
            Some(ledger) => ledger.issued(&device.ledger_id)?,
            None => None,
        };
        actions.push(decide(
            &plan,
            &args,
            &keys,
            device,
            expected.as_deref(),
            issued,
        )?);
    }

    // Pass 4: build again, and write and record each image.
    let out_dir_existed = plan.out_dir.exists();
    let result = std::fs::create_dir_all(plan.out_dir.join("bin"))
        .map_err(|e| {
            CliError(format!(
                "cannot write to out-dir `{}`: {e}",
                plan.out_dir.display()
            ))
        })
        .and_then(|()| SqliteLedger::open(&plan.ledger, plan.sync))
        .and_then(|ledger| {
            let work = Work {
                ledger: &ledger,
                actions: &actions,
                allow_reissue: args.allow_reissue,
                batch: run_start(),
            };
            build_all(&plan, &rows, &first_row, &keys, &devices, Some(&work))?;
            publish(&plan, &devices, &actions, &ledger)
        });
    if let Err(e) = result {
        if !out_dir_existed {
            // Only removes the folders this run created, and only while they are empty.
            let _ = std::fs::remove_dir(plan.out_dir.join("bin"));
            let _ = std::fs::remove_dir(&plan.out_dir);
        }
        let any_image = std::fs::read_dir(plan.out_dir.join("bin")).is_ok_and(|mut entries| {
            entries.any(|e| e.is_ok_and(|e| !e.file_name().to_string_lossy().starts_with('.')))
        });
        return Err(CliError(format!(
            "{}{}",
            e.0,
            if any_image {
                "; the images written so far are complete and in the ledger: run again with \
                 --resume to finish"
            } else {
                ""
            }
        )));
    }
    Ok(ExitCode::SUCCESS)
}

/// Now, as text that sorts in time order (seconds and nanoseconds since 1970, zero-padded).
fn run_start() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{:020}.{:09}", now.as_secs(), now.subsec_nanos())
}

/// Refuses what the run may not do to `device`, else says what it does.
fn decide(
    plan: &Plan,
    args: &MfgGenerateArgs,
    keys: &Keys,
    device: &Device,
    expected: Option<&str>,
    issued: Option<Issued>,
) -> CliResult<Action> {
    let at = format!("{}:{}", plan.values.display(), device.line);
    let bin = bin_path(&plan.out_dir, &device.name);
    let mut targets = vec![bin.clone()];
    if matches!(keys, Keys::PerDevice) {
        targets.push(key_path(&plan.out_dir, &device.name));
    }
    let existing = targets.iter().find(|p| p.exists());
    if args.resume {
        if let Some(issued) = &issued
            && bin.exists()
            && issued.image == image_rel(&device.name)
            && issued
                .key_file
                .as_ref()
                .is_none_or(|key| plan.out_dir.join(key).exists())
        {
            let on_disk = std::fs::read(&bin)
                .map_err(|e| CliError(format!("cannot read `{}`: {e}", bin.display())))?;
            let on_disk = hex(&Sha256::digest(&on_disk));
            if on_disk == issued.sha256 {
                if let Some(expected) = expected
                    && expected != on_disk
                {
                    return Err(CliError(format!(
                        "{at}: device `{}`: `{}` was made from other values than the row has now; \
                         --resume only finishes a run with the same inputs (nothing was written)",
                        device.id,
                        bin.display()
                    )));
                }
                return Ok(Action::Keep);
            }
        }
    } else if let Some(existing) = existing {
        return Err(CliError(format!(
            "`{}` (device `{}`, {at}) already exists; images are never overwritten (use a new \
             --out-dir, remove it, or --resume an interrupted run)",
            existing.display(),
            device.id,
        )));
    }
    if let Some(issued) = issued
        && !args.allow_reissue
    {
        return Err(CliError(format!(
            "{at}: device `{}` was already issued at {} ({}:{}, image {}) according to the \
             ledger `{}`; pass --allow-reissue to issue it again (nothing was written)",
            device.ledger_id,
            issued.issued_at,
            issued.values,
            issued.line,
            issued.image,
            plan.ledger.display()
        )));
    }
    Ok(if existing.is_some() {
        Action::Replace
    } else {
        Action::Build
    })
}

fn bin_path(out_dir: &Path, name: &str) -> PathBuf {
    out_dir.join("bin").join(format!("{name}.bin"))
}

fn key_path(out_dir: &Path, name: &str) -> PathBuf {
    out_dir.join("keys").join(format!("keys-{name}.bin"))
}

fn image_rel(name: &str) -> String {
    format!("bin/{name}.bin")
}

fn key_rel(name: &str) -> String {
    format!("keys/keys-{name}.bin")
}

/// The writing pass: where the ledger is and what to do with each device.
struct Work<'a> {
    ledger: &'a dyn Ledger,
    actions: &'a [Action],
    allow_reissue: bool,
    /// The run's start, as sortable text: orders the devices of the ledger by run, then line.
    batch: String,
}

/// Reads the values again, record by record, and builds the images in parallel, a chunk at a
/// time. Without `work`, only checks that every image builds and returns the SHA-256 of the
/// images that are the same on every build (not those with fresh keys); with it, writes and
/// records every image that is not kept.
fn build_all(
    plan: &Plan,
    rows: &[ConfigRow],
    first_row: &[String],
    keys: &Keys,
    devices: &[Device],
    work: Option<&Work<'_>>,
) -> CliResult<Vec<Option<String>>> {
    const CHUNK: usize = 1024;
    let mut values = Values::open(&plan.values)?;
    let mut shas = Vec::with_capacity(devices.len());
    let started = Instant::now();
    let terminal = std::io::stderr().is_terminal();
    let mut warned_repeat = work.is_some();
    let mut chunk: Vec<DeviceRow> = Vec::with_capacity(CHUNK);
    let verb = if work.is_some() { "built" } else { "checked" };
    let mut kept = 0;
    for (n, batch) in devices.chunks(CHUNK).enumerate() {
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
        let base = n * CHUNK;
        let results: Vec<CliResult<Option<String>>> = batch
            .par_iter()
            .zip(chunk.par_iter())
            .enumerate()
            .map(|(i, (device, row))| {
                let action = work.map(|w| w.actions[base + i]);
                if action == Some(Action::Keep) {
                    return Ok(None);
                }
                build_device(plan, rows, first_row, keys, device, row, work)
            })
            .collect();
        for result in results {
            shas.push(result?);
        }
        if let Some(work) = work {
            kept += work.actions[base..base + batch.len()]
                .iter()
                .filter(|a| **a == Action::Keep)
                .count();
        }
        if terminal {
            eprint!(
                "\r{}",
                progress(shas.len() - kept, devices.len() - kept, verb, started)
            );
        }
    }
    if terminal {
        eprint!("\r");
    }
    if work.is_some() {
        if kept > 0 {
            eprintln!("{kept} device(s) were finished by an earlier run and are kept (--resume)");
        }
        if kept < devices.len() {
            eprintln!(
                "{}",
                progress(shas.len() - kept, devices.len() - kept, verb, started)
            );
        }
    }
    Ok(shas)
}

fn progress(done: usize, total: usize, verb: &str, started: Instant) -> String {
    let seconds = started.elapsed().as_secs_f64().max(1e-6);
    format!(
        "{done}/{total} devices {verb} in {seconds:.2} s ({:.0} devices/s)",
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

/// Builds one device's image. Without `work`, returns the SHA-256 of an image that is the same
/// on every build (plain or with the shared key), else `None`. With it, writes the image (and
/// its key) under the final names, each through a temporary file and a rename, then records it
/// in the ledger.
fn build_device(
    plan: &Plan,
    rows: &[ConfigRow],
    first_row: &[String],
    keys: &Keys,
    device: &Device,
    row: &DeviceRow,
    work: Option<&Work<'_>>,
) -> CliResult<Option<String>> {
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
    let Some(work) = work else {
        // Checking: a fresh key gives other bytes on every build; the plain image shows that
        // the device builds.
        let bytes = match keys {
            Keys::Shared(key) => image.finish_encrypted(key),
            _ => image.finish(),
        }
        .map_err(located)?;
        return Ok(match keys {
            Keys::PerDevice => None,
            _ => Some(hex(&Sha256::digest(&bytes))),
        });
    };
    let device_key = match keys {
        Keys::PerDevice => Some(XtsKey::generate()?),
        _ => None,
    };
    let bytes = match (keys, &device_key) {
        (Keys::Shared(key), _) | (_, Some(key)) => image.finish_encrypted(key),
        _ => image.finish(),
    }
    .map_err(located)?;
    let io = |path: &Path, e: std::io::Error| {
        CliError(format!("cannot write `{}`: {e}", path.display()))
    };
    let key_file = match &device_key {
        Some(key) => {
            let path = key_path(&plan.out_dir, &device.name);
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
            }
            // A key file is replaced only when it is the unrecorded leftover of an
            // interrupted run (--resume).
            let leftover = path.exists();
            write_secret(&path, &key.to_key_file(), leftover).map_err(|e| io(&path, e))?;
            if plan.sync {
                sync_file(&path).map_err(|e| io(&path, e))?;
            }
            Some(key_rel(&device.name))
        }
        None => None,
    };
    let bin = bin_path(&plan.out_dir, &device.name);
    write_final(&bin, &bytes, plan.sync).map_err(|e| io(&bin, e))?;
    let sha256 = hex(&Sha256::digest(&bytes));
    work.ledger
        .issue(
            &Issued {
                device: device.ledger_id.clone(),
                image: image_rel(&device.name),
                sha256: sha256.clone(),
                key_file,
                size: u32::try_from(plan.size.bytes()).unwrap_or(u32::MAX),
                values: plan.values.display().to_string(),
                line: device.line,
                batch: work.batch.clone(),
                issued_at: String::new(),
            },
            work.allow_reissue,
        )
        .map_err(|e| {
            CliError(format!(
                "{}:{}: {}",
                plan.values.display(),
                device.line,
                e.0
            ))
        })?;
    Ok(Some(sha256))
}

/// Writes `bytes` to a temporary file beside `path` and renames it into place (with `sync`,
/// fsynced before the rename and the folder after it): `path` holds the whole image or
/// nothing new.
fn write_final(path: &Path, bytes: &[u8], sync: bool) -> std::io::Result<()> {
    if !sync {
        return write_atomic(path, bytes, None);
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.{}.sync.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)?;
        sync_file(dir)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn sync_file(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_all()
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

/// Writes the manifests for every device of the values file, from the ledger (so a resumed
/// run lists the devices of the earlier run too).
fn publish(
    plan: &Plan,
    devices: &[Device],
    actions: &[Action],
    ledger: &dyn Ledger,
) -> CliResult<()> {
    let io = |path: &Path, e: std::io::Error| {
        CliError(format!("cannot write `{}`: {e}", path.display()))
    };
    let bin_dir = plan.out_dir.join("bin");
    let keys_dir = plan.out_dir.join("keys");
    let mut csv = String::from("device,line,image,sha256,key_file\n");
    let mut json = Vec::with_capacity(devices.len());
    let mut any_key = false;
    let issued: HashMap<String, Issued> = ledger
        .devices()?
        .into_iter()
        .map(|entry| (entry.device.clone(), entry))
        .collect();
    for device in devices {
        let entry = issued.get(&device.ledger_id).ok_or_else(|| {
            CliError(format!(
                "device `{}` is missing from the ledger `{}`",
                device.ledger_id,
                plan.ledger.display()
            ))
        })?;
        any_key |= entry.key_file.is_some();
        let key_file = entry.key_file.clone().unwrap_or_default();
        let cells = [
            device.id.as_str(),
            &device.line.to_string(),
            &entry.image,
            &entry.sha256,
            &key_file,
        ];
        let quoted: Vec<String> = cells.iter().map(|c| csv_cell(c)).collect();
        csv.push_str(&quoted.join(","));
        csv.push('\n');
        json.push(serde_json::json!({
            "device": device.id,
            "line": device.line,
            "image": entry.image,
            "sha256": entry.sha256,
            "key_file": entry.key_file,
            "issued_at": entry.issued_at,
        }));
    }
    let manifest = serde_json::json!({
        "config": plan.config.display().to_string(),
        "values": plan.values.display().to_string(),
        "prefix": plan.prefix,
        "size": plan.size.bytes(),
        "version": plan.version.number(),
        "ledger": plan.ledger.display().to_string(),
        "devices": json,
    });
    let csv_path = plan.out_dir.join("manifest.csv");
    write_final(&csv_path, csv.as_bytes(), plan.sync).map_err(|e| io(&csv_path, e))?;
    let json_path = plan.out_dir.join("manifest.json");
    let mut json_text = serde_json::to_string_pretty(&manifest)?;
    json_text.push('\n');
    write_final(&json_path, json_text.as_bytes(), plan.sync).map_err(|e| io(&json_path, e))?;
    if plan.sync {
        for dir in [&keys_dir, &plan.out_dir] {
            if dir.exists() {
                sync_file(dir).map_err(|e| io(dir, e))?;
            }
        }
    }
    let kept = actions.iter().filter(|a| **a == Action::Keep).count();
    eprintln!(
        "Created {} NVS image(s){} in `{}`{}, manifest.csv/.json, ledger `{}`",
        devices.len() - kept,
        if kept > 0 {
            format!(" ({kept} kept from the interrupted run)")
        } else {
            String::new()
        },
        bin_dir.display(),
        if any_key {
            format!(", their keys in `{}`", keys_dir.display())
        } else {
            String::new()
        },
        plan.ledger.display()
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
