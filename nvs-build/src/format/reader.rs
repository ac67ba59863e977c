//! The reader: parses an image (from the generator or read back from a device) into pages,
//! namespaces and typed items, and lists every inconsistency it finds. It never panics.

use std::collections::{BTreeMap, HashMap};

use super::crc::{entry_crc, nvs_crc32};
use super::layout::{
    BITMAP_OFFSET, CHUNK_ANY, ENTRIES_PER_PAGE, ENTRY_SIZE, EntryState, FIRST_ENTRY_OFFSET,
    ItemType, PAGE_SIZE, PageState, Version, bitmap_state, data_entries,
};
use super::value::Value;

/// One page of a parsed image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageSummary {
    /// Physical position in the image (0-based).
    pub index: usize,
    /// The state word of the header.
    pub state: PageState,
    /// Sequence number from the header (`None` for uninitialized pages).
    pub sequence: Option<u32>,
    /// The format version from the header (`None` for uninitialized pages).
    pub version: Option<Version>,
    /// Entries marked written in the bitmap.
    pub written: usize,
    /// Entries marked erased in the bitmap.
    pub erased: usize,
    /// Entries marked empty (free) in the bitmap.
    pub empty: usize,
}

/// How serious a problem is: errors are real damage (the device loses data or refuses the
/// partition); warnings are leftovers the device cleans up by itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    /// Something the device cleans up or tolerates: nothing is lost.
    Warning,
    /// Damage: the device loses data or refuses the partition.
    Error,
}

/// Something wrong in the image, with where it was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// How serious it is.
    pub severity: Severity,
    /// The page (physical index), when the problem is in one.
    pub page: Option<usize>,
    /// The entry within the page, when the problem is in one.
    pub entry: Option<usize>,
    /// What is wrong, in words.
    pub message: String,
}

/// A namespace defined in the namespace table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceDef {
    /// The namespace's index (1..=254), which data items refer to.
    pub index: u8,
    /// The namespace's name.
    pub name: String,
}

/// Blob contents with how they were stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blob {
    /// The blob's bytes.
    pub data: Vec<u8>,
    /// Number of chunks (version 2 blobs); `None` for a legacy version 1 blob.
    pub chunks: Option<u8>,
    /// First chunk index of the blob's family: 0x00 or 0x80 (version 2 blobs).
    pub chunk_start: Option<u8>,
}

/// The value of an item as read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ItemValue {
    /// Integers and strings (without their NUL).
    Value(Value),
    /// A blob (legacy or chunked), with how it was stored.
    Blob(Blob),
    /// Data that could not be decoded (its entry is reported as a problem).
    Unreadable,
}

/// One logical item (a namespace-table entry, an integer, a string or a whole blob).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    /// Page and entry of the item's header (for a version 2 blob, of its index entry).
    pub page: usize,
    /// Entry index of the item's header within its page.
    pub entry: usize,
    /// The namespace index the item refers to.
    pub ns_index: u8,
    /// Name of the namespace, when the namespace table defines it.
    pub namespace: Option<String>,
    /// The key.
    pub key: String,
    /// The item's type as stored (`BlobIndex` for a version 2 blob).
    pub item_type: ItemType,
    /// The value.
    pub value: ItemValue,
    /// The entry is marked ERASED (an older copy the device has replaced).
    pub erased: bool,
}

impl Item {
    /// The item's type as a user wrote it: both kinds of blob are "blob".
    pub fn type_name(&self) -> &'static str {
        match self.item_type {
            ItemType::BlobIndex | ItemType::Blob => "blob",
            ty => ty.name(),
        }
    }
}

/// A parsed image.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParsedImage {
    /// Every page of the image, in physical order.
    pub pages: Vec<PageSummary>,
    /// The namespace table.
    pub namespaces: Vec<NamespaceDef>,
    /// Data items in page-sequence order (namespace-table entries are in `namespaces`).
    pub items: Vec<Item>,
    /// What is wrong with the image; empty for an intact one.
    pub problems: Vec<Problem>,
    /// Written entries exist but not one passes its CRC: the image is encrypted, or was
    /// decrypted with the wrong key.
    pub looks_encrypted: bool,
}

