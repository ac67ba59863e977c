//! Everything that goes through espflash's library, in one place: finding and opening the port,
//! connecting (a [`Session`]), progress reporting and reading flash back (here); what goes where
//! ([`segments`]: the app's segments, NVS images and nvs_keys by [`segments::Role`], the
//! partition table cross-check); and what may be written over ([`protect`]: the user-data and
//! factory-data guards on the chip, over the pure [`guard`](crate::guard)).

use std::collections::{BTreeMap, VecDeque};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use espflash::connection::{Connection, ResetAfterOperation, ResetBeforeOperation};
use espflash::flasher::Flasher;
use espflash::image_format::Segment;
use espflash::target::{Chip, DefaultProgressCallback, ProgressCallbacks};
use indicatif::{ProgressBar, ProgressStyle};
use serialport::{SerialPortType, UsbPortInfo};

use crate::fsutil::FileError;
use crate::guard;
use crate::settings;

pub mod protect;
pub mod segments;

/// An operation on the connected chip that failed: `cannot read flash at 0x9000: why`.
#[derive(Debug, thiserror::Error)]
#[error("cannot {what}: {}", error_chain(source))]
pub struct ChipError {
    /// What was being done: "read flash at 0x9000", "erase flash at 0x9000", ….
    pub what: String,
    #[source]
    pub source: espflash::Error,
}

impl ChipError {
    /// For `map_err`: `.map_err(ChipError::doing(format!("erase flash at {addr:#x}")))`.
    pub fn doing(what: String) -> impl Fn(espflash::Error) -> ChipError {
        move |source| ChipError {
            what: what.clone(),
            source,
        }
    }
}

