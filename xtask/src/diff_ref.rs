//! `cargo xtask diff-ref`: random CSV inputs through both our `cargo-nvs` and the reference,
//! compared byte for byte (and, with `--encrypt`, the encrypted images and their decryption).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use fastrand::Rng;
use nvs_build::hex;
use xshell::{Shell, cmd};

use crate::casegen::{self, CaseSpec};
use crate::flags::Args;
use crate::reference::{self, Job};
use crate::{Result, target_dir};

pub struct Options {
    cases: usize,
    encrypt_cases: usize,
    seed: u64,
    /// `None`: run the encryption cases if `cargo-nvs encrypt` exists.
    encrypt: Option<bool>,
    /// Run only this case (e.g. `case-0042`, `enc-0007`), to replay a failure.
    only: Option<String>,
    keep: bool,
    /// A prebuilt `cargo-nvs` to test instead of building one.
    bin: Option<PathBuf>,
}

impl Options {
    pub fn parse(args: &mut Args) -> Result<Options> {
        let seed = args.seed()?;
        let encrypt = match (args.flag("--encrypt"), args.flag("--no-encrypt")) {
            (true, true) => return Err("--encrypt and --no-encrypt exclude each other".into()),
            (true, false) => Some(true),
            (false, true) => Some(false),
            (false, false) => None,
        };
        Ok(Options {
            cases: args.value("--cases")?.unwrap_or(500),
            encrypt_cases: args.value("--encrypt-cases")?.unwrap_or(300),
            seed,
            encrypt,
            only: args.value("--case")?,
            keep: args.flag("--keep"),
            bin: args.value("--bin")?,
        })
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Plain,
    /// Encrypted with a random key written as an nvs_keys image.
    EncryptFixedKey,
    /// Encrypted with a key the reference derives from an HMAC key.
    EncryptHmacKey,
}

struct Case {
    seed: u64,
    name: String,
    dir: PathBuf,
    kind: Kind,
    spec: CaseSpec,
}

impl Case {
    fn encrypted(&self) -> bool {
        self.kind != Kind::Plain
    }

    fn key_file(&self) -> &'static str {
        match self.kind {
            Kind::Plain => "",
            Kind::EncryptFixedKey => "keys.bin",
            Kind::EncryptHmacKey => "keys/k.bin",
        }
    }

    fn version_args(&self) -> Vec<String> {
        if self.spec.version == 1 {
            vec!["--version".into(), "1".into()]
        } else {
            Vec::new()
        }
    }

    fn ours_generate_args(&self, output: &str) -> Vec<String> {
        let mut args = vec!["generate".to_owned()];
        args.extend(self.spec.inputs.iter().cloned());
        args.extend([output.to_owned(), self.spec.size.clone()]);
        args.extend(self.version_args());
        args
    }

    fn ours_encrypt_args(&self, output: &str) -> Vec<String> {
        let mut args = vec!["encrypt".to_owned()];
        args.extend(self.spec.inputs.iter().cloned());
        args.extend([output.to_owned(), self.spec.size.clone()]);
        args.extend(["--inputkey".to_owned(), self.key_file().to_owned()]);
        args.extend(self.version_args());
        args
    }

    fn ours_decrypt_args(&self, input: &str, output: &str) -> Vec<String> {
        vec![
            "decrypt".to_owned(),
            input.to_owned(),
            self.key_file().to_owned(),
            output.to_owned(),
        ]
    }

    /// The reference jobs of this case, in order.
    fn reference_jobs(&self) -> Vec<Job> {
        let dir = self.dir.clone();
        let (version, size, inputs) = (
            self.spec.version,
            self.spec.size.clone(),
            self.spec.inputs.clone(),
        );
        if !self.encrypted() {
            return vec![Job::Generate {
                dir,
                version,
                size,
                inputs,
                output: "ref.bin".into(),
            }];
        }
        vec![
            Job::Encrypt {
                dir: dir.clone(),
                version,
                size,
                inputs,
                output: "ref_enc.bin".into(),
                key: self.key_file().into(),
            },
            Job::Decrypt {
                dir,
                input: "ref_enc.bin".into(),
                key: self.key_file().into(),
                output: "ref_dec.bin".into(),
            },
        ]
    }
}

