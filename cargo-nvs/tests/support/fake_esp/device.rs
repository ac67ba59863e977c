//! The ROM-loader / flasher-stub state machine. It turns request frames into
//! response bytes; it never panics on what a client sends.

use std::collections::HashMap;
use std::io::Write as _;
use std::ops::Range;

use flate2::write::ZlibDecoder;
use md5::{Digest, Md5};

use super::{
    Config, Event, FakeChip, Fault, FlashBegin, Loader, Reboot, Stats, Transfer, op, slip,
};

const SECTOR: u64 = 0x1000;
const SYNC_BODY: [u8; 36] = {
    let mut b = [0x55u8; 36];
    b[0] = 0x07;
    b[1] = 0x07;
    b[2] = 0x12;
    b[3] = 0x20;
    b
};
/// ROM loaders answer SYNC with a non-zero value, the stub with 0 (esptool
/// uses that to notice a stub that is already running).
const SYNC_VALUE_ROM: u32 = 0x2012_0707;
const OHAI: &[u8] = b"OHAI";
const SPI_USR: u32 = 1 << 18;

// Error codes of the ROM loader.
const ROM_INVALID: u8 = 0x05;
const ROM_FAILED: u8 = 0x06;
const ROM_BAD_CRC: u8 = 0x07;
const ROM_READ_ERR: u8 = 0x09;
const ROM_READ_LEN: u8 = 0x0A;
const ROM_DEFLATE: u8 = 0x0B;
// Error codes of the flasher stub.
const STUB_BAD_LEN: u8 = 0xC0;
const STUB_BAD_CHECKSUM: u8 = 0xC1;
const STUB_FAILED_SPI: u8 = 0xC4;
const STUB_NOT_IN_FLASH: u8 = 0xC6;
const STUB_INFLATE: u8 = 0xC7;
const STUB_TOO_MUCH: u8 = 0xC9;
const STUB_NOT_IMPLEMENTED: u8 = 0xFF;

/// Chip-specific register addresses.
struct Profile {
    spi_base: u32,
    usr2: u32,
    w0: u32,
    uart_clkdiv: u32,
}

fn profile(chip: FakeChip) -> Profile {
    match chip {
        FakeChip::Esp32c3 => Profile {
            spi_base: 0x6000_2000,
            usr2: 0x20,
            w0: 0x58,
            uart_clkdiv: 0x6000_0014,
        },
        FakeChip::Esp32 => Profile {
            spi_base: 0x3FF4_2000,
            usr2: 0x24,
            w0: 0x80,
            uart_clkdiv: 0x3FF4_0014,
        },
    }
}

/// Registers as the chip shows them right after reset: chip magic, eFuse MAC
/// and revision words. Everything else reads as 0.
fn initial_regs(cfg: &Config) -> HashMap<u32, u32> {
    let m = cfg.mac;
    let mac0 = u32::from_be_bytes([m[2], m[3], m[4], m[5]]);
    let mac1 = (u32::from(m[0]) << 8) | u32::from(m[1]);
    let (major, minor) = cfg.revision;
    let mut r = HashMap::new();
    match cfg.chip {
        FakeChip::Esp32c3 => {
            r.insert(0x4000_1000, 0x1B31_506F);
            // eFuse BLOCK1 (read base 0x60008844): MAC in words 0/1,
            // WAFER_VERSION_MINOR_LO in word 3 bits 18..21, MINOR_HI in word 5
            // bit 23, MAJOR in word 5 bits 24..26.
            r.insert(0x6000_8844, mac0);
            r.insert(0x6000_8848, mac1);
            r.insert(0x6000_8850, (minor & 0x7) << 18);
            r.insert(
                0x6000_8858,
                (((minor >> 3) & 1) << 23) | ((major & 0x3) << 24),
            );
        }
        FakeChip::Esp32 => {
            r.insert(0x4000_1000, 0x00F0_1D83);
            // eFuse BLOCK0 (0x3FF5A000): MAC in words 1/2 (CRC8 in word 2 bits
            // 16..24); revision bits in word 3 bit 15, word 5 bit 20 and
            // APB_CTL_DATE bit 31; minor revision in word 5 bits 24..26.
            r.insert(0x3FF5_A004, mac0);
            r.insert(0x3FF5_A008, mac1 | (u32::from(mac_crc8(&m)) << 16));
            let word3 = if major >= 1 { 1 << 15 } else { 0 };
            let word5 = (if major >= 2 { 1 << 20 } else { 0 }) | ((minor & 0x3) << 24);
            let apb_date = 0x1604_2000 | if major >= 3 { 1 << 31 } else { 0 };
            r.insert(0x3FF5_A00C, word3);
            r.insert(0x3FF5_A014, word5);
            r.insert(0x3FF6_607C, apb_date);
        }
    }
    r
}

