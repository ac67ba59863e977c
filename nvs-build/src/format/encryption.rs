//! NVS encryption (spec §13): every written entry is its own XTS-AES-256 data unit, with the
//! entry's byte offset in the partition as the tweak. Page headers, bitmaps and unwritten
//! entries stay plaintext; CRCs are computed over the plaintext.

use std::fmt;

use aes::Aes256;
use aes::cipher::{Block, BlockDecrypt, BlockEncrypt, KeyInit};
use sha2::{Digest, Sha256};

use super::crc::nvs_crc32;
use super::layout::{
    BITMAP_OFFSET, ENTRIES_PER_PAGE, ENTRY_SIZE, EntryState, FIRST_ENTRY_OFFSET, PAGE_SIZE,
    bitmap_state,
};

/// Size of the `nvs_keys` partition image / key file.
pub const KEYS_IMAGE_SIZE: usize = 4096;

/// The 64-byte XTS key of an NVS partition: data key (eky) then tweak key (tky).
///
/// `Debug` never shows the key material.
#[derive(Clone, PartialEq, Eq)]
pub struct XtsKey([u8; 64]);

impl fmt::Debug for XtsKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("XtsKey(..)")
    }
}

/// Why key material was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyError {
    /// A key file shorter than the 64 key bytes.
    TooShort {
        /// The file's length in bytes.
        len: usize,
    },
    /// Both halves equal: XTS forbids it (the reference's crypto library refuses it too).
    EqualHalves,
    /// An empty HMAC key.
    EmptyHmacKey,
    /// The operating system's random number generator failed.
    Random(String),
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::TooShort { len } => write!(
                f,
                "the key file has {len} bytes; an NVS key file holds at least the 64 key bytes (it is normally a 4096-byte nvs_keys image)"
            ),
            KeyError::EqualHalves => f.write_str(
                "the data key and the tweak key are equal, which XTS forbids; generate a new key",
            ),
            KeyError::EmptyHmacKey => {
                f.write_str("the HMAC key file is empty; it must hold the 32-byte HMAC key")
            }
            KeyError::Random(e) => write!(f, "the system random number generator failed: {e}"),
        }
    }
}

impl std::error::Error for KeyError {}

/// A key read from a key file, and whether the file's CRC matched.
#[derive(Debug)]
pub struct KeyFile {
    /// The key (the file's first 64 bytes).
    pub key: XtsKey,
    /// False when the file's CRC at offset 64 does not match: the reference does not check it,
    /// but the device refuses such an nvs_keys partition.
    pub crc_ok: bool,
}

impl XtsKey {
    /// A key from 64 bytes: the data key first, then the tweak key.
    pub fn from_bytes(bytes: [u8; 64]) -> Result<XtsKey, KeyError> {
        if bytes[..32] == bytes[32..] {
            return Err(KeyError::EqualHalves);
        }
        Ok(XtsKey(bytes))
    }

    /// A fresh random key from the operating system's RNG.
    pub fn generate() -> Result<XtsKey, KeyError> {
        loop {
            let mut bytes = [0u8; 64];
            getrandom::fill(&mut bytes).map_err(|e| KeyError::Random(e.to_string()))?;
            if let Ok(key) = XtsKey::from_bytes(bytes) {
                return Ok(key);
            }
        }
    }

    /// The keys of the HMAC-based scheme: eky = HMAC-SHA256(hmac_key, 5A5ABEAE × 8),
    /// tky = HMAC-SHA256(hmac_key, A5A5DECE × 8), as the device derives them with its eFuse key.
    pub fn derive_from_hmac(hmac_key: &[u8]) -> Result<XtsKey, KeyError> {
        if hmac_key.is_empty() {
            return Err(KeyError::EmptyHmacKey);
        }
        let derive = |seed: [u8; 4]| -> [u8; 32] { hmac_sha256(hmac_key, &seed.repeat(8)) };
        let mut bytes = [0u8; 64];
        bytes[..32].copy_from_slice(&derive([0x5A, 0x5A, 0xBE, 0xAE]));
        bytes[32..].copy_from_slice(&derive([0xA5, 0xA5, 0xDE, 0xCE]));
        XtsKey::from_bytes(bytes)
    }

