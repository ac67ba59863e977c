//! Never destroy data a device holds: for each NVS partition a command is about to write, decide
//! from what the chip holds there whether writing is safe.
//!
//! [`assess`] is pure (bytes in, a [`Finding`] out), so every case is testable without a chip;
//! [`decide`] turns a finding into write / keep / refuse for the partition's role and the
//! user's flags. Factory data (certificates, secrets, serials) cannot be recreated, so anything
//! that is not blank, ours, our own interrupted write or development data is kept.

use crate::hex::sha256_hex;
use nvs_build::format::encryption::{XtsKey, decrypt_image};
use nvs_build::format::{ItemValue, ParsedImage, Severity, read_image};

/// What a data partition holds, as far as writing over it is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finding {
    /// Erased flash.
    Blank,
    /// Exactly the bytes we would write.
    Same,
    /// The first `written` bytes of our image, then erased flash: our own write, cut off.
    Interrupted { written: usize },
    /// Factory data made for development: every per-device key holds its `dev` value and
    /// every key is one the package defines.
    DevData,
    /// Per-device keys with values other than the `dev` ones (or missing): a production
    /// identity.
    Identity { keys: Vec<String> },
    /// A partition without per-device keys whose contents differ from ours.
    Differs,
    /// Keys the package does not define.
    ForeignKeys { keys: Vec<String> },
    /// Encrypted with keys we do not have.
    Unreadable,
    /// What `dump` reports as errors (warnings do not count).
    Damaged { problems: Vec<String> },
    /// A valid NVS partition with other contents (user data the device wrote).
    Other,
}

/// A data partition about to be written.
pub struct Planned<'a> {
    /// The bytes we would write (padded to the partition; encrypted when `key` is set).
    pub ours: &'a [u8],
    /// The package's development image of the partition (its per-device keys hold their `dev`
    /// values): `ours` for a development flash; `None` when there is none (no `dev` values),
    /// so nothing counts as development data.
    pub dev: Option<&'a [u8]>,
    /// Decrypts both images (partitions encrypted with an nvs_keys file or an HMAC key).
    pub key: Option<&'a XtsKey>,
    /// `namespace::key` of every key mass production fills in per device (factory data).
    pub per_device: &'a [String],
}

