//! `cargo nvs flash`, `read` and `dist` as users run them (the CLI binary with
//! `--port /dev/pts/N`), flashing the firmware example's real ELF into the ROM-loader emulator.
//! The example is built first (`cargo xtask ci` does it; otherwise the first test builds it).

// Every test here talks to the emulator, which needs a pty.
#![cfg(unix)]

use crate::support;

use std::path::{Path, PathBuf};
use std::process::Output;

use crate::support::fake_esp::{Config, Event, FakeEsp, Fault};
use crate::support::{assert_fails, assert_ok, bin, stderr, tempdir};
use nvs_build::format::{ImageBuilder, PartitionSize, Value, Version};

fn firmware_manifest() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/esp32c3-factory-data/Cargo.toml")
}

/// `cargo nvs <cmd> --manifest-path <firmware> --release --port <pty> …` without DTR/RTS resets
/// (a pty has none).
fn run(esp: &FakeEsp, cmd: &str, extra: &[&str]) -> Output {
    let out = bin()
        .args(["nvs", cmd, "--manifest-path"])
        .arg(firmware_manifest())
        .args([
            "--release",
            "--port",
            esp.path(),
            "--before",
            "no-reset",
            "--after",
            "no-reset",
        ])
        .args(extra)
        .output()
        .unwrap();
    esp.settle();
    out
}

/// The firmware's release build-script OUT_DIR (a no-op build when `cargo xtask ci` built it).
fn release_out_dir() -> PathBuf {
    static OUT_DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    OUT_DIR
        .get_or_init(|| {
            let out = cargo()
                .args(["build", "--release", "--message-format=json"])
                .current_dir(firmware_manifest().parent().unwrap())
                .output()
                .unwrap();
            assert_ok(&out);
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|m| {
                    m["reason"] == "build-script-executed"
                        && m["package_id"]
                            .as_str()
                            .is_some_and(|id| id.contains("esp32c3-factory-data"))
                })
                .and_then(|m| m["out_dir"].as_str().map(PathBuf::from))
                .expect("the firmware's build script ran")
        })
        .clone()
}

/// The firmware's development factory data as an earlier build made it (another
/// `DEVICE_NAME`), padded over the partition.
fn older_dev_fctry() -> Vec<u8> {
    let scratch = tempdir::Dir::new();
    let out = bin()
        .args(["nvs", "generate", "--manifest-path"])
        .arg(firmware_manifest())
        .arg("--out-dir")
        .arg(scratch.path())
        .env("DEVICE_NAME", "an-older-name")
        .output()
        .unwrap();
    assert_ok(&out);
    padded(
        &std::fs::read(scratch.path().join("fctry.bin")).unwrap(),
        0x2000,
    )
}

/// The release build's NVS image of `partition`, as nvs-build wrote it.
fn release_image(partition: &str) -> Vec<u8> {
    std::fs::read(release_out_dir().join(format!("nvs/{partition}.bin"))).unwrap()
}

fn padded(bytes: &[u8], size: usize) -> Vec<u8> {
    let mut bytes = bytes.to_vec();
    bytes.resize(size, 0xFF);
    bytes
}

/// An NVS image of `size` bytes with one namespace, as a device or another tool would hold it.
fn nvs_image(size: u64, namespace: &str, entries: &[(&str, Value)]) -> Vec<u8> {
    let mut builder = ImageBuilder::new(Version::V2);
    builder.namespace(namespace).unwrap();
    for (key, value) in entries {
        builder.add(key, value.clone()).unwrap();
    }
    let image = builder.finish(PartitionSize::new(size).unwrap()).unwrap();
    padded(&image, size as usize)
}

/// A product of the firmware: devices issued by `mfg generate` (Cargo mode) into `batch/` of a
/// scratch folder, with their own ledger.
struct Product {
    dir: tempdir::Dir,
    ledger: PathBuf,
}

impl Product {
    fn new(devices_csv: &str) -> Product {
        let dir = tempdir::Dir::new();
        let ledger = dir.path().join("ledger.sqlite");
        std::fs::write(dir.path().join("devices.csv"), devices_csv).unwrap();
        let product = Product { dir, ledger };
        let out = product.mfg(&["generate", "--values", "devices.csv", "--id", "serial"]);
        assert_ok(&out);
        product
    }

    /// `cargo nvs mfg ARGS… --out-dir batch` with the firmware and this product's ledger.
    fn mfg(&self, args: &[&str]) -> Output {
        bin()
            .args(["nvs", "mfg"])
            .args(args)
            .args(["--out-dir", "batch", "--manifest-path"])
            .arg(firmware_manifest())
            .arg("--ledger")
            .arg(&self.ledger)
            .current_dir(self.dir.path())
            .output()
            .unwrap()
    }

    /// `mfg flash` of the next device onto `esp` (ROM loader, no resets).
    fn flash_next(&self, esp: &FakeEsp, extra: &[&str]) -> Output {
        let mut args = vec!["flash", "--port", esp.path(), "--before", "no-reset"];
        args.extend(["--after", "no-reset", "--no-stub"]);
        args.extend_from_slice(extra);
        let out = self.mfg(&args);
        esp.settle();
        out
    }

    /// Device `id`'s factory image, padded over its partition.
    fn image(&self, id: &str) -> Vec<u8> {
        let file = self.dir.path().join(format!("batch/bin/fctry-{id}.bin"));
        padded(&std::fs::read(file).unwrap(), 0x2000)
    }
}

/// Compares flash contents without printing them (they may be long, or secret).
#[track_caller]
fn same(actual: &[u8], expected: &[u8], what: &str) {
    assert!(
        actual == expected,
        "{what}: differs at {:?}",
        support::fake_esp::diff_ranges(actual, expected)
    );
}

