//! Build ESP-IDF NVS partition images, byte-identical to Espressif's generator
//! `esp-idf-nvs-partition-gen` 0.3.0, from a build script or any other program.
//!
//! ```no_run
//! // build.rs: images for every partition in `[package.metadata.nvs]`
//! nvs_build::generate();
//! ```
//!
//! Layers, from the bottom up (each uses only the ones before it):
//! - [`format`](mod@format): the image format itself, bytes in and bytes out (no I/O).
//! - [`encoding`], [`csv_input`], [`image`], [`table`], [`metadata`], [`resolve`]: value
//!   encodings, the Espressif CSV format, partition tables and Cargo metadata, turned into
//!   located calls on the format core.
//! - [`config`]: the build-script API and its `cargo:` directives.

pub mod config;
pub mod csv_input;
pub mod encoding;
mod error;
pub mod format;
pub mod image;
#[cfg(feature = "encryption")]
pub mod keys;
pub mod metadata;
pub mod resolve;
pub mod table;

pub use config::{Config, generate, try_generate};
pub use csv_input::FileBase;
pub use error::{
    InputError, Location, MAX_INPUT_BYTES, MAX_KEY_FILE_BYTES, MAX_VALUE_FILE_BYTES, read_limited,
};
pub use image::ImageInput;
