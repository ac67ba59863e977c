//! The ledger in a PostgreSQL database, for production lines whose stations run on several PCs:
//! the same semantics as [`SqliteLedger`](super::ledger::SqliteLedger), with claims taken by
//! `SELECT … FOR UPDATE SKIP LOCKED` so that stations never wait on each other's device. A
//! device's claim and whether it was flashed live in its own row: a station that locks a row
//! another one has just claimed re-reads that row and passes it by (state kept in other tables
//! would be judged by the statement's older snapshot, and two stations could take one device).
//!
//! Selected by a `postgres://` or `postgresql://` URL wherever a ledger path is accepted. TLS as
//! libpq does it: `sslmode=prefer` by default (TLS when the server offers it, certificate not
//! checked), `disable`, `require` (TLS, not checked), `verify-ca` (chain checked) and
//! `verify-full` (chain and host name checked), with `sslrootcert=FILE` (PEM) or, without it,
//! the Mozilla roots. The password comes from the URL or `$PGPASSWORD` and is never shown.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::collections::HashMap;

use postgres::types::ToSql;
use postgres::{Client, GenericClient, NoTls, Row, Statement, Transaction};

use super::ledger::{
    BatchStatus, CLAIM_LIFETIME, ClaimOutcome, Conflict, FlashRecord, Issued, Ledger, LedgerError,
    LedgerResult, Refused, Reservation, StoredFile,
};
use super::ledger::{DEVICE_COLUMNS, FILE_COLUMNS};
use super::migrate::{ClaimRow, LedgerCopy};

/// Bumped when the tables change (as SQLite's); a database of a newer version is refused.
/// 4: nvs_flash_log.firmware_sha256. 5: nvs_device_files, nvs_batches.partition_table,
/// nvs_devices.claimed_by (the database role holding a claim, for the station role's policy)
/// and nvs_devices.from_chip (images built from recipes with the chip's MAC at flash time).
const SCHEMA_VERSION: i64 = 5;

/// UTC now, as the SQLite ledger writes times (sortable text).
const NOW: &str =
    "to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS nvs_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS nvs_batches (dir TEXT PRIMARY KEY, first_used TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS nvs_devices (
    device TEXT PRIMARY KEY, image TEXT NOT NULL, sha256 TEXT NOT NULL, key_file TEXT,
    hmac_key_file TEXT, size BIGINT NOT NULL, values_file TEXT NOT NULL, line BIGINT NOT NULL,
    batch TEXT NOT NULL, issued_at TEXT NOT NULL, issues BIGINT NOT NULL DEFAULT 1,
    batch_dir TEXT NOT NULL, claimant TEXT, claimed_at TEXT, written_to TEXT,
    flashed BOOLEAN NOT NULL DEFAULT FALSE, from_chip BOOLEAN NOT NULL DEFAULT FALSE);
ALTER TABLE nvs_devices ADD COLUMN IF NOT EXISTS from_chip BOOLEAN NOT NULL DEFAULT FALSE;
CREATE INDEX IF NOT EXISTS nvs_devices_order ON nvs_devices (batch, values_file, line);
CREATE INDEX IF NOT EXISTS nvs_devices_sha256 ON nvs_devices (sha256);
CREATE INDEX IF NOT EXISTS nvs_devices_to_flash ON nvs_devices (batch, values_file, line)
    WHERE NOT flashed AND written_to IS NULL AND sha256 <> '';
CREATE TABLE IF NOT EXISTS nvs_device_images (
    device TEXT NOT NULL, idx BIGINT NOT NULL, image TEXT NOT NULL, sha256 TEXT NOT NULL,
    PRIMARY KEY (device, idx));
CREATE TABLE IF NOT EXISTS nvs_flash_log (
    id BIGSERIAL PRIMARY KEY, time TEXT NOT NULL, mac TEXT NOT NULL, device TEXT NOT NULL,
    sha256 TEXT NOT NULL, port TEXT NOT NULL, result TEXT NOT NULL,
    firmware_sha256 TEXT NOT NULL DEFAULT '');
ALTER TABLE nvs_flash_log ADD COLUMN IF NOT EXISTS firmware_sha256 TEXT NOT NULL DEFAULT '';
CREATE INDEX IF NOT EXISTS nvs_flash_log_mac ON nvs_flash_log (mac);
CREATE INDEX IF NOT EXISTS nvs_flash_log_device ON nvs_flash_log (device);
CREATE INDEX IF NOT EXISTS nvs_flash_log_sha256 ON nvs_flash_log (sha256);
ALTER TABLE nvs_batches ADD COLUMN IF NOT EXISTS partition_table BYTEA;
CREATE TABLE IF NOT EXISTS nvs_device_files (
    device TEXT NOT NULL, name TEXT NOT NULL, partition_name TEXT NOT NULL,
    flash_offset BIGINT NOT NULL, partition_size BIGINT NOT NULL, sha256 TEXT NOT NULL,
    data BYTEA NOT NULL, PRIMARY KEY (device, name));
ALTER TABLE nvs_devices ADD COLUMN IF NOT EXISTS claimed_by TEXT;
-- Who holds a claim is the database role that wrote it, never what a client says: the station
-- role's policy on nvs_device_files (sql/postgres-roles.sql) lets it read only its claims'. A
-- station login (a member of nvs_station) may not undo a flash, nor change a row whose claim
-- another login holds (live: younger than CLAIM_LIFETIME, 900 s), whatever SQL it sends.
CREATE OR REPLACE FUNCTION nvs_claimed_by() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = 'nvs_station'
                                    AND pg_has_role(current_user, r.oid, 'MEMBER')) THEN
        IF OLD.flashed AND NOT NEW.flashed THEN
            RAISE EXCEPTION 'device %: a station may not mark a flashed device unflashed',
                OLD.device USING ERRCODE = 'insufficient_privilege';
        END IF;
        IF OLD.claimant IS NOT NULL AND OLD.claimed_by <> current_user
           AND OLD.claimed_at > to_char((clock_timestamp() - interval '900 seconds')
                                        AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') THEN
            RAISE EXCEPTION 'device %: another station login holds its claim', OLD.device
                USING ERRCODE = 'insufficient_privilege';
        END IF;
    END IF;
    IF NEW.claimant IS NULL THEN
        NEW.claimed_by := NULL;
    ELSIF TG_OP = 'INSERT' OR NEW.claimant IS DISTINCT FROM OLD.claimant
          OR NEW.claimed_at IS DISTINCT FROM OLD.claimed_at THEN
        NEW.claimed_by := current_user;
    END IF;
    RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS nvs_claimed_by ON nvs_devices;
CREATE TRIGGER nvs_claimed_by BEFORE INSERT OR UPDATE ON nvs_devices
    FOR EACH ROW EXECUTE FUNCTION nvs_claimed_by();
";

/// The roles and their rights (see [`PostgresLedger::create_roles`]).
pub const ROLES: &str = include_str!("../../sql/postgres-roles.sql");

// The trigger above spells the claim lifetime in seconds.
const _: () = assert!(CLAIM_LIFETIME.as_secs() == 900);

fn file_from_row(row: &Row, first: usize) -> StoredFile {
    StoredFile {
        name: row.get(first),
        partition: row.get(first + 1),
        offset: u32::try_from(row.get::<_, i64>(first + 2)).unwrap_or(u32::MAX),
        size: u32::try_from(row.get::<_, i64>(first + 3)).unwrap_or(0),
        sha256: row.get(first + 4),
        data: row.get(first + 5),
    }
}

/// The stored files of these (just issued) devices become theirs, replacing any earlier
/// ones: one statement each way for the whole chunk.
fn put_files<C: GenericClient>(
    db: &mut Db<'_, C>,
    entries: &[&Issued],
) -> Result<(), postgres::Error> {
    let taken: Vec<&String> = entries.iter().map(|e| &e.device).collect();
    db.execute(
        "DELETE FROM nvs_device_files WHERE device = ANY($1)",
        &[&taken],
    )?;
    let (mut devices, mut names, mut partitions, mut offsets, mut sizes, mut shas, mut data) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for entry in entries {
        for f in &entry.files {
            devices.push(entry.device.as_str());
            names.push(f.name.as_str());
            partitions.push(f.partition.as_str());
            offsets.push(i64::from(f.offset));
            sizes.push(i64::from(f.size));
            shas.push(f.sha256.as_str());
            data.push(f.data.as_slice());
        }
    }
    if !devices.is_empty() {
        db.execute(
            &format!(
                "INSERT INTO nvs_device_files (device, {FILE_COLUMNS})
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[],
                   $5::bigint[], $6::text[], $7::bytea[])"
            ),
            &[
                &devices,
                &names,
                &partitions,
                &offsets,
                &sizes,
                &shas,
                &data,
            ],
        )?;
    }
    Ok(())
}

