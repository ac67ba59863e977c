//! The build-script API: `nvs_build::generate()` for the common case, [`Config`] for the rest.
//!
//! Images go to `$OUT_DIR/nvs/<partition>.bin` (written only when their bytes change), with a
//! `manifest.json` beside them that `cargo nvs` reads. All `cargo:` directives are printed by
//! [`CargoOutput`], each kind switchable.

use std::path::{Path, PathBuf};

use crate::error::Error;
use crate::manifest::Manifest;
use crate::metadata::{Metadata, PartitionSpec, TableSource};
use crate::resolve::{Inputs, PartitionImage, build_partition};

/// Generates the package's NVS images from `[package.metadata.nvs]`; on error prints
/// `error: nvs-build: …` and exits the build script with status 1.
///
/// ```no_run
/// // in build.rs's `main`:
/// nvs_build::generate();
/// ```
pub fn generate() {
    Config::new().generate();
}

/// Like [`generate`], returning the error instead of exiting.
pub fn try_generate() -> Result<Generated, Error> {
    Config::new().try_generate()
}

/// Which `cargo:` directives to print.
#[derive(Clone, Debug)]
pub(crate) struct CargoOutput {
    pub(crate) rerun_if_changed: bool,
    pub(crate) warnings: bool,
    pub(crate) rustc_env: bool,
}

impl Default for CargoOutput {
    fn default() -> Self {
        CargoOutput {
            rerun_if_changed: true,
            warnings: true,
            rustc_env: true,
        }
    }
}

impl CargoOutput {
    /// Printing any `rerun-if-changed` narrows cargo's default (rerun on any package file) to
    /// exactly the inputs listed.
    fn rerun_if_changed(&self, path: &Path) {
        if self.rerun_if_changed {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }

    fn rerun_if_env_changed(&self, var: &str) {
        if self.rerun_if_changed {
            println!("cargo:rerun-if-env-changed={var}");
        }
    }

    /// One `cargo:warning` per line: cargo shows only the first line of a multi-line one.
    fn warning(&self, message: &str) {
        if self.warnings {
            for line in message.lines() {
                println!("cargo:warning={line}");
            }
        }
    }

    fn rustc_env(&self, name: &str, value: &str) {
        if self.rustc_env {
            println!("cargo:rustc-env={name}={value}");
        }
    }
}

/// What a build produced.
#[derive(Clone, Debug, Default)]
pub struct Generated {
    /// One per partition in the metadata, in the order written there.
    pub images: Vec<GeneratedImage>,
    /// `$OUT_DIR/nvs/manifest.json`.
    pub manifest: PathBuf,
}

/// One partition's image (or why it was skipped).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GeneratedImage {
    /// The partition's name in the partition table.
    pub partition: String,
    /// The partition's offset in flash, from the table.
    pub offset: u32,
    /// The partition's size in bytes, from the table.
    pub size: u32,
    /// Factory data (flagged `readonly` in the table or `read-only` in the metadata), as
    /// opposed to user data.
    pub factory: bool,
    /// The image is encrypted.
    pub encrypted: bool,
    /// A key takes its value from the environment or per device (possibly a secret): the
    /// image file is created with mode 0600 on Unix.
    pub secret: bool,
    /// The image file, unless the partition was skipped.
    pub path: Option<PathBuf>,
    /// The nvs_keys file of a partition encrypted with the flash-encryption scheme (flashed
    /// into the table's `nvs_keys` partition); `None` otherwise.
    pub keys_file: Option<PathBuf>,
    /// Why the partition was skipped (a per-device value without a `dev` value), if it was.
    pub skipped: Option<String>,
    /// How full the image is, in percent of the entries the device can use.
    pub percent_full: Option<u32>,
}

/// Builder for the build-script API (prost-build / cc style): every input cargo provides can be
/// set explicitly; the environment is only the fallback.
#[derive(Clone, Debug, Default)]
pub struct Config {
    manifest_path: Option<PathBuf>,
    out_dir: Option<PathBuf>,
    cargo_output: CargoOutput,
}

impl Config {
    /// Everything from the environment, every directive printed: what [`generate()`] does.
    pub fn new() -> Config {
        Config::default()
    }

