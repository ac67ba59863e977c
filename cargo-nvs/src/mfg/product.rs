//! Which ledger an `mfg` command uses: one per product, shared by all its batches, so that no
//! device id is issued twice whatever out dir a batch goes to. [`choose_ledger`] decides for
//! every `mfg` command, in this order:
//!
//! 1. `--ledger PATH`;
//! 2. the environment variable `NVS_LEDGER` (when set and not empty);
//! 3. `mfg generate`, mfg_gen mode: `ledger.sqlite` in the folder of the `--config` file (the
//!    config defines the product);
//! 4. `mfg generate`, Cargo mode: the package's `[package.metadata.nvs.mfg] ledger` (relative to
//!    Cargo.toml's folder), else `nvs-ledger.sqlite` beside Cargo.toml (never under `target/`,
//!    which `cargo clean` removes) — [`product_ledger`];
//! 5. `mfg flash` and `mfg log`: with `--out-dir DIR`, the ledger `DIR/manifest.json` records
//!    (`mfg generate` writes its absolute path there; batches of older versions, whose ledger
//!    was `DIR/ledger.sqlite`, are found through it too); else, inside a Cargo package
//!    (`-p`/`--manifest-path` respected), the package's ledger as in 4; else an error saying
//!    how to name one.

use crate::fsutil::folder_of;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::ledger::{Ledger, LedgerResult, SqliteLedger};
use super::postgres::{PostgresLedger, ServerUrl};
use crate::fsutil::FileError;
use crate::project::{PackageArgs, ProjectError};
use nvs_build::{InputError, Location};

