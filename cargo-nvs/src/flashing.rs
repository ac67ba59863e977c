//! Talking to the chip through espflash's library: finding and opening the port, connecting,
//! progress reporting, and reading flash back.

use std::collections::{BTreeMap, VecDeque};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use espflash::connection::{Connection, ResetAfterOperation, ResetBeforeOperation};
use espflash::flasher::Flasher;
use espflash::target::{Chip, ProgressCallbacks};
use indicatif::{ProgressBar, ProgressStyle};
use serialport::{SerialPortType, UsbPortInfo};

use crate::guard;
use crate::{CliError, CliResult};

/// How to reach the chip (espflash's option names).
#[derive(clap::Args, Debug, Clone)]
pub struct ConnectArgs {
    /// Serial port [default: $ESPFLASH_PORT, then espflash_ports.toml, then the only USB serial port].
    #[arg(long, short = 'P', value_name = "PORT")]
    pub port: Option<String>,
    /// Baud rate to flash at, after connecting at 115200.
    #[arg(long, short = 'B', value_name = "BAUD")]
    pub baud: Option<u32>,
    /// Chip (esp32, esp32c3, …) [default: detected].
    #[arg(long, short = 'c', value_name = "CHIP", value_parser = parse_chip)]
    pub chip: Option<Chip>,
    /// How to put the chip into the ROM loader.
    #[arg(long, value_enum, default_value_t = Before::DefaultReset)]
    pub before: Before,
    /// What to do after flashing.
    #[arg(long, value_enum, default_value_t = After::HardReset)]
    pub after: After,
    /// Talk to the ROM loader directly instead of uploading espflash's flasher stub.
    #[arg(long)]
    pub no_stub: bool,
}

