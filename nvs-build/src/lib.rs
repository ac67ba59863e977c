//! Build ESP-IDF NVS partition images from a build script, byte-identical to Espressif's
//! generator `esp-idf-nvs-partition-gen` 0.3.0 (encryption included).
//!
//! Declare the data in `Cargo.toml`, call [`generate()`] from `build.rs`, and the images are
//! built with the crate: offsets and sizes come from the ESP-IDF partition table you already
//! have. [`Config`] sets what the environment would otherwise decide, [`Error`] says what is
//! wrong with an input and where, and [`format`](mod@format) reads and builds images without any files, for
//! tools.
//!
//! # Getting started
//!
//! `Cargo.toml`:
//!
//! ```toml
//! [build-dependencies]
//! nvs-build = "0.1"   # features = ["encryption"] for encrypted partitions
//!
//! [package.metadata.nvs.partitions.nvs.namespaces.user_data]
//! ssid = ""
//! boots = { u32 = 0 }
//! ```
//!
//! `build.rs`:
//!
//! ```no_run
//! fn main() {
//!     nvs_build::generate();
//! }
//! ```
//!
//! The program (or firmware) finds the image through environment variables set at compile time:
//!
//! ```ignore
//! static NVS_IMAGE: &[u8] = include_bytes!(env!("NVS_NVS_BIN"));
//! const NVS_OFFSET: &str = env!("NVS_NVS_OFFSET"); // "0x9000"
//! ```
//!
//! # What `generate()` does
//!
//! For every partition in `[package.metadata.nvs]` it writes `$OUT_DIR/nvs/<partition>.bin`
//! (only when the bytes change, so nothing downstream rebuilds needlessly; mode 0600 on Unix
//! when a key comes from the environment or is per device) and `$OUT_DIR/nvs/manifest.json`
//! (partition, offset, size, file, factory or user data), which `cargo nvs flash` reads. It
//! prints:
//!
//! - `cargo:rerun-if-changed` for `Cargo.toml`, the partition table, `espflash.toml` and every
//!   file a value comes from, and `cargo:rerun-if-env-changed` for every `env` source;
//! - `cargo:rustc-env=NVS_<PARTITION>_BIN`, `_OFFSET` and `_SIZE`;
//! - a `cargo:warning` for a skipped partition (a per-device value without a `dev` value) and
//!   for a user-data partition more than 90 % full.
//!
//! On an error it prints `error: nvs-build: …` and exits the build script with status 1.
//!
//! # The metadata
//!
//! ```toml
//! [package.metadata.nvs]
//! partition-table = "partitions.csv"   # default: espflash.toml's, else partitions.csv beside
//!                                      # Cargo.toml, else ESP-IDF's default single-app table
//!
//! [package.metadata.nvs.partitions.fctry]          # a data/nvs partition of the table
//! read-only = true                                 # factory data
//! version = 2                                      # NVS format version (default 2)
//! csv = ["nvs/fctry.csv"]                          # Espressif CSV files, written first
//! encryption = { keys = "keys/nvs_keys.bin" }      # or { hmac-key = "keys/hmac.bin" }
//!
//! [package.metadata.nvs.partitions.fctry.namespaces.mass_prod]
//! ProductID    = "12345"                                 # a bare string is a string
//! DeviceSecret = { string = { env = "DEVICE_SECRET" } }  # from the environment
//! product_cert = { file = "certs/product.der" }          # a blob: the file's bytes
//! hw_rev       = { u8 = 3 }                              # u8 … i64, range-checked; f32, f64
//! calib        = { hex = "00ff10" }                      # blob from hex (or base64)
//! serial       = { u32 = { per-device = "serial", dev = 1 } }
//! ```
//!
//! Paths are relative to the folder of `Cargo.toml`. The workspace README of
//! [cargo-nvs](https://github.com/cargo-nvs/cargo-nvs) describes every field.
//!
//! # Configuring
//!
//! Everything Cargo provides can be set explicitly, and each kind of `cargo:` directive switched
//! off: that is how a test, or a tool other than a build script, uses the same code.
//! [`Config::try_generate`] returns the error instead of exiting, and tells what was written:
//!
//! ```
//! # let dir = std::env::temp_dir().join(format!("nvs-build-doc-config-{}", std::process::id()));
//! # let package = dir.join("app");
//! # std::fs::create_dir_all(&package)?;
//! std::fs::write(
//!     package.join("Cargo.toml"),
//!     r#"
//! [package]
//! name = "app"
//!
//! [package.metadata.nvs.partitions.nvs.namespaces.user_data]
//! ssid = "lab"
//! boots = { u32 = 0 }
//! "#,
//! )?;
//! let generated = nvs_build::Config::new()
//!     .manifest_path(package.join("Cargo.toml"))
//!     .out_dir(dir.join("out"))
//!     .emit_rerun_if_changed(false)
//!     .cargo_warnings(false)
//!     .emit_rustc_env(false)
//!     .try_generate()?;
//!
//! // No partition table configured: ESP-IDF's default one (nvs at 0x9000, 0x6000 bytes).
//! let image = &generated.images[0];
//! assert_eq!((image.partition.as_str(), image.offset, image.size), ("nvs", 0x9000, 0x6000));
//! let bytes = std::fs::read(image.path.as_ref().unwrap())?;
//! let parsed = nvs_build::format::read_image(&bytes);
//! let keys: Vec<&str> = parsed.live_items().map(|item| item.key.as_str()).collect();
//! assert_eq!(keys, ["ssid", "boots"]);
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Errors
//!
//! An [`Error`] names the file, line and column, and the key, and says what to do; it never
//! echoes a value, which may be a secret:
//!
//! ```
//! # let dir = std::env::temp_dir().join(format!("nvs-build-doc-error-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir)?;
//! let manifest = dir.join("Cargo.toml");
//! std::fs::write(
//!     &manifest,
//!     "[package]\nname = \"app\"\n\n\
//!      [package.metadata.nvs.partitions.nvs.namespaces.user_data]\n\
//!      hw_rev = { u8 = 300 }\n",
//! )?;
//! let error = nvs_build::Config::new()
//!     .manifest_path(&manifest)
//!     .out_dir(dir.join("out"))
//!     .cargo_warnings(false)
//!     .emit_rerun_if_changed(false)
//!     .try_generate()
//!     .unwrap_err();
//! assert_eq!(error.key(), Some("hw_rev"));
//! assert_eq!(error.location().unwrap().line, Some(5));
//! assert!(error.to_string().contains("Cargo.toml:5:"), "{error}");
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Reading and building images
//!
//! [`format`](mod@format) is the image format alone: bytes in, bytes out, no files, no environment.
//! [`format::ImageBuilder`] lays out items exactly as Espressif's generator does, and
//! [`format::read_image`] parses any image, including what a device left behind, into items
//! and problems (it never panics):
//!
//! ```
//! use nvs_build::format::{ImageBuilder, ItemValue, PartitionSize, Value, Version, read_image};
//!
//! let mut builder = ImageBuilder::new(Version::V2);
//! builder.namespace("cal")?;
//! builder.add("gain", Value::U16(1200))?;
//! builder.add("table", Value::Blob(vec![1, 2, 3]))?;
//! let image = builder.finish(PartitionSize::new(0x3000)?)?;
//!
//! let parsed = read_image(&image);
//! assert!(!parsed.is_damaged());
//! let gain = parsed.live_items().find(|item| item.key == "gain").unwrap();
//! assert_eq!(gain.namespace.as_deref(), Some("cal"));
//! assert_eq!(gain.value, ItemValue::Value(Value::U16(1200)));
//! # Ok::<(), nvs_build::format::FormatError>(())
//! ```
//!
//! # Encryption
//!
//! With the `encryption` feature, a partition with `encryption = { keys = … }` or
//! `{ hmac-key = … }` is written encrypted (XTS-AES-256, as ESP-IDF's NVS encryption), and
//! `format::encryption` encrypts, decrypts and makes keys:
//!
//! ```
//! # #[cfg(feature = "encryption")] {
//! use nvs_build::format::encryption::{XtsKey, decrypt_image, encrypt_image};
//! use nvs_build::format::{ImageBuilder, PartitionSize, Value, Version};
//!
//! let mut builder = ImageBuilder::new(Version::V2);
//! builder.namespace("secrets").unwrap();
//! builder.add("token", Value::String("s3cret".into())).unwrap();
//! let plain = builder.finish(PartitionSize::new(0x3000).unwrap()).unwrap();
//!
//! let key = XtsKey::derive_from_hmac(&[0x42; 32]).unwrap();
//! let mut image = plain.clone();
//! encrypt_image(&mut image, &key);
//! assert_ne!(image, plain);
//! decrypt_image(&mut image, &key);
//! assert_eq!(image, plain);
//! # }
//! ```
//!
//! # Build cost
//!
//! nvs-build is compiled by its users' toolchains, often older ESP ones: its minimum Rust
//! version is 1.85, and it pulls in at most 25 crates besides itself, with or without the
//! `encryption` feature (crc32fast, csv-core and toml without serde's derive; aes, sha2 and
//! getrandom with `encryption`).

