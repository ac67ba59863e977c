//! Golden vectors made with Espressif's generator (see tests/vectors/README.md): our images
//! must be byte-identical, and inputs we refuse on purpose must be refused.

use std::path::{Path, PathBuf};

use nvs_build::format::{PartitionSize, Version, describe_differences};
use nvs_build::{Error, FileBase, ImageInput};

fn vectors() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors")
}

fn generate(inputs: &[&str], size: u64, version: Version) -> Result<Vec<u8>, Error> {
    let dir = vectors().join("in");
    let mut image = ImageInput::new(PartitionSize::new(size).unwrap(), version);
    for input in inputs {
        // `file` rows resolve against the reference's working directory, which was `in/`.
        image.add_csv_file(&dir.join(input), &FileBase::Dir(dir.clone()))?;
    }
    image.finish()
}

#[track_caller]
fn assert_golden(inputs: &[&str], size: u64, version: Version, expected: &str) {
    let ours = generate(inputs, size, version).unwrap_or_else(|e| panic!("{inputs:?}: {e}"));
    let reference = std::fs::read(vectors().join("out").join(expected)).unwrap();
    if ours != reference {
        let diff = describe_differences(&ours, &reference, 8).join("\n");
        panic!("{expected}: ours (left) differs from the reference (right):\n{diff}");
    }
}

#[test]
fn every_row_type() {
    assert_golden(
        &["all_types_v2_ok.csv"],
        0x6000,
        Version::V2,
        "all_types_v2_ok.bin",
    );
    assert_golden(
        &["all_types_v1_ok.csv"],
        0x6000,
        Version::V1,
        "all_types_v1_ok.bin",
    );
    assert_golden(&["perf50.csv"], 0x6000, Version::V2, "perf50.bin");
}

#[test]
fn page_boundaries() {
    for name in [
        "edge_entry125",
        "edge_string_pageend",
        "edge_blob_at125",
        "edge_blob_at123",
        "edge_blob_fill_exact",
        "edge_blob_index_lastentry",
        "edge_string_max_v2",
        "edge_empty_values",
    ] {
        assert_golden(
            &[&format!("{name}.csv")],
            0x4000,
            Version::V2,
            &format!("{name}.bin"),
        );
    }
    assert_golden(
        &["edge_empty_values.csv"],
        0x3000,
        Version::V1,
        "edge_empty_values_v1.bin",
    );
}

#[test]
fn quirks_that_do_what_the_author_means() {
    assert_golden(&["quirk_wifi.csv"], 0x4000, Version::V2, "quirk_wifi.bin");
    assert_golden(
        &["quirk_encodings_ok.csv"],
        0x4000,
        Version::V2,
        "quirk_encodings_ok.bin",
    );
    assert_golden(
        &["quirk_namespaces_ok.csv"],
        0x4000,
        Version::V2,
        "quirk_namespaces_ok.bin",
    );
}

#[test]
fn read_only_sizes_and_multiple_files() {
    assert_golden(
        &["enc_simple.csv"],
        0x2000,
        Version::V2,
        "readonly_0x2000.bin",
    );
    assert_golden(
        &["enc_simple.csv"],
        0x1000,
        Version::V2,
        "readonly_0x1000.bin",
    );
    assert_golden(
        &["multi_a.csv", "multi_b.csv"],
        0x3000,
        Version::V2,
        "multi.bin",
    );
}

fn refusal(input: &str) -> String {
    generate(&[input], 0x6000, Version::V2)
        .expect_err("must be refused")
        .to_string()
}

#[test]
fn refused_on_purpose() {
    let e = refusal("all_types_v2.csv");
    assert!(
        e.contains("all_types_v2.csv:23") && e.contains("`ns_one` is selected again"),
        "{e}"
    );
    let e = refusal("quirk_namespaces.csv");
    assert!(
        e.contains("quirk_namespaces.csv:2") && e.contains("`early` comes before any namespace"),
        "{e}"
    );
    let e = refusal("quirk_encodings.csv");
    assert!(
        e.contains("quirk_encodings.csv:6")
            && e.contains("`HEX2BIN` must be written in lower case"),
        "{e}"
    );
}
