//! Key options shared by `encrypt` and `generate-key`, and writing key files.

use std::path::{Path, PathBuf};

use nvs_build::format::encryption::XtsKey;
use nvs_build::keys::load_hmac_key;

use crate::fsutil::write_secret;

/// Why keys cannot be made or read.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key options do not fit together (the message says how to fix them).
    #[error("{0}")]
    Invalid(String),
    /// An existing key file, which is never overwritten without --force.
    #[error("`{}` exists; key files are never overwritten (pass --force to replace it)", .0.display())]
    Exists(PathBuf),
    #[error("cannot write the {what} to `{}`: {source}", path.display())]
    Write {
        what: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the system random number generator failed: {0}")]
    Random(getrandom::Error),
    /// A key file cannot be read, or a key cannot be made from it.
    #[error(transparent)]
    Input(#[from] nvs_build::InputError),
    #[error(transparent)]
    Encryption(#[from] nvs_build::format::encryption::KeyError),
}

/// How keys are generated (the reference's option names, with its underscore spellings).
#[derive(clap::Args, Debug)]
pub struct KeyGenOptions {
    /// Write the generated nvs_keys file exactly here [default: keys/keys-<random>.bin in --out-dir].
    #[arg(long, value_name = "FILE")]
    pub keyfile: Option<PathBuf>,
    #[command(flatten)]
    pub hmac: HmacOptions,
    /// Where to write the generated HMAC key [default: hmac-<keyfile name> beside the key file].
    #[arg(
        long = "kp-hmac-keyfile",
        alias = "kp_hmac_keyfile",
        value_name = "FILE"
    )]
    pub kp_hmac_keyfile: Option<PathBuf>,
    /// Replace existing key files (they are never overwritten otherwise).
    #[arg(long)]
    pub force: bool,
}

/// The HMAC-based key protection scheme (`encrypt`, `generate-key` and `mfg generate`).
#[derive(clap::Args, Debug, Default)]
pub struct HmacOptions {
    /// Use the HMAC-based key protection scheme: derive the keys from an HMAC key (the one
    /// burned into the chip's eFuse).
    #[arg(long = "key-protect-hmac", alias = "key_protect_hmac")]
    pub key_protect_hmac: bool,
    /// Generate a random 32-byte HMAC key (HMAC scheme).
    #[arg(
        long = "kp-hmac-keygen",
        alias = "kp_hmac_keygen",
        conflicts_with = "kp_hmac_inputkey"
    )]
    pub kp_hmac_keygen: bool,
    /// Derive the keys from this HMAC key file (HMAC scheme).
    #[arg(
        long = "kp-hmac-inputkey",
        alias = "kp_hmac_inputkey",
        value_name = "FILE"
    )]
    pub kp_hmac_inputkey: Option<PathBuf>,
}

impl HmacOptions {
    pub fn any(&self) -> bool {
        self.key_protect_hmac || self.kp_hmac_keygen || self.kp_hmac_inputkey.is_some()
    }

