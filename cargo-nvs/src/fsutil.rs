//! Writing output files so that a failure never leaves a half-written file behind.

use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename, creating
/// missing parent folders. With `mode` (Unix), the file gets those permissions from the start.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: Option<u32>) -> std::io::Result<()> {
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
    let (tmp_path, mut file) = loop {
        let tmp = dir.join(format!(".{name}.{}.{attempt}.tmp", std::process::id()));
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
            Ok(file) => break (tmp, file),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 100 => {
                attempt += 1
            }
            Err(e) => return Err(e),
        }
    };
    let result = file.write_all(bytes).and_then(|()| file.flush());
    drop(file);
    match result.and_then(|()| std::fs::rename(&tmp_path, path)) {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp_path);
            Err(e)
        }
    }
}

/// Writes a secret file (mode 0600 from the start) without ever replacing an existing file,
/// unless `force`. The file appears complete or not at all.
pub fn write_secret(path: &Path, bytes: &[u8], force: bool) -> std::io::Result<()> {
    if force {
        return write_atomic(path, bytes, Some(0o600));
    }
    if path.exists() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "the file exists and is never overwritten (pass --force to replace it)",
        ));
    }
    // Write beside the target, then hard-link into place: linking fails if the name was taken
    // meanwhile, so an existing key file can never be replaced.
    let staging = path.with_file_name(format!(
        ".{}.staging",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    write_atomic(&staging, bytes, Some(0o600))?;
    let linked = std::fs::hard_link(&staging, path);
    let _ = std::fs::remove_file(&staging);
    linked.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            std::io::Error::new(
                e.kind(),
                "the file exists and is never overwritten (pass --force to replace it)",
            )
        } else {
            e
        }
    })
}
