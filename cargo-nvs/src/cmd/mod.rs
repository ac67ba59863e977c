pub mod decrypt;
pub mod device;
pub mod dist;
pub mod dump;
pub mod encrypt;
pub mod error;
pub mod flash;
pub mod generate;
pub mod generate_key;
pub mod mfg;
pub mod monitor;
pub mod partitions;
pub mod read;
pub mod station;

/// `--format text|json`, one spelling for every command that has machine-readable output.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    #[default]
    Text,
    Json,
}
