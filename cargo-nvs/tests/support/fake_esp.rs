//! A fake ESP32 serial ROM loader (and flasher stub) on a pseudo-terminal.
//!
//! The emulator runs on a thread of the test process, attached to the master
//! side of a pty from `serialport::TTYPort::pair()`. Clients — espflash as a
//! library, the `cargo-nvs` binary, esptool — open the slave by its path
//! ([`FakeEsp::path`], e.g. `/dev/pts/7`). The emulator keeps its own slave fd
//! open, so clients may come and go: each client session starts with SYNC and
//! the flash contents persist across sessions.
//!
//! What it models (see /work/shared/flash-testing.md, pitfalls P1–P12):
//! - SLIP framing; ROM responses with 4 status bytes, stub responses with 2;
//! - SYNC (8 answers), GET_SECURITY_INFO (ESP32-C3: 20 bytes; ESP32: error
//!   0x05), READ_REG/WRITE_REG over a small register map (chip magic, eFuse
//!   MAC and revision words, UART divider, SPI1 user commands with the JEDEC
//!   id in W0), SPI_ATTACH, SPI_SET_PARAMS, CHANGE_BAUDRATE;
//! - FLASH_BEGIN/DATA/END and FLASH_DEFL_BEGIN/DATA/END (zlib), erasing whole
//!   4 KiB sectors at BEGIN and programming NOR-style (bits only cleared);
//! - SPI_FLASH_MD5 (ROM: 32 hex chars, stub: 16 raw bytes), READ_FLASH_SLOW
//!   (ROM), READ_FLASH with acks and final MD5, ERASE_REGION, ERASE_FLASH,
//!   RUN_USER_CODE (stub);
//! - MEM_BEGIN/DATA/END: an executed upload counts as the stub, which greets
//!   with `OHAI` and switches to stub framing;
//! - the reboot after a ROM `FLASH_END` (P3), see [`Reboot`];
//! - optionally, wire time: each byte in or out takes 10 bit times at the
//!   baud in force, as on a UART cable ([`Config::wire_time`], or
//!   `NVS_TEST_WIRE_TIME=1`); [`FakeEsp::wire`] counts what crossed either way.
//!
//! ```ignore
//! let esp = Config::esp32c3().mac([0x7c, 0xdf, 0xa1, 0, 0, 1]).start();
//! // ... flash through esp.path() ...
//! esp.settle();
//! assert_eq!(&esp.read(0x9000, 4), b"\x01\x02\x03\x04");
//! assert_eq!(esp.flash_begins()[0].offset, 0x9000);
//! ```
#![allow(dead_code)]

mod device;
mod slip;
pub mod wire;

use std::io::{ErrorKind, Read, Write};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serialport::{SerialPort, TTYPort};

use self::device::Device;
pub use self::wire::Wire;
use self::wire::{DEFAULT_BAUD, WireState};

/// Command opcodes of the serial protocol.
pub mod op {
    pub const FLASH_BEGIN: u8 = 0x02;
    pub const FLASH_DATA: u8 = 0x03;
    pub const FLASH_END: u8 = 0x04;
    pub const MEM_BEGIN: u8 = 0x05;
    pub const MEM_END: u8 = 0x06;
    pub const MEM_DATA: u8 = 0x07;
    pub const SYNC: u8 = 0x08;
    pub const WRITE_REG: u8 = 0x09;
    pub const READ_REG: u8 = 0x0A;
    pub const SPI_SET_PARAMS: u8 = 0x0B;
    pub const SPI_ATTACH: u8 = 0x0D;
    pub const READ_FLASH_SLOW: u8 = 0x0E;
    pub const CHANGE_BAUDRATE: u8 = 0x0F;
    pub const FLASH_DEFL_BEGIN: u8 = 0x10;
    pub const FLASH_DEFL_DATA: u8 = 0x11;
    pub const FLASH_DEFL_END: u8 = 0x12;
    pub const SPI_FLASH_MD5: u8 = 0x13;
    pub const GET_SECURITY_INFO: u8 = 0x14;
    pub const ERASE_FLASH: u8 = 0xD0;
    pub const ERASE_REGION: u8 = 0xD1;
    pub const READ_FLASH: u8 = 0xD2;
    pub const RUN_USER_CODE: u8 = 0xD3;
}

