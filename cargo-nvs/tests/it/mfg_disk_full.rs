//! `cargo nvs mfg generate` on a disk that fills up mid-run: the run fails with a clear message
//! and no panic, nothing it leaves is half-written (every image under its final name is
//! byte-identical to a clean run's, every device in the ledger has its image), and once there is
//! room again `--resume` finishes the batch exactly as a clean run would have.
//!
//! The "disk" is a size-limited tmpfs mounted in a private user and mount namespace
//! (`unshare -rm`), so the test needs no privileges; where namespaces are unavailable it says
//! "skipped" and passes.

use std::path::Path;
use std::process::Command;

use crate::support::{Case, bin, ledger_devices, manifest_shas};

/// 12 KiB per image: a few hundred images make a realistic budget of a few MiB.
const SIZE: &str = "0x3000";
const IMAGE_KIB: usize = 12;
const CONFIG: &str = "app,namespace,\nserial,data,string\nnum,data,u8\nregion,data,string,REPEAT\n";

/// Mounts the small tmpfs, runs the batch into it until the disk is full, copies what it left
/// out (the tmpfs vanishes with the namespace), grows the tmpfs, resumes, and copies the result.
/// Arguments: binary, mount point, host folder for the results, small size, big size, then the
/// `mfg generate` arguments before `--out-dir`. The ledger is in the out dir, on the full disk
/// too (and apart from the clean run's).
const SCRIPT: &str = r#"
set -u
bin=$1 mnt=$2 host=$3 small=$4 big=$5
shift 5
mount -t tmpfs -o "size=$small" tmpfs "$mnt" || exit 90
"$bin" "$@" --out-dir "$mnt/out" --ledger "$mnt/out/ledger.sqlite" \
    >"$host/full.stdout" 2>"$host/full.stderr"
echo $? >"$host/full.rc"
if [ -e "$mnt/out" ]; then cp -a "$mnt/out" "$host/after_full" || exit 91; fi
mount -o "remount,size=$big" tmpfs "$mnt" || exit 92
"$bin" "$@" --out-dir "$mnt/out" --ledger "$mnt/out/ledger.sqlite" --resume \
    >"$host/resume.stdout" 2>"$host/resume.stderr"
echo $? >"$host/resume.rc"
cp -a "$mnt/out" "$host/after_resume" || exit 93
"#;

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn text(path: &Path) -> String {
    String::from_utf8_lossy(&read(path)).into_owned()
}

/// `got` has exactly the bytes of the clean run's `want` (said briefly: images are 12 KiB).
#[track_caller]
fn assert_same_image(got: &Path, want: &Path) {
    let (got_bytes, want_bytes) = (read(got), read(want));
    if got_bytes != want_bytes {
        let at = got_bytes
            .iter()
            .zip(&want_bytes)
            .position(|(a, b)| a != b)
            .unwrap_or(got_bytes.len().min(want_bytes.len()));
        panic!(
            "{} differs from the clean run's (half-written?): {} bytes instead of {}, first \
             difference at byte {at}",
            got.display(),
            got_bytes.len(),
            want_bytes.len()
        );
    }
}

/// Every file under `dir` (recursively) whose name ends in `.tmp`.
fn temp_files(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries {
        let entry = entry.unwrap();
        let path = entry.path();
        if entry.file_type().unwrap().is_dir() {
            found.extend(temp_files(&path));
        } else if entry.file_name().to_string_lossy().ends_with(".tmp") {
            found.push(path.display().to_string());
        }
    }
    found
}

