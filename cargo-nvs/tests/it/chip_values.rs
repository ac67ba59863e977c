//! Values from the chip being flashed: `{ chip = "mac" | "mac-hex" }` keys (Cargo metadata) and
//! `@chip:` cells (mfg_gen mode). `mfg generate` leaves a recipe; `mfg flash` builds each image
//! with the chip's MAC, and it equals Espressif's generator's output for the CSV with that MAC
//! written in; the production log records each image's SHA-256 with the MAC.

// The helpers serve the tests that drive the emulator, which needs a pty.
#![cfg_attr(not(unix), allow(dead_code, unused_imports))]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::support::{Case, assert_fails, assert_ok, bin, stderr};

/// The reference generator's Python (`cargo xtask ref-venv` makes it; `cargo xtask ci` before
/// the tests). Without it the test is skipped, except under CI, where it fails.
pub(crate) fn reference_python() -> Option<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
        PathBuf::from,
    );
    let python = target.join("ref-venv/bin/python");
    if python.exists() {
        return Some(python);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{} is missing: CI must compare with the reference (cargo xtask ref-venv)",
        python.display()
    );
    eprintln!("skipped: no reference generator (cargo xtask ref-venv makes it)");
    None
}

/// What the reference writes for `csv` (run in `dir`, where relative `file` rows resolve).
fn reference(python: &Path, dir: &Path, csv: &str, size: &str) -> Vec<u8> {
    std::fs::write(dir.join("ref.csv"), csv).unwrap();
    let out = Command::new(python)
        .args([
            "-m",
            "esp_idf_nvs_partition_gen",
            "generate",
            "ref.csv",
            "ref.bin",
            size,
        ])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "reference failed: {}", stderr(&out));
    std::fs::read(dir.join("ref.bin")).unwrap()
}

/// What the reference writes for `csv` encrypted with the nvs_keys file `key` (run in `dir`).
pub(crate) fn reference_encrypted(
    python: &Path,
    dir: &Path,
    csv: &str,
    size: &str,
    key: &[u8],
) -> Vec<u8> {
    std::fs::write(dir.join("ref.csv"), csv).unwrap();
    std::fs::write(dir.join("key.bin"), key).unwrap();
    let out = Command::new(python)
        .args([
            "-m",
            "esp_idf_nvs_partition_gen",
            "encrypt",
            "ref.csv",
            "ref.bin",
            size,
        ])
        .args(["--inputkey", "key.bin"])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "reference failed: {}", stderr(&out));
    std::fs::read(dir.join("ref.bin")).unwrap()
}

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    nvs_build::hex(&sha2::Sha256::digest(bytes))
}

/// The MAC as the reference CSV gets it: `AA:BB:…`, `aabb…`, and the number.
pub(crate) fn spellings(mac: [u8; 6]) -> (String, String, u64) {
    let upper: Vec<String> = mac.iter().map(|b| format!("{b:02X}")).collect();
    let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
    let number = mac.iter().fold(0u64, |n, &b| (n << 8) | u64::from(b));
    (upper.join(":"), hex, number)
}

/// `mfg log` of the batch `out_dir`: (mac, device, sha256, result) per row.
fn log(case: &Case, out_dir: &str) -> Vec<(String, String, String, String)> {
    let out = bin()
        .args(["mfg", "log", "--out-dir", out_dir])
        .current_dir(case.dir.path())
        .output()
        .unwrap();
    assert_ok(&out);
    let mut reader = csv::Reader::from_reader(out.stdout.as_slice());
    let header = reader.headers().unwrap().clone();
    let column = |name: &str| header.iter().position(|h| h == name).unwrap();
    let (mac, device, sha, result) = (
        column("mac"),
        column("device"),
        column("sha256"),
        column("result"),
    );
    reader
        .records()
        .map(|r| {
            let r = r.unwrap();
            (
                r[mac].to_owned(),
                r[device].to_owned(),
                r[sha].to_owned(),
                r[result].to_owned(),
            )
        })
        .collect()
}

/// A throwaway firmware package `fw/` whose `fctry` partition (0x3000 at 0xf000) has `keys`.
fn chip_crate(case: &Case, keys: &str) {
    std::fs::create_dir_all(case.dir.path().join("fw/src")).unwrap();
    case.file("fw/src/main.rs", "fn main() {}\n");
    case.file(
        "fw/cert.der",
        [0x30u8, 0x82, 0, 0x0a, b',', b'"', b'\n', 0xff],
    );
    case.file(
        "fw/partitions.csv",
        "nvs, data, nvs, 0x9000, 0x6000,\nfctry, data, nvs, 0xf000, 0x3000,\nfactory, app, factory, 0x20000, 1M,\n",
    );
    case.file(
        "fw/Cargo.toml",
        format!(
            "[package]\nname = \"fw\"\nversion = \"0.1.0\"\nedition = \"2024\"\n\n[workspace]\n\n\
             [package.metadata.nvs.partitions.fctry.namespaces.f]\n{keys}"
        ),
    );
}

