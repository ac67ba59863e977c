//! `cargo nvs mfg generate --values devices.csv --id COLUMN`: mass production from the package's
//! Cargo metadata (the ESP32-C3 firmware example), each device's image the one `cargo nvs
//! generate` makes with the `per-device` keys set to that device's row.

use crate::support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use crate::support::{Case, assert_ok, bin, stderr};
use nvs_build::metadata::Metadata;
use nvs_build::resolve::{Inputs, PartitionImage, build_partition};

/// The firmware's `DEVICE_NAME` env source, fixed so the images do not depend on the caller.
const DEVICE_NAME: &str = "mfg-cargo-test";

fn firmware() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/esp32c3-factory-data/Cargo.toml")
}

/// Runs `cargo nvs mfg generate --manifest-path <firmware> ARGS…` in the case's folder. The
/// ledger is the case's `ledger.sqlite` (`NVS_LEDGER`), never the default beside the committed
/// firmware's Cargo.toml.
fn mfg(case: &Case, args: &[&str]) -> Output {
    let manifest = firmware();
    bin()
        .args(["nvs", "mfg", "generate", "--manifest-path"])
        .arg(&manifest)
        .args(args)
        .env("DEVICE_NAME", DEVICE_NAME)
        .env("NVS_LEDGER", case.dir.path().join("ledger.sqlite"))
        .current_dir(case.dir.path())
        .output()
        .unwrap()
}

/// The common run: `devices.csv`, ids from `serial`, output in `out/`.
fn mfg_devices(case: &Case) -> Output {
    mfg_devices_into(case, "out", &[])
}

/// `devices.csv`, ids from `serial`, output in `out_dir`, then `extra`.
fn mfg_devices_into(case: &Case, out_dir: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "--values",
        "devices.csv",
        "--id",
        "serial",
        "--out-dir",
        out_dir,
    ];
    args.extend_from_slice(extra);
    mfg(case, &args)
}

/// The run failed naming every needle, and `out_dir` holds nothing.
#[track_caller]
fn assert_refused(case: &Case, out: &Output, out_dir: &str, needles: &[&str]) {
    let text = stderr(out);
    assert!(!out.status.success(), "expected failure; stderr: {text}");
    assert!(!text.contains("panicked"), "{text}");
    for needle in needles {
        assert!(text.contains(needle), "stderr lacks {needle:?}:\n{text}");
    }
    if let Ok(entries) = std::fs::read_dir(case.dir.path().join(out_dir)) {
        let names: Vec<_> = entries.map(|e| e.unwrap().file_name()).collect();
        assert!(names.is_empty(), "{out_dir}/ holds {names:?}:\n{text}");
    }
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn env(var: &str) -> Option<String> {
    if var == "DEVICE_NAME" {
        Some(DEVICE_NAME.into())
    } else {
        std::env::var(var).ok()
    }
}

/// The image nvs-build's API makes of `partition` with the per-device columns set to `columns`
/// (`None`: the `dev` values, as `cargo nvs generate` and build.rs use).
fn expected(partition: &str, columns: Option<&HashMap<&str, &str>>) -> Vec<u8> {
    let metadata = Metadata::from_manifest(&firmware()).unwrap().unwrap();
    let spec = metadata
        .partitions
        .iter()
        .find(|p| p.name == partition)
        .unwrap();
    let mut inputs = Inputs::new(env);
    if let Some(columns) = columns {
        inputs = inputs.with_per_device(|c| columns.get(c).map(|v| v.to_string()));
    }
    match build_partition(spec, &metadata.manifest_dir, &mut inputs).unwrap() {
        PartitionImage::Built(built) => built.bytes,
        PartitionImage::Skipped { reason } => panic!("skipped: {reason}"),
    }
}

/// `cargo nvs dump --format json` of an image: `key → value`.
fn dump(image: &Path) -> HashMap<String, serde_json::Value> {
    let out = bin()
        .args(["nvs", "dump", "--format", "json"])
        .arg(image)
        .output()
        .unwrap();
    assert_ok(&out);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["damaged"], false);
    json["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| {
            (
                format!(
                    "{}/{}",
                    item["namespace"].as_str().unwrap(),
                    item["key"].as_str().unwrap()
                ),
                item["value"].clone(),
            )
        })
        .collect()
}

const DEVICES: [(&str, &str); 4] = [
    ("1001", "alpha-secret"),
    ("1002", "be,ta \"quoted\""),
    ("1003", ""),
    ("4294967295", "max-serial"),
];

fn devices_csv() -> String {
    let mut csv = String::from("batch,serial,secret\n");
    for (serial, secret) in DEVICES {
        csv.push_str(&format!(
            "b1,{serial},\"{}\"\n",
            secret.replace('"', "\"\"")
        ));
    }
    csv
}