/// Why the product's ledger cannot be chosen.
#[derive(Debug, thiserror::Error)]
pub enum ProductError {
    /// A setting that names no usable ledger; the message names its place (Cargo.toml:LINE:COL,
    /// a manifest, an option) and what to write instead.
    #[error("{0}")]
    Invalid(String),
    /// What is wrong in `[package.metadata.nvs.mfg]`, at its line and column of Cargo.toml.
    #[error(transparent)]
    Manifest(nvs_build::InputError),
    #[error(transparent)]
    File(#[from] FileError),
    #[error(transparent)]
    Project(#[from] ProjectError),
}

/// The environment variable that names the ledger (after `--ledger`).
pub const LEDGER_ENV: &str = "NVS_LEDGER";
/// The ledger's file name beside a package's Cargo.toml.
pub const PACKAGE_LEDGER: &str = "nvs-ledger.sqlite";
/// The ledger's file name beside mfg_gen mode's config file.
pub const CONFIG_LEDGER: &str = "ledger.sqlite";

/// The ledger of the package whose manifest is `manifest_path`: `NVS_LEDGER` if set and not
/// empty, else the package's `[package.metadata.nvs.mfg] ledger` (a path relative to the
/// manifest's folder, or a `postgres://` URL without password), else `nvs-ledger.sqlite`
/// beside the manifest. Nothing is created or opened. Errors name Cargo.toml and the key when
/// the setting is not a path.
pub fn product_ledger(manifest_path: &Path) -> Result<ChosenLedger, ProductError> {
    if let Some(env) = env_ledger()? {
        return Ok(env);
    }
    let folder = folder_of(manifest_path);
    match metadata_ledger(manifest_path)? {
        Some(text) if ServerUrl::parse(&text).is_some() => {
            chosen(text.as_ref(), String::new(), false)
        }
        Some(relative) => chosen(folder.join(relative).as_os_str(), String::new(), false),
        None => chosen(
            folder.join(PACKAGE_LEDGER).as_os_str(),
            String::new(),
            false,
        ),
    }
}

/// A ledger given as text: a `postgres://` URL, or a file (made absolute).
fn chosen(text: &OsStr, from: String, flag: bool) -> Result<ChosenLedger, ProductError> {
    if let Some(url) = text.to_str().and_then(ServerUrl::parse) {
        return Ok(ChosenLedger {
            path: PathBuf::from(url.to_string()),
            server: Some(url),
            from,
            flag,
        });
    }
    Ok(ChosenLedger {
        path: absolute(Path::new(text)),
        server: None,
        from,
        flag,
    })
}

/// The ledger a command uses, and how it was chosen.
#[derive(Clone, Debug)]
pub struct ChosenLedger {
    /// Absolute; for a server, its URL with the password masked (for messages only).
    pub path: PathBuf,
    /// The PostgreSQL server, when the ledger is one.
    pub server: Option<ServerUrl>,
    /// Where the choice came from, for messages: `--ledger`, `NVS_LEDGER`, ….
    pub from: String,
    /// Given with `--ledger` (not a default).
    pub flag: bool,
}

impl ChosenLedger {
    /// The ledger `text` names (a file, or a `postgres://` URL), as `--ledger` takes it; `from`
    /// says where it was given, for messages.
    pub fn named(text: &OsStr, from: &str) -> Result<ChosenLedger, ProductError> {
        if text.is_empty() {
            return Err(ProductError::Invalid(format!(
                "{from} is empty: give the ledger's path or URL"
            )));
        }
        chosen(text, from.to_owned(), true)
    }

    /// The ledger as messages and manifests name it: the file, or the server's URL without
    /// its password.
    pub fn shown(&self) -> String {
        match &self.server {
            Some(url) => url.without_password(),
            None => self.path.display().to_string(),
        }
    }

    /// Opens the ledger, creating the file (or the server's tables) if needed.
    pub fn open(&self, sync: bool) -> LedgerResult<Box<dyn Ledger>> {
        Ok(match &self.server {
            Some(url) => Box::new(PostgresLedger::open(url)?),
            None => Box::new(SqliteLedger::open(&self.path, sync)?),
        })
    }

    /// Opens an existing ledger (a server's always exists once it answers).
    pub fn open_existing(&self) -> LedgerResult<Option<Box<dyn Ledger>>> {
        Ok(match &self.server {
            Some(url) => Some(Box::new(PostgresLedger::open(url)?)),
            None => SqliteLedger::open_existing(&self.path)?.map(|l| Box::new(l) as _),
        })
    }

    /// Opens an existing ledger only to look things up (nothing is changed or created).
    pub fn open_read_only(&self) -> LedgerResult<Option<Box<dyn Ledger>>> {
        Ok(match &self.server {
            Some(url) => PostgresLedger::open_read_only(url)?.map(|l| Box::new(l) as _),
            None => SqliteLedger::open_read_only(&self.path)?.map(|l| Box::new(l) as _),
        })
    }

    /// Whether the ledger holds anything yet (a server is asked when opened).
    pub fn exists(&self) -> bool {
        self.server.is_some() || self.path.exists()
    }
}

/// What a command's default ledger depends on.
pub(crate) enum Scope<'a> {
    /// `mfg generate` in mfg_gen mode: the config file.
    Config(&'a Path),
    /// `mfg generate` in Cargo mode: the package's Cargo.toml.
    Package(&'a Path),
    /// `mfg flash` and `mfg log`: the batch's out dir if given, else the package if there is
    /// one.
    Batch {
        out_dir: Option<&'a Path>,
        package: &'a PackageArgs,
    },
}

/// The ledger an `mfg` command uses (see the module's documentation for the order). Nothing is
/// created.
pub(crate) fn choose_ledger(
    flag: Option<&Path>,
    scope: Scope<'_>,
) -> Result<ChosenLedger, ProductError> {
    if let Some(path) = flag {
        if path.as_os_str().is_empty() {
            return Err(ProductError::Invalid(
                "--ledger is empty: give the ledger's path".into(),
            ));
        }
        return chosen(path.as_os_str(), "--ledger".into(), true);
    }
    if let Some(env) = env_ledger()? {
        return Ok(env);
    }
    match scope {
        Scope::Config(config) => {
            let folder = folder_of(config);
            chosen(
                folder.join(CONFIG_LEDGER).as_os_str(),
                format!("the default beside the config `{}`", config.display()),
                false,
            )
        }
        Scope::Package(manifest_path) => package_ledger(manifest_path),
        Scope::Batch { out_dir, package } => {
            if let Some(out_dir) = out_dir
                && let Some(recorded) = recorded_ledger(out_dir)?
            {
                return Ok(recorded);
            }
            let package_given = package.package.is_some() || package.manifest_path.is_some();
            match package.find() {
                Ok(project) => package_ledger(&project.manifest_path),
                Err(e) if package_given => Err(e.into()),
                Err(e) => Err(ProductError::Invalid(format!(
                    "which ledger? {}give --ledger PATH, set {LEDGER_ENV}, give --out-dir with \
                     the folder of an `mfg generate` batch (its manifest.json names its ledger), \
                     or run in the firmware's Cargo package or with -p/--manifest-path (its \
                     ledger: [package.metadata.nvs.mfg] ledger, else {PACKAGE_LEDGER} beside \
                     Cargo.toml) (no package here: {})",
                    match out_dir {
                        Some(dir) => format!("`{}` has no manifest.json; ", dir.display()),
                        None => String::new(),
                    },
                    e
                ))),
            }
        }
    }
}

/// `NVS_LEDGER`, when set and not empty.
fn env_ledger() -> Result<Option<ChosenLedger>, ProductError> {
    let Some(value) = std::env::var_os(LEDGER_ENV).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let value: OsString = value;
    chosen(&value, LEDGER_ENV.into(), false).map(Some)
}

/// The package's ledger ([`product_ledger`]), and where it came from.
fn package_ledger(manifest_path: &Path) -> Result<ChosenLedger, ProductError> {
    let ledger = product_ledger(manifest_path)?;
    let path = ledger.path.clone();
    let default = manifest_path.with_file_name(PACKAGE_LEDGER);
    // (Only asked for when NVS_LEDGER is not set: `choose_ledger` takes that first.)
    let from = if ledger.server.is_none() && same_file(&path, &default) {
        format!("the default beside `{}`", manifest_path.display())
    } else {
        format!(
            "[package.metadata.nvs.mfg] ledger in `{}`",
            manifest_path.display()
        )
    };
    Ok(ChosenLedger { from, ..ledger })
}

/// `[package.metadata.nvs.mfg] ledger` of the manifest, as written.
fn metadata_ledger(manifest_path: &Path) -> Result<Option<String>, ProductError> {
    let text = std::fs::read_to_string(manifest_path).map_err(FileError::reading(manifest_path))?;
    // An error at a span of Cargo.toml, underlined when shown.
    let at = |span: std::ops::Range<usize>, message: String| {
        let before = text.get(..span.start).unwrap_or(&text);
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        let length = text.get(span).map_or(0, |t| t.chars().count());
        ProductError::Manifest(
            InputError::new(
                Some(Location::column(manifest_path, line, column)),
                None,
                message,
            )
            .with_span_length(length),
        )
    };
    let root = DeTable::parse(&text).map_err(|e| {
        let message = format!("invalid TOML: {}", e.message());
        match e.span() {
            Some(span) => at(span, message),
            None => ProductError::Manifest(InputError::new(
                Some(Location::file(manifest_path)),
                None,
                message,
            )),
        }
    })?;
    let mut table = root.get_ref();
    for name in ["package", "metadata", "nvs"] {
        // Anything else than tables on the way is not ours to judge (cargo and nvs-build do).
        let Some(next) = lookup(table, name).and_then(|(_, v)| v.get_ref().as_table()) else {
            return Ok(None);
        };
        table = next;
    }
    let Some((_, mfg)) = lookup(table, "mfg") else {
        return Ok(None);
    };
    let Some(mfg_table) = mfg.get_ref().as_table() else {
        return Err(at(
            mfg.span(),
            format!(
                "`package.metadata.nvs.mfg` must be a table (`[package.metadata.nvs.mfg]` with \
                 `ledger = \"path\"`), not {}",
                a_type(mfg.get_ref())
            ),
        ));
    };
    if let Some((key, _)) = mfg_table.iter().find(|(k, _)| k.get_ref() != "ledger") {
        return Err(at(
            key.span(),
            format!(
                "unknown field `{}` in [package.metadata.nvs.mfg]; expected: ledger",
                key.get_ref()
            ),
        ));
    }
    let Some((_, ledger)) = lookup(mfg_table, "ledger") else {
        return Ok(None);
    };
    match ledger.get_ref().as_str() {
        Some("") => Err(at(
            ledger.span(),
            format!(
                "`package.metadata.nvs.mfg.ledger` is empty: give the ledger's path, relative to \
                 Cargo.toml's folder (or remove it for the default, {PACKAGE_LEDGER})"
            ),
        )),
        Some(url) if ServerUrl::parse(url).is_some_and(|u| u.has_password()) => Err(at(
            ledger.span(),
            "`package.metadata.nvs.mfg.ledger` holds a password: passwords never go in \
                 Cargo.toml. Give the URL without it and set PGPASSWORD on the station"
                .to_owned(),
        )),
        Some(path) => Ok(Some(path.to_owned())),
        None => Err(at(
            ledger.span(),
            format!(
                "`package.metadata.nvs.mfg.ledger` must be a string (the ledger's path, relative \
                 to Cargo.toml's folder), not {}",
                a_type(ledger.get_ref())
            ),
        )),
    }
}

/// "a string", "an integer", ….
fn a_type(value: &DeValue<'_>) -> String {
    let name = value.type_str();
    let article = if name.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    };
    format!("{article} {name}")
}

type Key<'i> = Spanned<std::borrow::Cow<'i, str>>;
type Val<'i> = Spanned<DeValue<'i>>;

fn lookup<'a, 'i>(table: &'a DeTable<'i>, name: &str) -> Option<(&'a Key<'i>, &'a Val<'i>)> {
    table.iter().find(|(k, _)| k.get_ref() == name)
}

/// The ledger `out_dir/manifest.json` names, if it names one. Older batches had their ledger in
/// the out dir, and their manifests name it relative to where `mfg generate` ran.
fn recorded_ledger(out_dir: &Path) -> Result<Option<ChosenLedger>, ProductError> {
    let manifest = out_dir.join("manifest.json");
    let own = out_dir.join(CONFIG_LEDGER);
    let own_ledger = || {
        own.exists().then(|| ChosenLedger {
            path: absolute(&own),
            server: None,
            from: format!("the out dir's own ledger (`{}`)", own.display()),
            flag: false,
        })
    };
    let text = match std::fs::read(&manifest) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(own_ledger()),
        Err(e) => return Err(FileError::new("read", &manifest, e).into()),
    };
    let json: serde_json::Value = serde_json::from_slice(&text).map_err(|e| {
        ProductError::Invalid(format!(
            "`{}` is not the manifest `mfg generate` writes ({e}); give --ledger PATH",
            manifest.display()
        ))
    })?;
    let recorded = match json.get("ledger") {
        None => return Ok(own_ledger()),
        Some(serde_json::Value::String(url)) if ServerUrl::parse(url).is_some() => {
            let from = format!("`{}`", manifest.display());
            return chosen(url.as_ref(), from, false).map(Some);
        }
        Some(serde_json::Value::String(path)) if !path.is_empty() => PathBuf::from(path),
        Some(_) => {
            return Err(ProductError::Invalid(format!(
                "`{}`: `ledger` is not a path; give --ledger PATH",
                manifest.display()
            )));
        }
    };
    let from = format!("`{}`", manifest.display());
    if recorded.is_absolute() {
        return Ok(Some(ChosenLedger {
            path: recorded,
            server: None,
            from,
            flag: false,
        }));
    }
    // Relative to the folder an older `mfg generate` ran in: its default was the out dir's own.
    if recorded.file_name() == Some(CONFIG_LEDGER.as_ref())
        && let Some(own) = own_ledger()
    {
        return Ok(Some(own));
    }
    if recorded.exists() {
        return Ok(Some(ChosenLedger {
            path: absolute(&recorded),
            server: None,
            from,
            flag: false,
        }));
    }
    Err(ProductError::Invalid(format!(
        "{from} names the ledger `{}`, relative to the folder `mfg generate` ran in, and it is \
         not found from here: give --ledger PATH (or set {LEDGER_ENV})",
        recorded.display()
    )))
}

/// `path` made absolute (against the current directory), its existing part resolved.
pub(crate) fn absolute(path: &Path) -> PathBuf {
    if let Ok(path) = std::fs::canonicalize(path) {
        return path;
    }
    // A file not made yet: its folder, resolved, and its name.
    if let (Some(folder), Some(name)) = (path.parent(), path.file_name()) {
        let folder = if folder.as_os_str().is_empty() {
            Path::new(".")
        } else {
            folder
        };
        if let Ok(folder) = std::fs::canonicalize(folder) {
            return folder.join(name);
        }
    }
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

/// Whether `a` and `b` name the same file (that may not exist yet).
pub(crate) fn same_file(a: &Path, b: &Path) -> bool {
    absolute(a) == absolute(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("cargo-nvs-product-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::canonicalize(dir).unwrap()
    }

    const PACKAGE: &str = "[package]\nname = \"fw\"\nversion = \"0.1.0\"\n";

    /// `[package.metadata.nvs.mfg] ledger` of a manifest with `tail` after [package].
    fn ledger_of(dir: &Path, tail: &str) -> Result<Option<String>, ProductError> {
        let manifest = dir.join("Cargo.toml");
        std::fs::write(&manifest, format!("{PACKAGE}{tail}")).unwrap();
        metadata_ledger(&manifest)
    }

    #[test]
    fn the_metadata_names_the_ledger_relative_to_cargo_toml() {
        let dir = scratch("metadata");
        assert_eq!(ledger_of(&dir, "").unwrap(), None);
        assert_eq!(
            ledger_of(&dir, "[package.metadata.nvs.partitions.nvs]\n").unwrap(),
            None
        );
        assert_eq!(
            ledger_of(&dir, "[package.metadata.nvs.mfg]\n").unwrap(),
            None
        );
        let tail = "[package.metadata.nvs.mfg]\nledger = \"../factory/ledger.sqlite\"\n";
        assert_eq!(
            ledger_of(&dir, tail).unwrap().as_deref(),
            Some("../factory/ledger.sqlite")
        );
        // Inline spelling too.
        let tail = "[package.metadata.nvs]\nmfg = { ledger = \"l.sqlite\" }\n";
        assert_eq!(ledger_of(&dir, tail).unwrap().as_deref(), Some("l.sqlite"));
        if std::env::var_os(LEDGER_ENV).is_none() {
            let manifest = dir.join("Cargo.toml");
            assert_eq!(
                product_ledger(&manifest).unwrap().path,
                dir.join("l.sqlite")
            );
            std::fs::write(&manifest, PACKAGE).unwrap();
            assert_eq!(
                product_ledger(&manifest).unwrap().path,
                dir.join(PACKAGE_LEDGER)
            );
            assert!(!dir.join(PACKAGE_LEDGER).exists(), "nothing is created");
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_ledger_setting_that_is_not_a_path_is_refused_naming_cargo_toml_and_the_key() {
        let dir = scratch("bad");
        let manifest = dir.join("Cargo.toml").display().to_string();
        for (tail, needles) in [
            (
                "[package.metadata.nvs.mfg]\nledger = 3\n",
                &[
                    ":5:10",
                    "`package.metadata.nvs.mfg.ledger` must be a string",
                    "integer",
                ][..],
            ),
            (
                "[package.metadata.nvs.mfg]\nledger = \"\"\n",
                &[":5:10", "is empty"],
            ),
            (
                "[package.metadata.nvs]\nmfg = \"x.sqlite\"\n",
                &[":5:7", "`package.metadata.nvs.mfg` must be a table"],
            ),
            (
                "[package.metadata.nvs.mfg]\nleger = \"x.sqlite\"\n",
                &[":5:1", "unknown field `leger`", "expected: ledger"],
            ),
            ("[package.metadata.nvs.mfg\n", &[":4:", "invalid TOML"]),
        ] {
            let e = ledger_of(&dir, tail).unwrap_err().to_string();
            assert!(e.contains(&manifest), "{e}");
            for needle in needles {
                assert!(e.contains(needle), "{e} lacks {needle}");
            }
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn an_out_dir_names_its_ledger_in_its_manifest() {
        let dir = scratch("recorded");
        let out = dir.join("out");
        std::fs::create_dir_all(&out).unwrap();
        // No manifest, no ledger of its own: nothing recorded.
        assert!(recorded_ledger(&out).unwrap().is_none());
        let manifest = out.join("manifest.json");
        std::fs::write(&manifest, r#"{"ledger": "/factory/product.sqlite"}"#).unwrap();
        let chosen = recorded_ledger(&out).unwrap().unwrap();
        assert_eq!(chosen.path, Path::new("/factory/product.sqlite"));
        assert!(chosen.from.contains("manifest.json"), "{}", chosen.from);
        // An older batch: the ledger in the out dir, named relative to where it ran.
        std::fs::write(out.join(CONFIG_LEDGER), b"").unwrap();
        std::fs::write(&manifest, r#"{"ledger": "somewhere/out/ledger.sqlite"}"#).unwrap();
        assert_eq!(
            recorded_ledger(&out).unwrap().unwrap().path,
            out.join(CONFIG_LEDGER)
        );
        std::fs::write(&manifest, r#"{"devices": []}"#).unwrap();
        assert_eq!(
            recorded_ledger(&out).unwrap().unwrap().path,
            out.join(CONFIG_LEDGER)
        );
        std::fs::remove_file(out.join(CONFIG_LEDGER)).unwrap();
        std::fs::write(&manifest, r#"{"ledger": "not/here.sqlite"}"#).unwrap();
        let e = recorded_ledger(&out).unwrap_err().to_string();
        assert!(
            e.contains("not/here.sqlite") && e.contains("--ledger"),
            "{e}"
        );
        std::fs::write(&manifest, r#"{"ledger": 1}"#).unwrap();
        let e = recorded_ledger(&out).unwrap_err().to_string();
        assert!(e.contains("manifest.json") && e.contains("--ledger"), "{e}");
        std::fs::write(&manifest, "not json").unwrap();
        let e = recorded_ledger(&out).unwrap_err().to_string();
        assert!(e.contains("manifest.json") && e.contains("--ledger"), "{e}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn the_flag_comes_first() {
        let chosen = choose_ledger(
            Some(Path::new("/a/b.sqlite")),
            Scope::Config(Path::new("conf.csv")),
        )
        .unwrap();
        assert_eq!(
            (chosen.path.as_path(), chosen.flag),
            (Path::new("/a/b.sqlite"), true)
        );
        assert!(choose_ledger(Some(Path::new("")), Scope::Config(Path::new("c"))).is_err());
        if std::env::var_os(LEDGER_ENV).is_none() {
            let dir = scratch("config");
            let chosen = choose_ledger(None, Scope::Config(&dir.join("conf.csv"))).unwrap();
            assert_eq!(chosen.path, dir.join(CONFIG_LEDGER));
            assert!(!chosen.flag);
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