impl ParsedImage {
    /// True when a problem of severity [`Severity::Error`] was found.
    pub fn is_damaged(&self) -> bool {
        self.problems.iter().any(|p| p.severity == Severity::Error)
    }

    /// The format version of the first initialized page.
    pub fn version(&self) -> Option<Version> {
        self.pages.iter().find_map(|p| p.version)
    }

    /// Live items (not erased), the way the device sees them.
    pub fn live_items(&self) -> impl Iterator<Item = &Item> {
        self.items.iter().filter(|i| !i.erased)
    }
}

/// A raw entry header as found on a page, before blobs are assembled.
struct RawItem {
    page: usize,
    entry: usize,
    state: EntryState,
    ns: u8,
    ty: ItemType,
    chunk: u8,
    key: String,
    /// Data field of the header.
    field: [u8; 8],
    /// Payload of a string/blob/chunk (when its spans and CRCs check out).
    payload: Option<Vec<u8>>,
}

/// Parses an image. Problems are collected in [`ParsedImage::problems`]; this never fails.
pub fn read_image(image: &[u8]) -> ParsedImage {
    let mut out = ParsedImage::default();
    let mut raw = Vec::new();
    if image.is_empty() {
        out.problems
            .push(problem(None, None, "the image is empty".into()));
        return out;
    }
    if image.len() % PAGE_SIZE != 0 {
        out.problems.push(problem(
            None,
            None,
            format!(
                "the image is {} bytes long, not a whole number of 4096-byte pages (truncated?); \
                 the last {} bytes are ignored",
                image.len(),
                image.len() % PAGE_SIZE
            ),
        ));
    }
    for (index, page) in image.chunks_exact(PAGE_SIZE).enumerate() {
        let summary = read_page(index, page, &mut raw, &mut out.problems);
        out.pages.push(summary);
    }
    check_pages(&mut out);
    out.looks_encrypted = no_written_entry_passes_crc(image);
    if out.looks_encrypted {
        out.problems.push(problem(
            None,
            None,
            "not one written entry passes its CRC check: the image is encrypted (give its key) or \
             was decrypted with the wrong key"
                .into(),
        ));
    }

    // Walk items in the order the device would: pages by sequence number.
    let mut order: Vec<usize> = (0..out.pages.len()).collect();
    order.sort_by_key(|&i| (out.pages[i].sequence.is_none(), out.pages[i].sequence, i));
    let rank: HashMap<usize, usize> = order.iter().enumerate().map(|(r, &p)| (p, r)).collect();
    raw.sort_by_key(|r| (rank[&r.page], r.entry));

    collect_namespaces(&raw, &mut out);
    assemble_items(raw, &mut out);
    check_duplicates(&mut out);
    check_freeing(&order, &mut out);
    out
}

