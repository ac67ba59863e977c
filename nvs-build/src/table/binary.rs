//! The binary form flashed at the table offset: 32-byte entries
//! (`magic 0xAA 0x50, type, subtype, offset u32 LE, size u32 LE, name [u8; 16], flags u32 LE`),
//! an MD5 entry (`0xEB 0xEB`, 14 × 0xFF, MD5 of the entries before it), and 32 bytes of 0xFF
//! ending the table; `gen_esp32part.py` pads it with 0xFF to 0xC00 bytes.

use std::path::Path;

use super::md5::Md5;
use super::{Partition, PartitionKind, PartitionTable};
use crate::error::{Error, Location};
use crate::hex;

pub(super) const ENTRY_MAGIC: [u8; 2] = [0xAA, 0x50];
const MD5_MAGIC: [u8; 2] = [0xEB, 0xEB];
const ENTRY: usize = 32;
const NAME: usize = 16;
const FLAG_ENCRYPTED: u32 = 1 << 0;
const FLAG_READONLY: u32 = 1 << 1;

pub(super) fn parse(path: &Path, bytes: &[u8]) -> Result<PartitionTable, Error> {
    let fail = |message: String| Error::new(Some(Location::file(path)), None, message);
    if bytes.is_empty() {
        return Err(fail(
            "the binary partition table is empty; give the partition-table.bin that ESP-IDF \
             built, or the CSV"
                .to_owned(),
        ));
    }
    let mut md5 = Md5::new();
    let mut partitions = Vec::new();
    let mut entry_number = 0;
    for (index, entry) in bytes.chunks(ENTRY).enumerate() {
        let at = index * ENTRY;
        if entry.len() < ENTRY {
            return Err(fail(format!(
                "the table is cut short: the file ends {} bytes into the entry at byte {at:#x}, \
                 before the end marker (32 bytes of 0xFF); the file is truncated, take the whole \
                 table",
                entry.len()
            )));
        }
        if entry.iter().all(|&b| b == 0xFF) {
            return Ok(PartitionTable { partitions });
        }
        // Like `gen_esp32part.py`, only the two magic bytes mark the MD5 entry.
        if entry[..2] == MD5_MAGIC {
            let computed = md5.finish();
            if entry[16..] != computed {
                return Err(fail(format!(
                    "the MD5 checksum at byte {at:#x} ({}) does not match the entries before it \
                     ({}); the table is corrupt or was edited after it was generated, so \
                     generate it again",
                    hex(&entry[16..]),
                    hex(&computed)
                )));
            }
            continue;
        }
        entry_number += 1;
        if entry[..2] != ENTRY_MAGIC {
            return Err(fail(format!(
                "entry {entry_number} at byte {at:#x} starts with {:#04x} {:#04x} instead of the \
                 partition entry magic 0xAA 0x50; this is not a partition table, or it is corrupt",
                entry[0], entry[1]
            )));
        }
        if partitions.len() == PartitionTable::MAX_PARTITIONS {
            // No need to read on: the table is refused anyway.
            return Err(fail(format!(
                "the table has more than {} partitions, the most a partition table can hold with \
                 its MD5 entry in 0xC00 bytes; remove partitions",
                PartitionTable::MAX_PARTITIONS
            )));
        }
        md5.update(entry);
        partitions.push(
            decode(entry).map_err(|message| {
                fail(format!("entry {entry_number} at byte {at:#x}: {message}"))
            })?,
        );
    }
    Err(fail(
        "the table has no end marker (32 bytes of 0xFF) after its entries; the file is \
         truncated or is not a partition table"
            .to_owned(),
    ))
}

fn decode(entry: &[u8]) -> Result<Partition, String> {
    let word =
        |at: usize| u32::from_le_bytes([entry[at], entry[at + 1], entry[at + 2], entry[at + 3]]);
    let raw_name = &entry[12..12 + NAME];
    let name_len = raw_name.iter().position(|&b| b == 0).unwrap_or(NAME);
    let name = std::str::from_utf8(&raw_name[..name_len])
        .map_err(|_| {
            "the partition name is not UTF-8; regenerate the table from a CSV saved as UTF-8"
                .to_owned()
        })?
        .to_owned();
    // Unknown flag bits are dropped: `gen_esp32part.py` only warns about them.
    let flags = word(28);
    Ok(Partition {
        name,
        kind: PartitionKind::from_byte(entry[2]),
        subtype: entry[3],
        offset: word(4),
        size: word(8),
        encrypted: flags & FLAG_ENCRYPTED != 0,
        readonly: flags & FLAG_READONLY != 0,
        line: None,
    })
}

pub(super) fn write(table: &PartitionTable) -> Vec<u8> {
    let mut out = Vec::with_capacity(PartitionTable::BINARY_SIZE);
    for p in &table.partitions {
        out.extend_from_slice(&ENTRY_MAGIC);
        out.push(p.kind.byte());
        out.push(p.subtype);
        out.extend_from_slice(&p.offset.to_le_bytes());
        out.extend_from_slice(&p.size.to_le_bytes());
        let mut name = [0u8; NAME];
        let cut = p.name.len().min(NAME);
        name[..cut].copy_from_slice(&p.name.as_bytes()[..cut]);
        out.extend_from_slice(&name);
        let mut flags = 0;
        if p.encrypted {
            flags |= FLAG_ENCRYPTED;
        }
        if p.readonly {
            flags |= FLAG_READONLY;
        }
        out.extend_from_slice(&flags.to_le_bytes());
    }
    let mut md5 = Md5::new();
    md5.update(&out);
    let digest = md5.finish();
    out.extend_from_slice(&MD5_MAGIC);
    out.extend_from_slice(&[0xFF; 14]);
    out.extend_from_slice(&digest);
    if out.len() < PartitionTable::BINARY_SIZE {
        out.resize(PartitionTable::BINARY_SIZE, 0xFF);
    }
    out
}