fn parse_chip(text: &str) -> Result<Chip, String> {
    text.parse().map_err(|_| {
        format!(
            "unknown chip `{text}` (esp32, esp32c2, esp32c3, esp32c6, esp32h2, esp32s2, esp32s3, …)"
        )
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Before {
    /// Toggle DTR/RTS to reset into the bootloader.
    DefaultReset,
    /// The chip is already in the bootloader: just sync.
    NoReset,
    /// No reset and no sync.
    NoResetNoSync,
    /// The USB-JTAG-Serial reset sequence.
    UsbReset,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum After {
    /// Reset the chip into the new firmware (DTR).
    HardReset,
    /// Leave it in the bootloader.
    NoReset,
    /// Leave it in the flasher stub.
    NoResetNoStub,
    /// Reset through the watchdog.
    WatchdogReset,
}

impl Before {
    fn espflash(self) -> ResetBeforeOperation {
        match self {
            Before::DefaultReset => ResetBeforeOperation::DefaultReset,
            Before::NoReset => ResetBeforeOperation::NoReset,
            Before::NoResetNoSync => ResetBeforeOperation::NoResetNoSync,
            Before::UsbReset => ResetBeforeOperation::UsbReset,
        }
    }
}

impl After {
    fn espflash(self) -> ResetAfterOperation {
        match self {
            After::HardReset => ResetAfterOperation::HardReset,
            After::NoReset => ResetAfterOperation::NoReset,
            After::NoResetNoStub => ResetAfterOperation::NoResetNoStub,
            After::WatchdogReset => ResetAfterOperation::WatchdogReset,
        }
    }
}

/// The port to use: `--port`, `$ESPFLASH_PORT`, espflash_ports.toml's `[connection] serial`,
/// else the only USB serial port. A given path is opened as is (ptys included).
pub fn resolve_port(explicit: Option<&str>) -> CliResult<(String, UsbPortInfo)> {
    let unknown = UsbPortInfo {
        vid: 0,
        pid: 0,
        serial_number: None,
        manufacturer: None,
        product: None,
    };
    if let Some(port) = explicit {
        return Ok((port.to_owned(), unknown));
    }
    if let Some(port) = std::env::var("ESPFLASH_PORT")
        .ok()
        .filter(|p| !p.is_empty())
    {
        return Ok((port, unknown));
    }
    if let Some(port) = espflash_ports_toml()? {
        return Ok((port, unknown));
    }
    let ports = serialport::available_ports().unwrap_or_default();
    let usb: Vec<(String, UsbPortInfo)> = ports
        .into_iter()
        .filter_map(|p| match p.port_type {
            SerialPortType::UsbPort(info) => Some((p.port_name, info)),
            _ => None,
        })
        .collect();
    match usb.as_slice() {
        [only] => Ok(only.clone()),
        [] => Err(CliError(
            "no serial port found: connect the board, or name the port with --port (or $ESPFLASH_PORT)".into(),
        )),
        several => Err(CliError(format!(
            "several USB serial ports found ({}); pick one with --port",
            several.iter().map(|(name, _)| name.as_str()).collect::<Vec<_>>().join(", ")
        ))),
    }
}

/// `[connection] serial = "…"` in espflash_ports.toml, in the current folder or its parent
/// (where espflash looks).
fn espflash_ports_toml() -> CliResult<Option<String>> {
    let Ok(cwd) = std::env::current_dir() else {
        return Ok(None);
    };
    let candidates = [Some(cwd.as_path()), cwd.parent()];
    let Some(path) = candidates
        .iter()
        .flatten()
        .map(|d| d.join("espflash_ports.toml"))
        .find(|p| p.is_file())
    else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| CliError(format!("cannot read `{}`: {e}", path.display())))?;
    let doc = toml_serial(&text);
    Ok(doc)
}

/// Finds `serial = "…"` under `[connection]` (a tiny line scan: the file has no other nesting).
fn toml_serial(text: &str) -> Option<String> {
    let mut in_connection = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_connection = line == "[connection]";
        } else if in_connection
            && let Some(value) = line
                .strip_prefix("serial")
                .map(str::trim)
                .and_then(|l| l.strip_prefix('='))
        {
            return Some(value.trim().trim_matches('"').to_owned()).filter(|v| !v.is_empty());
        }
    }
    None
}

/// Opens the port and connects to the ROM loader (or the stub).
pub fn connect(args: &ConnectArgs, verify: bool, skip: bool) -> CliResult<Flasher> {
    let (port, info) = resolve_port(args.port.as_deref())?;
    let serial = serialport::new(&port, 115_200)
        .flow_control(serialport::FlowControl::None)
        .open_native()
        .map_err(|e| CliError(format!("cannot open serial port `{port}`: {e} (is it in use by another program, e.g. a monitor?)")))?;
    let connection = Connection::new(
        serial,
        info,
        args.after.espflash(),
        args.before.espflash(),
        115_200,
    );
    let flasher = Flasher::connect(connection, !args.no_stub, verify, skip, args.chip, args.baud).map_err(|e| {
        if let espflash::Error::ChipMismatch(given, found) = &e {
            return CliError(format!("the chip on `{port}` is an {found}, not the {given} given with --chip"));
        }
        CliError(format!(
            "cannot connect to the chip on `{port}`: {e} (is it in download mode? hold BOOT while resetting, or check --before)"
        ))
    })?;
    if let Some(expected) = args.chip
        && flasher.chip() != expected
    {
        return Err(CliError(format!(
            "`{port}` has an {}, not the {expected} given with --chip",
            flasher.chip()
        )));
    }
    Ok(flasher)
}

/// Progress per segment: bars on a terminal, one line per segment otherwise.
pub struct Progress {
    names: BTreeMap<u32, String>,
    /// Segments still to come, in write order: espflash reports a skipped segment with
    /// `finish(true)` and no `init`, so the order tells which one it was.
    pending: VecDeque<(u32, usize)>,
    bar: Option<ProgressBar>,
    terminal: bool,
    pub written: usize,
    pub skipped: usize,
}

impl Progress {
    /// `segments`: (address, length, name) in the order they will be written.
    pub fn new(segments: &[(u32, usize, String)]) -> Progress {
        Progress {
            names: segments.iter().map(|(a, _, n)| (*a, n.clone())).collect(),
            pending: segments.iter().map(|(a, l, _)| (*a, *l)).collect(),
            bar: None,
            terminal: std::io::stderr().is_terminal(),
            written: 0,
            skipped: 0,
        }
    }

    fn label(&self, addr: u32) -> String {
        match self.names.get(&addr) {
            Some(name) => format!("{name} at {addr:#x}"),
            None => format!("{addr:#x}"),
        }
    }
}

impl ProgressCallbacks for Progress {
    fn init(&mut self, addr: u32, total: usize) {
        if self.terminal {
            let bar = ProgressBar::new(total as u64).with_message(self.label(addr));
            bar.set_style(
                ProgressStyle::with_template("{msg:>28} [{bar:30}] {pos}/{len}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            self.bar = Some(bar);
        }
    }

    fn update(&mut self, current: usize) {
        if let Some(bar) = &self.bar {
            bar.set_position(current as u64);
        }
    }

    fn verifying(&mut self) {
        if let (Some(bar), Some(&(addr, _))) = (&self.bar, self.pending.front()) {
            bar.set_message(format!("{} (verifying)", self.label(addr)));
        }
    }

    fn finish(&mut self, skipped: bool) {
        let (addr, total) = self.pending.pop_front().unwrap_or((0, 0));
        let outcome = if skipped {
            self.skipped += 1;
            "unchanged, skipped"
        } else {
            self.written += 1;
            "written"
        };
        match self.bar.take() {
            Some(bar) => bar.finish_with_message(format!("{}: {outcome}", self.label(addr))),
            None => eprintln!("{}: {total} bytes {outcome}", self.label(addr)),
        }
    }
}

/// Reads `size` bytes at `offset` back from flash.
pub fn read_flash(
    flasher: &mut Flasher,
    offset: u32,
    size: u32,
    use_stub: bool,
) -> CliResult<Vec<u8>> {
    // espflash reads into a file: a fresh private folder, since the data may be secret.
    let mut tag = [0u8; 8];
    getrandom::fill(&mut tag)
        .map_err(|e| CliError(format!("the system random number generator failed: {e}")))?;
    let dir = std::env::temp_dir().join(format!(
        "cargo-nvs-read-{}-{}",
        std::process::id(),
        u64::from_le_bytes(tag)
    ));
    let mut builder = std::fs::DirBuilder::new();
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
        .create(&dir)
        .map_err(|e| CliError(format!("cannot create `{}`: {e}", dir.display())))?;
    let result = read_into(flasher, offset, size, use_stub, &dir.join("read.bin"));
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn read_into(
    flasher: &mut Flasher,
    offset: u32,
    size: u32,
    use_stub: bool,
    file: &Path,
) -> CliResult<Vec<u8>> {
    let fail = |e: espflash::Error| CliError(format!("cannot read flash at {offset:#x}: {e}"));
    if use_stub {
        flasher
            .read_flash(offset, size, 0x1000, 64, PathBuf::from(file))
            .map_err(fail)?;
        return Ok(std::fs::read(file)?);
    }
    // espflash 4.7's ROM read gets addresses wrong past two 64-byte blocks: read 128 bytes per call.
    let mut data = Vec::with_capacity(size as usize);
    for start in (0..size).step_by(128) {
        let len = (size - start).min(128);
        flasher
            .read_flash_rom(offset + start, len, 64, 1, PathBuf::from(file))
            .map_err(fail)?;
        data.extend_from_slice(&std::fs::read(file)?);
    }
    Ok(data)
}

/// What the chip holds where `planned` would go at `addr`: by MD5 first (blank or ours), read
/// back and assessed only when it differs. Returns the bytes read, if any.
pub fn inspect(
    flasher: &mut Flasher,
    addr: u32,
    planned: &guard::Planned<'_>,
    use_stub: bool,
) -> CliResult<(guard::Finding, Option<Vec<u8>>)> {
    use md5::{Digest, Md5};
    let len = planned.ours.len() as u32;
    let on_chip = flasher
        .checksum_md5(addr, len)
        .map_err(|e| CliError(format!("cannot check the flash at {addr:#x}: {e}")))?;
    if on_chip == blank_md5(len) {
        return Ok((guard::Finding::Blank, None));
    }
    if on_chip == u128::from_be_bytes(Md5::digest(planned.ours).into()) {
        return Ok((guard::Finding::Same, None));
    }
    let chip = read_flash(flasher, addr, len, use_stub)?;
    Ok((guard::assess(planned, &chip), Some(chip)))
}

/// MD5 of `len` bytes of erased flash (0xFF), to tell a blank partition by its checksum.
pub fn blank_md5(len: u32) -> u128 {
    use md5::{Digest, Md5};
    let mut hasher = Md5::new();
    let block = [0xFFu8; 4096];
    let mut left = len as usize;
    while left > 0 {
        let n = left.min(block.len());
        hasher.update(&block[..n]);
        left -= n;
    }
    u128::from_be_bytes(hasher.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn espflash_ports_toml_serial() {
        assert_eq!(
            toml_serial("[connection]\nserial = \"/dev/ttyUSB1\"\n"),
            Some("/dev/ttyUSB1".into())
        );
        assert_eq!(toml_serial("[usb_device]\nserial = \"x\"\n"), None);
    }

    #[test]
    fn blank_md5_matches_known_value() {
        // md5 of 4096 × 0xFF
        assert_eq!(
            format!("{:032x}", blank_md5(4096)),
            "6ae59e64850377ee5470c854761551ea"
        );
    }
}
