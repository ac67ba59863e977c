//! Settings as espflash reads them: `espflash.toml` (`baudrate`, `[flash] mode/size/frequency`,
//! `[idf] bootloader/partition_table/partition_table_offset`) and `espflash_ports.toml`
//! (`[connection] serial`, `[[usb_device]] vid/pid`), each found in the current folder, its
//! parent, or espflash's config folder; `ESPFLASH_PORT` and `ESPFLASH_BAUD` in the environment.
//! Command-line options win over all of them.

use std::path::{Path, PathBuf};

use toml::de::{DeTable, DeValue};

use crate::fsutil::FileError;

/// Why espflash's settings cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("`{}` is not valid TOML: {message}", path.display())]
    Toml { path: PathBuf, message: String },
}

/// What the two files say (missing keys are `None`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Settings {
    pub baudrate: Option<u32>,
    pub flash_mode: Option<String>,
    pub flash_size: Option<String>,
    pub flash_frequency: Option<String>,
    pub bootloader: Option<PathBuf>,
    pub partition_table: Option<PathBuf>,
    pub partition_table_offset: Option<u32>,
    /// `[connection] serial`.
    pub serial: Option<String>,
    /// `[[usb_device]]` (vid, pid).
    pub usb_devices: Vec<(u16, u16)>,
}

/// Where espflash looks for `name`: the current folder, its parent, then
/// `$XDG_CONFIG_HOME/espflash` (or `~/.config/espflash`).
pub fn find(name: &str) -> Option<PathBuf> {
    let cwd = std::env::current_dir().ok()?;
    let mut candidates = vec![cwd.join(name)];
    if let Some(parent) = cwd.parent() {
        candidates.push(parent.join(name));
    }
    let config_home = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")));
    if let Some(home) = config_home {
        candidates.push(home.join("espflash").join(name));
    }
    candidates.into_iter().find(|p| p.is_file())
}

/// Reads both files (those that exist). Errors name the file and what is wrong.
pub fn load() -> Result<Settings, SettingsError> {
    let mut settings = Settings::default();
    if let Some(path) = find("espflash.toml") {
        read_project(&path, &mut settings)?;
    }
    if let Some(path) = find("espflash_ports.toml") {
        read_ports(&path, &mut settings)?;
    }
    Ok(settings)
}

/// The settings, or none when the files cannot be read (a warning says why).
pub fn load_or_warn() -> Settings {
    load().unwrap_or_else(|e| {
        eprintln!("warning: {e}; ignoring espflash's settings");
        Settings::default()
    })
}

/// The baud rate to flash at when `--baud` is not given: `ESPFLASH_BAUD`, then espflash.toml.
pub fn baud() -> Option<u32> {
    if let Some(baud) = std::env::var("ESPFLASH_BAUD")
        .ok()
        .and_then(|b| b.trim().parse().ok())
    {
        return Some(baud);
    }
    load_or_warn().baudrate
}

fn parse<'a>(path: &Path, text: &'a str) -> Result<DeTable<'a>, SettingsError> {
    DeTable::parse(text)
        .map(|t| t.into_inner())
        .map_err(|e| SettingsError::Toml {
            path: path.to_owned(),
            message: e.message().to_owned(),
        })
}

fn string(table: &DeTable<'_>, key: &str) -> Option<String> {
    match table.get(key).map(|v| v.get_ref()) {
        Some(DeValue::String(s)) => Some(s.to_string()),
        _ => None,
    }
}

fn integer(table: &DeTable<'_>, key: &str) -> Option<u32> {
    match table.get(key).map(|v| v.get_ref()) {
        Some(DeValue::Integer(i)) => {
            let digits = i.as_str().replace('_', "");
            let digits = digits.trim_start_matches("0x").trim_start_matches("+");
            u32::from_str_radix(digits, i.radix()).ok()
        }
        Some(DeValue::String(s)) => parse_u32(s),
        _ => None,
    }
}

