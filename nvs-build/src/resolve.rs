//! Resolved partition specs → image bytes: reads the files and environment variables the
//! values come from, records them (for cargo's `rerun-if-*`), and lays the image out.

use std::path::PathBuf;

use crate::chip::{ChipValue, Mac, RecipeRow};
use crate::csv_input::FileBase;
use crate::error::Error;
use crate::format::{PartitionSize, Value};
use crate::image::ImageInput;
use crate::metadata::{EntrySpec, PartitionSpec, ValueSource};

/// Everything reading the inputs touched.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dependencies {
    pub files: Vec<PathBuf>,
    pub env_vars: Vec<String>,
}

impl Dependencies {
    fn file(&mut self, path: &std::path::Path) {
        if !self.files.iter().any(|p| p == path) {
            self.files.push(path.to_owned());
        }
    }

    fn env(&mut self, var: &str) {
        if !self.env_vars.iter().any(|v| v == var) {
            self.env_vars.push(var.to_owned());
        }
    }
}

/// Looks a name up: an environment variable, or a per-device column.
type Lookup<'a> = Box<dyn Fn(&str) -> Option<String> + 'a>;

/// Where environment variables and per-device values come from.
pub struct Inputs<'a> {
    env: Lookup<'a>,
    per_device: Option<Lookup<'a>>,
    /// The MAC chip values take; without it, their `dev` values.
    chip_mac: Option<Mac>,
    pub deps: Dependencies,
}

impl<'a> Inputs<'a> {
    /// Environment variables from `env`; per-device keys take their `dev` values.
    pub fn new(env: impl Fn(&str) -> Option<String> + 'a) -> Inputs<'a> {
        Inputs {
            env: Box::new(env),
            per_device: None,
            chip_mac: None,
            deps: Dependencies::default(),
        }
    }

    /// Chip values (`{ chip = "mac", … }`) take this MAC instead of their `dev` values.
    pub fn with_chip_mac(mut self, mac: Mac) -> Inputs<'a> {
        self.chip_mac = Some(mac);
        self
    }

    /// Per-device keys take their values from `values` (a column name → value lookup), as mass
    /// production does for each device.
    pub fn with_per_device(mut self, values: impl Fn(&str) -> Option<String> + 'a) -> Inputs<'a> {
        self.per_device = Some(Box::new(values));
        self
    }
}

/// The image of one partition, or why it was not built.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PartitionImage {
    Built(BuiltImage),
    /// A per-device key has no value outside mass production.
    Skipped {
        reason: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuiltImage {
    pub bytes: Vec<u8>,
    /// Entries used (including ones the layout had to skip), out of `entries_available`.
    pub entries_used: usize,
    pub entries_available: usize,
}

impl BuiltImage {
    /// How full the partition is, in percent of its data entries.
    pub fn percent_full(&self) -> u32 {
        (self.entries_used * 100).div_ceil(self.entries_available.max(1)) as u32
    }
}

/// The rows of one partition's image with every value inline (its CSV files' `file` rows
/// read), chip values marked, for a recipe ([`crate::chip::recipe_csv`]); checked to fit the
/// partition with a stand-in MAC (every MAC spells as long). Not encrypted: the recipe says how.
pub fn partition_recipe(
    spec: &PartitionSpec,
    manifest_dir: &std::path::Path,
    inputs: &mut Inputs<'_>,
) -> Result<Option<Vec<RecipeRow>>, Error> {
    let Ok(mut image) = assemble(spec, manifest_dir, inputs, true)? else {
        return Ok(None);
    };
    let rows = image.take_recipe();
    image.finish()?;
    Ok(Some(rows))
}

/// Builds the image of one partition: its CSV files in order, then its inline keys.
pub fn build_partition(
    spec: &PartitionSpec,
    manifest_dir: &std::path::Path,
    inputs: &mut Inputs<'_>,
) -> Result<PartitionImage, Error> {
    let image = match assemble(spec, manifest_dir, inputs, false)? {
        Ok(image) => image,
        Err(entry) => {
            return Ok(PartitionImage::Skipped {
                reason: format!(
                    "{}: key `{}` is filled in per device by mass production and has no `dev` value for development builds",
                    entry.at, entry.key
                ),
            });
        }
    };
    let entries_used = image.entries_used();
    let entries_available = image.size().data_pages() * crate::format::ENTRIES_PER_PAGE;
    let bytes = match &spec.encryption {
        None => image.finish()?,
        Some((encryption, at)) => encrypt(image, encryption, at, inputs)?,
    };
    Ok(PartitionImage::Built(BuiltImage {
        bytes,
        entries_used,
        entries_available,
    }))
}

/// A partition's CSV files and keys added to an image; recording a recipe with `record`, in
/// which chip values take a stand-in MAC (else the inputs' MAC, or their `dev` values). `Err` names the per-device
/// key without a value that skips the partition.
fn assemble<'s>(
    spec: &'s PartitionSpec,
    manifest_dir: &std::path::Path,
    inputs: &mut Inputs<'_>,
    record: bool,
) -> Result<Result<ImageInput, &'s EntrySpec>, Error> {
    // Per-device keys without a value skip the partition (before reading anything else).
    if inputs.per_device.is_none() {
        if let Some(missing) = spec.missing_dev() {
            return Ok(Err(missing));
        }
    }
    let size = PartitionSize::new(u64::from(spec.size))
        .map_err(|e| Error::from_format(Some(spec.at.clone()), Some(&spec.name), e))?;
    let mut image = ImageInput::new(size, spec.version);
    if record {
        image.record_recipe();
    }
    let files = FileBase::Dir(manifest_dir.to_owned());
    for (csv, listed_at) in &spec.csv {
        image
            .add_csv_file(csv, &files)
            .map_err(|e| match e.location() {
                // The file itself could not be read: point at where it is listed too.
                Some(loc) if loc.line.is_none() => {
                    e.with_note(&format!(" (listed at {listed_at})"))
                }
                _ => e,
            })?;
    }
    // The CSV files above follow the reference; keys written in the metadata may use every
    // string length the device stores.
    image.allow_device_string_lengths(true);
    for ns in &spec.namespaces {
        image.namespace(Some(&ns.at), &ns.name)?;
        for entry in &ns.entries {
            let (value, text, chip) = resolve_value(entry, inputs, record)?;
            image.add_from(Some(&entry.at), &entry.key, value, &text, chip)?;
        }
    }
    for file in image.files_read() {
        inputs.deps.file(file);
    }
    Ok(Ok(image))
}

