//! Repo automation, run as `cargo xtask <command>` (see `HELP`).

mod bench;
mod casegen;
mod ci;
mod debian;
mod diff_mfg;
mod diff_ref;
mod firmware;
mod flags;
mod postgres;
mod reference;

use std::path::PathBuf;
use std::process::ExitCode;

use xshell::Shell;

use crate::flags::Args;

type Result<T, E = Box<dyn std::error::Error + Send + Sync>> = std::result::Result<T, E>;

const HELP: &str = "\
cargo xtask <command>

commands:
  ci          everything .ci/run checks: format, clippy (Linux and Windows), MSRV, cargo package,
              firmware build, tests, docs, diff-ref, diff-mfg
                --cases N          diff-ref plain cases (default 500)
  flash       build the firmware example and flash it with its NVS images (cargo nvs flash)
                --example NAME     default esp32c3-factory-data
                --port P           serial port; other options go to `cargo nvs flash`
  dist        release artifacts of the firmware example (cargo nvs dist)
                --example NAME, --out-dir DIR
  postgres    run a throwaway PostgreSQL server for the ledger tests; prints NVS_TEST_POSTGRES
  ref-venv    create target/ref-venv with Espressif's esp-idf-nvs-partition-gen 0.3.0
  diff-ref    compare cargo-nvs with the reference on random inputs
                --cases N          plain cases (default 500)
                --encrypt-cases N  encryption cases (default 300)
                --seed S           replay a run (default: from the clock, printed)
                --case NAME        run one case only, e.g. case-0042 or enc-0007
                --encrypt / --no-encrypt
                                   force the encryption cases on or off (default: on if
                                   `cargo-nvs encrypt` exists)
                --keep             keep passing cases on disk too
                --bin PATH         test this cargo-nvs binary instead of building one
  diff-mfg    compare `cargo nvs mfg generate` with mfg_gen's steps + the reference, per device
                --cases N          random config/values pairs (default 8)
                --devices N        devices per case (default 120, at least 100)
                --seed S, --keep, --bin PATH   as for diff-ref
  bench       time cargo-nvs against the reference (builds release): plain and encrypted
              images in-process, whole processes; then the build cost (below)
                --bin PATH         time this cargo-nvs binary instead of the release build
                --no-build-cost    skip the build cost
  bench mfg   `mfg generate` of 10,000 devices against mfg_gen's work in one Python process
              (plain, --keygen; tmpfs and disk), a write+rename baseline, 100,000 devices'
              peak RSS and time; --bin PATH as above
  bench ledger the PostgreSQL ledger against SQLite (a throwaway local server): claim + log per
              device, mfg generate of 10,000 devices, the share of one device's flashing time
  bench flash  flashing app + 2 NVS images into the emulator: one connection vs espflash, then esptool
  bench wire   `cargo nvs flash --baud 921600` into the emulator with wire time on (10 bit times a
              byte at the baud in force): elapsed against the wire limit, ROM loader and stub
  bench station `cargo nvs mfg station` against esptool 5.6 per device, 1, 2 and 4 ports, wire
              time on at 921600: s/device, devices/h, share of the wire limit
  bench build-cost
              time cold debug builds of a crate using nvs-build in build.rs against one using
              cc, side by side, and count their dependencies
";

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<ExitCode> {
    let mut args = Args::from_env();
    let sh = Shell::new()?;
    sh.change_dir(project_root());
    match args.subcommand().as_deref() {
        Some("postgres") => {
            args.finish()?;
            postgres::serve(&sh)
        }
        Some("ref-venv") => {
            args.finish()?;
            let python = reference::ensure_venv(&sh)?;
            println!("{}", python.display());
            Ok(ExitCode::SUCCESS)
        }
        Some("diff-ref") => {
            let opts = diff_ref::Options::parse(&mut args)?;
            args.finish()?;
            diff_ref::run(&sh, opts)
        }
        Some("diff-mfg") => {
            let opts = diff_mfg::Options::parse(&mut args)?;
            args.finish()?;
            diff_mfg::run(&sh, opts)
        }
        Some("bench") => {
            let opts = bench::Options::parse(&mut args)?;
            args.finish()?;
            bench::run(&sh, opts)
        }
        Some("bench-inner") => bench::inner(args),
        Some("flash") => firmware::flash(&sh, args),
        Some("dist") => firmware::dist(&sh, args),
        Some("ci") => {
            let cases = args.value("--cases")?.unwrap_or(500);
            args.finish()?;
            ci::run(&sh, cases)
        }
        Some("help") | None => {
            print!("{HELP}");
            Ok(ExitCode::SUCCESS)
        }
        Some(other) => Err(format!("unknown command `{other}`\n\n{HELP}").into()),
    }
}

fn project_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace root")
        .to_owned()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map_or_else(|| project_root().join("target"), |d| project_root().join(d))
}
