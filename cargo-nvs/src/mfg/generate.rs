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
//! temporary files and renamed into place, and each chunk of devices is recorded in the ledger
//! (one transaction) right after its images are in place, so an interrupted run leaves only
//! complete images under final names and `--resume` finishes it (images that were in place but
//! not yet recorded are made again).
//!
//! Every pass reads the values file again as a stream, a chunk of rows at a time, and devices
//! are named from their row and its number alone ([`Maker::device`]): what stays in memory for
//! the whole run is the id of every device (for duplicates, in the first pass) and one byte per
//! device for what to do with it. The manifests are written as the devices are recorded.
//!
//! Every command records into, or reads, the product's one ledger (`product.rs` says which file
//! that is): an id issued into any batch (out dir) is refused in every later batch. The ledger
//! records each device's batch folder, where `mfg flash` finds its images.
//!
//! `mfg flash` and `mfg log` (in `flash.rs`) flash issued devices and export the production log.

mod cargo;

use crate::fsutil::folder_of;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::hex::sha256_hex;
use indicatif::{ProgressBar, ProgressStyle};
use nvs_build::format::encryption::XtsKey;
use nvs_build::format::{PartitionSize, Version};
use nvs_build::keys::load_hmac_key;
use nvs_build::table::PartitionTable;
use nvs_build::{FileBase, ImageInput, InputError};
use rayon::prelude::*;

use super::chip_values::{RECIPE_KEY, RecipeKey, is_recipe, mfg_gen_recipe, recipe_key_file};
use super::input::{
    ConfigRow, DeviceRow, Values, ValuesError, bind_columns, device_csv, read_config,
};
use super::ledger::{Issued, Ledger, LedgerError, Reservation, StoredFile};
use super::product::{
    self, CONFIG_LEDGER, ChosenLedger, ProductError, Scope, choose_ledger, same_file,
};
use crate::fsutil::{
    FileError, StagedFile, remove_leftovers, sync_folder, write_atomic_with, write_secret,
};
use crate::keys::{HmacOptions, KeyError, load_key, random_hmac_key};
use crate::project::PackageArgs;
use crate::size::{SpellingError, parse_size, parse_version, warn_if_read_only};

