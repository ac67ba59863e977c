//! `cargo nvs mfg flash` and `mfg log` against the ROM-loader emulator: the image and nothing
//! else at the offset, the production log, `--next`, the one-id-per-chip refusals, a failed
//! verification, and several ports in parallel.

// Every test here talks to the emulator, which needs a pty.
#![cfg(unix)]

use crate::support;

use std::collections::HashMap;
use std::process::Output;

use crate::support::fake_esp::{Config, FakeEsp, Fault};
use crate::support::{Case, assert_fails, assert_ok, bin, mac_text, stderr};

const CONFIG: &str = "app,namespace,\nserial,data,string\nnum,data,u8\n";
const VALUES: &str = "id,serial,num\n1,SN1,1\n2,SN2,2\n3,SN3,3\n";
const MAC_A: [u8; 6] = [0x7c, 0xdf, 0xa1, 0, 0, 0x0a];
const MAC_B: [u8; 6] = [0x7c, 0xdf, 0xa1, 0, 0, 0x0b];
const MAC_C: [u8; 6] = [0x7c, 0xdf, 0xa1, 0, 0, 0x0c];

/// Three devices (SN1..SN3) generated into `out/`, 0x3000-byte images.
fn batch() -> Case {
    batch_with(&[])
}

/// [`batch`] with more `mfg generate` options (keys).
fn batch_with(extra: &[&str]) -> Case {
    let case = Case::new();
    case.file("config.csv", CONFIG).file("values.csv", VALUES);
    let mut args = vec![
        "mfg",
        "generate",
        "config.csv",
        "values.csv",
        "dev",
        "0x3000",
    ];
    args.extend(["--fileid", "serial", "--out-dir", "out"]);
    args.extend_from_slice(extra);
    assert_ok(&case.run(&args));
    case
}

fn image(case: &Case, id: &str) -> Vec<u8> {
    std::fs::read(case.dir.path().join(format!("out/bin/dev-{id}.bin"))).unwrap()
}

/// `cargo nvs mfg flash --out-dir out --port … ` through the emulators, no resets, ROM loader.
fn flash(case: &Case, esps: &[&FakeEsp], extra: &[&str]) -> Output {
    flash_from(case, Some("out"), esps, extra)
}

/// [`flash`] with another batch, or none (`--out-dir` left out).
fn flash_from(case: &Case, out_dir: Option<&str>, esps: &[&FakeEsp], extra: &[&str]) -> Output {
    let mut command = bin();
    command.args(["mfg", "flash"]);
    if let Some(out_dir) = out_dir {
        command.args(["--out-dir", out_dir]);
    }
    command.args(["--before", "no-reset", "--after", "no-reset", "--no-stub"]);
    for esp in esps {
        command.args(["--port", esp.path()]);
    }
    let out = command
        .args(extra)
        .current_dir(case.dir.path())
        .output()
        .unwrap();
    for esp in esps {
        esp.settle();
    }
    out
}

/// [`flash`] into the `nvs` partition of the case's `partitions.csv`.
fn flash_table_nvs(case: &Case, esp: &FakeEsp) -> Output {
    flash(
        case,
        &[esp],
        &["--partition-table", "partitions.csv", "--partition", "nvs"],
    )
}

/// The production log as CSV rows (header dropped), split into cells.
fn log(case: &Case) -> Vec<Vec<String>> {
    let out = case.run(&["mfg", "log", "--out-dir", "out", "--format", "csv"]);
    assert_ok(&out);
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("mac,device,sha256,time,result,port,firmware_sha256")
    );
    let rest: Vec<&str> = lines.collect();
    csv::ReaderBuilder::new()
        .has_headers(false)
        .from_reader(rest.join("\n").as_bytes())
        .records()
        .map(|r| r.unwrap().iter().map(str::to_owned).collect())
        .collect()
}

fn sha256_of(case: &Case, id: &str) -> String {
    let manifest = std::fs::read_to_string(case.dir.path().join("out/manifest.csv")).unwrap();
    manifest
        .lines()
        .find(|l| l.starts_with(&format!("{id},")))
        .unwrap()
        .split(',')
        .nth(3)
        .unwrap()
        .to_owned()
}

/// Compares flash contents without printing kilobytes on failure.
fn same(actual: &[u8], expected: &[u8], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    if let Some(i) = actual.iter().zip(expected).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i:#x}: {:#04x} instead of {:#04x}",
            actual[i], expected[i]
        );
    }
}

fn changed_outside(
    esp: &FakeEsp,
    before: &[u8],
    start: u32,
    len: u32,
) -> Vec<std::ops::Range<u32>> {
    esp.changed_since(before)
        .into_iter()
        .filter(|r| r.start < start || r.end > start + len)
        .collect()
}

