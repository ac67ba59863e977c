//! `read_image`'s verdict equals what ESP-IDF's nvs_flash does with the image: an error when
//! the device loses data or rewrites it away, a warning when it does something visible but
//! loses nothing (the cases observed on the device, recorded in ARCHITECTURE.md).

use nvs_build::format::{
    ImageBuilder, ItemType, ItemValue, PageState, PartitionSize, Severity, Value, Version,
    nvs_crc32, read_image,
};

/// Page 0 (FULL): namespace, `ProductID` (span 2), chunk 0 of `cert` up to entry 125.
/// Page 1 (ACTIVE): chunk 1 (entries 0..=35), index 36, `hw_rev` 37, namespace 38, `ssid`
/// 39..=40; entry 41 on is free.
fn sample() -> Vec<u8> {
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
    b.finish(PartitionSize::new(0x6000).unwrap()).unwrap()
}

fn problems(image: &[u8], severity: Severity) -> Vec<String> {
    read_image(image)
        .problems
        .into_iter()
        .filter(|p| p.severity == severity)
        .map(|p| format!("{:?}/{:?}: {}", p.page, p.entry, p.message))
        .collect()
}

fn errors(image: &[u8]) -> Vec<String> {
    problems(image, Severity::Error)
}

fn warnings(image: &[u8]) -> Vec<String> {
    problems(image, Severity::Warning)
}

/// Sets entry `entry` of page `page` to EMPTY (0b11) in the bitmap.
fn mark_empty(image: &mut [u8], page: usize, entry: usize) {
    image[page * 4096 + 32 + entry / 4] |= 0b11 << (2 * (entry % 4));
}

fn entry_at(page: usize, entry: usize) -> usize {
    page * 4096 + 64 + entry * 32
}