/// SplitMix64: independent, reproducible streams per (seed, kind, index), so one case can be
/// replayed alone.
fn case_seed(seed: u64, stream: u64, index: usize) -> u64 {
    let mut z = seed
        .wrapping_add((stream << 32 | index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn make_case(seed: u64, work: &Path, kind: Kind, index: usize) -> (Case, Vec<(String, Vec<u8>)>) {
    let (prefix, stream) = match kind {
        Kind::Plain => ("case", 0),
        _ => ("enc", 1),
    };
    let mut rng = Rng::with_seed(case_seed(seed, stream, index));
    let kind = match kind {
        Kind::Plain => Kind::Plain,
        _ if rng.usize(..3) == 0 => Kind::EncryptHmacKey,
        _ => Kind::EncryptFixedKey,
    };
    let name = format!("{prefix}-{index:04}");
    let dir = work.join(&name);
    let opts = if kind == Kind::Plain {
        casegen::Options {
            max_pages: 40,
            refused_share: 0.12,
            invalid_share: 0.10,
            exotic_share: 0.02,
        }
    } else {
        casegen::Options {
            max_pages: 40,
            refused_share: 0.05,
            invalid_share: 0.05,
            exotic_share: 0.0,
        }
    };
    let spec = casegen::generate(&mut rng, &dir, &opts);
    let mut files = Vec::new();
    match kind {
        Kind::Plain => {}
        Kind::EncryptFixedKey => files.push(("keys.bin".to_owned(), key_image(&mut rng))),
        Kind::EncryptHmacKey => {
            let mut hmac = vec![0; 32];
            rng.fill(&mut hmac);
            files.push(("hmac.bin".to_owned(), hmac));
        }
    }
    let case = Case {
        seed,
        name,
        dir,
        kind,
        spec,
    };
    (case, files)
}

/// A 4096-byte nvs_keys image (spec §13.2) of a random XTS key; the two halves must differ, or
/// OpenSSL refuses the key.
fn key_image(rng: &mut Rng) -> Vec<u8> {
    let mut key = [0u8; 64];
    loop {
        rng.fill(&mut key);
        if key[..32] != key[32..] {
            break;
        }
    }
    let mut image = vec![0xFF; 4096];
    image[..64].copy_from_slice(&key);
    image[64..68].copy_from_slice(&nvs_build::format::nvs_crc32(&key).to_le_bytes());
    image
}

/// An exit status and what the process printed on stderr.
#[derive(Clone, Default)]
struct Outcome {
    code: Option<i32>,
    stderr: String,
}

impl Outcome {
    fn ok(&self) -> bool {
        self.code == Some(0)
    }
}

fn run_ours(bin: &Path, dir: &Path, args: &[String]) -> Outcome {
    match Command::new(bin)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
    {
        Ok(out) => Outcome {
            code: out.status.code(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        },
        Err(e) => Outcome {
            code: None,
            stderr: format!("cannot run {}: {e}", bin.display()),
        },
    }
}

fn command_line(bin: &Path, dir: &Path, args: &[String]) -> String {
    let quoted: Vec<String> = args
        .iter()
        .map(|a| {
            if a.is_empty() || a.contains(|c: char| c.is_whitespace() || "'\"$\\".contains(c)) {
                format!("'{a}'")
            } else {
                a.clone()
            }
        })
        .collect();
    format!(
        "cd {} && {} {}",
        dir.display(),
        bin.display(),
        quoted.join(" ")
    )
}

/// Our side of a case, run while the reference works through its jobs.
#[derive(Default)]
struct Ours {
    generate: Outcome,
    encrypt: Option<Outcome>,
    decrypt: Option<Outcome>,
}

fn run_our_side(bin: &Path, case: &Case) -> Ours {
    let generate = run_ours(bin, &case.dir, &case.ours_generate_args("ours.bin"));
    if !case.encrypted() {
        return Ours {
            generate,
            ..Ours::default()
        };
    }
    let encrypt = run_ours(bin, &case.dir, &case.ours_encrypt_args("ours_enc.bin"));
    let decrypt = encrypt.ok().then(|| {
        run_ours(
            bin,
            &case.dir,
            &case.ours_decrypt_args("ours_enc.bin", "ours_dec.bin"),
        )
    });
    Ours {
        generate,
        encrypt: Some(encrypt),
        decrypt,
    }
}

/// Maps `f` over `items` on `threads` threads, keeping the order.
fn par_map<T: Sync, R: Send>(items: &[T], threads: usize, f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let next = AtomicUsize::new(0);
    let mut results: Vec<(usize, R)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads.max(1))
            .map(|_| {
                s.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(item) = items.get(i) else { break };
                        done.push((i, f(item)));
                    }
                    done
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("worker panicked"))
            .collect()
    });
    results.sort_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, r)| r).collect()
}

