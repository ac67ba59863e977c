//! `cargo nvs encrypt`, `decrypt`, `generate-key` and `dump --keys`: byte-identical to the
//! reference for the same key, key files 0600 and never overwritten, key material never printed.

#[cfg(unix)]
use std::path::Path;
use std::process::Output;

use crate::support::{Case, bin, hex, vectors};

fn input(name: &str) -> String {
    vectors()
        .join("in")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

#[track_caller]
fn assert_fails_with(out: &std::process::Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure; stderr: {stderr}");
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "stderr lacks {needle:?}:\n{stderr}"
        );
    }
}

/// Key material must not appear in any output, as hex in either case.
#[track_caller]
fn assert_not_printed(out: &std::process::Output, secret: &[u8]) {
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
    .to_lowercase();
    assert!(
        !all.contains(&hex(&secret[..8])),
        "key material printed:\n{all}"
    );
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn encrypt_with_input_key_matches_the_reference() {
    let case = Case::new();
    let out = bin()
        .args([
            "encrypt",
            "all_types_v2_ok.csv",
            "enc.bin",
            "0x6000",
            "--inputkey",
            "keys_fixed.bin",
            "--out-dir",
        ])
        .arg(case.dir.path())
        .current_dir(vectors().join("in"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_not_printed(&out, &[0x11; 8]);
    let ours = std::fs::read(case.dir.path().join("enc.bin")).unwrap();
    assert_eq!(
        ours,
        std::fs::read(vectors().join("out/all_types_v2_ok_enc.bin")).unwrap()
    );

    // decrypt gives the plain image, dump --keys shows the values.
    let dec = case.run(&["decrypt", "enc.bin", &input("keys_fixed.bin"), "dec.bin"]);
    assert!(dec.status.success());
    assert_eq!(
        std::fs::read(case.dir.path().join("dec.bin")).unwrap(),
        std::fs::read(vectors().join("out/all_types_v2_ok.bin")).unwrap()
    );
    let dump = case.run(&["dump", "enc.bin", "--keys", &input("keys_fixed.bin")]);
    assert!(dump.status.success());
    assert!(String::from_utf8_lossy(&dump.stdout).contains("\"Hello NVS\""));
}

#[test]
fn keygen_derived_from_hmac_key_matches_the_reference() {
    let case = Case::new();
    let out = bin()
        .args(["encrypt", "all_types_v1_ok.csv"])
        .arg(case.dir.path().join("enc.bin"))
        .args([
            "0x6000",
            "--version",
            "1",
            "--keygen",
            "--key_protect_hmac",
            "--kp_hmac_inputkey",
            "hmac_key_fixed.bin",
            "--keyfile",
        ])
        .arg(case.dir.path().join("derived.bin"))
        .current_dir(vectors().join("in"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key_file = case.dir.path().join("derived.bin");
    assert_eq!(
        std::fs::read(&key_file).unwrap(),
        std::fs::read(vectors().join("out/keys/hmac_derived_keys.bin")).unwrap()
    );
    assert_eq!(
        std::fs::read(case.dir.path().join("enc.bin")).unwrap(),
        std::fs::read(vectors().join("out/all_types_v1_ok_enc.bin")).unwrap()
    );
    #[cfg(unix)]
    assert_eq!(mode(&key_file), 0o600);
    assert_not_printed(&out, &std::fs::read(&key_file).unwrap());
    let dump = case.run(&[
        "dump",
        "enc.bin",
        "--hmac-key",
        &input("hmac_key_fixed.bin"),
    ]);
    assert!(
        dump.status.success(),
        "{}",
        String::from_utf8_lossy(&dump.stderr)
    );
}

#[test]
fn generated_keys_are_private_never_collide_and_never_overwritten() {
    let case = Case::new();
    case.file(
        "in.csv",
        "key,type,encoding,value\nns,namespace,,\nsecret,data,string,hunter2\n",
    );
    for _ in 0..2 {
        let out = case.run(&["encrypt", "in.csv", "e.bin", "0x3000", "--keygen"]);
        assert!(out.status.success());
        assert!(!String::from_utf8_lossy(&out.stderr).contains("hunter2"));
    }
    let keys: Vec<_> = std::fs::read_dir(case.dir.path().join("keys"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(keys.len(), 2, "two runs, two distinct key files: {keys:?}");
    #[cfg(unix)]
    for key in &keys {
        assert_eq!(mode(key), 0o600);
    }

    let out = case.run(&["generate-key", "--keyfile", "mine.bin"]);
    assert!(out.status.success());
    let first = std::fs::read(case.dir.path().join("mine.bin")).unwrap();
    assert_not_printed(&out, &first);
    let again = case.run(&["generate-key", "--keyfile", "mine.bin"]);
    assert_fails_with(&again, &["mine.bin", "never overwritten", "--force"]);
    assert_eq!(
        std::fs::read(case.dir.path().join("mine.bin")).unwrap(),
        first
    );
    assert!(
        case.run(&["generate-key", "--keyfile", "mine.bin", "--force"])
            .status
            .success()
    );
    assert_ne!(
        std::fs::read(case.dir.path().join("mine.bin")).unwrap(),
        first
    );

    let hmac = case.run(&[
        "generate-key",
        "--keyfile",
        "h.bin",
        "--key-protect-hmac",
        "--kp-hmac-keygen",
    ]);
    assert!(hmac.status.success());
    #[cfg(unix)]
    assert_eq!(mode(&case.dir.path().join("hmac-h.bin")), 0o600);
    assert_eq!(
        std::fs::read(case.dir.path().join("hmac-h.bin"))
            .unwrap()
            .len(),
        32
    );
}

/// `encrypt` of a one-key CSV with `--inputkey NAME`, the key file holding `bytes`.
fn encrypt_with_key_file(name: &str, bytes: impl AsRef<[u8]>) -> (Case, Output) {
    let case = Case::new();
    case.file(
        "in.csv",
        "key,type,encoding,value\nns,namespace,,\na,data,u8,1\n",
    );
    case.file(name, bytes);
    let out = case.run(&["encrypt", "in.csv", "e.bin", "0x3000", "--inputkey", name]);
    (case, out)
}

#[test]
fn key_file_too_short() {
    let (case, out) = encrypt_with_key_file("short.bin", [1u8; 40]);
    assert_fails_with(&out, &["short.bin", "40 bytes", "64 key bytes"]);
    assert!(!case.exists("e.bin"));
}

#[test]
fn key_file_with_wrong_crc_warns() {
    let mut keys = std::fs::read(vectors().join("in/keys_fixed.bin")).unwrap();
    keys[64] ^= 0xFF;
    let (_case, out) = encrypt_with_key_file("badcrc.bin", &keys);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning") && stderr.contains("CRC"),
        "{stderr}"
    );
}

#[test]
fn equal_xts_halves_are_refused() {
    let (case, out) = encrypt_with_key_file("same.bin", [0x5Au8; 64]);
    assert_fails_with(&out, &["same.bin", "equal", "XTS forbids"]);
    assert!(!case.exists("e.bin"));
}

#[test]
fn keygen_and_inputkey_together() {
    let case = Case::new();
    case.file("in.csv", "key,type,encoding,value\n");
    let out = case.run(&[
        "encrypt",
        "in.csv",
        "e.bin",
        "0x3000",
        "--keygen",
        "--inputkey",
        &input("keys_fixed.bin"),
    ]);
    assert_fails_with(&out, &["--keygen", "--inputkey"]);
    let neither = case.run(&["encrypt", "in.csv", "e.bin", "0x3000"]);
    assert_fails_with(&neither, &["--keygen", "--inputkey"]);
    assert!(!case.exists("e.bin"));
}

#[test]
fn hmac_scheme_without_hmac_key() {
    let case = Case::new();
    let out = case.run(&["generate-key", "--keyfile", "k.bin", "--key-protect-hmac"]);
    assert_fails_with(&out, &["--kp-hmac-inputkey", "--kp-hmac-keygen"]);
    assert!(!case.exists("k.bin"));
}

#[test]
fn hmac_key_file_empty() {
    let case = Case::new();
    case.file("empty.bin", []);
    let out = case.run(&[
        "generate-key",
        "--keyfile",
        "k.bin",
        "--key-protect-hmac",
        "--kp-hmac-inputkey",
        "empty.bin",
    ]);
    assert_fails_with(&out, &["empty.bin", "HMAC key file is empty"]);
    assert!(!case.exists("k.bin"));
}

#[test]
fn decrypting_with_the_wrong_key() {
    let case = Case::new();
    case.file("wrong.bin", {
        let mut k = vec![0x33u8; 64];
        k[32..].fill(0x44);
        k
    });
    let image = vectors()
        .join("out/enc_simple.bin")
        .to_string_lossy()
        .into_owned();
    let out = case.run(&["decrypt", &image, "wrong.bin", "dec.bin"]);
    assert_fails_with(&out, &["wrong key?"]);
    assert!(!case.exists("dec.bin"));
    let dump = case.run(&["dump", &image, "--keys", "wrong.bin"]);
    assert_fails_with(&dump, &["wrong key?"]);
}

#[test]
fn encrypted_image_dumped_without_key() {
    let case = Case::new();
    let image = vectors()
        .join("out/many_pages_enc.bin")
        .to_string_lossy()
        .into_owned();
    let out = case.run(&["dump", &image]);
    assert_fails_with(&out, &["looks encrypted", "--keys"]);
}

#[test]
fn generated_keys_are_removed_when_the_image_cannot_be_written() {
    let case = Case::new();
    case.file(
        "in.csv",
        "key,type,encoding,value\nns,namespace,,\na,data,u8,1\n",
    );
    case.file("blocker", "a file, not a folder");
    let out = case.run(&[
        "encrypt",
        "in.csv",
        "blocker/e.bin",
        "0x3000",
        "--keygen",
        "--keyfile",
        "k.bin",
    ]);
    assert_fails_with(&out, &["cannot write `blocker/e.bin`"]);
    assert!(
        !case.exists("k.bin"),
        "a key file for an image that was never written was left behind"
    );
}