fn parse_u32(text: &str) -> Option<u32> {
    match text.trim().strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => text.trim().parse().ok(),
    }
}

fn section<'t, 'a>(table: &'t DeTable<'a>, name: &str) -> Option<&'t DeTable<'a>> {
    match table.get(name).map(|v| v.get_ref()) {
        Some(DeValue::Table(t)) => Some(t),
        _ => None,
    }
}

fn read_project(path: &Path, settings: &mut Settings) -> Result<(), SettingsError> {
    let text = std::fs::read_to_string(path).map_err(FileError::reading(path))?;
    let root = parse(path, &text)?;
    settings.baudrate = integer(&root, "baudrate");
    if let Some(flash) = section(&root, "flash") {
        settings.flash_mode = string(flash, "mode");
        settings.flash_size = string(flash, "size");
        settings.flash_frequency = string(flash, "frequency");
    }
    let base = path.parent().unwrap_or(Path::new("."));
    if let Some(idf) = section(&root, "idf").or_else(|| section(&root, "idf_format_args")) {
        settings.bootloader = string(idf, "bootloader").map(|p| base.join(p));
        settings.partition_table = string(idf, "partition_table").map(|p| base.join(p));
        settings.partition_table_offset = integer(idf, "partition_table_offset");
    }
    Ok(())
}

fn read_ports(path: &Path, settings: &mut Settings) -> Result<(), SettingsError> {
    let text = std::fs::read_to_string(path).map_err(FileError::reading(path))?;
    let root = parse(path, &text)?;
    if let Some(connection) = section(&root, "connection") {
        settings.serial = string(connection, "serial").filter(|s| !s.is_empty());
    }
    if let Some(DeValue::Array(devices)) = root.get("usb_device").map(|v| v.get_ref()) {
        for device in devices.iter() {
            if let DeValue::Table(device) = device.get_ref() {
                let hex = |key: &str| {
                    string(device, key)
                        .and_then(|v| u16::from_str_radix(v.trim_start_matches("0x"), 16).ok())
                };
                if let (Some(vid), Some(pid)) = (hex("vid"), hex("pid")) {
                    settings.usb_devices.push((vid, pid));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_espflash_files() {
        let dir = std::env::temp_dir().join(format!("cargo-nvs-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let project = dir.join("espflash.toml");
        std::fs::write(
            &project,
            "baudrate = 460800\n[flash]\nmode = \"dio\"\nsize = \"4MB\"\nfrequency = \"80MHz\"\n\
             [idf]\npartition_table = \"partitions.csv\"\npartition_table_offset = 0x9000\n",
        )
        .unwrap();
        let ports = dir.join("espflash_ports.toml");
        std::fs::write(
            &ports,
            "[connection]\nserial = \"/dev/ttyUSB1\"\n\n[[usb_device]]\nvid = \"303a\"\npid = \"1001\"\n",
        )
        .unwrap();
        let mut s = Settings::default();
        read_project(&project, &mut s).unwrap();
        read_ports(&ports, &mut s).unwrap();
        assert_eq!(s.baudrate, Some(460_800));
        assert_eq!(s.flash_mode.as_deref(), Some("dio"));
        assert_eq!(s.flash_size.as_deref(), Some("4MB"));
        assert_eq!(s.flash_frequency.as_deref(), Some("80MHz"));
        assert_eq!(s.partition_table, Some(dir.join("partitions.csv")));
        assert_eq!(s.partition_table_offset, Some(0x9000));
        assert_eq!(s.serial.as_deref(), Some("/dev/ttyUSB1"));
        assert_eq!(s.usb_devices, vec![(0x303a, 0x1001)]);
        std::fs::write(&project, "baudrate = [").unwrap();
        let e = read_project(&project, &mut s).unwrap_err().to_string();
        assert!(e.contains("not valid TOML"), "{e}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
