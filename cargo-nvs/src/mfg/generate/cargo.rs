//! `cargo nvs mfg generate --values devices.csv --id COLUMN`: mass production the Cargo way.
//!
//! The package's `[package.metadata.nvs]` is built once per device row, every
//! `{ per-device = "COLUMN", … }` key taking its value from that column of the row (through
//! nvs-build's [`build_partition`], exactly as `cargo nvs generate` builds the partition with the
//! `dev` values), sizes and offsets from the package's partition table. Everything after the
//! first pass (checking, resume, the ledger, manifests) is shared with mfg_gen mode.
//!
//! The ledger keeps one entry per device id: the image of its first per-device partition (in
//! metadata order) with its SHA-256 and partition size, which is what `mfg flash` writes. With
//! several per-device partitions, the others are listed in the manifests only (and checked on
//! --resume against this run's build).

use std::collections::HashMap;
use std::path::Path;

use nvs_build::InputError;
use nvs_build::metadata::{EncryptionSpec, Metadata, PartitionSpec, TableSource, ValueSource};
use nvs_build::resolve::{Inputs, PartitionImage, build_partition, partition_recipe};

use crate::mfg::chip_values::{RecipeKey, recipe};

use super::{
    Built, Device, GenerateError, Ids, Maker, MfgGenerateArgs, Placement, Run, SharedImage, produce,
};
use crate::mfg::input::{DeviceRow, Values};
use crate::mfg::product::{Scope, choose_ledger};

pub(super) fn generate(args: &MfgGenerateArgs) -> Result<(), GenerateError> {
    let mfg_gen_only = [
        (args.fileid.is_some(), "--fileid (use --id COLUMN)"),
        (args.prefix_num.is_some(), "--prefix-num"),
        (
            args.version.is_some(),
            "--version (set `version` on the partition in the metadata)",
        ),
        (
            args.keygen,
            "--keygen (set `encryption` on the partition in the metadata)",
        ),
        (
            args.inputkey.is_some(),
            "--inputkey (set `encryption = { keys = \"…\" }` on the partition in the metadata)",
        ),
    ];
    if let Some((_, option)) = mfg_gen_only.iter().find(|(given, _)| *given) {
        return Err(GenerateError::Invalid(format!(
            "{option} belongs to the mfg_gen mode (--config, --prefix, --size); in the Cargo \
             metadata mode the package's [package.metadata.nvs] decides"
        )));
    }
    let Some(values_path) = args.values.clone() else {
        return Err(GenerateError::Invalid(
            "give --values devices.csv (a header naming the `per-device` columns of \
             [package.metadata.nvs], then one row per device) and --id COLUMN; or mfg_gen's \
             --config, --values, --prefix and --size"
                .into(),
        ));
    };
    let project = args.package.find()?;
    // The product's ledger: [package.metadata.nvs.mfg] ledger, else beside Cargo.toml.
    let ledger = choose_ledger(
        args.ledger.as_deref(),
        Scope::Package(&project.manifest_path),
    )?;
    let mut run = Run::new(args, values_path, ledger);
    let metadata = project.nvs_metadata()?;
    if metadata.table_source == TableSource::BuiltInDefault {
        eprintln!(
            "note: no partition table configured: using ESP-IDF's default single-app table (nvs \
             at 0x9000, 0x6000 bytes)"
        );
    }
    let (per_device, shared_specs) = select(args, &metadata)?;
    if args.partition_table.is_some() {
        return Err(GenerateError::Invalid(
            "--partition-table belongs to the mfg_gen mode; in the Cargo metadata mode the \
             package's partition table places the images"
                .into(),
        ));
    }
    if args.store_images {
        let names: Vec<String> = per_device.iter().map(|spec| spec.name.clone()).collect();
        let sizes: Vec<u32> = per_device.iter().map(|spec| spec.size).collect();
        run.placement = Some(Placement::new(&metadata.table, &names, &sizes)?);
    }

    let mut values = Values::open(&run.values)?;
    let header_at = run.at(values.header_line);
    let Some(id_column) = &args.id else {
        return Err(GenerateError::Invalid(format!(
            "give --id COLUMN: the column of `{}` that holds each device's id (a serial number); \
             the ledger records it, so it must be unique across batches (header at {header_at}: \
             {})",
            run.values.display(),
            values.header.join(",")
        )));
    };
    let id_index = values
        .header
        .iter()
        .position(|h| h == id_column)
        .ok_or_else(|| {
            GenerateError::Invalid(format!(
                "{header_at}: --id column `{id_column}` is not in the header (it has: {})",
                values.header.join(",")
            ))
        })?;
    let mut columns = HashMap::new();
    for spec in &per_device {
        for entry in spec.entries() {
            let ValueSource::PerDevice { column, .. } = &entry.source else {
                continue;
            };
            let index = values
                .header
                .iter()
                .position(|h| h == column)
                .ok_or_else(|| {
                    GenerateError::Invalid(format!(
                        "{header_at}: the header has no column `{column}`, from which key `{}` of \
                     partition `{}` ({}) takes each device's value (the header has: {})",
                        entry.key,
                        spec.name,
                        entry.at,
                        values.header.join(",")
                    ))
                })?;
            columns.insert(column.clone(), index);
        }
    }

    // The partitions without per-device keys are the same for every device: build them once.
    let mut shared = Vec::new();
    for spec in shared_specs {
        let mut inputs = Inputs::new(|var| std::env::var(var).ok());
        match build_partition(spec, &metadata.manifest_dir, &mut inputs)? {
            PartitionImage::Built(built) => shared.push(SharedImage {
                name: spec.name.clone(),
                bytes: built.bytes,
            }),
            PartitionImage::Skipped { reason } => {
                return Err(GenerateError::Invalid(format!(
                    "partition `{}`: {reason}",
                    spec.name
                )));
            }
        }
    }

    let maker = CargoMaker {
        package: project.name.clone(),
        metadata: &metadata,
        labels: per_device.iter().map(|spec| spec.name.clone()).collect(),
        recipes: per_device
            .iter()
            .map(|spec| spec.has_chip_values())
            .collect(),
        per_device,
        columns,
        shared,
        run: &run,
        id_index,
    };
    // Pass 1: every device's id, checked and unique, before anything is built.
    let mut ids = Ids::new();
    let mut count = 0;
    while let Some(row) = values.next_device()? {
        let device = maker.device(count, &row);
        ids.check(&run, row.line, id_column, &device.id)?;
        count += 1;
    }
    drop(ids);
    if count == 0 {
        return Err(GenerateError::Invalid(format!(
            "{}: the values file has a header but no device rows",
            run.values.display()
        )));
    }
    produce(&run, &maker, count)
}