    /// Reads a key file: its first 64 bytes are the key, as in the reference.
    pub fn from_key_file(bytes: &[u8]) -> Result<KeyFile, KeyError> {
        if bytes.len() < 64 {
            return Err(KeyError::TooShort { len: bytes.len() });
        }
        let mut key = [0u8; 64];
        key.copy_from_slice(&bytes[..64]);
        let crc_ok = bytes.len() >= 68
            && u32::from_le_bytes([bytes[64], bytes[65], bytes[66], bytes[67]]) == nvs_crc32(&key);
        Ok(KeyFile {
            key: XtsKey::from_bytes(key)?,
            crc_ok,
        })
    }

    /// The 4096-byte `nvs_keys` image: key, CRC32 of the key, 0xFF.
    pub fn to_key_file(&self) -> Vec<u8> {
        let mut image = vec![0xFF; KEYS_IMAGE_SIZE];
        image[..64].copy_from_slice(&self.0);
        image[64..68].copy_from_slice(&nvs_crc32(&self.0).to_le_bytes());
        image
    }

    fn data_cipher(&self) -> Aes256 {
        Aes256::new_from_slice(&self.0[..32]).expect("32-byte AES-256 key")
    }

    fn tweak_cipher(&self) -> Aes256 {
        Aes256::new_from_slice(&self.0[32..]).expect("32-byte AES-256 key")
    }
}

/// HMAC-SHA256 (RFC 2104) over the `sha2` crate's SHA-256.
fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut padded = [0u8; BLOCK];
    if key.len() > BLOCK {
        padded[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        padded[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| padded.map(|k| k ^ byte);
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5C))
        .chain_update(inner)
        .finalize()
        .into()
}

/// Encrypts every written entry of a plaintext image in place.
///
/// This is XTS with one 32-byte data unit per entry, computed in batches: all tweaks in one
/// pass of the tweak cipher, then all data blocks in one pass of the data cipher, so AES-NI
/// can pipeline. The tests check it against the `xts-mode` crate, entry by entry.
pub fn encrypt_image(image: &mut [u8], key: &XtsKey) {
    let mut offsets = Vec::new();
    for_each_entry(image, |offset, _| offsets.push(offset));
    let mut tweaks: Vec<Block<Aes256>> = offsets
        .iter()
        .map(|&o| Block::<Aes256>::clone_from_slice(&(o as u128).to_le_bytes()))
        .collect();
    key.tweak_cipher().encrypt_blocks(&mut tweaks);
    let mut blocks: Vec<Block<Aes256>> = Vec::with_capacity(2 * offsets.len());
    for (&offset, t0) in offsets.iter().zip(&tweaks) {
        let t1 = mul_alpha(t0);
        for (half, t) in [t0, &t1].into_iter().enumerate() {
            let at = offset + 16 * half;
            let mut block = Block::<Aes256>::clone_from_slice(&image[at..at + 16]);
            xor_into(&mut block, t);
            blocks.push(block);
        }
    }
    key.data_cipher().encrypt_blocks(&mut blocks);
    for ((&offset, t0), pair) in offsets.iter().zip(&tweaks).zip(blocks.chunks_exact(2)) {
        let t1 = mul_alpha(t0);
        for (half, (block, t)) in pair.iter().zip([t0, &t1]).enumerate() {
            let at = offset + 16 * half;
            let mut out = *block;
            xor_into(&mut out, t);
            image[at..at + 16].copy_from_slice(&out);
        }
    }
}

fn xor_into(block: &mut Block<Aes256>, tweak: &Block<Aes256>) {
    for (b, t) in block.iter_mut().zip(tweak.iter()) {
        *b ^= t;
    }
}

/// Multiplication by α in GF(2^128), XTS's little-endian convention: the next block's tweak.
fn mul_alpha(tweak: &Block<Aes256>) -> Block<Aes256> {
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(tweak);
    let value = u128::from_le_bytes(bytes);
    let carry = (value >> 127) as u8;
    let mut next = (value << 1).to_le_bytes();
    next[0] ^= 0x87 * carry;
    Block::<Aes256>::clone_from_slice(&next)
}

/// Decrypts every non-empty entry of an encrypted image in place, each by its true offset, so
/// images read back from a device (entries not contiguous) decrypt correctly too.
pub fn decrypt_image(image: &mut [u8], key: &XtsKey) {
    let (data, tweak) = (key.data_cipher(), key.tweak_cipher());
    for_each_entry(image, |offset, entry| {
        // An entry is two whole AES blocks: XTS without ciphertext stealing.
        let mut t = Block::<Aes256>::clone_from_slice(&(offset as u128).to_le_bytes());
        tweak.encrypt_block(&mut t);
        for half in entry.chunks_exact_mut(16) {
            let mut block = Block::<Aes256>::clone_from_slice(half);
            xor_into(&mut block, &t);
            data.decrypt_block(&mut block);
            xor_into(&mut block, &t);
            half.copy_from_slice(&block);
            t = mul_alpha(&t);
        }
    });
}

