//! The ROM-loader emulator of tests/support/fake_esp.rs, driven by espflash
//! 4.7 as a library (the way `cargo nvs flash` talks to a board), plus an
//! optional cross-check with esptool, the protocol's reference client.

// Every test here talks to the emulator, which needs a pty.
#![cfg(unix)]

use crate::support;

use std::path::Path;
use std::time::Duration;

use crate::support::fake_esp::{Config, Event, FakeEsp, Fault, Loader, Reboot, Wire, op};
use crate::support::tempdir::Dir;
use espflash::Error;
use espflash::connection::{Connection, ResetAfterOperation, ResetBeforeOperation};
use espflash::flasher::{FlashSize, Flasher};
use espflash::image_format::Segment;
use espflash::target::{Chip, DefaultProgressCallback};

fn connection(esp: &FakeEsp, after: ResetAfterOperation) -> Connection {
    let info = serialport::UsbPortInfo {
        vid: 0,
        pid: 0,
        serial_number: None,
        manufacturer: None,
        product: None,
    };
    Connection::new(
        esp.open_port(),
        info,
        after,
        ResetBeforeOperation::NoReset,
        115_200,
    )
}

fn try_connect(esp: &FakeEsp, use_stub: bool, baud: Option<u32>) -> Result<Flasher, Error> {
    try_connect_with(esp, use_stub, baud, ResetAfterOperation::NoReset)
}

fn try_connect_with(
    esp: &FakeEsp,
    use_stub: bool,
    baud: Option<u32>,
    after: ResetAfterOperation,
) -> Result<Flasher, Error> {
    Flasher::connect(connection(esp, after), use_stub, true, false, None, baud)
}

fn connect(esp: &FakeEsp, use_stub: bool) -> Flasher {
    try_connect(esp, use_stub, None).expect("espflash connects to the emulator")
}

