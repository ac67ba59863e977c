//! Build ESP-IDF NVS partition images, byte-identical to Espressif's generator
//! `esp-idf-nvs-partition-gen` 0.3.0.
//!
//! Layers, from the bottom up:
//! - [`format`]: the image format itself, bytes in and bytes out (no I/O).
//! - [`encoding`], [`csv_input`], [`image`]: value encodings and the Espressif CSV format,
//!   turned into located calls on the format core.

pub mod csv_input;
pub mod encoding;
mod error;
pub mod format;
pub mod image;
#[cfg(feature = "encryption")]
pub mod keys;

pub use csv_input::FileBase;
pub use error::{InputError, Location};
pub use image::ImageInput;
