//! A device's files kept in the ledger (`mfg generate --store-images`) as the segments a
//! station writes. Each image is checked against the SHA-256 the ledger recorded when the device
//! was issued, every file against its own, and where each goes against the partition table
//! stored with the batch, before anything is allocated or written: a file changed in the
//! database since is refused, not flashed. A recipe (values from the chip) is built for the
//! chip's MAC once it is checked.

use std::path::Path;

use nvs_build::table::PartitionTable;

use super::chip_values::{RECIPE_KEY, image_for_chip, is_recipe};
use super::flash::{MfgFlashError, Segments};
use super::ledger::{Issued, StoredFile};
use crate::hex::sha256_hex;

/// The device's stored files, images first (the ledger's order) then its key, each padded with
/// 0xFF over its partition of `table` (the batch's): (offset, bytes, partition). `built` gets
/// each image's SHA-256 as written (a recipe's is its image's for `mac`).
pub(crate) fn stored_segments(
    device: &Issued,
    mut files: Vec<StoredFile>,
    table: Option<&PartitionTable>,
    mac: Option<&str>,
    built: &mut Vec<String>,
) -> Result<Segments, MfgFlashError> {
    let refused = |what: String| {
        MfgFlashError::Invalid(format!(
            "device `{}`: {what}; not flashed (the ledger's copy is not what `mfg generate` \
             stored: generate the device anew, or flash it from its batch folder)",
            device.device
        ))
    };
    let Some(table) = table else {
        return Err(refused(
            "the ledger stores its files but not its batch's partition table".into(),
        ));
    };
    for file in &files {
        if file.partition != RECIPE_KEY {
            placed(file, table).map_err(refused)?;
        }
        let actual = sha256_hex(&file.data);
        if actual != file.sha256 {
            return Err(refused(format!(
                "the stored `{}` has SHA-256 {actual}, recorded {}",
                file.name, file.sha256
            )));
        }
    }
    // Its own key goes into nvs_keys (with HMAC key protection the chip derives it instead).
    let own_key = device
        .key_file
        .as_ref()
        .filter(|_| device.hmac_key_file.is_none());
    if let Some(key) = own_key
        && !files
            .iter()
            .any(|f| &f.name == key && f.partition == "nvs_keys")
    {
        return Err(refused(format!(
            "its image is encrypted with its own key `{key}`, which the ledger does not store"
        )));
    }
    // Keys a recipe names: stored ones (its own, or kept for the recipe), else a file of its
    // batch folder or an absolute path on this PC.
    let keys: Vec<(String, Vec<u8>)> = files
        .iter()
        .filter(|f| f.partition == "nvs_keys" || f.partition == RECIPE_KEY)
        .map(|f| (f.name.clone(), f.data.clone()))
        .collect();
    let read_key = |name: &str| match keys.iter().find(|(n, _)| n == name) {
        Some((_, data)) => Ok(data.clone()),
        None => {
            let path = device.batch_dir.join(name);
            std::fs::read(&path).map_err(|e| {
                format!(
                    "the key `{}` is not stored in the ledger and cannot be read ({e})",
                    path.display()
                )
            })
        }
    };
    let images = device.images();
    let mut segments = Vec::new();
    for (image, recorded) in images {
        let Some(at) = files.iter().position(|f| &f.name == image) else {
            return Err(refused(format!(
                "the ledger stores no copy of its image `{image}`"
            )));
        };
        let file = files.remove(at);
        // The SHA-256 recorded with the device, not only the one stored beside the bytes.
        if &file.sha256 != recorded {
            return Err(refused(format!(
                "the stored `{image}` is recorded with SHA-256 {}, the device with {recorded}",
                file.sha256
            )));
        }
        let (data, sha256) =
            image_for_chip(file.data, Path::new(image), &file.sha256, mac, &read_key)?;
        if data.len() > file.size as usize {
            return Err(refused(format!(
                "the image of `{image}` is larger than partition `{}`",
                file.partition
            )));
        }
        built.push(sha256);
        segments.push(padded(file.offset, data, file.size, file.partition));
    }
    for file in files {
        if file.partition == RECIPE_KEY {
            continue;
        }
        if own_key != Some(&file.name) {
            return Err(refused(format!(
                "the ledger stores `{}` for partition `{}`, which is none of the device's \
                 images or its key",
                file.name, file.partition
            )));
        }
        segments.push(padded(file.offset, file.data, file.size, file.partition));
    }
    Ok(segments)
}

