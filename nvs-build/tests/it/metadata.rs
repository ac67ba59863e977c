//! `[package.metadata.nvs]`: every error points at `Cargo.toml:LINE:COL` and names the key;
//! declaration order is kept; no input makes the reader panic.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use nvs_build::format::{ItemValue, Value, read_image};
use nvs_build::metadata::Metadata;
use nvs_build::resolve::{Inputs, PartitionImage, build_partition};
use proptest::prelude::*;

const TABLE: &str = "\
# Name,  Type, SubType, Offset,  Size,   Flags
nvs,     data, nvs,     0x9000,  0x3000,
fctry,   data, nvs,     0xc000,  0x2000, readonly
phy,     data, phy,     0xe000,  0x1000,
factory, app,  factory, 0x10000, 1M,
";

struct Project {
    dir: PathBuf,
}

impl Project {
    fn new(files: &[(&str, &[u8])]) -> Project {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "nvs-build-metadata-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("partitions.csv"), TABLE).unwrap();
        for (name, bytes) in files {
            let path = dir.join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, bytes).unwrap();
        }
        Project { dir }
    }

    fn manifest(&self) -> PathBuf {
        self.dir.join("Cargo.toml")
    }

    /// Parses `nvs` (the body after `[package.metadata.nvs]`) and builds every partition with
    /// `env` as the environment.
    fn build(&self, nvs: &str, env: &[(&str, &str)]) -> Result<Vec<PartitionImage>, String> {
        let text = format!(
            "[package]\nname = \"p\"\nversion = \"0.1.0\"\n\n[package.metadata.nvs]\n{nvs}"
        );
        std::fs::write(self.manifest(), &text).unwrap();
        let metadata = Metadata::parse(&self.manifest(), &text)
            .map_err(|e| e.to_string())?
            .expect("metadata");
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut inputs =
            Inputs::new(move |var| env.iter().find(|(k, _)| k == var).map(|(_, v)| v.clone()));
        metadata
            .partitions
            .iter()
            .map(|spec| {
                build_partition(spec, &metadata.manifest_dir, &mut inputs)
                    .map_err(|e| e.to_string())
            })
            .collect()
    }

    fn error(&self, nvs: &str) -> String {
        self.build(nvs, &[]).expect_err("must be refused")
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Line 6 is the first line after `[package.metadata.nvs]`.
fn at(line: usize, col: usize) -> String {
    format!("Cargo.toml:{line}:{col}")
}

#[test]
fn order_is_csv_files_then_inline_keys_in_declaration_order() {
    let p = Project::new(&[(
        "defaults.csv",
        b"key,type,encoding,value\nfirst,namespace,,\nz,data,u8,1\n",
    )]);
    let images = p
        .build(
            "[package.metadata.nvs.partitions.nvs]\ncsv = [\"defaults.csv\"]\n\
             [package.metadata.nvs.partitions.nvs.namespaces.zeta]\nb = { u8 = 2 }\na = \"x\"\n\
             [package.metadata.nvs.partitions.nvs.namespaces.alpha]\ny = { i32 = -5 }\n",
            &[],
        )
        .unwrap();
    let PartitionImage::Built(image) = &images[0] else {
        panic!()
    };
    let parsed = read_image(&image.bytes);
    let order: Vec<(String, String)> = parsed
        .items
        .iter()
        .map(|i| (i.namespace.clone().unwrap(), i.key.clone()))
        .collect();
    let expected = [("first", "z"), ("zeta", "b"), ("zeta", "a"), ("alpha", "y")];
    assert_eq!(order, expected.map(|(a, b)| (a.to_owned(), b.to_owned())));
    assert_eq!(parsed.items[3].value, ItemValue::Value(Value::I32(-5)));
}

#[test]
fn unknown_field() {
    let e = Project::new(&[]).error("[package.metadata.nvs.partitions.nvs]\nread-onyl = true\n");
    assert!(
        e.contains(&at(7, 1)) && e.contains("unknown field `read-onyl`") && e.contains("read-only"),
        "{e}"
    );
}

#[test]
fn the_mfg_table_belongs_to_cargo_nvs_and_is_ignored() {
    let p = Project::new(&[]);
    let partition = "[package.metadata.nvs.partitions.nvs.namespaces.user]\nssid = \"x\"\n";
    let with_mfg = p
        .build(
            &format!("[package.metadata.nvs.mfg]\nledger = \"x\"\n{partition}"),
            &[],
        )
        .unwrap();
    let without = p.build(partition, &[]).unwrap();
    let bytes = |images: &[PartitionImage]| match images {
        [PartitionImage::Built(image)] => image.bytes.clone(),
        _ => panic!("one built image expected"),
    };
    assert_eq!(bytes(&with_mfg), bytes(&without));
    // Whatever it holds is cargo-nvs's to check, and a package may have nothing else.
    let text = "[package]\nname = \"p\"\n[package.metadata.nvs.mfg]\nledger = 3\n";
    let metadata = Metadata::parse(&p.manifest(), text).unwrap().unwrap();
    assert!(metadata.partitions.is_empty());
}

#[test]
fn wrong_value_type() {
    let p = Project::new(&[]);
    let e = p.error("[package.metadata.nvs.partitions.nvs]\nread-only = \"yes\"\n");
    assert!(e.contains(&at(7, 13)) && e.contains("true or false"), "{e}");
    let e = p.error("[package.metadata.nvs.partitions.nvs.namespaces.ns]\nflag = true\n");
    assert!(e.contains(&at(7, 8)) && e.contains("`flag`"), "{e}");
    let e = p.error("[package.metadata.nvs.partitions.nvs.namespaces.ns]\nn = 3\n");
    assert!(
        e.contains(&at(7, 5)) && e.contains("give the integer type"),
        "{e}"
    );
    let e = p.error("[package.metadata.nvs.partitions.nvs.namespaces.ns]\nn = { float = 3 }\n");
    assert!(e.contains("unknown type `float`"), "{e}");
    let e = p.error("[package.metadata.nvs.partitions.nvs.namespaces.ns]\nn = { u8 = \"abc\" }\n");
    assert!(
        e.contains(&at(7, 1)) && e.contains("`n`") && e.contains("not a base-10 integer"),
        "{e}"
    );
}

#[test]
fn integer_out_of_range() {
    let e = Project::new(&[])
        .error("[package.metadata.nvs.partitions.nvs.namespaces.ns]\nhw_rev = { u8 = 300 }\n");
    assert!(
        e.contains(&at(7, 1)) && e.contains("`hw_rev`") && e.contains("out of range for u8"),
        "{e}"
    );
}

#[test]
fn key_longer_than_15_bytes() {
    let e = Project::new(&[]).error(
        "[package.metadata.nvs.partitions.nvs.namespaces.ns]\nthis_key_is_too_long = \"x\"\n",
    );
    assert!(
        e.contains(&at(7, 1)) && e.contains("`this_key_is_too_long`") && e.contains("at most 15"),
        "{e}"
    );
}

#[test]
fn unset_env_var() {
    let p = Project::new(&[]);
    let nvs = "[package.metadata.nvs.partitions.nvs.namespaces.ns]\nsecret = { string = { env = \"NVS_TEST_UNSET_VAR\" } }\n";
    let e = p.error(nvs);
    assert!(
        e.contains(&at(7, 1)) && e.contains("`NVS_TEST_UNSET_VAR` is not set"),
        "{e}"
    );
    assert!(p.build(nvs, &[("NVS_TEST_UNSET_VAR", "s3cret")]).is_ok());
}

#[test]
fn missing_file() {
    let e = Project::new(&[]).error("[package.metadata.nvs.partitions.nvs.namespaces.ns]\ncert = { file = \"certs/missing.der\" }\n");
    assert!(
        e.contains(&at(7, 1)) && e.contains("`cert`") && e.contains("missing.der"),
        "{e}"
    );
    let e =
        Project::new(&[]).error("[package.metadata.nvs.partitions.nvs]\ncsv = [\"nope.csv\"]\n");
    assert!(e.contains("nope.csv") && e.contains("cannot read"), "{e}");
}

#[test]
fn partition_not_in_table_or_not_nvs() {
    let p = Project::new(&[]);
    let e = p.error("[package.metadata.nvs.partitions.factory_data]\n");
    assert!(
        e.contains(&at(6, 34))
            && e.contains("`factory_data` is not in the partition table")
            && e.contains("nvs, fctry"),
        "{e}"
    );
    let e = p.error("[package.metadata.nvs.partitions.phy]\n");
    assert!(e.contains("not data/nvs"), "{e}");
}

#[test]
fn partition_too_small_says_how_much_is_needed() {
    let big: Vec<u8> = vec![7; 9000];
    let e = Project::new(&[("big.bin", &big)]).error(
        "[package.metadata.nvs.partitions.nvs.namespaces.ns]\nblob = { file = \"big.bin\" }\n",
    );
    assert!(
        e.contains(&at(7, 1)) && e.contains("too small") && e.contains("at least 0x4000"),
        "{e}"
    );
}

#[test]
fn per_device_keys_without_dev_value_skip_the_partition() {
    let p = Project::new(&[]);
    let images = p.build("[package.metadata.nvs.partitions.fctry.namespaces.mass_prod]\nserial = { u32 = { per-device = \"serial\" } }\n", &[]).unwrap();
    match &images[0] {
        PartitionImage::Skipped { reason } => assert!(
            reason.contains("`serial`") && reason.contains("dev"),
            "{reason}"
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn small_partitions_must_be_flagged_readonly() {
    let p = Project::new(&[]);
    std::fs::write(
        p.dir.join("partitions.csv"),
        "nvs, data, nvs, 0x9000, 0x2000,\n",
    )
    .unwrap();
    let e = p.error("[package.metadata.nvs.partitions.nvs.namespaces.ns]\na = \"b\"\n");
    assert!(
        e.contains("smaller than 0x3000") && e.contains("readonly"),
        "{e}"
    );
}

#[test]
fn a_missing_csv_file_names_where_it_is_listed() {
    let e =
        Project::new(&[]).error("[package.metadata.nvs.partitions.nvs]\ncsv = [\"nope.csv\"]\n");
    assert!(
        e.contains("nope.csv") && e.contains("listed at") && e.contains(&at(7, 8)),
        "{e}"
    );
}

#[test]
fn table_errors_point_at_the_table() {
    let p = Project::new(&[]);
    std::fs::write(
        p.dir.join("partitions.csv"),
        "nvs, data, nvs, 0x9000, 0x6000,\nfctry, data, nvs, 0xa000, 0x1000,\n",
    )
    .unwrap();
    let e = p.error("[package.metadata.nvs.partitions.nvs]\n");
    assert!(e.contains("partitions.csv:2"), "{e}");
}

#[test]
fn no_table_uses_the_esp_idf_default() {
    let p = Project::new(&[]);
    std::fs::remove_file(p.dir.join("partitions.csv")).unwrap();
    let text =
        "[package]\nname = \"p\"\n[package.metadata.nvs.partitions.nvs.namespaces.ns]\na = \"b\"\n";
    let metadata = Metadata::parse(&p.manifest(), text).unwrap().unwrap();
    assert_eq!(
        metadata.table_source,
        nvs_build::metadata::TableSource::BuiltInDefault
    );
    assert_eq!(
        (metadata.partitions[0].offset, metadata.partitions[0].size),
        (0x9000, 0x6000)
    );
}

/// Images with `env` or `per-device` keys may hold secrets: they are created 0600 (and an
/// existing file with the same bytes but a wider mode is narrowed); others keep the usual mode.
#[cfg(unix)]
#[test]
fn images_with_env_or_per_device_keys_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    let p = Project::new(&[]);
    std::fs::write(
        p.manifest(),
        "[package]\nname = \"p\"\nversion = \"0.1.0\"\n\n[package.metadata.nvs]\n\
         [package.metadata.nvs.partitions.fctry.namespaces.mass_prod]\n\
         serial = { u32 = { per-device = \"serial\", dev = 1 } }\n\
         [package.metadata.nvs.partitions.nvs.namespaces.cfg]\n\
         token = { string = { env = \"NVS_BUILD_TEST_UNSET_TOKEN\", default = \"t\" } }\n",
    )
    .unwrap();
    let out = p.dir.join("out");
    let generate = || {
        nvs_build::Config::new()
            .manifest_path(p.manifest())
            .out_dir(&out)
            .emit_rerun_if_changed(false)
            .cargo_warnings(false)
            .emit_rustc_env(false)
            .try_generate()
            .unwrap()
    };
    let generated = generate();
    assert!(generated.images.iter().all(|i| i.secret));
    let (fctry, nvs) = (out.join("nvs/fctry.bin"), out.join("nvs/nvs.bin"));
    assert_eq!((mode(&fctry), mode(&nvs)), (0o600, 0o600));
    let manifest = std::fs::read_to_string(out.join("nvs/manifest.json")).unwrap();
    assert_eq!(
        manifest.matches("\"secret\": true").count(),
        2,
        "{manifest}"
    );

    // Unchanged bytes are not rewritten, but a wider mode is narrowed.
    std::fs::set_permissions(&fctry, std::fs::Permissions::from_mode(0o644)).unwrap();
    let inode =
        |path: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(path).unwrap());
    let before = inode(&fctry);
    generate();
    assert_eq!((mode(&fctry), inode(&fctry)), (0o600, before));
    // Changed bytes replace a file of a wider mode with a private one.
    std::fs::write(&nvs, b"stale").unwrap();
    std::fs::set_permissions(&nvs, std::fs::Permissions::from_mode(0o666)).unwrap();
    generate();
    assert_eq!(mode(&nvs), 0o600);
    assert_ne!(std::fs::read(&nvs).unwrap(), b"stale");

    // Without such keys, the image gets the usual mode of a new file (not forced to 0600).
    std::fs::write(
        p.manifest(),
        "[package]\nname = \"p\"\nversion = \"0.1.0\"\n\n[package.metadata.nvs]\n\
         [package.metadata.nvs.partitions.nvs.namespaces.cfg]\nssid = \"lab\"\n",
    )
    .unwrap();
    let generated = generate();
    assert!(!generated.images[0].secret);
    let probe = p.dir.join("probe");
    std::fs::write(&probe, b"x").unwrap();
    assert_eq!(mode(&nvs), mode(&probe));
    let manifest = std::fs::read_to_string(out.join("nvs/manifest.json")).unwrap();
    assert!(manifest.contains("\"secret\": false"), "{manifest}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn metadata_reader_never_panics(body in "[ -~\\n]{0,200}", value in prop_oneof![
        Just("\"x\"".to_owned()), Just("{ u8 = 3 }".to_owned()), Just("{ u8 = { env = \"A\" } }".to_owned()),
        Just("{ file = 3 }".to_owned()), Just("[1, 2]".to_owned()), Just("{ hex = \"zz\" }".to_owned()),
        "[ -~]{0,30}",
    ]) {
        let p = Project::new(&[]);
        let _ = p.build(&body, &[]);
        let _ = p.build(&format!("[package.metadata.nvs.partitions.nvs.namespaces.ns]\nk = {value}\n"), &[]);
        let _ = Metadata::parse(Path::new("Cargo.toml"), &body);
    }
}

fn built(images: &[PartitionImage]) -> Vec<u8> {
    match images {
        [PartitionImage::Built(image)] => image.bytes.clone(),
        _ => panic!("one built image expected"),
    }
}

#[test]
fn floats_round_trip_with_idf_6_1() {
    let p = Project::new(&[]);
    let images = p
        .build(
            "[package.metadata.nvs.partitions.nvs]\nidf-version = \"6.1\"\n\
             [package.metadata.nvs.partitions.nvs.namespaces.cal]\n\
             gain = { f32 = 1.5 }\ntenth = { f32 = 0.1 }\noffset = { f64 = -2.5e-300 }\n\
             whole = { f32 = 2 }\nhot = { f64 = inf }\nenv = { f64 = { env = \"CAL_X\" } }\n",
            &[("CAL_X", "6.02e23")],
        )
        .unwrap();
    let parsed = read_image(&built(&images));
    assert!(parsed.problems.is_empty(), "{:?}", parsed.problems);
    let value = |key: &str| {
        parsed
            .items
            .iter()
            .find(|i| i.key == key)
            .map(|i| i.value.clone())
            .unwrap()
    };
    assert_eq!(value("gain"), ItemValue::Value(Value::F32(1.5)));
    assert_eq!(value("tenth"), ItemValue::Value(Value::F32(0.1)));
    assert_eq!(value("offset"), ItemValue::Value(Value::F64(-2.5e-300)));
    assert_eq!(value("whole"), ItemValue::Value(Value::F32(2.0)));
    assert_eq!(value("hot"), ItemValue::Value(Value::F64(f64::INFINITY)));
    assert_eq!(value("env"), ItemValue::Value(Value::F64(6.02e23)));
    // Newer releases are fine too.
    p.build(
        "[package.metadata.nvs.partitions.nvs]\nidf-version = \"v7.0.1\"\n\
         [package.metadata.nvs.partitions.nvs.namespaces.cal]\ngain = { f32 = 1.5 }\n",
        &[],
    )
    .unwrap();
}

#[test]
fn floats_need_idf_6_1() {
    let p = Project::new(&[]);
    for version in ["", "idf-version = \"6.0\"\n", "idf-version = \"6.0.2\"\n"] {
        let e = p.error(&format!(
            "[package.metadata.nvs.partitions.nvs]\n{version}\
             [package.metadata.nvs.partitions.nvs.namespaces.cal]\nk = {{ u8 = 1 }}\ngain = {{ f32 = 1.5 }}\n"
        ));
        let line = if version.is_empty() { 9 } else { 10 };
        assert!(
            e.contains(&at(line, 1)) && e.contains("`gain`") && e.contains("idf-version = \"6.1\""),
            "{e}"
        );
    }
    let e = p.error("[package.metadata.nvs.partitions.nvs]\nidf-version = \"six\"\n");
    assert!(e.contains(&at(7, 15)) && e.contains("idf-version"), "{e}");
}

#[test]
fn nan_and_out_of_range_floats_are_refused_without_echoing_them() {
    let p = Project::new(&[]);
    let head = "[package.metadata.nvs.partitions.nvs]\nidf-version = \"6.1\"\n\
                [package.metadata.nvs.partitions.nvs.namespaces.cal]\n";
    let e = p.error(&format!("{head}gain = {{ f32 = nan }}\n"));
    assert!(
        e.contains(&at(9, 1)) && e.contains("`gain`") && e.contains("NaN"),
        "{e}"
    );
    let e = p.error(&format!("{head}gain = {{ f64 = \"-nan\" }}\n"));
    assert!(e.contains("NaN"), "{e}");
    let e = p.error(&format!("{head}gain = {{ f32 = 3.5e39 }}\n"));
    assert!(
        e.contains("out of range for f32") && !e.contains("3.5e39"),
        "{e}"
    );
    let e = p.error(&format!("{head}gain = {{ f32 = \"1,5\" }}\n"));
    assert!(e.contains("not a number") && !e.contains("1,5"), "{e}");
    let e = p.error(&format!("{head}gain = {{ f32 = true }}\n"));
    assert!(e.contains("a number"), "{e}");
}

#[test]
fn long_strings_up_to_the_device_limit() {
    let p = Project::new(&[]);
    let s3999 = "x".repeat(3999);
    let images = p
        .build(
            &format!(
                "[package.metadata.nvs.partitions.nvs.namespaces.n]\na = {{ u8 = 1 }}\nlong = \"{s3999}\"\n"
            ),
            &[],
        )
        .unwrap();
    let parsed = read_image(&built(&images));
    assert!(parsed.problems.is_empty(), "{:?}", parsed.problems);
    let long = parsed.items.iter().find(|i| i.key == "long").unwrap();
    assert_eq!(long.value, ItemValue::Value(Value::String(s3999)));
    assert_eq!((long.page, long.entry), (1, 0));
    let e = p.error(&format!(
        "[package.metadata.nvs.partitions.nvs.namespaces.n]\nlong = \"{}\"\n",
        "x".repeat(4000)
    ));
    assert!(e.contains(&at(7, 1)) && e.contains("`long`"), "{e}");
    // CSV files keep the reference's limit.
    let csv = format!(
        "key,type,encoding,value\nn,namespace,,\nlong,data,string,{}\n",
        "x".repeat(3968)
    );
    let p = Project::new(&[("long.csv", csv.as_bytes())]);
    let e = p.error("[package.metadata.nvs.partitions.nvs]\ncsv = [\"long.csv\"]\n");
    assert!(e.contains("long.csv:3") && e.contains("`long`"), "{e}");
}

#[test]
fn nul_in_a_key_or_namespace_is_refused() {
    let p = Project::new(&[]);
    let e = p.error(
        "[package.metadata.nvs.partitions.nvs.namespaces.n]\nk = { u8 = 1 }\n\"k\\u0000x\" = { u8 = 2 }\n",
    );
    assert!(e.contains(&at(8, 1)) && e.contains("NUL"), "{e}");
    let e =
        p.error("[package.metadata.nvs.partitions.nvs.namespaces.\"\\u0000a\"]\nk = { u8 = 1 }\n");
    assert!(e.contains(&at(6, 49)) && e.contains("NUL"), "{e}");
    let csv = b"key,type,encoding,value\nn,namespace,,\nk,data,u8,1\nk\0x,data,u8,2\n";
    let p = Project::new(&[("nul.csv", csv)]);
    let e = p.error("[package.metadata.nvs.partitions.nvs]\ncsv = [\"nul.csv\"]\n");
    assert!(e.contains("nul.csv:4") && e.contains("NUL"), "{e}");
}

#[test]
fn many_keys_parse_with_correct_locations() {
    // 16,000 keys (the locations are a binary search over line starts, not a scan each).
    let mut nvs = String::from("[package.metadata.nvs.partitions.nvs]\n");
    for ns in 0..16 {
        nvs.push_str(&format!(
            "[package.metadata.nvs.partitions.nvs.namespaces.ns{ns}]\n"
        ));
        for k in 0..1000 {
            nvs.push_str(&format!("k{k} = {{ u32 = {k} }}\n"));
        }
    }
    nvs.push_str("bad = { u8 = 300 }\n");
    let text = format!("[package]\nname = \"p\"\n\n[package.metadata.nvs]\n{nvs}");
    let metadata = Metadata::parse(Path::new("Cargo.toml"), &text)
        .unwrap()
        .unwrap();
    let entries: usize = metadata.partitions[0]
        .namespaces
        .iter()
        .map(|n| n.entries.len())
        .sum();
    assert_eq!(entries, 16_001);
    let last = metadata.partitions[0].namespaces[15]
        .entries
        .last()
        .unwrap();
    assert_eq!(
        last.at.to_string(),
        format!("Cargo.toml:{}:1", 5 + 16 * 1001 + 1)
    );
}

/// `{ chip = "mac" | "mac-hex", dev = … }`: development builds take `dev`; with a MAC (mass
/// production at flash time) the chip's; mistakes are refused at their place in Cargo.toml.
#[test]
fn chip_values_take_dev_in_development_builds_and_the_mac_in_production() {
    use nvs_build::chip::{ChipValue, Mac};
    use nvs_build::metadata::ValueSource;
    let p = Project::new(&[]);
    let body = "[package.metadata.nvs.partitions.nvs.namespaces.ns]\n\
                serial = { string = { chip = \"mac\", dev = \"00:00:00:00:00:00\" } }\n\
                hexmac = { string = { chip = \"mac-hex\", dev = \"000000000000\" } }\n\
                id = { u64 = { chip = \"mac\", dev = 7 } }\n";
    let images = p.build(body, &[]).unwrap();
    let parsed = read_image(&built(&images));
    let value = |parsed: &nvs_build::format::ParsedImage, key: &str| {
        parsed
            .items
            .iter()
            .find(|i| i.key == key)
            .map(|i| i.value.clone())
            .unwrap()
    };
    assert_eq!(
        value(&parsed, "serial"),
        ItemValue::Value(Value::String("00:00:00:00:00:00".into()))
    );
    assert_eq!(value(&parsed, "id"), ItemValue::Value(Value::U64(7)));

    let text = std::fs::read_to_string(p.manifest()).unwrap();
    let metadata = Metadata::parse(&p.manifest(), &text).unwrap().unwrap();
    let sources: Vec<&ValueSource> = metadata.partitions[0].namespaces[0]
        .entries
        .iter()
        .map(|e| &e.source)
        .collect();
    assert_eq!(
        sources[1],
        &ValueSource::Chip {
            value: ChipValue::MacHex,
            dev: "000000000000".into()
        }
    );
    let mac = Mac([0xa4, 0xcf, 0x12, 0x0b, 0x1c, 0xfe]);
    let mut inputs = Inputs::new(|_| None).with_chip_mac(mac);
    let image = build_partition(&metadata.partitions[0], &metadata.manifest_dir, &mut inputs);
    let Ok(PartitionImage::Built(image)) = image else {
        panic!("built with the MAC")
    };
    let parsed = read_image(&image.bytes);
    assert_eq!(
        value(&parsed, "serial"),
        ItemValue::Value(Value::String("A4:CF:12:0B:1C:FE".into()))
    );
    assert_eq!(
        value(&parsed, "hexmac"),
        ItemValue::Value(Value::String("a4cf120b1cfe".into()))
    );
    assert_eq!(
        value(&parsed, "id"),
        ItemValue::Value(Value::U64(0xa4cf120b1cfe))
    );
}

#[test]
fn chip_value_mistakes_are_refused_where_they_are_written() {
    let p = Project::new(&[]);
    let ns = "[package.metadata.nvs.partitions.nvs.namespaces.ns]\n";
    // No dev value: say what to add.
    let e = p.error(&format!(
        "{ns}serial = {{ string = {{ chip = \"mac\" }} }}\n"
    ));
    assert!(
        e.contains(&at(7, 21))
            && e.contains("`serial`")
            && e.contains("add `dev = \"00:00:00:00:00:00\"`"),
        "{e}"
    );
    let e = p.error(&format!("{ns}id = {{ u64 = {{ chip = \"mac\" }} }}\n"));
    assert!(e.contains(&at(7, 14)) && e.contains("add `dev = 0`"), "{e}");
    // A type that cannot hold it.
    let e = p.error(&format!(
        "{ns}id = {{ u32 = {{ chip = \"mac\", dev = 1 }} }}\n"
    ));
    assert!(
        e.contains(&at(7, 23))
            && e.contains("`id`")
            && e.contains("fills string or u64 keys, not `u32`"),
        "{e}"
    );
    let e = p.error(&format!(
        "{ns}id = {{ u64 = {{ chip = \"mac-hex\", dev = 1 }} }}\n"
    ));
    assert!(e.contains("fills string keys, not `u64`"), "{e}");
    // A chip value that does not exist.
    let e = p.error(&format!(
        "{ns}sn = {{ string = {{ chip = \"serial\", dev = \"x\" }} }}\n"
    ));
    assert!(
        e.contains(&at(7, 26))
            && e.contains("unknown chip value `serial`")
            && e.contains("mac, mac-hex"),
        "{e}"
    );
    // Other fields beside it.
    let e = p.error(&format!(
        "{ns}sn = {{ string = {{ chip = \"mac\", dev = \"x\", env = \"Y\" }} }}\n"
    ));
    assert!(
        e.contains("unknown field") || e.contains("expected one of"),
        "{e}"
    );
}

/// A partition with chip values becomes a recipe (every value inline, `@chip:` cells for the
/// chip's); the recipe built with a MAC gives the bytes the metadata gives with that MAC, and a
/// CSV read without a MAC keeps `@chip:` cells as text, as Espressif's generator does.
#[test]
fn a_recipe_built_with_a_mac_equals_the_partition_built_with_it() {
    use nvs_build::chip::{Mac, recipe_csv};
    use nvs_build::format::{PartitionSize, Version};
    use nvs_build::resolve::partition_recipe;
    use nvs_build::{FileBase, ImageInput};
    let p = Project::new(&[
        ("cert.der", &[0u8, 1, 2, 0xff, b'\n', b'#'][..]),
        ("note.txt", "a note, \"quoted\"\n".as_bytes()),
        (
            "fctry.csv",
            b"key,type,encoding,value\nfirst,namespace,,\nblob,file,binary,cert.der\nn,data,i32,-3\n",
        ),
    ]);
    let body = "[package.metadata.nvs.partitions.nvs]\ncsv = [\"fctry.csv\"]\n\
                [package.metadata.nvs.partitions.nvs.namespaces.ns]\n\
                serial = { string = { chip = \"mac\", dev = \"00:00:00:00:00:00\" } }\n\
                note = { string = { file = \"note.txt\" } }\n\
                cert = { file = \"cert.der\" }\n\
                id = { u64 = { chip = \"mac\", dev = 7 } }\n\
                short = { string = { chip = \"mac-hex\", dev = \"x\" } }\n";
    p.build(body, &[]).unwrap();
    let text = std::fs::read_to_string(p.manifest()).unwrap();
    let metadata = Metadata::parse(&p.manifest(), &text).unwrap().unwrap();
    let spec = &metadata.partitions[0];
    let mut inputs = Inputs::new(|_| None).with_chip_mac(Mac::ZERO);
    let rows = partition_recipe(spec, &metadata.manifest_dir, &mut inputs)
        .unwrap()
        .unwrap();
    let csv = recipe_csv(&rows, &["a recipe".into()]).unwrap();
    assert!(csv.contains("serial,data,string,@chip:mac\n"), "{csv}");
    assert!(csv.contains("id,data,u64,@chip:mac\n"), "{csv}");
    assert!(csv.contains("short,data,string,@chip:mac-hex\n"), "{csv}");
    assert!(!csv.contains("cert.der"), "files are inline: {csv}");
    for mac in [
        Mac([1, 2, 3, 4, 5, 6]),
        Mac([0xa4, 0xcf, 0x12, 0x0b, 0x1c, 0xfe]),
    ] {
        let mut inputs = Inputs::new(|_| None).with_chip_mac(mac);
        let Ok(PartitionImage::Built(expected)) =
            build_partition(spec, &metadata.manifest_dir, &mut inputs)
        else {
            panic!("built")
        };
        let mut image = ImageInput::new(PartitionSize::new(0x3000).unwrap(), Version::V2);
        image.set_chip_mac(mac);
        image.allow_device_string_lengths(true);
        image
            .add_csv(
                Path::new("recipe.csv"),
                csv.as_bytes(),
                &FileBase::CurrentDir,
            )
            .unwrap();
        assert_eq!(image.finish().unwrap(), expected.bytes, "{mac}");
    }
    // Without a MAC, `@chip:mac` is a string like any other.
    let mut image = ImageInput::new(PartitionSize::new(0x3000).unwrap(), Version::V2);
    image
        .add_csv(
            Path::new("recipe.csv"),
            csv.as_bytes(),
            &FileBase::CurrentDir,
        )
        .unwrap_err(); // `u64` cannot read `@chip:mac`
    let mut image = ImageInput::new(PartitionSize::new(0x3000).unwrap(), Version::V2);
    image
        .add_csv(
            Path::new("plain.csv"),
            b"key,type,encoding,value\nns,namespace,,\ns,data,string,@chip:mac\n",
            &FileBase::CurrentDir,
        )
        .unwrap();
    let parsed = read_image(&image.finish().unwrap());
    assert_eq!(
        parsed.items[0].value,
        ItemValue::Value(Value::String("@chip:mac".into()))
    );
    // A MAC given to a CSV fills only the encodings that can hold it.
    let mut image = ImageInput::new(PartitionSize::new(0x3000).unwrap(), Version::V2);
    image.set_chip_mac(Mac::ZERO);
    let e = image
        .add_csv(
            Path::new("bad.csv"),
            b"key,type,encoding,value\nns,namespace,,\ns,data,u32,@chip:mac\n",
            &FileBase::CurrentDir,
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("bad.csv:3") && e.contains("string or u64"),
        "{e}"
    );
}
