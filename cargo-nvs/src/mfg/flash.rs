//! `cargo nvs mfg flash`: production flashing of the devices `mfg generate` issued, one device per
//! port, ports in parallel, every flash in the production log; `cargo nvs mfg log` exports it.

use std::path::{Path, PathBuf};

use espflash::image_format::Segment;
use espflash::target::{Chip, ProgressCallbacks};
use nvs_build::table::PartitionTable;

use crate::hex::sha256_hex;
use std::collections::BTreeMap;

use nvs_build::metadata::Metadata;
use nvs_build::resolve::{Inputs, PartitionImage, build_partition};

use super::chip_values::{RECIPE_SUFFIX, image_for_chip};
use super::ledger::{ClaimOutcome, FlashRecord, Issued, Ledger, LedgerError};
use super::product::{ChosenLedger, LEDGER_ENV, ProductError, Scope, choose_ledger};
use super::stored::stored_segments;
use crate::firmware::{Firmware, FirmwareError, misplaced};
use crate::flashing::protect::{DataPartition, ProtectError, guard_table_change, identify};
use crate::flashing::segments::{Planned, Role, SegmentError};
use crate::flashing::{
    After, Before, ChipError, ConnectArgs, FlashingError, Session, blank_md5, connect,
    erase_regions, inspect, parse_chip, read_flash, written,
};
use crate::fsutil::FileError;
use crate::guard::Allow;
use crate::guard::{Finding, Planned as GuardPlan, for_factory, why_kept};
use crate::project::PackageArgs;
use crate::size::{SpellingError, parse_size};

