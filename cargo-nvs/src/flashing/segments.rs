//! What goes where in flash: the app's segments as espflash builds them (checked against the
//! NVS partitions nvs-build placed), the NVS images and nvs_keys file to write with them, each
//! with its [`Role`], and the NVS partitions of a partition table.

use std::path::{Path, PathBuf};

use espflash::flasher::{FlashData, FlashFrequency, FlashMode, FlashSettings, FlashSize};
use espflash::image_format::idf::IdfBootloaderFormat;
use espflash::target::{Chip, XtalFrequency};
use nvs_build::manifest::ManifestImage;
use nvs_build::table::PartitionTable;

use crate::fsutil::FileError;
use crate::settings::SettingsError;

/// Why the segments to flash cannot be put together.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    /// The inputs disagree or are not usable (the message says which, and what to do).
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    File(#[from] FileError),
    #[error(transparent)]
    Settings(#[from] SettingsError),
    /// espflash cannot make the app image of the ELF.
    #[error("cannot make an {chip} image of `{}`: {source}", elf.display())]
    AppImage {
        chip: Chip,
        elf: PathBuf,
        #[source]
        source: espflash::Error,
    },
    /// The partition table in flash is not one.
    #[error(
        "{source} (give --partition-table-offset if the table is elsewhere, or --partition-table FILE)"
    )]
    TableInFlash {
        #[source]
        source: nvs_build::InputError,
    },
}

/// A value of an espflash option that is not one.
#[derive(Debug, thiserror::Error)]
#[error("unknown {what} `{text}` ({choices})")]
pub struct UnknownValue {
    what: &'static str,
    text: String,
    choices: &'static str,
}

/// Image options users know from espflash.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ImageArgs {
    /// Second-stage bootloader [default: espflash's for the chip].
    #[arg(long, value_name = "FILE")]
    pub bootloader: Option<PathBuf>,
    /// Partition table (CSV or binary) [default: the one of `[package.metadata.nvs]`].
    #[arg(long, value_name = "FILE")]
    pub partition_table: Option<PathBuf>,
    /// Flash mode (qio, qout, dio, dout).
    #[arg(long, value_name = "MODE", value_parser = parse_flash_mode)]
    pub flash_mode: Option<FlashMode>,
    /// Flash size (1MB, 2MB, 4MB, …).
    #[arg(long, value_name = "SIZE", value_parser = parse_flash_size)]
    pub flash_size: Option<FlashSize>,
    /// Flash frequency (40MHz, 80MHz, …).
    #[arg(long, value_name = "FREQ", value_parser = parse_flash_freq)]
    pub flash_freq: Option<FlashFrequency>,
}

impl ImageArgs {
    /// Fills what the command line left open from espflash.toml (`[flash]` mode, size,
    /// frequency; `[idf]` bootloader and partition table), as espflash does.
    pub fn with_espflash_settings(mut self) -> Result<ImageArgs, SegmentError> {
        let settings = crate::settings::load()?;
        let bad = |what: &str, e: UnknownValue| {
            SegmentError::Invalid(format!("espflash.toml: {what}: {e}"))
        };
        if self.flash_mode.is_none()
            && let Some(mode) = &settings.flash_mode
        {
            self.flash_mode = Some(parse_flash_mode(mode).map_err(|e| bad("[flash] mode", e))?);
        }
        if self.flash_size.is_none()
            && let Some(size) = &settings.flash_size
        {
            self.flash_size = Some(parse_flash_size(size).map_err(|e| bad("[flash] size", e))?);
        }
        if self.flash_freq.is_none()
            && let Some(freq) = &settings.flash_frequency
        {
            self.flash_freq =
                Some(parse_flash_freq(freq).map_err(|e| bad("[flash] frequency", e))?);
        }
        if self.bootloader.is_none() {
            self.bootloader = settings.bootloader;
        }
        if self.partition_table.is_none() {
            self.partition_table = settings.partition_table;
        }
        Ok(self)
    }
}

fn parse_flash_mode(text: &str) -> Result<FlashMode, UnknownValue> {
    match text.to_lowercase().as_str() {
        "qio" => Ok(FlashMode::Qio),
        "qout" => Ok(FlashMode::Qout),
        "dio" => Ok(FlashMode::Dio),
        "dout" => Ok(FlashMode::Dout),
        _ => Err(UnknownValue {
            what: "flash mode",
            text: text.to_owned(),
            choices: "qio, qout, dio, dout",
        }),
    }
}

