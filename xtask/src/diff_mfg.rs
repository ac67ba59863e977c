//! `cargo xtask diff-mfg`: random mfg_gen config and values files (every encoding, `file` rows,
//! REPEAT keys, metadata columns, awkward CSV quoting) through `cargo nvs mfg generate`, and
//! every device image compared with the reference generator's image of the per-device CSV that
//! mfg_gen would write. The per-device CSVs are written by Python's own `csv` module, following
//! mfg_gen's code, so our CSV emulation is checked too.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use fastrand::Rng;
use nvs_build::format::encryption::XtsKey;
use xshell::{Shell, cmd};

use crate::flags::Args;
use crate::reference;
use crate::{Result, target_dir};

/// mfg_gen's steps for one case, in one Python process for all cases: blank lines dropped,
/// config and values read with `csv.reader`, REPEAT values copied from the first row, each
/// device's `key,type,encoding,value` CSV written with `csv.writer`, then the generator.
/// (After [`crate::reference::MFG_GEN_STEPS`].)
const DRIVER: &str = r#"
import contextlib, traceback

def run_case(conf, values, prefix, size, version, fileid, prefix_num, key):
    config, repeat = read_config(conf)
    rows = list(csv.reader(lines(values)))
    header, first = rows[0], rows[1]
    devices = [first]
    for row in rows[2:]:
        fill_repeats(header, first, row, repeat)
        devices.append(row)
    os.makedirs('ref/csv', exist_ok=True)
    fid = '0'
    counter = int(prefix_num.split(':')[0]) if prefix_num else None
    for row in devices:
        pairs = list(zip_longest(header, row))
        fid = file_id(pairs, fileid, fid)
        if prefix_num:
            name = '%s-%0*d-%s' % (prefix, int(prefix_num.split(':')[1]), counter, fid)
            counter += 1
        else:
            name = '%s-%s' % (prefix, fid)
        path = os.path.join('ref', 'csv', name + '.csv')
        write_device_csv(path, config, pairs)
        args = SimpleNamespace(input=[path], output=os.path.join('bin', name + '.bin'),
                               size=size, version=int(version), outdir=os.path.abspath('ref'))
        if key.startswith('hmac:'):
            # mfg_gen --keygen --key_protect_hmac --kp_hmac_inputkey: a key file per device.
            args.keygen, args.inputkey, args.keyfile = True, None, 'keys-' + name
            args.key_protect_hmac, args.kp_hmac_keygen = True, False
            args.kp_hmac_keyfile, args.kp_hmac_inputkey = None, key[len('hmac:'):]
            nvs.encrypt(args)
        elif key:
            args.keygen, args.inputkey, args.keyfile = False, key, None
            args.key_protect_hmac, args.kp_hmac_keygen = False, False
            args.kp_hmac_keyfile, args.kp_hmac_inputkey = None, None
            nvs.encrypt(args)
        else:
            nvs.generate(args)

def main():
    with open(sys.argv[1], encoding='utf-8') as jobs, open(sys.argv[2], 'w') as results:
        for index, line in enumerate(jobs):
            case_dir, *fields = line.rstrip('\n').split('\t')
            os.chdir(case_dir)
            with open('ref.log', 'w') as log, contextlib.redirect_stdout(log), \
                    contextlib.redirect_stderr(log):
                try:
                    run_case(*fields)
                    code = 0
                except BaseException:
                    traceback.print_exc()
                    code = 1
            results.write('%d\t%d\n' % (index, code))

main()
"#;

pub struct Options {
    cases: usize,
    devices: usize,
    seed: u64,
    keep: bool,
    bin: Option<PathBuf>,
}

impl Options {
    pub fn parse(args: &mut Args) -> Result<Options> {
        let seed = args.seed()?;
        Ok(Options {
            cases: args.value("--cases")?.unwrap_or(8),
            devices: args.value("--devices")?.unwrap_or(120),
            seed,
            keep: args.flag("--keep"),
            bin: args.value("--bin")?,
        })
    }
}

const TEXT_ENCODINGS: [&str; 4] = ["string", "binary", "hex2bin", "base64"];

