//! The image reader on device-like images (written to by a real NVS implementation) and on
//! damaged ones.

use esp_nvs::Key;
use esp_nvs::mem_flash::MemFlash;
use nvs_build::format::{
    ImageBuilder, ItemValue, PageState, PartitionSize, Severity, Value, Version, read_image,
};

fn sample(size: u64) -> Vec<u8> {
    let mut b = ImageBuilder::new(Version::V2);
    b.namespace("mass_prod").unwrap();
    b.add("ProductID", Value::String("12345".into())).unwrap();
    b.add(
        "cert",
        Value::Blob((0..5000u32).map(|i| (i * 7) as u8).collect()),
    )
    .unwrap();
    b.add("hw_rev", Value::U8(3)).unwrap();
    b.namespace("user_data").unwrap();
    b.add("ssid", Value::String(String::new())).unwrap();
    b.finish(PartitionSize::new(size).unwrap()).unwrap()
}

fn errors(image: &[u8]) -> Vec<String> {
    read_image(image)
        .problems
        .into_iter()
        .filter(|p| p.severity == Severity::Error)
        .map(|p| format!("{:?}/{:?}: {}", p.page, p.entry, p.message))
        .collect()
}

/// Rewrites values the way firmware does: new copies are written, old ones ERASED, a blob
/// moves to the other chunk family (0x80), pages fill up and get recycled.
#[test]
fn images_written_by_a_device_read_cleanly() {
    let image = sample(0x6000);
    let mut nvs = esp_nvs::Nvs::new(0, image.len(), MemFlash::from_bytes(image)).unwrap();
    let user = Key::from_str("user_data");
    let prod = Key::from_str("mass_prod");
    for round in 0..300u32 {
        nvs.set(
            &user,
            &Key::from_str("ssid"),
            format!("network-{round}").as_str(),
        )
        .unwrap();
        nvs.set(&user, &Key::from_str("counter"), round).unwrap();
        if round % 60 == 0 {
            let blob: Vec<u8> = (0..700).map(|i| (i + round) as u8).collect();
            nvs.set(&prod, &Key::from_str("cert"), blob.as_slice())
                .unwrap();
        }
    }
    let device_image = nvs.into_inner().into_inner();
    let parsed = read_image(&device_image);
    assert!(
        errors(&device_image).is_empty(),
        "{:?}",
        errors(&device_image)
    );
    assert!(
        parsed.items.iter().any(|i| i.erased),
        "expected erased older copies"
    );
    let live = |key: &str| {
        let found: Vec<_> = parsed.live_items().filter(|i| i.key == key).collect();
        assert_eq!(found.len(), 1, "{key}: {found:?}");
        found[0].value.clone()
    };
    assert_eq!(
        live("ssid"),
        ItemValue::Value(Value::String("network-299".into()))
    );
    assert_eq!(live("counter"), ItemValue::Value(Value::U32(299)));
    match live("cert") {
        ItemValue::Blob(b) => {
            assert_eq!(
                b.data,
                (0..700).map(|i| (i + 240) as u8).collect::<Vec<u8>>()
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(
        parsed
            .items
            .iter()
            .any(|i| matches!(&i.value, ItemValue::Blob(b) if b.chunk_start == Some(0x80))),
        "the rewritten blob should be in the 0x80 chunk family"
    );
}

#[test]
fn freeing_page_follows_the_device() {
    // FULL page 0 turned FREEING: the device erases the ACTIVE page 1 (an "interrupted copy")
    // and with it keys found nowhere else. Error.
    let mut image = sample(0x6000);
    image[0..4].copy_from_slice(&PageState::FREEING.to_le_bytes());
    let parsed = read_image(&image);
    assert_eq!(parsed.pages[0].state, PageState::Freeing);
    let e = errors(&image);
    assert!(
        e.iter()
            .any(|e| e.contains("FREEING") && e.contains("`hw_rev`")),
        "{e:?}"
    );
}

#[test]
fn damage_is_reported() {
    let good = sample(0x6000);
    assert!(errors(&good).is_empty());

    let mut entry_crc = good.clone();
    entry_crc[64 + 32 + 10] ^= 0x01; // key byte of the first item
    assert!(
        errors(&entry_crc)
            .iter()
            .any(|e| e.contains("entry CRC mismatch"))
    );

    let mut data_crc = good.clone();
    data_crc[64 + 32 * 2] ^= 0x01; // first data byte of the string
    assert!(
        errors(&data_crc)
            .iter()
            .any(|e| e.contains("data CRC mismatch"))
    );

    let mut header = good.clone();
    header[5] ^= 0x01;
    assert!(
        errors(&header)
            .iter()
            .any(|e| e.contains("header CRC mismatch"))
    );

    let truncated = &good[..good.len() - 100];
    assert!(
        errors(truncated)
            .iter()
            .any(|e| e.contains("not a whole number"))
    );

    // Two used pages and one free page is a valid read/write partition; cut the free page off
    // and the device would have none.
    assert!(errors(&good[..0x3000]).is_empty());
    let mut no_free_page = good[..0x3000].to_vec();
    no_free_page[0x2000..0x3000].copy_from_slice(&good[0x1000..0x2000]);
    assert!(errors(&no_free_page).iter().any(|e| e.contains("no free")));

    // Drop the second chunk of the 5000-byte blob: mark its entries ERASED.
    let mut missing_chunk = good.clone();
    let page1_bitmap = 0x1000 + 32;
    missing_chunk[page1_bitmap] &= 0b1111_1100; // entry 0 of page 1 (chunk 1 header) → erased
    let e = errors(&missing_chunk);
    assert!(e.iter().any(|e| e.contains("missing chunk")), "{e:?}");

    let mut bad_state = good.clone();
    bad_state[32] = 0b0101_0101;
    assert!(errors(&bad_state).iter().any(|e| e.contains("ILLEGAL")));

    assert!(!errors(&[]).is_empty());
}
