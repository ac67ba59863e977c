//! Encryption keys from files, with errors that name the file (for build scripts and the CLI).

use std::path::Path;

use crate::error::{Error, Location};
use crate::format::encryption::XtsKey;

/// A key loaded from a file, and what the caller should warn about.
#[derive(Debug)]
pub struct LoadedKey {
    pub key: XtsKey,
    /// Set when the file's CRC does not match its key bytes (the device would refuse the
    /// nvs_keys partition; the reference does not check).
    pub warning: Option<String>,
}

use crate::error::{MAX_KEY_FILE_BYTES, read_input_max};

fn read(path: &Path, what: &str) -> Result<Vec<u8>, Error> {
    read_input_max(path, what, MAX_KEY_FILE_BYTES)
}

/// Reads an nvs_keys image (or any file whose first 64 bytes are the XTS key).
pub fn load_key_file(path: &Path) -> Result<LoadedKey, Error> {
    let bytes = read(path, "key file")?;
    let file = XtsKey::from_key_file(&bytes)
        .map_err(|e| Error::new(Some(Location::file(path)), None, e.to_string()))?;
    let warning = (!file.crc_ok).then(|| {
        format!(
            "{}: the key file's CRC (bytes 64..68) does not match its keys; the device will refuse \
             it as an nvs_keys partition. The keys themselves are used as given",
            path.display()
        )
    });
    Ok(LoadedKey {
        key: file.key,
        warning,
    })
}

/// Derives the XTS key of the HMAC-based scheme from an HMAC key file (all of it is the key).
pub fn load_hmac_key(path: &Path) -> Result<XtsKey, Error> {
    let bytes = read(path, "HMAC key file")?;
    XtsKey::derive_from_hmac(&bytes)
        .map_err(|e| Error::new(Some(Location::file(path)), None, e.to_string()))
}