fn parse_flash_size(text: &str) -> Result<FlashSize, UnknownValue> {
    Ok(match text.to_uppercase().trim_end_matches('B') {
        "256K" => FlashSize::_256Kb,
        "512K" => FlashSize::_512Kb,
        "1M" => FlashSize::_1Mb,
        "2M" => FlashSize::_2Mb,
        "4M" => FlashSize::_4Mb,
        "8M" => FlashSize::_8Mb,
        "16M" => FlashSize::_16Mb,
        "32M" => FlashSize::_32Mb,
        "64M" => FlashSize::_64Mb,
        "128M" => FlashSize::_128Mb,
        "256M" => FlashSize::_256Mb,
        _ => {
            return Err(UnknownValue {
                what: "flash size",
                text: text.to_owned(),
                choices: "1MB, 2MB, 4MB, 8MB, 16MB, …",
            });
        }
    })
}

fn parse_flash_freq(text: &str) -> Result<FlashFrequency, UnknownValue> {
    let mhz = text.to_lowercase();
    Ok(match mhz.trim_end_matches("mhz").trim_end_matches('m') {
        "12" => FlashFrequency::_12Mhz,
        "15" => FlashFrequency::_15Mhz,
        "16" => FlashFrequency::_16Mhz,
        "20" => FlashFrequency::_20Mhz,
        "24" => FlashFrequency::_24Mhz,
        "26" => FlashFrequency::_26Mhz,
        "30" => FlashFrequency::_30Mhz,
        "40" => FlashFrequency::_40Mhz,
        "48" => FlashFrequency::_48Mhz,
        "60" => FlashFrequency::_60Mhz,
        "80" => FlashFrequency::_80Mhz,
        _ => {
            return Err(UnknownValue {
                what: "flash frequency",
                text: text.to_owned(),
                choices: "20MHz, 26MHz, 40MHz, 80MHz, …",
            });
        }
    })
}

/// What a piece of flash is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Bootloader,
    PartitionTable,
    App,
    /// An NVS partition of factory data (read-only on the device).
    FactoryData,
    /// An NVS partition of user data: written only to blank flash, unless asked.
    UserData,
    /// The nvs_keys file, for the table's data/nvs_keys partition.
    NvsKeys,
}

impl Role {
    /// The name `dist`'s manifest.json gives it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Bootloader => "bootloader",
            Role::PartitionTable => "partition-table",
            Role::App => "app",
            Role::FactoryData => "factory-data",
            Role::UserData => "user-data",
            Role::NvsKeys => "nvs-keys",
        }
    }

    /// Data a device in the field already holds and cannot get back once overwritten: its
    /// factory data, its user data, and the keys its encrypted NVS data is readable with.
    pub fn is_device_data(self) -> bool {
        matches!(self, Role::FactoryData | Role::UserData | Role::NvsKeys)
    }
}

/// One piece of flash to write, with what it is.
pub struct Planned {
    pub name: String,
    pub addr: u32,
    pub data: Vec<u8>,
    pub role: Role,
    /// May hold secret values: an NVS image with env or per-device keys, or the nvs_keys file.
    pub secret: bool,
    /// Encrypted with the nvs_keys file (flash-encryption scheme).
    pub keyed: bool,
}

/// The app image (bootloader, partition table, app) as espflash builds it, checked against
/// the NVS partitions nvs-build placed: both must read the same table.
pub fn app_segments(
    elf: &Path,
    chip: Chip,
    xtal: XtalFrequency,
    image: &ImageArgs,
    table: Option<&Path>,
    nvs: &[ManifestImage],
    keys_partition: Option<(u32, u32)>,
) -> Result<Vec<Planned>, SegmentError> {
    let elf_data = std::fs::read(elf).map_err(|e| FileError::new("read the ELF", elf, e))?;
    let settings = FlashSettings::new(image.flash_mode, image.flash_size, image.flash_freq);
    let flash_data = FlashData::new(settings, 0, None, chip, xtal);
    let table_path = image.partition_table.as_deref().or(table);
    let format = IdfBootloaderFormat::new(
        &elf_data,
        &flash_data,
        table_path,
        image.bootloader.as_deref(),
        None,
        None,
    )
    .map_err(|source| SegmentError::AppImage {
        chip,
        elf: elf.to_owned(),
        source,
    })?;
    check_tables(&format.partition_table(), nvs, keys_partition, table_path)?;
    let names = [
        ("bootloader", Role::Bootloader),
        ("partition table", Role::PartitionTable),
        ("app", Role::App),
    ];
    Ok(format
        .flash_segments()
        .enumerate()
        .map(|(i, segment)| {
            let (name, role) = names.get(i).map_or_else(
                || (format!("segment {i}"), Role::App),
                |(n, r)| ((*n).to_owned(), *r),
            );
            Planned {
                name,
                addr: segment.addr,
                data: segment.data.into_owned(),
                role,
                secret: false,
                keyed: false,
            }
        })
        .collect())
}