/// Compares what the chip holds with what we would write.
pub fn assess(planned: &Planned<'_>, chip: &[u8]) -> Finding {
    if chip == planned.ours {
        return Finding::Same;
    }
    if chip.iter().all(|&b| b == 0xFF) {
        return Finding::Blank;
    }
    let first_difference = chip
        .iter()
        .zip(planned.ours)
        .position(|(a, b)| a != b)
        .unwrap_or(chip.len().min(planned.ours.len()));
    if chip.len() == planned.ours.len() && chip[first_difference..].iter().all(|&b| b == 0xFF) {
        return Finding::Interrupted {
            written: first_difference,
        };
    }
    let on_chip = parse(chip, planned.key);
    // Without a key of ours, entries that all fail their CRC are damage, not encryption.
    if on_chip.looks_encrypted && planned.key.is_some() {
        return Finding::Unreadable;
    }
    let mut problems: Vec<String> = on_chip
        .problems
        .iter()
        .filter(|p| p.severity == Severity::Error)
        .map(|p| match (p.page, p.entry) {
            (Some(page), Some(entry)) => format!("page {page} entry {entry}: {}", p.message),
            (Some(page), None) => format!("page {page}: {}", p.message),
            _ => p.message.clone(),
        })
        .collect();
    if on_chip.looks_encrypted && problems.is_empty() {
        problems.push("no entry passes its CRC".to_owned());
    }
    if !problems.is_empty() {
        return Finding::Damaged { problems };
    }
    let Some(dev) = planned.dev else {
        return Finding::Other;
    };
    let dev = parse(dev, planned.key);
    let values_of = |image: &ParsedImage| -> Vec<(String, ItemValue)> {
        image
            .live_items()
            .map(|item| {
                let name = format!("{}::{}", item.namespace.as_deref().unwrap_or("?"), item.key);
                (name, comparable(&item.value))
            })
            .collect()
    };
    let (chip_values, dev_values) = (values_of(&on_chip), values_of(&dev));
    let value_on = |values: &[(String, ItemValue)], name: &str| {
        values
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    if planned.per_device.is_empty() {
        return Finding::Other;
    }
    let mut foreign: Vec<String> = chip_values
        .iter()
        .filter(|(name, _)| value_on(&dev_values, name).is_none())
        .map(|(name, _)| name.clone())
        .collect();
    foreign.dedup();
    let identity: Vec<String> = planned
        .per_device
        .iter()
        .filter(|name| value_on(&chip_values, name) != value_on(&dev_values, name))
        .cloned()
        .collect();
    if !identity.is_empty() {
        Finding::Identity { keys: identity }
    } else if !foreign.is_empty() {
        Finding::ForeignKeys { keys: foreign }
    } else {
        Finding::DevData
    }
}

/// For factory data, [`Finding::Other`] means "differs, and there are no per-device keys to
/// tell development data from production data".
pub fn for_factory(finding: Finding) -> Finding {
    match finding {
        Finding::Other => Finding::Differs,
        other => other,
    }
}

fn parse(image: &[u8], key: Option<&XtsKey>) -> ParsedImage {
    match key {
        Some(key) => {
            let mut plain = image.to_vec();
            decrypt_image(&mut plain, key);
            read_image(&plain)
        }
        None => read_image(image),
    }
}

/// Blobs compare by their bytes, not by how they were chunked.
fn comparable(value: &ItemValue) -> ItemValue {
    match value {
        ItemValue::Blob(blob) => {
            ItemValue::Value(nvs_build::format::Value::Blob(blob.data.clone()))
        }
        other => other.clone(),
    }
}

/// The SHA-256s a ledger may know the partition's contents by: of the whole partition, and of
/// every shorter image (whole pages) that was padded with erased flash to fill it.
pub fn candidate_sha256s(chip: &[u8]) -> Vec<String> {
    const PAGE: usize = 4096;
    let mut end = chip.len();
    let mut hashes = vec![sha256_hex(chip)];
    while end >= 2 * PAGE && chip[end - PAGE..end].iter().all(|&b| b == 0xFF) {
        end -= PAGE;
        hashes.push(sha256_hex(&chip[..end]));
    }
    hashes
}

/// The partition's role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Read-only factory data (flagged `readonly` in the table or `read-only` in the metadata).
    Factory,
    /// Everything else: the device's own data, erased by a factory reset.
    UserData,
}

/// What the user allowed.
#[derive(Clone, Copy, Debug, Default)]
pub struct Allow {
    /// `--overwrite-factory-data`.
    pub overwrite_factory_data: bool,
    /// `--reset-user-data`.
    pub reset_user_data: bool,
    /// `--keep-user-data`: keep damaged user data as it is.
    pub keep_user_data: bool,
}

/// What to do with one partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Write it; the message (if any) says why that is safe or asked for.
    Write(Option<String>),
    /// Leave it as it is; the message says why.
    Keep(String),
    /// Stop: the partition needs the user's decision.
    Refuse(String),
}

/// Decides for the partition `label` (e.g. ``nvs `fctry` at 0xf000``). `identity` names the
/// device the partition belongs to, when a ledger knows it.
pub fn decide(
    role: Role,
    finding: &Finding,
    allow: Allow,
    label: &str,
    identity: Option<&str>,
) -> Decision {
    let holder = identity.map_or_else(
        || "an unknown production identity".to_owned(),
        str::to_owned,
    );
    match (role, finding) {
        (_, Finding::Blank | Finding::Same) => Decision::Write(None),
        (_, Finding::Interrupted { written }) => Decision::Write(Some(format!(
            "Finishing an interrupted write of {label}: it holds the first {written} bytes of \
             this image, then erased flash"
        ))),
        (Role::Factory, Finding::DevData) => Decision::Write(Some(format!(
            "Updating the development data in {label} (every per-device key holds its dev value)"
        ))),
        (Role::Factory, _) if allow.overwrite_factory_data => Decision::Write(Some(format!(
            "Replacing the factory data in {label}, which holds {holder} \
             (--overwrite-factory-data)"
        ))),
        (Role::Factory, finding) => Decision::Keep(format!(
            "Keeping the factory data in {label}: {}; it holds {holder}. \
             --overwrite-factory-data replaces it",
            why_kept(finding)
        )),
        (Role::UserData, _) if allow.reset_user_data => Decision::Write(Some(format!(
            "Replacing the device's user data in {label} (--reset-user-data)"
        ))),
        (Role::UserData, Finding::Damaged { problems }) if !allow.keep_user_data => {
            Decision::Refuse(format!(
                "{label} holds damaged user data ({}{}): an interrupted or failed write, or a \
                 fault. --reset-user-data replaces it with this image, --keep-user-data keeps it \
                 as it is",
                problems.first().map_or("", String::as_str),
                match problems.len() {
                    0 | 1 => String::new(),
                    n => format!(", and {} more error(s)", n - 1),
                }
            ))
        }
        (Role::UserData, Finding::Damaged { .. }) => Decision::Keep(format!(
            "Keeping the damaged user data in {label} as it is (--keep-user-data)"
        )),
        (Role::UserData, _) => Decision::Keep(format!(
            "Keeping the device's user data in {label} (the partition is not blank; \
             --reset-user-data replaces it)"
        )),
    }
}