/// A ledger URL, with the password kept out of everything that is shown.
#[derive(Clone, PartialEq, Eq)]
pub struct ServerUrl {
    /// As given (with the password, if any).
    url: String,
}

impl std::fmt::Debug for ServerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ServerUrl({self})")
    }
}

impl ServerUrl {
    /// `Some` for a `postgres://` or `postgresql://` URL.
    pub fn parse(text: &str) -> Option<ServerUrl> {
        (text.starts_with("postgres://") || text.starts_with("postgresql://")).then(|| ServerUrl {
            url: text.to_owned(),
        })
    }

    /// Whether the URL itself holds a password, in its user part or as a `password=` option
    /// (not allowed in Cargo.toml).
    pub fn has_password(&self) -> bool {
        self.parts().1.is_some_and(|u| u.contains(':'))
            || self.query_pairs().any(|(k, _)| k == "password")
    }

    /// `scheme://`, the user part (`user[:password]`, up to the first `@`, as the client library
    /// reads it: a password may hold `/` or `?`), and the rest (host, database, options).
    fn parts(&self) -> (&str, Option<&str>, &str) {
        let Some(split) = self.url.find("://").map(|i| i + 3) else {
            return ("", None, &self.url);
        };
        let (scheme, rest) = self.url.split_at(split);
        match rest.split_once('@') {
            Some((userinfo, rest)) => (scheme, Some(userinfo), rest),
            None => (scheme, None, rest),
        }
    }

    fn query_pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.parts()
            .2
            .split_once('?')
            .map_or("", |(_, q)| q)
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| p.split_once('=').unwrap_or((p, "")))
    }

    /// The URL with its password replaced by `with` (`None`: left out).
    fn rebuilt(&self, with: Option<&str>) -> String {
        let (scheme, userinfo, rest) = self.parts();
        let mut out = scheme.to_owned();
        if let Some(userinfo) = userinfo {
            let (user, password) = userinfo
                .split_once(':')
                .map_or((userinfo, None), |(u, p)| (u, Some(p)));
            out.push_str(user);
            if let (Some(_), Some(with)) = (password, with) {
                out.push(':');
                out.push_str(with);
            }
            out.push('@');
        }
        let (place, query) = rest
            .split_once('?')
            .map_or((rest, None), |(p, q)| (p, Some(q)));
        out.push_str(place);
        if let Some(query) = query {
            let pairs: Vec<String> = query
                .split('&')
                .filter(|p| !p.is_empty())
                .filter_map(|p| match p.split_once('=') {
                    Some(("password", _)) => with.map(|w| format!("password={w}")),
                    _ => Some(p.to_owned()),
                })
                .collect();
            if !pairs.is_empty() {
                out.push('?');
                out.push_str(&pairs.join("&"));
            }
        }
        out
    }

    /// The URL without its password (as manifests record it; the station supplies the
    /// password from `PGPASSWORD`).
    pub fn without_password(&self) -> String {
        self.rebuilt(None)
    }

    /// `host:port/database` as messages name the ledger.
    fn place(&self) -> String {
        let rest = self.parts().2;
        let rest = rest.split('?').next().unwrap_or(rest);
        let (host, database) = rest.split_once('/').unwrap_or((rest, ""));
        let host = if host.is_empty() { "localhost" } else { host };
        let has_port = match host.rfind(']') {
            Some(end) => host[end..].contains(':'),
            None => host.contains(':'),
        };
        let host = if has_port {
            host.to_owned()
        } else {
            format!("{host}:5432")
        };
        format!("{host}/{database}")
    }
}

impl std::fmt::Display for ServerUrl {
    /// The URL with the password masked.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.rebuilt(Some("***")))
    }
}

/// How the connection is protected, libpq's `sslmode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TlsMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// The ledger in PostgreSQL: one connection per process, shared by its ports' threads.
pub struct PostgresLedger {
    url: ServerUrl,
    connection: Mutex<Connection>,
    claim_lifetime: Duration,
}

/// A connection and the statements prepared on it: each statement is parsed once per
/// connection, not once per call (a round trip saved every time).
struct Connection {
    client: Client,
    statements: HashMap<String, Statement>,
}

/// Where a method runs its statements: a transaction or the bare connection, through the
/// statement cache.
struct Db<'a, C: GenericClient> {
    client: &'a mut C,
    statements: &'a mut HashMap<String, Statement>,
}