/// Which chip the emulator pretends to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FakeChip {
    /// Chip id 5 through GET_SECURITY_INFO; SPI1 at 0x60002000.
    Esp32c3,
    /// No GET_SECURITY_INFO (error 0x05): detected by the magic at
    /// 0x40001000; SPI1 at 0x3FF42000.
    Esp32,
}

/// Which program answers on the serial line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loader {
    Rom,
    Stub,
}

/// What the ROM does after `FLASH_END` / `FLASH_DEFL_END` (both flags), after
/// an executed upload that is not accepted as a stub, and after the stub's
/// RUN_USER_CODE: the chip leaves the download loop and runs the application.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Reboot {
    /// Unrealistic: keep answering as if nothing happened.
    StayInLoader,
    /// Silent until the next client session: the next SYNC finds the chip
    /// back in the ROM loader, as if the operator had reset it into download
    /// mode between the sessions. Commands of the current session go
    /// unanswered (a second write in the same ROM session times out).
    #[default]
    OfflineUntilSync,
    /// Silent until the test calls [`FakeEsp::reset`].
    OfflineUntilReset,
}

/// Injected faults. Counters (`nth`) are 1-based and count over the whole
/// life of the emulator, across sessions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Program the data of block `seq` (0-based FLASH_DATA / FLASH_DEFL_DATA
    /// sequence number) with its first byte flipped, after the checksum check:
    /// the transfer succeeds, MD5 verification fails. `begin_offset` limits it
    /// to the transfer whose FLASH_BEGIN offset matches.
    CorruptBlock { begin_offset: Option<u32>, seq: u32 },
    /// [`Fault::CorruptBlock`] in the first `times` transfers only (glitches that a retry, or
    /// a later write, gets past).
    CorruptFirst { seq: u32, times: usize },
    /// Execute the `nth` command with opcode `op` (any opcode if `None`) but
    /// send no reply (for SYNC: none of the 8).
    DropReply { op: Option<u8>, nth: u64 },
    /// Answer the `nth` command with opcode `op` (every one if `None`) with
    /// status 1 and `error`, without executing it.
    ErrorReply { op: u8, nth: Option<u64>, error: u8 },
    /// Report a wrong digest for every SPI_FLASH_MD5.
    Md5Mismatch,
    /// Answer every FLASH_BEGIN and FLASH_DEFL_BEGIN with status 1 and this
    /// error code (e.g. 0x06 "failed to act", 0xC4 "SPI operation failed").
    FlashBeginError(u8),
    /// Lose power instead of executing the `nth` command with opcode `op`: what it
    /// would have done and everything after it is lost, and the chip stays silent
    /// until [`FakeEsp::reset`] (a flash cut off mid-write).
    PowerLoss { op: u8, nth: u64 },
    /// Another program reads the port too: every `every`-th byte the chip
    /// sends never reaches the client.
    LoseOutput { every: usize },
}

/// Emulator settings; build with [`Config::esp32c3`] or [`Config::esp32`],
/// adjust, then [`Config::start`].
#[derive(Clone, Debug)]
pub struct Config {
    pub chip: FakeChip,
    /// Size of the flash image in bytes (default 4 MiB).
    pub flash_size: usize,
    /// JEDEC id returned by the SPI RDID (0x9F) command; `None` derives
    /// 0x00SS40EF (Winbond, SS = log2 of `flash_size`).
    pub flash_id: Option<u32>,
    /// Factory MAC address in the eFuses.
    pub mac: [u8; 6],
    /// Chip revision (major, minor) in the eFuses.
    pub revision: (u32, u32),
    pub reboot: Reboot,
    /// GET_SECURITY_INFO flags (C3); bit 2 = Secure Download Mode (P11).
    pub security_flags: u32,
    /// Whether an executed RAM upload starts a stub (answers `OHAI`).
    pub accept_stub: bool,
    pub faults: Vec<Fault>,
    /// Initial flash contents written over the 0xFF background.
    pub presets: Vec<(u32, Vec<u8>)>,
    /// Crystal frequency, for the UART divider register.
    pub xtal_hz: u32,
    /// What the application prints on the serial line after each reboot out
    /// of the ROM loader (about 100 ms later), e.g. [`boot_log`].
    pub boot_log: Option<Vec<u8>>,
    /// What the application prints every 100 ms while the chip does not
    /// answer as a loader (offline or powered off).
    pub chatter: Option<Vec<u8>>,
    /// Take as long as a UART cable: each byte in or out costs 10 bit times
    /// at the baud in force (115200 until a CHANGE_BAUDRATE has been
    /// answered; the application prints at 115200). Default: off, unless
    /// `NVS_TEST_WIRE_TIME=1` ([`wire::WIRE_TIME_ENV`]).
    pub wire_time: bool,
}

