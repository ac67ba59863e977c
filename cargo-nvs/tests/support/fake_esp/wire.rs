//! Wire time: each byte in or out costs 10 bit times (start, 8 data, stop) at the baud in
//! force, as on a UART cable. Off by default; see [`Config::wire_time`](super::Config::wire_time).
//!
//! Each direction has a [`Line`], a deadline clock: a run of bytes that follow each other
//! without a pause is one period, whose deadline is computed from the period's start and its
//! total byte count (not by adding rounded per-chunk durations), so sleeping in small chunks
//! does not drift. The emulator sleeps until a chunk's deadline before it decodes received
//! bytes or hands sent bytes to the pty, so the client sees a reply no sooner than a cable
//! would deliver it, and the pty's buffer throttles a client that writes ahead.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// The baud the ROM loader starts at (and the application prints at).
pub const DEFAULT_BAUD: u32 = 115_200;

/// Bits a byte takes on the wire: start bit, 8 data bits, stop bit.
pub const BITS_PER_BYTE: u64 = 10;

/// Setting this environment variable to `1` turns wire time on for every emulator started
/// without an explicit [`Config::wire_time`](super::Config::wire_time) (e.g. for a benchmark
/// run of existing tests).
pub const WIRE_TIME_ENV: &str = "NVS_TEST_WIRE_TIME";

/// Whether [`WIRE_TIME_ENV`] asks for wire time.
pub fn wire_time_from_env() -> bool {
    std::env::var_os(WIRE_TIME_ENV).is_some_and(|v| v == "1")
}

/// What crossed the wire: bytes per direction and baud, and the time the emulator's pacing
/// clock scheduled for them. Take it with [`FakeEsp::wire`](super::FakeEsp::wire).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Wire {
    /// Whether the emulator paced the wire (wire time on).
    pub paced: bool,
    /// Bytes the chip received (client to chip), by baud.
    pub received: BTreeMap<u32, u64>,
    /// Bytes the chip sent (chip to client), by baud.
    pub sent: BTreeMap<u32, u64>,
    /// Time the receive clock scheduled (zero with wire time off).
    pub received_clock: Duration,
    /// Time the send clock scheduled (zero with wire time off).
    pub sent_clock: Duration,
    /// Periods of each clock (runs of bytes without a pause, or at one baud): each period's
    /// length is rounded down to a whole nanosecond once.
    pub clock_periods: u64,
    /// From the first byte in or out to the last one's deadline (`None` before any traffic).
    pub active: Option<Duration>,
}

impl Wire {
    /// Seconds `bytes` take at each baud: Σ bytes × 10 / baud.
    pub fn seconds_of(bytes: &BTreeMap<u32, u64>) -> f64 {
        bytes
            .iter()
            .map(|(&baud, &n)| (n * BITS_PER_BYTE) as f64 / f64::from(baud))
            .sum()
    }

    /// The wire limit of what was received, from the counters.
    pub fn received_seconds(&self) -> f64 {
        Wire::seconds_of(&self.received)
    }

    /// The wire limit of what was sent, from the counters.
    pub fn sent_seconds(&self) -> f64 {
        Wire::seconds_of(&self.sent)
    }

    /// The wire limit of the whole conversation, both directions: the least time it can take
    /// when requests and replies alternate.
    pub fn seconds(&self) -> f64 {
        self.received_seconds() + self.sent_seconds()
    }

    /// What the two clocks scheduled, in seconds (zero with wire time off).
    pub fn clock_seconds(&self) -> f64 {
        (self.received_clock + self.sent_clock).as_secs_f64()
    }

    pub fn bytes_received(&self) -> u64 {
        self.received.values().sum()
    }

    pub fn bytes_sent(&self) -> u64 {
        self.sent.values().sum()
    }
}

