//! `cargo nvs mfg generate`: per-device NVS images for mass production, in two modes.
//!
//! - **mfg_gen mode** (`generate CONF VALUES PREFIX SIZE`, or `--config`/`--prefix`/`--size`):
//!   one NVS image per device from a config CSV and a values CSV, as ESP-IDF's
//!   `mfg_gen.py generate` makes them (same inputs, same file names, same bytes). Each device's
//!   image is built from the generator CSV mfg_gen would write for it, fed to the same CSV front
//!   end `cargo nvs generate` uses, so every image equals the reference generator's on that CSV
//!   by construction.
//! - **Cargo mode** (`--values` without a config, in `cargo.rs`): the package's
//!   `[package.metadata.nvs]` with its `per-device` keys filled from the values file's columns.
//!
//! Both share the rest ([`Maker`] is what differs): nothing is written until every device's
//! images have been built once in memory; then each device is built again, its files written to
//! temporary files, renamed into place and recorded in the ledger (one transaction), so an
//! interrupted run leaves only complete images under final names and `--resume` finishes it.
//!
//! `mfg flash` and `mfg log` (in `flash.rs`) flash issued devices and export the production log.

mod cargo;
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
use crate::project::PackageArgs;
use crate::size::parse_size;
use crate::{CliError, CliResult};

/// Mass manufacturing: per-device NVS images from a values CSV and either a config CSV
/// (ESP-IDF's mfg_gen.py) or the package's Cargo metadata.
#[derive(clap::Args)]
pub struct MfgArgs {
    #[command(subcommand)]
    command: MfgCommand,
}

#[derive(clap::Subcommand)]
enum MfgCommand {
    Generate(Box<MfgGenerateArgs>),
    Flash(Box<flash::MfgFlashArgs>),
    Log(flash::MfgLogArgs),
}