/// One generated case: its folder and the arguments of both sides.
struct Case {
    dir: PathBuf,
    prefix: String,
    size: String,
    version: u8,
    fileid: Option<String>,
    prefix_num: Option<(u64, usize)>,
    encryption: Encryption,
    devices: usize,
}

struct Key {
    name: String,
    ty: &'static str,
    encoding: &'static str,
    repeat: bool,
}

fn text(rng: &mut Rng, max: usize, ascii_only: bool) -> String {
    // Commas, quotes and line breaks exercise the CSV quoting on both sides; blank lines inside
    // quoted fields, mfg_gen's blank-line stripping.
    const ASCII: &[u8] = b"abcXYZ019 ,\"'#;:-_";
    let len = rng.usize(0..=max);
    let mut s = String::new();
    for _ in 0..len {
        match rng.u8(0..40) {
            0 if !ascii_only => s.push('é'),
            1 if !ascii_only => s.push('€'),
            3 => s.push('\n'),
            // A `#` starting a line inside a quoted field would make the generator read the
            // next rows into the value (both sides then refuse the case).
            _ => match ASCII[rng.usize(0..ASCII.len())] {
                b'#' if s.ends_with('\n') => s.push('-'),
                c => s.push(c as char),
            },
        }
    }
    s
}

fn hex(rng: &mut Rng, bytes: std::ops::Range<usize>) -> String {
    let len = rng.usize(bytes);
    (0..len)
        .map(|_| {
            let b = rng.u8(..);
            if rng.bool() {
                format!("{b:02x}")
            } else {
                format!("{b:02X}")
            }
        })
        .collect()
}

fn integer(rng: &mut Rng, lo: i128, hi: i128) -> String {
    let n = match rng.u8(0..6) {
        0 => lo,
        1 => hi,
        _ => lo + (rng.u128(..) % ((hi - lo) as u128 + 1)) as i128,
    };
    // Python's int() also takes spaces, `+` and `_` separators.
    match rng.u8(0..12) {
        0 => format!(" {n} "),
        1 if n >= 0 => format!("+{n}"),
        _ => n.to_string(),
    }
}

fn value(rng: &mut Rng, key: &Key, big_blob: bool) -> String {
    if let Some(&(_, lo, hi)) = crate::casegen::INT_TYPES
        .iter()
        .find(|(e, _, _)| *e == key.encoding)
    {
        return integer(rng, lo, hi);
    }
    match key.encoding {
        "string" => text(rng, 40, false),
        "binary" => text(rng, 40, true),
        "hex2bin" if big_blob => hex(rng, 2000..6000),
        "hex2bin" => hex(rng, 0..60),
        _ => {
            let bytes: Vec<u8> = (0..rng.usize(0..60)).map(|_| rng.u8(..)).collect();
            crate::casegen::base64_encode(&bytes)
        }
    }
}

