//! Readable differences between two images, entry by entry (for tests and the differential
//! check against the reference).

use super::layout::{ENTRY_SIZE, FIRST_ENTRY_OFFSET, PAGE_SIZE};

/// Describes up to `max` differing regions of `a` and `b`: page headers, bitmaps and entries,
/// each with its page and entry index, the key stored there and both byte strings in hex.
pub fn describe_differences(a: &[u8], b: &[u8], max: usize) -> Vec<String> {
    let mut out = Vec::new();
    if a.len() != b.len() {
        out.push(format!("lengths differ: {} vs {} bytes", a.len(), b.len()));
    }
    let len = a.len().min(b.len());
    let mut offset = 0;
    while offset < len && out.len() < max {
        let page = offset / PAGE_SIZE;
        let in_page = offset % PAGE_SIZE;
        let (what, width) = match in_page {
            0..=31 => ("header".to_owned(), 32),
            32..=63 => ("bitmap".to_owned(), 32),
            _ => (
                format!("entry {}", (in_page - FIRST_ENTRY_OFFSET) / ENTRY_SIZE),
                ENTRY_SIZE,
            ),
        };
        // A trailing partial unit (an image that is not whole pages) is compared as it is.
        let width = width.min(len - offset);
        let (x, y) = (&a[offset..offset + width], &b[offset..offset + width]);
        if x != y {
            let key = |e: &[u8]| {
                let k = &e[8..24];
                let end = k.iter().position(|&c| c == 0).unwrap_or(16);
                String::from_utf8_lossy(&k[..end]).into_owned()
            };
            let label = if in_page >= FIRST_ENTRY_OFFSET && width == ENTRY_SIZE {
                format!(" (key `{}` vs `{}`)", key(x), key(y))
            } else {
                String::new()
            };
            out.push(format!(
                "page {page} {what}{label}:\n  left:  {}\n  right: {}",
                hex(x),
                hex(y)
            ));
        }
        offset += width;
    }
    out
}

/// Hex bytes, space separated.
fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| crate::hex(std::slice::from_ref(b)))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::describe_differences;

    #[test]
    fn partial_units_and_lengths() {
        assert!(describe_differences(&[0; 40], &[0; 40], 10).is_empty());
        let d = describe_differences(&[0; 40], &[1; 40], 10);
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(describe_differences(&[0; 100], &[0; 90], 10)[0].contains("lengths differ"));
    }
}
