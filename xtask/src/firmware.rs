//! `cargo xtask flash` and `cargo xtask dist`: drive the firmware examples the way a user's
//! own xtask would, through `cargo nvs`.

use std::process::ExitCode;

use xshell::{Shell, cmd};

use crate::Result;
use crate::flags::Args;

const DEFAULT_EXAMPLE: &str = "esp32c3-factory-data";

/// The example's manifest, and the cargo-nvs binary built from this workspace.
fn prepare(sh: &Shell, example: &str) -> Result<(String, String)> {
    let manifest = format!("examples/{example}/Cargo.toml");
    if !sh.path_exists(&manifest) {
        return Err(format!("no example `{example}` (looked for {manifest})").into());
    }
    cmd!(sh, "cargo build --quiet -p cargo-nvs").run()?;
    let bin = crate::target_dir()
        .join("debug/cargo-nvs")
        .display()
        .to_string();
    Ok((manifest, bin))
}

/// `cargo xtask flash [--example NAME] [--port P] [cargo nvs flash options…]`
pub fn flash(sh: &Shell, mut args: Args) -> Result<ExitCode> {
    let example = args
        .value::<String>("--example")?
        .unwrap_or_else(|| DEFAULT_EXAMPLE.to_owned());
    let port = args.value::<String>("--port")?;
    let rest = args.rest();
    let (manifest, bin) = prepare(sh, &example)?;
    let port_args: Vec<String> = port
        .map(|p| vec!["--port".to_owned(), p])
        .unwrap_or_default();
    cmd!(
        sh,
        "{bin} nvs flash --release --manifest-path {manifest} {port_args...} {rest...}"
    )
    .run()?;
    Ok(ExitCode::SUCCESS)
}

/// `cargo xtask dist [--example NAME] [--out-dir DIR]`
pub fn dist(sh: &Shell, mut args: Args) -> Result<ExitCode> {
    let example = args
        .value::<String>("--example")?
        .unwrap_or_else(|| DEFAULT_EXAMPLE.to_owned());
    let out_dir = args.value::<String>("--out-dir")?;
    args.finish()?;
    let (manifest, bin) = prepare(sh, &example)?;
    let out = out_dir.unwrap_or_else(|| {
        crate::target_dir()
            .join("dist")
            .join(&example)
            .display()
            .to_string()
    });
    cmd!(
        sh,
        "{bin} nvs dist --manifest-path {manifest} --chip esp32c3 --out-dir {out}"
    )
    .run()?;
    Ok(ExitCode::SUCCESS)
}