/// A FREEING page is one the device was moving to a new page when power went out. At init it
/// erases the newest page if that is ACTIVE (it takes it for the half-made copy), copies the
/// FREEING page's items to a fresh page and erases the FREEING page (ESP-IDF's
/// `PageManager::load`). Data is lost when the ACTIVE page it erases holds items that are not
/// also on the FREEING page; otherwise flash is only rewritten.
fn check_freeing(order: &[usize], out: &mut ParsedImage) {
    let listed: Vec<usize> = order
        .iter()
        .copied()
        .filter(|&p| {
            matches!(
                out.pages[p].state,
                PageState::Active | PageState::Full | PageState::Freeing
            ) && out.pages[p].sequence.is_some()
        })
        .collect();
    let Some(&freeing) = listed
        .iter()
        .find(|&&p| out.pages[p].state == PageState::Freeing)
    else {
        return;
    };
    let newest = listed.last().copied();
    let erased_page = newest.filter(|&p| p != freeing && out.pages[p].state == PageState::Active);
    let live_on = |page: usize| {
        out.items
            .iter()
            .filter(move |i| i.page == page && !i.erased)
            .map(|i| (i.ns_index, i.key.clone(), i.type_name()))
    };
    let lost: Vec<String> = match erased_page {
        Some(active) => {
            let kept: Vec<_> = live_on(freeing).collect();
            live_on(active)
                .filter(|k| !kept.contains(k))
                .map(|(_, key, _)| format!("`{key}`"))
                .collect()
        }
        None => Vec::new(),
    };
    if let (Some(active), false) = (erased_page, lost.is_empty()) {
        out.problems.push(problem(
            Some(freeing),
            None,
            format!(
                "page is FREEING: at init the device erases the ACTIVE page {active} (taking it for an \
                 interrupted copy of this page) and moves this page's items to a new page; {} on page \
                 {active} exist nowhere else and are lost",
                lost.join(", ")
            ),
        ));
    } else {
        out.problems.push(warning(
            Some(freeing),
            None,
            "page is FREEING (a page move was interrupted): at init the device copies its items to a \
             new page and erases it; flash is rewritten, nothing is lost"
                .into(),
        ));
    }
}

/// True when some entries are marked written but none of them has a valid entry CRC.
fn no_written_entry_passes_crc(image: &[u8]) -> bool {
    let mut written = 0;
    for page in image.chunks_exact(PAGE_SIZE) {
        if page[..4] == [0xFF; 4] || nvs_crc32(&page[4..28]).to_le_bytes() != page[28..32] {
            continue;
        }
        let bitmap = &page[BITMAP_OFFSET..BITMAP_OFFSET + 32];
        for i in 0..ENTRIES_PER_PAGE {
            if bitmap_state(bitmap, i) == EntryState::Written {
                written += 1;
                let at = FIRST_ENTRY_OFFSET + i * ENTRY_SIZE;
                let entry: &[u8; 32] = page[at..at + ENTRY_SIZE].try_into().expect("32 bytes");
                if entry_crc(entry).to_le_bytes() == entry[4..8] {
                    return false;
                }
            }
        }
    }
    written > 0
}

fn problem(page: Option<usize>, entry: Option<usize>, message: String) -> Problem {
    Problem {
        severity: Severity::Error,
        page,
        entry,
        message,
    }
}

fn warning(page: Option<usize>, entry: Option<usize>, message: String) -> Problem {
    Problem {
        severity: Severity::Warning,
        page,
        entry,
        message,
    }
}

