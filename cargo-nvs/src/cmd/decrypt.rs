//! `cargo nvs decrypt INPUT KEYS OUTPUT`: the plaintext of an encrypted image.

use std::path::PathBuf;
use std::process::ExitCode;

use nvs_build::format::encryption::decrypt_image;
use nvs_build::format::{PAGE_SIZE, read_image};

use super::error::{CmdError, CmdResult};
use cargo_nvs::fsutil::{FileError, refuse_output_over_inputs, write_atomic};
use cargo_nvs::keys::load_key;

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

pub fn run(args: DecryptArgs) -> CmdResult<ExitCode> {
    let output = match &args.out_dir {
        Some(dir) if args.output.is_relative() => dir.join(&args.output),
        _ => args.output.clone(),
    };
    refuse_output_over_inputs(
        &output,
        [
            (args.input.as_path(), "INPUT image"),
            (args.keys.as_path(), "key file"),
        ],
    )?;
    let key = load_key(&args.keys)?;
    let mut bytes = nvs_build::read_limited(&args.input, nvs_build::MAX_INPUT_BYTES)
        .map_err(FileError::reading(&args.input))?;
    if bytes.is_empty() || bytes.len() % PAGE_SIZE != 0 {
        return Err(CmdError::Unusable(format!(
            "`{}` is {} bytes long, not a whole number of 4096-byte pages: it is {}; nothing was written",
            args.input.display(),
            bytes.len(),
            if bytes.is_empty() {
                "empty"
            } else {
                "truncated, or not an NVS image"
            }
        )));
    }
    decrypt_image(&mut bytes, &key);
    if read_image(&bytes).looks_encrypted {
        return Err(CmdError::Unusable(format!(
            "wrong key? after decrypting `{}` with `{}`, not one entry passes its CRC check; nothing was written",
            args.input.display(),
            args.keys.display()
        )));
    }
    write_atomic(&output, &bytes, None).map_err(FileError::writing(&output))?;
    eprintln!("Created decrypted NVS image `{}`", output.display());
    Ok(ExitCode::SUCCESS)
}