#[test]
fn every_device_gets_the_metadata_image_with_its_own_values() {
    let case = Case::new();
    case.file("devices.csv", devices_csv());
    let out = mfg_devices_into(&case, "out", &["--all-partitions"]);
    assert_ok(&out);
    let dir = case.dir.path().join("out");

    // The expected images are built as `cargo nvs generate` builds them: with the dev values,
    // that builder gives exactly its files.
    let generated = case.dir.path().join("gen");
    let out = bin()
        .args(["nvs", "generate", "--manifest-path"])
        .arg(firmware())
        .arg("--out-dir")
        .arg(&generated)
        .env("DEVICE_NAME", DEVICE_NAME)
        .output()
        .unwrap();
    assert_ok(&out);
    assert_eq!(read(&generated.join("fctry.bin")), expected("fctry", None));
    let dev_dump = dump(&generated.join("fctry.bin"));

    for (line, (serial, secret)) in DEVICES.iter().enumerate() {
        let columns = HashMap::from([("serial", *serial), ("secret", *secret), ("batch", "b1")]);
        let image = dir.join(format!("bin/fctry-{serial}.bin"));
        assert_eq!(
            read(&image),
            expected("fctry", Some(&columns)),
            "device {serial} (line {})",
            line + 2
        );
        // Read back: the per-device keys hold the row's values, every other key the dev build's.
        let items = dump(&image);
        assert_eq!(items["mass_prod/serial"], serial.parse::<u64>().unwrap());
        assert_eq!(items["mass_prod/DeviceSecret"], *secret);
        assert_eq!(items["mass_prod/DeviceName"], DEVICE_NAME);
        assert_eq!(items.len(), dev_dump.len());
        for (key, value) in &dev_dump {
            if key != "mass_prod/serial" && key != "mass_prod/DeviceSecret" {
                assert_eq!(&items[key], value, "{key}");
            }
        }
    }
    // The partition without per-device keys is the same for everyone: written once.
    assert_eq!(
        read(&dir.join("bin/nvs.bin")),
        read(&generated.join("nvs.bin"))
    );
    let mut names: Vec<String> = std::fs::read_dir(dir.join("bin"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "fctry-1001.bin",
            "fctry-1002.bin",
            "fctry-1003.bin",
            "fctry-4294967295.bin",
            "nvs.bin"
        ]
    );

    // Manifests: one row per device image, with its SHA-256; the table's offsets and sizes.
    let csv = String::from_utf8(read(&dir.join("manifest.csv"))).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "device,line,partition,image,sha256");
    assert_eq!(lines.len(), 1 + DEVICES.len());
    assert!(
        lines[2].starts_with("1002,3,fctry,bin/fctry-1002.bin,"),
        "{csv}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&read(&dir.join("manifest.json"))).unwrap();
    assert_eq!(json["package"], "esp32c3-factory-data");
    let fctry = &json["partitions"][0];
    assert_eq!(
        (
            &fctry["name"],
            &fctry["offset"],
            &fctry["size"],
            &fctry["per_device"]
        ),
        (
            &"fctry".into(),
            &0xf000.into(),
            &0x2000.into(),
            &true.into()
        )
    );
    assert_eq!(json["shared"][0]["image"], "bin/nvs.bin");
    assert_eq!(json["devices"].as_array().unwrap().len(), DEVICES.len());
    assert_eq!(json["devices"][3]["device"], "4294967295");
    assert_eq!(json["devices"][3]["line"], 5);

    // The ledger records every device by its id, with the image's SHA-256.
    assert!(!dir.join("ledger.sqlite").exists());
    let ledger = rusqlite::Connection::open(case.dir.path().join("ledger.sqlite")).unwrap();
    let rows: Vec<(String, String, String, u32)> = ledger
        .prepare("SELECT device, image, sha256, size FROM devices ORDER BY line")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(rows.len(), DEVICES.len());
    for ((device, image, sha256, size), (serial, _)) in rows.iter().zip(DEVICES) {
        assert_eq!(device, serial);
        assert_eq!(image, &format!("bin/fctry-{serial}.bin"));
        assert_eq!(*size, 0x2000);
        assert!(csv.contains(sha256.as_str()), "{sha256} not in {csv}");
    }
}

