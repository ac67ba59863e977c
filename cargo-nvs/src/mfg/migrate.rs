//! `cargo nvs mfg ledger migrate`: a product's ledger copied into another one (a SQLite file
//! into a PostgreSQL database when the line outgrows one PC, or back): issued devices, their
//! batch folders and images, claims and the production log, verified by count afterwards. The
//! target must be empty or hold an earlier copy of the same ledger (then what came since is
//! added); the copied ids are refused for reissue there like any issued id.

use std::collections::HashMap;

use super::ledger::{FlashRecord, Issued, Ledger, LedgerError};

/// Everything a ledger holds, in its order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LedgerCopy {
    /// Batch folders, when each was first used, and the partition table stored with it.
    pub batches: Vec<(String, String, Option<Vec<u8>>)>,
    /// Issued (and reserved) devices, with their other images.
    pub devices: Vec<Issued>,
    /// Live claims, with the chip a device was written to when that was never logged.
    pub claims: Vec<ClaimRow>,
    /// The production log, oldest first.
    pub log: Vec<FlashRecord>,
}

/// A device's claim as the ledger holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimRow {
    pub device: String,
    pub claimant: String,
    pub claimed_at: String,
    pub written_to: Option<String>,
}

/// Why a ledger was not (completely) copied.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// The target holds data that is not an earlier copy of the source.
    #[error(
        "the target ledger `{target}` is not empty and is not an earlier copy of `{source_ledger}` \
         ({why}); copy into an empty database (nothing was copied)"
    )]
    NotACopy {
        source_ledger: String,
        target: String,
        why: String,
    },
    /// The counts after the copy differ from the source's.
    #[error("after the copy, `{target}` holds {found} {what}, the source {expected}")]
    Count {
        target: String,
        what: &'static str,
        found: usize,
        expected: usize,
    },
}

/// What was copied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Migrated {
    pub batches: usize,
    pub devices: usize,
    pub claims: usize,
    pub log: usize,
    /// Log rows the target had already (an earlier copy).
    pub log_before: usize,
}

/// Copies `source` into `target` (names for messages: `source_name`, `target_name`).
pub fn migrate(
    source: &dyn Ledger,
    source_name: &str,
    target: &dyn Ledger,
    target_name: &str,
) -> Result<Migrated, MigrateError> {
    let from = source.export()?;
    let before = target.export()?;
    if let Err(why) = earlier_copy(&from, &before) {
        return Err(MigrateError::NotACopy {
            source_ledger: source_name.to_owned(),
            target: target_name.to_owned(),
            why,
        });
    }
    target.import(&from, before.log.len())?;
    let after = target.export()?;
    for (what, found, expected) in [
        ("batch folders", after.batches.len(), from.batches.len()),
        ("devices", after.devices.len(), from.devices.len()),
        ("claims", after.claims.len(), from.claims.len()),
        ("log rows", after.log.len(), from.log.len()),
        ("stored files", stored_files(&after), stored_files(&from)),
    ] {
        if found != expected {
            return Err(MigrateError::Count {
                target: target_name.to_owned(),
                what,
                found,
                expected,
            });
        }
    }
    Ok(Migrated {
        batches: from.batches.len(),
        devices: from.devices.len(),
        claims: from.claims.len(),
        log: from.log.len(),
        log_before: before.log.len(),
    })
}

/// How many device files (`--store-images`) a copy holds.
fn stored_files(copy: &LedgerCopy) -> usize {
    copy.devices.iter().map(|d| d.files.len()).sum()
}