/// Why `mfg flash` flashed nothing, or why one device's flash failed.
#[derive(Debug, thiserror::Error)]
pub enum MfgFlashError {
    /// The options, the batch or the chip do not allow this flash; the message says why and
    /// what to do (nothing was written).
    #[error("{0}")]
    Invalid(String),
    /// Writing or verifying failed; the production log has recorded the failure.
    #[error("flashing failed: {0} (logged)")]
    Write(#[source] espflash::Error),
    /// A refused or failed attempt, recorded in the production log.
    #[error("{0} (logged)")]
    Logged(#[source] Box<MfgFlashError>),
    /// Flashed and verified, but the production log could not record it.
    #[error(
        "flashed and verified on MAC {mac}, but the production log could not record it \
         ({source}); the device stays claimed so that no other station takes it: log it by hand"
    )]
    Unlogged {
        mac: String,
        #[source]
        source: LedgerError,
    },
    /// Some ports' devices failed (each was reported as it failed).
    #[error("{failed} of {total} flash(es) failed")]
    Failed { failed: usize, total: usize },
    #[error(transparent)]
    Chip(#[from] ChipError),
    #[error(transparent)]
    Firmware(#[from] FirmwareError),
    #[error(transparent)]
    Flashing(#[from] FlashingError),
    #[error(transparent)]
    Protect(#[from] ProtectError),
    #[error(transparent)]
    Segment(#[from] SegmentError),
    #[error(transparent)]
    Partition(#[from] nvs_build::table::NvsPartitionError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Product(#[from] ProductError),
    #[error(transparent)]
    File(#[from] FileError),
    #[error(transparent)]
    Input(#[from] nvs_build::InputError),
    #[error(transparent)]
    Spelling(#[from] SpellingError),
}

/// What `mfg flash` did when nothing failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flashed {
    /// This many devices were flashed, verified and logged.
    Devices(usize),
    /// Every device is flashed already or claimed by another station ([`NOTHING_LEFT`]).
    NothingLeft,
}

/// Flash issued devices: the next unflashed one (or the one named) per port, ports in parallel.
///
/// Writes the device's image padded with 0xFF over its whole partition in one connection,
/// checks it by MD5, reads the chip's MAC and appends `MAC, device, SHA-256, time, result` to the
/// production log in the ledger (see `cargo nvs mfg log`). Where it goes: --offset; or
/// --partition-table with --partition; or, by default, the Cargo package's partition table,
/// which takes every image of a device made from the package's metadata (`<partition>-<id>.bin`)
/// into its partition. Each device is claimed in the ledger first, so runs sharing the ledger
/// never take the same one.
///
/// The ledger is the product's (--ledger, $NVS_LEDGER, the one --out-dir's manifest.json names,
/// or the Cargo package's). Each device's images are read from the batch folder it was issued
/// into; --out-dir flashes only that batch's devices, without it every batch whose folder is
/// on disk takes part. A batch made with `mfg generate --store-images` is read from the ledger
/// itself, with where each image goes: then --ledger (and --firmware) is all a station needs;
/// each stored file is checked against the SHA-256 recorded when it was issued. A device with
/// values from the chip is built for the chip's MAC once connected.
///
/// A device id is never put on a second chip, nor a second id on a chip already logged, unless
/// --force. A failed flash is logged as `failed: …` and leaves the device unflashed: its
/// partitions on that chip are overwritten with erased flash and it goes back to the pool (when
/// that fails too, it stays held for that chip); the exit code is then non-zero. Refusals are
/// logged as `refused: …`. A device made with --keygen also gets its key file written to the
/// table's nvs_keys partition, in the same write; one made with HMAC key protection does not
/// (its chip derives the key from the HMAC key in its eFuse, which is named instead).
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  cargo nvs mfg flash --port /dev/ttyUSB0\n  cargo nvs mfg flash --port /dev/ttyUSB0 --port /dev/ttyUSB1"
)]
pub struct MfgFlashArgs {
    /// Flash only the devices of this batch (an `mfg generate` out dir); its manifest.json names
    /// the ledger [default: the devices of every batch in the ledger whose folder exists].
    #[arg(long = "out-dir", aliases = ["outdir", "out_dir"], value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
    /// The product's ledger [default: $NVS_LEDGER; else the one <out-dir>/manifest.json names;
    /// else the Cargo package's: [package.metadata.nvs.mfg] ledger, or nvs-ledger.sqlite beside
    /// Cargo.toml].
    #[arg(long, value_name = "PATH")]
    pub ledger: Option<PathBuf>,
    /// Flash this device (its id in the ledger: the --fileid value, or the image name for
    /// row-numbered batches); one port only.
    #[arg(long, value_name = "ID", conflicts_with = "next")]
    pub device: Option<String>,
    /// Flash the next devices not flashed yet, one per port, in the ledger's order (default).
    #[arg(long)]
    pub next: bool,
    /// Flash offset of the NVS partition (hex like 0x9000, or decimal) [default: from the
    /// partition table].
    #[arg(long, value_name = "ADDR", conflicts_with_all = ["partition_table", "partition"])]
    pub offset: Option<String>,
    /// Partition table (CSV or binary) to find the partition in [default: the Cargo package's,
    /// whose partitions the images are named after].
    #[arg(long, value_name = "FILE", requires = "partition")]
    pub partition_table: Option<PathBuf>,
    /// The NVS partition to flash (with --partition-table).
    #[arg(long, value_name = "NAME", requires = "partition_table")]
    pub partition: Option<String>,
    /// Bytes to write (the image padded with 0xFF) [default: the partition's size from the
    /// table, else the size the images were made for].
    #[arg(long, value_name = "SIZE")]
    pub size: Option<String>,
    /// Flash even if the device id is logged on another chip or the chip holds another id.
    #[arg(long)]
    pub force: bool,
    /// Serial port; repeat to flash several devices in parallel, one per port [default: as
    /// `cargo nvs flash` finds it].
    #[arg(long = "port", short = 'P', value_name = "PORT")]
    pub ports: Vec<String>,
    /// Baud rate to flash at, after connecting at 115200.
    #[arg(long, short = 'B', value_name = "BAUD")]
    pub baud: Option<u32>,
    /// Chip (esp32, esp32c3, …) [default: detected].
    #[arg(long, short = 'c', value_name = "CHIP", value_parser = parse_chip)]
    pub chip: Option<Chip>,
    /// How to put the chip into the ROM loader.
    #[arg(long, value_enum, default_value_t = Before::DefaultReset)]
    pub before: Before,
    /// What to do after flashing.
    #[arg(long, value_enum, default_value_t = After::HardReset)]
    pub after: After,
    /// Talk to the ROM loader directly instead of uploading espflash's flasher stub.
    #[arg(long)]
    pub no_stub: bool,
    /// Also write the firmware of this `cargo nvs dist` folder (bootloader, partition table,
    /// app; its user-data images onto blank flash only) in the same connection and write as the
    /// device's images, skipping what the chip holds already. Refused when the folder's table
    /// has no partition where the device's images go. The log records its firmware_sha256.
    #[arg(long, value_name = "DIR")]
    pub firmware: Option<PathBuf>,
    #[command(flatten)]
    pub package: PackageArgs,
}

/// The exit code of `mfg flash` when every device is flashed (or claimed by other stations):
/// scripts loop until they see it.
pub const NOTHING_LEFT: u8 = 3;

/// The product's ledger, which must exist, and how it was chosen.
pub fn open_ledger(
    out_dir: Option<&Path>,
    ledger: Option<&Path>,
    package: &PackageArgs,
) -> Result<(Box<dyn Ledger>, ChosenLedger), MfgFlashError> {
    let chosen = choose_ledger(ledger, Scope::Batch { out_dir, package })?;
    match chosen.open_existing()? {
        Some(ledger) => Ok((ledger, chosen)),
        None => Err(MfgFlashError::Invalid(format!(
            "no ledger at `{}` ({}): run `cargo nvs mfg generate` first, or name the ledger with \
             --ledger PATH or {LEDGER_ENV}",
            chosen.path.display(),
            chosen.from
        ))),
    }
}

/// Where the images go.
#[derive(Default)]
pub(crate) struct Target {
    offset: u32,
    /// Bytes to write; `None`: each device's own partition size.
    size: Option<u32>,
    /// The nvs_keys partition's offset and size, for devices with their own key.
    keys: Option<(u32, u32)>,
    /// The Cargo package's table: every image of a device goes to the partition it is named
    /// after (`offset` and `size` do not apply).
    package_table: Option<PartitionTable>,
    /// Cargo mode: each partition's development image (`None` where a per-device key has no
    /// `dev` value), per-device keys and key, to tell development data on a chip from a
    /// production identity.
    dev: BTreeMap<String, DevPartition>,
    /// The ledger, as messages name it.
    ledger_name: String,
    /// `--firmware`: written in the same pass.
    pub(crate) firmware: Option<Firmware>,
    /// Why nothing says where images go (no --offset or --partition-table, and no Cargo
    /// package): then only devices whose files the ledger stores, with their places, can be
    /// flashed.
    placement_unknown: Option<String>,
    /// The partition tables stored with batches (`mfg generate --store-images`), by batch
    /// folder: a chip's table is checked against its device's batch's.
    batch_tables: BTreeMap<PathBuf, PartitionTable>,
}

impl Target {
    /// --offset or --partition-table (with --size) placed the images: that does not apply to
    /// devices stored with their places.
    fn placement_given(&self) -> bool {
        self.package_table.is_none() && self.placement_unknown.is_none()
    }
}

/// A partition's development image (`None` without dev values) and what the guard needs.
type DevPartition = (Option<Vec<u8>>, DataPartition);

/// The development image of every partition of the metadata, with what the guard needs.
fn dev_images(metadata: &Metadata) -> Result<BTreeMap<String, DevPartition>, MfgFlashError> {
    let mut inputs = Inputs::new(|var| std::env::var(var).ok());
    let mut dev = BTreeMap::new();
    for spec in &metadata.partitions {
        // Without a dev value (or an env source) there is no development image: then only
        // blank flash and this device's own image go unchallenged.
        let image = match build_partition(spec, &metadata.manifest_dir, &mut inputs) {
            Ok(PartitionImage::Built(built)) => {
                let mut bytes = built.bytes;
                bytes.resize(spec.size as usize, 0xFF);
                Some(bytes)
            }
            _ => None,
        };
        dev.insert(spec.name.clone(), (image, DataPartition::of(Some(spec))?));
    }
    Ok(dev)
}

pub(crate) fn target(args: &MfgFlashArgs) -> Result<Target, MfgFlashError> {
    let package_given = args.package.package.is_some() || args.package.manifest_path.is_some();
    if package_given && (args.offset.is_some() || args.partition_table.is_some()) {
        return Err(MfgFlashError::Invalid(
            "-p/--manifest-path pick the package whose partition table places the images; \
             --offset and --partition-table place them instead: give one or the other"
                .into(),
        ));
    }
    let size = match &args.size {
        Some(text) => Some(
            u32::try_from(parse_size(text)?)
                .map_err(|_| MfgFlashError::Invalid(format!("--size {text}: too large")))?,
        ),
        None => None,
    };
    if let Some(text) = &args.offset {
        let offset = u32::try_from(parse_size(text)?)
            .map_err(|_| MfgFlashError::Invalid(format!("--offset {text}: too large")))?;
        if offset % 0x1000 != 0 {
            return Err(MfgFlashError::Invalid(format!(
                "--offset {text}: NVS partitions start on a 4 KiB boundary (0x1000)"
            )));
        }
        return Ok(Target {
            offset,
            size,
            ..Target::default()
        });
    }
    let (Some(path), Some(name)) = (&args.partition_table, &args.partition) else {
        if size.is_some() {
            return Err(MfgFlashError::Invalid(
                "--size needs --offset, or --partition-table and --partition (with the \
                 package's table every image fills its own partition)"
                    .into(),
            ));
        }
        let unknown = |e: &dyn std::fmt::Display| {
            format!(
                "where do the images go? give --offset, or --partition-table and --partition, or \
                 run in the firmware's Cargo package (or -p/--manifest-path) to use its partition \
                 table, or store the images in the ledger (`mfg generate --store-images`) ({e})"
            )
        };
        let metadata = match args
            .package
            .find()
            .and_then(|project| project.nvs_metadata())
        {
            Ok(metadata) => metadata,
            // Devices whose files the ledger stores carry their places: a station with only
            // the ledger (and the firmware) needs no package.
            Err(e) if !package_given => {
                return Ok(Target {
                    placement_unknown: Some(unknown(&e)),
                    ..Target::default()
                });
            }
            Err(e) => return Err(MfgFlashError::Invalid(unknown(&e))),
        };
        return Ok(Target {
            keys: nvs_keys_of(&metadata.table),
            dev: dev_images(&metadata)?,
            package_table: Some(metadata.table),
            ..Target::default()
        });
    };
    let table = PartitionTable::load(path, PartitionTable::DEFAULT_OFFSET)?;
    let partition = table.nvs_partition(name, &format!("`{}`", path.display()))?;
    if let Some(size) = size
        && size > partition.size
    {
        return Err(MfgFlashError::Invalid(format!(
            "--size {size:#x} is larger than partition `{name}` ({:#x})",
            partition.size
        )));
    }
    Ok(Target {
        offset: partition.offset,
        size: Some(size.unwrap_or(partition.size)),
        keys: nvs_keys_of(&table),
        ..Target::default()
    })
}

/// The offset and size of the table's nvs_keys partition.
fn nvs_keys_of(table: &PartitionTable) -> Option<(u32, u32)> {
    table.nvs_keys().map(|p| (p.offset, p.size))
}

/// Reads a device's image (relative to its batch folder), checks it is the one the ledger
/// recorded and, for a recipe (values from the chip), builds the image with the chip's `mac`;
/// with the SHA-256 of what is written.
fn read_image(
    batch_dir: &Path,
    image: &str,
    sha256: &str,
    mac: Option<&str>,
) -> Result<(Vec<u8>, String), MfgFlashError> {
    let path = batch_dir.join(image);
    let data = std::fs::read(&path)
        .map_err(|e| MfgFlashError::Invalid(format!("cannot read `{}`: {e}", path.display())))?;
    let actual = sha256_hex(&data);
    if actual != sha256 {
        return Err(MfgFlashError::Invalid(format!(
            "`{}` is not the image the ledger recorded (SHA-256 {actual}, ledger {sha256}); not \
             flashed",
            path.display()
        )));
    }
    let read_key = |name: &str| {
        let path = batch_dir.join(name);
        std::fs::read(&path).map_err(|e| format!("cannot read `{}`: {e}", path.display()))
    };
    image_for_chip(data, &path, sha256, mac, &read_key)
}

/// The device's images (from its batch folder), each padded with 0xFF over the partition it
/// goes to: (offset, bytes, partition).
fn image_segments(
    target: &Target,
    device: &Issued,
    mac: Option<&str>,
    built: &mut Vec<String>,
) -> Result<Vec<(u32, Vec<u8>, String)>, MfgFlashError> {
    if let Some(why) = &target.placement_unknown {
        return Err(MfgFlashError::Invalid(why.clone()));
    }
    let out_dir = device.batch_dir.as_path();
    let pad = |mut data: Vec<u8>, size: u32, image: &str| {
        if data.len() > size as usize {
            return Err(MfgFlashError::Invalid(format!(
                "`{}` is {} bytes, larger than the {size:#x} bytes to write",
                out_dir.join(image).display(),
                data.len()
            )));
        }
        data.resize(size as usize, 0xFF);
        Ok(data)
    };
    let Some(table) = &target.package_table else {
        let (data, sha256) = read_image(out_dir, &device.image, &device.sha256, mac)?;
        built.push(sha256);
        let size = target.size.unwrap_or(device.size);
        return Ok(vec![(
            target.offset,
            pad(data, size, &device.image)?,
            "nvs".to_owned(),
        )]);
    };
    let images: Vec<(&String, &String)> = device.images().collect();
    // An image of this device that the ledger does not list (ledgers before schema 2 list only
    // the first) would be left out without a word.
    for partition in table.nvs_partitions() {
        let image = format!("bin/{}-{}.bin", partition.name, device.device);
        if !images.iter().any(|(listed, _)| **listed == image) && out_dir.join(&image).exists() {
            return Err(MfgFlashError::Invalid(format!(
                "`{}` exists but the ledger does not list it for device `{}` (a ledger from an \
                 older cargo-nvs lists only a device's first image); flash each image with \
                 --partition-table and --partition",
                out_dir.join(&image).display(),
                device.device
            )));
        }
    }
    let mut segments = Vec::new();
    for (image, sha256) in images {
        let suffix = format!("-{}.bin", device.device);
        let recipe_suffix = format!("-{}{RECIPE_SUFFIX}", device.device);
        let Some(name) = image.strip_prefix("bin/").and_then(|n| {
            n.strip_suffix(&suffix)
                .or_else(|| n.strip_suffix(&recipe_suffix))
        }) else {
            return Err(MfgFlashError::Invalid(format!(
                "`{image}` is not named <partition>-{}.bin: it was not made from the package's \
                 metadata; give --offset, or --partition-table and --partition",
                device.device
            )));
        };
        let partition = table
            .nvs_partition(name, "the package's partition table")
            .map_err(|e| {
                MfgFlashError::Invalid(format!(
                    "`{image}`: {}; images of mfg_gen's form are named by their prefix: give \
                     --offset, or --partition-table and --partition",
                    e
                ))
            })?;
        if segments.is_empty() && partition.size != device.size {
            return Err(MfgFlashError::Invalid(format!(
                "`{image}` was made for {:#x} bytes, but partition `{name}` of the package's \
                 table has {:#x}; give --offset, or --partition-table and --partition",
                device.size, partition.size
            )));
        }
        let (data, sha256) = read_image(out_dir, image, sha256, mac)?;
        built.push(sha256);
        segments.push((
            partition.offset,
            pad(data, partition.size, image)?,
            name.to_owned(),
        ));
    }
    Ok(segments)
}

/// The batch folders whose devices this run may flash: --out-dir's, else every batch folder of
/// the ledger that is on disk or whose files the ledger stores; and the partition tables stored
/// with them.
pub(crate) fn batches(
    out_dir: Option<&Path>,
    ledger: &dyn Ledger,
    chosen: &ChosenLedger,
) -> Result<(Vec<PathBuf>, BTreeMap<PathBuf, PartitionTable>), MfgFlashError> {
    let known = ledger.batch_dirs()?;
    let mut tables = BTreeMap::new();
    for dir in &known {
        if let Some(bytes) = ledger.batch_table(dir)? {
            let name = format!("the partition table stored with batch `{}`", dir.display());
            let table = PartitionTable::parse_binary(Path::new(&name), &bytes)?;
            tables.insert(dir.clone(), table);
        }
    }
    if let Some(dir) = out_dir {
        let dir = std::fs::canonicalize(dir).map_err(|e| {
            MfgFlashError::Invalid(format!(
                "--out-dir `{}`: {e} (give the folder of an `mfg generate` batch)",
                dir.display()
            ))
        })?;
        if !known.contains(&dir) {
            return Err(MfgFlashError::Invalid(format!(
                "the ledger `{}` ({}) has no devices issued into `{}`; give the ledger the \
                 batch was made with (--ledger PATH, or {LEDGER_ENV})",
                chosen.path.display(),
                chosen.from,
                dir.display()
            )));
        }
        return Ok((vec![dir], tables));
    }
    let (present, missing): (Vec<PathBuf>, Vec<PathBuf>) = known
        .into_iter()
        .partition(|dir| tables.contains_key(dir) || dir.is_dir());
    for dir in &missing {
        eprintln!(
            "note: the batch folder `{}` is missing: its devices are skipped",
            dir.display()
        );
    }
    if present.is_empty() {
        return Err(MfgFlashError::Invalid(if missing.is_empty() {
            "the ledger has no devices: generate them with `cargo nvs mfg generate`".into()
        } else {
            "none of the ledger's batch folders is on disk (see above), and the ledger stores \
             no batch's files: give --out-dir with a batch's folder where it is now"
                .into()
        }));
    }
    Ok((present, tables))
}

/// `cargo nvs mfg flash`: claims one device per port, and flashes, verifies and logs each.
pub fn run(args: MfgFlashArgs) -> Result<Flashed, MfgFlashError> {
    let Production {
        target,
        ledger,
        batches,
        ..
    } = Production::open(&args)?;
    let ledger: &dyn Ledger = &*ledger;
    let ports: Vec<Option<String>> = if args.ports.is_empty() {
        vec![None]
    } else {
        args.ports.iter().cloned().map(Some).collect()
    };

    // One device per port, claimed in the ledger before any port is opened: other stations
    // sharing the ledger skip claimed devices.
    let claimants: Vec<String> = ports.iter().map(|port| station(port.as_deref())).collect();
    let mut chosen: Vec<Issued> = Vec::new();
    if let Some(id) = &args.device {
        if ports.len() > 1 {
            return Err(MfgFlashError::Invalid(
                "--device names one device: give one --port (or use --next)".into(),
            ));
        }
        let entry = ledger.issued(id)?.ok_or_else(|| {
            MfgFlashError::Invalid(format!(
                "device `{id}` is not in the ledger (it was never issued)"
            ))
        })?;
        if entry.sha256.is_empty() {
            return Err(MfgFlashError::Invalid(format!(
                "device `{id}` is reserved by a `mfg generate` run into `{}` that has not \
                 finished: finish it with --resume first",
                entry.batch_dir.display()
            )));
        }
        if args.out_dir.is_some() && !batches.contains(&entry.batch_dir) {
            return Err(MfgFlashError::Invalid(format!(
                "device `{id}` was issued into the batch `{}`, not `{}`; not flashed (drop \
                 --out-dir, or give that batch's)",
                entry.batch_dir.display(),
                batches[0].display()
            )));
        }
        if !entry.batch_dir.is_dir() && !target.batch_tables.contains_key(&entry.batch_dir) {
            return Err(MfgFlashError::Invalid(format!(
                "device `{id}` was issued into the batch `{}`, which is missing; not flashed",
                entry.batch_dir.display()
            )));
        }
        if let ClaimOutcome::HeldBy { claimant, since } = ledger.claim(id, &claimants[0])? {
            let held = format!("device `{id}` is being flashed by {claimant} (claimed at {since})");
            if !args.force {
                return Err(MfgFlashError::Invalid(format!(
                    "{held}; not flashed (--force flashes it anyway)"
                )));
            }
            eprintln!("warning: {held}; flashing anyway (--force)");
        }
        chosen.push(entry);
    } else {
        for claimant in &claimants {
            match ledger.claim_next(claimant, &batches) {
                Ok(Some(entry)) => chosen.push(entry),
                Ok(None) => break,
                Err(e) => {
                    // Give back what this run claimed so far.
                    for (entry, claimant) in chosen.iter().zip(&claimants) {
                        let _ = ledger.release(&entry.device, claimant);
                    }
                    return Err(e.into());
                }
            }
        }
        if chosen.is_empty() {
            eprintln!(
                "nothing left to flash: every device of {} is flashed already (or taken by \
                 another station); generate more with `cargo nvs mfg generate`",
                match (&args.out_dir, batches.as_slice()) {
                    (Some(_), [dir]) => format!("the batch `{}`", dir.display()),
                    _ => "the ledger's batches".into(),
                }
            );
            return Ok(Flashed::NothingLeft);
        }
        if chosen.len() < ports.len() {
            eprintln!(
                "warning: only {} unflashed device(s) left; {} port(s) stay idle",
                chosen.len(),
                ports.len() - chosen.len()
            );
        }
    }

    let jobs: Vec<(Option<String>, Issued)> = ports.into_iter().zip(chosen).collect();
    let results: Vec<Result<(), MfgFlashError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = jobs
            .iter()
            .zip(&claimants)
            .map(|((port, device), claimant)| {
                let (args, target) = (&args, &target);
                scope.spawn(move || {
                    let mut claim = Claim {
                        ledger,
                        device: &device.device,
                        claimant,
                        keep: false,
                    };
                    flash_device(args, target, port, device, &mut claim)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(MfgFlashError::Invalid("a flashing thread panicked".into()))
                })
            })
            .collect()
    });
    let mut failed = 0;
    for ((port, device), result) in jobs.iter().zip(results) {
        if let Err(e) = result {
            failed += 1;
            eprintln!(
                "error: [{}] device `{}`: {}",
                port.as_deref().unwrap_or("default port"),
                device.device,
                e
            );
        }
    }
    if failed > 0 {
        return Err(MfgFlashError::Failed {
            failed,
            total: jobs.len(),
        });
    }
    Ok(Flashed::Devices(jobs.len()))
}

/// What every production flash works with: where images go, the ledger, and the batches
/// whose devices may be claimed.
pub(crate) struct Production {
    pub target: Target,
    pub ledger: Box<dyn Ledger>,
    pub batches: Vec<PathBuf>,
}

impl Production {
    pub fn open(args: &MfgFlashArgs) -> Result<Production, MfgFlashError> {
        let mut target = target(args)?;
        target.firmware = args.firmware.as_deref().map(Firmware::load).transpose()?;
        let (ledger, chosen) = open_ledger(
            args.out_dir.as_deref(),
            args.ledger.as_deref(),
            &args.package,
        )?;
        target.ledger_name = chosen.shown();
        // Devices written to a chip whose flash was never logged are given to no other chip.
        let unlogged = ledger.written_unlogged()?;
        if let Some((device, mac)) = unlogged.first() {
            eprintln!(
                "note: {} device(s) were written to a chip but never logged (e.g. `{device}` on \
                 MAC {mac}): they go to no other chip. Connect that chip and run `cargo nvs mfg \
                 flash --device {device}` to verify and log it",
                unlogged.len()
            );
        }
        let (batches, tables) = batches(args.out_dir.as_deref(), &*ledger, &chosen)?;
        target.batch_tables = tables;
        for (i, port) in args.ports.iter().enumerate() {
            if args.ports[..i].contains(port) {
                return Err(MfgFlashError::Invalid(format!(
                    "--port {port} is given twice"
                )));
            }
        }
        Ok(Production {
            target,
            ledger,
            batches,
        })
    }
}

/// A device this run claimed: given back when its flash ends without a log entry (a log entry
/// ends the claim), unless `keep` (it was flashed, but the log failed: no other station may
/// take it).
pub(crate) struct Claim<'a> {
    pub ledger: &'a dyn Ledger,
    pub device: &'a str,
    pub claimant: &'a str,
    pub keep: bool,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if !self.keep {
            let _ = self.ledger.release(self.device, self.claimant);
        }
    }
}

/// Who claims devices in the ledger: this host and port (a port serves one run at a time, so
/// a rerun on it takes back its claims), or this process for the default port.
pub(crate) fn station(port: Option<&str>) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "station".into());
    // PCs cloned from one image share a host name: the machine id tells them apart, so one
    // station never takes back another's claim as its own.
    let machine = ["/etc/machine-id", "/var/lib/dbus/machine-id"]
        .iter()
        .find_map(|path| std::fs::read_to_string(path).ok())
        .map(|id| id.trim().chars().take(12).collect::<String>())
        .filter(|id| !id.is_empty())
        .map_or(String::new(), |id| format!(" ({id})"));
    match port {
        Some(port) => format!("{host}{machine} port {port}"),
        None => format!(
            "{host}{machine} process {} default port",
            std::process::id()
        ),
    }
}

