//! The engine of `cargo nvs`: flashing NVS images with an app through espflash's library without
//! destroying what a device holds, and mass production with a ledger of issued device ids.
//!
//! The `cargo-nvs` binary parses arguments, calls into these modules and prints; another
//! program (a station GUI, a fixture controller) can call them the same way. Every module has
//! its own error type; none of them is a `String`.
//!
//! - [`flashing`]: the espflash glue: the port, the connection (a [`flashing::Session`]),
//!   progress, reading flash; [`flashing::segments`], what goes where (app segments from
//!   espflash, NVS images, nvs_keys, by [`flashing::segments::Role`]); [`flashing::protect`],
//!   which NVS data may be written over on the chip, after the pure [`guard`].
//! - [`mfg`]: mass production: `generate` (images per device, ids reserved in the ledger first),
//!   `flash` (claim, guard, write, verify, log), the [`mfg::ledger::Ledger`] trait with SQLite and
//!   PostgreSQL backends, the product ledger.
//! - [`artifacts`], [`project`]: running cargo and reading nvs-build's OUT_DIR manifest.
//! - [`keys`], [`settings`], [`fsutil`], [`size`], [`hex`]: the pieces they share.
//!
//! A station program that takes devices from the product's ledger, as `mfg flash` does:
//!
//! ```
//! use cargo_nvs::mfg::ledger::{Ledger, LedgerError, SqliteLedger};
//!
//! let batch = std::env::temp_dir().join(format!("cargo-nvs-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&batch)?;
//! let ledger = SqliteLedger::open(&batch.join("ledger.sqlite"), false)?;
//! // Nothing was issued into this batch yet: nothing to claim.
//! match ledger.claim_next("station 1 port /dev/ttyUSB0", &[batch.clone()]) {
//!     Ok(Some(device)) => println!("flash {}", device.device),
//!     Ok(None) => println!("nothing left to flash"),
//!     Err(e @ LedgerError::Server { .. }) => eprintln!("the ledger server failed: {e}"),
//!     Err(e) => return Err(e.into()),
//! }
//! # std::fs::remove_dir_all(&batch)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod artifacts;
pub mod firmware;
pub mod flashing;
pub mod fsutil;
pub mod guard;
pub mod hex;
pub mod keys;
pub mod mfg;
pub mod project;
pub mod settings;
pub mod size;

pub use fsutil::FileError;
