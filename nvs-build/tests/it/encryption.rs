//! Encrypted images, byte-identical to the reference's `encrypt` with the same key.
#![cfg(feature = "encryption")]

use std::path::{Path, PathBuf};

use nvs_build::format::encryption::{XtsKey, decrypt_image, encrypt_image};
use nvs_build::format::{PartitionSize, Version, describe_differences, read_image};
use nvs_build::{FileBase, ImageInput};

fn vectors() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors")
}

fn read(rel: &str) -> Vec<u8> {
    std::fs::read(vectors().join(rel)).unwrap()
}

fn key(rel: &str) -> XtsKey {
    let file = XtsKey::from_key_file(&read(rel)).unwrap();
    assert!(file.crc_ok);
    file.key
}

fn plain(input: &str, size: u64, version: Version) -> Vec<u8> {
    let dir = vectors().join("in");
    let mut image = ImageInput::new(PartitionSize::new(size).unwrap(), version);
    image
        .add_csv_file(&dir.join(input), &FileBase::Dir(dir.clone()))
        .unwrap();
    image.finish().unwrap()
}

#[track_caller]
fn assert_same(ours: &[u8], expected: &[u8], what: &str) {
    if ours != expected {
        panic!(
            "{what}:\n{}",
            describe_differences(ours, expected, 6).join("\n")
        );
    }
}

#[test]
fn encrypted_images_match_the_reference() {
    let cases = [
        (
            "enc_simple.csv",
            0x3000,
            Version::V2,
            "in/keys_fixed.bin",
            "out/enc_simple.bin",
        ),
        (
            "many_pages.csv",
            0x20000,
            Version::V2,
            "in/keys_fixed.bin",
            "out/many_pages_enc.bin",
        ),
        (
            "all_types_v2_ok.csv",
            0x6000,
            Version::V2,
            "in/keys_fixed.bin",
            "out/all_types_v2_ok_enc.bin",
        ),
        (
            "all_types_v1_ok.csv",
            0x6000,
            Version::V1,
            "out/keys/hmac_derived_keys.bin",
            "out/all_types_v1_ok_enc.bin",
        ),
    ];
    for (input, size, version, key_file, expected) in cases {
        let key = key(key_file);
        let plaintext = plain(input, size, version);
        let mut ours = plaintext.clone();
        encrypt_image(&mut ours, &key);
        let reference = read(expected);
        assert_same(&ours, &reference, expected);

        // decrypt(encrypt(x)) == generate(x), and the reader works on the decrypted image.
        let mut decrypted = reference.clone();
        decrypt_image(&mut decrypted, &key);
        assert_same(&decrypted, &plaintext, "decrypted");
        assert!(read_image(&decrypted).problems.is_empty());
    }
}

#[test]
fn hmac_derived_key_file_matches_the_reference() {
    let hmac_key = read("in/hmac_key_fixed.bin");
    let ours = XtsKey::derive_from_hmac(&hmac_key).unwrap().to_key_file();
    assert_eq!(ours, read("out/keys/hmac_derived_keys.bin"));
}

#[test]
fn decrypting_with_the_wrong_key_fails_every_crc() {
    let mut image = read("out/enc_simple.bin");
    let mut wrong = [0x33u8; 64];
    wrong[32..].fill(0x44);
    decrypt_image(&mut image, &XtsKey::from_bytes(wrong).unwrap());
    let parsed = read_image(&image);
    assert!(parsed.is_damaged());
    assert!(parsed.items.is_empty());
}

#[test]
fn device_images_decrypt_by_true_offset() {
    // An entry in the middle of a page (as a device leaves it after erasing others) decrypts
    // with its own offset as the tweak.
    let key = key("in/keys_fixed.bin");
    let plaintext = plain("all_types_v2_ok.csv", 0x6000, Version::V2);
    let mut encrypted = plaintext.clone();
    encrypt_image(&mut encrypted, &key);
    // Mark entry 0 of page 0 EMPTY (as if never written) and wipe it: the rest still decrypts.
    let mut holey = encrypted.clone();
    holey[32] |= 0b11;
    holey[64..96].fill(0xFF);
    decrypt_image(&mut holey, &key);
    assert_eq!(holey[96..4096], plaintext[96..4096]);
}