#[test]
fn by_default_only_partitions_with_per_device_keys_are_built() {
    let case = Case::new();
    case.file("devices.csv", "serial,secret\n7,a\n8,b\n9,c\n");
    let out = mfg_devices_into(&case, "o", &[]);
    assert_ok(&out);
    let mut names: Vec<String> = std::fs::read_dir(case.dir.path().join("o/bin"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["fctry-7.bin", "fctry-8.bin", "fctry-9.bin"]);

    // A partition without per-device keys alone is not mass production.
    let out = mfg_devices_into(&case, "p", &["--partition", "nvs"]);
    assert_refused(&case, &out, "p", &["has per-device keys", "nvs"]);
    let out = mfg_devices_into(&case, "p", &["--partition", "nope"]);
    assert_refused(&case, &out, "p", &["--partition `nope`", "fctry, nvs"]);
}

#[test]
fn a_missing_per_device_column_is_refused_naming_the_header_and_key() {
    let case = Case::new();
    case.file("devices.csv", "serial,secrets\n1,a\n2,b\n");
    let out = mfg_devices(&case);
    assert_refused(
        &case,
        &out,
        "out",
        &[
            "devices.csv:1",
            "no column `secret`",
            "`DeviceSecret`",
            "`fctry`",
            "Cargo.toml:",
        ],
    );
    assert!(!case.exists("out"));
}

#[test]
fn values_that_do_not_fit_are_refused_naming_the_row_device_and_column() {
    let case = Case::new();
    // Line 4 (after a blank line, which is skipped): out of range for u32.
    case.file("devices.csv", "serial,secret\n1,a\n\n4294967296,b\n3,c\n");
    let out = mfg_devices(&case);
    assert_refused(
        &case,
        &out,
        "out",
        &[
            "devices.csv:4",
            "device `4294967296`",
            "column `serial`",
            "key `serial`",
            "out of range for u32",
        ],
    );
    // Not a number at all.
    case.file("devices.csv", "id,serial,secret\nA,1,a\nB,two,b\n");
    let out = mfg(
        &case,
        &["--values", "devices.csv", "--id", "id", "--out-dir", "out"],
    );
    assert_refused(
        &case,
        &out,
        "out",
        &["devices.csv:3", "device `B`", "column `serial`"],
    );
    // Too long for the 0x2000 factory partition.
    let long = "x".repeat(3960);
    case.file("devices.csv", format!("serial,secret\n1,a\n2,{long}\n"));
    let out = mfg_devices(&case);
    assert_refused(
        &case,
        &out,
        "out",
        &[
            "devices.csv:3",
            "device `2`",
            "partition `fctry`",
            "too small",
            "`secret`",
        ],
    );
    let long = "x".repeat(5000);
    case.file("devices.csv", format!("serial,secret\n1,a\n2,{long}\n"));
    let out = mfg_devices(&case);
    assert_refused(
        &case,
        &out,
        "out",
        &["devices.csv:3", "column `secret`", "5000 bytes"],
    );
    assert!(!case.exists("out"));
}

#[test]
fn ids_are_required_present_and_unique() {
    let case = Case::new();
    case.file("devices.csv", "serial,secret\n1,a\n2,b\n");
    let out = mfg(&case, &["--values", "devices.csv", "--out-dir", "out"]);
    assert_refused(
        &case,
        &out,
        "out",
        &["--id COLUMN", "unique across batches"],
    );
    let out = mfg(
        &case,
        &["--values", "devices.csv", "--id", "sn", "--out-dir", "out"],
    );
    assert_refused(&case, &out, "out", &["devices.csv:1", "--id column `sn`"]);
    case.file("devices.csv", "serial,secret\n1,a\n2,b\n1,c\n");
    let out = mfg_devices(&case);
    assert_refused(
        &case,
        &out,
        "out",
        &["devices.csv:4", "`1` is already used at line 2"],
    );
    // mfg_gen's options do not mix with the metadata mode.
    let out = mfg_devices_into(&case, "out", &["--keygen"]);
    assert_refused(&case, &out, "out", &["--keygen", "metadata"]);
    assert!(!case.exists("out"));
}

#[test]
fn the_ledger_refuses_an_id_issued_by_an_earlier_batch() {
    let case = Case::new();
    case.file("batch1.csv", "serial,secret\n10,a\n11,b\n12,c\n");
    case.file("batch2.csv", "serial,secret\n13,d\n11,e\n");
    let out = mfg(
        &case,
        &[
            "--values",
            "batch1.csv",
            "--id",
            "serial",
            "--out-dir",
            "one",
        ],
    );
    assert_ok(&out);
    // Another out dir, the same (product's) ledger.
    let mut args = vec![
        "--values",
        "batch2.csv",
        "--id",
        "serial",
        "--out-dir",
        "two",
    ];
    let out = mfg(&case, &args);
    assert_refused(
        &case,
        &out,
        "two",
        &[
            "batch2.csv:3",
            "device `11` was already issued",
            "batch1.csv:3",
            "--allow-reissue",
        ],
    );
    assert!(!stderr(&out).contains("`13`"), "{}", stderr(&out));
    assert!(!case.exists("two"));
    // Reissuing on purpose replaces the ledger entry.
    args.push("--allow-reissue");
    let out = mfg(&case, &args);
    assert_ok(&out);
    let ledger = rusqlite::Connection::open(case.dir.path().join("ledger.sqlite")).unwrap();
    let (values, issues): (String, i64) = ledger
        .query_row(
            "SELECT values_file, issues FROM devices WHERE device = '11'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((values.as_str(), issues), ("batch2.csv", 2));
    let count: i64 = ledger
        .query_row("SELECT count(*) FROM devices", [], |r| r.get(0))
        .unwrap();
    assert_eq!(count, 4);
}

#[test]
fn existing_images_are_kept_only_by_resume_with_the_same_values() {
    let case = Case::new();
    case.file("devices.csv", "serial,secret\n20,a\n21,b\n22,c\n");
    let args = [
        "--values",
        "devices.csv",
        "--id",
        "serial",
        "--out-dir",
        "out",
    ];
    assert_ok(&mfg(&case, &args));
    let before = read(&case.dir.path().join("out/bin/fctry-21.bin"));

    // Simulate an interruption after device 21: its successor's image and the manifests are gone.
    std::fs::remove_file(case.dir.path().join("out/bin/fctry-22.bin")).unwrap();
    std::fs::remove_file(case.dir.path().join("out/manifest.csv")).unwrap();
    let ledger = rusqlite::Connection::open(case.dir.path().join("ledger.sqlite")).unwrap();
    ledger
        .execute("DELETE FROM devices WHERE device = '22'", [])
        .unwrap();
    drop(ledger);

    let out = mfg(&case, &args);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("already exists"), "{}", stderr(&out));

    let mut resume = args.to_vec();
    resume.push("--resume");
    let out = mfg(&case, &resume);
    assert_ok(&out);
    assert!(
        stderr(&out).contains("2 device(s) were finished by an earlier run"),
        "{}",
        stderr(&out)
    );
    assert_eq!(read(&case.dir.path().join("out/bin/fctry-21.bin")), before);
    let columns = HashMap::from([("serial", "22"), ("secret", "c")]);
    assert_eq!(
        read(&case.dir.path().join("out/bin/fctry-22.bin")),
        expected("fctry", Some(&columns))
    );
    let csv = String::from_utf8(read(&case.dir.path().join("out/manifest.csv"))).unwrap();
    assert_eq!(csv.lines().count(), 4, "{csv}");

    // Other values than the kept image was made from: refused.
    case.file("devices.csv", "serial,secret\n20,a\n21,CHANGED\n22,c\n");
    let out = mfg(&case, &resume);
    assert!(!out.status.success());
    let text = stderr(&out);
    assert!(
        text.contains("devices.csv:3") && text.contains("other values"),
        "{text}"
    );
}

#[test]
#[cfg(unix)] // the emulator needs a pty
fn mfg_flash_writes_the_ledgers_image_into_the_factory_partition() {
    use support::fake_esp::Config;
    let case = Case::new();
    case.file("devices.csv", "serial,secret\n31,a\n32,b\n33,c\n");
    assert_ok(&mfg_devices(&case));
    let esp = Config::esp32c3()
        .mac([0x7c, 0xdf, 0xa1, 0, 0, 0x31])
        .start();
    let before = esp.flash();
    let table = firmware().with_file_name("partitions.csv");
    let out = bin()
        .args([
            "mfg",
            "flash",
            "--out-dir",
            "out",
            "--next",
            "--partition-table",
        ])
        .arg(&table)
        .args(["--partition", "fctry", "--port", esp.path()])
        .args(["--before", "no-reset", "--after", "no-reset", "--no-stub"])
        .current_dir(case.dir.path())
        .output()
        .unwrap();
    esp.settle();
    assert_ok(&out);
    // A read-only image holds only the pages it uses; the flash gets it padded with 0xFF.
    let mut image = read(&case.dir.path().join("out/bin/fctry-31.bin"));
    image.resize(0x2000, 0xFF);
    assert!(
        esp.read(0xf000, 0x2000) == image,
        "fctry holds another image"
    );
    let changed: Vec<_> = esp
        .changed_since(&before)
        .into_iter()
        .filter(|r| r.start < 0xf000 || r.end > 0xf000 + 0x2000)
        .collect();
    assert!(changed.is_empty(), "{changed:?}");
}

#[test]
#[cfg(unix)] // the emulator needs a pty
fn a_throwaway_crate_with_two_per_device_partitions() {
    let case = Case::new();
    std::fs::create_dir_all(case.dir.path().join("fw/src")).unwrap();
    case.file("fw/src/main.rs", "fn main() {}\n");
    case.file(
        "fw/partitions.csv",
        "nvs, data, nvs, 0x9000, 0x6000,\nfa, data, nvs, 0xf000, 0x3000,\nfb, data, nvs, 0x12000, 0x3000,\nfactory, app, factory, 0x20000, 1M,\n",
    );
    case.file(
        "fw/Cargo.toml",
        r#"[package]
name = "fw"
version = "0.1.0"
edition = "2024"

[workspace]

[package.metadata.nvs.partitions.fa.namespaces.a]
sn = { string = { per-device = "sn", dev = "dev" } }
n = { i16 = { per-device = "n" } }

[package.metadata.nvs.partitions.fb.namespaces.b]
fixed = { u8 = 7 }
sn = { string = { per-device = "sn", dev = "dev" } }

[package.metadata.nvs.partitions.nvs.namespaces.user]
ssid = ""
"#,
    );
    case.file("devices.csv", "sn,n\nA1,-5\nA2,300\nA3,0\n");
    let out = bin()
        .args(["mfg", "generate", "--manifest-path", "fw/Cargo.toml"])
        .args(["--values", "devices.csv", "--id", "sn", "--out-dir", "out"])
        .current_dir(case.dir.path())
        .output()
        .unwrap();
    assert_ok(&out);
    let metadata = Metadata::from_manifest(&case.dir.path().join("fw/Cargo.toml"))
        .unwrap()
        .unwrap();
    for (sn, n) in [("A1", "-5"), ("A2", "300"), ("A3", "0")] {
        for part in ["fa", "fb"] {
            let spec = metadata.partitions.iter().find(|p| p.name == part).unwrap();
            let columns = HashMap::from([("sn", sn), ("n", n)]);
            let mut inputs =
                Inputs::new(|_| None).with_per_device(|c| columns.get(c).map(|v| v.to_string()));
            let PartitionImage::Built(built) =
                build_partition(spec, &metadata.manifest_dir, &mut inputs).unwrap()
            else {
                panic!("skipped")
            };
            let path = case.dir.path().join(format!("out/bin/{part}-{sn}.bin"));
            assert_eq!(read(&path), built.bytes, "{part}-{sn}");
        }
    }
    assert!(
        !case.exists("out/bin/nvs.bin"),
        "only per-device partitions by default"
    );
    let csv = String::from_utf8(read(&case.dir.path().join("out/manifest.csv"))).unwrap();
    assert_eq!(csv.lines().count(), 1 + 6, "{csv}");
    assert!(csv.contains("\nA2,3,fb,bin/fb-A2.bin,"), "{csv}");
    // The package's ledger, beside its Cargo.toml, records each device once, with every image's
    // SHA-256 (as in the manifest).
    assert!(!case.exists("out/ledger.sqlite"));
    let ledger = rusqlite::Connection::open(case.dir.path().join("fw/nvs-ledger.sqlite")).unwrap();
    let image: String = ledger
        .query_row("SELECT image FROM devices WHERE device = 'A2'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(image, "bin/fa-A2.bin");
    let (other, other_sha): (String, String) = ledger
        .query_row(
            "SELECT image, sha256 FROM device_images WHERE device = 'A2' AND idx = 0",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(other, "bin/fb-A2.bin");
    assert!(
        csv.contains(&format!("\nA2,3,fb,bin/fb-A2.bin,{other_sha}\n")),
        "{csv}"
    );
    drop(ledger);
    // --resume keeps a device only when every image is as recorded: a second image changed
    // since is refused, not kept.
    let fb = case.dir.path().join("out/bin/fb-A3.bin");
    let original = read(&fb);
    let mut tampered = original.clone();
    tampered[100] ^= 1;
    std::fs::write(&fb, &tampered).unwrap();
    let out = bin()
        .args(["mfg", "generate", "--manifest-path", "fw/Cargo.toml"])
        .args(["--values", "devices.csv", "--id", "sn", "--out-dir", "out"])
        .arg("--resume")
        .current_dir(case.dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success(), "a changed image was kept");
    assert!(
        stderr(&out).contains("`A3` was already issued"),
        "{}",
        stderr(&out)
    );
    std::fs::write(&fb, &original).unwrap();
    // A second run with --resume keeps everything; a value changed since is caught.
    let rerun = |values: &str| {
        case.file("devices.csv", values);
        bin()
            .args(["mfg", "generate", "--manifest-path", "fw/Cargo.toml"])
            .args([
                "--values",
                "devices.csv",
                "--id",
                "sn",
                "--out-dir",
                "out",
                "--resume",
            ])
            .current_dir(case.dir.path())
            .output()
            .unwrap()
    };
    assert_ok(&rerun("sn,n\nA1,-5\nA2,300\nA3,0\n"));
    let out = rerun("sn,n\nA1,-5\nA2,301\nA3,0\n");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("devices.csv:3"), "{}", stderr(&out));
    // i16 range, named by row and column.
    case.file("devices.csv", "sn,n\nB1,40000\n");
    let out = bin()
        .args(["mfg", "generate", "--manifest-path", "fw/Cargo.toml"])
        .args([
            "--values",
            "devices.csv",
            "--id",
            "sn",
            "--out-dir",
            "other",
        ])
        .current_dir(case.dir.path())
        .output()
        .unwrap();
    assert_refused(
        &case,
        &out,
        "other",
        &[
            "devices.csv:2",
            "device `B1`",
            "column `n`",
            "out of range for i16",
        ],
    );

    // Flashing with the package's table: both of the next device's images, each padded over
    // its own partition, in one connection; nothing else changes.
    use support::fake_esp::Config;
    let esp = Config::esp32c3()
        .mac([0x7c, 0xdf, 0xa1, 0, 0, 0x41])
        .start();
    let before = esp.flash();
    let flash_next = |out_dir: &str| {
        let out = bin()
            .args(["mfg", "flash", "--out-dir", out_dir, "--next"])
            .args(["--manifest-path", "fw/Cargo.toml", "--port", esp.path()])
            .args(["--before", "no-reset", "--after", "no-reset", "--no-stub"])
            .current_dir(case.dir.path())
            .output()
            .unwrap();
        esp.settle();
        out
    };
    assert_ok(&flash_next("out"));
    for (part, offset) in [("fa", 0xf000), ("fb", 0x12000)] {
        let mut image = read(&case.dir.path().join(format!("out/bin/{part}-A1.bin")));
        image.resize(0x3000, 0xFF);
        assert!(
            esp.read(offset, 0x3000) == image,
            "{part} holds another image"
        );
    }
    let changed: Vec<_> = esp
        .changed_since(&before)
        .into_iter()
        .filter(|r| !(r.start >= 0xf000 && r.end <= 0xf000 + 0x6000))
        .collect();
    assert!(changed.is_empty(), "{changed:?}");
    // A ledger that lists only the first image (as before schema 2) is refused, not half
    // flashed.
    let ledger = rusqlite::Connection::open(case.dir.path().join("fw/nvs-ledger.sqlite")).unwrap();
    ledger
        .execute("DELETE FROM device_images WHERE device = 'A2'", [])
        .unwrap();
    drop(ledger);
    let out = flash_next("out");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("fb-A2.bin` exists but the ledger does not list it"),
        "{}",
        stderr(&out)
    );
    // A batch named by prefix (mfg_gen's form) has no partitions to go by.
    case.file("conf.csv", "a,namespace,\nsn,data,string\n");
    case.file("vals.csv", "sn\nZ1\n");
    assert_ok(
        &bin()
            .args(["mfg", "generate", "conf.csv", "vals.csv", "dev", "0x3000"])
            .args(["--fileid", "sn", "--out-dir", "plain"])
            .current_dir(case.dir.path())
            .output()
            .unwrap(),
    );
    let out = flash_next("plain");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("give --offset, or --partition-table and --partition"),
        "{}",
        stderr(&out)
    );
}

