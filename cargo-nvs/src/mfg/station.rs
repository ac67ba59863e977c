//! `cargo nvs mfg station`: a flashing station. Per port, a loop: wait for a chip, claim the
//! next device, flash it (with the firmware, in one connection and one write), verify, log,
//! report PASS or FAIL, then wait until that chip is gone or replaced. It ends when the batch is
//! exhausted, or when asked to stop (Ctrl-C): a device being written is finished, a claimed one
//! not yet written is given back.
//!
//! What happens is told as [`Event`]s to a [`Report`]; the binary prints them as lines or JSON.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use espflash::target::ProgressCallbacks;

use super::flash::{
    ChipInfo, Claim, MfgFlashArgs, MfgFlashError, Production, SegmentProgress, chip_of,
    connect_args, device_segments, flash_connected, give_up, hold, logged, station,
};
use super::ledger::{Issued, Ledger};
use crate::flashing::{After, Before, FlashingError, Session, connect};

/// Run a flashing station: per port, wait for a board, flash the next device onto it, report
/// PASS/FAIL, wait for the next board.
///
/// A board is there when its port exists and the ROM loader answers (hold BOOT, or use a fixture
/// with auto-reset); it is gone when the port disappears or another chip (another MAC) answers.
/// A failed write is retried on the same chip (--retries), at a lower baud each time (921600 →
/// 460800 → 115200); a device that still fails is logged as failed and goes back to the pool.
/// Every attempt, refused or failed, is in the production log. Ends with exit code 3 when every
/// device is flashed ("nothing left to flash"), or on Ctrl-C (exit 130) once the boards being
/// written are done; devices claimed but not written are given back.
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  cargo nvs mfg station --port /dev/ttyUSB0 --port /dev/ttyUSB1 --firmware target/nvs-dist/fw --baud 921600\n  cargo nvs mfg station --port /dev/serial/by-path/… --format json   (one JSON event per line, for the MES)"
)]
pub struct StationArgs {
    #[command(flatten)]
    pub flash: MfgFlashArgs,
    /// Retry a failed device this many times on the same chip, one baud step lower each time.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub retries: u32,
}

/// What happened at a port.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// Waiting for a board.
    Waiting,
    /// A chip answers.
    Connected { mac: String, chip: String },
    /// The device to flash onto it.
    Claimed { mac: String, device: String },
    /// Bytes of the write so far (segments the chip already held count as written).
    Progress {
        device: String,
        written: usize,
        total: usize,
    },
    /// PASS: written, verified and logged.
    Done {
        mac: String,
        device: String,
        /// The firmware written with it (`--firmware`).
        firmware_sha256: Option<String>,
        bytes: usize,
        seconds: f64,
    },
    /// An attempt failed or was refused (`retrying`: another attempt follows, at `baud`).
    Failed {
        mac: String,
        device: Option<String>,
        error: String,
        attempt: u32,
        retrying: bool,
        baud: Option<u32>,
    },
    /// The port cannot be used as it is (busy, no permission, another chip type, no MAC).
    Trouble { error: String },
    /// This board holds a device already (flashed and logged): it is not flashed again.
    AlreadyFlashed { mac: String, device: String },
    /// The board was taken away (its port vanished, or another chip answers).
    Removed { mac: String },
    /// Every device of the batch is flashed (or held by another station).
    NothingLeft,
    /// Stopped on request.
    Stopped,
}

/// Where a station's events go: called from every port's thread.
pub trait Report: Sync {
    fn event(&self, port: &str, event: &Event);
}

/// Why a station ended without an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// The batch is exhausted (`mfg flash`'s [`NOTHING_LEFT`](super::flash::NOTHING_LEFT)).
    NothingLeft,
    /// Asked to stop.
    Stopped,
}

/// How often a port is looked at while waiting for a board, and how often a board that stays
/// is asked who it is.
const POLL: Duration = Duration::from_millis(100);
const PROBE: Duration = Duration::from_millis(700);
/// How often a waiting port asks the ledger whether anything is left (a query over the whole
/// batch: not at every probe).
const LEDGER_CHECK: Duration = Duration::from_secs(2);

/// The bauds a failing device steps down through.
const BAUDS: [u32; 3] = [921_600, 460_800, 115_200];