fn read_page(
    index: usize,
    page: &[u8],
    raw: &mut Vec<RawItem>,
    problems: &mut Vec<Problem>,
) -> PageSummary {
    let word = u32::from_le_bytes([page[0], page[1], page[2], page[3]]);
    let state = PageState::from_word(word);
    let mut summary = PageSummary {
        index,
        state,
        sequence: None,
        version: None,
        written: 0,
        erased: 0,
        empty: ENTRIES_PER_PAGE,
    };
    if state == PageState::Uninitialized {
        if page[..32].iter().any(|&b| b != 0xFF) {
            // A page whose state word was lost: the device takes it for a free page, so
            // whatever it held is gone (and erased when the page is reused).
            problems.push(problem(
                Some(index),
                None,
                "page state word is 0xFFFFFFFF (uninitialized) but the rest of its header is written: \
                 the device takes it for a free page and loses its entries"
                    .into(),
            ));
        } else if page.iter().any(|&b| b != 0xFF) {
            // No header at all: the device erases the page before it uses it; nothing is lost.
            problems.push(warning(
                Some(index),
                None,
                "page has no header (all 0xFF) but is not blank; the device erases it before using it"
                    .into(),
            ));
        }
        return summary;
    }
    let stored_crc = u32::from_le_bytes([page[28], page[29], page[30], page[31]]);
    if nvs_crc32(&page[4..28]) != stored_crc {
        problems.push(problem(
            Some(index),
            None,
            format!(
                "page header CRC mismatch (stored {stored_crc:#010x}); the device treats this page as corrupt"
            ),
        ));
        return summary;
    }
    summary.sequence = Some(u32::from_le_bytes([page[4], page[5], page[6], page[7]]));
    summary.version = Version::from_header_byte(page[8]);
    if summary.version.is_none() {
        problems.push(problem(
            Some(index),
            None,
            format!(
                "unknown format version byte {:#04x} (0xFE is version 2, 0xFF version 1)",
                page[8]
            ),
        ));
    }
    match state {
        PageState::Active | PageState::Full | PageState::Freeing => {}
        PageState::Corrupt => {
            problems.push(problem(Some(index), None, "page is marked CORRUPT".into()))
        }
        PageState::Invalid(word) => problems.push(problem(
            Some(index),
            None,
            format!("unknown page state {word:#010x}"),
        )),
        PageState::Uninitialized => unreachable!("handled above"),
    }

    let bitmap = &page[BITMAP_OFFSET..BITMAP_OFFSET + 32];
    let entry_bytes = |i: usize| -> &[u8] {
        let at = FIRST_ENTRY_OFFSET + i * ENTRY_SIZE;
        &page[at..at + ENTRY_SIZE]
    };
    let mut i = 0;
    summary.empty = 0;
    // The device's next write goes to the first EMPTY slot of an ACTIVE page.
    let first_free = (0..ENTRIES_PER_PAGE).find(|&j| bitmap_state(bitmap, j) == EntryState::Empty);
    let mut unused_not_blank = Vec::new();
    while i < ENTRIES_PER_PAGE {
        let entry_state = bitmap_state(bitmap, i);
        match entry_state {
            EntryState::Empty => {
                summary.empty += 1;
                if entry_bytes(i).iter().any(|&b| b != 0xFF) {
                    unused_not_blank.push(i);
                }
                i += 1;
                continue;
            }
            EntryState::Illegal => {
                problems.push(problem(
                    Some(index),
                    Some(i),
                    "entry state is ILLEGAL (0b01)".into(),
                ));
                i += 1;
                continue;
            }
            EntryState::Written => summary.written += 1,
            EntryState::Erased => summary.erased += 1,
        }
        let bytes: [u8; 32] = entry_bytes(i).try_into().unwrap_or([0xFF; 32]);
        let (consumed, item) = parse_entry(
            index,
            i,
            entry_state,
            &bytes,
            &|j| entry_bytes(j),
            bitmap,
            problems,
        );
        // Data entries of a multi-entry item count with their header's state.
        for j in i + 1..i + consumed {
            match bitmap_state(bitmap, j) {
                EntryState::Written => summary.written += 1,
                EntryState::Erased => summary.erased += 1,
                EntryState::Empty => summary.empty += 1,
                EntryState::Illegal => {}
            }
        }
        if let Some(item) = item {
            if let (PageState::Active, Some(free), EntryState::Written) =
                (state, first_free, entry_state)
            {
                if i > free {
                    problems.push(problem(
                        Some(index),
                        Some(i),
                        format!(
                            "key `{}` lies after entry {free}, which the bitmap marks EMPTY on this ACTIVE \
                             page: the device erases every written slot from entry {free} on at init, so \
                             the key is lost",
                            item.key
                        ),
                    ));
                }
            }
            raw.push(item);
        }
        i += consumed;
    }
    check_unused_entries(index, page, state, first_free, &unused_not_blank, problems);
    summary
}