/// A throwaway firmware package `fw/` in the case's folder with one per-device partition
/// (`fctry`, 0x3000 at 0xf000, key `sn` from the column `sn`), `mfg` after its [workspace].
fn product_crate(case: &Case, mfg: &str) {
    std::fs::create_dir_all(case.dir.path().join("fw/src")).unwrap();
    case.file("fw/src/main.rs", "fn main() {}\n");
    case.file(
        "fw/partitions.csv",
        "nvs, data, nvs, 0x9000, 0x6000,\nfctry, data, nvs, 0xf000, 0x3000,\nfactory, app, factory, 0x20000, 1M,\n",
    );
    case.file(
        "fw/Cargo.toml",
        format!(
            "[package]\nname = \"fw\"\nversion = \"0.1.0\"\nedition = \"2024\"\n\n[workspace]\n{mfg}\n\
             [package.metadata.nvs.partitions.fctry.namespaces.f]\n\
             sn = {{ string = {{ per-device = \"sn\", dev = \"dev\" }} }}\n"
        ),
    );
}

/// `mfg generate --manifest-path fw/Cargo.toml --values VALUES --id sn --out-dir OUT EXTRA…`,
/// with `NVS_LEDGER` set to `env` if given.
fn fw_batch(case: &Case, values: &str, out_dir: &str, extra: &[&str], env: Option<&str>) -> Output {
    let mut command = bin();
    command
        .args(["mfg", "generate", "--manifest-path", "fw/Cargo.toml"])
        .args(["--values", values, "--id", "sn", "--out-dir", out_dir])
        .args(extra)
        .current_dir(case.dir.path());
    if let Some(env) = env {
        command.env("NVS_LEDGER", env);
    }
    command.output().unwrap()
}