fn cargo() -> std::process::Command {
    std::process::Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// `cargo run --release` of the firmware with `cargo nvs flash --elf` as its runner, into `esp`.
fn cargo_run_with_runner(esp: &FakeEsp, env: &[(&str, &std::ffi::OsStr)]) -> Output {
    // The environment beats the firmware's .cargo/config.toml (whose runner is espflash).
    let runner = format!(
        "{} nvs flash --port {} --before no-reset --after no-reset --no-stub --elf",
        env!("CARGO_BIN_EXE_cargo-nvs"),
        esp.path()
    );
    let mut command = cargo();
    command
        .args(["run", "--release"])
        .env("CARGO_TARGET_RISCV32IMC_UNKNOWN_NONE_ELF_RUNNER", runner)
        .current_dir(firmware_manifest().parent().unwrap());
    for (name, value) in env {
        command.env(name, value);
    }
    let out = command.output().unwrap();
    esp.settle();
    out
}

/// `cargo nvs dist --chip esp32c3 --out-dir DIR EXTRA…` for the firmware.
fn run_dist(dir: &Path, extra: &[&str]) -> Output {
    bin()
        .args(["nvs", "dist", "--manifest-path"])
        .arg(firmware_manifest())
        .args(["--chip", "esp32c3", "--out-dir"])
        .arg(dir)
        .args(extra)
        .output()
        .unwrap()
}

/// dist's option that puts the NVS images (development values) into flash_args, as
/// `cargo nvs flash` writes them.
const DEV_DATA: &[&str] = &["--with-dev-data"];

/// The artifacts `cargo nvs dist` writes: (offset, file bytes) from flash_args.
fn dist(dir: &Path, extra: &[&str]) -> Vec<(u32, Vec<u8>)> {
    assert_ok(&run_dist(dir, extra));
    // `mfg flash --firmware` takes the folder: its files match, its firmware_sha256 too.
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    let firmware = cargo_nvs::firmware::Firmware::load(dir).unwrap();
    assert_eq!(manifest["firmware_sha256"], firmware.sha256.as_str());
    let args = std::fs::read_to_string(dir.join("flash_args")).unwrap();
    args.lines()
        .skip(1)
        .map(|line| {
            let (offset, file) = line.split_once(' ').unwrap();
            let offset = u32::from_str_radix(offset.trim_start_matches("0x"), 16).unwrap();
            (offset, std::fs::read(dir.join(file)).unwrap())
        })
        .collect()
}

/// A file's permission bits.
#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn changed_outside(
    esp: &FakeEsp,
    before: &[u8],
    allowed: &[(u32, usize)],
) -> Vec<std::ops::Range<u32>> {
    esp.changed_since(before)
        .into_iter()
        .filter(|r| {
            !allowed
                .iter()
                .any(|&(a, len)| r.start >= a && r.end <= a + len as u32)
        })
        .collect()
}

#[test]
fn flashes_everything_in_one_pass_and_skips_what_is_unchanged() {
    let scratch = tempdir::Dir::new();
    let artifacts = dist(scratch.path(), DEV_DATA);
    let esp = FakeEsp::esp32c3();
    let blank = esp.flash();

    let out = run(&esp, "flash", &["--no-stub"]);
    assert_ok(&out);
    // Bootloader, table, app and both NVS partitions, exactly where dist says, nothing else.
    for (offset, bytes) in &artifacts {
        assert_eq!(
            &esp.read(*offset, bytes.len()),
            bytes,
            "flash at {offset:#x} differs from the dist artifact"
        );
    }
    let allowed: Vec<(u32, usize)> = artifacts
        .iter()
        .map(|(o, b)| (*o, b.len().div_ceil(4096) * 4096))
        .collect();
    assert!(
        changed_outside(&esp, &blank, &allowed).is_empty(),
        "{:?}",
        esp.changed_since(&blank)
    );
    // One write_bins_to_flash call: one FLASH_END (the ROM reboots after it).
    assert_eq!(esp.flash_end_count(), 1);
    // The factory image (4 KiB of a 2-page partition) is padded over the whole partition.
    assert!(
        artifacts
            .iter()
            .any(|(o, b)| *o == 0xf000 && b.len() == 0x2000)
    );

    // Nothing changed: a second flash writes no bytes at all.
    let written = esp.bytes_written();
    assert_ok(&run(&esp, "flash", &["--no-stub"]));
    assert_eq!(
        esp.bytes_written(),
        written,
        "a second flash with nothing changed wrote bytes"
    );
}

#[test]
fn user_data_survives_a_reflash_unless_reset() {
    let esp = FakeEsp::esp32c3();
    assert_ok(&run(&esp, "flash", &["--no-stub"]));
    // The device wrote its own user data into `nvs` (0x9000).
    let device_data = nvs_image(
        0x6000,
        "user_data",
        &[("ssid", Value::String("home".into()))],
    );
    esp.write(0x9000, &device_data);
    let before = esp.flash();

    let out = run(&esp, "flash", &["--no-stub"]);
    assert_ok(&out);
    assert!(
        stderr(&out).contains("Keeping the device's user data in nvs `nvs`"),
        "{}",
        stderr(&out)
    );
    assert_eq!(esp.read(0x9000, 0x6000), before[0x9000..0xf000].to_vec());

    let out = run(&esp, "flash", &["--no-stub", "--reset-user-data"]);
    assert_ok(&out);
    assert!(stderr(&out).contains("Replacing"), "{}", stderr(&out));
    same(
        &esp.read(0x9000, 0x6000),
        &padded(&release_image("nvs"), 0x6000),
        "reset nvs",
    );
}

#[test]
fn stub_mode_and_nvs_only() {
    let esp = FakeEsp::esp32c3();
    let blank = esp.flash();
    let out = run(&esp, "flash", &["--nvs-only", "--partition", "fctry"]);
    assert_ok(&out);
    let changed = esp.changed_since(&blank);
    assert!(
        !changed.is_empty()
            && changed
                .iter()
                .all(|r| r.start >= 0xf000 && r.end <= 0x11000),
        "{changed:?}"
    );
}

