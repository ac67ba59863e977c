//! `cargo nvs dist`: release artifacts for a firmware project's CI and for the factory:
//! bootloader, partition table and app, an esptool `flash_args` file (`esptool write-flash
//! @flash_args`) and `manifest.json`. Same inputs, same bytes.
//!
//! A release reaches devices that already hold their factory data (certificate, secrets,
//! serial: made once per device) and user data, and the keys their encrypted NVS data is
//! readable with. So by default the NVS images and the nvs_keys file are neither in
//! `flash_args` nor in the folder (which then holds no development secrets); manifest.json
//! still lists them (offset, size, role) with `"file": null`. `--with-dev-data` puts them in,
//! for bench devices, as private files (0600).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use espflash::target::Chip;
use serde_json::json;

use super::error::{CmdError, CmdResult};
use cargo_nvs::artifacts::{BuildArgs, build_with_nvs};
use cargo_nvs::firmware::firmware_sha256;
use cargo_nvs::flashing::segments::{ImageArgs, Planned, Role, app_segments, nvs_segments};
use cargo_nvs::fsutil::{FileError, write_atomic};
use cargo_nvs::hex::sha256_hex;
use cargo_nvs::project::PackageArgs;

/// Build release artifacts: bootloader, partition table and app, `flash_args` and
/// `manifest.json`. The NVS images and nvs_keys are left out unless --with-dev-data.
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  cargo nvs dist\n  cargo nvs dist --chip esp32c3 --out-dir release/"
)]
pub struct DistArgs {
    #[command(flatten)]
    package: PackageArgs,
    #[command(flatten)]
    build: BuildArgs,
    #[command(flatten)]
    image: ImageArgs,
    /// The chip the firmware is for [default: the chip feature of the package's esp-hal (or
    /// other esp-* dependency), else the target triple, where it names one].
    #[arg(long, short = 'c', value_name = "CHIP")]
    chip: Option<String>,
    /// Where to put the artifacts [default: target/nvs-dist/<package>].
    #[arg(long = "out-dir", alias = "outdir", value_name = "DIR")]
    out_dir: Option<PathBuf>,
    /// Also write the NVS images (factory and user data, with their development values) and
    /// the nvs_keys file, and flash them with flash_args: for bench devices only, as flashing
    /// replaces a device's factory data, user data and keys.
    #[arg(long)]
    with_dev_data: bool,
}

/// The chip named by a feature of the package's `esp-hal` dependency (else of another `esp-*`
/// dependency), e.g. `esp-hal = { features = ["esp32c3"] }`.
fn chip_of_manifest(manifest: &std::path::Path) -> Option<Chip> {
    use toml::de::{DeTable, DeValue};
    let text = std::fs::read_to_string(manifest).ok()?;
    let root = DeTable::parse(&text).ok()?.into_inner();
    let DeValue::Table(deps) = root.get("dependencies")?.get_ref() else {
        return None;
    };
    let chip_of = |name: &str| -> Option<Chip> {
        let DeValue::Table(dep) = deps.get(name)?.get_ref() else {
            return None;
        };
        let DeValue::Array(features) = dep.get("features")?.get_ref() else {
            return None;
        };
        features.iter().find_map(|f| match f.get_ref() {
            DeValue::String(s) => s.parse::<Chip>().ok(),
            _ => None,
        })
    };
    chip_of("esp-hal").or_else(|| {
        deps.iter()
            .map(|(k, _)| k.get_ref().to_string())
            .filter(|k| k.starts_with("esp-"))
            .find_map(|k| chip_of(&k))
    })
}

/// The chip a target triple names, where it names exactly one.
fn chip_of_target(triple: &str) -> Option<Chip> {
    let name = triple.strip_prefix("xtensa-")?.split('-').next()?;
    name.parse().ok()
}

/// One segment of the release: the file it is (or would be) written to, and whether it is.
struct Artifact<'a> {
    segment: &'a Planned,
    file: String,
    included: bool,
}

/// The file name of each segment, and which go into the folder and flash_args: the device's
/// own data only `with_dev_data`.
fn artifacts<'a>(
    segments: &'a [Planned],
    app_name: &str,
    with_dev_data: bool,
) -> Vec<Artifact<'a>> {
    segments
        .iter()
        .map(|segment| {
            let file = match segment.role {
                Role::Bootloader => "bootloader.bin".to_owned(),
                Role::PartitionTable => "partition-table.bin".to_owned(),
                Role::App => format!("{app_name}.bin"),
                Role::NvsKeys => "nvs_keys.bin".to_owned(),
                Role::FactoryData | Role::UserData => format!("nvs-{}.bin", partition_of(segment)),
            };
            Artifact {
                segment,
                file,
                included: with_dev_data || !segment.role.is_device_data(),
            }
        })
        .collect()
}

