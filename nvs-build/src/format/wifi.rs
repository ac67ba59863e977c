//! The reference's automatic Wi-Fi entries (quirk Q2).
//!
//! Espressif's generator writes extra entries when it sees the key names the ESP-IDF Wi-Fi driver
//! uses: before an `ap.ssid`/`ap.passwd`/`ap.authmode` row, once all three are known, a blob
//! `ap.pmk_info` (100 zero bytes + the WPA PMK); after the first `sta.ssid`/`sta.pswd` row, blobs
//! `sta.apinfo`, `sta.pmk` and `sta.apsw`. Images must carry the same entries.
//!
//! The PMK is PBKDF2-HMAC-SHA1 (4096 rounds per network). SHA-1 is written out here rather than
//! pulled in from RustCrypto (`pbkdf2` + `sha1`): those are about 4× faster on a CPU with SHA
//! extensions (254 PMKs: 195 ms against 780 ms here, 1.9 s before the pads were precomputed),
//! but nvs-build's tree with `encryption` already holds 29 crates against a budget of 25
//! (ARCHITECTURE.md). It reproduces a public derivation and guards no secret.

#[derive(Default, Clone, Debug)]
pub(crate) struct WifiState {
    ap_ssid: Option<String>,
    ap_passwd: Option<String>,
    ap_authmode: Option<String>,
    sta_extras_written: bool,
}

