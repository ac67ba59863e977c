//! One image being assembled from located inputs (CSV rows, metadata keys): wraps the format
//! core's [`ImageBuilder`] and turns its refusals into errors that point at the input.

use std::path::{Path, PathBuf};

use crate::chip::{ChipValue, Mac, RecipeRow};
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
    /// The MAC that CSV cells `@chip:…` take (else they are text, as in the reference).
    chip_mac: Option<Mac>,
    /// Every namespace and value added, when recording a recipe.
    recipe: Option<Vec<RecipeRow>>,
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
            chip_mac: None,
            recipe: None,
        }
    }

    /// CSV cells `@chip:mac` / `@chip:mac-hex` take their value from `mac` (mass production's
    /// extension); without it (the default) they are text, as Espressif's generator reads them.
    pub fn set_chip_mac(&mut self, mac: Mac) {
        self.chip_mac = Some(mac);
    }

    /// The MAC that chip values take, if one was set.
    pub fn chip_mac(&self) -> Option<Mac> {
        self.chip_mac
    }

    /// Records every namespace and value added from now on, for [`ImageInput::take_recipe`].
    pub fn record_recipe(&mut self) {
        self.recipe.get_or_insert_with(Vec::new);
    }

    /// The rows recorded since [`ImageInput::record_recipe`] (recording stops).
    pub fn take_recipe(&mut self) -> Vec<RecipeRow> {
        self.recipe.take().unwrap_or_default()
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
        if let Some(recipe) = &mut self.recipe {
            recipe.push(RecipeRow::Namespace(name.to_owned()));
        }
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
        self.add_from(at, key, value, source_text, None)
    }

    /// Adds an item, noting for a recipe whether it is a chip value.
    pub(crate) fn add_from(
        &mut self,
        at: Option<&Location>,
        key: &str,
        value: Value,
        source_text: &str,
        chip: Option<ChipValue>,
    ) -> Result<(), Error> {
        let recorded = self.recipe.is_some().then(|| value.clone());
        self.builder
            .add_with_source_text(key, value, source_text)
            .map_err(|e| Error::from_format(at.cloned(), Some(key), e))?;
        self.track_overflow(at, key);
        if let (Some(recipe), Some(value)) = (&mut self.recipe, recorded) {
            recipe.push(RecipeRow::Data {
                key: key.to_owned(),
                value,
                text: source_text.to_owned(),
                chip,
            });
        }
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