/// The names in `dir` that do not start with a dot (the final images), sorted.
fn final_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Why a tmpfs cannot be mounted in a private namespace here, if it cannot.
fn namespaces_unavailable(probe: &Path) -> Option<String> {
    std::fs::create_dir_all(probe).unwrap();
    let out = Command::new("unshare")
        .args([
            "-rm",
            "sh",
            "-c",
            r#"mount -t tmpfs -o size=64k tmpfs "$1""#,
            "sh",
        ])
        .arg(probe)
        .output();
    match out {
        Err(e) => Some(format!("cannot run `unshare`: {e}")),
        Ok(out) if !out.status.success() => Some(format!(
            "`unshare -rm` cannot mount a tmpfs ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Ok(_) => None,
    }
}

/// What a run into a full disk left, for the scenario's own checks.
struct Outcome {
    images: usize,
    recorded: usize,
    resume_err: String,
}

/// Runs a batch of `devices` into a tmpfs of `small_kib` until the disk is full, checks what it
/// left, resumes with room, and checks the result against a clean run. `None` when skipped.
fn fill_the_disk_then_resume(devices: usize, small_kib: usize) -> Option<Outcome> {
    let case = Case::new();
    let dir = case.dir.path();
    if let Some(why) = namespaces_unavailable(&dir.join("probe")) {
        eprintln!("skipped: {why}");
        return None;
    }

    let mut values = String::from("id,serial,num,region\n");
    for n in 0..devices {
        values.push_str(&format!("{n},SN{n:06},{},EU\n", n % 200));
    }
    case.file("config.csv", CONFIG).file("values.csv", values);
    let generate = [
        "mfg",
        "generate",
        "config.csv",
        "values.csv",
        "dev",
        SIZE,
        "--fileid",
        "serial",
    ];

    // The reference: the same batch with room to spare.
    let mut clean_args = generate.to_vec();
    clean_args.extend(["--out-dir", "clean", "--ledger", "clean/ledger.sqlite"]);
    let clean = case.run(&clean_args);
    assert!(
        clean.status.success(),
        "clean run failed: {}",
        String::from_utf8_lossy(&clean.stderr)
    );
    let clean_dir = dir.join("clean");
    let clean_shas = manifest_shas(&clean_dir.join("manifest.csv"));
    assert_eq!(final_names(&clean_dir.join("bin")).len(), devices);

    let small = format!("{small_kib}k");
    let big = format!("{}k", devices * IMAGE_KIB * 2 + 4096);
    let mnt = dir.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let program = bin().get_program().to_owned();
    let script = Command::new("unshare")
        .args(["-rm", "sh", "-c", SCRIPT, "sh"])
        .arg(&program)
        .arg(&mnt)
        .arg(dir)
        .args([&small, &big])
        .args(generate)
        .current_dir(dir)
        .output()
        .unwrap();
    // 90..93: mount, copy, remount, copy failed (the runs' own exits are in the .rc files).
    assert!(
        script.status.success(),
        "the namespace script failed ({}): {}",
        script.status,
        String::from_utf8_lossy(&script.stderr)
    );

    // The run that filled the disk: a non-zero exit and a message saying what happened.
    let full_rc = text(&dir.join("full.rc"));
    let full_err = text(&dir.join("full.stderr"));
    eprintln!("run on a full disk exited {}:\n{full_err}", full_rc.trim());
    assert_ne!(full_rc.trim(), "0", "the run did not fail:\n{full_err}");
    assert!(!full_err.contains("panicked"), "{full_err}");
    // The first failure is an image write: the OS's words and the image's path.
    assert!(
        full_err.contains("No space left on device") && full_err.contains("/bin/dev-SN"),
        "the message does not say which write found the disk full:\n{full_err}"
    );
    assert!(
        full_err.contains(&mnt.join("out").display().to_string()),
        "the message does not name the out dir:\n{full_err}"
    );

    // What it left: only complete images under final names, each as the clean run wrote it.
    let after = dir.join("after_full");
    let names = final_names(&after.join("bin"));
    for name in &names {
        assert_same_image(
            &after.join("bin").join(name),
            &clean_dir.join("bin").join(name),
        );
    }
    // Every device in the ledger has its complete image (an image may exist unrecorded).
    let recorded = if after.join("ledger.sqlite").exists() {
        ledger_devices(&after.join("ledger.sqlite"))
    } else {
        Vec::new()
    };
    for (device, image, sha, issues) in &recorded {
        assert!(after.join(image).exists(), "{image} recorded but missing");
        assert_eq!(&clean_shas[device], sha, "{device}'s recorded sha256");
        assert_eq!(*issues, 1, "{device} issued twice");
    }
    // A manifest is only ever complete: none lists a batch that did not finish.
    assert!(
        !after.join("manifest.csv").exists(),
        "a manifest was left by the failed run"
    );
    let leftovers = temp_files(&after);
    eprintln!(
        "at the failure: {} of {devices} images, {} recorded in the ledger, temporary files \
         left: {leftovers:?}",
        names.len(),
        recorded.len()
    );
    // The disk filled partway through, as intended (else the sizes need tuning).
    assert!(
        !names.is_empty() && names.len() < devices,
        "{} images at the failure: the disk did not fill mid-run",
        names.len()
    );
    assert!(
        full_err.contains("--resume"),
        "no hint to resume:\n{full_err}"
    );

    // Resumed with room: the batch as the clean run made it, each device issued once.
    let resume_rc = text(&dir.join("resume.rc"));
    let resume_err = text(&dir.join("resume.stderr"));
    eprintln!("resume exited {}:\n{resume_err}", resume_rc.trim());
    assert_eq!(resume_rc.trim(), "0", "resume failed:\n{resume_err}");
    let done = dir.join("after_resume");
    let finals = final_names(&done.join("bin"));
    let missing: Vec<_> = final_names(&clean_dir.join("bin"))
        .into_iter()
        .filter(|n| !finals.contains(n))
        .collect();
    assert!(missing.is_empty(), "missing after resume: {missing:?}");
    assert_eq!(finals.len(), devices, "extra files after resume");
    for name in &finals {
        assert_same_image(
            &done.join("bin").join(name),
            &clean_dir.join("bin").join(name),
        );
    }
    assert_eq!(
        text(&done.join("manifest.csv")),
        text(&clean_dir.join("manifest.csv")),
        "manifest.csv"
    );
    let leftovers = temp_files(&done);
    assert!(
        leftovers.is_empty(),
        "temporary files left after resume: {leftovers:?}"
    );
    let ledger = ledger_devices(&done.join("ledger.sqlite"));
    assert_eq!(ledger.len(), devices);
    for (device, image, sha, issues) in &ledger {
        assert_eq!(*issues, 1, "{device} issued {issues} times");
        assert_eq!(&clean_shas[device], sha, "{device}'s recorded sha256");
        assert!(done.join(image).exists(), "{image} recorded but missing");
    }
    Some(Outcome {
        images: names.len(),
        recorded: recorded.len(),
        resume_err,
    })
}

/// A few hundred devices, room for about a third: the disk fills within the first chunk.
#[test]
fn a_full_disk_leaves_only_complete_images_and_resume_finishes_the_batch() {
    fill_the_disk_then_resume(300, 100 * IMAGE_KIB);
}

/// More devices than one chunk of the writing pass, room for the first chunk and some: the
/// devices recorded before the disk filled are kept by --resume, not rebuilt.
#[test]
fn resume_after_a_full_disk_keeps_the_devices_already_recorded() {
    let Some(outcome) = fill_the_disk_then_resume(2500, 1400 * IMAGE_KIB) else {
        return;
    };
    assert!(outcome.recorded <= outcome.images);
    assert!(
        outcome.recorded > 0,
        "no device was recorded before the disk filled: the sizes need tuning"
    );
    let kept = format!(
        "{} device(s) were finished by an earlier run and are kept",
        outcome.recorded
    );
    assert!(
        outcome.resume_err.contains(&kept),
        "resume did not keep the {} recorded devices:\n{}",
        outcome.recorded,
        outcome.resume_err
    );
}
