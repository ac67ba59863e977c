//! `cargo nvs flash`: build the app, then write bootloader, partition table, app and every NVS
//! image in one connection and one `write_bins_to_flash` call (the ROM loader reboots after
//! each call).

use std::path::PathBuf;
use std::process::ExitCode;

use super::error::{CmdError, CmdResult};
use super::monitor::{MonitorOptions, monitor};
use cargo_nvs::artifacts::{BuildArgs, build_with_nvs, manifest_metadata, manifest_of_runner};
use cargo_nvs::flashing::protect::{Identities, data_partitions, write_guarded};
use cargo_nvs::flashing::segments::{ImageArgs, app_segments, nvs_segments};
use cargo_nvs::flashing::{ConnectArgs, connect};
use cargo_nvs::fsutil::FileError;
use cargo_nvs::guard::Allow;
use cargo_nvs::project::PackageArgs;

/// Build the app and flash it together with its NVS partitions, in one pass.
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  cargo nvs flash --release --monitor\n  cargo nvs flash --nvs-only --port /dev/ttyUSB0\n  runner = \"cargo nvs flash --elf --monitor\"   (in .cargo/config.toml: `cargo run` flashes and monitors)"
)]
pub struct FlashArgs {
    #[command(flatten)]
    pub package: PackageArgs,
    #[command(flatten)]
    pub build: BuildArgs,
    #[command(flatten)]
    pub connect: ConnectArgs,
    #[command(flatten)]
    pub image: ImageArgs,
    /// Flash this ELF instead of building (for `runner = "cargo nvs flash --elf --monitor"` in
    /// .cargo/config.toml: cargo appends the ELF's path, which may follow other options).
    #[arg(long, value_name = "ELF", num_args = 0..=1, default_missing_value = "-")]
    pub elf: Option<PathBuf>,
    /// The ELF, as cargo appends it after `--elf --monitor` (runner mode).
    #[arg(value_name = "ELF_PATH", hide = true)]
    pub elf_path: Option<PathBuf>,
    /// Show the application's serial output after flashing (Ctrl-R resets, Ctrl-C exits).
    #[arg(long, short = 'M')]
    pub monitor: bool,
    #[command(flatten)]
    pub monitor_options: MonitorOptions,
    /// Skip the MD5 check after writing.
    #[arg(long)]
    pub no_verify: bool,
    /// Write segments even when the flash already holds the same bytes.
    #[arg(long)]
    pub no_skip: bool,
    /// Flash only the NVS partitions, not bootloader, partition table and app.
    #[arg(long)]
    pub nvs_only: bool,
    /// Flash only these NVS partitions [default: all of the package's].
    #[arg(long = "partition", value_name = "NAME")]
    pub partitions: Vec<String>,
    /// Overwrite user-data partitions even when the device already holds data there.
    #[arg(long, conflicts_with = "keep_user_data")]
    pub reset_user_data: bool,
    /// Keep user-data partitions that the device holds damaged, as they are (without this, a
    /// damaged user-data partition stops the flash).
    #[arg(long)]
    pub keep_user_data: bool,
    /// Replace factory data the device holds (a production identity, foreign or damaged data);
    /// without this it is kept. Certificates and secrets cannot be recreated.
    #[arg(long)]
    pub overwrite_factory_data: bool,
}