/// Default MAC address of the fake chips.
pub const DEFAULT_MAC: [u8; 6] = [0x7c, 0xdf, 0xa1, 0x12, 0x34, 0x56];

impl Config {
    pub fn esp32c3() -> Config {
        Config {
            chip: FakeChip::Esp32c3,
            flash_size: 4 << 20,
            flash_id: None,
            mac: DEFAULT_MAC,
            revision: (0, 4),
            reboot: Reboot::default(),
            security_flags: 0,
            accept_stub: true,
            faults: Vec::new(),
            presets: Vec::new(),
            xtal_hz: 40_000_000,
            boot_log: None,
            chatter: None,
            wire_time: wire::wire_time_from_env(),
        }
    }

    pub fn esp32() -> Config {
        Config {
            chip: FakeChip::Esp32,
            revision: (3, 0),
            ..Config::esp32c3()
        }
    }

    pub fn flash_size(mut self, bytes: usize) -> Config {
        self.flash_size = bytes;
        self
    }

    /// Make the flash-ID probe report `bytes` (a power of two) while the
    /// image keeps [`Config::flash_size`].
    pub fn reported_flash_size(mut self, bytes: usize) -> Config {
        self.flash_id = Some(jedec_for(bytes));
        self
    }

    pub fn flash_id(mut self, id: u32) -> Config {
        self.flash_id = Some(id);
        self
    }

    pub fn mac(mut self, mac: [u8; 6]) -> Config {
        self.mac = mac;
        self
    }

    pub fn revision(mut self, major: u32, minor: u32) -> Config {
        self.revision = (major, minor);
        self
    }

    pub fn reboot(mut self, reboot: Reboot) -> Config {
        self.reboot = reboot;
        self
    }

    pub fn security_flags(mut self, flags: u32) -> Config {
        self.security_flags = flags;
        self
    }

    pub fn accept_stub(mut self, accept: bool) -> Config {
        self.accept_stub = accept;
        self
    }

    pub fn fault(mut self, fault: Fault) -> Config {
        self.faults.push(fault);
        self
    }

    pub fn chatter(mut self, line: impl Into<Vec<u8>>) -> Config {
        self.chatter = Some(line.into());
        self
    }

    pub fn boot_log(mut self, log: impl Into<Vec<u8>>) -> Config {
        self.boot_log = Some(log.into());
        self
    }

    /// Wire time on or off (see `Config::wire_time`).
    pub fn wire_time(mut self, on: bool) -> Config {
        self.wire_time = on;
        self
    }

    pub fn preset(mut self, offset: u32, bytes: impl Into<Vec<u8>>) -> Config {
        self.presets.push((offset, bytes.into()));
        self
    }

    /// The JEDEC id the SPI probe returns.
    pub fn jedec_id(&self) -> u32 {
        self.flash_id.unwrap_or_else(|| jedec_for(self.flash_size))
    }

    pub fn start(self) -> FakeEsp {
        FakeEsp::start(self)
    }
}

fn jedec_for(bytes: usize) -> u32 {
    let log2 = usize::BITS - 1 - bytes.max(1).leading_zeros();
    (log2 << 16) | 0x40EF
}

/// One FLASH_BEGIN or FLASH_DEFL_BEGIN as received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlashBegin {
    pub offset: u32,
    /// Erase size (ROM, uncompressed) or uncompressed size (stub, deflate).
    pub size: u32,
    pub blocks: u32,
    pub block_size: u32,
    pub deflate: bool,
    /// The fifth word (ROM "encrypted" flag) if the client sent one.
    pub encrypt_word: Option<u32>,
    pub loader: Loader,
    /// Session number (1-based) in which it arrived.
    pub session: u32,
}

