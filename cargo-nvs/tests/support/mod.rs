//! Shared helpers for the CLI tests: the binary, the committed vectors, scratch folders.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
pub mod defmt_elf;
// The ROM-loader emulator serves a pseudo-terminal.
#[cfg(unix)]
pub mod fake_esp;

/// The binary, without the caller's `NVS_LEDGER` (which would name the ledger of every `mfg`
/// run): tests that want one set it.
pub fn bin() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cargo-nvs"));
    command.env_remove("NVS_LEDGER");
    command
}

/// A command's stderr as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The command succeeded (else its stderr is the message).
#[track_caller]
pub fn assert_ok(out: &Output) {
    assert!(out.status.success(), "command failed:\n{}", stderr(out));
}

/// The command failed without a panic, its stderr naming every needle.
#[track_caller]
pub fn assert_fails(out: &Output, needles: &[&str]) {
    let err = stderr(out);
    assert!(!out.status.success(), "expected a failure:\n{err}");
    for needle in needles {
        assert!(err.contains(needle), "stderr lacks {needle:?}:\n{err}");
    }
    assert!(!err.contains("panicked"), "{err}");
}

pub fn vectors() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../nvs-build/tests/vectors")
}

pub struct Case {
    pub dir: tempdir::Dir,
}

pub mod tempdir {
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A scratch folder under the target directory, removed on drop.
    pub struct Dir(PathBuf);

