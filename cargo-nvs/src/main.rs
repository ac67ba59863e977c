//! `cargo nvs`: ESP32 NVS partition images in the Cargo workflow.

mod cmd;
mod report;

use std::ffi::OsString;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Cargo runs `cargo-nvs nvs ARGS…`; the clap root mirrors that, as cargo-espflash does, so that
/// help and usage say `cargo nvs`.
#[derive(Parser)]
#[command(name = "cargo", bin_name = "cargo", styles = clap::builder::Styles::styled())]
enum CargoCli {
    #[command(name = "nvs", version, about, long_about = None)]
    Nvs(NvsCli),
}

#[derive(clap::Args)]
struct NvsCli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Generate(cmd::generate::GenerateArgs),
    Encrypt(cmd::encrypt::EncryptArgs),
    Decrypt(cmd::decrypt::DecryptArgs),
    GenerateKey(cmd::generate_key::GenerateKeyArgs),
    Dump(cmd::dump::DumpArgs),
    Partitions(cmd::partitions::PartitionsArgs),
    Flash(Box<cmd::flash::FlashArgs>),
    Read(Box<cmd::read::ReadArgs>),
    Dist(Box<cmd::dist::DistArgs>),
    Mfg(cmd::mfg::MfgArgs),
    BoardInfo(cmd::device::BoardInfoArgs),
    ListPorts(cmd::device::ListPortsArgs),
    EraseParts(Box<cmd::device::ErasePartsArgs>),
    EraseRegion(Box<cmd::device::EraseRegionArgs>),
    Erase(Box<cmd::device::EraseArgs>),
    Monitor(Box<cmd::monitor::MonitorArgs>),
}

fn main() -> ExitCode {
    std::panic::set_hook(Box::new(panic_message));
    let CargoCli::Nvs(cli) = CargoCli::parse_from(cargo_args(std::env::args_os()));
    // A panic (a broken pipe, a library that trips over a garbled reply) has printed its
    // message in `panic_message`: exit with failure, not a backtrace.
    std::panic::catch_unwind(move || run(cli)).unwrap_or(ExitCode::FAILURE)
}

/// What a panic says to the user: nothing for a closed stdout (`| head`), a clear error for
/// espflash tripping over a reply that lost bytes, else an internal error.
fn panic_message(info: &std::panic::PanicHookInfo<'_>) {
    let message = info
        .payload()
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| info.payload().downcast_ref::<&str>().copied())
        .unwrap_or("");
    if message.contains("Broken pipe") || message.contains("os error 32") {
        // The reader went away (`cargo nvs dump … | head`): stop quietly.
        std::process::exit(0);
    }
    let location = info
        .location()
        .map(|l| format!("{}:{}", l.file(), l.line()))
        .unwrap_or_default();
    if location.contains("espflash") {
        eprintln!(
            "error: the reply from the chip was garbled or cut short (espflash: {message}): bytes \
             went missing on the serial line. Is another program (a serial monitor, \
             ModemManager, brltty) reading the port? Close it and try again"
        );
    } else {
        eprintln!(
            "error: internal error (a bug in cargo nvs, please report it): {message} at {location}"
        );
    }
}

fn run(cli: NvsCli) -> ExitCode {
    let result = match cli.command {
        Command::Generate(args) => cmd::generate::run(args),
        Command::Encrypt(args) => cmd::encrypt::run(args),
        Command::Decrypt(args) => cmd::decrypt::run(args),
        Command::GenerateKey(args) => cmd::generate_key::run(args),
        Command::Dump(args) => cmd::dump::run(args),
        Command::Partitions(args) => cmd::partitions::run(args),
        Command::Flash(args) => cmd::flash::run(*args),
        Command::Read(args) => cmd::read::run(*args),
        Command::Dist(args) => cmd::dist::run(*args),
        Command::Mfg(args) => cmd::mfg::run(args),
        Command::BoardInfo(args) => cmd::device::board_info(args),
        Command::ListPorts(args) => cmd::device::list_ports(args),
        Command::EraseParts(args) => cmd::device::erase_parts(*args),
        Command::EraseRegion(args) => cmd::device::erase_region(*args),
        Command::Erase(args) => cmd::device::erase(*args),
        Command::Monitor(args) => cmd::monitor::run(*args),
    };
    match result {
        Ok(code) => code,
        // `error: …`, the input's line when the error has a place, help and code; exit 1.
        Err(error) => {
            report::print(&error);
            ExitCode::FAILURE
        }
    }
}

/// `cargo nvs X` arrives as `cargo-nvs nvs X`; accept `cargo-nvs X` run directly too.
fn cargo_args(args: impl Iterator<Item = OsString>) -> Vec<OsString> {
    let mut args: Vec<OsString> = args.collect();
    if args.get(1).is_none_or(|a| a != "nvs") {
        args.insert(1, "nvs".into());
    }
    args
}