/// `mfg flash --next` of batch `out_dir` onto `esp`, then `extra`.
#[cfg(unix)]
fn flash_next(
    case: &Case,
    esp: &crate::support::fake_esp::FakeEsp,
    out_dir: &str,
    extra: &[&str],
) -> Output {
    let out = bin()
        .args([
            "mfg",
            "flash",
            "--out-dir",
            out_dir,
            "--next",
            "--port",
            esp.path(),
        ])
        .args(extra)
        .args(["--before", "no-reset", "--after", "no-reset", "--no-stub"])
        .current_dir(case.dir.path())
        .output()
        .unwrap();
    esp.settle();
    out
}

#[test]
#[cfg(unix)] // the emulator needs a pty
fn cargo_metadata_chip_values_give_each_chip_the_references_image_for_its_mac() {
    use crate::support::fake_esp::Config;
    let Some(python) = reference_python() else {
        return;
    };
    let case = Case::new();
    chip_crate(
        &case,
        "product = \"P1\"\n\
         serial = { string = { chip = \"mac\", dev = \"00:00:00:00:00:00\" } }\n\
         mac_hex = { string = { chip = \"mac-hex\", dev = \"000000000000\" } }\n\
         id = { u64 = { chip = \"mac\", dev = 0 } }\n\
         sn = { string = { per-device = \"sn\", dev = \"dev\" } }\n\
         cert = { file = \"cert.der\" }\n",
    );
    case.file("devices.csv", "sn\nA1\nA2\n");
    let out = bin()
        .args(["mfg", "generate", "--manifest-path", "fw/Cargo.toml"])
        .args(["--values", "devices.csv", "--id", "sn", "--out-dir", "out"])
        .current_dir(case.dir.path())
        .output()
        .unwrap();
    assert_ok(&out);
    // A recipe per device, no image: the image needs the chip.
    for sn in ["A1", "A2"] {
        assert!(case.exists(&format!("out/bin/fctry-{sn}.chip.csv")));
        assert!(!case.exists(&format!("out/bin/fctry-{sn}.bin")));
    }
    let recipe =
        std::fs::read_to_string(case.dir.path().join("out/bin/fctry-A1.chip.csv")).unwrap();
    assert!(
        recipe.contains("serial,data,string,@chip:mac\n"),
        "{recipe}"
    );
    assert!(recipe.contains("id,data,u64,@chip:mac\n"), "{recipe}");
    assert!(recipe.contains("sn,data,string,A1\n"), "{recipe}");

    let macs = [
        [0x7c, 0xdf, 0xa1, 0x01, 0x02, 0x03],
        [0xa4, 0xcf, 0x12, 0xfe, 0xdc, 0xba],
    ];
    let mut images = Vec::new();
    for (mac, sn) in macs.into_iter().zip(["A1", "A2"]) {
        let esp = Config::esp32c3().mac(mac).start();
        assert_ok(&flash_next(
            &case,
            &esp,
            "out",
            &["--manifest-path", "fw/Cargo.toml"],
        ));
        let (upper, hex, number) = spellings(mac);
        let expected = reference(
            &python,
            case.dir.path(),
            &format!(
                "key,type,encoding,value\nf,namespace,,\nproduct,data,string,P1\n\
                 serial,data,string,{upper}\nmac_hex,data,string,{hex}\nid,data,u64,{number}\n\
                 sn,data,string,{sn}\ncert,file,binary,fw/cert.der\n"
            ),
            "0x3000",
        );
        let held = esp.read(0xf000, 0x3000);
        assert!(
            held == expected,
            "the chip {upper} holds another image than the reference's"
        );
        images.push((upper, sha256(&expected), held));
    }
    assert!(images[0].2 != images[1].2, "two MACs, two images");
    // The log: each image's SHA-256 with its chip's MAC.
    let log = log(&case, "out");
    assert_eq!(log.len(), 2, "{log:?}");
    for ((mac, sha, _), (logged_mac, device, logged_sha, result)) in images.iter().zip(&log) {
        assert_eq!(result, "ok");
        assert!(
            logged_mac.eq_ignore_ascii_case(mac),
            "{logged_mac} vs {mac}"
        );
        assert_eq!(logged_sha, sha, "device {device}");
    }
    // Both devices are flashed: nothing is left.
    let esp = Config::esp32c3().mac([0x7c, 0xdf, 0xa1, 9, 9, 9]).start();
    let out = flash_next(&case, &esp, "out", &["--manifest-path", "fw/Cargo.toml"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
}

#[test]
#[cfg(unix)] // the emulator needs a pty
fn mfg_gen_chip_cells_give_each_chip_the_references_image_for_its_mac() {
    use crate::support::fake_esp::Config;
    let Some(python) = reference_python() else {
        return;
    };
    let case = Case::new();
    case.file("blob.bin", [1u8, 2, 3, b'#', b'\n']);
    case.file(
        "conf.csv",
        "f,namespace,\nserial,data,string\nid,data,u64\nsn,data,string\nblob,file,binary\n",
    );
    case.file(
        "vals.csv",
        "serial,id,sn,blob\n@chip:mac,@chip:mac,B1,blob.bin\n@chip:mac-hex,@chip:mac,B2,blob.bin\n",
    );
    let out = bin()
        .args(["mfg", "generate", "conf.csv", "vals.csv", "dev", "0x3000"])
        .args(["--fileid", "sn", "--out-dir", "g"])
        .current_dir(case.dir.path())
        .output()
        .unwrap();
    assert_ok(&out);
    assert!(case.exists("g/bin/dev-B1.chip.csv") && !case.exists("g/bin/dev-B1.bin"));
    // A recipe holds the device's values: owner-only, like images and keys.
    {
        use std::os::unix::fs::PermissionsExt;
        let recipe = std::fs::metadata(case.dir.path().join("g/bin/dev-B1.chip.csv")).unwrap();
        assert_eq!(recipe.permissions().mode() & 0o777, 0o600);
    }
    let macs = [
        [0x10, 0x20, 0x30, 0x40, 0x50, 0x60],
        [0xfe, 0xed, 0xfa, 0xce, 0x00, 0x01],
    ];
    let mut shas = Vec::new();
    for (i, (mac, sn)) in macs.into_iter().zip(["B1", "B2"]).enumerate() {
        let esp = Config::esp32c3().mac(mac).start();
        assert_ok(&flash_next(&case, &esp, "g", &["--offset", "0xf000"]));
        let (upper, hex, number) = spellings(mac);
        let serial = if i == 0 { upper } else { hex };
        let expected = reference(
            &python,
            case.dir.path(),
            &format!(
                "key,type,encoding,value\nf,namespace,,\nserial,data,string,{serial}\n\
                 id,data,u64,{number}\nsn,data,string,{sn}\nblob,file,binary,blob.bin\n"
            ),
            "0x3000",
        );
        assert!(
            esp.read(0xf000, 0x3000) == expected,
            "chip {serial}: not the reference's image"
        );
        shas.push(sha256(&expected));
    }
    assert_ne!(shas[0], shas[1]);
    let logged: Vec<String> = log(&case, "g").into_iter().map(|r| r.2).collect();
    assert_eq!(logged, shas);
}

#[test]
fn a_chip_value_without_dev_is_refused_naming_cargo_toml_and_the_key() {
    let case = Case::new();
    chip_crate(
        &case,
        "product = \"P1\"\nserial = { string = { chip = \"mac\" } }\n",
    );
    let out = bin()
        .args(["nvs", "generate", "--manifest-path", "fw/Cargo.toml"])
        .current_dir(case.dir.path())
        .output()
        .unwrap();
    assert_fails(
        &out,
        &[
            "Cargo.toml:10:21",
            "`serial`",
            "add `dev = \"00:00:00:00:00:00\"`",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
}

/// A recipe encrypted with a shared key (`--inputkey`), stored with `--store-images`: the key
/// goes into the ledger with it (never flashed), so a station builds the image with the batch
/// folder and the key file gone. It equals the reference's encryption of the CSV with the MAC.
#[test]
#[cfg(unix)] // the emulator needs a pty
fn a_stored_recipe_with_a_shared_key_is_built_from_the_ledger_alone() {
    use crate::support::fake_esp::Config;
    let Some(python) = reference_python() else {
        return;
    };
    let case = Case::new();
    case.file(
        "conf.csv",
        "f,namespace,\nserial,data,string\nsn,data,string\n",
    )
    .file("vals.csv", "serial,sn\n@chip:mac-hex,C1\n")
    .file("table.csv", "nvs, data, nvs, 0x9000, 0x3000,\n");
    assert_ok(&case.run(&["generate-key", "--keyfile", "shared.bin"]));
    let key = std::fs::read(case.dir.path().join("shared.bin")).unwrap();
    let out = bin()
        .args(["mfg", "generate", "conf.csv", "vals.csv", "dev", "0x3000"])
        .args([
            "--fileid",
            "sn",
            "--out-dir",
            "g",
            "--inputkey",
            "shared.bin",
        ])
        .args([
            "--store-images",
            "--partition-table",
            "table.csv",
            "--partition",
            "nvs",
        ])
        .current_dir(case.dir.path())
        .output()
        .unwrap();
    assert_ok(&out);
    std::fs::remove_dir_all(case.dir.path().join("g")).unwrap();
    std::fs::remove_file(case.dir.path().join("shared.bin")).unwrap();
    let mac = [0x24, 0x6f, 0x28, 0x01, 0x02, 0x03];
    let esp = Config::esp32c3().mac(mac).start();
    let out = bin()
        .args(["mfg", "flash", "--ledger"])
        .arg(case.dir.path().join("ledger.sqlite"))
        .args(["--port", esp.path()])
        .args(["--before", "no-reset", "--after", "no-reset", "--no-stub"])
        .current_dir(case.dir.path())
        .output()
        .unwrap();
    esp.settle();
    assert_ok(&out);
    let (_, hex, _) = spellings(mac);
    let expected = reference_encrypted(
        &python,
        case.dir.path(),
        &format!(
            "key,type,encoding,value\nf,namespace,,\nserial,data,string,{hex}\nsn,data,string,C1\n"
        ),
        "0x3000",
        &key,
    );
    assert!(
        esp.read(0x9000, 0x3000) == expected,
        "not the reference's image"
    );
}

/// A device with two per-device partitions, one of them with values from the chip, stored in
/// the ledger: `--resume` of the finished batch keeps both (the recipe checked, not rebuilt), and
/// a station with only the ledger writes the image and the recipe's image for its MAC, each
/// where the package's table put it.
#[test]
#[cfg(unix)] // the emulator needs a pty
fn a_recipe_beside_an_image_is_resumed_stored_and_flashed_with_it() {
    use crate::support::fake_esp::Config;
    let Some(python) = reference_python() else {
        return;
    };
    let case = Case::new();
    chip_crate(
        &case,
        "serial = { string = { chip = \"mac\", dev = \"00:00:00:00:00:00\" } }\n\
         sn = { string = { per-device = \"sn\", dev = \"dev\" } }\n\n\
         [package.metadata.nvs.partitions.nvs.namespaces.u]\n\
         token = { string = { per-device = \"token\", dev = \"t\" } }\n",
    );
    case.file("devices.csv", "sn,token\nA1,secret-1\n");
    let generate = |extra: &[&str]| {
        bin()
            .args(["mfg", "generate", "--manifest-path", "fw/Cargo.toml"])
            .args(["--values", "devices.csv", "--id", "sn", "--out-dir", "out"])
            .args(["--ledger", "ledger.sqlite", "--store-images"])
            .args(extra)
            .current_dir(case.dir.path())
            .output()
            .unwrap()
    };
    assert_ok(&generate(&[]));
    assert!(case.exists("out/bin/fctry-A1.chip.csv") && case.exists("out/bin/nvs-A1.bin"));
    let out = generate(&["--resume"]);
    assert_ok(&out);
    let mut nvs = std::fs::read(case.dir.path().join("out/bin/nvs-A1.bin")).unwrap();
    nvs.resize(0x6000, 0xFF);
    std::fs::remove_dir_all(case.dir.path().join("out")).unwrap();

    let station = Case::new();
    let mac = [0x58, 0xcf, 0x79, 0x10, 0x20, 0x30];
    let esp = Config::esp32c3().mac(mac).start();
    let out = bin()
        .args(["mfg", "flash", "--ledger"])
        .arg(case.dir.path().join("ledger.sqlite"))
        .args(["--port", esp.path()])
        .args(["--before", "no-reset", "--after", "no-reset", "--no-stub"])
        .current_dir(station.dir.path())
        .output()
        .unwrap();
    esp.settle();
    assert_ok(&out);
    let (upper, _, _) = spellings(mac);
    let expected = reference(
        &python,
        case.dir.path(),
        &format!(
            "key,type,encoding,value\nf,namespace,,\nserial,data,string,{upper}\n\
             sn,data,string,A1\n"
        ),
        "0x3000",
    );
    assert!(
        esp.read(0xf000, 0x3000) == expected,
        "fctry: not the reference's image"
    );
    assert!(
        esp.read(0x9000, 0x6000) == nvs,
        "nvs: not the device's stored image"
    );
}
