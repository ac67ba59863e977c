//! espflash's everyday device commands with its spellings: `board-info`, `list-ports`,
//! `erase-parts`, `erase-region`, and `erase --user-data` (a factory reset from the host). They
//! work without a Cargo package: the partition table is then the one the chip holds.
//! Erasing goes through the data guard: factory data that is not blank needs
//! `--overwrite-factory-data`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use espflash::flasher::Flasher;
use nvs_build::metadata::Metadata;
use nvs_build::table::PartitionTable;

use super::error::{CmdError, CmdResult};
use cargo_nvs::flashing::protect::{guard_erase, is_factory};
use cargo_nvs::flashing::{
    ConnectArgs, connect, describe_usb, erase_regions, read_flash, usb_ports,
};
use cargo_nvs::guard::Allow;
use cargo_nvs::project::PackageArgs;
use cargo_nvs::settings;

/// Print the chip type, revision, crystal, flash size, features and MAC address.
#[derive(clap::Args)]
#[command(after_help = "Example:\n  cargo nvs board-info --port /dev/ttyUSB0")]
pub struct BoardInfoArgs {
    #[command(flatten)]
    connect: ConnectArgs,
}

/// List the USB serial ports (development boards).
#[derive(clap::Args)]
#[command(after_help = "Example:\n  cargo nvs list-ports --name-only")]
pub struct ListPortsArgs {
    /// List every serial port, not only USB ones.
    #[arg(short = 'a', long)]
    list_all_ports: bool,
    /// Print only the ports' names (for scripts).
    #[arg(short = 'n', long)]
    name_only: bool,
}

/// Where the partition table comes from (for `erase-parts`, `erase --user-data`, `read`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TableArgs {
    /// Partition table (CSV or binary) [default: the package's, from `[package.metadata.nvs]`;
    /// outside a package the one the chip holds].
    #[arg(long, value_name = "FILE")]
    pub partition_table: Option<PathBuf>,
    /// Where the chip's partition table is [default: espflash.toml's, else 0x8000].
    #[arg(long, value_name = "OFFSET", value_parser = parse_u32)]
    pub partition_table_offset: Option<u32>,
    #[command(flatten)]
    pub package: PackageArgs,
}

/// Erase partitions by name (`--overwrite-factory-data` for factory data that is not blank).
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  cargo nvs erase-parts nvs\n  cargo nvs erase-parts nvs,otadata --port /dev/ttyUSB0"
)]
pub struct ErasePartsArgs {
    /// Names of the partitions to erase.
    #[arg(value_name = "LABELS", value_delimiter = ',', required = true)]
    erase_parts: Vec<String>,
    #[command(flatten)]
    table: TableArgs,
    /// Erase factory data too (a production identity, certificates: they cannot be recreated).
    #[arg(long)]
    overwrite_factory_data: bool,
    #[command(flatten)]
    connect: ConnectArgs,
}

/// Erase a region of flash (4 KiB aligned); factory data in it needs `--overwrite-factory-data`.
#[derive(clap::Args)]
#[command(after_help = "Example:\n  cargo nvs erase-region 0x9000 0x6000")]
pub struct EraseRegionArgs {
    /// Start address, a multiple of 4096 (0x1000).
    #[arg(value_parser = parse_u32)]
    address: u32,
    /// Size, a multiple of 4096 (0x1000).
    #[arg(value_parser = parse_u32)]
    size: u32,
    #[command(flatten)]
    table: TableArgs,
    /// Erase factory data in the region too.
    #[arg(long)]
    overwrite_factory_data: bool,
    #[command(flatten)]
    connect: ConnectArgs,
}

/// Erase every user-data NVS partition and keep factory data: a factory reset from the host.
#[derive(clap::Args)]
#[command(
    after_help = "Example:\n  cargo nvs erase --user-data --port /dev/ttyUSB0\n\n\
User data is every data/nvs partition that is not factory data: not flagged `readonly` in the \
table and, in a package, not `factory` and without per-device keys in [package.metadata.nvs]."
)]
pub struct EraseArgs {
    /// Erase the user-data NVS partitions (required: there is no other kind of `erase` yet).
    #[arg(long, required = true)]
    user_data: bool,
    #[command(flatten)]
    table: TableArgs,
    #[command(flatten)]
    connect: ConnectArgs,
}

pub fn parse_u32(text: &str) -> Result<u32, String> {
    let t = text.trim().replace('_', "");
    let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => t.parse(),
    };
    parsed.map_err(|_| format!("`{text}` is not a number (decimal, or hex with 0x)"))
}

pub fn board_info(args: BoardInfoArgs) -> CmdResult<ExitCode> {
    let mut flasher = connect(&args.connect, false, false)?;
    let info = flasher
        .device_info()
        .map_err(CmdError::chip("cannot read the chip's details"))?;
    print!("Chip type:         {}", info.chip);
    match info.revision {
        Some((major, minor)) => println!(" (revision v{major}.{minor})"),
        None => println!(),
    }
    println!("Crystal frequency: {}", info.crystal_frequency);
    println!("Flash size:        {}", info.flash_size);
    println!("Features:          {}", info.features.join(", "));
    if let Some(mac) = &info.mac_address {
        println!("MAC address:       {mac}");
    }
    flasher.finish()?;
    Ok(ExitCode::SUCCESS)
}

