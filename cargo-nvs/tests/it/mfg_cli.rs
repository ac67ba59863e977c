//! `cargo nvs mfg generate`: byte-identical to ESP-IDF's mfg_gen.py on the committed vectors,
//! keys per device or shared, and every refusal naming the input and leaving nothing behind.

use crate::support;

use std::path::Path;
use std::process::Output;

use crate::support::{
    Case, assert_ok, bin, ledger_devices, manifest_shas, stderr, tempdir, vectors,
};

const CONFIG: &str = "app,namespace,\nserial,data,string\nnum,data,u8\nregion,data,string,REPEAT\n";
const VALUES: &str = "id,serial,num,region\n1,SN1,1,EU\n2,SN2,2,\n3,SN3,3,\n";

fn mfg_dir() -> std::path::PathBuf {
    vectors().join("in/mfg")
}

/// Runs the command from `cwd`.
fn run_in(cwd: &Path, args: &[&str]) -> Output {
    bin().args(args).current_dir(cwd).output().unwrap()
}

/// The run failed, its message names every needle, and the out-dir holds nothing.
#[track_caller]
fn assert_refused(case: &Case, out: &Output, needles: &[&str]) {
    let text = stderr(out);
    assert!(!out.status.success(), "expected failure; stderr: {text}");
    assert!(!text.contains("panicked"), "{text}");
    for needle in needles {
        assert!(text.contains(needle), "stderr lacks {needle:?}:\n{text}");
    }
    for left in [
        "out/bin",
        "out/keys",
        "out/manifest.csv",
        "out/manifest.json",
    ] {
        assert!(!case.exists(left), "`{left}` was left behind:\n{text}");
    }
    if let Ok(entries) = std::fs::read_dir(case.dir.path().join("out")) {
        let names: Vec<_> = entries.map(|e| e.unwrap().file_name()).collect();
        assert!(names.is_empty(), "out/ holds {names:?}");
    }
}

/// `mfg generate config.csv values.csv dev 0x3000 --out-dir OUT_DIR EXTRA…`.
fn mfg_args(out_dir: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "mfg",
        "generate",
        "config.csv",
        "values.csv",
        "dev",
        "0x3000",
    ]
    .map(String::from)
    .into();
    args.extend(["--out-dir".to_owned(), out_dir.to_owned()]);
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

