//! `--state FILE`: the database on disk as a snapshot plus a journal of the write requests
//! made since it was taken.
//!
//! Why a journal of requests rather than of changed objects: the store is a deterministic
//! function of its previous state and the request (every map is ordered, ids come from the
//! store's own seeded generator, time is the request's `now_ms`), so replaying a request over
//! the state it was first served on gives the same objects, allocations and ids. A write then
//! costs one append and one `fdatasync` of a few hundred bytes, whatever the store holds; the
//! snapshot (the whole store) is rewritten only once the journal has grown as large as it, so
//! its cost spread over the writes that grew the journal is constant too.
//!
//! Guarantees, as with the single atomic file before:
//! - an answered write is on disk: the entry is appended and synced before the store is touched,
//!   so a `kill -9` (or a power cut) after the answer loses nothing;
//! - a write that could not be journaled is answered 500 and never applied, so nothing on disk
//!   or in memory has it, and a retry does not create twice;
//! - a crash at any point leaves a loadable pair: the snapshot is replaced atomically (temporary
//!   file, fsync, rename, fsync of the folder), it records the last entry it covers, and entries
//!   it covers are skipped on load; an entry torn by a crash mid-append was never answered and is
//!   dropped; damage anywhere else is refused with the byte offset, never silently skipped.
//!
//! Layout: the snapshot at `FILE` (JSON, version 2; version 1 files, which had no journal, load
//! as they are), the journal at `FILE.journal`, one entry per line: 16 hex digits of the FNV-1a
//! hash (`nsx_core::hash::stable_hash`) of the JSON that follows, a space, the JSON.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use nsx_core::hash::stable_hash;
use serde::{Deserialize, Serialize};

use crate::bootstrap::Bootstrap;
use crate::server::User;
use crate::store::{Ctx, Store};

/// The snapshot format this build writes.
pub(crate) const VERSION: u32 = 2;

/// The journal is folded into a new snapshot once it is this large and larger than the
/// snapshot: small stores are not rewritten every few writes.
const MIN_COMPACTION_BYTES: u64 = 1 << 20;

/// What the snapshot holds.
#[derive(Debug, Deserialize)]
pub(crate) struct Snapshot {
    pub version: u32,
    /// Every journal entry up to this sequence number is in the snapshot (or was never applied).
    #[serde(default)]
    pub journal_seq: u64,
    pub store: Store,
    pub users: BTreeMap<String, User>,
    pub bootstrap: Option<Bootstrap>,
}

/// The same, borrowed from the live manager, so that writing it clones nothing.
#[derive(Serialize)]
pub(crate) struct SnapshotRef<'a> {
    pub version: u32,
    pub journal_seq: u64,
    pub store: &'a Store,
    pub users: &'a BTreeMap<String, User>,
    pub bootstrap: &'a Option<Bootstrap>,
}

/// One write request as the store served it: who asked, when, and what.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Entry<'a> {
    pub seq: u64,
    pub user: Cow<'a, str>,
    pub superuser: bool,
    pub protected_principal: bool,
    pub allow_overwrite: bool,
    pub now_ms: i64,
    pub method: Cow<'a, str>,
    pub path: Cow<'a, str>,
    #[serde(default, skip_serializing_if = "<[_]>::is_empty")]
    pub query: Cow<'a, [(String, String)]>,
    /// The body as text when it is UTF-8 (every JSON body is)...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Cow<'a, str>>,
    /// ...else as base64, so that a replay sees the same bytes and refuses them the same way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_base64: Option<String>,
}

