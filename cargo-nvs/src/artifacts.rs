//! Building the firmware with cargo and finding what the build produced: the ELF and the NVS
//! images nvs-build wrote into the build script's OUT_DIR (with their manifest).

use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use cargo_metadata::Message;
use nvs_build::manifest::{Manifest, ManifestError};

use crate::project::Project;

/// Why the build or its NVS manifest cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// The build is not usable as it is (the message says what to do).
    #[error("{0}")]
    Invalid(String),
    /// Running cargo failed (`what`: "run cargo", "read cargo's output", …).
    #[error("cannot {what}: {source}")]
    Cargo {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read `{}` ({source}); does the package's build.rs call nvs_build::generate()?", path.display())]
    NoManifest {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{}`: {source}", path.display())]
    ManifestJson {
        path: PathBuf,
        #[source]
        source: ManifestError,
    },
    #[error(transparent)]
    Metadata(#[from] nvs_build::InputError),
}

/// Options that select what cargo builds, as `cargo build` spells them.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct BuildArgs {
    /// Build with the release profile.
    #[arg(long)]
    pub release: bool,
    /// The binary to flash, when the package has several.
    #[arg(long, value_name = "NAME")]
    pub bin: Option<String>,
    /// Target triple to build for [default: the package's .cargo/config.toml].
    #[arg(long, value_name = "TRIPLE")]
    pub target: Option<String>,
    /// Space or comma separated features to activate.
    #[arg(long, short = 'F', value_name = "FEATURES")]
    pub features: Option<String>,
}

/// What one `cargo build` produced for the selected package.
pub struct Built {
    /// The app's ELF (`None` if the package has no binary).
    pub elf: Option<PathBuf>,
    /// The package build script's OUT_DIR, if it has a build script.
    pub out_dir: Option<PathBuf>,
}

/// Runs `$CARGO build --message-format=json` for the package (cargo's own progress and errors
/// go to the terminal) and collects the ELF and the build script's OUT_DIR.
pub fn cargo_build(project: &Project, args: &BuildArgs) -> Result<Built, ArtifactError> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--message-format=json-render-diagnostics",
        "--manifest-path",
    ])
    .arg(&project.manifest_path);
    if args.release {
        cmd.arg("--release");
    }
    if let Some(bin) = &args.bin {
        cmd.args(["--bin", bin]);
    }
    if let Some(target) = &args.target {
        cmd.args(["--target", target]);
    }
    if let Some(features) = &args.features {
        cmd.args(["--features", features]);
    }
    // Run from the package folder so its .cargo/config.toml (target, runner, linker) applies.
    if let Some(dir) = project.manifest_path.parent() {
        cmd.current_dir(dir);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|source| ArtifactError::Cargo {
            what: "run cargo",
            source,
        })?;
    let stdout = child.stdout.take().expect("piped stdout");
    let mut elves = Vec::new();
    let mut out_dir = None;
    for message in Message::parse_stream(BufReader::new(stdout)) {
        let message = match message {
            Ok(message) => message,
            Err(e) => {
                // Don't leave cargo running behind an error.
                let _ = child.kill();
                let _ = child.wait();
                return Err(ArtifactError::Cargo {
                    what: "read cargo's output",
                    source: e,
                });
            }
        };
        match message {
            Message::CompilerArtifact(artifact) if artifact.package_id == project.id => {
                if let Some(exe) = artifact.executable {
                    elves.push((artifact.target.name.clone(), exe.into_std_path_buf()));
                }
            }
            Message::BuildScriptExecuted(script) if script.package_id == project.id => {
                out_dir = Some(script.out_dir.into_std_path_buf());
            }
            _ => {}
        }
    }
    let status = child.wait().map_err(|source| ArtifactError::Cargo {
        what: "wait for cargo",
        source,
    })?;
    if !status.success() {
        return Err(ArtifactError::Invalid(format!(
            "cargo build failed ({status})"
        )));
    }
    let elf = match elves.as_slice() {
        [] => None,
        [(_, elf)] => Some(elf.clone()),
        many => {
            return Err(ArtifactError::Invalid(format!(
                "`{}` has several binaries ({}); pick one with --bin",
                project.name,
                many.iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    };
    Ok(Built { elf, out_dir })
}

/// Builds the package and reads the NVS manifest its build script wrote: the ELF (if any) and
/// the images.
pub fn build_with_nvs(
    project: &Project,
    args: &BuildArgs,
) -> Result<(Option<PathBuf>, Manifest), ArtifactError> {
    let built = cargo_build(project, args)?;
    let out_dir = built.out_dir.ok_or_else(|| {
        ArtifactError::Invalid(format!(
            "`{}` has no build script; add one that calls nvs_build::generate()",
            project.name
        ))
    })?;
    Ok((built.elf, read_manifest(&out_dir)?))
}

/// As cargo's runner (`cargo run` with `runner = "cargo nvs flash --elf"`): the manifest of the
/// build cargo just made, from the `OUT_DIR` cargo sets for the runner of a package with a
/// build script. Never builds anything.
pub fn manifest_of_runner() -> Result<Manifest, ArtifactError> {
    match std::env::var_os("OUT_DIR") {
        Some(out_dir) if !out_dir.is_empty() => read_manifest(Path::new(&out_dir)),
        _ => Err(ArtifactError::Invalid(
            "--elf runs as cargo's runner: it flashes the ELF cargo built with the NVS images \
             of that same build, from $OUT_DIR/nvs/manifest.json, but OUT_DIR is not set. \
             Cargo sets it for `cargo run` when the package has a build script: add a \
             build.rs that calls nvs_build::generate(). Outside `cargo run`, use `cargo nvs \
             flash` without --elf (it builds the package)"
                .into(),
        )),
    }
}

/// The package's NVS metadata, read from the Cargo.toml the manifest's images were made from.
pub fn manifest_metadata(
    manifest: &Manifest,
) -> Result<nvs_build::metadata::Metadata, ArtifactError> {
    let path = manifest.manifest_path.as_deref().ok_or_else(|| {
        ArtifactError::Invalid(
            "the build's NVS manifest does not name its Cargo.toml (made by an older \
             nvs-build); rebuild the package"
                .into(),
        )
    })?;
    nvs_build::metadata::Metadata::from_manifest(path)?.ok_or_else(|| {
        ArtifactError::Invalid(format!(
            "`{}` has no [package.metadata.nvs] any more; rebuild the package",
            path.display()
        ))
    })
}

/// nvs-build's `$OUT_DIR/nvs/manifest.json` of `out_dir`.
pub fn read_manifest(out_dir: &Path) -> Result<Manifest, ArtifactError> {
    let path = Manifest::path_in(out_dir);
    let text = std::fs::read_to_string(&path).map_err(|source| ArtifactError::NoManifest {
        path: path.clone(),
        source,
    })?;
    Manifest::parse(&text).map_err(|source| match source {
        ManifestError::Json { .. } => ArtifactError::ManifestJson { path, source },
        ManifestError::Schema => ArtifactError::Invalid(format!(
            "`{}` is not an nvs-build manifest this cargo-nvs understands",
            path.display()
        )),
        // A field missing or out of range would put an image at the wrong address.
        ManifestError::Malformed { field } => ArtifactError::Invalid(format!(
            "`{}` is malformed (`{field}`); rebuild the package (cargo clean -p …) to rewrite it",
            path.display()
        )),
    })
}