/// Slots the bitmap marks EMPTY that do not hold erased flash. On an ACTIVE page the device
/// marks the non-blank slots from the first free one on as erased at init, and writes its next
/// items over the others (which corrupts them); on a FULL or FREEING page it never looks at
/// them, so only a whole entry hidden there (a key that vanished) is damage.
fn check_unused_entries(
    index: usize,
    page: &[u8],
    state: PageState,
    first_free: Option<usize>,
    slots: &[usize],
    problems: &mut Vec<Problem>,
) {
    let entry = |i: usize| -> [u8; 32] {
        let at = FIRST_ENTRY_OFFSET + i * ENTRY_SIZE;
        page[at..at + ENTRY_SIZE].try_into().unwrap_or([0xFF; 32])
    };
    // The key of a whole, valid entry in slot `i`, if it holds one.
    let hidden_key = |i: usize| -> Option<String> {
        let bytes = entry(i);
        let crc_ok = entry_crc(&bytes).to_le_bytes() == bytes[4..8];
        (crc_ok && ItemType::from_code(bytes[1]).is_some())
            .then(|| read_key(&bytes[8..24]).ok())
            .flatten()
    };
    // Non-blank header words from the first free slot on, one after the other: the device
    // marks these erased when it mounts the page.
    let mut erased_run_end = first_free.unwrap_or(ENTRIES_PER_PAGE);
    if state == PageState::Active {
        while erased_run_end < ENTRIES_PER_PAGE && entry(erased_run_end)[..4] != [0xFF; 4] {
            erased_run_end += 1;
        }
    }
    for &i in slots {
        let key = hidden_key(i);
        let named = key
            .as_deref()
            .map_or(String::new(), |k| format!(" (key `{k}`)"));
        match state {
            PageState::Active if first_free.is_some_and(|f| i < erased_run_end && i >= f) => {
                problems.push(problem(
                    Some(index),
                    Some(i),
                    format!(
                        "the bitmap marks this slot EMPTY but it holds an entry{named}; on this ACTIVE page \
                         the device marks it and the non-blank slots after it erased at init: their data is lost"
                    ),
                ))
            }
            PageState::Active => problems.push(problem(
                Some(index),
                Some(i),
                format!(
                    "unused slot after the first free one is not blank{named}; the next item the device \
                     writes here is corrupted and lost"
                ),
            )),
            _ if key.is_some() => problems.push(problem(
                Some(index),
                Some(i),
                format!(
                    "the bitmap marks this slot EMPTY but it holds an entry{named}; the device does not \
                     see it on a {} page: the key vanishes",
                    state.name().to_uppercase()
                ),
            )),
            _ => problems.push(warning(
                Some(index),
                Some(i),
                format!(
                    "unused slot is not blank; the device never writes to a {} page and ignores it",
                    state.name().to_uppercase()
                ),
            )),
        }
    }
}

