//! Random test cases for `diff-ref`: CSV inputs (and the files their `file` rows name) that walk
//! the corners of the reference's CSV dialect and page layout, plus a record of the constructs
//! each case contains, so that a rejection can be judged.

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::fmt::Write as _;
use std::ops::RangeBounds;
use std::path::Path;

use fastrand::Rng;

/// Constructs the reference accepts but we refuse on purpose (see `FormatError` and the CSV
/// front end): a rejection by us is expected, not a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Refused {
    NamespaceReselected,
    DataBeforeNamespace,
    UpperCaseEncoding,
    NonAsciiBinary,
    DuplicateKey,
    NonAsciiKey,
}

impl Refused {
    const ALL: [Refused; 6] = [
        Refused::NamespaceReselected,
        Refused::DataBeforeNamespace,
        Refused::UpperCaseEncoding,
        Refused::NonAsciiBinary,
        Refused::DuplicateKey,
        Refused::NonAsciiKey,
    ];
}

/// Constructs that make the reference fail, so both tools should reject the case. The last few
/// are reference failures that a lenient reimplementation easily misses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Invalid {
    IntOutOfRange,
    IntSpelling,
    /// `int()` does not strip `\x1c`..`\x1f`, although `str.isspace()` says they are spaces.
    IntOddSpace,
    OddHex,
    BadHexDigit,
    Base64Padding,
    KeyTooLong,
    StringTooLong,
    BlobTooLongV1,
    MissingFile,
    FileNotUtf8,
    UnknownEncoding,
    MissingValue,
    FillTooLong,
    FillSpelling,
    BadSize,
    /// A CSV field over Python's `csv.field_size_limit()` (131072 characters).
    HugeField,
    /// A blank line before the header: `DictReader` takes it as an empty header.
    BlankLineBeforeHeader,
    /// `bytes.strip()` strips ASCII whitespace only, so `\x1c` or U+00A0 around file hex stays.
    FileHexOddSpace,
    /// `int(bytes)` does not strip `\x1c` or U+00A0 either.
    FileIntOddSpace,
    /// `blob_fill` calls `.encode()` on the value, which is `bytes` for a non-empty file.
    FileFill,
}

impl Invalid {
    const ALL: [Invalid; 21] = [
        Invalid::IntOutOfRange,
        Invalid::IntSpelling,
        Invalid::IntOddSpace,
        Invalid::OddHex,
        Invalid::BadHexDigit,
        Invalid::Base64Padding,
        Invalid::KeyTooLong,
        Invalid::StringTooLong,
        Invalid::BlobTooLongV1,
        Invalid::MissingFile,
        Invalid::FileNotUtf8,
        Invalid::UnknownEncoding,
        Invalid::MissingValue,
        Invalid::FillTooLong,
        Invalid::FillSpelling,
        Invalid::BadSize,
        Invalid::HugeField,
        Invalid::BlankLineBeforeHeader,
        Invalid::FileHexOddSpace,
        Invalid::FileIntOddSpace,
        Invalid::FileFill,
    ];
}

/// Rare spellings the reference accepts (and so must we).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exotic {
    /// `int()` takes any Unicode decimal digits, e.g. `١٢`.
    UnicodeDigits,
    /// `int(size, 0)` takes a sign before the base prefix: `+0x3000`.
    SignedHexSize,
}

/// What a case contains, as far as judging it is concerned.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    pub refused: BTreeSet<Refused>,
    pub invalid: Option<Invalid>,
    pub exotic: Option<Exotic>,
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = self
            .refused
            .iter()
            .map(|r| format!("refused:{r:?}"))
            .collect();
        parts.extend(self.invalid.map(|i| format!("invalid:{i:?}")));
        parts.extend(self.exotic.map(|e| format!("exotic:{e:?}")));
        if parts.is_empty() {
            f.write_str("plain")
        } else {
            f.write_str(&parts.join(" "))
        }
    }
}

/// One generated case, ready to be written into its folder.
pub struct CaseSpec {
    pub version: u8,
    /// The SIZE argument, as spelled on the command line.
    pub size: String,
    /// CSV inputs in order, relative to the case folder.
    pub inputs: Vec<String>,
    /// Every file of the case (CSV inputs and `file` targets), relative to the case folder.
    pub files: Vec<(String, Vec<u8>)>,
    pub plan: Plan,
    /// Data pages the generator expects the image to need (a close estimate).
    pub pages_needed: usize,
}

pub struct Options {
    pub max_pages: usize,
    pub refused_share: f64,
    pub invalid_share: f64,
    pub exotic_share: f64,
}

/// Generates one case; `case_dir` is where it will live (absolute `file` paths point there).
pub fn generate(rng: &mut Rng, case_dir: &Path, opts: &Options) -> CaseSpec {
    let version = if rng.f64() < 0.3 { 1 } else { 2 };
    let mut plan = Plan::default();
    let roll = rng.f64();
    if roll < opts.refused_share {
        plan.refused.insert(pick(rng, &Refused::ALL));
        if rng.bool() {
            plan.refused.insert(pick(rng, &Refused::ALL));
        }
    } else if roll < opts.refused_share + opts.invalid_share {
        plan.invalid = Some(pick(rng, &Invalid::ALL));
    } else if roll < opts.refused_share + opts.invalid_share + opts.exotic_share {
        plan.exotic = Some(if rng.bool() {
            Exotic::UnicodeDigits
        } else {
            Exotic::SignedHexSize
        });
    }
    let read_only = rng.f64() < 0.06;
    let budget_pages = if read_only {
        rng.usize(1..=2)
    } else {
        match rng.u8(0..10) {
            0..=2 => 1,
            3..=6 => rng.usize(2..=5),
            _ => rng.usize(2..=opts.max_pages.saturating_sub(2).max(2)),
        }
    };
    if plan.invalid == Some(Invalid::BlobTooLongV1) && version == 2
        || plan.invalid == Some(Invalid::HugeField) && (version == 1 || read_only)
    {
        plan.invalid = Some(Invalid::IntOutOfRange);
    }

    let mut g = Gen {
        rng,
        case_dir,
        version,
        plan,
        namespaces: Vec::new(),
        keys: HashSet::new(),
        wifi: Wifi::default(),
        layout: Layout::new(version == 2),
        lines: Vec::new(),
        files: Vec::new(),
        file_count: 0,
        budget: budget_pages * 112,
        read_only,
    };
    g.rows();
    let pages_needed = g.layout.pages;
    let size = g.size(read_only, pages_needed, opts.max_pages);
    let (inputs, mut csv_files) = g.split_into_files();
    let mut files = std::mem::take(&mut g.files);
    files.append(&mut csv_files);
    CaseSpec {
        version,
        size,
        inputs,
        files,
        plan: g.plan,
        pages_needed,
    }
}

