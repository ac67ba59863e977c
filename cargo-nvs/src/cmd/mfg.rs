//! `cargo nvs mfg …`: mass production. The engine is the library's [`cargo_nvs::mfg`]; this
//! module maps the subcommands onto it and prints `mfg status` and `mfg log`.

use std::path::Path;
use std::process::ExitCode;

use cargo_nvs::mfg::ChosenLedger;
use cargo_nvs::mfg::flash::{self, Flashed, MfgFlashArgs, NOTHING_LEFT, open_ledger};
use cargo_nvs::mfg::generate::{self, MfgGenerateArgs};
use cargo_nvs::mfg::ledger::BatchStatus;
use cargo_nvs::project::PackageArgs;
use std::path::PathBuf;

use super::OutputFormat;
use super::error::{CmdError, CmdResult};

/// Mass manufacturing: per-device NVS images from a values CSV and either a config CSV
/// (ESP-IDF's mfg_gen.py) or the package's Cargo metadata.
#[derive(clap::Args)]
#[command(
    after_help = "Example:\n  cargo nvs mfg generate --values devices.csv --id serial\n  cargo nvs mfg flash --port /dev/ttyUSB0"
)]
pub struct MfgArgs {
    #[command(subcommand)]
    command: MfgCommand,
}

#[derive(clap::Subcommand)]
enum MfgCommand {
    Generate(Box<MfgGenerateArgs>),
    /// mfg_gen's `generate-key`: the same as `cargo nvs generate-key`.
    GenerateKey(super::generate_key::GenerateKeyArgs),
    Flash(Box<MfgFlashArgs>),
    Station(Box<super::station::StationCommand>),
    Log(MfgLogArgs),
    Status(MfgStatusArgs),
    #[command(subcommand)]
    Ledger(LedgerCommand),
}

/// The product's ledger itself.
#[derive(clap::Subcommand)]
enum LedgerCommand {
    Init(InitArgs),
    Migrate(MigrateArgs),
}

/// Create the product's ledger (a SQLite file, or the tables in a PostgreSQL database), or
/// bring an older one up to date. With --roles (PostgreSQL, as the database's owner), also the
/// roles `nvs_generator` (issues devices, stores images) and `nvs_station` (claims, logs, and
/// reads only the stored files of devices it holds a claim on): the SQL is
/// cargo-nvs/sql/postgres-roles.sql, printed by --print-roles.
#[derive(clap::Args)]
#[command(
    after_help = "Example:\n  cargo nvs mfg ledger init --ledger postgres://owner@db.factory/product_x --roles\n  psql -d product_x -c \"CREATE ROLE station_pc3 LOGIN PASSWORD '…' IN ROLE nvs_station\""
)]
struct InitArgs {
    /// The ledger (a SQLite file or a postgres:// URL).
    #[arg(long, value_name = "PATH|URL", required_unless_present = "print_roles")]
    ledger: Option<PathBuf>,
    /// PostgreSQL: also create the generator and station roles, their rights and the policy
    /// on stored files.
    #[arg(long)]
    roles: bool,
    /// Print the roles' SQL (to run with psql) instead.
    #[arg(long, conflicts_with_all = ["ledger", "roles"])]
    print_roles: bool,
}