#[test]
fn flashes_the_next_image_padded_over_its_partition_and_logs_it() {
    let case = batch();
    let esp = Config::esp32c3()
        .mac(MAC_A)
        .preset(0x9000, vec![0x55; 0x6000])
        .start();
    let before = esp.flash();
    // What the chip holds there is neither blank, nor this image, nor dev data: kept.
    let out = flash(
        &case,
        &[&esp],
        &["--next", "--offset", "0x9000", "--size", "0x6000"],
    );
    assert_fails(
        &out,
        &[
            "`nvs` at 0x9000",
            "an unknown production identity: dump reports it damaged",
            "--force replaces it",
        ],
    );
    same(&esp.flash(), &before, "a refused chip");
    // Every attempt is logged: a refusal as `refused: why`.
    let rows = log(&case);
    assert_eq!(rows.len(), 1);
    assert!(rows[0][4].starts_with("refused: "), "{rows:?}");
    let out = flash(
        &case,
        &[&esp],
        &[
            "--next", "--offset", "0x9000", "--size", "0x6000", "--force",
        ],
    );
    assert_ok(&out);
    // The image, then 0xFF over the rest of the partition, and nothing else.
    let mut expected = image(&case, "SN1");
    expected.resize(0x6000, 0xFF);
    same(&esp.read(0x9000, 0x6000), &expected, "esp");
    assert!(changed_outside(&esp, &before, 0x9000, 0x6000).is_empty());
    assert_eq!(esp.flash_end_count(), 1, "one write_bins_to_flash call");
    assert!(stderr(&out).contains(&mac_text(MAC_A)), "{}", stderr(&out));

    let rows = log(&case);
    assert_eq!(rows.len(), 2, "the refusal, then the flash");
    assert_eq!(rows[1][0], mac_text(MAC_A));
    assert_eq!(rows[1][1], "SN1");
    assert_eq!(rows[1][2], sha256_of(&case, "SN1"));
    assert!(
        rows[1][3].starts_with("20") && rows[1][3].ends_with('Z'),
        "{:?}",
        rows[1]
    );
    assert_eq!(rows[1][4], "ok");
    assert_eq!(rows[1][5], esp.path());

    // --next moves on to SN2 on the next chip; the partition table gives offset and size.
    case.file("partitions.csv", "# Name, Type, SubType, Offset, Size\nnvs, data, nvs, 0x9000, 0x6000\nphy_init, data, phy, 0xf000, 0x1000\nfactory, app, factory, 0x10000, 1M\n");
    let other = Config::esp32c3().mac(MAC_B).start();
    let blank = other.flash();
    let out = flash_table_nvs(&case, &other);
    assert_ok(&out);
    let mut expected = image(&case, "SN2");
    expected.resize(0x6000, 0xFF);
    same(&other.read(0x9000, 0x6000), &expected, "other");
    assert!(changed_outside(&other, &blank, 0x9000, 0x6000).is_empty());
    let rows = log(&case);
    assert_eq!(rows.len(), 3);
    assert_eq!(
        (rows[2][0].as_str(), rows[2][1].as_str()),
        (mac_text(MAC_B).as_str(), "SN2")
    );

    // JSON export.
    let out = case.run(&["mfg", "log", "--out-dir", "out", "--format", "json"]);
    assert_ok(&out);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json[2]["device"], "SN2");
    assert_eq!(json[2]["mac"], mac_text(MAC_B));
    assert_eq!(json[1]["sha256"], sha256_of(&case, "SN1"));
}

#[test]
fn refuses_an_id_on_a_second_chip_and_a_second_id_on_a_chip_unless_forced() {
    let case = batch();
    let a = Config::esp32c3().mac(MAC_A).start();
    let b = Config::esp32c3().mac(MAC_B).start();
    assert_ok(&flash(
        &case,
        &[&a],
        &["--device", "SN1", "--offset", "0x9000"],
    ));

    // SN1 onto another chip: refused, nothing written, the refusal logged.
    let blank = b.flash();
    let out = flash(&case, &[&b], &["--device", "SN1", "--offset", "0x9000"]);
    assert_fails(&out, &["SN1", "another chip", &mac_text(MAC_A), "--force"]);
    assert!(b.changed_since(&blank).is_empty());
    let rows = log(&case);
    assert_eq!(rows.len(), 2);
    assert!(rows[1][4].starts_with("refused: "), "{rows:?}");

    // A second id onto chip A (--next would give SN2): refused.
    let before = a.flash();
    let out = flash(&case, &[&a], &["--next", "--offset", "0x9000"]);
    assert_fails(&out, &[&mac_text(MAC_A), "already holds device `SN1`"]);
    assert!(a.flash() == before, "chip A written");
    assert_eq!(log(&case).len(), 3);

    // The same id onto the same chip again is a reflash, not a conflict.
    assert_ok(&flash(
        &case,
        &[&a],
        &["--device", "SN1", "--offset", "0x9000"],
    ));
    // --force overrides.
    let out = flash(
        &case,
        &[&b],
        &["--device", "SN1", "--offset", "0x9000", "--force"],
    );
    assert_ok(&out);
    assert!(stderr(&out).contains("--force"), "{}", stderr(&out));
    same(&b.read(0x9000, 0x3000), &image(&case, "SN1"), "b");
    let rows = log(&case);
    let ok: Vec<_> = rows.iter().filter(|r| r[4] == "ok").collect();
    assert_eq!(ok.len(), 3);
    assert!(ok.iter().all(|r| r[1] == "SN1"));

    // An unknown id.
    let out = flash(&case, &[&b], &["--device", "SN9", "--offset", "0x9000"]);
    assert_fails(&out, &["`SN9`", "not in the ledger"]);
}