/// Deterministic bytes that deflate cannot shrink.
fn noise(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

/// NVS-like contents: mostly erased with a few written entries (compressible).
fn nvs_like(len: usize, seed: u32) -> Vec<u8> {
    let mut data = vec![0xFF; len];
    let entries = noise(len / 8, seed);
    for (i, chunk) in entries.chunks(32).enumerate() {
        let at = i * 256;
        if at + chunk.len() <= len {
            data[at..at + chunk.len()].copy_from_slice(chunk);
        }
    }
    data
}

fn write(flasher: &mut Flasher, segments: &[(u32, &[u8])]) -> Result<(), Error> {
    let segments: Vec<Segment<'_>> = segments
        .iter()
        .map(|&(addr, data)| Segment::new(addr, data))
        .collect();
    flasher.write_bins_to_flash(&segments, &mut DefaultProgressCallback)
}

/// Every changed byte lies inside one of `allowed`.
#[track_caller]
fn assert_changes_within(esp: &FakeEsp, before: &[u8], allowed: &[std::ops::Range<u32>]) {
    for changed in esp.changed_since(before) {
        assert!(
            allowed
                .iter()
                .any(|a| a.start <= changed.start && changed.end <= a.end),
            "bytes {changed:#x?} changed outside {allowed:#x?}"
        );
    }
}

#[test]
fn c3_rom_writes_exact_bytes_and_nothing_else() {
    let table = noise(0xC00, 7);
    let between = noise(0x1000, 8);
    let esp = Config::esp32c3()
        .preset(0x8000, table.clone())
        .preset(0xF000, between.clone())
        .start();
    let before = esp.flash();
    let nvs = nvs_like(0x6000, 1);
    let app = noise(0x1234, 2);

    let mut flasher = connect(&esp, false);
    assert_eq!(flasher.chip(), Chip::Esp32c3);
    write(&mut flasher, &[(0x10000, &app), (0x9000, &nvs)]).unwrap();
    drop(flasher);

    assert_eq!(esp.read(0x9000, nvs.len()), nvs);
    assert_eq!(esp.read(0x10000, app.len()), app);
    // The rest of the app's last sector was erased (P7) and stays erased.
    assert!(
        esp.read(0x11234, 0x2000 - 0x1234)
            .iter()
            .all(|&b| b == 0xFF)
    );
    assert_eq!(esp.read(0x8000, table.len()), table);
    assert_eq!(esp.read(0xF000, between.len()), between);
    assert_changes_within(&esp, &before, &[0x9000..0xF000, 0x10000..0x11234]);
    assert_eq!(esp.erased_ranges(), vec![0x9000..0xF000, 0x10000..0x12000]);
    // ROM blocks are 0x400 bytes, padded with 0xFF.
    assert_eq!(esp.written_ranges(), vec![0x9000..0xF000, 0x10000..0x11400]);

    let begins = esp.flash_begins();
    assert_eq!(begins.len(), 2);
    assert_eq!((begins[0].offset, begins[0].size), (0x10000, 0x2000));
    assert_eq!((begins[1].offset, begins[1].size), (0x9000, 0x6000));
    assert!(begins.iter().all(|b| b.block_size == 0x400 && !b.deflate));
    assert!(begins.iter().all(|b| b.encrypt_word == Some(0)));
    assert_eq!(esp.md5_queries(), vec![(0x10000, 0x1234), (0x9000, 0x6000)]);
    assert_eq!(esp.flash_end_count(), 1);
    let transfers = esp.transfers();
    assert_eq!(transfers[1].blocks_received, 24);
    assert_eq!(transfers[1].bytes_programmed, 0x6000);
    // One FLASH_END closes the whole write: only the last transfer is "ended".
    let ended: Vec<bool> = transfers.iter().map(|t| t.ended).collect();
    assert_eq!(ended, [false, true]);
    assert_eq!(esp.sessions(), 1);
    assert_eq!(esp.stats().bytes_written, 0x6000 + 0x1400);
    // FLASH_END took the ROM out of the download loop (P3).
    assert_eq!(esp.loader(), None);
    assert!(esp.events().contains(&Event::Rebooted));
}

#[test]
fn c3_stub_compressed_and_uncompressed_segments() {
    let esp = FakeEsp::esp32c3();
    let nvs = nvs_like(0x5000, 3);
    let app = noise(0x9000, 4);

    // after = NoResetNoStub keeps the stub running between operations.
    let after = ResetAfterOperation::NoResetNoStub;
    let mut flasher = try_connect_with(&esp, true, Some(921_600), after).unwrap();
    assert_eq!(esp.stats().stub_loads, 1);
    assert_eq!(esp.loader(), Some(Loader::Stub));
    assert!(esp.events().contains(&Event::ChangeBaud {
        new: 921_600,
        prior: 115_200
    }));
    write(&mut flasher, &[(0x9000, &nvs), (0x20000, &app)]).unwrap();

    assert_eq!(esp.read(0x9000, nvs.len()), nvs);
    assert_eq!(esp.read(0x20000, app.len()), app);
    let begins = esp.flash_begins();
    // Compressible NVS goes through FLASH_DEFL_* with its exact size; the
    // incompressible app falls back to FLASH_BEGIN/DATA in 16 KiB blocks (P10).
    assert_eq!((begins[0].offset, begins[0].size), (0x9000, 0x5000));
    assert!(begins[0].deflate);
    assert_eq!((begins[1].offset, begins[1].size), (0x20000, 0x9000));
    assert!(!begins[1].deflate);
    assert_eq!(begins[1].block_size, 0x4000);
    assert_eq!(esp.md5_queries(), vec![(0x9000, 0x5000), (0x20000, 0x9000)]);
    assert_eq!((esp.stats().defl_ends, esp.flash_end_count()), (1, 0));

    // Stub-only command, and a second write in the same session.
    flasher.erase_region(0x20000, 0x1000).unwrap();
    assert!(esp.read(0x20000, 0x1000).iter().all(|&b| b == 0xFF));
    assert_eq!(esp.read(0x21000, 0x8000), app[0x1000..]);
    flasher
        .write_bin_to_flash(0x30000, &[1, 2, 3], &mut DefaultProgressCallback)
        .unwrap();
    // write_bin_to_flash pads to 4 bytes with 0xFF.
    assert_eq!(esp.read(0x30000, 4), [1, 2, 3, 0xFF]);
    assert_eq!(esp.loader(), Some(Loader::Stub));
    assert_eq!(esp.sessions(), 1);
}

#[test]
fn stub_soft_reset_returns_to_the_rom_loader() {
    let esp = FakeEsp::esp32c3();
    let mut flasher = connect(&esp, true);
    write(&mut flasher, &[(0x9000, &nvs_like(0x1000, 5))]).unwrap();
    // after = NoReset: the stub "soft-resets" back into the ROM loader with
    // FLASH_BEGIN(0) + FLASH_END(0), whose answer espflash does not read.
    drop(flasher);
    esp.settle();
    assert!(esp.events().ends_with(&[
        Event::FlashEnd {
            flag: 0,
            deflate: false
        },
        Event::StubExited
    ]));
    assert_eq!(esp.loader(), Some(Loader::Rom));
}

#[test]
fn esp32_rom_detected_by_magic_with_device_info() {
    let mac = [0x24, 0x0a, 0xc4, 0x01, 0x02, 0x03];
    let esp = Config::esp32().mac(mac).start();
    let nvs = nvs_like(0x3000, 5);

    let mut flasher = connect(&esp, false);
    assert_eq!(flasher.chip(), Chip::Esp32);
    let info = flasher.device_info().unwrap();
    assert_eq!(info.mac_address.as_deref(), Some("24:0a:c4:01:02:03"));
    assert_eq!(info.revision, Some((3, 0)));
    assert_eq!(info.flash_size, FlashSize::_4Mb);
    write(&mut flasher, &[(0x9000, &nvs)]).unwrap();

    assert_eq!(esp.read(0x9000, nvs.len()), nvs);
    let begins = esp.flash_begins();
    assert_eq!(begins.len(), 1);
    // ESP32's ROM takes FLASH_BEGIN without the encryption word.
    assert_eq!(begins[0].encrypt_word, None);
    assert!(esp.commands().contains(&op::GET_SECURITY_INFO));
    assert!(esp.events().contains(&Event::ReadReg {
        addr: 0x4000_1000,
        value: 0x00F0_1D83
    }));
    drop(flasher);

    // Second session through the stub (compressed, 4-word FLASH_DEFL_BEGIN).
    let mut flasher = connect(&esp, true);
    assert_eq!(flasher.chip(), Chip::Esp32);
    write(&mut flasher, &[(0xD000, &nvs)]).unwrap();
    assert_eq!(esp.read(0xD000, nvs.len()), nvs);
    let begins = esp.flash_begins();
    assert!(begins[1].deflate && begins[1].loader == Loader::Stub);
    assert_eq!(begins[1].encrypt_word, None);
    assert_eq!(esp.sessions(), 2);
}

#[test]
fn c3_device_info_reports_configured_mac_revision_and_size() {
    let esp = Config::esp32c3()
        .mac([0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0x01])
        .revision(0, 3)
        .flash_size(8 << 20)
        .start();
    let mut flasher = connect(&esp, false);
    let info = flasher.device_info().unwrap();
    assert_eq!(info.mac_address.as_deref(), Some("aa:bb:cc:dd:ee:01"));
    assert_eq!(info.revision, Some((0, 3)));
    assert_eq!(info.flash_size, FlashSize::_8Mb);
    assert!(esp.events().contains(&Event::SpiCommand {
        cmd: 0x9F,
        result: 0x0017_40EF
    }));
}

#[test]
fn two_sessions_in_a_row_keep_the_flash() {
    let esp = FakeEsp::esp32c3();
    let v1 = nvs_like(0x3000, 10);
    let mut flasher = connect(&esp, false);
    write(&mut flasher, &[(0x9000, &v1)]).unwrap();
    drop(flasher);
    let after_first = esp.flash();

    // The operator resets the board into download mode; a new client syncs.
    let mut v2 = v1.clone();
    v2[0x1800..0x1810].copy_from_slice(&[0x42; 16]);
    let other = noise(0x100, 11);
    let mut flasher = connect(&esp, false);
    write(
        &mut flasher,
        &[(0xA000, &v2[0x1000..0x2000]), (0x40000, &other)],
    )
    .unwrap();
    drop(flasher);

    assert_eq!(esp.sessions(), 2);
    assert_eq!(esp.read(0x9000, v2.len()), v2);
    assert_eq!(esp.read(0x40000, other.len()), other);
    let begins = esp.flash_begins();
    let sessions: Vec<u32> = begins.iter().map(|b| b.session).collect();
    assert_eq!(sessions, [1, 2, 2]);
    assert_changes_within(&esp, &after_first, &[0xA800..0xA810, 0x40000..0x40100]);
    assert_eq!(esp.flash_end_count(), 2);
    assert!(esp.events().contains(&Event::Woke));
}

#[test]
fn corrupted_block_fails_md5_verification() {
    let esp = Config::esp32c3()
        .fault(Fault::CorruptBlock {
            begin_offset: Some(0x9000),
            seq: 3,
        })
        .start();
    let nvs = nvs_like(0x2000, 12);
    let mut flasher = connect(&esp, false);
    let err = write(&mut flasher, &[(0x9000, &nvs)]).unwrap_err();
    assert!(matches!(err, Error::VerifyFailed), "{err:?}");
    drop(flasher);

    let diff = support::fake_esp::diff_ranges(&nvs, &esp.read(0x9000, nvs.len()));
    assert_eq!(diff, vec![0xC00..0xC01]);
    assert_eq!(esp.md5_queries(), vec![(0x9000, 0x2000)]);
}

#[test]
fn md5_mismatch_fails_verification_in_stub_mode() {
    let esp = Config::esp32c3().fault(Fault::Md5Mismatch).start();
    let nvs = nvs_like(0x2000, 13);
    let mut flasher = connect(&esp, true);
    let err = write(&mut flasher, &[(0x9000, &nvs)]).unwrap_err();
    assert!(matches!(err, Error::VerifyFailed), "{err:?}");
    // The data itself arrived intact.
    assert_eq!(esp.read(0x9000, nvs.len()), nvs);
}

#[test]
fn flash_begin_error_is_a_rom_error() {
    let esp = Config::esp32c3()
        .fault(Fault::FlashBeginError(0x06))
        .start();
    let before = esp.flash();
    let mut flasher = connect(&esp, false);
    let err = write(&mut flasher, &[(0x9000, &[0u8; 16])]).unwrap_err();
    let text = format!("{err:?}");
    assert!(
        text.contains("FlashBegin") && text.contains("FailedToAct"),
        "{text}"
    );
    assert!(esp.changed_since(&before).is_empty());
    assert!(esp.events().contains(&Event::Error {
        op: op::FLASH_BEGIN,
        code: 0x06
    }));
}

#[test]
fn smaller_reported_flash_rejects_writes_beyond_it() {
    let esp = Config::esp32c3().reported_flash_size(2 << 20).start();
    let mut flasher = connect(&esp, false);
    assert_eq!(flasher.device_info().unwrap().flash_size, FlashSize::_2Mb);
    assert!(esp.events().contains(&Event::SpiSetParams {
        total_size: 2 << 20
    }));
    let err = write(&mut flasher, &[(0x30_0000, &[0u8; 64])]).unwrap_err();
    assert!(format!("{err:?}").contains("FlashBegin"), "{err:?}");
    assert!(esp.read(0x30_0000, 64).iter().all(|&b| b == 0xFF));
}

#[test]
fn dropped_sync_reply_is_retried() {
    let esp = Config::esp32c3()
        .fault(Fault::DropReply {
            op: Some(op::SYNC),
            nth: 1,
        })
        .start();
    let flasher = connect(&esp, false);
    assert_eq!(flasher.chip(), Chip::Esp32c3);
    let stats = esp.stats();
    assert_eq!(stats.dropped_replies, 1);
    assert!(stats.syncs >= 2);
    assert_eq!(stats.sessions, 1);
}

#[test]
fn read_back_through_stub_and_rom() {
    let dir = Dir::new();
    let contents = noise(0x3000, 14);
    let esp = Config::esp32c3().preset(0x9000, contents.clone()).start();

    let mut flasher = connect(&esp, true);
    let file = dir.path().join("stub.bin");
    flasher
        .read_flash(0x9000, 0x3000, 0x1000, 64, file.clone())
        .unwrap();
    assert_eq!(std::fs::read(&file).unwrap(), contents);
    assert!(esp.events().contains(&Event::ReadDone));
    drop(flasher);

    // ROM path: READ_FLASH_SLOW, 64 bytes per command. espflash 4.7.0 gets
    // the addresses wrong past the second block (P12), so read two blocks.
    esp.reset();
    let mut flasher = connect(&esp, false);
    let file = dir.path().join("rom.bin");
    flasher
        .read_flash_rom(0x9000, 128, 0x1000, 64, file.clone())
        .unwrap();
    assert_eq!(std::fs::read(&file).unwrap(), contents[..128]);
    assert!(esp.events().contains(&Event::ReadFlash {
        offset: 0x9040,
        size: 64,
        slow: true
    }));
}

#[test]
fn rom_reboot_makes_a_second_write_in_the_same_session_time_out() {
    let esp = FakeEsp::esp32c3();
    let mut flasher = connect(&esp, false);
    flasher
        .write_bin_to_flash(0x10000, &[0xA5; 256], &mut DefaultProgressCallback)
        .unwrap();
    // The ROM went silent after FLASH_END: espflash's own timeout ends the second write.
    let err = flasher
        .write_bin_to_flash(0x9000, &[0x5A; 256], &mut DefaultProgressCallback)
        .unwrap_err();
    assert!(format!("{err:?}").contains("Timeout"), "{err:?}");
    drop(flasher);
    assert!(
        esp.events()
            .contains(&Event::Ignored { op: op::SPI_ATTACH })
    );
    assert!(esp.read(0x9000, 256).iter().all(|&b| b == 0xFF));

    // A new session (board reset into download mode) works again.
    let mut flasher = connect(&esp, false);
    write(&mut flasher, &[(0x9000, &[0x5A; 256])]).unwrap();
    assert_eq!(esp.read(0x9000, 256), [0x5A; 256]);
    assert_eq!(esp.sessions(), 2);
}

#[test]
fn reboot_knobs_stay_in_loader_and_offline_until_reset() {
    let esp = Config::esp32c3().reboot(Reboot::StayInLoader).start();
    let mut flasher = connect(&esp, false);
    for (addr, byte) in [(0x9000, 1u8), (0xA000, 2)] {
        flasher
            .write_bin_to_flash(addr, &[byte; 8], &mut DefaultProgressCallback)
            .unwrap();
    }
    assert_eq!(esp.read(0xA000, 8), [2; 8]);
    assert_eq!(esp.flash_end_count(), 2);
    drop(flasher);

    let esp = Config::esp32c3().reboot(Reboot::OfflineUntilReset).start();
    let mut flasher = connect(&esp, false);
    write(&mut flasher, &[(0x9000, &[1; 8])]).unwrap();
    drop(flasher);
    assert!(!esp.is_online());
    esp.reset();
    assert_eq!(esp.loader(), Some(Loader::Rom));
    let mut flasher = connect(&esp, false);
    write(&mut flasher, &[(0xA000, &[2; 8])]).unwrap();
    assert_eq!(esp.stats().resets, 1);
}

#[test]
fn malformed_input_does_not_kill_the_emulator() {
    use std::io::Write;
    let esp = FakeEsp::esp32c3();
    {
        let mut port = esp.open_port();
        let mut junk: Vec<u8> = noise(3000, 15);
        let frames: [&[u8]; 9] = [
            &[0xC0, 0xC0, 0xC0],
            &[0xC0, 0x00, 0xC0],
            &[0xC0, 0xDB, 0x01, 0x02, 0xC0],
            &[0xC0, 0x00, 0x03, 0x20, 0x00, 0, 0, 0, 0, 1, 2, 0xC0],
            &[0xC0, 0x00, 0x0A, 0x02, 0x00, 0, 0, 0, 0, 1, 2, 0xC0],
            &[0xC0, 0x00, 0x11, 0x04, 0x00, 0, 0, 0, 0, 1, 2, 3, 4, 0xC0],
            &[0xC0, 0x00, 0xD2, 0x00, 0x00, 0, 0, 0, 0, 0xC0],
            &[0xC0, 0x00, 0x04, 0xFF, 0xFF, 0, 0, 0, 0, 0xC0],
            &[
                0xC0, 0x00, 0x13, 0x10, 0x00, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
            ],
        ];
        for f in frames {
            junk.extend_from_slice(f);
        }
        junk.extend_from_slice(&[0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0, 0, 0, 0, 0, 0xC0]);
        port.write_all(&junk).unwrap();
        port.flush().unwrap();
    }
    esp.settle();
    let mut flasher = connect(&esp, false);
    write(&mut flasher, &[(0x9000, &[7; 32])]).unwrap();
    assert_eq!(esp.read(0x9000, 32), [7; 32]);
    assert!(esp.stats().malformed_frames > 0);
}

/// esptool (`pip install esptool==5.6.0`) against the emulator. Runs only with
/// `CARGO_NVS_ESPTOOL=/path/to/esptool`: it proves the emulator answers the
/// reference client the way espflash expects it to.
#[test]
fn esptool_reference_client_against_emulator() {
    let Some(esptool) = std::env::var_os("CARGO_NVS_ESPTOOL") else {
        eprintln!("CARGO_NVS_ESPTOOL not set: esptool cross-check skipped");
        return;
    };
    let esptool = Path::new(&esptool);
    let dir = Dir::new();
    let nvs = nvs_like(0x6000, 20);
    let file = dir.path().join("nvs.bin");
    std::fs::write(&file, &nvs).unwrap();
    let back = dir.path().join("back.bin");
    let back_arg = back.to_str().unwrap();

    let cases = [
        (Config::esp32c3(), true),
        (Config::esp32c3(), false),
        (Config::esp32(), true),
        (Config::esp32(), false),
    ];
    for (config, no_stub) in cases {
        let chip = config.chip;
        let esp = config.start();
        let file_arg = file.to_str().unwrap();
        let out = run_esptool(esptool, &esp, no_stub, &["write-flash", "0x9000", file_arg]);
        let what = format!("{chip:?} no_stub={no_stub} write-flash");
        assert!(out.contains("Hash of data verified"), "{what}\n{out}");
        assert_eq!(esp.read(0x9000, nvs.len()), nvs, "{what}\n{out}");
        assert_eq!(esp.md5_queries(), vec![(0x9000, 0x6000)], "{what}\n{out}");
        assert_eq!(esp.stats().stub_loads, u32::from(!no_stub), "{what}\n{out}");

        // Read back: READ_FLASH_SLOW (ROM) or READ_FLASH with acks (stub).
        let _ = std::fs::remove_file(&back);
        let len = if no_stub { "0x400" } else { "0x6000" };
        let out = run_esptool(
            esptool,
            &esp,
            no_stub,
            &["read-flash", "0x9000", len, back_arg],
        );
        let read = std::fs::read(&back).unwrap_or_default();
        let want = if no_stub { &nvs[..0x400] } else { &nvs[..] };
        assert!(read == want, "{chip:?} no_stub={no_stub} read-flash\n{out}");
        assert_eq!(esp.sessions(), 2);
    }
}

/// Runs esptool on the emulator's port; panics with its output on failure.
fn run_esptool(esptool: &Path, esp: &FakeEsp, no_stub: bool, args: &[&str]) -> String {
    let mut cmd = std::process::Command::new(esptool);
    cmd.args([
        "--port",
        esp.path(),
        "--before",
        "no-reset",
        "--after",
        "no-reset",
    ]);
    if no_stub {
        cmd.arg("--no-stub");
    }
    let out = cmd.args(args).output().expect("run esptool");
    let text = format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "esptool {args:?} failed\n{text}");
    text
}