/// esptool's `flash_args`: the flash settings, then `OFFSET FILE` per included segment.
fn flash_args(settings: &ImageArgs, artifacts: &[Artifact<'_>]) -> String {
    let mut text = format!(
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
    for a in artifacts.iter().filter(|a| a.included) {
        let _ = writeln!(text, "{:#x} {}", a.segment.addr, a.file);
    }
    text
}

/// manifest.json's entry for a segment. A segment left out has no file and no sha256: the
/// hash of an image whose other bytes are known would let anyone test guesses of its secrets.
fn manifest_entry(a: &Artifact<'_>) -> serde_json::Value {
    let s = a.segment;
    json!({
        "name": s.name,
        "role": s.role.as_str(),
        "file": a.included.then_some(&a.file),
        "in_flash_args": a.included,
        "offset": s.addr,
        "size": s.data.len(),
        "sha256": a.included.then(|| sha256_hex(&s.data)),
        "user_data": s.role == Role::UserData,
        "secret": s.secret,
    })
}

/// What a left-out segment is, for the message that says why it is left out.
fn left_out_reason(role: Role) -> &'static str {
    match role {
        Role::FactoryData => {
            "factory data: each device's own certificate, secrets and serial, which cannot be made again"
        }
        Role::UserData => "user data: what the device has stored since it was first flashed",
        _ => {
            "the key of the encrypted NVS partitions: new keys would make the device's encrypted data unreadable"
        }
    }
}

/// What the device's data in a segment is, in a word or two.
fn kind(role: Role) -> &'static str {
    match role {
        Role::FactoryData => "factory data",
        Role::UserData => "user data",
        _ => "NVS keys",
    }
}

/// Removes `path` if it exists; returns whether it did.
fn remove_stale(path: &Path) -> CmdResult<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(CmdError::StaleDevData {
            path: path.to_owned(),
            source,
        }),
    }
}

