//! `cargo xtask bench ledger`: what the shared PostgreSQL ledger costs against the embedded
//! SQLite one, side by side in one run on a throwaway local server: claim + mark + log per
//! device (median and 90th percentile), and `mfg generate` of 10,000 devices into each; the
//! PostgreSQL cost per device as a share of the time one device takes to flash.

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
        "cargo test --quiet --release -p cargo-nvs --lib ledger_claim_and_record_cost -- --ignored --nocapture"
    )
    .env("NVS_TEST_POSTGRES", server.url())
    .read()?;
    let mut claims = Vec::new();
    for line in per_device.lines() {
        if let ["bench-ledger", name, median, p90] = line.split_whitespace().collect::<Vec<_>>()[..]
        {
            claims.push((name.to_owned(), median.parse::<f64>()?, p90.parse::<f64>()?));
        }
    }
    if claims.len() != 2 {
        return Err(format!("the measurement printed {per_device:?}").into());
    }

    let dir = target_dir().join("bench-ledger");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let config = project_root().join(super::mfg::CONFIG);
    let values = dir.join("values.csv");
    std::fs::write(&values, super::mfg::values_csv(DEVICES))?;
    let bin = target_dir().join("release").join("cargo-nvs");
    let generate = |ledger: String, run: usize, backend: &str| -> Result<Duration> {
        let out = dir.join(format!("{backend}-{run}"));
        let start = Instant::now();
        cmd!(
            sh,
            "{bin} mfg generate {config} {values} dev 0x6000 --fileid serial_no --out-dir {out} --ledger {ledger}"
        )
        .quiet()
        .ignore_stderr()
        .run()?;
        Ok(start.elapsed())
    };
    let mut sqlite = Vec::new();
    let mut postgres = Vec::new();
    for run in 0..RUNS {
        let file = dir.join(format!("ledger-{run}.sqlite"));
        sqlite.push(generate(file.display().to_string(), run, "sqlite")?);
        let url = server.create_database(sh, &format!("bench_generate_{run}"))?;
        postgres.push(generate(url, run, "postgres")?);
    }
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
    println!(
        "  {:<44} {:>10.3} s {:>10.3} s {:>7.2}×",
        format!("mfg generate, {DEVICES} devices (best of {RUNS})"),
        sqlite.as_secs_f64(),
        postgres.as_secs_f64(),
        postgres.as_secs_f64() / sqlite.as_secs_f64()
    );
    println!(
        "  PostgreSQL per device: {:.0} µs = {:.2} % of flashing one 0x6000 image at 921600 baud \
         ({:.0} ms on the wire alone; goal < 1 %)",
        p.1,
        p.1 / flash_us * 100.0,
        flash_us / 1000.0
    );
    let _ = std::fs::remove_dir_all(&dir);
    drop(server);
    Ok(())
}
