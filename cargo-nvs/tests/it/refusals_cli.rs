//! Inputs that would lose data are refused, with nothing written: outputs that are an input or
//! a key file, truncated images, impossible sizes, endless inputs. And `dump` of floats.

use crate::support::{Case, vectors};

fn fixed_keys() -> Vec<u8> {
    std::fs::read(vectors().join("in/keys_fixed.bin")).unwrap()
}

#[track_caller]
fn assert_refused(out: &std::process::Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "stderr lacks {needle:?}:\n{stderr}"
        );
    }
}

const CSV: &str = "key,type,encoding,value\nns,namespace,,\nk,data,u8,1\n";

#[test]
fn encrypt_output_over_its_key_file_is_refused() {
    let case = Case::new();
    case.file("in.csv", CSV).file("keys.bin", fixed_keys());
    for output in ["keys.bin", "./keys.bin"] {
        let out = case.run(&[
            "encrypt",
            "in.csv",
            output,
            "0x3000",
            "--inputkey",
            "keys.bin",
        ]);
        assert_refused(&out, &["key file", "overwritten"]);
        assert_eq!(
            std::fs::read(case.dir.path().join("keys.bin")).unwrap(),
            fixed_keys()
        );
    }
    // The generated key file's own path.
    let out = case.run(&[
        "encrypt",
        "in.csv",
        "new.bin",
        "0x3000",
        "--keygen",
        "--keyfile",
        "new.bin",
    ]);
    assert_refused(&out, &["--keyfile", "overwritten"]);
    assert!(!case.exists("new.bin"));
}

#[test]
fn decrypt_output_over_its_input_or_key_is_refused() {
    let case = Case::new();
    case.file("in.csv", CSV).file("keys.bin", fixed_keys());
    let out = case.run(&[
        "encrypt",
        "in.csv",
        "enc.bin",
        "0x3000",
        "--inputkey",
        "keys.bin",
    ]);
    assert!(out.status.success());
    let enc = std::fs::read(case.dir.path().join("enc.bin")).unwrap();
    let out = case.run(&["decrypt", "enc.bin", "keys.bin", "enc.bin"]);
    assert_refused(&out, &["INPUT image", "overwritten"]);
    let out = case.run(&["decrypt", "enc.bin", "keys.bin", "keys.bin"]);
    assert_refused(&out, &["key file", "overwritten"]);
    assert_eq!(std::fs::read(case.dir.path().join("enc.bin")).unwrap(), enc);
    assert_eq!(
        std::fs::read(case.dir.path().join("keys.bin")).unwrap(),
        fixed_keys()
    );
}

#[test]
fn decrypt_of_an_empty_or_truncated_image_writes_nothing() {
    let case = Case::new();
    case.file("keys.bin", fixed_keys()).file("empty.bin", []);
    let out = case.run(&["decrypt", "empty.bin", "keys.bin", "out.bin"]);
    assert_refused(&out, &["empty", "nothing was written"]);
    case.file("cut.bin", vec![0xFFu8; 5000]);
    let out = case.run(&["decrypt", "cut.bin", "keys.bin", "out.bin"]);
    assert_refused(&out, &["5000 bytes", "truncated"]);
    assert!(!case.exists("out.bin"));
}

