//! `cargo xtask bench ledger`: what the shared PostgreSQL ledger costs against the embedded
//! SQLite one, side by side in one run on a throwaway local server: claim + mark + log per
//! device (median and 90th percentile), and `mfg generate` of 10,000 devices into each; the
//! PostgreSQL cost per device as a share of the time one device takes to flash; with
//! `--store-images`, what storing and reading the images costs, and what building an image
//! from a recipe (values from the chip) costs.

use std::time::{Duration, Instant};

use xshell::{Shell, cmd};

use crate::postgres::Server;
use crate::{Result, project_root, target_dir};

const DEVICES: usize = 10_000;
const RUNS: usize = 3;
/// The bench mfg image: 0x6000 bytes, flashed at 921600 baud (10 bits a byte on the wire,
/// nothing else counted: the real flash takes longer, so the share is an upper bound).
const IMAGE: f64 = 0x6000 as f64;
const BAUD: f64 = 921_600.0;

pub fn run(sh: &Shell) -> Result<()> {
    let server = Server::start(sh)?;
    cmd!(sh, "cargo build --quiet --release -p cargo-nvs").run()?;
    let per_device = cmd!(
        sh,
        "cargo test --quiet --release -p cargo-nvs --lib _cost -- --ignored --nocapture --test-threads=1"
    )
    .env("NVS_TEST_POSTGRES", server.url())
    .read()?;
    let (mut claims, mut recipes) = (Vec::new(), Vec::new());
    for line in per_device.lines() {
        let row = |name: &str, median: &str, p90: &str| -> Result<(String, f64, f64)> {
            Ok((name.to_owned(), median.parse::<f64>()?, p90.parse::<f64>()?))
        };
        // The quiet test runner's progress dots share the lines.
        let line = line.find("bench-").map_or("", |at| &line[at..]);
        match line.split_whitespace().collect::<Vec<_>>()[..] {
            ["bench-ledger", name, median, p90] => claims.push(row(name, median, p90)?),
            ["bench-recipe", name, median, p90] => recipes.push(row(name, median, p90)?),
            _ => {}
        }
    }
    // sqlite, postgres, sqlite-stored, postgres-stored; plain and encrypted recipes.
    if claims.len() != 4 || recipes.len() != 2 {
        return Err(format!("the measurement printed {per_device:?}").into());
    }

    let dir = target_dir().join("bench-ledger");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let config = project_root().join(super::mfg::CONFIG);
    let values = dir.join("values.csv");
    std::fs::write(&values, super::mfg::values_csv(DEVICES))?;
    let bin = target_dir().join("release").join("cargo-nvs");
    let table = dir.join("partitions.csv");
    std::fs::write(&table, "nvs, data, nvs, 0x9000, 0x6000,\n")?;
    let stored = [
        "--store-images",
        "--partition-table",
        table.to_str().unwrap_or_default(),
        "--partition",
        "nvs",
    ];
    let generate_with = |ledger: String,
                         run: usize,
                         backend: &str,
                         extra: &[&str]|
     -> Result<Duration> {
        let out = dir.join(format!("{backend}-{run}"));
        let start = Instant::now();
        cmd!(
            sh,
            "{bin} mfg generate {config} {values} dev 0x6000 --fileid serial_no --out-dir {out} --ledger {ledger} {extra...}"
        )
        .quiet()
        .ignore_stderr()
        .run()?;
        Ok(start.elapsed())
    };
    let generate =
        |ledger: String, run: usize, backend: &str| generate_with(ledger, run, backend, &[]);
    let mut sqlite = Vec::new();
    let mut postgres = Vec::new();
    for run in 0..RUNS {
        let file = dir.join(format!("ledger-{run}.sqlite"));
        sqlite.push(generate(file.display().to_string(), run, "sqlite")?);
        let url = server.create_database(sh, &format!("bench_generate_{run}"))?;
        postgres.push(generate(url, run, "postgres")?);
    }
    // Once each: every device's 0x6000 image goes into the ledger (240 MB).
    let sqlite_stored = generate_with(
        dir.join("ledger-stored.sqlite").display().to_string(),
        0,
        "sqlite-stored",
        &stored,
    )?;
    let url = server.create_database(sh, "bench_generate_stored")?;
    let postgres_stored = generate_with(url, 0, "postgres-stored", &stored)?;
    let best = |times: &[Duration]| times.iter().min().copied().unwrap_or_default();
    let (sqlite, postgres) = (best(&sqlite), best(&postgres));
    let flash_us = IMAGE * 10.0 / BAUD * 1e6;

    println!("ledger: local PostgreSQL (throwaway server) against SQLite, side by side");
    println!(
        "  {:<44} {:>12} {:>12} {:>8}",
        "", "SQLite", "PostgreSQL", "ratio"
    );
    let (s, p) = (&claims[0], &claims[1]);
    println!(
        "  {:<44} {:>9.0} µs {:>9.0} µs {:>7.1}×",
        "claim + mark + log per device, median",
        s.1,
        p.1,
        p.1 / s.1
    );
    println!(
        "  {:<44} {:>9.0} µs {:>9.0} µs {:>7.1}×",
        "claim + mark + log per device, 90th pct",
        s.2,
        p.2,
        p.2 / s.2
    );
    let (ss, ps) = (&claims[2], &claims[3]);
    println!(
        "  {:<44} {:>9.0} µs {:>9.0} µs {:>7.1}×",
        "… and read its stored image + key, median",
        ss.1,
        ps.1,
        ps.1 / ss.1
    );
    println!(
        "  {:<44} {:>10.3} s {:>10.3} s {:>7.2}×",
        format!("mfg generate, {DEVICES} devices (best of {RUNS})"),
        sqlite.as_secs_f64(),
        postgres.as_secs_f64(),
        postgres.as_secs_f64() / sqlite.as_secs_f64()
    );
    println!(
        "  {:<44} {:>10.3} s {:>10.3} s {:>7.2}×",
        "… with --store-images, 240 MB of images (once)",
        sqlite_stored.as_secs_f64(),
        postgres_stored.as_secs_f64(),
        postgres_stored.as_secs_f64() / sqlite_stored.as_secs_f64()
    );
    println!(
        "  PostgreSQL per device: {:.0} µs = {:.2} % of flashing one 0x6000 image at 921600 baud \
         ({:.0} ms on the wire alone; goal < 1 %)",
        p.1,
        p.1 / flash_us * 100.0,
        flash_us / 1000.0
    );
    println!(
        "  stored images (--store-images): a station reads a 0x6000 image + key per device in \
         {:.0} µs more on PostgreSQL ({:.0} µs on SQLite) = {:.2} % of the wire time",
        ps.1 - p.1,
        ss.1 - s.1,
        (ps.1 - p.1) / flash_us * 100.0
    );
    let (plain, encrypted) = (&recipes[0], &recipes[1]);
    println!(
        "  values from the chip: building a 0x6000 image from its recipe takes {:.0} µs \
         (encrypted {:.0} µs; 90th pct {:.0}/{:.0} µs) = {:.3} % of the wire time",
        plain.1,
        encrypted.1,
        plain.2,
        encrypted.2,
        encrypted.1 / flash_us * 100.0
    );
    let _ = std::fs::remove_dir_all(&dir);
    drop(server);
    Ok(())
}
