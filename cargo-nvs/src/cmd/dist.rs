//! `cargo nvs dist`: release artifacts for a firmware project's CI and for the factory:
//! bootloader, partition table, app and every NVS image, an esptool `flash_args` file
//! (`esptool write-flash @flash_args`) and `manifest.json`. Same inputs, same bytes.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use espflash::target::Chip;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::flash::{ImageArgs, app_segments, nvs_segments};
use crate::artifacts::{BuildArgs, build_with_nvs};
use crate::fsutil::write_atomic;
use crate::project::PackageArgs;
use crate::{CliError, CliResult};

/// Build release artifacts: every image to flash, `flash_args` and `manifest.json`.
#[derive(clap::Args)]
pub struct DistArgs {
    #[command(flatten)]
    package: PackageArgs,
    #[command(flatten)]
    build: BuildArgs,
    #[command(flatten)]
    image: ImageArgs,
    /// The chip the firmware is for [default: from the target triple, where it names one].
    #[arg(long, short = 'c', value_name = "CHIP")]
    chip: Option<String>,
    /// Where to put the artifacts [default: target/nvs-dist/<package>].
    #[arg(long = "out-dir", alias = "outdir", value_name = "DIR")]
    out_dir: Option<PathBuf>,
}

/// The chip a target triple names, where it names exactly one.
fn chip_of_target(triple: &str) -> Option<Chip> {
    let name = triple.strip_prefix("xtensa-")?.split('-').next()?;
    name.parse().ok()
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data).iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

pub fn run(args: DistArgs) -> CliResult<ExitCode> {
    let project = args.package.find()?;
    let metadata = project.nvs_metadata()?;
    let mut build = args.build.clone();
    build.release = true;
    let (elf, manifest) = build_with_nvs(&project, &build)?;
    let chip: Chip = match (
        &args.chip,
        args.build.target.as_deref().and_then(chip_of_target),
    ) {
        (Some(name), _) => name
            .parse()
            .map_err(|_| CliError(format!("unknown chip `{name}`")))?,
        (None, Some(chip)) => chip,
        (None, None) => {
            return Err(CliError(
                "give the chip with --chip (esp32c3, esp32, …)".into(),
            ));
        }
    };
    let elf = elf.ok_or_else(|| CliError(format!("`{}` has no binary", project.name)))?;
    let keys = metadata.table.nvs_keys().map(|p| (p.offset, p.size));
    let mut segments = app_segments(
        &elf,
        chip,
        chip.default_xtal_frequency(),
        &args.image,
        manifest.partition_table.as_deref(),
        &manifest.images,
        keys,
    )?;
    segments.extend(nvs_segments(&manifest.images, &[], keys)?);

    let dist = args
        .out_dir
        .clone()
        .unwrap_or_else(|| project.target_dir.join("nvs-dist").join(&project.name));
    let app_name = elf
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "app".into());
    let settings = &args.image;
    let mut flash_args = format!(
        "--flash-mode {} --flash-freq {} --flash-size {}\n",
        settings
            .flash_mode
            .map_or("keep".to_owned(), |m| format!("{m:?}").to_lowercase()),
        settings.flash_freq.map_or("keep".to_owned(), |f| f
            .to_string()
            .to_lowercase()
            .replace("mhz", "m")),
        settings
            .flash_size
            .map_or("keep".to_owned(), |s| match s.size() {
                size if size < 1024 * 1024 => format!("{}KB", size / 1024),
                size => format!("{}MB", size / (1024 * 1024)),
            })
    );
    let mut files = Vec::new();
    for segment in &segments {
        let file = match segment.name.as_str() {
            "bootloader" => "bootloader.bin".to_owned(),
            "partition table" => "partition-table.bin".to_owned(),
            "app" => format!("{app_name}.bin"),
            "nvs_keys" => "nvs_keys.bin".to_owned(),
            other => format!(
                "nvs-{}.bin",
                other.trim_start_matches("nvs `").trim_end_matches('`')
            ),
        };
        let mode = (file == "nvs_keys.bin").then_some(0o600);
        write_atomic(&dist.join(&file), &segment.data, mode).map_err(|e| {
            CliError(format!(
                "cannot write `{}`: {e}",
                dist.join(&file).display()
            ))
        })?;
        let _ = writeln!(flash_args, "{:#x} {file}", segment.addr);
        files.push(json!({
            "name": segment.name,
            "file": file,
            "offset": segment.addr,
            "size": segment.data.len(),
            "sha256": sha256_hex(&segment.data),
            "user_data": segment.user_data,
        }));
    }
    let write = |name: &str, bytes: &[u8]| {
        let path = dist.join(name);
        write_atomic(&path, bytes, None)
            .map_err(|e| CliError(format!("cannot write `{}`: {e}", path.display())))
    };
    write("flash_args", flash_args.as_bytes())?;
    let doc = json!({
        "schema": "cargo-nvs/dist/v1",
        "package": project.name,
        "chip": chip.to_string(),
        "tools": {"cargo-nvs": env!("CARGO_PKG_VERSION"), "espflash": "4.7"},
        "segments": files,
    });
    write(
        "manifest.json",
        format!("{}\n", serde_json::to_string_pretty(&doc)?).as_bytes(),
    )?;
    eprintln!(
        "Wrote {} image(s), flash_args and manifest.json to `{}` (flash with: esptool --chip {chip} write-flash @flash_args, from that folder)",
        segments.len(),
        dist.display()
    );
    Ok(ExitCode::SUCCESS)
}