fn ledger_ids(path: &Path) -> Vec<String> {
    support::ledger_devices(path)
        .into_iter()
        .map(|r| r.0)
        .collect()
}

#[test]
fn the_package_ledger_is_beside_cargo_toml_unless_the_metadata_or_the_environment_moves_it() {
    let case = Case::new();
    product_crate(&case, "");
    case.file("devices1.csv", "sn\nS1\nS2\n");
    case.file("devices2.csv", "sn\nS3\nS2\n");
    let dir = case.dir.path();

    // The default: nvs-ledger.sqlite beside Cargo.toml (not in the out dir, not in target/).
    assert_ok(&fw_batch(&case, "devices1.csv", "b1", &[], None));
    let default = dir.join("fw/nvs-ledger.sqlite");
    assert_eq!(ledger_ids(&default), ["S1", "S2"]);
    assert!(!case.exists("b1/ledger.sqlite") && !case.exists("fw/target"));
    let json: serde_json::Value =
        serde_json::from_slice(&read(&dir.join("b1/manifest.json"))).unwrap();
    assert_eq!(
        Path::new(json["ledger"].as_str().unwrap()),
        default.canonicalize().unwrap()
    );

    // A second batch into another out dir with an id of the first: refused, nothing written.
    let out = fw_batch(&case, "devices2.csv", "b2", &[], None);
    let b1 = dir.join("b1").canonicalize().unwrap();
    assert_refused(
        &case,
        &out,
        "b2",
        &[
            "devices2.csv:3: device `S2` was already issued",
            &format!("into `{}`", b1.display()),
            "devices1.csv:3",
            "fw/nvs-ledger.sqlite",
            "--allow-reissue",
        ],
    );
    assert!(!stderr(&out).contains("`S3`"), "{}", stderr(&out));
    assert!(!case.exists("b2"));
    assert_eq!(ledger_ids(&default), ["S1", "S2"]);

    // [package.metadata.nvs.mfg] ledger moves it (relative to Cargo.toml's folder).
    std::fs::create_dir_all(dir.join("factory")).unwrap();
    product_crate(
        &case,
        "\n[package.metadata.nvs.mfg]\nledger = \"../factory/ids.sqlite\"\n",
    );
    assert_ok(&fw_batch(&case, "devices2.csv", "b2", &[], None));
    assert_eq!(ledger_ids(&dir.join("factory/ids.sqlite")), ["S2", "S3"]);
    assert_eq!(ledger_ids(&default), ["S1", "S2"]);

    // NVS_LEDGER beats the metadata, --ledger beats NVS_LEDGER.
    assert_ok(&fw_batch(
        &case,
        "devices1.csv",
        "b3",
        &[],
        Some("env.sqlite"),
    ));
    assert_eq!(ledger_ids(&dir.join("env.sqlite")), ["S1", "S2"]);
    let flag = ["--ledger", "flag.sqlite"];
    assert_ok(&fw_batch(
        &case,
        "devices1.csv",
        "b4",
        &flag,
        Some("env.sqlite"),
    ));
    assert_eq!(ledger_ids(&dir.join("flag.sqlite")), ["S1", "S2"]);
    assert_eq!(ledger_ids(&dir.join("factory/ids.sqlite")), ["S2", "S3"]);

    // A setting that is not a path: refused naming Cargo.toml and the key.
    product_crate(&case, "\n[package.metadata.nvs.mfg]\nledger = 5\n");
    let out = fw_batch(&case, "devices1.csv", "b5", &[], None);
    assert_refused(
        &case,
        &out,
        "b5",
        &[
            "fw/Cargo.toml:9:10",
            "`package.metadata.nvs.mfg.ledger` must be a string",
        ],
    );
    assert!(!case.exists("b5"));
    // And an unknown key (a typo would silently use the default).
    product_crate(&case, "\n[package.metadata.nvs.mfg]\nleger = \"x\"\n");
    let out = fw_batch(&case, "devices1.csv", "b5", &[], None);
    assert_refused(
        &case,
        &out,
        "b5",
        &["fw/Cargo.toml:9:1", "unknown field `leger`"],
    );
}

