//! Finding the package to work on, the way cargo subcommands do (`-p`, `--manifest-path`).

use std::path::{Path, PathBuf};

use cargo_metadata::{MetadataCommand, Package};

/// Why the package cannot be found or its metadata read.
#[derive(Debug, thiserror::Error)]
pub enum ProjectError {
    /// No single package to work on, or one without NVS metadata (the message says what to do).
    #[error("{0}")]
    Invalid(String),
    #[error("cannot read the cargo workspace: {0}")]
    Workspace(#[source] cargo_metadata::Error),
    #[error(transparent)]
    Metadata(#[from] nvs_build::InputError),
}

/// `-p/--package` and `--manifest-path`, as every cargo command spells them.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct PackageArgs {
    /// Package whose `[package.metadata.nvs]` to use.
    #[arg(short = 'p', long, value_name = "SPEC")]
    pub package: Option<String>,
    /// Path to Cargo.toml.
    #[arg(long, value_name = "PATH")]
    pub manifest_path: Option<PathBuf>,
}

/// The selected package and the workspace's target directory.
pub struct Project {
    pub name: String,
    pub id: cargo_metadata::PackageId,
    pub manifest_path: PathBuf,
    pub target_dir: PathBuf,
}

impl PackageArgs {
    pub fn find(&self) -> Result<Project, ProjectError> {
        let mut cmd = MetadataCommand::new();
        cmd.no_deps();
        if let Some(path) = &self.manifest_path {
            cmd.manifest_path(path);
        }
        let metadata = cmd.exec().map_err(ProjectError::Workspace)?;
        let members: Vec<&Package> = metadata.workspace_packages();
        let package = match &self.package {
            Some(name) => members
                .iter()
                .find(|p| p.name.as_str() == name)
                .copied()
                .ok_or_else(|| {
                    ProjectError::Invalid(format!(
                        "package `{name}` is not in the workspace (members: {})",
                        members
                            .iter()
                            .map(|p| p.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                })?,
            None => {
                match metadata.root_package() {
                    Some(root) => root,
                    None => {
                        // A virtual workspace: the one member with NVS metadata, if there is one.
                        let with_nvs: Vec<&Package> = members
                            .iter()
                            .copied()
                            .filter(|p| !p.metadata["nvs"].is_null())
                            .collect();
                        match with_nvs.as_slice() {
                            [one] => *one,
                            [] => return Err(ProjectError::Invalid(
                                "no workspace member has [package.metadata.nvs]; pass -p PACKAGE"
                                    .into(),
                            )),
                            many => {
                                return Err(ProjectError::Invalid(format!(
                                    "several packages have [package.metadata.nvs] ({}); pick one with -p",
                                    many.iter()
                                        .map(|p| p.name.as_str())
                                        .collect::<Vec<_>>()
                                        .join(", ")
                                )));
                            }
                        }
                    }
                }
            }
        };
        Ok(Project {
            name: package.name.to_string(),
            id: package.id.clone(),
            manifest_path: package.manifest_path.clone().into_std_path_buf(),
            target_dir: metadata.target_directory.clone().into_std_path_buf(),
        })
    }
}

impl Project {
    /// Reads the package's NVS metadata, failing when it has none.
    pub fn nvs_metadata(&self) -> Result<nvs_build::metadata::Metadata, ProjectError> {
        nvs_build::metadata::Metadata::from_manifest(&self.manifest_path)?.ok_or_else(|| {
            ProjectError::Invalid(format!(
                "`{}` has no [package.metadata.nvs]; see the README for the schema",
                self.manifest_path.display()
            ))
        })
    }

    /// `target/nvs/<package>/`.
    pub fn default_out_dir(&self) -> PathBuf {
        self.target_dir.join("nvs").join(&self.name)
    }
}

/// Shows `path` relative to the current directory when it is below it.
pub fn display_path(path: &Path) -> String {
    std::env::current_dir()
        .ok()
        .and_then(|cwd| path.strip_prefix(cwd).ok().map(Path::to_owned))
        .unwrap_or_else(|| path.to_owned())
        .display()
        .to_string()
}
