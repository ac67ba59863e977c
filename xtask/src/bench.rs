//! `cargo xtask bench`: our generator against the reference, in-process and as whole processes.
//! Prints figures only; timings are never asserted.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use nvs_build::format::{PartitionSize, Version};
use nvs_build::{FileBase, ImageInput};
use xshell::{Shell, cmd};

use crate::flags::Args;
use crate::reference::{self, MODULE};
use crate::{Result, project_root, target_dir};

const CSV: &str = "nvs-build/tests/vectors/in/perf50.csv";
const SIZE: u64 = 0x6000;
const REF_ITERATIONS: usize = 200;
const PROCESS_RUNS: usize = 20;
const BENCH_SCRIPT: &str = include_str!("ref_bench.py");

/// `bin`: a prebuilt `cargo-nvs` to time instead of the release build.
pub fn run(sh: &Shell, bin: Option<PathBuf>) -> Result<ExitCode> {
    let python = reference::ensure_venv(sh)?;
    // Timings only mean something for optimized code: the in-process loop runs in a release
    // build of xtask itself.
    if bin.is_some() {
        cmd!(sh, "cargo build --quiet --release -p xtask").run()?;
    } else {
        cmd!(sh, "cargo build --quiet --release -p cargo-nvs -p xtask").run()?;
    }
    let release = target_dir().join("release");
    let csv = project_root().join(CSV);
    let dir = scratch_dir()?;
    let our_image = dir.join("ours.bin");

    let inner = release.join("xtask");
    let out = cmd!(sh, "{inner} bench-inner {csv} {our_image}").read()?;
    let ours_in_process: f64 = out.trim().parse()?;

    let script = dir.join("ref_bench.py");
    sh.write_file(&script, BENCH_SCRIPT)?;
    let iterations = REF_ITERATIONS.to_string();
    let out = cmd!(sh, "{python} {script} {csv} {dir} {iterations}").read()?;
    let ref_in_process: f64 = out.trim().parse()?;
    let same = sh.read_binary_file(dir.join("ref.bin"))? == sh.read_binary_file(&our_image)?;

    let our_bin = match bin {
        Some(bin) => std::path::absolute(bin)?,
        None => release.join("cargo-nvs"),
    };
    let ours_process = mean_wall_time(&dir, &our_bin, &["generate"], &csv, "ours_cli.bin")?;
    let ref_process = mean_wall_time(
        &dir,
        &python,
        &["-m", MODULE, "generate"],
        &csv,
        "ref_cli.bin",
    )?;

    println!("bench: {CSV} into {SIZE:#x} (version 2)");
    println!(
        "  {:<32} {:>12} {:>12} {:>9}   target",
        "", "ours", "reference", "ratio"
    );
    println!(
        "  {:<32} {:>9.2} µs {:>9.0} µs {:>8.0}×   ours ≤ 10 µs, ≥ 100×",
        "in-process, per image",
        ours_in_process * 1e6,
        ref_in_process * 1e6,
        ref_in_process / ours_in_process
    );
    println!(
        "  {:<32} {:>9.2} ms {:>9.1} ms {:>8.0}×   ≥ 40×",
        format!("whole process, mean of {PROCESS_RUNS} runs"),
        ours_process.as_secs_f64() * 1e3,
        ref_process.as_secs_f64() * 1e3,
        ref_process.as_secs_f64() / ours_process.as_secs_f64()
    );
    if !same {
        println!("  warning: the two images differ; run `cargo xtask diff-ref`");
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(ExitCode::SUCCESS)
}

/// Outputs go to tmpfs when there is one, so that the disk does not time the reference.
fn scratch_dir() -> Result<PathBuf> {
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_owned()
    } else {
        target_dir()
    };
    let dir = base.join(format!("cargo-nvs-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn mean_wall_time(
    dir: &Path,
    program: &Path,
    args: &[&str],
    csv: &Path,
    output: &str,
) -> Result<Duration> {
    let run = || -> Result<Duration> {
        let start = Instant::now();
        let status = Command::new(program)
            .args(args)
            .arg(csv)
            .args([output, &format!("{SIZE:#x}")])
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        let elapsed = start.elapsed();
        if !status.success() {
            return Err(format!("{} failed: {status}", program.display()).into());
        }
        Ok(elapsed)
    };
    for _ in 0..2 {
        run()?;
    }
    let mut total = Duration::ZERO;
    for _ in 0..PROCESS_RUNS {
        total += run()?;
    }
    Ok(total / PROCESS_RUNS as u32)
}

/// `xtask bench-inner CSV OUT`: the in-process loop (run from a release build). Prints the
/// mean seconds per image and writes the image to OUT for comparison.
pub fn inner(mut args: Args) -> Result<ExitCode> {
    let csv = PathBuf::from(args.subcommand().ok_or("bench-inner CSV OUT")?);
    let out = PathBuf::from(args.subcommand().ok_or("bench-inner CSV OUT")?);
    args.finish()?;
    let bytes = std::fs::read(&csv)?;
    let size = PartitionSize::new(SIZE)?;
    let build = || -> Result<Vec<u8>> {
        let mut image = ImageInput::new(size, Version::V2);
        image.add_csv(black_box(&csv), black_box(&bytes), &FileBase::CurrentDir)?;
        Ok(image.finish()?)
    };
    std::fs::write(&out, build()?)?;
    for _ in 0..1000 {
        black_box(build()?);
    }
    // Batches until half a second has passed; the fastest batch is the least disturbed.
    let mut best = f64::INFINITY;
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(500) {
        let batch = Instant::now();
        for _ in 0..1000 {
            black_box(build()?);
        }
        best = best.min(batch.elapsed().as_secs_f64() / 1000.0);
    }
    println!("{best}");
    Ok(ExitCode::SUCCESS)
}
