//! Tools the CI needs from Debian packages, installed when missing (the CI runs as root).

use std::path::PathBuf;

use xshell::{Shell, cmd};

use crate::Result;

/// Installs the Debian package `package`; `what` says what it is for, in the error when it
/// cannot be installed here (not root, or no apt-get).
pub fn install(sh: &Shell, package: &str, what: &str) -> Result<()> {
    if cmd!(sh, "id -u").read()?.trim() != "0" || which("apt-get").is_none() {
        return Err(format!(
            "{what} is not installed and cannot be installed here (needs root and apt-get): \
             install the `{package}` package or its equivalent"
        )
        .into());
    }
    eprintln!("installing the distribution's {package} package ({what})");
    cmd!(sh, "apt-get update -qq").run()?;
    cmd!(sh, "apt-get install -y -qq {package}")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .run()?;
    Ok(())
}

/// `program` in PATH.
pub fn which(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
}
