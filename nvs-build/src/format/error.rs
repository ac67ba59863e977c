use std::fmt;

/// Why the format core refused an image or an item.
///
/// Besides the limits of the format itself, some variants are inputs that Espressif's generator
/// accepts but silently turns into something the author did not mean; we refuse those instead
/// of copying the reference's bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FormatError {
    /// The partition size is not a whole number of 4096-byte pages.
    SizeNotPageMultiple {
        /// The size asked for, in bytes.
        size: u64,
    },
    /// The partition size is zero.
    SizeZero,
    /// The partition is larger than an NVS partition can address.
    SizeTooLarge {
        /// The size asked for, in bytes.
        size: u64,
    },
    /// The data needs more pages than the partition offers.
    PartitionTooSmall {
        /// The partition's size in bytes.
        size: u64,
        /// Data pages the items need (a read/write partition keeps one more page free).
        pages_needed: usize,
        /// The smallest partition size that would hold the data.
        min_size: u64,
    },
    /// A key over 15 bytes (the device's limit).
    KeyTooLong {
        /// The key.
        key: String,
    },
    /// A namespace name over 15 bytes.
    NamespaceTooLong {
        /// The namespace name.
        name: String,
    },
    /// Non-ASCII keys: the reference counts characters but writes UTF-8 bytes, corrupting the
    /// entry (quirk Q5).
    KeyNotAscii {
        /// The key.
        key: String,
    },
    /// A NUL byte in a key or namespace name: the device reads keys up to the first NUL, so
    /// `k` and `k\0x` would be one key (the reference writes both).
    KeyHasNul {
        /// The key or namespace name.
        key: String,
    },
    /// A data item before any namespace: the reference writes it into the namespace table
    /// (index 0), where the device never finds it (quirk Q7).
    NoNamespace {
        /// The key.
        key: String,
    },
    /// An earlier namespace selected again: the reference keeps writing into the newest
    /// namespace instead (quirk Q1).
    NamespaceReselected {
        /// The namespace selected again.
        name: String,
        /// The namespace being written when it was selected again.
        current: String,
    },
    /// A 255th namespace: the device supports indexes 1..=254 only.
    TooManyNamespaces {
        /// The namespace name.
        name: String,
    },
    /// A key written twice in one namespace: the device would see only one of them.
    DuplicateKey {
        /// The namespace.
        namespace: String,
        /// The key.
        key: String,
    },
    /// A string longer than the reference can lay out, or than the device stores (`max` bytes
    /// including the NUL).
    StringTooLong {
        /// The key.
        key: String,
        /// The string's length in bytes, with its NUL.
        len: usize,
        /// The longest allowed, in bytes, with the NUL.
        max: usize,
    },
    /// A legacy version 1 blob larger than one page allows.
    BlobTooLongV1 {
        /// The key.
        key: String,
        /// The blob's length in bytes.
        len: usize,
    },
    /// A version 2 blob larger than the device accepts (508,000 bytes in 127 chunks).
    BlobTooLong {
        /// The key.
        key: String,
        /// The blob's length in bytes.
        len: usize,
    },
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FormatError::SizeNotPageMultiple { size } => write!(
                f,
                "partition size {size:#x} is not a multiple of 4096 (0x1000); round it to whole pages"
            ),
            FormatError::SizeZero => write!(
                f,
                "partition size is zero; give at least 0x3000 (3 pages), or 0x1000 for a read-only partition"
            ),
            FormatError::SizeTooLarge { size } => {
                write!(f, "partition size {size:#x} is larger than 4 GiB")
            }
            FormatError::PartitionTooSmall {
                size,
                pages_needed,
                min_size,
            } => write!(
                f,
                "partition of {size:#x} bytes is too small: the data needs {pages_needed} page(s); \
                 use a size of at least {min_size:#x}"
            ),
            FormatError::KeyTooLong { key } => write!(
                f,
                "key `{key}` is {} bytes long; NVS keys are at most 15 bytes",
                key.len()
            ),
            FormatError::NamespaceTooLong { name } => write!(
                f,
                "namespace `{name}` is {} bytes long; NVS namespace names are at most 15 bytes",
                name.len()
            ),
            FormatError::KeyNotAscii { key } => write!(
                f,
                "key `{}` contains non-ASCII characters; use ASCII keys (Espressif's generator \
                 would write a corrupt entry for it)",
                key.escape_debug()
            ),
            FormatError::KeyHasNul { key } => write!(
                f,
                "key `{}` contains a NUL byte; the device reads a key only up to its first NUL, so \
                 it would be a different key (or clash with one). Remove the NUL",
                key.escape_debug()
            ),
            FormatError::NoNamespace { key } => write!(
                f,
                "key `{key}` comes before any namespace; add a `namespace` row above it \
                 (Espressif's generator would put it into the namespace table, where the device never finds it)"
            ),
            FormatError::NamespaceReselected { name, current } => write!(
                f,
                "namespace `{name}` is selected again after `{current}`; Espressif's generator would \
                 silently write the following keys into `{current}`. Group each namespace's keys under one \
                 `namespace` row"
            ),
            FormatError::TooManyNamespaces { name } => write!(
                f,
                "namespace `{name}` would be the 255th; NVS supports at most 254 namespaces"
            ),
            FormatError::DuplicateKey { namespace, key } => write!(
                f,
                "key `{key}` appears twice in namespace `{namespace}`; the device would only see one of them. \
                 Remove or rename one"
            ),
            FormatError::StringTooLong { key, len, max } => write!(
                f,
                "string `{key}` is {} bytes long; at most {} bytes fit{}",
                len.saturating_sub(1),
                max - 1,
                if *max == super::layout::MAX_STRING_SIZE_V2 {
                    " in Espressif's CSV format (it crashes on longer ones; Cargo metadata accepts up to 3999)"
                } else {
                    " (one page, plus the NUL)"
                }
            ),
            FormatError::BlobTooLongV1 { key, len } => write!(
                f,
                "blob `{key}` is {len} bytes long; format version 1 allows at most 1984. Use --version 2 \
                 for multi-page blobs"
            ),
            FormatError::BlobTooLong { key, len } => write!(
                f,
                "blob `{key}` is {len} bytes long; the device accepts blobs of at most 508000 bytes"
            ),
        }
    }
}

impl std::error::Error for FormatError {}
