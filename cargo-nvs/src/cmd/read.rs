//! `cargo nvs read --partition NAME | --all`: read NVS partitions back from a device and show
//! them like `cargo nvs dump` (for returned units and debugging). The partitions are found in
//! the table the device holds, so this works on any device, from any folder.

use std::path::PathBuf;
use std::process::ExitCode;

use nvs_build::table::{Partition, PartitionTable};

use super::OutputFormat;
use super::device::TableArgs;
use super::dump::show;
use super::error::{CmdError, CmdResult};
use cargo_nvs::flashing::segments::table_in_flash;
use cargo_nvs::flashing::{ConnectArgs, connect, read_flash};
use cargo_nvs::fsutil::{FileError, write_atomic};
use cargo_nvs::keys::KeyInput;

/// Read NVS partitions back from a device and dump them.
#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["partition", "all"])))]
#[command(
    after_help = "Examples:\n  cargo nvs read --partition nvs\n  cargo nvs read --all --port /dev/ttyUSB0\n  cargo nvs read --partition fctry -o fctry.bin   (the file is private: 0600)"
)]
pub struct ReadArgs {
    /// The NVS partition to read (by name, from the partition table).
    #[arg(long, value_name = "NAME")]
    partition: Option<String>,
    /// Read and dump every NVS partition of the table.
    #[arg(long, conflicts_with = "output")]
    all: bool,
    /// --partition-table FILE [default: the table on the device], --partition-table-offset
    /// (-p/--manifest-path are accepted as before; the table read is the device's own).
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

pub fn run(args: ReadArgs) -> CmdResult<ExitCode> {
    let key = args.key.load()?;
    let offset = args
        .table
        .partition_table_offset
        .or_else(|| cargo_nvs::settings::load_or_warn().partition_table_offset)
        .unwrap_or(PartitionTable::DEFAULT_OFFSET);
    // The table file is checked before the port is opened.
    let given = match &args.table.partition_table {
        Some(path) => Some(PartitionTable::load(path, offset)?),
        None => None,
    };
    let mut flasher = connect(&args.connect, false, false)?;
    let use_stub = !args.connect.no_stub;
    let (table, table_name) = match given {
        Some(table) => (table, "the partition table".to_owned()),
        None => {
            let bytes = read_flash(
                &mut flasher,
                offset,
                PartitionTable::BINARY_SIZE as u32,
                use_stub,
            )?;
            let table = table_in_flash(&bytes, offset, "the device")?;
            eprintln!("Using the device's partition table at {offset:#x}");
            (
                table,
                format!("the device's partition table at {offset:#x}"),
            )
        }
    };
    let partitions: Vec<&Partition> = match &args.partition {
        Some(name) => vec![table.nvs_partition(name, &table_name)?],
        None => {
            let all: Vec<&Partition> = table.nvs_partitions().collect();
            if all.is_empty() {
                return Err(CmdError::Unusable(format!(
                    "{table_name} has no NVS partition"
                )));
            }
            all
        }
    };
    let mut read = Vec::with_capacity(partitions.len());
    for partition in &partitions {
        let bytes = read_flash(&mut flasher, partition.offset, partition.size, use_stub)?;
        eprintln!(
            "Read {} bytes of `{}` at {:#x}",
            bytes.len(),
            partition.name,
            partition.offset
        );
        read.push(bytes);
    }
    // Every command that connects ends as --after says.
    flasher.finish()?;
    let mut status = ExitCode::SUCCESS;
    for (i, (partition, bytes)) in partitions.iter().zip(read).enumerate() {
        if let Some(path) = &args.output {
            // The device's data may hold secrets (keys, certificates, passwords).
            write_atomic(path, &bytes, Some(0o600)).map_err(FileError::writing(path))?;
            eprintln!("Saved to `{}`", path.display());
        }
        if args.all && args.format == OutputFormat::Text {
            if i > 0 {
                println!();
            }
            println!(
                "== partition `{}` ({:#x}, {:#x} bytes)",
                partition.name, partition.offset, partition.size
            );
        }
        let shown = show(
            bytes,
            key.as_ref(),
            args.format,
            &format!("partition `{}`", partition.name),
        );
        match shown {
            Ok(code) if code != ExitCode::SUCCESS => status = code,
            Ok(_) => {}
            // With --all, an encrypted partition without its key does not hide the others.
            Err(e) if args.all => {
                eprintln!("error: {e}");
                status = ExitCode::FAILURE;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(status)
}
