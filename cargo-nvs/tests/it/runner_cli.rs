//! The everyday runner (issue 14): `board-info`, `list-ports`, `erase*`, `read` outside a
//! package, espflash's `--after` at the end of every command, connection errors, and the
//! serial monitor — the CLI binary against the ROM-loader emulator on a pty.

// Every test here talks to the emulator, which needs a pty.
#![cfg(unix)]

use crate::support;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use crate::support::fake_esp::{Config, Event, FakeEsp, Fault, Loader};
use crate::support::{assert_fails, assert_ok, bin, stderr, tempdir};

fn firmware_manifest() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/esp32c3-factory-data/Cargo.toml")
}

/// `cargo nvs ARGS… --port <pty> --before no-reset --after no-reset`, run in `dir` (outside any
/// package unless ARGS name one).
fn device(esp: &FakeEsp, dir: &Path, args: &[&str]) -> Output {
    let out = bin()
        .arg("nvs")
        .args(args)
        .args([
            "--port",
            esp.path(),
            "--before",
            "no-reset",
            "--after",
            "no-reset",
        ])
        .current_dir(dir)
        .output()
        .unwrap();
    esp.settle();
    out
}

/// `cargo nvs flash` of the firmware example (release, ROM loader).
fn flash_firmware(esp: &FakeEsp, extra: &[&str]) -> Output {
    let out = bin()
        .args(["nvs", "flash", "--release", "--manifest-path"])
        .arg(firmware_manifest())
        .args([
            "--port",
            esp.path(),
            "--before",
            "no-reset",
            "--after",
            "no-reset",
            "--no-stub",
        ])
        .args(extra)
        .output()
        .unwrap();
    esp.settle();
    out
}

/// A folder outside every Cargo package (under the target dir, which has no Cargo.toml).
fn outside() -> tempdir::Dir {
    tempdir::Dir::new()
}