fn pick<T: Copy>(rng: &mut Rng, items: &[T]) -> T {
    items[rng.usize(..items.len())]
}

/// The reference's placement rules (spec §9.2), to size partitions around the data.
struct Layout {
    v2: bool,
    cursor: usize,
    pages: usize,
}

impl Layout {
    fn new(v2: bool) -> Layout {
        Layout {
            v2,
            cursor: 0,
            pages: 1,
        }
    }

    fn entries(&self) -> usize {
        (self.pages - 1) * 126 + self.cursor
    }

    fn open(&mut self) {
        self.pages += 1;
        self.cursor = 0;
    }

    fn primitive(&mut self) {
        if self.cursor == 126 {
            self.open();
        }
        self.cursor += 1;
    }

    fn single_page(&mut self, n: usize) {
        let span = 1 + n.div_ceil(32);
        if self.cursor + span >= 126 {
            self.open();
        }
        self.cursor = (self.cursor + span).min(126);
    }

    fn string(&mut self, bytes: usize) {
        self.single_page(bytes + 1);
    }

    fn blob(&mut self, n: usize) {
        if !self.v2 {
            return self.single_page(n);
        }
        if self.cursor == 126 {
            self.open();
        }
        let mut remaining = n;
        loop {
            let tail = (126 - self.cursor - 1) * 32;
            let chunk = tail.min(remaining);
            self.cursor += 1 + chunk.div_ceil(32);
            remaining -= chunk;
            if remaining > 0 || tail - chunk < 32 {
                self.open();
            }
            if remaining == 0 {
                break;
            }
        }
        self.cursor += 1;
    }
}

/// The reference's automatic Wi-Fi entries (quirk Q2), to keep keys unique.
#[derive(Clone, Copy, Default)]
struct Wifi {
    ap_ssid: bool,
    ap_passwd: bool,
    ap_authmode: bool,
    sta_done: bool,
}

const WIFI_KEYS: [&str; 5] = [
    "ap.ssid",
    "ap.passwd",
    "ap.authmode",
    "sta.ssid",
    "sta.pswd",
];
const WIFI_EXTRAS: [&str; 4] = ["ap.pmk_info", "sta.apinfo", "sta.pmk", "sta.apsw"];

pub const INT_TYPES: [(&str, i128, i128); 8] = [
    ("u8", 0, u8::MAX as i128),
    ("i8", i8::MIN as i128, i8::MAX as i128),
    ("u16", 0, u16::MAX as i128),
    ("i16", i16::MIN as i128, i16::MAX as i128),
    ("u32", 0, u32::MAX as i128),
    ("i32", i32::MIN as i128, i32::MAX as i128),
    ("u64", 0, u64::MAX as i128),
    ("i64", i64::MIN as i128, i64::MAX as i128),
];

const ALNUM: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_";
const PUNCT: &[u8] = b" ,.;:!?'\"-+*/=()[]{}<>@$%&|~^`\\#";
const NON_ASCII: [char; 14] = [
    'é', 'ß', 'ü', 'Ж', 'я', '中', '文', '€', '✓', '😀', '🚀', '\u{a0}', '\u{200b}', 'ﬁ',
];
/// Whitespace Python's `str.strip()` removes (hex2bin strips the cell).
const STR_SPACES: [&str; 10] = [
    " ", "\t", "\n", "  \n ", "\x0b", "\x0c", "\x1c", "\u{a0}", "\u{2003}", "\u{3000}",
];
/// Whitespace `int()` strips: not `\x1c`..`\x1f`, unlike `str.strip()`.
const INT_SPACES: [&str; 8] = [
    " ", "\t", "\n", "\x0b", "\x0c", "\u{a0}", "\u{2003}", "\u{3000}",
];
/// Whitespace `bytes.strip()` removes (hex2bin strips a file's bytes).
const BYTES_SPACES: [&str; 6] = [" ", "\t", "\n", "\r\n", "\x0b", "\x0c"];
/// Whitespace the reference strips from no file contents.
const ODD_SPACES: [&str; 4] = ["\x1c", "\x1f", "\u{a0}", "\u{2003}"];

#[derive(Clone, Copy, PartialEq, Eq)]
enum TextStyle {
    Alnum,
    Printable,
    Multiline,
    Unicode,
}

/// A CSV cell: `Text` is quoted when needed; `Raw` is written as is (odd quoting on purpose).
#[derive(Clone)]
enum Cell {
    Text(String),
    Raw(String),
}

impl Cell {
    fn text(s: impl Into<String>) -> Cell {
        Cell::Text(s.into())
    }
}

struct Row {
    key: Cell,
    ty: String,
    encoding: Option<Cell>,
    value: Option<Cell>,
    /// Fields past the header (ignored by both tools).
    surplus: usize,
}

enum Line {
    Row(Row),
    Comment(String),
    Blank,
    /// Starts a new input file (the split points between files).
    FileBreak,
}

struct Gen<'a> {
    rng: &'a mut Rng,
    case_dir: &'a Path,
    version: u8,
    plan: Plan,
    /// Namespace names in creation order; index `i` is namespace `i + 1`.
    namespaces: Vec<String>,
    /// (namespace index, key) of every item written, as the reference writes them (into the
    /// newest namespace, quirk Q1).
    keys: HashSet<(usize, String)>,
    wifi: Wifi,
    layout: Layout,
    lines: Vec<Line>,
    files: Vec<(String, Vec<u8>)>,
    file_count: usize,
    /// Entries the case aims to fill.
    budget: usize,
    /// One- or two-page partitions, where one big item would overflow.
    read_only: bool,
}