    /// Refuses --kp-hmac-* without --key-protect-hmac, and the scheme without an HMAC key.
    pub fn check(&self) -> Result<(), KeyError> {
        if !self.key_protect_hmac {
            if self.any() {
                return Err(KeyError::Invalid(
                    "--kp-hmac-* options need --key-protect-hmac".into(),
                ));
            }
        } else if !self.kp_hmac_keygen && self.kp_hmac_inputkey.is_none() {
            return Err(KeyError::Invalid(
                "the HMAC scheme (--key-protect-hmac) needs an HMAC key: pass --kp-hmac-inputkey \
                 FILE, or --kp-hmac-keygen to create one"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// A new random HMAC key (32 bytes, as the eFuse HMAC peripheral takes).
pub fn random_hmac_key() -> Result<[u8; 32], KeyError> {
    let mut hmac_key = [0u8; 32];
    getrandom::fill(&mut hmac_key).map_err(KeyError::Random)?;
    Ok(hmac_key)
}

impl KeyGenOptions {
    pub fn uses_hmac_options(&self) -> bool {
        self.hmac.any() || self.kp_hmac_keyfile.is_some()
    }
}

/// Creates the key (random, or derived from an HMAC key) and writes the key files; prints
/// where they went, never what they hold.
/// Keys just generated, and the files written for them.
pub struct GeneratedKeys {
    pub key: XtsKey,
    files: Vec<PathBuf>,
}

impl GeneratedKeys {
    /// Removes the files written, when what the keys were for could not be completed.
    pub fn discard(self) {
        for file in self.files {
            let _ = std::fs::remove_file(file);
        }
    }
}

pub fn generate_keys(
    opts: &KeyGenOptions,
    out_dir: Option<&Path>,
) -> Result<GeneratedKeys, KeyError> {
    // Usage errors before any file is looked at.
    if opts.kp_hmac_keyfile.is_some() && !opts.hmac.key_protect_hmac {
        return Err(KeyError::Invalid(
            "--kp-hmac-* options need --key-protect-hmac".into(),
        ));
    }
    opts.hmac.check()?;
    let keyfile = match &opts.keyfile {
        Some(path) => path.clone(),
        None => default_key_path(out_dir)?,
    };
    let hmac_path = opts.kp_hmac_keyfile.clone().unwrap_or_else(|| {
        let name = keyfile
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        keyfile.with_file_name(format!("hmac-{name}"))
    });
    // Refuse before writing anything, so no half of a key pair is left behind.
    let mut targets = vec![&keyfile];
    if opts.hmac.key_protect_hmac && opts.hmac.kp_hmac_keygen {
        targets.push(&hmac_path);
    }
    if let Some(existing) = targets.iter().find(|p| p.exists()).filter(|_| !opts.force) {
        return Err(KeyError::Exists(existing.to_path_buf()));
    }
    let mut files = Vec::new();
    let key = if opts.hmac.kp_hmac_keygen {
        let hmac_key = random_hmac_key()?;
        write_key(&hmac_path, &hmac_key, opts.force, "HMAC key")?;
        files.push(hmac_path.clone());
        XtsKey::derive_from_hmac(&hmac_key)?
    } else if let Some(path) = &opts.hmac.kp_hmac_inputkey {
        load_hmac_key(path)?
    } else {
        XtsKey::generate()?
    };
    let generated = GeneratedKeys { key, files };
    if let Err(e) = write_key(
        &keyfile,
        &generated.key.to_key_file(),
        opts.force,
        "encryption keys",
    ) {
        generated.discard();
        return Err(e);
    }
    Ok(GeneratedKeys {
        files: [generated.files, vec![keyfile]].concat(),
        key: generated.key,
    })
}

fn write_key(path: &Path, bytes: &[u8], force: bool, what: &str) -> Result<(), KeyError> {
    write_secret(path, bytes, force).map_err(|source| KeyError::Write {
        what: what.to_owned(),
        path: path.to_owned(),
        source,
    })?;
    eprintln!(
        "Created {what} `{}` (mode 0600; keep it secret)",
        path.display()
    );
    Ok(())
}

/// `keys/keys-<random>.bin`: a fresh name every time, so runs never collide.
fn default_key_path(out_dir: Option<&Path>) -> Result<PathBuf, KeyError> {
    let mut tag = [0u8; 4];
    getrandom::fill(&mut tag).map_err(KeyError::Random)?;
    let tag = crate::hex::hex(&tag);
    Ok(out_dir
        .unwrap_or(Path::new("."))
        .join("keys")
        .join(format!("keys-{tag}.bin")))
}

/// The key to read an image with: `--keys` (an nvs_keys file) or `--hmac-key`.
#[derive(clap::Args, Debug, Default)]
pub struct KeyInput {
    /// nvs_keys file (its first 64 bytes are the XTS key) the image is encrypted with.
    #[arg(long, value_name = "KEYS.bin", conflicts_with = "hmac_key")]
    pub keys: Option<PathBuf>,
    /// HMAC key file the image's keys are derived from (HMAC scheme).
    #[arg(long = "hmac-key", value_name = "FILE")]
    pub hmac_key: Option<PathBuf>,
}

impl KeyInput {
    pub fn load(&self) -> Result<Option<XtsKey>, KeyError> {
        if let Some(path) = &self.keys {
            return load_key(path).map(Some);
        }
        self.hmac_key
            .as_deref()
            .map(load_hmac_key)
            .transpose()
            .map_err(Into::into)
    }
}

/// Loads an nvs_keys file, warning when its CRC is wrong.
pub fn load_key(path: &Path) -> Result<XtsKey, KeyError> {
    let loaded = nvs_build::keys::load_key_file(path)?;
    if let Some(warning) = loaded.warning {
        eprintln!("warning: {warning}");
    }
    Ok(loaded.key)
}
