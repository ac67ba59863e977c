//! A `cargo nvs dist` folder as the firmware of a production flash (`mfg flash --firmware
//! DIR`): its bootloader, partition table and app, each checked against the SHA-256 that
//! manifest.json records, and the firmware's own SHA-256, which the production log records
//! with every device.

use std::path::{Path, PathBuf};

use nvs_build::table::PartitionTable;

use crate::flashing::segments::{Planned, Role};
use crate::fsutil::FileError;
use crate::hex::hex;

/// Why a dist folder cannot be used as firmware.
#[derive(Debug, thiserror::Error)]
pub enum FirmwareError {
    /// Not a folder `cargo nvs dist` wrote, or one it wrote differently (the message says what
    /// is missing).
    #[error("`{}` is not a `cargo nvs dist` folder: {why}", dir.display())]
    NotDist { dir: PathBuf, why: String },
    /// A file differs from what manifest.json recorded: the folder changed after `dist`.
    #[error(
        "`{}` does not match its SHA-256 in manifest.json: the folder was changed after `cargo \
         nvs dist`; make it again (nothing was written)",
        file.display()
    )]
    Changed { file: PathBuf },
    /// A device image that goes where the firmware's table has no partition for it.
    #[error("{0}")]
    Misplaced(String),
    #[error(transparent)]
    File(#[from] FileError),
    /// The partition table in the folder is not one.
    #[error(transparent)]
    Table(#[from] nvs_build::InputError),
}

/// The firmware of a dist folder.
pub struct Firmware {
    pub dir: PathBuf,
    /// The chip dist built for (`esp32c3`, …).
    pub chip: String,
    /// [`firmware_sha256`] of the bootloader, table and app.
    pub sha256: String,
    /// Bootloader, partition table and app (in manifest order), then the user-data images dist
    /// wrote with `--with-dev-data` (role [`Role::UserData`]: for blank flash only).
    pub segments: Vec<Planned>,
    /// The partition table the firmware writes.
    pub table: PartitionTable,
}

/// The SHA-256 that names a firmware: over each segment of the bootloader, partition table and
/// app in flash order, its offset and length (each 4 bytes, little-endian) and its bytes.
pub fn firmware_sha256<'a>(segments: impl IntoIterator<Item = (u32, &'a [u8])>) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for (offset, data) in segments {
        hasher.update(offset.to_le_bytes());
        hasher.update((data.len() as u32).to_le_bytes());
        hasher.update(data);
    }
    hex(&hasher.finalize())
}