/// Whether a partition has keys filled in per device.
fn has_per_device_keys(spec: &PartitionSpec) -> bool {
    spec.entries().any(|e| {
        matches!(
            e.source,
            ValueSource::PerDevice { .. } | ValueSource::Chip { .. }
        )
    })
}

/// The partitions to build per device, and those to build once.
fn select<'m>(
    args: &MfgGenerateArgs,
    metadata: &'m Metadata,
) -> Result<(Vec<&'m PartitionSpec>, Vec<&'m PartitionSpec>), GenerateError> {
    let chosen: Vec<&PartitionSpec> = if !args.partitions.is_empty() {
        let mut chosen = Vec::new();
        for name in &args.partitions {
            let spec = metadata
                .partitions
                .iter()
                .find(|p| p.name == *name)
                .ok_or_else(|| {
                    GenerateError::Invalid(format!(
                        "--partition `{name}` is not in [package.metadata.nvs] of `{}` (it has: {})",
                        metadata.manifest_path.display(),
                        names(metadata.partitions.iter())
                    ))
                })?;
            if !chosen.iter().any(|c: &&PartitionSpec| c.name == spec.name) {
                chosen.push(spec);
            }
        }
        chosen
    } else if args.all_partitions {
        metadata.partitions.iter().collect()
    } else {
        metadata
            .partitions
            .iter()
            .filter(|p| has_per_device_keys(p))
            .collect()
    };
    let (per_device, shared): (Vec<_>, Vec<_>) =
        chosen.into_iter().partition(|p| has_per_device_keys(p));
    if per_device.is_empty() {
        return Err(GenerateError::Invalid(format!(
            "no {} of [package.metadata.nvs] in `{}` has per-device keys, so every device would \
             get the same images; mark the keys filled in per device with \
             `{{ u32 = {{ per-device = \"COLUMN\", dev = 1 }} }}` (or use `cargo nvs generate`)",
            if args.partitions.is_empty() {
                "partition".to_owned()
            } else {
                format!("selected partition ({})", names(shared.iter().copied()))
            },
            metadata.manifest_path.display()
        )));
    }
    Ok((per_device, shared))
}

fn names<'a>(specs: impl Iterator<Item = &'a PartitionSpec>) -> String {
    let names: Vec<&str> = specs.map(|s| s.name.as_str()).collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

/// Cargo mode: each device's images from the metadata, per-device keys from its row.
struct CargoMaker<'a> {
    package: String,
    metadata: &'a Metadata,
    per_device: Vec<&'a PartitionSpec>,
    labels: Vec<String>,
    /// Per partition: it takes values from the chip, so each device gets a recipe.
    recipes: Vec<bool>,
    /// Values column name → index, for every per-device key.
    columns: HashMap<String, usize>,
    shared: Vec<SharedImage>,
    run: &'a Run,
    /// The --id column.
    id_index: usize,
}

