//! How `main` shows a command's error. The first line is `error: MESSAGE`, as before (scripts
//! and tests read it); miette's graphical handler renders what follows: for an error located in
//! an input (Cargo.toml, a CSV file, a partition table, an `mfg` config file) that input's line
//! with the offending span underlined, then a help line when there is advice, then the error's
//! code (`cargo_nvs::mfg::values`, `nvs_build::input`, …).
//!
//! Only the offending line is shown, never its neighbours, and never a line of an `mfg` values
//! file (per-device values may be secrets); in an NVS CSV file (`key,type,encoding,value`) the
//! value column is masked. Lines are read from the file when the error is shown (bounded), and
//! nothing is shown when the file changed or cannot be read: the message then keeps its
//! `file:line:` prefix. Not a terminal: no colours, ASCII lines; lines are never wrapped.

use std::fmt;
use std::io::IsTerminal;
use std::path::Path;

use cargo_nvs::mfg::generate::GenerateError;
use cargo_nvs::mfg::input::ValuesError;
use cargo_nvs::mfg::product::ProductError;
use miette::{
    Diagnostic, GraphicalReportHandler, GraphicalTheme, LabeledSpan, MietteError,
    MietteSpanContents, SourceCode, SourceSpan, SpanContents,
};

use crate::cmd::error::CmdError;

/// Longest line shown under an error; a longer one is left out.
const MAX_SHOWN_LINE: usize = 400;
/// Largest file read to show a line of it.
const MAX_SHOWN_FILE: u64 = 16 << 20;

/// Prints `error` to stderr.
pub fn print(error: &CmdError) {
    let stderr = std::io::stderr();
    let terminal = stderr.is_terminal();
    let colour = terminal
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
        && std::env::var_os("TERM").is_none_or(|t| t != "dumb");
    eprint!("{}", render(error, terminal, colour));
}

/// The whole report, ending with a newline.
fn render(error: &CmdError, unicode: bool, colour: bool) -> String {
    let mut message = error.to_string();
    let mut snippet = None;
    if let Some((input, show)) = located(error)
        && let Some(location) = input.location()
        && show == Show::Line
        && let Some(found) = source_line(input)
    {
        if let Some(rest) = message.strip_prefix(&format!("{location}: ")) {
            message = rest.to_owned();
        }
        snippet = Some(found);
    }
    let tail = Tail {
        help: help(error),
        snippet,
    };
    let theme = match (unicode, colour) {
        (_, true) => GraphicalTheme::unicode(),
        (true, false) => GraphicalTheme::unicode_nocolor(),
        (false, false) => GraphicalTheme::none(),
    };
    let handler = GraphicalReportHandler::new_themed(theme)
        .with_wrap_lines(false)
        .with_width(usize::MAX / 4)
        .without_cause_chain()
        .with_links(false);
    let mut rendered = String::new();
    // The tail's message is empty: miette writes an empty line for it, then the snippet and
    // the help.
    if handler.render_report(&mut rendered, &tail).is_err() {
        rendered.clear();
    }
    let rendered = rendered.strip_prefix('\n').unwrap_or(&rendered);
    let error_word = if colour {
        "\x1b[1;31merror\x1b[0m"
    } else {
        "error"
    };
    format!(
        "{error_word}: {message}\n{rendered}  code: {}\n",
        code(error)
    )
}

/// What miette renders below our `error:` line.
#[derive(Debug)]
struct Tail {
    help: Option<String>,
    snippet: Option<(Line, LabeledSpan)>,
}

/// One line of an input, as miette's source: every span read from it is the whole line, with
/// the line's number and the span's column (miette would show only the span without context
/// lines, and the neighbours may hold values).
#[derive(Debug)]
struct Line {
    name: String,
    text: String,
    /// 0-based.
    number: usize,
}

impl SourceCode for Line {
    fn read_span<'a>(
        &'a self,
        span: &SourceSpan,
        _: usize,
        _: usize,
    ) -> Result<Box<dyn SpanContents<'a> + 'a>, MietteError> {
        let column = self
            .text
            .get(..span.offset())
            .map_or(0, |before| before.chars().count());
        Ok(Box::new(MietteSpanContents::new_named(
            self.name.clone(),
            self.text.as_bytes(),
            SourceSpan::new(0.into(), self.text.len()),
            self.number,
            column,
            1,
        )))
    }
}

impl fmt::Display for Tail {
    fn fmt(&self, _: &mut fmt::Formatter<'_>) -> fmt::Result {
        Ok(())
    }
}

impl std::error::Error for Tail {}

impl Diagnostic for Tail {
    fn help<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        self.help.as_ref().map(|h| Box::new(h) as _)
    }

    fn source_code(&self) -> Option<&dyn SourceCode> {
        self.snippet.as_ref().map(|(source, _)| source as _)
    }

    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        let (_, label) = self.snippet.as_ref()?;
        Some(Box::new(std::iter::once(label.clone())))
    }
}