/// Flashes one device through one port and logs it. Its images and key files are in its batch
/// folder (`device.batch_dir`).
fn flash_device(
    args: &MfgFlashArgs,
    target: &Target,
    port: &Option<String>,
    device: &Issued,
    claim: &mut Claim<'_>,
) -> Result<(), MfgFlashError> {
    let label = format!(
        "[{}] {}",
        port.as_deref().unwrap_or("default port"),
        device.device
    );
    // A device made from the chip is built once its MAC is known, and a stored device is read
    // then (a refusal is logged with the chip); the others are checked before the port opens.
    let late = device.from_chip || target.batch_tables.contains_key(&device.batch_dir);
    let early = match late {
        true => None,
        false => Some(device_segments(target, claim.ledger, device, &label, None)?),
    };
    let mut flasher = connect(
        &connect_args(args, port.clone(), args.baud),
        true,
        target.firmware.is_some(),
    )?;
    let chip = chip_of(&mut flasher)?;
    let (built, segments) = match early {
        Some(prepared) => prepared,
        None => match device_segments(target, claim.ledger, device, &label, Some(&chip.mac)) {
            Ok(prepared) => prepared,
            Err(e) => return logged(claim.ledger, target, device, port, &chip.mac, Err(e)),
        },
    };
    let device = &built;
    let mut progress = PortProgress::new(label.clone());
    let result = flash_connected(
        args,
        target,
        &mut flasher,
        &chip,
        device,
        &segments,
        claim,
        port,
        &label,
        &mut progress,
        false,
    );
    if let Err(MfgFlashError::Write(_)) = &result {
        give_up(
            &mut flasher,
            target,
            device,
            &segments,
            claim,
            port,
            &chip.mac,
        )?;
    }
    logged(claim.ledger, target, device, port, &chip.mac, result)
}