impl Gen<'_> {
    fn rows(&mut self) {
        let mut pending: Vec<(usize, Refused)> = self
            .plan
            .refused
            .iter()
            .filter(|&&r| r != Refused::DataBeforeNamespace)
            .map(|&r| (self.rng.usize(..=self.budget), r))
            .collect();
        let mut invalid_at = self.plan.invalid.map(|_| self.rng.usize(..=self.budget));
        let mut exotic_at = (self.plan.exotic == Some(Exotic::UnicodeDigits))
            .then(|| self.rng.usize(..=self.budget));

        if self.plan.invalid == Some(Invalid::BlankLineBeforeHeader) {
            invalid_at = None;
        }
        if self.plan.refused.contains(&Refused::DataBeforeNamespace) {
            for _ in 0..self.rng.usize(1..=3) {
                if self.rng.bool() {
                    self.primitive_row();
                } else {
                    self.string_row();
                }
            }
        }
        self.new_namespace_row();
        let file_breaks = match self.rng.u8(0..10) {
            0..=5 => 0,
            6..=8 => 1,
            _ => 2,
        };
        let mut breaks: Vec<usize> = (0..file_breaks)
            .map(|_| self.rng.usize(..=self.budget))
            .collect();
        breaks.sort_unstable();

        while self.layout.entries() < self.budget {
            let at = self.layout.entries();
            while breaks.first().is_some_and(|&b| b <= at) {
                breaks.remove(0);
                self.lines.push(Line::FileBreak);
            }
            if let Some(i) = pending.iter().position(|&(t, _)| t <= at) {
                let (_, refused) = pending.remove(i);
                self.inject_refused(refused);
                continue;
            }
            if invalid_at.is_some_and(|t| t <= at) {
                invalid_at = None;
                self.inject_invalid();
                continue;
            }
            if exotic_at.is_some_and(|t| t <= at) {
                exotic_at = None;
                self.unicode_digits_row();
                continue;
            }
            self.decoration();
            self.random_row();
        }
        for _ in breaks {
            self.lines.push(Line::FileBreak);
        }
        for (_, refused) in pending {
            self.inject_refused(refused);
        }
        if invalid_at.is_some() {
            self.inject_invalid();
        }
        if exotic_at.is_some() {
            self.unicode_digits_row();
        }
        self.decoration();
    }

    fn decoration(&mut self) {
        match self.rng.u8(0..100) {
            0..=4 => {
                let text = self.text_in(0..40, TextStyle::Printable);
                self.lines.push(Line::Comment(text));
            }
            5..=8 => self.lines.push(Line::Blank),
            _ => {}
        }
    }

    fn random_row(&mut self) {
        match self.rng.u8(0..100) {
            0..=29 => {
                self.primitive_row();
            }
            30..=49 => self.string_row(),
            50..=71 => self.blob_row(),
            72..=83 => self.file_row(),
            84..=88 => {
                if self.namespaces.len() < 12 {
                    self.new_namespace_row();
                }
            }
            89..=90 => self.same_namespace_row(),
            91..=95 => self.fill_row(),
            _ => self.wifi_row(),
        }
    }

    fn ns(&self) -> usize {
        self.namespaces.len()
    }

    fn key_free(&self, key: &str) -> bool {
        !self.keys.contains(&(self.ns(), key.to_owned()))
            && !WIFI_KEYS.contains(&key)
            && !WIFI_EXTRAS.contains(&key)
    }

    /// A key not used in the current namespace: mostly short identifiers, sometimes the full
    /// 15 characters, punctuation that needs quoting, or the empty key.
    fn fresh_key(&mut self) -> String {
        loop {
            let key = match self.rng.u8(0..100) {
                0 => String::new(),
                1 => format!("  #{}", self.rng.u16(..)),
                2..=9 => self.ascii(15, b"abcdefghijklmnopqrstuvwxyz0123456789_.-"),
                10..=15 => {
                    let len = self.rng.usize(1..=15);
                    self.ascii(len, b"abcXYZ019 _.,\"'-:")
                }
                _ => {
                    let len = self.rng.usize(1..=10);
                    self.ascii(len, ALNUM)
                }
            };
            if self.key_free(&key) && !key.starts_with('#') {
                return key;
            }
        }
    }

    fn ascii(&mut self, len: usize, alphabet: &[u8]) -> String {
        (0..len)
            .map(|_| alphabet[self.rng.usize(..alphabet.len())] as char)
            .collect()
    }

    /// Exactly `bytes` bytes of UTF-8 text. Never a line starting with `#` inside a value,
    /// which both tools would drop as a comment line.
    fn text(&mut self, bytes: usize, style: TextStyle) -> String {
        let mut s = String::with_capacity(bytes);
        while s.len() < bytes {
            let c = match style {
                TextStyle::Alnum => ALNUM[self.rng.usize(..ALNUM.len())] as char,
                TextStyle::Printable | TextStyle::Multiline | TextStyle::Unicode => {
                    match self.rng.u8(0..100) {
                        0..=59 => ALNUM[self.rng.usize(..ALNUM.len())] as char,
                        60..=89 => PUNCT[self.rng.usize(..PUNCT.len())] as char,
                        90..=94 if style == TextStyle::Multiline => '\n',
                        95 if style == TextStyle::Multiline => '\r',
                        _ if style == TextStyle::Unicode => pick(self.rng, &NON_ASCII),
                        _ => ' ',
                    }
                }
            };
            if c.len_utf8() > bytes - s.len() || c == '#' && s.ends_with(['\n', '\r']) {
                continue;
            }
            s.push(c);
        }
        s
    }

    fn text_in(&mut self, len: impl RangeBounds<usize>, style: TextStyle) -> String {
        let len = self.rng.usize(len);
        self.text(len, style)
    }

    fn text_style(&mut self) -> TextStyle {
        match self.rng.u8(0..10) {
            0..=3 => TextStyle::Alnum,
            4..=5 => TextStyle::Printable,
            6 => TextStyle::Multiline,
            _ => TextStyle::Unicode,
        }
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut data = vec![0; len];
        self.rng.fill(&mut data);
        data
    }

    fn bytes_in(&mut self, len: impl RangeBounds<usize>) -> Vec<u8> {
        let len = self.rng.usize(len);
        self.bytes(len)
    }

    fn push_row(&mut self, key: impl Into<Cell>, ty: &str, encoding: Cell, value: Cell) {
        let surplus = if self.rng.u8(0..30) == 0 {
            self.rng.usize(1..=2)
        } else {
            0
        };
        self.lines.push(Line::Row(Row {
            key: key.into(),
            ty: ty.to_owned(),
            encoding: Some(encoding),
            value: Some(value),
            surplus,
        }));
    }

    /// Records a data item written under `key` into the current namespace.
    fn claim(&mut self, key: &str) {
        self.keys.insert((self.ns(), key.to_owned()));
    }

    /// The type column of a `data` row: anything but `file`/`namespace` means data.
    fn data_type(&mut self) -> &'static str {
        match self.rng.u8(0..40) {
            0 => "DATA",
            1 => "whatever",
            2 => "File",
            3 => "",
            _ => "data",
        }
    }

    fn new_namespace_row(&mut self) {
        let name = loop {
            let len = if self.rng.u8(0..8) == 0 {
                15
            } else {
                self.rng.usize(1..=10)
            };
            let name = self.ascii(len, ALNUM);
            if !self.namespaces.contains(&name) {
                break name;
            }
        };
        self.namespace_row(&name);
        self.namespaces.push(name);
        self.layout.primitive();
    }

    /// Naming the current namespace again writes nothing (and is fine by us).
    fn same_namespace_row(&mut self) {
        if let Some(current) = self.namespaces.last().cloned() {
            self.namespace_row(&current);
        }
    }

    fn namespace_row(&mut self, name: &str) {
        let (encoding, value, short) = match self.rng.u8(0..10) {
            0..=5 => (String::new(), String::new(), false),
            6..=7 => (String::new(), String::new(), true),
            8 => ("u8".to_owned(), "7".to_owned(), false),
            _ => (String::new(), self.text(5, TextStyle::Printable), false),
        };
        self.lines.push(Line::Row(Row {
            key: Cell::text(name),
            ty: "namespace".to_owned(),
            encoding: (!short).then(|| Cell::text(encoding)),
            value: (!short).then(|| Cell::text(value)),
            surplus: 0,
        }));
    }

    fn primitive_row(&mut self) -> String {
        let key = self.fresh_key();
        let (name, min, max) = pick(self.rng, &INT_TYPES);
        let n = match self.rng.u8(0..10) {
            0 => min,
            1 => max,
            2 => 0,
            3 => min.max(-1),
            4 => self.rng.i128(min..=max.min(1000)),
            _ => self.rng.i128(min..=max),
        };
        let encoding = self.int_encoding_spelling(name);
        let value = self.int_spelling(n);
        let ty = self.data_type();
        self.push_row(key.clone(), ty, Cell::text(encoding), value);
        self.claim(&key);
        self.layout.primitive();
        key
    }

    fn int_encoding_spelling(&mut self, name: &str) -> String {
        match self.rng.u8(0..10) {
            0 => name.to_uppercase(),
            1 => {
                let mut s = name.to_owned();
                s[..1].make_ascii_uppercase();
                s
            }
            _ => name.to_owned(),
        }
    }

    /// Python `int()` spellings: sign, surrounding whitespace, `_` between digits, zeros.
    fn int_spelling(&mut self, n: i128) -> Cell {
        let mut digits = n.unsigned_abs().to_string();
        if self.rng.u8(0..8) == 0 {
            digits = format!("{}{digits}", "0".repeat(self.rng.usize(1..=3)));
        }
        if self.rng.u8(0..8) == 0 && digits.len() > 1 {
            let mut spaced = String::new();
            for (i, c) in digits.chars().enumerate() {
                if i > 0 && self.rng.u8(0..3) == 0 {
                    spaced.push('_');
                }
                spaced.push(c);
            }
            digits = spaced;
        }
        let sign = match (n < 0, self.rng.u8(0..8)) {
            (true, _) => "-",
            (false, 0) => "+",
            (false, 1) if n == 0 => "-",
            _ => "",
        };
        let mut text = format!("{sign}{digits}");
        if self.rng.u8(0..8) == 0 {
            let before = pick(self.rng, &INT_SPACES);
            let after = pick(self.rng, &INT_SPACES);
            text = format!("{before}{text}{after}");
        }
        Cell::Text(text)
    }

    fn unicode_digits_row(&mut self) {
        let key = self.fresh_key();
        // Arabic-Indic and full-width digits: `int()` maps every Unicode `Nd` digit.
        let zero = if self.rng.bool() {
            '\u{660}'
        } else {
            '\u{ff10}'
        };
        let n = self.rng.u8(0..200);
        let value: String = n
            .to_string()
            .chars()
            .map(|c| char::from_u32(zero as u32 + c.to_digit(10).unwrap()).unwrap())
            .collect();
        self.push_row(key.clone(), "data", Cell::text("u8"), Cell::text(value));
        self.claim(&key);
        self.layout.primitive();
    }

    /// Bytes of a string: mostly short, sometimes right at the page limit.
    /// Caps an item's size in a read-only case to the room left in its budget.
    fn fit(&self, len: usize) -> usize {
        if self.read_only {
            len.min(self.budget.saturating_sub(self.layout.entries()) * 32)
        } else {
            len
        }
    }

    fn string_len(&mut self) -> usize {
        let max = if self.version == 2 { 3967 } else { 1983 };
        let len = match self.rng.u8(0..20) {
            0..=1 => 0,
            2..=8 => self.rng.usize(1..20),
            9..=13 => self.rng.usize(20..200),
            14..=15 => self.rng.usize(200..max),
            16 => max,
            17 => self.rng.usize(max - 40..=max),
            _ => self.rng.usize(1..(max / 2)),
        };
        self.fit(len)
    }

    fn string_row(&mut self) {
        let key = self.fresh_key();
        if self.rng.u8(0..30) == 0 {
            return self.odd_quoting_row(key);
        }
        let len = self.string_len();
        let style = self.text_style();
        let comment_inside = len > 2 && self.rng.u8(0..40) == 0;
        // The inserted line goes, its leading line break stays: one byte more.
        let mut text = self.text(len - usize::from(comment_inside), style);
        if comment_inside && text.is_char_boundary(1) && !text[1..].starts_with('#') {
            // A line starting with `#` inside a quoted value is dropped by both tools.
            let mut dropped = self.text_in(0..10, TextStyle::Alnum);
            dropped.insert(0, '#');
            text.insert_str(1, &format!("\n{dropped}\n"));
        }
        let ty = self.data_type();
        self.push_row(key.clone(), ty, Cell::text("string"), Cell::Text(text));
        self.claim(&key);
        self.layout.string(len);
    }

    /// Quotes in odd places, which the `excel` dialect reads in its own way.
    fn odd_quoting_row(&mut self, key: String) {
        // Not empty, or the quotes pair up differently (`{a}"{b}` would open a quoted field).
        let a = self.text_in(1..6, TextStyle::Alnum);
        let b = self.text_in(1..6, TextStyle::Alnum);
        let raw = match self.rng.u8(0..6) {
            0 => format!("\"{a}\"{b}"),
            1 => format!("{a}\"{b}"),
            2 => format!(" \"{a}\""),
            3 => format!("\"{a}\"{b}\"c\""),
            4 => format!("\"{a}\" "),
            _ => format!("\"{a}\"\"\"{b}\""),
        };
        self.push_row(key.clone(), "data", Cell::text("string"), Cell::Raw(raw));
        self.claim(&key);
        self.layout.string(a.len() + b.len() + 4);
    }

    /// Blob sizes around entry (32), chunk (4000) and page boundaries.
    fn blob_len(&mut self) -> usize {
        let len = self.any_blob_len();
        self.fit(len)
    }

    fn any_blob_len(&mut self) -> usize {
        if self.version == 1 {
            return match self.rng.u8(0..10) {
                0 => pick(self.rng, &[0, 1, 31, 32, 33, 63, 64, 65]),
                1..=4 => self.rng.usize(0..100),
                5..=7 => self.rng.usize(100..1984),
                _ => self.rng.usize(1950..=1984),
            };
        }
        match self.rng.u8(0..20) {
            0..=2 => pick(self.rng, &[0, 1, 31, 32, 33, 63, 64, 65]),
            3..=8 => self.rng.usize(0..100),
            9..=12 => self.rng.usize(100..2000),
            13..=14 => self.rng.usize(3960..=4040),
            15..=16 => 4000 * self.rng.usize(1..=3) + self.rng.usize(0..=66) - 33,
            _ => self.rng.usize(2000..12_000),
        }
    }

    fn hex(&mut self, data: &[u8]) -> String {
        let upper = match self.rng.u8(0..5) {
            0 => Some(true),
            1 => None,
            _ => Some(false),
        };
        let mut s = String::with_capacity(data.len() * 2);
        for &b in data {
            let up = upper.unwrap_or_else(|| self.rng.bool());
            if up {
                write!(s, "{b:02X}").unwrap();
            } else {
                write!(s, "{b:02x}").unwrap();
            }
        }
        s
    }

    /// Base64 as Python 3.11's lenient decoder reads it: line breaks, junk characters, text
    /// after the padding.
    fn base64(&mut self, data: &[u8]) -> String {
        let plain = base64_encode(data);
        match self.rng.u8(0..20) {
            0..=2 => plain
                .as_bytes()
                .chunks(76)
                .map(|c| std::str::from_utf8(c).unwrap())
                .collect::<Vec<_>>()
                .join("\n"),
            3..=4 => {
                let mut s = String::new();
                for c in plain.chars() {
                    if self.rng.u8(0..10) == 0 {
                        s.push(pick(
                            self.rng,
                            &['!', '*', ' ', '@', '\t', '.', '-', '_', '\n'],
                        ));
                    }
                    s.push(c);
                }
                s
            }
            5 if plain.ends_with('=') => {
                let junk = self.text_in(1..10, TextStyle::Alnum);
                format!("{plain}{junk}")
            }
            6 => format!("={plain}"),
            _ => plain,
        }
    }

    fn blob_row(&mut self) {
        let key = self.fresh_key();
        let len = self.blob_len();
        let (encoding, value) = match self.rng.u8(0..3) {
            0 => {
                let data = self.bytes(len);
                let mut hex = self.hex(&data);
                if self.rng.u8(0..6) == 0 {
                    let before = pick(self.rng, &STR_SPACES);
                    let after = pick(self.rng, &STR_SPACES);
                    hex = format!("{before}{hex}{after}");
                }
                ("hex2bin", hex)
            }
            1 => {
                let data = self.bytes(len);
                ("base64", self.base64(&data))
            }
            _ => {
                let style = if self.rng.bool() {
                    TextStyle::Alnum
                } else {
                    TextStyle::Printable
                };
                ("binary", self.text(len, style))
            }
        };
        let encoding = if encoding == "binary" && self.rng.u8(0..6) == 0 {
            pick(self.rng, &["BINARY", "Binary"])
        } else {
            encoding
        };
        let ty = self.data_type();
        self.push_row(key.clone(), ty, Cell::text(encoding), Cell::Text(value));
        self.claim(&key);
        self.layout.blob(len);
    }

    /// `blob_fill(N;0xPP)` / `blob_sz_fill(N;0xPP)` (quirk Q4).
    fn fill_row(&mut self) {
        let key = self.fresh_key();
        let sized = self.rng.bool();
        let max = if self.version == 1 { 1980 } else { 9000 };
        let n = match self.rng.u8(0..4) {
            0 => pick(self.rng, &[0, 1, 31, 32, 33]),
            1 => self.rng.usize(0..100),
            _ => self.rng.usize(0..=max),
        };
        let n = self.fit(n);
        let value_len = self.rng.usize(0..=n.min(40));
        let style = self.text_style();
        let value = self.text(value_len, style);
        let pad: u8 = self.rng.u8(..);
        let pad = if self.rng.bool() {
            format!("0x{pad:02x}")
        } else {
            format!("0x{pad:02X}")
        };
        let tail = if self.rng.u8(0..6) == 0 { "junk" } else { "" };
        let name = if sized { "blob_sz_fill" } else { "blob_fill" };
        let encoding = format!("{name}({n};{pad}){tail}");
        self.push_row(key.clone(), "data", Cell::Text(encoding), Cell::Text(value));
        self.claim(&key);
        self.layout.blob(n + if sized { 4 } else { 0 });
    }

    /// Writes a file of the case and returns how a `file` row names it: relative to the case
    /// folder (the CWD of both tools) or absolute.
    fn add_file(&mut self, ext: &str, contents: Vec<u8>) -> String {
        self.file_count += 1;
        let dir = match self.rng.u8(0..5) {
            0 => "sub/",
            1 => "deep/er/",
            _ => "",
        };
        let name = if self.rng.u8(0..10) == 0 {
            format!("{dir}my file {}.{ext}", self.file_count)
        } else {
            format!("{dir}f{}.{ext}", self.file_count)
        };
        self.files.push((name.clone(), contents));
        match self.rng.u8(0..10) {
            0..=1 => self.case_dir.join(&name).display().to_string(),
            2 => format!("./{name}"),
            _ => name,
        }
    }

    fn file_row(&mut self) {
        let key = self.fresh_key();
        let (encoding, path) = match self.rng.u8(0..20) {
            0..=4 => {
                let len = self.string_len();
                let style = self.text_style();
                let text = self.text(len, style);
                self.layout.string(len);
                ("string".to_owned(), self.add_file("txt", text.into_bytes()))
            }
            5..=8 => {
                let len = self.blob_len();
                let data = self.bytes(len);
                let mut hex = self.hex(&data);
                if self.rng.bool() {
                    let before = pick(self.rng, &BYTES_SPACES);
                    let after = pick(self.rng, &BYTES_SPACES);
                    hex = format!("{before}{hex}{after}");
                }
                self.layout.blob(len);
                ("hex2bin".to_owned(), self.add_file("hex", hex.into_bytes()))
            }
            9..=11 => {
                let len = self.blob_len();
                let data = self.bytes(len);
                let text = self.base64(&data) + "\n";
                self.layout.blob(len);
                ("base64".to_owned(), self.add_file("b64", text.into_bytes()))
            }
            12..=17 => {
                let len = self.blob_len();
                let data = self.bytes(len);
                self.layout.blob(len);
                ("binary".to_owned(), self.add_file("bin", data))
            }
            18 => {
                // Quirk Q8: `int()` parses the file's bytes.
                let (name, min, max) = pick(self.rng, &INT_TYPES);
                let n = self.rng.i128(min..=max);
                let text = match self.rng.u8(0..4) {
                    0 => format!("{n}\n"),
                    1 => format!(" {n} \r\n"),
                    2 => format!("\t{n}"),
                    _ => format!("{n}"),
                };
                self.layout.primitive();
                (name.to_owned(), self.add_file("int", text.into_bytes()))
            }
            _ => {
                // An empty file is the one `file` value `blob_fill` survives.
                let n = self.rng.usize(0..200);
                self.layout.blob(n);
                (
                    format!("blob_fill({n};0x5a)"),
                    self.add_file("empty", Vec::new()),
                )
            }
        };
        self.push_row(key.clone(), "file", Cell::Text(encoding), Cell::Text(path));
        self.claim(&key);
    }

    /// Wi-Fi key names make the reference add entries of its own (quirk Q2).
    fn wifi_row(&mut self) {
        let key = pick(self.rng, &WIFI_KEYS);
        let mut written = Vec::new();
        let authmode = self.rng.u8(0..5).to_string();
        let mut wifi_after = self.wifi;
        match key {
            "ap.ssid" => wifi_after.ap_ssid = true,
            "ap.passwd" => wifi_after.ap_passwd = true,
            "ap.authmode" => wifi_after.ap_authmode |= authmode != "0",
            _ => {}
        }
        if key.starts_with("ap.") {
            if wifi_after.ap_ssid && wifi_after.ap_passwd && wifi_after.ap_authmode {
                written.push(("ap.pmk_info", 132));
            }
            written.push((key, 0));
        } else {
            written.push((key, 0));
            if !wifi_after.sta_done {
                written.extend([("sta.apinfo", 140), ("sta.pmk", 32), ("sta.apsw", 2)]);
                wifi_after.sta_done = true;
            }
        }
        if written
            .iter()
            .any(|(k, _)| self.keys.contains(&(self.ns(), (*k).to_owned())))
        {
            return;
        }
        self.wifi = wifi_after;
        let (encoding, value) = if key == "ap.authmode" && self.rng.bool() {
            ("u8".to_owned(), authmode)
        } else if key == "ap.authmode" {
            ("string".to_owned(), authmode)
        } else {
            let len = self.rng.usize(1..=16);
            ("string".to_owned(), self.text(len, TextStyle::Alnum))
        };
        self.push_row(
            key,
            "data",
            Cell::Text(encoding.clone()),
            Cell::text(&value),
        );
        for (k, blob) in written {
            self.claim(k);
            match (k == key, encoding.as_str()) {
                (false, _) => self.layout.blob(blob),
                (true, "u8") => self.layout.primitive(),
                (true, _) => self.layout.string(value.len()),
            }
        }
    }

    fn inject_refused(&mut self, refused: Refused) {
        match refused {
            Refused::NamespaceReselected => {
                while self.namespaces.len() < 2 {
                    self.new_namespace_row();
                    self.primitive_row();
                }
                let earlier = self.rng.usize(..self.namespaces.len() - 1);
                let name = self.namespaces[earlier].clone();
                self.namespace_row(&name);
            }
            Refused::DataBeforeNamespace => unreachable!("written before the first namespace"),
            Refused::UpperCaseEncoding => {
                let key = self.fresh_key();
                let encoding = pick(
                    self.rng,
                    &["STRING", "String", "HEX2BIN", "Hex2bin", "BASE64", "Base64"],
                );
                let value = match encoding.to_lowercase().as_str() {
                    "string" => self.text_in(0..50, TextStyle::Printable),
                    "hex2bin" => {
                        let data = self.bytes_in(0..40);
                        self.hex(&data)
                    }
                    _ => {
                        let data = self.bytes_in(0..40);
                        base64_encode(&data)
                    }
                };
                let len = value.len();
                self.push_row(key.clone(), "data", Cell::text(encoding), Cell::Text(value));
                self.claim(&key);
                self.layout.blob(len);
            }
            Refused::NonAsciiBinary => {
                let key = self.fresh_key();
                let len = self.rng.usize(4..200);
                let mut value = self.text(len, TextStyle::Unicode);
                if value.is_ascii() {
                    value.push('é');
                }
                let len = value.len();
                self.push_row(key.clone(), "data", Cell::text("binary"), Cell::Text(value));
                self.claim(&key);
                self.layout.blob(len);
            }
            Refused::DuplicateKey => {
                let existing = self
                    .keys
                    .iter()
                    .filter(|(ns, k)| {
                        *ns == self.ns()
                            && !WIFI_KEYS.contains(&k.as_str())
                            && !WIFI_EXTRAS.contains(&k.as_str())
                    })
                    .map(|(_, k)| k.clone())
                    .min();
                let key = match existing {
                    Some(key) => key,
                    None => self.primitive_row(),
                };
                self.push_row(key, "data", Cell::text("u8"), Cell::text("1"));
                self.layout.primitive();
            }
            Refused::NonAsciiKey => {
                let len = self.rng.usize(1..=8);
                let mut key = self.text(len, TextStyle::Unicode);
                if key.is_ascii() {
                    key.push('ü');
                }
                if self.rng.u8(0..4) == 0 {
                    self.namespace_row(&key);
                    self.namespaces.push(key);
                } else {
                    self.push_row(key.clone(), "data", Cell::text("u8"), Cell::text("5"));
                    self.claim(&key);
                }
                self.layout.primitive();
            }
        }
    }

    fn inject_invalid(&mut self) {
        let Some(invalid) = self.plan.invalid else {
            return;
        };
        let key = self.fresh_key();
        let (ty, encoding, value): (&str, String, Cell) = match invalid {
            Invalid::IntOutOfRange => {
                let (name, min, max) = pick(self.rng, &INT_TYPES);
                let n = match self.rng.u8(0..3) {
                    0 => min - 1,
                    1 => max + 1,
                    _ => max * 1000 + 7,
                };
                ("data", name.to_owned(), self.int_spelling(n))
            }
            Invalid::IntSpelling => {
                let text = pick(
                    self.rng,
                    &[
                        "0x10", "1.0", "", "1__0", "_1", "1_", "12a", "+-1", "1 2", "- 1",
                    ],
                );
                ("data", "i32".to_owned(), Cell::text(text))
            }
            Invalid::IntOddSpace => {
                let (name, _, max) = pick(self.rng, &INT_TYPES);
                let space = pick(self.rng, &["\x1c", "\x1d", "\x1e", "\x1f"]);
                let n = self.rng.i128(0..=max.min(1000));
                let text = if self.rng.bool() {
                    format!("{space}{n}")
                } else {
                    format!("{n}{space}")
                };
                ("data", name.to_owned(), Cell::Text(text))
            }
            Invalid::OddHex => {
                let data = self.bytes_in(0..40);
                let hex = self.hex(&data) + "a";
                ("data", "hex2bin".to_owned(), Cell::Text(hex))
            }
            Invalid::BadHexDigit => {
                let data = self.bytes_in(0..40);
                let hex = self.hex(&data) + pick(self.rng, &["zz", "0g", "0x", "é0"]);
                ("data", "hex2bin".to_owned(), Cell::Text(hex))
            }
            Invalid::Base64Padding => {
                let len = self.rng.usize(1..40) * 3 + self.rng.usize(1..=2);
                let data = self.bytes(len);
                let b64 = base64_encode(&data).trim_end_matches('=').to_owned();
                let b64 = if self.rng.bool() { b64 } else { b64 + "AAAAA" };
                ("data", "base64".to_owned(), Cell::Text(b64))
            }
            Invalid::KeyTooLong => {
                let len = self.rng.usize(16..=20);
                let long = self.ascii(len, ALNUM);
                if self.rng.bool() {
                    return self.namespace_row(&long);
                }
                return self.push_row(long, "data", Cell::text("u8"), Cell::text("1"));
            }
            Invalid::StringTooLong => {
                let len = if self.version == 2 {
                    self.rng.usize(3968..=4010)
                } else {
                    self.rng.usize(1984..=2000)
                };
                let text = self.text(len, TextStyle::Printable);
                ("data", "string".to_owned(), Cell::Text(text))
            }
            Invalid::BlobTooLongV1 => {
                let text = self.text_in(1985..=2100, TextStyle::Alnum);
                ("data", "binary".to_owned(), Cell::Text(text))
            }
            Invalid::MissingFile => ("file", "binary".to_owned(), Cell::text("no-such-file.bin")),
            Invalid::FileNotUtf8 => {
                let mut data = self.text_in(0..20, TextStyle::Alnum).into_bytes();
                data.insert(self.rng.usize(..=data.len()), 0xFF);
                let path = self.add_file("txt", data);
                ("file", "string".to_owned(), Cell::Text(path))
            }
            Invalid::UnknownEncoding => {
                let encoding = pick(self.rng, &["float", "", "int", "bool", "utf8", "hex"]);
                ("data", encoding.to_owned(), Cell::text("1"))
            }
            Invalid::MissingValue => {
                self.lines.push(Line::Row(Row {
                    key: Cell::Text(key),
                    ty: "data".to_owned(),
                    encoding: Some(Cell::text("u8")),
                    value: None,
                    surplus: 0,
                }));
                return;
            }
            Invalid::FillTooLong => {
                let n = self.rng.usize(0..10);
                let len = n + self.rng.usize(1..5);
                let value = self.text(len, TextStyle::Alnum);
                ("data", format!("blob_fill({n};0xff)"), Cell::Text(value))
            }
            Invalid::FillSpelling => {
                let encoding = pick(
                    self.rng,
                    &[
                        "blob_fill(4,0xff)",
                        "blob_fill(4;ff)",
                        "blob_fill(x;0xff)",
                        "blob_fill(4;0XFF)",
                        "blob_sz_fill(4;0xf)",
                        "blob_fill",
                    ],
                );
                ("data", encoding.to_owned(), Cell::text("ab"))
            }
            // Handled by `size` and `split_into_files`.
            Invalid::BadSize | Invalid::BlankLineBeforeHeader => return,
            Invalid::HugeField => {
                let len = self.rng.usize(65_537..70_000);
                let data = self.bytes(len);
                let hex = self.hex(&data);
                self.layout.blob(len);
                ("data", "hex2bin".to_owned(), Cell::Text(hex))
            }
            Invalid::FileHexOddSpace => {
                let data = self.bytes_in(0..40);
                let space = pick(self.rng, &ODD_SPACES);
                let hex = self.hex(&data);
                let text = if self.rng.bool() {
                    format!("{space}{hex}")
                } else {
                    format!("{hex}{space}")
                };
                let path = self.add_file("hex", text.into_bytes());
                ("file", "hex2bin".to_owned(), Cell::Text(path))
            }
            Invalid::FileIntOddSpace => {
                let space = pick(self.rng, &ODD_SPACES);
                let text = format!("{space}{}", self.rng.u8(..));
                let path = self.add_file("int", text.into_bytes());
                ("file", "u8".to_owned(), Cell::Text(path))
            }
            Invalid::FileFill => {
                let text = self.text_in(1..10, TextStyle::Alnum);
                let path = self.add_file("txt", text.into_bytes());
                ("file", "blob_fill(16;0xff)".to_owned(), Cell::Text(path))
            }
        };
        self.push_row(key.clone(), ty, Cell::Text(encoding), value);
        self.claim(&key);
    }

    /// The SIZE argument: mostly just enough or a little more than the data needs, sometimes
    /// exactly one page short, sometimes random; spelled in the ways `int(size, 0)` reads.
    fn size(&mut self, read_only: bool, needed: usize, max_pages: usize) -> String {
        if self.plan.invalid == Some(Invalid::BadSize) {
            let bad = [
                "0x3001", "0", "6K", "012288", "-0x3000", "0x", "", "1e4", "0x1000.0",
            ];
            return pick(self.rng, &bad).to_owned();
        }
        let pages = if read_only {
            if self.rng.u8(0..10) == 0 {
                self.rng.usize(1..=2)
            } else {
                needed.clamp(1, 2)
            }
        } else {
            match self.rng.u8(0..20) {
                0..=4 => needed + 1,
                5 => needed,
                6..=15 => needed + 1 + self.rng.usize(0..=5),
                _ => self.rng.usize(3..=max_pages),
            }
            .clamp(3, max_pages.max(needed + 1))
        };
        let bytes = pages * 4096;
        if self.plan.exotic == Some(Exotic::SignedHexSize) {
            return format!("+{bytes:#x}");
        }
        match self.rng.u8(0..40) {
            0..=1 => format!("{bytes:#X}"),
            2..=5 => bytes.to_string(),
            6 => {
                let s = bytes.to_string();
                let (a, b) = s.split_at(s.len() - 3);
                format!("{a}_{b}")
            }
            7 => format!("0x_{bytes:x}"),
            8 => format!("{bytes:#o}"),
            9 => format!(" {bytes:#x} "),
            10 => format!("+{bytes}"),
            _ => format!("{bytes:#x}"),
        }
    }

    /// Serializes the lines into CSV files: each with its own header (column order, extra
    /// columns), line endings and comments.
    fn split_into_files(&mut self) -> (Vec<String>, Vec<(String, Vec<u8>)>) {
        let lines = std::mem::take(&mut self.lines);
        let mut groups: Vec<Vec<Line>> = vec![Vec::new()];
        for line in lines {
            match line {
                Line::FileBreak => groups.push(Vec::new()),
                line => groups.last_mut().unwrap().push(line),
            }
        }
        let mut inputs = Vec::new();
        let mut files = Vec::new();
        for (i, group) in groups.into_iter().enumerate() {
            let name = format!("in{i}.csv");
            let blank_first = i == 0 && self.plan.invalid == Some(Invalid::BlankLineBeforeHeader);
            files.push((
                name.clone(),
                self.csv_file(&group, blank_first).into_bytes(),
            ));
            inputs.push(name);
        }
        (inputs, files)
    }

    fn csv_file(&mut self, lines: &[Line], blank_first: bool) -> String {
        #[derive(Clone, PartialEq)]
        enum Col {
            Key,
            Type,
            Encoding,
            Value,
            Extra(&'static str),
        }
        let mut columns = vec![Col::Key, Col::Type, Col::Encoding, Col::Value];
        match self.rng.u8(0..10) {
            0 => self.rng.shuffle(&mut columns),
            1 => {
                let at = self.rng.usize(..=columns.len());
                columns.insert(at, Col::Extra(pick(self.rng, &["comment", "id", "Key"])));
            }
            _ => {}
        }
        let standard = columns[..] == [Col::Key, Col::Type, Col::Encoding, Col::Value];
        let eol = match self.rng.u8(0..20) {
            0..=2 => "\r\n",
            3 => "\r",
            _ => "\n",
        };
        let mut out = String::new();
        if blank_first {
            out.push_str(eol);
        }
        if self.rng.u8(0..5) == 0 {
            write!(out, "# generated by cargo xtask diff-ref{eol}").unwrap();
        }
        let header: Vec<&str> = columns
            .iter()
            .map(|c| match c {
                Col::Key => "key",
                Col::Type => "type",
                Col::Encoding => "encoding",
                Col::Value => "value",
                Col::Extra(name) => name,
            })
            .collect();
        write!(out, "{}{eol}", header.join(",")).unwrap();
        if lines.is_empty() && self.rng.bool() {
            // An input with nothing at all in it, not even a header.
            return String::new();
        }
        for line in lines {
            match line {
                Line::Comment(text) => write!(out, "#{text}{eol}").unwrap(),
                Line::Blank => out.push_str(eol),
                Line::FileBreak => unreachable!(),
                Line::Row(row) => {
                    let short = standard && (row.encoding.is_none() || row.value.is_none());
                    let mut cells: Vec<String> = Vec::new();
                    for col in &columns {
                        let cell = match col {
                            Col::Key => Some(row.key.clone()),
                            Col::Type => Some(Cell::text(&row.ty)),
                            Col::Encoding => row.encoding.clone(),
                            Col::Value => row.value.clone(),
                            Col::Extra(_) => {
                                Some(Cell::Text(self.text_in(0..8, TextStyle::Printable)))
                            }
                        };
                        match cell {
                            None if short => break,
                            None => cells.push(String::new()),
                            Some(cell) => {
                                let first = cells.is_empty();
                                cells.push(self.render(cell, first));
                            }
                        }
                    }
                    for _ in 0..row.surplus {
                        cells.push(self.text(3, TextStyle::Alnum));
                    }
                    write!(out, "{}{eol}", cells.join(",")).unwrap();
                }
            }
        }
        out
    }

    /// Quotes a cell the way Python's `csv.writer` does (when it holds a delimiter, quote or
    /// line break), sometimes when it need not, and always when a leading `#` would turn the
    /// line into a comment.
    fn render(&mut self, cell: Cell, first: bool) -> String {
        match cell {
            Cell::Raw(raw) => raw,
            Cell::Text(text) => {
                let needs = text.contains([',', '"', '\n', '\r']) || first && text.starts_with('#');
                if needs || self.rng.u8(0..20) == 0 {
                    format!("\"{}\"", text.replace('"', "\"\""))
                } else {
                    text
                }
            }
        }
    }
}

