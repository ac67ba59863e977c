//! `cargo nvs mfg station`: the station loop is the library's [`cargo_nvs::mfg::station`]; this
//! module shows its events (a line per port on a terminal, a line per event otherwise, or JSON
//! lines for a factory's MES) and turns Ctrl-C into a stop.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use cargo_nvs::mfg::flash::NOTHING_LEFT;
use cargo_nvs::mfg::station::{self, Ended, Event, Report, StationArgs};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::json;

use super::OutputFormat;
use super::error::CmdResult;

/// Exit code when the station was stopped with Ctrl-C (128 + SIGINT, as shells report it).
const INTERRUPTED: u8 = 130;

#[derive(clap::Args)]
pub struct StationCommand {
    #[command(flatten)]
    station: StationArgs,
    /// `text`: a line per port (on a terminal) or per event; `json`: one JSON object per event
    /// and line on stdout (connected, claimed, progress, done, failed, removed, …).
    #[arg(long, value_enum, default_value_t)]
    format: OutputFormat,
}

pub fn run(args: StationCommand) -> CmdResult<ExitCode> {
    static STOP: AtomicBool = AtomicBool::new(false);
    ctrlc::set_handler(|| {
        if STOP.swap(true, Ordering::SeqCst) {
            // A second Ctrl-C: stop now (claims lapse; a write cut off is finished by the
            // next flash of that board).
            std::process::exit(i32::from(INTERRUPTED));
        }
        eprintln!(
            "stopping: the boards being written are finished, devices not yet written are given \
             back (Ctrl-C again stops at once)"
        );
    })?;
    let report: Box<dyn Report> = match args.format {
        OutputFormat::Json => Box::new(JsonReport {
            started: Instant::now(),
        }),
        OutputFormat::Text => Box::new(TextReport::new(&args.station.flash.ports)),
    };
    let ended = station::run(&args.station, &*report, &STOP)?;
    drop(report);
    Ok(match ended {
        Ended::NothingLeft => {
            eprintln!(
                "nothing left to flash: every device of the batch is flashed, or claimed by \
                 another station"
            );
            ExitCode::from(NOTHING_LEFT)
        }
        Ended::Stopped => ExitCode::from(INTERRUPTED),
    })
}

/// One JSON object per event and line, on stdout.
struct JsonReport {
    started: Instant,
}

impl Report for JsonReport {
    fn event(&self, port: &str, event: &Event) {
        let mut value = match event {
            Event::Waiting => json!({"event": "waiting"}),
            Event::Connected { mac, chip } => {
                json!({"event": "connected", "mac": mac, "chip": chip})
            }
            Event::Claimed { mac, device } => {
                json!({"event": "claimed", "mac": mac, "device": device})
            }
            Event::Progress {
                device,
                written,
                total,
            } => json!({"event": "progress", "device": device, "written": written, "total": total}),
            Event::Done {
                mac,
                device,
                firmware_sha256,
                bytes,
                seconds,
            } => json!({
                "event": "done", "result": "PASS", "mac": mac, "device": device,
                "firmware_sha256": firmware_sha256, "bytes": bytes, "seconds": seconds,
            }),
            Event::Failed {
                mac,
                device,
                error,
                attempt,
                retrying,
                baud,
            } => json!({
                "event": "failed", "result": if *retrying { "RETRY" } else { "FAIL" },
                "mac": mac, "device": device, "error": error, "attempt": attempt,
                "retrying": retrying, "baud": baud,
            }),
            Event::Removed { mac } => json!({"event": "removed", "mac": mac}),
            Event::Trouble { error } => json!({"event": "trouble", "error": error}),
            Event::AlreadyFlashed { mac, device } => {
                json!({"event": "already-flashed", "mac": mac, "device": device})
            }
            Event::NothingLeft => json!({"event": "nothing-left"}),
            Event::Stopped => json!({"event": "stopped"}),
        };
        value["port"] = port.into();
        value["t"] = self.started.elapsed().as_secs_f64().into();
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{value}");
        let _ = out.flush();
    }
}

