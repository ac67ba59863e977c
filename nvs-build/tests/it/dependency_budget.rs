//! nvs-build is a build-dependency: what it makes users compile must stay small. The budget is
//! 25 crates besides nvs-build, counted as the distinct crates other than nvs-build in
//! `cargo tree -p nvs-build -e normal,build --prefix none`, with default features and with
//! `-F encryption`. ARCHITECTURE.md states the current counts.

use std::process::Command;

const BUDGET: usize = 25;

/// The distinct crates other than nvs-build in its normal and build dependency tree.
fn tree(features: &[&str]) -> Vec<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "tree",
            "-p",
            "nvs-build",
            "-e",
            "normal,build",
            "--prefix",
            "none",
        ])
        .args(features)
        .arg("--manifest-path")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut crates: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim_end_matches(" (*)").to_owned())
        .filter(|l| !l.is_empty() && !l.starts_with("nvs-build "))
        .collect();
    crates.sort();
    crates.dedup();
    crates
}

fn check(features: &[&str]) {
    let crates = tree(features);
    assert!(
        crates.len() <= BUDGET,
        "nvs-build {features:?} pulls in {} crates besides itself (budget {BUDGET}):\n{}",
        crates.len(),
        crates.join("\n")
    );
    for heavy in [
        "espflash",
        "clap",
        "cargo_metadata",
        "serialport",
        "anyhow",
        "miette",
        "serde_derive",
        "syn",
        "rusqlite",
        "postgres",
    ] {
        assert!(
            !crates.iter().any(|c| c.starts_with(&format!("{heavy} "))),
            "{heavy} must not be in nvs-build's tree ({features:?})"
        );
    }
}

#[test]
fn default_features_stay_within_budget() {
    check(&[]);
}

#[test]
fn encryption_stays_within_budget() {
    check(&["-F", "encryption"]);
}