impl From<String> for Cell {
    fn from(s: String) -> Cell {
        Cell::Text(s)
    }
}

impl From<&str> for Cell {
    fn from(s: &str) -> Cell {
        Cell::Text(s.to_owned())
    }
}

pub fn base64_encode(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_python() {
        assert_eq!(base64_encode(b""), "");
        assert_eq!(base64_encode(b"h"), "aA==");
        assert_eq!(base64_encode(b"hello"), "aGVsbG8=");
        assert_eq!(base64_encode(b"\xff\xfe\xfd"), "//79");
    }

    #[test]
    fn layout_follows_the_reference() {
        // Spec §9.2: a blob starting at entry 125 leaves a zero-length chunk there and puts
        // its index on the next page.
        let mut layout = Layout::new(true);
        layout.cursor = 125;
        layout.blob(0);
        assert_eq!((layout.pages, layout.cursor), (2, 1));
        // A string never ends on entry 125; a primitive may take it.
        let mut layout = Layout::new(false);
        layout.cursor = 120;
        layout.string(5 * 32 - 1);
        assert_eq!((layout.pages, layout.cursor), (2, 6));
        layout.cursor = 125;
        layout.primitive();
        assert_eq!((layout.pages, layout.cursor), (2, 126));
    }

    #[test]
    fn cases_are_reproducible() {
        let opts = Options {
            max_pages: 40,
            refused_share: 0.2,
            invalid_share: 0.2,
            exotic_share: 0.1,
        };
        for seed in 0..50 {
            let a = generate(&mut Rng::with_seed(seed), Path::new("/x"), &opts);
            let b = generate(&mut Rng::with_seed(seed), Path::new("/x"), &opts);
            assert_eq!((a.size, a.inputs, a.files), (b.size, b.inputs, b.files));
        }
    }
}
