//! Values from the chip being flashed (its MAC): a device with such keys gets no image at
//! `mfg generate`, but a **recipe**, `bin/<name>.chip.csv`: its generator CSV in Espressif's
//! format with every value inline (files read, numbers in decimal, blobs in hex) and the chip's
//! values left as `@chip:mac` / `@chip:mac-hex` cells, after `# ` comment lines saying the
//! partition size, format version and the key it is encrypted with. The ledger records the
//! recipe with its SHA-256 (`Issued::from_chip`), so it is checked before use as images are.
//!
//! `mfg flash` / `mfg station` read the chip's MAC, build the image from the recipe with it
//! (nvs-build's CSV reader and format core, the same as for every CSV) and flash it; the
//! production log records the built image's SHA-256 with the MAC. With the MAC written into the
//! cells, Espressif's generator gives the same bytes from the recipe.

use std::path::Path;

use nvs_build::chip::{ChipValue, Mac, RecipeRow, recipe_csv};
use nvs_build::format::encryption::XtsKey;
use nvs_build::format::{PartitionSize, Version};
use nvs_build::{FileBase, ImageInput};

use super::flash::MfgFlashError;
use super::input::ConfigRow;
use crate::hex::sha256_hex;

/// The partition a stored file names when it is the key a recipe is encrypted with and not
/// flashed (a shared key, or one derived from an HMAC key): `mfg generate --store-images`.
pub(crate) const RECIPE_KEY: &str = "(recipe key)";

/// How a recipe file's name ends (an image's is `.bin`).
pub(crate) const RECIPE_SUFFIX: &str = ".chip.csv";

/// The first comment line of every recipe.
const FIRST_LINE: &str =
    "cargo-nvs chip recipe: `cargo nvs mfg flash` fills in the @chip: cells with the chip's MAC";

/// Whether a device's image (its path in the batch folder) is a recipe.
pub(crate) fn is_recipe(image: &str) -> bool {
    image.ends_with(RECIPE_SUFFIX)
}

/// The key a recipe's image is encrypted with: a path relative to the batch folder, or
/// absolute.
pub(crate) enum RecipeKey {
    /// An nvs_keys file.
    Keys(String),
    /// An HMAC key the encryption key derives from.
    Hmac(String),
}

/// The recipe of an image: the header comments, then the rows as a generator CSV. Refused
/// (why, naming the key): values a CSV cannot spell so that they read back the same.
pub(crate) fn recipe(
    rows: &[RecipeRow],
    size: u64,
    version: Version,
    key: Option<&RecipeKey>,
) -> Result<Vec<u8>, String> {
    let mut comments = vec![
        FIRST_LINE.to_owned(),
        format!("size: {size:#x}"),
        format!("version: {}", version.number()),
    ];
    match key {
        Some(RecipeKey::Keys(path)) => comments.push(format!("keys: {path}")),
        Some(RecipeKey::Hmac(path)) => comments.push(format!("hmac-key: {path}")),
        None => {}
    }
    recipe_csv(rows, &comments)
        .map(String::into_bytes)
        .map_err(|(key, why)| format!("key `{key}`: {why}"))
}

/// Builds the image a recipe (`path`, read as `bytes`) gives for the chip with `mac` (as
/// espflash reports it), encrypted when the recipe says so: `read_key` gives the bytes of the
/// key file the recipe names (relative to the batch folder, or absolute).
pub(crate) fn build_image(
    bytes: &[u8],
    path: &Path,
    mac: &str,
    read_key: &dyn Fn(&str) -> Result<Vec<u8>, String>,
) -> Result<Vec<u8>, String> {
    let mac = Mac::parse(mac).ok_or_else(|| format!("the chip's MAC `{mac}` is not a MAC"))?;
    let Header { size, version, key } = header(bytes, path)?;
    let (Some(size), Some(version)) = (size, version) else {
        return Err(format!(
            "`{}` does not say its partition size and format version",
            path.display()
        ));
    };
    let size = PartitionSize::new(size).map_err(|e| format!("`{}`: {e}", path.display()))?;
    let mut image = ImageInput::new(size, version);
    image.set_chip_mac(mac);
    // Checked at `mfg generate`: metadata strings may use the device's lengths.
    image.allow_device_string_lengths(true);
    image
        .add_csv(path, bytes, &FileBase::CurrentDir)
        .map_err(|e| e.to_string())?;
    let key = match key {
        None => return image.finish().map_err(|e| e.to_string()),
        Some(RecipeKey::Keys(p)) => XtsKey::from_key_file(&read_key(&p)?)
            .map(|k| k.key)
            .map_err(|e| format!("`{p}`: {e}"))?,
        Some(RecipeKey::Hmac(p)) => {
            XtsKey::derive_from_hmac(&read_key(&p)?).map_err(|e| format!("`{p}`: {e}"))?
        }
    };
    image.finish_encrypted(&key).map_err(|e| e.to_string())
}