/// `cargo nvs read …` against `esp`, run in `dir` (no --manifest-path: no package needed).
fn read_in(esp: &FakeEsp, dir: &Path, extra: &[&str]) -> Output {
    let out = bin()
        .args([
            "nvs",
            "read",
            "--port",
            esp.path(),
            "--before",
            "no-reset",
            "--after",
            "no-reset",
        ])
        .args(extra)
        .current_dir(dir)
        .output()
        .unwrap();
    esp.settle();
    out
}

fn dump_keys(json: &[u8]) -> Vec<String> {
    let dump: serde_json::Value = serde_json::from_slice(json).unwrap();
    dump["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["key"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn read_back_and_dump() {
    let esp = FakeEsp::esp32c3();
    assert_ok(&run(&esp, "flash", &["--no-stub"]));
    // The chip rebooted into the app after the flash: back into download mode.
    esp.reset();
    // A folder with no Cargo package: the partitions are found in the device's own table.
    let scratch = tempdir::Dir::new();
    let saved = scratch.path().join("fctry.bin");
    // An older file of that name, readable by all, is replaced by a private one.
    std::fs::write(&saved, b"old").unwrap();
    let out = read_in(
        &esp,
        scratch.path(),
        &[
            "--partition",
            "fctry",
            "--format",
            "json",
            "-o",
            "fctry.bin",
        ],
    );
    assert_ok(&out);
    assert!(stderr(&out).contains("device's partition table at 0x8000"));
    let keys = dump_keys(&out.stdout);
    assert!(
        keys.iter().any(|k| k == "ProductID") && keys.iter().any(|k| k == "product_cert"),
        "{keys:?}"
    );
    assert_eq!(std::fs::read(&saved).unwrap(), esp.read(0xf000, 0x2000));
    // The device's data may hold secrets.
    #[cfg(unix)]
    assert_eq!(mode(&saved), 0o600);

    // --all: every NVS partition of the device's table (the stub of the last run is still
    // running: reset into the ROM loader first).
    esp.reset();
    let out = read_in(&esp, scratch.path(), &["--all"]);
    assert_ok(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("== partition `nvs` (0x9000")
            && text.contains("== partition `fctry` (0xf000"),
        "{text}"
    );

    // A table given explicitly wins over the device's.
    std::fs::write(
        scratch.path().join("other.csv"),
        "store, data, nvs, 0xf000, 0x2000, readonly\nfactory, app, factory, 0x20000, 1M,\n",
    )
    .unwrap();
    esp.reset();
    let out = read_in(
        &esp,
        scratch.path(),
        &[
            "--partition",
            "store",
            "--partition-table",
            "other.csv",
            "--format",
            "json",
        ],
    );
    assert_ok(&out);
    assert!(dump_keys(&out.stdout).iter().any(|k| k == "ProductID"));
}

#[test]
fn read_from_a_device_without_a_table_says_so() {
    let esp = FakeEsp::esp32c3();
    let scratch = tempdir::Dir::new();
    let out = read_in(&esp, scratch.path(), &["--all", "--no-stub"]);
    assert_fails(
        &out,
        &["no partition table at 0x8000", "--partition-table-offset"],
    );
    let out = read_in(
        &esp,
        scratch.path(),
        &[
            "--partition",
            "nvs",
            "--partition-table-offset",
            "0x9000",
            "--no-stub",
        ],
    );
    assert_fails(&out, &["no partition table at 0x9000"]);
}

#[test]
fn dump_picks_a_partition_out_of_a_full_flash_dump() {
    let esp = FakeEsp::esp32c3();
    assert_ok(&run(&esp, "flash", &["--no-stub"]));
    let scratch = tempdir::Dir::new();
    let flash = scratch.path().join("flash.bin");
    std::fs::write(&flash, esp.flash()).unwrap();
    let dump = |extra: &[&str]| {
        bin()
            .args(["nvs", "dump", "flash.bin", "--format", "json"])
            .args(extra)
            .current_dir(scratch.path())
            .output()
            .unwrap()
    };
    let out = dump(&["--partition", "fctry"]);
    assert_ok(&out);
    assert!(dump_keys(&out.stdout).iter().any(|k| k == "product_cert"));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["size"], 0x2000);
    // With a table file instead of the one inside the dump.
    std::fs::write(
        scratch.path().join("t.csv"),
        "user, data, nvs, 0x9000, 0x6000,\nfactory, app, factory, 0x20000, 1M,\n",
    )
    .unwrap();
    let out = dump(&["--partition", "user", "--partition-table", "t.csv"]);
    assert_ok(&out);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["size"],
        0x6000
    );
    // Not an NVS partition, not there, and a dump that is too short.
    assert_fails(&dump(&["--partition", "factory"]), &["not data/nvs"]);
    assert_fails(
        &dump(&["--partition", "nope"]),
        &["no partition `nope`", "nvs, fctry"],
    );
    std::fs::write(&flash, &esp.flash()[..0x10000]).unwrap();
    assert_fails(
        &dump(&["--partition", "fctry"]),
        &["ends before partition `fctry`"],
    );
}

#[test]
fn faults_are_errors_never_success() {
    for fault in [
        Fault::CorruptBlock {
            begin_offset: Some(0x9000),
            seq: 2,
        },
        Fault::Md5Mismatch,
        Fault::FlashBeginError(0x06),
    ] {
        let esp = Config::esp32c3().fault(fault.clone()).start();
        let out = run(&esp, "flash", &["--no-stub", "--nvs-only"]);
        assert_fails(&out, &["flashing failed"]);
    }
    let esp = Config::esp32c3()
        .fault(Fault::DropReply {
            op: Some(0x03),
            nth: 3,
        })
        .start();
    let out = run(&esp, "flash", &["--no-stub", "--nvs-only"]);
    assert_fails(&out, &["flashing failed"]);
}