/// What the builder writes around one item.
pub(crate) struct WifiExtras {
    pub before: Vec<(&'static str, Vec<u8>)>,
    pub after: Vec<(&'static str, Vec<u8>)>,
}

impl WifiState {
    /// Whether `key` is one of the names the reference reacts to.
    pub(crate) fn is_trigger(key: &str) -> bool {
        matches!(
            key,
            "ap.ssid" | "ap.passwd" | "ap.authmode" | "sta.ssid" | "sta.pswd"
        )
    }

    /// Updates the state for an item with `key` whose source text is `text`, and returns the
    /// blobs to write before and after it.
    pub(crate) fn extras_for(&mut self, key: &str, text: &str) -> WifiExtras {
        let mut extras = WifiExtras {
            before: Vec::new(),
            after: Vec::new(),
        };
        match key {
            "ap.ssid" => self.ap_ssid = Some(text.to_owned()),
            "ap.passwd" => self.ap_passwd = Some(text.to_owned()),
            "ap.authmode" if text != "0" => self.ap_authmode = Some(text.to_owned()),
            "sta.ssid" | "sta.pswd" if !self.sta_extras_written => {
                self.sta_extras_written = true;
                extras.after.push(("sta.apinfo", vec![0xFF; 140]));
                extras.after.push(("sta.pmk", vec![0x00; 32]));
                extras.after.push(("sta.apsw", vec![0x00; 2]));
                return extras;
            }
            _ => {}
        }
        let is_ap_key = matches!(key, "ap.ssid" | "ap.passwd" | "ap.authmode");
        let known = |v: &Option<String>| v.as_deref().filter(|s| !s.is_empty()).map(str::to_owned);
        if let (true, Some(ssid), Some(pass), Some(_)) = (
            is_ap_key,
            known(&self.ap_ssid),
            known(&self.ap_passwd),
            known(&self.ap_authmode),
        ) {
            let mut pmk_info = vec![0u8; 100];
            pmk_info.extend_from_slice(&pbkdf2_hmac_sha1(pass.as_bytes(), ssid.as_bytes(), 4096));
            extras.before.push(("ap.pmk_info", pmk_info));
        }
        extras
    }
}

/// The 32-byte WPA PMK: PBKDF2-HMAC-SHA1(password, salt = SSID, iterations).
///
/// The HMAC key's inner and outer pads are compressed once; each of the 2 × 4096 iterations is
/// then two SHA-1 compressions of one block, without allocating.
fn pbkdf2_hmac_sha1(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut key = [0u8; 64];
    if password.len() > 64 {
        key[..20].copy_from_slice(&sha1(password));
    } else {
        key[..password.len()].copy_from_slice(password);
    }
    let padded = |pad: u8| {
        let mut block = [0u8; 64];
        for (b, k) in block.iter_mut().zip(key) {
            *b = k ^ pad;
        }
        let mut state = SHA1_INIT;
        compress(&mut state, &block);
        state
    };
    let (inner, outer) = (padded(0x36), padded(0x5c));
    // HMAC of a 20-byte message (a previous U): one block each for the inner and outer hash.
    let hmac20 = |message: &[u8; 20]| -> [u8; 20] {
        let inner_hash = finish_after_block(inner, message);
        finish_after_block(outer, &inner_hash)
    };
    let mut out = [0u8; 32];
    for (block_index, chunk) in out.chunks_mut(20).enumerate() {
        let mut message = salt.to_vec();
        message.extend_from_slice(&(block_index as u32 + 1).to_be_bytes());
        let mut u = finish_after_block(outer, &sha1_after_block(inner, &message));
        let mut t = u;
        for _ in 1..iterations {
            u = hmac20(&u);
            for (t, u) in t.iter_mut().zip(u.iter()) {
                *t ^= u;
            }
        }
        chunk.copy_from_slice(&t[..chunk.len()]);
    }
    out
}

const SHA1_INIT: [u32; 5] = [
    0x6745_2301,
    0xEFCD_AB89,
    0x98BA_DCFE,
    0x1032_5476,
    0xC3D2_E1F0,
];

/// SHA-1 of a 64-byte block already compressed into `state`, followed by a 20-byte message:
/// one more block.
fn finish_after_block(mut state: [u32; 5], message: &[u8; 20]) -> [u8; 20] {
    let mut block = [0u8; 64];
    block[..20].copy_from_slice(message);
    block[20] = 0x80;
    block[56..].copy_from_slice(&((64u64 + 20) * 8).to_be_bytes());
    compress(&mut state, &block);
    digest_bytes(state)
}

/// SHA-1 of a 64-byte block already compressed into `state`, followed by `data`.
fn sha1_after_block(state: [u32; 5], data: &[u8]) -> [u8; 20] {
    sha1_with(state, 64, data)
}

/// SHA-1 (FIPS 180-4).
fn sha1(data: &[u8]) -> [u8; 20] {
    sha1_with(SHA1_INIT, 0, data)
}

/// Continues a hash whose first `done` bytes (a multiple of 64) are compressed into `state`.
fn sha1_with(mut state: [u32; 5], done: u64, data: &[u8]) -> [u8; 20] {
    let mut blocks = data.chunks_exact(64);
    for block in &mut blocks {
        compress(&mut state, block.try_into().unwrap_or(&[0; 64]));
    }
    let rest = blocks.remainder();
    let bit_len = (done + data.len() as u64).wrapping_mul(8);
    let mut tail = [0u8; 128];
    tail[..rest.len()].copy_from_slice(rest);
    tail[rest.len()] = 0x80;
    let tail_len = if rest.len() < 56 { 64 } else { 128 };
    tail[tail_len - 8..tail_len].copy_from_slice(&bit_len.to_be_bytes());
    for block in tail[..tail_len].chunks_exact(64) {
        compress(&mut state, block.try_into().unwrap_or(&[0; 64]));
    }
    digest_bytes(state)
}

fn digest_bytes(state: [u32; 5]) -> [u8; 20] {
    let mut out = [0u8; 20];
    for (chunk, word) in out.chunks_mut(4).zip(state) {
        chunk.copy_from_slice(&word.to_be_bytes());
    }
    out
}

/// The SHA-1 compression function on one 64-byte block.
fn compress(h: &mut [u32; 5], block: &[u8; 64]) {
    let mut w = [0u32; 80];
    for (i, word) in block.chunks_exact(4).enumerate() {
        w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
    }
    for i in 16..80 {
        w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
    }
    let [mut a, mut b, mut c, mut d, mut e] = *h;
    for (i, wi) in w.iter().enumerate() {
        let (f, k) = match i {
            0..=19 => ((b & c) | (!b & d), 0x5A82_7999),
            20..=39 => (b ^ c ^ d, 0x6ED9_EBA1),
            40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1B_BCDC),
            _ => (b ^ c ^ d, 0xCA62_C1D6),
        };
        let temp = a
            .rotate_left(5)
            .wrapping_add(f)
            .wrapping_add(e)
            .wrapping_add(k)
            .wrapping_add(*wi);
        e = d;
        d = c;
        c = b.rotate_left(30);
        b = a;
        a = temp;
    }
    for (h, v) in h.iter_mut().zip([a, b, c, d, e]) {
        *h = h.wrapping_add(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::hex;

    #[test]
    fn sha1_known_answers() {
        assert_eq!(
            hex(&sha1(b"abc")),
            "a9993e364706816aba3e25717850c26c9cd0d89d"
        );
        assert_eq!(hex(&sha1(b"")), "da39a3ee5e6b4b0d3255bfef95601890afd80709");
        let long = b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
        assert_eq!(hex(&sha1(long)), "84983e441c3bd26ebaae4aa1f95129e5e54670f1");
        // Several blocks, and a tail that needs a second padding block.
        assert_eq!(
            hex(&sha1(&[b'a'; 1000])),
            "291e9a6c66994949b57ba5e650361e98fc36b1ba"
        );
        assert_eq!(
            hex(&sha1(&[b'a'; 60])),
            "13d956033d9af449bfe2c4ef78c17c20469c4bf1"
        );
    }

    #[test]
    fn pbkdf2_rfc6070() {
        // RFC 6070 test vector 2 (first 20 bytes) and the IEEE 802.11i PSK test vector.
        let dk = pbkdf2_hmac_sha1(b"password", b"salt", 2);
        assert_eq!(hex(&dk[..20]), "ea6c014dc72d6f8ccd1ed92ace1d41f0d8de8957");
        // A password longer than a block is hashed first (RFC 6070 vector 5, first 20 bytes).
        let dk = pbkdf2_hmac_sha1(
            b"passwordPASSWORDpassword",
            b"saltSALTsaltSALTsaltSALTsaltSALTsalt",
            4096,
        );
        assert_eq!(hex(&dk[..20]), "3d2eec4fe41c849b80c8d83662c0e44a8b291a96");
        let long_key = pbkdf2_hmac_sha1(&[b'k'; 100], b"ssid", 2);
        // Python: hashlib.pbkdf2_hmac("sha1", b"k" * 100, b"ssid", 2, 32)
        assert_eq!(
            hex(&long_key),
            "74268e3f968e610fac738942835eb4108e6738f6fb904a77e1ce1be6661bb6b6"
        );
        let psk = pbkdf2_hmac_sha1(b"password", b"IEEE", 4096);
        assert_eq!(
            hex(&psk),
            "f42c6fc52df0ebef9ebb4b90b38a5f902e83fe1b135a70e23aed762e9710a12e"
        );
    }
}