impl<C: GenericClient> Db<'_, C> {
    fn statement(&mut self, sql: &str) -> Result<Statement, postgres::Error> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(sql)?;
        self.statements.insert(sql.to_owned(), statement.clone());
        Ok(statement)
    }

    fn query(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, postgres::Error> {
        let statement = self.statement(sql)?;
        self.client.query(&statement, params)
    }

    fn query_one(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, postgres::Error> {
        let statement = self.statement(sql)?;
        self.client.query_one(&statement, params)
    }

    fn query_opt(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, postgres::Error> {
        let statement = self.statement(sql)?;
        self.client.query_opt(&statement, params)
    }

    fn execute(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, postgres::Error> {
        let statement = self.statement(sql)?;
        self.client.execute(&statement, params)
    }

    fn batch_execute(&mut self, sql: &str) -> Result<(), postgres::Error> {
        self.client.batch_execute(sql)
    }
}

impl PostgresLedger {
    /// Connects, and creates or upgrades the tables (once, whichever station comes first).
    pub fn open(url: &ServerUrl) -> LedgerResult<PostgresLedger> {
        let ledger = Self::connect(url, Duration::from_secs(10))?;
        ledger.create_tables()?;
        Ok(ledger)
    }

    /// Connects only to look things up (a development flash naming a device): no tables are
    /// created, `None` when there are none yet, a short connection timeout.
    pub fn open_read_only(url: &ServerUrl) -> LedgerResult<Option<PostgresLedger>> {
        let ledger = Self::connect(url, Duration::from_secs(3))?;
        let exists: bool = ledger.auto(|db| {
            db.query_one("SELECT to_regclass('nvs_meta') IS NOT NULL", &[])
                .map(|r| r.get(0))
        })?;
        Ok(exists.then_some(ledger))
    }

    fn connect(url: &ServerUrl, timeout: Duration) -> LedgerResult<PostgresLedger> {
        let fail = |message: String| LedgerError::Setup {
            ledger: url.to_string(),
            message,
        };
        let (config_text, mode, root_cert) = split_tls_options(&url.url).map_err(fail)?;
        let mut config: postgres::Config = config_text
            .parse()
            .map_err(|e: postgres::Error| fail(format!("not a valid PostgreSQL URL: {e}")))?;
        if config.get_password().is_none()
            && let Ok(password) = std::env::var("PGPASSWORD")
        {
            config.password(password);
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(timeout);
        }
        let server = |source: postgres::Error| LedgerError::Server {
            ledger: url.place(),
            source,
        };
        let client = match mode {
            TlsMode::Disable => config
                .ssl_mode(postgres::config::SslMode::Disable)
                .connect(NoTls)
                .map_err(server)?,
            mode => {
                let tls = tls_connector(mode, root_cert.as_deref()).map_err(fail)?;
                config.ssl_mode(if mode == TlsMode::Prefer {
                    postgres::config::SslMode::Prefer
                } else {
                    postgres::config::SslMode::Require
                });
                config.connect(tls).map_err(server)?
            }
        };
        Ok(PostgresLedger {
            url: url.clone(),
            connection: Mutex::new(Connection {
                client,
                statements: HashMap::new(),
            }),
            claim_lifetime: CLAIM_LIFETIME,
        })
    }

    /// Creates the roles a factory gives its generator and station logins, with their grants
    /// and the policy that lets a station read only the files of devices it holds a claim on:
    /// `sql/postgres-roles.sql`, run as the tables' owner (again changes nothing).
    pub fn create_roles(&self) -> LedgerResult<()> {
        self.with(|tx| tx.batch_execute(ROLES))
    }

    /// Creates or upgrades the tables (once, whichever station comes first).
    fn create_tables(&self) -> LedgerResult<()> {
        let url = &self.url;
        self.with(|tx| {
            // The tables exist and are current: nothing to do (DDL would take table
            // locks that other stations' claims wait on).
            let current =
                |tx: &mut Db<'_, Transaction<'_>>| -> Result<Option<i64>, postgres::Error> {
                    let exists: bool = tx
                        .query_one("SELECT to_regclass('nvs_meta') IS NOT NULL", &[])?
                        .get(0);
                    if !exists {
                        return Ok(None);
                    }
                    Ok(tx
                        .query_opt("SELECT value FROM nvs_meta WHERE key = 'schema'", &[])?
                        .and_then(|r| r.get::<_, String>(0).parse::<i64>().ok()))
                };
            match current(tx)? {
                Some(version) if version > SCHEMA_VERSION => return Ok(Err(version)),
                Some(SCHEMA_VERSION) => return Ok(Ok(())),
                _ => {}
            }
            // Stations starting together create the tables once.
            tx.execute("SELECT pg_advisory_xact_lock(7155437241)", &[])?;
            if let Some(version) = current(tx)?.filter(|v| *v > SCHEMA_VERSION) {
                return Ok(Err(version));
            }
            tx.batch_execute(SCHEMA)?;
            tx.execute(
                "INSERT INTO nvs_meta (key, value) VALUES ('schema', $1)
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                &[&SCHEMA_VERSION.to_string()],
            )?;
            Ok(Ok(()))
        })
        .map_err(|e| match &e {
            // A generator or station login (sql/postgres-roles.sql) may not change tables.
            LedgerError::Server { source, .. }
                if source.code() == Some(&postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) =>
            {
                LedgerError::Setup {
                    ledger: url.to_string(),
                    message: format!(
                        "its tables are missing or of an older cargo-nvs, and this login may not \
                         create or upgrade them ({e}): have the database's owner run `cargo nvs \
                         mfg ledger init --ledger URL`"
                    ),
                }
            }
            _ => e,
        })?
        .map_err(|version| LedgerError::NewerSchema {
            ledger: PathBuf::from(url.to_string()),
            version,
        })
    }

    /// Runs `f` in one transaction (committed when it returns `Ok`).
    fn with<T>(
        &self,
        f: impl FnOnce(&mut Db<'_, Transaction<'_>>) -> Result<T, postgres::Error>,
    ) -> LedgerResult<T> {
        self.with_outcome(|db| f(db).map(|value| (value, true)))
    }

    /// Runs `f` in one transaction, committed when it returns `(value, true)`, else rolled back.
    fn with_outcome<T>(
        &self,
        f: impl FnOnce(&mut Db<'_, Transaction<'_>>) -> Result<(T, bool), postgres::Error>,
    ) -> LedgerResult<T> {
        let mut connection = self.lock()?;
        let Connection { client, statements } = &mut *connection;
        let mut tx = client.transaction().map_err(|e| self.server(e))?;
        let (value, commit) = f(&mut Db {
            client: &mut tx,
            statements,
        })
        .map_err(|e| self.server(e))?;
        if commit { tx.commit() } else { tx.rollback() }.map_err(|e| self.server(e))?;
        Ok(value)
    }

    /// Runs `f`'s statements each on its own (autocommit): for methods of one statement.
    fn auto<T>(
        &self,
        f: impl FnOnce(&mut Db<'_, Client>) -> Result<T, postgres::Error>,
    ) -> LedgerResult<T> {
        let mut connection = self.lock()?;
        let Connection { client, statements } = &mut *connection;
        f(&mut Db { client, statements }).map_err(|e| self.server(e))
    }

    fn lock(&self) -> LedgerResult<std::sync::MutexGuard<'_, Connection>> {
        self.connection.lock().map_err(|_| LedgerError::Poisoned {
            ledger: PathBuf::from(self.url.to_string()),
        })
    }

    fn server(&self, source: postgres::Error) -> LedgerError {
        LedgerError::Server {
            ledger: self.url.place(),
            source,
        }
    }

    fn live_claim(&self) -> String {
        format!(
            "d.claimed_at > to_char((clock_timestamp() - interval '{} seconds') AT TIME ZONE \
             'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')",
            self.claim_lifetime.as_secs()
        )
    }
}

/// Takes libpq's `sslmode` and `sslrootcert` out of the URL (the client library knows only
/// part of them).
fn split_tls_options(url: &str) -> Result<(String, TlsMode, Option<PathBuf>), String> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_owned(), TlsMode::Prefer, None));
    };
    let mut mode = TlsMode::Prefer;
    let mut root_cert = None;
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "sslmode" => {
                mode = match value {
                    "disable" => TlsMode::Disable,
                    "allow" | "prefer" => TlsMode::Prefer,
                    "require" => TlsMode::Require,
                    "verify-ca" => TlsMode::VerifyCa,
                    "verify-full" => TlsMode::VerifyFull,
                    other => {
                        return Err(format!(
                            "sslmode={other}: use disable, prefer, require, verify-ca or \
                             verify-full"
                        ));
                    }
                }
            }
            "sslrootcert" => root_cert = Some(PathBuf::from(value)),
            _ => kept.push(pair),
        }
    }
    let text = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((text, mode, root_cert))
}

/// A rustls connector (ring provider) that checks as much as `mode` asks.
fn tls_connector(
    mode: TlsMode,
    root_cert: Option<&std::path::Path>,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    #[allow(
        deprecated,
        reason = "ring is the provider that builds everywhere (also for Windows with mingw); its \
                  lack of post-quantum key exchange is accepted for a ledger connection"
    )]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let mut roots = rustls::RootCertStore::empty();
    match root_cert {
        Some(path) => {
            for cert in CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("sslrootcert `{}`: {e}", path.display()))?
            {
                let cert = cert.map_err(|e| format!("sslrootcert `{}`: {e}", path.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("sslrootcert `{}`: {e}", path.display()))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let roots = Arc::new(roots);
    let config = match mode {
        TlsMode::VerifyFull => builder.with_root_certificates(roots).with_no_client_auth(),
        TlsMode::VerifyCa | TlsMode::Prefer | TlsMode::Require | TlsMode::Disable => {
            let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
                roots,
                provider.clone(),
            )
            .build()
            .map_err(|e| format!("TLS: {e}"))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(LibpqVerifier {
                    inner: verifier,
                    provider,
                    check_chain: mode == TlsMode::VerifyCa,
                }))
                .with_no_client_auth()
        }
    };
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// libpq's weaker modes: `prefer`/`require` encrypt without checking the certificate;
/// `verify-ca` checks the chain but not the host name.
#[derive(Debug)]
struct LibpqVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    check_chain: bool,
}