impl<'a> Entry<'a> {
    pub fn new(
        ctx: &'a Ctx,
        method: &'a str,
        path: &'a str,
        query: &'a [(String, String)],
        body: &'a [u8],
    ) -> Self {
        let (text, b64) = match std::str::from_utf8(body) {
            Ok("") => (None, None),
            Ok(s) => (Some(Cow::Borrowed(s)), None),
            Err(_) => {
                use base64::Engine;
                (
                    None,
                    Some(base64::engine::general_purpose::STANDARD.encode(body)),
                )
            }
        };
        Self {
            seq: 0,
            user: Cow::Borrowed(&ctx.user),
            superuser: ctx.superuser,
            protected_principal: ctx.protected_principal,
            allow_overwrite: ctx.allow_overwrite,
            now_ms: ctx.now_ms,
            method: Cow::Borrowed(method),
            path: Cow::Borrowed(path),
            query: Cow::Borrowed(query),
            body: text,
            body_base64: b64,
        }
    }

    pub fn ctx(&self) -> Ctx {
        Ctx {
            user: self.user.to_string(),
            superuser: self.superuser,
            protected_principal: self.protected_principal,
            allow_overwrite: self.allow_overwrite,
            now_ms: self.now_ms,
        }
    }

    /// The body's bytes; `Err` for base64 this build cannot read (a damaged entry).
    pub fn body_bytes(&self) -> Result<Vec<u8>, String> {
        match (&self.body, &self.body_base64) {
            (Some(t), _) => Ok(t.as_bytes().to_vec()),
            (None, Some(b)) => {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD
                    .decode(b)
                    .map_err(|e| format!("entry {}: body_base64: {e}", self.seq))
            }
            (None, None) => Ok(Vec::new()),
        }
    }
}

/// What a state file held when it was opened.
pub(crate) struct Loaded {
    pub file: StateFile,
    pub snapshot: Snapshot,
    /// Entries after the snapshot, in the order they were served.
    pub entries: Vec<Entry<'static>>,
    /// An entry torn by a crash mid-append was dropped (it had not been answered).
    pub dropped_torn_entry: bool,
}

/// The snapshot and journal of one manager.
#[derive(Debug)]
pub(crate) struct StateFile {
    path: PathBuf,
    journal: PathBuf,
    /// Sequence number of the next entry. Numbers are never reused, not even a failed append's,
    /// so that a torn entry the snapshot claims to cover can never be replayed.
    next_seq: u64,
    journal_len: u64,
    snapshot_len: u64,
    /// A failed append left bytes that could not be cut off: nothing more may be appended until
    /// a snapshot has emptied the journal.
    torn: bool,
}