/// What a device's checked image file (`path`, its SHA-256 `sha256`) writes to the chip: the
/// file itself, or for a recipe the image built for `mac` (which must be known by then); with
/// the written image's SHA-256.
pub(crate) fn image_for_chip(
    data: Vec<u8>,
    path: &Path,
    sha256: &str,
    mac: Option<&str>,
    read_key: &dyn Fn(&str) -> Result<Vec<u8>, String>,
) -> Result<(Vec<u8>, String), MfgFlashError> {
    if !is_recipe(&path.to_string_lossy()) {
        return Ok((data, sha256.to_owned()));
    }
    let Some(mac) = mac else {
        return Err(MfgFlashError::Invalid(format!(
            "`{}` takes values from the chip: it is built once the chip's MAC is known",
            path.display()
        )));
    };
    let image = build_image(&data, path, mac, read_key).map_err(|why| {
        MfgFlashError::Invalid(format!(
            "cannot build the image of `{}` for MAC {mac}: {why}; not flashed",
            path.display()
        ))
    })?;
    let sha256 = sha256_hex(&image);
    Ok((image, sha256))
}

/// The key file a recipe's image is encrypted with, as the recipe names it.
pub(crate) fn recipe_key_file(bytes: &[u8], path: &Path) -> Result<Option<String>, String> {
    Ok(header(bytes, path)?.key.map(|key| match key {
        RecipeKey::Keys(p) | RecipeKey::Hmac(p) => p,
    }))
}

/// What a recipe's `# ` lines say.
struct Header {
    size: Option<u64>,
    version: Option<Version>,
    key: Option<RecipeKey>,
}

/// A recipe's header.
fn header(bytes: &[u8], path: &Path) -> Result<Header, String> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| format!("`{}` is not a recipe (not UTF-8)", path.display()))?;
    let mut lines = text.lines().map_while(|l| l.strip_prefix("# "));
    if lines.next() != Some(FIRST_LINE) {
        return Err(format!(
            "`{}` is not a cargo-nvs chip recipe",
            path.display()
        ));
    }
    let (mut size, mut version, mut key) = (None, None, None);
    for line in lines {
        match line.split_once(": ") {
            Some(("size", n)) => {
                size = n
                    .strip_prefix("0x")
                    .and_then(|hex| u64::from_str_radix(hex, 16).ok())
            }
            Some(("version", "1")) => version = Some(Version::V1),
            Some(("version", "2")) => version = Some(Version::V2),
            Some(("keys", p)) => key = Some(RecipeKey::Keys(p.to_owned())),
            Some(("hmac-key", p)) => key = Some(RecipeKey::Hmac(p.to_owned())),
            _ => {}
        }
    }
    Ok(Header { size, version, key })
}

/// mfg_gen mode: whether a device's row (REPEAT keys from the first row) has a `@chip:` cell
/// for a config key.
pub(crate) fn row_from_chip(config: &[ConfigRow], first_row: &[String], fields: &[String]) -> bool {
    config.iter().any(|row| {
        row.column.is_some_and(|c| {
            let cell = if row.repeat {
                first_row.get(c)
            } else {
                fields.get(c)
            };
            cell.is_some_and(|cell| ChipValue::from_cell(cell).is_some())
        })
    })
}

/// mfg_gen mode: the recipe of a device whose generator CSV (`csv`, as mfg_gen writes it) has
/// `@chip:` cells; checked to fit `size` with any MAC.
pub(crate) fn mfg_gen_recipe(
    values: &Path,
    csv: &str,
    size: PartitionSize,
    version: Version,
    key: Option<&RecipeKey>,
) -> Result<Result<Vec<u8>, String>, nvs_build::InputError> {
    let mut image = ImageInput::new(size, version);
    image.set_chip_mac(Mac::ZERO);
    image.record_recipe();
    image.add_csv(values, csv.as_bytes(), &FileBase::CurrentDir)?;
    let rows = image.take_recipe();
    image.finish()?;
    Ok(recipe(&rows, size.bytes(), version, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What building a device's image from its recipe costs a station (µs, median and 90th
    /// percentile), plain and encrypted: `cargo xtask bench ledger` prints it.
    #[test]
    #[ignore = "measurement; run with `cargo xtask bench ledger`"]
    fn recipe_build_cost() {
        let csv = "key,type,encoding,value\nf,namespace,,\nserial,data,string,@chip:mac\n\
                   id,data,u64,@chip:mac\nsn,data,string,SN000123\n\
                   cert,data,base64,"
            .to_owned()
            + &"QUJD".repeat(300)
            + "\n";
        let size = PartitionSize::new(0x6000).unwrap();
        let bytes: [u8; 64] = std::array::from_fn(|i| i as u8);
        let key = XtsKey::from_bytes(bytes).unwrap().to_key_file();
        for (name, encrypted) in [("plain", false), ("encrypted", true)] {
            let recipe_key = encrypted.then(|| RecipeKey::Keys("keys.bin".into()));
            let recipe = mfg_gen_recipe(
                Path::new("values.csv"),
                &csv,
                size,
                Version::V2,
                recipe_key.as_ref(),
            )
            .unwrap()
            .unwrap();
            let read_key = |_: &str| Ok(key.clone());
            let mut times = Vec::new();
            for n in 0..2000u32 {
                let mac = format!(
                    "7C:DF:A1:{:02X}:{:02X}:{:02X}",
                    n >> 16,
                    (n >> 8) & 0xff,
                    n & 0xff
                );
                let start = std::time::Instant::now();
                let image = build_image(&recipe, Path::new("r.chip.csv"), &mac, &read_key).unwrap();
                times.push(start.elapsed().as_micros() as u64);
                assert_eq!(image.len(), 0x6000);
            }
            times.sort_unstable();
            println!(
                "bench-recipe {name} {} {}",
                times[times.len() / 2],
                times[times.len() * 9 / 10]
            );
        }
    }
}
