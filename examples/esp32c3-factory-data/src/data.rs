//! What the firmware does with its two NVS partitions, independent of the chip: the factory
//! data in `fctry` (read only), the user data in `nvs` (read, written, erased by a factory
//! reset). Generic over esp-nvs's `Platform`, so it runs on the flash and on a RAM copy alike.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use embedded_storage::nor_flash::{
    ErrorType, NorFlash, NorFlashError, NorFlashErrorKind, ReadNorFlash,
};
use esp_nvs::error::Error;
use esp_nvs::platform::{Crc, Platform};
use esp_nvs::{Key, Nvs};

/// An NVS partition of the partition table, as nvs-build found it at build time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Partition {
    pub name: &'static str,
    pub offset: usize,
    pub size: usize,
}

impl Partition {
    const fn end(&self) -> usize {
        self.offset + self.size
    }
}

/// The read-only factory data partition (`fctry` in partitions.csv).
pub const FCTRY: Partition = Partition {
    name: "fctry",
    offset: parse_int(env!("NVS_FCTRY_OFFSET")),
    size: parse_int(env!("NVS_FCTRY_SIZE")),
};

/// The user data partition (`nvs` in partitions.csv).
pub const USER: Partition = Partition {
    name: "nvs",
    offset: parse_int(env!("NVS_NVS_OFFSET")),
    size: parse_int(env!("NVS_NVS_SIZE")),
};

// Checked when compiling: a factory reset of the user partition cannot reach factory data.
const _: () = assert!(
    FCTRY.end() <= USER.offset || USER.end() <= FCTRY.offset,
    "the fctry and nvs partitions overlap"
);

/// Reads a number as nvs-build writes it into `NVS_<PART>_OFFSET`/`_SIZE` (`0xf000`), or in
/// decimal. Any other text fails the build.
pub const fn parse_int(text: &str) -> usize {
    let bytes = text.as_bytes();
    let (mut i, radix) = if bytes.len() > 2 && bytes[0] == b'0' && (bytes[1] | 0x20) == b'x' {
        (2, 16)
    } else {
        (0, 10)
    };
    assert!(i < bytes.len(), "empty number");
    let mut value: usize = 0;
    while i < bytes.len() {
        let digit = match bytes[i] {
            b'0'..=b'9' => bytes[i] - b'0',
            b'a'..=b'f' => bytes[i] - b'a' + 10,
            b'A'..=b'F' => bytes[i] - b'A' + 10,
            _ => panic!("not a number"),
        } as usize;
        assert!(digit < radix, "not a number");
        value = match value.checked_mul(radix) {
            Some(v) => match v.checked_add(digit) {
                Some(v) => v,
                None => panic!("number too large"),
            },
            None => panic!("number too large"),
        };
        i += 1;
    }
    value
}

pub const MASS_PROD: Key = Key::from_str("mass_prod");
const PRODUCT_ID: Key = Key::from_str("ProductID");
const DEVICE_NAME: Key = Key::from_str("DeviceName");
const DEVICE_SECRET: Key = Key::from_str("DeviceSecret");
const PRODUCT_CERT: Key = Key::from_str("product_cert");
const HW_REV: Key = Key::from_str("hw_rev");
const SERIAL: Key = Key::from_str("serial");

pub const USER_DATA: Key = Key::from_str("user_data");
const SSID: Key = Key::from_str("ssid");
pub const SETTINGS: Key = Key::from_str("settings");
pub const BRIGHTNESS: Key = Key::from_str("brightness");
pub const LOCALE: Key = Key::from_str("locale");

/// What `ssid` becomes when it is empty or missing.
pub const DEMO_SSID: &str = "factory-demo-net";

/// A secret value: its `Debug` shows the length only, and it has no `Display`, so it cannot end
/// up in a log by accident.
pub struct Secret(String);

impl Secret {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The value itself, for the code that needs it (TLS, cloud authentication).
    #[allow(dead_code)]
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<secret, {} bytes>", self.0.len())
    }
}

/// The `mass_prod` namespace of the factory partition.
#[derive(Debug)]
pub struct FactoryData {
    pub product_id: String,
    pub device_name: String,
    pub device_secret: Secret,
    pub hw_rev: u8,
    pub serial: u32,
    pub product_cert: Vec<u8>,
}

