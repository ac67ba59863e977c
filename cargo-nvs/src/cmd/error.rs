//! The binary's error: every library error a command can end with (kept whole, with its
//! source and location), and the refusals the commands make themselves. `main` shows it with
//! miette (`crate::report`): `error: MESSAGE`, then the input's line for located errors, a help
//! line and the error's code. Exit code 1.

use cargo_nvs::firmware::FirmwareError;
use cargo_nvs::flashing::{ChipError, FlashingError};
use cargo_nvs::flashing::{protect::ProtectError, segments::SegmentError};
use cargo_nvs::fsutil::{FileError, OutputOverInput};
use cargo_nvs::mfg::flash::MfgFlashError;
use cargo_nvs::mfg::generate::GenerateError;
use cargo_nvs::mfg::input::ValuesError;
use cargo_nvs::mfg::ledger::LedgerError;
use cargo_nvs::mfg::product::ProductError;
use cargo_nvs::{
    artifacts::ArtifactError, keys::KeyError, project::ProjectError, settings::SettingsError,
    size::SpellingError,
};

pub type CmdResult<T = ()> = Result<T, CmdError>;

#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    /// Arguments that do not go together, or one that is missing or out of range (what clap
    /// cannot check).
    #[error("{0}")]
    Usage(String),
    /// An input file or image that is not what the command needs (truncated, encrypted without
    /// a key, no such partition in it, no defmt table).
    #[error("{0}")]
    Unusable(String),
    /// What the command will not do to the device (erase factory data without the flag, write
    /// or erase beyond its flash).
    #[error("{0}")]
    Refused(String),
    /// The chip failed while the command was `doing` something.
    #[error("{doing}: {source}")]
    Chip {
        doing: String,
        #[source]
        source: espflash::Error,
    },
    /// The serial port failed while the command was `doing` something.
    #[error("{doing}: {source}")]
    Serial {
        doing: String,
        #[source]
        source: serialport::Error,
    },
    /// The port stopped answering while the monitor read it.
    #[error(
        "the serial port `{port}` went away ({source}): unplugged, or the board reset its USB \
         connection"
    )]
    PortGone {
        port: String,
        #[source]
        source: std::io::Error,
    },
    /// A file an earlier `dist --with-dev-data` run left that cannot be removed.
    #[error(
        "cannot remove `{}` (from an earlier --with-dev-data run; it holds development data): {source}",
        path.display()
    )]
    StaleDevData {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Writing the command's output (stdout) failed.
    #[error("cannot write the {what}: {source}")]
    Output {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot handle Ctrl-C: {0}")]
    CtrlC(#[from] ctrlc::Error),
    #[error(transparent)]
    Input(#[from] nvs_build::Error),
    #[error(transparent)]
    Encryption(#[from] nvs_build::format::encryption::KeyError),
    #[error(transparent)]
    File(#[from] FileError),
    #[error(transparent)]
    OutputOverInput(#[from] OutputOverInput),
    #[error(transparent)]
    Project(#[from] ProjectError),
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error(transparent)]
    Spelling(#[from] SpellingError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Flashing(#[from] FlashingError),
    #[error(transparent)]
    ChipReply(#[from] ChipError),
    #[error(transparent)]
    Segment(#[from] SegmentError),
    #[error(transparent)]
    Protect(#[from] ProtectError),
    #[error(transparent)]
    Firmware(#[from] FirmwareError),
    #[error(transparent)]
    Generate(#[from] GenerateError),
    #[error(transparent)]
    MfgFlash(#[from] MfgFlashError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Product(#[from] ProductError),
    #[error(transparent)]
    Values(#[from] ValuesError),
    #[error(transparent)]
    Migrate(#[from] cargo_nvs::mfg::migrate::MigrateError),
    #[error(transparent)]
    NvsPartition(#[from] nvs_build::table::NvsPartitionError),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

impl CmdError {
    /// For `map_err` on the chip's calls: `.map_err(CmdError::chip("cannot read …"))`.
    pub fn chip(doing: impl Into<String>) -> impl FnOnce(espflash::Error) -> CmdError {
        let doing = doing.into();
        move |source| CmdError::Chip { doing, source }
    }

    /// For `map_err` on the port's calls.
    pub fn serial(doing: impl Into<String>) -> impl FnOnce(serialport::Error) -> CmdError {
        let doing = doing.into();
        move |source| CmdError::Serial { doing, source }
    }
}