/// Why the chip cannot be reached or its flash read.
#[derive(Debug, thiserror::Error)]
pub enum FlashingError {
    /// No port to use, or it cannot be opened (the message says why and what to do).
    #[error("{0}")]
    Port(String),
    /// Connecting failed; `diagnosis` says what the port answered instead, and what to do.
    #[error("{diagnosis}")]
    Connect {
        diagnosis: String,
        #[source]
        source: espflash::Error,
    },
    #[error("`{port}` has an {found}, not the {expected} given with --chip")]
    WrongChip {
        port: String,
        found: Chip,
        expected: Chip,
    },
    #[error(transparent)]
    Chip(#[from] ChipError),
    #[error(transparent)]
    File(#[from] FileError),
    #[error("the system random number generator failed: {0}")]
    Random(getrandom::Error),
}

/// How to reach the chip (espflash's option names).
#[derive(clap::Args, Debug, Clone)]
pub struct ConnectArgs {
    /// Serial port [default: $ESPFLASH_PORT, then espflash_ports.toml, then the only USB serial port].
    #[arg(long, short = 'P', value_name = "PORT")]
    pub port: Option<String>,
    /// Baud rate to talk to the chip at, after connecting at 115200 [default: $ESPFLASH_BAUD,
    /// then espflash.toml's `baudrate`].
    #[arg(long, short = 'B', value_name = "BAUD")]
    pub baud: Option<u32>,
    /// Chip (esp32, esp32c3, …) [default: detected].
    #[arg(long, short = 'c', value_name = "CHIP", value_parser = parse_chip)]
    pub chip: Option<Chip>,
    /// How to put the chip into the ROM loader.
    #[arg(long, short = 'b', value_enum, default_value_t = Before::DefaultReset)]
    pub before: Before,
    /// What to leave the chip in at the end (hard-reset: run the app; no-reset: stay in the
    /// ROM loader, for a next `--before no-reset`).
    #[arg(long, short = 'a', value_enum, default_value_t = After::HardReset)]
    pub after: After,
    /// Talk to the ROM loader directly instead of uploading espflash's flasher stub.
    #[arg(long)]
    pub no_stub: bool,
}

/// `--chip` that names no chip espflash knows.
#[derive(Debug, thiserror::Error)]
#[error("unknown chip `{0}` (esp32, esp32c2, esp32c3, esp32c6, esp32h2, esp32s2, esp32s3, …)")]
pub struct UnknownChip(String);

/// `--chip`, as espflash spells chips.
pub fn parse_chip(text: &str) -> Result<Chip, UnknownChip> {
    text.parse().map_err(|_| UnknownChip(text.to_owned()))
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
/// else the USB serial ports (those of `[[usb_device]]` when it lists any): the only one, or
/// one picked on a terminal. A given path is opened as is (ptys included).
pub fn resolve_port(explicit: Option<&str>) -> Result<(String, UsbPortInfo), FlashingError> {
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
    let settings = settings::load_or_warn();
    if let Some(port) = settings.serial {
        return Ok((port, unknown));
    }
    let mut usb = usb_ports();
    if !settings.usb_devices.is_empty() {
        usb.retain(|(_, info)| settings.usb_devices.contains(&(info.vid, info.pid)));
    }
    match usb.as_slice() {
        [only] => Ok(only.clone()),
        [] => Err(FlashingError::Port(
            "no serial port found: connect the board, or name the port with --port (or \
             $ESPFLASH_PORT, or `[connection] serial` in espflash_ports.toml)"
                .into(),
        )),
        several if std::io::stdin().is_terminal() && std::io::stderr().is_terminal() => {
            pick_port(several)
        }
        several => Err(FlashingError::Port(format!(
            "several USB serial ports found ({}); pick one with --port (or $ESPFLASH_PORT)",
            several
                .iter()
                .map(|(name, info)| format!("{name} {}", describe_usb(info)))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// The USB serial ports, sorted by name.
pub fn usb_ports() -> Vec<(String, UsbPortInfo)> {
    let mut usb: Vec<(String, UsbPortInfo)> = serialport::available_ports()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|p| match p.port_type {
            SerialPortType::UsbPort(info) => Some((p.port_name, info)),
            _ => None,
        })
        .collect();
    usb.sort_by(|a, b| a.0.cmp(&b.0));
    usb
}

/// `(VID:PID product, manufacturer)`.
pub fn describe_usb(info: &UsbPortInfo) -> String {
    let names: Vec<&str> = [info.product.as_deref(), info.manufacturer.as_deref()]
        .into_iter()
        .flatten()
        .collect();
    format!(
        "({:04x}:{:04x}{}{})",
        info.vid,
        info.pid,
        if names.is_empty() { "" } else { " " },
        names.join(", ")
    )
}

/// Asks on the terminal which of several ports to use.
fn pick_port(ports: &[(String, UsbPortInfo)]) -> Result<(String, UsbPortInfo), FlashingError> {
    eprintln!("Several USB serial ports found:");
    for (i, (name, info)) in ports.iter().enumerate() {
        eprintln!("  {}) {name} {}", i + 1, describe_usb(info));
    }
    eprint!("Which one (1-{})? ", ports.len());
    let mut answer = String::new();
    std::io::stdin()
        .read_line(&mut answer)
        .map_err(|e| FileError::new("read the answer from", Path::new("stdin"), e))?;
    answer
        .trim()
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_sub(1))
        .and_then(|i| ports.get(i))
        .cloned()
        .ok_or_else(|| {
            FlashingError::Port(format!(
                "`{}` is not one of 1-{}; pick the port with --port",
                answer.trim(),
                ports.len()
            ))
        })
}

/// Opens `port` at 115200 baud for espflash, saying what is wrong when it cannot: missing, not
/// a serial port, in use, no permission.
pub fn open_port(port: &str) -> Result<espflash::connection::Port, FlashingError> {
    // Unix ports are files (Windows' COM ports are not).
    #[cfg(unix)]
    {
        let path = Path::new(port);
        if !path.exists() {
            return Err(FlashingError::Port(format!(
                "serial port `{port}` does not exist: is the board plugged in? `cargo nvs \
                 list-ports` lists the ports"
            )));
        }
        use std::os::unix::fs::FileTypeExt;
        if path
            .metadata()
            .is_ok_and(|m| !m.file_type().is_char_device())
        {
            return Err(FlashingError::Port(format!(
                "`{port}` is not a serial port (not a terminal device); `cargo nvs list-ports` \
                 lists the ports"
            )));
        }
    }
    serialport::new(port, 115_200)
        .flow_control(serialport::FlowControl::None)
        .open_native()
        .map_err(|e| FlashingError::Port(open_error(port, &e)))
}

fn open_error(port: &str, e: &serialport::Error) -> String {
    let io = match e.kind() {
        serialport::ErrorKind::Io(kind) => Some(kind),
        _ => None,
    };
    let text = e.to_string();
    if io == Some(std::io::ErrorKind::PermissionDenied) || text.contains("ermission denied") {
        format!(
            "no permission to open `{port}` ({text}): add your user to the port's group (often \
             `dialout` or `uucp`) and log in again"
        )
    } else if text.contains("busy")
        || text.contains("exclusive lock")
        || text.contains("Resource temporarily unavailable")
        || text.contains("EWOULDBLOCK")
        || text.contains("EBUSY")
    {
        format!(
            "`{port}` is busy: another program has it open (a serial monitor, another flash); \
             close it and try again"
        )
    } else if text.contains("Inappropriate ioctl") || text.contains("Not a typewriter") {
        format!("`{port}` is not a serial port ({text})")
    } else {
        format!("cannot open serial port `{port}`: {text}")
    }
}

/// A connected chip. Every session ends with espflash's `reset_after` (`--after`): explicitly
/// with [`Session::finish`], or when dropped on an error path (then quietly), unless a write
/// through espflash did it already ([`Session::ended`]).
pub struct Session {
    /// `Some` until [`Session::into_flasher`].
    flasher: Option<Flasher>,
    args: ConnectArgs,
    ended: bool,
}

impl Session {
    /// espflash's `write_bins_to_flash` ends with `reset_after` itself.
    pub fn ended(&mut self) {
        self.ended = true;
    }

    /// Ends the session as `--after` says.
    pub fn finish(mut self) -> Result<(), FlashingError> {
        self.ended = true;
        let args = self.args.clone();
        finish(&mut self, &args)
    }

    /// The flasher, for the serial port after the session (the monitor); the session must have
    /// ended.
    pub fn into_flasher(mut self) -> Option<Flasher> {
        self.ended = true;
        self.flasher.take()
    }
}

impl std::ops::Deref for Session {
    type Target = Flasher;
    fn deref(&self) -> &Flasher {
        self.flasher
            .as_ref()
            .expect("a session has its flasher until into_flasher")
    }
}

impl std::ops::DerefMut for Session {
    fn deref_mut(&mut self) -> &mut Flasher {
        self.flasher
            .as_mut()
            .expect("a session has its flasher until into_flasher")
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if !self.ended
            && let Some(flasher) = self.flasher.as_mut()
        {
            let chip = flasher.chip();
            let _ = flasher.connection().reset_after(!self.args.no_stub, chip);
        }
    }
}

/// Opens the port and connects to the ROM loader (or the stub).
pub fn connect(args: &ConnectArgs, verify: bool, skip: bool) -> Result<Session, FlashingError> {
    let (port, info) = resolve_port(args.port.as_deref())?;
    let serial = open_port(&port)?;
    let connection = Connection::new(
        serial,
        info,
        args.after.espflash(),
        args.before.espflash(),
        115_200,
    );
    let baud = args.baud.or_else(settings::baud);
    let flasher = Flasher::try_connect(connection, !args.no_stub, verify, skip, args.chip, baud)
        .map_err(|failed| {
            let (e, connection) = *failed;
            connect_error(&port, e, connection, args.before)
        })?;
    let session = Session {
        flasher: Some(flasher),
        args: args.clone(),
        ended: false,
    };
    if let Some(expected) = args.chip
        && session.chip() != expected
    {
        return Err(FlashingError::WrongChip {
            port,
            found: session.chip(),
            expected,
        });
    }
    Ok(session)
}

/// What went wrong while connecting: espflash says "connection failed" for every kind of
/// silence, so ask the port once more and look at what comes back.
fn connect_error(
    port: &str,
    e: espflash::Error,
    connection: Connection,
    before: Before,
) -> FlashingError {
    if let espflash::Error::ChipMismatch(given, found) = &e {
        let diagnosis =
            format!("the chip on `{port}` is an {found}, not the {given} given with --chip");
        return FlashingError::Connect {
            diagnosis,
            source: e,
        };
    }
    let reset_hint = match before {
        Before::NoReset | Before::NoResetNoSync => {
            "put it into download mode (hold BOOT and press RESET), or let cargo nvs reset it \
             (--before default-reset)"
        }
        _ => {
            "hold BOOT and press RESET to enter download mode (boards without the auto-reset \
             circuit need this)"
        }
    };
    let failed_to_connect = matches!(&e, espflash::Error::Connection(_))
        && error_chain(&e).contains("Failed to connect");
    let mut serial = connection.into_serial();
    if !failed_to_connect {
        // It answered at first and then stopped or garbled: bytes go missing.
        let diagnosis = format!(
            "the chip on `{port}` stopped answering while connecting ({}): replies went \
             missing. Is another program (a serial monitor, ModemManager, brltty) reading \
             `{port}`? Close it and try again",
            error_chain(&e)
        );
        return FlashingError::Connect {
            diagnosis,
            source: e,
        };
    }
    let diagnosis = match probe(&mut serial) {
        Probe::Silent => format!(
            "no reply from `{port}`: nothing answers there. Check that it is the board's port \
             (`cargo nvs list-ports`) and {reset_hint}"
        ),
        Probe::Loader => format!(
            "the ROM loader on `{port}` answers, but connecting failed: replies went \
             missing. Is another program reading `{port}`? Close it and try again"
        ),
        Probe::Other(sample) => format!(
            "`{port}` answers, but not as an ESP ROM loader (it sent {sample}): the chip runs its \
             application or is at another baud rate, or this is another device. {}",
            capitalise(reset_hint)
        ),
    };
    FlashingError::Connect {
        diagnosis,
        source: e,
    }
}

/// The error and its sources, `: `-separated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

fn capitalise(text: &str) -> String {
    let mut chars = text.chars();
    chars
        .next()
        .map(|c| c.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

enum Probe {
    Silent,
    Loader,
    /// What arrived, shown safely (printable ASCII, else hex), at most 64 bytes.
    Other(String),
}

/// Sends one SYNC and listens for 300 ms.
fn probe(serial: &mut espflash::connection::Port) -> Probe {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};
    let _ = serialport::SerialPort::clear(serial, serialport::ClearBuffer::All);
    let mut body = vec![0x07, 0x07, 0x12, 0x20];
    body.extend([0x55; 32]);
    let mut frame = vec![0x00, 0x08];
    frame.extend((body.len() as u16).to_le_bytes());
    frame.extend([0; 4]);
    frame.extend(&body);
    let mut slip = vec![0xC0];
    for b in frame {
        match b {
            0xC0 => slip.extend([0xDB, 0xDC]),
            0xDB => slip.extend([0xDB, 0xDD]),
            b => slip.push(b),
        }
    }
    slip.push(0xC0);
    if serial.write_all(&slip).is_err() {
        return Probe::Silent;
    }
    let _ = serialport::SerialPort::set_timeout(serial, Duration::from_millis(50));
    let deadline = Instant::now() + Duration::from_millis(300);
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while Instant::now() < deadline && got.len() < 4096 {
        if let Ok(n) = serial.read(&mut buf) {
            got.extend_from_slice(&buf[..n]);
        }
    }
    if got.is_empty() {
        Probe::Silent
    } else if got.windows(3).any(|w| w == [0xC0, 0x01, 0x08]) {
        Probe::Loader
    } else {
        let sample: &[u8] = &got[..got.len().min(64)];
        let shown = if sample
            .iter()
            .all(|b| b.is_ascii_graphic() || b" \r\n\t".contains(b))
        {
            format!("{:?}", String::from_utf8_lossy(sample))
        } else {
            sample
                .iter()
                .map(|b| crate::hex::hex(std::slice::from_ref(b)))
                .collect::<Vec<_>>()
                .join(" ")
        };
        Probe::Other(format!(
            "{} bytes{}: {shown}",
            got.len(),
            if got.len() > 64 { ", first 64" } else { "" }
        ))
    }
}

/// Ends a session as `--after` says (espflash's `reset_after`): `hard-reset` restarts the app,
/// `no-reset` leaves the ROM loader for the next `--before no-reset`, `no-reset-no-stub` the
/// stub. A port without DTR/RTS lines (a pty, some adapters) cannot reset: say so and go on.
pub fn finish(flasher: &mut Flasher, args: &ConnectArgs) -> Result<(), FlashingError> {
    let chip = flasher.chip();
    match flasher.connection().reset_after(!args.no_stub, chip) {
        Ok(()) => Ok(()),
        Err(e) if is_no_modem_lines(&error_chain(&e)) => {
            eprintln!(
                "note: the chip was not reset: the port has no DTR/RTS lines ({}); press RESET \
                 to start the application",
                error_chain(&e)
            );
            Ok(())
        }
        Err(source) => Err(ChipError::doing("reset the chip (--after)".into())(source).into()),
    }
}

/// The outcome of espflash's `write_bins_to_flash`, whose last step is `reset_after`: when only
/// that reset failed for want of DTR/RTS lines, the data was written and verified; say so and
/// succeed.
pub fn written(result: Result<(), espflash::Error>) -> Result<(), espflash::Error> {
    match result {
        Err(e) if is_no_modem_lines(&error_chain(&e)) => {
            eprintln!(
                "note: written, but the chip was not reset: the port has no DTR/RTS lines ({}); \
                 press RESET to start the application",
                error_chain(&e)
            );
            Ok(())
        }
        other => other,
    }
}

/// An error from toggling DTR/RTS on a port that has none.
pub fn is_no_modem_lines(text: &str) -> bool {
    text.contains("Not a typewriter")
        || text.contains("Inappropriate ioctl")
        || text.contains("ENOTTY")
}

/// Progress per segment, in bytes: bars with speed and time left on a terminal, one line per
/// segment otherwise.
pub struct Progress {
    names: BTreeMap<u32, String>,
    /// Segments still to come, in write order: espflash reports a skipped segment with
    /// `finish(true)` and no `init`, so the order tells which one it was.
    pending: VecDeque<(u32, usize)>,
    bar: Option<ProgressBar>,
    terminal: bool,
    /// Blocks of the segment being written (espflash counts blocks, not bytes).
    blocks: usize,
    started: Option<std::time::Instant>,
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
            blocks: 0,
            started: None,
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

/// `12.3 KiB/s`.
pub fn rate(bytes: usize, elapsed: std::time::Duration) -> String {
    let per_second = bytes as f64 / elapsed.as_secs_f64().max(0.001);
    if per_second >= 1024.0 * 1024.0 {
        format!("{:.1} MiB/s", per_second / (1024.0 * 1024.0))
    } else {
        format!("{:.1} KiB/s", per_second / 1024.0)
    }
}

impl ProgressCallbacks for Progress {
    fn init(&mut self, addr: u32, total: usize) {
        self.blocks = total.max(1);
        self.started = Some(std::time::Instant::now());
        let bytes = self.pending.front().map_or(total, |&(_, len)| len);
        if self.terminal {
            let bar = ProgressBar::new(bytes as u64).with_message(self.label(addr));
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg:>28} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec}, {eta} left",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            self.bar = Some(bar);
        }
    }

    fn update(&mut self, current: usize) {
        if let Some(bar) = &self.bar {
            let bytes = bar.length().unwrap_or(0);
            bar.set_position(bytes * current.min(self.blocks) as u64 / self.blocks as u64);
        }
    }

    fn verifying(&mut self) {
        if let (Some(bar), Some(&(addr, _))) = (&self.bar, self.pending.front()) {
            bar.set_message(format!("{} (verifying)", self.label(addr)));
        }
    }

    fn finish(&mut self, skipped: bool) {
        let (addr, total) = self.pending.pop_front().unwrap_or((0, 0));
        let elapsed = self.started.take().map(|s| s.elapsed());
        let outcome = if skipped {
            self.skipped += 1;
            "unchanged, skipped".to_owned()
        } else {
            self.written += 1;
            match elapsed {
                Some(t) => format!("written in {:.1} s ({})", t.as_secs_f64(), rate(total, t)),
                None => "written".to_owned(),
            }
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
) -> Result<Vec<u8>, FlashingError> {
    // espflash reads into a file: a fresh private folder, since the data may be secret.
    let mut tag = [0u8; 8];
    getrandom::fill(&mut tag).map_err(FlashingError::Random)?;
    let dir = std::env::temp_dir().join(format!(
        "cargo-nvs-read-{}-{}",
        std::process::id(),
        u64::from_le_bytes(tag)
    ));
    #[cfg_attr(not(unix), allow(unused_mut))]
    let mut builder = std::fs::DirBuilder::new();
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
        .create(&dir)
        .map_err(|e| FileError::new("create", &dir, e))?;
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
) -> Result<Vec<u8>, FlashingError> {
    let fail = ChipError::doing(format!("read flash at {offset:#x}"));
    if use_stub {
        flasher
            .read_flash(offset, size, 0x1000, 64, PathBuf::from(file))
            .map_err(&fail)?;
        return Ok(std::fs::read(file).map_err(FileError::reading(file))?);
    }
    // espflash 4.7's ROM read gets addresses wrong past two 64-byte blocks: read 128 bytes per call.
    let mut data = Vec::with_capacity(size as usize);
    for start in (0..size).step_by(128) {
        let len = (size - start).min(128);
        flasher
            .read_flash_rom(offset + start, len, 64, 1, PathBuf::from(file))
            .map_err(&fail)?;
        data.extend_from_slice(&std::fs::read(file).map_err(FileError::reading(file))?);
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
) -> Result<(guard::Finding, Option<Vec<u8>>), FlashingError> {
    use md5::{Digest, Md5};
    let len = planned.ours.len() as u32;
    let on_chip = flasher
        .checksum_md5(addr, len)
        .map_err(ChipError::doing(format!("check the flash at {addr:#x}")))?;
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

/// Erases the regions: with the stub by ERASE_REGION, through the ROM loader by writing
/// erased flash (one pass: the ROM reboots after it).
pub fn erase_regions(
    flasher: &mut Flasher,
    regions: &[(u32, u32)],
    use_stub: bool,
) -> Result<(), FlashingError> {
    if use_stub {
        for &(addr, size) in regions {
            flasher
                .erase_region(addr, size)
                .map_err(ChipError::doing(format!(
                    "erase {size:#x} bytes at {addr:#x}"
                )))?;
        }
        return Ok(());
    }
    let blanks: Vec<Vec<u8>> = regions
        .iter()
        .map(|&(_, size)| vec![0xFF; size as usize])
        .collect();
    let segments: Vec<Segment<'_>> = regions
        .iter()
        .zip(&blanks)
        .map(|(&(addr, _), data)| Segment::new(addr, data))
        .collect();
    written(flasher.write_bins_to_flash(&segments, &mut DefaultProgressCallback))
        .map_err(ChipError::doing("erase (writing erased flash)".into()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blank_md5_matches_known_value() {
        // md5 of 4096 × 0xFF
        assert_eq!(
            format!("{:032x}", blank_md5(4096)),
            "6ae59e64850377ee5470c854761551ea"
        );
    }
}
