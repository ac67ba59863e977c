//! One image being assembled from located inputs (CSV rows, metadata keys): wraps the format
//! core's [`ImageBuilder`] and turns its refusals into errors that point at the input.

use std::path::{Path, PathBuf};

use crate::error::{Error, Location};
use crate::format::{FormatError, ImageBuilder, PartitionSize, Value, Version};

/// An image being assembled for a partition of a given size.
#[derive(Debug)]
pub struct ImageInput {
    builder: ImageBuilder,
    size: PartitionSize,
    /// The first item that did not fit into the partition.
    overflow: Option<(Option<Location>, String)>,
    files_read: Vec<PathBuf>,
}

impl ImageInput {
    /// An empty image for a partition of `size` bytes in format `version`.
    pub fn new(size: PartitionSize, version: Version) -> ImageInput {
        ImageInput {
            // Partitions are small (KiBs to a few MiB); reserving them avoids regrowth.
            builder: ImageBuilder::with_capacity(version, size.bytes().min(1 << 24) as usize),
            size,
            overflow: None,
            files_read: Vec::new(),
        }
    }

    /// Accepts version 2 strings up to the device's 3999 bytes (Cargo metadata), beyond the
    /// 3967 Espressif's generator can lay out (see
    /// [`ImageBuilder::allow_device_string_lengths`]).
    pub fn allow_device_string_lengths(&mut self, allow: bool) {
        self.builder.allow_device_string_lengths(allow);
    }

    /// The partition's size.
    pub fn size(&self) -> PartitionSize {
        self.size
    }

    /// The format version.
    pub fn version(&self) -> Version {
        self.builder.version()
    }

    /// Entries used so far, counting the ones the layout had to skip at page ends.
    pub fn entries_used(&self) -> usize {
        self.builder.entries_used()
    }

    /// Pages used so far.
    pub fn pages_used(&self) -> usize {
        self.builder.pages_used()
    }

    /// Every file whose contents went into the image (CSV files and `file` values), in order.
    pub fn files_read(&self) -> &[PathBuf] {
        &self.files_read
    }

    pub(crate) fn note_file_read(&mut self, path: &Path) {
        if !self.files_read.iter().any(|p| p == path) {
            self.files_read.push(path.to_owned());
        }
    }

    /// Opens (or continues) a namespace.
    pub fn namespace(&mut self, at: Option<&Location>, name: &str) -> Result<(), Error> {
        self.builder
            .namespace(name)
            .map_err(|e| Error::from_format(at.cloned(), Some(name), e))?;
        self.track_overflow(at, name);
        Ok(())
    }

    /// Adds an item to the current namespace; `source_text` is how the input spelled the value.
    pub fn add(
        &mut self,
        at: Option<&Location>,
        key: &str,
        value: Value,
        source_text: &str,
    ) -> Result<(), Error> {
        self.builder
            .add_with_source_text(key, value, source_text)
            .map_err(|e| Error::from_format(at.cloned(), Some(key), e))?;
        self.track_overflow(at, key);
        Ok(())
    }

    fn track_overflow(&mut self, at: Option<&Location>, key: &str) {
        if self.overflow.is_none() && self.builder.pages_used() > self.size.data_pages() {
            self.overflow = Some((at.cloned(), key.to_owned()));
        }
    }

    /// The finished image, encrypted with `key` (XTS-AES-256 per entry, as ESP-IDF's
    /// encrypted NVS expects).
    #[cfg(feature = "encryption")]
    pub fn finish_encrypted(
        self,
        key: &crate::format::encryption::XtsKey,
    ) -> Result<Vec<u8>, Error> {
        let mut bytes = self.finish()?;
        crate::format::encryption::encrypt_image(&mut bytes, key);
        Ok(bytes)
    }

    /// The finished image bytes.
    pub fn finish(self) -> Result<Vec<u8>, Error> {
        let overflow = self.overflow;
        self.builder
            .finish(self.size)
            .map_err(|e| match (e, overflow) {
                (e @ FormatError::PartitionTooSmall { .. }, Some((at, key))) => {
                    Error::from_format(at, Some(&key), e)
                        .with_note(&format!(" (the data overflows at key `{key}`)"))
                }
                (e, _) => Error::from_format(None, None, e),
            })
    }
}
