/// The CRC-32 variant used everywhere in NVS: reflected polynomial 0xEDB88320 with the
/// register seeded so that it matches `zlib.crc32(data, 0xFFFFFFFF)` in Python and
/// `esp_rom_crc32_le(0xFFFFFFFF, …)` on the device. It is *not* plain CRC-32.
pub fn nvs_crc32(data: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new_with_initial(0xFFFF_FFFF);
    hasher.update(data);
    hasher.finalize()
}

/// CRC of an entry: bytes 0..4 and 8..32, skipping the CRC field itself.
pub(crate) fn entry_crc(entry: &[u8; 32]) -> u32 {
    // One contiguous update: for 28 bytes the per-call overhead dominates.
    let mut covered = [0u8; 28];
    covered[..4].copy_from_slice(&entry[0..4]);
    covered[4..].copy_from_slice(&entry[8..32]);
    nvs_crc32(&covered)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variant_check_value() {
        assert_eq!(nvs_crc32(b"123456789"), 0xD202_D277);
        assert_eq!(nvs_crc32(b""), 0xFFFF_FFFF);
        assert_eq!(nvs_crc32(&[0u8; 24]), 0xFFFF_FFFF);
    }
}