// ---- wire time -------------------------------------------------------------------------------

/// The pacing clocks scheduled exactly the wire time the counters add up to: every byte that
/// crossed went through a clock (each clock period rounds down to a nanosecond once).
#[track_caller]
fn assert_clock_matches_counters(wire: &Wire) {
    assert!(wire.paced, "wire time is off");
    let rounding = wire.clock_periods as f64 * 1e-9;
    assert!(
        (wire.clock_seconds() - wire.seconds()).abs() <= rounding + 1e-12,
        "the clocks scheduled {} s, the counters make {} s (received {:?}, sent {:?})",
        wire.clock_seconds(),
        wire.seconds(),
        wire.received,
        wire.sent
    );
}

#[test]
fn wire_time_clock_accumulates_without_drift() {
    use crate::support::fake_esp::wire::{Line, byte_time};
    use std::time::Instant;
    let start = Instant::now();
    let mut line = Line::new(start);
    // 1,000 back-to-back chunks of 11 bytes at 115200 (95.486 µs each, not a whole number of
    // nanoseconds): the deadline is the exact time of 11,000 bytes, not 1,000 rounded chunks.
    let mut due = start;
    for _ in 0..1000 {
        due = line.pass(11, 115_200, start, true);
    }
    assert_eq!(due - start, byte_time(11_000, 115_200));
    assert_eq!(line.scheduled(), byte_time(11_000, 115_200));
    assert_eq!(line.periods(), 1);
    // A pause starts a new period at the time the bytes come; a new baud starts one too.
    let later = due + Duration::from_millis(5);
    assert_eq!(
        line.pass(92, 921_600, later, false),
        later + byte_time(92, 921_600)
    );
    assert_eq!(line.periods(), 2);
    assert_eq!(
        line.scheduled(),
        byte_time(11_000, 115_200) + byte_time(92, 921_600)
    );
}