/// A flash transfer: a begin and what its data blocks programmed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transfer {
    pub begin: FlashBegin,
    pub blocks_received: u32,
    /// Bytes programmed (padding and decompressed data included).
    pub bytes_programmed: u64,
    /// Closed by FLASH_END / FLASH_DEFL_END.
    pub ended: bool,
}

/// The event log. Every executed command leaves at least its opcode in
/// [`FakeEsp::commands`]; the interesting ones also leave an event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A client session began (first SYNC after other traffic); 1-based.
    Session(u32),
    SecurityInfo,
    ReadReg {
        addr: u32,
        value: u32,
    },
    WriteReg {
        addr: u32,
        value: u32,
        mask: u32,
    },
    /// An SPI1 user command ran (0x9F = read JEDEC id).
    SpiCommand {
        cmd: u32,
        result: u32,
    },
    SpiAttach {
        stub_format: bool,
    },
    SpiSetParams {
        total_size: u32,
    },
    ChangeBaud {
        new: u32,
        prior: u32,
    },
    FlashBegin(FlashBegin),
    FlashData {
        seq: u32,
        addr: u32,
        len: u32,
    },
    FlashEnd {
        flag: u32,
        deflate: bool,
    },
    BadChecksum {
        op: u8,
        seq: u32,
    },
    Corrupted {
        addr: u32,
        seq: u32,
    },
    Md5 {
        offset: u32,
        size: u32,
    },
    ReadFlash {
        offset: u32,
        size: u32,
        slow: bool,
    },
    ReadDone,
    ReadAborted,
    EraseRegion {
        offset: u32,
        size: u32,
    },
    EraseFlash,
    MemBegin {
        offset: u32,
        size: u32,
    },
    MemEnd {
        entry: u32,
        execute: bool,
    },
    StubStarted,
    StubExited,
    RunUserCode,
    /// The chip left the download loop (see [`Reboot`]).
    Rebooted,
    /// A SYNC found the chip offline and brought it back (operator reset).
    Woke,
    /// [`FakeEsp::reset`] was called.
    Reset,
    Error {
        op: u8,
        code: u8,
    },
    DroppedReply {
        op: u8,
    },
    /// A command arrived while the chip was offline.
    Ignored {
        op: u8,
    },
    Unsupported {
        op: u8,
    },
}

/// Counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Client sessions (runs of SYNC after other traffic).
    pub sessions: u32,
    /// Commands executed (SYNC included, ignored ones not).
    pub commands: u64,
    pub syncs: u64,
    pub flash_begins: u32,
    /// FLASH_END commands.
    pub flash_ends: u32,
    /// FLASH_DEFL_END commands.
    pub defl_ends: u32,
    pub md5_queries: u32,
    /// Bytes programmed by data blocks (padding included).
    pub bytes_written: u64,
    pub bytes_erased: u64,
    pub stub_loads: u32,
    pub stub_exits: u32,
    pub reboots: u32,
    pub resets: u32,
    pub dropped_replies: u32,
    /// Error responses sent (injected ones included).
    pub errors: u32,
    /// Frames that arrived while the chip was offline.
    pub ignored_frames: u64,
    /// Frames that were not requests (or garbled SYNCs).
    pub malformed_frames: u64,
    /// SLIP frames dropped for bad escapes or excessive length.
    pub discarded_frames: u64,
}

struct Shared {
    device: Mutex<Device>,
    /// Pace the wire (see [`Config::wire_time`]).
    wire_time: AtomicBool,
    wire: Mutex<WireState>,
    stop: AtomicBool,
    /// Milliseconds since `epoch` of the last byte received.
    last_input_ms: AtomicU64,
    epoch: Instant,
}

/// A running emulator; stops (and joins its thread) on drop.
pub struct FakeEsp {
    path: String,
    shared: Arc<Shared>,
    probe: Option<TTYPort>,
    thread: Option<JoinHandle<()>>,
}

