//! Writing output files so that a failure never leaves a half-written file behind.
//!
//! A file is written completely before it gets its final name. On Linux it is first an unnamed
//! file (`O_TMPFILE`) that is linked into place: a process killed before that leaves nothing at
//! all. Elsewhere (and on file systems without `O_TMPFILE`) it is a uniquely named temporary file
//! in the same folder, renamed or hard-linked into place; a kill can leave such a file behind,
//! and [`remove_leftovers`] clears them. Where an unnamed file cannot be linked after all (an
//! unusual /proc), its bytes go to a named temporary file instead, and later files are named
//! from the start.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A file operation that failed, with the file: `cannot read `PATH`: why`.
#[derive(Debug, thiserror::Error)]
#[error("cannot {verb} `{}`: {source}", path.display())]
pub struct FileError {
    /// `read`, `write`, `create`, …
    pub verb: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

impl FileError {
    pub fn new(verb: &'static str, path: &Path, source: std::io::Error) -> FileError {
        FileError {
            verb,
            path: path.to_owned(),
            source,
        }
    }

    /// For `map_err`: `.map_err(FileError::reading(path))`.
    pub fn reading(path: &Path) -> impl FnOnce(std::io::Error) -> FileError + '_ {
        move |e| FileError::new("read", path, e)
    }

    /// For `map_err`: `.map_err(FileError::writing(path))`.
    pub fn writing(path: &Path) -> impl FnOnce(std::io::Error) -> FileError + '_ {
        move |e| FileError::new("write", path, e)
    }
}

/// An output that would overwrite one of the command's inputs.
#[derive(Debug, thiserror::Error)]
#[error(
    "OUTPUT `{}` is also the {what} `{}`; it would be overwritten (nothing was written). Name \
     another output file",
    output.display(),
    input.display()
)]
pub struct OutputOverInput {
    pub output: PathBuf,
    pub what: String,
    pub input: PathBuf,
}

/// The suffix of this module's temporary file names (`.<name>.<pid>.<n>.tmp`).
const TEMP_SUFFIX: &str = ".tmp";

/// A temporary file beside its destination; removed on drop unless it was moved into place.
struct TempFile {
    path: PathBuf,
}

impl TempFile {
    /// The file was renamed into place: nothing is left to remove.
    fn renamed(mut self) {
        self.path = PathBuf::new();
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A new file that has no final name yet: unnamed (Linux `O_TMPFILE`), or under a temporary
/// name.
struct Unnamed {
    file: std::fs::File,
    temp: Option<TempFile>,
}

/// The folder `path` is in (`.` for a bare file name).
pub(crate) fn folder_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Creates a new file under a fresh temporary name beside `path` with `create`, creating the
/// folder when it is missing.
fn create_temp<T>(
    path: &Path,
    mut create: impl FnMut(&Path) -> std::io::Result<T>,
) -> std::io::Result<(TempFile, T)> {
    // The process id tells concurrent runs apart and a counter this process's files: no random
    // tag and no folder check on the hot path of mass production.
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = folder_of(path);
    let mut name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Room for the tag within the usual 255-byte name limit.
    if name.len() > 200 {
        let mut end = 200;
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        name.truncate(end);
    }
    let mut attempts = 0;
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!(".{name}.{}.{n}{TEMP_SUFFIX}", std::process::id()));
        match create(&tmp) {
            Ok(made) => return Ok((TempFile { path: tmp }, made)),
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
    }
}

impl Unnamed {
    /// A new, empty file for `path` (whose folder is created if missing). With `mode` (Unix),
    /// the file has those permissions from the start.
    fn create(path: &Path, mode: Option<u32>) -> std::io::Result<Unnamed> {
        #[cfg(target_os = "linux")]
        if let Some(file) = o_tmpfile::create(folder_of(path), mode)? {
            return Ok(Unnamed { file, temp: None });
        }
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(mode.unwrap_or(0o666));
        }
        #[cfg(not(unix))]
        let _ = mode;
        let (temp, file) = create_temp(path, |tmp| options.open(tmp))?;
        Ok(Unnamed {
            file,
            temp: Some(temp),
        })
    }