pub fn run(sh: &Shell, opts: Options) -> Result<ExitCode> {
    let started = Instant::now();
    let python = reference::ensure_venv(sh)?;
    let bin = match &opts.bin {
        Some(bin) => std::path::absolute(bin)?,
        None => {
            cmd!(sh, "cargo build --quiet -p cargo-nvs").run()?;
            target_dir().join("debug").join("cargo-nvs")
        }
    };
    let encrypt = opts.encrypt.unwrap_or_else(|| {
        Command::new(&bin)
            .args(["encrypt", "--help"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    let seed = opts.seed;
    let work = target_dir().join("diff-ref").join(format!("seed-{seed}"));
    if work.exists() {
        sh.remove_path(&work)?;
    }
    sh.create_dir(&work)?;

    let mut wanted: Vec<(Kind, usize)> = (0..opts.cases).map(|i| (Kind::Plain, i)).collect();
    if encrypt {
        wanted.extend((0..opts.encrypt_cases).map(|i| (Kind::EncryptFixedKey, i)));
    }
    if let Some(only) = &opts.only {
        let (prefix, index) = only
            .rsplit_once('-')
            .and_then(|(p, i)| Some((p, i.parse::<usize>().ok()?)))
            .ok_or_else(|| format!("--case {only}: expected case-N or enc-N"))?;
        wanted = match prefix {
            "case" => vec![(Kind::Plain, index)],
            "enc" => vec![(Kind::EncryptFixedKey, index)],
            _ => return Err(format!("--case {only}: expected case-N or enc-N").into()),
        };
    }
    println!(
        "diff-ref: seed {seed}: {} plain case(s), {} encryption case(s){}; rerun with --seed {seed}",
        wanted.iter().filter(|(k, _)| *k == Kind::Plain).count(),
        wanted.iter().filter(|(k, _)| *k != Kind::Plain).count(),
        if encrypt {
            ""
        } else {
            " (encryption off: `cargo-nvs encrypt` is missing; force with --encrypt)"
        }
    );

    // Generate and write every case.
    let cases: Vec<Case> = par_map(&wanted, threads(), |&(kind, index)| {
        let (case, extra) = make_case(seed, &work, kind, index);
        write_case(&case, &extra, &bin).expect("cannot write the case files");
        case
    });

    // HMAC-derived keys come from the reference, before either side encrypts.
    let hmac_jobs: Vec<Job> = cases
        .iter()
        .filter(|c| c.kind == Kind::EncryptHmacKey)
        .map(|c| Job::HmacKey {
            dir: c.dir.clone(),
            hmac_key: "hmac.bin".into(),
            keyfile: "k.bin".into(),
        })
        .collect();
    if !hmac_jobs.is_empty() {
        let codes = reference::run_jobs(sh, &python, &work, &hmac_jobs)?;
        if let Some(i) = codes.iter().position(|c| *c != Some(0)) {
            return Err(format!(
                "the reference could not derive an HMAC key: {}",
                reference::command_line(&hmac_jobs[i])
            )
            .into());
        }
    }

    // Both sides at once: the reference in one Python process, ours on worker threads.
    let mut jobs = Vec::new();
    let mut jobs_of_case = Vec::new();
    for case in &cases {
        let first = jobs.len();
        jobs.extend(case.reference_jobs());
        jobs_of_case.push(first..jobs.len());
    }
    let (ref_codes, ours) = std::thread::scope(|s| {
        let reference = s.spawn(|| {
            let sh = Shell::new()?;
            reference::run_jobs(&sh, &python, &work, &jobs)
        });
        let ours = par_map(&cases, threads(), |case| run_our_side(&bin, case));
        (reference.join().expect("reference thread panicked"), ours)
    });
    let ref_codes = ref_codes?;
    let generated = Instant::now();

    // Judge.
    let indices: Vec<usize> = (0..cases.len()).collect();
    let verdicts = par_map(&indices, threads(), |&i| {
        let case = &cases[i];
        let ref_codes = &ref_codes[jobs_of_case[i].clone()];
        let verdict = judge(&bin, case, ref_codes, &ours[i]);
        if verdict.is_ok() && !opts.keep {
            let _ = std::fs::remove_dir_all(&case.dir);
        }
        verdict
    });

    let mut counts = [[0usize; 2]; 2];
    let mut passes = [[0usize; 3]; 2];
    let mut tally: BTreeMap<&str, BTreeMap<String, usize>> = BTreeMap::new();
    for (case, verdict) in cases.iter().zip(&verdicts) {
        let encrypted = usize::from(case.encrypted());
        counts[encrypted][usize::from(verdict.is_err())] += 1;
        if let Ok(pass) = verdict {
            passes[encrypted][*pass as usize] += 1;
        }
        if let Err(failure) = verdict {
            println!(
                "\nFAIL {} ({})\n{}",
                case.name,
                case.dir.display(),
                failure.report
            );
            *tally
                .entry(failure.kind)
                .or_default()
                .entry(case.spec.plan.to_string())
                .or_default() += 1;
        }
    }
    let failed = counts[0][1] + counts[1][1];
    if failed == 0 && !opts.keep {
        sh.remove_path(&work)?;
    } else if failed > 0 {
        println!("\nfailures by kind and by the constructs of the case:");
        for (kind, plans) in &tally {
            println!("  {kind}: {}", plans.values().sum::<usize>());
            for (plan, n) in plans {
                println!("    {n:4}  {plan}");
            }
        }
        println!("failing cases are kept in {}", work.display());
    }
    println!(
        "\n(cases run in {:.1} s, judged in {:.1} s)",
        generated.duration_since(started).as_secs_f64(),
        generated.elapsed().as_secs_f64()
    );
    let breakdown = |[identical, both, refused]: [usize; 3]| {
        println!(
            "  passes: {identical} identical, {both} rejected by both, {refused} refused by us on purpose"
        );
    };
    breakdown(passes[0]);
    println!("diff-ref: {} passed, {} failed", counts[0][0], counts[0][1]);
    if encrypt {
        breakdown(passes[1]);
        println!(
            "diff-ref encrypt: {} passed, {} failed",
            counts[1][0], counts[1][1]
        );
    } else {
        println!("diff-ref encrypt: skipped (no `cargo-nvs encrypt`)");
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

fn write_case(case: &Case, extra: &[(String, Vec<u8>)], bin: &Path) -> Result<()> {
    std::fs::create_dir_all(&case.dir)?;
    for (name, bytes) in case.spec.files.iter().chain(extra) {
        let path = case.dir.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(path, bytes)?;
    }
    std::fs::write(case.dir.join("case.txt"), describe(case, bin))?;
    Ok(())
}

/// What the case is and how to run it by hand.
fn describe(case: &Case, bin: &Path) -> String {
    let mut s = String::new();
    let spec = &case.spec;
    let _ = writeln!(
        s,
        "replay: cargo xtask diff-ref --seed {} --case {}\nconstructs: {}\nversion {}, size '{}' ({} data page(s) expected), inputs: {}",
        case.seed,
        case.name,
        spec.plan,
        spec.version,
        spec.size,
        spec.pages_needed,
        spec.inputs.join(" ")
    );
    if case.kind == Kind::EncryptHmacKey {
        let job = Job::HmacKey {
            dir: case.dir.clone(),
            hmac_key: "hmac.bin".into(),
            keyfile: "k.bin".into(),
        };
        let _ = writeln!(s, "key:  {}", reference::command_line(&job));
    }
    for job in case.reference_jobs() {
        let _ = writeln!(s, "ref:  {}", reference::command_line(&job));
    }
    let mut ours = vec![case.ours_generate_args("ours.bin")];
    if case.encrypted() {
        ours.push(case.ours_encrypt_args("ours_enc.bin"));
        ours.push(case.ours_decrypt_args("ours_enc.bin", "ours_dec.bin"));
        ours.push(case.ours_decrypt_args("ref_enc.bin", "ours_refdec.bin"));
    }
    for args in ours {
        let _ = writeln!(s, "ours: {}", command_line(bin, &case.dir, &args));
    }
    s
}

/// Why a case failed, and the report to print.
struct Failure {
    kind: &'static str,
    report: String,
}

/// How a case passed.
#[derive(Clone, Copy)]
enum Pass {
    Identical,
    BothReject,
    RefusedByUs,
}

fn judge(bin: &Path, case: &Case, ref_codes: &[Option<i32>], ours: &Ours) -> Result<Pass, Failure> {
    let read = |name: &str| std::fs::read(case.dir.join(name)).ok();
    let ref_code = ref_codes[0];
    let (ref_out, our_outcome, our_out) = match &ours.encrypt {
        Some(encrypt) => ("ref_enc.bin", encrypt, "ours_enc.bin"),
        None => ("ref.bin", &ours.generate, "ours.bin"),
    };
    // The reference "accepts" only when it exits 0 and leaves a non-empty image: it exits 0 on
    // an unparseable SIZE, and 1 leaving a 0-byte file when it crashes.
    let ref_image = read(ref_out).filter(|b| ref_code == Some(0) && !b.is_empty());
    let our_image = read(our_out).filter(|_| our_outcome.ok());
    let mut report = describe(case, bin);
    let (kind, details) = match (&ref_image, &our_image) {
        (None, None) => return Ok(Pass::BothReject),
        (Some(_), None) if !case.spec.plan.refused.is_empty() => return Ok(Pass::RefusedByUs),
        (Some(_), None) => (
            "the reference accepts, we reject",
            format!("our stderr: {}", our_outcome.stderr.trim_end()),
        ),
        (None, Some(_)) => {
            // The log holds key and decrypt jobs too; show how the image job ended.
            let log = std::fs::read_to_string(case.dir.join("ref.log")).unwrap_or_default();
            let log = log
                .split("\n$ ")
                .map(|job| job.trim_start_matches("$ "))
                .find(|job| job.starts_with("gen ") || job.starts_with("enc "))
                .unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(3).collect();
            let mut details = format!(
                "reference exit code: {}",
                ref_code.map_or("none".into(), |c| c.to_string())
            );
            for line in tail.into_iter().rev() {
                let _ = write!(details, "\nref.log: {line}");
            }
            ("we accept what the reference rejects", details)
        }
        (Some(ref_image), Some(our_image)) => {
            let mut problems = Vec::new();
            if ref_image != our_image {
                problems.push(format!(
                    "{ref_out} and {our_out} differ:\n{}",
                    image_diff(
                        (ref_out, ref_image),
                        (our_out, our_image),
                        !case.encrypted()
                    )
                ));
            }
            if case.encrypted() {
                problems.extend(check_decryption(bin, case, ours, ref_codes));
            } else if !problems.is_empty() {
                dump_json(bin, case);
                problems.push("`cargo-nvs dump --format json` of both: ref.json, ours.json".into());
            }
            if problems.is_empty() {
                return Ok(Pass::Identical);
            }
            let kind = if ref_image == our_image {
                "decryption differs"
            } else {
                "the images differ"
            };
            let problems: Vec<&str> = problems.iter().map(|p| p.trim_end()).collect();
            (kind, problems.join("\n"))
        }
    };
    report.push_str(&details);
    let report = format!("  {kind}\n  {}", report.trim_end().replace('\n', "\n  "));
    Err(Failure { kind, report })
}

fn dump_json(bin: &Path, case: &Case) {
    for (image, json) in [("ref.bin", "ref.json"), ("ours.bin", "ours.json")] {
        let out = Command::new(bin)
            .args(["dump", image, "--format", "json"])
            .current_dir(&case.dir)
            .output();
        if let Ok(out) = out {
            let _ = std::fs::write(case.dir.join(json), out.stdout);
        }
    }
}

/// Our decryption of our image must give our plain image; our decryption of the reference's
/// image must give the reference's decryption.
fn check_decryption(
    bin: &Path,
    case: &Case,
    ours: &Ours,
    ref_codes: &[Option<i32>],
) -> Vec<String> {
    let read = |name: &str| std::fs::read(case.dir.join(name)).ok();
    let mut problems = Vec::new();
    match (&ours.decrypt, read("ours_dec.bin"), read("ours.bin")) {
        (Some(dec), Some(decrypted), Some(plain)) if dec.ok() && ours.generate.ok() => {
            if decrypted != plain {
                problems.push(format!(
                    "our decrypt of ours_enc.bin differs from our plain generate (ours.bin):\n{}",
                    image_diff(("ours.bin", &plain), ("ours_dec.bin", &decrypted), true)
                ));
            }
        }
        (dec, ..) => problems.push(format!(
            "our decrypt of ours_enc.bin or our plain generate failed: {}{}",
            dec.as_ref().map_or("", |d| d.stderr.trim_end()),
            ours.generate.stderr.trim_end()
        )),
    }
    let args = case.ours_decrypt_args("ref_enc.bin", "ours_refdec.bin");
    let refdec = run_ours(bin, &case.dir, &args);
    match (ref_codes.get(1).copied().flatten(), read("ref_dec.bin")) {
        (Some(0), Some(ref_dec)) => match read("ours_refdec.bin").filter(|_| refdec.ok()) {
            Some(our_dec) if our_dec == ref_dec => {}
            Some(our_dec) => problems.push(format!(
                "our decrypt of ref_enc.bin (ours_refdec.bin) differs from the reference's (ref_dec.bin):\n{}",
                image_diff(("ref_dec.bin", &ref_dec), ("ours_refdec.bin", &our_dec), true)
            )),
            None => problems.push(format!(
                "our decrypt of ref_enc.bin failed: {}",
                refdec.stderr.trim_end()
            )),
        },
        (code, _) => problems.push(format!(
            "the reference could not decrypt its own image (exit code {code:?})"
        )),
    }
    problems
}

/// A readable account of where two images differ: sizes, the number of differing 32-byte units
/// and the first few of them decoded as page header, bitmap or entry.
fn image_diff(a: (&str, &[u8]), b: (&str, &[u8]), decode: bool) -> String {
    let width = a.0.len().max(b.0.len());
    let ((a_name, a), (b_name, b)) = (a, b);
    let mut s = String::new();
    if a.len() != b.len() {
        let _ = writeln!(
            s,
            "sizes differ: {a_name} {} bytes, {b_name} {} bytes",
            a.len(),
            b.len()
        );
    }
    let units: Vec<usize> = (0..a.len().min(b.len()) / 32)
        .filter(|&u| a[u * 32..u * 32 + 32] != b[u * 32..u * 32 + 32])
        .collect();
    let _ = writeln!(s, "{} differing 32-byte unit(s)", units.len());
    for &u in units.iter().take(3) {
        let offset = u * 32;
        let (page, slot) = (offset / 4096, (offset % 4096) / 32);
        let what = match slot {
            0 => "header".to_owned(),
            1 => "entry-state bitmap".to_owned(),
            n => format!("entry {}", n - 2),
        };
        let _ = writeln!(s, "page {page} {what} (offset {offset:#x}):");
        for (label, image) in [(a_name, a), (b_name, b)] {
            let unit = &image[offset..offset + 32];
            let fields = if unit.iter().all(|&b| b == 0xFF) {
                "  (empty: all 0xFF)".to_owned()
            } else if decode && slot >= 2 {
                format!("  {}", entry_role(image, page, slot - 2))
            } else {
                String::new()
            };
            let _ = writeln!(s, "  {label:width$} {}{fields}", hex(unit));
        }
    }
    s
}

/// What entry `target` of `page` is: an item header, or a data entry of the item before it,
/// found by walking the page's items by their spans.
fn entry_role(image: &[u8], page: usize, target: usize) -> String {
    let entry = |i: usize| &image[page * 4096 + 64 + i * 32..][..32];
    let mut at = 0;
    while at <= target {
        let header = entry(at);
        if header.iter().all(|&b| b == 0xFF) {
            break;
        }
        let span = usize::from(header[2]).clamp(1, 126);
        if target < at + span {
            let fields = entry_fields(header);
            return if target == at {
                fields
            } else {
                format!(
                    "data entry {} of the item at entry {at}: {fields}",
                    target - at
                )
            };
        }
        at += span;
    }
    entry_fields(entry(target))
}

fn entry_fields(e: &[u8]) -> String {
    let key_len = e[8..24].iter().position(|&b| b == 0).unwrap_or(16);
    format!(
        "ns={} type={:#04x} span={} chunk={:#04x} key={:?} data={}",
        e[0],
        e[1],
        e[2],
        e[3],
        String::from_utf8_lossy(&e[8..8 + key_len]),
        hex(&e[24..32])
    )
}
