//! Espressif's generator, the reference: a venv with the pinned release, and a driver that runs
//! many jobs in one Python process.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use xshell::{Shell, cmd};

use crate::{Result, target_dir};

pub const PACKAGE: &str = "esp-idf-nvs-partition-gen==0.3.0";
pub const MODULE: &str = "esp_idf_nvs_partition_gen";

/// mfg_gen.py's per-device steps in Python, for drivers that run them against the generator
/// module in one process (diff-mfg, bench mfg).
pub const MFG_GEN_STEPS: &str = include_str!("mfg_gen_steps.py");
const DRIVER: &str = include_str!("ref_driver.py");

pub fn venv_dir() -> PathBuf {
    target_dir().join("ref-venv")
}

pub fn python() -> PathBuf {
    venv_dir().join("bin").join("python")
}

/// Creates `target/ref-venv` with the reference installed, unless a previous run finished that.
pub fn ensure_venv(sh: &Shell) -> Result<PathBuf> {
    install_venv(
        sh,
        &venv_dir(),
        PACKAGE,
        "import esp_idf_nvs_partition_gen.nvs_partition_gen",
    )
}

/// esptool 5.6.0 in `target/esptool-venv` (for the test that flashes `cargo nvs dist` output
/// with it); returns the `esptool` executable.
pub fn ensure_esptool(sh: &Shell) -> Result<PathBuf> {
    let venv = crate::target_dir().join("esptool-venv");
    install_venv(sh, &venv, "esptool==5.6.0", "import esptool")?;
    Ok(venv.join("bin").join("esptool"))
}

/// A venv at `venv` with `package` installed (idempotent); returns its python.
fn install_venv(sh: &Shell, venv: &std::path::Path, package: &str, check: &str) -> Result<PathBuf> {
    let python = venv.join("bin").join("python");
    // Written last, so an interrupted install is redone.
    let marker = venv.join("xtask-installed.txt");
    if python.exists() && sh.read_file(&marker).is_ok_and(|m| m.trim() == package) {
        return Ok(python);
    }
    eprintln!("xtask: installing {package} into {}", venv.display());
    cmd!(sh, "python3 -m venv {venv}").run()?;
    cmd!(
        sh,
        "{python} -m pip install --quiet --disable-pip-version-check {package}"
    )
    .run()?;
    cmd!(sh, "{python} -c {check}").run()?;
    sh.write_file(&marker, format!("{package}\n"))?;
    Ok(python)
}

/// One call into the reference module, run with `dir` as the current directory.
pub enum Job {
    Generate {
        dir: PathBuf,
        version: u8,
        size: String,
        inputs: Vec<String>,
        output: String,
    },
    Encrypt {
        dir: PathBuf,
        version: u8,
        size: String,
        inputs: Vec<String>,
        output: String,
        key: String,
    },
    /// Skipped (`None` result) when `input` is missing or empty.
    Decrypt {
        dir: PathBuf,
        input: String,
        key: String,
        output: String,
    },
    /// `generate-key --key_protect_hmac --kp_hmac_inputkey HMAC --keyfile KEYFILE --outdir DIR`.
    HmacKey {
        dir: PathBuf,
        hmac_key: String,
        keyfile: String,
    },
}

impl Job {
    fn tsv(&self) -> String {
        let mut fields: Vec<String> = Vec::new();
        let dir = |d: &Path| d.display().to_string();
        match self {
            Job::Generate {
                dir: d,
                version,
                size,
                inputs,
                output,
            } => {
                fields.extend(["gen".into(), dir(d), version.to_string(), size.clone()]);
                fields.push(output.clone());
                fields.extend(inputs.iter().cloned());
            }
            Job::Encrypt {
                dir: d,
                version,
                size,
                inputs,
                output,
                key,
            } => {
                fields.extend(["enc".into(), dir(d), version.to_string(), size.clone()]);
                fields.extend([output.clone(), key.clone()]);
                fields.extend(inputs.iter().cloned());
            }
            Job::Decrypt {
                dir: d,
                input,
                key,
                output,
            } => fields.extend([
                "dec".into(),
                dir(d),
                input.clone(),
                key.clone(),
                output.clone(),
            ]),
            Job::HmacKey {
                dir: d,
                hmac_key,
                keyfile,
            } => fields.extend(["hkey".into(), dir(d), hmac_key.clone(), keyfile.clone()]),
        }
        assert!(
            fields.iter().all(|f| !f.contains(['\t', '\n', '\r'])),
            "job fields must not contain tabs or line breaks: {fields:?}"
        );
        fields.join("\t")
    }
}

/// Runs `jobs` in one Python process; returns each job's CLI exit code (`None`: skipped).
pub fn run_jobs(sh: &Shell, python: &Path, work: &Path, jobs: &[Job]) -> Result<Vec<Option<i32>>> {
    let driver = work.join("ref_driver.py");
    let jobs_file = work.join("jobs.tsv");
    let results_file = work.join("results.tsv");
    sh.write_file(&driver, DRIVER)?;
    let mut text = String::new();
    for job in jobs {
        writeln!(text, "{}", job.tsv())?;
    }
    sh.write_file(&jobs_file, text)?;
    cmd!(sh, "{python} {driver} {jobs_file} {results_file}")
        .quiet()
        .run()?;
    let mut codes = vec![None; jobs.len()];
    let mut seen = 0;
    for line in sh.read_file(&results_file)?.lines() {
        let (index, code) = line
            .split_once('\t')
            .ok_or_else(|| format!("bad driver result line {line:?}"))?;
        let index: usize = index.parse()?;
        codes[index] = if code == "skip" {
            None
        } else {
            Some(code.parse()?)
        };
        seen += 1;
    }
    if seen != jobs.len() {
        return Err(format!(
            "the reference driver answered {seen} of {} jobs",
            jobs.len()
        )
        .into());
    }
    Ok(codes)
}

/// How to run the reference by hand, for reports.
pub fn command_line(job: &Job) -> String {
    let py = python();
    let py = py.display();
    let version = |v: &u8| if *v == 1 { " --version 1" } else { "" };
    match job {
        Job::Generate {
            dir,
            version: v,
            size,
            inputs,
            output,
        } => format!(
            "cd {} && {py} -m {MODULE} generate {} {output} '{size}'{}",
            dir.display(),
            inputs.join(" "),
            version(v)
        ),
        Job::Encrypt {
            dir,
            version: v,
            size,
            inputs,
            output,
            key,
        } => format!(
            "cd {} && {py} -m {MODULE} encrypt {} {output} '{size}' --inputkey {key}{}",
            dir.display(),
            inputs.join(" "),
            version(v)
        ),
        Job::Decrypt {
            dir,
            input,
            key,
            output,
        } => format!(
            "cd {} && {py} -m {MODULE} decrypt {input} {key} {output}",
            dir.display()
        ),
        Job::HmacKey {
            dir,
            hmac_key,
            keyfile,
        } => format!(
            "cd {0} && {py} -m {MODULE} generate-key --key_protect_hmac --kp_hmac_inputkey {hmac_key} \
             --keyfile {keyfile} --outdir {0}",
            dir.display()
        ),
    }
}