    /// A new file for `path` holding `bytes` (on disk, with `sync`).
    fn write(path: &Path, bytes: &[u8], mode: Option<u32>, sync: bool) -> std::io::Result<Unnamed> {
        let mut unnamed = Unnamed::create(path, mode)?;
        unnamed.file.write_all(bytes)?;
        if sync {
            unnamed.file.sync_all()?;
        }
        Ok(unnamed)
    }

    /// Links an unnamed file to `path`; where that is impossible after all, copies it to a
    /// named temporary file beside `path` and returns that (unnamed files are not used again).
    #[cfg(target_os = "linux")]
    fn link_or_name(file: &mut std::fs::File, path: &Path) -> std::io::Result<Option<TempFile>> {
        match o_tmpfile::link(file, path) {
            Ok(()) => Ok(None),
            Err(e) if !o_tmpfile::cannot_link(&e) => Err(e),
            Err(_) => {
                o_tmpfile::give_up();
                use std::io::{Seek, SeekFrom};
                file.seek(SeekFrom::Start(0))?;
                // The copy keeps the unnamed file's permissions (0600 for secrets).
                let mode = {
                    use std::os::unix::fs::PermissionsExt;
                    file.metadata()?.permissions().mode() & 0o777
                };
                let (temp, mut named) = create_temp(path, |tmp| {
                    use std::os::unix::fs::OpenOptionsExt;
                    std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(mode)
                        .open(tmp)
                })?;
                std::io::copy(file, &mut named)?;
                named.sync_data()?;
                Ok(Some(temp))
            }
        }
    }

    /// Gives the file the name `path`; fails with `AlreadyExists` rather than replace a file.
    fn link_new(self, path: &Path) -> std::io::Result<()> {
        #[cfg_attr(not(target_os = "linux"), allow(unused_mut))]
        let Unnamed { mut file, temp } = self;
        let temp = match temp {
            Some(temp) => temp,
            #[cfg(target_os = "linux")]
            None => match Self::link_or_name(&mut file, path)? {
                None => return Ok(()),
                Some(temp) => temp,
            },
            #[cfg(not(target_os = "linux"))]
            None => unreachable!("unnamed files exist only on Linux"),
        };
        drop(file);
        std::fs::hard_link(&temp.path, path)
    }

    /// Gives the file the name `path`, replacing any file of that name in one step.
    fn replace(self, path: &Path) -> std::io::Result<()> {
        #[cfg_attr(not(target_os = "linux"), allow(unused_mut))]
        let Unnamed { mut file, temp } = self;
        let temp = match temp {
            Some(temp) => temp,
            #[cfg(target_os = "linux")]
            None => match Self::link_or_name(&mut file, path) {
                Ok(None) => return Ok(()),
                Ok(Some(temp)) => temp,
                // The name is taken: name the file beside it, then rename it over.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    create_temp(path, |tmp| o_tmpfile::link(&file, tmp))?.0
                }
                Err(e) => return Err(e),
            },
            #[cfg(not(target_os = "linux"))]
            None => unreachable!("unnamed files exist only on Linux"),
        };
        drop(file);
        std::fs::rename(&temp.path, path)?;
        temp.renamed();
        Ok(())
    }
}

/// A file written a piece at a time that appears under its name, complete, on
/// [`commit`](Self::commit); nothing is left of it if it never is.
pub struct StagedFile {
    path: PathBuf,
    out: std::io::BufWriter<std::fs::File>,
    temp: Option<TempFile>,
}

impl StagedFile {
    pub fn create(path: &Path) -> std::io::Result<StagedFile> {
        let Unnamed { file, temp } = Unnamed::create(path, None)?;
        Ok(StagedFile {
            path: path.to_owned(),
            out: std::io::BufWriter::with_capacity(1 << 16, file),
            temp,
        })
    }