/// CRC8 (Dallas/Maxim) of the MAC, as in ESP32 eFuse BLOCK0.
fn mac_crc8(mac: &[u8; 6]) -> u8 {
    let mut crc = 0u8;
    for &b in mac {
        crc ^= b;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x8C
            } else {
                crc >> 1
            };
        }
    }
    crc
}

fn word(data: &[u8], i: usize) -> u32 {
    data.get(i * 4..i * 4 + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .unwrap_or(0)
}

struct ActiveTransfer {
    offset: u32,
    size: u32,
    block_size: u32,
    deflate: bool,
    inflater: Option<ZlibDecoder<Vec<u8>>>,
    produced: u64,
    record: usize,
}

struct ReadStream {
    offset: u64,
    size: u64,
    block: u64,
    max_in_flight: u64,
    sent: u64,
    acked: u64,
}

pub struct Device {
    pub cfg: Config,
    prof: Profile,
    pub flash: Vec<u8>,
    regs: HashMap<u32, u32>,
    pub loader: Loader,
    pub online: bool,
    /// Set by [`Fault::PowerLoss`]: silent until [`FakeEsp::reset`](super::FakeEsp::reset).
    pub power_lost: bool,
    baud: u32,
    params_size: u64,
    transfer: Option<ActiveTransfer>,
    mem_active: bool,
    read: Option<ReadStream>,
    last_was_sync: bool,
    mute: bool,
    op_counts: HashMap<u8, u64>,
    pub events: Vec<Event>,
    pub stats: Stats,
    pub commands: Vec<u8>,
    pub transfers: Vec<Transfer>,
    pub written: Vec<Range<u32>>,
    pub erased: Vec<Range<u32>>,
    /// What the application prints after the last reboot, not sent yet (see
    /// [`Config::boot_log`]).
    pub boot_output: Vec<u8>,
}

impl Device {
    pub fn new(cfg: Config) -> Device {
        let mut flash = vec![0xFF; cfg.flash_size];
        for (offset, bytes) in &cfg.presets {
            copy_clipped(&mut flash, u64::from(*offset), bytes);
        }
        let regs = initial_regs(&cfg);
        let params_size = flash.len() as u64;
        Device {
            prof: profile(cfg.chip),
            cfg,
            flash,
            regs,
            loader: Loader::Rom,
            online: true,
            power_lost: false,
            baud: 115_200,
            params_size,
            transfer: None,
            mem_active: false,
            read: None,
            last_was_sync: false,
            mute: false,
            op_counts: HashMap::new(),
            events: Vec::new(),
            stats: Stats::default(),
            commands: Vec::new(),
            transfers: Vec::new(),
            written: Vec::new(),
            erased: Vec::new(),
            boot_output: Vec::new(),
        }
    }

    /// The chip comes out of reset into the ROM download mode.
    pub fn power_on(&mut self, why: Event) {
        self.online = true;
        self.power_lost = false;
        self.loader = Loader::Rom;
        self.regs = initial_regs(&self.cfg);
        self.baud = 115_200;
        self.params_size = self.flash.len() as u64;
        self.transfer = None;
        self.mem_active = false;
        self.read = None;
        self.last_was_sync = false;
        self.events.push(why);
    }

    /// The baud rate in force on the serial line.
    pub fn baud(&self) -> u32 {
        self.baud
    }

    pub fn write_flash(&mut self, offset: u32, bytes: &[u8]) {
        copy_clipped(&mut self.flash, u64::from(offset), bytes);
    }

    pub fn handle_frame(&mut self, frame: &[u8], out: &mut Vec<u8>) {
        if self.read.is_some() {
            if frame.len() == 4 {
                self.read_ack(frame, out);
                return;
            }
            self.read = None;
            self.events.push(Event::ReadAborted);
        }
        if frame.len() < 8 || frame[0] != 0x00 {
            self.stats.malformed_frames += 1;
            return;
        }
        let op = frame[1];
        let len = usize::from(u16::from_le_bytes([frame[2], frame[3]]));
        let checksum = u32::from_le_bytes([frame[4], frame[5], frame[6], frame[7]]);
        let data = &frame[8..];
        let is_sync = op == op::SYNC && data == SYNC_BODY;
        if op == op::SYNC && !is_sync {
            // The ROM ignores a garbled SYNC; the client simply retries.
            self.stats.malformed_frames += 1;
            return;
        }
        if !self.online {
            if is_sync && self.cfg.reboot == Reboot::OfflineUntilSync && !self.power_lost {
                self.power_on(Event::Woke);
            } else {
                self.stats.ignored_frames += 1;
                self.events.push(Event::Ignored { op });
                self.last_was_sync = false;
                return;
            }
        }
        if is_sync {
            if !self.last_was_sync {
                self.stats.sessions += 1;
                self.events.push(Event::Session(self.stats.sessions));
            }
            self.last_was_sync = true;
        } else {
            self.last_was_sync = false;
        }

        self.stats.commands += 1;
        self.commands.push(op);
        let nth_op = {
            let n = self.op_counts.entry(op).or_insert(0);
            *n += 1;
            *n
        };
        let nth_any = self.stats.commands;
        let power_loss = self.cfg.faults.iter().any(|f| match *f {
            Fault::PowerLoss { op: o, nth } => o == op && nth == nth_op,
            _ => false,
        });
        if power_loss {
            self.online = false;
            self.power_lost = true;
            self.transfer = None;
            self.events.push(Event::Ignored { op });
            return;
        }
        self.mute = self.cfg.faults.iter().any(|f| match *f {
            Fault::DropReply { op: Some(o), nth } => o == op && nth == nth_op,
            Fault::DropReply { op: None, nth } => nth == nth_any,
            _ => false,
        });
        if self.mute {
            self.stats.dropped_replies += 1;
            self.events.push(Event::DroppedReply { op });
        }

        let injected = self.cfg.faults.iter().find_map(|f| match *f {
            Fault::ErrorReply { op: o, nth, error }
                if o == op && nth.is_none_or(|n| n == nth_op) =>
            {
                Some(error)
            }
            Fault::FlashBeginError(error)
                if op == op::FLASH_BEGIN || op == op::FLASH_DEFL_BEGIN =>
            {
                Some(error)
            }
            _ => None,
        });
        if let Some(code) = injected {
            self.fail(out, op, code);
        } else if len != data.len() {
            let code = self.code(ROM_INVALID, STUB_BAD_LEN);
            self.fail(out, op, code);
        } else {
            self.dispatch(op, data, checksum, out);
        }
        self.mute = false;
    }

    fn dispatch(&mut self, op: u8, data: &[u8], checksum: u32, out: &mut Vec<u8>) {
        let stub = self.loader == Loader::Stub;
        match op {
            op::SYNC => {
                self.stats.syncs += 1;
                let value = if stub { 0 } else { SYNC_VALUE_ROM };
                for _ in 0..8 {
                    self.ok(out, op, value);
                }
            }
            op::GET_SECURITY_INFO => match self.cfg.chip {
                FakeChip::Esp32 => {
                    let code = self.code(ROM_INVALID, STUB_NOT_IMPLEMENTED);
                    self.fail(out, op, code);
                }
                FakeChip::Esp32c3 => {
                    self.events.push(Event::SecurityInfo);
                    let mut body = Vec::with_capacity(20);
                    body.extend_from_slice(&self.cfg.security_flags.to_le_bytes());
                    body.push(0); // flash_crypt_cnt
                    body.extend_from_slice(&[0; 7]); // key purposes
                    body.extend_from_slice(&5u32.to_le_bytes()); // chip id: ESP32-C3
                    body.extend_from_slice(&0u32.to_le_bytes()); // eco / api version
                    self.ok_body(out, op, &body);
                }
            },
            op::READ_REG => {
                if data.len() != 4 {
                    return self.fail_invalid(out, op);
                }
                let addr = word(data, 0);
                let value = self.reg(addr);
                self.events.push(Event::ReadReg { addr, value });
                self.ok(out, op, value);
            }
            op::WRITE_REG => {
                if data.is_empty() || !data.len().is_multiple_of(16) {
                    return self.fail_invalid(out, op);
                }
                for quad in data.chunks_exact(16) {
                    self.write_reg(word(quad, 0), word(quad, 1), word(quad, 2));
                }
                self.ok(out, op, 0);
            }
            op::SPI_ATTACH => {
                if data.len() != 4 && data.len() != 8 {
                    return self.fail_invalid(out, op);
                }
                self.events.push(Event::SpiAttach {
                    stub_format: data.len() == 4,
                });
                self.ok(out, op, 0);
            }
            op::SPI_SET_PARAMS => {
                if data.len() != 24 {
                    return self.fail_invalid(out, op);
                }
                let total_size = word(data, 1);
                self.params_size = u64::from(total_size);
                self.events.push(Event::SpiSetParams { total_size });
                self.ok(out, op, 0);
            }
            op::CHANGE_BAUDRATE => {
                if data.len() != 8 {
                    return self.fail_invalid(out, op);
                }
                let (new, prior) = (word(data, 0), word(data, 1));
                self.events.push(Event::ChangeBaud { new, prior });
                self.ok(out, op, 0);
                if new > 0 {
                    self.baud = new;
                }
            }
            op::FLASH_BEGIN | op::FLASH_DEFL_BEGIN => self.flash_begin(out, op, data),
            op::FLASH_DATA | op::FLASH_DEFL_DATA => self.flash_data(out, op, data, checksum),
            op::FLASH_END | op::FLASH_DEFL_END => self.flash_end(out, op, data),
            op::MEM_BEGIN => {
                if data.len() < 16 {
                    return self.fail_invalid(out, op);
                }
                self.mem_active = true;
                self.events.push(Event::MemBegin {
                    offset: word(data, 3),
                    size: word(data, 0),
                });
                self.ok(out, op, 0);
            }
            op::MEM_DATA => {
                if !self.mem_active {
                    let code = self.code(ROM_INVALID, STUB_NOT_IN_FLASH);
                    return self.fail(out, op, code);
                }
                if self.check_block(out, op, data, checksum).is_some() {
                    self.ok(out, op, 0);
                }
            }
            op::MEM_END => self.mem_end(out, op, data),
            op::SPI_FLASH_MD5 => self.md5(out, op, data),
            op::READ_FLASH_SLOW => self.read_flash_slow(out, op, data),
            op::READ_FLASH => self.read_flash(out, op, data),
            op::ERASE_FLASH if stub => {
                let len = self.flash.len() as u64;
                self.erase(0, len);
                self.events.push(Event::EraseFlash);
                self.ok(out, op, 0);
            }
            op::ERASE_REGION if stub => {
                if data.len() < 8 {
                    return self.fail(out, op, STUB_BAD_LEN);
                }
                let (offset, size) = (word(data, 0), word(data, 1));
                let (start, end) = (u64::from(offset), u64::from(offset) + u64::from(size));
                if !start.is_multiple_of(SECTOR) || !end.is_multiple_of(SECTOR) {
                    return self.fail(out, op, STUB_BAD_LEN);
                }
                if end > self.flash.len() as u64 {
                    return self.fail(out, op, STUB_FAILED_SPI);
                }
                self.erase(start, end);
                self.events.push(Event::EraseRegion { offset, size });
                self.ok(out, op, 0);
            }
            op::RUN_USER_CODE if stub => {
                // The stub jumps to the application without answering.
                self.events.push(Event::RunUserCode);
                self.reboot();
            }
            _ => {
                self.events.push(Event::Unsupported { op });
                let code = self.code(ROM_INVALID, STUB_NOT_IMPLEMENTED);
                self.fail(out, op, code);
            }
        }
    }

    // ---- registers -------------------------------------------------------

    fn reg(&self, addr: u32) -> u32 {
        if addr == self.prof.uart_clkdiv {
            // The ROM sets the UART divider from the crystal and the baud rate.
            return self.cfg.xtal_hz / self.baud.max(1);
        }
        self.regs.get(&addr).copied().unwrap_or(0)
    }

    fn write_reg(&mut self, addr: u32, value: u32, mask: u32) {
        self.events.push(Event::WriteReg { addr, value, mask });
        let new = (self.reg(addr) & !mask) | (value & mask);
        let cmd_reg = self.prof.spi_base;
        if addr == cmd_reg && new & SPI_USR != 0 {
            // SPI1 user command: runs at once; W0 receives what the flash sent.
            let cmd = self.reg(self.prof.spi_base + self.prof.usr2) & 0xFFFF;
            let result = match cmd {
                0x9F => self.cfg.jedec_id(),
                _ => 0,
            };
            self.regs.insert(self.prof.spi_base + self.prof.w0, result);
            self.regs.insert(addr, new & !SPI_USR);
            self.events.push(Event::SpiCommand { cmd, result });
        } else {
            self.regs.insert(addr, new);
        }
    }

    // ---- flash writes ----------------------------------------------------

    fn flash_begin(&mut self, out: &mut Vec<u8>, op: u8, data: &[u8]) {
        if data.len() < 16 {
            return self.fail_invalid(out, op);
        }
        let deflate = op == op::FLASH_DEFL_BEGIN;
        let begin = FlashBegin {
            offset: word(data, 3),
            size: word(data, 0),
            blocks: word(data, 1),
            block_size: word(data, 2),
            deflate,
            encrypt_word: (data.len() >= 20).then(|| word(data, 4)),
            loader: self.loader,
            session: self.stats.sessions,
        };
        self.events.push(Event::FlashBegin(begin.clone()));
        self.stats.flash_begins += 1;
        self.transfer = None;
        let start = u64::from(begin.offset);
        let end = start + u64::from(begin.size);
        let limit = (self.flash.len() as u64).min(self.params_size);
        if end > limit {
            let code = self.code(ROM_FAILED, STUB_TOO_MUCH);
            return self.fail(out, op, code);
        }
        if begin.size > 0 {
            // Whole sectors, as the SPI flash can only erase those.
            let first = start / SECTOR * SECTOR;
            let last = (end.div_ceil(SECTOR) * SECTOR).min(self.flash.len() as u64);
            self.erase(first, last);
        }
        self.transfers.push(Transfer {
            begin: begin.clone(),
            blocks_received: 0,
            bytes_programmed: 0,
            ended: false,
        });
        self.transfer = Some(ActiveTransfer {
            offset: begin.offset,
            size: begin.size,
            block_size: begin.block_size,
            deflate,
            inflater: deflate.then(|| ZlibDecoder::new(Vec::new())),
            produced: 0,
            record: self.transfers.len() - 1,
        });
        self.ok(out, op, 0);
    }

    /// Checks a FLASH_DATA/MEM_DATA style block (16-byte header, payload,
    /// XOR checksum); answers the error itself and returns `None` if bad.
    fn check_block<'a>(
        &mut self,
        out: &mut Vec<u8>,
        op: u8,
        data: &'a [u8],
        checksum: u32,
    ) -> Option<(u32, &'a [u8])> {
        if data.len() < 16 {
            let code = self.code(ROM_INVALID, STUB_BAD_LEN);
            self.fail(out, op, code);
            return None;
        }
        let size = word(data, 0) as usize;
        let seq = word(data, 1);
        let payload = &data[16..];
        if payload.len() != size {
            let code = self.code(ROM_INVALID, STUB_BAD_LEN);
            self.fail(out, op, code);
            return None;
        }
        let calc = payload.iter().fold(0xEFu8, |acc, b| acc ^ b);
        if checksum != u32::from(calc) {
            self.events.push(Event::BadChecksum { op, seq });
            let code = self.code(ROM_BAD_CRC, STUB_BAD_CHECKSUM);
            self.fail(out, op, code);
            return None;
        }
        Some((seq, payload))
    }

    fn flash_data(&mut self, out: &mut Vec<u8>, op: u8, data: &[u8], checksum: u32) {
        let deflate_op = op == op::FLASH_DEFL_DATA;
        let active = match &self.transfer {
            Some(t) if t.deflate == deflate_op => (t.offset, t.block_size),
            _ => {
                let code = self.code(ROM_INVALID, STUB_NOT_IN_FLASH);
                return self.fail(out, op, code);
            }
        };
        let Some((seq, payload)) = self.check_block(out, op, data, checksum) else {
            return;
        };
        let (offset, block_size) = active;
        let (addr, mut bytes) = if deflate_op {
            let Some(t) = self.transfer.as_mut() else {
                return;
            };
            let Some(inflater) = t.inflater.as_mut() else {
                return;
            };
            if inflater
                .write_all(payload)
                .and_then(|()| inflater.flush())
                .is_err()
            {
                let code = self.code(ROM_DEFLATE, STUB_INFLATE);
                return self.fail(out, op, code);
            }
            let produced = std::mem::take(inflater.get_mut());
            let addr = u64::from(t.offset) + t.produced;
            t.produced += produced.len() as u64;
            if t.produced > u64::from(t.size) {
                let code = self.code(ROM_DEFLATE, STUB_TOO_MUCH);
                return self.fail(out, op, code);
            }
            (addr, produced)
        } else {
            let addr = u64::from(offset) + u64::from(seq) * u64::from(block_size);
            (addr, payload.to_vec())
        };
        let corrupt = self.cfg.faults.iter().any(|f| match *f {
            Fault::CorruptBlock {
                begin_offset,
                seq: s,
            } => s == seq && begin_offset.is_none_or(|o| o == offset),
            Fault::CorruptFirst { seq: s, times } => {
                s == seq
                    && self
                        .events
                        .iter()
                        .filter(|e| matches!(e, Event::Corrupted { .. }))
                        .count()
                        < times
            }
            _ => false,
        });
        if corrupt && !bytes.is_empty() {
            bytes[0] ^= 0x01;
            self.events.push(Event::Corrupted {
                addr: addr as u32,
                seq,
            });
        }
        let programmed = self.program(addr, &bytes);
        if let Some(record) = self
            .transfer
            .as_ref()
            .and_then(|t| self.transfers.get_mut(t.record))
        {
            record.blocks_received += 1;
            record.bytes_programmed += programmed;
        }
        self.events.push(Event::FlashData {
            seq,
            addr: addr as u32,
            len: bytes.len() as u32,
        });
        self.ok(out, op, 0);
    }

    fn flash_end(&mut self, out: &mut Vec<u8>, op: u8, data: &[u8]) {
        if data.len() < 4 {
            return self.fail_invalid(out, op);
        }
        let flag = word(data, 0);
        let deflate = op == op::FLASH_DEFL_END;
        if let Some(t) = self.transfer.take()
            && let Some(record) = self.transfers.get_mut(t.record)
        {
            record.ended = true;
        }
        self.events.push(Event::FlashEnd { flag, deflate });
        if deflate {
            self.stats.defl_ends += 1;
        } else {
            self.stats.flash_ends += 1;
        }
        self.ok(out, op, 0);
        match self.loader {
            // The ROM leaves the download loop whatever the flag says: 0
            // reboots, 1 runs the application (P3).
            Loader::Rom => self.reboot(),
            // The stub reboots into the ROM loader on 0 and stays on 1.
            Loader::Stub if flag == 0 => {
                self.loader = Loader::Rom;
                self.params_size = self.flash.len() as u64;
                self.stats.stub_exits += 1;
                self.events.push(Event::StubExited);
            }
            Loader::Stub => {}
        }
    }

    fn reboot(&mut self) {
        self.stats.reboots += 1;
        self.events.push(Event::Rebooted);
        self.transfer = None;
        self.mem_active = false;
        self.read = None;
        if self.cfg.reboot != Reboot::StayInLoader {
            self.online = false;
            // The application starts and prints its boot log.
            if let Some(log) = &self.cfg.boot_log {
                self.boot_output = log.clone();
            }
        }
    }

    fn program(&mut self, addr: u64, bytes: &[u8]) -> u64 {
        let len = self.flash.len() as u64;
        if addr >= len || bytes.is_empty() {
            return 0;
        }
        let end = (addr + bytes.len() as u64).min(len);
        let (a, e) = (addr as usize, end as usize);
        // NOR flash: programming can only clear bits.
        for (cell, b) in self.flash[a..e].iter_mut().zip(bytes) {
            *cell &= *b;
        }
        self.written.push(a as u32..e as u32);
        self.stats.bytes_written += end - addr;
        end - addr
    }

    fn erase(&mut self, start: u64, end: u64) {
        let end = end.min(self.flash.len() as u64);
        if start >= end {
            return;
        }
        self.flash[start as usize..end as usize].fill(0xFF);
        self.erased.push(start as u32..end as u32);
        self.stats.bytes_erased += end - start;
    }

    // ---- RAM download (stub upload) ---------------------------------------

    fn mem_end(&mut self, out: &mut Vec<u8>, op: u8, data: &[u8]) {
        if data.len() < 8 {
            return self.fail_invalid(out, op);
        }
        let execute = word(data, 0) == 0;
        let entry = word(data, 1);
        let had_upload = std::mem::take(&mut self.mem_active);
        self.events.push(Event::MemEnd { entry, execute });
        self.ok(out, op, 0);
        if !execute || self.loader != Loader::Rom {
            return;
        }
        if self.cfg.accept_stub && had_upload {
            slip::encode(out, OHAI);
            self.loader = Loader::Stub;
            self.stats.stub_loads += 1;
            self.events.push(Event::StubStarted);
        } else {
            // Jumped into code that is not a loader: the device goes quiet.
            self.reboot();
        }
    }

    // ---- reads -------------------------------------------------------------

    fn region(&self, offset: u32, size: u32) -> Option<Range<usize>> {
        let start = u64::from(offset);
        let end = start + u64::from(size);
        (end <= self.flash.len() as u64).then_some(start as usize..end as usize)
    }

    fn md5(&mut self, out: &mut Vec<u8>, op: u8, data: &[u8]) {
        if data.len() < 8 {
            return self.fail_invalid(out, op);
        }
        let (offset, size) = (word(data, 0), word(data, 1));
        let Some(range) = self.region(offset, size) else {
            let code = self.code(ROM_READ_ERR, STUB_FAILED_SPI);
            return self.fail(out, op, code);
        };
        let mut digest = [0u8; 16];
        digest.copy_from_slice(Md5::digest(&self.flash[range]).as_slice());
        if self.cfg.faults.contains(&Fault::Md5Mismatch) {
            digest[0] ^= 0xFF;
        }
        self.stats.md5_queries += 1;
        self.events.push(Event::Md5 { offset, size });
        match self.loader {
            Loader::Rom => {
                self.ok_body(out, op, crate::support::hex(&digest).as_bytes());
            }
            Loader::Stub => self.ok_body(out, op, &digest),
        }
    }

    fn read_flash_slow(&mut self, out: &mut Vec<u8>, op: u8, data: &[u8]) {
        if self.loader == Loader::Stub {
            return self.fail(out, op, STUB_NOT_IMPLEMENTED);
        }
        if data.len() < 8 {
            return self.fail_invalid(out, op);
        }
        let (offset, size) = (word(data, 0), word(data, 1));
        if size > 64 {
            return self.fail(out, op, ROM_READ_LEN);
        }
        let Some(range) = self.region(offset, size) else {
            return self.fail(out, op, ROM_READ_ERR);
        };
        self.events.push(Event::ReadFlash {
            offset,
            size,
            slow: true,
        });
        // The ROM always answers with a 64-byte buffer.
        let mut body = self.flash[range].to_vec();
        body.resize(64, 0);
        self.ok_body(out, op, &body);
    }

    fn read_flash(&mut self, out: &mut Vec<u8>, op: u8, data: &[u8]) {
        if self.loader == Loader::Rom {
            return self.fail(out, op, ROM_INVALID);
        }
        if data.len() < 16 {
            return self.fail(out, op, STUB_BAD_LEN);
        }
        let (offset, size, block, max_in_flight) =
            (word(data, 0), word(data, 1), word(data, 2), word(data, 3));
        if block == 0 || max_in_flight == 0 {
            return self.fail(out, op, STUB_BAD_LEN);
        }
        if self.region(offset, size).is_none() {
            return self.fail(out, op, STUB_FAILED_SPI);
        }
        self.events.push(Event::ReadFlash {
            offset,
            size,
            slow: false,
        });
        self.ok(out, op, 0);
        self.read = Some(ReadStream {
            offset: u64::from(offset),
            size: u64::from(size),
            block: u64::from(block),
            max_in_flight: u64::from(max_in_flight),
            sent: 0,
            acked: 0,
        });
        self.pump(out);
    }

    fn read_ack(&mut self, frame: &[u8], out: &mut Vec<u8>) {
        if let Some(r) = self.read.as_mut() {
            let acked = u64::from(word(frame, 0));
            r.acked = acked.min(r.sent);
        }
        self.pump(out);
    }

    /// Stub READ_FLASH flow control: keep at most `max_in_flight` unacknowledged
    /// bytes on the wire; after the last ack send the MD5 of the region.
    fn pump(&mut self, out: &mut Vec<u8>) {
        let Some(mut r) = self.read.take() else {
            return;
        };
        while r.sent < r.size && r.sent - r.acked < r.max_in_flight {
            let n = (r.size - r.sent).min(r.block);
            let a = (r.offset + r.sent) as usize;
            slip::encode(out, &self.flash[a..a + n as usize]);
            r.sent += n;
        }
        if r.acked >= r.size {
            let range = r.offset as usize..(r.offset + r.size) as usize;
            let digest = Md5::digest(&self.flash[range]);
            slip::encode(out, digest.as_slice());
            self.events.push(Event::ReadDone);
        } else {
            self.read = Some(r);
        }
    }

    // ---- responses -----------------------------------------------------------

    fn code(&self, rom: u8, stub: u8) -> u8 {
        match self.loader {
            Loader::Rom => rom,
            Loader::Stub => stub,
        }
    }

    fn respond(&mut self, out: &mut Vec<u8>, op: u8, value: u32, body: &[u8], status: u8, err: u8) {
        if self.mute {
            return;
        }
        // ROM loaders send 4 status bytes, the stub 2 (P4).
        let status_bytes: &[u8] = match self.loader {
            Loader::Rom => &[status, err, 0, 0],
            Loader::Stub => &[status, err],
        };
        let len = (body.len() + status_bytes.len()) as u16;
        let mut packet = Vec::with_capacity(8 + usize::from(len));
        packet.extend_from_slice(&[0x01, op]);
        packet.extend_from_slice(&len.to_le_bytes());
        packet.extend_from_slice(&value.to_le_bytes());
        packet.extend_from_slice(body);
        packet.extend_from_slice(status_bytes);
        slip::encode(out, &packet);
    }

    fn ok(&mut self, out: &mut Vec<u8>, op: u8, value: u32) {
        self.respond(out, op, value, &[], 0, 0);
    }

    fn ok_body(&mut self, out: &mut Vec<u8>, op: u8, body: &[u8]) {
        self.respond(out, op, 0, body, 0, 0);
    }

    fn fail(&mut self, out: &mut Vec<u8>, op: u8, code: u8) {
        self.stats.errors += 1;
        self.events.push(Event::Error { op, code });
        self.respond(out, op, 0, &[], 1, code);
    }

    fn fail_invalid(&mut self, out: &mut Vec<u8>, op: u8) {
        let code = self.code(ROM_INVALID, STUB_BAD_LEN);
        self.fail(out, op, code);
    }
}

fn copy_clipped(flash: &mut [u8], offset: u64, bytes: &[u8]) {
    let len = flash.len() as u64;
    if offset >= len {
        return;
    }
    let end = (offset + bytes.len() as u64).min(len);
    let n = (end - offset) as usize;
    flash[offset as usize..end as usize].copy_from_slice(&bytes[..n]);
}