impl Firmware {
    /// Reads `dir/manifest.json` and the files it lists; every file must have the SHA-256 the
    /// manifest recorded.
    pub fn load(dir: &Path) -> Result<Firmware, FirmwareError> {
        let not_dist = |why: &str| FirmwareError::NotDist {
            dir: dir.to_owned(),
            why: why.to_owned(),
        };
        let manifest = dir.join("manifest.json");
        let text = std::fs::read(&manifest).map_err(FileError::reading(&manifest))?;
        let doc: serde_json::Value = serde_json::from_slice(&text)
            .map_err(|e| not_dist(&format!("manifest.json is not JSON ({e})")))?;
        if doc["schema"] != "cargo-nvs/dist/v2" {
            return Err(not_dist("manifest.json's schema is not cargo-nvs/dist/v2"));
        }
        let chip = doc["chip"].as_str().unwrap_or_default().to_owned();
        let entries = doc["segments"]
            .as_array()
            .ok_or_else(|| not_dist("manifest.json lists no segments"))?;
        let mut segments = Vec::new();
        for entry in entries {
            let role = match entry["role"].as_str() {
                Some("bootloader") => Role::Bootloader,
                Some("partition-table") => Role::PartitionTable,
                Some("app") => Role::App,
                // dist's dev data: user data for blank flash; a device's factory data and keys
                // come from its batch.
                Some("user-data") => Role::UserData,
                Some(_) => continue,
                None => return Err(not_dist("a segment has no role")),
            };
            let (Some(file), Some(offset), Some(sha256)) = (
                entry["file"].as_str(),
                entry["offset"].as_u64().and_then(|o| u32::try_from(o).ok()),
                entry["sha256"].as_str(),
            ) else {
                if role == Role::UserData {
                    continue; // left out of the folder (no --with-dev-data)
                }
                return Err(not_dist("a segment has no file, offset or SHA-256"));
            };
            let path = dir.join(file);
            let data = std::fs::read(&path).map_err(FileError::reading(&path))?;
            if crate::hex::sha256_hex(&data) != sha256.to_ascii_lowercase() {
                return Err(FirmwareError::Changed { file: path });
            }
            segments.push(Planned {
                name: entry["name"].as_str().unwrap_or(file).to_owned(),
                addr: offset,
                data,
                role,
                secret: role == Role::UserData,
                keyed: false,
            });
        }
        let firmware: Vec<&Planned> = segments
            .iter()
            .filter(|s| !s.role.is_device_data())
            .collect();
        if !firmware.iter().any(|s| s.role == Role::App) {
            return Err(not_dist("manifest.json lists no app"));
        }
        let Some(table) = firmware.iter().find(|s| s.role == Role::PartitionTable) else {
            return Err(not_dist("manifest.json lists no partition table"));
        };
        let table_path = dir.join("partition-table.bin");
        let table = PartitionTable::parse_binary_at(&table_path, &table.data, table.addr)?;
        let sha256 = firmware_sha256(firmware.iter().map(|s| (s.addr, s.data.as_slice())));
        if let Some(recorded) = doc["firmware_sha256"].as_str()
            && recorded != sha256
        {
            return Err(FirmwareError::Changed {
                file: manifest.clone(),
            });
        }
        Ok(Firmware {
            dir: dir.to_owned(),
            chip,
            sha256,
            segments,
            table,
        })
    }

    /// Refuses a device image that does not go exactly where the firmware's table has a
    /// partition of its kind (data/nvs, or data/nvs_keys for the key file).
    pub fn check_placement(&self, addr: u32, len: usize, name: &str) -> Result<(), FirmwareError> {
        let table_name = format!(
            "the firmware's partition table (`{}`)",
            self.dir.join("partition-table.bin").display()
        );
        match misplaced(&self.table, &table_name, addr, len, name) {
            None => Ok(()),
            Some(problem) => Err(FirmwareError::Misplaced(format!(
                "{problem}. The images were made for another table: use the dist of the same \
                 package version (nothing was written)"
            ))),
        }
    }
}

/// Why an image `name` of `len` bytes at `addr` does not go exactly where `table` has a
/// partition of its kind (data/nvs, or data/nvs_keys for `nvs_keys`), if it does not.
pub fn misplaced(
    table: &PartitionTable,
    table_name: &str,
    addr: u32,
    len: usize,
    name: &str,
) -> Option<String> {
    let keys = name == "nvs_keys";
    let kind = |p: &nvs_build::table::Partition| if keys { p.is_nvs_keys() } else { p.is_nvs() };
    if table
        .partitions
        .iter()
        .any(|p| p.offset == addr && len <= p.size as usize && kind(p))
    {
        return None;
    }
    let partitions: Vec<String> = table
        .partitions
        .iter()
        .filter(|p| p.is_nvs() || p.is_nvs_keys())
        .map(|p| format!("{} at {:#x} ({:#x} bytes)", p.name, p.offset, p.size))
        .collect();
    Some(format!(
        "{table_name} has no {} partition at {addr:#x} for {name} ({len:#x} bytes); it has: {}",
        if keys { "data/nvs_keys" } else { "data/nvs" },
        if partitions.is_empty() {
            "none".to_owned()
        } else {
            partitions.join(", ")
        }
    ))
}