impl StateFile {
    /// A new state file at `path` (its first snapshot writes it). A journal left there by
    /// another database is removed first: its entries would otherwise replay over this one.
    pub fn create(path: &Path) -> Result<Self, String> {
        let journal = journal_path(path);
        match std::fs::remove_file(&journal) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("failed to remove {}: {e}", journal.display())),
        }
        Ok(Self {
            path: path.to_path_buf(),
            journal,
            next_seq: 1,
            journal_len: 0,
            snapshot_len: 0,
            torn: false,
        })
    }

    /// Reads the snapshot and the journal; `None` when there is no snapshot.
    pub fn load(path: &Path) -> Result<Option<Loaded>, String> {
        let text = match std::fs::read(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("failed to read {}: {e}", path.display())),
        };
        let snapshot: Snapshot = serde_json::from_slice(&text)
            .map_err(|e| format!("failed to parse state file {}: {e}", path.display()))?;
        if !(1..=VERSION).contains(&snapshot.version) {
            return Err(format!(
                "state file {} has version {}, expected 1 to {VERSION}",
                path.display(),
                snapshot.version
            ));
        }
        let journal = journal_path(path);
        let bytes = match std::fs::read(&journal) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(format!("failed to read {}: {e}", journal.display())),
        };
        let (all, dropped_torn_entry) =
            parse_journal(&bytes).map_err(|e| format!("journal {}: {e}", journal.display()))?;
        let mut last = snapshot.journal_seq;
        let mut entries = Vec::new();
        for e in all {
            if e.seq <= snapshot.journal_seq {
                continue;
            }
            if e.seq <= last {
                return Err(format!(
                    "journal {}: entry {} follows entry {last} (sequence numbers must grow)",
                    journal.display(),
                    e.seq
                ));
            }
            last = e.seq;
            entries.push(e);
        }
        let file = Self {
            path: path.to_path_buf(),
            journal,
            next_seq: last + 1,
            journal_len: bytes.len() as u64,
            snapshot_len: text.len() as u64,
            torn: false,
        };
        Ok(Some(Loaded {
            file,
            snapshot,
            entries,
            dropped_torn_entry,
        }))
    }

    /// The sequence number a snapshot taken now covers.
    pub fn covered(&self) -> u64 {
        self.next_seq - 1
    }

    /// Whether the next write must first be preceded by a snapshot (see `torn`).
    pub fn needs_snapshot(&self) -> bool {
        self.torn
    }

    /// Whether the journal has outgrown the snapshot and should be folded into a new one.
    pub fn wants_snapshot(&self) -> bool {
        self.journal_len >= self.snapshot_len.max(MIN_COMPACTION_BYTES)
    }

    /// Appends one entry and syncs it; on `Err` the entry is not in the journal (or, if its
    /// bytes could not be cut off, `needs_snapshot` holds and the snapshot will cover it).
    pub fn append(&mut self, entry: &mut Entry<'_>) -> Result<(), String> {
        if self.torn {
            return Err(format!(
                "{}: a failed append could not be cut off; waiting for a new snapshot",
                self.journal.display()
            ));
        }
        entry.seq = self.next_seq;
        self.next_seq += 1;
        let json = serde_json::to_string(entry).map_err(|e| e.to_string())?;
        let line = format!("{:016x} {json}\n", stable_hash(&json));
        let written = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.journal)
            .and_then(|mut f| {
                f.write_all(line.as_bytes())?;
                f.sync_data()
            });
        match written {
            Ok(()) => {
                self.journal_len += line.len() as u64;
                Ok(())
            }
            Err(e) => {
                // Cut whatever part of the line reached the file; if even that fails, the
                // sequence number is burned and the next snapshot will cover it.
                let cut = OpenOptions::new()
                    .write(true)
                    .open(&self.journal)
                    .and_then(|f| {
                        if f.metadata()?.len() > self.journal_len {
                            f.set_len(self.journal_len)?;
                            f.sync_all()?;
                        }
                        Ok(())
                    });
                if cut.is_err() && self.journal.exists() {
                    self.torn = true;
                }
                Err(format!("{}: {e}", self.journal.display()))
            }
        }
    }

    /// Replaces the snapshot with `snapshot` (which must cover [`StateFile::covered`]) and
    /// empties the journal.
    pub fn write_snapshot(&mut self, snapshot: &SnapshotRef<'_>) -> Result<(), String> {
        debug_assert_eq!(snapshot.journal_seq, self.covered());
        let len = write_atomically(&self.path, |w| {
            serde_json::to_writer(w, snapshot).map_err(std::io::Error::other)
        })
        .map_err(|e| format!("{}: {e}", self.path.display()))?;
        self.snapshot_len = len;
        // Every entry in the journal is covered now; emptying it only saves space and replay
        // time, so a failure here is not the write's failure (the next write tries again).
        match File::create(&self.journal).and_then(|f| f.sync_all()) {
            Ok(()) => {
                self.journal_len = 0;
                self.torn = false;
            }
            Err(e) => {
                tracing::warn!(journal = %self.journal.display(), error = %e, "failed to empty the journal after a snapshot");
                // A torn tail is covered by the snapshot's sequence number: appending after it
                // would make it a damaged entry in the middle, so keep refusing until emptied.
            }
        }
        Ok(())
    }
}

/// `FILE.journal` next to `FILE`.
pub(crate) fn journal_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".journal");
    path.with_file_name(name)
}