    /// Puts the complete file in place, replacing any file of its name (with `sync`, on disk
    /// first, and its folder after).
    pub fn commit(self, sync: bool) -> std::io::Result<()> {
        let StagedFile { path, out, temp } = self;
        let file = out.into_inner().map_err(|e| e.into_error())?;
        if sync {
            file.sync_all()?;
        }
        Unnamed { file, temp }.replace(&path)?;
        if sync {
            sync_folder(&path)?;
        }
        Ok(())
    }
}

impl std::io::Write for StagedFile {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.out.write(bytes)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// Whether `a` and `b` name the same file: the same file on disk when both exist (links and
/// `./` spellings included), else the same absolute path once the parent folder is resolved.
pub fn same_file(a: &Path, b: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let (Ok(ma), Ok(mb)) = (std::fs::metadata(a), std::fs::metadata(b)) {
            return ma.dev() == mb.dev() && ma.ino() == mb.ino();
        }
    }
    let resolve = |p: &Path| -> PathBuf {
        if let Ok(full) = p.canonicalize() {
            return full;
        }
        let parent = match p.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
            _ => PathBuf::from("."),
        };
        match (parent.canonicalize(), p.file_name()) {
            (Ok(dir), Some(name)) => dir.join(name),
            _ => p.to_owned(),
        }
    };
    resolve(a) == resolve(b)
}

/// Refuses an output that is one of `inputs` (an image, CSV or key file): writing it would
/// destroy the input, and with a key file, every image encrypted with it.
pub fn refuse_output_over_inputs<'a>(
    output: &Path,
    inputs: impl IntoIterator<Item = (&'a Path, &'a str)>,
) -> Result<(), OutputOverInput> {
    for (input, what) in inputs {
        if same_file(output, input) {
            return Err(OutputOverInput {
                output: output.to_owned(),
                what: what.to_owned(),
                input: input.to_owned(),
            });
        }
    }
    Ok(())
}

pub fn write_atomic(path: &Path, bytes: &[u8], mode: Option<u32>) -> std::io::Result<()> {
    write_atomic_with(path, bytes, mode, false)
}

/// [`write_atomic`]; with `sync`, the file is on disk before it gets its name and the name
/// before this returns (fsync of the file, then of its folder).
pub fn write_atomic_with(
    path: &Path,
    bytes: &[u8],
    mode: Option<u32>,
    sync: bool,
) -> std::io::Result<()> {
    Unnamed::write(path, bytes, mode, sync)?.replace(path)?;
    if sync {
        sync_folder(path)?;
    }
    Ok(())
}

/// Flushes `path`'s folder entry to disk (after a rename or a link).
pub fn sync_folder(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(folder_of(path))?.sync_all()
}

/// Writes a secret file (mode 0600 from the start) without ever replacing an existing file,
/// unless `force`. The file appears complete or not at all.
pub fn write_secret(path: &Path, bytes: &[u8], force: bool) -> std::io::Result<()> {
    if force {
        return write_atomic(path, bytes, Some(0o600));
    }
    // Linking a complete file fails if the name is taken, so an existing key file can never be
    // replaced, and concurrent runs cannot mix their keys.
    let unnamed = Unnamed::write(path, bytes, Some(0o600), false)?;
    unnamed.link_new(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "the file exists and is never overwritten (pass --force to replace it)",
            )
        } else {
            e
        }
    })
}

/// How old a temporary file of another process must be to count as left behind where its
/// process cannot be looked up (a live run's files are written within moments, and the ones
/// it streams, like manifests, are written to all along).
const LEFTOVER_AGE: std::time::Duration = std::time::Duration::from_secs(60 * 60);