/// Generate NVS images for every device row of the values file.
///
/// Cargo mode (`--values devices.csv --id COLUMN`, no config): the package's
/// `[package.metadata.nvs]` with every `per-device = "COLUMN"` key taken from that column of the
/// device's row, sizes and offsets from its partition table. Every partition with per-device keys
/// is built per device as `<out-dir>/bin/<partition>-<ID>.bin`; partitions picked with
/// --partition or --all-partitions that have no per-device keys are the same for every device and
/// are written once, as `<out-dir>/bin/<partition>.bin`.
///
/// mfg_gen mode (`--config`, `--prefix`, `--size`, or mfg_gen's `generate CONF VALUES PREFIX
/// SIZE`): writes `<out-dir>/bin/<PREFIX>[-NNNN]-<FILEID>.bin`, byte-identical to mfg_gen.py's.
/// Encodings: mfg_gen's (string, binary, hex2bin, base64, u8, i8, u16, u32, i32, u64, i64) and
/// also i16, which mfg_gen rejects by mistake although the generator supports it. Unlike
/// mfg_gen, no intermediate csv/ files are written.
///
/// Both modes write `manifest.csv` and `manifest.json` (device, values line, images, SHA-256,
/// key file), never overwrite existing images and keys, and write nothing unless every device's
/// images build. Every device id and its (first) image's SHA-256 go to the ledger
/// (`<out-dir>/ledger.sqlite`, or --ledger) as the device is finalized; an id issued by an
/// earlier run is refused (unless --allow-reissue). Each image appears complete under its final
/// name or not at all, so a run that was interrupted is finished with --resume.
#[derive(clap::Args)]
#[command(disable_version_flag = true)]
pub struct MfgGenerateArgs {
    /// mfg_gen's positional form: config CSV, values CSV, file name prefix, partition size.
    #[arg(value_name = "CONF VALUES PREFIX SIZE", num_args = 0..=4)]
    positional: Vec<String>,
    /// mfg_gen mode: config CSV, no header: `name,namespace,` and `key,type,encoding[,REPEAT]`
    /// rows.
    #[arg(long, alias = "conf", value_name = "CONF.csv")]
    config: Option<PathBuf>,
    /// Values CSV: a header, then one row per device. mfg_gen mode: the header names every
    /// config key (in config order; other columns are metadata), and a REPEAT key's value is
    /// taken from the first row. Cargo mode: the header names every `per-device` column.
    #[arg(long, value_name = "VALUES.csv")]
    values: Option<PathBuf>,
    /// mfg_gen mode: file name prefix of every image.
    #[arg(long, value_name = "NAME")]
    prefix: Option<String>,
    /// mfg_gen mode: partition size (hex like 0x6000, or decimal).
    #[arg(long, value_name = "SIZE")]
    size: Option<String>,
    /// mfg_gen mode: values column that names each image (a serial number); default: 1, 2, 3…
    /// by row.
    #[arg(long, value_name = "COLUMN")]
    fileid: Option<String>,
    /// mfg_gen mode: insert a counter in the names: from START, zero-padded to LEN digits.
    #[arg(long = "prefix-num", alias = "prefix_num", num_args = 2, value_names = ["START", "LEN"])]
    prefix_num: Option<Vec<u64>>,
    /// mfg_gen mode: NVS format version: 2 has multi-page blobs (default), 1 is the legacy
    /// format. (In Cargo mode each partition's `version` decides.)
    #[arg(long, value_name = "1|2", value_parser = parse_version)]
    version: Option<Version>,
    /// mfg_gen mode: encrypt every image with its own fresh key, written to
    /// keys/keys-<name>.bin (0600).
    #[arg(long, conflicts_with = "inputkey")]
    keygen: bool,
    /// mfg_gen mode: encrypt every image with the key in this nvs_keys file.
    #[arg(long, value_name = "KEYS.bin")]
    inputkey: Option<PathBuf>,
    /// Cargo mode: the values column holding each device's id (required: the ledger records it,
    /// and it must be unique across batches). Images are named `<partition>-<ID>.bin`.
    #[arg(long, value_name = "COLUMN")]
    id: Option<String>,
    /// Cargo mode: build these NVS partitions of the metadata [default: every partition with
    /// per-device keys].
    #[arg(
        long = "partition",
        value_name = "NAME",
        conflicts_with = "all_partitions"
    )]
    partitions: Vec<String>,
    /// Cargo mode: build every NVS partition of the metadata (those without per-device keys
    /// once, as bin/<partition>.bin).
    #[arg(long)]
    all_partitions: bool,
    #[command(flatten)]
    package: PackageArgs,
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
    /// Finish an interrupted run: devices whose images exist and are in the ledger with the same
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
        MfgCommand::Generate(args) => generate(*args),
        MfgCommand::Flash(args) => flash::run(*args),
        MfgCommand::Log(args) => flash::log(args),
    }
}

/// What both modes share: where the values come from and where everything goes.
struct Run {
    values: PathBuf,
    out_dir: PathBuf,
    ledger: PathBuf,
    sync: bool,
    resume: bool,
    allow_reissue: bool,
}

impl Run {
    fn new(args: &MfgGenerateArgs, values: PathBuf) -> Run {
        let out_dir = args.out_dir.clone().unwrap_or_else(|| PathBuf::from("."));
        Run {
            ledger: args
                .ledger
                .clone()
                .unwrap_or_else(|| out_dir.join("ledger.sqlite")),
            values,
            out_dir,
            sync: args.sync,
            resume: args.resume,
            allow_reissue: args.allow_reissue,
        }
    }

    /// `values.csv:LINE`.
    fn at(&self, line: usize) -> String {
        format!("{}:{line}", self.values.display())
    }
}

/// mfg_gen mode's settings, after the positional and named spellings are merged.
struct Plan {
    config: PathBuf,
    values: PathBuf,
    prefix: String,
    size: PartitionSize,
    version: Version,
    fileid: Option<String>,
    prefix_num: Option<(u64, usize)>,
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
                 {what} is missing (or only --values, for the Cargo metadata mode)"
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
        version: args.version.unwrap_or(Version::V2),
        fileid: args.fileid.clone(),
        prefix_num,
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

/// Device ids of one run: checked to be usable in file names and unique.
struct Ids {
    seen: HashMap<String, usize>,
}

impl Ids {
    fn new() -> Ids {
        Ids {
            seen: HashMap::new(),
        }
    }