impl FakeEsp {
    /// Creates the pty and starts serving. Panics if no pty can be created.
    pub fn start(config: Config) -> FakeEsp {
        let (mut master, slave) = TTYPort::pair().expect("create a pseudo-terminal pair");
        let path = slave.name().expect("the pty slave has a path");
        master
            .set_timeout(Duration::from_millis(20))
            .expect("set the pty read timeout");
        let probe = master.try_clone_native().ok();
        let epoch = Instant::now();
        let shared = Arc::new(Shared {
            wire_time: AtomicBool::new(config.wire_time),
            wire: Mutex::new(WireState::new(epoch)),
            device: Mutex::new(Device::new(config)),
            stop: AtomicBool::new(false),
            last_input_ms: AtomicU64::new(0),
            epoch,
        });
        let for_thread = Arc::clone(&shared);
        let thread = thread::Builder::new()
            .name(format!("fake-esp {path}"))
            .spawn(move || serve(master, slave, &for_thread))
            .expect("spawn the emulator thread");
        FakeEsp {
            path,
            shared,
            probe,
            thread: Some(thread),
        }
    }

    /// An ESP32-C3 with default settings.
    pub fn esp32c3() -> FakeEsp {
        Config::esp32c3().start()
    }

    /// An ESP32 with default settings.
    pub fn esp32() -> FakeEsp {
        Config::esp32().start()
    }

    /// Path of the pty slave, e.g. `/dev/pts/7`, for `--port`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Opens the port as a client would (115200 baud, no flow control).
    pub fn open_port(&self) -> TTYPort {
        serialport::new(&self.path, 115_200)
            .flow_control(serialport::FlowControl::None)
            .open_native()
            .expect("open the emulator's pty")
    }

