//! `cargo nvs decrypt INPUT KEYS OUTPUT`: the plaintext of an encrypted image.

use std::path::PathBuf;
use std::process::ExitCode;

use nvs_build::format::encryption::decrypt_image;
use nvs_build::format::read_image;

use super::keys::load_key;
use crate::fsutil::write_atomic;
use crate::{CliError, CliResult};

/// Decrypt an encrypted NVS partition image.
#[derive(clap::Args)]
#[command(after_help = "Example:\n  cargo nvs decrypt nvs_encr.bin keys/keys.bin nvs.bin")]
pub struct DecryptArgs {
    /// The encrypted image.
    input: PathBuf,
    /// The nvs_keys file it was encrypted with.
    keys: PathBuf,
    /// Where to write the decrypted image.
    output: PathBuf,
    /// Folder the output path is relative to.
    #[arg(long = "out-dir", alias = "outdir", value_name = "DIR")]
    out_dir: Option<PathBuf>,
}

pub fn run(args: DecryptArgs) -> CliResult<ExitCode> {
    let key = load_key(&args.keys)?;
    let mut bytes = std::fs::read(&args.input)
        .map_err(|e| CliError(format!("cannot read `{}`: {e}", args.input.display())))?;
    decrypt_image(&mut bytes, &key);
    if read_image(&bytes).looks_encrypted {
        return Err(CliError(format!(
            "wrong key? after decrypting `{}` with `{}`, not one entry passes its CRC check; nothing was written",
            args.input.display(),
            args.keys.display()
        )));
    }
    let output = match &args.out_dir {
        Some(dir) if args.output.is_relative() => dir.join(&args.output),
        _ => args.output.clone(),
    };
    write_atomic(&output, &bytes, None)
        .map_err(|e| CliError(format!("cannot write `{}`: {e}", output.display())))?;
    eprintln!("Created decrypted NVS image `{}`", output.display());
    Ok(ExitCode::SUCCESS)
}