    /// Refuses an id that cannot be part of a file name or that an earlier row already has.
    fn check(&mut self, run: &Run, line: usize, column: &str, id: &str) -> CliResult {
        if let Err(why) = check_name_part(id) {
            return Err(CliError(format!(
                "{}: column `{column}`: the device id {why}",
                run.at(line)
            )));
        }
        if let Some(previous) = self.seen.insert(id.to_owned(), line) {
            return Err(CliError(format!(
                "{}: column `{column}`: device id `{id}` is already used at line {previous}; ids \
                 must be unique (nothing was written)",
                run.at(line)
            )));
        }
        Ok(())
    }
}

/// How mfg_gen mode encrypts images.
enum Keys {
    Plain,
    Shared(XtsKey),
    PerDevice,
}

/// One device, as planned in the first pass.
struct Device {
    line: usize,
    id: String,
    /// The names of its images (`bin/<name>.bin`); the first is the one the ledger records (and
    /// names its key file, if it has one).
    images: Vec<String>,
    /// Its key in the ledger: the id, or the image name when ids are row numbers.
    ledger_id: String,
}

impl Device {
    fn name(&self) -> &str {
        &self.images[0]
    }
}

/// One device's images, as a mode builds them (in [`Device::images`] order).
struct Built {
    images: Vec<Vec<u8>>,
    /// The device's own fresh encryption key, written to `keys/keys-<name>.bin`.
    key: Option<XtsKey>,
}

/// An image that is the same for every device, written once as `bin/<name>.bin`.
struct SharedImage {
    name: String,
    label: String,
    bytes: Vec<u8>,
}

/// What differs between the modes: how a device's images are built and described.
trait Maker: Sync {
    /// Builds the device's images from its row. `writing` is false in the checking pass, where
    /// no fresh key need be made.
    fn build(&self, device: &Device, row: &DeviceRow, writing: bool) -> CliResult<Built>;
    /// Every device gets a fresh key: its images differ on every build.
    fn fresh_keys(&self) -> bool {
        false
    }
    /// Looks at a chunk of rows in the checking pass (for warnings); returns true when it need
    /// not look at more.
    fn check_rows(&self, _rows: &[DeviceRow], _header: &[String]) -> bool {
        true
    }
    /// The partition size the ledger's image (a device's first) is made for.
    fn ledger_size(&self) -> u32;
    /// Images that are the same for every device.
    fn shared(&self) -> &[SharedImage] {
        &[]
    }
    /// What each of a device's images is (its partition), for the manifests; `None`: devices
    /// have one image, listed as mfg_gen's manifests do.
    fn labels(&self) -> Option<&[String]> {
        None
    }
    /// The manifest's fields other than `values`, `ledger` and the lists of images.
    fn manifest_fields(&self) -> serde_json::Map<String, serde_json::Value>;
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
    let cargo_mode = args.positional.is_empty()
        && args.config.is_none()
        && args.prefix.is_none()
        && args.size.is_none();
    if cargo_mode {
        return cargo::generate(&args);
    }
    let cargo_only = [
        (args.id.is_some(), "--id (use --fileid)"),
        (!args.partitions.is_empty(), "--partition"),
        (args.all_partitions, "--all-partitions"),
        (args.package.package.is_some(), "-p/--package"),
        (args.package.manifest_path.is_some(), "--manifest-path"),
    ];
    if let Some((_, option)) = cargo_only.iter().find(|(given, _)| *given) {
        return Err(CliError(format!(
            "{option} belongs to the Cargo metadata mode (`--values devices.csv --id COLUMN`), \
             which takes no config, prefix or size"
        )));
    }
    let plan = plan(&args)?;
    let run = Run::new(&args, plan.values.clone());
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
                        "{}: --fileid column `{column}` is not in the header (it has: {})",
                        run.at(values.header_line),
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
    let mut ids = Ids::new();
    let mut counter = plan.prefix_num.map_or(0, |(start, _)| start);
    while let Some(row) = values.next_device()? {
        let first = first_row.get_or_insert_with(|| row.fields.clone());
        let id = match fileid_column {
            // The id comes from the row as mfg_gen completes it (REPEAT values from row 1).
            Some(c) if rows.iter().any(|r| r.repeat && r.column == Some(c)) => first[c].clone(),
            Some(c) => row.fields[c].clone(),
            None => (devices.len() + 1).to_string(),
        };
        ids.check(
            &run,
            row.line,
            plan.fileid.as_deref().unwrap_or_default(),
            &id,
        )?;
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
            images: vec![name],
            ledger_id,
        });
    }
    let Some(first_row) = first_row else {
        return Err(CliError(format!(
            "{}: the values file has a header but no device rows",
            plan.values.display()
        )));
    };
    let maker = MfgGen {
        plan: &plan,
        rows: &rows,
        first_row: &first_row,
        keys: &keys,
    };
    produce(&run, &maker, &devices)
}