fn run_args(case: &Case, args: &[String]) -> Output {
    case.run(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn mfg(case: &Case, extra: &[&str]) -> Output {
    run_args(case, &mfg_args("out", extra))
}

fn case(config: &str, values: &str) -> Case {
    let case = Case::new();
    case.file("config.csv", config).file("values.csv", values);
    case
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A key file is private (0600) and the run never printed `secret` (in hex).
#[track_caller]
#[cfg_attr(not(unix), allow(unused_variables))]
fn assert_secret(path: &Path, secret: &[u8], out: &Output) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", path.display());
    }
    let hex = support::hex(secret);
    assert!(!String::from_utf8_lossy(&out.stdout).contains(&hex));
    assert!(!stderr(out).contains(&hex));
}

/// out/bin/dev-1.bin is what the generator makes of `csv` (device 1's CSV, as mfg_gen writes it).
#[track_caller]
fn assert_first_device_is_generators(case: &Case, csv: &str) {
    case.file("one.csv", csv);
    assert_ok(&case.run(&["generate", "one.csv", "one.bin", "0x3000"]));
    let dir = case.dir.path();
    assert_eq!(
        read(&dir.join("out/bin/dev-1.bin")),
        read(&dir.join("one.bin"))
    );
}

/// The same batch, plain, into `out_dir` (to compare with), recorded in a ledger of its own
/// (the product's has its ids already).
fn plain_run(case: &Case, out_dir: &str) {
    let ledger = format!("{out_dir}/ledger.sqlite");
    let args = mfg_args(out_dir, &["--fileid", "serial", "--ledger", &ledger]);
    assert_ok(&run_args(case, &args));
}

#[test]
fn matches_mfg_gen_on_the_committed_vectors() {
    let out = tempdir::Dir::new();
    let dir = out.path().to_str().unwrap();
    let result = run_in(
        &mfg_dir(),
        &[
            "mfg",
            "generate",
            "mfg_config.csv",
            "mfg_values_3.csv",
            "dev",
            "0x3000",
            "--out-dir",
            dir,
            // Not beside the committed config (the default).
            "--ledger",
            &format!("{dir}/ledger.sqlite"),
        ],
    );
    assert_ok(&result);
    for n in 1..=3 {
        let name = format!("bin/dev-{n}.bin");
        assert_eq!(
            read(&out.path().join(&name)),
            read(&vectors().join("out/mfg").join(&name)),
            "{name}"
        );
    }
    // Without --fileid the numbering repeats in every batch: warned.
    assert!(stderr(&result).contains("--fileid"), "{}", stderr(&result));
    assert!(stderr(&result).contains("devices/s"), "{}", stderr(&result));
    let names: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let mut names = names;
    names.sort();
    assert_eq!(
        names,
        ["bin", "ledger.sqlite", "manifest.csv", "manifest.json"],
        "no staging left"
    );
}

#[test]
fn matches_mfg_gen_with_fileid_and_prefix_num_in_both_spellings() {
    let expected = vectors().join("out/mfg_named/bin");
    for args in [
        &[
            "mfg",
            "generate",
            "mfg_config.csv",
            "mfg_values_3.csv",
            "dev",
            "0x3000",
            "--fileid",
            "serial_no",
            "--prefix_num",
            "7",
            "3",
            "--outdir",
        ][..],
        &[
            "mfg",
            "generate",
            "--config",
            "mfg_config.csv",
            "--values",
            "mfg_values_3.csv",
            "--prefix",
            "dev",
            "--size",
            "0x3000",
            "--fileid",
            "serial_no",
            "--prefix-num",
            "7",
            "3",
            "--out-dir",
        ][..],
    ] {
        let out = tempdir::Dir::new();
        let mut args = args.to_vec();
        args.push(out.path().to_str().unwrap());
        // Not beside the committed config (the default), and one per spelling.
        let ledger = out.path().join("ledger.sqlite");
        args.extend(["--ledger", ledger.to_str().unwrap()]);
        let result = run_in(&mfg_dir(), &args);
        assert_ok(&result);
        assert!(!stderr(&result).contains("warning"), "{}", stderr(&result));
        for entry in std::fs::read_dir(&expected).unwrap() {
            let name = entry.unwrap().file_name();
            assert_eq!(
                read(&out.path().join("bin").join(&name)),
                read(&expected.join(&name)),
                "{name:?}"
            );
        }
        let manifest = std::fs::read_to_string(out.path().join("manifest.csv")).unwrap();
        let lines: Vec<_> = manifest.lines().collect();
        assert_eq!(lines[0], "device,line,image,sha256,key_file");
        assert!(
            lines[1].starts_with("SN00000001,2,bin/dev-007-SN00000001.bin,"),
            "{manifest}"
        );
        assert_eq!(lines.len(), 4);
        let json: serde_json::Value =
            serde_json::from_slice(&read(&out.path().join("manifest.json"))).unwrap();
        assert_eq!(json["devices"][2]["image"], "bin/dev-009-SN00000003.bin");
        assert_eq!(json["devices"][2]["sha256"].as_str().unwrap().len(), 64);
    }
}

#[test]
fn repeat_values_come_from_the_first_row_and_match_the_generator() {
    let case = case(CONFIG, VALUES);
    assert_ok(&mfg(&case, &["--fileid", "serial"]));
    for n in 1..=3 {
        let csv = format!(
            "key,type,encoding,value\napp,namespace,,\nserial,data,string,SN{n}\nnum,data,u8,{n}\nregion,data,string,EU\n"
        );
        case.file(&format!("dev{n}.csv"), csv);
        let out = case.run(&[
            "generate",
            &format!("dev{n}.csv"),
            &format!("ref{n}.bin"),
            "0x3000",
        ]);
        assert_ok(&out);
        let dir = case.dir.path();
        assert_eq!(
            read(&dir.join(format!("out/bin/dev-SN{n}.bin"))),
            read(&dir.join(format!("ref{n}.bin")))
        );
    }
}

#[test]
fn i16_is_accepted_and_file_rows_resolve_against_the_current_directory() {
    let case = case(
        "app,namespace,\nt,data,i16\ncert,file,binary\n",
        "t,cert\n-32768,a.der\n32767,b.der\n",
    );
    case.file("a.der", b"\x01\x02").file("b.der", b"\x03");
    assert_ok(&mfg(&case, &[]));
    assert_first_device_is_generators(
        &case,
        "key,type,encoding,value\napp,namespace,,\nt,data,i16,-32768\ncert,file,binary,a.der\n",
    );
}

#[test]
fn keygen_writes_one_private_key_per_device_and_never_prints_it() {
    let case = case(CONFIG, VALUES);
    let out = mfg(&case, &["--fileid", "serial", "--keygen"]);
    assert_ok(&out);
    let dir = case.dir.path();
    let mut keys = Vec::new();
    for n in 1..=3 {
        let key_path = dir.join(format!("out/keys/keys-dev-SN{n}.bin"));
        let key = read(&key_path);
        assert_eq!(key.len(), 4096);
        assert_secret(&key_path, &key[..32], &out);
        keys.push(key);
        // The image decrypts with its own key to the plain image.
        let plain = case.run(&[
            "decrypt",
            &format!("out/bin/dev-SN{n}.bin"),
            &format!("out/keys/keys-dev-SN{n}.bin"),
            &format!("plain{n}.bin"),
        ]);
        assert_ok(&plain);
    }
    assert!(keys[0] != keys[1] && keys[1] != keys[2]);
    let manifest = std::fs::read_to_string(dir.join("out/manifest.csv")).unwrap();
    assert!(manifest.contains(",keys/keys-dev-SN2.bin\n"), "{manifest}");
    // The decrypted images equal plain mfg output.
    plain_run(&case, "plain");
    for n in 1..=3 {
        assert_eq!(
            read(&dir.join(format!("plain{n}.bin"))),
            read(&dir.join(format!("plain/bin/dev-SN{n}.bin")))
        );
    }
}

#[test]
fn hmac_keygen_gives_every_device_its_own_hmac_key_and_derived_keys() {
    let case = case(CONFIG, VALUES);
    let out = mfg(
        &case,
        &[
            "--fileid",
            "serial",
            "--keygen",
            "--key_protect_hmac",
            "--kp_hmac_keygen",
        ],
    );
    assert_ok(&out);
    let dir = case.dir.path();
    let mut hmac_keys = Vec::new();
    for n in 1..=3 {
        let hmac_path = dir.join(format!("out/keys/hmac-keys-dev-SN{n}.bin"));
        let hmac_key = read(&hmac_path);
        assert_eq!(hmac_key.len(), 32);
        assert_secret(&hmac_path, &hmac_key, &out);
        // The key file is the one `generate-key` derives from that HMAC key (whose derivation
        // the golden vectors pin to the reference's).
        let derived = format!("derived{n}.bin");
        assert_ok(&case.run(&[
            "generate-key",
            "--key-protect-hmac",
            "--kp-hmac-inputkey",
            hmac_path.to_str().unwrap(),
            "--keyfile",
            &derived,
        ]));
        assert_eq!(
            read(&dir.join(format!("out/keys/keys-dev-SN{n}.bin"))),
            read(&dir.join(&derived))
        );
        // The image reads back with the HMAC key alone.
        let dump = case.run(&[
            "dump",
            &format!("out/bin/dev-SN{n}.bin"),
            "--hmac-key",
            hmac_path.to_str().unwrap(),
        ]);
        assert_ok(&dump);
        assert!(String::from_utf8_lossy(&dump.stdout).contains(&format!("SN{n}")));
        hmac_keys.push(hmac_key);
    }
    assert!(hmac_keys[0] != hmac_keys[1] && hmac_keys[1] != hmac_keys[2]);
    let manifest = std::fs::read_to_string(dir.join("out/manifest.csv")).unwrap();
    assert!(
        manifest.starts_with("device,line,image,sha256,key_file,hmac_key_file\n")
            && manifest.contains(",keys/keys-dev-SN2.bin,keys/hmac-keys-dev-SN2.bin\n"),
        "{manifest}"
    );
}

#[test]
fn hmac_inputkey_derives_every_device_key_from_one_hmac_key() {
    let case = case(CONFIG, VALUES);
    let hmac = vectors().join("in/hmac_key_fixed.bin");
    let out = mfg(
        &case,
        &[
            "--keygen",
            "--key-protect-hmac",
            "--kp-hmac-inputkey",
            hmac.to_str().unwrap(),
        ],
    );
    assert_ok(&out);
    let dir = case.dir.path();
    assert!(!case.exists("out/keys/hmac-keys-dev-1.bin"));
    for n in 1..=3 {
        // The derived key file the reference makes from this HMAC key (a golden vector).
        assert_eq!(
            read(&dir.join(format!("out/keys/keys-dev-{n}.bin"))),
            read(&vectors().join("out/keys/hmac_derived_keys.bin"))
        );
    }
    // Deterministic: --resume compares the images and keeps them all.
    let again = mfg(
        &case,
        &[
            "--keygen",
            "--key-protect-hmac",
            "--kp-hmac-inputkey",
            hmac.to_str().unwrap(),
            "--resume",
        ],
    );
    assert_ok(&again);
    assert!(stderr(&again).contains("3 device(s) were finished by an earlier run"));
}

#[test]
fn refuses_hmac_options_that_cannot_work_in_mass_production() {
    let hmac = vectors().join("in/hmac_key_fixed.bin");
    let hmac = hmac.to_str().unwrap();
    let keys = vectors().join("in/keys_fixed.bin");
    for (extra, needle) in [
        (
            vec![
                "--keygen",
                "--key-protect-hmac",
                "--kp-hmac-keygen",
                "--kp-hmac-keyfile",
                "h.bin",
            ],
            "--kp-hmac-keyfile names one file",
        ),
        (
            vec!["--key-protect-hmac", "--kp-hmac-keygen"],
            "need --keygen",
        ),
        (
            vec!["--inputkey", keys.to_str().unwrap(), "--key-protect-hmac"],
            "need --keygen",
        ),
        (vec!["--keygen", "--key-protect-hmac"], "needs an HMAC key"),
        (
            vec!["--keygen", "--kp-hmac-inputkey", hmac],
            "need --key-protect-hmac",
        ),
    ] {
        let case = case(CONFIG, VALUES);
        let out = mfg(&case, &extra);
        assert_refused(&case, &out, &[needle]);
    }
}

#[test]
fn inputkey_encrypts_every_device_with_the_same_key() {
    let case = case(CONFIG, VALUES);
    let key = vectors().join("in/keys_fixed.bin");
    let out = mfg(&case, &["--inputkey", key.to_str().unwrap()]);
    assert_ok(&out);
    assert!(!case.exists("out/keys"));
    for n in 1..=3 {
        let csv = format!(
            "key,type,encoding,value\napp,namespace,,\nserial,data,string,SN{n}\nnum,data,u8,{n}\nregion,data,string,EU\n"
        );
        case.file(&format!("dev{n}.csv"), csv);
        assert_ok(&case.run(&[
            "encrypt",
            &format!("dev{n}.csv"),
            &format!("ref{n}.bin"),
            "0x3000",
            "--inputkey",
            key.to_str().unwrap(),
        ]));
        let dir = case.dir.path();
        assert_eq!(
            read(&dir.join(format!("out/bin/dev-{n}.bin"))),
            read(&dir.join(format!("ref{n}.bin")))
        );
    }
}

#[test]
fn refuses_a_config_key_missing_from_the_values_header() {
    let case = case(CONFIG, "id,serial,region\n1,SN1,EU\n");
    let out = mfg(&case, &[]);
    assert_refused(
        &case,
        &out,
        &["config.csv:3", "`num`", "not a column", "values.csv"],
    );
}

#[test]
fn refuses_keys_out_of_config_order() {
    let case = case(CONFIG, "num,serial,region\n1,SN1,EU\n");
    let out = mfg(&case, &[]);
    assert_refused(&case, &out, &["config.csv:3", "`num`", "config order"]);
}

#[test]
fn refuses_a_values_row_with_the_wrong_field_count() {
    let case = case(CONFIG, "id,serial,num,region\n1,SN1,1,EU\n\n2,SN2,2\n");
    let out = mfg(&case, &[]);
    assert_refused(
        &case,
        &out,
        &["values.csv:4", "3 field(s)", "has 4", "`region`"],
    );
    let case = self::case(CONFIG, "id,serial,num,region\n1,SN1,1,EU,extra\n");
    let out = mfg(&case, &[]);
    assert_refused(&case, &out, &["values.csv:2", "5 field(s)", "`region`"]);
}

#[test]
fn refuses_invalid_types_encodings_and_rows() {
    for (config, needles) in [
        (
            "app,namespace,\nk,blob,string\n",
            &["config.csv:2", "invalid type `blob`"][..],
        ),
        (
            "app,namespace,\nk,data,float\n",
            &["config.csv:2", "invalid encoding `float`"],
        ),
        (
            "app,namespace,\nk,data,STRING\n",
            &["config.csv:2", "invalid encoding"],
        ),
        (
            "app,namespace,\nk,data,blob_fill(4;0x00)\n",
            &["config.csv:2", "invalid encoding"],
        ),
        ("app,namespace,\nk,data\n", &["config.csv:2", "2 field(s)"]),
        (
            "app,namespace,\nk,data,u8,ONCE\n",
            &["config.csv:2", "4 field(s)"],
        ),
        ("k,data,u8\n", &["config.csv:1", "before any namespace"]),
        (
            "app,namespace,,REPEAT\nk,data,u8\n",
            &["config.csv:1", "REPEAT"],
        ),
    ] {
        let case = case(config, "k\n1\n");
        let out = mfg(&case, &[]);
        assert_refused(&case, &out, needles);
    }
}

#[test]
fn refuses_empty_files() {
    let case = case("", VALUES);
    assert_refused(&case, &mfg(&case, &[]), &["config.csv", "empty"]);
    let case = self::case(CONFIG, "");
    assert_refused(&case, &mfg(&case, &[]), &["values.csv", "empty"]);
    let case = self::case(CONFIG, "id,serial,num,region\n\n");
    assert_refused(&case, &mfg(&case, &[]), &["values.csv", "no device rows"]);
    let case = self::case("\n  \n", VALUES);
    assert_refused(&case, &mfg(&case, &[]), &["config.csv", "empty"]);
}

#[test]
fn refuses_a_missing_fileid_column() {
    let case = case(CONFIG, VALUES);
    let out = mfg(&case, &["--fileid", "serial_no"]);
    assert_refused(
        &case,
        &out,
        &["values.csv:1", "--fileid column `serial_no`", "id,serial"],
    );
}

#[test]
fn refuses_a_value_out_of_range_naming_the_device_row() {
    let case = case(
        CONFIG,
        "id,serial,num,region\n1,SN1,1,EU\n2,SN2,2,\n3,SN3,256,\n",
    );
    let out = mfg(&case, &["--fileid", "serial"]);
    assert_refused(
        &case,
        &out,
        &[
            "values.csv:4",
            "device `SN3`",
            "column `num`",
            "config.csv:3",
            "out of range",
        ],
    );
    assert!(!stderr(&out).contains("256"), "values are never echoed");
    let case = self::case(CONFIG, "id,serial,num,region\n1,SN1,x,EU\n");
    assert_refused(&case, &mfg(&case, &[]), &["values.csv:2", "column `num`"]);
}

#[test]
fn refuses_a_value_too_long_for_the_partition_naming_the_device_row() {
    let big = "00".repeat(9000);
    let values = format!("id,blob\n1,00\n2,{big}\n");
    let case = case("app,namespace,\nblob,data,hex2bin\n", &values);
    let out = mfg(&case, &[]);
    assert_refused(
        &case,
        &out,
        &["values.csv:3", "device `2`", "column `blob`"],
    );
}

#[test]
fn refuses_an_out_dir_that_cannot_be_written() {
    let case = case(CONFIG, VALUES);
    case.file("taken", "a file, not a folder");
    let out = case.run(&[
        "mfg",
        "generate",
        "config.csv",
        "values.csv",
        "dev",
        "0x3000",
        "--out-dir",
        "taken",
    ]);
    let text = stderr(&out);
    assert!(!out.status.success());
    assert!(text.contains("cannot write to out-dir `taken`"), "{text}");
    assert_eq!(
        read(&case.dir.path().join("taken")),
        b"a file, not a folder"
    );
}

#[test]
fn refuses_duplicate_ids_naming_both_lines() {
    let case = case(
        CONFIG,
        "id,serial,num,region\n1,SN1,1,EU\n2,SN2,2,\n\n3,SN1,3,\n",
    );
    let out = mfg(&case, &["--fileid", "serial"]);
    assert_refused(
        &case,
        &out,
        &["values.csv:5", "`SN1`", "line 2", "column `serial`"],
    );
}

#[test]
fn refuses_ids_that_are_not_file_names_and_existing_images() {
    let case = case(CONFIG, "id,serial,num,region\n1,../x,1,EU\n");
    let out = mfg(&case, &["--fileid", "serial"]);
    assert_refused(
        &case,
        &out,
        &["values.csv:2", "column `serial`", "file name"],
    );

    let case = self::case(CONFIG, VALUES);
    assert_ok(&mfg(&case, &[]));
    let before = read(&case.dir.path().join("out/bin/dev-2.bin"));
    let again = mfg(&case, &[]);
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("already exists"),
        "{}",
        stderr(&again)
    );
    assert_eq!(read(&case.dir.path().join("out/bin/dev-2.bin")), before);
}

