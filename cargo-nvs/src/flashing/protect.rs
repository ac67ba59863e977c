//! The chip side of [`guard`](crate::guard): before a flash writes anything, look at what the
//! chip holds where each NVS partition, the nvs_keys and a changed partition table would go, and
//! decide what may be written. Used by `flash` (and its runner mode) and by `mfg flash`.

use std::collections::BTreeMap;
use std::path::Path;

use espflash::flasher::Flasher;
use md5::{Digest, Md5};
use nvs_build::format::encryption::XtsKey;
use nvs_build::manifest::ManifestImage;
use nvs_build::metadata::{EncryptionSpec, Metadata, PartitionSpec, ValueSource};
use nvs_build::table::{Partition, PartitionTable};

use crate::flashing::segments::{Planned, Role};
use crate::flashing::{
    ChipError, FlashingError, Progress, Session, blank_md5, inspect, read_flash, written,
};
use crate::guard::{
    self, Allow, Decision, Finding, Planned as GuardPlan, candidate_sha256s, decide, for_factory,
};
use crate::mfg::ledger::Ledger;
use crate::mfg::product_ledger;
use espflash::image_format::Segment;

/// Why a flash does not go ahead.
#[derive(Debug, thiserror::Error)]
pub enum ProtectError {
    /// Writing would destroy data the chip holds; each reason names the partition and the
    /// flag that allows it.
    #[error("{}; nothing was written", reasons.join("; "))]
    Refused { reasons: Vec<String> },
    /// The write itself failed (or its verification).
    #[error("flashing failed: {0}")]
    WriteFailed(#[source] espflash::Error),
    /// A segment ends beyond the chip's flash.
    #[error("{name} ends at {end:#x}, beyond the chip's {flash_size:#x} bytes of flash")]
    BeyondFlash {
        name: String,
        end: u64,
        flash_size: u32,
    },
    /// Erasing would destroy factory data the chip holds; each reason names the partition.
    #[error("{}; nothing was erased", reasons.join("; "))]
    RefusedErase { reasons: Vec<String> },
    #[error(transparent)]
    Chip(#[from] ChipError),
    #[error(transparent)]
    Flashing(#[from] FlashingError),
    /// A key or partition table the guard needs cannot be read.
    #[error(transparent)]
    Input(#[from] nvs_build::InputError),
}

/// What the guard needs to know of one NVS partition of the package.
pub struct DataPartition {
    /// `namespace::key` of its per-device keys (values from the chip too).
    pub per_device: Vec<String>,
    /// Decrypts it (and what the chip holds there).
    pub key: Option<XtsKey>,
}

impl DataPartition {
    /// What the metadata says of a partition (nothing, for one it does not describe).
    pub fn of(spec: Option<&PartitionSpec>) -> Result<DataPartition, ProtectError> {
        let per_device = per_device_keys(spec);
        let key = match spec.and_then(|s| s.encryption.as_ref()) {
            Some((EncryptionSpec::KeyFile(path), _)) => {
                Some(nvs_build::keys::load_key_file(path)?.key)
            }
            Some((EncryptionSpec::HmacKey(path), _)) => Some(nvs_build::keys::load_hmac_key(path)?),
            None => None,
        };
        Ok(DataPartition { per_device, key })
    }
}

/// `namespace::key` of the partition's keys that differ per device (`per-device`, or from the
/// chip): they make its data a device's identity.
fn per_device_keys(spec: Option<&PartitionSpec>) -> Vec<String> {
    let Some(spec) = spec else {
        return Vec::new();
    };
    spec.namespaces
        .iter()
        .flat_map(|ns| {
            ns.entries
                .iter()
                .filter(|e| {
                    matches!(
                        e.source,
                        ValueSource::PerDevice { .. } | ValueSource::Chip { .. }
                    )
                })
                .map(move |e| format!("{}::{}", ns.name, e.key))
        })
        .collect()
}

/// The package's NVS partitions by offset: per-device keys and key.
pub fn data_partitions(
    metadata: &Metadata,
    images: &[ManifestImage],
) -> Result<BTreeMap<u32, DataPartition>, ProtectError> {
    images
        .iter()
        .map(|image| {
            let spec = metadata.partitions.iter().find(|p| p.name == image.name);
            Ok((image.offset, DataPartition::of(spec)?))
        })
        .collect()
}

/// ``device `ID` (found by … in the ledger `NAME`)``: the device whose recorded image is what
/// the chip holds (`chip`), else the one last flashed onto the chip's MAC.
pub fn identify(
    ledger: &dyn Ledger,
    ledger_name: &str,
    chip: Option<&[u8]>,
    mac: Option<&str>,
) -> Option<String> {
    let by_sha = chip
        .into_iter()
        .flat_map(candidate_sha256s)
        .find_map(|sha| ledger.device_with_sha256(&sha).ok().flatten());
    let (device, how) = match by_sha {
        Some(device) => (device, "its SHA-256"),
        None => (ledger.device_on_mac(mac?).ok()??, "the chip's MAC"),
    };
    Some(format!(
        "device `{device}` (found by {how} in the ledger `{ledger_name}`)"
    ))
}

/// Names the device a partition belongs to, from the product's ledger (opened read-only: a
/// development flash never changes it).
pub struct Identities {
    /// The package whose product ledger names devices: found and opened (read-only, with how
    /// messages name it) the first time a name is needed, so that a development flash that
    /// keeps nothing never reads its settings or touches the ledger.
    manifest_path: std::path::PathBuf,
    ledger: std::sync::OnceLock<Option<(String, Box<dyn Ledger>)>>,
    mac: Option<String>,
}

impl Identities {
    pub fn new(manifest_path: &Path, mac: Option<String>) -> Identities {
        Identities {
            manifest_path: manifest_path.to_owned(),
            ledger: std::sync::OnceLock::new(),
            mac,
        }
    }

    /// Names the device, when the ledger knows the partition's contents or the chip.
    pub fn name(&self, chip: Option<&[u8]>) -> Option<String> {
        let (shown, ledger) = self
            .ledger
            .get_or_init(|| {
                let chosen = product_ledger(&self.manifest_path).ok()?;
                let ledger = chosen.open_read_only().ok().flatten()?;
                Some((chosen.shown(), ledger))
            })
            .as_ref()?;
        identify(&**ledger, shown, chip, self.mac.as_deref())
    }
}

/// What the guard decided for a flash.
#[derive(Debug, Default)]
pub struct Guarded {
    /// Segments (by address) to leave out: the chip keeps what it holds there.
    pub kept: Vec<u32>,
    /// Regions to erase before writing (over data that is replaced), so that a write cut off
    /// later leaves the start of our image and erased flash, which the next flash finishes.
    pub erase_first: Vec<(u32, u32)>,
}

impl Guarded {
    /// Leaves the kept segments out; with the stub, erases what is replaced first (the ROM
    /// loader erases a whole segment before writing it anyway; the stub may not).
    pub fn apply(
        &self,
        flasher: &mut Flasher,
        segments: &mut Vec<Planned>,
        use_stub: bool,
    ) -> Result<(), ProtectError> {
        segments.retain(|s| !self.kept.contains(&s.addr));
        if use_stub {
            for &(addr, len) in &self.erase_first {
                flasher
                    .erase_region(addr, len)
                    .map_err(ChipError::doing(format!("erase flash at {addr:#x}")))?;
            }
        }
        Ok(())
    }
}

/// Decides, for every NVS partition and the nvs_keys about to be written, from what the chip
/// holds there, whether writing it is safe (see `guard`); says what is kept and why. Refuses
/// (before anything is written) when a partition needs the user's decision.
pub fn guard_segments(
    flasher: &mut Flasher,
    segments: &[Planned],
    data: &BTreeMap<u32, DataPartition>,
    allow: Allow,
    identities: &Identities,
    use_stub: bool,
) -> Result<Guarded, ProtectError> {
    let mut guarded = Guarded::default();
    let mut refusals = Vec::new();
    // Written only because --reset-user-data said so, and left as the chip holds them.
    let (mut by_flag, mut unchanged) = (Vec::new(), Vec::new());
    for segment in segments {
        let flagged_role = match segment.role {
            Role::FactoryData => guard::Role::Factory,
            Role::UserData => guard::Role::UserData,
            _ => continue,
        };
        let Some(partition) = data.get(&segment.addr) else {
            continue;
        };
        // Per-device keys make a partition factory data, flagged or not: mass production puts
        // identities there.
        let role = if partition.per_device.is_empty() {
            flagged_role
        } else {
            guard::Role::Factory
        };
        let planned = GuardPlan {
            ours: &segment.data,
            // A development flash: our image holds the dev values.
            dev: Some(&segment.data),
            key: partition.key.as_ref(),
            per_device: &partition.per_device,
        };
        let (mut finding, chip) = inspect(flasher, segment.addr, &planned, use_stub)?;
        if role == guard::Role::Factory {
            finding = for_factory(finding);
        }
        let identity = match &finding {
            Finding::Blank | Finding::Same | Finding::Interrupted { .. } | Finding::DevData => None,
            _ if role == guard::Role::Factory => identities.name(chip.as_deref()),
            _ => None,
        };
        let label = format!("{} at {:#x}", segment.name, segment.addr);
        match decide(role, &finding, allow, &label, identity.as_deref()) {
            Decision::Write(message) => {
                if let Some(message) = message {
                    eprintln!("{message}");
                }
                match finding {
                    Finding::Same => unchanged.push(segment.addr),
                    Finding::Blank => {}
                    _ => {
                        guarded
                            .erase_first
                            .push((segment.addr, segment.data.len() as u32));
                        if role == guard::Role::UserData && allow.reset_user_data {
                            by_flag.push(segment.addr);
                        }
                    }
                }
            }
            Decision::Keep(message) => {
                eprintln!("{message}");
                guarded.kept.push(segment.addr);
            }
            Decision::Refuse(message) => refusals.push(message),
        }
    }
    if !refusals.is_empty() {
        return Err(ProtectError::Refused { reasons: refusals });
    }
    let Some(keys) = segments.iter().find(|s| s.role == Role::NvsKeys) else {
        return Ok(guarded);
    };
    // The chip's nvs_keys are what its encrypted NVS data (any partition, also ones this
    // package does not encrypt, and keys the device made itself) is readable with.
    let on_chip = flasher
        .checksum_md5(keys.addr, keys.data.len() as u32)
        .map_err(ChipError::doing(format!(
            "check nvs_keys at {:#x}",
            keys.addr
        )))?;
    let ours = u128::from_be_bytes(Md5::digest(&keys.data).into());
    if on_chip == ours || on_chip == blank_md5(keys.data.len() as u32) {
        return Ok(guarded);
    }
    if allow.overwrite_factory_data {
        eprintln!(
            "Replacing the chip's nvs_keys at {:#x} (--overwrite-factory-data): NVS data encrypted \
             with the old keys becomes unreadable",
            keys.addr
        );
        return Ok(guarded);
    }
    eprintln!(
        "Keeping the chip's nvs_keys at {:#x}: they differ from this package's, and the device's \
         encrypted NVS data is readable only with them (--overwrite-factory-data replaces them)",
        keys.addr
    );
    guarded.kept.push(keys.addr);
    for segment in segments.iter().filter(|s| s.keyed) {
        if guarded.kept.contains(&segment.addr) || unchanged.contains(&segment.addr) {
            continue;
        }
        if by_flag.contains(&segment.addr) {
            refusals.push(format!(
                "--reset-user-data cannot replace {} at {:#x}: its image is encrypted with this \
                 package's nvs_keys, which the chip does not have (add --overwrite-factory-data \
                 to replace the keys too)",
                segment.name, segment.addr
            ));
            continue;
        }
        eprintln!(
            "Not writing {} at {:#x}: its image is encrypted with this package's nvs_keys, which \
             the chip does not have",
            segment.name, segment.addr
        );
        guarded.kept.push(segment.addr);
        guarded
            .erase_first
            .retain(|&(addr, _)| addr != segment.addr);
    }
    if !refusals.is_empty() {
        return Err(ProtectError::Refused { reasons: refusals });
    }
    Ok(guarded)
}

/// When the flash replaces the chip's partition table with a different one, the bootloader,
/// table and app segments may land on NVS data the old table placed elsewhere (a grown app
/// over a moved `fctry`). Refuses, before anything is written, when a segment would overwrite
/// a non-blank data/nvs or nvs_keys partition of the chip's table that the new table does not
/// have at the same place; warns about such partitions that stay where the new firmware will
/// not look. `flags` names the options that allow it (factory data, user data), as the
/// command spells them.
pub fn guard_table_change(
    flasher: &mut Flasher,
    segments: &[Planned],
    allow: Allow,
    flags: (&str, &str),
    use_stub: bool,
) -> Result<(), ProtectError> {
    let Some(table) = segments.iter().find(|s| s.role == Role::PartitionTable) else {
        return Ok(());
    };
    let new_table = PartitionTable::parse_binary(Path::new("the partition table"), &table.data)?;
    let len = table.data.len() as u32;
    let on_chip = flasher
        .checksum_md5(table.addr, len)
        .map_err(ChipError::doing("check the partition table".into()))?;
    if on_chip == u128::from_be_bytes(Md5::digest(&table.data).into()) || on_chip == blank_md5(len)
    {
        return Ok(());
    }
    let bytes = read_flash(flasher, table.addr, len, use_stub)?;
    let Ok(old) = PartitionTable::parse_binary(Path::new("the chip's partition table"), &bytes)
    else {
        eprintln!(
            "note: the chip holds no valid partition table at {:#x}; it gets this one",
            table.addr
        );
        return Ok(());
    };
    let mut refusals = Vec::new();
    for partition in old
        .partitions
        .iter()
        .filter(|p| p.is_nvs() || p.is_nvs_keys())
    {
        let same_place = new_table.partitions.iter().any(|p| {
            (p.offset, p.size, p.kind, p.subtype)
                == (
                    partition.offset,
                    partition.size,
                    partition.kind,
                    partition.subtype,
                )
        });
        if same_place {
            continue;
        }
        let (start, end) = (u64::from(partition.offset), partition.end());
        let over: Vec<&str> = segments
            .iter()
            .filter(|s| u64::from(s.addr) < end && u64::from(s.addr) + s.data.len() as u64 > start)
            .map(|s| s.name.as_str())
            .collect();
        let blank = flasher
            .checksum_md5(partition.offset, partition.size)
            .map_err(ChipError::doing(format!("check `{}`", partition.name)))?
            == blank_md5(partition.size);
        if blank {
            continue;
        }
        let factory = partition.readonly || partition.is_nvs_keys();
        let what = if factory { "factory data" } else { "user data" };
        if over.is_empty() {
            eprintln!(
                "warning: the chip's partition table has {what} `{}` at {:#x} ({:#x} bytes), \
                 which the new table does not have there: it stays on the chip, where the new \
                 firmware will not look",
                partition.name, partition.offset, partition.size
            );
            continue;
        }
        let allowed = if factory {
            allow.overwrite_factory_data
        } else {
            allow.reset_user_data
        };
        let message = format!(
            "the chip's partition table differs from the one being flashed: its {what} partition \
             `{}` at {:#x} ({:#x} bytes) holds data that {} would overwrite",
            partition.name,
            partition.offset,
            partition.size,
            over.join(", ")
        );
        if allowed {
            eprintln!("warning: {message} (allowed by a flag)");
        } else {
            refusals.push(format!(
                "{message}. Save it first (`cargo nvs read`), or pass {} to overwrite it",
                if factory { flags.0 } else { flags.1 }
            ));
        }
    }
    if refusals.is_empty() {
        Ok(())
    } else {
        Err(ProtectError::Refused { reasons: refusals })
    }
}

/// Factory data: flagged `readonly` in the table, an nvs_keys partition, or (in a package)
/// `factory` or with per-device keys in the metadata.
pub fn is_factory(
    partition: &Partition,
    metadata: Option<&Metadata>,
) -> Result<bool, ProtectError> {
    if partition.readonly || partition.is_nvs_keys() {
        return Ok(true);
    }
    let spec = metadata.and_then(|m| m.partitions.iter().find(|p| p.name == partition.name));
    // (Its keys are not read: what is factory data does not depend on them.)
    Ok(spec.is_some_and(|s| s.factory) || !per_device_keys(spec).is_empty())
}

/// Refuses (before anything is erased) when a region to erase covers factory data that is
/// not blank, unless `--overwrite-factory-data`. `mac`: the chip's, to name the identity it
/// holds.
pub fn guard_erase(
    flasher: &mut Flasher,
    table: &PartitionTable,
    metadata: Option<&Metadata>,
    regions: &[(u32, u32)],
    allow: Allow,
    use_stub: bool,
    mac: Option<String>,
) -> Result<(), ProtectError> {
    let mut refusals = Vec::new();
    let identities = metadata.map(|m| Identities::new(&m.manifest_path, mac));
    for partition in table
        .partitions
        .iter()
        .filter(|p| p.is_nvs() || p.is_nvs_keys())
    {
        let overlaps = regions.iter().any(|&(addr, size)| {
            u64::from(addr) < partition.end()
                && u64::from(addr) + u64::from(size) > u64::from(partition.offset)
        });
        if !overlaps || !is_factory(partition, metadata)? {
            continue;
        }
        let on_chip = flasher
            .checksum_md5(partition.offset, partition.size)
            .map_err(ChipError::doing(format!("check `{}`", partition.name)))?;
        if on_chip == blank_md5(partition.size) {
            continue;
        }
        let label = format!(
            "factory data `{}` at {:#x}",
            partition.name, partition.offset
        );
        let finding = if partition.is_nvs_keys() {
            Finding::Differs
        } else {
            let spec =
                metadata.and_then(|m| m.partitions.iter().find(|p| p.name == partition.name));
            let data = DataPartition::of(spec)?;
            let chip = read_flash(flasher, partition.offset, partition.size, use_stub)?;
            let blank = vec![0xFF; partition.size as usize];
            let planned = GuardPlan {
                ours: &blank,
                dev: None,
                key: data.key.as_ref(),
                per_device: &data.per_device,
            };
            let finding = for_factory(guard::assess(&planned, &chip));
            if let Some(name) = identities.as_ref().and_then(|i| i.name(Some(&chip))) {
                eprintln!("note: {label} holds {name}");
            }
            finding
        };
        match guard::decide(guard::Role::Factory, &finding, allow, &label, None) {
            Decision::Write(message) => {
                eprintln!(
                    "{}",
                    message.unwrap_or_default().replace("Replacing", "Erasing")
                );
            }
            Decision::Keep(_) | Decision::Refuse(_) => refusals.push(format!(
                "{label} is not blank: {}. Save it first (`cargo nvs read --partition {}`), or \
                 pass --overwrite-factory-data to erase it",
                guard::why_kept(&finding),
                partition.name
            )),
        }
    }
    if refusals.is_empty() {
        Ok(())
    } else {
        Err(ProtectError::RefusedErase { reasons: refusals })
    }
}
/// What [`write_guarded`] did.
#[derive(Debug)]
pub struct Written {
    /// Segments written, and those the chip held already (skipped by MD5).
    pub written: usize,
    pub skipped: usize,
    /// Segments (by address) left out: the chip keeps what it holds there.
    pub kept: Vec<u32>,
}

/// `cargo nvs flash`'s write: refuses segments beyond the chip's flash and a table change that
/// would overwrite NVS data it moves, guards every NVS segment against what the chip holds
/// ([`guard_segments`]), and writes what may be written in one `write_bins_to_flash`.
pub fn write_guarded(
    flasher: &mut Session,
    mut segments: Vec<Planned>,
    data: &BTreeMap<u32, DataPartition>,
    allow: Allow,
    identities: &Identities,
    flash_size: u32,
    use_stub: bool,
) -> Result<Written, ProtectError> {
    if let Some(s) = segments
        .iter()
        .find(|s| u64::from(s.addr) + s.data.len() as u64 > u64::from(flash_size))
    {
        return Err(ProtectError::BeyondFlash {
            name: s.name.clone(),
            end: u64::from(s.addr) + s.data.len() as u64,
            flash_size,
        });
    }
    guard_table_change(
        flasher,
        &segments,
        allow,
        ("--overwrite-factory-data", "--reset-user-data"),
        use_stub,
    )?;
    let guarded = guard_segments(flasher, &segments, data, allow, identities, use_stub)?;
    guarded.apply(flasher, &mut segments, use_stub)?;
    let list: Vec<(u32, usize, String)> = segments
        .iter()
        .map(|s| (s.addr, s.data.len(), s.name.clone()))
        .collect();
    let espflash_segments: Vec<Segment<'_>> = segments
        .iter()
        .map(|s| Segment::new(s.addr, &s.data))
        .collect();
    let mut progress = Progress::new(&list);
    written(flasher.write_bins_to_flash(&espflash_segments, &mut progress))
        .map_err(ProtectError::WriteFailed)?;
    flasher.ended();
    Ok(Written {
        written: progress.written,
        skipped: progress.skipped,
        kept: guarded.kept,
    })
}
