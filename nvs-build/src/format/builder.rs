//! The writer: lays items out on pages exactly as Espressif's generator does (spec §9).

use std::collections::HashSet;
use std::hash::{BuildHasherDefault, Hasher};

use super::crc::{entry_crc, nvs_crc32};
use super::error::FormatError;
use super::layout::{
    BITMAP_OFFSET, CHUNK_ANY, ENTRIES_PER_PAGE, ENTRY_SIZE, FIRST_ENTRY_OFFSET, ItemType,
    MAX_BLOB_CHUNKS, MAX_BLOB_SIZE_V1, MAX_BLOB_SIZE_V2, MAX_KEY_LEN, MAX_NAMESPACES,
    MAX_STRING_SIZE_DEVICE, MAX_STRING_SIZE_V1, MAX_STRING_SIZE_V2, PAGE_SIZE, PageState, Version,
    data_entries,
};
use super::value::Value;
use super::wifi::WifiState;

/// The geometry of a partition: how many pages it has and whether it is a read-only one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartitionSize {
    size: u64,
}

impl PartitionSize {
    /// Checks a partition size in bytes: a non-zero multiple of 4096.
    ///
    /// Sizes of one or two pages are read-only partitions (the partition table must flag them
    /// `readonly`); from three pages on, the last page stays free for the device.
    pub fn new(size: u64) -> Result<PartitionSize, FormatError> {
        if size == 0 {
            return Err(FormatError::SizeZero);
        }
        if size % PAGE_SIZE as u64 != 0 {
            return Err(FormatError::SizeNotPageMultiple { size });
        }
        if size > u64::from(u32::MAX) + 1 {
            return Err(FormatError::SizeTooLarge { size });
        }
        Ok(PartitionSize { size })
    }

    /// The size in bytes.
    pub fn bytes(self) -> u64 {
        self.size
    }

    /// The number of 4096-byte pages.
    pub fn pages(self) -> usize {
        (self.size / PAGE_SIZE as u64) as usize
    }

    /// Partitions under three pages can only be read-only: the device needs a free page to write.
    pub fn is_read_only(self) -> bool {
        self.pages() < 3
    }

    /// Pages that may hold data: all of a read-only partition, all but the reserved last page
    /// otherwise.
    pub fn data_pages(self) -> usize {
        if self.is_read_only() {
            self.pages()
        } else {
            self.pages() - 1
        }
    }

    /// The smallest read/write partition that holds `pages` data pages.
    pub fn min_size_for(pages: usize) -> u64 {
        ((pages.max(2) + 1) * PAGE_SIZE) as u64
    }
}

/// Builds one NVS image, item by item, in the order given.
///
/// ```
/// use nvs_build::format::{ImageBuilder, PartitionSize, Value, Version};
/// let mut image = ImageBuilder::new(Version::V2);
/// image.namespace("mass_prod")?;
/// image.add("ProductID", Value::String("12345".into()))?;
/// image.add("hw_rev", Value::U8(3))?;
/// let bytes = image.finish(PartitionSize::new(0x6000)?)?;
/// assert_eq!(bytes.len(), 0x6000);
/// # Ok::<(), nvs_build::format::FormatError>(())
/// ```
#[derive(Clone, Debug)]
pub struct ImageBuilder {
    version: Version,
    /// Pages started so far; the last one is the current page.
    pages: Vec<u8>,
    /// Next free entry of the current page (0..=126).
    cursor: usize,
    /// Namespace names; index `i` is namespace number `i + 1`.
    namespaces: Vec<String>,
    /// Keys written so far, as namespace index + key bytes.
    keys: HashSet<KeyId, BuildHasherDefault<KeyIdHasher>>,
    wifi: WifiState,
    /// Version 2 strings may be as long as the device allows (4000 bytes with the NUL), not
    /// only as long as the reference can lay out (3968).
    device_strings: bool,
}

/// A namespace index and a key (at most 15 bytes, zero-padded) in one number.
type KeyId = u128;

fn key_id(ns: u8, key: &str) -> KeyId {
    let mut id = [0u8; 16];
    id[0] = ns;
    id[1..=key.len()].copy_from_slice(key.as_bytes());
    u128::from_le_bytes(id)
}

/// A multiplicative hash of the 128-bit key ids: keys are short and not attacker-chosen, so
/// SipHash's cost buys nothing here.
#[derive(Default)]
struct KeyIdHasher(u64);

