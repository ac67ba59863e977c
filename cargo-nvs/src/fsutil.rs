//! Writing output files so that a failure never leaves a half-written file behind.

use std::io::Write;
use std::path::{Path, PathBuf};

/// A complete temporary file beside its destination; removed on drop unless moved into place.
struct TempFile {
    path: PathBuf,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        // After a rename or hard link has put it in place, this finds nothing or a second link.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Writes `bytes` to a new, uniquely named file in `path`'s folder (created if missing). With
/// `mode` (Unix), the file has those permissions from the start.
fn write_temp(path: &Path, bytes: &[u8], mode: Option<u32>) -> std::io::Result<TempFile> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut attempt = 0u32;
    let (temp, mut file) = loop {
        let mut tag = [0u8; 4];
        let _ = getrandom::fill(&mut tag);
        let tmp = dir.join(format!(
            ".{name}.{}.{}.tmp",
            std::process::id(),
            u32::from_le_bytes(tag)
        ));
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(mode.unwrap_or(0o666));
        }
        #[cfg(not(unix))]
        let _ = mode;
        match options.open(&tmp) {
            Ok(file) => break (TempFile { path: tmp }, file),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 100 => {
                attempt += 1
            }
            Err(e) => return Err(e),
        }
    };
    file.write_all(bytes)?;
    file.flush()?;
    Ok(temp)
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename, creating
/// missing parent folders. With `mode` (Unix), the file gets those permissions from the start.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: Option<u32>) -> std::io::Result<()> {
    let temp = write_temp(path, bytes, mode)?;
    std::fs::rename(&temp.path, path)
}

/// Writes a secret file (mode 0600 from the start) without ever replacing an existing file,
/// unless `force`. The file appears complete or not at all.
pub fn write_secret(path: &Path, bytes: &[u8], force: bool) -> std::io::Result<()> {
    if force {
        return write_atomic(path, bytes, Some(0o600));
    }
    let exists = || {
        std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "the file exists and is never overwritten (pass --force to replace it)",
        )
    };
    if path.exists() {
        return Err(exists());
    }
    // Hard-linking a complete, uniquely named file fails if the name was taken meanwhile, so an
    // existing key file can never be replaced, and concurrent runs cannot mix their keys.
    let temp = write_temp(path, bytes, Some(0o600))?;
    std::fs::hard_link(&temp.path, path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            exists()
        } else {
            e
        }
    })
}