/// nvs-build's table parser places the NVS images; espflash flashes its own reading of the
/// table. Refuse to flash if they disagree.
fn check_tables(
    espflash_table: &esp_idf_part::PartitionTable,
    nvs: &[ManifestImage],
    keys_partition: Option<(u32, u32)>,
    path: Option<&Path>,
) -> Result<(), SegmentError> {
    let table_name = path.map_or("the default partition table".to_owned(), |p| {
        format!("`{}`", p.display())
    });
    for image in nvs {
        let Some(part) = espflash_table.find(&image.name) else {
            return Err(SegmentError::Invalid(format!(
                "NVS partition `{}` is not in the partition table espflash flashes ({table_name}); \
                 use the same table for the metadata and --partition-table",
                image.name
            )));
        };
        if (part.offset(), part.size()) != (image.offset, image.size) {
            return Err(SegmentError::Invalid(format!(
                "partition `{}`: the NVS image was made for offset {:#x}, size {:#x}, but the table espflash flashes \
                 ({table_name}) says offset {:#x}, size {:#x}; use the same table for both",
                image.name,
                image.offset,
                image.size,
                part.offset(),
                part.size()
            )));
        }
    }
    if let Some((offset, size)) =
        keys_partition.filter(|_| nvs.iter().any(|i| i.keys_file.is_some()))
    {
        let found = espflash_table.partitions().iter().any(|p| {
            (p.offset(), p.size()) == (offset, size)
                && p.subtype() == esp_idf_part::SubType::Data(esp_idf_part::DataType::NvsKeys)
        });
        if !found {
            return Err(SegmentError::Invalid(format!(
                "the table espflash flashes ({table_name}) has no data/nvs_keys partition at {offset:#x} (size {size:#x}), \
                 where the metadata's table puts the NVS keys; use the same table for both"
            )));
        }
    }
    Ok(())
}