/// Whether an input's line may be shown.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Show {
    Line,
    /// A line of an `mfg` values file: per-device values, possibly secrets.
    LocationOnly,
}

/// The located input error inside `error`, if any.
fn located(error: &CmdError) -> Option<(&nvs_build::Error, Show)> {
    use cargo_nvs::{
        artifacts::ArtifactError, firmware::FirmwareError, flashing::protect::ProtectError,
        keys::KeyError, mfg::flash::MfgFlashError, project::ProjectError,
    };
    let line = |e| Some((e, Show::Line));
    match error {
        CmdError::Input(e)
        | CmdError::Project(ProjectError::Metadata(e))
        | CmdError::Artifact(ArtifactError::Metadata(e))
        | CmdError::Key(KeyError::Input(e))
        | CmdError::Firmware(FirmwareError::Table(e))
        | CmdError::Protect(ProtectError::Input(e))
        | CmdError::MfgFlash(MfgFlashError::Input(e)) => line(e),
        CmdError::Generate(e) => in_generate(e),
        CmdError::Values(e) => in_values(e),
        CmdError::Product(e) => in_product(e),
        CmdError::MfgFlash(MfgFlashError::Product(e)) => in_product(e),
        _ => None,
    }
}

fn in_generate(error: &GenerateError) -> Option<(&nvs_build::Error, Show)> {
    match error {
        GenerateError::Input(e) => Some((e, Show::Line)),
        GenerateError::Values(e) => in_values(e),
        GenerateError::Product(e) => in_product(e),
        GenerateError::Interrupted { source } => in_generate(source),
        _ => None,
    }
}

fn in_values(error: &ValuesError) -> Option<(&nvs_build::Error, Show)> {
    match error {
        ValuesError::Config(e) => Some((e, Show::Line)),
        ValuesError::Values(e) => Some((e, Show::LocationOnly)),
        _ => None,
    }
}

fn in_product(error: &ProductError) -> Option<(&nvs_build::Error, Show)> {
    match error {
        ProductError::Manifest(e) => Some((e, Show::Line)),
        _ => None,
    }
}

/// The input's line as miette's source and the span to underline.
fn source_line(input: &nvs_build::Error) -> Option<(Line, LabeledSpan)> {
    let location = input.location()?;
    let line_number = location.line?;
    let bytes = nvs_build::read_limited(&location.path, MAX_SHOWN_FILE).ok()?;
    let text = String::from_utf8_lossy(&bytes);
    let mut lines = text.split('\n');
    let first = lines.next().unwrap_or_default().trim_end_matches('\r');
    let line = if line_number == 1 {
        first
    } else {
        lines.nth(line_number - 2)?.trim_end_matches('\r')
    };
    if line.len() > MAX_SHOWN_LINE {
        return None;
    }
    let line = if is_nvs_csv(&location.path, first) {
        mask_value(line)
    } else {
        line.to_owned()
    };
    let (start, len) = span(
        &line,
        location.column,
        input.span_length(),
        is_toml(&location.path),
    );
    Some((
        Line {
            name: location.path.display().to_string(),
            text: line,
            number: line_number - 1,
        },
        LabeledSpan::underline((start, len)),
    ))
}

fn is_toml(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("toml"))
}

/// An ESP-IDF NVS CSV file: its header names the value column.
fn is_nvs_csv(path: &Path, first_line: &str) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"))
        && first_line
            .trim_start_matches('\u{feff}')
            .replace(' ', "")
            .starts_with("key,type,encoding")
}

/// A CSV row with the value (the fourth field on) replaced by `…`: values may be secrets.
fn mask_value(line: &str) -> String {
    match line.match_indices(',').nth(2) {
        Some((at, _)) if at + 1 < line.len() => format!("{}…", &line[..=at]),
        _ => line.to_owned(),
    }
}

/// The byte span to underline in `line`: from the 1-based character `column`, `length`
/// characters, else the token there (a TOML key or string, a CSV field); the whole line without
/// a column.
fn span(line: &str, column: Option<usize>, length: Option<usize>, toml: bool) -> (usize, usize) {
    let Some(column) = column else {
        return (0, line.trim_end().len().max(1));
    };
    let start = line
        .char_indices()
        .nth(column.saturating_sub(1))
        .map_or(line.len(), |(i, _)| i);
    let rest = &line[start..];
    let len = match length {
        Some(n) => rest.char_indices().nth(n).map_or(rest.len(), |(i, _)| i),
        None if toml && rest.starts_with(['"', '\'']) => {
            let quote = &rest[..1];
            rest[1..].find(quote).map_or(rest.len(), |end| end + 2)
        }
        None if toml => rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '-' || c == '.'))
            .unwrap_or(rest.len()),
        None => rest.find(',').unwrap_or(rest.len()),
    };
    let len = rest[..len].trim_end().len();
    (start, len.max(1))
}

