//! `cargo nvs mfg station` against ROM-loader emulators behind stable port paths: a symlink per
//! socket, re-pointed to a new emulator (a new board with a new MAC) when a board is swapped;
//! a path that vanishes is a board taken away.

// Every test here talks to the emulator, which needs a pty.
#![cfg(unix)]

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support;
use crate::support::fake_esp::{Config, Event, FakeEsp, Fault};
use crate::support::{Case, bin, mac_text};

const CONFIG: &str = "app,namespace,\nserial,data,string\nnum,data,u8\n";
/// The firmware's table: the images go to `nvs` at 0x9000.
const TABLE: &str = "nvs, data, nvs, 0x9000, 0x6000,\nphy_init, data, phy, 0xf000, 0x1000,\n\
    factory, app, factory, 0x20000, 1M,\n";

/// `n` devices SN1…SNn generated into `out/`, 0x3000-byte images.
fn batch(n: usize) -> Case {
    let case = Case::new();
    let mut values = String::from("id,serial,num\n");
    for i in 1..=n {
        values.push_str(&format!("{i},SN{i},{}\n", i % 250));
    }
    case.file("config.csv", CONFIG).file("values.csv", values);
    let out = case.run(&[
        "mfg",
        "generate",
        "config.csv",
        "values.csv",
        "dev",
        "0x3000",
        "--fileid",
        "serial",
        "--out-dir",
        "out",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    case
}

fn image(case: &Case, id: &str) -> Vec<u8> {
    std::fs::read(case.dir.path().join(format!("out/bin/dev-{id}.bin"))).unwrap()
}

fn mac(n: u8) -> [u8; 6] {
    [0x7c, 0xdf, 0xa1, 0, 0x51, n]
}

/// A board socket: a stable path that points at the board plugged in (if any).
struct Socket {
    path: PathBuf,
    boards: Vec<FakeEsp>,
}

impl Socket {
    fn new(dir: &Path, name: &str) -> Socket {
        Socket {
            path: dir.join(name),
            boards: Vec::new(),
        }
    }

    /// Plugs in `board` (replacing the one there, if any, in one step).
    fn plug(&mut self, board: FakeEsp) {
        let tmp = self.path.with_extension("new");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(board.path(), &tmp).unwrap();
        std::fs::rename(&tmp, &self.path).unwrap();
        self.boards.push(board);
    }

    /// Takes the board away: the path vanishes (the emulator stays, for checking).
    fn unplug(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }

    fn current(&self) -> &FakeEsp {
        self.boards.last().unwrap()
    }

    fn name(&self) -> &str {
        self.path.to_str().unwrap()
    }
}

/// A station process with its JSON events as they come.
struct Station {
    child: Child,
    events: Arc<Mutex<Vec<serde_json::Value>>>,
    stderr: Arc<Mutex<String>>,
}

impl Station {
    fn start(case: &Case, sockets: &[&Socket], extra: &[&str]) -> Station {
        let mut command = bin();
        command.args(["mfg", "station", "--out-dir", "out", "--offset", "0x9000"]);
        command.args(["--before", "no-reset", "--after", "no-reset", "--no-stub"]);
        command.args(["--format", "json"]);
        for socket in sockets {
            command.args(["--port", socket.name()]);
        }
        command.args(extra);
        Station::spawn(command, case)
    }

    /// Starts `command` (a station with `--format json`) in the case's folder.
    fn spawn(mut command: std::process::Command, case: &Case) -> Station {
        let mut child = command
            .current_dir(case.dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let events = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().unwrap();
        let sink = events.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let line = line.unwrap();
                let event: serde_json::Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("not a JSON event ({e}): {line}"));
                sink.lock().unwrap().push(event);
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let pipe = child.stderr.take().unwrap();
        let text = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let line = line.unwrap();
                let mut text = text.lock().unwrap();
                text.push_str(&line);
                text.push('\n');
            }
        });
        Station {
            child,
            events,
            stderr,
        }
    }

    fn events(&self) -> Vec<serde_json::Value> {
        self.events.lock().unwrap().clone()
    }

    /// The events of `kind` at `port`.
    fn count(&self, port: &str, kind: &str) -> usize {
        self.events()
            .iter()
            .filter(|e| e["port"] == port && e["event"] == kind)
            .count()
    }

    /// Waits (at most a minute) until `done` holds.
    #[track_caller]
    fn wait_for(&mut self, what: &str, mut done: impl FnMut(&Station) -> bool) {
        let start = Instant::now();
        while !done(self) {
            if let Ok(Some(status)) = self.child.try_wait() {
                // Its last events may still be in the pipe.
                std::thread::sleep(Duration::from_millis(200));
                if done(self) {
                    return;
                }
                panic!(
                    "the station ended ({status}) before {what}:\n{}\n{:?}",
                    self.stderr.lock().unwrap(),
                    self.events()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "no {what} within a minute:\n{}\n{:#?}",
                self.stderr.lock().unwrap(),
                self.events()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (at most a minute) for the station to end.
    #[track_caller]
    fn end(mut self) -> (ExitStatus, Vec<serde_json::Value>, String) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // The readers finish with the pipes.
                std::thread::sleep(Duration::from_millis(100));
                let stderr = self.stderr.lock().unwrap().clone();
                return (status, self.events(), stderr);
            }
            if start.elapsed() > Duration::from_secs(60) {
                let _ = self.child.kill();
                panic!("the station did not end:\n{}", self.stderr.lock().unwrap());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The production log as CSV rows (without the header).
fn log(case: &Case) -> Vec<csv::StringRecord> {
    let out = case.run(&["mfg", "log", "--out-dir", "out"]);
    assert!(out.status.success());
    csv::Reader::from_reader(out.stdout.as_slice())
        .records()
        .map(Result::unwrap)
        .collect()
}

/// The ledger's `mfg status` total.
fn status_total(case: &Case) -> serde_json::Value {
    let out = case.run(&["mfg", "status", "--out-dir", "out", "--format", "json"]);
    assert!(out.status.success());
    serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["total"].clone()
}

#[test]
fn three_sockets_flash_twelve_boards_swapped_by_an_operator() {
    let case = batch(12);
    let mut sockets: Vec<Socket> = (1..=3)
        .map(|i| Socket::new(case.dir.path(), &format!("socket{i}")))
        .collect();
    let mut next_mac = 1u8;
    for socket in &mut sockets {
        socket.plug(Config::esp32c3().mac(mac(next_mac)).start());
        next_mac += 1;
    }
    let firmware_sha256 = support::dist_folder(case.dir.path(), "dist", TABLE);
    let refs: Vec<&Socket> = sockets.iter().collect();
    let mut station = Station::start(&case, &refs, &["--firmware", "dist"]);
    let names: Vec<String> = sockets.iter().map(|s| s.name().to_owned()).collect();
    let mut done_boards = 0;
    let mut plugged = 3;
    let mut passes = [0usize; 3];
    while done_boards < 12 {
        // The next socket whose board passed: swap it (every other time the path vanishes
        // first, as when a board is pulled before the next one goes in).
        let mut swapped = false; // or passed
        for (i, socket) in sockets.iter_mut().enumerate() {
            let now = station.count(&names[i], "done");
            if now > passes[i] {
                passes[i] = now;
                done_boards += 1;
                swapped = true;
                if plugged == 12 {
                    continue;
                }
                plugged += 1;
                if plugged % 2 == 0 {
                    socket.unplug();
                    std::thread::sleep(Duration::from_millis(300));
                }
                socket.plug(Config::esp32c3().mac(mac(next_mac)).start());
                next_mac += 1;
            }
        }
        if !swapped {
            station.wait_for("a board to pass", |s| {
                (0..3).any(|i| s.count(&names[i], "done") > passes[i])
            });
        }
    }
    let (status, events, stderr) = station.end();
    assert_eq!(status.code(), Some(3), "nothing left to flash:\n{stderr}");

    // Every board holds the firmware and one device's image, no device twice.
    let dist = case.dir.path().join("dist");
    let firmware: Vec<(u32, Vec<u8>)> = [
        ("bootloader.bin", 0x0),
        ("partition-table.bin", 0x8000),
        ("fw.bin", 0x20000),
    ]
    .into_iter()
    .map(|(file, offset)| (offset, std::fs::read(dist.join(file)).unwrap()))
    .collect();
    let boards: Vec<&FakeEsp> = sockets.iter().flat_map(|s| s.boards.iter()).collect();
    assert_eq!(boards.len(), 12);
    let mut seen = HashSet::new();
    for board in &boards {
        let chip = board.read(0x9000, 0x3000);
        let device = (1..=12)
            .map(|i| format!("SN{i}"))
            .find(|id| image(&case, id) == chip)
            .expect("a board without a device's image");
        assert!(seen.insert(device.clone()), "{device} on two boards");
        for (offset, bytes) in &firmware {
            assert!(
                board.read(*offset, bytes.len()) == *bytes,
                "firmware at {offset:#x}"
            );
        }
        // One write per board (the ROM loader reboots after FLASH_END), in the connection that
        // found the board (later ones only ask who is there).
        assert_eq!(board.flash_end_count(), 1);
        let events = board.events();
        let first_write = events
            .iter()
            .position(|e| matches!(e, Event::FlashBegin(_)))
            .unwrap();
        assert!(
            !events[..first_write]
                .iter()
                .any(|e| matches!(e, Event::Session(n) if *n > 1)),
            "written in a later connection"
        );
    }
    // The log: 12 ok rows, no MAC or device twice.
    let rows = log(&case);
    assert_eq!(rows.len(), 12, "{rows:?}");
    assert!(
        rows.iter()
            .all(|r| &r[4] == "ok" && r[6] == firmware_sha256)
    );
    let macs: HashSet<&str> = rows.iter().map(|r| &r[0]).collect();
    let devices: HashSet<&str> = rows.iter().map(|r| &r[1]).collect();
    assert_eq!((macs.len(), devices.len()), (12, 12));
    // The events: for every board connected, claimed and done, with port, MAC and device.
    let done: Vec<&serde_json::Value> = events.iter().filter(|e| e["event"] == "done").collect();
    assert_eq!(done.len(), 12);
    for event in &done {
        let (port, mac, device) = (&event["port"], &event["mac"], &event["device"]);
        assert!(names.iter().any(|n| port == n.as_str()), "{event}");
        assert_eq!(event["result"], "PASS");
        assert_eq!(event["firmware_sha256"], firmware_sha256.as_str());
        let bytes = firmware.iter().map(|(_, b)| b.len()).sum::<usize>() + 0x3000;
        assert!(event["seconds"].as_f64().is_some());
        assert_eq!(event["bytes"].as_u64(), Some(bytes as u64));
        for kind in ["connected", "claimed"] {
            assert!(
                events
                    .iter()
                    .any(|e| e["event"] == kind && &e["mac"] == mac && &e["port"] == port),
                "no {kind} event for {event}"
            );
        }
        assert!(
            events
                .iter()
                .any(|e| e["event"] == "claimed" && &e["device"] == device)
        );
    }
    assert!(events.iter().any(|e| e["event"] == "progress"));
    assert_eq!(
        events
            .iter()
            .filter(|e| e["event"] == "nothing-left")
            .count(),
        3
    );
    assert_eq!(status_total(&case)["claimed"], 0);
}

#[test]
fn a_failing_board_is_retried_at_a_lower_baud_then_failed_and_its_device_goes_back() {
    let case = batch(2);
    let mut socket = Socket::new(case.dir.path(), "socket");
    // This board corrupts its first two writes: both attempts fail; wiping the device's
    // partition afterwards (the third write) works.
    socket.plug(
        Config::esp32c3()
            .mac(mac(1))
            .fault(Fault::CorruptFirst { seq: 0, times: 2 })
            .start(),
    );
    let mut station = Station::start(&case, &[&socket], &["--baud", "921600"]);
    let port = socket.name().to_owned();
    station.wait_for("a FAIL", |s| {
        s.events()
            .iter()
            .any(|e| e["event"] == "failed" && e["result"] == "FAIL")
    });
    let failed: Vec<serde_json::Value> = station
        .events()
        .into_iter()
        .filter(|e| e["event"] == "failed")
        .collect();
    assert_eq!(failed.len(), 2, "{failed:?}");
    assert_eq!(failed[0]["result"], "RETRY");
    assert_eq!(failed[0]["baud"], 460_800, "the retry steps the baud down");
    assert_eq!(failed[1]["result"], "FAIL");
    assert_eq!(failed[0]["device"], "SN1");
    // The retry really went at 460800.
    assert!(
        socket.boards[0]
            .events()
            .iter()
            .any(|e| matches!(e, Event::ChangeBaud { new: 460_800, .. }))
    );
    // The failed board keeps no copy of SN1: its partition was erased.
    assert!(
        socket.boards[0]
            .read(0x9000, 0x3000)
            .iter()
            .all(|&b| b == 0xFF)
    );
    // SN1 went back to the pool: the next board gets it. This one corrupts its first write
    // only: the retry passes.
    socket.plug(
        Config::esp32c3()
            .mac(mac(2))
            .fault(Fault::CorruptFirst { seq: 0, times: 1 })
            .start(),
    );
    station.wait_for("a PASS", |s| s.count(&port, "done") == 1);
    // This one corrupts every write, a wipe included: SN2 fails, and as the board may hold a
    // copy of it, SN2 stays held for this board; nothing is left for another one.
    socket.plug(
        Config::esp32c3()
            .mac(mac(3))
            .fault(Fault::CorruptBlock {
                begin_offset: None,
                seq: 0,
            })
            .start(),
    );
    let (status, events, stderr) = station.end();
    assert_eq!(status.code(), Some(3), "{stderr}");
    let done: Vec<_> = events.iter().filter(|e| e["event"] == "done").collect();
    assert_eq!(done.len(), 1);
    assert_eq!(
        (done[0]["device"].as_str(), done[0]["mac"].as_str()),
        (Some("SN1"), Some(mac_text(mac(2)).as_str()))
    );
    assert!(socket.boards[1].read(0x9000, 0x3000) == image(&case, "SN1"));
    // Every attempt is in the log.
    let rows = log(&case);
    let results: Vec<(String, String, bool)> = rows
        .iter()
        .map(|r| (r[0].to_owned(), r[1].to_owned(), &r[4] == "ok"))
        .collect();
    let row = |m: u8, d: &str, ok: bool| (mac_text(mac(m)), d.to_owned(), ok);
    assert_eq!(
        results,
        vec![
            row(1, "SN1", false),
            row(1, "SN1", false),
            row(1, "SN1", false),
            row(2, "SN1", false),
            row(2, "SN1", true),
            row(3, "SN2", false),
            row(3, "SN2", false),
            row(3, "SN2", false),
        ]
    );
    assert!(rows[2][4].contains("were erased"), "{:?}", rows[2]);
    assert!(
        rows[7][4].contains("stays held for this chip"),
        "{:?}",
        rows[7]
    );
    let total = status_total(&case);
    assert_eq!(
        (total["flashed"].as_u64(), total["unlogged"].as_u64()),
        (Some(1), Some(1))
    );
}

/// A board that passed and is seen again (re-seated) keeps its device: no second id.
#[test]
fn a_board_seen_again_after_its_pass_is_not_flashed_again() {
    let case = batch(2);
    let mut socket = Socket::new(case.dir.path(), "socket");
    socket.plug(Config::esp32c3().mac(mac(1)).start());
    let mut station = Station::start(&case, &[&socket], &[]);
    let port = socket.name().to_owned();
    station.wait_for("a PASS", |s| s.count(&port, "done") == 1);
    // Out, and the same board back in (a new emulator with the same flash and MAC).
    let flash = socket.boards[0].flash();
    socket.unplug();
    std::thread::sleep(Duration::from_millis(300));
    socket.plug(
        Config::esp32c3()
            .mac(mac(1))
            .preset(0, flash.clone())
            .start(),
    );
    station.wait_for("the board recognised", |s| {
        s.count(&port, "already-flashed") == 1
    });
    assert!(
        socket.boards[1].flash() == flash,
        "the board was written again"
    );
    socket.plug(Config::esp32c3().mac(mac(2)).start());
    let (status, events, stderr) = station.end();
    assert_eq!(status.code(), Some(3), "{stderr}");
    let claimed: Vec<_> = events.iter().filter(|e| e["event"] == "claimed").collect();
    assert_eq!(claimed.len(), 2, "{claimed:?}");
    assert!(socket.boards[2].read(0x9000, 0x3000) == image(&case, "SN2"));
}

#[test]
fn ctrl_c_gives_back_unwritten_claims_and_records_nothing_unverified() {
    let case = batch(4);
    let mut a = Socket::new(case.dir.path(), "a");
    let b = Socket::new(case.dir.path(), "b");
    // A real cable's speed, so that Ctrl-C comes while the board is being written.
    a.plug(Config::esp32c3().mac(mac(1)).wire_time(true).start());
    // Socket b has no board: it waits.
    let mut station = Station::start(&case, &[&a, &b], &[]);
    let port = a.name().to_owned();
    station.wait_for("the write to start", |s| s.count(&port, "progress") > 0);
    let pid = station.child.id().to_string();
    let kill = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    assert!(kill.success());
    let (status, events, stderr) = station.end();
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("stopping"), "{stderr}");
    assert_eq!(events.iter().filter(|e| e["event"] == "stopped").count(), 2);
    // The board being written was finished, verified and logged; no claim is held; nothing
    // else is recorded.
    assert_eq!(station_done(&events, &port), 1, "{events:?}");
    let total = status_total(&case);
    assert_eq!(
        (total["flashed"].as_u64(), total["claimed"].as_u64()),
        (Some(1), Some(0))
    );
    let rows = log(&case);
    assert_eq!(rows.len(), 1);
    assert_eq!(&rows[0][4], "ok");
    assert!(a.current().read(0x9000, 0x3000) == image(&case, &rows[0][1]));
}

fn station_done(events: &[serde_json::Value], port: &str) -> usize {
    events
        .iter()
        .filter(|e| e["event"] == "done" && e["port"] == port)
        .count()
}

/// `cargo xtask bench station`: the firmware example's dist plus its devices' images, through
/// 1, 2 and 4 sockets with the emulators' wire time on (921600 baud), by `mfg station` and by
/// esptool doing the same work per device (one `write-flash @flash_args` plus the device's
/// image), side by side in one run. Ignored: a measurement, not a test.
#[test]
#[ignore]
fn station_benchmark() {
    const PER_PORT: usize = 3;
    const BAUD: &str = "921600";
    let esptool = std::env::var_os("CARGO_NVS_ESPTOOL").expect("CARGO_NVS_ESPTOOL (xtask sets it)");
    let firmware =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/esp32c3-factory-data/Cargo.toml");
    let work = Case::new();
    let dist = work.dir.path().join("dist");
    let out = bin()
        .args(["nvs", "dist", "--manifest-path"])
        .arg(&firmware)
        .arg("--out-dir")
        .arg(&dist)
        .env("DEVICE_NAME", "bench")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "station: the firmware example's dist (bootloader, table, app) + each device's fctry \
         image, wire time on, {BAUD} baud, {PER_PORT} devices per port"
    );
    println!(
        "{:>5}  {:<24} {:>9} {:>9} {:>10} {:>11}",
        "ports", "tool", "elapsed", "s/device", "devices/h", "wire share"
    );
    let mut one_port = None;
    for ports in [1usize, 2, 4] {
        let devices = PER_PORT * ports;
        let case = Case::new();
        let mut values = String::from("serial,secret\n");
        for i in 0..devices {
            values.push_str(&format!("{},s{i}\n", 1000 + i));
        }
        case.file("devices.csv", values);
        let ledger = case.dir.path().join("ledger.sqlite");
        let out = bin()
            .args(["nvs", "mfg", "generate", "--manifest-path"])
            .arg(&firmware)
            .args([
                "--values",
                "devices.csv",
                "--id",
                "serial",
                "--out-dir",
                "out",
            ])
            .env("DEVICE_NAME", "bench")
            .env("NVS_LEDGER", &ledger)
            .current_dir(case.dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );

        for (tool, extra) in [
            ("cargo nvs mfg station", &[][..]),
            ("  … --no-stub", &["--no-stub"][..]),
        ] {
            let (elapsed, share) = bench_station(&case, &firmware, &dist, ports, devices, extra);
            if extra.is_empty() && ports == 1 {
                one_port = Some(elapsed);
            }
            print_row(ports, tool, elapsed, devices, share);
            if extra.is_empty() && ports == 4 {
                let one = one_port.unwrap();
                println!(
                    "       4 ports: {:.2}× the devices per hour of one port",
                    (devices as f64 / elapsed) / (PER_PORT as f64 / one)
                );
            }
        }
        let (elapsed, share) = bench_esptool(&esptool, &case, &dist, ports, PER_PORT);
        print_row(ports, "esptool 5.6 (--no-stub)", elapsed, devices, share);
    }
}

fn print_row(ports: usize, tool: &str, elapsed: f64, devices: usize, share: f64) {
    let per_port = devices / ports;
    println!(
        "{ports:>5}  {tool:<24} {elapsed:>8.2}s {:>8.2}s {:>10.0} {:>10.2}",
        elapsed / per_port as f64,
        devices as f64 / elapsed * 3600.0,
        share
    );
}

/// Runs `mfg station` over `ports` sockets until the batch is flashed, plugging a new board
/// into a socket as soon as its board passes. Returns the elapsed time and the wire share (the
/// boards' wire limit ÷ the elapsed time, averaged over the ports).
fn bench_station(
    case: &Case,
    firmware: &Path,
    dist: &Path,
    ports: usize,
    devices: usize,
    extra: &[&str],
) -> (f64, f64) {
    // A fresh ledger copy per run: every run flashes the whole batch.
    let ledger = case
        .dir
        .path()
        .join(format!("ledger-{}.sqlite", extra.len()));
    std::fs::copy(case.dir.path().join("ledger.sqlite"), &ledger).unwrap();
    let mut sockets: Vec<Socket> = (0..ports)
        .map(|i| Socket::new(case.dir.path(), &format!("bench{i}-{}", extra.len())))
        .collect();
    let mut next_mac = 1u8;
    for socket in &mut sockets {
        socket.plug(Config::esp32c3().mac(mac(next_mac)).wire_time(true).start());
        next_mac += 1;
    }
    let mut command = bin();
    command
        .args(["mfg", "station", "--out-dir", "out", "--manifest-path"])
        .arg(firmware)
        .arg("--firmware")
        .arg(dist)
        .args([
            "--baud", "921600", "--before", "no-reset", "--after", "no-reset",
        ])
        .args(["--format", "json"])
        .args(extra)
        .env("NVS_LEDGER", &ledger);
    for socket in &sockets {
        command.args(["--port", socket.name()]);
    }
    let mut station = Station::spawn(command, case);
    let names: Vec<String> = sockets.iter().map(|s| s.name().to_owned()).collect();
    let mut passes = vec![0usize; ports];
    let mut plugged = ports;
    let mut done = 0;
    while done < devices {
        station.wait_for("a board to pass", |s| {
            (0..ports).any(|i| s.count(&names[i], "done") > passes[i])
        });
        for (i, socket) in sockets.iter_mut().enumerate() {
            let now = station.count(&names[i], "done");
            if now > passes[i] {
                passes[i] = now;
                done += 1;
                if plugged < devices {
                    socket.plug(Config::esp32c3().mac(mac(next_mac)).wire_time(true).start());
                    next_mac += 1;
                    plugged += 1;
                }
            }
        }
    }
    let (status, events, stderr) = station.end();
    assert_eq!(status.code(), Some(3), "{stderr}");
    let t = |e: &serde_json::Value| e["t"].as_f64().unwrap();
    let mut elapsed = 0f64;
    let mut shares = Vec::new();
    for (i, socket) in sockets.iter().enumerate() {
        let at_port: Vec<&serde_json::Value> = events
            .iter()
            .filter(|e| e["port"] == names[i].as_str())
            .collect();
        // From the port's first event: connecting to the first board and uploading the stub
        // are part of the work, and of the wire time.
        let start = at_port.first().map(|e| t(e)).unwrap();
        let end = at_port
            .iter()
            .filter(|e| e["event"] == "done")
            .map(|e| t(e))
            .fold(0.0, f64::max);
        elapsed = elapsed.max(end);
        let wire: f64 = socket.boards.iter().map(|b| b.wire().seconds()).sum();
        shares.push(wire / (end - start));
    }
    (elapsed, shares.iter().sum::<f64>() / shares.len() as f64)
}

/// esptool per device: a new board, `write-flash @flash_args 0xf000 <its fctry image>` at
/// 921600, `per_port` boards per port, the ports in parallel.
fn bench_esptool(
    esptool: &std::ffi::OsStr,
    case: &Case,
    dist: &Path,
    ports: usize,
    per_port: usize,
) -> (f64, f64) {
    let start = Instant::now();
    let results: Vec<(f64, f64)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..ports)
            .map(|port| {
                scope.spawn(move || {
                    let began = Instant::now();
                    let mut wire = 0.0;
                    for n in 0..per_port {
                        let board = Config::esp32c3()
                            .mac(mac((100 + port * per_port + n) as u8))
                            .wire_time(true)
                            .start();
                        let image = case
                            .dir
                            .path()
                            .join(format!("out/bin/fctry-{}.bin", 1000 + port * per_port + n));
                        let out = std::process::Command::new(esptool)
                            .args(["--chip", "esp32c3", "--port", board.path()])
                            .args(["--baud", "921600", "--before", "no-reset"])
                            .args(["--after", "no-reset", "--no-stub", "write-flash"])
                            .arg("@flash_args")
                            .arg("0xf000")
                            .arg(&image)
                            .current_dir(dist)
                            .output()
                            .unwrap();
                        assert!(
                            out.status.success(),
                            "{}",
                            String::from_utf8_lossy(&out.stderr)
                        );
                        board.settle();
                        wire += board.wire().seconds();
                    }
                    (began.elapsed().as_secs_f64(), wire)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let elapsed = start.elapsed().as_secs_f64();
    let share = results.iter().map(|(e, w)| w / e).sum::<f64>() / results.len() as f64;
    (elapsed, share)
}

/// A firmware table with an nvs_keys partition, for devices with their own key.
const TABLE_WITH_KEYS: &str = "nvs, data, nvs, 0x9000, 0x6000,\n\
    nvs_keys, data, nvs_keys, 0xf000, 0x1000, encrypted\nfactory, app, factory, 0x20000, 1M,\n";

/// A PostgreSQL ledger made ready by its owner with `mfg ledger init --roles`, a login for a
/// generator and two stations, and three devices (each with its own key) issued by the
/// generator with `--store-images`. The batch folder is then removed: what a station flashes
/// can only come from the ledger. Returns the case, the owner's URL, a URL per login, and each
/// device's files as generated (`bin/…` and `keys/…` by device).
struct StoredBatch {
    case: Case,
    owner: String,
    generator: String,
    stations: [String; 2],
    files: std::collections::HashMap<String, (Vec<u8>, Vec<u8>)>,
}

fn stored_batch(tag: &str) -> Option<StoredBatch> {
    stored_batch_of(tag, CONFIG, "id,serial,num\n1,SN1,1\n2,SN2,2\n3,SN3,3\n")
}

/// [`stored_batch`] with this config and these values (devices SN1…, whose images may be
/// recipes: `files` then holds the recipe).
fn stored_batch_of(tag: &str, config: &str, values: &str) -> Option<StoredBatch> {
    let owner = support::postgres_database(tag)?;
    let case = Case::new();
    case.file("config.csv", config)
        .file("values.csv", values)
        .file("partitions.csv", TABLE_WITH_KEYS);
    let out = case.run(&["mfg", "ledger", "init", "--ledger", &owner, "--roles"]);
    support::assert_ok(&out);
    let mut admin = postgres::Client::connect(&owner, postgres::NoTls).unwrap();
    let login = |name: &str, role: &str, admin: &mut postgres::Client| {
        let name = format!("{name}_{tag}_{}", std::process::id());
        admin
            .batch_execute(&format!(
                "DROP ROLE IF EXISTS {name}; CREATE ROLE {name} LOGIN IN ROLE {role}"
            ))
            .unwrap();
        owner.replacen("postgres@", &format!("{name}@"), 1)
    };
    let generator = login("gen", "nvs_generator", &mut admin);
    let stations = [
        login("sta", "nvs_station", &mut admin),
        login("stb", "nvs_station", &mut admin),
    ];
    let out = case.run(&[
        "mfg",
        "generate",
        "config.csv",
        "values.csv",
        "dev",
        "0x3000",
        "--fileid",
        "serial",
        "--keygen",
        "--out-dir",
        "out",
        "--ledger",
        &generator,
        "--store-images",
        "--partition-table",
        "partitions.csv",
        "--partition",
        "nvs",
    ]);
    support::assert_ok(&out);
    let out_dir = case.dir.path().join("out");
    let mut files = std::collections::HashMap::new();
    let ids = (1..values.lines().count()).map(|i| format!("SN{i}"));
    for id in ids {
        let image = std::fs::read(out_dir.join(format!("bin/dev-{id}.bin")))
            .or_else(|_| std::fs::read(out_dir.join(format!("bin/dev-{id}.chip.csv"))))
            .unwrap();
        let key = std::fs::read_dir(out_dir.join("keys"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.to_string_lossy().ends_with(&format!("-{id}.bin")))
            .map(|p| std::fs::read(p).unwrap())
            .expect("a key file per device");
        files.insert(id, (image, key));
    }
    std::fs::remove_dir_all(&out_dir).unwrap();
    Some(StoredBatch {
        case,
        owner,
        generator,
        stations,
        files,
    })
}

/// `mfg station` with only the ledger `url` and the firmware `dist/`, on `socket`.
fn ledger_station(case: &Case, url: &str, socket: &Socket) -> Station {
    let mut command = bin();
    command.args(["mfg", "station", "--ledger", url]);
    command.args(["--firmware", "dist", "--port", socket.name()]);
    command.args(["--before", "no-reset", "--after", "no-reset", "--no-stub"]);
    command.args(["--format", "json"]);
    Station::spawn(command, case)
}

/// A station with only `--ledger URL` (PostgreSQL, a station login) and `--firmware DIR`: no
/// batch folder, no Cargo package, no placement options. Each board gets the firmware, its
/// device's image and key where the stored table puts them; a stored image changed in the
/// database is refused before anything is written, and logged.
#[test]
fn a_station_with_only_the_ledger_and_the_firmware_flashes_the_stored_images() {
    let Some(batch) = stored_batch("stored") else {
        return;
    };
    let case = &batch.case;
    let firmware_sha256 = support::dist_folder(case.dir.path(), "dist", TABLE_WITH_KEYS);
    // Someone with write access to the database changes one byte of SN3's image.
    let mut admin = postgres::Client::connect(&batch.owner, postgres::NoTls).unwrap();
    let changed = admin
        .execute(
            "UPDATE nvs_device_files SET data = set_byte(data, 100, get_byte(data, 100) # 1)
             WHERE device = 'SN3' AND name LIKE 'bin/%'",
            &[],
        )
        .unwrap();
    assert_eq!(changed, 1);

    let mut socket = Socket::new(case.dir.path(), "socket");
    socket.plug(Config::esp32c3().mac(mac(0x61)).start());
    let mut station = ledger_station(case, &batch.stations[0], &socket);
    let port = socket.name().to_owned();
    station.wait_for("the first board to pass", |s| s.count(&port, "done") == 1);
    socket.plug(Config::esp32c3().mac(mac(0x62)).start());
    station.wait_for("the second board to pass", |s| s.count(&port, "done") == 2);
    let third = Config::esp32c3().mac(mac(0x63)).start();
    let blank = third.flash();
    socket.plug(third);
    let (status, events, stderr) = station.end();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("SN3") && stderr.contains("SHA-256") && stderr.contains("not flashed"),
        "{stderr}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "failed" && e["device"] == "SN3"),
        "{events:?}"
    );
    assert!(
        socket.current().flash() == blank,
        "a tampered image was written"
    );

    let dist = case.dir.path().join("dist");
    for (board, id) in socket.boards.iter().zip(["SN1", "SN2"]) {
        let (image, key) = &batch.files[id];
        let mut expected = image.clone();
        expected.resize(0x6000, 0xFF);
        same_bytes(&board.read(0x9000, 0x6000), &expected, id);
        let mut expected_key = key.clone();
        expected_key.resize(0x1000, 0xFF);
        same_bytes(&board.read(0xf000, 0x1000), &expected_key, "its key");
        for (file, offset) in [("bootloader.bin", 0x0), ("fw.bin", 0x20000)] {
            let bytes = std::fs::read(dist.join(file)).unwrap();
            same_bytes(&board.read(offset, bytes.len()), &bytes, file);
        }
    }
    // The log (read by the owner): two passes with the firmware, the refusal of SN3.
    let out = case.run(&["mfg", "log", "--ledger", &batch.owner]);
    support::assert_ok(&out);
    let rows: Vec<csv::StringRecord> = csv::Reader::from_reader(out.stdout.as_slice())
        .records()
        .map(Result::unwrap)
        .collect();
    let summary: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| (&r[1], &r[4][..r[4].len().min(8)]))
        .collect();
    assert_eq!(
        summary,
        [("SN1", "ok"), ("SN2", "ok"), ("SN3", "refused:")],
        "{rows:?}"
    );
    assert!(rows[..2].iter().all(|r| r[6] == firmware_sha256));
    assert_eq!(&rows[0][0], mac_text(mac(0x61)));
}

/// The roles `mfg ledger init --roles` makes: a station login reads the stored files (images
/// and keys) of the device it holds a claim on and of no other, not even another station's
/// claimed device or a flashed one; it cannot name itself the claimant, take over another
/// login's live claim, undo a flash, change stored files, issue devices or change the log.
#[test]
fn a_station_login_reads_only_the_key_material_of_its_own_claim() {
    use cargo_nvs::mfg::ledger::{ClaimOutcome, Ledger};
    use cargo_nvs::mfg::postgres::{PostgresLedger, ServerUrl};
    let Some(batch) = stored_batch("roles") else {
        return;
    };
    let open = |url: &str| PostgresLedger::open(&ServerUrl::parse(url).unwrap()).unwrap();
    let (a, b) = (open(&batch.stations[0]), open(&batch.stations[1]));
    assert!(
        a.stored_files("SN2").unwrap().is_empty(),
        "read before its claim"
    );
    assert!(matches!(
        a.claim("SN2", "pc-a").unwrap(),
        ClaimOutcome::Claimed
    ));
    let files = a.stored_files("SN2").unwrap();
    let (image, key) = &batch.files["SN2"];
    assert_eq!(files.len(), 2, "{files:?}");
    assert!(
        files
            .iter()
            .any(|f| &f.data == image && f.partition == "nvs")
    );
    assert!(
        files
            .iter()
            .any(|f| &f.data == key && f.partition == "nvs_keys")
    );
    for other in ["SN1", "SN3"] {
        assert!(
            a.stored_files(other).unwrap().is_empty(),
            "{other} read by a"
        );
    }
    // The other station sees nothing, not even the device a holds.
    for device in ["SN1", "SN2", "SN3"] {
        assert!(
            b.stored_files(device).unwrap().is_empty(),
            "{device} read by b"
        );
    }
    let mut raw = postgres::Client::connect(&batch.stations[1], postgres::NoTls).unwrap();
    let visible: i64 = raw
        .query_one("SELECT count(*) FROM nvs_device_files", &[])
        .unwrap()
        .get(0);
    assert_eq!(visible, 0);
    // A flashed device: its files are no one's to read any more.
    assert!(matches!(
        a.claim("SN1", "pc-a").unwrap(),
        ClaimOutcome::Claimed
    ));
    a.record_flash(&cargo_nvs::mfg::ledger::FlashRecord {
        mac: "7C:DF:A1:00:00:01".into(),
        device: "SN1".into(),
        sha256: String::new(),
        port: "p".into(),
        result: "ok".into(),
        time: String::new(),
        firmware_sha256: String::new(),
    })
    .unwrap();
    assert!(
        a.stored_files("SN1").unwrap().is_empty(),
        "a flashed device's files"
    );
    for (what, sql) in [
        (
            "name itself the claimant",
            "UPDATE nvs_devices SET claimed_by = current_user WHERE device = 'SN2'",
        ),
        (
            "take over another login's live claim",
            "UPDATE nvs_devices SET claimant = 'b', claimed_at = '9999' WHERE device = 'SN2'",
        ),
        (
            "mark a flashed device unflashed",
            "UPDATE nvs_devices SET flashed = FALSE WHERE device = 'SN1'",
        ),
        (
            "change a stored file",
            "UPDATE nvs_device_files SET data = '' WHERE device = 'SN2'",
        ),
        (
            "issue a device",
            "INSERT INTO nvs_devices (device, image, sha256, size, values_file, line, batch,
               issued_at, batch_dir) VALUES ('X', '', '', 0, '', 0, '', '', '')",
        ),
        ("rewrite the log", "DELETE FROM nvs_flash_log"),
    ] {
        let error = raw.batch_execute(sql).expect_err(what);
        assert_eq!(
            error.code(),
            Some(&postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
            "{what}: {error:?}"
        );
    }
    // Claiming a flashed device (its claim has ended) gives no access to its files.
    raw.batch_execute(
        "UPDATE nvs_devices SET claimant = 'b', claimed_at = '9999' WHERE device = 'SN1'",
    )
    .unwrap();
    assert!(
        b.stored_files("SN1").unwrap().is_empty(),
        "a flashed device's files, by b"
    );
    // The generator reads everything it stored.
    let generator = open(&batch.generator);
    assert_eq!(generator.stored_files("SN1").unwrap().len(), 2);
    // A login may not make the tables: it is told who may.
    let empty = support::postgres_database("roles_empty").unwrap();
    let login = batch.stations[0].split('@').next().unwrap();
    let as_station = empty.replacen("postgres://postgres", login, 1);
    let Err(error) = PostgresLedger::open(&ServerUrl::parse(&as_station).unwrap()) else {
        panic!("a station login made the tables");
    };
    assert!(
        error
            .to_string()
            .contains("database's owner run `cargo nvs mfg ledger init"),
        "{error}"
    );
}

#[track_caller]
fn same_bytes(actual: &[u8], expected: &[u8], what: &str) {
    if actual != expected {
        let at = actual.iter().zip(expected).position(|(a, b)| a != b);
        panic!("{what} differs (first at {at:?})");
    }
}

/// Values from the chip with the ledger alone: devices with an `@chip:mac` cell and their own
/// key, stored in PostgreSQL; a station login with the firmware flashes two boards with
/// different MACs. Each gets its image built for its MAC and encrypted with its stored key,
/// equal to what Espressif's generator encrypts for the CSV with that MAC, and the log records
/// each image's SHA-256 with the MAC.
#[test]
fn a_station_with_only_the_ledger_builds_each_chips_values_from_its_mac() {
    let Some(python) = crate::chip_values::reference_python() else {
        return;
    };
    let config = "app,namespace,\nserial,data,string\nnum,data,u8\nmac,data,string\n";
    let values = "id,serial,num,mac\n1,SN1,1,@chip:mac\n2,SN2,2,@chip:mac\n";
    let Some(batch) = stored_batch_of("chip", config, values) else {
        return;
    };
    let case = &batch.case;
    support::dist_folder(case.dir.path(), "dist", TABLE_WITH_KEYS);
    let mut socket = Socket::new(case.dir.path(), "socket");
    socket.plug(Config::esp32c3().mac(mac(0x71)).start());
    let mut station = ledger_station(case, &batch.stations[0], &socket);
    let port = socket.name().to_owned();
    station.wait_for("the first board to pass", |s| s.count(&port, "done") == 1);
    socket.plug(Config::esp32c3().mac(mac(0x72)).start());
    station.wait_for("the second board to pass", |s| s.count(&port, "done") == 2);
    let (status, _, stderr) = station.end();
    assert_eq!(status.code(), Some(3), "nothing left to flash:\n{stderr}");

    let mut shas = Vec::new();
    for (board, (id, n)) in socket.boards.iter().zip([("SN1", 1), ("SN2", 2)]) {
        let (upper, _, _) = crate::chip_values::spellings(mac(0x70 + n));
        let csv = format!(
            "key,type,encoding,value\napp,namespace,,\nserial,data,string,{id}\n\
             num,data,u8,{n}\nmac,data,string,{upper}\n"
        );
        let key = &batch.files[id].1;
        let expected =
            crate::chip_values::reference_encrypted(&python, case.dir.path(), &csv, "0x3000", key);
        same_bytes(&board.read(0x9000, 0x3000), &expected, id);
        let mut key = batch.files[id].1.clone();
        key.resize(0x1000, 0xFF);
        same_bytes(&board.read(0xf000, 0x1000), &key, "its key");
        shas.push((
            mac_text(mac(0x70 + n)),
            cargo_nvs::hex::sha256_hex(&expected),
        ));
    }
    assert_ne!(shas[0].1, shas[1].1);
    let out = case.run(&["mfg", "log", "--ledger", &batch.owner]);
    support::assert_ok(&out);
    let logged: Vec<(String, String)> = csv::Reader::from_reader(out.stdout.as_slice())
        .records()
        .map(Result::unwrap)
        .map(|r| (r[0].to_owned(), r[2].to_owned()))
        .collect();
    assert_eq!(logged, shas);
}
