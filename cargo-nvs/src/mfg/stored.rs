//! A device's files kept in the ledger (`mfg generate --store-images`) as the segments a
//! station writes: each checked against the SHA-256 the ledger recorded when the device was
//! issued, so that a file changed in the database since is refused, not flashed. A recipe
//! (values from the chip) is built for the chip's MAC once it is checked.

use std::path::Path;

use super::chip_values::{build_image, is_recipe};
use super::flash::{MfgFlashError, Segments};
use super::ledger::{Issued, StoredFile};
use crate::hex::sha256_hex;

/// The device's stored files, images first (the ledger's order) then its key, each padded with
/// 0xFF over its partition: (offset, bytes, partition). `built` gets each image's SHA-256 as
/// written (a recipe's is its image's for `mac`).
pub(crate) fn stored_segments(
    device: &Issued,
    mut files: Vec<StoredFile>,
    mac: Option<&str>,
    built: &mut Vec<String>,
) -> Result<Segments, MfgFlashError> {
    let refused = |what: String| {
        MfgFlashError::Invalid(format!(
            "device `{}`: {what}; not flashed (the ledger's copy was changed after `mfg \
             generate` stored it: generate the device anew, or flash it from its batch folder)",
            device.device
        ))
    };
    for file in &files {
        let actual = sha256_hex(&file.data);
        if actual != file.sha256 {
            return Err(refused(format!(
                "the stored `{}` has SHA-256 {actual}, recorded {}",
                file.name, file.sha256
            )));
        }
        if file.data.len() > file.size as usize || !file.offset.is_multiple_of(0x1000) {
            return Err(refused(format!(
                "the stored `{}` ({} bytes) does not fit partition `{}` ({:#x} bytes at {:#x})",
                file.name,
                file.data.len(),
                file.partition,
                file.size,
                file.offset
            )));
        }
    }
    // A recipe's key is the device's stored key file; a shared key is read where it was.
    let keys: Vec<(String, Vec<u8>)> = files
        .iter()
        .filter(|f| f.partition == "nvs_keys")
        .map(|f| (f.name.clone(), f.data.clone()))
        .collect();
    let read_key = |name: &str| match keys.iter().find(|(n, _)| n == name) {
        Some((_, data)) => Ok(data.clone()),
        None => std::fs::read(Path::new(name)).map_err(|e| {
            format!("the key `{name}` is not stored in the ledger and cannot be read ({e})")
        }),
    };
    let images = std::iter::once((&device.image, &device.sha256))
        .chain(device.more_images.iter().map(|(image, sha)| (image, sha)));
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
        let data = if is_recipe(image) {
            let Some(mac) = mac else {
                return Err(MfgFlashError::Invalid(format!(
                    "`{image}` takes values from the chip: it is built once the chip's MAC is \
                     known"
                )));
            };
            build_image(&file.data, Path::new(image), mac, &read_key).map_err(|why| {
                MfgFlashError::Invalid(format!(
                    "cannot build the image of `{image}` for MAC {mac}: {why}; not flashed"
                ))
            })?
        } else {
            file.data
        };
        if data.len() > file.size as usize {
            return Err(refused(format!(
                "the image of `{image}` is larger than partition `{}`",
                file.partition
            )));
        }
        built.push(sha256_hex(&data));
        segments.push(padded(file.offset, data, file.size, file.partition));
    }
    for file in files {
        if file.partition != "nvs_keys" || device.key_file.as_deref() != Some(&file.name) {
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

fn padded(offset: u32, mut data: Vec<u8>, size: u32, partition: String) -> (u32, Vec<u8>, String) {
    data.resize(size as usize, 0xFF);
    (offset, data, partition)
}