impl Hasher for KeyIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write_u128(&mut self, id: u128) {
        let folded = (id as u64) ^ ((id >> 64) as u64).rotate_left(29);
        self.0 = folded.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (folded >> 32);
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

impl ImageBuilder {
    /// Starts an image. Page 0 exists from the start, as in the reference, even if nothing is
    /// ever added.
    pub fn new(version: Version) -> ImageBuilder {
        ImageBuilder::with_capacity(version, 2 * PAGE_SIZE)
    }

    /// Like [`ImageBuilder::new`], reserving `bytes` up front (the partition size, typically).
    pub fn with_capacity(version: Version, bytes: usize) -> ImageBuilder {
        let mut builder = ImageBuilder {
            version,
            pages: Vec::with_capacity(bytes.max(PAGE_SIZE)),
            cursor: 0,
            namespaces: Vec::new(),
            keys: HashSet::with_capacity_and_hasher(64, BuildHasherDefault::default()),
            wifi: WifiState::default(),
            device_strings: false,
        };
        builder.open_page();
        builder
    }

    /// The format version the image is built for.
    pub fn version(&self) -> Version {
        self.version
    }

    /// Accepts version 2 strings up to the device's limit (3999 bytes plus the NUL: a header
    /// and 125 data entries, a whole page). Espressif's generator crashes on strings of
    /// 3968–3999 bytes, so there is no reference for them; such a string starts a new page
    /// unless the current one is empty. Leave this off where bytes must equal the reference
    /// (the CSV drop-in).
    pub fn allow_device_string_lengths(&mut self, allow: bool) {
        self.device_strings = allow;
    }

    /// Pages started so far (at least 1).
    pub fn pages_used(&self) -> usize {
        self.pages.len() / PAGE_SIZE
    }

    /// Entries used so far: all of every earlier page (a page is closed when the next item
    /// does not fit) plus those of the current page.
    pub fn entries_used(&self) -> usize {
        (self.pages_used() - 1) * ENTRIES_PER_PAGE + self.cursor
    }

    /// The namespace that items are written into, if any.
    pub fn current_namespace(&self) -> Option<&str> {
        self.namespaces.last().map(String::as_str)
    }

    /// Opens namespace `name`: a new namespace gets the next index and an entry in the
    /// namespace table. Naming the current namespace again is allowed and writes nothing;
    /// going back to an earlier one is refused (the reference would not switch, quirk Q1).
    pub fn namespace(&mut self, name: &str) -> Result<(), FormatError> {
        check_key(name).map_err(|e| match e {
            FormatError::KeyTooLong { key } => FormatError::NamespaceTooLong { name: key },
            other => other,
        })?;
        if let Some(existing) = self.namespaces.iter().position(|n| n == name) {
            if existing + 1 == self.namespaces.len() {
                return Ok(());
            }
            return Err(FormatError::NamespaceReselected {
                name: name.to_owned(),
                current: self.namespaces.last().cloned().unwrap_or_default(),
            });
        }
        if self.namespaces.len() >= MAX_NAMESPACES {
            return Err(FormatError::TooManyNamespaces {
                name: name.to_owned(),
            });
        }
        self.namespaces.push(name.to_owned());
        let index = self.namespaces.len() as u8;
        self.write_primitive(0, name, &Value::U8(index));
        Ok(())
    }

    /// Adds an item to the current namespace.
    pub fn add(&mut self, key: &str, value: Value) -> Result<(), FormatError> {
        let text = value.source_text();
        self.add_with_source_text(key, value, &text)
    }

    /// Adds an item, telling the builder the text it was written as in the source (a CSV
    /// `value` cell). The reference derives its automatic Wi-Fi entries from that text.
    pub fn add_with_source_text(
        &mut self,
        key: &str,
        value: Value,
        source_text: &str,
    ) -> Result<(), FormatError> {
        self.add_item(key, value, Some(source_text))
    }

    /// Adds an item exactly as given, without the reference's automatic Wi-Fi entries (for
    /// re-creating an image from what a reader found in it).
    pub fn add_verbatim(&mut self, key: &str, value: Value) -> Result<(), FormatError> {
        self.add_item(key, value, None)
    }