#[test]
fn sizes_above_the_largest_flash_are_refused() {
    let case = Case::new();
    case.refuses(CSV, "0x100000000", &[], &["SIZE 0x100000000", "128 MiB"]);
    case.refuses(CSV, "0x8001000", &[], &["128 MiB"]);
    // 128 MiB itself is accepted.
    let out = case.run(&["generate", "input.csv", "max.bin", "0x8000000"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn nul_in_a_csv_key_or_namespace_is_refused() {
    let case = Case::new();
    case.refuses(
        "key,type,encoding,value\nns,namespace,,\nk,data,u8,1\nk\0x,data,u8,2\n",
        "0x3000",
        &[],
        &["input.csv:4", "NUL"],
    );
    case.refuses(
        "key,type,encoding,value\n\0a,namespace,,\nk,data,u8,1\n\0b,namespace,,\n",
        "0x3000",
        &[],
        &["input.csv:2", "NUL"],
    );
}

#[cfg(target_os = "linux")]
#[test]
fn endless_inputs_stop_with_an_error() {
    let case = Case::new();
    case.file("keys.bin", fixed_keys());
    let out = case.run(&["dump", "/dev/zero"]);
    assert_refused(&out, &["/dev/zero", "larger than 256 MiB"]);
    let out = case.run(&["decrypt", "/dev/zero", "keys.bin", "out.bin"]);
    assert_refused(&out, &["larger than 256 MiB"]);
    let out = case.run(&["generate", "/dev/zero", "out.bin", "0x3000"]);
    assert_refused(&out, &["larger than 256 MiB"]);
    case.file("x.bin", vec![0xFFu8; 0x3000]);
    let out = case.run(&["dump", "x.bin", "--keys", "/dev/zero"]);
    assert_refused(&out, &["larger than 1 MiB"]);
    case.file(
        "file.csv",
        "key,type,encoding,value\nns,namespace,,\nf,file,binary,/dev/zero\n",
    );
    let out = case.run(&["generate", "file.csv", "out.bin", "0x3000"]);
    assert_refused(&out, &["file.csv:3", "`f`", "larger than 16 MiB"]);
    assert!(!case.exists("out.bin"));
}

#[test]
fn dump_shows_floats_in_text_and_json() {
    use nvs_build::format::{ImageBuilder, PartitionSize, Value, Version};
    let mut b = ImageBuilder::new(Version::V2);
    b.namespace("cal").unwrap();
    b.add("gain", Value::F32(1.5)).unwrap();
    b.add("tenth", Value::F32(0.1)).unwrap();
    b.add("big", Value::F64(-2.5e300)).unwrap();
    b.add("hot", Value::F64(f64::INFINITY)).unwrap();
    b.add("nan", Value::F32(f32::NAN)).unwrap();
    let image = b.finish(PartitionSize::new(0x3000).unwrap()).unwrap();
    let case = Case::new();
    case.file("f.bin", &image);
    let text = case.run(&["dump", "f.bin"]);
    assert!(text.status.success());
    let text = String::from_utf8_lossy(&text.stdout);
    for line in ["gain", "f32", "1.5", "0.1", "-2.5e300", "inf", "NaN"] {
        assert!(text.contains(line), "{line}: {text}");
    }
    let json = case.run(&["dump", "f.bin", "--format", "json"]);
    assert!(json.status.success());
    let doc: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(doc["schema"], "cargo-nvs/dump/v1");
    let value = |key: &str| {
        doc["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["key"] == key)
            .unwrap()
            .clone()
    };
    assert_eq!(value("gain")["type"], "f32");
    assert_eq!(value("gain")["value"], serde_json::json!(1.5));
    assert_eq!(value("tenth")["value"].to_string(), "0.1");
    assert_eq!(value("big")["type"], "f64");
    assert_eq!(value("big")["value"], serde_json::json!(-2.5e300));
    assert!(value("hot")["value"].is_null());
    assert!(value("nan")["value"].is_null());
}

#[test]
fn huge_fields_in_an_mfg_values_file_are_refused_early() {
    let case = Case::new();
    case.file(
        "conf.csv",
        "app,namespace,\nserial_no,data,string\nblob,data,string\n",
    );
    // One field over mfg_gen's 131,072 characters, on a line of its own.
    case.file(
        "values.csv",
        format!("serial_no,blob\nA1,{}\n", "x".repeat(131_073)),
    );
    let args = [
        "mfg",
        "generate",
        "--config",
        "conf.csv",
        "--values",
        "values.csv",
        "--prefix",
        "dev",
        "--size",
        "0x6000",
        "--fileid",
        "serial_no",
        "--out-dir",
        "out",
        "--ledger",
        "l.sqlite",
    ];
    let out = case.run(&args);
    assert_refused(&out, &["values.csv:2", "131072"]);
    // A line too long to be a values file is refused before it is read whole.
    case.file(
        "values.csv",
        format!("serial_no,blob\nA1,\"{}\"\n", "x,".repeat(3 << 20)),
    );
    let out = case.run(&args);
    assert_refused(&out, &["line 2", "4 MiB"]);
    assert!(!case.exists("out/bin"));
}

#[test]
fn floats_round_trip_from_metadata_through_dump_json() {
    let case = Case::new();
    std::fs::create_dir_all(case.dir.path().join("src")).unwrap();
    case.file("src/main.rs", "fn main() {}\n")
        .file(
            "partitions.csv",
            "nvs, data, nvs, 0x9000, 0x6000,\nfactory, app, factory, 0x10000, 1M,\n",
        )
        .file(
            "Cargo.toml",
            "[package]\nname = \"floats\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n\
             [package.metadata.nvs.partitions.nvs]\nidf-version = \"6.1\"\n\
             [package.metadata.nvs.partitions.nvs.namespaces.cal]\n\
             gain = { f32 = 1.5 }\noffset = { f64 = -0.1 }\nlong = \"\"\"\n"
                .to_owned()
                + &"y".repeat(3999)
                + "\"\"\"\n[workspace]\n",
        );
    let out = case.run(&[
        "generate",
        "--manifest-path",
        "Cargo.toml",
        "--out-dir",
        "out",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json = case.run(&["dump", "out/nvs.bin", "--format", "json"]);
    assert!(
        json.status.success(),
        "{}",
        String::from_utf8_lossy(&json.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let item = |key: &str| {
        doc["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["key"] == key)
            .unwrap()
            .clone()
    };
    assert_eq!(item("gain")["type"], "f32");
    assert_eq!(item("gain")["value"], serde_json::json!(1.5));
    assert_eq!(item("offset")["type"], "f64");
    assert_eq!(item("offset")["value"], serde_json::json!(-0.1));
    assert_eq!(item("long")["value"].as_str().unwrap().len(), 3999);
    assert_eq!(doc["damaged"], false);
    // Without idf-version the same metadata is refused, naming the key.
    let manifest = std::fs::read_to_string(case.dir.path().join("Cargo.toml")).unwrap();
    case.file(
        "Cargo.toml",
        manifest.replace("idf-version = \"6.1\"\n", ""),
    );
    let out = case.run(&[
        "generate",
        "--manifest-path",
        "Cargo.toml",
        "--out-dir",
        "out2",
    ]);
    assert_refused(&out, &["Cargo.toml:8:1", "`gain`", "idf-version"]);
    assert!(!case.exists("out2/nvs.bin"));
}
