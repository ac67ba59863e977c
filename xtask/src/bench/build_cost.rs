//! `cargo xtask bench build-cost`: what depending on nvs-build costs a build, against `cc`, the
//! usual build-dependency, side by side in one run.
//!
//! Two throwaway crates under `target/`: one whose build.rs runs `nvs_build::generate()` on a
//! one-key `[package.metadata.nvs]` (nvs-build as a path build-dependency, versions pinned by the
//! workspace's Cargo.lock), one whose build.rs compiles a one-line C file with `cc`. Dependencies
//! are fetched first, so downloads do not count; then each is built cold (`cargo build`, debug,
//! from an empty target dir of its own) a few times, one build at a time, alternating.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use xshell::{Shell, cmd};

use crate::{Result, project_root, target_dir};

/// Cold builds of each crate; the best and the median are reported.
const RUNS: usize = 3;

/// The figures, nvs-build first in each pair.
pub struct BuildCost {
    /// Each crate's cold build times, sorted.
    nvs_builds: Vec<Duration>,
    cc_builds: Vec<Duration>,
    /// What nvs-build and cc depend on (`cargo tree -e normal,build -p …`): unique crates besides
    /// themselves. (`-e normal -p` alone prints nothing for a build-dependency.)
    nvs_deps: usize,
    cc_deps: usize,
    /// Crates each throwaway build compiles (itself included).
    nvs_crates: usize,
    cc_crates: usize,
}

struct Scratch {
    /// The crate's folder.
    dir: PathBuf,
    /// Its own CARGO_TARGET_DIR, emptied before each build.
    target: PathBuf,
}

pub fn measure(sh: &Shell) -> Result<BuildCost> {
    let root = target_dir().join("xtask-build-cost");
    if root.exists() {
        std::fs::remove_dir_all(&root)?;
    }
    let nvs = write_nvs_crate(sh, &root.join("nvs"))?;
    let cc = write_cc_crate(sh, &root.join("cc"))?;
    for krate in [&nvs, &cc] {
        let _dir = sh.push_dir(&krate.dir);
        cmd!(sh, "cargo fetch --quiet")
            .quiet()
            .run()
            .map_err(|e| format!("cannot fetch the dependencies (offline?): {e}"))?;
    }
    let nvs_deps = unique_crates(sh, &nvs.dir, &["-e", "normal,build", "-p", "nvs-build"])?;
    let cc_deps = unique_crates(sh, &cc.dir, &["-e", "normal,build", "-p", "cc"])?;
    // Less the root itself.
    let (nvs_deps, cc_deps) = (nvs_deps.saturating_sub(1), cc_deps.saturating_sub(1));
    let nvs_crates = unique_crates(sh, &nvs.dir, &["-e", "normal,build"])?;
    let cc_crates = unique_crates(sh, &cc.dir, &["-e", "normal,build"])?;

    eprintln!("xtask: timing {RUNS} cold debug builds each of nvs-build and cc, one at a time");
    let mut nvs_builds = Vec::new();
    let mut cc_builds = Vec::new();
    // Alternating, so that a slow spell of the machine does not fall on one side only.
    for _ in 0..RUNS {
        nvs_builds.push(cold_build(&nvs)?);
        cc_builds.push(cold_build(&cc)?);
    }
    nvs_builds.sort();
    cc_builds.sort();
    let _ = std::fs::remove_dir_all(&root);
    Ok(BuildCost {
        nvs_builds,
        cc_builds,
        nvs_deps,
        cc_deps,
        nvs_crates,
        cc_crates,
    })
}

pub fn print(cost: &BuildCost) {
    let secs = |d: Duration| d.as_secs_f64();
    let (nvs_best, cc_best) = (cost.nvs_builds[0], cost.cc_builds[0]);
    let (nvs_median, cc_median) = (cost.nvs_builds[RUNS / 2], cost.cc_builds[RUNS / 2]);
    println!(
        "build cost: cold `cargo build` (debug) of a crate whose build.rs runs nvs_build::generate(),\n  \
         against one whose build.rs compiles a C file with cc (CARGO_INCREMENTAL=0, one at a time)"
    );
    println!(
        "  {:<32} {:>12} {:>12} {:>9}   target",
        "", "nvs-build", "cc", "ratio"
    );
    for (what, nvs, cc) in [
        (
            format!("cold debug build, best of {RUNS}"),
            nvs_best,
            cc_best,
        ),
        (
            format!("cold debug build, median of {RUNS}"),
            nvs_median,
            cc_median,
        ),
    ] {
        println!(
            "  {:<32} {:>10.2} s {:>10.2} s {:>8.1}×   nvs-build / cc ≤ 3×",
            what,
            secs(nvs),
            secs(cc),
            secs(nvs) / secs(cc)
        );
    }
    println!(
        "  {:<32} {:>12} {:>12}",
        "dependencies (cargo tree)", cost.nvs_deps, cost.cc_deps
    );
    println!(
        "  {:<32} {:>12} {:>12}",
        "crates compiled in the build", cost.nvs_crates, cost.cc_crates
    );
}