#[test]
fn bad_ports_and_wrong_chips() {
    let out = bin()
        .args(["nvs", "flash", "--nvs-only", "--release", "--manifest-path"])
        .arg(firmware_manifest())
        .args(["--port", "/dev/does-not-exist", "--before", "no-reset"])
        .output()
        .unwrap();
    assert_fails(&out, &["serial port `/dev/does-not-exist` does not exist"]);

    let esp = FakeEsp::esp32c3();
    let out = run(&esp, "flash", &["--no-stub", "--chip", "esp32"]);
    assert_fails(&out, &["is an esp32c3, not the esp32 given with --chip"]);

    // Port busy: the emulator's own client end holds it open exclusively.
    let esp = FakeEsp::esp32c3();
    let _held = esp.open_port();
    let out = run(&esp, "flash", &["--no-stub"]);
    assert_fails(&out, &["is busy: another program has it open"]);
}

#[test]
fn refuses_disagreeing_tables_foreign_elves_and_small_flash() {
    let scratch = tempdir::Dir::new();
    let table = scratch.path().join("other.csv");
    std::fs::write(&table, "nvs, data, nvs, 0xa000, 0x5000,\nfctry, data, nvs, 0xf000, 0x2000, readonly\nfactory, app, factory, 0x20000, 1M,\n").unwrap();
    let esp = FakeEsp::esp32c3();
    let out = run(
        &esp,
        "flash",
        &["--no-stub", "--partition-table", table.to_str().unwrap()],
    );
    assert_fails(&out, &["partition `nvs`", "0x9000", "0xa000"]);

    let esp = FakeEsp::esp32c3();
    let host_elf = std::env::current_exe().unwrap();
    let out = bin()
        .args(["nvs", "flash", "--port", esp.path(), "--before", "no-reset"])
        .args(["--after", "no-reset", "--no-stub", "--elf"])
        .arg(&host_elf)
        .env("OUT_DIR", release_out_dir())
        .output()
        .unwrap();
    assert_fails(&out, &["cannot make an esp32c3 image"]);

    // 256 KiB: the app at 0x20000 (about 180 KiB) does not fit.
    let esp = Config::esp32c3().reported_flash_size(0x40000).start();
    let out = run(&esp, "flash", &["--no-stub"]);
    assert_fails(&out, &["beyond the chip's"]);
}