/// `mfg ledger init`.
fn init(args: InitArgs) -> CmdResult<ExitCode> {
    if args.print_roles {
        print!("{}", cargo_nvs::mfg::postgres::ROLES);
        return Ok(ExitCode::SUCCESS);
    }
    let Some(ledger) = args.ledger else {
        return Err(CmdError::Usage("give --ledger PATH|URL".into()));
    };
    let chosen = ChosenLedger::named(ledger.as_os_str(), "--ledger")?;
    match (&chosen.server, args.roles) {
        (Some(url), roles) => {
            let ledger = cargo_nvs::mfg::postgres::PostgresLedger::open(url)?;
            if roles {
                ledger.create_roles()?;
            }
        }
        (None, false) => drop(chosen.open(true)?),
        (None, true) => {
            return Err(CmdError::Usage(
                "--roles: a SQLite ledger has no roles (whoever may write the file may do \
                 everything); roles are for a PostgreSQL ledger"
                    .into(),
            ));
        }
    }
    eprintln!(
        "The ledger `{}` is ready{}",
        chosen.shown(),
        if args.roles {
            "; roles nvs_generator and nvs_station created: give each person and station its \
             own login in one of them (CREATE ROLE … LOGIN PASSWORD '…' IN ROLE nvs_station)"
        } else {
            ""
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// Copy a product's ledger into another one (a SQLite file into a PostgreSQL database when the
/// line outgrows one PC): issued devices and their batch folders, claims and the production
/// log, verified by count. The target must be empty or hold an earlier copy of the same ledger
/// (then what came since is added); the copied ids are refused for reissue there.
#[derive(clap::Args)]
#[command(
    after_help = "Example:\n  PGPASSWORD=… cargo nvs mfg ledger migrate --from nvs-ledger.sqlite --to postgres://nvs@db.factory/product_x"
)]
struct MigrateArgs {
    /// The ledger to copy (a SQLite file or a postgres:// URL); it must exist.
    #[arg(long, value_name = "PATH|URL")]
    from: PathBuf,
    /// The ledger to copy into (created if it does not exist).
    #[arg(long, value_name = "PATH|URL")]
    to: PathBuf,
}

/// `mfg ledger migrate`.
fn migrate(args: MigrateArgs) -> CmdResult<ExitCode> {
    let from = ChosenLedger::named(args.from.as_os_str(), "--from")?;
    let to = ChosenLedger::named(args.to.as_os_str(), "--to")?;
    let Some(source) = from.open_existing()? else {
        return Err(CmdError::Usage(format!(
            "--from: no ledger at `{}`",
            from.shown()
        )));
    };
    let target = to.open(true)?;
    let copied = cargo_nvs::mfg::migrate::migrate(&*source, &from.shown(), &*target, &to.shown())?;
    eprintln!(
        "Copied `{}` into `{}`: {} device(s) in {} batch folder(s), {} claim(s), {} log row(s) \
         ({} of them there already); counts verified",
        from.shown(),
        to.shown(),
        copied.devices,
        copied.batches,
        copied.claims,
        copied.log,
        copied.log_before
    );
    Ok(ExitCode::SUCCESS)
}

/// `mfg flash`: exit code [`NOTHING_LEFT`] when every device is flashed.
fn flash_devices(args: MfgFlashArgs) -> CmdResult<ExitCode> {
    Ok(match flash::run(args)? {
        Flashed::Devices(_) => ExitCode::SUCCESS,
        Flashed::NothingLeft => ExitCode::from(NOTHING_LEFT),
    })
}

pub fn run(args: MfgArgs) -> CmdResult<ExitCode> {
    match args.command {
        MfgCommand::Generate(args) => generate::generate(*args)
            .map(|()| ExitCode::SUCCESS)
            .map_err(Into::into),
        MfgCommand::GenerateKey(args) => super::generate_key::run(args),
        MfgCommand::Flash(args) => flash_devices(*args),
        MfgCommand::Station(args) => super::station::run(*args),
        MfgCommand::Log(args) => log(args),
        MfgCommand::Status(args) => status(args),
        MfgCommand::Ledger(LedgerCommand::Init(args)) => init(args),
        MfgCommand::Ledger(LedgerCommand::Migrate(args)) => migrate(args),
    }
}

/// Show where each batch of the product's ledger stands: issued, reserved, flashed, failed,
/// claimed, written without a log entry, remaining.
///
/// Example: `cargo nvs mfg status --format json`
#[derive(clap::Args)]
pub struct MfgStatusArgs {
    /// Only this batch (an `mfg generate` out dir; its manifest.json also names the ledger).
    #[arg(long = "out-dir", aliases = ["outdir", "out_dir"], value_name = "DIR")]
    out_dir: Option<PathBuf>,
    /// The product's ledger [default: as `cargo nvs mfg log` finds it].
    #[arg(long, value_name = "PATH")]
    ledger: Option<PathBuf>,
    /// Output format (to stdout).
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    format: OutputFormat,
    #[command(flatten)]
    package: PackageArgs,
}

pub fn status(args: MfgStatusArgs) -> CmdResult<ExitCode> {
    let (ledger, chosen) = open_ledger(
        args.out_dir.as_deref(),
        args.ledger.as_deref(),
        &args.package,
    )?;
    let mut batches = ledger.status()?;
    if let Some(dir) = &args.out_dir {
        let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.clone());
        batches.retain(|b| Path::new(&b.batch) == dir);
    }
    let mut total = BatchStatus {
        batch: "total".into(),
        ..BatchStatus::default()
    };
    for b in &batches {
        total.issued += b.issued;
        total.reserved += b.reserved;
        total.flashed += b.flashed;
        total.failed += b.failed;
        total.claimed += b.claimed;
        total.unlogged += b.unlogged;
        total.remaining += b.remaining;
    }
    let mut out = std::io::stdout().lock();
    let text = match args.format {
        OutputFormat::Json => {
            let row = |b: &BatchStatus| {
                serde_json::json!({
                    "batch": b.batch, "issued": b.issued, "reserved": b.reserved,
                    "flashed": b.flashed, "failed": b.failed, "claimed": b.claimed,
                    "unlogged": b.unlogged, "remaining": b.remaining,
                })
            };
            let mut total_row = row(&total);
            if let Some(t) = total_row.as_object_mut() {
                t.remove("batch");
            }
            let doc = serde_json::json!({
                "schema": "cargo-nvs/mfg-status/v1",
                "ledger": chosen.shown(),
                "batches": batches.iter().map(row).collect::<Vec<_>>(),
                "total": total_row,
            });
            format!("{}\n", serde_json::to_string_pretty(&doc)?)
        }
        OutputFormat::Text => {
            let mut text = format!("ledger {}\n", chosen.shown());
            text.push_str(&format!(
                "{:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9}  batch\n",
                "issued", "reserved", "flashed", "failed", "claimed", "unlogged", "remaining"
            ));
            for b in batches.iter().chain(std::iter::once(&total)) {
                text.push_str(&format!(
                    "{:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9}  {}\n",
                    b.issued,
                    b.reserved,
                    b.flashed,
                    b.failed,
                    b.claimed,
                    b.unlogged,
                    b.remaining,
                    b.batch
                ));
            }
            text
        }
    };
    std::io::Write::write_all(&mut out, text.as_bytes()).map_err(|source| CmdError::Output {
        what: "status",
        source,
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Export the production log of the product's ledger (every flash of every batch: MAC,
/// device, SHA-256, time, result, port).
#[derive(clap::Args)]
#[command(after_help = "Example:\n  cargo nvs mfg log --format csv > production.csv")]
pub struct MfgLogArgs {
    /// An `mfg generate` out dir whose manifest.json names the ledger.
    #[arg(long = "out-dir", aliases = ["outdir", "out_dir"], value_name = "DIR")]
    out_dir: Option<PathBuf>,
    /// The product's ledger [default: $NVS_LEDGER; else the one <out-dir>/manifest.json names;
    /// else the Cargo package's: [package.metadata.nvs.mfg] ledger, or nvs-ledger.sqlite beside
    /// Cargo.toml].
    #[arg(long, value_name = "PATH")]
    ledger: Option<PathBuf>,
    /// Output format (to stdout).
    #[arg(long, value_enum, default_value_t = LogFormat::Csv)]
    format: LogFormat,
    #[command(flatten)]
    package: PackageArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Csv,
    Json,
}

pub fn log(args: MfgLogArgs) -> CmdResult<ExitCode> {
    let (ledger, _) = open_ledger(
        args.out_dir.as_deref(),
        args.ledger.as_deref(),
        &args.package,
    )?;
    let mut out = std::io::stdout().lock();
    match args.format {
        LogFormat::Csv => ledger.export_log_csv(&mut out)?,
        LogFormat::Json => {
            let rows: Vec<serde_json::Value> = ledger
                .flash_log()?
                .into_iter()
                .map(|r| {
                    serde_json::json!({
                        "mac": r.mac, "device": r.device, "sha256": r.sha256,
                        "time": r.time, "result": r.result, "port": r.port,
                    })
                })
                .collect();
            let mut text = serde_json::to_string_pretty(&rows)?;
            text.push('\n');
            std::io::Write::write_all(&mut out, text.as_bytes()).map_err(|source| {
                CmdError::Output {
                    what: "log",
                    source,
                }
            })?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