#[test]
#[cfg(unix)] // the emulator needs a pty
fn mfg_flash_and_log_in_the_package_use_its_ledger_and_every_batch_on_disk() {
    use support::fake_esp::Config;
    let case = Case::new();
    product_crate(&case, "");
    case.file("a.csv", "sn\nA1\n");
    case.file("b.csv", "sn\nB1\nB2\n");
    assert_ok(&fw_batch(&case, "a.csv", "a", &[], None));
    assert_ok(&fw_batch(&case, "b.csv", "b", &[], None));
    // Batch a's folder is gone: its device is skipped, b's first is next.
    std::fs::rename(
        case.dir.path().join("a"),
        case.dir.path().join("a-elsewhere"),
    )
    .unwrap();
    let esp = Config::esp32c3()
        .mac([0x7c, 0xdf, 0xa1, 0, 0, 0x51])
        .start();
    let out = bin()
        .args(["mfg", "flash", "--next", "--manifest-path", "fw/Cargo.toml"])
        .args(["--port", esp.path()])
        .args(["--before", "no-reset", "--after", "no-reset", "--no-stub"])
        .current_dir(case.dir.path())
        .output()
        .unwrap();
    esp.settle();
    assert_ok(&out);
    let text = stderr(&out);
    assert!(
        text.contains("batch folder") && text.contains("is missing") && text.contains("B1"),
        "{text}"
    );
    let mut image = read(&case.dir.path().join("b/bin/fctry-B1.bin"));
    image.resize(0x3000, 0xFF);
    assert!(
        esp.read(0xf000, 0x3000) == image,
        "fctry holds another image"
    );
    // The log of the package's ledger.
    let out = bin()
        .args(["mfg", "log", "--manifest-path", "fw/Cargo.toml"])
        .current_dir(case.dir.path())
        .output()
        .unwrap();
    assert_ok(&out);
    let log = String::from_utf8(out.stdout).unwrap();
    assert_eq!(log.lines().count(), 2, "{log}");
    assert!(log.contains(",B1,"), "{log}");
    // Outside any package (the case's folder is inside this workspace), with nothing naming a
    // ledger: said how to name one.
    let outside = std::env::temp_dir().join(format!("cargo-nvs-no-package-{}", std::process::id()));
    std::fs::create_dir_all(&outside).unwrap();
    let out = bin()
        .args(["mfg", "log"])
        .current_dir(&outside)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&outside);
    assert!(!out.status.success());
    let text = stderr(&out);
    assert!(
        text.contains("--ledger") && text.contains("NVS_LEDGER") && text.contains("--out-dir"),
        "{text}"
    );
}

#[cfg(unix)] // the emulator needs a pty
/// The firmware's table with `fctry` moved (where another version of it might put it).
const MOVED_TABLE: &str = "nvs, data, nvs, 0x9000, 0x6000,\nphy_init, data, phy, 0xf000, 0x1000,\n\
    fctry, data, nvs, 0x10000, 0x2000, readonly\nfactory, app, factory, 0x20000, 1M,\n";