/// A station that died while writing (or could not log): the chip may hold the device, so it
/// goes to no other chip until that chip is verified and logged.
#[test]
fn a_device_written_but_never_logged_goes_to_no_other_chip() {
    let case = batch();
    let db = rusqlite::Connection::open(case.dir.path().join("ledger.sqlite")).unwrap();
    db.execute(
        "INSERT INTO claims (device, claimant, claimed_at, written_to)
         VALUES ('SN1', 'a station that died', '2000-01-01T00:00:00.000Z', ?1)",
        [mac_text(MAC_A)],
    )
    .unwrap();
    drop(db);
    let b = Config::esp32c3().mac(MAC_B).start();
    let out = flash(&case, &[&b], &["--next", "--offset", "0x9000"]);
    assert_ok(&out);
    assert!(
        stderr(&out).contains("never logged (e.g. `SN1` on MAC"),
        "{}",
        stderr(&out)
    );
    same(
        &b.read(0x9000, 0x3000),
        &image(&case, "SN2"),
        "the next device",
    );

    let c = Config::esp32c3().mac(MAC_C).start();
    let blank = c.flash();
    let out = flash(&case, &[&c], &["--device", "SN1", "--offset", "0x9000"]);
    assert_fails(
        &out,
        &[
            "was written to the chip with MAC",
            &mac_text(MAC_A),
            "--device SN1",
        ],
    );
    assert!(c.flash() == blank, "written onto a third chip");

    // The chip it went to: verified and logged; then it is an ordinary flashed device.
    let a = Config::esp32c3().mac(MAC_A).start();
    assert_ok(&flash(
        &case,
        &[&a],
        &["--device", "SN1", "--offset", "0x9000"],
    ));
    let rows = log(&case);
    assert_eq!(rows.iter().filter(|r| r[4] == "ok").count(), 2);
    assert!(
        rows.iter()
            .any(|r| r[1] == "SN1" && r[0] == mac_text(MAC_C) && r[4].starts_with("refused: "))
    );
    assert!(
        rows.iter()
            .any(|r| r[1] == "SN1" && r[0] == mac_text(MAC_A) && r[4] == "ok")
    );
}

#[test]
fn a_failed_verification_is_logged_and_leaves_the_device_unflashed() {
    let case = batch();
    // A write that arrives corrupted: logged as failed; the device's partition on that chip is
    // erased afterwards, so SN1 goes back to the pool.
    let glitch = Config::esp32c3()
        .mac(MAC_A)
        .fault(Fault::CorruptFirst { seq: 0, times: 1 })
        .start();
    let out = flash(&case, &[&glitch], &["--next", "--offset", "0x9000"]);
    assert_fails(&out, &["SN1", "failed"]);
    assert!(glitch.read(0x9000, 0x3000).iter().all(|&b| b == 0xFF));
    let rows = log(&case);
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(
        rows.iter()
            .all(|r| r[0] == mac_text(MAC_A) && r[1] == "SN1")
    );
    assert!(rows[0][4].starts_with("failed: "), "{:?}", rows[0]);
    assert!(rows[1][4].contains("were erased"), "{:?}", rows[1]);
    let good = Config::esp32c3().mac(MAC_B).start();
    assert_ok(&flash(&case, &[&good], &["--offset", "0x9000"]));
    same(&good.read(0x9000, 0x3000), &image(&case, "SN1"), "good");
    let rows = log(&case);
    assert_eq!((rows[2][1].as_str(), rows[2][4].as_str()), ("SN1", "ok"));

    // Verification that fails although the write arrived (every MD5 answer is wrong): the
    // chip may hold SN2 whole, and the erase cannot be verified either, so SN2 stays held for
    // that chip; the next chip gets SN3.
    let bad = Config::esp32c3()
        .mac(MAC_C)
        .fault(Fault::Md5Mismatch)
        .start();
    let out = flash(&case, &[&bad], &["--next", "--offset", "0x9000"]);
    assert_fails(&out, &["SN2", "failed"]);
    assert!(log(&case).last().unwrap()[4].contains("stays held for this chip"));
    let other = Config::esp32c3()
        .mac([0x7c, 0xdf, 0xa1, 0, 0, 0x0d])
        .start();
    assert_ok(&flash(&case, &[&other], &["--next", "--offset", "0x9000"]));
    same(&other.read(0x9000, 0x3000), &image(&case, "SN3"), "other");
    // On that chip, once it answers properly (and the failed run's claim has lapsed, or from
    // the same port), SN2 is settled.
    let db = rusqlite::Connection::open(case.dir.path().join("ledger.sqlite")).unwrap();
    db.execute(
        "UPDATE claims SET claimed_at = '2000-01-01T00:00:00.000Z' WHERE device = 'SN2'",
        [],
    )
    .unwrap();
    drop(db);
    let settled = Config::esp32c3().mac(MAC_C).preset(0, bad.flash()).start();
    assert_ok(&flash(
        &case,
        &[&settled],
        &["--device", "SN2", "--offset", "0x9000"],
    ));
    same(
        &settled.read(0x9000, 0x3000),
        &image(&case, "SN2"),
        "settled",
    );
}