/// espflash's connection options for `port`, from `mfg flash`'s.
pub(crate) fn connect_args(
    args: &MfgFlashArgs,
    port: Option<String>,
    baud: Option<u32>,
) -> ConnectArgs {
    ConnectArgs {
        port,
        baud,
        chip: args.chip,
        before: args.before,
        after: args.after,
        no_stub: args.no_stub,
    }
}

/// What a production flash needs to know of the connected chip.
pub struct ChipInfo {
    pub mac: String,
    pub flash_size: u32,
}

/// The MAC and flash size of the connected chip (a chip that does not tell its MAC is refused).
pub(crate) fn chip_of(flasher: &mut espflash::flasher::Flasher) -> Result<ChipInfo, MfgFlashError> {
    let info = flasher
        .device_info()
        .map_err(ChipError::doing("read the chip's details".into()))?;
    let mac = info.mac_address.clone().ok_or_else(|| {
        MfgFlashError::Invalid(
            "the chip does not tell its MAC (secure download mode); not flashed".into(),
        )
    })?;
    Ok(ChipInfo {
        mac,
        flash_size: info.flash_size.size(),
    })
}

/// A device's segments: (offset, bytes, partition).
pub(crate) type Segments = Vec<(u32, Vec<u8>, String)>;

/// The device as it is flashed, and its segments: its images where the target puts them (a
/// recipe built with the chip's `mac`), its key file into nvs_keys, checked against the
/// firmware's table (`--firmware`). For a device made from the chip, the SHA-256s are those of
/// the images built for this chip (what the production log records).
pub(crate) fn device_segments(
    target: &Target,
    ledger: &dyn Ledger,
    device: &Issued,
    label: &str,
    mac: Option<&str>,
) -> Result<(Issued, Segments), MfgFlashError> {
    let out_dir = device.batch_dir.as_path();
    let stored = ledger.stored_files(&device.device)?;
    if !stored.is_empty() && target.placement_given() {
        return Err(MfgFlashError::Invalid(format!(
            "device `{}` is stored in the ledger with the partitions its files go to: --offset, \
             --partition-table and --size do not apply to it (drop them)",
            device.device
        )));
    }
    let batch_table = target.batch_tables.get(&device.batch_dir);
    if stored.is_empty() && batch_table.is_some() {
        return Err(MfgFlashError::Invalid(format!(
            "device `{}`: the ledger stores its batch's files but shows none of its own (a \
             station login sees only the files of a device it holds a claim on and that is not \
             flashed yet); not flashed",
            device.device
        )));
    }
    let from_folder = stored.is_empty();
    let mut built = Vec::new();
    let mut segments = if from_folder {
        image_segments(target, device, mac, &mut built)?
    } else {
        stored_segments(device, stored, batch_table, mac, &mut built)?
    };
    let mut device = device.clone();
    if device.from_chip {
        let mut built = built.into_iter();
        if let Some(sha) = built.next() {
            device.sha256 = sha;
        }
        for ((_, sha), built) in device.more_images.iter_mut().zip(built) {
            *sha = built;
        }
    }
    if let Some(hmac_key) = &device.hmac_key_file {
        // HMAC key protection: the chip derives the key from its eFuse; nvs_keys stays unused.
        let in_out_dir = out_dir.join(hmac_key);
        let shown = if in_out_dir.exists() {
            in_out_dir.display().to_string()
        } else {
            hmac_key.clone()
        };
        eprintln!(
            "{label}: HMAC key protection: the chip needs the HMAC key `{shown}` in an eFuse key \
             block (espefuse.py burn_key BLOCK_KEYn {shown} HMAC_UP); the derived key file is not \
             flashed"
        );
    } else if let Some(key_file) = device.key_file.as_ref().filter(|_| from_folder) {
        let Some((offset, keys_size)) = target.keys else {
            return Err(MfgFlashError::Invalid(format!(
                "the image is encrypted with its own key ({key_file}): give --partition-table \
                 with a data/nvs_keys partition so the key is flashed with it"
            )));
        };
        let key_path = out_dir.join(key_file);
        let key = std::fs::read(&key_path).map_err(FileError::reading(&key_path))?;
        if key.len() > keys_size as usize {
            return Err(MfgFlashError::Invalid(format!(
                "`{}` is larger than the nvs_keys partition",
                key_path.display()
            )));
        }
        segments.push((offset, key, "nvs_keys".to_owned()));
    }
    if let Some(firmware) = &target.firmware {
        for (addr, data, name) in &segments {
            firmware.check_placement(*addr, data.len(), name)?;
        }
    }

    Ok((device, segments))
}