    fn add_item(
        &mut self,
        key: &str,
        value: Value,
        wifi_text: Option<&str>,
    ) -> Result<(), FormatError> {
        check_key(key)?;
        let ns = self.namespaces.len() as u8;
        if ns == 0 {
            return Err(FormatError::NoNamespace {
                key: key.to_owned(),
            });
        }
        let extras = match wifi_text {
            Some(text) if WifiState::is_trigger(key) => {
                let mut wifi = self.wifi.clone();
                let extras = wifi.extras_for(key, text);
                Some((wifi, extras))
            }
            _ => None,
        };
        let Some((wifi, extras)) = extras else {
            self.check_size(key, &value)?;
            if !self.keys.insert(key_id(ns, key)) {
                return Err(self.duplicate(ns, key));
            }
            self.write_item(ns, key, &value);
            return Ok(());
        };
        let mut items: Vec<(&str, Value)> = Vec::with_capacity(4);
        items.extend(extras.before.into_iter().map(|(k, v)| (k, Value::Blob(v))));
        items.push((key, value));
        items.extend(extras.after.into_iter().map(|(k, v)| (k, Value::Blob(v))));
        // Check everything before writing anything, so an error leaves the image unchanged.
        for (i, (key, value)) in items.iter().enumerate() {
            let earlier: Vec<&str> = items[..i].iter().map(|(k, _)| *k).collect();
            self.check_fresh(ns, key, &earlier)?;
            self.check_size(key, value)?;
        }
        self.wifi = wifi;
        for (key, value) in items {
            self.write_item(ns, key, &value);
            self.keys.insert(key_id(ns, key));
        }
        Ok(())
    }

    /// Finishes the image for a partition of `size`: read/write partitions come out exactly
    /// `size` bytes long with unused pages erased (0xFF); read-only partitions (one or two
    /// pages) contain only the pages used, as the reference writes them.
    pub fn finish(self, size: PartitionSize) -> Result<Vec<u8>, FormatError> {
        let used = self.pages_used();
        if used > size.data_pages() {
            return Err(FormatError::PartitionTooSmall {
                size: size.bytes(),
                pages_needed: used,
                min_size: PartitionSize::min_size_for(used),
            });
        }
        let mut bytes = self.pages;
        if !size.is_read_only() {
            bytes.resize(size.bytes() as usize, 0xFF);
        }
        Ok(bytes)
    }

    /// Refuses a key already written in namespace `ns` (or about to be, in `pending`).
    fn check_fresh(&self, ns: u8, key: &str, pending: &[&str]) -> Result<(), FormatError> {
        if self.keys.contains(&key_id(ns, key)) || pending.contains(&key) {
            return Err(self.duplicate(ns, key));
        }
        Ok(())
    }

    fn duplicate(&self, ns: u8, key: &str) -> FormatError {
        FormatError::DuplicateKey {
            namespace: self.namespaces[ns as usize - 1].clone(),
            key: key.to_owned(),
        }
    }

    fn check_size(&self, key: &str, value: &Value) -> Result<(), FormatError> {
        match (value, self.version) {
            (Value::String(s), version) => {
                let len = s.len() + 1;
                let max = match version {
                    Version::V1 => MAX_STRING_SIZE_V1,
                    Version::V2 if self.device_strings => MAX_STRING_SIZE_DEVICE,
                    Version::V2 => MAX_STRING_SIZE_V2,
                };
                if len > max {
                    return Err(FormatError::StringTooLong {
                        key: key.to_owned(),
                        len,
                        max,
                    });
                }
            }
            (Value::Blob(b), Version::V1) if b.len() > MAX_BLOB_SIZE_V1 => {
                return Err(FormatError::BlobTooLongV1 {
                    key: key.to_owned(),
                    len: b.len(),
                });
            }
            (Value::Blob(b), Version::V2)
                if b.len() > MAX_BLOB_SIZE_V2
                    || blob_chunk_count(self.cursor, b.len()) > MAX_BLOB_CHUNKS + 1 =>
            {
                return Err(FormatError::BlobTooLong {
                    key: key.to_owned(),
                    len: b.len(),
                });
            }
            _ => {}
        }
        Ok(())
    }

    fn write_item(&mut self, ns: u8, key: &str, value: &Value) {
        match value {
            Value::String(s) => {
                let mut data = Vec::with_capacity(s.len() + 1);
                data.extend_from_slice(s.as_bytes());
                data.push(0);
                self.write_single_page(ns, ItemType::Str, key, &data);
            }
            Value::Blob(data) => match self.version {
                Version::V1 => self.write_single_page(ns, ItemType::Blob, key, data),
                Version::V2 => self.write_blob_v2(ns, key, data),
            },
            primitive => self.write_primitive(ns, key, primitive),
        }
    }

    fn write_primitive(&mut self, ns: u8, key: &str, value: &Value) {
        let Some((ty, data, _)) = value.primitive() else {
            unreachable!("write_primitive takes primitives only")
        };
        if self.cursor == ENTRIES_PER_PAGE {
            self.open_page();
        }
        self.write_entry(&entry(ns, ty, 1, CHUNK_ANY, key, data));
    }