/// The error's code: which module refused, as a path. An input error wrapped by a library
/// module keeps nvs-build's code.
fn code(error: &CmdError) -> &'static str {
    let input_code = |e: &nvs_build::Error| {
        if e.location().is_some_and(|l| is_toml(&l.path)) {
            "nvs_build::metadata"
        } else {
            "nvs_build::input"
        }
    };
    match error {
        CmdError::Usage(_) => "cargo_nvs::usage",
        CmdError::Unusable(_) => "cargo_nvs::input",
        CmdError::Refused(_) => "cargo_nvs::refused",
        CmdError::Chip { .. } => "cargo_nvs::chip",
        CmdError::Serial { .. } | CmdError::PortGone { .. } => "cargo_nvs::port",
        CmdError::Output { .. } | CmdError::Json(_) => "cargo_nvs::output",
        CmdError::StaleDevData { .. } | CmdError::File(_) => "cargo_nvs::file",
        CmdError::OutputOverInput(_) => "cargo_nvs::file::output_over_input",
        CmdError::CtrlC(_) => "cargo_nvs::signal",
        CmdError::Input(e) => input_code(e),
        CmdError::Encryption(_) => "nvs_build::encryption",
        CmdError::Project(cargo_nvs::project::ProjectError::Metadata(e))
        | CmdError::Artifact(cargo_nvs::artifacts::ArtifactError::Metadata(e))
        | CmdError::Generate(GenerateError::Input(e)) => input_code(e),
        CmdError::Project(_) => "cargo_nvs::project",
        CmdError::Artifact(_) => "cargo_nvs::artifacts",
        CmdError::Settings(_) => "cargo_nvs::settings",
        CmdError::Spelling(_) => "cargo_nvs::size",
        CmdError::Key(_) => "cargo_nvs::keys",
        CmdError::Flashing(_) | CmdError::ChipReply(_) => "cargo_nvs::flashing",
        CmdError::Segment(_) => "cargo_nvs::segments",
        CmdError::Protect(_) => "cargo_nvs::protect",
        CmdError::Firmware(_) => "cargo_nvs::firmware",
        CmdError::Generate(GenerateError::Values(_)) | CmdError::Values(_) => {
            "cargo_nvs::mfg::values"
        }
        CmdError::Generate(GenerateError::Product(_)) | CmdError::Product(_) => {
            "cargo_nvs::mfg::product"
        }
        CmdError::Generate(GenerateError::Ledger(_)) | CmdError::Ledger(_) => {
            "cargo_nvs::mfg::ledger"
        }
        CmdError::Generate(_) => "cargo_nvs::mfg::generate",
        CmdError::MfgFlash(_) => "cargo_nvs::mfg::flash",
        CmdError::Migrate(_) => "cargo_nvs::mfg::migrate",
        CmdError::NvsPartition(_) => "nvs_build::table",
    }
}

/// Advice that the message does not give itself.
fn help(error: &CmdError) -> Option<String> {
    use std::io::ErrorKind;
    let file_help = |kind: ErrorKind| match kind {
        ErrorKind::NotFound => Some(format!(
            "relative paths start in the current directory, `{}`",
            std::env::current_dir()
                .map(|d| d.display().to_string())
                .unwrap_or_default()
        )),
        ErrorKind::PermissionDenied => Some("check the file's permissions and owner".to_owned()),
        _ => None,
    };
    match error {
        CmdError::Usage(_) => Some("`cargo nvs help COMMAND` lists the options".to_owned()),
        CmdError::File(e) => file_help(e.source.kind()),
        CmdError::StaleDevData { source, .. } => file_help(source.kind()),
        CmdError::Chip { .. } | CmdError::Serial { .. } | CmdError::PortGone { .. } => Some(
            "check the cable, and that no other program (a serial monitor) holds the port"
                .to_owned(),
        ),
        _ if code(error) == "nvs_build::metadata" => {
            Some("the README's `[package.metadata.nvs]` reference lists every setting".to_owned())
        }
        _ => match located(error) {
            Some((_, Show::LocationOnly)) => {
                Some("the line is not shown: per-device values may be secrets".to_owned())
            }
            _ => None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_follow_the_column_the_length_or_the_token() {
        assert_eq!(span("hw_rev = { u8 = 300 }", Some(1), None, true), (0, 6));
        assert_eq!(span("a = \"x y\"", Some(5), None, true), (4, 5));
        assert_eq!(
            span("nvs, data, nvs, 0x9000", Some(17), None, false),
            (16, 6)
        );
        assert_eq!(span("k = 1", Some(5), Some(3), true), (4, 1));
        assert_eq!(span("volume,data,u8,…  ", None, None, false), (0, 18));
    }

    #[test]
    fn values_are_masked() {
        assert_eq!(
            mask_value("secret,data,string,hunter2"),
            "secret,data,string,…"
        );
        assert_eq!(mask_value("ns,namespace,,"), "ns,namespace,,");
    }
}