#[cfg(unix)] // the emulator needs a pty
/// `mfg flash --next` of the firmware's package, with `extra`, onto `esp`.
fn mfg_flash_next(case: &Case, esp: &support::fake_esp::FakeEsp, extra: &[&str]) -> Output {
    let out = bin()
        .args([
            "mfg",
            "flash",
            "--out-dir",
            "out",
            "--next",
            "--manifest-path",
        ])
        .arg(firmware())
        .args(extra)
        .args(["--port", esp.path()])
        .args(["--before", "no-reset", "--after", "no-reset", "--no-stub"])
        .current_dir(case.dir.path())
        .output()
        .unwrap();
    esp.settle();
    out
}

#[cfg(unix)] // the emulator needs a pty
/// The production log's rows (CSV, header first).
fn log_rows(case: &Case) -> Vec<Vec<String>> {
    let out = bin()
        .args(["mfg", "log", "--out-dir", "out"])
        .current_dir(case.dir.path())
        .output()
        .unwrap();
    assert_ok(&out);
    csv::ReaderBuilder::new()
        .has_headers(false)
        .from_reader(out.stdout.as_slice())
        .records()
        .map(|r| r.unwrap().iter().map(str::to_owned).collect())
        .collect()
}

#[test]
#[cfg(unix)] // the emulator needs a pty
fn mfg_flash_with_firmware_writes_firmware_and_device_in_one_pass() {
    use support::fake_esp::Config;
    let case = Case::new();
    case.file("devices.csv", "serial,secret\n41,a\n42,b\n");
    assert_ok(&mfg_devices(&case));
    let table = std::fs::read_to_string(firmware().with_file_name("partitions.csv")).unwrap();
    let firmware_sha256 = support::dist_folder(case.dir.path(), "dist", &table);
    let esp = Config::esp32c3()
        .mac([0x7c, 0xdf, 0xa1, 0, 0, 0x41])
        .start();
    let out = mfg_flash_next(&case, &esp, &["--firmware", "dist"]);
    assert_ok(&out);
    let dist = case.dir.path().join("dist");
    for (file, offset) in [
        ("bootloader.bin", 0x0),
        ("partition-table.bin", 0x8000),
        ("fw.bin", 0x20000),
    ] {
        let bytes = read(&dist.join(file));
        assert!(
            esp.read(offset, bytes.len()) == bytes,
            "{file} is not on the chip"
        );
    }
    let mut image = read(&case.dir.path().join("out/bin/fctry-41.bin"));
    image.resize(0x2000, 0xFF);
    assert!(
        esp.read(0xf000, 0x2000) == image,
        "fctry holds another image"
    );
    // One connection, one write (the ROM loader reboots after FLASH_END).
    assert_eq!(esp.sessions(), 1);
    assert_eq!(esp.flash_end_count(), 1);
    let rows = log_rows(&case);
    assert_eq!(rows[0].last().map(String::as_str), Some("firmware_sha256"));
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[1][1], "41");
    assert_eq!(rows[1][4], "ok");
    assert_eq!(rows[1][6], firmware_sha256);
    assert!(
        !stderr(&out).contains("no firmware on this chip"),
        "{}",
        stderr(&out)
    );

    // A firmware whose table has no NVS partition where the images go: refused, nothing written.
    support::dist_folder(case.dir.path(), "dist-moved", MOVED_TABLE);
    let blank = Config::esp32c3()
        .mac([0x7c, 0xdf, 0xa1, 0, 0, 0x42])
        .start();
    let before = blank.flash();
    let out = mfg_flash_next(&case, &blank, &["--firmware", "dist-moved"]);
    assert!(!out.status.success());
    let text = stderr(&out);
    assert!(
        text.contains("has no data/nvs partition at 0xf000")
            && text.contains("nothing was written"),
        "{text}"
    );
    assert!(blank.changed_since(&before).is_empty());

    // A chip that holds the firmware already gets only its device's image (MD5 skips the rest).
    let mut preset = Config::esp32c3().mac([0x7c, 0xdf, 0xa1, 0, 0, 0x43]);
    for (file, offset) in [
        ("bootloader.bin", 0x0),
        ("partition-table.bin", 0x8000),
        ("fw.bin", 0x20000),
    ] {
        preset = preset.preset(offset, read(&dist.join(file)));
    }
    let flashed = preset.start();
    let out = mfg_flash_next(&case, &flashed, &["--firmware", "dist"]);
    assert_ok(&out);
    let written: Vec<u32> = flashed.flash_begins().iter().map(|b| b.offset).collect();
    assert_eq!(written, vec![0xf000], "only the device's image is written");
    let mut image = read(&case.dir.path().join("out/bin/fctry-42.bin"));
    image.resize(0x2000, 0xFF);
    assert!(flashed.read(0xf000, 0x2000) == image);

    // A changed file in the folder is refused.
    std::fs::write(dist.join("fw.bin"), b"tampered").unwrap();
    let out = mfg_flash_next(&case, &blank, &["--firmware", "dist"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("does not match its SHA-256"),
        "{}",
        stderr(&out)
    );
    assert!(blank.changed_since(&before).is_empty());
}

