//! SLIP framing as the ESP serial protocol uses it (RFC 1055 with a leading END).

const END: u8 = 0xC0;
const ESC: u8 = 0xDB;
const ESC_END: u8 = 0xDC;
const ESC_ESC: u8 = 0xDD;

/// Longest frame accepted; anything longer is garbage and is dropped whole.
/// (Largest legitimate request: a 16 KiB stub data block plus headers.)
const MAX_FRAME: usize = 64 * 1024;

/// Appends `packet` to `out` as one SLIP frame.
pub fn encode(out: &mut Vec<u8>, packet: &[u8]) {
    out.reserve(packet.len() + 8);
    out.push(END);
    for &b in packet {
        match b {
            END => out.extend_from_slice(&[ESC, ESC_END]),
            ESC => out.extend_from_slice(&[ESC, ESC_ESC]),
            _ => out.push(b),
        }
    }
    out.push(END);
}

/// Incremental decoder: feed it bytes as they arrive, collect whole frames.
/// Bytes outside a frame, bad escapes and oversized frames are discarded.
#[derive(Default)]
pub struct Decoder {
    buf: Vec<u8>,
    in_frame: bool,
    escaped: bool,
    bad: bool,
    /// Frames thrown away (bad escape or too long).
    pub discarded: u64,
}

impl Decoder {
    pub fn push(&mut self, bytes: &[u8], frames: &mut Vec<Vec<u8>>) {
        for &b in bytes {
            if b == END {
                if self.in_frame && (self.bad || !self.buf.is_empty()) {
                    if self.bad || self.escaped {
                        self.discarded += 1;
                    } else {
                        frames.push(std::mem::take(&mut self.buf));
                    }
                }
                self.buf.clear();
                self.in_frame = true;
                self.escaped = false;
                self.bad = false;
                continue;
            }
            if !self.in_frame || self.bad {
                continue;
            }
            if self.escaped {
                self.escaped = false;
                match b {
                    ESC_END => self.buf.push(END),
                    ESC_ESC => self.buf.push(ESC),
                    _ => self.bad = true,
                }
            } else if b == ESC {
                self.escaped = true;
            } else {
                self.buf.push(b);
            }
            if self.buf.len() > MAX_FRAME {
                self.bad = true;
                self.buf.clear();
            }
        }
    }
}
