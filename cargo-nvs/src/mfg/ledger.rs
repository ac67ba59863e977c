//! The device ledger and the production log of `cargo nvs mfg`: which device ids were issued
//! (with their image's SHA-256), and which were flashed onto which chip (by MAC).
//!
//! Behind the [`Ledger`] trait so that a shared server database could later serve several
//! stations; [`SqliteLedger`] keeps both in one SQLite file. There is one ledger per product,
//! shared by all its batches (where it is: `product.rs`); each device records the folder of the
//! batch it was issued into, where its images are.
//! Every flash record is one transaction; issued devices are recorded a chunk per transaction.

use crate::fsutil::folder_of;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};

use super::migrate::{ClaimRow, LedgerCopy};

/// What can go wrong with a ledger; every case names it.
#[derive(Debug)]
pub enum LedgerError {
    /// The database refused or failed.
    Database {
        ledger: PathBuf,
        source: rusqlite::Error,
    },
    /// The ledger was made by a newer cargo-nvs.
    NewerSchema { ledger: PathBuf, version: i64 },
    /// The database server refused or failed (`ledger`: host:port/database).
    Server {
        ledger: String,
        source: postgres::Error,
    },
    /// The ledger's URL or TLS settings cannot work (`ledger`: the URL, password masked).
    Setup { ledger: String, message: String },
    /// A thread of this process panicked while it held the ledger.
    Poisoned { ledger: PathBuf },
    /// Writing the production log out failed.
    Export(csv::Error),
}

impl std::fmt::Display for LedgerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LedgerError::Database { ledger, source } => {
                write!(f, "ledger `{}`: {source}", ledger.display())
            }
            LedgerError::NewerSchema { ledger, version } => write!(
                f,
                "the ledger `{}` was made by a newer cargo-nvs (schema {version}); update \
                 cargo-nvs",
                ledger.display()
            ),
            LedgerError::Poisoned { ledger } => write!(
                f,
                "ledger `{}`: a worker failed while it held the ledger",
                ledger.display()
            ),
            LedgerError::Export(e) => write!(f, "cannot write the production log: {e}"),
            LedgerError::Server { ledger, source } => {
                write!(f, "ledger server {ledger}: {source}")?;
                if let Some(inner) = std::error::Error::source(source) {
                    write!(f, " ({inner})")?;
                }
                Ok(())
            }
            LedgerError::Setup { ledger, message } => write!(f, "ledger `{ledger}`: {message}"),
        }
    }
}

impl std::error::Error for LedgerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LedgerError::Database { source, .. } => Some(source),
            LedgerError::Server { source, .. } => Some(source),
            LedgerError::Export(e) => Some(e),
            _ => None,
        }
    }
}

impl From<csv::Error> for LedgerError {
    fn from(e: csv::Error) -> Self {
        LedgerError::Export(e)
    }
}

pub type LedgerResult<T> = Result<T, LedgerError>;

/// An id the ledger refused to issue: it was issued (or reserved) before.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    pub device: String,
    /// When it was issued or reserved (UTC, ISO 8601).
    pub when: String,
    /// Only reserved, by a run that has not finished.
    pub reserved: bool,
    /// The batch folder it was issued into.
    pub batch_dir: String,
    pub ledger: PathBuf,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = if self.reserved {
            "reserved by a run that has not finished"
        } else {
            "already issued"
        };
        write!(
            f,
            "device `{}` was {what} at {} into `{}` (ledger `{}`); pass --allow-reissue to \
             issue it again",
            self.device,
            self.when,
            self.batch_dir,
            self.ledger.display()
        )
    }
}

/// The outcome of claiming a device by name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClaimOutcome {
    Claimed,
    /// Another station holds a live claim on it.
    HeldBy {
        claimant: String,
        since: String,
    },
}

/// Why flashing a device onto a chip would break the one-id-per-chip rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Conflict {
    /// The device was flashed onto another chip.
    OnAnotherChip {
        device: String,
        mac: String,
        when: String,
    },
    /// The chip holds another device.
    ChipHoldsAnother {
        mac: String,
        device: String,
        when: String,
    },
}

impl std::fmt::Display for Conflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Conflict::OnAnotherChip { device, mac, when } => write!(
                f,
                "device `{device}` was already flashed onto another chip (MAC {mac}) at {when}"
            ),
            Conflict::ChipHoldsAnother { mac, device, when } => write!(
                f,
                "the chip with MAC {mac} already holds device `{device}` (flashed at {when})"
            ),
        }
    }
}

/// One issued device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issued {
    /// The device id: the `--fileid` value, or `<image name>` for row-numbered batches.
    pub device: String,
    /// The image, relative to the batch folder (`bin/NAME.bin`).
    pub image: String,
    pub sha256: String,
    /// The device's other images with their SHA-256, in order (Cargo mode with several
    /// per-device partitions).
    pub more_images: Vec<(String, String)>,
    /// The key file, relative to the batch folder, for `--keygen` batches.
    pub key_file: Option<String>,
    /// For the HMAC key protection scheme: the HMAC key the device's key derives from (its own
    /// file relative to the batch folder, or the one file every device shares). It goes into the
    /// chip's eFuse, so the derived key file is not flashed.
    pub hmac_key_file: Option<String>,
    /// The partition size the image was made for.
    pub size: u32,
    /// Where it came from: the values file and its line.
    pub values: String,
    pub line: usize,
    /// Orders devices for `mfg flash --next`: the run's start (sortable text), then `line`.
    pub batch: String,
    /// The batch folder (the `mfg generate` out dir, absolute and canonical) that holds the
    /// device's images and key files. Devices of ledgers before schema 3 have the ledger's own
    /// folder (then every batch had its own ledger in its out dir).
    pub batch_dir: PathBuf,
    /// Set by the ledger (UTC, ISO 8601).
    pub issued_at: String,
    /// Some of its values come from the chip: its images ending in `.chip.csv` are recipes
    /// (their SHA-256 is the recipe's), built when the chip's MAC is known; the production
    /// log records each built image's SHA-256 with the MAC.
    pub from_chip: bool,
    /// The device's images and key file kept in the ledger itself (`mfg generate
    /// --store-images`), so that stations need no batch folder: given to `issue_many` to be
    /// stored with the entry, and filled by `export`. Other reads leave it empty: a station
    /// reads a claimed device's with [`Ledger::stored_files`].
    pub files: Vec<StoredFile>,
}

impl Issued {
    /// Its images in order, each with its SHA-256: the first, then the others.
    pub fn images(&self) -> impl Iterator<Item = (&String, &String)> {
        std::iter::once((&self.image, &self.sha256))
            .chain(self.more_images.iter().map(|(image, sha)| (image, sha)))
    }
}

/// A device's file kept in the ledger: an image, or its key for the nvs_keys partition, with
/// where it goes.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredFile {
    /// Its name in the batch folder (`bin/…`, `keys/…`), as [`Issued`] names it.
    pub name: String,
    /// The partition it goes to (`nvs_keys` for a key file), its offset and size: the file
    /// is written there padded with 0xFF to the partition's size.
    pub partition: String,
    pub offset: u32,
    pub size: u32,
    /// Of `data`, as generated; checked before the file is written to a chip.
    pub sha256: String,
    pub data: Vec<u8>,
}

impl std::fmt::Debug for StoredFile {
    // The data is key material: never in a debug print.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredFile")
            .field("name", &self.name)
            .field("partition", &self.partition)
            .field("offset", &format_args!("{:#x}", self.offset))
            .field("size", &format_args!("{:#x}", self.size))
            .field("sha256", &self.sha256)
            .field("bytes", &self.data.len())
            .finish()
    }
}

/// The run that reserves ids, as its devices will be recorded: an id is reserved while its row
/// has no SHA-256 yet; `issue_many` fills in the rows of the same run (`batch`).
pub struct Reservation<'a> {
    /// The run's start (sortable text), as `Issued::batch`.
    pub batch: &'a str,
    pub batch_dir: &'a Path,
    pub values: &'a str,
    /// `--allow-reissue`: ids issued before are taken.
    pub allow_reissue: bool,
    /// `--resume`: ids reserved by an unfinished run into the same batch folder are taken.
    pub resume: bool,
}

/// Where a batch stands (`cargo nvs mfg status`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchStatus {
    /// The batch folder.
    pub batch: String,
    /// Devices issued (recorded with their images).
    pub issued: u64,
    /// Ids reserved by a run that has not finished (no images recorded).
    pub reserved: u64,
    /// Devices with a successful flash.
    pub flashed: u64,
    /// Devices not flashed whose last attempt failed.
    pub failed: u64,
    /// Devices not flashed that a station holds now.
    pub claimed: u64,
    /// Devices written to a chip without a log entry (they go to no other chip).
    pub unlogged: u64,
    /// Issued devices not flashed yet.
    pub remaining: u64,
}

/// One production-log row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlashRecord {
    pub mac: String,
    pub device: String,
    pub sha256: String,
    pub port: String,
    /// `ok`, or `failed: …`.
    pub result: String,
    /// Set by the ledger (UTC, ISO 8601).
    pub time: String,
    /// The firmware written in the same pass (`mfg flash --firmware`: dist's
    /// `firmware_sha256`); empty when only the NVS images were written.
    pub firmware_sha256: String,
}