/// The production log's record of a flash that was refused or failed before anything was
/// written: every attempt is logged. A failed write logged itself; without a ledger nothing
/// can be.
pub(crate) fn logged(
    ledger: &dyn Ledger,
    target: &Target,
    device: &Issued,
    port: &Option<String>,
    mac: &str,
    result: Result<(), MfgFlashError>,
) -> Result<(), MfgFlashError> {
    let Err(e) = result else {
        return Ok(());
    };
    let outcome = match &e {
        // Logged already, or not to be: the write failed (logged with the claim's end), it
        // passed but could not be logged, or the ledger itself failed.
        MfgFlashError::Write(_)
        | MfgFlashError::Unlogged { .. }
        | MfgFlashError::Ledger(_)
        | MfgFlashError::Logged(_) => {
            return Err(e);
        }
        MfgFlashError::Chip(_)
        | MfgFlashError::Flashing(_)
        | MfgFlashError::Protect(ProtectError::Chip(_) | ProtectError::Flashing(_)) => "failed",
        _ => "refused",
    };
    ledger.log_attempt(&record(
        target,
        device,
        port,
        mac,
        format!("{outcome}: {e}"),
    ))?;
    Err(MfgFlashError::Logged(Box::new(e)))
}

/// A production-log row for `device` on `mac`.
fn record(
    target: &Target,
    device: &Issued,
    port: &Option<String>,
    mac: &str,
    result: String,
) -> FlashRecord {
    FlashRecord {
        mac: mac.to_owned(),
        device: device.device.clone(),
        sha256: device.sha256.clone(),
        port: port.clone().unwrap_or_default(),
        result,
        time: String::new(),
        firmware_sha256: target
            .firmware
            .as_ref()
            .map_or(String::new(), |f| f.sha256.clone()),
    }
}