/// Removes the temporary files that a killed run of this program left in `dir`
/// (`.<name>.<pid>.<n>.tmp` of another process that is no longer running, on Linux, or that
/// was last written over an hour ago); returns how many.
pub fn remove_leftovers(dir: &Path) -> std::io::Result<usize> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(leftover_pid) else {
            continue;
        };
        let stale = || {
            entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > LEFTOVER_AGE)
        };
        if pid != std::process::id() && (!process_running(pid) || stale()) {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(removed)
}

/// The process id in a temporary file name of this module.
fn leftover_pid(name: &str) -> Option<u32> {
    let stem = name.strip_prefix('.')?.strip_suffix(TEMP_SUFFIX)?;
    let mut parts = stem.rsplitn(3, '.');
    let counter = parts.next()?;
    let pid = parts.next()?;
    let _original = parts.next().filter(|n| !n.is_empty())?;
    counter.parse::<u64>().ok()?;
    pid.parse().ok()
}

/// Whether a process with this id is running (in this process's view); where that cannot be
/// told, it is assumed to be.
fn process_running(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new("/proc").join(pid.to_string()).exists()
    } else {
        true
    }
}

#[cfg(target_os = "linux")]
mod o_tmpfile {
    //! `O_TMPFILE` files: created without a name, linked into place once complete.

