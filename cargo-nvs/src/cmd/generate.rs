//! `cargo nvs generate INPUT... OUTPUT SIZE`: a drop-in for
//! `python -m esp_idf_nvs_partition_gen generate`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use nvs_build::format::{PartitionSize, Version};
use nvs_build::{FileBase, ImageInput};

use nvs_build::config::generate_images;
use nvs_build::metadata::TableSource;
use nvs_build::resolve::Inputs;

use super::error::{CmdError, CmdResult};
use cargo_nvs::fsutil::{FileError, refuse_output_over_inputs, write_atomic};
use cargo_nvs::project::{PackageArgs, display_path};
use cargo_nvs::size::{parse_size, parse_version, warn_if_read_only};

/// Generate NVS partition images: from the package's `[package.metadata.nvs]` (no arguments),
/// or from CSV files like Espressif's generator (`INPUT... OUTPUT SIZE`).
#[derive(clap::Args)]
#[command(override_usage = "cargo nvs generate [OPTIONS] [INPUT... OUTPUT SIZE]")]
#[command(
    after_help = "Examples:\n  cargo nvs generate                          (every NVS partition of [package.metadata.nvs])\n  cargo nvs generate nvs.csv nvs.bin 0x6000   (like Espressif's nvs_partition_gen.py)"
)]
#[command(disable_version_flag = true)]
pub struct GenerateArgs {
    /// CSV files, then the output image, then the partition size (hex like 0x6000, or decimal).
    /// Without them, every NVS partition of the package's metadata is generated.
    #[arg(value_name = "INPUT... OUTPUT SIZE")]
    args: Vec<PathBuf>,
    #[command(flatten)]
    package: PackageArgs,
    /// NVS format version: 2 has multi-page blobs (default), 1 is the legacy format. (In
    /// metadata mode each partition's `version` decides.)
    #[arg(long, value_name = "1|2", value_parser = parse_version)]
    version: Option<Version>,
    /// Folder the output path is relative to [metadata mode default: target/nvs/<package>].
    #[arg(long = "out-dir", alias = "outdir", value_name = "DIR")]
    out_dir: Option<PathBuf>,
}

/// The largest flash of any ESP chip: no partition can be larger.
pub const MAX_PARTITION_SIZE: u64 = 128 << 20;

/// The positional arguments split into inputs, output and size.
pub struct Positionals<'a> {
    pub inputs: &'a [PathBuf],
    pub output: PathBuf,
    pub size: PartitionSize,
}

pub fn split_positionals<'a>(
    args: &'a [PathBuf],
    out_dir: Option<&Path>,
) -> CmdResult<Positionals<'a>> {
    let [inputs @ .., output, size] = args else {
        return Err(CmdError::Usage("give INPUT... OUTPUT SIZE".into()));
    };
    if inputs.is_empty() {
        return Err(CmdError::Usage(
            "give at least one INPUT csv file before OUTPUT and SIZE".into(),
        ));
    }
    let size_text = size.to_string_lossy();
    let bytes = parse_size(&size_text)?;
    if bytes > MAX_PARTITION_SIZE {
        return Err(CmdError::Usage(format!(
            "SIZE {size_text} is larger than 128 MiB (0x8000000), the largest flash of any ESP chip; \
             give the NVS partition's size from the partition table (typically 0x6000)"
        )));
    }
    let size =
        PartitionSize::new(bytes).map_err(|e| CmdError::Usage(format!("SIZE {size_text}: {e}")))?;
    let output = match out_dir {
        Some(dir) if output.is_relative() => dir.join(output),
        _ => output.clone(),
    };
    refuse_output_over_inputs(&output, inputs.iter().map(|i| (i.as_path(), "INPUT")))?;
    Ok(Positionals {
        inputs,
        output,
        size,
    })
}

/// Builds the image from CSV inputs, as the reference does (paths relative to the current
/// directory).
pub fn build_from_csv(
    inputs: &[PathBuf],
    size: PartitionSize,
    version: Version,
) -> CmdResult<ImageInput> {
    let mut image = ImageInput::new(size, version);
    for input in inputs {
        image.add_csv_file(input, &FileBase::CurrentDir)?;
    }
    Ok(image)
}

pub fn run(args: GenerateArgs) -> CmdResult<ExitCode> {
    if args.args.is_empty() {
        if args.version.is_some() {
            return Err(CmdError::Usage(
                "--version applies to CSV inputs; in Cargo metadata, set `version = 1` on the partition".into(),
            ));
        }
        return run_from_metadata(&args);
    }
    let version = args.version.unwrap_or(Version::V2);
    if args.package.package.is_some() || args.package.manifest_path.is_some() {
        return Err(CmdError::Usage(
            "-p/--manifest-path select Cargo metadata; leave out INPUT... OUTPUT SIZE to use it"
                .into(),
        ));
    }
    let p = split_positionals(&args.args, args.out_dir.as_deref())?;
    warn_if_read_only(p.size);
    let image = build_from_csv(p.inputs, p.size, version)?;
    let pages = image.pages_used();
    let bytes = image.finish()?;
    write_atomic(&p.output, &bytes, None).map_err(FileError::writing(&p.output))?;
    eprintln!(
        "Created NVS image `{}` ({} bytes, version {}, {} of {} data page(s) used)",
        p.output.display(),
        bytes.len(),
        version.number(),
        pages,
        p.size.data_pages()
    );
    Ok(ExitCode::SUCCESS)
}

/// `cargo nvs generate` with no arguments: the same images build.rs makes, into
/// `target/nvs/<package>/` or `--out-dir`.
fn run_from_metadata(args: &GenerateArgs) -> CmdResult<ExitCode> {
    let project = args.package.find()?;
    let metadata = project.nvs_metadata()?;
    if metadata.table_source == TableSource::BuiltInDefault {
        eprintln!(
            "note: no partition table configured: using ESP-IDF's default single-app table (nvs at 0x9000, 0x6000 bytes)"
        );
    }
    let out_dir = args
        .out_dir
        .clone()
        .unwrap_or_else(|| project.default_out_dir());
    let mut inputs = Inputs::new(|var| std::env::var(var).ok());
    let images = generate_images(&metadata, &out_dir, &mut inputs)?;
    if args.out_dir.is_none() {
        // target/nvs/<package>/ is ours: an image of a partition that the metadata no longer
        // has (or that was skipped this time) is stale.
        let current: Vec<&Path> = images.iter().filter_map(|i| i.path.as_deref()).collect();
        for entry in std::fs::read_dir(&out_dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "bin") && !current.contains(&path.as_path()) {
                match std::fs::remove_file(&path) {
                    Ok(()) => eprintln!(
                        "Removed `{}`: its partition is not generated any more",
                        display_path(&path)
                    ),
                    Err(e) => eprintln!("warning: cannot remove stale `{}`: {e}", path.display()),
                }
            }
        }
    }
    for image in &images {
        match (&image.path, &image.skipped) {
            (Some(path), _) => eprintln!(
                "Generated `{}` for partition `{}` ({} data, offset {:#x}, size {:#x}, {}% full)",
                display_path(path),
                image.partition,
                if image.factory { "factory" } else { "user" },
                image.offset,
                image.size,
                image.percent_full.unwrap_or(0)
            ),
            (None, Some(reason)) => {
                eprintln!("warning: partition `{}` skipped: {reason}", image.partition)
            }
            (None, None) => {}
        }
    }
    Ok(ExitCode::SUCCESS)
}
