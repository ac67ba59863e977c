//! A device's files kept in the ledger (`mfg generate --store-images`) as the segments a
//! station writes: each checked against the SHA-256 the ledger recorded when the device was
//! issued, so that a file changed in the database since is refused, not flashed.

use super::flash::MfgFlashError;
use super::ledger::{Issued, StoredFile};
use crate::hex::sha256_hex;

/// The device's stored files, images first (the ledger's order) then its key, each padded with
/// 0xFF over its partition: (offset, bytes, partition).
pub(crate) fn stored_segments(
    device: &Issued,
    mut files: Vec<StoredFile>,
) -> Result<Vec<(u32, Vec<u8>, String)>, MfgFlashError> {
    let refused = |what: String| {
        MfgFlashError::Invalid(format!(
            "device `{}`: {what}; not flashed (the ledger's copy was changed after `mfg \
             generate` stored it: generate the device anew, or flash it from its batch folder)",
            device.device
        ))
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
        segments.push(segment(file, &refused)?);
    }
    for file in files {
        if file.partition != "nvs_keys" || device.key_file.as_deref() != Some(&file.name) {
            return Err(refused(format!(
                "the ledger stores `{}` for partition `{}`, which is none of the device's \
                 images or its key",
                file.name, file.partition
            )));
        }
        segments.push(segment(file, &refused)?);
    }
    Ok(segments)
}

/// One stored file as a segment, if its bytes are still those recorded.
fn segment(
    file: StoredFile,
    refused: &dyn Fn(String) -> MfgFlashError,
) -> Result<(u32, Vec<u8>, String), MfgFlashError> {
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
    let mut data = file.data;
    data.resize(file.size as usize, 0xFF);
    Ok((file.offset, data, file.partition))
}