fn write_nvs_crate(sh: &Shell, dir: &Path) -> Result<Scratch> {
    let nvs_build = project_root().join("nvs-build");
    let nvs_build = nvs_build.to_str().filter(|p| !p.contains('\''));
    let nvs_build = nvs_build.ok_or("the nvs-build path does not fit in a TOML literal string")?;
    sh.write_file(
        dir.join("Cargo.toml"),
        format!(
            r#"[package]
name = "build-cost-nvs"
version = "0.0.0"
edition = "2024"
publish = false

[build-dependencies]
nvs-build = {{ path = '{nvs_build}' }}

[package.metadata.nvs]
partition-table = "partitions.csv"

[package.metadata.nvs.partitions.nvs.namespaces.config]
greeting = "hello"

# Not a member of the workspace the folder is in.
[workspace]
"#
        ),
    )?;
    // The versions the workspace is tested with (cargo drops the entries it does not need).
    sh.copy_file(project_root().join("Cargo.lock"), dir.join("Cargo.lock"))?;
    sh.write_file(
        dir.join("partitions.csv"),
        "# Name, Type, SubType, Offset, Size, Flags\nnvs, data, nvs, 0x9000, 0x6000,\n",
    )?;
    sh.write_file(
        dir.join("build.rs"),
        "fn main() {\n    nvs_build::generate();\n}\n",
    )?;
    // Fails to compile unless the image really was generated.
    sh.write_file(
        dir.join("src/lib.rs"),
        "pub static NVS: &[u8] = include_bytes!(concat!(env!(\"OUT_DIR\"), \"/nvs/nvs.bin\"));\n",
    )?;
    Ok(Scratch {
        dir: dir.to_owned(),
        target: dir.with_extension("target"),
    })
}

fn write_cc_crate(sh: &Shell, dir: &Path) -> Result<Scratch> {
    sh.write_file(
        dir.join("Cargo.toml"),
        r#"[package]
name = "build-cost-cc"
version = "0.0.0"
edition = "2024"
publish = false

[build-dependencies]
cc = "1"

# Not a member of the workspace the folder is in.
[workspace]
"#,
    )?;
    sh.write_file(dir.join("hello.c"), "int hello(void) { return 42; }\n")?;
    sh.write_file(
        dir.join("build.rs"),
        "fn main() {\n    cc::Build::new().file(\"hello.c\").compile(\"hello\");\n}\n",
    )?;
    sh.write_file(dir.join("src/lib.rs"), "//! Links `hello`.\n")?;
    Ok(Scratch {
        dir: dir.to_owned(),
        target: dir.with_extension("target"),
    })
}

/// `cargo tree --prefix none ARGS`: the number of distinct crates listed.
fn unique_crates(sh: &Shell, dir: &Path, args: &[&str]) -> Result<usize> {
    let _dir = sh.push_dir(dir);
    let out = cmd!(sh, "cargo tree --quiet --offline --prefix none {args...}")
        .quiet()
        .read()?;
    let mut crates: Vec<&str> = out
        .lines()
        .map(|l| l.trim_end_matches(" (*)").trim())
        .filter(|l| !l.is_empty())
        .collect();
    crates.sort_unstable();
    crates.dedup();
    Ok(crates.len())
}

/// One `cargo build` from an empty target dir, as a user's first build would be.
fn cold_build(krate: &Scratch) -> Result<Duration> {
    if krate.target.exists() {
        std::fs::remove_dir_all(&krate.target)?;
    }
    let start = Instant::now();
    let out = Command::new("cargo")
        .args(["build", "--offline", "--quiet"])
        .current_dir(&krate.dir)
        .env("CARGO_TARGET_DIR", &krate.target)
        // As for a crates.io dependency, which is never built incrementally (a path one is).
        .env("CARGO_INCREMENTAL", "0")
        // Nothing that would make the build less than cold.
        .env_remove("RUSTC_WRAPPER")
        .env_remove("CARGO_BUILD_RUSTC_WRAPPER")
        .env_remove("CARGO_BUILD_BUILD_DIR")
        .stdin(Stdio::null())
        .output()?;
    let elapsed = start.elapsed();
    if !out.status.success() {
        return Err(format!(
            "cargo build in {} failed: {}\n{}",
            krate.dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(elapsed)
}