/// Why `mfg generate` wrote nothing, or stopped (then every image in place is complete and
/// `--resume` finishes the run).
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// The options or an input row are not usable; the message names the place (file:line,
    /// column, option) and what to do.
    #[error("{0}")]
    Invalid(String),
    /// Device ids the ledger has issued before, or that another run reserved meanwhile: an id is
    /// never issued twice. Nothing was written for them.
    #[error("{message}")]
    Issued {
        /// The refused ids (of ids issued by earlier runs: the first ten, as the message).
        ids: Vec<String>,
        message: String,
    },
    /// The run stopped after writing some devices; each one in place is complete and recorded.
    #[error(
        "{source}; every image in place is complete: run again with --resume to finish (it keeps the devices the ledger recorded and rebuilds the others)"
    )]
    Interrupted {
        #[source]
        source: Box<GenerateError>,
    },
    /// A write failed, and the ledger could not record the devices written meanwhile either.
    #[error(
        "{source}; the ledger could not record the devices written meanwhile either ({ledger})"
    )]
    Unrecorded {
        #[source]
        source: Box<GenerateError>,
        ledger: LedgerError,
    },
    /// A write failed while the devices written before were being recorded, which failed too
    /// (a full disk fails both).
    #[error("{write}; and: {record}")]
    WrittenAndRecorded {
        #[source]
        write: Box<GenerateError>,
        record: Box<GenerateError>,
    },
    #[error(transparent)]
    Project(#[from] crate::project::ProjectError),
    #[error(transparent)]
    Values(#[from] ValuesError),
    #[error(transparent)]
    Product(#[from] ProductError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Input(#[from] InputError),
    #[error(transparent)]
    Encryption(#[from] nvs_build::format::encryption::KeyError),
    #[error(transparent)]
    File(#[from] FileError),
    #[error(transparent)]
    Spelling(#[from] SpellingError),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
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
/// images build. Every device id, its images' SHA-256 and the batch folder (the out dir) go to
/// the product's ledger as the device is finalized; an id issued by any earlier run, into any
/// out dir, is refused (unless --allow-reissue). Each image appears complete under its final
/// name or not at all, so a run that was interrupted is finished with --resume.
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  cargo nvs mfg generate --values devices.csv --id serial\n  cargo nvs mfg generate --config config.csv --values values.csv --prefix dev --id serial"
)]
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
    /// mfg_gen mode: encrypt every image with its own key, written to keys/keys-<name>.bin
    /// (0600): a fresh random one, or with --key-protect-hmac one derived from an HMAC key.
    #[arg(long, conflicts_with = "inputkey")]
    keygen: bool,
    /// mfg_gen mode: encrypt every image with the key in this nvs_keys file.
    #[arg(long, value_name = "KEYS.bin")]
    inputkey: Option<PathBuf>,
    /// mfg_gen mode with --keygen: --key-protect-hmac with --kp-hmac-keygen gives every device
    /// a fresh HMAC key (keys/hmac-keys-<name>.bin, 0600, for the chip's eFuse) and derives its
    /// encryption key from it; with --kp-hmac-inputkey FILE every device's key is derived from
    /// that one HMAC key.
    #[command(flatten)]
    hmac: HmacOptions,
    /// Refused: mfg_gen writes every device's HMAC key to this one file, so all but the last
    /// are lost. Every device gets its own keys/hmac-keys-<name>.bin instead.
    #[arg(
        long = "kp-hmac-keyfile",
        alias = "kp_hmac_keyfile",
        value_name = "FILE",
        hide = true
    )]
    kp_hmac_keyfile: Option<PathBuf>,
    /// mfg_gen's hidden --keyfile, --input and --output: it sets them anew for every device, so
    /// they are accepted and ignored.
    #[arg(long = "keyfile", value_name = "FILE", hide = true)]
    mfg_gen_keyfile: Option<PathBuf>,
    #[arg(long = "input", value_name = "FILE", hide = true)]
    mfg_gen_input: Option<PathBuf>,
    #[arg(long = "output", value_name = "FILE", hide = true)]
    mfg_gen_output: Option<PathBuf>,
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
    /// The product's ledger of issued device ids (SQLite, shared by all its batches)
    /// [default: $NVS_LEDGER; else mfg_gen mode: ledger.sqlite beside the --config file; Cargo
    /// mode: [package.metadata.nvs.mfg] ledger (relative to Cargo.toml), else
    /// nvs-ledger.sqlite beside Cargo.toml].
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
    /// Also keep every device's images and key file in the ledger, with the partition each goes
    /// to (and the partition table, with the batch): stations sharing the ledger then need
    /// neither this folder nor the Cargo package (`mfg flash --ledger URL`). mfg_gen mode takes
    /// the table and partition from --partition-table and --partition.
    #[arg(long)]
    store_images: bool,
    /// mfg_gen mode with --store-images: the partition table (CSV or binary) whose NVS partition
    /// --partition NAME the images go to.
    #[arg(long, value_name = "FILE", requires = "store_images")]
    partition_table: Option<PathBuf>,
}

/// What both modes share: where the values come from and where everything goes.
struct Run {
    values: PathBuf,
    out_dir: PathBuf,
    /// The product's ledger as chosen (a file, absolute, or a PostgreSQL server), and how.
    ledger: ChosenLedger,
    sync: bool,
    resume: bool,
    allow_reissue: bool,
    /// `--store-images`: where the devices' files go.
    placement: Option<Placement>,
}

/// `--store-images`: where each of a device's images goes (in [`Device::images`] order:
/// partition, offset, size) and its key (the nvs_keys partition), from the partition table
/// stored with the batch.
struct Placement {
    table: Vec<u8>,
    images: Vec<(String, u32, u32)>,
    keys: Option<(u32, u32)>,
}

impl Placement {
    /// Places the images on the NVS partitions `names` of `table` (each made for `sizes`: no
    /// larger than its partition).
    fn new(
        table: &PartitionTable,
        names: &[String],
        sizes: &[u32],
    ) -> Result<Placement, GenerateError> {
        let mut images = Vec::new();
        for (name, made_for) in names.iter().zip(sizes) {
            let partition = table
                .nvs_partition(name, "the partition table")
                .map_err(|e| GenerateError::Invalid(format!("--store-images: {e}")))?;
            if *made_for > partition.size {
                return Err(GenerateError::Invalid(format!(
                    "the images are made for {made_for:#x} bytes, larger than partition `{name}` \
                     ({:#x}); give a smaller --size or another partition",
                    partition.size
                )));
            }
            images.push((name.clone(), partition.offset, partition.size));
        }
        Ok(Placement {
            table: table.to_binary(),
            images,
            keys: table.nvs_keys().map(|p| (p.offset, p.size)),
        })
    }

    /// The files of a device to keep in the ledger, read back from the out dir (the bytes
    /// just written, checked against their SHA-256): its images and, unless its key derives
    /// from an HMAC key in the chip's eFuse, its key file.
    fn files(&self, out_dir: &Path, entry: &Issued) -> Result<Vec<StoredFile>, GenerateError> {
        let images = entry.images();
        let mut files = Vec::new();
        for ((name, sha256), (partition, offset, size)) in images.zip(&self.images) {
            files.push(stored(
                out_dir,
                name,
                Some(sha256),
                partition,
                *offset,
                *size,
            )?);
        }
        if let (Some(key_file), None) = (&entry.key_file, &entry.hmac_key_file) {
            let Some((offset, size)) = self.keys else {
                return Err(GenerateError::Invalid(
                    "--store-images: each device has its own key, and the partition table has \
                     no data/nvs_keys partition to put it in"
                        .into(),
                ));
            };
            files.push(stored(out_dir, key_file, None, "nvs_keys", offset, size)?);
        }
        // A recipe is encrypted at flash time: a key it names that is not the device's own
        // (a shared key, or the one derived from an HMAC key) is kept too, never flashed.
        let recipes: Vec<&StoredFile> = files.iter().filter(|f| is_recipe(&f.name)).collect();
        let mut recipe_keys = Vec::new();
        for recipe in recipes {
            let key = recipe_key_file(&recipe.data, Path::new(&recipe.name))
                .map_err(GenerateError::Invalid)?;
            if let Some(key) = key.filter(|k| !files.iter().any(|f| &f.name == k)) {
                recipe_keys.push(stored(out_dir, &key, None, RECIPE_KEY, 0, 0)?);
            }
        }
        files.extend(recipe_keys);
        Ok(files)
    }
}

/// The file `name` of the out dir (relative, or absolute) as the ledger keeps it, if it still
/// has the SHA-256 it was written with (`recorded`, when the ledger has one).
fn stored(
    out_dir: &Path,
    name: &str,
    recorded: Option<&str>,
    partition: &str,
    offset: u32,
    size: u32,
) -> Result<StoredFile, GenerateError> {
    let path = out_dir.join(name);
    let data = std::fs::read(&path).map_err(|e| write_error(&path, e))?;
    let sha256 = sha256_hex(&data);
    if recorded.is_some_and(|recorded| recorded != sha256) {
        return Err(GenerateError::Invalid(format!(
            "`{}` changed while it was being recorded; run again with --resume",
            path.display()
        )));
    }
    // A recipe is not the image (that is built for the chip, and checked to fit); a recipe's
    // key goes nowhere.
    if data.len() > size as usize && !is_recipe(name) && partition != RECIPE_KEY {
        return Err(GenerateError::Invalid(format!(
            "`{}` is larger than partition `{partition}` ({size:#x} bytes)",
            path.display()
        )));
    }
    Ok(StoredFile {
        name: name.to_owned(),
        partition: partition.to_owned(),
        offset,
        size,
        sha256,
        data,
    })
}

impl Run {
    fn new(args: &MfgGenerateArgs, values: PathBuf, ledger: ChosenLedger) -> Run {
        let out_dir = args.out_dir.clone().unwrap_or_else(|| PathBuf::from("."));
        Run {
            ledger,
            values,
            out_dir,
            sync: args.sync,
            resume: args.resume,
            allow_reissue: args.allow_reissue,
            placement: None,
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

fn plan(args: &MfgGenerateArgs) -> Result<Plan, GenerateError> {
    let mut positional = args.positional.iter();
    let mut pick = |named: Option<String>, what: &str| -> Result<String, GenerateError> {
        match (positional.next(), named) {
            (Some(_), Some(_)) => Err(GenerateError::Invalid(format!(
                "{what} is given both as an argument and as --{what}; give it once"
            ))),
            (Some(p), None) => Ok(p.clone()),
            (None, Some(n)) => Ok(n),
            (None, None) => Err(GenerateError::Invalid(format!(
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
        .map_err(|e| GenerateError::Invalid(format!("SIZE {size_text}: {e}")))?;
    check_name_part(&prefix)
        .map_err(|why| GenerateError::Invalid(format!("--prefix `{prefix}`: {why}")))?;
    let prefix_num = match args.prefix_num.as_deref() {
        // A counter wider than u64's 20 digits is only padding.
        Some(&[_, len]) if len > 20 => {
            return Err(GenerateError::Invalid(format!(
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
    seen: HashMap<Box<str>, u32>,
}

impl Ids {
    fn new() -> Ids {
        Ids {
            seen: HashMap::new(),
        }
    }

    /// Refuses an id that cannot be part of a file name or that an earlier row already has.
    fn check(
        &mut self,
        run: &Run,
        line: usize,
        column: &str,
        id: &str,
    ) -> Result<(), GenerateError> {
        if let Err(why) = check_name_part(id) {
            return Err(GenerateError::Invalid(format!(
                "{}: column `{column}`: the device id {why}",
                run.at(line)
            )));
        }
        let line32 = u32::try_from(line).unwrap_or(u32::MAX);
        if let Some(previous) = self.seen.insert(id.into(), line32) {
            return Err(GenerateError::Invalid(format!(
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
    /// --inputkey: one key for every image, no key files.
    Shared(XtsKey),
    /// --keygen: every device gets a key file.
    PerDevice(KeySource),
}

/// Where a device's own key comes from.
enum KeySource {
    /// A fresh random key.
    Random,
    /// A fresh HMAC key (written beside the key file), the key derived from it.
    FreshHmac,
    /// Derived from one HMAC key (--kp-hmac-inputkey, as given): the same for every device.
    Hmac(XtsKey, String),
}

/// The key files each device gets, beside its image in the out dir.
#[derive(Clone, Copy, PartialEq, Eq)]
enum KeyFiles {
    None,
    /// keys/keys-<name>.bin.
    Keys,
    /// Also keys/hmac-keys-<name>.bin.
    KeysAndHmac,
}

impl KeyFiles {
    /// The files of the device `name`, relative to the out dir.
    fn of(self, name: &str) -> Vec<String> {
        match self {
            KeyFiles::None => Vec::new(),
            KeyFiles::Keys => vec![key_rel(name)],
            KeyFiles::KeysAndHmac => vec![key_rel(name), hmac_key_rel(name)],
        }
    }
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
    /// Per image: it takes values from the chip, so it is a recipe (`bin/<name>.chip.csv`).
    recipes: Vec<bool>,
}

impl Device {
    fn name(&self) -> &str {
        &self.images[0]
    }

    /// Its `i`th image's file, relative to the out dir: `bin/<name>.bin`, or for a recipe
    /// `bin/<name>.chip.csv`.
    fn file(&self, i: usize) -> String {
        if self.recipes.get(i).copied().unwrap_or(false) {
            format!(
                "bin/{}{}",
                self.images[i],
                super::chip_values::RECIPE_SUFFIX
            )
        } else {
            image_rel(&self.images[i])
        }
    }

    /// Some of its images are recipes.
    fn takes_chip_values(&self) -> bool {
        self.recipes.iter().any(|r| *r)
    }
}

/// One device's images, as a mode builds them (in [`Device::images`] order).
struct Built {
    images: Vec<Vec<u8>>,
    /// The device's own encryption key, written to `keys/keys-<name>.bin`.
    key: Option<XtsKey>,
    /// The HMAC key it was derived from when that is the device's own, written to
    /// `keys/hmac-keys-<name>.bin`.
    hmac_key: Option<[u8; 32]>,
}

/// An image that is the same for every device, written once as `bin/<name>.bin` (`name`: its
/// partition).
struct SharedImage {
    name: String,
    bytes: Vec<u8>,
}

/// What differs between the modes: how a device's images are built and described.
trait Maker: Sync {
    /// The device of the values file's `n`th row (from 0), as the first pass named it.
    fn device(&self, n: usize, row: &DeviceRow) -> Device;
    /// Builds the device's images from its row. `writing` is false in the checking pass, where
    /// no fresh key need be made.
    fn build(
        &self,
        device: &Device,
        row: &DeviceRow,
        writing: bool,
    ) -> Result<Built, GenerateError>;
    /// Every device gets a fresh key: its images differ on every build.
    fn fresh_keys(&self) -> bool {
        false
    }
    /// The key files every device gets.
    fn key_files(&self) -> KeyFiles {
        KeyFiles::None
    }
    /// The HMAC key the device `name`'s key derives from (HMAC key protection), as the ledger
    /// records it.
    fn hmac_key_file(&self, _name: &str) -> Option<String> {
        None
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

/// `cargo nvs mfg generate`: writes every device's images and records them in the ledger, or
/// writes nothing.
pub fn generate(args: MfgGenerateArgs) -> Result<(), GenerateError> {
    let cargo_mode = args.positional.is_empty()
        && args.config.is_none()
        && args.prefix.is_none()
        && args.size.is_none();
    if cargo_mode {
        return cargo::generate(&args);
    }
    let cargo_only = [
        (args.id.is_some(), "--id (use --fileid)"),
        (
            !args.partitions.is_empty() && args.partition_table.is_none(),
            "--partition (without --partition-table)",
        ),
        (args.all_partitions, "--all-partitions"),
        (args.package.package.is_some(), "-p/--package"),
        (args.package.manifest_path.is_some(), "--manifest-path"),
    ];
    if let Some((_, option)) = cargo_only.iter().find(|(given, _)| *given) {
        return Err(GenerateError::Invalid(format!(
            "{option} belongs to the Cargo metadata mode (`--values devices.csv --id COLUMN`), \
             which takes no config, prefix or size"
        )));
    }
    let plan = plan(&args)?;
    let ledger = choose_ledger(args.ledger.as_deref(), Scope::Config(&plan.config))?;
    let mut run = Run::new(&args, plan.values.clone(), ledger);
    if args.store_images {
        let (Some(path), [name]) = (&args.partition_table, args.partitions.as_slice()) else {
            return Err(GenerateError::Invalid(
                "--store-images in mfg_gen mode: give --partition-table FILE and --partition \
                 NAME, the NVS partition the images go to (stations flash them there)"
                    .into(),
            ));
        };
        let table = PartitionTable::load(path, PartitionTable::DEFAULT_OFFSET)?;
        let size = u32::try_from(plan.size.bytes()).unwrap_or(u32::MAX);
        run.placement = Some(Placement::new(&table, std::slice::from_ref(name), &[size])?);
    }
    for (given, option) in [
        (args.mfg_gen_keyfile.is_some(), "--keyfile"),
        (args.mfg_gen_input.is_some(), "--input"),
        (args.mfg_gen_output.is_some(), "--output"),
    ] {
        if given {
            eprintln!(
                "warning: {option} is ignored: mfg_gen sets it anew for every device (images go \
                 to <out-dir>/bin, keys to <out-dir>/keys)"
            );
        }
    }
    let keys = mfg_gen_keys(&args)?;
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
                    GenerateError::Invalid(format!(
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
                 The ledger records them by image name (`{}-…1`), so another batch with the same \
                 names is refused as a reissue",
                plan.prefix
            );
            None
        }
    };

    // Pass 1: check every row, name every device and refuse duplicates before writing anything.
    let Some(first) = values.next_device()? else {
        return Err(GenerateError::Invalid(format!(
            "{}: the values file has a header but no device rows",
            plan.values.display()
        )));
    };
    let first_row = first.fields.clone();
    let maker = MfgGen {
        plan: &plan,
        rows: &rows,
        first_row: &first_row,
        keys: &keys,
        resume: run.resume,
        fileid_column,
        repeat_fileid: fileid_column
            .is_some_and(|c| rows.iter().any(|r| r.repeat && r.column == Some(c))),
        inputkey: args.inputkey.as_ref().map(|p| {
            std::path::absolute(p)
                .unwrap_or_else(|_| p.clone())
                .display()
                .to_string()
        }),
    };
    let mut ids = Ids::new();
    let start = plan.prefix_num.map_or(0, |(start, _)| start);
    let mut count = 0;
    let mut next = Some(first);
    while let Some(row) = next {
        let device = maker.device(count, &row);
        ids.check(
            &run,
            row.line,
            plan.fileid.as_deref().unwrap_or_default(),
            &device.id,
        )?;
        count += 1;
        start.checked_add(count as u64).ok_or_else(|| {
            GenerateError::Invalid("--prefix-num START: the counter overflows".into())
        })?;
        next = values.next_device()?;
    }
    drop(ids);
    produce(&run, &maker, count)
}

/// How mfg_gen mode's options ask for images to be encrypted.
fn mfg_gen_keys(args: &MfgGenerateArgs) -> Result<Keys, GenerateError> {
    let hmac = &args.hmac;
    if args.kp_hmac_keyfile.is_some() {
        return Err(GenerateError::Invalid(
            "--kp-hmac-keyfile names one file, and mfg_gen writes every device's HMAC key to it, \
             keeping only the last; here every device gets its own keys/hmac-keys-<name>.bin \
             (drop the option)"
                .into(),
        ));
    }
    if hmac.any() && !args.keygen {
        return Err(GenerateError::Invalid(
            "the HMAC options (--key-protect-hmac, --kp-hmac-*) make each device's key: they \
             need --keygen (--inputkey already gives the key)"
                .into(),
        ));
    }
    hmac.check()?;
    Ok(match (&args.inputkey, args.keygen) {
        (Some(path), _) => Keys::Shared(load_key(path)?),
        (None, true) if hmac.kp_hmac_keygen => Keys::PerDevice(KeySource::FreshHmac),
        (None, true) => match &hmac.kp_hmac_inputkey {
            Some(path) => Keys::PerDevice(KeySource::Hmac(
                load_hmac_key(path)?,
                path.display().to_string(),
            )),
            None => Keys::PerDevice(KeySource::Random),
        },
        (None, false) => Keys::Plain,
    })
}

/// mfg_gen mode: each device's image from the generator CSV mfg_gen writes for it.
struct MfgGen<'a> {
    plan: &'a Plan,
    rows: &'a [ConfigRow],
    first_row: &'a [String],
    keys: &'a Keys,
    /// --resume: the checking pass compares the images it builds with the files.
    resume: bool,
    /// The --fileid column.
    fileid_column: Option<usize>,
    /// The --fileid column is a REPEAT key: every device takes the first row's id.
    repeat_fileid: bool,
    /// --inputkey, absolute: a recipe names it.
    inputkey: Option<String>,
}

impl Maker for MfgGen<'_> {
    fn device(&self, n: usize, row: &DeviceRow) -> Device {
        let plan = self.plan;
        let id = match self.fileid_column {
            // The id comes from the row as mfg_gen completes it (REPEAT values from row 1).
            Some(c) if self.repeat_fileid => self.first_row[c].clone(),
            Some(c) => row.fields[c].clone(),
            None => (n + 1).to_string(),
        };
        let name = match plan.prefix_num {
            Some((start, len)) => {
                let counter = start.wrapping_add(n as u64);
                format!("{}-{counter:0len$}-{id}", plan.prefix)
            }
            None => format!("{}-{id}", plan.prefix),
        };
        let ledger_id = if self.fileid_column.is_some() {
            id.clone()
        } else {
            name.clone()
        };
        let recipe = super::chip_values::row_from_chip(self.rows, self.first_row, &row.fields);
        Device {
            line: row.line,
            id,
            images: vec![name],
            ledger_id,
            recipes: vec![recipe],
        }
    }

    fn build(
        &self,
        device: &Device,
        row: &DeviceRow,
        writing: bool,
    ) -> Result<Built, GenerateError> {
        let (plan, rows) = (self.plan, self.rows);
        let mut starts = Vec::with_capacity(rows.len());
        let csv = device_csv(
            rows,
            |config| {
                let c = config.column.unwrap_or_default();
                if config.repeat {
                    self.first_row[c].as_str()
                } else {
                    row.fields[c].as_str()
                }
            },
            &mut starts,
        );
        let located = |e: InputError| locate(plan, rows, &starts, device, e);
        let recipe = if device.takes_chip_values() {
            let key = match self.keys {
                Keys::Plain => None,
                Keys::Shared(_) => self.inputkey.clone().map(RecipeKey::Keys),
                Keys::PerDevice(_) => Some(RecipeKey::Keys(key_rel(device.name()))),
            };
            let recipe = mfg_gen_recipe(&plan.values, &csv, plan.size, plan.version, key.as_ref())
                .map_err(located)?
                .map_err(|why| {
                    GenerateError::Invalid(format!(
                        "{}: device `{}`: {why}",
                        plan.values.display(),
                        device.id
                    ))
                })?;
            Some(recipe)
        } else {
            None
        };
        let mut image = ImageInput::new(plan.size, plan.version);
        if recipe.is_none() {
            image
                .add_csv(&plan.values, csv.as_bytes(), &FileBase::CurrentDir)
                .map_err(located)?;
        }
        // Checking: a fresh key gives other bytes on every build; the plain image shows that
        // the device builds.
        let (mut key, mut hmac_key) = (None, None);
        match self.keys {
            Keys::PerDevice(KeySource::Random) if writing => key = Some(XtsKey::generate()?),
            Keys::PerDevice(KeySource::FreshHmac) if writing => {
                let fresh = random_hmac_key()?;
                key = Some(XtsKey::derive_from_hmac(&fresh)?);
                hmac_key = Some(fresh);
            }
            Keys::PerDevice(KeySource::Hmac(derived, _)) => key = Some(derived.clone()),
            _ => {}
        }
        if let Some(recipe) = recipe {
            return Ok(Built {
                images: vec![recipe],
                key,
                hmac_key,
            });
        }
        // Encrypting cannot fail: checking needs the encrypted bytes only for their SHA-256,
        // which only --resume compares.
        let bytes = match (self.keys, &key) {
            (Keys::Shared(key), _) | (_, Some(key)) if writing || self.resume => {
                image.finish_encrypted(key)
            }
            _ => image.finish(),
        }
        .map_err(located)?;
        Ok(Built {
            images: vec![bytes],
            key,
            hmac_key,
        })
    }

    fn fresh_keys(&self) -> bool {
        matches!(
            self.keys,
            Keys::PerDevice(KeySource::Random | KeySource::FreshHmac)
        )
    }

    fn hmac_key_file(&self, name: &str) -> Option<String> {
        match self.keys {
            Keys::PerDevice(KeySource::FreshHmac) => Some(hmac_key_rel(name)),
            Keys::PerDevice(KeySource::Hmac(_, path)) => Some(path.clone()),
            _ => None,
        }
    }

    fn key_files(&self) -> KeyFiles {
        match self.keys {
            Keys::PerDevice(KeySource::FreshHmac) => KeyFiles::KeysAndHmac,
            Keys::PerDevice(_) => KeyFiles::Keys,
            _ => KeyFiles::None,
        }
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

/// Devices are read, built, written and recorded this many at a time.
const CHUNK: usize = 1024;

/// Reads the next `n` device rows of the values file (which had them in the first pass).
/// The rows' strings are reused.
fn next_chunk(
    run: &Run,
    values: &mut Values,
    n: usize,
    chunk: &mut Vec<DeviceRow>,
) -> Result<(), GenerateError> {
    chunk.truncate(n);
    while chunk.len() < n {
        chunk.push(DeviceRow {
            line: 0,
            fields: Vec::new(),
        });
    }
    for row in chunk.iter_mut() {
        if !values.read_device_into(row)? {
            return Err(GenerateError::Invalid(format!(
                "{} changed while it was being read",
                run.values.display()
            )));
        }
    }
    Ok(())
}

/// Passes 2 to 4 and the manifests, for the `count` devices of either mode. Every pass reads
/// the values file again, a chunk at a time: memory does not grow with the device count.
fn produce(run: &Run, maker: &dyn Maker, count: usize) -> Result<(), GenerateError> {
    check_ledger_place(run)?;
    // Passes 2 and 3: build every image in memory (nothing is written) so that bad input writes
    // nothing, and decide what to do with each device, refusing existing files and issued ids.
    let Checked { actions, to_issue } = check_all(run, maker, count)?;
    for shared in maker.shared() {
        let path = bin_path(&run.out_dir, &shared.name);
        if path.exists() && std::fs::read(&path).ok().as_deref() != Some(&shared.bytes[..]) {
            return Err(GenerateError::Invalid(format!(
                "`{}` (partition `{}`, the same for every device) already exists with other \
                 bytes; images are never overwritten (use a new --out-dir or remove it)",
                path.display(),
                shared.name
            )));
        }
    }

    // Pass 4: build again, and write and record each device's files.
    if !run.ledger.exists() {
        // The ledger knows only the ids issued into it: say where it starts, once.
        eprintln!(
            "note: starting the product ledger `{}`; it refuses every id issued into it from now \
             on. Batches made by cargo-nvs before the product ledger kept their own \
             `<out-dir>/ledger.sqlite`, whose ids it does not know",
            run.ledger.path.display()
        );
    }
    let out_dir_existed = run.out_dir.exists();
    let result = std::fs::create_dir_all(run.out_dir.join("bin"))
        .map_err(|e| {
            GenerateError::Invalid(format!(
                "cannot write to out-dir `{}`: {e}",
                run.out_dir.display()
            ))
        })
        .and_then(|()| batch_dir(&run.out_dir))
        .and_then(|batch_dir| Ok((run.ledger.open(run.sync)?, batch_dir)))
        .and_then(|(ledger, batch_dir)| {
            let work = Work {
                ledger: &*ledger,
                actions: &actions,
                batch: run_start(),
                batch_dir,
                values: run.values.display().to_string(),
            };
            // One run at a time writes into an out dir (a --resume must not take over the
            // reservations of a run that is still going).
            let _writing = lock_out_dir(&run.out_dir)?;
            check_stored_batch(run, &work)?;
            reserve(run, &work, &to_issue)?;
            if let Some(placement) = &run.placement {
                ledger.store_batch_table(&work.batch_dir, &placement.table)?;
                keep_private(run);
            }
            write_all(run, maker, &work)
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
        return Err(if any_image {
            GenerateError::Interrupted {
                source: Box::new(e),
            }
        } else {
            e
        });
    }
    Ok(())
}

/// A batch's images are all in the ledger or none are: `--store-images` into a batch stored
/// with another partition table, into one whose earlier devices were not stored (`--resume`),
/// or its absence for a batch that is stored, is refused before anything is reserved.
fn check_stored_batch(run: &Run, work: &Work<'_>) -> Result<(), GenerateError> {
    let stored = work.ledger.batch_table(&work.batch_dir)?;
    let kept = work.actions.contains(&Action::Keep);
    let problem = match (&run.placement, &stored) {
        (Some(placement), Some(table)) if *table != placement.table => {
            "was stored in the ledger with another partition table: use a new --out-dir"
        }
        (Some(_), None) if kept => {
            "holds devices whose images are not in the ledger: finish it without --store-images"
        }
        (None, Some(_)) => {
            "keeps its images in the ledger: give --store-images (and the same table)"
        }
        _ => return Ok(()),
    };
    Err(GenerateError::Invalid(format!(
        "the batch `{}` {problem}",
        work.batch_dir.display()
    )))
}

/// A SQLite ledger that holds images and keys is readable by its owner only (its journal
/// files take the same mode). Best effort: a file system without modes keeps its own.
fn keep_private(run: &Run) {
    #[cfg(unix)]
    if run.ledger.server.is_none() {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&run.ledger.path, std::fs::Permissions::from_mode(0o600));
    }
    #[cfg(not(unix))]
    let _ = run;
}

/// Holds the out dir for this run until dropped: another `mfg generate` into it (on this
/// machine, or another one sharing the folder) is refused rather than racing this one.
#[cfg(unix)]
fn lock_out_dir(out_dir: &Path) -> Result<std::fs::File, GenerateError> {
    let dir = std::fs::File::open(out_dir)
        .map_err(|e| GenerateError::Invalid(format!("cannot open `{}`: {e}", out_dir.display())))?;
    match dir.try_lock() {
        Ok(()) => Ok(dir),
        Err(std::fs::TryLockError::WouldBlock) => Err(GenerateError::Invalid(format!(
            "another `cargo nvs mfg generate` is writing into `{}` right now; wait for it to \
             finish (nothing was written)",
            out_dir.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(GenerateError::Invalid(format!(
            "cannot lock `{}`: {e}",
            out_dir.display()
        ))),
    }
}

/// Elsewhere folders cannot be opened as files; the ledger's reservation still keeps two runs
/// from issuing the same id.
#[cfg(not(unix))]
fn lock_out_dir(_out_dir: &Path) -> Result<Option<std::fs::File>, GenerateError> {
    Ok(None)
}

/// Reserves the run's ids in the ledger before any file is written, so that a run issuing the
/// same ids at the same time (another process, another station) cannot also write them: the
/// run that comes second writes nothing and names the ids.
fn reserve(run: &Run, work: &Work<'_>, to_issue: &[(String, usize)]) -> Result<(), GenerateError> {
    let refused = work.ledger.reserve(
        to_issue,
        &Reservation {
            batch: &work.batch,
            batch_dir: &work.batch_dir,
            values: &work.values,
            allow_reissue: run.allow_reissue,
            resume: run.resume,
        },
    )?;
    if refused.is_empty() {
        return Ok(());
    }
    let lines: HashMap<&str, usize> = to_issue.iter().map(|(id, l)| (id.as_str(), *l)).collect();
    let mut text = format!(
        "{} device id(s) were issued by another run meanwhile (product ledger `{}`); an id is \
         never issued twice:",
        refused.len(),
        run.ledger.path.display()
    );
    for refused in refused.iter().take(10) {
        let line = lines.get(refused.device.as_str()).copied().unwrap_or(0);
        let what = if refused.reserved {
            "reserved by a run that has not finished"
        } else {
            "issued"
        };
        text.push_str(&format!(
            "\n  {}: device `{}` was {what} at {} into `{}`",
            run.at(line),
            refused.device,
            refused.when,
            refused.batch_dir
        ));
    }
    if refused.len() > 10 {
        text.push_str(&format!("\n  … and {} more", refused.len() - 10));
    }
    text.push_str("\nnothing was written");
    Err(GenerateError::Issued {
        ids: refused.into_iter().map(|r| r.device).collect(),
        message: text,
    })
}

/// The batch folder as the ledger records it: the out dir (which exists), absolute and
/// canonical.
fn batch_dir(out_dir: &Path) -> Result<PathBuf, GenerateError> {
    let dir = std::fs::canonicalize(out_dir).map_err(|e| {
        GenerateError::Invalid(format!(
            "cannot resolve out-dir `{}`: {e}",
            out_dir.display()
        ))
    })?;
    if dir.to_str().is_none() {
        return Err(GenerateError::Invalid(format!(
            "out-dir `{}` is not valid UTF-8, and the ledger records batch folders as text: use \
             another folder",
            dir.display()
        )));
    }
    Ok(dir)
}

/// Refuses a ledger that cannot be made where it was chosen, and a batch whose out dir has a
/// ledger of its own (as older versions kept one per out dir) that this run would not check.
fn check_ledger_place(run: &Run) -> Result<(), GenerateError> {
    if run.ledger.server.is_some() {
        return Ok(());
    }
    let folder = folder_of(&run.ledger.path);
    // The out dir is made by the run.
    if !folder.is_dir() && !same_file(folder, &run.out_dir) {
        return Err(GenerateError::Invalid(format!(
            "the ledger `{}` ({}) cannot be made: its folder `{}` does not exist; create it, or \
             name the ledger with --ledger PATH or {} (nothing was written)",
            run.ledger.path.display(),
            run.ledger.from,
            folder.display(),
            product::LEDGER_ENV
        )));
    }
    let own = run.out_dir.join(CONFIG_LEDGER);
    if !own.is_file() || same_file(&own, &run.ledger.path) {
        return Ok(());
    }
    if run.ledger.flag {
        eprintln!(
            "warning: `{}` is another ledger (an out dir's own, as older versions kept them); \
             its devices are not checked by this run, which records into `{}` (--ledger)",
            own.display(),
            run.ledger.path.display()
        );
        return Ok(());
    }
    Err(GenerateError::Invalid(format!(
        "`{}` is this out dir's own ledger (older versions kept one per out dir), but this run \
         records into the product's ledger `{}` ({}), which does not check the ids it holds; \
         pass --ledger {} to go on with it (nothing was written)",
        own.display(),
        run.ledger.path.display(),
        run.ledger.from,
        own.display()
    )))
}

/// Passes 2 and 3: builds every device in memory, a chunk at a time in parallel, and decides
/// what to do with it. A device that does not build is refused before any device that the run
/// may not write (in values order within each kind), and those before the ids the ledger has
/// issued before (all named together).
/// What the checking pass decided: an action per device, and the ids (with their values line)
/// to reserve in the ledger before anything is written.
struct Checked {
    actions: Vec<Action>,
    to_issue: Vec<(String, usize)>,
}

fn check_all(run: &Run, maker: &dyn Maker, count: usize) -> Result<Checked, GenerateError> {
    let mut values = Values::open(&run.values)?;
    let existing_ledger = run.ledger.open_existing()?;
    // The SHA-256 of the images that come out the same on every build are only needed to check
    // kept images on --resume.
    let hash = run.resume && !maker.fresh_keys();
    // Without the folders of images and keys, no device has files yet: no need to look.
    let on_disk = run.out_dir.join("bin").exists() || run.out_dir.join("keys").exists();
    let checking = Checking {
        run,
        maker,
        ledger: existing_ledger,
        hash,
        on_disk,
        batch_dir: std::fs::canonicalize(&run.out_dir).ok(),
    };
    let bar = device_bar(count, "checking");
    let mut checked_rows = false;
    let header = values.header.clone();
    // While a chunk is built, the next one is read.
    let mut chunk: Vec<DeviceRow> = Vec::with_capacity(CHUNK);
    let mut next: Vec<DeviceRow> = Vec::with_capacity(CHUNK);
    let mut actions = Vec::with_capacity(count);
    let mut to_issue = Vec::new();
    let mut refused: Option<GenerateError> = None;
    let mut reissues = Reissues::default();
    let mut done = 0;
    let mut n = CHUNK.min(count);
    next_chunk(run, &mut values, n, &mut chunk)?;
    while n > 0 {
        if !checked_rows {
            checked_rows = maker.check_rows(&chunk, &header);
        }
        let n_next = CHUNK.min(count - done - n);
        let deciding = refused.is_none();
        let (read, results) = rayon::join(
            || next_chunk(run, &mut values, n_next, &mut next),
            || check_chunk(&checking, &chunk, done, deciding),
        );
        for (i, result) in results.into_iter().enumerate() {
            match result? {
                Some(Ok(Verdict::Do(action))) if refused.is_none() => {
                    if action != Action::Keep {
                        let device = maker.device(done + i, &chunk[i]);
                        to_issue.push((device.ledger_id, device.line));
                    }
                    actions.push(action);
                }
                Some(Ok(Verdict::Issued(reissue))) if refused.is_none() => reissues.add(*reissue),
                Some(Err(e)) if refused.is_none() => refused = Some(e),
                _ => {}
            }
        }
        read?;
        done += n;
        bar.set_position(done as u64);
        std::mem::swap(&mut chunk, &mut next);
        n = n_next;
    }
    bar.finish_and_clear();
    match refused {
        Some(e) => Err(e),
        None if reissues.count > 0 => Err(reissues.error(run)),
        None => Ok(Checked { actions, to_issue }),
    }
}

/// What the checking pass decided for a device.
enum Verdict {
    Do(Action),
    /// Refused: the ledger has the id issued before (without --allow-reissue).
    Issued(Box<Reissue>),
}

/// A device whose id the ledger has issued before.
struct Reissue {
    line: usize,
    device: String,
    issued: Issued,
}

/// The devices of the run that the ledger has issued before: the first few, and how many.
#[derive(Default)]
struct Reissues {
    shown: Vec<Reissue>,
    count: usize,
}

impl Reissues {
    const SHOWN: usize = 10;

    fn add(&mut self, reissue: Reissue) {
        self.count += 1;
        if self.shown.len() < Self::SHOWN {
            self.shown.push(reissue);
        }
    }

    fn error(&self, run: &Run) -> GenerateError {
        let mut text = format!(
            "{} device id(s) of `{}` were already issued according to the product's ledger \
             `{}` ({}); an id is never issued twice:",
            self.count,
            run.values.display(),
            run.ledger.path.display(),
            run.ledger.from
        );
        for r in &self.shown {
            if r.issued.sha256.is_empty() {
                text.push_str(&format!(
                    "\n  {}: device `{}` was reserved at {} for `{}` ({}:{}) by a run that has \
                     not finished (--resume in that out dir finishes it)",
                    run.at(r.line),
                    r.device,
                    r.issued.issued_at,
                    r.issued.batch_dir.display(),
                    r.issued.values,
                    r.issued.line,
                ));
                continue;
            }
            text.push_str(&format!(
                "\n  {}: device `{}` was already issued at {} into `{}` ({}:{}, image {})",
                run.at(r.line),
                r.device,
                r.issued.issued_at,
                r.issued.batch_dir.display(),
                r.issued.values,
                r.issued.line,
                r.issued.image
            ));
        }
        if self.count > self.shown.len() {
            text.push_str(&format!("\n  … and {} more", self.count - self.shown.len()));
        }
        text.push_str(
            "\ngive these devices new ids, or pass --allow-reissue to issue them again \
             (nothing was written)",
        );
        GenerateError::Issued {
            ids: self.shown.iter().map(|r| r.device.clone()).collect(),
            message: text,
        }
    }
}

/// What the checking pass needs to decide what to do with a device.
struct Checking<'a> {
    run: &'a Run,
    maker: &'a dyn Maker,
    /// The ledger of earlier runs, if there is one.
    ledger: Option<Box<dyn Ledger>>,
    /// Compute the SHA-256 of the images (--resume compares them with the files).
    hash: bool,
    /// The folder of images or keys exists (else no device has files yet).
    on_disk: bool,
    /// The out dir as the ledger records batch folders, if it exists.
    batch_dir: Option<PathBuf>,
}

/// Builds the devices of a chunk (from device `first`) in parallel, and with `deciding`, decides
/// what to do with each.
fn check_chunk(
    checking: &Checking<'_>,
    chunk: &[DeviceRow],
    first: usize,
    deciding: bool,
) -> Vec<Result<Option<Result<Verdict, GenerateError>>, GenerateError>> {
    let (run, maker, hash, on_disk) = (
        checking.run,
        checking.maker,
        checking.hash,
        checking.on_disk,
    );
    let existing_ledger = &checking.ledger;
    let done = first;
    chunk
        .par_iter()
        .enumerate()
        .map(|(i, row)| {
            let device = maker.device(done + i, row);
            let built = maker.build(&device, row, false)?;
            if !deciding {
                return Ok(None);
            }
            let expected: Shas = hash.then(|| built.images.iter().map(|b| sha256_hex(b)).collect());
            let issued = match &existing_ledger {
                Some(ledger) => ledger.issued(&device.ledger_id)?,
                None => None,
            };
            Ok(Some(decide(
                run,
                maker,
                &device,
                expected.as_deref(),
                issued,
                on_disk,
                checking.batch_dir.as_deref(),
            )))
        })
        .collect()
}

/// The writing pass: where the ledger is and what to do with each device.
struct Work<'a> {
    ledger: &'a dyn Ledger,
    actions: &'a [Action],
    /// The run's start, as sortable text: orders the devices of the ledger by run, then line.
    batch: String,
    /// The out dir, as the ledger records it.
    batch_dir: PathBuf,
    /// The values file, as the ledger records it.
    values: String,
}

/// The SHA-256 of each of a device's images, when known.
type Shas = Option<Vec<String>>;

/// What the writing pass did with a device it built.
struct Written {
    shas: Vec<String>,
    key_file: Option<String>,
    hmac_key_file: Option<String>,
}

/// Pass 4: reads the values again, builds the images in parallel a chunk at a time and writes
/// them; each chunk's devices are then recorded in the ledger (one transaction, right after
/// their images are in place) and listed in the manifests, while the next chunk is built.
fn write_all(run: &Run, maker: &dyn Maker, work: &Work<'_>) -> Result<(), GenerateError> {
    let count = work.actions.len();
    let mut values = Values::open(&run.values)?;
    // Where files cannot be made unnamed, a killed run leaves temporary files: clear them.
    let mut leftovers = 0;
    for dir in [
        run.out_dir.clone(),
        run.out_dir.join("bin"),
        run.out_dir.join("keys"),
    ] {
        leftovers += remove_leftovers(&dir).map_err(|e| {
            GenerateError::Invalid(format!("cannot clean `{}`: {e}", dir.display()))
        })?;
    }
    if leftovers > 0 {
        eprintln!("removed {leftovers} temporary file(s) left by an interrupted run");
    }
    let kept = work.actions.iter().filter(|a| **a == Action::Keep).count();
    if maker.key_files() != KeyFiles::None && kept < count {
        let keys = run.out_dir.join("keys");
        std::fs::create_dir_all(&keys).map_err(|e| {
            GenerateError::Invalid(format!("cannot write `{}`: {e}", keys.display()))
        })?;
    }
    let mut recorder = Recorder {
        run,
        maker,
        work,
        manifests: Manifests::start(run, maker)?,
        started: Instant::now(),
        bar: device_bar(count - kept, "writing"),
        built: 0,
        issued: Vec::with_capacity(CHUNK),
    };
    // While a chunk is built and written, the one before is recorded and the next one read.
    let mut chunk: Vec<DeviceRow> = Vec::with_capacity(CHUNK);
    let mut next: Vec<DeviceRow> = Vec::with_capacity(CHUNK);
    let mut pending: Option<ChunkResults> = None;
    let mut done = 0;
    let mut failed = false;
    let mut n = CHUNK.min(count);
    next_chunk(run, &mut values, n, &mut chunk)?;
    loop {
        let building = !failed && n > 0;
        let n_next = if building {
            CHUNK.min(count - done - n)
        } else {
            0
        };
        if pending.is_none() && !building {
            break;
        }
        let (recorded, built) = rayon::join(
            || -> Result<(), GenerateError> {
                let recorded = pending
                    .take()
                    .map_or(Ok(()), |results| recorder.record(results));
                recorded?;
                next_chunk(run, &mut values, n_next, &mut next)
            },
            || building.then(|| write_chunk(run, maker, work, done, &chunk)),
        );
        if let Err(e) = recorded {
            let Some(mut results) = built else {
                return Err(e);
            };
            // A write that failed meanwhile names the file (a full disk fails both); record
            // what was written too.
            let write_error = results
                .iter()
                .position(|(_, written)| written.is_err())
                .and_then(|i| std::mem::replace(&mut results[i].1, Ok(None)).err());
            let _ = recorder.record(results);
            return Err(match write_error {
                Some(write) => GenerateError::WrittenAndRecorded {
                    write: Box::new(write),
                    record: Box::new(e),
                },
                None => e,
            });
        }
        if let Some(results) = built {
            failed = results.iter().any(|(_, written)| written.is_err());
            done += n;
            pending = Some(results);
        }
        std::mem::swap(&mut chunk, &mut next);
        n = n_next;
    }
    recorder.bar.finish_and_clear();
    if kept > 0 {
        eprintln!("{kept} device(s) were finished by an earlier run and are kept (--resume)");
    }
    if kept < count {
        eprintln!(
            "{}",
            progress(recorder.built, count - kept, "built", recorder.started)
        );
    }
    for shared in maker.shared() {
        let path = bin_path(&run.out_dir, &shared.name);
        if !path.exists() {
            write_atomic_with(&path, &shared.bytes, Some(0o600), run.sync).map_err(|e| {
                GenerateError::Invalid(format!("cannot write `{}`: {e}", path.display()))
            })?;
        }
    }
    let Recorder { manifests, .. } = recorder;
    let any_key = manifests.any_key;
    manifests.finish(run)?;
    summary(run, maker, count - kept, kept, any_key);
    Ok(())
}

/// A chunk's devices, and what the writing pass did with each: `None` for a kept one.
type ChunkResults = Vec<(Device, Result<Option<Written>, GenerateError>)>;

/// Builds and writes the devices of a chunk (from device `first`) in parallel.
fn write_chunk(
    run: &Run,
    maker: &dyn Maker,
    work: &Work<'_>,
    first: usize,
    chunk: &[DeviceRow],
) -> ChunkResults {
    chunk
        .par_iter()
        .enumerate()
        .map(|(i, row)| {
            let device = maker.device(first + i, row);
            let written = match work.actions[first + i] {
                Action::Keep => Ok(None),
                action => {
                    write_device(run, maker, &device, row, action == Action::Replace).map(Some)
                }
            };
            (device, written)
        })
        .collect()
}

/// Records the written devices in the ledger and lists every device in the manifests, a chunk
/// at a time.
struct Recorder<'a> {
    run: &'a Run,
    maker: &'a dyn Maker,
    work: &'a Work<'a>,
    manifests: Manifests,
    started: Instant,
    bar: ProgressBar,
    built: usize,
    issued: Vec<Issued>,
}

impl Recorder<'_> {
    /// Records every device of the chunk whose images are in place, even when another one
    /// failed (then returns the first failure).
    fn record(&mut self, mut results: ChunkResults) -> Result<(), GenerateError> {
        let (run, maker, work) = (self.run, self.maker, self.work);
        self.issued.clear();
        for (device, written) in &results {
            if let Ok(Some(written)) = written {
                self.issued.push(Issued {
                    device: device.ledger_id.clone(),
                    image: device.file(0),
                    sha256: written.shas[0].clone(),
                    more_images: (1..device.images.len())
                        .zip(&written.shas[1..])
                        .map(|(i, sha)| (device.file(i), sha.clone()))
                        .collect(),
                    from_chip: device.takes_chip_values(),
                    key_file: written.key_file.clone(),
                    hmac_key_file: written.hmac_key_file.clone(),
                    size: maker.ledger_size(),
                    values: work.values.clone(),
                    line: device.line,
                    batch: work.batch.clone(),
                    batch_dir: work.batch_dir.clone(),
                    issued_at: String::new(),
                    files: Vec::new(),
                });
                if let Some(placement) = &run.placement {
                    let entry = self.issued.last_mut().expect("just pushed");
                    entry.files = placement.files(&run.out_dir, entry)?;
                }
            }
        }
        let failed = results
            .iter()
            .position(|(_, written)| written.is_err())
            .and_then(|i| std::mem::replace(&mut results[i].1, Ok(None)).err());
        let outcomes = work.ledger.issue_many(&self.issued, run.allow_reissue);
        // A failed write is the first error (a full disk fails the ledger too, afterwards).
        let outcomes = match (failed, outcomes) {
            (Some(e), Ok(_)) => return Err(e),
            (Some(e), Err(ledger)) => {
                return Err(GenerateError::Unrecorded {
                    source: Box::new(e),
                    ledger,
                });
            }
            (None, outcomes) => outcomes?,
        };
        let mut outcomes = outcomes.into_iter().zip(&self.issued);
        for (device, written) in results {
            let (entry, shas) = match written {
                Ok(Some(written)) => {
                    let Some((outcome, entry)) = outcomes.next() else {
                        unreachable!("one outcome per issued device")
                    };
                    let issued_at = outcome.map_err(|why| {
                        GenerateError::Invalid(format!("{}: {why}", run.at(device.line)))
                    })?;
                    self.built += 1;
                    let entry = Issued {
                        issued_at,
                        ..entry.clone()
                    };
                    (entry, Some(written.shas))
                }
                Ok(None) => {
                    let entry = work.ledger.issued(&device.ledger_id)?.ok_or_else(|| {
                        GenerateError::Invalid(format!(
                            "device `{}` is missing from the ledger `{}`",
                            device.ledger_id,
                            run.ledger.path.display()
                        ))
                    })?;
                    (entry, None)
                }
                Err(e) => return Err(e),
            };
            self.manifests
                .device(run, maker, &device, &entry, shas.as_deref())?;
        }
        self.bar.set_position(self.built as u64);
        Ok(())
    }
}

/// Builds one device's images and writes them (and its fresh key) under the final names, each
/// through a temporary file and a rename; the caller records it in the ledger.
fn write_device(
    run: &Run,
    maker: &dyn Maker,
    device: &Device,
    row: &DeviceRow,
    replace: bool,
) -> Result<Written, GenerateError> {
    let built = maker.build(device, row, true)?;
    let shas: Vec<String> = built.images.iter().map(|bytes| sha256_hex(bytes)).collect();
    let io = |path: &Path, e: std::io::Error| {
        GenerateError::Invalid(format!("cannot write `{}`: {e}", path.display()))
    };
    // Key files (the keys folder is made before the writing pass) are replaced only when they
    // are the unrecorded leftovers of an interrupted run (--resume); a key derived the same way
    // again may meet its identical leftover.
    let secrets = [
        built
            .hmac_key
            .map(|k| (hmac_key_rel(device.name()), k.to_vec())),
        built
            .key
            .as_ref()
            .map(|k| (key_rel(device.name()), k.to_key_file())),
    ];
    for (rel, bytes) in secrets.iter().flatten() {
        let path = run.out_dir.join(rel);
        match write_secret(&path, bytes, replace) {
            Err(e)
                if e.kind() == std::io::ErrorKind::AlreadyExists
                    && std::fs::read(&path).is_ok_and(|existing| existing == *bytes) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(GenerateError::Invalid(format!(
                    "`{}` exists with another key; key files are never overwritten (use a new \
                     --out-dir, or remove it)",
                    path.display()
                )));
            }
            written => written.map_err(|e| io(&path, e))?,
        }
        if run.sync {
            sync_file(&path).map_err(|e| io(&path, e))?;
            sync_folder(&path).map_err(|e| io(&path, e))?;
        }
    }
    let key_file = built.key.is_some().then(|| key_rel(device.name()));
    let hmac_key_file = maker.hmac_key_file(device.name());
    for (i, bytes) in built.images.iter().enumerate() {
        let bin = run.out_dir.join(device.file(i));
        write_atomic_with(&bin, bytes, Some(0o600), run.sync).map_err(|e| io(&bin, e))?;
    }
    Ok(Written {
        shas,
        key_file,
        hmac_key_file,
    })
}

/// A file of the out dir written a piece at a time, appearing complete on [`Staged::commit`];
/// errors name it.
struct Staged {
    path: PathBuf,
    file: StagedFile,
}

impl Staged {
    fn create(path: PathBuf) -> Result<Staged, GenerateError> {
        match StagedFile::create(&path) {
            Ok(file) => Ok(Staged { path, file }),
            Err(e) => Err(write_error(&path, e)),
        }
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), GenerateError> {
        self.file
            .write_all(bytes)
            .map_err(|e| write_error(&self.path, e))
    }

    /// `value` as pretty JSON nested in the document after `indent` (serde_json's pretty
    /// printer starts at the left margin: each line break it writes gets the indent, which is
    /// safe as JSON strings hold no raw line breaks). `scratch` is reused from call to call.
    fn write_json(
        &mut self,
        value: &impl serde::Serialize,
        indent: &[u8],
        scratch: &mut Vec<u8>,
    ) -> Result<(), GenerateError> {
        scratch.clear();
        serde_json::to_writer_pretty(&mut *scratch, value)?;
        for (i, line) in scratch.split(|&b| b == b'\n').enumerate() {
            if i > 0 {
                self.write(b"\n")?;
                self.write(indent)?;
            }
            self.write(line)?;
        }
        Ok(())
    }

    /// Puts the complete file in place (with `sync`, on disk first and its folder after).
    fn commit(self, sync: bool) -> Result<(), GenerateError> {
        let Staged { path, file } = self;
        file.commit(sync).map_err(|e| write_error(&path, e))
    }
}

fn write_error(path: &Path, e: std::io::Error) -> GenerateError {
    GenerateError::Invalid(format!("cannot write `{}`: {e}", path.display()))
}

/// `manifest.csv` and `manifest.json`, written a device at a time as the devices are recorded:
/// a `csv::Writer` and serde_json (one device object at a time) into staged files, so memory
/// does not grow with the number of devices.
struct Manifests {
    csv: csv::Writer<StagedFile>,
    csv_path: PathBuf,
    json: Staged,
    /// The members of manifest.json that sort after `devices` (serde_json's maps are
    /// sorted), written after the list.
    json_after: serde_json::Map<String, serde_json::Value>,
    first: bool,
    any_key: bool,
    /// A device's JSON, before it is written.
    scratch: Vec<u8>,
}

impl Manifests {
    fn start(run: &Run, maker: &dyn Maker) -> Result<Manifests, GenerateError> {
        let csv_path = run.out_dir.join("manifest.csv");
        let staged = StagedFile::create(&csv_path).map_err(|e| write_error(&csv_path, e))?;
        let mut csv = csv::Writer::from_writer(staged);
        let header: &[&str] = match (maker.labels(), maker.key_files()) {
            (None, KeyFiles::KeysAndHmac) => &[
                "device",
                "line",
                "image",
                "sha256",
                "key_file",
                "hmac_key_file",
            ],
            (None, _) => &["device", "line", "image", "sha256", "key_file"],
            (Some(_), _) => &["device", "line", "partition", "image", "sha256"],
        };
        csv.write_record(header)
            .map_err(|e| csv_error(&csv_path, e))?;
        let mut manifest = maker.manifest_fields();
        manifest.insert("values".into(), run.values.display().to_string().into());
        // Absolute: `mfg flash --out-dir` finds the ledger through it from anywhere.
        let ledger = match &run.ledger.server {
            // Without the password: the station supplies it.
            Some(url) => url.without_password(),
            None => std::fs::canonicalize(&run.ledger.path)
                .unwrap_or_else(|_| run.ledger.path.clone())
                .display()
                .to_string(),
        };
        manifest.insert("ledger".into(), ledger.into());
        if maker.labels().is_some() {
            let shared: Vec<serde_json::Value> = maker
                .shared()
                .iter()
                .map(|s| {
                    serde_json::json!({
                        "partition": s.name,
                        "image": image_rel(&s.name),
                        "sha256": sha256_hex(&s.bytes),
                    })
                })
                .collect();
            manifest.insert("shared".into(), shared.into());
        }
        // The object's members in serde_json's (sorted) order, the device list in its place.
        let mut json = Staged::create(run.out_dir.join("manifest.json"))?;
        json.write(b"{")?;
        let mut json_after = serde_json::Map::new();
        let mut scratch = Vec::new();
        for (key, value) in manifest {
            if key.as_str() < "devices" {
                json.write(b"\n  ")?;
                json.write_json(&key, b"", &mut scratch)?;
                json.write(b": ")?;
                json.write_json(&value, b"  ", &mut scratch)?;
                json.write(b",")?;
            } else {
                json_after.insert(key, value);
            }
        }
        json.write(b"\n  \"devices\": [\n")?;
        Ok(Manifests {
            csv,
            csv_path,
            json,
            json_after,
            first: true,
            any_key: false,
            scratch: Vec::new(),
        })
    }

    /// Lists a device, with its ledger entry. A device's images other than the first (which
    /// the ledger records) take their SHA-256 from this run's build (`shas`), else from the
    /// file (a kept device, checked against the build).
    fn device(
        &mut self,
        run: &Run,
        maker: &dyn Maker,
        device: &Device,
        entry: &Issued,
        shas: Option<&[String]>,
    ) -> Result<(), GenerateError> {
        self.any_key |= entry.key_file.is_some();
        let line = device.line.to_string();
        let value = match maker.labels() {
            None => {
                let key_file = entry.key_file.as_deref().unwrap_or_default();
                let mut row = vec![
                    device.id.as_str(),
                    &line,
                    &entry.image,
                    &entry.sha256,
                    key_file,
                ];
                let mut value = serde_json::json!({
                    "device": device.id,
                    "line": device.line,
                    "image": entry.image,
                    "sha256": entry.sha256,
                    "key_file": entry.key_file,
                    "issued_at": entry.issued_at,
                });
                if let Some(hmac_key_file) = &entry.hmac_key_file {
                    value["hmac_key_file"] = hmac_key_file.as_str().into();
                }
                if maker.key_files() == KeyFiles::KeysAndHmac {
                    row.push(entry.hmac_key_file.as_deref().unwrap_or_default());
                }
                self.csv_row(&row)?;
                value
            }
            Some(labels) => {
                let mut images = Vec::with_capacity(device.images.len());
                for (i, label) in labels.iter().enumerate().take(device.images.len()) {
                    let image = device.file(i);
                    let sha256 = match (i, shas, entry.more_images.get(i.wrapping_sub(1))) {
                        (0, _, _) => entry.sha256.clone(),
                        (_, Some(shas), _) => shas[i].clone(),
                        (_, None, Some((_, recorded))) => recorded.clone(),
                        // A ledger older than the list of a device's other images.
                        (_, None, None) => sha_of_file(&run.out_dir.join(&image))?,
                    };
                    self.csv_row(&[&device.id, &line, label, &image, &sha256])?;
                    images.push(serde_json::json!({
                        "partition": label,
                        "image": image,
                        "sha256": sha256,
                    }));
                }
                serde_json::json!({
                    "device": device.id,
                    "line": device.line,
                    "images": images,
                    "issued_at": entry.issued_at,
                })
            }
        };
        if !self.first {
            self.json.write(b",\n")?;
        }
        self.first = false;
        self.json.write(b"    ")?;
        self.json.write_json(&value, b"    ", &mut self.scratch)
    }

    fn csv_row(&mut self, cells: &[&str]) -> Result<(), GenerateError> {
        self.csv
            .write_record(cells)
            .map_err(|e| csv_error(&self.csv_path, e))
    }

    fn finish(mut self, run: &Run) -> Result<(), GenerateError> {
        self.json.write(b"\n  ]")?;
        for (key, value) in std::mem::take(&mut self.json_after) {
            self.json.write(b",\n  ")?;
            self.json.write_json(&key, b"", &mut self.scratch)?;
            self.json.write(b": ")?;
            self.json.write_json(&value, b"  ", &mut self.scratch)?;
        }
        self.json.write(b"\n}\n")?;
        let Manifests {
            csv,
            csv_path,
            json,
            ..
        } = self;
        let csv = csv
            .into_inner()
            .map_err(|e| write_error(&csv_path, e.into_error()))?;
        csv.commit(run.sync)
            .map_err(|e| write_error(&csv_path, e))?;
        json.commit(run.sync)?;
        if run.sync {
            let keys_dir = run.out_dir.join("keys");
            for dir in [&keys_dir, &run.out_dir] {
                if dir.exists() {
                    sync_file(dir).map_err(|e| write_error(dir, e))?;
                }
            }
        }
        Ok(())
    }
}

/// A manifest.csv write error as the other write errors read: `cannot write `PATH`: why`.
fn csv_error(path: &Path, e: csv::Error) -> GenerateError {
    let message = e.to_string();
    match e.into_kind() {
        csv::ErrorKind::Io(e) => write_error(path, e),
        _ => GenerateError::Invalid(format!("cannot write `{}`: {message}", path.display())),
    }
}

/// The message that ends a run.
fn summary(run: &Run, maker: &dyn Maker, built: usize, kept: usize, any_key: bool) {
    // A device has an image per partition the manifests label (mfg_gen: one).
    let images_per_device = maker.labels().map_or(1, <[String]>::len);
    let bin_dir = run.out_dir.join("bin");
    let keys_dir = run.out_dir.join("keys");
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
        run.ledger.path.display()
    );
}

/// Now, as text that sorts in time order (seconds and nanoseconds since 1970, zero-padded).
fn run_start() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{:020}.{:09}", now.as_secs(), now.subsec_nanos())
}

fn sha_of_file(path: &Path) -> Result<String, GenerateError> {
    let bytes = std::fs::read(path)
        .map_err(|e| GenerateError::Invalid(format!("cannot read `{}`: {e}", path.display())))?;
    Ok(sha256_hex(&bytes))
}

/// Refuses what the run may not do to `device`, else says what it does. `batch_dir` is the out
/// dir as the ledger records it (if it exists).
fn decide(
    run: &Run,
    maker: &dyn Maker,
    device: &Device,
    expected: Option<&[String]>,
    issued: Option<Issued>,
    on_disk: bool,
    batch_dir: Option<&Path>,
) -> Result<Verdict, GenerateError> {
    if !on_disk && issued.is_none() {
        // Nothing of it exists, and it was never issued (the common case: checked cheaply).
        return Ok(Verdict::Do(Action::Build));
    }
    let at = run.at(device.line);
    let bins: Vec<PathBuf> = (0..device.images.len())
        .map(|i| run.out_dir.join(device.file(i)))
        .collect();
    let key_files: Vec<PathBuf> = maker
        .key_files()
        .of(device.name())
        .iter()
        .map(|rel| run.out_dir.join(rel))
        .collect();
    let mut targets = bins.clone();
    if maker.fresh_keys() {
        targets.extend(key_files.iter().cloned());
    }
    let existing = targets.iter().find(|p| on_disk && p.exists());
    if run.resume {
        if let Some(issued) = &issued
            && on_disk
            && batch_dir == Some(issued.batch_dir.as_path())
            && bins.iter().all(|bin| bin.exists())
            && issued.image == device.file(0)
            && key_files.iter().all(|key| key.exists())
        {
            // Every image as the ledger recorded it (older ledgers have only the first).
            let recorded = issued.images().map(|(_, sha)| sha);
            let shas: Vec<String> = bins
                .iter()
                .map(|bin| sha_of_file(bin))
                .collect::<Result<_, _>>()?;
            if shas
                .iter()
                .zip(recorded)
                .all(|(on_disk, sha)| on_disk == sha)
            {
                if let Some(expected) = expected {
                    for ((bin, on_disk), expected) in bins.iter().zip(&shas).zip(expected) {
                        if on_disk != expected {
                            return Err(GenerateError::Invalid(format!(
                                "{at}: device `{}`: `{}` was made from other values than the \
                                 row has now; --resume only finishes a run with the same inputs \
                                 (nothing was written)",
                                device.id,
                                bin.display()
                            )));
                        }
                    }
                }
                return Ok(Verdict::Do(Action::Keep));
            }
        }
    } else if let Some(existing) = existing {
        return Err(GenerateError::Invalid(format!(
            "`{}` (device `{}`, {at}) already exists; images are never overwritten (use a new \
             --out-dir, remove it, or --resume an interrupted run)",
            existing.display(),
            device.id,
        )));
    }
    // A device this batch reserved in a run that did not finish: --resume takes it over.
    let unfinished = issued.as_ref().is_some_and(|issued| {
        run.resume && issued.sha256.is_empty() && batch_dir == Some(issued.batch_dir.as_path())
    });
    if let Some(issued) = issued
        && !run.allow_reissue
        && !unfinished
    {
        return Ok(Verdict::Issued(Box::new(Reissue {
            line: device.line,
            device: device.ledger_id.clone(),
            issued,
        })));
    }
    Ok(Verdict::Do(if existing.is_some() {
        Action::Replace
    } else {
        Action::Build
    }))
}

fn bin_path(out_dir: &Path, name: &str) -> PathBuf {
    out_dir.join("bin").join(format!("{name}.bin"))
}

fn image_rel(name: &str) -> String {
    format!("bin/{name}.bin")
}

fn key_rel(name: &str) -> String {
    format!("keys/keys-{name}.bin")
}

fn hmac_key_rel(name: &str) -> String {
    format!("keys/hmac-keys-{name}.bin")
}

/// A bar for a pass over the devices, with their rate and the time left; drawn only on a
/// terminal.
fn device_bar(total: usize, what: &'static str) -> ProgressBar {
    let bar = ProgressBar::new(total as u64).with_message(what);
    bar.set_style(
        ProgressStyle::with_template("{msg:>8} [{bar:30}] {pos}/{len} devices, {rate}, {eta} left")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .with_key(
                "rate",
                |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = write!(w, "{:.0} devices/s", state.per_sec());
                },
            ),
    );
    bar
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

fn sync_file(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_all()
}

/// Turns an error about the device's generator CSV into one about the inputs: the values row
/// and column for data, the config line for namespaces.
fn locate(
    plan: &Plan,
    rows: &[ConfigRow],
    starts: &[usize],
    device: &Device,
    e: InputError,
) -> GenerateError {
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
        Some(row) if row.is_namespace() => GenerateError::Invalid(format!(
            "{}:{}: namespace `{}`: {message} (building {device_at})",
            plan.config.display(),
            row.line,
            row.key
        )),
        Some(row) => GenerateError::Invalid(format!(
            "{device_at}, column `{}` ({} at {}:{}): {message}",
            row.key,
            row.encoding,
            plan.config.display(),
            row.line
        )),
        None => GenerateError::Invalid(format!("{device_at}: {message}")),
    }
}