pub fn run(mut args: FlashArgs) -> CmdResult<ExitCode> {
    // `--elf PATH`, `--elf --monitor PATH` (cargo's runner), or `flash PATH`.
    args.elf = match (args.elf.take(), args.elf_path.take()) {
        (Some(elf), None) if elf.as_os_str() == "-" => {
            return Err(CmdError::Usage(
                "--elf needs the ELF's path (cargo appends it when `cargo nvs flash --elf` is the \
                 runner in .cargo/config.toml)"
                    .into(),
            ));
        }
        (Some(elf), Some(image)) if elf.as_os_str() != "-" => {
            return Err(CmdError::Usage(format!(
                "two ELFs given: `{}` and `{}`; flash one",
                elf.display(),
                image.display()
            )));
        }
        (Some(_), Some(image)) | (None, Some(image)) => Some(image),
        (elf, None) => elf,
    };
    let (elf, manifest, package_name) = match &args.elf {
        // As cargo's runner the app is built already: flash it with that build's images.
        Some(elf) => {
            if args.build.release || args.build.features.is_some() || args.build.bin.is_some() {
                eprintln!(
                    "note: --release, --features and --bin do not apply with --elf: cargo built \
                     the app already, and its build's NVS images are flashed"
                );
            }
            let manifest = manifest_of_runner()?;
            (Some(elf.clone()), manifest, None)
        }
        None => {
            let project = args.package.find()?;
            let (elf, manifest) = build_with_nvs(&project, &args.build)?;
            (elf, manifest, Some(project.name))
        }
    };
    let metadata = manifest_metadata(&manifest)?;
    args.image = args.image.clone().with_espflash_settings()?;
    let keys_partition = metadata.table.nvs_keys().map(|p| (p.offset, p.size));
    let mut segments = nvs_segments(&manifest.images, &args.partitions, keys_partition)?;
    // Decide what may be written before anything is built for the chip or read from it.
    let data = data_partitions(&metadata, &manifest.images)?;

    let mut flasher = connect(&args.connect, !args.no_verify, !args.no_skip)?;
    let elf_for_monitor = elf.clone();
    let chip = flasher.chip();
    let info = flasher
        .device_info()
        .map_err(CmdError::chip("cannot read the chip's details"))?;
    eprintln!(
        "Connected: {chip}{}, {} flash{}",
        info.revision
            .map_or(String::new(), |(a, b)| format!(" rev v{a}.{b}")),
        info.flash_size,
        info.mac_address
            .as_deref()
            .map_or(String::new(), |m| format!(", MAC {m}"))
    );
    if !args.nvs_only {
        let elf = elf.ok_or_else(|| {
            CmdError::Usage(format!(
                "`{}` has no binary to flash (use --nvs-only)",
                package_name.as_deref().unwrap_or("the package")
            ))
        })?;
        let xtal = chip
            .xtal_frequency(flasher.connection())
            .map_err(CmdError::chip("cannot read the crystal frequency"))?;
        let mut app = app_segments(
            &elf,
            chip,
            xtal,
            &args.image,
            manifest.partition_table.as_deref(),
            &manifest.images,
            keys_partition,
        )?;
        app.append(&mut segments);
        segments = app;
    }
    let flash_size = args.image.flash_size.unwrap_or(info.flash_size).size();
    let allow = Allow {
        overwrite_factory_data: args.overwrite_factory_data,
        reset_user_data: args.reset_user_data,
        keep_user_data: args.keep_user_data,
    };
    let identities = Identities::new(&metadata.manifest_path, info.mac_address.clone());
    let written = write_guarded(
        &mut flasher,
        segments,
        &data,
        allow,
        &identities,
        flash_size,
        !args.connect.no_stub,
    )?;
    eprintln!(
        "Flashed {} segment(s), {} unchanged and skipped{}",
        written.written,
        written.skipped,
        if written.kept.is_empty() {
            String::new()
        } else {
            format!(", {} kept as the device holds them", written.kept.len())
        }
    );
    if !args.monitor {
        return Ok(ExitCode::SUCCESS);
    }
    let Some(flasher) = flasher.into_flasher() else {
        return Ok(ExitCode::SUCCESS);
    };
    let serial = flasher.into_connection().into_serial();
    let port = serialport::SerialPort::name(&serial).unwrap_or_else(|| "the port".to_owned());
    let elf = match &elf_for_monitor {
        Some(path) => {
            Some(std::fs::read(path).map_err(|e| FileError::new("read the ELF", path, e))?)
        }
        None => None,
    };
    // espflash's `--after` reset (or the ROM loader's reboot) started the application.
    monitor(serial, &port, elf.as_deref(), &args.monitor_options, false)
}
