//! A tiny ELF with a defmt table (what `defmt` puts in firmware: a `.defmt` section whose
//! symbols are the format strings, their addresses the frame indices), and the frames an
//! application sends with esp-println's `defmt-espflash` (`0xFF 0x00`, rzcobs, `0x00`), for
//! testing the monitor without a real defmt firmware.

use object::write::{Object, Symbol, SymbolSection};
use object::{
    Architecture, BinaryFormat, Endianness, SectionKind, SymbolFlags, SymbolKind, SymbolScope,
};

/// `(index, level tag, format string)` of the test table.
pub const MESSAGES: &[(u16, &str, &str)] = &[
    (0, "defmt_info", "app booted: serial {=u32}, hw_rev {=u8}"),
    (1, "defmt_warn", "user data is empty"),
];

/// The ELF bytes.
pub fn elf() -> Vec<u8> {
    let mut obj = Object::new(BinaryFormat::Elf, Architecture::Riscv32, Endianness::Little);
    let section = obj.add_section(Vec::new(), b".defmt".to_vec(), SectionKind::Other);
    obj.append_section_data(section, &[0u8; 16], 1);
    for (index, tag, format) in MESSAGES {
        let name = format!(
            r#"{{"package":"fw","tag":"{tag}","data":"{format}","disambiguator":"{index}","crate_name":"fw"}}"#
        );
        obj.add_symbol(Symbol {
            name: name.into_bytes(),
            value: u64::from(*index),
            size: 1,
            kind: SymbolKind::Data,
            scope: SymbolScope::Compilation,
            weak: false,
            section: SymbolSection::Section(section),
            flags: SymbolFlags::None,
        });
    }
    for marker in ["_defmt_version_ = 4", "_defmt_encoding_ = rzcobs"] {
        obj.add_symbol(Symbol {
            name: marker.as_bytes().to_vec(),
            value: 1,
            size: 0,
            kind: SymbolKind::Data,
            scope: SymbolScope::Compilation,
            weak: false,
            section: SymbolSection::Absolute,
            flags: SymbolFlags::None,
        });
    }
    obj.write().expect("write the test ELF")
}

/// rzcobs of `message` (7-byte groups, each with at least one zero byte, which the test
/// frames have).
fn rzcobs(message: &[u8]) -> Vec<u8> {
    let mut padded = message.to_vec();
    padded.resize(message.len().div_ceil(7) * 7, 0);
    // The decoder reads backwards: build its input reversed, then turn it around.
    let reversed: Vec<u8> = padded.iter().rev().copied().collect();
    let mut stream = Vec::new();
    for group in reversed.chunks(7) {
        let mut mask = 0u8;
        for (i, &b) in group.iter().enumerate() {
            if b == 0 {
                mask |= 1 << (6 - i);
            }
        }
        assert!(mask != 0, "test frames need a zero in every 7-byte group");
        stream.push(mask);
        stream.extend(group.iter().filter(|&&b| b != 0));
    }
    stream.reverse();
    stream
}

/// One frame on the wire.
pub fn frame(index: u16, args: &[u8]) -> Vec<u8> {
    let mut message = index.to_le_bytes().to_vec();
    message.extend_from_slice(args);
    let mut wire = vec![0xFF, 0x00];
    wire.extend(rzcobs(&message));
    wire.push(0x00);
    wire
}

/// A boot log: the ROM's text, the app's text, then two defmt frames.
pub fn boot_log() -> Vec<u8> {
    let mut log = b"ESP-ROM:esp32c3-api1-20210207\r\nrst:0x1 (POWERON),boot:0xc (SPI_FAST_FLASH_BOOT)\r\nI (42) app: factory data read\r\n".to_vec();
    let mut args = 4242u32.to_le_bytes().to_vec();
    args.push(3);
    log.extend(frame(0, &args));
    log.extend(frame(1, &[]));
    log.extend_from_slice(b"plain text after the frames\r\n");
    log
}