/// Why data is kept (or refused), in words; never a value.
pub fn why_kept(finding: &Finding) -> String {
    let list = |keys: &[String]| {
        let shown: Vec<&str> = keys.iter().take(4).map(String::as_str).collect();
        let more = keys.len().saturating_sub(shown.len());
        if more > 0 {
            format!("{} and {more} more", shown.join(", "))
        } else {
            shown.join(", ")
        }
    };
    match finding {
        Finding::Identity { keys } => format!(
            "its per-device keys ({}) do not hold their dev values",
            list(keys)
        ),
        Finding::Differs | Finding::Other => {
            "it differs from this image and has no per-device keys that would tell development \
             data from production data"
                .to_owned()
        }
        Finding::ForeignKeys { keys } => {
            format!(
                "it holds keys this package does not define ({})",
                list(keys)
            )
        }
        Finding::Unreadable => "it is encrypted with keys this package does not have".to_owned(),
        Finding::Damaged { problems } => format!(
            "dump reports it damaged ({})",
            problems.first().map_or("", String::as_str)
        ),
        Finding::Blank | Finding::Same | Finding::Interrupted { .. } | Finding::DevData => {
            String::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nvs_build::format::{ImageBuilder, Value, Version};

    const SIZE: usize = 0x3000;

    fn image(entries: &[(&str, Value)]) -> Vec<u8> {
        let mut builder = ImageBuilder::new(Version::V2);
        builder.namespace("mass_prod").unwrap();
        for (key, value) in entries {
            builder.add(key, value.clone()).unwrap();
        }
        builder
            .finish(nvs_build::format::PartitionSize::new(SIZE as u64).unwrap())
            .unwrap()
    }

    fn dev() -> Vec<u8> {
        image(&[
            ("name", Value::String("demo".into())),
            ("serial", Value::U32(1)),
            ("secret", Value::String("dev-secret".into())),
        ])
    }

    fn per_device() -> Vec<String> {
        vec!["mass_prod::serial".into(), "mass_prod::secret".into()]
    }

    fn assess_with(chip: &[u8], per_device: &[String]) -> Finding {
        let ours = dev();
        assess(
            &Planned {
                ours: &ours,
                dev: Some(&ours),
                key: None,
                per_device,
            },
            chip,
        )
    }

    #[test]
    fn blank_same_and_interrupted_writes() {
        let ours = dev();
        assert_eq!(
            assess_with(&vec![0xFF; SIZE], &per_device()),
            Finding::Blank
        );
        assert_eq!(assess_with(&ours, &per_device()), Finding::Same);
        let mut cut = vec![0xFF; SIZE];
        // The page header and the first entries, then the write stopped.
        cut[..0x60].copy_from_slice(&ours[..0x60]);
        assert_eq!(
            assess_with(&cut, &per_device()),
            Finding::Interrupted { written: 0x60 }
        );
    }

    #[test]
    fn dev_data_identity_and_foreign_keys() {
        // Other values of keys that are not per-device (DEVICE_NAME changed): still dev data.
        let renamed = image(&[
            ("name", Value::String("renamed".into())),
            ("serial", Value::U32(1)),
            ("secret", Value::String("dev-secret".into())),
        ]);
        assert_eq!(assess_with(&renamed, &per_device()), Finding::DevData);
        let production = image(&[
            ("name", Value::String("demo".into())),
            ("serial", Value::U32(1000)),
            ("secret", Value::String("real".into())),
        ]);
        assert_eq!(
            assess_with(&production, &per_device()),
            Finding::Identity { keys: per_device() }
        );
        let missing = image(&[("name", Value::String("demo".into()))]);
        assert!(matches!(
            assess_with(&missing, &per_device()),
            Finding::Identity { .. }
        ));
        let foreign = image(&[
            ("name", Value::String("demo".into())),
            ("serial", Value::U32(1)),
            ("secret", Value::String("dev-secret".into())),
            ("other", Value::U8(1)),
        ]);
        assert_eq!(
            assess_with(&foreign, &per_device()),
            Finding::ForeignKeys {
                keys: vec!["mass_prod::other".into()]
            }
        );
        // Without per-device keys nothing tells dev data from production data.
        assert_eq!(for_factory(assess_with(&renamed, &[])), Finding::Differs);
    }

    #[test]
    fn damage_and_garbage() {
        let mut damaged = dev();
        damaged[64 + 32 + 5] ^= 0x40; // inside the second entry: its CRC no longer matches
        assert!(matches!(
            assess_with(&damaged, &per_device()),
            Finding::Damaged { .. }
        ));
        let garbage: Vec<u8> = (0..SIZE).map(|i| (i * 7 % 251) as u8).collect();
        assert!(matches!(
            assess_with(&garbage, &per_device()),
            Finding::Damaged { .. } | Finding::Unreadable
        ));
    }

    #[test]
    fn encrypted_with_other_keys_is_unreadable() {
        let key = |a: u8, b: u8| {
            let mut bytes = [a; 64];
            bytes[32..].fill(b);
            XtsKey::from_bytes(bytes).unwrap()
        };
        let (ours_key, their_key) = (key(0x11, 0x12), key(0x21, 0x22));
        let mut ours = dev();
        nvs_build::format::encryption::encrypt_image(&mut ours, &ours_key);
        let mut theirs = image(&[("serial", Value::U32(5))]);
        nvs_build::format::encryption::encrypt_image(&mut theirs, &their_key);
        let per_device = per_device();
        let planned = Planned {
            ours: &ours,
            dev: Some(&ours),
            key: Some(&ours_key),
            per_device: &per_device,
        };
        assert_eq!(assess(&planned, &theirs), Finding::Unreadable);
        let mut renamed = image(&[
            ("name", Value::String("x".into())),
            ("serial", Value::U32(1)),
            ("secret", Value::String("dev-secret".into())),
        ]);
        nvs_build::format::encryption::encrypt_image(&mut renamed, &ours_key);
        assert_eq!(assess(&planned, &renamed), Finding::DevData);
    }

    #[test]
    fn decisions_follow_role_and_flags() {
        let label = "nvs `fctry` at 0xf000";
        let identity = Finding::Identity { keys: per_device() };
        let none = Allow::default();
        let Decision::Keep(message) =
            decide(Role::Factory, &identity, none, label, Some("device `1000`"))
        else {
            panic!()
        };
        assert!(message.contains("device `1000`") && message.contains("--overwrite-factory-data"));
        let Decision::Keep(message) = decide(Role::Factory, &identity, none, label, None) else {
            panic!()
        };
        assert!(
            message.contains("an unknown production identity"),
            "{message}"
        );
        let overwrite = Allow {
            overwrite_factory_data: true,
            ..none
        };
        assert!(matches!(
            decide(Role::Factory, &identity, overwrite, label, None),
            Decision::Write(Some(_))
        ));
        assert!(matches!(
            decide(Role::Factory, &Finding::DevData, none, label, None),
            Decision::Write(Some(_))
        ));
        let damaged = Finding::Damaged {
            problems: vec!["entry CRC mismatch".into()],
        };
        assert!(matches!(
            decide(Role::UserData, &damaged, none, label, None),
            Decision::Refuse(_)
        ));
        let keep = Allow {
            keep_user_data: true,
            ..none
        };
        assert!(matches!(
            decide(Role::UserData, &damaged, keep, label, None),
            Decision::Keep(_)
        ));
        assert!(matches!(
            decide(Role::Factory, &damaged, none, label, None),
            Decision::Keep(_)
        ));
        assert!(matches!(
            decide(Role::UserData, &Finding::Other, none, label, None),
            Decision::Keep(_)
        ));
    }

    #[test]
    fn sha256_candidates_cover_shorter_padded_images() {
        let mut chip = vec![0xFF; 0x6000];
        chip[..10].copy_from_slice(b"0123456789");
        let hashes = candidate_sha256s(&chip);
        assert_eq!(hashes.len(), 6);
        assert_eq!(hashes[5], sha256_hex(&chip[..0x1000]));
    }
}
