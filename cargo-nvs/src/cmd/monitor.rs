//! `cargo nvs monitor` and `flash --monitor`: show the application's serial output, with defmt
//! frames decoded from the ELF's table. Ctrl-R resets the chip, Ctrl-C exits.
//!
//! Keys come from the terminal (raw mode on Linux) or, when stdin is not a terminal, from stdin
//! as bytes (0x12 resets, 0x03 exits, others go to the device; at end of input the monitor goes
//! on). `--non-interactive` reads no keys: the monitor runs until the port closes or the
//! process is interrupted. A port without DTR/RTS lines (a pty) cannot reset the chip: the
//! monitor says so and carries on.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::Duration;

use defmt_decoder::Table;
use espflash::connection::Port;
use serialport::SerialPort;

use super::error::{CmdError, CmdResult};
use cargo_nvs::flashing::{is_no_modem_lines, open_port, resolve_port};
use cargo_nvs::fsutil::FileError;

/// How the application's output is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Text, shown as it arrives.
    Serial,
    /// defmt frames (esp-println's `defmt-espflash`), decoded with the ELF's table; text
    /// between frames is shown as it arrives.
    Defmt,
}

/// Monitor options (espflash's spellings).
#[derive(clap::Args, Clone, Debug)]
pub struct MonitorOptions {
    /// Baud rate of the application's serial output.
    #[arg(
        long,
        env = "MONITOR_BAUD",
        default_value_t = 115_200,
        value_name = "BAUD"
    )]
    pub monitor_baud: u32,
    /// How the output is encoded [default: defmt when the ELF has a defmt table, else serial].
    #[arg(long, short = 'L', value_enum, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Read no keys (scripts, CI): run until the port closes or the process is interrupted.
    #[arg(long)]
    pub non_interactive: bool,
}

/// Open the serial monitor (without flashing).
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  cargo nvs monitor --port /dev/ttyUSB0\n  \
cargo nvs monitor --elf target/riscv32imc-unknown-none-elf/release/app --log-format defmt\n\n\
Keys: Ctrl-R resets the chip, Ctrl-C exits.")]
pub struct MonitorArgs {
    /// Serial port [default: $ESPFLASH_PORT, then espflash_ports.toml, then the only USB serial port].
    #[arg(long, short = 'P', value_name = "PORT")]
    port: Option<String>,
    /// The application's ELF, for defmt's table.
    #[arg(long, value_name = "FILE")]
    elf: Option<PathBuf>,
    /// Do not reset the chip before monitoring.
    #[arg(long)]
    no_reset: bool,
    #[command(flatten)]
    options: MonitorOptions,
}

pub fn run(args: MonitorArgs) -> CmdResult<ExitCode> {
    let (port, _) = resolve_port(args.port.as_deref())?;
    let serial = open_port(&port)?;
    let elf = match &args.elf {
        Some(path) => {
            Some(std::fs::read(path).map_err(|e| FileError::new("read the ELF", path, e))?)
        }
        None => None,
    };
    monitor(serial, &port, elf.as_deref(), &args.options, !args.no_reset)
}

/// Shows the output of the application on `serial` until Ctrl-C (or the port closes);
/// `reset` restarts the chip first.
pub fn monitor(
    serial: Port,
    port: &str,
    elf: Option<&[u8]>,
    options: &MonitorOptions,
    reset: bool,
) -> CmdResult<ExitCode> {
    let result = watch(serial, port, elf, options, reset);
    raw_mode::restore();
    result
}