#[test]
fn several_ports_flash_different_devices_in_parallel() {
    let case = batch();
    let esps: Vec<FakeEsp> = [MAC_A, MAC_B, MAC_C]
        .into_iter()
        .map(|mac| Config::esp32c3().mac(mac).start())
        .collect();
    let refs: Vec<&FakeEsp> = esps.iter().collect();
    let out = flash(&case, &refs[..2], &["--next", "--offset", "0x9000"]);
    assert_ok(&out);
    let text = stderr(&out);
    for esp in &refs[..2] {
        assert!(text.contains(&format!("[{}]", esp.path())), "{text}");
    }
    same(
        &esps[0].read(0x9000, 0x3000),
        &image(&case, "SN1"),
        "port 1",
    );
    same(
        &esps[1].read(0x9000, 0x3000),
        &image(&case, "SN2"),
        "port 2",
    );
    let mut rows = log(&case);
    rows.sort();
    assert_eq!(rows.len(), 2);
    assert_eq!(
        (rows[0][0].as_str(), rows[0][1].as_str()),
        (mac_text(MAC_A).as_str(), "SN1")
    );
    assert_eq!(
        (rows[1][0].as_str(), rows[1][1].as_str()),
        (mac_text(MAC_B).as_str(), "SN2")
    );

    // Three ports, one device left: one flashes, the others stay idle.
    let blank = esps[1].flash();
    let out = flash(&case, &[&esps[2], &esps[1]], &["--offset", "0x9000"]);
    assert_ok(&out);
    assert!(stderr(&out).contains("idle"), "{}", stderr(&out));
    same(
        &esps[2].read(0x9000, 0x3000),
        &image(&case, "SN3"),
        "port 3",
    );
    assert!(esps[1].flash() == blank, "idle port written");
    // None left.
    let out = flash(&case, &[&esps[2]], &["--offset", "0x9000"]);
    assert_fails(&out, &["every device", "flashed"]);
}