fn fix_entry_crc(image: &mut [u8], at: usize) {
    let mut covered = Vec::with_capacity(28);
    covered.extend_from_slice(&image[at..at + 4]);
    covered.extend_from_slice(&image[at + 8..at + 32]);
    let crc = nvs_crc32(&covered);
    image[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
}

#[test]
fn generated_images_have_no_problems() {
    assert!(read_image(&sample()).problems.is_empty());
}

#[test]
fn empty_bitmap_slot_holding_an_entry_on_an_active_page_is_an_error() {
    let mut image = sample();
    mark_empty(&mut image, 1, 37); // hw_rev
    let e = errors(&image);
    assert!(
        e.iter()
            .any(|e| e.contains("Some(1)/Some(37)") && e.contains("`hw_rev`")),
        "{e:?}"
    );
    // Everything written after it is erased by the device too.
    assert!(
        e.iter().any(|e| e.contains("`ssid`") && e.contains("lost")),
        "{e:?}"
    );
}

#[test]
fn empty_bitmap_slot_holding_an_entry_on_a_full_page_is_an_error() {
    let mut image = sample();
    mark_empty(&mut image, 0, 0); // the namespace entry of mass_prod
    let e = errors(&image);
    assert!(
        e.iter().any(|e| e.contains("Some(0)/Some(0)")
            && e.contains("`mass_prod`")
            && e.contains("vanishes")),
        "{e:?}"
    );
}

#[test]
fn freeing_page_is_an_error_when_the_device_loses_data() {
    // FULL → FREEING: the device erases the newest (ACTIVE) page, whose keys exist nowhere else.
    let mut image = sample();
    image[0..4].copy_from_slice(&PageState::FREEING.to_le_bytes());
    let e = errors(&image);
    assert!(
        e.iter().any(|e| e.contains("Some(0)/None")
            && e.contains("FREEING")
            && e.contains("`hw_rev`")
            && e.contains("`ssid`")),
        "{e:?}"
    );
}

#[test]
fn freeing_page_is_a_warning_when_the_device_only_copies_it() {
    // ACTIVE → FREEING: the device copies the page to a new one and erases it; nothing is lost.
    let mut b = ImageBuilder::new(Version::V2);
    b.namespace("ns").unwrap();
    b.add("n", Value::U32(7)).unwrap();
    let mut image = b.finish(PartitionSize::new(0x4000).unwrap()).unwrap();
    image[0..4].copy_from_slice(&PageState::FREEING.to_le_bytes());
    assert!(errors(&image).is_empty(), "{:?}", errors(&image));
    let w = warnings(&image);
    assert!(
        w.iter()
            .any(|w| w.contains("FREEING") && w.contains("copies")),
        "{w:?}"
    );
}

#[test]
fn garbage_after_the_first_free_slot_of_an_active_page_is_an_error() {
    let mut image = sample();
    image[entry_at(1, 60) + 12] = 0x00;
    let e = errors(&image);
    assert!(
        e.iter()
            .any(|e| e.contains("Some(1)/Some(60)") && e.contains("next item")),
        "{e:?}"
    );
    // Also right at the first free slot, header word still blank.
    let mut image = sample();
    image[entry_at(1, 41) + 20] = 0x12;
    assert!(
        errors(&image)
            .iter()
            .any(|e| e.contains("Some(1)/Some(41)")),
        "{:?}",
        errors(&image)
    );
    // A non-blank header word at the first free slot: the device marks it erased at init.
    let mut image = sample();
    image[entry_at(1, 41)] = 0x01;
    assert!(
        errors(&image)
            .iter()
            .any(|e| e.contains("Some(1)/Some(41)") && e.contains("erased at init")),
        "{:?}",
        errors(&image)
    );
}

#[test]
fn garbage_in_an_unused_slot_of_a_full_page_is_a_warning() {
    // A 3000-byte string and a 1000-byte one: the second starts page 1, page 0's entries 96..
    // stay unused.
    let mut b = ImageBuilder::new(Version::V2);
    b.namespace("ns").unwrap();
    b.add("a", Value::String("a".repeat(3000))).unwrap();
    b.add("b", Value::String("b".repeat(1000))).unwrap();
    let mut image = b.finish(PartitionSize::new(0x4000).unwrap()).unwrap();
    image[entry_at(0, 100) + 3] = 0x00;
    assert!(errors(&image).is_empty(), "{:?}", errors(&image));
    assert!(
        warnings(&image)
            .iter()
            .any(|w| w.contains("Some(0)/Some(100)")),
        "{:?}",
        warnings(&image)
    );
}

#[test]
fn garbage_in_a_page_without_header_is_a_warning() {
    let mut image = sample();
    image[0x3000 + 700] = 0x42;
    assert!(errors(&image).is_empty(), "{:?}", errors(&image));
    assert!(
        warnings(&image)
            .iter()
            .any(|w| w.contains("Some(3)/None") && w.contains("erases it")),
        "{:?}",
        warnings(&image)
    );
}

#[test]
fn a_page_whose_state_word_was_lost_is_an_error() {
    // State word flipped to 0xFFFFFFFF, header otherwise intact: the device sees a free page.
    let mut image = sample();
    image[0] = 0xFF;
    assert!(
        errors(&image)
            .iter()
            .any(|e| e.contains("Some(0)/None") && e.contains("free page")),
        "{:?}",
        errors(&image)
    );
}

#[test]
fn two_active_pages_are_a_warning() {
    let mut image = sample();
    image[0..4].copy_from_slice(&PageState::ACTIVE.to_le_bytes());
    assert!(errors(&image).is_empty(), "{:?}", errors(&image));
    assert!(
        warnings(&image)
            .iter()
            .any(|w| w.contains("2 pages are ACTIVE")),
        "{:?}",
        warnings(&image)
    );
}

#[test]
fn a_float_entry_made_by_hand_from_a_u32_reads_as_f32() {
    // What the device was observed to read: a u32 entry turned into type 0x24 holding 1.5f32
    // and four 0xFF bytes, entry CRC recomputed.
    let mut b = ImageBuilder::new(Version::V2);
    b.namespace("cal").unwrap();
    b.add("gain", Value::U32(0)).unwrap();
    b.add("big", Value::U64(0)).unwrap();
    let mut image = b.finish(PartitionSize::new(0x3000).unwrap()).unwrap();
    let gain = entry_at(0, 1);
    assert_eq!(image[gain + 1], 0x04);
    image[gain + 1] = 0x24;
    image[gain + 24..gain + 28].copy_from_slice(&1.5f32.to_le_bytes());
    fix_entry_crc(&mut image, gain);
    let big = entry_at(0, 2);
    image[big + 1] = 0x28;
    image[big + 24..big + 32].copy_from_slice(&(-2.25e300f64).to_le_bytes());
    fix_entry_crc(&mut image, big);

    let parsed = read_image(&image);
    assert!(parsed.problems.is_empty(), "{:?}", parsed.problems);
    let gain = parsed.items.iter().find(|i| i.key == "gain").unwrap();
    assert_eq!(gain.item_type, ItemType::F32);
    assert_eq!(gain.type_name(), "f32");
    assert_eq!(gain.value, ItemValue::Value(Value::F32(1.5)));
    assert_eq!(Value::F32(1.5).to_string(), "1.5");
    let big = parsed.items.iter().find(|i| i.key == "big").unwrap();
    assert_eq!(big.value, ItemValue::Value(Value::F64(-2.25e300)));
}

#[test]
fn floats_built_are_stored_like_the_integer_primitives() {
    let mut b = ImageBuilder::new(Version::V2);
    b.namespace("cal").unwrap();
    b.add("gain", Value::F32(1.5)).unwrap();
    b.add("offset", Value::F64(-0.1)).unwrap();
    let image = b.finish(PartitionSize::new(0x3000).unwrap()).unwrap();
    let gain = entry_at(0, 1);
    assert_eq!(&image[gain..gain + 4], &[1, 0x24, 1, 0xFF]);
    assert_eq!(
        &image[gain + 24..gain + 32],
        &[0x00, 0x00, 0xC0, 0x3F, 0xFF, 0xFF, 0xFF, 0xFF]
    );
    let offset = entry_at(0, 2);
    assert_eq!(&image[offset..offset + 4], &[1, 0x28, 1, 0xFF]);
    assert_eq!(&image[offset + 24..offset + 32], &(-0.1f64).to_le_bytes());
    let parsed = read_image(&image);
    assert!(parsed.problems.is_empty());
    assert_eq!(parsed.items[1].value, ItemValue::Value(Value::F64(-0.1)));
}

#[test]
fn device_length_strings_take_a_whole_page() {
    for len in [3967usize, 3968, 3999] {
        let mut b = ImageBuilder::new(Version::V2);
        b.allow_device_string_lengths(true);
        b.namespace("ns").unwrap();
        b.add("s", Value::String("x".repeat(len))).unwrap();
        b.add("after", Value::U8(1)).unwrap();
        let image = b.finish(PartitionSize::new(0x5000).unwrap()).unwrap();
        let parsed = read_image(&image);
        assert!(parsed.problems.is_empty(), "{len}: {:?}", parsed.problems);
        let s = parsed.items.iter().find(|i| i.key == "s").unwrap();
        assert_eq!(s.value, ItemValue::Value(Value::String("x".repeat(len))));
        if len >= 3968 {
            assert_eq!((s.page, s.entry), (1, 0), "{len}");
        }
    }
    let mut b = ImageBuilder::new(Version::V2);
    b.allow_device_string_lengths(true);
    b.namespace("ns").unwrap();
    assert!(b.add("s", Value::String("x".repeat(4000))).is_err());
    // Without the flag (the CSV drop-in), the reference's limit stays.
    let mut b = ImageBuilder::new(Version::V2);
    b.namespace("ns").unwrap();
    assert!(b.add("s", Value::String("x".repeat(3968))).is_err());
}

#[test]
fn nul_in_keys_and_namespaces_is_refused() {
    let mut b = ImageBuilder::new(Version::V2);
    assert!(b.namespace("\0a").is_err());
    b.namespace("ns").unwrap();
    b.add("k", Value::U8(1)).unwrap();
    let err = b.add("k\0x", Value::U8(2)).unwrap_err();
    assert!(err.to_string().contains("NUL"), "{err}");
}