#[test]
fn connect_chain_flash_board_info_read_erase_user_data() {
    let esp = FakeEsp::esp32c3();
    let out = flash_firmware(&esp, &[]);
    assert_ok(&out);
    // Progress in bytes, with the speed (one line per segment when stderr is no terminal).
    let err = stderr(&out);
    assert!(
        err.contains("nvs `fctry` at 0xf000: 8192 bytes written in") && err.contains("iB/s)"),
        "{err}"
    );
    let fctry = esp.read(0xf000, 0x2000);
    let dir = outside();

    // board-info as espflash prints it, outside a package.
    let out = device(&esp, dir.path(), &["board-info", "--no-stub"]);
    assert_ok(&out);
    let info = String::from_utf8_lossy(&out.stdout);
    assert!(
        info.contains("Chip type:         esp32c3 (revision v0.4)"),
        "{info}"
    );
    assert!(info.contains("Crystal frequency: 40 MHz"), "{info}");
    assert!(info.contains("Flash size:        4MB"), "{info}");
    assert!(
        info.contains("MAC address:       7c:df:a1:12:34:56"),
        "{info}"
    );

    // read outside a package: the partition comes from the chip's own table. With the stub
    // and --after no-reset it leaves the stub: the ROM loader answers the next session.
    let out = device(
        &esp,
        dir.path(),
        &["read", "--partition", "nvs", "--format", "json"],
    );
    assert_ok(&out);
    let dump: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(dump["items"].as_array().is_some_and(|a| !a.is_empty()));
    assert!(
        esp.events().contains(&Event::StubExited),
        "read did not end the stub session (--after no-reset)"
    );
    assert_eq!(esp.loader(), Some(Loader::Rom));

    // erase --user-data: nvs is erased, the readonly fctry kept (stub and ROM loader).
    for loader in [&[][..], &["--no-stub"][..]] {
        let mut args = vec!["erase", "--user-data"];
        args.extend_from_slice(loader);
        let out = device(&esp, dir.path(), &args);
        assert_ok(&out);
        let err = stderr(&out);
        assert!(err.contains("Keeping factory data `fctry`"), "{err}");
        assert!(err.contains("Erased user data `nvs`"), "{err}");
        assert!(esp.read(0x9000, 0x6000).iter().all(|&b| b == 0xFF));
        assert_eq!(esp.read(0xf000, 0x2000), fctry, "factory data changed");
    }

    // The next command with --before no-reset still connects.
    assert_ok(&device(&esp, dir.path(), &["board-info"]));

    // --after hard-reset (the default) on a port without DTR/RTS: the data is written, a note
    // says the chip was not reset, exit 0 (flash and board-info alike).
    let out = bin()
        .args([
            "nvs",
            "flash",
            "--release",
            "--nvs-only",
            "--no-stub",
            "--reset-user-data",
            "--manifest-path",
        ])
        .arg(firmware_manifest())
        .args(["--port", esp.path(), "--before", "no-reset"])
        .output()
        .unwrap();
    esp.settle();
    assert_ok(&out);
    assert!(
        stderr(&out).contains("no DTR/RTS lines"),
        "{}",
        stderr(&out)
    );
    let out = bin()
        .args([
            "nvs",
            "board-info",
            "--port",
            esp.path(),
            "--before",
            "no-reset",
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_ok(&out);
    assert!(
        stderr(&out).contains("no DTR/RTS lines"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn erase_parts_and_region_keep_factory_data_unless_asked() {
    let esp = FakeEsp::esp32c3();
    assert_ok(&flash_firmware(&esp, &[]));
    let fctry = esp.read(0xf000, 0x2000);
    let dir = outside();

    let out = device(&esp, dir.path(), &["erase-parts", "fctry"]);
    assert_fails(
        &out,
        &[
            "factory data `fctry` at 0xf000 is not blank",
            "--overwrite-factory-data",
            "nothing was erased",
        ],
    );
    assert_eq!(esp.read(0xf000, 0x2000), fctry);
    let out = device(&esp, dir.path(), &["erase-region", "0x8000", "0x10000"]);
    assert_fails(&out, &["factory data `fctry`", "nothing was erased"]);
    assert_eq!(esp.read(0xf000, 0x2000), fctry);

    let out = device(&esp, dir.path(), &["erase-region", "0x9001", "0x1000"]);
    assert_fails(&out, &["multiples of 4096"]);
    let out = device(&esp, dir.path(), &["erase-parts", "nope"]);
    assert_fails(&out, &["no partition `nope`", "fctry"]);

    // User data may be erased by name; phy_init too.
    assert_ok(&device(&esp, dir.path(), &["erase-parts", "nvs,phy_init"]));
    assert!(esp.read(0x9000, 0x6000).iter().all(|&b| b == 0xFF));
    assert!(esp.read(0x11000, 0x1000).iter().all(|&b| b == 0xFF));
    assert_eq!(esp.read(0xf000, 0x2000), fctry);

    let out = device(
        &esp,
        dir.path(),
        &["erase-parts", "fctry", "--overwrite-factory-data"],
    );
    assert_ok(&out);
    assert!(esp.read(0xf000, 0x2000).iter().all(|&b| b == 0xFF));

    // In the firmware's package, its metadata says what factory data is.
    assert_ok(&flash_firmware(&esp, &["--nvs-only"]));
    let out = bin()
        .args(["nvs", "erase-parts", "fctry", "--manifest-path"])
        .arg(firmware_manifest())
        .args([
            "--port",
            esp.path(),
            "--before",
            "no-reset",
            "--after",
            "no-reset",
        ])
        .output()
        .unwrap();
    assert_fails(&out, &["factory data `fctry`", "per-device keys"]);
}

#[test]
fn list_ports_runs_without_a_package() {
    let dir = outside();
    let out = bin()
        .args(["nvs", "list-ports", "--name-only"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_ok(&out);
    let out = bin()
        .args(["nvs", "list-ports", "--list-all-ports"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_ok(&out);
}

#[test]
fn connection_errors_say_what_happened() {
    let dir = outside();
    let esp = FakeEsp::esp32c3();

    let mut missing = bin();
    missing
        .args(["nvs", "board-info", "--port", "/dev/does-not-exist"])
        .current_dir(dir.path());
    assert_fails(
        &missing.output().unwrap(),
        &["`/dev/does-not-exist` does not exist", "list-ports"],
    );

    let not_tty = dir.path().join("not-a-port");
    std::fs::write(&not_tty, b"").unwrap();
    let out = bin()
        .args(["nvs", "board-info", "--port"])
        .arg(&not_tty)
        .output()
        .unwrap();
    assert_fails(&out, &["is not a serial port"]);

    // Busy: another program holds the port (exclusively, as serial programs do).
    let held = esp.open_port();
    let out = device(&esp, dir.path(), &["board-info"]);
    assert_fails(&out, &["is busy", "another program"]);
    drop(held);

    // No reply: the chip lost power at the first SYNC and stays silent.
    let quiet = Config::esp32c3()
        .fault(Fault::PowerLoss { op: 0x08, nth: 1 })
        .start();
    let out = device(&quiet, dir.path(), &["board-info"]);
    assert_fails(&out, &["no reply from", "download mode"]);

    // Wrong reply: the chip runs its application, which keeps printing.
    let chatty = Config::esp32c3()
        .fault(Fault::PowerLoss { op: 0x08, nth: 1 })
        .chatter(b"I (312) app: hello from the application\r\n")
        .start();
    let out = device(&chatty, dir.path(), &["board-info"]);
    assert_fails(
        &out,
        &["not as an ESP ROM loader", "hello from the application"],
    );
}

#[test]
fn a_port_that_loses_bytes_ends_in_a_clear_error() {
    let dir = outside();
    let esp = Config::esp32c3()
        .fault(Fault::LoseOutput { every: 97 })
        .start();
    // Ending at all (with this error) is the point: before, `flash` kept waiting.
    let out = flash_firmware(&esp, &[]);
    assert_fails(&out, &["another program"]);
    let out = device(&esp, dir.path(), &["read", "--partition", "nvs"]);
    assert_fails(&out, &["another program"]);
}

/// A running `cargo nvs` with piped stdin (keys) and stdout collected on a thread.
struct Running {
    child: std::process::Child,
    stdout: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Running {
    fn start(cmd: &mut std::process::Command) -> Running {
        use std::io::Read;
        let mut child = cmd
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut pipe = child.stdout.take().unwrap();
        let sink = std::sync::Arc::clone(&stdout);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Running { child, stdout }
    }

    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned()
    }

    /// Waits until stdout shows every needle (60 s at most).
    fn wait_for(&mut self, needles: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let out = self.stdout();
            if needles.iter().all(|n| out.contains(n)) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                let mut err = String::new();
                use std::io::Read;
                let _ = self.child.stderr.take().unwrap().read_to_string(&mut err);
                panic!("exited ({status}) before showing {needles:?}:\n{out}\n{err}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{needles:?} not shown within 60 s:\n{}", self.stdout());
    }

    /// Sends keys as a terminal would (0x12 Ctrl-R, 0x03 Ctrl-C).
    fn keys(&mut self, keys: &[u8]) {
        use std::io::Write;
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(keys).unwrap();
        stdin.flush().unwrap();
    }

    fn wait(mut self) -> Output {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "the monitor did not exit on Ctrl-C"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut out = self.child.wait_with_output().unwrap();
        out.stdout = self.stdout.lock().unwrap().clone();
        out
    }
}

#[test]
fn flash_then_monitor_shows_the_boot_log() {
    let esp = Config::esp32c3()
        .boot_log(support::defmt_elf::boot_log())
        .start();
    let mut cmd = bin();
    cmd.args(["nvs", "flash", "--release", "--manifest-path"])
        .arg(firmware_manifest())
        .args([
            "--port",
            esp.path(),
            "--before",
            "no-reset",
            "--after",
            "no-reset",
            "--no-stub",
            "--monitor",
        ]);
    let mut running = Running::start(&mut cmd);
    // The firmware's ELF has no defmt table: the output is shown as it arrives.
    running.wait_for(&[
        "ESP-ROM:esp32c3",
        "I (42) app: factory data read",
        "plain text after",
    ]);
    running.keys(&[0x12]);
    std::thread::sleep(Duration::from_millis(300));
    running.keys(&[0x03]);
    let out = running.wait();
    assert_ok(&out);
    let err = stderr(&out);
    assert!(err.contains("Flashed"), "{err}");
    assert!(
        err.contains("Ctrl-R resets the chip, Ctrl-C exits"),
        "{err}"
    );
    assert!(err.contains("Resetting the chip"), "{err}");
    assert!(err.contains("no DTR/RTS lines"), "{err}");
}

#[test]
fn monitor_decodes_defmt_frames_with_the_elf() {
    let dir = outside();
    let elf = dir.path().join("app.elf");
    std::fs::write(&elf, support::defmt_elf::elf()).unwrap();
    let esp = FakeEsp::esp32c3();
    let mut cmd = bin();
    cmd.args(["nvs", "monitor", "--port", esp.path(), "--elf"])
        .arg(&elf)
        .current_dir(dir.path());
    let mut running = Running::start(&mut cmd);
    std::thread::sleep(Duration::from_millis(300));
    esp.print(&support::defmt_elf::boot_log());
    running.wait_for(&[
        "I (42) app: factory data read",
        "[INFO ] app booted: serial 4242, hw_rev 3",
        "[WARN ] user data is empty",
        "plain text after the frames",
    ]);
    running.keys(&[0x03]);
    let out = running.wait();
    assert_ok(&out);
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        !shown.contains('\u{FFFD}'),
        "raw frame bytes shown:\n{shown}"
    );
    let err = stderr(&out);
    assert!(err.contains("(defmt)"), "{err}");

    // defmt asked for without a table, or without an ELF: a clear error.
    let out = bin()
        .args([
            "nvs",
            "monitor",
            "--port",
            esp.path(),
            "--log-format",
            "defmt",
        ])
        .current_dir(dir.path())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_fails(&out, &["needs the application's ELF", "--elf"]);
}

#[test]
fn runner_mode_elf_then_monitor_as_the_firmware_example_configures_it() {
    let esp = Config::esp32c3()
        .boot_log(support::defmt_elf::boot_log())
        .start();
    // As examples/esp32c3-factory-data/.cargo/config.toml says, with the emulator's port.
    let runner = format!(
        "{} nvs flash --port {} --before no-reset --after no-reset --no-stub --elf --monitor",
        env!("CARGO_BIN_EXE_cargo-nvs"),
        esp.path()
    );
    let config = std::fs::read_to_string(
        firmware_manifest()
            .parent()
            .unwrap()
            .join(".cargo/config.toml"),
    )
    .unwrap();
    assert!(
        config.contains("runner = \"cargo nvs flash --elf --monitor"),
        "{config}"
    );
    let mut cmd =
        std::process::Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.args(["run", "--release"])
        .env("CARGO_TARGET_RISCV32IMC_UNKNOWN_NONE_ELF_RUNNER", runner)
        .current_dir(firmware_manifest().parent().unwrap());
    let mut running = Running::start(&mut cmd);
    running.wait_for(&["I (42) app: factory data read"]);
    running.keys(&[0x03]);
    let out = running.wait();
    assert_ok(&out);
    assert_ne!(
        esp.read(0x20000, 32),
        vec![0xFF; 32],
        "the app was not written"
    );
}

#[test]
fn settings_as_espflash_reads_them() {
    let esp = FakeEsp::esp32c3();
    let dir = outside();
    std::fs::write(
        dir.path().join("espflash_ports.toml"),
        format!("[connection]\nserial = \"{}\"\n", esp.path()),
    )
    .unwrap();
    std::fs::write(dir.path().join("espflash.toml"), "baudrate = 460800\n").unwrap();
    let out = bin()
        .args([
            "nvs",
            "board-info",
            "--before",
            "no-reset",
            "--after",
            "no-reset",
        ])
        .env_remove("ESPFLASH_PORT")
        .env_remove("ESPFLASH_BAUD")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_ok(&out);
    assert!(
        esp.events().contains(&Event::ChangeBaud {
            new: 460_800,
            prior: 115_200
        }),
        "espflash.toml's baudrate was not used"
    );

    // The environment beats the files.
    let other = FakeEsp::esp32c3();
    let out = bin()
        .args([
            "nvs",
            "board-info",
            "--before",
            "no-reset",
            "--after",
            "no-reset",
        ])
        .env("ESPFLASH_PORT", other.path())
        .env("ESPFLASH_BAUD", "230400")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_ok(&out);
    assert!(other.events().contains(&Event::ChangeBaud {
        new: 230_400,
        prior: 115_200
    }));

    // A broken file is named.
    std::fs::write(dir.path().join("espflash.toml"), "baudrate = [\n").unwrap();
    let out = bin()
        .args(["nvs", "flash", "--manifest-path"])
        .arg(firmware_manifest())
        .args(["--release", "--port", esp.path(), "--before", "no-reset"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_fails(&out, &["espflash.toml", "not valid TOML"]);
}

#[test]
fn dist_detects_the_chip_from_esp_hal() {
    let dir = outside();
    let out = bin()
        .args(["nvs", "dist", "--manifest-path"])
        .arg(firmware_manifest())
        .arg("--out-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_ok(&out);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["chip"], "esp32c3");
}

/// A scratch package with two NVS partitions: `nvs` takes a value from an environment
/// variable, `other` (when `with_other`) from a file that does not exist.
fn package_with_env_secret(dir: &Path, with_other: bool) {
    std::fs::create_dir_all(dir.join("src")).unwrap();
    std::fs::write(dir.join("src/lib.rs"), "").unwrap();
    std::fs::write(
        dir.join("partitions.csv"),
        "nvs, data, nvs, 0x9000, 0x6000,\nother, data, nvs, 0xf000, 0x3000,\nfactory, app, factory, 0x20000, 1M,\n",
    )
    .unwrap();
    let other = if with_other {
        "[package.metadata.nvs.partitions.other.namespaces.app]\ncert = { file = \"missing.der\" }\n"
    } else {
        ""
    };
    std::fs::write(
        dir.join("Cargo.toml"),
        format!(
            "[package]\nname = \"envy\"\nversion = \"0.1.0\"\nedition = \"2024\"\n\n[workspace]\n\n\
             [package.metadata.nvs]\npartition-table = \"partitions.csv\"\n\
             [package.metadata.nvs.partitions.nvs.namespaces.app]\n\
             token = {{ string = {{ env = \"ENVY_SECRET_TOKEN\" }} }}\n{other}"
        ),
    )
    .unwrap();
}

#[test]
fn partitions_needs_no_secrets_and_errors_go_to_stderr() {
    let dir = outside();
    package_with_env_secret(dir.path(), true);
    let out = bin()
        .args(["nvs", "partitions"])
        .env_remove("ENVY_SECRET_TOKEN")
        .current_dir(dir.path())
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    // `other` cannot be built (its file is missing): an error, on stderr.
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("error: NVS partition `other`"),
        "{}",
        stderr(&out)
    );
    assert!(!shown.contains("error"), "{shown}");
    assert!(
        shown.contains("(estimated: $ENVY_SECRET_TOKEN not set)"),
        "{shown}"
    );
}

#[test]
fn a_closed_stdout_ends_quietly() {
    let dir = outside();
    package_with_env_secret(dir.path(), false);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_cargo-nvs"))
        .args(["nvs", "partitions", "--format", "json"])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Like `| head -c0`: the reader is gone before anything is printed.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert!(
        !err.contains("panicked") && !err.contains("Broken pipe"),
        "{err}"
    );
}

#[test]
fn every_command_has_an_example_and_clean_usage() {
    for cmd in [
        "generate",
        "encrypt",
        "decrypt",
        "generate-key",
        "dump",
        "partitions",
        "flash",
        "read",
        "dist",
        "mfg",
        "board-info",
        "list-ports",
        "erase-parts",
        "erase-region",
        "erase",
        "monitor",
    ] {
        let out = bin().args(["nvs", cmd, "--help"]).output().unwrap();
        assert_ok(&out);
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(
            help.contains("Example"),
            "`{cmd} --help` has no example:\n{help}"
        );
        assert!(
            !help.contains("SIZE> <INPUT"),
            "`{cmd} --help` usage repeats:\n{help}"
        );
    }
    let help = bin().args(["nvs", "encrypt", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("Either --keygen or --inputkey is required"),
        "{help}"
    );
    let help = bin().args(["nvs", "read", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(!help.to_lowercase().contains("flash at"), "{help}");
}

#[test]
fn generate_removes_images_of_partitions_gone_from_the_metadata() {
    let dir = outside();
    package_with_env_secret(dir.path(), false);
    let out_dir = dir.path().join("target/nvs/envy");
    std::fs::create_dir_all(&out_dir).unwrap();
    std::fs::write(out_dir.join("other.bin"), b"stale").unwrap();
    let out = bin()
        .args(["nvs", "generate"])
        .env("ENVY_SECRET_TOKEN", "t")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_ok(&out);
    assert!(out_dir.join("nvs.bin").exists());
    assert!(!out_dir.join("other.bin").exists(), "{}", stderr(&out));
    assert!(stderr(&out).contains("other.bin"), "{}", stderr(&out));
}
