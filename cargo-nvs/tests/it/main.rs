//! cargo-nvs's integration tests, one binary: each former `tests/*.rs` file is a module here, so
//! the shared support code (the ROM-loader emulator above all) compiles once, not once per file.
//! The tests still run the `cargo-nvs` binary (`support::bin`). Filter by module as before by
//! file: `cargo test -p cargo-nvs --test it flash_cli::` (or a test's name alone).

// Beside, not inside, this folder: tests/support is the emulator's home.
#[path = "../support/mod.rs"]
mod support;

mod chip_values;
mod emulator;
mod encrypt_cli;
mod flash_cli;
mod generate_cli;
mod metadata_e2e;
mod mfg_cargo;
mod mfg_cli;
mod mfg_disk_full;
mod mfg_flash;
mod refusals_cli;
mod runner_cli;
mod station;