    /// The Cargo.toml to read [default: `$CARGO_MANIFEST_DIR/Cargo.toml`].
    pub fn manifest_path(&mut self, path: impl Into<PathBuf>) -> &mut Config {
        self.manifest_path = Some(path.into());
        self
    }

    /// Where `nvs/` goes [default: `$OUT_DIR`].
    pub fn out_dir(&mut self, path: impl Into<PathBuf>) -> &mut Config {
        self.out_dir = Some(path.into());
        self
    }

    /// Print `cargo:rerun-if-changed` / `rerun-if-env-changed` for every input [default: on].
    pub fn emit_rerun_if_changed(&mut self, on: bool) -> &mut Config {
        self.cargo_output.rerun_if_changed = on;
        self
    }

    /// Print `cargo:warning` lines [default: on].
    pub fn cargo_warnings(&mut self, on: bool) -> &mut Config {
        self.cargo_output.warnings = on;
        self
    }

    /// Print `cargo:rustc-env=NVS_<PARTITION>_BIN/_OFFSET/_SIZE` [default: on].
    pub fn emit_rustc_env(&mut self, on: bool) -> &mut Config {
        self.cargo_output.rustc_env = on;
        self
    }

    /// Generates the images; on error prints `error: nvs-build: …` and exits with status 1.
    pub fn generate(&mut self) -> Generated {
        match self.try_generate() {
            Ok(generated) => generated,
            Err(e) => {
                eprintln!("error: nvs-build: {e}");
                std::process::exit(1);
            }
        }
    }

    /// Generates the images and returns what was produced.
    pub fn try_generate(&mut self) -> Result<Generated, Error> {
        let manifest_path = match &self.manifest_path {
            Some(path) => path.clone(),
            None => env_path("CARGO_MANIFEST_DIR")?.join("Cargo.toml"),
        };
        let out_dir = match &self.out_dir {
            Some(path) => path.clone(),
            None => env_path("OUT_DIR")?,
        }
        .join("nvs");
        let out = &self.cargo_output;
        out.rerun_if_changed(&manifest_path);
        let Some(metadata) = Metadata::from_manifest(&manifest_path)? else {
            out.warning(&format!(
                "{}: no [package.metadata.nvs]; no NVS images to generate",
                manifest_path.display()
            ));
            // Images and a manifest from an earlier build would otherwise still be flashed.
            match std::fs::remove_dir_all(&out_dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(Error::new(
                        None,
                        None,
                        format!("cannot remove `{}`: {e}", out_dir.display()),
                    ));
                }
                _ => {}
            }
            return Ok(Generated::default());
        };
        if let Some(table) = metadata.table_source.path() {
            out.rerun_if_changed(table);
        }
        if let Some(config) = &metadata.espflash_config {
            out.rerun_if_changed(config);
        }
        let mut inputs = Inputs::new(|var| std::env::var(var).ok());
        let result = generate_images(&metadata, &out_dir, &mut inputs);
        // Even on error, tell cargo what to watch, so fixing an input reruns the script.
        for file in &inputs.deps.files {
            out.rerun_if_changed(file);
        }
        for var in &inputs.deps.env_vars {
            out.rerun_if_env_changed(var);
        }
        let images = result?;
        for image in &images {
            let prefix = format!("NVS_{}", env_name(&image.partition));
            if let Some(path) = &image.path {
                out.rustc_env(&format!("{prefix}_BIN"), &path.display().to_string());
            }
            out.rustc_env(&format!("{prefix}_OFFSET"), &format!("{:#x}", image.offset));
            out.rustc_env(&format!("{prefix}_SIZE"), &format!("{:#x}", image.size));
            if let Some(reason) = &image.skipped {
                out.warning(&format!(
                    "NVS partition `{}` not generated: {reason}",
                    image.partition
                ));
            }
            if let Some(percent) = image.percent_full.filter(|&p| p > 90 && !image.factory) {
                out.warning(&format!(
                    "NVS partition `{}` is {percent}% full; the device may run out of room when it writes (enlarge it in the partition table)",
                    image.partition
                ));
            }
        }
        if metadata.table_source == TableSource::BuiltInDefault {
            out.warning("no partition table configured: using ESP-IDF's default single-app table (nvs at 0x9000, 0x6000 bytes)");
        }
        let manifest = out_dir.join(Manifest::FILE_NAME);
        write_if_changed(
            &manifest,
            Manifest::of(&metadata, &images).to_json().as_bytes(),
        )?;
        Ok(Generated { images, manifest })
    }
}