/// Parses the entry at `i`. Returns how many entries it spans (at least 1) and the raw item,
/// if the header could be decoded.
#[allow(clippy::too_many_arguments)]
fn parse_entry<'a>(
    page: usize,
    i: usize,
    state: EntryState,
    bytes: &[u8; 32],
    entry_at: &dyn Fn(usize) -> &'a [u8],
    bitmap: &[u8],
    problems: &mut Vec<Problem>,
) -> (usize, Option<RawItem>) {
    // Only WRITTEN entries must be consistent: an ERASED one may be a half-written leftover.
    let strict = state == EntryState::Written;
    let report = |problems: &mut Vec<Problem>, msg: String| {
        if strict {
            problems.push(problem(Some(page), Some(i), msg));
        }
    };
    if bytes.iter().all(|&b| b == 0xFF) {
        report(problems, "entry is marked written but is blank".into());
        return (1, None);
    }
    let stored_crc = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    if entry_crc(bytes) != stored_crc {
        report(problems, "entry CRC mismatch".into());
        return (1, None);
    }
    let Some(ty) = ItemType::from_code(bytes[1]) else {
        report(problems, format!("unknown item type {:#04x}", bytes[1]));
        return (1, None);
    };
    let key = match read_key(&bytes[8..24]) {
        Ok(key) => key,
        Err(msg) => {
            report(problems, msg);
            return (1, None);
        }
    };
    let span = bytes[2] as usize;
    let chunk = bytes[3];
    let mut field = [0u8; 8];
    field.copy_from_slice(&bytes[24..32]);
    let mut item = RawItem {
        page,
        entry: i,
        state,
        ns: bytes[0],
        ty,
        chunk,
        key,
        field,
        payload: None,
    };
    let named = format!("`{}`", item.key);
    let single_entry = ty.primitive_width().is_some() || ty == ItemType::BlobIndex;
    match ty {
        _ if single_entry => {
            if span != 1 {
                report(
                    problems,
                    format!("{} item {named} has span {span}, expected 1", ty.name()),
                );
            }
            if chunk != CHUNK_ANY {
                report(
                    problems,
                    format!(
                        "{} item {named} has chunk index {chunk:#04x}, expected 0xff",
                        ty.name()
                    ),
                );
            }
            (1, Some(item))
        }
        _ => {
            let size = u16::from_le_bytes([field[0], field[1]]) as usize;
            let expected_span = 1 + data_entries(size);
            if ty == ItemType::BlobData && chunk == CHUNK_ANY {
                report(problems, format!("blob chunk {named} has chunk index 0xff"));
            }
            if span != expected_span || i + span > ENTRIES_PER_PAGE {
                report(
                    problems,
                    format!(
                        "{} item {named} of {size} bytes has span {span} (expected {expected_span}, within the page)",
                        ty.name()
                    ),
                );
                return (1, Some(item));
            }
            let mut payload = Vec::with_capacity(size);
            for j in i + 1..i + span {
                if bitmap_state(bitmap, j) != state {
                    report(
                        problems,
                        format!(
                            "data entry {j} of {named} is {} but its header is {}",
                            bitmap_state(bitmap, j).name(),
                            state.name()
                        ),
                    );
                }
                payload.extend_from_slice(entry_at(j));
            }
            payload.truncate(size);
            let data_crc = u32::from_le_bytes([field[4], field[5], field[6], field[7]]);
            if nvs_crc32(&payload) != data_crc {
                report(
                    problems,
                    format!("data CRC mismatch in {} item {named}", ty.name()),
                );
            } else {
                item.payload = Some(payload);
            }
            (span, Some(item))
        }
    }
}

fn read_key(field: &[u8]) -> Result<String, String> {
    let Some(end) = field.iter().position(|&b| b == 0) else {
        return Err("key is not NUL-terminated within 16 bytes".into());
    };
    Ok(String::from_utf8_lossy(&field[..end]).into_owned())
}

fn check_pages(out: &mut ParsedImage) {
    let active = out
        .pages
        .iter()
        .filter(|p| p.state == PageState::Active)
        .count();
    if active > 1 {
        // Legal: the device reads them all and loses nothing.
        out.problems.push(warning(
            None,
            None,
            format!(
                "{active} pages are ACTIVE (the device expects one); it reads them all and loses nothing"
            ),
        ));
    }
    let mut seen = HashMap::new();
    for page in &out.pages {
        if let Some(seq) = page.sequence {
            if let Some(first) = seen.insert(seq, page.index) {
                out.problems.push(problem(
                    Some(page.index),
                    None,
                    format!("sequence number {seq} is also used by page {first}"),
                ));
            }
        }
    }
    let free = out
        .pages
        .iter()
        .filter(|p| p.state == PageState::Uninitialized)
        .count();
    if out.pages.len() >= 3 && free == 0 {
        out.problems.push(problem(
            None,
            None,
            "no free (uninitialized) page: a read/write partition needs one, or the device fails \
             with ESP_ERR_NVS_NO_FREE_PAGES (truncated image, or a read-only partition of 3+ pages?)"
                .into(),
        ));
    }
}

