//! Reads back the NVS images the build script generated from `[package.metadata.nvs]` and
//! prints where each goes on flash and what it holds.

use nvs_build::format::{ItemValue, read_image};

struct Image {
    partition: &'static str,
    offset: &'static str,
    size: &'static str,
    path: &'static str,
    bytes: &'static [u8],
}

const IMAGES: [Image; 2] = [
    Image {
        partition: "fctry",
        offset: env!("NVS_FCTRY_OFFSET"),
        size: env!("NVS_FCTRY_SIZE"),
        path: env!("NVS_FCTRY_BIN"),
        bytes: include_bytes!(env!("NVS_FCTRY_BIN")),
    },
    Image {
        partition: "nvs",
        offset: env!("NVS_NVS_OFFSET"),
        size: env!("NVS_NVS_SIZE"),
        path: env!("NVS_NVS_BIN"),
        bytes: include_bytes!(env!("NVS_NVS_BIN")),
    },
];

/// Keys whose values are secrets: shown by size only.
const SECRET_KEYS: [&str; 1] = ["DeviceSecret"];

fn main() {
    for image in &IMAGES {
        println!(
            "partition `{}` at {} ({} bytes): {} bytes of image in {}",
            image.partition,
            image.offset,
            image.size,
            image.bytes.len(),
            image.path
        );
        let parsed = read_image(image.bytes);
        for item in parsed.live_items() {
            let shown = match &item.value {
                _ if SECRET_KEYS.contains(&item.key.as_str()) => "<secret, not shown>".to_owned(),
                ItemValue::Value(v) => v.to_string(),
                ItemValue::Blob(b) => format!("blob of {} bytes", b.data.len()),
                ItemValue::Unreadable => "<unreadable>".to_owned(),
            };
            let ns = item.namespace.as_deref().unwrap_or("?");
            println!("  {ns}:{:<14} {:<7} {shown}", item.key, item.type_name());
        }
        if parsed.is_damaged() {
            eprintln!(
                "error: the `{}` image is damaged: {:?}",
                image.partition, parsed.problems
            );
            std::process::exit(1);
        }
    }
}