/// Flashes the claimed `device` onto the connected chip, with the firmware (`--firmware`), in
/// one write, and logs the outcome of the write. `rewrite`: the last attempt wrote this chip
/// and failed verification; what it left is replaced without the guard's judgement.
#[allow(clippy::too_many_arguments)]
pub(crate) fn flash_connected(
    args: &MfgFlashArgs,
    target: &Target,
    flasher: &mut Session,
    chip: &ChipInfo,
    device: &Issued,
    segments: &[(u32, Vec<u8>, String)],
    claim: &mut Claim<'_>,
    port: &Option<String>,
    label: &str,
    progress: &mut dyn SegmentProgress,
    rewrite: bool,
) -> Result<(), MfgFlashError> {
    let ledger = claim.ledger;
    let mac = &chip.mac;
    if let Some(conflict) = ledger.flash_conflict(mac, &device.device)? {
        if !args.force {
            return Err(MfgFlashError::Invalid(format!(
                "{conflict}; not flashed (--force flashes it anyway)"
            )));
        }
        eprintln!("{label}: warning: {conflict}; flashing anyway (--force)");
    }
    if let Some(other) = ledger.written_to(&device.device)?.filter(|m| m != mac) {
        let problem = format!(
            "device `{}` was written to the chip with MAC {other}, and how that ended was never \
             logged: that chip may hold it. Connect it and run `cargo nvs mfg flash --device {}`",
            device.device, device.device
        );
        if !args.force {
            return Err(MfgFlashError::Invalid(format!(
                "{problem}; not flashed (--force flashes it here anyway)"
            )));
        }
        eprintln!("{label}: warning: {problem}; flashing it here anyway (--force)");
    }
    let flash_size = chip.flash_size;
    let firmware_parts = target.firmware.iter().flat_map(|f| {
        f.segments
            .iter()
            .map(|s| (s.addr, s.data.len(), s.name.as_str()))
    });
    if let Some((addr, len, name)) = segments
        .iter()
        .map(|(a, d, n)| (*a, d.len(), n.as_str()))
        .chain(firmware_parts)
        .find(|(a, len, _)| u64::from(*a) + *len as u64 > u64::from(flash_size))
    {
        return Err(MfgFlashError::Invalid(format!(
            "{name} at {addr:#x} ({len} bytes) ends beyond the chip's {flash_size:#x} bytes of \
             flash; not flashed"
        )));
    }
    let firmware = match &target.firmware {
        Some(firmware) => firmware_segments(args, firmware, flasher, segments, label)?,
        None => {
            // A batch stored with its table was placed by it.
            let table =
                (target.batch_tables.get(&device.batch_dir)).or(target.package_table.as_ref());
            if let Some(problem) = chip_table_problem(args, table, flasher, segments, label)? {
                return Err(MfgFlashError::Invalid(problem));
            }
            Vec::new()
        }
    };
    let erase_first = if rewrite {
        // This chip holds what the failed attempt just wrote there (it failed verification).
        segments
            .iter()
            .map(|(addr, data, _)| (*addr, data.len() as u32))
            .collect()
    } else {
        guard_device_images(args, target, flasher, segments, label, mac, ledger)?
    };
    if !args.no_stub {
        // What is replaced is erased first, so a write cut off later leaves the start of the
        // image and erased flash, which the next run finishes (the ROM loader does this itself).
        for &(addr, len) in &erase_first {
            flasher
                .erase_region(addr, len)
                .map_err(ChipError::doing(format!("erase flash at {addr:#x}")))?;
        }
    }
    // One write: the firmware, then the device's images.
    let espflash_segments: Vec<Segment<'_>> = firmware
        .iter()
        .map(|s| Segment::new(s.addr, &s.data))
        .chain(
            segments
                .iter()
                .map(|(addr, data, _)| Segment::new(*addr, data)),
        )
        .collect();
    eprintln!("{label}: chip {} MAC {mac}", flasher.chip());
    // From here the chip may hold the device even if this process dies.
    if !ledger.mark_written(&device.device, claim.claimant, mac)? && !args.force {
        return Err(MfgFlashError::Invalid(format!(
            "device `{}` is no longer this station's (its claim lapsed and another station took \
             it over, or it was written to another chip meanwhile); not flashed",
            device.device
        )));
    }
    progress.segments(
        &espflash_segments
            .iter()
            .map(|s| (s.addr, s.data.len()))
            .collect::<Vec<_>>(),
    );
    let written = written(flasher.write_bins_to_flash(&espflash_segments, progress));
    flasher.ended();
    let record = |result: String| record(target, device, port, mac, result);
    match written {
        Ok(()) => {
            if let Err(e) = ledger.record_flash(&record("ok".into())) {
                claim.keep = true;
                return Err(MfgFlashError::Unlogged {
                    mac: mac.clone(),
                    source: e,
                });
            }
            let places: Vec<String> = segments
                .iter()
                .map(|(addr, data, name)| format!("{name}: {} bytes at {addr:#x}", data.len()))
                .collect();
            eprintln!(
                "{label}: flashed and verified ({}) on MAC {mac}",
                places.join(", ")
            );
            Ok(())
        }
        Err(e) => {
            // The claim and its record of this chip stay: a retry goes on with them, and
            // `give_up` decides what becomes of the device.
            ledger.log_attempt(&record(format!("failed: {e}")))?;
            Err(MfgFlashError::Write(e))
        }
    }
}