fn collect_namespaces(raw: &[RawItem], out: &mut ParsedImage) {
    for r in raw
        .iter()
        .filter(|r| r.ns == 0 && r.state == EntryState::Written)
    {
        if r.ty != ItemType::U8 {
            out.problems.push(problem(
                Some(r.page),
                Some(r.entry),
                format!(
                    "namespace table entry `{}` has type {}, expected u8",
                    r.key,
                    r.ty.name()
                ),
            ));
            continue;
        }
        let index = r.field[0];
        if index == 0 || index == 0xFF {
            out.problems.push(problem(
                Some(r.page),
                Some(r.entry),
                format!("namespace `{}` has reserved index {index}", r.key),
            ));
        }
        if let Some(other) = out
            .namespaces
            .iter()
            .find(|n| n.index == index || n.name == r.key)
        {
            out.problems.push(problem(
                Some(r.page),
                Some(r.entry),
                format!(
                    "namespace `{}` ({index}) clashes with namespace `{}` ({})",
                    r.key, other.name, other.index
                ),
            ));
            continue;
        }
        out.namespaces.push(NamespaceDef {
            index,
            name: r.key.clone(),
        });
    }
}

/// A live blob chunk: where it is and its payload (if its CRCs checked out).
struct Chunk {
    page: usize,
    entry: usize,
    payload: Option<Vec<u8>>,
}

type ChunksByIndex = BTreeMap<u8, Chunk>;

fn assemble_items(mut raw: Vec<RawItem>, out: &mut ParsedImage) {
    let names: HashMap<u8, String> = out
        .namespaces
        .iter()
        .map(|n| (n.index, n.name.clone()))
        .collect();
    // Chunks by (ns, key, family), live ones only: erased chunks belong to replaced blobs.
    let mut chunks: HashMap<(u8, String, u8), ChunksByIndex> = HashMap::new();
    // Chunk payloads move into `chunks` (the loop below skips chunk entries): a large image is
    // not held twice.
    for r in raw
        .iter_mut()
        .filter(|r| r.ty == ItemType::BlobData && r.state == EntryState::Written)
    {
        let family = if r.chunk < 0x80 { 0x00 } else { 0x80 };
        let slot = chunks.entry((r.ns, r.key.clone(), family)).or_default();
        if slot
            .insert(
                r.chunk,
                Chunk {
                    page: r.page,
                    entry: r.entry,
                    payload: r.payload.take(),
                },
            )
            .is_some()
        {
            out.problems.push(warning(
                Some(r.page),
                Some(r.entry),
                format!(
                    "chunk {} of blob `{}` appears twice (the device keeps the later one)",
                    r.chunk, r.key
                ),
            ));
        }
    }
    let mut used_families = Vec::new();
    let mut undefined_ns = Vec::new();
    for r in raw {
        if r.ns == 0 || r.ty == ItemType::BlobData {
            continue;
        }
        let erased = r.state == EntryState::Erased;
        if !erased && !names.contains_key(&r.ns) && !undefined_ns.contains(&r.ns) {
            undefined_ns.push(r.ns);
            out.problems.push(problem(
                Some(r.page),
                Some(r.entry),
                format!(
                    "key `{}` uses namespace index {} that the namespace table does not define",
                    r.key, r.ns
                ),
            ));
        }
        let value = match r.ty {
            ItemType::Str => match &r.payload {
                Some(bytes) => {
                    let text = match bytes.split_last() {
                        Some((0, text)) => text,
                        _ => {
                            if !erased {
                                out.problems.push(problem(
                                    Some(r.page),
                                    Some(r.entry),
                                    format!("string `{}` is not NUL-terminated", r.key),
                                ));
                            }
                            &bytes[..]
                        }
                    };
                    ItemValue::Value(Value::String(String::from_utf8_lossy(text).into_owned()))
                }
                None => ItemValue::Unreadable,
            },
            ItemType::Blob => match r.payload {
                Some(data) => ItemValue::Blob(Blob {
                    data,
                    chunks: None,
                    chunk_start: None,
                }),
                None => ItemValue::Unreadable,
            },
            ItemType::BlobIndex => {
                let size =
                    u32::from_le_bytes([r.field[0], r.field[1], r.field[2], r.field[3]]) as usize;
                let count = r.field[4];
                let start = r.field[5];
                if erased {
                    ItemValue::Unreadable
                } else {
                    used_families.push((r.ns, r.key.clone(), start));
                    assemble_blob(
                        &r,
                        size,
                        count,
                        start,
                        chunks.get(&(r.ns, r.key.clone(), start)),
                        &mut out.problems,
                    )
                }
            }
            ty => match Value::decode_primitive(ty, &r.field) {
                Some(v) => ItemValue::Value(v),
                None => ItemValue::Unreadable,
            },
        };
        out.items.push(Item {
            page: r.page,
            entry: r.entry,
            ns_index: r.ns,
            namespace: names.get(&r.ns).cloned(),
            key: r.key,
            item_type: r.ty,
            value,
            erased,
        });
    }
    let mut orphans: Vec<_> = chunks
        .iter()
        .filter(|(k, _)| !used_families.contains(k))
        .map(|((_, key, family), list)| {
            let (page, entry) = list.values().next().map_or((0, 0), |c| (c.page, c.entry));
            (page, entry, key.clone(), *family)
        })
        .collect();
    orphans.sort();
    for (page, entry, key, family) in orphans {
        out.problems.push(warning(
            Some(page),
            Some(entry),
            format!("blob chunks of `{key}` (family {family:#04x}) have no blob index; the device discards them"),
        ));
    }
}

