//! `cargo nvs read --partition NAME`: read an NVS partition back from a device and show it
//! like `cargo nvs dump` (for returned units and debugging).

use std::path::PathBuf;
use std::process::ExitCode;

use nvs_build::table::{Partition, PartitionTable};

use super::OutputFormat;
use super::device::{TableArgs, resolve_table, table_before_connect};
use super::dump::show;
use super::keys::KeyInput;
use crate::flashing::{ConnectArgs, connect, read_flash};
use crate::fsutil::write_atomic;
use crate::{CliError, CliResult};

/// Read an NVS partition back from a device and dump it.
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  cargo nvs read --partition nvs\n  cargo nvs read --partition fctry -o fctry.bin --port /dev/ttyUSB0   (outside a package: the chip's own partition table)"
)]
pub struct ReadArgs {
    /// The NVS partition to read (by name, from the partition table).
    #[arg(long, value_name = "NAME")]
    partition: String,
    #[command(flatten)]
    table: TableArgs,
    /// Also save the raw partition contents here.
    #[arg(long, short = 'o', value_name = "FILE")]
    output: Option<PathBuf>,
    #[command(flatten)]
    key: KeyInput,
    #[arg(long, value_enum, default_value_t)]
    format: OutputFormat,
    #[command(flatten)]
    connect: ConnectArgs,
}

/// The data/nvs partition `name` of `table` (`table_name` says which table, in errors).
pub fn nvs_partition<'t>(
    table: &'t PartitionTable,
    name: &str,
    table_name: &str,
) -> CliResult<&'t Partition> {
    let partition = table.find(name).ok_or_else(|| {
        let nvs: Vec<&str> = table.nvs_partitions().map(|p| p.name.as_str()).collect();
        CliError(format!(
            "no partition `{name}` in {table_name} (its NVS partitions: {})",
            nvs.join(", ")
        ))
    })?;
    if !partition.is_nvs() {
        return Err(CliError(format!(
            "partition `{name}` is {}/{}, not data/nvs",
            partition.type_name(),
            partition.subtype_name()
        )));
    }
    Ok(partition)
}

pub fn run(args: ReadArgs) -> CliResult<ExitCode> {
    let known = table_before_connect(&args.table)?;
    if let Some(tables) = &known {
        nvs_partition(&tables.table, &args.partition, &tables.name)?;
    }
    let key = args.key.load()?;
    let use_stub = !args.connect.no_stub;
    let mut flasher = connect(&args.connect, false, false)?;
    let tables = resolve_table(known, &args.table, &mut flasher, use_stub)?;
    let partition = nvs_partition(&tables.table, &args.partition, &tables.name)?.clone();
    let bytes = read_flash(&mut flasher, partition.offset, partition.size, use_stub)?;
    flasher.finish()?;
    eprintln!(
        "Read {} bytes of `{}` at {:#x}",
        bytes.len(),
        partition.name,
        partition.offset
    );
    if let Some(path) = &args.output {
        // The device's data may hold secrets (keys, certificates, passwords).
        write_atomic(path, &bytes, Some(0o600))
            .map_err(|e| CliError(format!("cannot write `{}`: {e}", path.display())))?;
        eprintln!("Saved to `{}`", path.display());
    }
    show(
        bytes,
        key.as_ref(),
        args.format,
        &format!("partition `{}`", partition.name),
    )
}
