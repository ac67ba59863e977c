//! Property tests: no input makes the CSV front end or the image reader panic, and whatever the
//! builder writes, the reader reads back unchanged.

use std::path::Path;

use nvs_build::format::{ImageBuilder, ItemValue, PartitionSize, Value, Version, read_image};
use nvs_build::{FileBase, ImageInput};
use proptest::prelude::*;

fn csv_text() -> impl Strategy<Value = Vec<u8>> {
    // Mostly CSV-shaped text, sometimes raw bytes.
    let cell = prop_oneof![
        Just("namespace".to_owned()),
        Just("data".to_owned()),
        Just("file".to_owned()),
        Just("u8".to_owned()),
        Just("i64".to_owned()),
        Just("string".to_owned()),
        Just("hex2bin".to_owned()),
        Just("base64".to_owned()),
        Just("binary".to_owned()),
        Just("blob_fill(4;0xff)".to_owned()),
        "[ -~]{0,12}",
        "\\PC{0,6}",
        Just("\"a,\"\"b\"".to_owned()),
    ];
    let row = prop::collection::vec(cell, 0..6).prop_map(|cells| cells.join(","));
    let text = prop::collection::vec(row, 0..12).prop_map(|rows| {
        let mut t = String::from("key,type,encoding,value\n");
        for r in rows {
            t.push_str(&r);
            t.push('\n');
        }
        t.into_bytes()
    });
    prop_oneof![4 => text, 1 => prop::collection::vec(any::<u8>(), 0..300)]
}

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<u8>().prop_map(Value::U8),
        any::<i8>().prop_map(Value::I8),
        any::<u16>().prop_map(Value::U16),
        any::<i16>().prop_map(Value::I16),
        any::<u32>().prop_map(Value::U32),
        any::<i32>().prop_map(Value::I32),
        any::<u64>().prop_map(Value::U64),
        any::<i64>().prop_map(Value::I64),
        "\\PC{0,80}".prop_map(Value::String),
        prop::collection::vec(any::<u8>(), 0..9000).prop_map(Value::Blob),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn csv_front_end_never_panics(text in csv_text()) {
        let mut image = ImageInput::new(PartitionSize::new(0x4000).unwrap(), Version::V2);
        let base = FileBase::Dir(std::env::temp_dir().join("nvs-build-proptest-no-such-dir"));
        if image.add_csv(Path::new("fuzz.csv"), &text, &base).is_ok() {
            let _ = image.finish();
        }
    }

    #[test]
    fn reader_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..9000)) {
        let _ = read_image(&bytes);
    }

    #[test]
    fn reader_never_panics_on_damaged_images(flips in prop::collection::vec((0usize..0x4000, any::<u8>()), 1..20)) {
        let mut b = ImageBuilder::new(Version::V2);
        b.namespace("ns").unwrap();
        b.add("blob", Value::Blob(vec![7; 5000])).unwrap();
        b.add("s", Value::String("text".into())).unwrap();
        let mut image = b.finish(PartitionSize::new(0x4000).unwrap()).unwrap();
        for (at, byte) in flips {
            image[at] = byte;
        }
        let _ = read_image(&image);
    }

    #[test]
    fn what_is_written_reads_back(
        items in prop::collection::vec((0usize..3, value()), 0..30),
        v1 in any::<bool>(),
    ) {
        let version = if v1 { Version::V1 } else { Version::V2 };
        let mut b = ImageBuilder::new(version);
        let mut expected = Vec::new();
        let mut ns = None;
        for (i, (namespace, value)) in items.into_iter().enumerate() {
            if v1 && matches!(&value, Value::Blob(d) if d.len() > 1984) {
                continue;
            }
            // Namespaces only ever move forward (re-selecting is refused).
            if ns.is_none_or(|n| namespace > n) {
                ns = Some(namespace);
                b.namespace(&format!("ns{namespace}")).unwrap();
            }
            let key = format!("k{i}");
            b.add_verbatim(&key, value.clone()).unwrap();
            expected.push((format!("ns{}", ns.unwrap()), key, value));
        }
        let pages = b.pages_used();
        let image = b.finish(PartitionSize::new(((pages + 1) * 4096) as u64).unwrap()).unwrap();
        let parsed = read_image(&image);
        prop_assert!(parsed.problems.is_empty(), "{:?}", parsed.problems);
        let found: Vec<_> = parsed.items.iter().map(|i| {
            let value = match &i.value {
                ItemValue::Value(v) => v.clone(),
                ItemValue::Blob(b) => Value::Blob(b.data.clone()),
                ItemValue::Unreadable => panic!("unreadable {}", i.key),
            };
            (i.namespace.clone().unwrap(), i.key.clone(), value)
        }).collect();
        prop_assert_eq!(found, expected);
    }
}
