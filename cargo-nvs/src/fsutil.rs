//! Writing output files so that a failure never leaves a half-written file behind.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

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
/// `mode` (Unix), the file has those permissions from the start; with `sync`, its data is on
/// disk before this returns.
fn write_temp(
    path: &Path,
    bytes: &[u8],
    mode: Option<u32>,
    sync: bool,
) -> std::io::Result<TempFile> {
    // The process id tells concurrent runs apart and a counter this process's files: no random
    // tag and no folder check on the hot path of mass production.
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode.unwrap_or(0o666));
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut attempts = 0;
    let (temp, mut file) = loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!(".{name}.{}.{n}.tmp", std::process::id()));
        match options.open(&tmp) {
            Ok(file) => break (TempFile { path: tmp }, file),
            // A leftover of a killed run with the same process id: try the next name.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempts < 100 => {
                attempts += 1
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && attempts < 100 => {
                attempts += 1;
                std::fs::create_dir_all(dir)?;
            }
            Err(e) => return Err(e),
        }
    };
    file.write_all(bytes)?;
    if sync {
        file.sync_all()?;
    }
    Ok(temp)
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename, creating
/// missing parent folders. With `mode` (Unix), the file gets those permissions from the start.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: Option<u32>) -> std::io::Result<()> {
    write_atomic_with(path, bytes, mode, false)
}

/// [`write_atomic`]; with `sync`, the file is on disk before the rename and the rename before
/// this returns (fsync of the file, then of its folder).
pub fn write_atomic_with(
    path: &Path,
    bytes: &[u8],
    mode: Option<u32>,
    sync: bool,
) -> std::io::Result<()> {
    let temp = write_temp(path, bytes, mode, sync)?;
    std::fs::rename(&temp.path, path)?;
    if sync {
        sync_folder(path)?;
    }
    Ok(())
}

/// Flushes `path`'s folder entry to disk (after a rename or a link).
pub fn sync_folder(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => std::fs::File::open(dir)?.sync_all(),
        _ => std::fs::File::open(".")?.sync_all(),
    }
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
    // Hard-linking a complete, uniquely named file fails if the name is taken, so an existing
    // key file can never be replaced, and concurrent runs cannot mix their keys.
    let temp = write_temp(path, bytes, Some(0o600), false)?;
    std::fs::hard_link(&temp.path, path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            exists()
        } else {
            e
        }
    })
}