#[test]
fn wire_time_counts_a_sync_exchange_exactly() {
    use std::io::{Read, Write};
    let esp = Config::esp32c3().wire_time(true).start();
    assert!(esp.wire_time());
    // One SYNC request: 8-byte header + 36-byte body, nothing to escape, two frame ends.
    let mut request = vec![0xC0, 0x00, op::SYNC, 36, 0, 0, 0, 0, 0];
    request.extend_from_slice(&[0x07, 0x07, 0x12, 0x20]);
    request.extend_from_slice(&[0x55; 32]);
    request.push(0xC0);
    assert_eq!(request.len(), 46);
    let mut port = esp.open_port();
    serialport::SerialPort::set_timeout(&mut port, Duration::from_secs(3)).unwrap();
    port.write_all(&request).unwrap();
    // Eight answers of 8-byte header + 4 status bytes, framed: 8 × 14 bytes.
    let mut answers = vec![0u8; 8 * 14];
    port.read_exact(&mut answers).unwrap();
    esp.settle();
    let wire = esp.wire();
    assert_eq!(wire.received, [(115_200, 46)].into());
    assert_eq!(wire.sent, [(115_200, 112)].into());
    assert_eq!(wire.seconds(), (46.0 + 112.0) * 10.0 / 115_200.0);
    assert_clock_matches_counters(&wire);
}

