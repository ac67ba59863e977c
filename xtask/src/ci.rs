//! `cargo xtask ci`: everything `.ci/run` checks, in the order a failure is cheapest to find.

use std::process::ExitCode;

use xshell::{Shell, cmd};

use crate::Result;

/// nvs-build's promise to users compiling it with older (ESP) toolchains.
const NVS_BUILD_MSRV: (u32, u32) = (1, 85);

pub fn run(sh: &Shell, diff_cases: usize) -> Result<ExitCode> {
    let steps: &[(&str, &dyn Fn() -> Result<()>)] = &[
        ("format", &|| {
            Ok(cmd!(sh, "cargo fmt --all -- --check").run()?)
        }),
        ("clippy", &|| {
            cmd!(sh, "cargo clippy --workspace --all-targets -- -D warnings").run()?;
            // nvs-build as a plain build-dependency, without the encryption feature.
            Ok(cmd!(
                sh,
                "cargo clippy -p nvs-build --no-default-features --all-targets -- -D warnings"
            )
            .run()?)
        }),
        // Everything, tests included, must also compile for Windows (the GNU target: its linker
        // and C compiler come from Debian, unlike MSVC's).
        ("clippy-windows", &|| {
            ensure_windows_target(sh)?;
            Ok(cmd!(
                sh,
                "cargo clippy --workspace --all-targets --target {WINDOWS} -- -D warnings"
            )
            .run()?)
        }),
        ("msrv", &|| check_msrv(sh)),
        // What crates.io would get: both crates at once (cargo-nvs needs the unpublished
        // nvs-build), each built from its .crate alone. About 7 s warm, 40 s after a cold
        // workspace build (a few dependencies are built with other features); --allow-dirty so
        // that a run from a working tree checks the tree as it is.
        ("package", &|| {
            forget_packaged_copies()?;
            Ok(cmd!(sh, "cargo package -p nvs-build -p cargo-nvs --allow-dirty").run()?)
        }),
        // Before the tests: the flashing tests flash this firmware's real ELF.
        ("firmware", &|| build_firmware(sh)),
        ("test", &|| {
            // The flashing tests check `cargo nvs dist` output with esptool too, and the ledger
            // tests need a PostgreSQL server (they fail, not skip, under CI=true without one).
            let esptool = crate::reference::ensure_esptool(sh)?;
            // Values from the chip are checked against the reference generator (the test
            // fails, not skips, under CI=true without it).
            crate::reference::ensure_venv(sh)?;
            let postgres = crate::postgres::Server::start(sh)?;
            let ca = postgres
                .ca
                .as_ref()
                .map(|ca| ca.display().to_string())
                .unwrap_or_default();
            Ok(cmd!(sh, "cargo test --workspace")
                .env("CARGO_NVS_ESPTOOL", esptool)
                .env("NVS_TEST_POSTGRES", postgres.url())
                .env("NVS_TEST_POSTGRES_CA", ca)
                .run()?)
        }),
        ("doc", &|| {
            Ok(cmd!(sh, "cargo doc -p nvs-build --no-deps --all-features")
                .env("RUSTDOCFLAGS", "-D warnings")
                .run()?)
        }),
        ("diff-ref", &|| {
            let cases = diff_cases.to_string();
            Ok(cmd!(sh, "cargo xtask diff-ref --cases {cases}").run()?)
        }),
        // Mass production: random configs and values files, every device against the reference.
        ("diff-mfg", &|| {
            Ok(cmd!(sh, "cargo xtask diff-mfg --cases 5 --devices 120").run()?)
        }),
    ];
    let mut failed = Vec::new();
    let mut took = Vec::new();
    for &(name, step) in steps {
        eprintln!("\n=== ci: {name}");
        let start = std::time::Instant::now();
        if let Err(e) = step() {
            eprintln!("ci: {name} failed: {e}");
            failed.push(name);
        }
        took.push(format!("{name} {:.0?}", start.elapsed()));
    }
    eprintln!("\nci: time per step: {}", took.join(", "));
    let passed = steps.len() - failed.len();
    if !failed.is_empty() {
        eprintln!("\nci: failed steps: {}", failed.join(", "));
    }
    println!("ci: {passed} passed, {} failed", failed.len());
    Ok(if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

const WINDOWS: &str = "x86_64-pc-windows-gnu";

/// The Windows target's standard library through rustup, and MinGW-w64's C compiler (build
/// scripts of ring and rusqlite compile C for the target) from Debian when it is missing.
fn ensure_windows_target(sh: &Shell) -> Result<()> {
    cmd!(sh, "rustup target add {WINDOWS}").run()?;
    if crate::debian::which("x86_64-w64-mingw32-gcc").is_none() {
        crate::debian::install(
            sh,
            "gcc-mingw-w64-x86-64",
            "MinGW-w64's C compiler for Windows (x86_64-w64-mingw32-gcc)",
        )?;
    }
    Ok(())
}

/// Only one Rust toolchain can be installed here, so the MSRV is checked two ways: clippy's
/// `incompatible_msrv` lint (workspace lints, denied) catches std APIs newer than nvs-build's
/// `rust-version`, and this check makes sure no crate in its normal dependency tree (every
/// feature on) declares a newer `rust-version`.
fn check_msrv(sh: &Shell) -> Result<()> {
    // The default format is "name vVERSION" (plus markers), which is all this needs.
    let tree = cmd!(
        sh,
        "cargo tree -p nvs-build -e normal --all-features --prefix none"
    )
    .read()?;
    let metadata: serde_json::Value =
        serde_json::from_str(&cmd!(sh, "cargo metadata --format-version 1").read()?)?;
    let packages = metadata["packages"]
        .as_array()
        .ok_or("cargo metadata: no packages")?;
    let mut too_new = Vec::new();
    for line in tree.lines() {
        let mut words = line.split_whitespace();
        let (Some(name), Some(version)) = (words.next(), words.next()) else {
            continue;
        };
        let version = version.trim_start_matches('v');
        let package = packages
            .iter()
            .find(|p| p["name"] == name && p["version"] == version);
        let Some(rust) = package.and_then(|p| p["rust_version"].as_str()) else {
            continue;
        };
        let mut parts = rust.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
        if (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) > NVS_BUILD_MSRV {
            too_new.push(format!("{name} {version} needs Rust {rust}"));
        }
    }
    too_new.sort();
    too_new.dedup();
    if too_new.is_empty() {
        eprintln!(
            "msrv: every crate in nvs-build's tree builds with Rust {}.{}",
            NVS_BUILD_MSRV.0, NVS_BUILD_MSRV.1
        );
        Ok(())
    } else {
        Err(format!(
            "nvs-build promises Rust {}.{}, but {}",
            NVS_BUILD_MSRV.0,
            NVS_BUILD_MSRV.1,
            too_new.join("; ")
        )
        .into())
    }
}

/// Builds the ESP32-C3 firmware example (its own workspace, target and lock file).
pub fn build_firmware(sh: &Shell) -> Result<()> {
    cmd!(sh, "rustup target add riscv32imc-unknown-none-elf").run()?;
    let _dir = sh.push_dir("examples/esp32c3-factory-data");
    cmd!(sh, "cargo build --release --locked").run()?;
    Ok(())
}

/// Cargo verifies cargo-nvs against nvs-build's `.crate`, which it takes for a registry
/// crate, builds into the workspace's `target/debug`, and never rebuilds while its version stays
/// the same: a later run would build cargo-nvs against that stale nvs-build. Remove it (and the
/// staging folder, and cargo's extraction of it) first; the workspace's own nvs-build is rebuilt
/// with it, a few seconds.
fn forget_packaged_copies() -> Result<()> {
    let target = crate::target_dir();
    let mut stale = vec![target.join("package")];
    for dir in [".fingerprint", "deps"] {
        let Ok(entries) = std::fs::read_dir(target.join("debug").join(dir)) else {
            continue;
        };
        stale.extend(entries.flatten().map(|e| e.path()).filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with("nvs-build-")
                    || n.starts_with("libnvs_build-")
                    || n.starts_with("nvs_build-")
            })
        }));
    }
    // Cargo also extracts the `.crate` under CARGO_HOME (a folder per local registry, not
    // crates.io's) and reuses that extraction while the version stays the same.
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cargo")));
    for kind in ["src", "cache"] {
        let Some(registries) = cargo_home.as_ref().map(|h| h.join("registry").join(kind)) else {
            continue;
        };
        let Ok(entries) = std::fs::read_dir(registries) else {
            continue;
        };
        for registry in entries.flatten() {
            if registry.file_name().to_string_lossy().starts_with("index.") {
                continue;
            }
            let Ok(crates) = std::fs::read_dir(registry.path()) else {
                continue;
            };
            stale.extend(crates.flatten().map(|e| e.path()).filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("nvs-build-") || n.starts_with("cargo-nvs-"))
            }));
        }
    }
    for path in stale {
        let removed = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        match removed {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot remove `{}`: {e}", path.display()).into()),
        }
    }
    Ok(())
}