    fn device(&self) -> MutexGuard<'_, Device> {
        lock(&self.shared.device)
    }

    /// Waits until the emulator has processed everything sent to it: no
    /// unread input and no input for 25 ms (gives up after 2 s). Needed only
    /// after commands whose answer the client does not wait for.
    pub fn settle(&self) {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let pending = self
                .probe
                .as_ref()
                .and_then(|p| p.bytes_to_read().ok())
                .unwrap_or(0);
            let now_ms = self.shared.epoch.elapsed().as_millis() as u64;
            let quiet = now_ms.saturating_sub(self.shared.last_input_ms.load(Ordering::SeqCst));
            if (pending == 0 && quiet >= 25) || Instant::now() > deadline {
                return;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    // ---- flash contents ----------------------------------------------------

    /// A copy of the whole flash image.
    pub fn flash(&self) -> Vec<u8> {
        self.device().flash.clone()
    }

    /// `len` bytes from `offset` (clipped to the flash end).
    pub fn read(&self, offset: u32, len: usize) -> Vec<u8> {
        let dev = self.device();
        let start = (offset as usize).min(dev.flash.len());
        let end = start.saturating_add(len).min(dev.flash.len());
        dev.flash[start..end].to_vec()
    }

    /// Overwrites flash contents directly (no erase semantics).
    pub fn write(&self, offset: u32, bytes: &[u8]) {
        self.device().write_flash(offset, bytes);
    }

    /// Byte ranges where the flash differs from `before` (an earlier
    /// [`FakeEsp::flash`]).
    pub fn changed_since(&self, before: &[u8]) -> Vec<Range<u32>> {
        diff_ranges(before, &self.device().flash)
    }

    // ---- inspection ----------------------------------------------------------

    pub fn events(&self) -> Vec<Event> {
        self.device().events.clone()
    }

    pub fn clear_events(&self) {
        self.device().events.clear();
    }

    pub fn stats(&self) -> Stats {
        self.device().stats.clone()
    }

    pub fn sessions(&self) -> u32 {
        self.device().stats.sessions
    }

    /// Opcodes of all executed commands, in order.
    pub fn commands(&self) -> Vec<u8> {
        self.device().commands.clone()
    }

    /// How many commands with opcode `op` were executed.
    pub fn count(&self, op: u8) -> usize {
        self.device().commands.iter().filter(|&&o| o == op).count()
    }

    pub fn flash_begins(&self) -> Vec<FlashBegin> {
        self.device()
            .events
            .iter()
            .filter_map(|e| match e {
                Event::FlashBegin(b) => Some(b.clone()),
                _ => None,
            })
            .collect()
    }

    /// (offset, size) of every SPI_FLASH_MD5.
    pub fn md5_queries(&self) -> Vec<(u32, u32)> {
        self.device()
            .events
            .iter()
            .filter_map(|e| match *e {
                Event::Md5 { offset, size } => Some((offset, size)),
                _ => None,
            })
            .collect()
    }

    /// Number of FLASH_END commands (FLASH_DEFL_END not included).
    pub fn flash_end_count(&self) -> u32 {
        self.device().stats.flash_ends
    }

    /// Transfers (begin + data) with the bytes each programmed.
    pub fn transfers(&self) -> Vec<Transfer> {
        self.device().transfers.clone()
    }

    /// Merged ranges programmed by data blocks (padding included).
    pub fn written_ranges(&self) -> Vec<Range<u32>> {
        merge_ranges(self.device().written.clone())
    }

    /// Merged ranges erased (by FLASH_BEGIN, ERASE_REGION, ERASE_FLASH).
    pub fn erased_ranges(&self) -> Vec<Range<u32>> {
        merge_ranges(self.device().erased.clone())
    }

    pub fn bytes_written(&self) -> u64 {
        self.device().stats.bytes_written
    }

    /// The program answering, or `None` while the chip is offline.
    pub fn loader(&self) -> Option<Loader> {
        let dev = self.device();
        dev.online.then_some(dev.loader)
    }

    pub fn is_online(&self) -> bool {
        self.device().online
    }

    /// What crossed the wire so far, each way and at which baud, and the time
    /// the pacing clocks scheduled for it (see [`Wire`]).
    pub fn wire(&self) -> Wire {
        lock(&self.shared.wire).snapshot(self.wire_time())
    }

    /// Whether the wire is paced (see `Config::wire_time`).
    pub fn wire_time(&self) -> bool {
        self.shared.wire_time.load(Ordering::SeqCst)
    }

    // ---- knobs -----------------------------------------------------------------

    /// Turns wire time on or off from the next byte on.
    pub fn set_wire_time(&self, on: bool) {
        self.shared.wire_time.store(on, Ordering::SeqCst);
    }

    /// Operator reset into download mode: ROM loader, online, registers reset.
    pub fn reset(&self) {
        let mut dev = self.device();
        dev.stats.resets += 1;
        dev.power_on(Event::Reset);
    }

    pub fn set_faults(&self, faults: Vec<Fault>) {
        self.device().cfg.faults = faults;
    }

    pub fn add_fault(&self, fault: Fault) {
        self.device().cfg.faults.push(fault);
    }

    pub fn set_reboot(&self, reboot: Reboot) {
        self.device().cfg.reboot = reboot;
    }

    /// The application prints `bytes` on the serial line (sent within 20 ms).
    pub fn print(&self, bytes: &[u8]) {
        self.device().boot_output.extend_from_slice(bytes);
    }
}

impl Drop for FakeEsp {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The emulator thread. `_slave` stays open so that the master never reads
/// EIO while no client has the port open.
fn serve(mut master: TTYPort, _slave: TTYPort, shared: &Shared) {
    let mut decoder = slip::Decoder::default();
    let mut buf = vec![0u8; 16 * 1024];
    let mut frames = Vec::new();
    let mut sent = 0usize;
    let mut last_chatter = Instant::now();
    // Wire time: whether more input was waiting when the last received chunk
    // had crossed the wire (then the next one follows it without a pause).
    let mut rx_waiting = false;
    while !shared.stop.load(Ordering::SeqCst) {
        if last_chatter.elapsed() >= Duration::from_millis(100) {
            last_chatter = Instant::now();
            let chatter = {
                let dev = lock(&shared.device);
                dev.cfg.chatter.clone().filter(|_| !dev.online)
            };
            if let Some(line) = chatter {
                send(&mut master, &line, DEFAULT_BAUD, shared);
            }
        }
        // The application's output, once the client has been quiet for 100 ms
        // (it reads the answer to FLASH_END first).
        let quiet = shared.epoch.elapsed().as_millis() as u64
            >= shared.last_input_ms.load(Ordering::SeqCst) + 100;
        if quiet {
            let app_output = std::mem::take(&mut lock(&shared.device).boot_output);
            if !app_output.is_empty() {
                send(&mut master, &app_output, DEFAULT_BAUD, shared);
            }
        }
        let paced = shared.wire_time.load(Ordering::SeqCst);
        let baud = lock(&shared.device).baud();
        // Paced, input is taken about a millisecond of wire time at a time, so
        // what the client writes ahead waits in the pty's buffer.
        let want = if paced {
            wire::chunk_len(baud)
        } else {
            buf.len()
        };
        let n = match master.read(&mut buf[..want]) {
            Ok(0) => {
                thread::sleep(Duration::from_millis(1));
                continue;
            }
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::TimedOut | ErrorKind::WouldBlock | ErrorKind::Interrupted
                ) =>
            {
                rx_waiting = false;
                continue;
            }
            Err(_) => {
                thread::sleep(Duration::from_millis(5));
                continue;
            }
        };
        let now = Instant::now();
        if paced {
            let done = {
                let mut wire = lock(&shared.wire);
                let done = wire.rx.pass(n, baud, now, rx_waiting);
                wire.count(true, n, baud, done - wire::byte_time(n, baud), done);
                done
            };
            // The bytes are decoded once the last of them has arrived.
            wire::sleep_until(done, &shared.stop);
            rx_waiting = master.bytes_to_read().is_ok_and(|waiting| waiting > 0);
        } else {
            lock(&shared.wire).count(true, n, baud, now, now);
        }
        shared
            .last_input_ms
            .store(shared.epoch.elapsed().as_millis() as u64, Ordering::SeqCst);
        decoder.push(&buf[..n], &mut frames);
        // Each reply with the baud it goes out at: the one in force when its
        // request arrived (the ROM answers CHANGE_BAUDRATE, then switches).
        let mut replies = Vec::new();
        {
            let mut dev = lock(&shared.device);
            for frame in frames.drain(..) {
                let baud = dev.baud();
                let mut out = Vec::new();
                dev.handle_frame(&frame, &mut out);
                replies.push((out, baud));
            }
            dev.stats.discarded_frames = decoder.discarded;
            let lose = dev.cfg.faults.iter().find_map(|f| match *f {
                Fault::LoseOutput { every } if every > 0 => Some(every),
                _ => None,
            });
            if let Some(every) = lose {
                for (out, _) in &mut replies {
                    out.retain(|_| {
                        sent += 1;
                        !sent.is_multiple_of(every)
                    });
                }
            }
        }
        for (out, baud) in replies {
            if !out.is_empty() {
                send(&mut master, &out, baud, shared);
            }
        }
    }
}

/// Sends `bytes` at `baud`, counting them; paced (wire time on), each piece
/// goes to the pty once it would have crossed the wire. Gives up if the
/// client stops reading for 5 s.
fn send(master: &mut TTYPort, bytes: &[u8], baud: u32, shared: &Shared) {
    let paced = shared.wire_time.load(Ordering::SeqCst);
    let piece_len = if paced {
        wire::chunk_len(baud)
    } else {
        bytes.len().max(1)
    };
    for (i, piece) in bytes.chunks(piece_len).enumerate() {
        let now = Instant::now();
        if paced {
            let done = {
                let mut wire = lock(&shared.wire);
                let done = wire.tx.pass(piece.len(), baud, now, i > 0);
                let start = done - wire::byte_time(piece.len(), baud);
                wire.count(false, piece.len(), baud, start, done);
                done
            };
            wire::sleep_until(done, &shared.stop);
        } else {
            lock(&shared.wire).count(false, piece.len(), baud, now, now);
        }
        if !write_all(master, piece, &shared.stop) {
            return;
        }
    }
}

/// Writes everything unless the client stops reading for 5 s (then false).
fn write_all(master: &mut TTYPort, mut bytes: &[u8], stop: &AtomicBool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !bytes.is_empty() {
        if stop.load(Ordering::SeqCst) || Instant::now() >= deadline {
            return false;
        }
        match master.write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => thread::sleep(Duration::from_millis(1)),
        }
    }
    true
}

/// Sorts and merges overlapping or adjacent ranges.
pub fn merge_ranges(mut ranges: Vec<Range<u32>>) -> Vec<Range<u32>> {
    ranges.retain(|r| r.start < r.end);
    ranges.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<u32>> = Vec::new();
    for r in ranges {
        match merged.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    merged
}

/// Byte ranges where `a` and `b` differ (a length difference counts as a
/// difference over the extra bytes).
pub fn diff_ranges(a: &[u8], b: &[u8]) -> Vec<Range<u32>> {
    let mut ranges = Vec::new();
    let mut start = None;
    let len = a.len().max(b.len());
    for i in 0..len {
        let differs = a.get(i) != b.get(i);
        match (differs, start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                ranges.push(s as u32..i as u32);
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        ranges.push(s as u32..len as u32);
    }
    ranges
}