/// The ledger and production log, shared by the parallel workers of one run.
pub trait Ledger: Send + Sync {
    /// The device's entry, if it was issued.
    fn issued(&self, device: &str) -> LedgerResult<Option<Issued>>;
    /// Records an issued device in one transaction; refuses an id issued before unless
    /// `allow_reissue` (then the entry is replaced).
    #[cfg(test)]
    fn issue(&self, entry: &Issued, allow_reissue: bool) -> Result<(), String> {
        match self
            .issue_many(std::slice::from_ref(entry), allow_reissue)
            .map_err(|e| e.to_string())?
            .pop()
        {
            Some(Err(refused)) => Err(refused.to_string()),
            _ => Ok(()),
        }
    }
    /// Records issued devices in one transaction: each one's `issued_at`, or why it was refused
    /// (an id issued before, unless `allow_reissue`: then the entry is replaced). The others
    /// are recorded even when some are refused.
    fn issue_many(
        &self,
        entries: &[Issued],
        allow_reissue: bool,
    ) -> LedgerResult<Vec<Result<String, Refused>>>;
    /// Reserves the ids a run is about to issue, all in one transaction, before any of their
    /// files is written: two runs issuing overlapping ids at once cannot both get one. Returns
    /// the refused ids with when they were issued (or reserved); when any is refused, nothing
    /// is reserved. See [`Reservation`].
    fn reserve(
        &self,
        devices: &[(String, usize)],
        run: &Reservation<'_>,
    ) -> LedgerResult<Vec<Refused>>;
    /// Every issued device, oldest first.
    #[cfg(test)]
    fn devices(&self) -> LedgerResult<Vec<Issued>>;
    /// Every batch folder devices were issued into, in the order they were first used.
    fn batch_dirs(&self) -> LedgerResult<Vec<PathBuf>>;
    /// Keeps the partition table (binary) a batch's stored files were placed by with the batch
    /// (`mfg generate --store-images`).
    fn store_batch_table(&self, batch_dir: &Path, table: &[u8]) -> LedgerResult<()>;
    /// The partition table stored with the batch, if any: its devices' files are in the ledger.
    fn batch_table(&self, batch_dir: &Path) -> LedgerResult<Option<Vec<u8>>>;
    /// The device's files stored in the ledger (none when it was issued without
    /// --store-images). In PostgreSQL with the station role, only a device the station holds a
    /// claim on has any: see `sql/postgres-roles.sql`.
    fn stored_files(&self, device: &str) -> LedgerResult<Vec<StoredFile>>;
    /// Claims the oldest issued device of the batches in `batch_dirs` that has no successful
    /// flash and no live claim of another claimant, for `claimant`, in one transaction:
    /// stations sharing the ledger never get the same device, and a station's rerun takes back
    /// its own claims. A claim older than [`CLAIM_LIFETIME`] is stale (its station died) and is
    /// taken over.
    fn claim_next(&self, claimant: &str, batch_dirs: &[PathBuf]) -> LedgerResult<Option<Issued>>;
    /// Claims the named device; `Err` names the station that holds a live claim on it.
    fn claim(&self, device: &str, claimant: &str) -> LedgerResult<ClaimOutcome>;
    /// Gives up `claimant`'s claim on the device (when it was not flashed after all); a claim
    /// whose device was written to a chip stays.
    fn release(&self, device: &str, claimant: &str) -> LedgerResult<()>;
    /// Records, just before writing, that the claimed device goes onto the chip `mac`. Until
    /// the flash is logged the device is given to no other chip: if the station dies (or the
    /// log cannot be written) the chip may hold it, so it is never claimed automatically again.
    /// `false` when `claimant` no longer holds the claim (another station took it over) or the
    /// device was already written to another chip: then nothing may be written.
    fn mark_written(&self, device: &str, claimant: &str, mac: &str) -> LedgerResult<bool>;
    /// The chip an unlogged write of `device` went to, if any.
    fn written_to(&self, device: &str) -> LedgerResult<Option<String>>;
    /// Every device written to a chip without a log entry: (device, MAC).
    fn written_unlogged(&self) -> LedgerResult<Vec<(String, String)>>;
    /// Appends a production-log row and ends the device's claim, in one transaction.
    fn record_flash(&self, record: &FlashRecord) -> LedgerResult<()>;
    /// Appends a production-log row of an attempt that wrote nothing (refused, or failed before
    /// writing); the device's claim, and what it says of an earlier write, stay.
    fn log_attempt(&self, record: &FlashRecord) -> LedgerResult<()>;
    /// Why flashing `device` onto the chip `mac` would break the one-id-per-MAC rule: the id
    /// already went to another MAC, or the MAC already holds another id (successful flashes).
    fn flash_conflict(&self, mac: &str, device: &str) -> LedgerResult<Option<Conflict>>;
    /// The production log, oldest first.
    fn flash_log(&self) -> LedgerResult<Vec<FlashRecord>>;
    /// Everything the ledger holds, read in one transaction (`mfg ledger migrate`).
    fn export(&self) -> LedgerResult<LedgerCopy>;
    /// Adds `copy` to this ledger in one transaction: the batch folders and devices it lacks
    /// (and those it holds only reserved), the claims as `copy` has them, and the log rows after
    /// the first `log_kept` (which it holds already), with their times.
    fn import(&self, copy: &LedgerCopy, log_kept: usize) -> LedgerResult<()>;
    /// Where each batch stands, oldest batch first.
    fn status(&self) -> LedgerResult<Vec<BatchStatus>>;
    /// The device whose recorded image (its first, or any other) has this SHA-256 (lower-case
    /// hex), if any.
    fn device_with_sha256(&self, sha256: &str) -> LedgerResult<Option<String>>;
    /// The device of the latest successful flash onto the chip with this MAC (as espflash
    /// prints it, as the production log records it), if any.
    fn device_on_mac(&self, mac: &str) -> LedgerResult<Option<String>>;
    /// The production log as CSV: `mac,device,sha256,time,result,port,firmware_sha256`.
    fn export_log_csv(&self, out: &mut dyn std::io::Write) -> LedgerResult<()> {
        let mut writer = csv::Writer::from_writer(out);
        writer.write_record([
            "mac",
            "device",
            "sha256",
            "time",
            "result",
            "port",
            "firmware_sha256",
        ])?;
        for r in self.flash_log()? {
            writer.write_record([
                &r.mac,
                &r.device,
                &r.sha256,
                &r.time,
                &r.result,
                &r.port,
                &r.firmware_sha256,
            ])?;
        }
        writer.flush().map_err(csv::Error::from)?;
        Ok(())
    }
}

/// The ledger in one SQLite file (WAL mode, a busy timeout, one connection behind a mutex).
pub struct SqliteLedger {
    path: PathBuf,
    connection: Mutex<Connection>,
    claim_lifetime: Duration,
}

/// Bumped when the tables change; a ledger of a newer version is refused, older ones are
/// upgraded in place when opened. 2: device_images, claims and devices.hmac_key_file.
/// 3: batches and devices.batch_dir (the ledger is one per product, no longer one per out dir).
/// 4: flash_log.firmware_sha256 (the firmware written with the device's images).
/// 5: device_files and batches.partition_table (`mfg generate --store-images`), and
/// devices.from_chip (images built from recipes with the chip's MAC at flash time).
const SCHEMA_VERSION: i64 = 5;

