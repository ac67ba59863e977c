//! The NVS image format: bytes in, bytes out.
//!
//! This module knows pages, entries, CRCs, item types, blob chunking, namespaces, format versions
//! and (with the `encryption` feature) XTS-AES encryption. It does no I/O, reads no environment and
//! knows nothing about Cargo or CSV: front ends turn their input into calls on [`ImageBuilder`],
//! and [`read_image`] turns bytes back into typed items.
//!
//! The layout reproduces Espressif's generator `esp-idf-nvs-partition-gen` 0.3.0 byte for byte,
//! for every input it accepts that means what its author intended (see [`FormatError`] for the
//! inputs we refuse on purpose).

mod builder;
mod crc;
mod diff;
#[cfg(feature = "encryption")]
pub mod encryption;
mod error;
mod layout;
mod reader;
mod value;
mod wifi;

pub use builder::{ImageBuilder, PartitionSize};
pub use crc::nvs_crc32;
pub use diff::describe_differences;
pub use error::FormatError;
pub use layout::{
    ENTRIES_PER_PAGE, ENTRY_SIZE, EntryState, FIRST_ENTRY_OFFSET, ItemType, MAX_BLOB_SIZE_V1,
    MAX_KEY_LEN, MAX_NAMESPACES, MAX_STRING_SIZE_DEVICE, MAX_STRING_SIZE_V1, MAX_STRING_SIZE_V2,
    PAGE_SIZE, PageState, Version,
};
pub use reader::{
    Blob, Item, ItemValue, NamespaceDef, PageSummary, ParsedImage, Problem, Severity, read_image,
};
pub use value::Value;

/// Whether `key` is one of the Wi-Fi key names that make the reference write extra entries
/// (quirk Q2).
pub fn is_wifi_key(key: &str) -> bool {
    wifi::WifiState::is_trigger(key)
}