fn assemble_blob(
    index: &RawItem,
    size: usize,
    count: u8,
    start: u8,
    chunks: Option<&ChunksByIndex>,
    problems: &mut Vec<Problem>,
) -> ItemValue {
    let at = (Some(index.page), Some(index.entry));
    if start != 0x00 && start != 0x80 {
        problems.push(problem(
            at.0,
            at.1,
            format!(
                "blob `{}` has chunk start {start:#04x} (expected 0x00 or 0x80)",
                index.key
            ),
        ));
        return ItemValue::Unreadable;
    }
    let mut data = Vec::with_capacity(size);
    let mut complete = true;
    for k in 0..count {
        let chunk_index = start.wrapping_add(k);
        match chunks.and_then(|c| c.get(&chunk_index)) {
            Some(Chunk {
                payload: Some(payload),
                ..
            }) => data.extend_from_slice(payload),
            Some(Chunk { payload: None, .. }) => complete = false,
            None => {
                complete = false;
                problems.push(problem(
                    at.0,
                    at.1,
                    format!("blob `{}` is missing chunk {chunk_index}", index.key),
                ));
            }
        }
    }
    let extra = chunks.map_or(0, |c| c.len()).saturating_sub(count as usize);
    if extra > 0 {
        problems.push(problem(
            at.0,
            at.1,
            format!(
                "blob `{}` has {extra} chunk(s) more than its index counts",
                index.key
            ),
        ));
        complete = false;
    }
    if complete && data.len() != size {
        problems.push(problem(
            at.0,
            at.1,
            format!(
                "blob `{}` chunks hold {} bytes but its index says {size}",
                index.key,
                data.len()
            ),
        ));
        complete = false;
    }
    if !complete {
        return ItemValue::Unreadable;
    }
    ItemValue::Blob(Blob {
        data,
        chunks: Some(count),
        chunk_start: Some(start),
    })
}

fn check_duplicates(out: &mut ParsedImage) {
    let mut seen: HashMap<(u8, &str, bool), (usize, usize)> = HashMap::new();
    let mut found = Vec::new();
    for item in out.items.iter().filter(|i| !i.erased) {
        // A legacy blob and a blob index may share a key (the device reads the index first).
        let is_blob = item.item_type == ItemType::Blob;
        if let Some(first) = seen.insert(
            (item.ns_index, item.key.as_str(), is_blob),
            (item.page, item.entry),
        ) {
            found.push(problem(
                Some(item.page),
                Some(item.entry),
                format!(
                    "key `{}` is written twice in namespace {} (first at page {}, entry {})",
                    item.key,
                    item.namespace.as_deref().unwrap_or("?"),
                    first.0,
                    first.1
                ),
            ));
        }
    }
    out.problems.extend(found);
}