    /// Strings and version 1 blobs: header plus data on one page. The reference opens a new
    /// page when `cursor + span >= 126`, so such an item never ends on entry 125.
    fn write_single_page(&mut self, ns: u8, ty: ItemType, key: &str, data: &[u8]) {
        let span = 1 + data_entries(data.len());
        if span == ENTRIES_PER_PAGE {
            // Only strings beyond the reference's limit: they take a whole page.
            if self.cursor != 0 {
                self.open_page();
            }
        } else if self.cursor + span >= ENTRIES_PER_PAGE {
            self.open_page();
        }
        let header = entry(ns, ty, span as u8, CHUNK_ANY, key, sized_data(data));
        self.write_entry(&header);
        self.write_data(data);
    }

    /// Version 2 blobs: split into chunks that fill each page's remaining entries (a chunk may be
    /// empty), followed by the index.
    fn write_blob_v2(&mut self, ns: u8, key: &str, data: &[u8]) {
        if self.cursor == ENTRIES_PER_PAGE {
            self.open_page();
        }
        let mut offset = 0;
        let mut chunk_index = 0u8;
        loop {
            let tail = (ENTRIES_PER_PAGE - self.cursor - 1) * ENTRY_SIZE;
            let chunk = &data[offset..offset + tail.min(data.len() - offset)];
            let span = 1 + data_entries(chunk.len());
            let header = entry(
                ns,
                ItemType::BlobData,
                span as u8,
                chunk_index,
                key,
                sized_data(chunk),
            );
            self.write_entry(&header);
            self.write_data(chunk);
            chunk_index += 1;
            offset += chunk.len();
            let remaining = data.len() - offset;
            if remaining > 0 || tail - chunk.len() < ENTRY_SIZE {
                self.open_page();
            }
            if remaining == 0 {
                break;
            }
        }
        let mut index_data = [0xFFu8; 8];
        index_data[..4].copy_from_slice(&(data.len() as u32).to_le_bytes());
        index_data[4] = chunk_index;
        index_data[5] = 0;
        self.write_entry(&entry(
            ns,
            ItemType::BlobIndex,
            1,
            CHUNK_ANY,
            key,
            index_data,
        ));
    }

    fn open_page(&mut self) {
        let page_count = self.pages_used();
        if page_count > 0 {
            let start = (page_count - 1) * PAGE_SIZE;
            let state = &mut self.pages[start..start + 4];
            if *state == PageState::ACTIVE.to_le_bytes() {
                state.copy_from_slice(&PageState::FULL.to_le_bytes());
            }
        }
        let start = self.pages.len();
        self.pages.resize(start + PAGE_SIZE, 0xFF);
        let header = &mut self.pages[start..start + 32];
        header[0..4].copy_from_slice(&PageState::ACTIVE.to_le_bytes());
        header[4..8].copy_from_slice(&(page_count as u32).to_le_bytes());
        header[8] = self.version.header_byte();
        let crc = nvs_crc32(&header[4..28]);
        header[28..32].copy_from_slice(&crc.to_le_bytes());
        self.cursor = 0;
    }

    /// Writes one 32-byte entry at the cursor and marks it WRITTEN in the bitmap.
    fn write_entry(&mut self, bytes: &[u8; ENTRY_SIZE]) {
        let page = self.pages.len() - PAGE_SIZE;
        let at = page + FIRST_ENTRY_OFFSET + self.cursor * ENTRY_SIZE;
        self.pages[at..at + ENTRY_SIZE].copy_from_slice(bytes);
        self.pages[page + BITMAP_OFFSET + self.cursor / 4] &= !(1u8 << (2 * (self.cursor % 4)));
        self.cursor += 1;
    }

