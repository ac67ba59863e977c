//! nvs-build is a build-dependency: its normal dependency tree (default features) must stay
//! small. The budget is 25 crates, nvs-build included; README.md states the current count.

use std::process::Command;

const BUDGET: usize = 25;

#[test]
fn normal_dependency_tree_stays_within_budget() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "tree",
            "-p",
            "nvs-build",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--manifest-path",
        ])
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
        .filter(|l| !l.is_empty())
        .collect();
    crates.sort();
    crates.dedup();
    assert!(
        crates.len() <= BUDGET,
        "nvs-build's normal dependency tree has {} crates (budget {BUDGET}):\n{}",
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
    ] {
        assert!(
            !crates.iter().any(|c| c.starts_with(&format!("{heavy} "))),
            "{heavy} must not be in nvs-build's tree"
        );
    }
}