/// One direction's deadline clock.
#[derive(Debug)]
pub struct Line {
    /// Start of the current period.
    anchor: Instant,
    baud: u32,
    /// Bytes of the current period.
    bytes: u64,
    /// Length of the closed periods.
    closed: Duration,
    periods: u64,
}

impl Line {
    pub fn new(now: Instant) -> Line {
        Line {
            anchor: now,
            baud: DEFAULT_BAUD,
            bytes: 0,
            closed: Duration::ZERO,
            periods: 0,
        }
    }

    fn length(&self) -> Duration {
        byte_time(usize::try_from(self.bytes).unwrap_or(usize::MAX), self.baud)
    }

    /// When the last byte passed so far has crossed the wire.
    pub fn due(&self) -> Instant {
        self.anchor + self.length()
    }

    /// `n` more bytes at `baud`; returns when the last of them has crossed. `continuous`: they
    /// were already waiting, so the line did not go idle since the last deadline; otherwise they
    /// start at `now` if the line is idle by then.
    pub fn pass(&mut self, n: usize, baud: u32, now: Instant, continuous: bool) -> Instant {
        let due = self.due();
        let start = if continuous { due } else { due.max(now) };
        if self.bytes == 0 || baud != self.baud || start != due {
            if self.bytes > 0 {
                self.closed += self.length();
            }
            self.anchor = start;
            self.baud = baud;
            self.bytes = 0;
            self.periods += 1;
        }
        self.bytes += n as u64;
        self.due()
    }

    /// The time scheduled so far.
    pub fn scheduled(&self) -> Duration {
        self.closed + self.length()
    }

    pub fn periods(&self) -> u64 {
        self.periods
    }
}

/// The emulator's wire state: both clocks and the counters.
#[derive(Debug)]
pub struct WireState {
    pub rx: Line,
    pub tx: Line,
    pub received: BTreeMap<u32, u64>,
    pub sent: BTreeMap<u32, u64>,
    first: Option<Instant>,
    last: Option<Instant>,
}

impl WireState {
    pub fn new(now: Instant) -> WireState {
        WireState {
            rx: Line::new(now),
            tx: Line::new(now),
            received: BTreeMap::new(),
            sent: BTreeMap::new(),
            first: None,
            last: None,
        }
    }

    /// Records `n` bytes in one direction that are done crossing at `done`.
    pub fn count(&mut self, received: bool, n: usize, baud: u32, start: Instant, done: Instant) {
        let map = if received {
            &mut self.received
        } else {
            &mut self.sent
        };
        *map.entry(baud).or_insert(0) += n as u64;
        self.first = Some(self.first.map_or(start, |f| f.min(start)));
        self.last = Some(self.last.map_or(done, |l| l.max(done)));
    }

    pub fn snapshot(&self, paced: bool) -> Wire {
        Wire {
            paced,
            received: self.received.clone(),
            sent: self.sent.clone(),
            received_clock: self.rx.scheduled(),
            sent_clock: self.tx.scheduled(),
            clock_periods: self.rx.periods() + self.tx.periods(),
            active: self.first.zip(self.last).map(|(f, l)| l - f),
        }
    }
}

/// How long `n` bytes take at `baud` (rounded down to a nanosecond).
pub fn byte_time(n: usize, baud: u32) -> Duration {
    let nanos = n as u128 * u128::from(BITS_PER_BYTE) * 1_000_000_000 / u128::from(baud.max(1));
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// Bytes handled at once while pacing: about a millisecond of wire time.
pub fn chunk_len(baud: u32) -> usize {
    (baud as usize / BITS_PER_BYTE as usize / 1000).max(1)
}

/// Sleeps until `deadline`, waking every 20 ms to look at `stop`.
pub fn sleep_until(deadline: Instant, stop: &AtomicBool) {
    loop {
        let now = Instant::now();
        if now >= deadline || stop.load(Ordering::SeqCst) {
            return;
        }
        thread::sleep((deadline - now).min(Duration::from_millis(20)));
    }
}