#[test]
#[cfg(unix)] // the emulator needs a pty
fn mfg_flash_without_firmware_refuses_and_logs_a_chip_whose_table_disagrees() {
    use support::fake_esp::Config;
    let case = Case::new();
    case.file("devices.csv", "serial,secret\n51,a\n");
    assert_ok(&mfg_devices(&case));
    let other = case.dir.path().join("other.csv");
    std::fs::write(&other, MOVED_TABLE).unwrap();
    let other_table = nvs_build::table::PartitionTable::load(&other, 0x8000)
        .unwrap()
        .to_binary();
    let esp = Config::esp32c3()
        .mac([0x7c, 0xdf, 0xa1, 0, 0, 0x51])
        .preset(0x8000, other_table)
        .start();
    let before = esp.flash();
    let out = mfg_flash_next(&case, &esp, &[]);
    assert!(!out.status.success());
    let text = stderr(&out);
    assert!(
        text.contains("disagrees with the one the images were made for")
            && text.contains("fctry at 0x10000"),
        "{text}"
    );
    assert!(esp.changed_since(&before).is_empty());
    let rows = log_rows(&case);
    assert!(rows[1][4].starts_with("refused: "), "{rows:?}");

    // A blank chip gets the images, with a warning.
    let blank = Config::esp32c3()
        .mac([0x7c, 0xdf, 0xa1, 0, 0, 0x52])
        .start();
    let out = mfg_flash_next(&case, &blank, &[]);
    assert_ok(&out);
    assert!(
        stderr(&out).contains("no firmware on this chip yet"),
        "{}",
        stderr(&out)
    );
}

/// A dist made with `--with-dev-data` carries user data: `mfg flash --firmware` writes it onto
/// blank flash only; a board that holds user data keeps it.
#[test]
#[cfg(unix)] // the emulator needs a pty
fn mfg_flash_with_firmware_writes_dist_user_data_onto_blank_flash_only() {
    use support::fake_esp::Config;
    let case = Case::new();
    case.file("devices.csv", "serial,secret\n61,a\n62,b\n");
    assert_ok(&mfg_devices(&case));
    let table = std::fs::read_to_string(firmware().with_file_name("partitions.csv")).unwrap();
    support::dist_folder(case.dir.path(), "dist", &table);
    // The dist's user-data image for `nvs` (0x9000, 0x6000), as `dist --with-dev-data` lists it.
    let dist = case.dir.path().join("dist");
    let defaults: Vec<u8> = (0..0x6000u32).map(|i| (i % 199) as u8).collect();
    std::fs::write(dist.join("nvs-nvs.bin"), &defaults).unwrap();
    let manifest_path = dist.join("manifest.json");
    let mut manifest: serde_json::Value = serde_json::from_slice(&read(&manifest_path)).unwrap();
    manifest["with_dev_data"] = true.into();
    manifest["segments"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "name": "nvs `nvs`", "role": "user-data", "file": "nvs-nvs.bin", "in_flash_args": true,
            "offset": 0x9000, "size": defaults.len(),
            "sha256": cargo_nvs::hex::sha256_hex(&defaults), "user_data": true, "secret": false,
        }));
    std::fs::write(
        &manifest_path,
        serde_json::to_vec_pretty(&manifest).unwrap(),
    )
    .unwrap();

    let blank = Config::esp32c3()
        .mac([0x7c, 0xdf, 0xa1, 0, 0, 0x61])
        .start();
    assert_ok(&mfg_flash_next(&case, &blank, &["--firmware", "dist"]));
    assert!(
        blank.read(0x9000, 0x6000) == defaults,
        "blank flash gets the defaults"
    );

    let owned: Vec<u8> = (0..0x6000u32).map(|i| (i % 13) as u8).collect();
    let used = Config::esp32c3()
        .mac([0x7c, 0xdf, 0xa1, 0, 0, 0x62])
        .preset(0x9000, owned.clone())
        .start();
    let out = mfg_flash_next(&case, &used, &["--firmware", "dist"]);
    assert_ok(&out);
    assert!(
        used.read(0x9000, 0x6000) == owned,
        "the board's user data was overwritten"
    );
    assert!(
        stderr(&out).contains("kept the user data"),
        "{}",
        stderr(&out)
    );
    let mut image = read(&case.dir.path().join("out/bin/fctry-62.bin"));
    image.resize(0x2000, 0xFF);
    assert!(used.read(0xf000, 0x2000) == image, "its device is flashed");
}

/// `--store-images` in the Cargo mode with a SQLite ledger: with the batch folder gone and no
/// package in sight, `mfg flash --ledger FILE` writes each stored image where the package's
/// table put it; a copy made by `mfg ledger migrate` carries the images and goes on.
#[test]
#[cfg(unix)] // the emulator needs a pty
fn stored_images_flash_from_the_ledger_alone_and_move_with_a_migration() {
    use support::fake_esp::Config;
    let case = Case::new();
    case.file("devices.csv", "serial,secret\n41,a\n42,b\n");
    assert_ok(&mfg_devices_into(&case, "out", &["--store-images"]));
    let image = |id: &str| {
        let mut image = read(&case.dir.path().join(format!("out/bin/fctry-{id}.bin")));
        image.resize(0x2000, 0xFF);
        image
    };
    let images = [image("41"), image("42")];
    std::fs::remove_dir_all(case.dir.path().join("out")).unwrap();
    let station = Case::new();
    let flash = |ledger: &str, mac: u8| {
        let esp = Config::esp32c3().mac([0x7c, 0xdf, 0xa1, 0, 0, mac]).start();
        let before = esp.flash();
        let out = bin()
            .args(["mfg", "flash", "--ledger"])
            .arg(case.dir.path().join(ledger))
            .args(["--port", esp.path()])
            .args(["--before", "no-reset", "--after", "no-reset", "--no-stub"])
            .current_dir(station.dir.path())
            .output()
            .unwrap();
        esp.settle();
        assert_ok(&out);
        let outside: Vec<_> = esp
            .changed_since(&before)
            .into_iter()
            .filter(|r| r.start < 0xf000 || r.end > 0xf000 + 0x2000)
            .collect();
        assert!(outside.is_empty(), "{outside:?}");
        esp.read(0xf000, 0x2000)
    };
    assert!(
        flash("ledger.sqlite", 0x41) == images[0],
        "fctry holds another image"
    );
    let out = case.run(&[
        "mfg",
        "ledger",
        "migrate",
        "--from",
        "ledger.sqlite",
        "--to",
        "copy.sqlite",
    ]);
    assert_ok(&out);
    assert!(
        flash("copy.sqlite", 0x42) == images[1],
        "the copy's image differs"
    );
}
