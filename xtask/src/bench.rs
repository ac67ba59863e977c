//! `cargo xtask bench`: our generator against the reference, in-process (plain and encrypted
//! images) and as whole processes, and the cold build cost of depending on nvs-build against
//! `cc`'s (see `build_cost`). Prints figures only; timings are never asserted.

mod build_cost;
mod ledger;
mod mfg;

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
/// The encryption key: an nvs_keys image, as `--inputkey` takes it.
const KEY: &str = "nvs-build/tests/vectors/in/keys_fixed.bin";
const SIZE: u64 = 0x6000;
const REF_ITERATIONS: usize = 200;
/// The reference's encrypt() takes about twice as long as its generate().
const REF_ENC_ITERATIONS: usize = 100;
const PROCESS_RUNS: usize = 20;
const BENCH_SCRIPT: &str = include_str!("ref_bench.py");

/// `cargo xtask bench [build-cost] [--bin PATH] [--no-build-cost]`.
pub struct Options {
    /// A prebuilt `cargo-nvs` to time instead of the release build.
    bin: Option<PathBuf>,
    /// Time image generation (everything but the build cost).
    runtime: bool,
    build_cost: bool,
    /// Flashing: one connection against the espflash-then-esptool workflow (emulator).
    flash: bool,
    /// Flashing with the emulator's wire time on: elapsed against the wire limit.
    wire: bool,
    /// `cargo nvs mfg generate` against mfg_gen's work (see `mfg`).
    mfg: bool,
    /// The PostgreSQL ledger against SQLite (see `ledger`).
    ledger: bool,
    /// `mfg station` against esptool, 1, 2 and 4 ports, wire time on.
    station: bool,
}

impl Options {
    pub fn parse(args: &mut Args) -> Result<Options> {
        let only_build_cost = match args.subcommand().as_deref() {
            None => false,
            Some("build-cost") => true,
            Some("flash") => {
                return Ok(Options {
                    bin: None,
                    runtime: false,
                    build_cost: false,
                    flash: true,
                    wire: false,
                    mfg: false,
                    ledger: false,
                    station: false,
                });
            }
            Some("wire") => {
                return Ok(Options {
                    bin: None,
                    runtime: false,
                    build_cost: false,
                    flash: false,
                    wire: true,
                    mfg: false,
                    ledger: false,
                    station: false,
                });
            }
            Some("mfg") => {
                return Ok(Options {
                    bin: args.value("--bin")?,
                    runtime: false,
                    build_cost: false,
                    flash: false,
                    wire: false,
                    mfg: true,
                    ledger: false,
                    station: false,
                });
            }
            Some("ledger") => {
                return Ok(Options {
                    bin: None,
                    runtime: false,
                    build_cost: false,
                    flash: false,
                    wire: false,
                    mfg: false,
                    ledger: true,
                    station: false,
                });
            }
            Some("station") => {
                return Ok(Options {
                    bin: None,
                    runtime: false,
                    build_cost: false,
                    flash: false,
                    wire: false,
                    mfg: false,
                    ledger: false,
                    station: true,
                });
            }
            Some(other) => return Err(format!("unknown bench `{other}`").into()),
        };
        let no_build_cost = args.flag("--no-build-cost");
        let bin = args.value("--bin")?;
        if only_build_cost && (no_build_cost || bin.is_some()) {
            return Err("`bench build-cost` takes no --no-build-cost or --bin".into());
        }
        Ok(Options {
            bin,
            runtime: !only_build_cost,
            build_cost: !no_build_cost,
            flash: false,
            wire: false,
            mfg: false,
            ledger: false,
            station: false,
        })
    }
}