#[cfg(feature = "encryption")]
fn encrypt(
    image: ImageInput,
    encryption: &crate::metadata::EncryptionSpec,
    _at: &crate::error::Location,
    inputs: &mut Inputs<'_>,
) -> Result<Vec<u8>, Error> {
    use crate::metadata::EncryptionSpec;
    let key = match encryption {
        EncryptionSpec::KeyFile(path) => {
            inputs.deps.file(path);
            crate::keys::load_key_file(path)?.key
        }
        EncryptionSpec::HmacKey(path) => {
            inputs.deps.file(path);
            crate::keys::load_hmac_key(path)?
        }
    };
    image.finish_encrypted(&key)
}

#[cfg(not(feature = "encryption"))]
fn encrypt(
    _image: ImageInput,
    _encryption: &crate::metadata::EncryptionSpec,
    at: &crate::error::Location,
    _inputs: &mut Inputs<'_>,
) -> Result<Vec<u8>, Error> {
    Err(Error::new(
        Some(at.clone()),
        None,
        "this partition is encrypted, but nvs-build was compiled without its `encryption` feature; \
         enable it: nvs-build = { version = \"…\", features = [\"encryption\"] }",
    ))
}

/// The value of one key, the text it was written as (for the reference's Wi-Fi helper) and,
/// when the chip gave it, which chip value it is.
fn resolve_value(
    entry: &EntrySpec,
    inputs: &mut Inputs<'_>,
    recipe: bool,
) -> Result<(Value, String, Option<ChipValue>), Error> {
    let chip_mac = if recipe {
        Some(Mac::ZERO)
    } else {
        inputs.chip_mac
    };
    let fail = |msg: String| Error::new(Some(entry.at.clone()), Some(&entry.key), msg);
    let text = match &entry.source {
        ValueSource::Text(text) => text.clone(),
        ValueSource::Integer(n) => {
            let value = crate::encoding::integer_value(entry.encoding, *n).map_err(fail)?;
            return Ok((value, n.to_string(), None));
        }
        ValueSource::Chip { value, dev } => match chip_mac {
            Some(mac) => {
                let (filled, text) = value.fill(entry.encoding, &mac).map_err(fail)?;
                return Ok((filled, text, Some(*value)));
            }
            None => dev.clone(),
        },
        ValueSource::File(path) => {
            let bytes = crate::error::read_limited(path, crate::error::MAX_VALUE_FILE_BYTES)
                .map_err(|e| fail(format!("cannot read file `{}`: {e}", path.display())))?;
            inputs.deps.file(path);
            let value = entry.encoding.decode_file(&bytes).map_err(fail)?;
            return Ok((value, path.to_string_lossy().into_owned(), None));
        }
        ValueSource::Env { var, default } => {
            inputs.deps.env(var);
            match ((inputs.env)(var), default) {
                (Some(value), _) => value,
                (None, Some(default)) => default.clone(),
                (None, None) => {
                    return Err(fail(format!(
                        "environment variable `{var}` is not set; set it, or give a fallback with `default = …`"
                    )));
                }
            }
        }
        ValueSource::PerDevice { column, dev } => {
            let value = inputs.per_device.as_ref().and_then(|values| values(column));
            match (value, dev) {
                (Some(value), _) => value,
                (None, Some(dev)) => dev.clone(),
                (None, None) => {
                    return Err(fail(format!("no value for per-device column `{column}`")));
                }
            }
        }
    };
    let value = entry.encoding.decode(&text).map_err(fail)?;
    Ok((value, text, None))
}
