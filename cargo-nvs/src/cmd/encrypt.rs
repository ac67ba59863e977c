//! `cargo nvs encrypt INPUT... OUTPUT SIZE`: a drop-in for the reference's `encrypt`.

use std::path::PathBuf;
use std::process::ExitCode;

use nvs_build::format::Version;

use super::error::{CmdError, CmdResult};
use super::generate::{build_from_csv, split_positionals};
use cargo_nvs::fsutil::{FileError, refuse_output_over_inputs, write_atomic};
use cargo_nvs::keys::{KeyGenOptions, generate_keys, load_key};
use cargo_nvs::size::{parse_version, warn_if_read_only};

/// Generate an encrypted NVS partition image (XTS-AES-256, as ESP-IDF's NVS encryption).
#[derive(clap::Args)]
#[command(
    override_usage = "cargo nvs encrypt [OPTIONS] (--keygen | --inputkey KEYS.bin | --key-protect-hmac …) INPUT... OUTPUT SIZE"
)]
#[command(
    after_help = "Either --keygen or --inputkey is required (or HMAC key protection: --key-protect-hmac with --kp-hmac-keygen or --kp-hmac-inputkey).\n\nExamples:\n  cargo nvs encrypt --keygen nvs.csv nvs_encr.bin 0x6000\n  cargo nvs encrypt --inputkey keys/keys.bin nvs.csv nvs_encr.bin 0x6000"
)]
#[command(disable_version_flag = true)]
pub struct EncryptArgs {
    /// CSV files, then the output image, then the partition size (hex like 0x6000, or decimal).
    #[arg(value_name = "INPUT... OUTPUT SIZE", required = true)]
    args: Vec<PathBuf>,
    /// NVS format version: 2 has multi-page blobs (default), 1 is the legacy format.
    #[arg(long, value_name = "1|2", default_value = "2", value_parser = parse_version)]
    version: Version,
    /// Folder the output path (and generated keys) are relative to.
    #[arg(long = "out-dir", alias = "outdir", value_name = "DIR")]
    out_dir: Option<PathBuf>,
    /// Generate new keys (written to --keyfile, mode 0600).
    #[arg(long, conflicts_with = "inputkey")]
    keygen: bool,
    /// Encrypt with the keys of this nvs_keys file.
    #[arg(long, value_name = "KEYS.bin")]
    inputkey: Option<PathBuf>,
    #[command(flatten)]
    keygen_options: KeyGenOptions,
}

pub fn run(args: EncryptArgs) -> CmdResult<ExitCode> {
    let p = split_positionals(&args.args, args.out_dir.as_deref())?;
    if !args.keygen && args.inputkey.is_none() {
        return Err(CmdError::Usage(
            "give --keygen to create keys, or --inputkey KEYS.bin to use existing ones".into(),
        ));
    }
    if args.inputkey.is_some() && args.keygen_options.uses_hmac_options() {
        return Err(CmdError::Usage(
            "--inputkey already gives the keys; the HMAC options (--key-protect-hmac, --kp-hmac-*) only apply to --keygen"
                .into(),
        ));
    }
    if args.inputkey.is_some() && args.keygen_options.keyfile.is_some() {
        eprintln!("warning: --inputkey is given, so --keyfile is ignored");
    }
    // The output must not land on a key file: the image would replace the keys it can only
    // be decrypted with.
    let hmac = &args.keygen_options.hmac;
    let in_out_dir = |path: &PathBuf| match args.out_dir.as_deref() {
        Some(dir) if path.is_relative() => dir.join(path),
        _ => path.clone(),
    };
    let key_files: Vec<(PathBuf, &str)> = [
        (args.inputkey.clone(), "--inputkey key file"),
        (
            args.keygen_options.keyfile.as_ref().map(in_out_dir),
            "--keyfile",
        ),
        (hmac.kp_hmac_inputkey.clone(), "HMAC key file"),
        (
            args.keygen_options.kp_hmac_keyfile.as_ref().map(in_out_dir),
            "HMAC key file",
        ),
    ]
    .into_iter()
    .filter_map(|(path, what)| path.map(|p| (p, what)))
    .collect();
    refuse_output_over_inputs(
        &p.output,
        key_files.iter().map(|(path, what)| (path.as_path(), *what)),
    )?;
    warn_if_read_only(p.size);
    // Build (and so validate) the image before any key file is written.
    let image = build_from_csv(p.inputs, p.size, args.version)?;
    let (key, generated) = match &args.inputkey {
        Some(path) => (load_key(path)?, None),
        None => {
            let generated = generate_keys(&args.keygen_options, args.out_dir.as_deref())?;
            (generated.key.clone(), Some(generated))
        }
    };
    let written = image
        .finish_encrypted(&key)
        .map_err(CmdError::from)
        .and_then(|bytes| {
            write_atomic(&p.output, &bytes, None)
                .map(|()| bytes.len())
                .map_err(|e| CmdError::from(FileError::writing(&p.output)(e)))
        });
    let len = match written {
        Ok(len) => len,
        Err(e) => {
            // Keys for an image that was never written are of no use: leave nothing behind.
            if let Some(generated) = generated {
                generated.discard();
            }
            return Err(e);
        }
    };
    eprintln!(
        "Created encrypted NVS image `{}` ({} bytes, version {})",
        p.output.display(),
        len,
        args.version.number()
    );
    Ok(ExitCode::SUCCESS)
}
