//! `cargo xtask bench mfg`: `cargo nvs mfg generate` (release build) against mfg_gen's work done
//! by the reference in one Python process, side by side in one run, on tmpfs and on disk; a
//! baseline of only writing as many image-sized files; and the peak memory and per-device time
//! of a 100,000-device run. Prints figures only; timings are never asserted.
//!
//! Both sides get the 6-key config (`mfg_config.csv`) and a values file extending
//! `mfg_values_1000.csv`'s pattern, `--fileid serial_no`, size 0x6000. The reference side follows
//! mfg_gen.py per device row: the REPEAT value copied from the first row, the device's
//! `key,type,encoding,value` CSV written to `csv/`, then `generate()` (or `encrypt()` with
//! `keygen=True`, which writes `keys/keys-<name>.bin`) writing `bin/<name>.bin`.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use xshell::{Shell, cmd};

use crate::{Result, project_root, reference, target_dir};

pub(super) const CONFIG: &str = "nvs-build/tests/vectors/in/mfg/mfg_config.csv";
/// The values file whose pattern is extended (checked to be the first 1,000 rows).
const VALUES_1000: &str = "nvs-build/tests/vectors/in/mfg/mfg_values_1000.csv";
const FILEID: &str = "serial_no";
const PREFIX: &str = "dev";
const SIZE: usize = 0x6000;
const DEVICES: usize = 10_000;
const BIG_DEVICES: usize = 100_000;
/// Runs of each 10,000-device measurement; the best is reported.
const RUNS: usize = 3;
/// Runs of the 100,000-device measurement (2–4 s each): the first after the other
/// measurements is often slowed by the kernel's reclaim of the memory they used.
const BIG_RUNS: usize = 3;
const TARGET_RATIO: f64 = 20.0;
const TARGET_BASELINE: f64 = 2.0;
const TARGET_RSS_MIB: f64 = 64.0;

/// mfg_gen.py's per-device steps (its `create_intermediate_csv`), with the generator module
/// called in-process. `python DRIVER CONF VALUES PREFIX SIZE FILEID OUTDIR plain|keygen`; prints
/// the seconds spent (after the imports) to stderr.
/// (After [`crate::reference::MFG_GEN_STEPS`].)
const DRIVER: &str = r#"
import time

def main(conf, values, prefix, size, fileid, outdir, mode):
    start = time.perf_counter()
    keygen = mode == 'keygen'
    config, repeat = read_config(conf)
    rows = csv.reader(lines(values))
    header = next(rows)
    first = None
    csv_dir = os.path.join(outdir, 'csv')
    os.makedirs(csv_dir, exist_ok=True)
    os.makedirs(os.path.join(outdir, 'bin'), exist_ok=True)
    fid = '0'
    for row in rows:
        if first is None:
            first = row
        else:
            fill_repeats(header, first, row, repeat)
        pairs = list(zip_longest(header, row))
        fid = file_id(pairs, fileid, fid)
        name = prefix + '-' + fid
        path = os.path.join(csv_dir, name + '.csv')
        if os.path.isfile(path):
            raise SystemExit('Target csv file: %s already exists.' % path)
        write_device_csv(path, config, pairs)
        bin_name = os.path.join('bin', name + '.bin')
        if os.path.isfile(os.path.join(outdir, bin_name)):
            raise SystemExit('Target binary file: %s already exists.' % bin_name)
        args = SimpleNamespace(input=path, output=bin_name, size=size, version=2, outdir=outdir)
        if keygen:
            args.keygen, args.inputkey, args.keyfile = True, None, 'keys-' + name + '.bin'
            args.key_protect_hmac, args.kp_hmac_keygen = False, False
            args.kp_hmac_keyfile, args.kp_hmac_inputkey = None, None
            nvs.encrypt(args)
        else:
            nvs.generate(args)
    print(time.perf_counter() - start, file=sys.stderr)

main(*sys.argv[1:])
"#;

