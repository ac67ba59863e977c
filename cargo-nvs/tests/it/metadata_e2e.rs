//! End to end: a throwaway crate whose build.rs is `nvs_build::generate()` is built with
//! cargo. Its images equal the reference generator's output for the equivalent CSV (committed
//! in tests/e2e-crate/reference), cargo reruns the build script only when an input changes, and
//! `cargo nvs generate` makes the same bytes from any working directory.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::{bin, tempdir};

const TEMPLATE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e-crate");

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Lays the crate out in a scratch folder, pointing its build-dependency at this nvs-build.
fn make_crate(dir: &Path) -> PathBuf {
    copy_dir(Path::new(TEMPLATE), dir);
    let nvs_build = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../nvs-build")
        .canonicalize()
        .unwrap();
    let manifest = std::fs::read_to_string(dir.join("Cargo.toml.in"))
        .unwrap()
        .replace(
            "@NVS_BUILD@",
            &nvs_build.display().to_string().replace('\\', "/"),
        );
    std::fs::write(dir.join("Cargo.toml"), manifest).unwrap();
    // Pin dependency versions to the ones this workspace tested.
    std::fs::copy(nvs_build.join("../Cargo.lock"), dir.join("Cargo.lock")).unwrap();
    dir.join("Cargo.toml")
}

struct Build {
    ran_build_script: bool,
    out_dir: PathBuf,
    stderr: String,
}

fn cargo_build(manifest: &Path, target_dir: &Path, name: &str) -> Build {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["build", "-v", "--message-format=json", "--manifest-path"])
        .arg(manifest)
        .env("CARGO_TARGET_DIR", target_dir)
        .env("NVS_E2E_NAME", name)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "cargo build failed:\n{stderr}");
    let out_dir = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|m| {
            m["reason"] == "build-script-executed"
                && m["package_id"].as_str().unwrap_or("").contains("nvs-e2e")
        })
        .and_then(|m| m["out_dir"].as_str().map(PathBuf::from))
        .expect("the build script's out_dir");
    Build {
        ran_build_script: stderr.lines().any(|l| {
            l.contains("Running") && l.contains("nvs-e2e") && l.contains("build-script-build")
        }),
        out_dir,
        stderr,
    }
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn touch(path: &Path) {
    let file = std::fs::File::options().append(true).open(path).unwrap();
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(2);
    file.set_modified(later).unwrap();
}

/// In `dir`, fctry.bin (env and per-device keys) is 0600 and userdata.bin has the mode any
/// new file gets.
#[cfg(unix)]
#[track_caller]
fn assert_private_only_where_secret(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir.join("fctry.bin")), 0o600, "{}", dir.display());
    let probe = dir.join("probe");
    std::fs::write(&probe, b"x").unwrap();
    let usual = mode(&probe);
    std::fs::remove_file(&probe).unwrap();
    assert_eq!(mode(&dir.join("userdata.bin")), usual, "{}", dir.display());
}

#[test]
fn build_script_images_match_the_reference_and_rebuild_only_on_change() {
    let scratch = tempdir::Dir::new();
    let manifest = make_crate(&scratch.path().join("crate"));
    let crate_dir = manifest.parent().unwrap().to_owned();
    // Shared between runs so only the first compiles nvs-build's dependencies.
    let target_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("e2e-target");

    let first = cargo_build(&manifest, &target_dir, "e2e-device");
    let images = first.out_dir.join("nvs");
    for partition in ["fctry", "userdata"] {
        assert_eq!(
            read(&images.join(format!("{partition}.bin"))),
            read(&crate_dir.join(format!("reference/{partition}.bin"))),
            "{partition}: build.rs image differs from the reference's for the equivalent CSV"
        );
    }
    let manifest_json: serde_json::Value =
        serde_json::from_slice(&read(&images.join("manifest.json"))).unwrap();
    assert_eq!(manifest_json["partitions"][0]["name"], "fctry");
    assert_eq!(manifest_json["partitions"][0]["offset"], 0x9000);
    // fctry has env and per-device keys (possibly secrets); userdata has neither.
    assert_eq!(manifest_json["partitions"][0]["secret"], true);
    assert_eq!(manifest_json["partitions"][1]["secret"], false);
    #[cfg(unix)]
    assert_private_only_where_secret(&images);

    let again = cargo_build(&manifest, &target_dir, "e2e-device");
    assert!(
        !again.ran_build_script,
        "nothing changed, yet the build script ran:\n{}",
        again.stderr
    );

    touch(&crate_dir.join("data/base.csv"));
    let touched = cargo_build(&manifest, &target_dir, "e2e-device");
    assert!(
        touched.ran_build_script,
        "a listed CSV changed, yet the build script did not run"
    );

    touch(&crate_dir.join("certs/cert.bin"));
    assert!(
        cargo_build(&manifest, &target_dir, "e2e-device").ran_build_script,
        "a `file` value changed"
    );

    let renamed = cargo_build(&manifest, &target_dir, "other-name");
    assert!(renamed.ran_build_script, "an env source changed");
    assert_ne!(
        read(&renamed.out_dir.join("nvs/fctry.bin")),
        read(&crate_dir.join("reference/fctry.bin"))
    );

    // `cargo nvs generate` gives the same bytes, from any working directory.
    for (cwd, out) in [
        (crate_dir.clone(), "gen-a"),
        (std::env::temp_dir(), "gen-b"),
    ] {
        let out_dir = scratch.path().join(out);
        let status = bin()
            .args(["nvs", "generate", "--manifest-path"])
            .arg(&manifest)
            .arg("--out-dir")
            .arg(&out_dir)
            .env("NVS_E2E_NAME", "e2e-device")
            .current_dir(cwd)
            .status()
            .unwrap();
        assert!(status.success());
        #[cfg(unix)]
        assert_private_only_where_secret(&out_dir);
        for partition in ["fctry", "userdata"] {
            assert_eq!(
                read(&out_dir.join(format!("{partition}.bin"))),
                read(&crate_dir.join(format!("reference/{partition}.bin"))),
                "cargo nvs generate ({out}) differs for {partition}"
            );
        }
    }
}