pub fn run(sh: &Shell, opts: Options) -> Result<ExitCode> {
    if opts.ledger {
        ledger::run(sh)?;
        return Ok(ExitCode::SUCCESS);
    }
    if opts.mfg {
        mfg::run(sh, opts.bin)?;
        return Ok(ExitCode::SUCCESS);
    }
    if opts.flash {
        // The emulator lives in cargo-nvs's test support, so the measurement is an ignored test.
        crate::ci::build_firmware(sh)?;
        let esptool = crate::reference::ensure_esptool(sh)?;
        cmd!(sh, "cargo test --quiet -p cargo-nvs --test it flash_cli::flash_workflow_comparison -- --ignored --nocapture")
            .env("CARGO_NVS_ESPTOOL", esptool)
            .run()?;
        return Ok(ExitCode::SUCCESS);
    }
    if opts.station {
        // An ignored test too; release, as a station runs (the stub's compression is CPU).
        crate::ci::build_firmware(sh)?;
        let esptool = crate::reference::ensure_esptool(sh)?;
        cmd!(sh, "cargo test --release --quiet -p cargo-nvs --test it station::station_benchmark -- --ignored --nocapture")
            .env("CARGO_NVS_ESPTOOL", esptool)
            .run()?;
        return Ok(ExitCode::SUCCESS);
    }
    if opts.wire {
        // Also an ignored test, for the same reason.
        crate::ci::build_firmware(sh)?;
        cmd!(sh, "cargo test --quiet -p cargo-nvs --test it flash_cli::wire_time_benchmark -- --ignored --nocapture")
            .run()?;
        return Ok(ExitCode::SUCCESS);
    }
    if opts.runtime {
        run_runtime(sh, opts.bin)?;
    }
    if opts.build_cost {
        if opts.runtime {
            println!();
        }
        match build_cost::measure(sh) {
            Ok(cost) => build_cost::print(&cost),
            // The figures above stand on their own.
            Err(e) if opts.runtime => println!("build cost: not measured: {e}"),
            Err(e) => return Err(e),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `bin`: a prebuilt `cargo-nvs` to time instead of the release build.
fn run_runtime(sh: &Shell, bin: Option<PathBuf>) -> Result<()> {
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
    let key = project_root().join(KEY);
    let dir = scratch_dir()?;
    let our_image = dir.join("ours.bin");
    let our_encrypted = dir.join("ours_enc.bin");

    let inner = release.join("xtask");
    let out = cmd!(
        sh,
        "{inner} bench-inner {csv} {our_image} {key} {our_encrypted}"
    )
    .read()?;
    let (ours_in_process, ours_encrypt) = match out.split_whitespace().collect::<Vec<_>>()[..] {
        [plain, encrypted] => (plain.parse::<f64>()?, encrypted.parse::<f64>()?),
        _ => return Err(format!("bench-inner printed {out:?}").into()),
    };

    let script = dir.join("ref_bench.py");
    sh.write_file(&script, BENCH_SCRIPT)?;
    let iterations = REF_ITERATIONS.to_string();
    let out = cmd!(sh, "{python} {script} generate {csv} {dir} {iterations}").read()?;
    let ref_in_process: f64 = out.trim().parse()?;
    let iterations = REF_ENC_ITERATIONS.to_string();
    let out = cmd!(
        sh,
        "{python} {script} encrypt {csv} {dir} {iterations} {key}"
    )
    .read()?;
    let ref_encrypt: f64 = out.trim().parse()?;
    let same = sh.read_binary_file(dir.join("ref.bin"))? == sh.read_binary_file(&our_image)?;
    let same_encrypted =
        sh.read_binary_file(dir.join("ref_enc.bin"))? == sh.read_binary_file(&our_encrypted)?;

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

    println!("bench: {CSV} into {SIZE:#x} (version 2; encrypted with {KEY})");
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
        "  {:<32} {:>9.2} µs {:>9.0} µs {:>8.0}×   ≥ 100×",
        "in-process, encrypted, per image",
        ours_encrypt * 1e6,
        ref_encrypt * 1e6,
        ref_encrypt / ours_encrypt
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
    if !same_encrypted {
        println!("  warning: the two encrypted images differ; run `cargo xtask diff-ref`");
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
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

/// `xtask bench-inner CSV OUT KEY ENC_OUT`: the in-process loops (run from a release build).
/// Prints the seconds per image, plain then encrypted with the key file KEY, one a line, and
/// writes the images to OUT and ENC_OUT for comparison.
pub fn inner(mut args: Args) -> Result<ExitCode> {
    const USAGE: &str = "bench-inner CSV OUT KEY ENC_OUT";
    let mut next = || args.subcommand().map(PathBuf::from).ok_or(USAGE);
    let (csv, out, key_file, enc_out) = (next()?, next()?, next()?, next()?);
    args.finish()?;
    let bytes = std::fs::read(&csv)?;
    let key = nvs_build::keys::load_key_file(&key_file)?.key;
    let size = PartitionSize::new(SIZE)?;
    let image = || -> Result<ImageInput> {
        let mut image = ImageInput::new(size, Version::V2);
        image.add_csv(black_box(&csv), black_box(&bytes), &FileBase::CurrentDir)?;
        Ok(image)
    };
    let plain = || -> Result<Vec<u8>> { Ok(image()?.finish()?) };
    let encrypted = || -> Result<Vec<u8>> { Ok(image()?.finish_encrypted(black_box(&key))?) };
    std::fs::write(&out, plain()?)?;
    std::fs::write(&enc_out, encrypted()?)?;
    println!("{}", best_per_call(plain)?);
    println!("{}", best_per_call(encrypted)?);
    Ok(ExitCode::SUCCESS)
}

/// Seconds per call of `f`: batches of calls until half a second has passed, after a warm-up;
/// the fastest batch is the least disturbed.
fn best_per_call(mut f: impl FnMut() -> Result<Vec<u8>>) -> Result<f64> {
    // Batches of about 5 ms.
    let warm_up = Instant::now();
    let mut calls = 0u32;
    while warm_up.elapsed() < Duration::from_millis(50) || calls < 10 {
        black_box(f()?);
        calls += 1;
    }
    let batch_len = (calls / 10).max(1);
    let mut best = f64::INFINITY;
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(500) {
        let batch = Instant::now();
        for _ in 0..batch_len {
            black_box(f()?);
        }
        best = best.min(batch.elapsed().as_secs_f64() / f64::from(batch_len));
    }
    Ok(best)
}