fn watch(
    mut serial: Port,
    port: &str,
    elf: Option<&[u8]>,
    options: &MonitorOptions,
    reset: bool,
) -> CmdResult<ExitCode> {
    let table = defmt_table(elf, options.log_format)?;
    serial
        .set_baud_rate(options.monitor_baud)
        .map_err(CmdError::serial(format!(
            "cannot set `{port}` to {} baud",
            options.monitor_baud
        )))?;
    serial
        .set_timeout(Duration::from_millis(50))
        .map_err(CmdError::serial(format!(
            "cannot set a timeout on `{port}`"
        )))?;
    let stdin_is_terminal = std::io::IsTerminal::is_terminal(&std::io::stdin());
    eprintln!(
        "Monitoring `{port}` at {} baud ({}){}",
        options.monitor_baud,
        if table.is_some() { "defmt" } else { "serial" },
        if options.non_interactive {
            ""
        } else {
            "; Ctrl-R resets the chip, Ctrl-C exits"
        }
    );
    if reset {
        reset_chip(&mut serial);
    }
    let keys = if options.non_interactive {
        None
    } else {
        Some(read_keys(stdin_is_terminal))
    };
    let mut decoder = table.as_ref().map(Defmt::new);
    let mut stdout = std::io::stdout().lock();
    let mut buf = [0u8; 1024];
    loop {
        match serial.read(&mut buf) {
            Ok(0) => {}
            Ok(n) => {
                let shown = match &mut decoder {
                    Some(defmt) => defmt.feed(&buf[..n]),
                    None => buf[..n].to_vec(),
                };
                // A closed stdout (`| head`) ends the monitor quietly.
                if stdout
                    .write_all(&shown)
                    .and_then(|()| stdout.flush())
                    .is_err()
                {
                    return Ok(ExitCode::SUCCESS);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                return Err(CmdError::PortGone {
                    port: port.to_owned(),
                    source: e,
                });
            }
        }
        let Some(keys) = &keys else { continue };
        loop {
            match keys.rx.try_recv() {
                Ok(0x03) => {
                    eprintln!("\nExiting the monitor");
                    return Ok(ExitCode::SUCCESS);
                }
                Ok(0x12) => reset_chip(&mut serial),
                Ok(key) => {
                    let _ = serial.write_all(&[key]);
                }
                Err(_) => break,
            }
        }
    }
}

/// The ELF's defmt table, when the output is (or may be) defmt.
fn defmt_table(elf: Option<&[u8]>, format: Option<LogFormat>) -> CmdResult<Option<Table>> {
    if format == Some(LogFormat::Serial) {
        return Ok(None);
    }
    let Some(elf) = elf else {
        if format == Some(LogFormat::Defmt) {
            return Err(CmdError::Usage(
                "--log-format defmt needs the application's ELF for its table: pass --elf FILE"
                    .into(),
            ));
        }
        return Ok(None);
    };
    match Table::parse(elf) {
        Ok(Some(table)) => {
            if table.encoding() != defmt_decoder::Encoding::Rzcobs {
                return Err(CmdError::Unusable(format!(
                    "the ELF's defmt encoding is {:?}; the monitor decodes rzcobs (esp-println's \
                     `defmt-espflash`)",
                    table.encoding()
                )));
            }
            Ok(Some(table))
        }
        Ok(None) if format == Some(LogFormat::Defmt) => Err(CmdError::Unusable(
            "--log-format defmt: the ELF has no defmt table (.defmt section); use --log-format \
             serial"
                .into(),
        )),
        Ok(None) => Ok(None),
        Err(e) => Err(CmdError::Unusable(format!(
            "cannot read the ELF's defmt table: {e}"
        ))),
    }
}

/// Restarts the chip (RTS pulse, as espflash does); a port without modem lines cannot.
fn reset_chip(serial: &mut Port) {
    eprintln!("Resetting the chip");
    let pulse = serial.write_request_to_send(true).and_then(|()| {
        std::thread::sleep(Duration::from_millis(100));
        serial.write_request_to_send(false)
    });
    if let Err(e) = pulse {
        if is_no_modem_lines(&e.to_string()) {
            eprintln!(
                "note: the port has no DTR/RTS lines ({e}): press RESET on the board to restart it"
            );
        } else {
            eprintln!("warning: cannot reset the chip: {e}");
        }
    }
}

struct Keys {
    rx: mpsc::Receiver<u8>,
}

/// Keys from stdin, on a thread; the terminal in raw mode (restored at exit).
fn read_keys(terminal: bool) -> Keys {
    let (tx, rx) = mpsc::channel();
    if terminal {
        raw_mode::enable();
    }
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut byte = [0u8; 1];
        while let Ok(1) = stdin.read(&mut byte) {
            if tx.send(byte[0]).is_err() {
                break;
            }
        }
    });
    Keys { rx }
}

