//! Generate → read back: our reader finds exactly what was written, rebuilding the image from
//! what it found gives the same bytes, and an independent reader (the `esp-nvs` crate, a
//! bare-metal NVS implementation) reads the same values.

use std::path::{Path, PathBuf};

use esp_nvs::Key;
use esp_nvs::mem_flash::MemFlash;
use nvs_build::format::{ImageBuilder, ItemType, ItemValue, PartitionSize, Value, read_image};

fn out_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/out")
}

/// The reference's plain (unencrypted) outputs that we reproduce, with their partition sizes.
const IMAGES: &[(&str, u64)] = &[
    ("all_types_v2_ok.bin", 0x6000),
    ("all_types_v1_ok.bin", 0x6000),
    ("perf50.bin", 0x6000),
    ("edge_entry125.bin", 0x4000),
    ("edge_string_pageend.bin", 0x4000),
    ("edge_blob_at125.bin", 0x4000),
    ("edge_blob_at123.bin", 0x4000),
    ("edge_blob_fill_exact.bin", 0x4000),
    ("edge_blob_index_lastentry.bin", 0x4000),
    ("edge_string_max_v2.bin", 0x4000),
    ("edge_empty_values.bin", 0x4000),
    ("edge_empty_values_v1.bin", 0x3000),
    ("quirk_wifi.bin", 0x4000),
    ("quirk_encodings_ok.bin", 0x4000),
    ("quirk_namespaces_ok.bin", 0x4000),
    ("multi.bin", 0x3000),
    ("readonly_0x1000.bin", 0x1000),
    ("readonly_0x2000.bin", 0x2000),
];

fn value_of(item: &nvs_build::format::Item) -> Value {
    match &item.value {
        ItemValue::Value(v) => v.clone(),
        ItemValue::Blob(b) => Value::Blob(b.data.clone()),
        ItemValue::Unreadable => panic!("unreadable item {}", item.key),
    }
}

#[test]
fn read_back_and_rebuild_gives_the_same_bytes() {
    for &(name, size) in IMAGES {
        let bytes = std::fs::read(out_dir().join(name)).unwrap();
        let parsed = read_image(&bytes);
        assert!(parsed.problems.is_empty(), "{name}: {:?}", parsed.problems);
        let version = parsed.version().unwrap();
        let mut rebuilt = ImageBuilder::new(version);
        let mut namespace = None;
        for item in &parsed.items {
            assert!(!item.erased);
            if namespace.as_deref() != item.namespace.as_deref() {
                namespace = item.namespace.clone();
                rebuilt.namespace(namespace.as_deref().unwrap()).unwrap();
            }
            rebuilt.add_verbatim(&item.key, value_of(item)).unwrap();
        }
        let rebuilt = rebuilt.finish(PartitionSize::new(size).unwrap()).unwrap();
        assert_eq!(
            rebuilt, bytes,
            "{name}: rebuilding from the read-back items differs"
        );
    }
}

#[test]
fn esp_nvs_reads_the_same_values() {
    // esp-nvs, like the device, wants a free page: read/write partitions only.
    for &(name, _) in IMAGES.iter().filter(|(n, _)| !n.starts_with("readonly")) {
        let bytes = std::fs::read(out_dir().join(name)).unwrap();
        let parsed = read_image(&bytes);
        let mut nvs = esp_nvs::Nvs::new(0, bytes.len(), MemFlash::from_bytes(bytes.clone()))
            .unwrap_or_else(|e| panic!("{name}: esp-nvs cannot open the image: {e:?}"));
        for item in parsed.live_items() {
            let ns = Key::from_str(item.namespace.as_deref().unwrap());
            let key = Key::from_str(&item.key);
            let got = match item.item_type {
                ItemType::U8 => Value::U8(nvs.get(&ns, &key).unwrap()),
                ItemType::I8 => Value::I8(nvs.get(&ns, &key).unwrap()),
                ItemType::U16 => Value::U16(nvs.get(&ns, &key).unwrap()),
                ItemType::I16 => Value::I16(nvs.get(&ns, &key).unwrap()),
                ItemType::U32 => Value::U32(nvs.get(&ns, &key).unwrap()),
                ItemType::I32 => Value::I32(nvs.get(&ns, &key).unwrap()),
                ItemType::U64 => Value::U64(nvs.get(&ns, &key).unwrap()),
                ItemType::I64 => Value::I64(nvs.get(&ns, &key).unwrap()),
                ItemType::Str => Value::String(nvs.get(&ns, &key).unwrap()),
                ItemType::Blob | ItemType::BlobIndex => Value::Blob(
                    nvs.get::<Vec<u8>>(&ns, &key)
                        .unwrap_or_else(|e| panic!("{name}: blob {}: {e:?}", item.key)),
                ),
                ItemType::BlobData => unreachable!("chunks are assembled into blobs"),
                ItemType::F32 | ItemType::F64 => unreachable!("the golden vectors hold no floats"),
            };
            assert_eq!(got, value_of(item), "{name}: {}", item.key);
        }
    }
}