/// mfg_gen mode: each device's image from the generator CSV mfg_gen writes for it.
struct MfgGen<'a> {
    plan: &'a Plan,
    rows: &'a [ConfigRow],
    first_row: &'a [String],
    keys: &'a Keys,
}

impl Maker for MfgGen<'_> {
    fn build(&self, device: &Device, row: &DeviceRow, writing: bool) -> CliResult<Built> {
        let (plan, rows) = (self.plan, self.rows);
        let mut starts = Vec::with_capacity(rows.len());
        let csv = device_csv(
            rows,
            |config| {
                let c = config.column.unwrap_or_default();
                if config.repeat {
                    self.first_row[c].clone()
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
        // Checking: a fresh key gives other bytes on every build; the plain image shows that
        // the device builds.
        let key = match self.keys {
            Keys::PerDevice if writing => Some(XtsKey::generate()?),
            _ => None,
        };
        let bytes = match (self.keys, &key) {
            (Keys::Shared(key), _) | (_, Some(key)) => image.finish_encrypted(key),
            _ => image.finish(),
        }
        .map_err(located)?;
        Ok(Built {
            images: vec![bytes],
            key,
        })
    }

    fn fresh_keys(&self) -> bool {
        matches!(self.keys, Keys::PerDevice)
    }

    fn check_rows(&self, rows: &[DeviceRow], header: &[String]) -> bool {
        warn_ignored_repeats(self.plan, self.rows, self.first_row, rows, header)
    }

    fn ledger_size(&self) -> u32 {
        u32::try_from(self.plan.size.bytes()).unwrap_or(u32::MAX)
    }

    fn manifest_fields(&self) -> serde_json::Map<String, serde_json::Value> {
        let plan = self.plan;
        let serde_json::Value::Object(fields) = serde_json::json!({
            "config": plan.config.display().to_string(),
            "prefix": plan.prefix,
            "size": plan.size.bytes(),
            "version": plan.version.number(),
        }) else {
            unreachable!("a JSON object")
        };
        fields
    }
}

/// Passes 2 to 4 and the manifests, for the devices of either mode.
fn produce(run: &Run, maker: &dyn Maker, devices: &[Device]) -> CliResult<ExitCode> {
    // Pass 2: build every image in memory (nothing is written) so that bad input writes nothing;
    // keep the SHA-256 of the images that come out the same every time.
    let expected = build_all(run, maker, devices, None)?;

    // Pass 3: what to do with each device, refusing existing files and issued ids.
    let existing_ledger = SqliteLedger::open_existing(&run.ledger)?;
    let mut actions = Vec::with_capacity(devices.len());
    for (device, expected) in devices.iter().zip(&expected) {
        let issued = match &existing_ledger {
            Some(ledger) => ledger.issued(&device.ledger_id)?,
            None => None,
        };
        actions.push(decide(run, maker, device, expected.as_deref(), issued)?);
    }
    for shared in maker.shared() {
        let path = bin_path(&run.out_dir, &shared.name);
        if path.exists() && std::fs::read(&path).ok().as_deref() != Some(&shared.bytes[..]) {
            return Err(CliError(format!(
                "`{}` (partition `{}`, the same for every device) already exists with other \
                 bytes; images are never overwritten (use a new --out-dir or remove it)",
                path.display(),
                shared.label
            )));
        }
    }

    // Pass 4: build again, and write and record each device's files.
    let out_dir_existed = run.out_dir.exists();
    let result = std::fs::create_dir_all(run.out_dir.join("bin"))
        .map_err(|e| {
            CliError(format!(
                "cannot write to out-dir `{}`: {e}",
                run.out_dir.display()
            ))
        })
        .and_then(|()| SqliteLedger::open(&run.ledger, run.sync))
        .and_then(|ledger| {
            let work = Work {
                ledger: &ledger,
                actions: &actions,
                batch: run_start(),
            };
            let written = build_all(run, maker, devices, Some(&work))?;
            for shared in maker.shared() {
                let path = bin_path(&run.out_dir, &shared.name);
                if !path.exists() {
                    write_final(&path, &shared.bytes, run.sync)
                        .map_err(|e| CliError(format!("cannot write `{}`: {e}", path.display())))?;
                }
            }
            publish(run, maker, devices, &actions, &written, &expected, &ledger)
        });
    if let Err(e) = result {
        if !out_dir_existed {
            // Only removes the folders this run created, and only while they are empty.
            let _ = std::fs::remove_dir(run.out_dir.join("bin"));
            let _ = std::fs::remove_dir(&run.out_dir);
        }
        let any_image = std::fs::read_dir(run.out_dir.join("bin")).is_ok_and(|mut entries| {
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

fn sha_of_file(path: &Path) -> CliResult<String> {
    let bytes = std::fs::read(path)
        .map_err(|e| CliError(format!("cannot read `{}`: {e}", path.display())))?;
    Ok(hex(&Sha256::digest(&bytes)))
}

/// Refuses what the run may not do to `device`, else says what it does.
fn decide(
    run: &Run,
    maker: &dyn Maker,
    device: &Device,
    expected: Option<&[String]>,
    issued: Option<Issued>,
) -> CliResult<Action> {
    let at = run.at(device.line);
    let bins: Vec<PathBuf> = device
        .images
        .iter()
        .map(|name| bin_path(&run.out_dir, name))
        .collect();
    let mut targets = bins.clone();
    if maker.fresh_keys() {
        targets.push(key_path(&run.out_dir, device.name()));
    }
    let existing = targets.iter().find(|p| p.exists());
    if run.resume {
        if let Some(issued) = &issued
            && bins.iter().all(|bin| bin.exists())
            && issued.image == image_rel(device.name())
            && issued
                .key_file
                .as_ref()
                .is_none_or(|key| run.out_dir.join(key).exists())
        {
            let on_disk = sha_of_file(&bins[0])?;
            if on_disk == issued.sha256 {
                if let Some(expected) = expected {
                    for (bin, expected) in bins.iter().zip(expected) {
                        if sha_of_file(bin)? != *expected {
                            return Err(CliError(format!(
                                "{at}: device `{}`: `{}` was made from other values than the \
                                 row has now; --resume only finishes a run with the same inputs \
                                 (nothing was written)",
                                device.id,
                                bin.display()
                            )));
                        }
                    }
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
        && !run.allow_reissue
    {
        return Err(CliError(format!(
            "{at}: device `{}` was already issued at {} ({}:{}, image {}) according to the \
             ledger `{}`; pass --allow-reissue to issue it again (nothing was written)",
            device.ledger_id,
            issued.issued_at,
            issued.values,
            issued.line,
            issued.image,
            run.ledger.display()
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
    /// The run's start, as sortable text: orders the devices of the ledger by run, then line.
    batch: String,
}

/// The SHA-256 of each of a device's images, when known.
type Shas = Option<Vec<String>>;

/// Reads the values again, record by record, and builds the images in parallel, a chunk at a
/// time. Without `work`, only checks that every device builds and returns the SHA-256 of the
/// images that are the same on every build (not those with fresh keys); with it, writes and
/// records every device that is not kept and returns the SHA-256 of what it wrote.
fn build_all(
    run: &Run,
    maker: &dyn Maker,
    devices: &[Device],
    work: Option<&Work<'_>>,
) -> CliResult<Vec<Shas>> {
    const CHUNK: usize = 1024;
    let mut values = Values::open(&run.values)?;
    let mut shas = Vec::with_capacity(devices.len());
    let started = Instant::now();
    let terminal = std::io::stderr().is_terminal();
    let mut checked_rows = work.is_some();
    let mut chunk: Vec<DeviceRow> = Vec::with_capacity(CHUNK);
    let verb = if work.is_some() { "built" } else { "checked" };
    let mut kept = 0;
    for (n, batch) in devices.chunks(CHUNK).enumerate() {
        chunk.clear();
        for _ in batch {
            let row = values.next_device()?.ok_or_else(|| {
                CliError(format!(
                    "{} changed while it was being read",
                    run.values.display()
                ))
            })?;
            chunk.push(row);
        }
        if !checked_rows {
            checked_rows = maker.check_rows(&chunk, &values.header);
        }
        let base = n * CHUNK;
        let results: Vec<CliResult<Shas>> = batch
            .par_iter()
            .zip(chunk.par_iter())
            .enumerate()
            .map(|(i, (device, row))| {
                let action = work.map(|w| w.actions[base + i]);
                if action == Some(Action::Keep) {
                    return Ok(None);
                }
                build_device(run, maker, device, row, work)
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

/// Builds one device's images. Without `work`, returns their SHA-256 when they are the same on
/// every build (no fresh key), else `None`. With it, writes the images (and the key) under the
/// final names, each through a temporary file and a rename, then records the device in the
/// ledger.
fn build_device(
    run: &Run,
    maker: &dyn Maker,
    device: &Device,
    row: &DeviceRow,
    work: Option<&Work<'_>>,
) -> CliResult<Shas> {
    let built = maker.build(device, row, work.is_some())?;
    let shas: Vec<String> = built
        .images
        .iter()
        .map(|bytes| hex(&Sha256::digest(bytes)))
        .collect();
    let Some(work) = work else {
        return Ok((!maker.fresh_keys()).then_some(shas));
    };
    let io = |path: &Path, e: std::io::Error| {
        CliError(format!("cannot write `{}`: {e}", path.display()))
    };
    let key_file = match &built.key {
        Some(key) => {
            let path = key_path(&run.out_dir, device.name());
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
            }
            // A key file is replaced only when it is the unrecorded leftover of an
            // interrupted run (--resume).
            let leftover = path.exists();
            write_secret(&path, &key.to_key_file(), leftover).map_err(|e| io(&path, e))?;
            if run.sync {
                sync_file(&path).map_err(|e| io(&path, e))?;
            }
            Some(key_rel(device.name()))
        }
        None => None,
    };
    for (name, bytes) in device.images.iter().zip(&built.images) {
        let bin = bin_path(&run.out_dir, name);
        write_final(&bin, bytes, run.sync).map_err(|e| io(&bin, e))?;
    }
    work.ledger
        .issue(
            &Issued {
                device: device.ledger_id.clone(),
                image: image_rel(device.name()),
                sha256: shas[0].clone(),
                key_file,
                size: maker.ledger_size(),
                values: run.values.display().to_string(),
                line: device.line,
                batch: work.batch.clone(),
                issued_at: String::new(),
            },
            run.allow_reissue,
        )
        .map_err(|e| CliError(format!("{}: {}", run.at(device.line), e.0)))?;
    Ok(Some(shas))
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
/// run lists the devices of the earlier run too). A device's images other than the first (which
/// the ledger records) take their SHA-256 from this run's build: `written`, else `expected`.
fn publish(
    run: &Run,
    maker: &dyn Maker,
    devices: &[Device],
    actions: &[Action],
    written: &[Shas],
    expected: &[Shas],
    ledger: &dyn Ledger,
) -> CliResult<()> {
    let io = |path: &Path, e: std::io::Error| {
        CliError(format!("cannot write `{}`: {e}", path.display()))
    };
    let bin_dir = run.out_dir.join("bin");
    let keys_dir = run.out_dir.join("keys");
    let labels = maker.labels();
    let mut csv = String::from(match labels {
        None => "device,line,image,sha256,key_file\n",
        Some(_) => "device,line,partition,image,sha256\n",
    });
    let mut json = Vec::with_capacity(devices.len());
    let mut any_key = false;
    let issued: HashMap<String, Issued> = ledger
        .devices()?
        .into_iter()
        .map(|entry| (entry.device.clone(), entry))
        .collect();
    let mut push_row = |cells: &[&str]| {
        let quoted: Vec<String> = cells.iter().map(|c| csv_cell(c)).collect();
        csv.push_str(&quoted.join(","));
        csv.push('\n');
    };
    for (n, device) in devices.iter().enumerate() {
        let entry = issued.get(&device.ledger_id).ok_or_else(|| {
            CliError(format!(
                "device `{}` is missing from the ledger `{}`",
                device.ledger_id,
                run.ledger.display()
            ))
        })?;
        any_key |= entry.key_file.is_some();
        let line = device.line.to_string();
        let Some(labels) = labels else {
            let key_file = entry.key_file.clone().unwrap_or_default();
            push_row(&[&device.id, &line, &entry.image, &entry.sha256, &key_file]);
            json.push(serde_json::json!({
                "device": device.id,
                "line": device.line,
                "image": entry.image,
                "sha256": entry.sha256,
                "key_file": entry.key_file,
                "issued_at": entry.issued_at,
            }));
            continue;
        };
        let built = written[n].as_ref().or(expected[n].as_ref());
        let mut images = Vec::with_capacity(device.images.len());
        for (i, (name, label)) in device.images.iter().zip(labels).enumerate() {
            let sha256 = match (i, built) {
                (0, _) => entry.sha256.clone(),
                (_, Some(shas)) => shas[i].clone(),
                (_, None) => sha_of_file(&bin_path(&run.out_dir, name))?,
            };
            let image = image_rel(name);
            push_row(&[&device.id, &line, label, &image, &sha256]);
            images.push(serde_json::json!({
                "partition": label,
                "image": image,
                "sha256": sha256,
            }));
        }
        json.push(serde_json::json!({
            "device": device.id,
            "line": device.line,
            "images": images,
            "issued_at": entry.issued_at,
        }));
    }
    let mut manifest = maker.manifest_fields();
    manifest.insert("values".into(), run.values.display().to_string().into());
    manifest.insert("ledger".into(), run.ledger.display().to_string().into());
    if labels.is_some() {
        let shared: Vec<serde_json::Value> = maker
            .shared()
            .iter()
            .map(|s| {
                serde_json::json!({
                    "partition": s.label,
                    "image": image_rel(&s.name),
                    "sha256": hex(&Sha256::digest(&s.bytes)),
                })
            })
            .collect();
        manifest.insert("shared".into(), shared.into());
    }
    manifest.insert("devices".into(), json.into());
    let csv_path = run.out_dir.join("manifest.csv");
    write_final(&csv_path, csv.as_bytes(), run.sync).map_err(|e| io(&csv_path, e))?;
    let json_path = run.out_dir.join("manifest.json");
    let mut json_text = serde_json::to_string_pretty(&manifest)?;
    json_text.push('\n');
    write_final(&json_path, json_text.as_bytes(), run.sync).map_err(|e| io(&json_path, e))?;
    if run.sync {
        for dir in [&keys_dir, &run.out_dir] {
            if dir.exists() {
                sync_file(dir).map_err(|e| io(dir, e))?;
            }
        }
    }
    let kept = actions.iter().filter(|a| **a == Action::Keep).count();
    let built = devices.len() - kept;
    let images_per_device = devices.first().map_or(1, |d| d.images.len());
    let shared = match maker.shared() {
        [] => String::new(),
        shared => format!(
            " and {} the same for every device ({})",
            shared.len(),
            shared
                .iter()
                .map(|s| image_rel(&s.name))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    eprintln!(
        "Created {} NVS image(s){}{}{shared} in `{}`{}, manifest.csv/.json, ledger `{}`",
        built * images_per_device,
        if images_per_device > 1 {
            format!(" ({images_per_device} per device)")
        } else {
            String::new()
        },
        if kept > 0 {
            format!(" ({kept} device(s) kept from the interrupted run)")
        } else {
            String::new()
        },
        bin_dir.display(),
        if any_key {
            format!(", their keys in `{}`", keys_dir.display())
        } else {
            String::new()
        },
        run.ledger.display()
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