/// esptool, the factory's usual tool, flashes the `dist` artifacts (`write-flash @flash_args`)
/// into a second emulator: the flash must equal what `cargo nvs flash` wrote. Needs esptool
/// 5.6 (`cargo xtask ci` installs it and sets CARGO_NVS_ESPTOOL).
#[test]
fn esptool_flashes_dist_artifacts_to_the_same_bytes() {
    let Some(esptool) = std::env::var_os("CARGO_NVS_ESPTOOL") else {
        eprintln!(
            "skipped: set CARGO_NVS_ESPTOOL to an esptool 5.6 executable (cargo xtask ci does)"
        );
        return;
    };
    let scratch = tempdir::Dir::new();
    dist(scratch.path(), DEV_DATA);
    let ours = FakeEsp::esp32c3();
    assert_ok(&run(&ours, "flash", &["--no-stub"]));

    let theirs = FakeEsp::esp32c3();
    let out = esptool_write_flash(&esptool, &theirs)
        .arg("@flash_args")
        .current_dir(scratch.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "esptool failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
    theirs.settle();
    let (a, b) = (ours.flash(), theirs.flash());
    assert!(
        a == b,
        "flash differs at {:?}",
        support::fake_esp::diff_ranges(&a, &b)
    );
}

/// As cargo's runner (`runner = "cargo nvs flash --elf"`), `cargo run --release` hands over the
/// release ELF by a relative path, with the build script's OUT_DIR: the chip gets that build's
/// NVS images, and cargo-nvs builds nothing itself.
#[test]
fn runner_mode_flashes_what_cargo_built() {
    let esp = FakeEsp::esp32c3();
    let out = cargo_run_with_runner(&esp, &[]);
    assert_ok(&out);
    assert!(
        !stderr(&out).contains("`dev` profile"),
        "the runner built the app again:\n{}",
        stderr(&out)
    );
    assert_ne!(
        esp.read(0x20000, 32),
        vec![0xFF; 32],
        "the app was not written"
    );
    for (name, offset, size) in [("nvs", 0x9000, 0x6000), ("fctry", 0xf000, 0x2000)] {
        same(
            &esp.read(offset, size),
            &padded(&release_image(name), size),
            &format!("{name}: the release build's image"),
        );
    }
    // Outside `cargo run` there is no OUT_DIR: say so, build nothing.
    let out = bin()
        .args(["nvs", "flash", "--port", esp.path(), "--elf", "x.elf"])
        .env_remove("OUT_DIR")
        .output()
        .unwrap();
    assert_fails(&out, &["OUT_DIR is not set", "cargo run"]);
}

/// A chip provisioned by `mfg flash` keeps its identity through every way of updating the app.
#[test]
fn a_provisioned_chip_keeps_its_factory_data() {
    let product = Product::new("serial,secret\n1000,per-device-secret-1000\n");
    let (scratch, ledger) = (&product.dir, &product.ledger);
    let esp = FakeEsp::esp32c3();
    assert_ok(&product.flash_next(&esp, &[]));
    let identity = esp.read(0xf000, 0x2000);
    same(
        &identity,
        &product.image("1000"),
        "the provisioned factory data",
    );
    let with_ledger = |out: &[&str]| {
        let out = bin()
            .args(["nvs", "flash", "--manifest-path"])
            .arg(firmware_manifest())
            .args(["--release", "--port", esp.path(), "--before", "no-reset"])
            .args(["--after", "no-reset", "--no-stub"])
            .args(out)
            .env("NVS_LEDGER", ledger)
            .output()
            .unwrap();
        esp.settle();
        out
    };
    let updates: [(&str, Output); 3] = [
        ("flash", with_ledger(&[])),
        (
            "flash --reset-user-data",
            with_ledger(&["--reset-user-data"]),
        ),
        (
            "runner",
            cargo_run_with_runner(&esp, &[("NVS_LEDGER", ledger.as_os_str())]),
        ),
    ];
    for (how, out) in updates {
        assert_ok(&out);
        let err = stderr(&out);
        assert!(
            err.contains("Keeping the factory data in nvs `fctry`")
                && err.contains("device `1000`"),
            "{how}:\n{err}"
        );
        assert!(
            !err.contains("per-device-secret-1000"),
            "{how} printed the secret:\n{err}"
        );
        assert_eq!(
            esp.read(0xf000, 0x2000),
            identity,
            "{how} changed the factory data"
        );
        assert_ne!(esp.read(0x20000, 32), vec![0xFF; 32], "{how}: no app");
    }
    // A release through the factory's usual tool: esptool writes dist's flash_args.
    if let Some(esptool) = std::env::var_os("CARGO_NVS_ESPTOOL") {
        let release = scratch.path().join("dist");
        dist(&release, &[]);
        esp.write(0x20000, &[0u8; 64]); // an older app
        let out = esptool_write_flash(&esptool, &esp)
            .arg("@flash_args")
            .current_dir(&release)
            .output()
            .unwrap();
        esp.settle();
        assert!(out.status.success(), "esptool: {}", stderr(&out));
        same(
            &esp.read(0xf000, 0x2000),
            &identity,
            "esptool: factory data",
        );
        assert_ne!(esp.read(0x20000, 64), vec![0u8; 64], "esptool: no app");
        esp.reset();
    } else {
        eprintln!("esptool step skipped: set CARGO_NVS_ESPTOOL (cargo xtask ci does)");
    }
    // Without the ledger the identity is still kept, as an unknown one.
    let out = bin()
        .args(["nvs", "flash", "--manifest-path"])
        .arg(firmware_manifest())
        .args([
            "--release",
            "--nvs-only",
            "--port",
            esp.path(),
            "--before",
            "no-reset",
        ])
        .args(["--after", "no-reset", "--no-stub"])
        .env("NVS_LEDGER", scratch.path().join("none.sqlite"))
        .output()
        .unwrap();
    esp.settle();
    assert_ok(&out);
    assert!(
        stderr(&out).contains("an unknown production identity"),
        "{}",
        stderr(&out)
    );
    same(
        &esp.read(0xf000, 0x2000),
        &identity,
        "factory data without a ledger",
    );
    // The flag replaces it.
    let out = with_ledger(&["--overwrite-factory-data"]);
    assert_ok(&out);
    assert!(
        stderr(&out).contains("Replacing the factory data"),
        "{}",
        stderr(&out)
    );
    same(
        &esp.read(0xf000, 0x2000),
        &padded(&release_image("fctry"), 0x2000),
        "flash contents",
    );
}

/// `mfg flash` provisions a development chip without a flag, and refuses a chip that holds
/// another production identity unless --force.
#[test]
fn mfg_flash_replaces_dev_data_and_refuses_another_identity() {
    let dev_chip = FakeEsp::esp32c3();
    assert_ok(&run(&dev_chip, "flash", &["--no-stub", "--nvs-only"]));
    let product = Product::new("serial,secret\n1000,secret-1000\n1001,secret-1001\n");
    let flash_next = |esp: &FakeEsp, extra: &[&str]| product.flash_next(esp, extra);
    let image = |id: &str| product.image(id);
    let out = flash_next(&dev_chip, &[]);
    assert_ok(&out);
    assert!(
        stderr(&out).contains("replacing the development data in `fctry`"),
        "{}",
        stderr(&out)
    );
    same(
        &dev_chip.read(0xf000, 0x2000),
        &image("1000"),
        "device 1000",
    );

    // A second chip that already holds device 1000's identity (a cloned or returned unit).
    let clone = Config::esp32c3()
        .mac([0x7c, 0xdf, 0xa1, 0x00, 0x00, 0x42])
        .preset(0xf000, image("1000"))
        .start();
    let out = flash_next(&clone, &[]);
    assert_fails(
        &out,
        &["holds device `1000` (found by its SHA-256", "--force"],
    );
    assert!(!stderr(&out).contains("secret-10"), "{}", stderr(&out));
    same(&clone.read(0xf000, 0x2000), &image("1000"), "refused chip");
    let out = flash_next(&clone, &["--force"]);
    assert_ok(&out);
    same(&clone.read(0xf000, 0x2000), &image("1001"), "forced chip");
}

/// Development data is replaced (e.g. after DEVICE_NAME changed); data that is not ours is not.
#[test]
fn dev_factory_data_is_updated_and_foreign_data_kept() {
    let older = older_dev_fctry();
    let esp = Config::esp32c3().preset(0xf000, older.clone()).start();
    let out = run(&esp, "flash", &["--no-stub", "--nvs-only"]);
    assert_ok(&out);
    assert!(
        stderr(&out).contains("Updating the development data in nvs `fctry`"),
        "{}",
        stderr(&out)
    );
    same(
        &esp.read(0xf000, 0x2000),
        &padded(&release_image("fctry"), 0x2000),
        "flash contents",
    );

    // The dev values, plus a key the package does not define.
    let foreign = nvs_image(
        0x2000,
        "mass_prod",
        &[
            (
                "DeviceSecret",
                Value::String("dev-secret-not-for-production".into()),
            ),
            ("serial", Value::U32(1)),
            ("extra", Value::U8(7)),
        ],
    );
    // No per-device key holds its dev value any more.
    let identity = nvs_image(0x2000, "mass_prod", &[("serial", Value::U32(77))]);
    for (chip, why) in [
        (
            foreign,
            "keys this package does not define (mass_prod::extra)",
        ),
        (
            identity,
            "per-device keys (mass_prod::DeviceSecret, mass_prod::serial)",
        ),
    ] {
        let esp = Config::esp32c3().preset(0xf000, chip.clone()).start();
        let out = run(&esp, "flash", &["--no-stub", "--nvs-only"]);
        assert_ok(&out);
        let err = stderr(&out);
        assert!(
            err.contains(why) && err.contains("an unknown production identity"),
            "{err}"
        );
        same(&esp.read(0xf000, 0x2000), &chip, why);
        // The user data beside it was still written.
        same(
            &esp.read(0x9000, 0x6000),
            &padded(&release_image("nvs"), 0x6000),
            "flash contents",
        );
    }
}

/// With the stub (espflash's default), data that is replaced is erased first: a write cut off
/// later then leaves our image's start and erased flash, which the next flash finishes.
#[test]
fn stub_mode_erases_what_it_replaces_first() {
    let older = older_dev_fctry();
    let esp = Config::esp32c3().preset(0xf000, older).start();
    let out = run(&esp, "flash", &["--nvs-only"]);
    assert_ok(&out);
    assert!(
        stderr(&out).contains("Updating the development data"),
        "{}",
        stderr(&out)
    );
    assert!(
        esp.events().iter().any(|e| matches!(
            e,
            Event::EraseRegion {
                offset: 0xf000,
                size: 0x2000
            }
        )),
        "{:?}",
        esp.events()
    );
    same(
        &esp.read(0xf000, 0x2000),
        &padded(&release_image("fctry"), 0x2000),
        "stub",
    );
    // Kept user data is read back through the stub too.
    let device_data = nvs_image(0x6000, "user_data", &[("ssid", Value::String("x".into()))]);
    esp.write(0x9000, &device_data);
    let out = run(&esp, "flash", &["--nvs-only"]);
    assert_ok(&out);
    assert!(
        stderr(&out).contains("Keeping the device's user data"),
        "{}",
        stderr(&out)
    );
    same(
        &esp.read(0x9000, 0x6000),
        &device_data,
        "kept through the stub",
    );
}

/// A new partition table that moves NVS data: the app must not land on the old place of a
/// production identity.
#[test]
fn a_changed_partition_table_does_not_overwrite_moved_factory_data() {
    let old_table = esp_idf_part::PartitionTable::try_from_str(
        "nvs, data, nvs, 0x9000, 0x6000,\nfctry, data, nvs, 0x20000, 0x2000, readonly\n\
         factory, app, factory, 0x30000, 1M,\n",
    )
    .unwrap()
    .to_bin()
    .unwrap();
    let identity = nvs_image(0x2000, "mass_prod", &[("serial", Value::U32(4242))]);
    let esp = Config::esp32c3()
        .preset(0x8000, old_table)
        .preset(0x20000, identity.clone())
        .start();
    let before = esp.flash();
    let out = run(&esp, "flash", &["--no-stub"]);
    assert_fails(
        &out,
        &[
            "the chip's partition table differs",
            "factory data partition `fctry` at 0x20000",
            "--overwrite-factory-data",
        ],
    );
    same(&esp.flash(), &before, "a refused flash");
    // --nvs-only leaves the table and app alone: nothing to fear.
    assert_ok(&run(&esp, "flash", &["--no-stub", "--nvs-only"]));
    same(&esp.read(0x20000, 0x2000), &identity, "the old place");
    let out = run(&esp, "flash", &["--no-stub", "--overwrite-factory-data"]);
    assert_ok(&out);
    assert_ne!(esp.read(0x20000, 32), identity[..32].to_vec(), "no app");
}

/// A write cut off by a power loss is finished by the next flash; a corrupted one is named and
/// refused until the user decides.
#[test]
fn interrupted_writes_are_finished_and_damage_is_refused() {
    let nvs = padded(&release_image("nvs"), 0x6000);
    // Power lost at the first block of `nvs` (after fctry's 8 blocks): erased, nothing written.
    let esp = Config::esp32c3()
        .fault(Fault::PowerLoss { op: 0x03, nth: 9 })
        .start();
    assert_fails(
        &run(&esp, "flash", &["--no-stub", "--nvs-only"]),
        &["flashing failed"],
    );
    esp.set_faults(Vec::new());
    esp.reset();
    same(&esp.read(0x9000, 0x6000), &[0xFF; 0x6000], "erased nvs");
    assert_ok(&run(&esp, "flash", &["--no-stub", "--nvs-only"]));
    same(&esp.read(0x9000, 0x6000), &nvs, "nvs");

    // Cut off inside an entry (a stub writes and a power loss cuts finer than ROM blocks): the
    // first bytes of our image, then erased flash.
    let mut cut = vec![0xFF; 0x6000];
    cut[..0x70].copy_from_slice(&nvs[..0x70]);
    let esp = Config::esp32c3().preset(0x9000, cut).start();
    let out = run(&esp, "flash", &["--no-stub", "--nvs-only"]);
    assert_ok(&out);
    assert!(
        stderr(&out).contains("Finishing an interrupted write of nvs `nvs`"),
        "{}",
        stderr(&out)
    );
    same(&esp.read(0x9000, 0x6000), &nvs, "nvs");

    // A corrupted block: the flash fails, the next one names the partition and stops.
    let esp = Config::esp32c3()
        .fault(Fault::CorruptBlock {
            begin_offset: Some(0x9000),
            seq: 0,
        })
        .start();
    assert_fails(
        &run(&esp, "flash", &["--no-stub", "--nvs-only"]),
        &["flashing failed"],
    );
    esp.set_faults(Vec::new());
    let damaged = esp.read(0x9000, 0x6000);
    let out = run(&esp, "flash", &["--no-stub", "--nvs-only"]);
    assert_fails(
        &out,
        &[
            "nvs `nvs` at 0x9000 holds damaged user data",
            "--reset-user-data",
            "--keep-user-data",
        ],
    );
    same(&esp.read(0x9000, 0x6000), &damaged, "damaged nvs");
    let out = run(
        &esp,
        "flash",
        &["--no-stub", "--nvs-only", "--keep-user-data"],
    );
    assert_ok(&out);
    same(&esp.read(0x9000, 0x6000), &damaged, "damaged nvs");
    assert_ok(&run(
        &esp,
        "flash",
        &["--no-stub", "--nvs-only", "--reset-user-data"],
    ));
    same(&esp.read(0x9000, 0x6000), &nvs, "nvs");
}

#[test]
fn dist_is_reproducible() {
    for extra in [&[][..], DEV_DATA] {
        let (a, b) = (tempdir::Dir::new(), tempdir::Dir::new());
        let (first, second) = (dist(a.path(), extra), dist(b.path(), extra));
        assert_eq!(first, second);
        assert_eq!(
            std::fs::read(a.path().join("manifest.json")).unwrap(),
            std::fs::read(b.path().join("manifest.json")).unwrap()
        );
    }
}

/// A release reaches devices that hold their own factory and user data: by default dist
/// leaves the NVS images (and nvs_keys) out of flash_args and out of the folder, lists them in
/// manifest.json with their roles, and says so. A folder of an earlier `--with-dev-data` run
/// (images 0600) loses those images. esptool flashing the default flash_args onto a device
/// updates the app and leaves its factory and user data byte-identical.
#[test]
fn default_dist_leaves_factory_and_user_data_alone() {
    let scratch = tempdir::Dir::new();
    let dir = scratch.path();
    let bench = dist(dir, DEV_DATA);
    assert!(bench.iter().any(|(offset, _)| *offset == 0xf000));
    #[cfg(unix)]
    for file in ["nvs-fctry.bin", "nvs-nvs.bin"] {
        assert_eq!(mode(&dir.join(file)), 0o600, "{file}");
    }

    let out = run_dist(dir, &[]);
    assert_ok(&out);
    let err = stderr(&out);
    for needle in [
        "partition `fctry` at 0xf000 (factory data",
        "partition `nvs` at 0x9000 (user data",
        "--with-dev-data",
        "Removed `nvs-fctry.bin`, `nvs-nvs.bin`",
    ] {
        assert!(err.contains(needle), "stderr lacks {needle:?}:\n{err}");
    }
    let flash_args = std::fs::read_to_string(dir.join("flash_args")).unwrap();
    let files: Vec<&str> = flash_args
        .lines()
        .skip(1)
        .map(|l| l.split_once(' ').unwrap().1)
        .collect();
    assert_eq!(
        files,
        [
            "bootloader.bin",
            "partition-table.bin",
            "esp32c3-factory-data.bin"
        ],
        "{flash_args}"
    );
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "bootloader.bin",
            "esp32c3-factory-data.bin",
            "flash_args",
            "manifest.json",
            "partition-table.bin"
        ]
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    let segments: Vec<(u64, &str, bool, bool)> = manifest["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["offset"].as_u64().unwrap(),
                s["role"].as_str().unwrap(),
                s["in_flash_args"].as_bool().unwrap(),
                s["file"].is_null(),
            )
        })
        .collect();
    assert_eq!(
        segments,
        [
            (0x0, "bootloader", true, false),
            (0x8000, "partition-table", true, false),
            (0x20000, "app", true, false),
            (0xf000, "factory-data", false, true),
            (0x9000, "user-data", false, true),
        ]
    );
    assert_eq!(manifest["segments"][3]["size"], 0x2000);

    let Some(esptool) = std::env::var_os("CARGO_NVS_ESPTOOL") else {
        eprintln!(
            "esptool part skipped: set CARGO_NVS_ESPTOOL to an esptool 5.6 executable (cargo xtask ci does)"
        );
        return;
    };
    // A device in the field: its own factory data, user data it wrote, an older app.
    let factory: Vec<u8> = (0..0x2000u32).map(|i| (i * 7 % 251) as u8).collect();
    let user: Vec<u8> = (0..0x6000u32).map(|i| (i * 13 % 241) as u8).collect();
    let device = Config::esp32c3()
        .preset(0xf000, factory.clone())
        .preset(0x9000, user.clone())
        .preset(0x20000, vec![0xA5; 0x1000])
        .start();
    let before = device.flash();
    let out = esptool_write_flash(&esptool, &device)
        .arg("@flash_args")
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "esptool failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
    device.settle();
    assert_eq!(device.read(0xf000, 0x2000), factory, "factory data changed");
    assert_eq!(device.read(0x9000, 0x6000), user, "user data changed");
    let app = std::fs::read(dir.join("esp32c3-factory-data.bin")).unwrap();
    assert_eq!(
        device.read(0x20000, app.len()),
        app,
        "the app was not updated"
    );
    let written: Vec<(u32, usize)> = dist_segments(&manifest)
        .into_iter()
        .map(|(offset, len)| (offset, len.div_ceil(4096) * 4096))
        .collect();
    assert!(
        changed_outside(&device, &before, &written).is_empty(),
        "{:?}",
        device.changed_since(&before)
    );
}

