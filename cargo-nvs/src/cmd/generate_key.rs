//! `cargo nvs generate-key`: a new nvs_keys file (random, or derived from an HMAC key).

use std::path::PathBuf;
use std::process::ExitCode;

use super::error::CmdResult;
use cargo_nvs::keys::{KeyGenOptions, generate_keys};

/// Generate NVS encryption keys (a 4096-byte nvs_keys image, mode 0600).
#[derive(clap::Args)]
#[command(after_help = "Example:\n  cargo nvs generate-key --keyfile keys/nvs_keys.bin")]
pub struct GenerateKeyArgs {
    /// Folder for the default key file name (keys/keys-<random>.bin).
    #[arg(long = "out-dir", alias = "outdir", value_name = "DIR")]
    out_dir: Option<PathBuf>,
    #[command(flatten)]
    keygen_options: KeyGenOptions,
}

pub fn run(args: GenerateKeyArgs) -> CmdResult<ExitCode> {
    generate_keys(&args.keygen_options, args.out_dir.as_deref())?;
    Ok(ExitCode::SUCCESS)
}