/// The entries of a journal, and whether a torn last entry was dropped.
fn parse_journal(bytes: &[u8]) -> Result<(Vec<Entry<'static>>, bool), String> {
    let mut entries = Vec::new();
    let mut at = 0usize;
    while at < bytes.len() {
        let rest = &bytes[at..];
        let (line, complete) = match rest.iter().position(|&b| b == b'\n') {
            Some(end) => (&rest[..end], true),
            None => (rest, false),
        };
        let next = at + line.len() + usize::from(complete);
        match parse_line(line) {
            Ok(e) if complete => entries.push(e),
            // The last line, cut short or half written by a crash: it was never answered.
            _ if next >= bytes.len() => return Ok((entries, true)),
            // (A line without its newline is always the last one.)
            Ok(_) => return Err(format!("the entry at byte {at} has no end")),
            Err(why) => {
                return Err(format!(
                    "the entry at byte {at} is damaged ({why}) and entries follow it"
                ));
            }
        }
        at = next;
    }
    Ok((entries, false))
}

fn parse_line(line: &[u8]) -> Result<Entry<'static>, String> {
    let (sum, json) = match line.iter().position(|&b| b == b' ') {
        Some(16) => (&line[..16], &line[17..]),
        _ => return Err("no checksum".into()),
    };
    let sum = std::str::from_utf8(sum)
        .ok()
        .and_then(|s| u64::from_str_radix(s, 16).ok())
        .ok_or("a checksum that is not hex")?;
    let json = std::str::from_utf8(json).map_err(|_| "not UTF-8")?;
    if sum != stable_hash(json) {
        return Err("checksum mismatch".into());
    }
    serde_json::from_str(json).map_err(|e| e.to_string())
}

/// Writes a file atomically: a temporary file, fsync, rename, fsync of the folder. Returns the
/// bytes written.
fn write_atomically(
    path: &Path,
    fill: impl FnOnce(&mut BufWriter<&mut File>) -> std::io::Result<()>,
) -> std::io::Result<u64> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("state")
    ));
    let len = {
        let mut f = File::create(&tmp)?;
        {
            let mut w = BufWriter::with_capacity(1 << 16, &mut f);
            fill(&mut w)?;
            w.flush()?;
        }
        f.sync_all()?;
        f.metadata()?.len()
    };
    std::fs::rename(&tmp, path)?;
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: u64) -> String {
        let json = format!(
            r#"{{"seq":{seq},"user":"admin","superuser":true,"protected_principal":false,"allow_overwrite":false,"now_ms":5,"method":"POST","path":"/api/v1/x"}}"#
        );
        format!("{:016x} {json}\n", stable_hash(&json))
    }

    #[test]
    fn a_torn_last_entry_is_dropped_and_damage_before_the_end_is_refused() {
        let whole = entry(1) + &entry(2);
        let (es, torn) = parse_journal(whole.as_bytes()).unwrap();
        assert_eq!((es.len(), torn), (2, false));
        // Every cut inside the second entry drops it and keeps the first.
        let first = entry(1).len();
        for cut in first + 1..whole.len() {
            let (es, torn) = parse_journal(&whole.as_bytes()[..cut]).unwrap();
            assert_eq!((es.len(), torn), (1, true), "cut at {cut}");
        }
        // A flipped byte in the first entry, with the second after it, is an error naming it.
        let mut bad = whole.clone().into_bytes();
        bad[30] ^= 1;
        let err = parse_journal(&bad).err().unwrap();
        assert!(err.contains("byte 0") && err.contains("checksum"), "{err}");
    }

    #[test]
    fn a_body_that_is_not_utf8_goes_through_base64() {
        let ctx = Ctx::admin(1);
        let e = Entry::new(&ctx, "POST", "/api/v1/x", &[], &[0xff, 0x00, b'{']);
        assert!(e.body.is_none());
        let json = serde_json::to_string(&e).unwrap();
        let back: Entry<'static> = serde_json::from_str(&json).unwrap();
        assert_eq!(back.body_bytes().unwrap(), [0xff, 0x00, b'{']);
    }
}