/// Runs the station until the batch is exhausted or `stop` is set.
pub fn run(
    args: &StationArgs,
    report: &dyn Report,
    stop: &AtomicBool,
) -> Result<Ended, MfgFlashError> {
    if args.flash.device.is_some() {
        return Err(MfgFlashError::Invalid(
            "--device names one device; a station flashes the next one onto each board (use \
             `cargo nvs mfg flash --device ID`)"
                .into(),
        ));
    }
    if args.flash.force {
        return Err(MfgFlashError::Invalid(
            "--force is not for a station: it would apply to every board (use `cargo nvs mfg \
             flash --force` on the one board that needs it)"
                .into(),
        ));
    }
    if args.flash.ports.is_empty() {
        return Err(MfgFlashError::Invalid(
            "give the station's ports with --port (one per board socket)".into(),
        ));
    }
    let production = Production::open(&args.flash)?;
    let station = Station {
        args,
        baud: args.flash.baud.or_else(crate::settings::baud),
        production: &production,
        report,
        stop,
    };
    let ends: Vec<Result<Ended, MfgFlashError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = args
            .flash
            .ports
            .iter()
            .map(|port| {
                let station = &station;
                scope.spawn(move || {
                    let end = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        station.serve(port)
                    }))
                    .unwrap_or_else(|_| {
                        Err(MfgFlashError::Invalid(format!(
                            "the thread of port `{port}` panicked (see above)"
                        )))
                    });
                    if end.is_err() {
                        // A port that cannot go on (the ledger is gone): the others stop too,
                        // finishing their boards, rather than run on without it.
                        station.stop.store(true, Ordering::SeqCst);
                    }
                    end
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(MfgFlashError::Invalid("a port's thread panicked".into()))
                })
            })
            .collect()
    });
    let mut ended = Ended::NothingLeft;
    for end in ends {
        if end? == Ended::Stopped {
            ended = Ended::Stopped;
        }
    }
    Ok(ended)
}

struct Station<'a> {
    args: &'a StationArgs,
    /// `--baud`, else espflash's settings: where retries step down from.
    baud: Option<u32>,
    production: &'a Production,
    report: &'a dyn Report,
    stop: &'a AtomicBool,
}

/// What waiting at a port ended with.
enum Wait {
    Chip(Box<Session>, ChipInfo),
    /// The board was taken away.
    Gone,
    NothingLeft,
    Stopped,
}