    /// Writes data bytes into consecutive entries; the tail of the last one stays 0xFF.
    fn write_data(&mut self, data: &[u8]) {
        for piece in data.chunks(ENTRY_SIZE) {
            let mut bytes = [0xFFu8; ENTRY_SIZE];
            bytes[..piece.len()].copy_from_slice(piece);
            self.write_entry(&bytes);
        }
    }
}

/// Keys are ASCII (see [`FormatError::KeyNotAscii`]) without NUL, and at most 15 bytes.
fn check_key(key: &str) -> Result<(), FormatError> {
    if key.contains('\0') {
        return Err(FormatError::KeyHasNul {
            key: key.to_owned(),
        });
    }
    if !key.is_ascii() {
        return Err(FormatError::KeyNotAscii {
            key: key.to_owned(),
        });
    }
    if key.len() > MAX_KEY_LEN {
        return Err(FormatError::KeyTooLong {
            key: key.to_owned(),
        });
    }
    Ok(())
}

/// Data field of a string or blob header: size, reserved 0xFFFF, CRC of the data.
fn sized_data(data: &[u8]) -> [u8; 8] {
    let mut field = [0xFFu8; 8];
    field[..2].copy_from_slice(&(data.len() as u16).to_le_bytes());
    field[4..].copy_from_slice(&nvs_crc32(data).to_le_bytes());
    field
}

fn entry(ns: u8, ty: ItemType, span: u8, chunk: u8, key: &str, data: [u8; 8]) -> [u8; 32] {
    let mut bytes = [0u8; 32];
    bytes[0] = ns;
    bytes[1] = ty.code();
    bytes[2] = span;
    bytes[3] = chunk;
    bytes[8..8 + key.len()].copy_from_slice(key.as_bytes());
    bytes[24..32].copy_from_slice(&data);
    let crc = entry_crc(&bytes);
    bytes[4..8].copy_from_slice(&crc.to_le_bytes());
    bytes
}

/// How many chunks a version 2 blob of `len` bytes gets when it starts at entry `cursor`.
fn blob_chunk_count(mut cursor: usize, len: usize) -> usize {
    if cursor == ENTRIES_PER_PAGE {
        cursor = 0;
    }
    let mut remaining = len;
    let mut chunks = 0;
    loop {
        let tail = (ENTRIES_PER_PAGE - cursor - 1) * ENTRY_SIZE;
        let chunk = tail.min(remaining);
        remaining -= chunk;
        chunks += 1;
        if remaining == 0 {
            return chunks;
        }
        cursor = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_image_has_one_active_page() {
        let image = ImageBuilder::new(Version::V2)
            .finish(PartitionSize::new(0x3000).unwrap())
            .unwrap();
        assert_eq!(image.len(), 0x3000);
        assert_eq!(&image[0..4], &[0xFE, 0xFF, 0xFF, 0xFF]);
        assert_eq!(
            u32::from_le_bytes(image[28..32].try_into().unwrap()),
            0xB9BA_2D84
        );
        assert!(image[0x1000..].iter().all(|&b| b == 0xFF));
    }

    #[test]
    fn header_crcs_match_spec_table() {
        let mut b = ImageBuilder::new(Version::V1);
        b.open_page();
        b.open_page();
        let crc = |p: usize| {
            u32::from_le_bytes(b.pages[p * 4096 + 28..p * 4096 + 32].try_into().unwrap())
        };
        assert_eq!(
            [crc(0), crc(1), crc(2)],
            [0xDCDD_16C2, 0x5DF8_73E5, 0x05E6_DACD]
        );
    }

    #[test]
    fn refusals() {
        let mut b = ImageBuilder::new(Version::V2);
        assert!(matches!(
            b.add("k", Value::U8(1)),
            Err(FormatError::NoNamespace { .. })
        ));
        b.namespace("a").unwrap();
        b.namespace("a").unwrap();
        b.namespace("b").unwrap();
        assert!(matches!(
            b.namespace("a"),
            Err(FormatError::NamespaceReselected { .. })
        ));
        b.add("k", Value::U8(1)).unwrap();
        assert!(matches!(
            b.add("k", Value::U8(1)),
            Err(FormatError::DuplicateKey { .. })
        ));
        assert!(matches!(b.add("keyof16charssss", Value::U8(1)), Ok(())));
        assert!(matches!(
            b.add("keyof16charsssss", Value::U8(1)),
            Err(FormatError::KeyTooLong { .. })
        ));
        let mut other = ImageBuilder::new(Version::V2);
        let e = other.namespace("a_twenty_char_namesp").unwrap_err();
        assert!(matches!(e, FormatError::NamespaceTooLong { .. }));
        assert!(
            e.to_string()
                .starts_with("namespace `a_twenty_char_namesp` is 20 bytes long"),
            "{e}"
        );
        assert!(matches!(
            b.add("ké", Value::U8(1)),
            Err(FormatError::KeyNotAscii { .. })
        ));
        let long = "x".repeat(3967);
        b.add("s", Value::String(long.clone())).unwrap();
        assert!(matches!(
            b.add("s2", Value::String(long + "x")),
            Err(FormatError::StringTooLong { .. })
        ));
    }
}