/// Whether the stored file goes where the batch's table has its partition (an NVS partition,
/// or nvs_keys for a key), and fits.
fn placed(file: &StoredFile, table: &PartitionTable) -> Result<(), String> {
    // A key is stored for "nvs_keys", whatever the table calls its nvs_keys partition.
    let partition = table
        .partitions
        .iter()
        .find(|p| match file.partition.as_str() {
            "nvs_keys" => p.is_nvs_keys(),
            name => p.name == name && p.is_nvs(),
        });
    match partition {
        Some(p) if p.offset == file.offset && p.size == file.size => {
            if file.data.len() > file.size as usize && !is_recipe(&file.name) {
                return Err(format!(
                    "the stored `{}` ({} bytes) is larger than partition `{}`",
                    file.name,
                    file.data.len(),
                    file.partition
                ));
            }
            Ok(())
        }
        _ => Err(format!(
            "the stored `{}` goes to partition `{}` ({:#x} bytes at {:#x}), which the batch's \
             partition table does not have",
            file.name, file.partition, file.size, file.offset
        )),
    }
}

fn padded(offset: u32, mut data: Vec<u8>, size: u32, partition: String) -> (u32, Vec<u8>, String) {
    data.resize(size as usize, 0xFF);
    (offset, data, partition)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> PartitionTable {
        PartitionTable::parse_csv(
            Path::new("partitions.csv"),
            "nvs, data, nvs, 0x9000, 0x6000,\nkeys, data, nvs_keys, 0xf000, 0x1000, encrypted\n",
            0x8000,
        )
        .unwrap()
    }

    fn file(name: &str, partition: &str, offset: u32, size: u32, data: &[u8]) -> StoredFile {
        StoredFile {
            name: name.into(),
            partition: partition.into(),
            offset,
            size,
            sha256: sha256_hex(data),
            data: data.to_vec(),
        }
    }

    /// A device with an image and its own key, both stored.
    fn device() -> (Issued, Vec<StoredFile>) {
        let image = file("bin/dev-A.bin", "nvs", 0x9000, 0x6000, &[1; 0x3000]);
        let key = file(
            "keys/keys-dev-A.bin",
            "nvs_keys",
            0xf000,
            0x1000,
            &[2; 0x1000],
        );
        let device = Issued {
            sha256: image.sha256.clone(),
            key_file: Some(key.name.clone()),
            ..crate::mfg::ledger::tests::entry("A", 1)
        };
        (device, vec![image, key])
    }

    fn segments(device: &Issued, files: Vec<StoredFile>) -> Result<Segments, String> {
        stored_segments(device, files, Some(&table()), None, &mut Vec::new())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn stored_files_become_padded_segments_where_the_table_puts_them() {
        let (device, files) = device();
        let segments = segments(&device, files).unwrap();
        let places: Vec<(u32, usize, &str)> = segments
            .iter()
            .map(|(offset, data, name)| (*offset, data.len(), name.as_str()))
            .collect();
        assert_eq!(
            places,
            [(0x9000, 0x6000, "nvs"), (0xf000, 0x1000, "nvs_keys")]
        );
        assert!(segments[0].1[0x3000..].iter().all(|&b| b == 0xFF));
    }

    #[test]
    fn files_changed_missing_or_misplaced_in_the_ledger_are_refused() {
        type Change = fn(&mut Vec<StoredFile>);
        let cases: [(&str, Change); 6] = [
            ("has SHA-256", |files| files[0].data[7] ^= 1),
            // Bytes and their SHA-256 both replaced: the device's recorded one tells.
            ("recorded with SHA-256", |files| {
                files[0].data[7] ^= 1;
                files[0].sha256 = sha256_hex(&files[0].data);
            }),
            ("does not store", |files| {
                files.pop();
            }),
            ("stores no copy of its image", |files| {
                files.remove(0);
            }),
            ("does not have", |files| files[0].offset = 0),
            // A size from the database is checked before anything that large is made.
            ("does not have", |files| files[0].size = u32::MAX),
        ];
        for (needle, change) in cases {
            let (device, mut files) = device();
            change(&mut files);
            let error = segments(&device, files).unwrap_err();
            assert!(
                error.contains(needle) && error.contains("not flashed"),
                "{error}"
            );
            assert!(!error.contains("0101"), "bytes in the message: {error}");
        }
        let (device, files) = device();
        let error = stored_segments(&device, files, None, None, &mut Vec::new()).unwrap_err();
        assert!(error.to_string().contains("partition table"), "{error}");
    }
}