pub fn run(args: DistArgs) -> CmdResult<ExitCode> {
    let project = args.package.find()?;
    let metadata = project.nvs_metadata()?;
    let mut build = args.build.clone();
    build.release = true;
    let (elf, manifest) = build_with_nvs(&project, &build)?;
    let image = args.image.clone().with_espflash_settings()?;
    let detected = chip_of_manifest(&project.manifest_path)
        .or_else(|| args.build.target.as_deref().and_then(chip_of_target));
    let chip: Chip = match (&args.chip, detected) {
        (Some(name), _) => {
            cargo_nvs::flashing::parse_chip(name).map_err(|e| CmdError::Usage(e.to_string()))?
        }
        (None, Some(chip)) => chip,
        (None, None) => {
            return Err(CmdError::Usage(format!(
                "cannot tell the chip of `{}` (no esp-hal chip feature, no chip in the target \
                 triple): give it with --chip (esp32c3, esp32, …)",
                project.manifest_path.display()
            )));
        }
    };
    let elf = elf.ok_or_else(|| CmdError::Unusable(format!("`{}` has no binary", project.name)))?;
    let keys = metadata.table.nvs_keys().map(|p| (p.offset, p.size));
    let keys_name = metadata.table.nvs_keys().map(|p| p.name.clone());
    let mut segments = app_segments(
        &elf,
        chip,
        chip.default_xtal_frequency(),
        &image,
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
    let artifacts = artifacts(&segments, &app_name, args.with_dev_data);
    let mut removed = Vec::new();
    for a in &artifacts {
        let path = dist.join(&a.file);
        if a.included {
            // The device's data may hold secrets (development values, keys): private.
            let mode = a.segment.role.is_device_data().then_some(0o600);
            write_atomic(&path, &a.segment.data, mode).map_err(FileError::writing(&path))?;
        } else if remove_stale(&path)? {
            // Left by an earlier --with-dev-data run: the folder must not ship it.
            removed.push(a.file.as_str());
        }
    }
    let write = |name: &str, bytes: &[u8]| {
        let path = dist.join(name);
        write_atomic(&path, bytes, None).map_err(|e| CmdError::from(FileError::writing(&path)(e)))
    };
    write("flash_args", flash_args(&image, &artifacts).as_bytes())?;
    let doc = json!({
        "schema": "cargo-nvs/dist/v2",
        "package": project.name,
        "chip": chip.to_string(),
        "tools": {"cargo-nvs": env!("CARGO_PKG_VERSION"), "espflash": "4.7"},
        "with_dev_data": args.with_dev_data,
        // What `mfg flash --firmware` checks and the production log records with each device.
        "firmware_sha256": firmware_sha256(
            segments
                .iter()
                .filter(|s| !s.role.is_device_data())
                .map(|s| (s.addr, s.data.as_slice()))
        ),
        "segments": artifacts.iter().map(manifest_entry).collect::<Vec<_>>(),
    });
    write(
        "manifest.json",
        format!("{}\n", serde_json::to_string_pretty(&doc)?).as_bytes(),
    )?;

    let device_data: Vec<&Artifact<'_>> = artifacts
        .iter()
        .filter(|a| a.segment.role.is_device_data())
        .collect();
    if args.with_dev_data && !device_data.is_empty() {
        eprintln!(
            "warning: --with-dev-data: flash_args writes {} with development values, replacing what a device holds there; \
             for bench devices only. The folder holds development data (those files are mode 0600): do not ship it",
            device_data
                .iter()
                .map(|a| format!(
                    "{} ({})",
                    describe(a.segment, keys_name.as_deref()),
                    kind(a.segment.role)
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
    } else if !device_data.is_empty() {
        eprintln!(
            "Left out of flash_args and the folder (devices in the field already hold this data; flashing would replace it):"
        );
        for a in &device_data {
            eprintln!(
                "  {} at {:#x} ({})",
                describe(a.segment, keys_name.as_deref()),
                a.segment.addr,
                left_out_reason(a.segment.role)
            );
        }
        eprintln!(
            "  manifest.json lists them with \"file\": null. To include them for a bench device, run dist with --with-dev-data"
        );
        if !removed.is_empty() {
            eprintln!(
                "  Removed {} of an earlier --with-dev-data run",
                removed
                    .iter()
                    .map(|f| format!("`{f}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    eprintln!(
        "Wrote {} image(s), flash_args and manifest.json to `{}` (flash with: esptool --chip {chip} write-flash @flash_args, from that folder)",
        artifacts.iter().filter(|a| a.included).count(),
        dist.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// The NVS partition an NVS segment is for (its name is "nvs `NAME`").
fn partition_of(segment: &Planned) -> &str {
    segment
        .name
        .strip_prefix("nvs `")
        .and_then(|n| n.strip_suffix('`'))
        .unwrap_or(&segment.name)
}

/// "partition `fctry`", or "partition `nvs_keys` (the nvs_keys file)", for messages.
fn describe(segment: &Planned, keys_partition: Option<&str>) -> String {
    match segment.role {
        Role::NvsKeys => format!(
            "partition `{}` (the nvs_keys file)",
            keys_partition.unwrap_or("nvs_keys")
        ),
        _ => format!("partition `{}`", partition_of(segment)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(name: &str, addr: u32, role: Role) -> Planned {
        Planned {
            name: name.to_owned(),
            addr,
            data: vec![0xAB; 16],
            role,
            secret: role.is_device_data() && role != Role::UserData,
            keyed: false,
        }
    }

    fn release() -> Vec<Planned> {
        vec![
            segment("bootloader", 0x0, Role::Bootloader),
            segment("partition table", 0x8000, Role::PartitionTable),
            segment("app", 0x20000, Role::App),
            segment("nvs `fctry`", 0xf000, Role::FactoryData),
            segment("nvs `nvs`", 0x9000, Role::UserData),
            segment("nvs_keys", 0x11000, Role::NvsKeys),
        ]
    }

    #[test]
    fn device_data_and_keys_stay_out_of_a_default_release() {
        let segments = release();
        let artifacts = artifacts(&segments, "fw", false);
        assert_eq!(
            flash_args(&ImageArgs::default(), &artifacts),
            "--flash-mode keep --flash-freq keep --flash-size keep\n\
             0x0 bootloader.bin\n0x8000 partition-table.bin\n0x20000 fw.bin\n"
        );
        let entries: Vec<serde_json::Value> = artifacts.iter().map(manifest_entry).collect();
        let roles: Vec<&str> = entries
            .iter()
            .map(|e| e["role"].as_str().unwrap())
            .collect();
        assert_eq!(
            roles,
            [
                "bootloader",
                "partition-table",
                "app",
                "factory-data",
                "user-data",
                "nvs-keys"
            ]
        );
        for entry in &entries[3..] {
            assert_eq!(entry["in_flash_args"], false, "{entry}");
            assert!(
                entry["file"].is_null() && entry["sha256"].is_null(),
                "{entry}"
            );
            assert_eq!(entry["size"], 16);
        }
        assert_eq!(entries[5]["offset"], 0x11000);
        assert_eq!(entries[2]["file"], "fw.bin");
    }

    #[test]
    fn with_dev_data_everything_is_flashed() {
        let segments = release();
        let artifacts = artifacts(&segments, "fw", true);
        let args = flash_args(&ImageArgs::default(), &artifacts);
        for line in [
            "0xf000 nvs-fctry.bin",
            "0x9000 nvs-nvs.bin",
            "0x11000 nvs_keys.bin",
        ] {
            assert!(args.contains(line), "{args}");
        }
        let entries: Vec<serde_json::Value> = artifacts.iter().map(manifest_entry).collect();
        assert!(
            entries
                .iter()
                .all(|e| e["in_flash_args"] == true && e["file"].is_string())
        );
        assert_eq!(entries[3]["user_data"], false);
        assert_eq!(entries[4]["user_data"], true);
    }
}
