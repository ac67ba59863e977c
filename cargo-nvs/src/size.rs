//! Sizes, offsets and NVS format versions on the command line, spelled as Espressif's tools
//! accept them.

use nvs_build::format::{PartitionSize, Version};

/// A number on the command line that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpellingError {
    #[error("`{0}` is not a size; write it in hex (0x6000) or decimal (24576)")]
    NotASize(String),
    #[error("`{0}` is beyond the 4 GiB a flash address can reach")]
    BeyondFlash(String),
    #[error("`{0}` is not an NVS format version; use 1 or 2")]
    NotAVersion(String),
}

/// Parses a size like Python's `int(text, 0)`: `0x6000`, `0o…`, `0b…`, decimal, `_` separators.
pub fn parse_size(text: &str) -> Result<u64, SpellingError> {
    let err = || SpellingError::NotASize(text.to_owned());
    // Like Python's int(): surrounding whitespace and a `+` sign are fine.
    let t = text.trim();
    let t = t.strip_prefix('+').unwrap_or(t);
    let lower = t.to_ascii_lowercase();
    let (digits, radix) = if let Some(rest) = lower.strip_prefix("0x") {
        (rest, 16)
    } else if let Some(rest) = lower.strip_prefix("0o") {
        (rest, 8)
    } else if let Some(rest) = lower.strip_prefix("0b") {
        (rest, 2)
    } else {
        // Python rejects decimal numbers with leading zeros in base 0.
        if lower.len() > 1
            && lower.starts_with('0')
            && !lower.trim_start_matches(['0', '_']).is_empty()
        {
            return Err(err());
        }
        (lower.as_str(), 10)
    };
    // `0x_6000` is valid Python, `_6000` is not.
    let digits = match radix {
        10 => digits,
        _ => digits.strip_prefix('_').unwrap_or(digits),
    };
    if digits.starts_with('_') {
        return Err(err());
    }
    if digits.is_empty() || digits.ends_with('_') || digits.contains("__") {
        return Err(err());
    }
    u64::from_str_radix(&digits.replace('_', ""), radix).map_err(|_| err())
}

/// A flash address (a size that fits in 32 bits).
pub fn parse_offset(text: &str) -> Result<u32, SpellingError> {
    let n = parse_size(text)?;
    u32::try_from(n).map_err(|_| SpellingError::BeyondFlash(text.to_owned()))
}

/// `--version 1|2`.
pub fn parse_version(text: &str) -> Result<Version, SpellingError> {
    match text {
        "1" => Ok(Version::V1),
        "2" => Ok(Version::V2),
        _ => Err(SpellingError::NotAVersion(text.to_owned())),
    }
}

/// Warns as the reference does when a partition is too small to be written by the device.
pub fn warn_if_read_only(size: PartitionSize) {
    if size.is_read_only() {
        eprintln!(
            "warning: a partition of {:#x} bytes is smaller than 0x3000: it must be flagged `readonly` in \
             the partition table CSV (the image holds only the pages it uses)",
            size.bytes()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn spellings() {
        assert_eq!(parse_size("0x6000"), Ok(0x6000));
        assert_eq!(parse_size("0X6000"), Ok(0x6000));
        assert_eq!(parse_size("24576"), Ok(24576));
        assert_eq!(parse_size("24_576"), Ok(24576));
        assert_eq!(parse_size("0x_6000"), Ok(0x6000));
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size(" +0x3000 "), Ok(0x3000));
        assert!(parse_size("-0x3000").is_err());
        assert!(parse_size("+-1").is_err());
        assert!(parse_size("_12288").is_err());
        assert!(parse_size("012288").is_err());
        assert!(parse_size("6K").is_err());
        assert!(parse_size("").is_err());
    }
}