impl rustls::client::danger::ServerCertVerifier for LibpqVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if !self.check_chain {
            return Ok(rustls::client::danger::ServerCertVerified::assertion());
        }
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(rustls::client::danger::ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn issued_from_row(row: &Row) -> Issued {
    let images: Option<Vec<String>> = row.get(11);
    let shas: Option<Vec<String>> = row.get(12);
    Issued {
        device: row.get(0),
        image: row.get(1),
        sha256: row.get(2),
        more_images: images
            .unwrap_or_default()
            .into_iter()
            .zip(shas.unwrap_or_default())
            .collect(),
        key_file: row.get(3),
        hmac_key_file: row.get(9),
        size: u32::try_from(row.get::<_, i64>(4)).unwrap_or(0),
        values: row.get(5),
        line: usize::try_from(row.get::<_, i64>(6)).unwrap_or(0),
        batch: row.get(7),
        issued_at: row.get(8),
        batch_dir: PathBuf::from(row.get::<_, String>(10)),
        files: Vec::new(),
        from_chip: row.get(13),
    }
}

fn flash_from_row(r: &Row) -> FlashRecord {
    FlashRecord {
        time: r.get(0),
        mac: r.get(1),
        device: r.get(2),
        sha256: r.get(3),
        port: r.get(4),
        result: r.get(5),
        firmware_sha256: r.get(6),
    }
}

/// Appends a production-log row, at `time` (a copy's) or now.
fn insert_log<C: GenericClient>(
    db: &mut Db<'_, C>,
    r: &FlashRecord,
    time: Option<&str>,
) -> Result<(), postgres::Error> {
    let sql = format!(
        "INSERT INTO nvs_flash_log (time, mac, device, sha256, port, result, firmware_sha256)
         VALUES (COALESCE($7::text, {NOW}), $1, $2, $3, $4, $5, $6)"
    );
    db.execute(
        &sql,
        &[
            &r.mac,
            &r.device,
            &r.sha256,
            &r.port,
            &r.result,
            &r.firmware_sha256,
            &time,
        ],
    )
    .map(|_| ())
}

/// A device's columns for [`issued_from_row`], its other images included (as two arrays), from
/// the `nvs_devices` row `d`.
fn device_columns(d: &str) -> String {
    format!(
        "{d}.device, {d}.image, {d}.sha256, {d}.key_file, {d}.size, {d}.values_file, {d}.line,
         {d}.batch, {d}.issued_at, {d}.hmac_key_file, {d}.batch_dir,
         (SELECT array_agg(i.image ORDER BY i.idx) FROM nvs_device_images i
            WHERE i.device = {d}.device),
         (SELECT array_agg(i.sha256 ORDER BY i.idx) FROM nvs_device_images i
            WHERE i.device = {d}.device),
         {d}.from_chip"
    )
}

impl Ledger for PostgresLedger {
    fn export(&self) -> LedgerResult<LedgerCopy> {
        let devices_sql = format!(
            "SELECT {} FROM nvs_devices d ORDER BY batch, values_file, line, device",
            device_columns("d")
        );
        self.with(|db| {
            // One snapshot for every table.
            db.batch_execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")?;
            let batches = db
                .query(
                    "SELECT dir, first_used, partition_table FROM nvs_batches
                     ORDER BY first_used, dir",
                    &[],
                )?
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect();
            let mut devices: Vec<Issued> = db
                .query(&devices_sql, &[])?
                .iter()
                .map(issued_from_row)
                .collect();
            let mut files: HashMap<String, Vec<StoredFile>> = HashMap::new();
            for row in db.query(
                &format!(
                    "SELECT device, {FILE_COLUMNS} FROM nvs_device_files ORDER BY device, name"
                ),
                &[],
            )? {
                files
                    .entry(row.get(0))
                    .or_default()
                    .push(file_from_row(&row, 1));
            }
            for device in &mut devices {
                device.files = files.remove(&device.device).unwrap_or_default();
            }
            let claims = db
                .query(
                    "SELECT device, claimant, claimed_at, written_to FROM nvs_devices
                     WHERE claimant IS NOT NULL ORDER BY device",
                    &[],
                )?
                .iter()
                .map(|r| ClaimRow {
                    device: r.get(0),
                    claimant: r.get(1),
                    claimed_at: r.get(2),
                    written_to: r.get(3),
                })
                .collect();
            let log = db
                .query(
                    "SELECT time, mac, device, sha256, port, result, firmware_sha256
                     FROM nvs_flash_log ORDER BY id",
                    &[],
                )?
                .iter()
                .map(flash_from_row)
                .collect();
            Ok(LedgerCopy {
                batches,
                devices,
                claims,
                log,
            })
        })
    }

    fn import(&self, copy: &LedgerCopy, log_kept: usize) -> LedgerResult<()> {
        let insert_device = format!(
            "INSERT INTO nvs_devices ({DEVICE_COLUMNS})
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
             ON CONFLICT (device) DO UPDATE SET image = excluded.image,
               sha256 = excluded.sha256, key_file = excluded.key_file,
               from_chip = excluded.from_chip,
               hmac_key_file = excluded.hmac_key_file, size = excluded.size,
               values_file = excluded.values_file, line = excluded.line,
               batch = excluded.batch, issued_at = excluded.issued_at
             WHERE nvs_devices.sha256 = '' AND excluded.sha256 <> ''"
        );
        self.with(|db| {
            for (dir, first_used, table) in &copy.batches {
                db.execute(
                    "INSERT INTO nvs_batches (dir, first_used, partition_table) VALUES ($1, $2, $3)
                     ON CONFLICT (dir) DO UPDATE SET partition_table =
                       COALESCE(excluded.partition_table, nvs_batches.partition_table)",
                    &[dir, first_used, table],
                )?;
            }
            for d in &copy.devices {
                let changed = db.execute(
                    &insert_device,
                    &[
                        &d.device,
                        &d.image,
                        &d.sha256,
                        &d.key_file,
                        &i64::from(d.size),
                        &d.values,
                        &(d.line as i64),
                        &d.batch,
                        &d.issued_at,
                        &d.hmac_key_file,
                        &d.batch_dir.to_string_lossy().into_owned(),
                        &d.from_chip,
                    ],
                )?;
                if changed > 0 {
                    db.execute(
                        "DELETE FROM nvs_device_images WHERE device = $1",
                        &[&d.device],
                    )?;
                    for (idx, (image, sha256)) in d.more_images.iter().enumerate() {
                        db.execute(
                            "INSERT INTO nvs_device_images (device, idx, image, sha256)
                             VALUES ($1, $2, $3, $4)",
                            &[&d.device, &(idx as i64), image, sha256],
                        )?;
                    }
                    put_files(db, &[d])?;
                }
            }
            db.execute(
                "UPDATE nvs_devices SET claimant = NULL, claimed_at = NULL, written_to = NULL
                 WHERE claimant IS NOT NULL OR written_to IS NOT NULL",
                &[],
            )?;
            for claim in &copy.claims {
                db.execute(
                    "UPDATE nvs_devices SET claimant = $2, claimed_at = $3, written_to = $4
                     WHERE device = $1",
                    &[
                        &claim.device,
                        &claim.claimant,
                        &claim.claimed_at,
                        &claim.written_to,
                    ],
                )?;
            }
            for r in copy.log.iter().skip(log_kept) {
                insert_log(db, r, Some(&r.time))?;
            }
            db.execute(
                "UPDATE nvs_devices d SET flashed = TRUE WHERE NOT flashed AND EXISTS
                   (SELECT 1 FROM nvs_flash_log f WHERE f.device = d.device AND f.result = 'ok')",
                &[],
            )?;
            Ok(())
        })
    }

    fn issued(&self, device: &str) -> LedgerResult<Option<Issued>> {
        let sql = format!(
            "SELECT {} FROM nvs_devices d WHERE device = $1",
            device_columns("d")
        );
        self.auto(|db| Ok(db.query_opt(&sql, &[&device])?.map(|r| issued_from_row(&r))))
    }

    fn issue_many(
        &self,
        entries: &[Issued],
        allow_reissue: bool,
    ) -> LedgerResult<Vec<Result<String, Refused>>> {
        let take = if allow_reissue {
            "TRUE"
        } else {
            // This run's own reservations.
            "nvs_devices.sha256 = '' AND nvs_devices.batch = excluded.batch
             AND nvs_devices.batch_dir = excluded.batch_dir"
        };
        let issues = if allow_reissue {
            ", issues = nvs_devices.issues + 1"
        } else {
            ""
        };
        // One statement for the whole chunk (arrays, unnest): a round trip per chunk, not per
        // device.
        let insert = format!(
            "INSERT INTO nvs_devices ({DEVICE_COLUMNS})
             SELECT u.device, u.image, u.sha256, u.key_file, u.size, u.values_file, u.line,
               u.batch, $11, u.hmac_key_file, u.batch_dir, u.from_chip
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[],
               $6::text[], $7::bigint[], $8::text[], $9::text[], $10::text[], $12::boolean[])
               AS u(device, image, sha256, key_file, size, values_file, line, batch,
                 hmac_key_file, batch_dir, from_chip)
             ORDER BY u.device
             ON CONFLICT (device) DO UPDATE SET image = excluded.image,
               sha256 = excluded.sha256, key_file = excluded.key_file,
               hmac_key_file = excluded.hmac_key_file, size = excluded.size,
               values_file = excluded.values_file, line = excluded.line,
               batch = excluded.batch, issued_at = excluded.issued_at,
               batch_dir = excluded.batch_dir, from_chip = excluded.from_chip{issues}
             WHERE {take}
             RETURNING device"
        );
        let column = |f: fn(&Issued) -> String| entries.iter().map(f).collect::<Vec<String>>();
        let devices = column(|e| e.device.clone());
        let images = column(|e| e.image.clone());
        let shas = column(|e| e.sha256.clone());
        let key_files: Vec<Option<String>> = entries.iter().map(|e| e.key_file.clone()).collect();
        let sizes: Vec<i64> = entries.iter().map(|e| i64::from(e.size)).collect();
        let values = column(|e| e.values.clone());
        let lines: Vec<i64> = entries.iter().map(|e| e.line as i64).collect();
        let batches = column(|e| e.batch.clone());
        let hmac: Vec<Option<String>> = entries.iter().map(|e| e.hmac_key_file.clone()).collect();
        let dirs = column(|e| e.batch_dir.to_string_lossy().into_owned());
        let from_chip: Vec<bool> = entries.iter().map(|e| e.from_chip).collect();
        let (outcomes, now) = self.with(|db| {
            let now: String = db.query_one(&format!("SELECT {NOW}"), &[])?.get(0);
            let mut distinct = dirs.clone();
            distinct.sort();
            distinct.dedup();
            db.execute(
                "INSERT INTO nvs_batches (dir, first_used) SELECT d, $2 FROM unnest($1::text[]) d
                 ON CONFLICT (dir) DO NOTHING",
                &[&distinct, &now],
            )?;
            let taken: std::collections::HashSet<String> = db
                .query(
                    &insert,
                    &[
                        &devices, &images, &shas, &key_files, &sizes, &values, &lines, &batches,
                        &hmac, &dirs, &now, &from_chip,
                    ],
                )?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let taken_entries: Vec<&Issued> = entries
                .iter()
                .filter(|e| taken.contains(&e.device))
                .collect();
            let taken_list: Vec<&String> = taken_entries.iter().map(|e| &e.device).collect();
            db.execute(
                "DELETE FROM nvs_device_images WHERE device = ANY($1)",
                &[&taken_list],
            )?;
            let (mut image_devices, mut idxs, mut image_names, mut image_shas) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for entry in &taken_entries {
                for (idx, (image, sha256)) in entry.more_images.iter().enumerate() {
                    image_devices.push(entry.device.clone());
                    idxs.push(idx as i64);
                    image_names.push(image.clone());
                    image_shas.push(sha256.clone());
                }
            }
            if !image_devices.is_empty() {
                db.execute(
                    "INSERT INTO nvs_device_images (device, idx, image, sha256)
                     SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[])",
                    &[&image_devices, &idxs, &image_names, &image_shas],
                )?;
            }
            put_files(db, &taken_entries)?;
            let refused: Vec<&String> = devices.iter().filter(|d| !taken.contains(*d)).collect();
            let mut earlier = std::collections::HashMap::new();
            if !refused.is_empty() {
                for row in db.query(
                    "SELECT device, issued_at, batch_dir FROM nvs_devices WHERE device = ANY($1)",
                    &[&refused],
                )? {
                    earlier.insert(
                        row.get::<_, String>(0),
                        (row.get::<_, String>(1), row.get::<_, String>(2)),
                    );
                }
            }
            Ok((
                entries
                    .iter()
                    .map(|e| match taken.contains(&e.device) {
                        true => Ok(()),
                        false => Err(earlier.get(&e.device).cloned().unwrap_or_default()),
                    })
                    .collect::<Vec<_>>(),
                now,
            ))
        })?;
        Ok(entries
            .iter()
            .zip(outcomes)
            .map(|(entry, outcome)| {
                outcome
                    .map(|()| now.clone())
                    .map_err(|(when, batch_dir)| Refused {
                        device: entry.device.clone(),
                        when,
                        reserved: false,
                        batch_dir,
                        ledger: PathBuf::from(self.url.to_string()),
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
            "TRUE"
        } else if run.resume {
            "nvs_devices.sha256 = '' AND nvs_devices.batch_dir = excluded.batch_dir"
        } else {
            "FALSE"
        };
        let insert = format!(
            "INSERT INTO nvs_devices (device, image, sha256, size, values_file, line, batch,
               issued_at, batch_dir)
             SELECT u.device, '', '', 0, $3, u.line, $4, $5, $6
             FROM unnest($1::text[], $2::bigint[]) AS u(device, line)
             ORDER BY u.device
             ON CONFLICT (device) DO UPDATE SET image = '', sha256 = '', size = 0,
               values_file = excluded.values_file, line = excluded.line,
               batch = excluded.batch, issued_at = excluded.issued_at,
               batch_dir = excluded.batch_dir
             WHERE {take}
             RETURNING device"
        );
        let ids: Vec<&String> = devices.iter().map(|(d, _)| d).collect();
        let lines: Vec<i64> = devices.iter().map(|(_, l)| *l as i64).collect();
        let batch_dir = run.batch_dir.to_string_lossy().into_owned();
        let values = run.values.to_owned();
        let batch = run.batch.to_owned();
        // All or nothing: when any id is refused, the transaction is rolled back.
        let refused = self.with_outcome(|db| {
            let now: String = db.query_one(&format!("SELECT {NOW}"), &[])?.get(0);
            let taken: std::collections::HashSet<String> = db
                .query(&insert, &[&ids, &lines, &values, &batch, &now, &batch_dir])?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let lost: Vec<&String> = ids
                .iter()
                .copied()
                .filter(|d| !taken.contains(*d))
                .collect();
            let mut refused = Vec::new();
            if !lost.is_empty() {
                for row in db.query(
                    "SELECT device, issued_at, sha256 = '', batch_dir FROM nvs_devices
                     WHERE device = ANY($1) ORDER BY device",
                    &[&lost],
                )? {
                    refused.push(Refused {
                        device: row.get(0),
                        when: row.get(1),
                        reserved: row.get(2),
                        batch_dir: row.get(3),
                        ledger: PathBuf::from(self.url.to_string()),
                    });
                }
            }
            let commit = refused.is_empty();
            Ok((refused, commit))
        })?;
        Ok(refused)
    }

    #[cfg(test)]
    fn devices(&self) -> LedgerResult<Vec<Issued>> {
        let sql = format!(
            "SELECT {} FROM nvs_devices d ORDER BY batch, values_file, line",
            device_columns("d")
        );
        self.auto(|db| Ok(db.query(&sql, &[])?.iter().map(issued_from_row).collect()))
    }

    fn batch_dirs(&self) -> LedgerResult<Vec<PathBuf>> {
        self.auto(|db| {
            Ok(db
                .query("SELECT dir FROM nvs_batches ORDER BY first_used, dir", &[])?
                .iter()
                .map(|r| PathBuf::from(r.get::<_, String>(0)))
                .collect())
        })
    }

    fn store_batch_table(&self, batch_dir: &Path, table: &[u8]) -> LedgerResult<()> {
        let sql = format!(
            "INSERT INTO nvs_batches (dir, first_used, partition_table) VALUES ($1, {NOW}, $2)
             ON CONFLICT (dir) DO UPDATE SET partition_table = excluded.partition_table"
        );
        self.auto(|db| {
            db.execute(&sql, &[&batch_dir.to_string_lossy().into_owned(), &table])
                .map(drop)
        })
    }

    fn batch_table(&self, batch_dir: &Path) -> LedgerResult<Option<Vec<u8>>> {
        self.auto(|db| {
            Ok(db
                .query_opt(
                    "SELECT partition_table FROM nvs_batches WHERE dir = $1",
                    &[&batch_dir.to_string_lossy().into_owned()],
                )?
                .and_then(|r| r.get(0)))
        })
    }

    fn stored_files(&self, device: &str) -> LedgerResult<Vec<StoredFile>> {
        let sql =
            format!("SELECT {FILE_COLUMNS} FROM nvs_device_files WHERE device = $1 ORDER BY name");
        self.auto(|db| {
            Ok(db
                .query(&sql, &[&device])?
                .iter()
                .map(|r| file_from_row(r, 0))
                .collect())
        })
    }

    fn claim_next(&self, claimant: &str, batch_dirs: &[PathBuf]) -> LedgerResult<Option<Issued>> {
        let dirs: Vec<String> = batch_dirs
            .iter()
            .map(|d| d.to_string_lossy().into_owned())
            .collect();
        // One statement: the subquery locks the next free device, skipping rows other
        // stations hold locked (SKIP LOCKED); a row claimed meanwhile is re-read and passed by.
        let sql = format!(
            "UPDATE nvs_devices SET claimant = $1, claimed_at = {NOW}
             WHERE device = (
               SELECT d.device FROM nvs_devices d WHERE d.sha256 <> ''
                 AND NOT d.flashed AND d.written_to IS NULL
                 AND (d.claimant IS NULL OR d.claimant = $1 OR NOT ({live}))
                 AND d.batch_dir = ANY($2)
               ORDER BY d.batch, d.values_file, d.line LIMIT 1
               FOR UPDATE SKIP LOCKED)
             RETURNING {columns}",
            live = self.live_claim(),
            columns = device_columns("nvs_devices")
        );
        self.auto(|db| {
            Ok(db
                .query_opt(&sql, &[&claimant, &dirs])?
                .map(|r| issued_from_row(&r)))
        })
    }

    fn claim(&self, device: &str, claimant: &str) -> LedgerResult<ClaimOutcome> {
        let live = self.live_claim();
        // One conditional statement: of two stations claiming it at once, the second waits
        // for the first's row lock, re-reads the row and finds it claimed.
        let take = format!(
            "UPDATE nvs_devices d SET claimant = $2, claimed_at = {NOW}
             WHERE device = $1 AND (claimant IS NULL OR claimant = $2 OR NOT ({live}))
             RETURNING 1"
        );
        let held = "SELECT claimant, claimed_at FROM nvs_devices WHERE device = $1";
        self.with(|db| {
            if db.query_opt(&take, &[&device, &claimant])?.is_some() {
                return Ok(ClaimOutcome::Claimed);
            }
            Ok(match db.query_opt(held, &[&device])? {
                Some(row) => ClaimOutcome::HeldBy {
                    claimant: row.get::<_, Option<String>>(0).unwrap_or_default(),
                    since: row.get::<_, Option<String>>(1).unwrap_or_default(),
                },
                // Not issued: the caller checked; nothing to claim.
                None => ClaimOutcome::Claimed,
            })
        })
    }

    fn release(&self, device: &str, claimant: &str) -> LedgerResult<()> {
        // The station lets go; a record of the chip the device went to stays (with a lapsed
        // claim).
        self.auto(|db| {
            db.execute(
                "UPDATE nvs_devices SET
                   claimant = CASE WHEN written_to IS NULL THEN NULL ELSE claimant END,
                   claimed_at = CASE WHEN written_to IS NULL THEN NULL
                     ELSE '0000-00-00T00:00:00.000Z' END
                 WHERE device = $1 AND claimant = $2",
                &[&device, &claimant],
            )
            .map(drop)
        })
    }

    fn mark_written(&self, device: &str, claimant: &str, mac: &str) -> LedgerResult<bool> {
        let sql = format!(
            "UPDATE nvs_devices SET written_to = $3, claimed_at = {NOW}
             WHERE device = $1 AND claimant = $2 AND (written_to IS NULL OR written_to = $3)"
        );
        self.auto(|db| {
            db.execute(&sql, &[&device, &claimant, &mac])
                .map(|changed| changed == 1)
        })
    }

    fn written_to(&self, device: &str) -> LedgerResult<Option<String>> {
        self.auto(|db| {
            Ok(db
                .query_opt(
                    "SELECT written_to FROM nvs_devices WHERE device = $1
                     AND written_to IS NOT NULL",
                    &[&device],
                )?
                .map(|r| r.get(0)))
        })
    }

    fn written_unlogged(&self) -> LedgerResult<Vec<(String, String)>> {
        self.auto(|db| {
            Ok(db
                .query(
                    "SELECT device, written_to FROM nvs_devices WHERE written_to IS NOT NULL
                     ORDER BY claimed_at",
                    &[],
                )?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect())
        })
    }

    fn log_attempt(&self, record: &FlashRecord) -> LedgerResult<()> {
        self.auto(|db| insert_log(db, record, None))
    }

    fn record_flash(&self, record: &FlashRecord) -> LedgerResult<()> {
        // One statement: the log row and the end of the claim together.
        let sql = format!(
            "WITH logged AS (
               INSERT INTO nvs_flash_log (time, mac, device, sha256, port, result,
                 firmware_sha256)
               VALUES ({NOW}, $1, $2, $3, $4, $5, $7))
             UPDATE nvs_devices SET claimant = NULL, claimed_at = NULL, written_to = NULL,
               flashed = flashed OR $6
             WHERE device = $2"
        );
        self.auto(|db| {
            db.execute(
                &sql,
                &[
                    &record.mac,
                    &record.device,
                    &record.sha256,
                    &record.port,
                    &record.result,
                    &(record.result == "ok"),
                    &record.firmware_sha256,
                ],
            )
            .map(drop)
        })
    }

    fn flash_conflict(&self, mac: &str, device: &str) -> LedgerResult<Option<Conflict>> {
        self.auto(|db| {
            if let Some(row) = db.query_opt(
                "SELECT mac, time FROM nvs_flash_log WHERE device = $1 AND result = 'ok'
                   AND mac <> $2 ORDER BY id DESC LIMIT 1",
                &[&device, &mac],
            )? {
                return Ok(Some(Conflict::OnAnotherChip {
                    device: device.to_owned(),
                    mac: row.get(0),
                    when: row.get(1),
                }));
            }
            Ok(db
                .query_opt(
                    "SELECT device, time FROM nvs_flash_log WHERE mac = $1 AND result = 'ok'
                       AND device <> $2 ORDER BY id DESC LIMIT 1",
                    &[&mac, &device],
                )?
                .map(|row| Conflict::ChipHoldsAnother {
                    mac: mac.to_owned(),
                    device: row.get(0),
                    when: row.get(1),
                }))
        })
    }

    fn flash_log(&self) -> LedgerResult<Vec<FlashRecord>> {
        self.auto(|db| {
            Ok(db
                .query(
                    "SELECT time, mac, device, sha256, port, result, firmware_sha256
                     FROM nvs_flash_log ORDER BY id",
                    &[],
                )?
                .iter()
                .map(flash_from_row)
                .collect())
        })
    }

    fn status(&self) -> LedgerResult<Vec<BatchStatus>> {
        let sql = format!(
            "SELECT batch_dir,
               SUM(CASE WHEN sha256 <> '' THEN 1 ELSE 0 END),
               SUM(CASE WHEN sha256 = '' THEN 1 ELSE 0 END),
               SUM(CASE WHEN ok THEN 1 ELSE 0 END),
               SUM(CASE WHEN NOT ok AND failed THEN 1 ELSE 0 END),
               SUM(CASE WHEN NOT ok AND claimed THEN 1 ELSE 0 END),
               SUM(CASE WHEN NOT ok AND unlogged THEN 1 ELSE 0 END)
             FROM (SELECT d.batch_dir, d.batch, d.sha256, d.flashed AS ok,
               EXISTS (SELECT 1 FROM nvs_flash_log f WHERE f.device = d.device
                 AND f.result <> 'ok') AS failed,
               COALESCE(d.claimant IS NOT NULL AND {live}, FALSE) AS claimed,
               d.written_to IS NOT NULL AS unlogged
             FROM nvs_devices d) s
             GROUP BY batch_dir ORDER BY MIN(batch), batch_dir",
            live = self.live_claim()
        );
        self.auto(|db| {
            Ok(db
                .query(&sql, &[])?
                .iter()
                .map(|r| {
                    let n = |i: usize| u64::try_from(r.get::<_, i64>(i)).unwrap_or(0);
                    let (issued, flashed) = (n(1), n(3));
                    BatchStatus {
                        batch: r.get(0),
                        issued,
                        reserved: n(2),
                        flashed,
                        failed: n(4),
                        claimed: n(5),
                        unlogged: n(6),
                        remaining: issued.saturating_sub(flashed),
                    }
                })
                .collect())
        })
    }

    fn device_with_sha256(&self, sha256: &str) -> LedgerResult<Option<String>> {
        let sha256 = sha256.to_ascii_lowercase();
        self.auto(|db| {
            Ok(db
                .query_opt(
                    "SELECT device FROM nvs_devices WHERE sha256 = $1
                     UNION ALL SELECT device FROM nvs_device_images WHERE sha256 = $1
                     UNION ALL SELECT device FROM nvs_flash_log WHERE sha256 = $1
                       AND result = 'ok' LIMIT 1",
                    &[&sha256],
                )?
                .map(|r| r.get(0)))
        })
    }

    fn device_on_mac(&self, mac: &str) -> LedgerResult<Option<String>> {
        self.auto(|db| {
            Ok(db
                .query_opt(
                    "SELECT device FROM nvs_flash_log WHERE mac = $1 AND result = 'ok'
                     ORDER BY id DESC LIMIT 1",
                    &[&mac],
                )?
                .map(|r| r.get(0)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mfg::ledger::tests::{issue_devices, reservation};

    /// A fresh database on the test server (`NVS_TEST_POSTGRES`: a URL whose user may create
    /// databases; `cargo xtask ci` starts a throwaway server and sets it). Without it the test
    /// is skipped, except in CI, where it fails.
    fn fresh_database(tag: &str) -> Option<ServerUrl> {
        let Some(admin) = std::env::var("NVS_TEST_POSTGRES")
            .ok()
            .filter(|u| !u.is_empty())
        else {
            assert!(
                std::env::var_os("CI").is_none(),
                "NVS_TEST_POSTGRES is not set: CI must test the PostgreSQL ledger"
            );
            eprintln!("skipped: set NVS_TEST_POSTGRES to a PostgreSQL URL (cargo xtask ci does)");
            return None;
        };
        let name = format!("nvs_test_{tag}_{}", std::process::id());
        let mut client = postgres::Client::connect(&admin, NoTls).expect("the test server");
        // One statement each: neither may run inside a transaction block.
        for statement in [
            format!("DROP DATABASE IF EXISTS {name}"),
            format!("CREATE DATABASE {name}"),
        ] {
            client.batch_execute(&statement).unwrap();
        }
        let (base, query) = admin.split_once('?').unwrap_or((&admin, ""));
        let base = base.rsplit_once('/').map_or(base, |(b, _)| b);
        let query = if query.is_empty() {
            String::new()
        } else {
            format!("?{query}")
        };
        ServerUrl::parse(&format!("{base}/{name}{query}"))
    }

    /// libpq's sslmode against a server with a self-signed certificate for localhost (`cargo
    /// xtask ci` starts one and sets NVS_TEST_POSTGRES_CA to it).
    #[test]
    fn a_sqlite_ledger_is_copied_into_postgres() {
        let (Some(a), Some(b)) = (fresh_database("migrate_a"), fresh_database("migrate_b")) else {
            return;
        };
        let target = PostgresLedger::open(&a).unwrap();
        let other = PostgresLedger::open(&b).unwrap();
        crate::mfg::migrate::tests::migration(&target, &other);
    }

    #[test]
    fn tls_modes_behave_as_libpq() {
        let (Ok(_), Ok(ca)) = (
            std::env::var("NVS_TEST_POSTGRES"),
            std::env::var("NVS_TEST_POSTGRES_CA"),
        ) else {
            eprintln!("skipped: NVS_TEST_POSTGRES and NVS_TEST_POSTGRES_CA name a TLS server");
            return;
        };
        if ca.is_empty() {
            eprintln!("skipped: the test server has no certificate (no openssl)");
            return;
        }
        let Some(url) = fresh_database("tls") else {
            return;
        };
        let base = url.url.split('?').next().unwrap_or(&url.url).to_owned();
        let localhost = base.replace("127.0.0.1", "localhost");
        let encrypted = |url: &str| -> Result<bool, String> {
            let ledger =
                PostgresLedger::open(&ServerUrl::parse(url).unwrap()).map_err(|e| e.to_string())?;
            ledger
                .auto(|db| {
                    db.query_one(
                        "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                        &[],
                    )
                    .map(|r| r.get::<_, bool>(0))
                })
                .map_err(|e| e.to_string())
        };
        assert_eq!(encrypted(&base), Ok(true), "prefer: TLS when offered");
        assert_eq!(encrypted(&format!("{base}?sslmode=disable")), Ok(false));
        assert_eq!(encrypted(&format!("{base}?sslmode=require")), Ok(true));
        let verified = format!("sslrootcert={ca}");
        assert_eq!(
            encrypted(&format!("{localhost}?sslmode=verify-full&{verified}")),
            Ok(true)
        );
        assert_eq!(
            encrypted(&format!("{base}?sslmode=verify-ca&{verified}")),
            Ok(true)
        );
        // Not signed by a root the client trusts: refused, naming the ledger's server.
        let e = encrypted(&format!("{localhost}?sslmode=verify-full")).unwrap_err();
        assert!(e.contains("ledger server localhost:"), "{e}");
    }

    #[test]
    fn postgres_semantics() {
        let Some(url) = fresh_database("semantics") else {
            return;
        };
        let (first, second) = (
            PostgresLedger::open(&url).unwrap(),
            PostgresLedger::open(&url).unwrap(),
        );
        crate::mfg::ledger::tests::semantics(&first, &second);
    }

    #[test]
    fn two_stations_claiming_one_device_by_name_at_once_get_it_once() {
        let Some(url) = fresh_database("by_name") else {
            return;
        };
        let setup = PostgresLedger::open(&url).unwrap();
        let run = reservation("1", "/batch");
        assert!(setup.reserve(&[("X".into(), 2)], &run).unwrap().is_empty());
        let stations = [
            PostgresLedger::open(&url).unwrap(),
            PostgresLedger::open(&url).unwrap(),
        ];
        for round in 0..20 {
            let outcomes: Vec<ClaimOutcome> = std::thread::scope(|scope| {
                let handles: Vec<_> = stations
                    .iter()
                    .enumerate()
                    .map(|(n, ledger)| scope.spawn(move || ledger.claim("X", &format!("s{n}"))))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap().unwrap())
                    .collect()
            });
            let won = outcomes
                .iter()
                .filter(|o| **o == ClaimOutcome::Claimed)
                .count();
            assert_eq!(won, 1, "round {round}: {outcomes:?}");
            // Free it for the next round.
            for n in 0..2 {
                setup.release("X", &format!("s{n}")).unwrap();
            }
        }
    }

    #[test]
    fn stations_claiming_at_once_never_get_the_same_device() {
        let Some(url) = fresh_database("claims") else {
            return;
        };
        let setup = PostgresLedger::open(&url).unwrap();
        issue_devices(&setup, 200, "/batch");
        // Four stations, each its own connection, claim and log until nothing is left.
        let taken: Vec<Vec<String>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4)
                .map(|station| {
                    let url = url.clone();
                    scope.spawn(move || {
                        let ledger = PostgresLedger::open(&url).unwrap();
                        let claimant = format!("station-{station}");
                        let mut mine = Vec::new();
                        while let Some(device) = ledger
                            .claim_next(&claimant, &[PathBuf::from("/batch")])
                            .unwrap()
                        {
                            ledger
                                .record_flash(&FlashRecord {
                                    mac: format!("{station}-{}", device.device),
                                    device: device.device.clone(),
                                    sha256: device.sha256.clone(),
                                    port: claimant.clone(),
                                    result: "ok".into(),
                                    time: String::new(),
                                    firmware_sha256: String::new(),
                                })
                                .unwrap();
                            mine.push(device.device);
                        }
                        mine
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut all: Vec<String> = taken.concat();
        assert_eq!(
            all.len(),
            200,
            "{:?}",
            taken.iter().map(Vec::len).collect::<Vec<_>>()
        );
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 200, "a device was flashed twice");
        assert_eq!(setup.flash_log().unwrap().len(), 200);
    }

    #[test]
    fn urls_hide_their_password_and_name_host_port_and_database() {
        let url = ServerUrl::parse("postgres://nvs:s3cret@db.factory:6543/line1?sslmode=require")
            .unwrap();
        assert!(url.has_password());
        let shown = url.to_string();
        assert!(!shown.contains("s3cret"), "{shown}");
        assert_eq!(
            shown,
            "postgres://nvs:***@db.factory:6543/line1?sslmode=require"
        );
        assert_eq!(url.place(), "db.factory:6543/line1");
        assert!(!format!("{url:?}").contains("s3cret"));
        let plain = ServerUrl::parse("postgresql://station@localhost/nvs").unwrap();
        assert!(!plain.has_password());
        assert_eq!(plain.place(), "localhost:5432/nvs");
        assert!(ServerUrl::parse("ledger.sqlite").is_none());
        // The client library reads the user part up to the first `@`: a password may hold
        // `/` or `?`; and `password=` is an option too.
        for (url, secret) in [
            ("postgres://nvs:Ab/9x@db/prod", "Ab/9x"),
            ("postgres://nvs:a?b@db/prod", "a?b"),
            (
                "postgres://nvs@db/prod?sslmode=require&password=s3cret",
                "s3cret",
            ),
        ] {
            let url = ServerUrl::parse(url).unwrap();
            assert!(url.has_password(), "{url}");
            for shown in [
                url.to_string(),
                url.without_password(),
                url.place(),
                format!("{url:?}"),
            ] {
                assert!(!shown.contains(secret), "{shown}");
            }
            assert_eq!(url.place(), "db:5432/prod");
        }
        assert_eq!(
            ServerUrl::parse("postgres://nvs@db/prod?sslmode=require&password=x")
                .unwrap()
                .without_password(),
            "postgres://nvs@db/prod?sslmode=require"
        );
    }

    #[test]
    fn libpq_tls_options_are_taken_out_of_the_url() {
        let (text, mode, root) =
            split_tls_options("postgres://u@h/d?sslmode=verify-full&sslrootcert=ca.pem&x=1")
                .unwrap();
        assert_eq!(
            (text.as_str(), mode, root),
            (
                "postgres://u@h/d?x=1",
                TlsMode::VerifyFull,
                Some(PathBuf::from("ca.pem"))
            )
        );
        assert_eq!(
            split_tls_options("postgres://u@h/d").unwrap().1,
            TlsMode::Prefer
        );
        assert!(split_tls_options("postgres://u@h/d?sslmode=maybe").is_err());
    }
}

/// Not a test but a measurement, run by `cargo xtask bench ledger` (release build, its own
/// server): claiming a device, marking it written and logging its flash, per device, on
/// SQLite and on PostgreSQL. Prints `bench-ledger BACKEND MEDIAN_US P90_US`.
#[cfg(test)]
mod bench {
    use super::*;
    use crate::mfg::ledger::SqliteLedger;

    const DEVICES: usize = 2000;

    /// Claim + mark + log per device (µs, median and 90th percentile); with `files`, each
    /// device has them stored and the station reads them after its claim.
    fn measure(name: &str, ledger: &dyn Ledger, files: &[StoredFile]) {
        let dir = format!("/bench/{name}");
        crate::mfg::ledger::tests::issue_devices_with(ledger, name, DEVICES, &dir, files);
        let dirs = [PathBuf::from(&dir)];
        let mut times = Vec::with_capacity(DEVICES);
        for n in 0..DEVICES {
            let start = std::time::Instant::now();
            let device = ledger.claim_next("station", &dirs).unwrap().unwrap();
            if !files.is_empty() {
                assert_eq!(
                    ledger.stored_files(&device.device).unwrap().len(),
                    files.len()
                );
            }
            let mac = format!("mac-{n}");
            ledger
                .mark_written(&device.device, "station", &mac)
                .unwrap();
            ledger
                .record_flash(&FlashRecord {
                    mac,
                    device: device.device.clone(),
                    sha256: device.sha256.clone(),
                    port: "p".into(),
                    result: "ok".into(),
                    time: String::new(),
                    firmware_sha256: String::new(),
                })
                .unwrap();
            times.push(start.elapsed().as_micros() as u64);
        }
        times.sort_unstable();
        println!(
            "bench-ledger {name} {} {}",
            times[times.len() / 2],
            times[times.len() * 9 / 10]
        );
    }

    /// What a station reads per device with `--store-images`: a 0x6000 image and its key.
    fn stored_files() -> Vec<StoredFile> {
        [
            ("bin/dev.bin", "nvs", 0x9000, 0x6000),
            ("keys/keys.bin", "nvs_keys", 0xf000, 0x1000),
        ]
        .into_iter()
        .map(|(name, partition, offset, size)| {
            let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
            StoredFile {
                name: name.into(),
                partition: partition.into(),
                offset,
                size,
                sha256: crate::hex::sha256_hex(&data),
                data,
            }
        })
        .collect()
    }

    #[test]
    #[ignore = "measurement; run with `cargo xtask bench ledger`"]
    fn ledger_claim_and_record_cost() {
        let dir = crate::mfg::ledger::tests::scratch("bench");
        let sqlite = SqliteLedger::open(&dir.join("l.sqlite"), false).unwrap();
        measure("sqlite", &sqlite, &[]);
        let url = std::env::var("NVS_TEST_POSTGRES").expect("cargo xtask bench ledger sets it");
        let url = ServerUrl::parse(&url).unwrap();
        let postgres = PostgresLedger::open(&url).unwrap();
        measure("postgres", &postgres, &[]);
        let files = stored_files();
        measure("sqlite-stored", &sqlite, &files);
        measure("postgres-stored", &postgres, &files);
        let _ = std::fs::remove_dir_all(dir);
    }
}