#[test]
fn wire_time_paces_a_transfer_at_115200() {
    const N: usize = 4096;
    let esp = Config::esp32c3().wire_time(true).start();
    let data = noise(N, 13);
    let mut flasher = connect(&esp, false);
    write(&mut flasher, &[(0x9000, &data)]).unwrap();
    drop(flasher);
    esp.settle();
    assert!(esp.read(0x9000, N) == data, "the data arrived");
    let wire = esp.wire();
    // Everything at the ROM's 115200: the N bytes and the protocol around them.
    assert_eq!(wire.received.keys().copied().collect::<Vec<_>>(), [115_200]);
    assert_eq!(wire.sent.keys().copied().collect::<Vec<_>>(), [115_200]);
    assert!(wire.bytes_received() > N as u64, "{:?}", wire.received);
    assert!(wire.received_seconds() >= N as f64 * 10.0 / 115_200.0);
    assert_clock_matches_counters(&wire);
}

#[test]
fn wire_time_follows_change_baudrate() {
    const N: usize = 16 * 1024;
    let esp = Config::esp32c3().wire_time(true).start();
    let data = noise(N, 14);
    let mut flasher = try_connect(&esp, false, Some(921_600)).unwrap();
    write(&mut flasher, &[(0x10000, &data)]).unwrap();
    drop(flasher);
    esp.settle();
    assert!(esp.read(0x10000, N) == data, "the data arrived");
    assert!(esp.events().contains(&Event::ChangeBaud {
        new: 921_600,
        prior: 0
    }));
    let wire = esp.wire();
    // The handshake and CHANGE_BAUDRATE with its answer at 115200, the transfer at 921600.
    assert_eq!(
        wire.received.keys().copied().collect::<Vec<_>>(),
        [115_200, 921_600]
    );
    assert_eq!(
        wire.sent.keys().copied().collect::<Vec<_>>(),
        [115_200, 921_600]
    );
    assert!(wire.received[&921_600] > N as u64, "{:?}", wire.received);
    assert!(wire.received[&115_200] < 1024, "{:?}", wire.received);
    assert_clock_matches_counters(&wire);
}

#[test]
fn without_wire_time_the_wire_is_counted_but_not_paced() {
    let esp = Config::esp32c3().wire_time(false).start();
    let data = noise(4096, 15);
    let mut flasher = connect(&esp, false);
    write(&mut flasher, &[(0x9000, &data)]).unwrap();
    drop(flasher);
    esp.settle();
    let wire = esp.wire();
    assert!(!wire.paced);
    assert!(wire.bytes_received() > 4096, "{:?}", wire.received);
    assert!(wire.bytes_sent() > 0);
    assert_eq!(wire.received_clock + wire.sent_clock, Duration::ZERO);
}