/// Calls `f` with the partition offset and bytes of every entry whose bitmap state is not
/// EMPTY, on every page that has a header.
fn for_each_entry(image: &mut [u8], mut f: impl FnMut(usize, &mut [u8])) {
    for (page_index, page) in image.chunks_exact_mut(PAGE_SIZE).enumerate() {
        if page[..4] == [0xFF; 4] {
            continue;
        }
        let (head, entries) = page.split_at_mut(FIRST_ENTRY_OFFSET);
        let bitmap = &head[BITMAP_OFFSET..BITMAP_OFFSET + 32];
        for (i, entry) in entries
            .chunks_exact_mut(ENTRY_SIZE)
            .take(ENTRIES_PER_PAGE)
            .enumerate()
        {
            if bitmap_state(bitmap, i) != EntryState::Empty {
                f(
                    page_index * PAGE_SIZE + FIRST_ENTRY_OFFSET + i * ENTRY_SIZE,
                    entry,
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::hex;

    #[test]
    fn fixed_key_file_crc() {
        let mut bytes = [0x11u8; 64];
        bytes[32..].fill(0x22);
        let file = XtsKey::from_bytes(bytes).unwrap().to_key_file();
        assert_eq!(
            u32::from_le_bytes(file[64..68].try_into().unwrap()),
            0x3CCF_EF2C
        );
        assert!(XtsKey::from_key_file(&file).unwrap().crc_ok);
    }

    #[test]
    fn hmac_derivation_matches_the_spec() {
        let hmac_key: Vec<u8> = (0..32).collect();
        let key = XtsKey::derive_from_hmac(&hmac_key).unwrap();
        let h = hex(&key.0);
        assert!(h.starts_with("813a1412") && h[56..64].eq("2b6a025c"), "{h}");
        assert!(
            h[64..].starts_with("b20ad6b6") && h.ends_with("8408addf"),
            "{h}"
        );
    }

    #[test]
    fn batched_encryption_equals_xts_mode_per_entry() {
        let mut bytes = [0u8; 64];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (i * 37 + 11) as u8;
        }
        let key = XtsKey::from_bytes(bytes).unwrap();
        // Pages with every entry written, so tweaks cover many offsets (and page indexes > 16).
        let mut image = vec![0u8; 20 * PAGE_SIZE];
        for (i, page) in image.chunks_exact_mut(PAGE_SIZE).enumerate() {
            page[..4].copy_from_slice(&0xFFFF_FFFEu32.to_le_bytes());
            page[32..64].fill(0xAA);
            page[64..]
                .iter_mut()
                .enumerate()
                .for_each(|(j, b)| *b = (i * 7 + j) as u8);
        }
        let plain = image.clone();
        let mut batched = image.clone();
        encrypt_image(&mut batched, &key);
        let xts = xts_mode::Xts128::new(key.data_cipher(), key.tweak_cipher());
        for_each_entry(&mut image, |offset, entry| {
            xts.encrypt_sector(entry, (offset as u128).to_le_bytes())
        });
        assert_eq!(batched, image);
        decrypt_image(&mut batched, &key);
        assert_eq!(batched, plain);
    }

    #[test]
    fn hmac_equals_the_hmac_crate() {
        use hmac::{Hmac, Mac};
        for key_len in [0, 1, 32, 63, 64, 65, 200] {
            let key: Vec<u8> = (0..key_len).map(|i| (i * 13 + 5) as u8).collect();
            for message in [&b""[..], b"abc", &[0x5A; 100]] {
                let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&key).unwrap();
                mac.update(message);
                let expected: [u8; 32] = mac.finalize().into_bytes().into();
                assert_eq!(hmac_sha256(&key, message), expected, "key {key_len}");
            }
        }
    }

    #[test]
    fn refusals() {
        assert_eq!(XtsKey::from_bytes([7; 64]), Err(KeyError::EqualHalves));
        assert!(matches!(
            XtsKey::from_key_file(&[1; 63]),
            Err(KeyError::TooShort { len: 63 })
        ));
        assert_eq!(XtsKey::derive_from_hmac(&[]), Err(KeyError::EmptyHmacKey));
        assert_eq!(format!("{:?}", XtsKey::generate().unwrap()), "XtsKey(..)");
    }
}