/// How long a claim on a device holds: longer than any flash takes, so that a claim older than
/// this belongs to a station that died.
pub const CLAIM_LIFETIME: Duration = Duration::from_secs(15 * 60);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS devices (
    device    TEXT PRIMARY KEY NOT NULL,
    image     TEXT NOT NULL,
    sha256    TEXT NOT NULL,
    key_file  TEXT,
    hmac_key_file TEXT,
    size      INTEGER NOT NULL,
    values_file TEXT NOT NULL,
    line      INTEGER NOT NULL,
    batch     TEXT NOT NULL,
    issued_at TEXT NOT NULL,
    issues    INTEGER NOT NULL DEFAULT 1,
    batch_dir TEXT NOT NULL DEFAULT '',
    from_chip INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS batches (
    dir        TEXT PRIMARY KEY NOT NULL,
    first_used TEXT NOT NULL,
    partition_table BLOB
);
CREATE TABLE IF NOT EXISTS device_files (
    device    TEXT NOT NULL,
    name      TEXT NOT NULL,
    partition_name TEXT NOT NULL,
    flash_offset   INTEGER NOT NULL,
    partition_size INTEGER NOT NULL,
    sha256    TEXT NOT NULL,
    data      BLOB NOT NULL,
    PRIMARY KEY (device, name)
);
CREATE TABLE IF NOT EXISTS device_images (
    device TEXT NOT NULL,
    idx    INTEGER NOT NULL,
    image  TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    PRIMARY KEY (device, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS claims (
    device     TEXT PRIMARY KEY NOT NULL,
    claimant   TEXT NOT NULL,
    claimed_at TEXT NOT NULL,
    written_to TEXT
);
CREATE TABLE IF NOT EXISTS flash_log (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    time   TEXT NOT NULL,
    mac    TEXT NOT NULL,
    device TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    port   TEXT NOT NULL,
    result TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS flash_log_mac ON flash_log (mac);
CREATE INDEX IF NOT EXISTS flash_log_device ON flash_log (device);
CREATE INDEX IF NOT EXISTS flash_log_sha256 ON flash_log (sha256);
";

const NOW: &str = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')";

impl SqliteLedger {
    /// Opens the ledger, creating the file and its tables if needed.
    pub fn open(path: &Path, sync: bool) -> LedgerResult<SqliteLedger> {
        Self::open_with(path, OpenFlags::default(), sync)
    }

    /// Opens an existing ledger; `None` when there is none (nothing is created).
    pub fn open_existing(path: &Path) -> LedgerResult<Option<SqliteLedger>> {
        if !path.exists() {
            return Ok(None);
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_URI
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        Self::open_with(path, flags, false).map(Some)
    }

    /// Opens an existing ledger only to look things up: nothing is written (no journal mode,
    /// no schema upgrade); `None` when there is none.
    pub fn open_read_only(path: &Path) -> LedgerResult<Option<SqliteLedger>> {
        if !path.exists() {
            return Ok(None);
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_URI
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let connection = Connection::open_with_flags(path, flags)
            .and_then(|c| c.busy_timeout(Duration::from_secs(5)).map(|()| c))
            .map_err(|source| LedgerError::Database {
                ledger: path.to_owned(),
                source,
            })?;
        Ok(Some(SqliteLedger {
            path: path.to_owned(),
            connection: Mutex::new(connection),
            claim_lifetime: CLAIM_LIFETIME,
        }))
    }

    fn open_with(path: &Path, flags: OpenFlags, sync: bool) -> LedgerResult<SqliteLedger> {
        let fail = |source: rusqlite::Error| LedgerError::Database {
            ledger: path.to_owned(),
            source,
        };
        let mut connection = Connection::open_with_flags(path, flags).map_err(fail)?;
        connection
            .busy_timeout(Duration::from_secs(30))
            .map_err(fail)?;
        // Switching to WAL needs a moment alone with the file: another process creating or
        // upgrading the same ledger right now answers "locked" at once, whatever the timeout.
        let started = std::time::Instant::now();
        loop {
            match connection.pragma_update(None, "journal_mode", "WAL") {
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if matches!(
                        e.code,
                        rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                    ) && started.elapsed() < Duration::from_secs(30) =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                other => break other.map_err(fail)?,
            }
        }
        // In WAL mode NORMAL survives a killed process; FULL also a power failure.
        connection
            .pragma_update(None, "synchronous", if sync { "FULL" } else { "NORMAL" })
            .map_err(fail)?;
        let version: i64 = connection
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(fail)?;
        if version > SCHEMA_VERSION {
            return Err(LedgerError::NewerSchema {
                ledger: path.to_owned(),
                version,
            });
        }
        if version < SCHEMA_VERSION {
            // One transaction that takes the write lock first: several processes opening an
            // old ledger at once upgrade it once.
            let tx = connection
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(fail)?;
            let version: i64 = tx
                .pragma_query_value(None, "user_version", |r| r.get(0))
                .map_err(fail)?;
            if version < SCHEMA_VERSION {
                upgrade(&tx, &ledger_folder(path)).map_err(fail)?;
            }
            tx.commit().map_err(fail)?;
        }
        Ok(SqliteLedger {
            path: path.to_owned(),
            connection: Mutex::new(connection),
            claim_lifetime: CLAIM_LIFETIME,
        })
    }

    /// The condition on a `claims c` row that it still holds.
    fn live_claim(&self) -> String {
        format!(
            "c.claimed_at > strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-{} seconds')",
            self.claim_lifetime.as_secs()
        )
    }

    fn error(&self, source: rusqlite::Error) -> LedgerError {
        LedgerError::Database {
            ledger: self.path.clone(),
            source,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>) -> LedgerResult<T> {
        let mut connection = self.connection.lock().map_err(|_| LedgerError::Poisoned {
            ledger: self.path.clone(),
        })?;
        f(&mut connection).map_err(|e| self.error(e))
    }
}

/// Creates the tables, or brings those of an older schema up to date (in `tx`, whose caller
/// commits): devices of a schema 1 or 2 ledger were issued into the ledger's own folder, as
/// every out dir then had its own ledger.
fn upgrade(tx: &Connection, ledger_folder: &str) -> rusqlite::Result<()> {
    tx.execute_batch(SCHEMA)?;
    // The tables are created above; columns later schemas added to older tables are added here.
    let added: [(&str, &str, &str); 6] = [
        ("devices", "hmac_key_file", "TEXT"),                 // 2
        ("claims", "written_to", "TEXT"),                     // 2
        ("devices", "batch_dir", "TEXT NOT NULL DEFAULT ''"), // 3
        ("flash_log", "firmware_sha256", "TEXT NOT NULL DEFAULT ''"), // 4
        ("batches", "partition_table", "BLOB"),               // 5
        ("devices", "from_chip", "INTEGER NOT NULL DEFAULT 0"), // 5
    ];
    for (table, column, kind) in added {
        let present = tx
            .prepare("SELECT 1 FROM pragma_table_info(?1) WHERE name = ?2")
            .and_then(|mut s| s.exists([table, column]))?;
        if !present {
            tx.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {kind}"))?;
        }
    }
    let moved = tx.execute(
        "UPDATE devices SET batch_dir = ?1 WHERE batch_dir = ''",
        [ledger_folder],
    )?;
    if moved > 0 {
        tx.execute(
            &format!("INSERT OR IGNORE INTO batches (dir, first_used) VALUES (?1, {NOW})"),
            [ledger_folder],
        )?;
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)
}

/// The folder the ledger file is in, absolute and canonical where it can be.
fn ledger_folder(path: &Path) -> String {
    let folder = folder_of(path);
    std::fs::canonicalize(folder)
        .or_else(|_| std::path::absolute(folder))
        .unwrap_or_else(|_| folder.to_owned())
        .to_string_lossy()
        .into_owned()
}

fn issued_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Issued> {
    Ok(Issued {
        device: row.get(0)?,
        image: row.get(1)?,
        sha256: row.get(2)?,
        more_images: Vec::new(),
        key_file: row.get(3)?,
        hmac_key_file: row.get(9)?,
        size: row.get(4)?,
        values: row.get(5)?,
        line: row.get::<_, i64>(6)? as usize,
        batch: row.get(7)?,
        issued_at: row.get(8)?,
        batch_dir: PathBuf::from(row.get::<_, String>(10)?),
        files: Vec::new(),
        from_chip: row.get(11)?,
    })
}

/// Claims `device` for `claimant` from now, replacing an older claim (but not its record of a
/// chip the device was written to).
fn put_claim(c: &Connection, device: &str, claimant: &str) -> rusqlite::Result<()> {
    c.execute(
        &format!(
            "INSERT INTO claims (device, claimant, claimed_at) VALUES (?1, ?2, {NOW})
             ON CONFLICT (device) DO UPDATE SET claimant = excluded.claimant,
               claimed_at = excluded.claimed_at"
        ),
        [device, claimant],
    )
    .map(drop)
}

/// A device's images other than the first, in order.
fn more_images(c: &Connection, device: &str) -> rusqlite::Result<Vec<(String, String)>> {
    c.prepare_cached("SELECT image, sha256 FROM device_images WHERE device = ?1 ORDER BY idx")?
        .query_map([device], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect()
}

/// The devices table's columns, as both backends name them.
pub(super) const DEVICE_COLUMNS: &str = "device, image, sha256, key_file, size, values_file, line, batch, \
     issued_at, hmac_key_file, batch_dir, from_chip";

/// A stored file's columns, as both backends name them.
pub(super) const FILE_COLUMNS: &str =
    "name, partition_name, flash_offset, partition_size, sha256, data";

fn file_from_row(row: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<StoredFile> {
    Ok(StoredFile {
        name: row.get(first)?,
        partition: row.get(first + 1)?,
        offset: row.get(first + 2)?,
        size: row.get(first + 3)?,
        sha256: row.get(first + 4)?,
        data: row.get(first + 5)?,
    })
}

/// The device's stored files become `files` (a reissue's replace the earlier ones).
fn put_files(c: &Connection, device: &str, files: &[StoredFile]) -> rusqlite::Result<()> {
    c.prepare_cached("DELETE FROM device_files WHERE device = ?1")?
        .execute([device])?;
    let mut insert = c.prepare_cached(&format!(
        "INSERT INTO device_files (device, {FILE_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
    ))?;
    for f in files {
        insert.execute(params![
            device,
            f.name,
            f.partition,
            f.offset,
            f.size,
            f.sha256,
            f.data
        ])?;
    }
    Ok(())
}

/// Appends a production-log row, at `time` (a copy's) or now.
fn insert_log(c: &Connection, r: &FlashRecord, time: Option<&str>) -> rusqlite::Result<()> {
    c.execute(
        &format!(
            "INSERT INTO flash_log (time, mac, device, sha256, port, result, firmware_sha256)
             VALUES (COALESCE(?7, {NOW}), ?1, ?2, ?3, ?4, ?5, ?6)"
        ),
        params![
            r.mac,
            r.device,
            r.sha256,
            r.port,
            r.result,
            r.firmware_sha256,
            time
        ],
    )
    .map(|_| ())
}

fn flash_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<FlashRecord> {
    Ok(FlashRecord {
        time: row.get(0)?,
        mac: row.get(1)?,
        device: row.get(2)?,
        sha256: row.get(3)?,
        port: row.get(4)?,
        result: row.get(5)?,
        firmware_sha256: row.get(6)?,
    })
}

impl Ledger for SqliteLedger {
    fn export(&self) -> LedgerResult<LedgerCopy> {
        self.with(|c| {
            let tx = c.transaction()?;
            let batches = tx
                .prepare(
                    "SELECT dir, first_used, partition_table FROM batches \
                     ORDER BY first_used, dir",
                )?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<rusqlite::Result<_>>()?;
            let mut devices: Vec<Issued> = tx
                .prepare(&format!(
                    "SELECT {DEVICE_COLUMNS} FROM devices ORDER BY batch, values_file, line, device"
                ))?
                .query_map([], issued_from_row)?
                .collect::<rusqlite::Result<_>>()?;
            let mut images: HashMap<String, Vec<(String, String)>> = HashMap::new();
            let mut statement =
                tx.prepare("SELECT device, image, sha256 FROM device_images ORDER BY device, idx")?;
            let rows = statement.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            for row in rows {
                let (device, image, sha256): (String, String, String) = row?;
                images.entry(device).or_default().push((image, sha256));
            }
            let mut files: HashMap<String, Vec<StoredFile>> = HashMap::new();
            let mut statement = tx.prepare(&format!(
                "SELECT device, {FILE_COLUMNS} FROM device_files ORDER BY device, name"
            ))?;
            let rows =
                statement.query_map([], |r| Ok((r.get::<_, String>(0)?, file_from_row(r, 1)?)))?;
            for row in rows {
                let (device, file) = row?;
                files.entry(device).or_default().push(file);
            }
            for device in &mut devices {
                device.more_images = images.remove(&device.device).unwrap_or_default();
                device.files = files.remove(&device.device).unwrap_or_default();
            }
            let claims = tx
                .prepare(
                    "SELECT device, claimant, claimed_at, written_to FROM claims ORDER BY device",
                )?
                .query_map([], |r| {
                    Ok(ClaimRow {
                        device: r.get(0)?,
                        claimant: r.get(1)?,
                        claimed_at: r.get(2)?,
                        written_to: r.get(3)?,
                    })
                })?
                .collect::<rusqlite::Result<_>>()?;
            let log = tx
                .prepare(
                    "SELECT time, mac, device, sha256, port, result, firmware_sha256 \
                     FROM flash_log ORDER BY id",
                )?
                .query_map([], flash_from_row)?
                .collect::<rusqlite::Result<_>>()?;
            Ok(LedgerCopy {
                batches,
                devices,
                claims,
                log,
            })
        })
    }

    fn import(&self, copy: &LedgerCopy, log_kept: usize) -> LedgerResult<()> {
        self.with(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            for (dir, first_used, table) in &copy.batches {
                tx.execute(
                    "INSERT INTO batches (dir, first_used, partition_table) VALUES (?1, ?2, ?3)
                     ON CONFLICT (dir) DO UPDATE
                     SET partition_table = COALESCE(excluded.partition_table, partition_table)",
                    params![dir, first_used, table],
                )?;
            }
            for d in &copy.devices {
                let changed = tx.execute(
                    &format!(
                        "INSERT INTO devices ({DEVICE_COLUMNS})
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
                         ON CONFLICT (device) DO UPDATE SET image = excluded.image,
                           sha256 = excluded.sha256, key_file = excluded.key_file,
                           from_chip = excluded.from_chip,
                           hmac_key_file = excluded.hmac_key_file, size = excluded.size,
                           values_file = excluded.values_file, line = excluded.line,
                           batch = excluded.batch, issued_at = excluded.issued_at
                         WHERE devices.sha256 = '' AND excluded.sha256 <> ''"
                    ),
                    params![
                        d.device,
                        d.image,
                        d.sha256,
                        d.key_file,
                        d.size,
                        d.values,
                        d.line as i64,
                        d.batch,
                        d.issued_at,
                        d.hmac_key_file,
                        d.batch_dir.to_string_lossy(),
                        d.from_chip
                    ],
                )?;
                if changed > 0 {
                    tx.execute("DELETE FROM device_images WHERE device = ?1", [&d.device])?;
                    for (idx, (image, sha256)) in d.more_images.iter().enumerate() {
                        tx.execute(
                            "INSERT INTO device_images (device, idx, image, sha256) \
                             VALUES (?1, ?2, ?3, ?4)",
                            params![d.device, idx as i64, image, sha256],
                        )?;
                    }
                    put_files(&tx, &d.device, &d.files)?;
                }
            }
            tx.execute("DELETE FROM claims", [])?;
            for claim in &copy.claims {
                tx.execute(
                    "INSERT INTO claims (device, claimant, claimed_at, written_to) \
                     VALUES (?1, ?2, ?3, ?4)",
                    params![
                        claim.device,
                        claim.claimant,
                        claim.claimed_at,
                        claim.written_to
                    ],
                )?;
            }
            for r in copy.log.iter().skip(log_kept) {
                insert_log(&tx, r, Some(&r.time))?;
            }
            tx.commit()
        })
    }

    fn issued(&self, device: &str) -> LedgerResult<Option<Issued>> {
        self.with(|c| {
            let Some(mut issued) = c
                .prepare_cached(&format!(
                    "SELECT {DEVICE_COLUMNS} FROM devices WHERE device = ?1"
                ))?
                .query_row([device], issued_from_row)
                .optional()?
            else {
                return Ok(None);
            };
            issued.more_images = more_images(c, device)?;
            Ok(Some(issued))
        })
    }

    fn issue_many(
        &self,
        entries: &[Issued],
        allow_reissue: bool,
    ) -> LedgerResult<Vec<Result<String, Refused>>> {
        let outcomes = self.with(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut outcomes = Vec::with_capacity(entries.len());
            {
                // One time for the transaction's devices: they are recorded together.
                let now: String = tx.query_row(&format!("SELECT {NOW}"), [], |r| r.get(0))?;
                // A device issued before is replaced (--allow-reissue), or left alone and
                // refused: then the insert changes no row.
                let on_conflict = if allow_reissue {
                    "DO UPDATE SET image = excluded.image,
                       sha256 = excluded.sha256, key_file = excluded.key_file,
                       hmac_key_file = excluded.hmac_key_file, from_chip = excluded.from_chip,
                       size = excluded.size, values_file = excluded.values_file,
                       line = excluded.line, batch = excluded.batch,
                       issued_at = excluded.issued_at, batch_dir = excluded.batch_dir,
                       issues = issues + 1"
                } else {
                    // This run's own reservation (see `reserve`) is filled in; anything else
                    // is left alone and refused.
                    "DO UPDATE SET image = excluded.image,
                       sha256 = excluded.sha256, key_file = excluded.key_file,
                       hmac_key_file = excluded.hmac_key_file, from_chip = excluded.from_chip,
                       size = excluded.size, values_file = excluded.values_file,
                       line = excluded.line, issued_at = excluded.issued_at
                     WHERE devices.sha256 = '' AND devices.batch = excluded.batch
                       AND devices.batch_dir = excluded.batch_dir"
                };
                let mut insert = tx.prepare_cached(&format!(
                    "INSERT INTO devices ({DEVICE_COLUMNS})
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
                     ON CONFLICT (device) {on_conflict}"
                ))?;
                let mut earlier_of = tx
                    .prepare_cached("SELECT issued_at, batch_dir FROM devices WHERE device = ?1")?;
                let mut add_batch = tx.prepare_cached(
                    "INSERT OR IGNORE INTO batches (dir, first_used) VALUES (?1, ?2)",
                )?;
                let mut last_batch: Option<&Path> = None;
                let mut forget_images =
                    tx.prepare_cached("DELETE FROM device_images WHERE device = ?1")?;
                let mut add_image = tx.prepare_cached(
                    "INSERT OR REPLACE INTO device_images (device, idx, image, sha256) \
                     VALUES (?1, ?2, ?3, ?4)",
                )?;
                for entry in entries {
                    let batch_dir = entry.batch_dir.to_string_lossy();
                    if last_batch != Some(entry.batch_dir.as_path()) {
                        add_batch.execute(params![batch_dir, now])?;
                        last_batch = Some(&entry.batch_dir);
                    }
                    let changed = insert.execute(params![
                        entry.device,
                        entry.image,
                        entry.sha256,
                        entry.key_file,
                        entry.size,
                        entry.values,
                        entry.line as i64,
                        entry.batch,
                        now,
                        entry.hmac_key_file,
                        batch_dir,
                        entry.from_chip
                    ])?;
                    if changed == 0 {
                        let earlier: (String, String) = earlier_of
                            .query_row([&entry.device], |r| Ok((r.get(0)?, r.get(1)?)))?;
                        outcomes.push(Err(earlier));
                        continue;
                    }
                    // The device's images replace any earlier ones (a reissue, or an unfinished
                    // run's reservation taken over).
                    forget_images.execute([&entry.device])?;
                    for (idx, (image, sha256)) in entry.more_images.iter().enumerate() {
                        add_image.execute(params![entry.device, idx as i64, image, sha256])?;
                    }
                    put_files(&tx, &entry.device, &entry.files)?;
                    outcomes.push(Ok(now.clone()));
                }
            }
            tx.commit()?;
            Ok(outcomes)
        })?;
        Ok(entries
            .iter()
            .zip(outcomes)
            .map(|(entry, outcome)| {
                outcome.map_err(|(when, batch_dir)| Refused {
                    device: entry.device.clone(),
                    when,
                    reserved: false,
                    batch_dir,
                    ledger: self.path.clone(),
                })
            })
            .collect())
    }

    fn reserve(
        &self,
        devices: &[(String, usize)],
        run: &Reservation<'_>,
    ) -> LedgerResult<Vec<Refused>> {
        let take = if run.allow_reissue {
            "1"
        } else if run.resume {
            "devices.sha256 = '' AND devices.batch_dir = excluded.batch_dir"
        } else {
            "0"
        };
        let batch_dir = run.batch_dir.to_string_lossy();
        self.with(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut refused = Vec::new();
            {
                let now: String = tx.query_row(&format!("SELECT {NOW}"), [], |r| r.get(0))?;
                let mut insert = tx.prepare(&format!(
                    "INSERT INTO devices (device, image, sha256, size, values_file, line, batch,
                       issued_at, batch_dir)
                     VALUES (?1, '', '', 0, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (device) DO UPDATE SET image = '', sha256 = '', size = 0,
                       values_file = excluded.values_file, line = excluded.line,
                       batch = excluded.batch, issued_at = excluded.issued_at,
                       batch_dir = excluded.batch_dir
                     WHERE {take}"
                ))?;
                let mut earlier_of = tx.prepare(
                    "SELECT issued_at, sha256 = '', batch_dir FROM devices WHERE device = ?1",
                )?;
                for (device, line) in devices {
                    let changed = insert.execute(params![
                        device,
                        run.values,
                        *line as i64,
                        run.batch,
                        now,
                        batch_dir
                    ])?;
                    if changed == 0 {
                        let (when, reserved, batch_dir) = earlier_of
                            .query_row([device], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
                        refused.push(Refused {
                            device: device.clone(),
                            when,
                            reserved,
                            batch_dir,
                            ledger: self.path.clone(),
                        });
                    }
                }
            }
            if refused.is_empty() {
                tx.commit()?;
            }
            Ok(refused)
        })
    }

    #[cfg(test)]
    fn devices(&self) -> LedgerResult<Vec<Issued>> {
        self.with(|c| {
            let mut statement = c.prepare(&format!(
                "SELECT {DEVICE_COLUMNS} FROM devices ORDER BY batch, values_file, line"
            ))?;
            statement.query_map([], issued_from_row)?.collect()
        })
    }

    fn batch_dirs(&self) -> LedgerResult<Vec<PathBuf>> {
        self.with(|c| {
            c.prepare("SELECT dir FROM batches ORDER BY first_used, dir")?
                .query_map([], |r| Ok(PathBuf::from(r.get::<_, String>(0)?)))?
                .collect()
        })
    }

    fn store_batch_table(&self, batch_dir: &Path, table: &[u8]) -> LedgerResult<()> {
        self.with(|c| {
            c.execute(
                &format!(
                    "INSERT INTO batches (dir, first_used, partition_table) VALUES (?1, {NOW}, ?2)
                     ON CONFLICT (dir) DO UPDATE SET partition_table = excluded.partition_table"
                ),
                params![batch_dir.to_string_lossy(), table],
            )
            .map(drop)
        })
    }

    fn batch_table(&self, batch_dir: &Path) -> LedgerResult<Option<Vec<u8>>> {
        self.with(|c| {
            c.query_row(
                "SELECT partition_table FROM batches WHERE dir = ?1",
                [batch_dir.to_string_lossy()],
                |r| r.get(0),
            )
            .optional()
            .map(Option::flatten)
        })
    }

    fn stored_files(&self, device: &str) -> LedgerResult<Vec<StoredFile>> {
        self.with(|c| {
            c.prepare_cached(&format!(
                "SELECT {FILE_COLUMNS} FROM device_files WHERE device = ?1 ORDER BY name"
            ))?
            .query_map([device], |r| file_from_row(r, 0))?
            .collect()
        })
    }

    fn claim_next(&self, claimant: &str, batch_dirs: &[PathBuf]) -> LedgerResult<Option<Issued>> {
        let live_claim = self.live_claim();
        let dirs: Vec<std::borrow::Cow<'_, str>> =
            batch_dirs.iter().map(|d| d.to_string_lossy()).collect();
        // Batch folders as one JSON array parameter (`json_each`): serializing strings
        // cannot fail.
        let dirs = serde_json::to_string(&dirs).unwrap_or_else(|_| "[]".to_owned());
        self.with(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut next = tx
                .prepare(&format!(
                    "SELECT {DEVICE_COLUMNS} FROM devices d WHERE d.sha256 <> '' AND NOT EXISTS
                       (SELECT 1 FROM flash_log f WHERE f.device = d.device AND f.result = 'ok')
                     AND NOT EXISTS
                       (SELECT 1 FROM claims c WHERE c.device = d.device AND c.claimant <> ?1
                          AND {live_claim})
                     AND NOT EXISTS
                       (SELECT 1 FROM claims w WHERE w.device = d.device
                          AND w.written_to IS NOT NULL)
                     AND d.batch_dir IN (SELECT value FROM json_each(?2))
                     ORDER BY batch, values_file, line LIMIT 1"
                ))?
                .query_row([claimant, dirs.as_str()], issued_from_row)
                .optional()?;
            if let Some(next) = &mut next {
                next.more_images = more_images(&tx, &next.device)?;
                put_claim(&tx, &next.device, claimant)?;
            }
            tx.commit()?;
            Ok(next)
        })
    }

    fn claim(&self, device: &str, claimant: &str) -> LedgerResult<ClaimOutcome> {
        let live_claim = self.live_claim();
        self.with(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let holder: Option<(String, String)> = tx
                .query_row(
                    &format!(
                        "SELECT claimant, claimed_at FROM claims c
                         WHERE device = ?1 AND claimant <> ?2 AND {live_claim}"
                    ),
                    [device, claimant],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            if let Some((claimant, since)) = holder {
                return Ok(ClaimOutcome::HeldBy { claimant, since });
            }
            put_claim(&tx, device, claimant)?;
            tx.commit()?;
            Ok(ClaimOutcome::Claimed)
        })
    }

    fn release(&self, device: &str, claimant: &str) -> LedgerResult<()> {
        self.with(|c| {
            c.execute(
                "DELETE FROM claims WHERE device = ?1 AND claimant = ?2 AND written_to IS NULL",
                [device, claimant],
            )?;
            // The station lets go, the record of the chip stays.
            c.execute(
                "UPDATE claims SET claimed_at = '0000-00-00T00:00:00.000Z'
                 WHERE device = ?1 AND claimant = ?2",
                [device, claimant],
            )
            .map(drop)
        })
    }

    fn mark_written(&self, device: &str, claimant: &str, mac: &str) -> LedgerResult<bool> {
        self.with(|c| {
            c.execute(
                &format!(
                    "UPDATE claims SET written_to = ?3, claimed_at = {NOW}
                     WHERE device = ?1 AND claimant = ?2
                       AND (written_to IS NULL OR written_to = ?3)"
                ),
                [device, claimant, mac],
            )
            .map(|changed| changed == 1)
        })
    }

    fn written_to(&self, device: &str) -> LedgerResult<Option<String>> {
        self.with(|c| {
            c.query_row(
                "SELECT written_to FROM claims WHERE device = ?1 AND written_to IS NOT NULL",
                [device],
                |r| r.get(0),
            )
            .optional()
        })
    }

    fn written_unlogged(&self) -> LedgerResult<Vec<(String, String)>> {
        self.with(|c| {
            c.prepare(
                "SELECT device, written_to FROM claims WHERE written_to IS NOT NULL
                 ORDER BY claimed_at",
            )?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect()
        })
    }

    fn log_attempt(&self, record: &FlashRecord) -> LedgerResult<()> {
        self.with(|c| insert_log(c, record, None))
    }

    fn record_flash(&self, record: &FlashRecord) -> LedgerResult<()> {
        self.with(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            insert_log(&tx, record, None)?;
            tx.execute("DELETE FROM claims WHERE device = ?1", [&record.device])?;
            tx.commit()
        })
    }

    fn flash_conflict(&self, mac: &str, device: &str) -> LedgerResult<Option<Conflict>> {
        self.with(|c| {
            let other_mac: Option<(String, String)> = c
                .query_row(
                    "SELECT mac, time FROM flash_log WHERE device = ?1 AND result = 'ok'
                       AND mac <> ?2 ORDER BY id DESC LIMIT 1",
                    [device, mac],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            if let Some((other, when)) = other_mac {
                return Ok(Some(Conflict::OnAnotherChip {
                    device: device.to_owned(),
                    mac: other,
                    when,
                }));
            }
            let other_device: Option<(String, String)> = c
                .query_row(
                    "SELECT device, time FROM flash_log WHERE mac = ?1 AND result = 'ok'
                       AND device <> ?2 ORDER BY id DESC LIMIT 1",
                    [mac, device],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            Ok(
                other_device.map(|(other, when)| Conflict::ChipHoldsAnother {
                    mac: mac.to_owned(),
                    device: other,
                    when,
                }),
            )
        })
    }

    fn status(&self) -> LedgerResult<Vec<BatchStatus>> {
        let live_claim = self.live_claim();
        self.with(|c| {
            let mut statement = c.prepare(&format!(
                "SELECT batch_dir, SUM(sha256 <> ''), SUM(sha256 = ''), SUM(ok),
                   SUM(NOT ok AND failed), SUM(NOT ok AND claimed), SUM(NOT ok AND unlogged)
                 FROM (SELECT d.batch_dir, d.batch, d.sha256,
                   EXISTS (SELECT 1 FROM flash_log f WHERE f.device = d.device
                     AND f.result = 'ok') AS ok,
                   EXISTS (SELECT 1 FROM flash_log f WHERE f.device = d.device
                     AND f.result <> 'ok') AS failed,
                   EXISTS (SELECT 1 FROM claims c WHERE c.device = d.device
                     AND {live_claim}) AS claimed,
                   EXISTS (SELECT 1 FROM claims w WHERE w.device = d.device
                     AND w.written_to IS NOT NULL) AS unlogged
                 FROM devices d)
                 GROUP BY batch_dir ORDER BY MIN(batch), batch_dir"
            ))?;
            statement
                .query_map([], |r| {
                    let n = |i: usize| -> rusqlite::Result<u64> {
                        Ok(r.get::<_, Option<i64>>(i)?.unwrap_or(0).max(0) as u64)
                    };
                    let (issued, flashed) = (n(1)?, n(3)?);
                    Ok(BatchStatus {
                        batch: r.get(0)?,
                        issued,
                        reserved: n(2)?,
                        flashed,
                        failed: n(4)?,
                        claimed: n(5)?,
                        unlogged: n(6)?,
                        remaining: issued.saturating_sub(flashed),
                    })
                })?
                .collect()
        })
    }

    fn flash_log(&self) -> LedgerResult<Vec<FlashRecord>> {
        self.with(|c| {
            let mut statement = c.prepare(
                "SELECT time, mac, device, sha256, port, result, firmware_sha256 FROM flash_log
                 ORDER BY id",
            )?;
            statement.query_map([], flash_from_row)?.collect()
        })
    }

    fn device_with_sha256(&self, sha256: &str) -> LedgerResult<Option<String>> {
        let sha256 = sha256.to_ascii_lowercase();
        self.with(|c| {
            c.query_row(
                "SELECT device FROM devices WHERE sha256 = ?1
                 UNION ALL SELECT device FROM device_images WHERE sha256 = ?1
                 UNION ALL SELECT device FROM flash_log WHERE sha256 = ?1 AND result = 'ok'
                 LIMIT 1",
                [&sha256],
                |r| r.get(0),
            )
            .optional()
        })
    }

    fn device_on_mac(&self, mac: &str) -> LedgerResult<Option<String>> {
        self.with(|c| {
            c.query_row(
                "SELECT device FROM flash_log WHERE mac = ?1 AND result = 'ok'
                 ORDER BY id DESC LIMIT 1",
                [mac],
                |r| r.get(0),
            )
            .optional()
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn scratch(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("cargo-nvs-ledger-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A plain run (no --allow-reissue, no --resume) reserving into `batch_dir`.
    pub(crate) fn reservation<'a>(batch: &'a str, batch_dir: &'a str) -> Reservation<'a> {
        Reservation {
            batch,
            batch_dir: Path::new(batch_dir),
            values: "values.csv",
            allow_reissue: false,
            resume: false,
        }
    }

    /// Reserves and records `count` devices `D00000`… into `batch_dir` (batch "1").
    pub(crate) fn issue_devices(ledger: &dyn Ledger, count: usize, batch_dir: &str) {
        issue_devices_with(ledger, "D", count, batch_dir, &[]);
    }

    /// [`issue_devices`] with ids `<prefix>00000`…, each device with these stored files.
    pub(crate) fn issue_devices_with(
        ledger: &dyn Ledger,
        prefix: &str,
        count: usize,
        batch_dir: &str,
        files: &[StoredFile],
    ) {
        let ids: Vec<(String, usize)> = (0..count)
            .map(|n| (format!("{prefix}{n:05}"), n + 2))
            .collect();
        assert!(
            ledger
                .reserve(&ids, &reservation("1", batch_dir))
                .unwrap()
                .is_empty()
        );
        let entries: Vec<Issued> = ids
            .iter()
            .map(|(id, line)| Issued {
                files: files.to_vec(),
                ..entry_in(id, *line, batch_dir)
            })
            .collect();
        for chunk in entries.chunks(1024) {
            assert!(
                ledger
                    .issue_many(chunk, false)
                    .unwrap()
                    .iter()
                    .all(Result::is_ok)
            );
        }
    }

    pub(crate) fn entry(device: &str, line: usize) -> Issued {
        Issued {
            device: device.into(),
            image: format!("bin/dev-{device}.bin"),
            sha256: "ab".repeat(32),
            more_images: Vec::new(),
            key_file: None,
            hmac_key_file: None,
            size: 0x3000,
            values: "values.csv".into(),
            line,
            batch: "1".into(),
            batch_dir: PathBuf::from("/batch/one"),
            issued_at: String::new(),
            files: Vec::new(),
            from_chip: false,
        }
    }

    /// [`entry`] issued into another batch folder.
    pub(crate) fn entry_in(device: &str, line: usize, batch_dir: &str) -> Issued {
        Issued {
            batch_dir: PathBuf::from(batch_dir),
            ..entry(device, line)
        }
    }

    fn one() -> Vec<PathBuf> {
        vec![PathBuf::from("/batch/one")]
    }

    fn flash(mac: &str, device: &str, result: &str) -> FlashRecord {
        FlashRecord {
            mac: mac.into(),
            device: device.into(),
            sha256: "ab".repeat(32),
            port: "/dev/x".into(),
            result: result.into(),
            time: String::new(),
            firmware_sha256: String::new(),
        }
    }

    /// What every backend must do, on two connections ("stations") to one ledger: issue and
    /// refuse reissues, reserve ids so that one run gets each, claim each device for one
    /// station only, log flashes and their conflicts, keep devices written without a log
    /// entry away from other chips, and tell where batches stand.
    pub(crate) fn semantics(first: &dyn Ledger, second: &dyn Ledger) {
        let one = one();
        let run = |batch: &'static str| reservation(batch, "/batch/one");
        let ids = |names: &[&str]| -> Vec<(String, usize)> {
            names.iter().map(|n| (n.to_string(), 2)).collect()
        };
        // Reservation: the second run overlaps and gets nothing.
        assert!(
            first
                .reserve(&ids(&["A", "B", "C"]), &run("1"))
                .unwrap()
                .is_empty()
        );
        let refused = second.reserve(&ids(&["C", "D"]), &run("2")).unwrap();
        assert_eq!(refused.len(), 1);
        assert!(refused[0].reserved && refused[0].device == "C");
        assert!(first.issued("D").unwrap().is_none());
        assert!(
            first.claim_next("s1", &one).unwrap().is_none(),
            "reserved only"
        );
        // Recording fills in the run's own reservations; another run's record is refused.
        let entries: Vec<Issued> = ["A", "B", "C"]
            .iter()
            .enumerate()
            .map(|(n, id)| Issued {
                sha256: format!("{:064x}", n + 1),
                more_images: vec![(format!("bin/x-{id}.bin"), format!("{:064x}", n + 100))],
                ..entry(id, n + 2)
            })
            .collect();
        let outcomes = first.issue_many(&entries, false).unwrap();
        assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
        let again = second.issue_many(&entries[..1], false).unwrap();
        assert!(
            again[0]
                .as_ref()
                .is_err_and(|r| !r.reserved && r.device == "A")
        );
        assert_eq!(first.issued("B").unwrap().unwrap().more_images.len(), 1);
        assert_eq!(second.batch_dirs().unwrap(), one);
        // Each station gets its own device; a rerun takes its own back.
        let a = first.claim_next("s1", &one).unwrap().unwrap();
        let b = second.claim_next("s2", &one).unwrap().unwrap();
        assert_eq!((a.device.as_str(), b.device.as_str()), ("A", "B"));
        assert_eq!(second.claim_next("s2", &one).unwrap().unwrap().device, "B");
        assert!(matches!(
            second.claim("A", "s2").unwrap(),
            ClaimOutcome::HeldBy { claimant, .. } if claimant == "s1"
        ));
        // Flashing and its log.
        assert!(first.mark_written("A", "s1", "m1").unwrap());
        assert_eq!(second.written_to("A").unwrap().as_deref(), Some("m1"));
        first.record_flash(&flash("m1", "A", "ok")).unwrap();
        assert!(second.written_unlogged().unwrap().is_empty());
        assert!(matches!(
            second.flash_conflict("m2", "A").unwrap(),
            Some(Conflict::OnAnotherChip { .. })
        ));
        assert!(matches!(
            second.flash_conflict("m1", "B").unwrap(),
            Some(Conflict::ChipHoldsAnother { .. })
        ));
        assert!(second.flash_conflict("m1", "A").unwrap().is_none());
        assert_eq!(second.device_on_mac("m1").unwrap().as_deref(), Some("A"));
        assert_eq!(
            second
                .device_with_sha256(&format!("{:064x}", 101))
                .unwrap()
                .as_deref(),
            Some("B"),
            "found by the SHA-256 of a device's other image"
        );
        // A device written without a log entry goes to no other chip, even when released.
        assert!(second.mark_written("B", "s2", "m2").unwrap());
        assert!(
            !first.mark_written("B", "s9", "m9").unwrap(),
            "not its claim"
        );
        second.release("B", "s2").unwrap();
        assert_eq!(first.claim_next("s3", &one).unwrap().unwrap().device, "C");
        assert_eq!(
            first.written_unlogged().unwrap(),
            vec![("B".into(), "m2".into())]
        );
        second.record_flash(&flash("m3", "C", "failed: x")).unwrap();
        let status = first.status().unwrap();
        assert_eq!(status.len(), 1);
        let s = &status[0];
        assert_eq!(
            (
                s.issued,
                s.reserved,
                s.flashed,
                s.failed,
                s.unlogged,
                s.remaining
            ),
            (3, 0, 1, 1, 1, 2),
            "{s:?}"
        );
        let log = second.flash_log().unwrap();
        assert_eq!(log.len(), 2);
        assert_eq!(
            (log[0].device.as_str(), log[0].result.as_str()),
            ("A", "ok")
        );
    }

    #[test]
    fn sqlite_semantics() {
        let dir = scratch("semantics");
        let path = dir.join("l.sqlite");
        let (first, second) = (
            SqliteLedger::open(&path, false).unwrap(),
            SqliteLedger::open(&path, false).unwrap(),
        );
        semantics(&first, &second);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn issue_refuses_a_second_issue_unless_allowed() {
        let dir = scratch("issue");
        let ledger = SqliteLedger::open(&dir.join("l.sqlite"), false).unwrap();
        ledger.issue(&entry("A", 2), false).unwrap();
        let e = ledger.issue(&entry("A", 3), false).unwrap_err();
        assert!(
            e.contains("already issued") && e.contains("--allow-reissue"),
            "{e}"
        );
        ledger.issue(&entry("A", 3), true).unwrap();
        assert_eq!(ledger.issued("A").unwrap().unwrap().line, 3);
        assert_eq!(ledger.devices().unwrap().len(), 1);
        assert!(ledger.issued("B").unwrap().is_none());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn flash_log_conflicts_and_next() {
        let dir = scratch("flash");
        let ledger = SqliteLedger::open(&dir.join("l.sqlite"), false).unwrap();
        for (n, id) in ["A", "B", "C"].iter().enumerate() {
            ledger.issue(&entry(id, n + 2), false).unwrap();
        }
        let next = |station: &str| {
            ledger
                .claim_next(station, &one())
                .unwrap()
                .map(|d| d.device)
        };
        assert_eq!(next("s1").as_deref(), Some("A"));
        // A failed flash ends the claim; the device is offered again.
        ledger.record_flash(&flash("m1", "A", "failed: x")).unwrap();
        assert_eq!(next("s1").as_deref(), Some("A"));
        assert!(ledger.flash_conflict("m2", "A").unwrap().is_none());
        ledger.record_flash(&flash("m1", "A", "ok")).unwrap();
        assert_eq!(next("s1").as_deref(), Some("B"));
        // B is claimed: the next claim gets C, then nothing is left.
        assert_eq!(next("s2").as_deref(), Some("C"));
        assert_eq!(next("s3"), None);
        ledger.release("C", "s2").unwrap();
        assert_eq!(next("s3").as_deref(), Some("C"));
        assert!(ledger.flash_conflict("m1", "A").unwrap().is_none());
        let e = ledger.flash_conflict("m2", "A").unwrap().unwrap();
        assert!(e.to_string().contains("MAC m1"), "{e}");
        let e = ledger.flash_conflict("m1", "B").unwrap().unwrap();
        assert!(e.to_string().contains("already holds device `A`"), "{e}");
        let mut csv = Vec::new();
        ledger.export_log_csv(&mut csv).unwrap();
        let csv = String::from_utf8(csv).unwrap();
        assert!(
            csv.starts_with("mac,device,sha256,time,result,port,firmware_sha256\n"),
            "{csv}"
        );
        assert!(csv.contains("m1,A,"), "{csv}");
        assert_eq!(csv.lines().count(), 3);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn ids_are_reserved_before_writing_and_one_run_gets_each() {
        let dir = scratch("reserve");
        let path = dir.join("l.sqlite");
        let (first, second) = (
            SqliteLedger::open(&path, false).unwrap(),
            SqliteLedger::open(&path, false).unwrap(),
        );
        let run = |batch: &'static str| reservation(batch, "/batch");
        let ids = |names: &[&str]| -> Vec<(String, usize)> {
            names.iter().map(|n| (n.to_string(), 2)).collect()
        };
        assert!(
            first
                .reserve(&ids(&["A", "B"]), &run("1"))
                .unwrap()
                .is_empty()
        );
        // The second run overlaps on B: refused, and nothing of it is reserved (C stays free).
        let refused = second.reserve(&ids(&["B", "C"]), &run("2")).unwrap();
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].device, "B");
        assert!(refused[0].reserved, "{refused:?}");
        assert!(first.issued("C").unwrap().is_none());
        // A reserved device is not flashable yet.
        assert!(
            first
                .claim_next("s", &[PathBuf::from("/batch")])
                .unwrap()
                .is_none()
        );
        // The first run records its own reservations; another run's record of them is refused.
        let mut a = entry("A", 2);
        a.batch = "1".into();
        a.batch_dir = PathBuf::from("/batch");
        let mut b2 = entry("B", 2);
        b2.batch = "2".into();
        b2.batch_dir = PathBuf::from("/batch");
        assert!(second.issue_many(&[b2], false).unwrap()[0].is_err());
        assert!(first.issue_many(&[a], false).unwrap()[0].is_ok());
        assert_eq!(first.issued("A").unwrap().unwrap().sha256, "ab".repeat(32));
        // --resume into the same batch takes over an unfinished reservation (B), not A.
        let resume = Reservation {
            resume: true,
            ..run("3")
        };
        assert!(second.reserve(&ids(&["B"]), &resume).unwrap().is_empty());
        assert_eq!(second.reserve(&ids(&["A"]), &resume).unwrap().len(), 1);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_device_written_without_a_log_entry_is_claimed_by_no_one() {
        let dir = scratch("written");
        let ledger = SqliteLedger::open(&dir.join("l.sqlite"), false).unwrap();
        for (n, id) in ["A", "B"].iter().enumerate() {
            ledger.issue(&entry(id, n + 2), false).unwrap();
        }
        let a = ledger.claim_next("s1", &one()).unwrap().unwrap();
        assert!(ledger.mark_written(&a.device, "s1", "m1").unwrap());
        // Released (the station's flash ended without a log entry): the mark stays.
        ledger.release(&a.device, "s1").unwrap();
        assert_eq!(ledger.written_to("A").unwrap().as_deref(), Some("m1"));
        assert_eq!(
            ledger.written_unlogged().unwrap(),
            vec![("A".to_owned(), "m1".to_owned())]
        );
        // Not even the same station takes it back automatically.
        assert_eq!(
            ledger.claim_next("s1", &one()).unwrap().unwrap().device,
            "B"
        );
        // Claiming it by name (any station: the one that wrote it let go) keeps the mark;
        // logging ends it.
        assert_eq!(ledger.claim("A", "s2").unwrap(), ClaimOutcome::Claimed);
        assert_eq!(ledger.written_to("A").unwrap().as_deref(), Some("m1"));
        ledger.record_flash(&flash("m1", "A", "ok")).unwrap();
        assert!(ledger.written_unlogged().unwrap().is_empty());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn stations_sharing_a_ledger_never_claim_the_same_device() {
        let dir = scratch("claims");
        let path = dir.join("l.sqlite");
        let first = SqliteLedger::open(&path, false).unwrap();
        for (n, id) in ["A", "B"].iter().enumerate() {
            first.issue(&entry(id, n + 2), false).unwrap();
        }
        // A second station: its own connection to the same file.
        let second = SqliteLedger::open(&path, false).unwrap();
        let a = first.claim_next("station-1", &one()).unwrap().unwrap();
        let b = second.claim_next("station-2", &one()).unwrap().unwrap();
        assert_eq!((a.device.as_str(), b.device.as_str()), ("A", "B"));
        assert!(second.claim_next("station-3", &one()).unwrap().is_none());
        // A station's rerun (the same claimant) takes its own claim back.
        let again = second.claim_next("station-2", &one()).unwrap().unwrap();
        assert_eq!(again.device, "B");
        let ClaimOutcome::HeldBy { claimant: held, .. } = second.claim("A", "station-2").unwrap()
        else {
            panic!("a live claim of another station")
        };
        assert!(held.contains("station-1"), "{held}");
        // A claim the station itself holds may be renewed.
        assert_eq!(
            first.claim("A", "station-1").unwrap(),
            ClaimOutcome::Claimed
        );
        // A station that died: its claims lapse.
        let mut lapsed = SqliteLedger::open(&path, false).unwrap();
        lapsed.claim_lifetime = Duration::ZERO;
        assert_eq!(
            lapsed
                .claim_next("station-3", &one())
                .unwrap()
                .unwrap()
                .device,
            "A"
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_schema_1_ledger_is_upgraded_and_keeps_its_devices() {
        let dir = scratch("v1");
        let path = dir.join("l.sqlite");
        {
            let old = Connection::open(&path).unwrap();
            old.execute_batch(
                "CREATE TABLE devices (device TEXT PRIMARY KEY NOT NULL, image TEXT NOT NULL,
                   sha256 TEXT NOT NULL, key_file TEXT, size INTEGER NOT NULL,
                   values_file TEXT NOT NULL, line INTEGER NOT NULL, batch TEXT NOT NULL,
                   issued_at TEXT NOT NULL, issues INTEGER NOT NULL DEFAULT 1);
                 INSERT INTO devices VALUES ('A', 'bin/dev-A.bin', 'ab', NULL, 12288, 'v.csv', 2,
                   'b', 't', 1);
                 PRAGMA user_version = 1;",
            )
            .unwrap();
        }
        let ledger = SqliteLedger::open(&path, false).unwrap();
        let a = ledger.issued("A").unwrap().unwrap();
        assert_eq!((a.image.as_str(), a.hmac_key_file), ("bin/dev-A.bin", None));
        assert!(a.more_images.is_empty());
        // Then every out dir had its own ledger: the device's batch is the ledger's folder.
        let folder = std::fs::canonicalize(&dir).unwrap();
        assert_eq!(a.batch_dir, folder);
        ledger
            .issue(&entry_in("B", 3, folder.to_str().unwrap()), false)
            .unwrap();
        assert_eq!(ledger.claim("A", "s").unwrap(), ClaimOutcome::Claimed);
        let next = ledger.claim_next("t", &[folder]).unwrap().unwrap();
        assert_eq!(next.device, "B");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_schema_2_ledger_is_upgraded_to_3_and_keeps_its_devices_images_and_log() {
        let dir = scratch("v2");
        let path = dir.join("l.sqlite");
        {
            let old = Connection::open(&path).unwrap();
            old.execute_batch(
                "CREATE TABLE devices (device TEXT PRIMARY KEY NOT NULL, image TEXT NOT NULL,
                   sha256 TEXT NOT NULL, key_file TEXT, hmac_key_file TEXT,
                   size INTEGER NOT NULL, values_file TEXT NOT NULL, line INTEGER NOT NULL,
                   batch TEXT NOT NULL, issued_at TEXT NOT NULL,
                   issues INTEGER NOT NULL DEFAULT 1);
                 CREATE TABLE device_images (device TEXT NOT NULL, idx INTEGER NOT NULL,
                   image TEXT NOT NULL, sha256 TEXT NOT NULL, PRIMARY KEY (device, idx))
                   WITHOUT ROWID;
                 CREATE TABLE claims (device TEXT PRIMARY KEY NOT NULL,
                   claimant TEXT NOT NULL, claimed_at TEXT NOT NULL);
                 CREATE TABLE flash_log (id INTEGER PRIMARY KEY AUTOINCREMENT,
                   time TEXT NOT NULL, mac TEXT NOT NULL, device TEXT NOT NULL,
                   sha256 TEXT NOT NULL, port TEXT NOT NULL, result TEXT NOT NULL);
                 INSERT INTO devices VALUES ('A', 'bin/fa-A.bin', 'aa', NULL, NULL, 12288,
                   'v.csv', 2, 'b', 't', 1);
                 INSERT INTO devices VALUES ('B', 'bin/fa-B.bin', 'bb', NULL, NULL, 12288,
                   'v.csv', 3, 'b', 't', 1);
                 INSERT INTO device_images VALUES ('A', 0, 'bin/fb-A.bin', 'a2');
                 INSERT INTO flash_log (time, mac, device, sha256, port, result)
                   VALUES ('t', 'm1', 'A', 'aa', 'p', 'ok');
                 PRAGMA user_version = 2;",
            )
            .unwrap();
        }
        let folder = std::fs::canonicalize(&dir).unwrap();
        let ledger = SqliteLedger::open_existing(&path).unwrap().unwrap();
        let devices = ledger.devices().unwrap();
        assert_eq!(devices.len(), 2);
        assert!(devices.iter().all(|d| d.batch_dir == folder), "{devices:?}");
        let a = ledger.issued("A").unwrap().unwrap();
        assert_eq!(a.more_images, [("bin/fb-A.bin".into(), "a2".into())]);
        assert_eq!(ledger.batch_dirs().unwrap(), std::slice::from_ref(&folder));
        assert_eq!(ledger.flash_log().unwrap().len(), 1);
        // A flashed, so B is next, and only in its own folder's batch.
        assert!(ledger.claim_next("s", &one()).unwrap().is_none());
        let b = ledger.claim_next("s", &[folder]).unwrap().unwrap();
        assert_eq!(b.device, "B");
        drop(ledger);
        let version: i64 = Connection::open(&path)
            .unwrap()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        // Opening again changes nothing.
        let again = SqliteLedger::open(&path, false).unwrap();
        assert_eq!(again.devices().unwrap(), devices);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_ledger_of_a_newer_schema_is_refused() {
        let dir = scratch("v9");
        let path = dir.join("l.sqlite");
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        let e = SqliteLedger::open(&path, false).err().unwrap().to_string();
        assert!(
            e.contains("newer cargo-nvs") && e.contains("l.sqlite"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn devices_are_claimed_only_from_the_batches_asked_for() {
        let dir = scratch("batches");
        let ledger = SqliteLedger::open(&dir.join("l.sqlite"), false).unwrap();
        ledger
            .issue(&entry_in("A", 2, "/batch/one"), false)
            .unwrap();
        ledger
            .issue(&entry_in("B", 3, "/batch/two"), false)
            .unwrap();
        assert_eq!(
            ledger.batch_dirs().unwrap(),
            [PathBuf::from("/batch/one"), PathBuf::from("/batch/two")]
        );
        let two = [PathBuf::from("/batch/two")];
        assert_eq!(ledger.claim_next("s", &two).unwrap().unwrap().device, "B");
        assert!(ledger.claim_next("t", &two).unwrap().is_none());
        assert!(ledger.claim_next("t", &[]).unwrap().is_none());
        let a = ledger.claim_next("t", &one()).unwrap().unwrap();
        assert_eq!(
            (a.device.as_str(), a.batch_dir.as_path()),
            ("A", Path::new("/batch/one"))
        );
        // An id of one batch is refused in another, naming where it went.
        let e = ledger
            .issue(&entry_in("A", 4, "/batch/two"), false)
            .unwrap_err();
        assert!(
            e.contains("`A` was already issued") && e.contains("/batch/one"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn the_device_of_an_image_and_the_device_on_a_chip() {
        let dir = scratch("lookups");
        let ledger = SqliteLedger::open(&dir.join("l.sqlite"), false).unwrap();
        let mut a = entry("A", 2);
        a.sha256 = "aa".repeat(32);
        a.more_images = vec![("bin/fb-A.bin".into(), "a2".repeat(32))];
        let mut b = entry("B", 3);
        b.sha256 = "bb".repeat(32);
        ledger.issue(&a, false).unwrap();
        ledger.issue(&b, false).unwrap();
        let of = |sha: &str| ledger.device_with_sha256(sha).unwrap();
        assert_eq!(of(&"aa".repeat(32)).as_deref(), Some("A"));
        assert_eq!(
            of(&"a2".repeat(32)).as_deref(),
            Some("A"),
            "a device's other image"
        );
        assert_eq!(of(&"bb".repeat(32)).as_deref(), Some("B"));
        assert_eq!(of(&"BB".repeat(32)).as_deref(), Some("B"));
        assert_eq!(of(&"cc".repeat(32)), None);

        let on = |mac: &str| ledger.device_on_mac(mac).unwrap();
        assert_eq!(on("7c:df:a1:00:00:01"), None);
        ledger
            .record_flash(&flash("7c:df:a1:00:00:01", "A", "failed: x"))
            .unwrap();
        assert_eq!(
            on("7c:df:a1:00:00:01"),
            None,
            "a failed flash puts nothing on the chip"
        );
        ledger
            .record_flash(&flash("7c:df:a1:00:00:01", "A", "ok"))
            .unwrap();
        assert_eq!(on("7c:df:a1:00:00:01").as_deref(), Some("A"));
        // The latest successful flash counts (a forced reflash with another device).
        ledger
            .record_flash(&flash("7c:df:a1:00:00:01", "B", "ok"))
            .unwrap();
        ledger
            .record_flash(&flash("7c:df:a1:00:00:01", "A", "failed: y"))
            .unwrap();
        assert_eq!(on("7c:df:a1:00:00:01").as_deref(), Some("B"));
        assert_eq!(on("7c:df:a1:00:00:02"), None);
        let _ = std::fs::remove_dir_all(dir);
    }
}
