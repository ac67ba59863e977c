//! Geometry and codes of the on-flash format (spec §2–§6).

/// Size of a flash page (and of an NVS page) in bytes.
pub const PAGE_SIZE: usize = 4096;
/// Size of an entry in bytes.
pub const ENTRY_SIZE: usize = 32;
/// Entries in a page, after its 32-byte header and 32-byte entry-state bitmap.
pub const ENTRIES_PER_PAGE: usize = 126;
/// Byte offset of the first entry in a page.
pub const FIRST_ENTRY_OFFSET: usize = 64;
pub(crate) const BITMAP_OFFSET: usize = 32;
/// Longest key or namespace name, in bytes (the entry's 16-byte key field keeps a NUL).
pub const MAX_KEY_LEN: usize = 15;
/// Namespace indexes 1..=254; 0 is the namespace table and 255 means "any" on the device.
pub const MAX_NAMESPACES: usize = 254;
/// Longest string (bytes including the NUL) the reference lays out under version 2: span 125
/// is the most its `e + span >= 126` fit rule allows, even on an empty page.
pub const MAX_STRING_SIZE_V2: usize = 3968;
/// Longest string (bytes including the NUL) the device stores: a header and 125 data entries,
/// a whole page (ESP-IDF's `Page::CHUNK_MAX_SIZE`). The reference cannot lay out strings above
/// [`MAX_STRING_SIZE_V2`]; metadata may ask for the device's limit.
pub const MAX_STRING_SIZE_DEVICE: usize = 4000;
/// Longest string (including NUL) under version 1, the reference's declared limit.
pub const MAX_STRING_SIZE_V1: usize = 1984;
/// Longest legacy (version 1) blob.
pub const MAX_BLOB_SIZE_V1: usize = 1984;
/// The device erases a blob index whose size exceeds 127 chunks of 125 entries.
pub(crate) const MAX_BLOB_SIZE_V2: usize = 127 * 125 * 32;
/// Chunk indexes of the first family must stay below 0x80, where the second family starts.
pub(crate) const MAX_BLOB_CHUNKS: usize = 0x7F;
pub(crate) const CHUNK_ANY: u8 = 0xFF;

/// NVS format version, as the page header's version byte counts down.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Version {
    /// Legacy: blobs are single-page `BLOB` items of at most 1984 bytes.
    V1,
    /// Multi-page blobs (`BLOB_DATA` chunks plus a `BLOB_IDX`). The reference's default.
    V2,
}

impl Version {
    /// The page header's version byte (0xFF for version 1, 0xFE for version 2).
    pub fn header_byte(self) -> u8 {
        match self {
            Version::V1 => 0xFF,
            Version::V2 => 0xFE,
        }
    }

    /// The version a page header's version byte stands for; `None` for an unknown byte.
    pub fn from_header_byte(byte: u8) -> Option<Version> {
        match byte {
            0xFF => Some(Version::V1),
            0xFE => Some(Version::V2),
            _ => None,
        }
    }

    /// The version's number, 1 or 2, as `--version` and the metadata's `version` spell it.
    pub fn number(self) -> u8 {
        match self {
            Version::V1 => 1,
            Version::V2 => 2,
        }
    }
}

/// Page state word at offset 0 of the header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageState {
    /// All 0xFF: a free page.
    Uninitialized,
    /// Being written.
    Active,
    /// Full: the device writes no more into it.
    Full,
    /// Being copied elsewhere by the device (an interrupted garbage collection).
    Freeing,
    /// Marked corrupt by the device.
    Corrupt,
    /// Any other state word.
    Invalid(u32),
}

impl PageState {
    /// The state word of an active page.
    pub const ACTIVE: u32 = 0xFFFF_FFFE;
    /// The state word of a full page.
    pub const FULL: u32 = 0xFFFF_FFFC;
    /// The state word of a page being freed.
    pub const FREEING: u32 = 0xFFFF_FFF8;
    /// The state word of a corrupt page.
    pub const CORRUPT: u32 = 0xFFFF_FFF0;

    /// The state a header's state word stands for.
    pub fn from_word(word: u32) -> PageState {
        match word {
            0xFFFF_FFFF => PageState::Uninitialized,
            Self::ACTIVE => PageState::Active,
            Self::FULL => PageState::Full,
            Self::FREEING => PageState::Freeing,
            Self::CORRUPT => PageState::Corrupt,
            other => PageState::Invalid(other),
        }
    }

    /// The state's name in lower case, for messages.
    pub fn name(self) -> &'static str {
        match self {
            PageState::Uninitialized => "uninitialized",
            PageState::Active => "active",
            PageState::Full => "full",
            PageState::Freeing => "freeing",
            PageState::Corrupt => "corrupt",
            PageState::Invalid(_) => "invalid",
        }
    }
}