#[test]
fn two_stations_sharing_the_ledger_flash_different_devices() {
    let case = batch();
    let esps: Vec<FakeEsp> = [MAC_A, MAC_B]
        .into_iter()
        .map(|mac| Config::esp32c3().mac(mac).start())
        .collect();
    // Two processes at once, one port each: both claim from the same ledger file.
    let stations: Vec<std::process::Child> = esps
        .iter()
        .map(|esp| {
            bin()
                .args([
                    "mfg",
                    "flash",
                    "--out-dir",
                    "out",
                    "--next",
                    "--offset",
                    "0x9000",
                ])
                .args(["--before", "no-reset", "--after", "no-reset", "--no-stub"])
                .args(["--port", esp.path()])
                .current_dir(case.dir.path())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for station in stations {
        assert_ok(&station.wait_with_output().unwrap());
    }
    for esp in &esps {
        esp.settle();
    }
    let mut flashed: Vec<String> = log(&case).into_iter().map(|r| r[1].clone()).collect();
    flashed.sort();
    assert_eq!(flashed, ["SN1", "SN2"], "a device went to both stations");
    for esp in &esps {
        let on_chip = esp.read(0x9000, 0x3000);
        assert!(
            on_chip == image(&case, "SN1") || on_chip == image(&case, "SN2"),
            "{} holds neither image",
            esp.path()
        );
    }
    assert!(esps[0].read(0x9000, 0x3000) != esps[1].read(0x9000, 0x3000));
}

#[test]
fn refuses_bad_targets_and_a_missing_ledger() {
    let case = batch();
    let esp = FakeEsp::esp32c3();
    let out = flash(&case, &[&esp], &["--offset", "0x9001"]);
    assert_fails(&out, &["4 KiB"]);
    let out = flash(&case, &[&esp], &["--offset", "0x9000", "--size", "0x1000"]);
    assert_fails(&out, &["larger than"]);
    // No place given, and the case folder is no firmware package.
    let out = flash(&case, &[&esp], &[]);
    assert_fails(
        &out,
        &["give --offset, or --partition-table and --partition"],
    );
    let out = flash(
        &case,
        &[&esp],
        &["--offset", "0x9000", "--manifest-path", "Cargo.toml"],
    );
    assert_fails(&out, &["give one or the other"]);
    let out = case.run(&["mfg", "log", "--ledger", "nowhere.sqlite"]);
    assert_fails(&out, &["no ledger at", "nowhere.sqlite", "mfg generate"]);
    assert!(!case.exists("nowhere.sqlite"), "a ledger was made");
    assert_eq!(esp.sessions(), 0, "the chip was never opened");
}

#[test]
fn a_device_with_its_own_key_gets_the_key_into_nvs_keys() {
    let case = batch_with(&["--keygen"]);
    let esp = Config::esp32c3().mac(MAC_A).start();
    // An offset alone has no place for the key: refused before connecting.
    let out = flash(&case, &[&esp], &["--offset", "0x9000"]);
    assert_fails(&out, &["keys/keys-dev-SN1.bin", "nvs_keys"]);
    assert_eq!(esp.sessions(), 0);

    case.file(
        "partitions.csv",
        "nvs, data, nvs, 0x9000, 0x3000\nnvs_keys, data, nvs_keys, 0xc000, 0x1000\nfactory, app, factory, 0x10000, 1M\n",
    );
    let blank = esp.flash();
    let out = flash_table_nvs(&case, &esp);
    assert_ok(&out);
    same(&esp.read(0x9000, 0x3000), &image(&case, "SN1"), "nvs");
    let key = std::fs::read(case.dir.path().join("out/keys/keys-dev-SN1.bin")).unwrap();
    same(&esp.read(0xc000, key.len()), &key, "nvs_keys");
    assert!(changed_outside(&esp, &blank, 0x9000, 0x4000).is_empty());
    assert_eq!(esp.flash_end_count(), 1, "image and key in one write");

    // A chip whose nvs_keys hold other keys (its encrypted data needs them): refused.
    let other = Config::esp32c3()
        .mac([0x7c, 0xdf, 0xa1, 0, 0, 0x33])
        .preset(0xc000, vec![0x42; 64])
        .start();
    let out = flash_table_nvs(&case, &other);
    assert_fails(
        &out,
        &[
            "nvs_keys partition at 0xc000",
            "holds other keys",
            "--force",
        ],
    );
    same(&other.read(0xc000, 64), &[0x42; 64], "kept keys");
    same(
        &other.read(0x9000, 0x3000),
        &[0xFF; 0x3000],
        "nothing written",
    );
}

#[test]
fn an_hmac_protected_device_gets_only_its_image_and_a_note_about_the_efuse() {
    let case = batch_with(&["--keygen", "--key-protect-hmac", "--kp-hmac-keygen"]);
    // A table with nvs_keys: the derived key must still not be written there in plaintext.
    case.file(
        "partitions.csv",
        "nvs, data, nvs, 0x9000, 0x3000\nnvs_keys, data, nvs_keys, 0xc000, 0x1000\nfactory, app, factory, 0x10000, 1M\n",
    );
    let esp = Config::esp32c3().mac(MAC_A).start();
    let blank = esp.flash();
    let out = flash_table_nvs(&case, &esp);
    assert_ok(&out);
    same(&esp.read(0x9000, 0x3000), &image(&case, "SN1"), "nvs");
    assert!(
        changed_outside(&esp, &blank, 0x9000, 0x3000).is_empty(),
        "something besides the image was written (the derived key?)"
    );
    assert!(
        stderr(&out).contains("hmac-keys-dev-SN1.bin") && stderr(&out).contains("HMAC_UP"),
        "{}",
        stderr(&out)
    );
    // Without nvs_keys in the table (the usual HMAC setup) it flashes too.
    let esp = Config::esp32c3().mac(MAC_B).start();
    assert_ok(&flash(&case, &[&esp], &["--offset", "0x9000"]));
    same(&esp.read(0x9000, 0x3000), &image(&case, "SN2"), "nvs");
}

/// A second batch (SN4, SN5) into `out2`, the same product (config): the same ledger.
fn second_batch(case: &Case) {
    case.file("values2.csv", "id,serial,num\n4,SN4,4\n5,SN5,5\n");
    let args = [
        "mfg",
        "generate",
        "config.csv",
        "values2.csv",
        "dev",
        "0x3000",
        "--fileid",
        "serial",
        "--out-dir",
        "out2",
    ];
    assert_ok(&case.run(&args));
}

#[test]
fn out_dir_flashes_only_its_batch_and_without_it_every_batch_takes_part() {
    let case = batch();
    second_batch(&case);
    let esp = Config::esp32c3().mac(MAC_A).start();
    let other = Config::esp32c3().mac(MAC_B).start();
    let third = Config::esp32c3().mac(MAC_C).start();
    let batch2 = Some("out2");
    for (esp, id) in [(&esp, "SN4"), (&other, "SN5")] {
        let out = flash_from(&case, batch2, &[esp], &["--next", "--offset", "0x9000"]);
        assert_ok(&out);
        let image = std::fs::read(case.dir.path().join(format!("out2/bin/dev-{id}.bin"))).unwrap();
        same(&esp.read(0x9000, 0x3000), &image, id);
    }
    // Batch 2 is done; batch 1's devices are never taken for it.
    let blank = third.flash();
    let out = flash_from(&case, batch2, &[&third], &["--next", "--offset", "0x9000"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    for needle in ["nothing left to flash", "every device of the batch", "out2"] {
        assert!(stderr(&out).contains(needle), "{}", stderr(&out));
    }
    // Where each batch stands.
    let status = bin()
        .args(["mfg", "status", "--format", "json", "--ledger"])
        .arg(case.dir.path().join("ledger.sqlite"))
        .output()
        .unwrap();
    assert_ok(&status);
    let doc: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let batches = doc["batches"].as_array().unwrap();
    assert_eq!(batches.len(), 2, "{doc}");
    let (one, two) = (&batches[0], &batches[1]);
    assert_eq!(
        (one["issued"].as_u64(), one["flashed"].as_u64()),
        (Some(3), Some(0)),
        "{doc}"
    );
    assert_eq!(
        (two["issued"].as_u64(), two["remaining"].as_u64()),
        (Some(2), Some(0)),
        "{doc}"
    );
    assert_eq!(doc["total"]["remaining"], 3, "{doc}");
    let text = bin()
        .args(["mfg", "status", "--out-dir", "out2"])
        .current_dir(case.dir.path())
        .output()
        .unwrap();
    assert_ok(&text);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("remaining") && text.contains("out2") && !text.contains("/out\n"),
        "{text}"
    );
    let out = flash_from(
        &case,
        batch2,
        &[&third],
        &["--device", "SN1", "--offset", "0x9000"],
    );
    assert_fails(
        &out,
        &["`SN1` was issued into the batch", "/out`", "not flashed"],
    );
    // A ledger that never saw the batch (an empty one here) says so.
    case.file("other.sqlite", "");
    let out = flash_from(
        &case,
        batch2,
        &[&third],
        &["--next", "--offset", "0x9000", "--ledger", "other.sqlite"],
    );
    assert_fails(
        &out,
        &["other.sqlite", "has no devices issued into", "out2"],
    );
    assert!(third.flash() == blank, "a chip was written");
    let flashed: Vec<String> = log(&case).into_iter().map(|r| r[1].clone()).collect();
    assert_eq!(flashed, ["SN4", "SN5"]);

    // Without --out-dir every batch takes part (the oldest first); the ledger comes from
    // NVS_LEDGER, or --ledger.
    let mut command = bin();
    let out = command
        .args([
            "mfg",
            "flash",
            "--next",
            "--offset",
            "0x9000",
            "--port",
            third.path(),
        ])
        .args(["--before", "no-reset", "--after", "no-reset", "--no-stub"])
        .env("NVS_LEDGER", case.dir.path().join("ledger.sqlite"))
        .current_dir(case.dir.path())
        .output()
        .unwrap();
    third.settle();
    assert_ok(&out);
    same(&third.read(0x9000, 0x3000), &image(&case, "SN1"), "SN1");
    let fourth = Config::esp32c3()
        .mac([0x7c, 0xdf, 0xa1, 0, 0, 0x0d])
        .start();
    let out = flash_from(
        &case,
        None,
        &[&fourth],
        &["--next", "--offset", "0x9000", "--ledger", "ledger.sqlite"],
    );
    assert_ok(&out);
    same(&fourth.read(0x9000, 0x3000), &image(&case, "SN2"), "SN2");
    let flashed: Vec<String> = log(&case).into_iter().map(|r| r[1].clone()).collect();
    assert_eq!(flashed, ["SN4", "SN5", "SN1", "SN2"]);
}

#[test]
fn a_batch_of_an_older_version_with_its_own_ledger_is_flashed_through_its_manifest() {
    // As an older cargo-nvs left it: a schema 2 ledger in the out dir, named in manifest.json
    // relative to where `mfg generate` ran.
    let case = batch_with(&["--ledger", "out/ledger.sqlite"]);
    let dir = case.dir.path();
    let ledger = dir.join("out/ledger.sqlite");
    let db = rusqlite::Connection::open(&ledger).unwrap();
    db.execute_batch(
        "ALTER TABLE devices DROP COLUMN batch_dir; DROP TABLE batches;
         PRAGMA user_version = 2;",
    )
    .unwrap();
    drop(db);
    let manifest = dir.join("out/manifest.json");
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    json["ledger"] = "out/ledger.sqlite".into();
    std::fs::write(&manifest, serde_json::to_vec_pretty(&json).unwrap()).unwrap();

    // Flashed from inside the out dir: the manifest's relative path is not from here.
    let esp = Config::esp32c3().mac(MAC_A).start();
    let out = bin()
        .args([
            "mfg",
            "flash",
            "--out-dir",
            ".",
            "--next",
            "--offset",
            "0x9000",
        ])
        .args(["--port", esp.path()])
        .args(["--before", "no-reset", "--after", "no-reset", "--no-stub"])
        .current_dir(dir.join("out"))
        .output()
        .unwrap();
    esp.settle();
    assert_ok(&out);
    same(&esp.read(0x9000, 0x3000), &image(&case, "SN1"), "SN1");
    // Upgraded in place: its devices belong to the out dir.
    let db = rusqlite::Connection::open(&ledger).unwrap();
    let version: i64 = db
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, 5);
    let dirs: Vec<String> = db
        .prepare("SELECT DISTINCT batch_dir FROM devices")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        dirs,
        [dir.join("out")
            .canonicalize()
            .unwrap()
            .display()
            .to_string()]
    );
    assert_eq!(log(&case).len(), 1);
}

/// A line of four stations (separate processes, two boards each) sharing one PostgreSQL ledger
/// flashes a 400-device batch, boards swapped after every pass: every device once, every chip
/// holding its device's image, 400 `ok` rows, no MAC or id twice, then "nothing left" (exit 3).
#[test]
fn four_stations_sharing_a_postgres_ledger_flash_every_device_once() {
    let Some(url) = support::postgres_database("stations") else {
        return;
    };
    let case = Case::new();
    let mut values = String::from("id,serial,num\n");
    for n in 1..=400 {
        values.push_str(&format!("{n},SN{n},{}\n", n % 200));
    }
    case.file("config.csv", CONFIG).file("values.csv", values);
    let generate = [
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
        "--ledger",
    ];
    let mut args: Vec<&str> = generate.to_vec();
    args.push(&url);
    assert_ok(&case.run(&args));

    let mut chips: HashMap<String, Vec<u8>> = HashMap::new();
    for round in 0u8.. {
        assert!(round < 80, "the line never finished");
        let boards: Vec<FakeEsp> = (0..8u8)
            .map(|i| {
                Config::esp32c3()
                    .mac([0x7c, 0xdf, 0xa1, 0x40, round, i])
                    .start()
            })
            .collect();
        let stations: Vec<std::process::Child> = boards
            .chunks(2)
            .map(|pair| {
                bin()
                    .args(["mfg", "flash", "--out-dir", "out", "--offset", "0x9000"])
                    .args(["--before", "no-reset", "--after", "no-reset", "--no-stub"])
                    .args([
                        "--ledger",
                        &url,
                        "--port",
                        pair[0].path(),
                        "--port",
                        pair[1].path(),
                    ])
                    .current_dir(case.dir.path())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let outs: Vec<Output> = stations
            .into_iter()
            .map(|s| s.wait_with_output().unwrap())
            .collect();
        for out in &outs {
            assert!(
                matches!(out.status.code(), Some(0 | 3)),
                "round {round}: {}",
                stderr(out)
            );
        }
        for (index, board) in boards.iter().enumerate() {
            board.settle();
            let nvs = board.read(0x9000, 0x3000);
            if nvs.iter().any(|&b| b != 0xFF) {
                let mac = mac_text([0x7c, 0xdf, 0xa1, 0x40, round, index as u8]);
                chips.insert(mac, nvs);
            }
        }
        if outs.iter().all(|o| o.status.code() == Some(3)) {
            break;
        }
    }
    let rows = log_of(&url);
    assert_eq!(rows.len(), 400, "one ok row per device");
    let (mut macs, mut ids): (Vec<&str>, Vec<&str>) =
        rows.iter().map(|(m, d)| (m.as_str(), d.as_str())).unzip();
    macs.sort();
    macs.dedup();
    ids.sort();
    ids.dedup();
    assert_eq!((macs.len(), ids.len()), (400, 400), "a MAC or an id twice");
    assert_eq!(chips.len(), 400);
    for (mac, device) in &rows {
        let expected =
            std::fs::read(case.dir.path().join(format!("out/bin/dev-{device}.bin"))).unwrap();
        same(&chips[mac], &expected, &format!("{device} on {mac}"));
    }
}

/// The production log in a PostgreSQL ledger: (MAC, device) of every `ok` row.
fn log_of(url: &str) -> Vec<(String, String)> {
    let url = url.replace("?sslmode=disable", "");
    let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    client
        .query(
            "SELECT mac, device FROM nvs_flash_log WHERE result = 'ok' ORDER BY id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Runs `mfg generate` of the three-device batch into `out/` with the ledger `url`.
fn postgres_batch(url: &str) -> Case {
    let case = Case::new();
    case.file("config.csv", CONFIG).file("values.csv", VALUES);
    let mut args = vec![
        "mfg",
        "generate",
        "config.csv",
        "values.csv",
        "dev",
        "0x3000",
    ];
    args.extend(["--fileid", "serial", "--out-dir", "out", "--ledger", url]);
    assert_ok(&case.run(&args));
    case
}

/// `mfg flash` of the batch with the ledger `url` onto `esp`, with `extra` options.
fn flash_postgres(case: &Case, url: &str, esp: &FakeEsp, extra: &[&str]) -> std::process::Command {
    let mut command = bin();
    command
        .args([
            "mfg",
            "flash",
            "--out-dir",
            "out",
            "--offset",
            "0x9000",
            "--ledger",
            url,
        ])
        .args(["--before", "no-reset", "--after", "no-reset", "--no-stub"])
        .args(["--port", esp.path()])
        .args(extra)
        .current_dir(case.dir.path());
    command
}

/// A station killed in the middle of writing: the chip may hold the device, so no other chip
/// gets it; the operator finishes it on that chip and it ends up flashed once.
#[test]
fn a_station_killed_mid_flash_leaves_its_device_to_its_chip() {
    let Some(url) = support::postgres_database("killed") else {
        return;
    };
    let case = postgres_batch(&url);
    // The chip stops answering in the middle of the image: the station waits for it.
    let a = Config::esp32c3()
        .mac(MAC_A)
        .fault(Fault::DropReply {
            op: Some(0x03),
            nth: 4,
        })
        .start();
    let mut station = flash_postgres(&case, &url, &a, &[])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while a.count(0x03) < 4 && started.elapsed() < std::time::Duration::from_secs(20) {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    station.kill().unwrap();
    station.wait().unwrap();
    a.set_faults(Vec::new());
    a.reset();

    // The next station takes the next device, and says which one waits for its chip.
    let b = Config::esp32c3().mac(MAC_B).start();
    let out = flash_postgres(&case, &url, &b, &[]).output().unwrap();
    b.settle();
    assert_ok(&out);
    assert!(stderr(&out).contains("`SN1` on MAC"), "{}", stderr(&out));
    same(&b.read(0x9000, 0x3000), &image(&case, "SN2"), "b");
    // Back on its own chip, SN1 is written, verified and logged.
    let out = flash_postgres(&case, &url, &a, &["--device", "SN1"])
        .output()
        .unwrap();
    a.settle();
    assert_ok(&out);
    same(&a.read(0x9000, 0x3000), &image(&case, "SN1"), "a");
    let rows = log_of(&url);
    assert_eq!(
        rows,
        vec![
            (mac_text(MAC_B), "SN2".to_owned()),
            (mac_text(MAC_A), "SN1".to_owned())
        ]
    );
}

/// The ledger server goes away: the station stops with an error naming the ledger and records
/// nothing; once the server is back the batch completes, every device once.
#[test]
fn a_station_without_its_ledger_server_stops_and_the_batch_completes_later() {
    let Some(url) = support::postgres_database("outage") else {
        return;
    };
    let case = postgres_batch(&url);
    let database = url
        .rsplit_once('/')
        .map(|(_, db)| db.split('?').next().unwrap_or(db).to_owned())
        .unwrap();
    let admin = std::env::var("NVS_TEST_POSTGRES").unwrap();
    let mut admin = postgres::Client::connect(&admin, postgres::NoTls).unwrap();
    let outage = |admin: &mut postgres::Client, down: bool| {
        admin
            .batch_execute(&format!(
                "ALTER DATABASE {database} ALLOW_CONNECTIONS {}",
                !down
            ))
            .unwrap();
        if down {
            admin
                .execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                    &[&database],
                )
                .unwrap();
        }
    };
    outage(&mut admin, true);
    let a = Config::esp32c3().mac(MAC_A).start();
    let blank = a.flash();
    let out = flash_postgres(&case, &url, &a, &[]).output().unwrap();
    a.settle();
    assert_fails(&out, &["ledger server 127.0.0.1:", &database]);
    assert!(a.flash() == blank, "written without a ledger");
    outage(&mut admin, false);
    for (mac, id) in [(MAC_A, "SN1"), (MAC_B, "SN2"), (MAC_C, "SN3")] {
        let esp = Config::esp32c3().mac(mac).start();
        let out = flash_postgres(&case, &url, &esp, &[]).output().unwrap();
        esp.settle();
        assert_ok(&out);
        same(&esp.read(0x9000, 0x3000), &image(&case, id), id);
    }
    assert_eq!(log_of(&url).len(), 3);
}

/// `mfg ledger migrate`: the copy refuses the batch's ids for reissue, and `mfg flash` goes on
/// from it; a non-empty ledger of something else is refused as a target.
#[test]
fn a_migrated_ledger_refuses_reissue_and_flashes_on() {
    let case = batch();
    let esp = Config::esp32c3().mac(MAC_A).start();
    assert_ok(&flash(&case, &[&esp], &["--next", "--offset", "0x9000"]));
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
    assert!(stderr(&out).contains("3 device(s)"), "{}", stderr(&out));
    // The same values again, into the copy: every id is refused, nothing written.
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
        "again",
        "--ledger",
        "copy.sqlite",
    ]);
    assert_fails(&out, &["already issued", "SN1", "copy.sqlite"]);
    assert!(!case.exists("again/bin/dev-SN1.bin"));
    // Flashing goes on from the copy: SN1 is flashed already, SN2 is next.
    let other = Config::esp32c3().mac(MAC_B).start();
    assert_ok(&flash(
        &case,
        &[&other],
        &["--next", "--offset", "0x9000", "--ledger", "copy.sqlite"],
    ));
    same(
        &other.read(0x9000, 0x3000),
        &image(&case, "SN2"),
        "SN2 from the copy",
    );
    // Into a ledger of another product: refused.
    let elsewhere = Case::new();
    elsewhere
        .file("config.csv", CONFIG)
        .file("values.csv", "id,serial,num\n1,X1,1\n");
    assert_ok(&elsewhere.run(&[
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
    ]));
    let foreign = elsewhere.dir.path().join("ledger.sqlite");
    let out = case.run(&[
        "mfg",
        "ledger",
        "migrate",
        "--from",
        "ledger.sqlite",
        "--to",
        foreign.to_str().unwrap(),
    ]);
    assert_fails(
        &out,
        &[
            "is not empty and is not an earlier copy",
            "nothing was copied",
        ],
    );
}

/// `--store-images` needs to know where the images go, and they must fit there; roles are for
/// a PostgreSQL ledger. Each refusal writes nothing.
#[test]
fn storing_images_needs_a_partition_they_fit_and_roles_need_postgres() {
    let case = Case::new();
    case.file("config.csv", CONFIG)
        .file("values.csv", VALUES)
        .file("small.csv", "nvs, data, nvs, 0x9000, 0x2000,\n");
    let generate = |extra: &[&str]| {
        let mut args = vec![
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
            "--store-images",
        ];
        args.extend_from_slice(extra);
        case.run(&args)
    };
    let refusals: [(&[&str], &[&str]); 3] = [
        (&[], &["--partition-table FILE and --partition NAME"]),
        (
            &["--partition-table", "small.csv", "--partition", "nvs"],
            &["0x3000 bytes", "larger than partition `nvs`"],
        ),
        (
            &["--partition-table", "small.csv", "--partition", "fctry"],
            &["fctry"],
        ),
    ];
    for (extra, needles) in refusals {
        assert_fails(&generate(extra), needles);
        assert!(
            !case.exists("out") && !case.exists("ledger.sqlite"),
            "{extra:?}"
        );
    }
    let out = case.run(&["mfg", "ledger", "init", "--ledger", "l.sqlite", "--roles"]);
    assert_fails(&out, &["a SQLite ledger has no roles"]);
    assert!(!case.exists("l.sqlite"));

    // A batch's images are all in the ledger or none are.
    case.file("table.csv", "nvs, data, nvs, 0x9000, 0x6000,\n")
        .file("moved.csv", "nvs, data, nvs, 0x10000, 0x6000,\n")
        .file("more.csv", "id,serial,num\n4,SN4,4\n");
    assert_ok(&generate(&[
        "--partition-table",
        "table.csv",
        "--partition",
        "nvs",
    ]));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(case.dir.path().join("ledger.sqlite")).unwrap();
        assert_eq!(
            mode.permissions().mode() & 0o777,
            0o600,
            "it holds keys and images"
        );
    }
    let more = |extra: &[&str]| {
        let mut args = vec!["mfg", "generate", "config.csv", "more.csv", "dev", "0x3000"];
        args.extend(["--fileid", "serial", "--out-dir", "out"]);
        args.extend_from_slice(extra);
        case.run(&args)
    };
    assert_fails(&more(&[]), &["keeps its images in the ledger"]);
    let moved = [
        "--store-images",
        "--partition-table",
        "moved.csv",
        "--partition",
        "nvs",
    ];
    assert_fails(&more(&moved), &["another partition table"]);
    assert!(!case.exists("out/bin/dev-SN4.bin"));
}