impl Station<'_> {
    fn ledger(&self) -> &dyn Ledger {
        &*self.production.ledger
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// One port's loop.
    fn serve(&self, port: &str) -> Result<Ended, MfgFlashError> {
        let claimant = station(Some(port));
        let mut next = None;
        loop {
            let (session, chip) = match next.take() {
                Some(chip) => chip,
                None => match self.wait_for_chip(port)? {
                    Wait::Chip(session, chip) => (session, chip),
                    Wait::Gone => continue,
                    Wait::NothingLeft => return Ok(self.nothing_left(port)),
                    Wait::Stopped => return Ok(self.stopped_at(port)),
                },
            };
            self.report.event(
                port,
                &Event::Connected {
                    mac: chip.mac.clone(),
                    chip: session.chip().to_string(),
                },
            );
            if let Some(device) = self.ledger().device_on_mac(&chip.mac)? {
                // A board that passed, seen again (re-seated, or its port came back after a
                // reset): it keeps its device, and no second one is claimed for it.
                self.report.event(
                    port,
                    &Event::AlreadyFlashed {
                        mac: chip.mac.clone(),
                        device,
                    },
                );
                drop(session);
                match self.wait_for_change(port, &chip.mac)? {
                    Wait::Chip(session, chip) => next = Some((session, chip)),
                    Wait::Gone => {}
                    Wait::NothingLeft => return Ok(self.nothing_left(port)),
                    Wait::Stopped => return Ok(self.stopped_at(port)),
                }
                continue;
            }
            let Some(device) = self
                .ledger()
                .claim_next(&claimant, &self.production.batches)?
            else {
                return Ok(self.nothing_left(port));
            };
            self.report.event(
                port,
                &Event::Claimed {
                    mac: chip.mac.clone(),
                    device: device.device.clone(),
                },
            );
            if self.flash(port, &claimant, session, &chip, &device)? == Some(Ended::Stopped) {
                return Ok(self.stopped_at(port));
            }
            match self.wait_for_change(port, &chip.mac)? {
                Wait::Chip(session, chip) => next = Some((session, chip)),
                Wait::Gone => {}
                Wait::NothingLeft => return Ok(self.nothing_left(port)),
                Wait::Stopped => return Ok(self.stopped_at(port)),
            }
        }
    }

    fn nothing_left(&self, port: &str) -> Ended {
        self.report.event(port, &Event::NothingLeft);
        Ended::NothingLeft
    }

    fn stopped_at(&self, port: &str) -> Ended {
        self.report.event(port, &Event::Stopped);
        Ended::Stopped
    }

    /// Every device of the station's batches is flashed or held for the chip a write of it went
    /// to (claimed ones are not: their flash may still fail and give them back).
    fn exhausted(&self) -> Result<bool, MfgFlashError> {
        let batches = &self.production.batches;
        let ours: Vec<_> = self
            .ledger()
            .status()?
            .into_iter()
            .filter(|b| batches.iter().any(|dir| dir == Path::new(&b.batch)))
            .collect();
        // Devices held for a chip that may hold them (written, never logged) are not to be had.
        Ok(!ours.is_empty() && ours.iter().all(|b| b.remaining <= b.unlogged))
    }

    /// Connects to the chip at `port`, at `baud`: `None` while no chip answers there (no port,
    /// no sync), an error for what an operator must see (a busy port, no permission, another
    /// chip type, no MAC). Without `reset`, the chip is neither reset into the loader nor
    /// afterwards: a board that passed and runs its app is left alone.
    fn probe(
        &self,
        port: &str,
        baud: Option<u32>,
        reset: bool,
    ) -> Result<Option<(Box<Session>, ChipInfo)>, MfgFlashError> {
        if cfg!(unix) && !Path::new(port).exists() {
            return Ok(None);
        }
        let firmware = self.production.target.firmware.is_some();
        let mut args = connect_args(&self.args.flash, Some(port.to_owned()), baud);
        if !reset {
            (args.before, args.after) = (Before::NoReset, After::NoReset);
        }
        let mut session = match connect(&args, true, firmware) {
            Ok(session) => session,
            Err(FlashingError::Connect { .. }) => return Ok(None),
            Err(FlashingError::Port(why)) if why.contains("does not exist") => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let chip = chip_of(&mut session)?;
        Ok(Some((Box::new(session), chip)))
    }

    /// Reports a probe's error once (until it changes).
    fn trouble(&self, port: &str, last: &mut String, error: MfgFlashError) {
        let text = error.to_string();
        if *last != text {
            self.report.event(
                port,
                &Event::Trouble {
                    error: text.clone(),
                },
            );
            *last = text;
        }
    }

    /// Waits until a chip answers at `port`.
    fn wait_for_chip(&self, port: &str) -> Result<Wait, MfgFlashError> {
        self.report.event(port, &Event::Waiting);
        let mut checked = Instant::now();
        let mut last = String::new();
        loop {
            if self.stopped() {
                return Ok(Wait::Stopped);
            }
            if checked.elapsed() >= LEDGER_CHECK {
                if self.exhausted()? {
                    return Ok(Wait::NothingLeft);
                }
                checked = Instant::now();
            }
            match self.probe(port, self.baud, true) {
                Ok(Some((session, chip))) => return Ok(Wait::Chip(session, chip)),
                Ok(None) => {}
                Err(e) => self.trouble(port, &mut last, e),
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits until the chip `mac` is taken away (its port vanishes) or replaced (another chip
    /// answers: it is returned).
    fn wait_for_change(&self, port: &str, mac: &str) -> Result<Wait, MfgFlashError> {
        let mut probed = Instant::now();
        let plugged = device_file(port);
        let mut counted = Instant::now();
        let mut last = String::new();
        loop {
            if self.stopped() {
                return Ok(Wait::Stopped);
            }
            if cfg!(unix) && !Path::new(port).exists() {
                self.report.event(port, &Event::Removed { mac: mac.into() });
                return Ok(Wait::Gone);
            }
            // A stable name (a udev or fixture link) that now leads to another device file: a
            // new board; ask at once.
            let moved = plugged.is_some() && device_file(port) != plugged;
            if counted.elapsed() >= LEDGER_CHECK {
                if self.exhausted()? {
                    return Ok(Wait::NothingLeft);
                }
                counted = Instant::now();
            }
            if moved || probed.elapsed() >= PROBE {
                // Without resets: a board that passed runs its app undisturbed; a new board
                // answers once it is in the loader (a fixture holding BOOT), or its port is new.
                match self.probe(port, self.baud, moved) {
                    Ok(Some((session, chip))) if chip.mac != mac => {
                        self.report.event(port, &Event::Removed { mac: mac.into() });
                        let resets = (self.args.flash.before, self.args.flash.after)
                            != (Before::NoReset, After::NoReset);
                        if moved || !resets {
                            return Ok(Wait::Chip(session, chip));
                        }
                        // A new board found without a reset: connect again as `--before` and
                        // `--after` say, so that it is reset as asked when it is done.
                        drop(session);
                        return self.wait_for_chip(port);
                    }
                    Ok(_) => {}
                    Err(e) => self.trouble(port, &mut last, e),
                }
                probed = Instant::now();
            }
            std::thread::sleep(POLL);
        }
    }

    /// Flashes the claimed `device` onto the connected chip, retrying on the same chip. `None`
    /// when it is done (PASS or FAIL, reported); `Some(Stopped)` when it was given back unwritten
    /// because the station stops. An error that does not depend on the chip (the device's files)
    /// stops the station: every board would fail on it.
    fn flash(
        &self,
        port: &str,
        claimant: &str,
        session: Box<Session>,
        chip: &ChipInfo,
        device: &Issued,
    ) -> Result<Option<Ended>, MfgFlashError> {
        let (args, target, ledger) = (&self.args.flash, &self.production.target, self.ledger());
        let port_name = Some(port.to_owned());
        let label = format!("[{port}] {}", device.device);
        let mut claim = Claim {
            ledger,
            device: &device.device,
            claimant,
            keep: false,
        };
        let failed = |error: &MfgFlashError, attempt: u32, retrying: bool, baud: Option<u32>| {
            self.report.event(
                port,
                &Event::Failed {
                    mac: chip.mac.clone(),
                    device: Some(device.device.clone()),
                    error: error.to_string(),
                    attempt,
                    retrying,
                    baud,
                },
            )
        };
        // A device made from the chip is built for this chip's MAC.
        let (built, segments) =
            match device_segments(target, ledger, device, &label, Some(&chip.mac)) {
                Ok(prepared) => prepared,
                Err(e) => {
                    let e = logged(ledger, target, device, &port_name, &chip.mac, Err(e))
                        .expect_err("an error stays one");
                    failed(&e, 1, false, self.baud);
                    return Err(e);
                }
            };
        let device = &built;
        let mut session = Some(session);
        let mut baud = self.baud;
        let mut attempt = 1;
        // The last attempt wrote to this chip and failed verification: the retry replaces
        // what it left without asking the guard (which would see damaged data).
        let mut rewrite = false;
        loop {
            if self.stopped() && !rewrite {
                // Claimed but not written: `claim` gives it back.
                return Ok(Some(Ended::Stopped));
            }
            let mut current = match session.take() {
                Some(session) => session,
                None => match self.probe(port, baud, false) {
                    Ok(Some((session, again))) if again.mac == chip.mac => session,
                    other => {
                        // No sync at this baud (or another board): one step lower while
                        // attempts are left; else what the failed write left stays held.
                        let why = match other {
                            Ok(Some(_)) => "another board answers".to_owned(),
                            Err(e) => e.to_string(),
                            Ok(None) => "no answer".to_owned(),
                        };
                        let e = MfgFlashError::Invalid(format!(
                            "the chip {} is not there for attempt {attempt} at `{port}` ({why})",
                            chip.mac
                        ));
                        let retry = attempt <= self.args.retries && !self.stopped();
                        let next_baud = if retry { step_down(baud) } else { baud };
                        failed(&e, attempt, retry, next_baud);
                        if retry {
                            baud = next_baud;
                            attempt += 1;
                            continue;
                        }
                        if rewrite {
                            hold(
                                &mut claim,
                                target,
                                device,
                                &port_name,
                                &chip.mac,
                                &format!(
                                    "{e}; what the failed write left on this chip was not erased"
                                ),
                            )?;
                        }
                        return Ok(None);
                    }
                },
            };
            let mut progress = StationProgress::new(self.report, port, &device.device);
            let started = Instant::now();
            let result = flash_connected(
                args,
                target,
                &mut current,
                chip,
                device,
                &segments,
                &mut claim,
                &port_name,
                &label,
                &mut progress,
                rewrite,
            );
            let error = match result {
                Ok(()) => {
                    self.report.event(
                        port,
                        &Event::Done {
                            mac: chip.mac.clone(),
                            device: device.device.clone(),
                            firmware_sha256: target.firmware.as_ref().map(|f| f.sha256.clone()),
                            bytes: progress.total,
                            seconds: started.elapsed().as_secs_f64(),
                        },
                    );
                    return Ok(None);
                }
                Err(MfgFlashError::Ledger(e)) => return Err(MfgFlashError::Ledger(e)),
                Err(e) => e,
            };
            let wrote = matches!(error, MfgFlashError::Write(_));
            let retry = attempt <= self.args.retries && retryable(&error) && !self.stopped();
            let next_baud = if retry { step_down(baud) } else { baud };
            if !retry && wrote {
                // The last attempt: the chip keeps no copy of the device.
                give_up(
                    &mut current,
                    target,
                    device,
                    &segments,
                    &mut claim,
                    &port_name,
                    &chip.mac,
                )?;
            }
            let error = logged(ledger, target, device, &port_name, &chip.mac, Err(error))
                .expect_err("an error stays one");
            drop(current);
            failed(&error, attempt, retry, next_baud);
            if !retry {
                return Ok(None);
            }
            rewrite |= wrote;
            baud = next_baud;
            attempt += 1;
        }
    }
}

/// What the port's path leads to (on Unix: the device file's device and inode), to tell when
/// a stable name starts to lead elsewhere.
fn device_file(port: &str) -> Option<(u64, u64)> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(port).ok().map(|m| (m.dev(), m.ino()))
    }
    #[cfg(not(unix))]
    {
        let _ = port;
        None
    }
}

/// A write that failed may pass on the same chip (a glitch, a baud too high); a refusal will
/// not.
fn retryable(error: &MfgFlashError) -> bool {
    match error {
        MfgFlashError::Logged(inner) => retryable(inner),
        MfgFlashError::Write(_) | MfgFlashError::Chip(_) | MfgFlashError::Flashing(_) => true,
        _ => false,
    }
}

/// The next lower baud (at 115200, or when none was given, it stays).
fn step_down(baud: Option<u32>) -> Option<u32> {
    let baud = baud?;
    Some(
        BAUDS
            .iter()
            .copied()
            .find(|b| *b < baud)
            .unwrap_or(baud.min(115_200)),
    )
}

/// espflash's progress as [`Event::Progress`], at most a few times a second.
struct StationProgress<'a> {
    report: &'a dyn Report,
    port: &'a str,
    device: &'a str,
    segments: Vec<(u32, usize)>,
    /// The segments finished (espflash goes through them in order).
    finished: usize,
    /// Bytes of the segments finished, and of the whole write.
    done: usize,
    total: usize,
    current: (usize, usize),
    last: Option<Instant>,
}

impl<'a> StationProgress<'a> {
    fn new(report: &'a dyn Report, port: &'a str, device: &'a str) -> StationProgress<'a> {
        StationProgress {
            report,
            port,
            device,
            segments: Vec::new(),
            finished: 0,
            done: 0,
            total: 0,
            current: (0, 0),
            last: None,
        }
    }

    fn send(&mut self, written: usize, force: bool) {
        if !force
            && self
                .last
                .is_some_and(|t| t.elapsed() < Duration::from_millis(250))
        {
            return;
        }
        self.last = Some(Instant::now());
        self.report.event(
            self.port,
            &Event::Progress {
                device: self.device.to_owned(),
                written,
                total: self.total,
            },
        );
    }
}

impl SegmentProgress for StationProgress<'_> {
    fn segments(&mut self, segments: &[(u32, usize)]) {
        self.segments = segments.to_vec();
        self.total = segments.iter().map(|(_, len)| len).sum();
    }
}

impl ProgressCallbacks for StationProgress<'_> {
    fn init(&mut self, addr: u32, blocks: usize) {
        let bytes = self
            .segments
            .iter()
            .find(|(a, _)| *a == addr)
            .map_or(0, |(_, len)| *len);
        self.current = (bytes, blocks.max(1));
    }

    fn update(&mut self, block: usize) {
        let (bytes, blocks) = self.current;
        let written = self.done + bytes * block.min(blocks) / blocks;
        self.send(written, false);
    }

    fn verifying(&mut self) {}

    fn finish(&mut self, _skipped: bool) {
        // A skipped segment (the chip holds it) had no `init`: its bytes count as written too.
        let bytes = self
            .segments
            .get(self.finished)
            .map_or(self.current.0, |(_, len)| *len);
        self.finished += 1;
        self.done += bytes;
        self.current = (0, 1);
        self.send(self.done, true);
    }
}