    impl Dir {
        pub fn new() -> Dir {
            static COUNTER: AtomicUsize = AtomicUsize::new(0);
            let n = COUNTER.fetch_add(1, Ordering::SeqCst);
            let path = Path::new(env!("CARGO_TARGET_TMPDIR"))
                .join(format!("cli-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).unwrap();
            Dir(path)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Case {
    pub fn new() -> Case {
        Case {
            dir: tempdir::Dir::new(),
        }
    }

    pub fn file(&self, name: &str, contents: impl AsRef<[u8]>) -> &Self {
        std::fs::write(self.dir.path().join(name), contents).unwrap();
        self
    }

    pub fn run(&self, args: &[&str]) -> Output {
        bin()
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap()
    }

    pub fn exists(&self, name: &str) -> bool {
        self.dir.path().join(name).exists()
    }

    /// Runs `generate input.csv out.bin SIZE` and expects a refusal mentioning every `needle`.
    #[track_caller]
    pub fn refuses(&self, csv: &str, size: &str, extra: &[&str], needles: &[&str]) {
        self.file("input.csv", csv);
        let mut args = vec!["generate", "input.csv", "out.bin", size];
        args.extend_from_slice(extra);
        let out = self.run(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let shown: String = csv.chars().take(200).collect();
        assert!(
            !out.status.success(),
            "expected failure for {shown:?}; stderr: {stderr}"
        );
        for needle in needles {
            assert!(
                stderr.contains(needle),
                "stderr lacks {needle:?}:\n{stderr}"
            );
        }
        assert!(!self.exists("out.bin"), "an output file was left behind");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// The `mfg` ledger's recorded devices as (device, image, sha256, issues), by device (ids a
/// run only reserved have no SHA-256 yet).
pub fn ledger_devices(path: &Path) -> Vec<(String, String, String, i64)> {
    let db = rusqlite::Connection::open(path).unwrap();
    let mut statement = db
        .prepare(
            "SELECT device, image, sha256, issues FROM devices WHERE sha256 <> '' ORDER BY device",
        )
        .unwrap();
    statement
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// An `mfg` manifest.csv as device → sha256.
pub fn manifest_shas(path: &Path) -> std::collections::HashMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| {
            let cells: Vec<&str> = l.split(',').collect();
            (cells[0].to_owned(), cells[3].to_owned())
        })
        .collect()
}

/// Lower-case hex SHA-256, as the ledger and manifests record images.
pub use cargo_nvs::hex::{hex, sha256_hex};

/// A MAC address as the production log writes it: `7c:df:a1:00:00:0a`.
pub fn mac_text(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| hex(std::slice::from_ref(b)))
        .collect::<Vec<_>>()
        .join(":")
}

/// A fresh, empty database on the test server as a `postgres://` URL: `NVS_TEST_POSTGRES` names
/// a server whose user may create databases (`cargo xtask ci` starts a throwaway one and sets
/// it; `cargo xtask postgres` runs one by hand). Without it the caller skips, except under CI,
/// where the PostgreSQL ledger must be tested: then this fails.
#[track_caller]
pub fn postgres_database(tag: &str) -> Option<String> {
    let Some(admin) = std::env::var("NVS_TEST_POSTGRES")
        .ok()
        .filter(|u| !u.is_empty())
    else {
        assert!(
            std::env::var_os("CI").is_none(),
            "NVS_TEST_POSTGRES is not set: CI must test the PostgreSQL ledger"
        );
        eprintln!("skipped: set NVS_TEST_POSTGRES to a PostgreSQL URL (cargo xtask ci does)");
        return None;
    };
    let name = format!("nvs_it_{tag}_{}", std::process::id());
    let mut client = postgres::Client::connect(&admin, postgres::NoTls).expect("the test server");
    for statement in [
        format!("DROP DATABASE IF EXISTS {name}"),
        format!("CREATE DATABASE {name}"),
    ] {
        client.batch_execute(&statement).unwrap();
    }
    let (base, query) = admin.split_once('?').unwrap_or((&admin, ""));
    let base = base.rsplit_once('/').map_or(base, |(b, _)| b);
    Some(if query.is_empty() {
        format!("{base}/{name}")
    } else {
        format!("{base}/{name}?{query}")
    })
}

/// A `cargo nvs dist` folder `base/dir` made by hand: a bootloader, the partition table `table_csv` and
/// an app, with manifest.json as dist writes it. Returns its firmware_sha256.
pub fn dist_folder(base: &Path, dir: &str, table_csv: &str) -> String {
    let folder = base.join(dir);
    std::fs::create_dir_all(&folder).unwrap();
    let csv = folder.join("partitions.csv");
    std::fs::write(&csv, table_csv).unwrap();
    let table = nvs_build::table::PartitionTable::load(&csv, 0x8000)
        .unwrap()
        .to_binary();
    let bootloader: Vec<u8> = (0..0x1800u32).map(|i| (i * 7 % 251) as u8).collect();
    let app: Vec<u8> = (0..0x3000u32).map(|i| (i * 13 % 241) as u8).collect();
    let segments = [
        (
            "bootloader",
            "bootloader",
            "bootloader.bin",
            0x0u32,
            &bootloader,
        ),
        (
            "partition table",
            "partition-table",
            "partition-table.bin",
            0x8000,
            &table,
        ),
        ("app", "app", "fw.bin", 0x20000, &app),
    ];
    let mut entries = Vec::new();
    for (name, role, file, offset, data) in segments {
        std::fs::write(folder.join(file), data).unwrap();
        entries.push(serde_json::json!({
            "name": name, "role": role, "file": file, "in_flash_args": true,
            "offset": offset, "size": data.len(),
            "sha256": cargo_nvs::hex::sha256_hex(data), "user_data": false, "secret": false,
        }));
    }
    let sha256 = cargo_nvs::firmware::firmware_sha256(
        segments
            .iter()
            .map(|(_, _, _, offset, data)| (*offset, data.as_slice())),
    );
    let manifest = serde_json::json!({
        "schema": "cargo-nvs/dist/v2", "package": "fw", "chip": "esp32c3",
        "with_dev_data": false, "firmware_sha256": sha256, "segments": entries,
    });
    std::fs::write(
        folder.join("manifest.json"),
        serde_json::to_vec_pretty(&manifest).unwrap(),
    )
    .unwrap();
    sha256
}