#![deny(missing_docs)]
// The guide shows a whole build.rs, `fn main` included.
#![allow(clippy::needless_doctest_main)]

mod build_script;
#[doc(hidden)]
pub mod chip;
mod csv_input;
mod encoding;
mod error;
pub mod format;
mod image;

// What `cargo nvs`, the workspace's tools and tests use besides the documented API: public so
// they can, hidden because it is not a promise to anyone else.
#[doc(hidden)]
pub mod config {
    pub use crate::build_script::generate_images;
}
#[doc(hidden)]
#[cfg(feature = "encryption")]
pub mod keys;
#[doc(hidden)]
pub mod manifest;
#[doc(hidden)]
pub mod metadata;
#[doc(hidden)]
pub mod resolve;
#[doc(hidden)]
pub mod table;

pub use build_script::{Config, Generated, GeneratedImage, generate};
pub use error::{Error, Location};

#[doc(hidden)]
pub use build_script::try_generate;
#[doc(hidden)]
pub use csv_input::FileBase;
#[doc(hidden)]
pub use encoding::hex;
#[doc(hidden)]
pub use error::{
    Error as InputError, MAX_INPUT_BYTES, MAX_KEY_FILE_BYTES, MAX_VALUE_FILE_BYTES, read_limited,
};
#[doc(hidden)]
pub use image::ImageInput;