/// Removes the scratch folders however the bench ends.
struct Scratch(Vec<PathBuf>);

impl Drop for Scratch {
    fn drop(&mut self) {
        for dir in &self.0 {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// One of our runs: wall time of the whole process and its peak RSS (VmHWM, polled).
struct OurRun {
    time: Duration,
    hwm_kib: Option<u64>,
}

/// Several runs of one measurement: the best and worst wall times, and the highest peak RSS.
struct Times {
    best: Duration,
    worst: Duration,
    hwm_kib: Option<u64>,
}

impl Times {
    fn new() -> Times {
        Times {
            best: Duration::MAX,
            worst: Duration::ZERO,
            hwm_kib: None,
        }
    }

    fn add(&mut self, time: Duration) {
        self.best = self.best.min(time);
        self.worst = self.worst.max(time);
    }

    fn add_ours(&mut self, run: OurRun) {
        self.add(run.time);
        self.hwm_kib = self.hwm_kib.max(run.hwm_kib);
    }
}

/// The figures of one file system.
struct FsFigures {
    name: &'static str,
    plain: Times,
    keygen: Times,
    ref_plain: Times,
    ref_keygen: Times,
    baseline_single: Times,
    baseline_multi: Times,
    threads: usize,
    same_images: bool,
}

/// `bin`: a prebuilt `cargo-nvs` to time instead of the release build.
pub fn run(sh: &Shell, bin: Option<PathBuf>) -> Result<()> {
    let python = reference::ensure_venv(sh)?;
    let bin = match bin {
        Some(bin) => std::path::absolute(bin)?,
        None => {
            cmd!(sh, "cargo build --quiet --release -p cargo-nvs").run()?;
            target_dir().join("release").join("cargo-nvs")
        }
    };
    let config = project_root().join(CONFIG);
    let shm = Path::new("/dev/shm");
    let tag = format!("cargo-nvs-bench-mfg-{}", std::process::id());
    let mut file_systems: Vec<(&'static str, PathBuf)> = Vec::new();
    if shm.is_dir() {
        file_systems.push(("tmpfs (/dev/shm)", shm.join(&tag)));
    }
    file_systems.push(("disk (target/)", target_dir().join(&tag)));
    let _scratch = Scratch(file_systems.iter().map(|(_, d)| d.clone()).collect());

    let values = values_csv(DEVICES);
    let expected = std::fs::read_to_string(project_root().join(VALUES_1000))?;
    if !values.starts_with(&expected) {
        return Err(format!("the generated values do not extend {VALUES_1000}").into());
    }

    let mut figures = Vec::new();
    for (name, dir) in &file_systems {
        std::fs::create_dir_all(dir)?;
        let values_path = dir.join("values.csv");
        std::fs::write(&values_path, &values)?;
        eprintln!("bench mfg: {name}: {}", dir.display());
        figures.push(measure_fs(name, dir, &bin, &python, &config, &values_path)?);
    }

    // 100,000 devices on the first file system (tmpfs when there is one).
    let (big_fs, big_dir) = &file_systems[0];
    let big_values = big_dir.join("values_100k.csv");
    std::fs::write(&big_values, values_csv(BIG_DEVICES))?;
    eprintln!("bench mfg: {BIG_DEVICES} devices on {big_fs}");
    let mut big = Times::new();
    for _ in 0..BIG_RUNS {
        let run = run_ours(
            &bin,
            big_dir,
            &config,
            &big_values,
            "big",
            false,
            BIG_DEVICES,
        )?;
        remove(&big_dir.join("big"))?;
        big.add_ours(run);
    }

    println!(
        "bench mfg: {CONFIG}, {DEVICES} devices, size {SIZE:#x}, --fileid {FILEID}; best of \
         {RUNS} runs (worst in brackets); ours: the whole process, reference: its loop after the \
         imports"
    );
    print_table(&figures, big_fs, &big);
    Ok(())
}

fn measure_fs(
    name: &'static str,
    dir: &Path,
    bin: &Path,
    python: &Path,
    config: &Path,
    values: &Path,
) -> Result<FsFigures> {
    let driver = dir.join("mfg_driver.py");
    std::fs::write(&driver, [crate::reference::MFG_GEN_STEPS, DRIVER].concat())?;
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let (mut plain, mut keygen) = (Times::new(), Times::new());
    let (mut ref_plain, mut ref_keygen) = (Times::new(), Times::new());
    let (mut single, mut multi) = (Times::new(), Times::new());
    let mut same_images = true;
    // Alternating, so that a disturbance hits both sides alike.
    for run in 0..RUNS {
        plain.add_ours(run_ours(bin, dir, config, values, "ours", false, DEVICES)?);
        ref_plain.add(run_reference(
            python, &driver, dir, config, values, "ref", false,
        )?);
        if run == 0 {
            same_images = same_images_sampled(&dir.join("ours/bin"), &dir.join("ref/bin"))?;
        }
        remove(&dir.join("ours"))?;
        remove(&dir.join("ref"))?;

        keygen.add_ours(run_ours(
            bin,
            dir,
            config,
            values,
            "ours-keygen",
            true,
            DEVICES,
        )?);
        remove(&dir.join("ours-keygen"))?;
        ref_keygen.add(run_reference(
            python,
            &driver,
            dir,
            config,
            values,
            "ref-keygen",
            true,
        )?);
        remove(&dir.join("ref-keygen"))?;

        single.add(write_files(&dir.join("baseline"), 1)?);
        multi.add(write_files(&dir.join("baseline"), threads)?);
    }
    Ok(FsFigures {
        name,
        plain,
        keygen,
        ref_plain,
        ref_keygen,
        baseline_single: single,
        baseline_multi: multi,
        threads,
        same_images,
    })
}

/// Flushes what earlier runs left to the disk (dirty pages; on ext4 with `discard`, the trims of
/// removed outputs), so that no run pays for the one before.
fn settle() {
    let _ = Command::new("sync").status();
}

fn remove(dir: &Path) -> Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    Ok(())
}

/// The values file: `mfg_values_1000.csv`'s rows, continued to `devices` rows.
pub(super) fn values_csv(devices: usize) -> String {
    let mut out = String::from("id,serial_no,device_no,fw_key,region,calib\n");
    for i in 1..=devices {
        let calib: Vec<u8> = (0..24).map(|j| ((i + j) % 256) as u8).collect();
        let region = if i == 1 { "EU" } else { "" };
        let _ = writeln!(
            out,
            "{i},SN{i:08},{},{:032x},{region},{}",
            100_000 + i,
            i as u128 * 0x123_4567,
            crate::casegen::base64_encode(&calib)
        );
    }
    out
}

/// Runs `cargo nvs mfg generate` into the fresh folder `dir/out`, polling its peak RSS.
fn run_ours(
    bin: &Path,
    dir: &Path,
    config: &Path,
    values: &Path,
    out: &str,
    keygen: bool,
    devices: usize,
) -> Result<OurRun> {
    let out_dir = dir.join(out);
    remove(&out_dir)?;
    let size = format!("{SIZE:#x}");
    let mut command = Command::new(bin);
    command
        .args(["mfg", "generate"])
        .arg(config)
        .arg(values)
        .args([PREFIX, &size, "--fileid", FILEID, "--out-dir"])
        .arg(&out_dir)
        // Every run issues the same ids: each gets a fresh ledger of its own, in its out dir
        // (never the product default beside the config, nor $NVS_LEDGER's).
        .arg("--ledger")
        .arg(out_dir.join("ledger.sqlite"));
    if keygen {
        command.arg("--keygen");
    }
    let log = dir.join(format!("{out}.log"));
    command
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?);
    let done = AtomicBool::new(false);
    settle();
    let start = Instant::now();
    let mut child = command.spawn()?;
    let status_file = PathBuf::from(format!("/proc/{}/status", child.id()));
    let (status, time, hwm_kib) = std::thread::scope(|s| {
        let poller = s.spawn(|| {
            let mut hwm = None;
            while !done.load(Ordering::Relaxed) {
                if let Some(kib) = vm_hwm_kib(&status_file) {
                    hwm = hwm.max(Some(kib));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            hwm
        });
        let status = child.wait();
        let time = start.elapsed();
        done.store(true, Ordering::Relaxed);
        (status, time, poller.join().ok().flatten())
    });
    if !status?.success() {
        return Err(format!(
            "{} failed; its output: {}",
            bin.display(),
            std::fs::read_to_string(&log).unwrap_or_default()
        )
        .into());
    }
    let images = std::fs::read_dir(out_dir.join("bin"))?.count();
    if images != devices {
        return Err(format!("{out}: {images} images for {devices} devices").into());
    }
    Ok(OurRun { time, hwm_kib })
}

/// The `VmHWM` (peak resident set) of a live process, in KiB.
fn vm_hwm_kib(status: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(status).ok()?;
    let line = text.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Runs the reference driver into the fresh folder `dir/out`; returns the time it reports.
fn run_reference(
    python: &Path,
    driver: &Path,
    dir: &Path,
    config: &Path,
    values: &Path,
    out: &str,
    keygen: bool,
) -> Result<Duration> {
    let out_dir = dir.join(out);
    remove(&out_dir)?;
    settle();
    let output = Command::new(python)
        .arg(driver)
        .arg(config)
        .arg(values)
        .args([PREFIX, &format!("{SIZE:#x}"), FILEID])
        .arg(&out_dir)
        .arg(if keygen { "keygen" } else { "plain" })
        .current_dir(dir)
        .stdin(Stdio::null())
        // It prints a few lines per device.
        .stdout(Stdio::null())
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(format!("the reference driver failed: {stderr}").into());
    }
    let seconds: f64 = stderr
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .ok_or_else(|| format!("the reference driver printed {stderr:?}"))?;
    let images = std::fs::read_dir(out_dir.join("bin"))?.count();
    if images != DEVICES {
        return Err(format!("reference: {images} images for {DEVICES} devices").into());
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Compares every 97th plain image of the two sides (and the last).
fn same_images_sampled(ours: &Path, theirs: &Path) -> Result<bool> {
    for i in (1..=DEVICES).step_by(97).chain([DEVICES]) {
        let name = format!("{PREFIX}-SN{i:08}.bin");
        if std::fs::read(ours.join(&name))? != std::fs::read(theirs.join(&name))? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The baseline: `DEVICES` files of `SIZE` bytes written into the empty folder `dir` by
/// `threads` threads, each to a temporary name and renamed into place, as ours are. Removes the
/// folder afterwards.
fn write_files(dir: &Path, threads: usize) -> Result<Duration> {
    remove(dir)?;
    std::fs::create_dir_all(dir)?;
    let bytes = vec![0xFFu8; SIZE];
    settle();
    let start = Instant::now();
    let results: Vec<std::io::Result<()>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let bytes = &bytes;
                s.spawn(move || -> std::io::Result<()> {
                    for i in (t..DEVICES).step_by(threads) {
                        let name = format!("{PREFIX}-SN{:08}.bin", i + 1);
                        let tmp = dir.join(format!(".{name}.tmp"));
                        let mut file = std::fs::OpenOptions::new()
                            .write(true)
                            .create_new(true)
                            .open(&tmp)?;
                        file.write_all(bytes)?;
                        drop(file);
                        std::fs::rename(&tmp, dir.join(&name))?;
                    }
                    Ok(())
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("panicked")))
            })
            .collect()
    });
    let time = start.elapsed();
    for result in results {
        result?;
    }
    remove(dir)?;
    Ok(time)
}

fn verdict(met: bool) -> &'static str {
    if met { "ok" } else { "BELOW TARGET" }
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or_else(
        || "n/a".to_owned(),
        |k| format!("{:.1} MiB", k as f64 / 1024.0),
    )
}

fn print_table(figures: &[FsFigures], big_fs: &str, big: &Times) {
    let secs = |d: Duration| format!("{:.3} s", d.as_secs_f64());
    let times = |t: &Times| format!("{} [{:.2}]", secs(t.best), t.worst.as_secs_f64());
    println!(
        "  {:<32} {:>16} {:>16} {:>8}   target",
        "", "ours", "other", "ratio"
    );
    for f in figures {
        println!("  {}, {DEVICES} devices:", f.name);
        for (label, ours, theirs) in [
            ("plain vs reference", &f.plain, &f.ref_plain),
            ("--keygen vs reference", &f.keygen, &f.ref_keygen),
        ] {
            let ratio = theirs.best.as_secs_f64() / ours.best.as_secs_f64();
            println!(
                "    {:<30} {:>16} {:>16} {:>7.1}×   {:<10} {}",
                label,
                times(ours),
                times(theirs),
                ratio,
                format!("≥ {TARGET_RATIO:.0}×"),
                verdict(ratio >= TARGET_RATIO)
            );
        }
        let baseline = if f.baseline_single.best <= f.baseline_multi.best {
            &f.baseline_single
        } else {
            &f.baseline_multi
        };
        let ratio = f.plain.best.as_secs_f64() / baseline.best.as_secs_f64();
        println!(
            "    {:<30} {:>16} {:>16} {:>7.2}×   {:<10} {}",
            "plain vs write+rename baseline",
            times(&f.plain),
            times(baseline),
            ratio,
            format!("≤ {TARGET_BASELINE:.0}×"),
            verdict(ratio <= TARGET_BASELINE)
        );
        println!(
            "      baseline: 1 thread {}, {} threads {}",
            times(&f.baseline_single),
            f.threads,
            times(&f.baseline_multi)
        );
        println!(
            "      per device (best): ours {:.1} µs plain, {:.1} µs --keygen; reference {:.1} µs \
             plain, {:.1} µs --keygen",
            per_device_us(&f.plain, DEVICES),
            per_device_us(&f.keygen, DEVICES),
            per_device_us(&f.ref_plain, DEVICES),
            per_device_us(&f.ref_keygen, DEVICES)
        );
        println!(
            "      our peak RSS: plain {}, --keygen {}",
            mib(f.plain.hwm_kib),
            mib(f.keygen.hwm_kib)
        );
        if !f.same_images {
            println!("      warning: sampled plain images differ; run `cargo xtask diff-mfg`");
        }
    }
    println!("  {big_fs}, {BIG_DEVICES} devices, plain, best of {BIG_RUNS} runs:");
    let big_rss_mib = big.hwm_kib.map(|k| k as f64 / 1024.0);
    println!(
        "    {:<30} {:>16} {:>16} {:>8}   {:<10} {}",
        "peak RSS (VmHWM, polled)",
        mib(big.hwm_kib),
        "",
        "",
        format!("≤ {TARGET_RSS_MIB:.0} MiB"),
        big_rss_mib.map_or("n/a", |m| verdict(m <= TARGET_RSS_MIB))
    );
    let (per_big, per_small) = (
        per_device_us(big, BIG_DEVICES),
        per_device_us(&figures[0].plain, DEVICES),
    );
    println!(
        "    {:<30} {:>16} {:>16} {:>7.2}×   {:<10} per device at {DEVICES}: {per_small:.1} µs",
        "time; per device vs 10,000",
        times(big),
        format!("{per_big:.1} µs/dev"),
        per_big / per_small,
        "≈ 1× (linear)",
    );
}

fn per_device_us(times: &Times, devices: usize) -> f64 {
    times.best.as_secs_f64() / devices as f64 * 1e6
}