#[test]
fn refuses_mixed_or_missing_positionals() {
    let case = case(CONFIG, VALUES);
    let out = case.run(&["mfg", "generate", "config.csv", "--config", "config.csv"]);
    assert!(stderr(&out).contains("both"), "{}", stderr(&out));
    let out = case.run(&["mfg", "generate", "config.csv", "values.csv", "dev"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("size is missing"), "{}", stderr(&out));
    let out = case.run(&[
        "mfg",
        "generate",
        "config.csv",
        "values.csv",
        "dev",
        "0x3000",
        "--keygen",
        "--inputkey",
        "k.bin",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

#[test]
fn warns_once_when_a_later_row_gives_a_repeat_key_another_value() {
    let case = case(
        CONFIG,
        "id,serial,num,region\n1,SN1,1,EU\n2,SN2,2,US\n3,SN3,3,JP\n",
    );
    let out = mfg(&case, &["--fileid", "serial"]);
    assert_ok(&out);
    let text = stderr(&out);
    assert_eq!(text.matches("REPEAT").count(), 1, "{text}");
    assert!(text.contains("values.csv:3: column `region`"), "{text}");
    assert!(
        !text.contains("US") && !text.contains("JP"),
        "values are never echoed: {text}"
    );
}

#[test]
fn blank_lines_are_skipped_and_errors_keep_the_file_line_numbers() {
    // mfg_gen drops whitespace-only lines, even inside a quoted value.
    let values = "id,serial,num,region\n\n1,\"S\n\n1\",1,EU\n  \n2,SN2,300,\n";
    let case = case(CONFIG, values);
    let out = mfg(&case, &[]);
    assert_refused(&case, &out, &["values.csv:7", "device `2`", "column `num`"]);
    let case = self::case(CONFIG, "id,serial,num,region\n1,\"S\n\n1\",1,EU\n");
    assert_ok(&mfg(&case, &[]));
    assert_first_device_is_generators(
        &case,
        "key,type,encoding,value\napp,namespace,,\nserial,data,string,\"S\n1\"\nnum,data,u8,1\nregion,data,string,EU\n",
    );
}

#[test]
fn the_ledger_records_every_id_and_refuses_a_reissue_before_writing() {
    let case = case(CONFIG, VALUES);
    assert_ok(&mfg(&case, &["--fileid", "serial"]));
    let dir = case.dir.path();
    // The product's ledger: beside the config, not in the out dir.
    assert!(!case.exists("out/ledger.sqlite"));
    let rows = ledger_devices(&dir.join("ledger.sqlite"));
    let shas = manifest_shas(&dir.join("out/manifest.csv"));
    assert_eq!(rows.len(), 3);
    for (device, image, sha, issues) in &rows {
        assert_eq!(image, &format!("bin/dev-{device}.bin"));
        assert_eq!(&shas[device], sha);
        assert_eq!(*issues, 1);
    }
    // The manifest names it by its absolute path (mfg flash --out-dir finds it so).
    let json: serde_json::Value =
        serde_json::from_slice(&read(&dir.join("out/manifest.json"))).unwrap();
    let recorded = Path::new(json["ledger"].as_str().unwrap());
    assert!(recorded.is_absolute(), "{recorded:?}");
    assert_eq!(recorded, dir.join("ledger.sqlite").canonicalize().unwrap());

    // Another batch into another out dir, with one id of the first batch: refused by default.
    case.file("more.csv", "id,serial,num,region\n4,SN4,4,EU\n\n5,SN2,5,\n");
    let more = |extra: &[&str]| {
        let mut args = vec![
            "mfg",
            "generate",
            "config.csv",
            "more.csv",
            "dev",
            "0x3000",
            "--fileid",
            "serial",
            "--out-dir",
            "more",
        ];
        args.extend_from_slice(extra);
        case.run(&args)
    };
    let out = more(&[]);
    assert!(!out.status.success());
    let text = stderr(&out);
    let first_batch = dir.join("out").canonicalize().unwrap();
    for needle in [
        "more.csv:4",
        "`SN2`",
        "already issued at 20",
        &format!("into `{}`", first_batch.display()),
        "values.csv:3",
        "--allow-reissue",
        "nothing was written",
    ] {
        assert!(text.contains(needle), "stderr lacks {needle:?}:\n{text}");
    }
    assert!(!text.contains("`SN4`"), "{text}");
    assert!(!case.exists("more"), "nothing is written");
    assert_eq!(ledger_devices(&dir.join("ledger.sqlite")).len(), 3);

    assert_ok(&more(&["--allow-reissue"]));
    let rows = ledger_devices(&dir.join("ledger.sqlite"));
    assert_eq!(rows.len(), 4);
    let sn2 = rows.iter().find(|r| r.0 == "SN2").unwrap();
    assert_eq!(sn2.3, 2, "issued twice, as allowed");
    assert_eq!(sn2.2, manifest_shas(&dir.join("more/manifest.csv"))["SN2"]);
}

#[test]
fn the_same_values_into_a_second_out_dir_are_refused_naming_every_id_and_the_first_batch() {
    let mut values = String::from("id,serial,num,region\n");
    for n in 0..20 {
        values.push_str(&format!("{n},SN{},{n},EU\n", 1000 + n));
    }
    let case = case(CONFIG, &values);
    let batch = |out_dir: &str| run_args(&case, &mfg_args(out_dir, &["--fileid", "serial"]));
    assert_ok(&batch("batch1"));
    let dir = case.dir.path();
    let ledger = dir.join("ledger.sqlite");
    let before = std::fs::read(&ledger).unwrap();
    let out = batch("batch2");
    let text = stderr(&out);
    assert!(!out.status.success(), "{text}");
    assert!(!text.contains("panicked"), "{text}");
    let batch1 = dir.join("batch1").canonicalize().unwrap();
    for needle in [
        "20 device id(s) of `values.csv` were already issued",
        &ledger.canonicalize().unwrap().display().to_string(),
        "values.csv:2: device `SN1000` was already issued",
        &format!("into `{}`", batch1.display()),
        "values.csv:11: device `SN1009`",
        "… and 10 more",
        "--allow-reissue",
        "nothing was written",
    ] {
        assert!(text.contains(needle), "stderr lacks {needle:?}:\n{text}");
    }
    assert!(!case.exists("batch2"), "nothing is written");
    assert_eq!(
        std::fs::read(&ledger).unwrap(),
        before,
        "the ledger is unchanged"
    );
    assert!(ledger_devices(&ledger).iter().all(|r| r.3 == 1));
}

#[test]
fn the_ledger_sits_beside_the_config_and_nvs_ledger_and_ledger_move_it() {
    let case = Case::new();
    std::fs::create_dir_all(case.dir.path().join("product")).unwrap();
    case.file("product/config.csv", CONFIG);
    case.file("values.csv", VALUES);
    let dir = case.dir.path();
    let run = |out_dir: &str, extra: &[&str], env: Option<&str>| {
        let mut command = bin();
        command
            .args(["mfg", "generate", "product/config.csv", "values.csv", "dev"])
            .args(["0x3000", "--fileid", "serial", "--out-dir", out_dir])
            .args(extra)
            .current_dir(dir);
        if let Some(env) = env {
            command.env("NVS_LEDGER", env);
        }
        command.output().unwrap()
    };
    assert_ok(&run("a", &[], None));
    assert_eq!(ledger_devices(&dir.join("product/ledger.sqlite")).len(), 3);
    // NVS_LEDGER names another ledger (relative to the current directory): the ids are new
    // there.
    assert_ok(&run("b", &[], Some("env.sqlite")));
    assert_eq!(ledger_devices(&dir.join("env.sqlite")).len(), 3);
    let json: serde_json::Value =
        serde_json::from_slice(&read(&dir.join("b/manifest.json"))).unwrap();
    assert_eq!(
        Path::new(json["ledger"].as_str().unwrap()),
        dir.join("env.sqlite").canonicalize().unwrap()
    );
    // An empty NVS_LEDGER is no setting: the product's ledger refuses the ids.
    let out = run("c", &[], Some(""));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("product/ledger.sqlite"),
        "{}",
        stderr(&out)
    );
    // --ledger beats NVS_LEDGER.
    assert_ok(&run("d", &["--ledger", "flag.sqlite"], Some("env.sqlite")));
    assert_eq!(ledger_devices(&dir.join("flag.sqlite")).len(), 3);
    assert_eq!(ledger_devices(&dir.join("env.sqlite")).len(), 3);
    // A ledger whose folder does not exist is refused before anything is written.
    let out = run("e", &["--ledger", "nowhere/l.sqlite"], None);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("nowhere") && stderr(&out).contains("does not exist"),
        "{}",
        stderr(&out)
    );
    assert!(!case.exists("e"));
}

#[test]
fn an_out_dir_with_a_ledger_of_its_own_is_refused_unless_it_is_named() {
    // As an older cargo-nvs left a batch: its ledger in the out dir.
    let case = case(CONFIG, VALUES);
    let old = mfg(
        &case,
        &["--fileid", "serial", "--ledger", "out/ledger.sqlite"],
    );
    assert_ok(&old);
    let dir = case.dir.path();
    std::fs::remove_file(dir.join("out/bin/dev-SN3.bin")).unwrap();
    let db = rusqlite::Connection::open(dir.join("out/ledger.sqlite")).unwrap();
    db.execute("DELETE FROM devices WHERE device = 'SN3'", [])
        .unwrap();
    drop(db);
    // Resuming it with the product's ledger would not see its devices.
    let out = mfg(&case, &["--fileid", "serial", "--resume"]);
    assert!(!out.status.success());
    let text = stderr(&out);
    assert!(
        text.contains("out/ledger.sqlite` is this out dir's own ledger")
            && text.contains("--ledger"),
        "{text}"
    );
    assert!(!case.exists("ledger.sqlite"), "nothing is written");
    assert!(!case.exists("out/bin/dev-SN3.bin"));
    let out = mfg(
        &case,
        &[
            "--fileid",
            "serial",
            "--resume",
            "--ledger",
            "out/ledger.sqlite",
        ],
    );
    assert_ok(&out);
    assert!(
        stderr(&out).contains("2 device(s) were finished"),
        "{}",
        stderr(&out)
    );
    assert_eq!(ledger_devices(&dir.join("out/ledger.sqlite")).len(), 3);
}

#[test]
fn row_numbered_ids_are_recorded_by_image_name() {
    let case = case(CONFIG, VALUES);
    let out = mfg(&case, &[]);
    assert_ok(&out);
    assert!(stderr(&out).contains("ledger"), "{}", stderr(&out));
    let devices: Vec<String> = ledger_devices(&case.dir.path().join("ledger.sqlite"))
        .into_iter()
        .map(|r| r.0)
        .collect();
    assert_eq!(devices, ["dev-1", "dev-2", "dev-3"]);
    // Another prefix does not clash.
    let out = case.run(&[
        "mfg",
        "generate",
        "config.csv",
        "values.csv",
        "other",
        "0x3000",
        "--out-dir",
        "out",
    ]);
    assert_ok(&out);
    assert_eq!(
        ledger_devices(&case.dir.path().join("ledger.sqlite")).len(),
        6
    );
}

#[test]
fn resume_keeps_recorded_images_and_replaces_unrecorded_leftovers() {
    let case = case(CONFIG, VALUES);
    assert_ok(&mfg(&case, &["--fileid", "serial"]));
    let dir = case.dir.path();
    let clean: Vec<Vec<u8>> = (1..=3)
        .map(|n| read(&dir.join(format!("out/bin/dev-SN{n}.bin"))))
        .collect();
    let manifest = read(&dir.join("out/manifest.csv"));
    // A finished run resumes to nothing new.
    let out = mfg(&case, &["--fileid", "serial", "--resume"]);
    assert_ok(&out);
    assert!(
        stderr(&out).contains("3 device(s) were finished"),
        "{}",
        stderr(&out)
    );
    // SN2 written but not recorded (killed between the rename and the ledger), SN3 missing.
    let db = rusqlite::Connection::open(dir.join("ledger.sqlite")).unwrap();
    db.execute("DELETE FROM devices WHERE device IN ('SN2', 'SN3')", [])
        .unwrap();
    drop(db);
    std::fs::write(dir.join("out/bin/dev-SN2.bin"), b"stale").unwrap();
    std::fs::remove_file(dir.join("out/bin/dev-SN3.bin")).unwrap();
    std::fs::remove_file(dir.join("out/manifest.csv")).unwrap();
    // Without --resume the leftover is refused.
    let out = mfg(&case, &["--fileid", "serial"]);
    assert!(stderr(&out).contains("already exists"), "{}", stderr(&out));
    let out = mfg(&case, &["--fileid", "serial", "--resume"]);
    assert_ok(&out);
    assert!(
        stderr(&out).contains("1 device(s) were finished"),
        "{}",
        stderr(&out)
    );
    for n in 1..=3 {
        assert_eq!(
            read(&dir.join(format!("out/bin/dev-SN{n}.bin"))),
            clean[n - 1]
        );
    }
    assert_eq!(read(&dir.join("out/manifest.csv")), manifest);
    assert!(
        ledger_devices(&dir.join("ledger.sqlite"))
            .iter()
            .all(|r| r.3 == 1)
    );

    // An image recorded with other bytes than the values give now: refused, nothing written.
    case.file("values.csv", VALUES.replace("2,SN2,2,", "2,SN2,9,"));
    let out = mfg(&case, &["--fileid", "serial", "--resume"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("values.csv:3") && stderr(&out).contains("other values"),
        "{}",
        stderr(&out)
    );
    assert_eq!(read(&dir.join("out/bin/dev-SN2.bin")), clean[1]);
}

/// A well-mixed 64-bit hash (SplitMix64's finalizer).
fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Whether files in `dir` can be made unnamed and linked into place (Linux O_TMPFILE), as the
/// tool does.
fn unnamed_files_work(dir: &Path) -> bool {
    #[cfg(target_os = "linux")]
    {
        use nix::fcntl::{AT_FDCWD, AtFlags, OFlag, open};
        use std::os::fd::AsRawFd;
        let flags = OFlag::O_TMPFILE | OFlag::O_RDWR | OFlag::O_CLOEXEC;
        let Ok(fd) = open(dir, flags, nix::sys::stat::Mode::from_bits_truncate(0o600)) else {
            return false;
        };
        let probe = dir.join(".unnamed-probe");
        let source = format!("/proc/self/fd/{}", fd.as_raw_fd());
        let linked = nix::unistd::linkat(
            AT_FDCWD,
            source.as_str(),
            AT_FDCWD,
            &probe,
            AtFlags::AT_SYMLINK_FOLLOW,
        )
        .is_ok();
        let _ = std::fs::remove_file(&probe);
        linked
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = dir;
        false
    }
}

#[test]
fn a_killed_run_leaves_only_complete_images_and_resume_finishes_it() {
    const DEVICES: usize = 3000;
    let mut values = String::from("id,serial,num,region\n");
    for n in 0..DEVICES {
        values.push_str(&format!("{n},SN{n:06},{},EU\n", n % 200));
    }
    let case = case(CONFIG, &values);
    let dir = case.dir.path();
    // Every attempt is a batch of its own (the same ids): each with its own ledger, in its out
    // dir.
    let args = |out: &str| {
        let ledger = format!("{out}/ledger.sqlite");
        mfg_args(out, &["--fileid", "serial", "--ledger", &ledger])
    };
    assert_ok(&run_args(&case, &args("clean")));
    let clean_bin = dir.join("clean/bin");
    // Where unnamed files cannot be made, a kill may leave a named temporary file.
    let unnamed_files = unnamed_files_work(dir);

    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    let mut killed_mid_run = false;
    for attempt in 0..4u64 {
        let out = format!("out{attempt}");
        let mut child = bin()
            .args(args(&out))
            .current_dir(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Kill at a random point of the writing pass, chosen by progress (the number of images
        // in place), so that the machine's speed does not matter.
        let target = 1 + splitmix(seed.wrapping_add(attempt)) as usize % (DEVICES * 9 / 10);
        let bin_dir = dir.join(&out).join("bin");
        let images = || std::fs::read_dir(&bin_dir).map_or(0, |entries| entries.count());
        while images() < target && child.try_wait().unwrap().is_none() {
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        let finished = child.try_wait().unwrap().is_some();
        child.kill().unwrap();
        child.wait().unwrap();
        let out_dir = dir.join(&out);
        let bin_dir = out_dir.join("bin");

        // Only complete images under final names, each equal to the clean run's.
        let mut finals = 0;
        if bin_dir.exists() {
            for entry in std::fs::read_dir(&bin_dir).unwrap() {
                let name = entry.unwrap().file_name().into_string().unwrap();
                if name.starts_with('.') {
                    // On Linux an image has no name until it is complete (O_TMPFILE): a kill
                    // leaves no temporary file at all.
                    assert!(
                        !unnamed_files && name.ends_with(".tmp"),
                        "unexpected file {name}"
                    );
                    continue;
                }
                assert_eq!(
                    read(&bin_dir.join(&name)),
                    read(&clean_bin.join(&name)),
                    "{name} differs from the clean run's (killed at {target}+ images)"
                );
                finals += 1;
            }
        }
        let recorded = if out_dir.join("ledger.sqlite").exists() {
            ledger_devices(&out_dir.join("ledger.sqlite"))
        } else {
            Vec::new()
        };
        // Every recorded device has its complete image.
        let clean_shas = manifest_shas(&dir.join("clean/manifest.csv"));
        for (device, image, sha, _) in &recorded {
            assert!(out_dir.join(image).exists(), "{image} recorded but missing");
            assert_eq!(&clean_shas[device], sha);
        }
        assert!(recorded.len() <= finals);
        eprintln!(
            "attempt {attempt}: killed at {target}+ images: {finals} images, {} recorded{}",
            recorded.len(),
            if finished {
                " (the run had finished)"
            } else {
                ""
            }
        );

        // A plain rerun refuses; --resume completes it.
        if finals > 0 {
            let again = run_args(&case, &args(&out));
            assert!(!again.status.success());
        }
        let mut resume = args(&out);
        resume.push("--resume".into());
        let resumed = case.run(&resume.iter().map(String::as_str).collect::<Vec<_>>());
        assert_ok(&resumed);
        let mut names: Vec<_> = std::fs::read_dir(&bin_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        assert_eq!(names.len(), DEVICES);
        for name in &names {
            assert_eq!(
                read(&bin_dir.join(name)),
                read(&clean_bin.join(name)),
                "{name}"
            );
        }
        assert_eq!(
            read(&out_dir.join("manifest.csv")),
            read(&dir.join("clean/manifest.csv"))
        );
        // Leftovers of the killed (dead) process are swept; elsewhere only old ones are.
        if cfg!(target_os = "linux") {
            for folder in [&out_dir, &bin_dir] {
                for entry in std::fs::read_dir(folder).unwrap() {
                    let name = entry.unwrap().file_name().into_string().unwrap();
                    assert!(
                        !name.starts_with('.'),
                        "{name} was left in {}",
                        folder.display()
                    );
                }
            }
        }
        let ledger = ledger_devices(&out_dir.join("ledger.sqlite"));
        assert_eq!(ledger.len(), DEVICES);
        assert!(ledger.iter().all(|r| r.3 == 1), "an id was issued twice");
        if !finished && finals < DEVICES {
            killed_mid_run = true;
            break;
        }
    }
    assert!(
        killed_mid_run,
        "no attempt was killed in the middle of writing"
    );
}

#[test]
fn mfg_generate_key_is_generate_key() {
    let case = Case::new();
    let hmac = vectors().join("in/hmac_key_fixed.bin");
    assert_ok(&case.run(&[
        "mfg",
        "generate-key",
        "--key_protect_hmac",
        "--kp_hmac_inputkey",
        hmac.to_str().unwrap(),
        "--keyfile",
        "k.bin",
    ]));
    assert_eq!(
        read(&case.dir.path().join("k.bin")),
        read(&vectors().join("out/keys/hmac_derived_keys.bin"))
    );
}

#[test]
fn mfg_gens_hidden_per_device_options_are_accepted_and_ignored() {
    let case = case(CONFIG, VALUES);
    let out = mfg(
        &case,
        &[
            "--fileid",
            "serial",
            "--keyfile",
            "k",
            "--input",
            "i.csv",
            "--output",
            "o.bin",
        ],
    );
    assert_ok(&out);
    for option in ["--keyfile", "--input", "--output"] {
        assert!(
            stderr(&out).contains(&format!("warning: {option} is ignored")),
            "{}",
            stderr(&out)
        );
    }
    assert!(!case.exists("o.bin") && !case.exists("k"));
    plain_run(&case, "plain");
    for n in 1..=3 {
        let name = format!("bin/dev-SN{n}.bin");
        assert_eq!(
            read(&case.dir.path().join("out").join(&name)),
            read(&case.dir.path().join("plain").join(&name))
        );
    }
}

#[test]
fn resume_with_keygen_replaces_an_unrecorded_key_leftover_and_keeps_the_rest() {
    let case = case(CONFIG, VALUES);
    assert_ok(&mfg(&case, &["--fileid", "serial", "--keygen"]));
    let dir = case.dir.path();
    let key = |n: u32| read(&dir.join(format!("out/keys/keys-dev-SN{n}.bin")));
    let before: Vec<Vec<u8>> = (1..=3).map(key).collect();
    // As if killed after SN2's key file was written but before its image and ledger row.
    let ledger = rusqlite::Connection::open(dir.join("ledger.sqlite")).unwrap();
    ledger
        .execute("DELETE FROM devices WHERE device = 'SN2'", [])
        .unwrap();
    drop(ledger);
    std::fs::remove_file(dir.join("out/bin/dev-SN2.bin")).unwrap();
    let again = mfg(&case, &["--fileid", "serial", "--keygen", "--resume"]);
    assert_ok(&again);
    assert!(stderr(&again).contains("2 device(s) were finished by an earlier run"));
    assert_eq!(key(1), before[0]);
    assert_eq!(key(3), before[2]);
    assert_ne!(key(2), before[1], "the leftover key was not replaced");
    // The new image goes with the new key.
    assert_ok(&case.run(&[
        "decrypt",
        "out/bin/dev-SN2.bin",
        "out/keys/keys-dev-SN2.bin",
        "plain2.bin",
    ]));
    let dump = case.run(&["dump", "plain2.bin"]);
    assert!(String::from_utf8_lossy(&dump.stdout).contains("SN2"));
    assert_eq!(ledger_devices(&dir.join("ledger.sqlite")).len(), 3);
}

/// Device images hold each device's values (serials, secrets): private, like key files.
#[cfg(unix)]
#[test]
fn device_images_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let case = case(CONFIG, VALUES);
    assert_ok(&mfg(&case, &["--fileid", "serial"]));
    for n in 1..=3 {
        let path = case.dir.path().join(format!("out/bin/dev-SN{n}.bin"));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", path.display());
    }
}

/// Two runs issuing overlapping ids at the same moment (into one out dir, or two): exactly one
/// gets each id; the other writes nothing and names the ids; every SHA-256 the ledger recorded
/// is its file's. Before ids were reserved ahead of writing, both could pass their checks and
/// rename images over each other. SQLite (the default ledger) and PostgreSQL, 20 trials each.
#[test]
fn two_runs_issuing_the_same_ids_at_once_never_both_get_one() {
    two_runs_race(None);
}

#[test]
fn two_runs_issuing_the_same_ids_at_once_on_postgres_never_both_get_one() {
    if let Some(url) = support::postgres_database("race") {
        two_runs_race(Some(&url));
    }
}

/// The devices a ledger recorded (with images), as (device, image, sha256).
fn recorded(case: &Case, server: Option<&str>) -> Vec<(String, String, String)> {
    match server {
        None => ledger_devices(&case.dir.path().join("ledger.sqlite"))
            .into_iter()
            .map(|(d, i, s, _)| (d, i, s))
            .collect(),
        Some(url) => {
            let url = url.replace("?sslmode=disable", "");
            let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
            client
                .query(
                    "SELECT device, image, sha256 FROM nvs_devices WHERE sha256 <> ''
                     ORDER BY device",
                    &[],
                )
                .unwrap()
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect()
        }
    }
}

fn two_runs_race(server: Option<&str>) {
    let mut values = String::from("id,serial,num,region\n");
    for n in 1..=300 {
        values.push_str(&format!("{n},SN{n},{},EU\n", n % 200));
    }
    for trial in 0..20 {
        let case = case(CONFIG, &values);
        if let Some(url) = server {
            // A fresh product each trial: empty the tables.
            let plain = url.replace("?sslmode=disable", "");
            let mut client = postgres::Client::connect(&plain, postgres::NoTls).unwrap();
            client
                .batch_execute(
                    "DO $$ BEGIN IF to_regclass('nvs_devices') IS NOT NULL THEN
                       TRUNCATE nvs_devices, nvs_device_images, nvs_batches, nvs_flash_log;
                     END IF; END $$",
                )
                .unwrap();
        }
        let (dir_a, dir_b) = if trial % 2 == 0 {
            ("out", "out")
        } else {
            ("out", "out2")
        };
        let spawn = |out_dir: &str| {
            let mut extra = vec!["--fileid", "serial"];
            if let Some(url) = server {
                extra.extend(["--ledger", url]);
            }
            let args = mfg_args(out_dir, &extra);
            bin()
                .args(&args)
                .current_dir(case.dir.path())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        };
        let (a, b) = (spawn(dir_a), spawn(dir_b));
        let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
        let won: Vec<&Output> = [&a, &b]
            .into_iter()
            .filter(|o| o.status.success())
            .collect();
        assert_eq!(
            won.len(),
            1,
            "trial {trial}: {}\n---\n{}",
            stderr(&a),
            stderr(&b)
        );
        let lost = if a.status.success() { &b } else { &a };
        let text = stderr(lost);
        assert!(
            (text.contains("SN") && text.contains("never issued twice"))
                || text.contains("already exists")
                || text.contains("is writing into"),
            "trial {trial}: {text}"
        );
        assert!(!text.contains("panicked"), "{text}");
        let devices = recorded(&case, server);
        assert_eq!(devices.len(), 300, "trial {trial}");
        let winner_dir = if a.status.success() { dir_a } else { dir_b };
        for (device, image, sha256) in devices {
            let bytes = std::fs::read(case.dir.path().join(winner_dir).join(&image)).unwrap();
            assert_eq!(
                support::sha256_hex(&bytes),
                sha256,
                "trial {trial}: {device}"
            );
        }
        if dir_a != dir_b {
            let loser_dir = if a.status.success() { dir_b } else { dir_a };
            let images = std::fs::read_dir(case.dir.path().join(loser_dir).join("bin"))
                .map_or(0, |entries| entries.count());
            assert_eq!(images, 0, "trial {trial}: the losing run wrote images");
        }
    }
}

/// A run still writing into an out dir holds it: another run into it (a `--resume` too) is
/// refused instead of taking over its reservations.
#[cfg(unix)]
#[test]
fn a_second_run_into_an_out_dir_being_written_is_refused() {
    let case = case(CONFIG, VALUES);
    std::fs::create_dir_all(case.dir.path().join("out/bin")).unwrap();
    let held = std::fs::File::open(case.dir.path().join("out")).unwrap();
    held.try_lock().unwrap();
    for extra in [&[][..], &["--resume"][..]] {
        let out = mfg(&case, extra);
        let text = stderr(&out);
        assert!(!out.status.success(), "{text}");
        assert!(
            text.contains("is writing into") && text.contains("nothing was written"),
            "{text}"
        );
    }
    held.unlock().unwrap();
    assert_ok(&mfg(&case, &[]));
}