/// After the last failed write of `device` onto the connected chip: its partitions there are
/// overwritten with erased flash (0xFF), so that the chip keeps no copy of the identity, and
/// the device goes back to the pool (logged). When that fails too, the device stays held for
/// this chip (as a write never logged): it goes to no other chip until `mfg flash --device ID`
/// on this one settles it.
pub(crate) fn give_up(
    flasher: &mut Session,
    target: &Target,
    device: &Issued,
    segments: &[(u32, Vec<u8>, String)],
    claim: &mut Claim<'_>,
    port: &Option<String>,
    mac: &str,
) -> Result<(), MfgFlashError> {
    // Erased flash written and verified (not ERASE_REGION, which is not verified).
    let regions: Vec<(u32, u32)> = segments
        .iter()
        .map(|(addr, data, _)| (*addr, data.len() as u32))
        .collect();
    let wiped = erase_regions(flasher, &regions, false);
    flasher.ended();
    let record = |result: String| record(target, device, port, mac, result);
    match wiped {
        Ok(()) => claim.ledger.record_flash(&record(
            "failed: given up; its partitions on this chip were erased, the device goes back \
             to the pool"
                .into(),
        ))?,
        Err(e) => hold(
            claim,
            target,
            device,
            port,
            mac,
            &format!("given up, and erasing its partitions on this chip failed too ({e})"),
        )?,
    }
    Ok(())
}

/// Keeps the claimed `device` held for the chip `mac`, which may hold what a failed write left
/// (`why`): logged, and given to no other chip (as a write never logged) until `mfg flash
/// --device ID` on that chip settles it.
pub(crate) fn hold(
    claim: &mut Claim<'_>,
    target: &Target,
    device: &Issued,
    port: &Option<String>,
    mac: &str,
    why: &str,
) -> Result<(), MfgFlashError> {
    claim.keep = true;
    claim.ledger.log_attempt(&record(
        target,
        device,
        port,
        mac,
        format!("failed: {why}: the device stays held for this chip"),
    ))?;
    Ok(())
}

/// The firmware segments to write with the device's images: bootloader, table and app (a
/// changed table may not overwrite NVS data it moves), and dist's user-data images only where
/// the chip's flash is blank (and no image of the device goes).
fn firmware_segments<'f>(
    args: &MfgFlashArgs,
    firmware: &'f Firmware,
    flasher: &mut espflash::flasher::Flasher,
    device_segments: &[(u32, Vec<u8>, String)],
    label: &str,
) -> Result<Vec<&'f Planned>, MfgFlashError> {
    let chip = flasher.chip().to_string();
    if !firmware.chip.is_empty() && firmware.chip != chip {
        return Err(MfgFlashError::Invalid(format!(
            "the firmware in `{}` is for an {}, the chip is an {chip}; not flashed",
            firmware.dir.display(),
            firmware.chip
        )));
    }
    let allow = Allow {
        overwrite_factory_data: args.force,
        reset_user_data: args.force,
        ..Allow::default()
    };
    guard_table_change(
        flasher,
        &firmware.segments,
        allow,
        ("--force", "--force"),
        !args.no_stub,
    )?;
    let mut chosen = Vec::new();
    for segment in &firmware.segments {
        if segment.role != Role::UserData {
            chosen.push(segment);
            continue;
        }
        if device_segments
            .iter()
            .any(|(addr, _, _)| *addr == segment.addr)
        {
            continue;
        }
        let len = segment.data.len() as u32;
        let on_chip = flasher
            .checksum_md5(segment.addr, len)
            .map_err(ChipError::doing(format!(
                "check the flash at {:#x}",
                segment.addr
            )))?;
        if on_chip == blank_md5(len) {
            chosen.push(segment);
        } else {
            eprintln!(
                "{label}: kept the user data the chip holds at {:#x} ({}): dist's development \
                 data goes onto blank flash only",
                segment.addr, segment.name
            );
        }
    }
    Ok(chosen)
}

