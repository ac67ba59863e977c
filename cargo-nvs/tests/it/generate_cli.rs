//! `cargo nvs generate` and `cargo nvs dump` as a user runs them: every class of bad input gets
//! a clear error naming file, line and key, a non-zero exit and no output file.

use crate::support::{Case, bin, vectors};

const HEAD: &str = "key,type,encoding,value\nns,namespace,,\n";

#[test]
fn generate_matches_the_reference_from_the_cli() {
    let dir = vectors().join("in");
    let case = Case::new();
    let out = case.dir.path().join("all.bin");
    let status = bin()
        .args(["nvs", "generate", "all_types_v2_ok.csv"])
        .arg(&out)
        .arg("0x6000")
        .current_dir(&dir)
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(vectors().join("out/all_types_v2_ok.bin")).unwrap()
    );

    // --version 1, --outdir and --out-dir with a relative output path, decimal size.
    for flag in ["--out-dir", "--outdir"] {
        let status = bin()
            .args([
                "generate",
                "all_types_v1_ok.csv",
                "v1.bin",
                "24576",
                "--version",
                "1",
                flag,
            ])
            .arg(case.dir.path())
            .current_dir(&dir)
            .status()
            .unwrap();
        assert!(status.success());
        assert_eq!(
            std::fs::read(case.dir.path().join("v1.bin")).unwrap(),
            std::fs::read(vectors().join("out/all_types_v1_ok.bin")).unwrap()
        );
    }
}