impl CargoMaker<'_> {
    /// Turns an error about the metadata into one about the device: its values row, and the
    /// column when a per-device key's value was refused.
    fn locate(&self, spec: &PartitionSpec, device: &Device, e: InputError) -> GenerateError {
        let device_at = format!("{}: device `{}`", self.run.at(device.line), device.id);
        let column = spec
            .entries()
            .find(|entry| Some(entry.key.as_str()) == e.key() && Some(&entry.at) == e.location())
            .and_then(|entry| match &entry.source {
                ValueSource::PerDevice { column, .. } => Some((entry, column)),
                _ => None,
            });
        match column {
            Some((entry, column)) => GenerateError::Invalid(format!(
                "{device_at}, column `{column}` (key `{}` of partition `{}`, {}): {}",
                entry.key,
                spec.name,
                entry.at,
                e.message()
            )),
            // Not one key's value (the partition is full, say): list the row's columns that
            // went into it.
            None => {
                let columns: Vec<String> = spec
                    .entries()
                    .filter_map(|entry| match &entry.source {
                        ValueSource::PerDevice { column, .. } => Some(format!("`{column}`")),
                        _ => None,
                    })
                    .collect();
                GenerateError::Invalid(format!(
                    "{device_at}: partition `{}`: {e} (with this row's values of column(s) {})",
                    spec.name,
                    columns.join(", ")
                ))
            }
        }
    }
}

impl CargoMaker<'_> {
    /// The recipe of a partition that takes values from the chip: every value inline, the
    /// chip's as `@chip:` cells; encrypted partitions name their key file (absolute).
    fn recipe(
        &self,
        spec: &PartitionSpec,
        device: &Device,
        inputs: &mut Inputs<'_>,
    ) -> Result<Vec<u8>, GenerateError> {
        let rows = partition_recipe(spec, &self.metadata.manifest_dir, inputs)
            .map_err(|e| self.locate(spec, device, e))?
            .ok_or_else(|| {
                GenerateError::Invalid(format!(
                    "{}: device `{}`: partition `{}`: a per-device key has no value",
                    self.run.at(device.line),
                    device.id,
                    spec.name
                ))
            })?;
        let absolute = |path: &Path| {
            std::path::absolute(path)
                .unwrap_or_else(|_| path.to_owned())
                .display()
                .to_string()
        };
        let key = spec
            .encryption
            .as_ref()
            .map(|(encryption, _)| match encryption {
                EncryptionSpec::KeyFile(path) => RecipeKey::Keys(absolute(path)),
                EncryptionSpec::HmacKey(path) => RecipeKey::Hmac(absolute(path)),
            });
        recipe(&rows, u64::from(spec.size), spec.version, key.as_ref()).map_err(|why| {
            GenerateError::Invalid(format!(
                "partition `{}` ({}) takes values from the chip, so each device's image is \
                 made when it is flashed from a CSV recipe, which cannot hold this: {why}",
                spec.name, spec.at
            ))
        })
    }
}

impl Maker for CargoMaker<'_> {
    fn device(&self, _n: usize, row: &DeviceRow) -> Device {
        let id = row.fields[self.id_index].clone();
        Device {
            line: row.line,
            images: self
                .per_device
                .iter()
                .map(|spec| format!("{}-{id}", spec.name))
                .collect(),
            ledger_id: id.clone(),
            id,
            recipes: self.recipes.clone(),
        }
    }

    fn build(
        &self,
        device: &Device,
        row: &DeviceRow,
        _writing: bool,
    ) -> Result<Built, GenerateError> {
        let mut images = Vec::with_capacity(self.per_device.len());
        for (spec, &recipe) in self.per_device.iter().zip(&self.recipes) {
            let mut inputs = Inputs::new(|var| std::env::var(var).ok()).with_per_device(|column| {
                self.columns
                    .get(column)
                    .map(|&index| row.fields[index].clone())
            });
            if recipe {
                images.push(self.recipe(spec, device, &mut inputs)?);
                continue;
            }
            let image = build_partition(spec, &self.metadata.manifest_dir, &mut inputs)
                .map_err(|e| self.locate(spec, device, e))?;
            match image {
                PartitionImage::Built(built) => images.push(built.bytes),
                PartitionImage::Skipped { reason } => {
                    return Err(GenerateError::Invalid(format!(
                        "{}: device `{}`: partition `{}`: {reason}",
                        self.run.at(device.line),
                        device.id,
                        spec.name
                    )));
                }
            }
        }
        Ok(Built {
            images,
            key: None,
            hmac_key: None,
        })
    }

    fn ledger_size(&self) -> u32 {
        self.per_device[0].size
    }

    fn shared(&self) -> &[SharedImage] {
        &self.shared
    }

    fn labels(&self) -> Option<&[String]> {
        Some(&self.labels)
    }

    fn manifest_fields(&self) -> serde_json::Map<String, serde_json::Value> {
        let partitions: Vec<serde_json::Value> = self
            .per_device
            .iter()
            .map(|spec| (*spec, true))
            .chain(self.shared.iter().filter_map(|s| {
                let spec = self.metadata.partitions.iter().find(|p| p.name == s.name)?;
                Some((spec, false))
            }))
            .map(|(spec, per_device)| {
                serde_json::json!({
                    "name": spec.name,
                    "offset": spec.offset,
                    "size": spec.size,
                    "version": spec.version.number(),
                    "factory": spec.factory,
                    "per_device": per_device,
                })
            })
            .collect();
        let serde_json::Value::Object(fields) = serde_json::json!({
            "package": self.package,
            "manifest": display(&self.metadata.manifest_path),
            "partitions": partitions,
        }) else {
            unreachable!("a JSON object")
        };
        fields
    }
}

fn display(path: &Path) -> String {
    path.display().to_string()
}