/// Whether `target` is empty or an earlier copy of `source`: each of its devices is in the
/// source with the same images and batch folder, its log is the start of the source's, and its
/// batch folders are the source's.
fn earlier_copy(source: &LedgerCopy, target: &LedgerCopy) -> Result<(), String> {
    let devices: HashMap<&str, &Issued> = source
        .devices
        .iter()
        .map(|d| (d.device.as_str(), d))
        .collect();
    for device in &target.devices {
        match devices.get(device.device.as_str()) {
            None => {
                return Err(format!(
                    "it has device `{}`, the source has not",
                    device.device
                ));
            }
            // A device the earlier copy holds only reserved may since have been issued.
            Some(d)
                if (d.sha256 != device.sha256 && !device.sha256.is_empty())
                    || d.batch_dir != device.batch_dir
                    || (d.more_images != device.more_images && !device.sha256.is_empty()) =>
            {
                return Err(format!(
                    "its device `{}` has other images or another batch folder",
                    device.device
                ));
            }
            Some(_) => {}
        }
    }
    if let Some((dir, _, _)) = target
        .batches
        .iter()
        .find(|(dir, _, _)| !source.batches.iter().any(|(d, _, _)| d == dir))
    {
        return Err(format!(
            "it has the batch folder `{dir}`, the source has not"
        ));
    }
    let same_start = target.log.len() <= source.log.len()
        && target.log.iter().zip(&source.log).all(|(a, b)| a == b);
    if !same_start {
        return Err("its production log is not the start of the source's".into());
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::mfg::ledger::SqliteLedger;
    use crate::mfg::ledger::tests::{issue_devices, reservation, scratch};

    fn record(mac: &str, device: &str, result: &str) -> FlashRecord {
        FlashRecord {
            mac: mac.into(),
            device: device.into(),
            sha256: "ab".repeat(32),
            port: "/dev/x".into(),
            result: result.into(),
            time: String::new(),
            firmware_sha256: String::new(),
        }
    }

    /// What a migration must do, from a SQLite ledger into `target` (empty) — `other` is another
    /// empty ledger of the target's kind, for the refusal of a foreign non-empty target.
    pub(crate) fn migration(target: &dyn Ledger, other: &dyn Ledger) {
        let dir = scratch("migrate-source");
        let source = SqliteLedger::open(&dir.join("ledger.sqlite"), false).unwrap();
        let batch = dir.join("batch").to_string_lossy().into_owned();
        issue_devices(&source, 20, &batch);
        // A flashed device, a claimed one, one written to a chip but never logged, a refusal.
        assert!(
            source
                .claim_next("station", &[PathBuf::from(&batch)])
                .unwrap()
                .is_some()
        );
        source
            .record_flash(&record("aa:00", "D00000", "ok"))
            .unwrap();
        source.claim("D00001", "station").unwrap();
        source.claim("D00002", "station").unwrap();
        assert!(source.mark_written("D00002", "station", "aa:02").unwrap());
        source
            .log_attempt(&record("aa:03", "D00003", "refused: other data"))
            .unwrap();

        let copied = migrate(&source, "source", target, "target").unwrap();
        assert_eq!(
            (copied.devices, copied.claims, copied.log, copied.log_before),
            (20, 2, 2, 0)
        );
        let (from, to) = (source.export().unwrap(), target.export().unwrap());
        assert_eq!(from, to, "the copy holds what the source holds");
        // The copied ids are refused for reissue there; the device written but never logged
        // goes to no other chip; the next device to claim is the same.
        let refused = target
            .reserve(&[("D00005".into(), 7)], &reservation("2", &batch))
            .unwrap();
        assert_eq!(refused.len(), 1);
        assert_eq!(
            target.written_to("D00002").unwrap().as_deref(),
            Some("aa:02")
        );
        assert_eq!(
            target.device_on_mac("aa:00").unwrap().as_deref(),
            Some("D00000")
        );

        // The line went on with the source: copying again adds what came since.
        source
            .record_flash(&record("aa:01", "D00001", "ok"))
            .unwrap();
        issue_devices_more(&source, &batch);
        let again = migrate(&source, "source", target, "target").unwrap();
        assert_eq!((again.devices, again.log, again.log_before), (21, 3, 2));
        assert_eq!(source.export().unwrap(), target.export().unwrap());

        // A target with a ledger of its own is refused, and nothing is copied.
        let dir2 = scratch("migrate-foreign");
        let foreign = SqliteLedger::open(&dir2.join("ledger.sqlite"), false).unwrap();
        issue_devices(&foreign, 3, "/another/product");
        migrate(&foreign, "foreign", other, "other").unwrap();
        let e = migrate(&source, "source", other, "other").unwrap_err();
        assert!(
            matches!(e, MigrateError::NotACopy { .. }) && e.to_string().contains("not empty"),
            "{e}"
        );
        assert_eq!(other.export().unwrap(), foreign.export().unwrap());
        let _ = std::fs::remove_dir_all(dir);
        let _ = std::fs::remove_dir_all(dir2);
    }

    /// One more device, `X1`, issued into `batch`.
    fn issue_devices_more(ledger: &dyn Ledger, batch: &str) {
        assert!(
            ledger
                .reserve(&[("X1".into(), 99)], &reservation("3", batch))
                .unwrap()
                .is_empty()
        );
        let entry = Issued {
            batch: "3".into(),
            ..crate::mfg::ledger::tests::entry_in("X1", 99, batch)
        };
        assert!(ledger.issue_many(&[entry], false).unwrap()[0].is_ok());
    }

    #[test]
    fn a_sqlite_ledger_is_copied_into_another_one() {
        let dir = scratch("migrate-target");
        let target = SqliteLedger::open(&dir.join("target.sqlite"), false).unwrap();
        let other = SqliteLedger::open(&dir.join("other.sqlite"), false).unwrap();
        migration(&target, &other);
        let _ = std::fs::remove_dir_all(dir);
    }
}