/// Builds every partition of `metadata` into `out_dir/<partition>.bin` (written only when the
/// bytes change; private, mode 0600 on Unix, when a key comes from the environment or per
/// device). The pure path shared by build scripts and `cargo nvs generate`.
pub fn generate_images(
    metadata: &Metadata,
    out_dir: &Path,
    inputs: &mut Inputs<'_>,
) -> Result<Vec<GeneratedImage>, Error> {
    // Build every image before writing any, so an error leaves the output folder as it was.
    let mut built = Vec::new();
    for spec in &metadata.partitions {
        built.push((spec, build_partition(spec, &metadata.manifest_dir, inputs)?));
    }
    let mut images = Vec::new();
    for (spec, image) in built {
        images.push(match image {
            PartitionImage::Built(built) => {
                let path = out_dir.join(format!("{}.bin", spec.name));
                let secret = spec.holds_secrets();
                write_file_if_changed(&path, &built.bytes, secret)?;
                generated(spec, Some(path), None, Some(built.percent_full()), secret)
            }
            PartitionImage::Skipped { reason } => {
                generated(spec, None, Some(reason), None, spec.holds_secrets())
            }
        });
    }
    Ok(images)
}

fn generated(
    spec: &PartitionSpec,
    path: Option<PathBuf>,
    skipped: Option<String>,
    percent_full: Option<u32>,
    secret: bool,
) -> GeneratedImage {
    GeneratedImage {
        partition: spec.name.clone(),
        offset: spec.offset,
        size: spec.size,
        factory: spec.factory,
        encrypted: spec.encryption.is_some(),
        secret,
        keys_file: match &spec.encryption {
            Some((crate::metadata::EncryptionSpec::KeyFile(path), _)) => Some(path.clone()),
            _ => None,
        },
        path,
        skipped,
        percent_full,
    }
}

fn env_path(var: &str) -> Result<PathBuf, Error> {
    std::env::var_os(var).map(PathBuf::from).ok_or_else(|| {
        Error::new(None, None, format!("`{var}` is not set: nvs_build::generate() runs in a build script (or set it with Config)"))
    })
}

/// `fctry` → `FCTRY`, `my-nvs` → `MY_NVS`.
fn env_name(partition: &str) -> String {
    partition
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// Writes through a temporary file and a rename, and only when the bytes differ, so cargo and
/// tools watching the file see no change when there is none.
pub fn write_if_changed(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    write_file_if_changed(path, bytes, false)
}

/// [`write_if_changed`], `private` for a file that may hold secrets: on Unix it is private
/// (mode 0600) from its creation, before any byte is written, and an existing file with the
/// same bytes but a wider mode is made private without being rewritten.
fn write_file_if_changed(path: &Path, bytes: &[u8], private: bool) -> Result<(), Error> {
    let fail = |e: std::io::Error| {
        Error::new(
            None,
            None,
            format!("cannot write `{}`: {e}", path.display()),
        )
    };
    if std::fs::read(path).is_ok_and(|old| old == bytes) {
        if private {
            make_private(path).map_err(fail)?;
        }
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(fail)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    write_new_file(&tmp, bytes, private)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            fail(e)
        })
}

/// Creates `path` afresh (private: mode 0600 on Unix, from the start) and writes `bytes`.
fn write_new_file(path: &Path, bytes: &[u8], private: bool) -> std::io::Result<()> {
    use std::io::Write;
    // A leftover of a killed build (with the same process id) would keep its own mode.
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    options.open(path)?.write_all(bytes)
}

/// Takes group and other permissions off an existing file (Unix; elsewhere nothing to do).
fn make_private(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)?.permissions().mode();
        if mode & 0o077 != 0 {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}