/// Without `--firmware`: what is wrong with the chip's partition table for the device's images
/// (they would land outside the NVS partitions its firmware uses), if anything. A chip without
/// a table gets the images with a warning.
fn chip_table_problem(
    args: &MfgFlashArgs,
    package_table: Option<&PartitionTable>,
    flasher: &mut espflash::flasher::Flasher,
    segments: &[(u32, Vec<u8>, String)],
    label: &str,
) -> Result<Option<String>, MfgFlashError> {
    let offset = PartitionTable::DEFAULT_OFFSET;
    let size = PartitionTable::BINARY_SIZE as u32;
    let bytes = read_flash(flasher, offset, size, !args.no_stub)?;
    if bytes.iter().all(|&b| b == 0xFF) {
        eprintln!(
            "{label}: warning: no firmware on this chip yet (no partition table at {offset:#x}); \
             writing the images only (--firmware DIR writes a `cargo nvs dist` with them)"
        );
        return Ok(None);
    }
    let name = "the chip's partition table";
    let Ok(chip_table) = PartitionTable::parse_binary_at(Path::new(name), &bytes, offset) else {
        return Ok(Some(format!(
            "the chip holds no valid partition table at {offset:#x}; not flashed (flash the \
             firmware with --firmware DIR)"
        )));
    };
    let data_partitions = |table: &PartitionTable| -> Vec<(String, u32, u32, bool)> {
        let mut list: Vec<_> = table
            .partitions
            .iter()
            .filter(|p| p.is_nvs() || p.is_nvs_keys())
            .map(|p| (p.name.clone(), p.offset, p.size, p.is_nvs_keys()))
            .collect();
        list.sort();
        list
    };
    if let Some(package) = package_table {
        let (theirs, ours) = (data_partitions(&chip_table), data_partitions(package));
        if theirs != ours {
            let show = |list: &[(String, u32, u32, bool)]| {
                list.iter()
                    .map(|(n, o, s, _)| format!("{n} at {o:#x} ({s:#x} bytes)"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Ok(Some(format!(
                "the chip's partition table disagrees with the one the images were made for \
                 (the package's, or the one stored with the batch) on the NVS partitions (chip: \
                 {}; images: {}); not flashed: its firmware would not find the data (flash the \
                 firmware with --firmware DIR)",
                show(&theirs),
                show(&ours)
            )));
        }
        return Ok(None);
    }
    for (addr, data, what) in segments {
        if let Some(problem) = misplaced(&chip_table, name, *addr, data.len(), what) {
            return Ok(Some(format!("{problem}; not flashed")));
        }
    }
    Ok(None)
}

/// A device's images go over blank flash, this very image, its own interrupted write, or the
/// package's development data; its key over blank flash or the same key. Anything else
/// (another production identity, foreign or damaged data, data encrypted with other keys,
/// other keys) is refused unless --force. Returns the regions that are replaced.
fn guard_device_images(
    args: &MfgFlashArgs,
    target: &Target,
    flasher: &mut espflash::flasher::Flasher,
    segments: &[(u32, Vec<u8>, String)],
    label: &str,
    mac: &str,
    ledger: &dyn Ledger,
) -> Result<Vec<(u32, u32)>, MfgFlashError> {
    let mut replaced = Vec::new();
    for (addr, data, name) in segments {
        let len = data.len() as u32;
        let dev = target.dev.get(name).filter(|_| name != "nvs_keys");
        let planned = GuardPlan {
            ours: data,
            dev: dev.and_then(|(image, _)| image.as_deref()),
            key: dev.and_then(|(_, p)| p.key.as_ref()),
            per_device: dev.map_or(&[][..], |(_, p)| p.per_device.as_slice()),
        };
        let (finding, chip) = inspect(flasher, *addr, &planned, !args.no_stub)?;
        let problem = match finding {
            Finding::Blank | Finding::Same => continue,
            _ if name == "nvs_keys" => format!(
                "the nvs_keys partition at {addr:#x} on MAC {mac} holds other keys (the chip's \
                 encrypted NVS data is readable only with them)"
            ),
            Finding::Interrupted { .. } => {
                eprintln!("{label}: finishing an interrupted write of `{name}` at {addr:#x}");
                replaced.push((*addr, len));
                continue;
            }
            Finding::DevData => {
                eprintln!("{label}: replacing the development data in `{name}` at {addr:#x}");
                replaced.push((*addr, len));
                continue;
            }
            other => {
                let holder = identify(ledger, &target.ledger_name, chip.as_deref(), Some(mac))
                    .unwrap_or_else(|| "an unknown production identity".to_owned());
                format!(
                    "`{name}` at {addr:#x} on MAC {mac} holds {holder}: {}",
                    why_kept(&for_factory(other))
                )
            }
        };
        if !args.force {
            return Err(MfgFlashError::Invalid(format!(
                "{problem}; not flashed (--force replaces it)"
            )));
        }
        eprintln!("{label}: warning: {problem}; replacing it (--force)");
        replaced.push((*addr, len));
    }
    Ok(replaced)
}

/// espflash's progress callbacks, told first which segments (address, bytes) the write holds,
/// in order: espflash counts blocks, the segment's length is what the user knows.
pub trait SegmentProgress: ProgressCallbacks {
    fn segments(&mut self, segments: &[(u32, usize)]);
}

/// One line per step and port (threads share stderr, so no bars), in bytes.
struct PortProgress {
    label: String,
    /// (address, bytes) of the segments still to come, in write order.
    pending: std::collections::VecDeque<(u32, usize)>,
    started: Option<std::time::Instant>,
}

impl PortProgress {
    fn new(label: String) -> PortProgress {
        PortProgress {
            label,
            pending: Default::default(),
            started: None,
        }
    }
}

impl SegmentProgress for PortProgress {
    fn segments(&mut self, segments: &[(u32, usize)]) {
        self.pending = segments.iter().copied().collect();
    }
}

impl ProgressCallbacks for PortProgress {
    fn init(&mut self, addr: u32, _blocks: usize) {
        // espflash counts blocks; the segment's length is what the user knows.
        let bytes = self
            .pending
            .iter()
            .find(|(a, _)| *a == addr)
            .map_or(0, |(_, len)| *len);
        self.started = Some(std::time::Instant::now());
        eprintln!("{}: writing {bytes} bytes at {addr:#x}", self.label);
    }

    fn update(&mut self, _current: usize) {}

    fn verifying(&mut self) {
        eprintln!("{}: verifying", self.label);
    }

    fn finish(&mut self, skipped: bool) {
        let (addr, bytes) = self.pending.pop_front().unwrap_or((0, 0));
        if let (false, Some(t)) = (skipped, self.started.take()) {
            eprintln!(
                "{}: {bytes} bytes at {addr:#x} written in {:.1} s ({})",
                self.label,
                t.elapsed().as_secs_f64(),
                crate::flashing::rate(bytes, t.elapsed())
            );
        }
    }
}