#[cfg(target_os = "linux")]
mod raw_mode {
    use nix::sys::termios::{SetArg, Termios, cfmakeraw, tcgetattr, tcsetattr};
    use std::sync::Mutex;

    static SAVED: Mutex<Option<Termios>> = Mutex::new(None);

    /// Raw mode, so Ctrl-C and Ctrl-R arrive as keys; the previous mode is restored at exit.
    pub fn enable() {
        let stdin = std::io::stdin();
        let Ok(saved) = tcgetattr(&stdin) else {
            return;
        };
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        // Keep output processing, so `\n` still starts a new line.
        raw.output_flags = saved.output_flags;
        if tcsetattr(&stdin, SetArg::TCSANOW, &raw).is_ok()
            && let Ok(mut slot) = SAVED.lock()
        {
            *slot = Some(saved);
        }
    }

    /// Restores the terminal (called on every exit path of the monitor).
    pub fn restore() {
        if let Some(saved) = SAVED.lock().ok().and_then(|mut s| s.take()) {
            let _ = tcsetattr(std::io::stdin(), SetArg::TCSANOW, &saved);
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod raw_mode {
    /// Elsewhere keys arrive line by line; Ctrl-C interrupts the process.
    pub fn enable() {}
    pub fn restore() {}
}

/// Splits the stream into text and defmt frames (`0xFF 0x00`, rzcobs bytes, `0x00`) and
/// decodes the frames.
struct Defmt<'t> {
    table: &'t Table,
    in_frame: bool,
    frame: Vec<u8>,
    /// A `0xFF` at the end of the last chunk: maybe the start of a frame marker.
    pending_ff: bool,
}

impl<'t> Defmt<'t> {
    fn new(table: &'t Table) -> Defmt<'t> {
        Defmt {
            table,
            in_frame: false,
            frame: Vec::new(),
            pending_ff: false,
        }
    }

    /// What to show for `bytes`: text as is, frames decoded, one line each.
    fn feed(&mut self, bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for &b in bytes {
            if self.in_frame {
                if b == 0x00 {
                    if !self.frame.is_empty() {
                        self.decode(&mut out);
                        self.in_frame = false;
                    }
                } else {
                    self.frame.push(b);
                }
                continue;
            }
            match (self.pending_ff, b) {
                (true, 0x00) => {
                    self.pending_ff = false;
                    self.in_frame = true;
                    self.frame.clear();
                }
                (true, 0xFF) => out.push(0xFF),
                (true, other) => {
                    self.pending_ff = false;
                    out.extend([0xFF, other]);
                }
                (false, 0xFF) => self.pending_ff = true,
                (false, other) => out.push(other),
            }
        }
        out
    }

    fn decode(&mut self, out: &mut Vec<u8>) {
        let mut stream = self.table.new_stream_decoder();
        stream.received(&self.frame);
        stream.received(&[0x00]);
        self.frame.clear();
        match stream.decode() {
            Ok(frame) => {
                let level = frame
                    .level()
                    .map(|l| format!("[{:<5}] ", l.as_str().to_uppercase()))
                    .unwrap_or_default();
                out.extend(format!("{level}{}\n", frame.display_message()).into_bytes());
            }
            Err(_) => out.extend(b"[defmt: a frame that does not decode with this ELF's table]\n"),
        }
    }
}