/// A line per port on a terminal (state, device, bytes, speed, PASS/FAIL counts); elsewhere a
/// line per event (progress left out).
struct TextReport {
    bars: Option<(MultiProgress, HashMap<String, ProgressBar>)>,
    ports: Mutex<HashMap<String, PortState>>,
}

#[derive(Default)]
struct PortState {
    pass: u32,
    fail: u32,
    device: Option<String>,
    write_started: Option<Instant>,
}

impl TextReport {
    fn new(ports: &[String]) -> TextReport {
        let bars = std::io::stderr().is_terminal().then(|| {
            let multi = MultiProgress::new();
            let width = ports.iter().map(String::len).max().unwrap_or(0);
            let style = ProgressStyle::with_template(&format!("{{prefix:<{width}}}  {{wide_msg}}"))
                .unwrap_or_else(|_| ProgressStyle::default_bar());
            let bars = ports
                .iter()
                .map(|port| {
                    let bar = multi.add(ProgressBar::new(0).with_style(style.clone()));
                    bar.set_prefix(port.clone());
                    (port.clone(), bar)
                })
                .collect();
            (multi, bars)
        });
        TextReport {
            bars,
            ports: Mutex::new(HashMap::new()),
        }
    }

    fn show(&self, port: &str, state: &PortState, text: &str) {
        let counts = format!("PASS {} FAIL {}", state.pass, state.fail);
        match &self.bars {
            Some((_, bars)) => {
                if let Some(bar) = bars.get(port) {
                    bar.set_message(format!("{text:<60} {counts}"));
                }
            }
            None => eprintln!("[{port}] {text} ({counts})"),
        }
    }
}

impl Report for TextReport {
    fn event(&self, port: &str, event: &Event) {
        let mut ports = self.ports.lock().unwrap_or_else(|e| e.into_inner());
        let state = ports.entry(port.to_owned()).or_default();
        let text = match event {
            Event::Waiting => "waiting for a board".to_owned(),
            Event::Connected { mac, chip } => format!("{chip} MAC {mac}"),
            Event::Claimed { mac, device } => {
                state.device = Some(device.clone());
                state.write_started = Some(Instant::now());
                format!("flashing {device} onto MAC {mac}")
            }
            Event::Progress {
                device,
                written,
                total,
            } => {
                if self.bars.is_none() {
                    return;
                }
                let seconds = state
                    .write_started
                    .map_or(0.0, |t| t.elapsed().as_secs_f64())
                    .max(1e-3);
                format!(
                    "writing {device}  {written}/{total} bytes  {:.0} KiB/s",
                    *written as f64 / 1024.0 / seconds
                )
            }
            Event::Done {
                mac,
                device,
                bytes,
                seconds,
                ..
            } => {
                state.pass += 1;
                format!("PASS {device} on MAC {mac} ({bytes} bytes in {seconds:.1} s); next board")
            }
            Event::Failed {
                device,
                error,
                retrying,
                baud,
                ..
            } => {
                let device = device.as_deref().unwrap_or("?");
                if *retrying {
                    let baud = baud.map_or(String::new(), |b| format!(" at {b} baud"));
                    format!("retrying {device}{baud}: {error}")
                } else {
                    state.fail += 1;
                    format!("FAIL {device}: {error}")
                }
            }
            Event::Removed { mac } => format!("board {mac} removed"),
            Event::Trouble { error } => format!("cannot use the port: {error}"),
            Event::AlreadyFlashed { mac, device } => {
                format!("board {mac} holds {device} already (it passed): take it out")
            }
            Event::NothingLeft => "nothing left to flash".to_owned(),
            Event::Stopped => "stopped".to_owned(),
        };
        let state = &*state;
        self.show(port, state, &text);
    }
}

impl Drop for TextReport {
    fn drop(&mut self) {
        if let Some((_, bars)) = &self.bars {
            for bar in bars.values() {
                bar.abandon();
            }
        }
    }
}