/// Reads the factory data. `NamespaceNotFound` means the `fctry` image was never flashed.
pub fn read_factory_data<F: Platform>(nvs: &mut Nvs<F>) -> Result<FactoryData, Error> {
    Ok(FactoryData {
        product_id: nvs.get(&MASS_PROD, &PRODUCT_ID)?,
        device_name: nvs.get(&MASS_PROD, &DEVICE_NAME)?,
        device_secret: Secret(nvs.get(&MASS_PROD, &DEVICE_SECRET)?),
        hw_rev: nvs.get(&MASS_PROD, &HW_REV)?,
        serial: nvs.get(&MASS_PROD, &SERIAL)?,
        product_cert: nvs.get(&MASS_PROD, &PRODUCT_CERT)?,
    })
}

/// A value that may be missing: `Ok(None)` when the key or its namespace is not there.
pub fn get_optional<F: Platform, T>(
    nvs: &mut Nvs<F>,
    namespace: &Key,
    key: &Key,
) -> Result<Option<T>, Error>
where
    Nvs<F>: esp_nvs::Get<T>,
{
    match nvs.get(namespace, key) {
        Ok(value) => Ok(Some(value)),
        Err(Error::KeyNotFound | Error::NamespaceNotFound) => Ok(None),
        Err(e) => Err(e),
    }
}

/// What `update_ssid` found and left.
#[derive(Debug, PartialEq, Eq)]
pub struct SsidUpdate {
    /// `None` when the key was missing (after a factory reset).
    pub before: Option<String>,
    pub written: bool,
    pub after: String,
}

/// Reads `user_data:ssid`, writes [`DEMO_SSID`] when it is empty or missing (and only then, to
/// spare the flash a write on every boot), and reads it back.
pub fn update_ssid<F: Platform>(nvs: &mut Nvs<F>) -> Result<SsidUpdate, Error> {
    let before: Option<String> = get_optional(nvs, &USER_DATA, &SSID)?;
    let written = before.as_deref().is_none_or(str::is_empty);
    if written {
        nvs.set(&USER_DATA, &SSID, DEMO_SSID)?;
    }
    let after = nvs.get(&USER_DATA, &SSID)?;
    Ok(SsidUpdate {
        before,
        written,
        after,
    })
}

/// Factory reset: deletes every key of the `user_data` namespace and overwrites the deleted
/// values with zeros on flash, so no old SSID or password survives in erased entries. Other
/// namespaces of the user partition (here `settings`) are kept. Returns how many keys went.
///
/// It is given the user partition only; the factory partition is opened through [`ReadOnly`],
/// which refuses every write and erase, so factory data cannot be reset even by mistake.
pub fn factory_reset<F: Platform>(nvs: &mut Nvs<F>) -> Result<usize, Error> {
    let mut keys: Vec<Key> = Vec::new();
    for entry in nvs.keys() {
        let (namespace, key) = entry?;
        if namespace == USER_DATA {
            keys.push(key);
        }
    }
    for key in &keys {
        nvs.delete(&USER_DATA, key)?;
    }
    nvs.purge_all(&USER_DATA)?;
    Ok(keys.len())
}

/// A flash that can only be read: writes and erases fail without reaching the flash. The
/// factory partition is opened through it, so neither this firmware nor esp-nvs's own
/// housekeeping when mounting can ever change factory data.
pub struct ReadOnly<F>(pub F);

impl<F: ReadNorFlash> ErrorType for ReadOnly<F> {
    type Error = NorFlashErrorKind;
}

impl<F: ReadNorFlash> ReadNorFlash for ReadOnly<F> {
    const READ_SIZE: usize = F::READ_SIZE;

    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), Self::Error> {
        self.0.read(offset, bytes).map_err(|e| e.kind())
    }

    fn capacity(&self) -> usize {
        self.0.capacity()
    }
}

impl<F: NorFlash> NorFlash for ReadOnly<F> {
    const WRITE_SIZE: usize = F::WRITE_SIZE;
    const ERASE_SIZE: usize = F::ERASE_SIZE;

    fn erase(&mut self, _from: u32, _to: u32) -> Result<(), Self::Error> {
        Err(NorFlashErrorKind::Other)
    }

    fn write(&mut self, _offset: u32, _bytes: &[u8]) -> Result<(), Self::Error> {
        Err(NorFlashErrorKind::Other)
    }
}

impl<F: Crc> Crc for ReadOnly<F> {
    fn crc32(init: u32, data: &[u8]) -> u32 {
        F::crc32(init, data)
    }
}