/// The NVS images to write, each padded with 0xFF to its whole partition (so a smaller image
/// leaves no stale data behind), plus the nvs_keys file where the flash-encryption scheme is
/// used.
pub fn nvs_segments(
    images: &[ManifestImage],
    only: &[String],
    keys_partition: Option<(u32, u32)>,
) -> Result<Vec<Planned>, SegmentError> {
    for name in only {
        if !images.iter().any(|i| &i.name == name) {
            return Err(SegmentError::Invalid(format!(
                "--partition {name}: the package has no NVS partition of that name (it has: {})",
                images
                    .iter()
                    .map(|i| i.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }
    let mut planned = Vec::new();
    let mut keys_file: Option<&Path> = None;
    for image in images
        .iter()
        .filter(|i| only.is_empty() || only.contains(&i.name))
    {
        let Some(file) = &image.file else {
            let reason = image.skipped.as_deref().unwrap_or("skipped");
            if only.contains(&image.name) {
                return Err(SegmentError::Invalid(format!(
                    "partition `{}` has no image to flash: {reason}",
                    image.name
                )));
            }
            eprintln!(
                "warning: partition `{}` has no image ({reason}); not flashed",
                image.name
            );
            continue;
        };
        let mut data = std::fs::read(file).map_err(FileError::reading(file))?;
        if data.len() > image.size as usize {
            return Err(SegmentError::Invalid(format!(
                "the image of `{}` is {} bytes, larger than its partition ({:#x})",
                image.name,
                data.len(),
                image.size
            )));
        }
        data.resize(image.size as usize, 0xFF);
        planned.push(Planned {
            name: format!("nvs `{}`", image.name),
            addr: image.offset,
            data,
            role: if image.factory {
                Role::FactoryData
            } else {
                Role::UserData
            },
            secret: image.secret,
            keyed: image.keys_file.is_some(),
        });
        if let Some(keys) = &image.keys_file {
            match keys_file {
                Some(other) if other != keys.as_path() => {
                    return Err(SegmentError::Invalid(format!(
                        "NVS partitions use different key files (`{}`, `{}`), but the chip has one nvs_keys partition",
                        other.display(),
                        keys.display()
                    )));
                }
                _ => keys_file = Some(keys),
            }
        }
    }
    if let Some(keys) = keys_file {
        let Some((offset, size)) = keys_partition else {
            return Err(SegmentError::Invalid(
                "an NVS partition is encrypted with an nvs_keys file, but the partition table has no data/nvs_keys partition".into(),
            ));
        };
        let data = std::fs::read(keys).map_err(FileError::reading(keys))?;
        if data.len() > size as usize {
            return Err(SegmentError::Invalid(format!(
                "`{}` is larger than the nvs_keys partition",
                keys.display()
            )));
        }
        planned.push(Planned {
            name: "nvs_keys".to_owned(),
            addr: offset,
            data,
            // Checked against kept encrypted user data before writing (see `run`).
            role: Role::NvsKeys,
            secret: true,
            keyed: false,
        });
    }
    Ok(planned)
}

/// A binary partition table found in flash (a device's, or a full-flash image's) at `offset`.
pub fn table_in_flash(
    bytes: &[u8],
    offset: u32,
    source: &str,
) -> Result<PartitionTable, SegmentError> {
    let name = format!("{source}'s partition table at {offset:#x}");
    if bytes.iter().all(|&b| b == 0xFF) {
        return Err(SegmentError::Invalid(format!(
            "{source} holds no partition table at {offset:#x} (the flash there is erased): give \
             --partition-table-offset if the table is elsewhere, or --partition-table FILE"
        )));
    }
    PartitionTable::parse_binary_at(Path::new(&name), bytes, offset)
        .map_err(|source| SegmentError::TableInFlash { source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(
        dir: &Path,
        name: &str,
        offset: u32,
        size: u32,
        len: usize,
        keys: Option<&str>,
    ) -> ManifestImage {
        let file = dir.join(format!("{name}.bin"));
        std::fs::write(&file, vec![0xAB; len]).unwrap();
        ManifestImage {
            name: name.to_owned(),
            offset,
            size,
            factory: name == "fctry",
            encrypted: false,
            secret: false,
            file: Some(file),
            keys_file: keys.map(|k| dir.join(k)),
            skipped: None,
        }
    }

    fn scratch(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("cargo-nvs-flash-unit-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("keys.bin"), vec![0x11; 4096]).unwrap();
        std::fs::write(dir.join("other.bin"), vec![0x22; 4096]).unwrap();
        dir
    }

    #[test]
    fn nvs_images_are_padded_and_keys_go_to_nvs_keys() {
        let dir = scratch("keys");
        let images = [
            image(&dir, "fctry", 0xf000, 0x2000, 0x1000, Some("keys.bin")),
            image(&dir, "nvs", 0x9000, 0x6000, 0x6000, None),
        ];
        let planned = nvs_segments(&images, &[], Some((0x11000, 0x1000))).unwrap();
        let fctry = planned.iter().find(|p| p.addr == 0xf000).unwrap();
        assert_eq!(fctry.data.len(), 0x2000);
        assert!(fctry.data[0x1000..].iter().all(|&b| b == 0xFF));
        assert_eq!(fctry.role, Role::FactoryData);
        let nvs = planned.iter().find(|p| p.addr == 0x9000).unwrap();
        assert_eq!(nvs.role, Role::UserData);
        let keys = planned.iter().find(|p| p.role == Role::NvsKeys).unwrap();
        assert_eq!((keys.addr, keys.data.len()), (0x11000, 4096));

        let only = nvs_segments(&images, &["nvs".to_owned()], Some((0x11000, 0x1000))).unwrap();
        assert_eq!(only.len(), 1);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn refusals() {
        let dir = scratch("refuse");
        let keyed = [image(
            &dir,
            "fctry",
            0xf000,
            0x2000,
            0x1000,
            Some("keys.bin"),
        )];
        let e = nvs_segments(&keyed, &[], None).err().unwrap().to_string();
        assert!(e.contains("no data/nvs_keys partition"), "{e}");

        let two_keys = [
            image(&dir, "fctry", 0xf000, 0x2000, 0x1000, Some("keys.bin")),
            image(&dir, "nvs", 0x9000, 0x6000, 0x1000, Some("other.bin")),
        ];
        let e = nvs_segments(&two_keys, &[], Some((0x11000, 0x1000)))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("different key files"), "{e}");

        let too_big = [image(&dir, "nvs", 0x9000, 0x3000, 0x4000, None)];
        let e = nvs_segments(&too_big, &[], None).err().unwrap().to_string();
        assert!(e.contains("larger than its partition"), "{e}");

        let e = nvs_segments(&too_big, &["nope".to_owned()], None)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("no NVS partition of that name"), "{e}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