fn make_case(seed: u64, index: usize, work: &Path, devices: usize) -> Result<Case> {
    let mut rng = Rng::with_seed(seed.wrapping_mul(0x9E37_79B9).wrapping_add(index as u64));
    let dir = work.join(format!("case-{index:03}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("files"))?;
    let version = if rng.u8(0..4) == 0 { 1 } else { 2 };
    let big_blob = version == 2 && rng.u8(0..3) == 0;

    // Every encoding in every case, plus `file` rows, shuffled over 1–3 namespaces.
    let mut keys: Vec<Key> = crate::casegen::INT_TYPES
        .iter()
        .map(|(e, _, _)| *e)
        .chain(TEXT_ENCODINGS)
        .enumerate()
        .map(|(i, encoding)| Key {
            name: format!("k{i}_{encoding}"),
            ty: "data",
            encoding,
            repeat: false,
        })
        .collect();
    for i in 0..rng.usize(1..4) {
        keys.push(Key {
            name: format!("f{i}"),
            ty: "file",
            encoding: TEXT_ENCODINGS[rng.usize(0..4)],
            repeat: false,
        });
    }
    rng.shuffle(&mut keys);
    for _ in 0..rng.usize(1..3) {
        let i = rng.usize(0..keys.len());
        keys[i].repeat = true;
    }
    let namespaces = rng.usize(1..4);
    let mut config = String::new();
    let mut per_namespace = keys.len().div_ceil(namespaces);
    per_namespace = per_namespace.max(1);
    for (i, key) in keys.iter().enumerate() {
        if i % per_namespace == 0 {
            writeln!(config, "ns{},namespace,", i / per_namespace)?;
        }
        let repeat = if key.repeat { ",REPEAT" } else { "" };
        writeln!(config, "{},{},{}{repeat}", key.name, key.ty, key.encoding)?;
        if rng.u8(0..8) == 0 {
            config.push('\n'); // blank lines are skipped
        }
    }

    // Metadata columns among the keys, in config order.
    let mut header: Vec<Option<usize>> = (0..keys.len()).map(Some).collect();
    header.insert(rng.usize(0..=header.len()), None);
    let serial_column = rng.bool();
    let fileid = match rng.u8(0..3) {
        0 => None,
        1 => Some("id".to_owned()),
        _ => Some("serial".to_owned()),
    };
    if serial_column {
        header.insert(rng.usize(0..=header.len()), None);
    }
    let names: Vec<String> = {
        let mut metadata = ["id", "serial"].into_iter();
        header
            .iter()
            .map(|c| match c {
                Some(k) => keys[*k].name.clone(),
                None => metadata.next().unwrap_or("meta").to_owned(),
            })
            .collect()
    };
    let fileid = fileid.filter(|f| names.contains(f));

    // `file` rows point at a small pool of files per key.
    let mut pools: Vec<Vec<String>> = Vec::new();
    for key in keys.iter() {
        let mut pool = Vec::new();
        if key.ty == "file" {
            for j in 0..4 {
                let name = format!("files/{}-{j}.dat", key.name);
                let contents: Vec<u8> = match key.encoding {
                    "string" => text(&mut rng, 100, false).into_bytes(),
                    "hex2bin" => hex(&mut rng, 0..80).into_bytes(),
                    "base64" => {
                        let raw: Vec<u8> = (0..rng.usize(0..80)).map(|_| rng.u8(..)).collect();
                        crate::casegen::base64_encode(&raw).into_bytes()
                    }
                    _ => (0..rng.usize(0..120)).map(|_| rng.u8(..)).collect(),
                };
                std::fs::write(dir.join(&name), contents)?;
                pool.push(name);
            }
        }
        pools.push(pool);
    }

    let mut values = String::new();
    let quote = |s: &str| {
        if s.contains([',', '"', '\n']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s.to_owned()
        }
    };
    values.push_str(&names.iter().map(|n| quote(n)).collect::<Vec<_>>().join(","));
    values.push('\n');
    for d in 0..devices {
        let mut cells = Vec::new();
        for (c, name) in header.iter().zip(&names) {
            let cell = match c {
                None if name == "id" => format!("D{:06}", d * 7 + 3),
                None => format!("SN-{:08x}", (d as u32).wrapping_mul(2_654_435_761)),
                Some(k) if keys[*k].repeat && d > 0 => String::new(),
                Some(k) if keys[*k].ty == "file" => {
                    pools[*k][rng.usize(0..pools[*k].len())].clone()
                }
                Some(k) => value(&mut rng, &keys[*k], big_blob && d % 5 == 0),
            };
            cells.push(quote(&cell));
        }
        values.push_str(&cells.join(","));
        values.push_str(if rng.u8(0..10) == 0 { "\r\n" } else { "\n" });
        if rng.u8(0..20) == 0 {
            values.push('\n');
        }
    }
    std::fs::write(dir.join("config.csv"), config)?;
    std::fs::write(dir.join("values.csv"), values)?;
    // By the case's index, so that even a few cases cover every kind.
    let encryption = match index % 4 {
        1 => {
            let mut bytes = [0u8; 64];
            bytes.iter_mut().for_each(|b| *b = rng.u8(..));
            let key = XtsKey::from_bytes(bytes).map_err(|e| e.to_string())?;
            std::fs::write(dir.join("keys.bin"), key.to_key_file())?;
            Encryption::InputKey
        }
        2 => {
            let mut hmac_key = [0u8; 32];
            hmac_key.iter_mut().for_each(|b| *b = rng.u8(..));
            std::fs::write(dir.join("hmac.bin"), hmac_key)?;
            Encryption::HmacInputKey
        }
        _ => Encryption::None,
    };
    let size = if big_blob {
        0x10000
    } else {
        [0x4000, 0x6000][rng.usize(0..2)]
    };
    Ok(Case {
        dir,
        prefix: ["dev", "node", "x"][rng.usize(0..3)].to_owned(),
        size: format!("{size:#x}"),
        version,
        fileid,
        prefix_num: rng.bool().then(|| (rng.u64(0..50), rng.usize(1..5))),
        encryption,
        devices,
    })
}

fn our_args(case: &Case) -> Vec<String> {
    let mut args: Vec<String> = ["mfg", "generate", "config.csv", "values.csv"]
        .map(String::from)
        .into();
    args.extend([case.prefix.clone(), case.size.clone()]);
    args.extend(["--version".into(), case.version.to_string()]);
    if let Some(f) = &case.fileid {
        args.extend(["--fileid".into(), f.clone()]);
    }
    if let Some((start, len)) = case.prefix_num {
        args.extend(["--prefix_num".into(), start.to_string(), len.to_string()]);
    }
    match case.encryption {
        Encryption::None => {}
        Encryption::InputKey => args.extend(["--inputkey".into(), "keys.bin".into()]),
        Encryption::HmacInputKey => args.extend(
            [
                "--keygen",
                "--key-protect-hmac",
                "--kp-hmac-inputkey",
                "hmac.bin",
            ]
            .map(String::from),
        ),
    }
    args.extend(["--out-dir".into(), "ours".into()]);
    // A ledger of the case's own (never the default beside the config, nor $NVS_LEDGER's).
    args.extend(["--ledger".into(), "ours/ledger.sqlite".into()]);
    args
}

fn job_line(case: &Case) -> String {
    let prefix_num = case
        .prefix_num
        .map(|(s, l)| format!("{s}:{l}"))
        .unwrap_or_default();
    [
        case.dir.display().to_string(),
        "config.csv".into(),
        "values.csv".into(),
        case.prefix.clone(),
        case.size.clone(),
        case.version.to_string(),
        case.fileid.clone().unwrap_or_default(),
        prefix_num,
        match case.encryption {
            Encryption::None => String::new(),
            Encryption::InputKey => "keys.bin".into(),
            Encryption::HmacInputKey => "hmac:hmac.bin".into(),
        },
    ]
    .join("\t")
}

/// How a case's images are encrypted.
enum Encryption {
    None,
    /// `--inputkey keys.bin`: one key for every device.
    InputKey,
    /// `--keygen --key-protect-hmac --kp-hmac-inputkey hmac.bin`: a key file per device, each
    /// derived from one HMAC key (so both sides' key files compare too).
    HmacInputKey,
}

/// The `.bin` files of a folder, sorted.
fn bins(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".bin"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

pub fn run(sh: &Shell, opts: Options) -> Result<ExitCode> {
    let python = reference::ensure_venv(sh)?;
    let bin = match &opts.bin {
        Some(bin) => std::path::absolute(bin)?,
        None => {
            cmd!(sh, "cargo build --quiet -p cargo-nvs").run()?;
            target_dir().join("debug").join("cargo-nvs")
        }
    };
    let work = target_dir()
        .join("diff-mfg")
        .join(format!("seed-{}", opts.seed));
    println!(
        "diff-mfg: seed {} ({} cases of {} devices) in {}",
        opts.seed,
        opts.cases,
        opts.devices.max(100),
        work.display()
    );
    let cases = (0..opts.cases)
        .map(|i| make_case(opts.seed, i, &work, opts.devices.max(100)))
        .collect::<Result<Vec<_>>>()?;

    let count =
        |kind: fn(&Encryption) -> bool| cases.iter().filter(|c| kind(&c.encryption)).count();
    println!(
        "diff-mfg: {} case(s) with --inputkey, {} with --keygen --key-protect-hmac \
         --kp-hmac-inputkey (key files compared too)",
        count(|e| matches!(e, Encryption::InputKey)),
        count(|e| matches!(e, Encryption::HmacInputKey)),
    );
    let started = Instant::now();
    let mut ours_ok = Vec::new();
    for case in &cases {
        let out = Command::new(&bin)
            .args(our_args(case))
            .current_dir(&case.dir)
            .output()?;
        std::fs::write(
            case.dir.join("ours.log"),
            [&out.stdout[..], &out.stderr].concat(),
        )?;
        ours_ok.push(out.status.success());
    }
    let ours_time = started.elapsed();

    let started = Instant::now();
    let driver = work.join("mfg_driver.py");
    let jobs = work.join("jobs.tsv");
    let results = work.join("results.tsv");
    std::fs::write(&driver, [crate::reference::MFG_GEN_STEPS, DRIVER].concat())?;
    let lines: Vec<String> = cases.iter().map(job_line).collect();
    std::fs::write(&jobs, lines.join("\n") + "\n")?;
    cmd!(sh, "{python} {driver} {jobs} {results}")
        .quiet()
        .run()?;
    let ref_codes: Vec<bool> = std::fs::read_to_string(&results)?
        .lines()
        .map(|l| l.ends_with("\t0"))
        .collect();
    let ref_time = started.elapsed();

    let (mut passed, mut failed, mut both_refused) = (0usize, 0usize, 0usize);
    for (i, case) in cases.iter().enumerate() {
        let ref_ok = ref_codes.get(i).copied().unwrap_or(false);
        let why = |what: &str| {
            format!(
                "  {}: {what}\n    ours: cd {} && {} {}",
                case.dir.display(),
                case.dir.display(),
                bin.display(),
                our_args(case).join(" ")
            )
        };
        if !ref_ok && !ours_ok[i] {
            // Both refused (e.g. a value the comment quirk made too long): agreement, but no
            // images to compare.
            both_refused += 1;
            continue;
        }
        if !ref_ok || !ours_ok[i] {
            failed += case.devices;
            println!(
                "{}",
                why(&format!(
                    "reference {}, ours {} (see ref.log, ours.log)",
                    if ref_ok { "ok" } else { "failed" },
                    if ours_ok[i] { "ok" } else { "failed" }
                ))
            );
            continue;
        }
        let ours = bins(&case.dir.join("ours/bin"));
        let theirs = bins(&case.dir.join("ref/bin"));
        let (our_keys, their_keys) = (
            bins(&case.dir.join("ours/keys")),
            bins(&case.dir.join("ref/keys")),
        );
        if ours != theirs || our_keys != their_keys {
            failed += case.devices;
            println!("{}", why("the image or key file names differ"));
            continue;
        }
        let mut case_failed = 0;
        for name in &ours {
            // A device passes when its image and (HMAC-derived) key file are the same.
            let keys_differ = match name.strip_suffix(".bin") {
                Some(stem) if !our_keys.is_empty() => {
                    let key = format!("keys-{stem}.bin");
                    std::fs::read(case.dir.join("ours/keys").join(&key))?
                        != std::fs::read(case.dir.join("ref/keys").join(&key))?
                }
                _ => false,
            };
            let a = std::fs::read(case.dir.join("ours/bin").join(name))?;
            let b = std::fs::read(case.dir.join("ref/bin").join(name))?;
            if a == b && !keys_differ {
                passed += 1;
            } else {
                case_failed += 1;
                if case_failed == 1 {
                    println!(
                        "{}",
                        why(&format!(
                            "{name} differs (its CSV: ref/csv/{})",
                            name.replace(".bin", ".csv")
                        ))
                    );
                }
            }
        }
        failed += case_failed;
        if case_failed == 0 && !opts.keep {
            let _ = std::fs::remove_dir_all(&case.dir);
        }
    }
    println!(
        "diff-mfg: our cargo-nvs {:.2} s, reference (one Python process) {:.2} s",
        ours_time.as_secs_f64(),
        ref_time.as_secs_f64()
    );
    if both_refused > 0 {
        println!("diff-mfg: {both_refused} case(s) refused by both (see their ref.log, ours.log)");
    }
    println!("diff-mfg: {passed} passed, {failed} failed");
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
