//! Lower-case hex, as the ledger, manifests and dumps write bytes and SHA-256 digests: the
//! encoder is nvs-build's, the one of both crates.

use sha2::{Digest, Sha256};

pub use nvs_build::hex;

/// The SHA-256 of `bytes`, in lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}