/// Two-bit state of an entry slot in the page bitmap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryState {
    /// Never written (bits 11).
    Empty,
    /// Holds live data (bits 10).
    Written,
    /// Written, then erased (bits 00).
    Erased,
    /// Bits 01, which the device never writes.
    Illegal,
}

impl EntryState {
    /// The state's name in lower case, for messages.
    pub fn name(self) -> &'static str {
        match self {
            EntryState::Empty => "empty",
            EntryState::Written => "written",
            EntryState::Erased => "erased",
            EntryState::Illegal => "illegal",
        }
    }
}

/// Reads the state of entry `index` from a page's 32-byte bitmap (two bits per entry, LSB first).
pub(crate) fn bitmap_state(bitmap: &[u8], index: usize) -> EntryState {
    let bits = (bitmap[index / 4] >> (2 * (index % 4))) & 0b11;
    match bits {
        0b11 => EntryState::Empty,
        0b10 => EntryState::Written,
        0b00 => EntryState::Erased,
        _ => EntryState::Illegal,
    }
}

/// Item type codes (spec §6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ItemType {
    /// `u8`, stored in the entry's data field.
    U8,
    /// `i8`, stored in the entry's data field.
    I8,
    /// `u16`, stored in the entry's data field.
    U16,
    /// `i16`, stored in the entry's data field.
    I16,
    /// `u32`, stored in the entry's data field.
    U32,
    /// `i32`, stored in the entry's data field.
    I32,
    /// `u64`, stored in the entry's data field.
    U64,
    /// `i64`, stored in the entry's data field.
    I64,
    /// IEEE 754 single, `NVS_TYPE_FLOAT` (ESP-IDF 6.1 on): stored like `U32`.
    F32,
    /// IEEE 754 double, `NVS_TYPE_DOUBLE` (ESP-IDF 6.1 on): stored like `U64`.
    F64,
    /// NUL-terminated string (`SZ`).
    Str,
    /// Legacy single-page blob of format version 1.
    Blob,
    /// One chunk of a version 2 blob.
    BlobData,
    /// The index entry that closes a version 2 blob.
    BlobIndex,
}

impl ItemType {
    /// The type code in an entry's header.
    pub fn code(self) -> u8 {
        match self {
            ItemType::U8 => 0x01,
            ItemType::I8 => 0x11,
            ItemType::U16 => 0x02,
            ItemType::I16 => 0x12,
            ItemType::U32 => 0x04,
            ItemType::I32 => 0x14,
            ItemType::U64 => 0x08,
            ItemType::I64 => 0x18,
            ItemType::F32 => 0x24,
            ItemType::F64 => 0x28,
            ItemType::Str => 0x21,
            ItemType::Blob => 0x41,
            ItemType::BlobData => 0x42,
            ItemType::BlobIndex => 0x48,
        }
    }

    /// The item type of a type code; `None` for a code the format does not define.
    pub fn from_code(code: u8) -> Option<ItemType> {
        Some(match code {
            0x01 => ItemType::U8,
            0x11 => ItemType::I8,
            0x02 => ItemType::U16,
            0x12 => ItemType::I16,
            0x04 => ItemType::U32,
            0x14 => ItemType::I32,
            0x08 => ItemType::U64,
            0x18 => ItemType::I64,
            0x24 => ItemType::F32,
            0x28 => ItemType::F64,
            0x21 => ItemType::Str,
            0x41 => ItemType::Blob,
            0x42 => ItemType::BlobData,
            0x48 => ItemType::BlobIndex,
            _ => return None,
        })
    }

    /// Width in bytes of a primitive type, `None` for variable-length types.
    pub fn primitive_width(self) -> Option<usize> {
        match self {
            ItemType::U8 | ItemType::I8 => Some(1),
            ItemType::U16 | ItemType::I16 => Some(2),
            ItemType::U32 | ItemType::I32 | ItemType::F32 => Some(4),
            ItemType::U64 | ItemType::I64 | ItemType::F64 => Some(8),
            _ => None,
        }
    }

    /// The name used in CSV encodings, dumps and JSON.
    pub fn name(self) -> &'static str {
        match self {
            ItemType::U8 => "u8",
            ItemType::I8 => "i8",
            ItemType::U16 => "u16",
            ItemType::I16 => "i16",
            ItemType::U32 => "u32",
            ItemType::I32 => "i32",
            ItemType::U64 => "u64",
            ItemType::I64 => "i64",
            ItemType::F32 => "f32",
            ItemType::F64 => "f64",
            ItemType::Str => "string",
            ItemType::Blob => "blob",
            ItemType::BlobData => "blob_data",
            ItemType::BlobIndex => "blob_index",
        }
    }
}

/// Number of 32-byte entries that `len` data bytes occupy.
pub(crate) fn data_entries(len: usize) -> usize {
    len.div_ceil(ENTRY_SIZE)
}
