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
use crate::support::{Case, bin};

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

fn mac_text(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
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
        let mut child = command
            .args(extra)
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
    // Every write of this board's first block is corrupted: it fails twice.
    socket.plug(
        Config::esp32c3()
            .mac(mac(1))
            .fault(Fault::CorruptBlock {
                begin_offset: None,
                seq: 0,
            })
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
    // Its device went back to the pool: the next board gets it. This one's first block is
    // corrupted once: the retry passes.
    socket.plug(
        Config::esp32c3()
            .mac(mac(2))
            .fault(Fault::CorruptBlockOnce { seq: 0 })
            .start(),
    );
    station.wait_for("a PASS", |s| s.count(&port, "done") == 1);
    socket.plug(Config::esp32c3().mac(mac(3)).start());
    let (status, events, stderr) = station.end();
    assert_eq!(status.code(), Some(3), "{stderr}");
    let done: Vec<_> = events.iter().filter(|e| e["event"] == "done").collect();
    assert_eq!(done.len(), 2);
    assert_eq!(
        (done[0]["device"].as_str(), done[0]["mac"].as_str()),
        (Some("SN1"), Some(mac_text(mac(2)).as_str()))
    );
    assert_eq!(done[1]["device"], "SN2");
    assert!(socket.boards[1].read(0x9000, 0x3000) == image(&case, "SN1"));
    assert!(socket.boards[2].read(0x9000, 0x3000) == image(&case, "SN2"));
    // Every attempt is in the log: two failures on the first board, one on the second, then
    // the passes.
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
            row(2, "SN1", false),
            row(2, "SN1", true),
            row(3, "SN2", true),
        ]
    );
    assert!(rows[0][4].starts_with("failed: "));
}

#[test]
fn ctrl_c_gives_back_unwritten_claims_and_records_nothing_unverified() {
    let case = batch(4);
    let mut a = Socket::new(case.dir.path(), "a");
    let b = Socket::new(case.dir.path(), "b");
    a.plug(Config::esp32c3().mac(mac(1)).start());
    // Socket b has no board: it waits.
    let mut station = Station::start(&case, &[&a, &b], &[]);
    let port = a.name().to_owned();
    station.wait_for("a PASS", |s| s.count(&port, "done") == 1);
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
    // One device flashed and verified; no claim held; nothing else recorded.
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