/// (offset, size) of the segments a dist manifest puts in flash_args.
fn dist_segments(manifest: &serde_json::Value) -> Vec<(u32, usize)> {
    manifest["segments"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["in_flash_args"] == true)
        .map(|s| {
            (
                s["offset"].as_u64().unwrap() as u32,
                s["size"].as_u64().unwrap() as usize,
            )
        })
        .collect()
}

/// Not a test but a measurement, run by `cargo xtask bench flash`: app + 2 NVS images, our one
/// connection against the two-step workflow it replaces (espflash for the app, then esptool
/// for the NVS images at hand-copied addresses), on a first flash and on a re-flash with
/// nothing changed. Counts connections and bytes written.
#[test]
#[ignore = "measurement; run with `cargo xtask bench flash`"]
fn flash_workflow_comparison() {
    let esptool = std::env::var_os("CARGO_NVS_ESPTOOL").expect("set CARGO_NVS_ESPTOOL");
    let scratch = tempdir::Dir::new();
    let artifacts = dist(scratch.path(), DEV_DATA);

    let ours = FakeEsp::esp32c3();
    let mut our_runs = Vec::new();
    for _ in 0..2 {
        let (sessions, bytes) = (ours.sessions(), ours.bytes_written());
        assert_ok(&run(&ours, "flash", &["--no-stub"]));
        our_runs.push((ours.sessions() - sessions, ours.bytes_written() - bytes));
    }

    // Two steps: espflash writes bootloader, table and app (its default skips unchanged
    // segments); esptool then writes each NVS image.
    let theirs = FakeEsp::esp32c3();
    let (app, nvs): (Vec<_>, Vec<_>) = artifacts
        .iter()
        .partition(|(offset, _)| *offset < 0x9000 || *offset >= 0x20000);
    let mut their_runs = Vec::new();
    for _ in 0..2 {
        let (sessions, bytes) = (theirs.sessions(), theirs.bytes_written());
        espflash_write(&theirs, &app);
        let mut args: Vec<String> = Vec::new();
        for (offset, data) in &nvs {
            let file = scratch.path().join(format!("nvs-{offset:x}.bin"));
            std::fs::write(&file, data).unwrap();
            args.push(format!("{offset:#x}"));
            args.push(file.display().to_string());
        }
        let out = esptool_write_flash(&esptool, &theirs)
            .args(&args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        theirs.settle();
        their_runs.push((theirs.sessions() - sessions, theirs.bytes_written() - bytes));
    }
    println!("flash: app + 2 NVS images into the emulator (ESP32-C3, ROM loader)");
    println!(
        "  {:<28} {:>22} {:>26}",
        "", "cargo nvs flash", "espflash, then esptool"
    );
    for (i, label) in ["first flash", "re-flash, nothing changed"]
        .iter()
        .enumerate()
    {
        let ((oc, ob), (tc, tb)) = (our_runs[i], their_runs[i]);
        println!("  {label:<28} {oc:>3} connection(s) {ob:>7} B {tc:>6} connection(s) {tb:>8} B");
    }
    let connections = |runs: &[(u32, u64)]| runs.iter().map(|r| r.0).sum::<u32>();
    println!(
        "  connections over both runs: {} vs {} ({:.1}x fewer); bytes written on the re-flash: {} vs {}",
        connections(&our_runs),
        connections(&their_runs),
        f64::from(connections(&their_runs)) / f64::from(connections(&our_runs).max(1)),
        our_runs[1].1,
        their_runs[1].1
    );
}

/// `cargo xtask bench wire`: `cargo nvs flash --baud 921600` of the firmware example into the
/// emulator with wire time on, elapsed time against the wire limit (Σ bytes × 10 / baud over
/// both directions, from the emulator's counters). Prints figures only.
#[test]
#[ignore = "a benchmark: cargo xtask bench wire"]
fn wire_time_benchmark() {
    use crate::support::fake_esp::Wire;
    const BAUD: &str = "921600";
    let per_baud = |bytes: &std::collections::BTreeMap<u32, u64>| {
        bytes
            .iter()
            .map(|(baud, n)| format!("{n} B @{baud}"))
            .collect::<Vec<_>>()
            .join(" + ")
    };
    // A no-op build first, so that the timed runs find the firmware built.
    release_out_dir();
    println!(
        "wire: `cargo nvs flash --baud {BAUD}` of the firmware example (bootloader, table, app, \
         NVS images) into the emulator (ESP32-C3) with wire time on"
    );
    for (label, extra) in [
        ("ROM loader (--no-stub)", &["--no-stub"][..]),
        ("flasher stub (deflate)", &[][..]),
    ] {
        let esp = Config::esp32c3().wire_time(true).start();
        let mut args = vec!["--baud", BAUD];
        args.extend_from_slice(extra);
        let start = std::time::Instant::now();
        let out = run(&esp, "flash", &args);
        let command = start.elapsed().as_secs_f64();
        assert_ok(&out);
        let wire: Wire = esp.wire();
        let limit = wire.seconds();
        let on_wire = wire.active.map_or(0.0, |d| d.as_secs_f64());
        println!("  {label}");
        println!("    in:  {}", per_baud(&wire.received));
        println!("    out: {}", per_baud(&wire.sent));
        println!(
            "    wire limit {:.3} s (clocks scheduled {:.3} s); on the wire (first byte to last) \
             {:.3} s = {:.2}x the limit; whole command {:.3} s = {:.2}x",
            limit,
            wire.clock_seconds(),
            on_wire,
            on_wire / limit,
            command,
            command / limit
        );
    }
}

/// Writes segments the way `espflash write-bin`/`flash` would, through espflash's library.
fn espflash_write(esp: &FakeEsp, segments: &[&(u32, Vec<u8>)]) {
    use espflash::connection::{Connection, ResetAfterOperation, ResetBeforeOperation};
    use espflash::flasher::Flasher;
    use espflash::image_format::Segment;
    use espflash::target::DefaultProgressCallback;
    let info = serialport::UsbPortInfo {
        vid: 0,
        pid: 0,
        serial_number: None,
        manufacturer: None,
        product: None,
    };
    let connection = Connection::new(
        esp.open_port(),
        info,
        ResetAfterOperation::NoReset,
        ResetBeforeOperation::NoReset,
        115_200,
    );
    let mut flasher = Flasher::connect(connection, false, true, true, None, None).unwrap();
    let segments: Vec<Segment<'_>> = segments
        .iter()
        .map(|(offset, data)| Segment::new(*offset, data))
        .collect();
    flasher
        .write_bins_to_flash(&segments, &mut DefaultProgressCallback)
        .unwrap();
    drop(flasher);
    esp.settle();
}

/// esptool's `write-flash` into the emulator `esp` (ROM loader, no resets); the files follow.
fn esptool_write_flash(
    esptool: impl AsRef<std::ffi::OsStr>,
    esp: &FakeEsp,
) -> std::process::Command {
    let mut command = std::process::Command::new(esptool);
    command.args(["--chip", "esp32c3", "--port", esp.path()]);
    command.args([
        "--before",
        "no-reset",
        "--after",
        "no-reset",
        "--no-stub",
        "write-flash",
    ]);
    command
}