    use std::path::Path;
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicBool, Ordering};

    use nix::errno::Errno;
    use nix::fcntl::{AT_FDCWD, AtFlags, OFlag, open};
    use nix::sys::stat::Mode;

    /// A new unnamed file in `dir`, or `None` where unnamed files cannot be made or linked
    /// (older kernels, some file systems, no /proc).
    pub fn create(dir: &Path, mode: Option<u32>) -> std::io::Result<Option<std::fs::File>> {
        static PROC_FD: OnceLock<bool> = OnceLock::new();
        if GAVE_UP.load(Ordering::Relaxed)
            || !*PROC_FD.get_or_init(|| Path::new("/proc/self/fd").is_dir())
        {
            return Ok(None);
        }
        // Readable too, so that its bytes can be copied if it cannot be linked.
        let flags = OFlag::O_TMPFILE | OFlag::O_RDWR | OFlag::O_CLOEXEC;
        let mode = Mode::from_bits_truncate(mode.unwrap_or(0o666));
        let mut created_dir = false;
        loop {
            match open(dir, flags, mode) {
                Ok(fd) => return Ok(Some(fd.into())),
                Err(Errno::ENOENT) if !created_dir => {
                    std::fs::create_dir_all(dir)?;
                    created_dir = true;
                }
                Err(Errno::EOPNOTSUPP | Errno::EISDIR | Errno::EINVAL) => return Ok(None),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Set when an unnamed file could not be linked: later files are named from the start.
    static GAVE_UP: AtomicBool = AtomicBool::new(false);

    pub fn give_up() {
        GAVE_UP.store(true, Ordering::Relaxed);
    }

    /// The link failed because linking through /proc does not work here (not because of the
    /// target, like a taken name or a full disk).
    pub fn cannot_link(e: &std::io::Error) -> bool {
        matches!(
            e.raw_os_error().map(Errno::from_raw),
            Some(Errno::ENOENT | Errno::EPERM | Errno::EACCES | Errno::EINVAL | Errno::EOPNOTSUPP)
        )
    }

    /// Gives the unnamed `file` the name `path` (fails with `AlreadyExists` if it is taken).
    pub fn link(file: &std::fs::File, path: &Path) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        // Linking through /proc needs no privilege, unlike AT_EMPTY_PATH.
        let source = format!("/proc/self/fd/{}", file.as_raw_fd());
        nix::unistd::linkat(
            AT_FDCWD,
            source.as_str(),
            AT_FDCWD,
            path,
            AtFlags::AT_SYMLINK_FOLLOW,
        )
        .map_err(std::io::Error::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("cargo-nvs-fsutil-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn atomic_writes_create_folders_replace_and_leave_only_the_file() {
        let dir = scratch("atomic");
        let path = dir.join("a/b/image.bin");
        write_atomic(&path, b"first", None).unwrap();
        write_atomic_with(&path, b"second", None, true).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        assert_eq!(names(&dir.join("a/b")), ["image.bin"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn secrets_are_0600_and_never_replaced_unless_forced() {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch("secret");
        let path = dir.join("keys/k.bin");
        write_secret(&path, b"one", false).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = write_secret(&path, b"two", false).unwrap_err();
        assert_eq!(again.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
        write_secret(&path, b"three", true).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"three");
        assert_eq!(names(&dir.join("keys")), ["k.bin"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Named temporary files, as where unnamed files cannot be made or linked (this switches
    /// the whole test process over; the other tests pass either way).
    #[cfg(target_os = "linux")]
    #[test]
    fn without_unnamed_files_writes_are_still_atomic_and_leave_nothing() {
        o_tmpfile::give_up();
        let dir = scratch("named");
        let path = dir.join("x/image.bin");
        write_atomic(&path, b"first", None).unwrap();
        write_atomic(&path, b"second", None).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        let key = dir.join("x/key.bin");
        write_secret(&key, b"k", false).unwrap();
        assert!(write_secret(&key, b"other", false).is_err());
        assert_eq!(std::fs::read(&key).unwrap(), b"k");
        let mut staged = StagedFile::create(&dir.join("x/manifest.csv")).unwrap();
        std::io::Write::write_all(&mut staged, b"a,b\n").unwrap();
        staged.commit(false).unwrap();
        assert_eq!(
            names(&dir.join("x")),
            ["image.bin", "key.bin", "manifest.csv"]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn leftovers_written_long_ago_are_removed_on_every_platform() {
        let dir = scratch("old-leftovers");
        std::fs::create_dir_all(&dir).unwrap();
        // Process 1 is always running; its file is removed only for its age.
        let (old, fresh) = (".dev-1.bin.1.3.tmp", ".dev-2.bin.1.4.tmp");
        for name in [old, fresh] {
            std::fs::write(dir.join(name), b"x").unwrap();
        }
        let two_hours_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
        std::fs::File::options()
            .write(true)
            .open(dir.join(old))
            .unwrap()
            .set_modified(two_hours_ago)
            .unwrap();
        assert_eq!(remove_leftovers(&dir).unwrap(), 1);
        assert_eq!(names(&dir), [fresh]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn leftovers_of_dead_processes_are_removed_and_nothing_else() {
        let dir = scratch("leftovers");
        std::fs::create_dir_all(&dir).unwrap();
        // Process ids above the kernel's limit (2^22) never run.
        let dead = ".dev-1.bin.4194999.7.tmp";
        let mine = format!(".dev-2.bin.{}.0.tmp", std::process::id());
        for name in [dead, &mine, "dev-1.bin", ".hidden.tmp", ".x.notapid.1.tmp"] {
            std::fs::write(dir.join(name), b"x").unwrap();
        }
        assert_eq!(remove_leftovers(&dir).unwrap(), 1);
        let mut expected = vec![
            ".hidden.tmp".to_string(),
            ".x.notapid.1.tmp".into(),
            mine,
            "dev-1.bin".into(),
        ];
        expected.sort();
        assert_eq!(names(&dir), expected);
        assert_eq!(remove_leftovers(&dir.join("missing")).unwrap(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn leftover_names_are_parsed_strictly() {
        assert_eq!(leftover_pid(".a.b.bin.12.3.tmp"), Some(12));
        assert_eq!(leftover_pid(".a.12.3.tmp"), Some(12));
        assert_eq!(leftover_pid("..12.3.tmp"), None);
        assert_eq!(leftover_pid(".a.12.x.tmp"), None);
        assert_eq!(leftover_pid("a.12.3.tmp"), None);
        assert_eq!(leftover_pid(".a.12.3.bin"), None);
    }
}