pub fn list_ports(args: ListPortsArgs) -> CmdResult<ExitCode> {
    let ports: Vec<(String, String)> = if args.list_all_ports {
        let mut all: Vec<(String, String)> = serialport::available_ports()
            .map_err(CmdError::serial("cannot list the serial ports"))?
            .into_iter()
            .map(|p| {
                let what = match &p.port_type {
                    serialport::SerialPortType::UsbPort(info) => describe_usb(info),
                    serialport::SerialPortType::PciPort => "PCI".to_owned(),
                    serialport::SerialPortType::BluetoothPort => "Bluetooth".to_owned(),
                    serialport::SerialPortType::Unknown => String::new(),
                };
                (p.port_name, what)
            })
            .collect();
        all.sort();
        all
    } else {
        usb_ports()
            .into_iter()
            .map(|(name, info)| (name, describe_usb(&info)))
            .collect()
    };
    if ports.is_empty() && !args.name_only {
        println!(
            "No {}serial ports found.",
            if args.list_all_ports { "" } else { "USB " }
        );
    }
    let width = ports.iter().map(|(n, _)| n.len()).max().unwrap_or(0) + 2;
    for (name, what) in ports {
        if args.name_only {
            println!("{name}");
        } else {
            println!("{name:<width$}{what}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The partition table and, in a package, its NVS metadata.
pub struct Tables {
    pub table: PartitionTable,
    pub metadata: Option<Metadata>,
    /// Where the table came from, for messages.
    pub name: String,
}

/// The package's metadata when there is a package with `[package.metadata.nvs]` (an error if
/// `-p`/`--manifest-path` named one that cannot be read); `None` outside a package.
pub fn package_metadata(package: &PackageArgs) -> CmdResult<Option<Metadata>> {
    let explicit = package.package.is_some() || package.manifest_path.is_some();
    match package.find() {
        Ok(project) => match Metadata::from_manifest(&project.manifest_path) {
            Ok(Some(metadata)) => Ok(Some(metadata)),
            Ok(None) if explicit => Err(CmdError::Usage(format!(
                "`{}` has no [package.metadata.nvs]",
                project.manifest_path.display()
            ))),
            Ok(None) => Ok(None),
            Err(e) => Err(e.into()),
        },
        Err(e) if explicit => Err(e.into()),
        Err(_) => Ok(None),
    }
}

/// The table before connecting: `--partition-table`, else the package's; `None` means "read
/// the chip's" (outside a package).
pub fn table_before_connect(args: &TableArgs) -> CmdResult<Option<Tables>> {
    let offset = args
        .partition_table_offset
        .or_else(|| settings::load_or_warn().partition_table_offset)
        .unwrap_or(PartitionTable::DEFAULT_OFFSET);
    let metadata = package_metadata(&args.package)?;
    if let Some(path) = &args.partition_table {
        let table = PartitionTable::load(path, offset)?;
        return Ok(Some(Tables {
            table,
            metadata,
            name: format!("`{}`", path.display()),
        }));
    }
    Ok(metadata.map(|metadata| Tables {
        table: metadata.table.clone(),
        name: format!(
            "the partition table of `{}`",
            metadata.manifest_path.display()
        ),
        metadata: Some(metadata),
    }))
}

/// The partition table the chip holds at `offset`.
pub fn chip_table(flasher: &mut Flasher, offset: u32, use_stub: bool) -> CmdResult<PartitionTable> {
    let bytes = read_flash(
        flasher,
        offset,
        PartitionTable::BINARY_SIZE as u32,
        use_stub,
    )?;
    if bytes.iter().all(|&b| b == 0xFF) {
        return Err(CmdError::Unusable(format!(
            "the chip holds no partition table at {offset:#x} (erased flash): flash the firmware \
             first, or name a table with --partition-table (or --partition-table-offset)"
        )));
    }
    PartitionTable::parse_binary_at(Path::new("the chip's partition table"), &bytes, offset)
        .map_err(|e| {
            e.with_note(&format!(
                " (read from the chip at {offset:#x}; --partition-table names a table file)"
            ))
            .into()
        })
}

/// The table to use: the one given or the package's, else the chip's.
pub fn resolve_table(
    known: Option<Tables>,
    args: &TableArgs,
    flasher: &mut Flasher,
    use_stub: bool,
) -> CmdResult<Tables> {
    if let Some(tables) = known {
        return Ok(tables);
    }
    let offset = args
        .partition_table_offset
        .or_else(|| settings::load_or_warn().partition_table_offset)
        .unwrap_or(PartitionTable::DEFAULT_OFFSET);
    Ok(Tables {
        table: chip_table(flasher, offset, use_stub)?,
        metadata: None,
        name: format!("the chip's partition table (at {offset:#x})"),
    })
}

fn check_aligned(addr: u32, size: u32) -> CmdResult {
    if !addr.is_multiple_of(0x1000) || !size.is_multiple_of(0x1000) || size == 0 {
        return Err(CmdError::Usage(format!(
            "erase-region {addr:#x} {size:#x}: address and size must be non-zero multiples of \
             4096 (0x1000)"
        )));
    }
    Ok(())
}

fn run_erase(
    connect_args: &ConnectArgs,
    table_args: &TableArgs,
    table_optional: bool,
    allow: Allow,
    pick: impl FnOnce(&Tables) -> CmdResult<Vec<(u32, u32, String)>>,
) -> CmdResult<ExitCode> {
    let known = table_before_connect(table_args)?;
    let use_stub = !connect_args.no_stub;
    let mut flasher = connect(connect_args, false, false)?;
    let tables = match resolve_table(known, table_args, &mut flasher, use_stub) {
        Ok(tables) => tables,
        // erase-region works on a chip without a table: there is no partition to guard.
        Err(e) if table_optional => {
            eprintln!("note: {e}; no partition is guarded");
            Tables {
                table: PartitionTable {
                    partitions: Vec::new(),
                },
                metadata: None,
                name: "no partition table".to_owned(),
            }
        }
        Err(e) => return Err(e),
    };
    let picked = pick(&tables)?;
    let info = flasher.device_info().ok();
    let flash_size = info.as_ref().map(|i| i.flash_size.size());
    if let Some(end) = flash_size
        && let Some((addr, size, what)) = picked
            .iter()
            .find(|(a, s, _)| u64::from(*a) + u64::from(*s) > u64::from(end))
    {
        return Err(CmdError::Refused(format!(
            "{what} ({size:#x} bytes at {addr:#x}) ends beyond the chip's {end:#x} bytes of flash; \
             nothing was erased"
        )));
    }
    let regions: Vec<(u32, u32)> = picked.iter().map(|(a, s, _)| (*a, *s)).collect();
    guard_erase(
        &mut flasher,
        &tables.table,
        tables.metadata.as_ref(),
        &regions,
        allow,
        use_stub,
        info.and_then(|i| i.mac_address),
    )?;
    if regions.is_empty() {
        eprintln!("Nothing to erase");
    } else {
        erase_regions(&mut flasher, &regions, use_stub)?;
        if !use_stub {
            flasher.ended();
        }
        for (addr, size, what) in &picked {
            eprintln!("Erased {what} ({size:#x} bytes at {addr:#x})");
        }
    }
    // Through the ROM loader the write ended with espflash's reset_after already.
    if use_stub || regions.is_empty() {
        flasher.finish()?;
    }
    Ok(ExitCode::SUCCESS)
}

pub fn erase_parts(args: ErasePartsArgs) -> CmdResult<ExitCode> {
    let allow = Allow {
        overwrite_factory_data: args.overwrite_factory_data,
        ..Allow::default()
    };
    let names = args.erase_parts.clone();
    run_erase(&args.connect, &args.table, false, allow, |tables| {
        names
            .iter()
            .map(|name| {
                let p = tables.table.find(name).ok_or_else(|| {
                    CmdError::Usage(format!(
                        "no partition `{name}` in {} (it has: {}); nothing was erased",
                        tables.name,
                        tables
                            .table
                            .partitions
                            .iter()
                            .map(|p| p.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                })?;
                Ok((p.offset, p.size, format!("partition `{}`", p.name)))
            })
            .collect()
    })
}

pub fn erase_region(args: EraseRegionArgs) -> CmdResult<ExitCode> {
    check_aligned(args.address, args.size)?;
    let allow = Allow {
        overwrite_factory_data: args.overwrite_factory_data,
        ..Allow::default()
    };
    let (address, size) = (args.address, args.size);
    // The guard needs a table only when there is one to find: a blank chip has none.
    let table = args.table.clone();
    run_erase(&args.connect, &table, true, allow, move |_| {
        Ok(vec![(address, size, "the region".to_owned())])
    })
}

pub fn erase(args: EraseArgs) -> CmdResult<ExitCode> {
    debug_assert!(args.user_data);
    run_erase(
        &args.connect,
        &args.table,
        false,
        Allow::default(),
        |tables| {
            let mut picked = Vec::new();
            for p in tables.table.partitions.iter().filter(|p| p.is_nvs()) {
                if is_factory(p, tables.metadata.as_ref())? {
                    eprintln!("Keeping factory data `{}` at {:#x}", p.name, p.offset);
                } else {
                    picked.push((p.offset, p.size, format!("user data `{}`", p.name)));
                }
            }
            if picked.is_empty() {
                eprintln!("{} has no user-data NVS partition", tables.name);
            }
            Ok(picked)
        },
    )
}