#[test]
fn read_only_sizes_warn() {
    let case = Case::new();
    case.file("input.csv", format!("{HEAD}a,data,u8,1\n"));
    let out = case.run(&["generate", "input.csv", "out.bin", "0x2000"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("readonly"));
    assert_eq!(
        std::fs::read(case.dir.path().join("out.bin"))
            .unwrap()
            .len(),
        0x1000
    );
}

#[test]
fn header_missing_or_misspelt() {
    Case::new().refuses(
        "key,type,encodng,value\nns,namespace,,\na,data,u8,1\n",
        "0x3000",
        &[],
        &["input.csv:1", "no `encoding` column"],
    );
}

#[test]
fn byte_order_mark() {
    Case::new().refuses(
        &format!("\u{feff}{HEAD}"),
        "0x3000",
        &[],
        &["input.csv:1", "byte-order mark"],
    );
}

#[test]
fn short_rows() {
    Case::new().refuses(
        &format!("{HEAD}a,data,u8\n"),
        "0x3000",
        &[],
        &["input.csv:3", "`a`", "no `value` field"],
    );
}

#[test]
fn key_longer_than_15_bytes() {
    Case::new().refuses(
        &format!("{HEAD}sixteen_chars_xx,data,u8,1\n"),
        "0x3000",
        &[],
        &["input.csv:3", "`sixteen_chars_xx`", "at most 15 bytes"],
    );
}

#[test]
fn unknown_encoding() {
    Case::new().refuses(
        &format!("{HEAD}a,data,float,1.5\n"),
        "0x3000",
        &[],
        &["input.csv:3", "`a`", "unknown encoding `float`"],
    );
}

#[test]
fn integers_out_of_range_or_not_base_10() {
    Case::new().refuses(
        &format!("{HEAD}a,data,u8,256\n"),
        "0x3000",
        &[],
        &["input.csv:3", "`a`", "out of range for u8"],
    );
    Case::new().refuses(
        &format!("{HEAD}a,data,i8,-129\n"),
        "0x3000",
        &[],
        &["out of range for i8"],
    );
    Case::new().refuses(
        &format!("{HEAD}b,data,u32,0x10\n"),
        "0x3000",
        &[],
        &["input.csv:3", "`b`", "not a base-10 integer"],
    );
}

#[test]
fn bad_hex() {
    Case::new().refuses(
        &format!("{HEAD}h,data,hex2bin,abc\n"),
        "0x3000",
        &[],
        &["input.csv:3", "`h`", "odd number"],
    );
    Case::new().refuses(
        &format!("{HEAD}h,data,hex2bin,zz\n"),
        "0x3000",
        &[],
        &["`h`", "not a hex digit"],
    );
}

#[test]
fn bad_base64_padding() {
    Case::new().refuses(
        &format!("{HEAD}b,data,base64,aGVsbG8\n"),
        "0x3000",
        &[],
        &["input.csv:3", "`b`", "padding"],
    );
}

#[test]
fn strings_too_long() {
    let long = "x".repeat(3968);
    Case::new().refuses(
        &format!("{HEAD}s,data,string,{long}\n"),
        "0x3000",
        &[],
        &["input.csv:3", "`s`", "at most 3967 bytes"],
    );
    let long = "x".repeat(1984);
    Case::new().refuses(
        &format!("{HEAD}s,data,string,{long}\n"),
        "0x3000",
        &["--version", "1"],
        &["`s`", "at most 1983 bytes"],
    );
}

#[test]
fn blob_too_large_for_version_1() {
    let hex = "ab".repeat(1985);
    Case::new().refuses(
        &format!("{HEAD}b,data,hex2bin,{hex}\n"),
        "0x3000",
        &["--version", "1"],
        &["input.csv:3", "`b`", "version 1 allows at most 1984"],
    );
}

#[test]
fn missing_file() {
    Case::new().refuses(
        &format!("{HEAD}f,file,binary,nope.bin\n"),
        "0x3000",
        &[],
        &["input.csv:3", "`f`", "cannot read file `nope.bin`"],
    );
}

#[test]
fn string_file_not_utf8() {
    let case = Case::new();
    case.file("bad.txt", [0xff, 0xfe, 0x41]);
    case.refuses(
        &format!("{HEAD}f,file,string,bad.txt\n"),
        "0x3000",
        &[],
        &["input.csv:3", "`f`", "not valid UTF-8"],
    );
}

#[test]
fn partition_too_small_names_the_minimum() {
    let blob = "ab".repeat(9000);
    Case::new().refuses(
        &format!("{HEAD}big,data,hex2bin,{blob}\n"),
        "0x3000",
        &[],
        &["input.csv:3", "`big`", "too small", "at least 0x4000"],
    );
}

#[test]
fn bad_sizes() {
    let case = Case::new();
    case.refuses(HEAD, "0x1800", &[], &["not a multiple of 4096"]);
    case.refuses(HEAD, "0", &[], &["zero"]);
    case.refuses(HEAD, "12k", &[], &["not a size"]);
}

#[test]
fn output_not_writable() {
    let case = Case::new();
    case.file("input.csv", HEAD);
    case.file("blocker", "a file, not a folder");
    let out = case.run(&["generate", "input.csv", "blocker/out.bin", "0x3000"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot write `blocker/out.bin`"));
}

#[test]
fn inputs_the_reference_would_silently_get_wrong() {
    Case::new().refuses(
        "key,type,encoding,value\na,data,u8,1\n",
        "0x3000",
        &[],
        &["input.csv:2", "before any namespace"],
    );
    Case::new().refuses(
        "key,type,encoding,value\nA,namespace,,\nB,namespace,,\nA,namespace,,\nz,data,u8,1\n",
        "0x3000",
        &[],
        &["input.csv:4", "`A` is selected again after `B`"],
    );
    Case::new().refuses(
        &format!("{HEAD}clé,data,u8,1\n"),
        "0x3000",
        &[],
        &["input.csv:3", "non-ASCII"],
    );
    Case::new().refuses(
        &format!("{HEAD}b,data,binary,héllo\n"),
        "0x3000",
        &[],
        &["input.csv:3", "`b`", "must be ASCII"],
    );
    Case::new().refuses(
        &format!("{HEAD}s,data,STRING,abc\n"),
        "0x3000",
        &[],
        &["input.csv:3", "`s`", "lower case"],
    );
    Case::new().refuses(
        &format!("{HEAD}a,data,u8,1\na,data,u8,2\n"),
        "0x3000",
        &[],
        &["input.csv:4", "`a` appears twice"],
    );
    let namespaces: String = (0..255).map(|i| format!("n{i},namespace,,\n")).collect();
    Case::new().refuses(
        &format!("key,type,encoding,value\n{namespaces}"),
        "0x6000",
        &[],
        &["input.csv:256", "255th"],
    );
}

#[test]
fn dump_shows_values_and_json() {
    let image = vectors().join("out/all_types_v2_ok.bin");
    let text = bin().arg("dump").arg(&image).output().unwrap();
    assert!(text.status.success());
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(
        text.contains("ns_one:str1") && text.contains("\"Hello NVS\""),
        "{text}"
    );
    assert!(
        text.contains("ns_one:u64max") && text.contains("18446744073709551615"),
        "{text}"
    );
    assert!(text.contains("No problems found."));

    let json = bin()
        .args(["dump", "--format", "json"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(json.status.success());
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["schema"], "cargo-nvs/dump/v1");
    assert_eq!(v["damaged"], false);
    let items = v["items"].as_array().unwrap();
    let b64 = items.iter().find(|i| i["key"] == "b64").unwrap();
    assert_eq!(b64["type"], "blob");
    assert_eq!(b64["value"], "0102030405060708090a0b0c0d0e0f10");
    assert_eq!(v["pages"][0]["state"], "full");
}

#[test]
fn dump_reports_truncated_and_corrupted_images() {
    let case = Case::new();
    let good = std::fs::read(vectors().join("out/perf50.bin")).unwrap();
    case.file("truncated.bin", &good[..5000]);
    let out = case.run(&["dump", "truncated.bin"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("not a whole number of 4096-byte pages"));

    let mut corrupt = good.clone();
    corrupt[64 + 32 + 30] ^= 0x40; // entry 1: the u32 `k0`, unused data byte under the entry CRC
    case.file("corrupt.bin", &corrupt);
    let out = case.run(&["dump", "--format", "json", "corrupt.bin"]);
    assert!(!out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["damaged"], true);
    assert_eq!(v["problems"][0]["page"], 0);
    assert_eq!(v["problems"][0]["entry"], 1);

    let out = case.run(&["dump", "missing.bin"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read `missing.bin`"));
}

#[test]
fn a_forgotten_output_never_overwrites_the_input() {
    let case = Case::new();
    let csv = format!("{HEAD}a,data,u8,1\n");
    case.file("input.csv", &csv);
    let out = case.run(&["generate", "input.csv", "0x3000"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least one INPUT"));
    let out = case.run(&["generate", "input.csv", "input.csv", "0x3000"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is also the INPUT"));
    assert_eq!(
        std::fs::read_to_string(case.dir.path().join("input.csv")).unwrap(),
        csv
    );
}
