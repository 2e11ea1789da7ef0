//! The row journal of the embedded ledger's default durability (`sync = "crash_safe"`).
//!
//! A caller's row is appended to a journal file by the caller itself: one `writev(2)` on an
//! `O_APPEND` file, under a short lock that also numbers the row and hands it to the SQLite
//! writer thread. When `record` returns, the row is in the OS's hands: it survives a crash or
//! SIGKILL of the gateway, and nobody waited for SQLite. The writer thread inserts rows into
//! SQLite in its own time (batches, aggregates) and stores, in the same transaction, the last
//! journal number it holds (`ledger_meta.journal_through`). Opening the ledger replays the
//! journal lines past that number, so a crash loses nothing that was answered.
//!
//! Files: `<ledger>.journal-<first number>`. Past [`ROTATE_BYTES`] the journal moves to a new
//! file; a file is deleted once every row in it is in SQLite. A line is `<number>\t<JSON row>`.
//! A write that fails or comes up short moves to a new file too, so a torn line can only be
//! the last of its file, and is skipped with a warning at replay.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, IoSlice, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};

use super::super::{LedgerError, Outcome, Row};

/// A journal file past this size is closed and a new one started.
const ROTATE_BYTES: u64 = 64 * 1024 * 1024;

/// A row as a journal line holds it.
#[derive(Serialize)]
struct LineRef<'a> {
    at_ms: i64,
    request_id: &'a str,
    client: &'a str,
    account_id: Option<&'a str>,
    path: &'a str,
    action: Option<&'a str>,
    status: u16,
    credits: u64,
    credits_known: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    credits_raw: Option<&'a str>,
    outcome: Outcome,
}

#[derive(Deserialize)]
struct LineOwned {
    at_ms: i64,
    request_id: String,
    client: String,
    account_id: Option<String>,
    path: String,
    action: Option<String>,
    status: u16,
    credits: u64,
    credits_known: bool,
    /// Absent from lines journaled before it existed.
    #[serde(default)]
    credits_raw: Option<String>,
    outcome: String,
}

pub(super) fn encode(row: &Row, out: &mut Vec<u8>) {
    let line = LineRef {
        at_ms: row.at_ms,
        request_id: &row.request_id,
        client: &row.client,
        account_id: row.account_id.as_deref(),
        path: &row.path,
        action: row.action.as_deref(),
        status: row.status,
        credits: row.credits,
        credits_known: row.credits_known,
        credits_raw: row.credits_raw.as_deref(),
        outcome: row.outcome,
    };
    // Serializing plain strings and numbers cannot fail.
    let _ = serde_json::to_writer(&mut *out, &line);
    out.push(b'\n');
}

fn decode(json: &str) -> Option<Row> {
    let l: LineOwned = serde_json::from_str(json).ok()?;
    Some(Row {
        at_ms: l.at_ms,
        request_id: l.request_id,
        client: l.client.into(),
        account_id: l.account_id.map(Into::into),
        path: l.path,
        action: l.action.map(Into::into),
        status: l.status,
        credits: l.credits,
        credits_known: l.credits_known,
        credits_raw: l.credits_raw,
        outcome: Outcome::parse(&l.outcome)?,
    })
}

/// The journal files of a ledger, oldest first, with the first number each holds.
pub(super) fn files(ledger: &Path) -> Vec<(u64, PathBuf)> {
    let Some(name) = ledger.file_name().and_then(|n| n.to_str()) else {
        return Vec::new();
    };
    let prefix = format!("{name}.journal-");
    let dir = match ledger.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(d) => d.to_path_buf(),
        None => PathBuf::from("."),
    };
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let file = e.file_name();
            let first = file.to_str()?.strip_prefix(&prefix)?.parse().ok()?;
            Some((first, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// Every journaled row numbered past `through`, in order, and the highest number seen.
pub(super) fn replay(ledger: &Path, through: u64) -> std::io::Result<(Vec<(u64, Row)>, u64)> {
    let mut rows = Vec::new();
    let mut last = through;
    for (_, path) in files(ledger) {
        let reader = BufReader::new(File::open(&path)?);
        for line in reader.split(b'\n') {
            let line = line?;
            let parsed = std::str::from_utf8(&line).ok().and_then(|text| {
                let (n, json) = text.split_once('\t')?;
                Some((n.parse::<u64>().ok()?, decode(json)?))
            });
            match parsed {
                Some((n, row)) => {
                    last = last.max(n);
                    if n > through {
                        rows.push((n, row));
                    }
                }
                None if line.is_empty() => {}
                None => tracing::warn!(
                    file = %path.display(),
                    "skipped a torn or unreadable ledger journal line (a write cut short)"
                ),
            }
        }
    }
    rows.sort_by_key(|(n, _)| *n);
    Ok((rows, last))
}

pub(super) struct Journal {
    ledger: PathBuf,
    inner: Mutex<Inner>,
}

struct Inner {
    file: Arc<File>,
    /// The number the next row gets.
    next: u64,
    /// Bytes in the current file.
    bytes: u64,
    /// A write failed or came up short: start a new file before the next one.
    broken: bool,
}

fn create(ledger: &Path, first: u64) -> std::io::Result<File> {
    let mut path = ledger.as_os_str().to_owned();
    path.push(format!(".journal-{first}"));
    OpenOptions::new().create(true).append(true).open(path)
}

impl Journal {
    /// Start journaling rows from number `next` into a new file.
    pub(super) fn start(ledger: &Path, next: u64) -> std::io::Result<Journal> {
        let file = create(ledger, next)?;
        Ok(Journal {
            ledger: ledger.to_path_buf(),
            inner: Mutex::new(Inner {
                file: Arc::new(file),
                next,
                bytes: 0,
                broken: false,
            }),
        })
    }

    /// Number the row, append it (`encoded` is its JSON line) and, under the same lock, hand
    /// it to `then` (the writer's queue), so the writer sees rows in number order.
    pub(super) fn append(
        &self,
        encoded: &[u8],
        then: impl FnOnce(u64),
    ) -> Result<(), std::io::Error> {
        let mut then = Some(then);
        self.append_many(encoded, &[encoded.len()], |_, n| {
            if let Some(t) = then.take() {
                t(n)
            }
        })
    }

    /// [`Journal::append`] for several rows at once: `lines` holds their JSON lines one after
    /// the other, `ends[i]` where row `i`'s ends. One `writev(2)` for all of them; `then(i, n)`
    /// is called for each row in order, under the lock, with its number.
    pub(super) fn append_many(
        &self,
        lines: &[u8],
        ends: &[usize],
        mut then: impl FnMut(usize, u64),
    ) -> Result<(), std::io::Error> {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let count = ends.len() as u64;
        if inner.broken || inner.bytes >= ROTATE_BYTES {
            let next = inner.next;
            match create(&self.ledger, next) {
                Ok(f) => {
                    inner.file = Arc::new(f);
                    inner.bytes = 0;
                    inner.broken = false;
                }
                Err(e) if inner.broken => {
                    let first = inner.next;
                    inner.next += count;
                    for i in 0..ends.len() {
                        then(i, first + i as u64);
                    }
                    return Err(e);
                }
                // Rotation failed: keep appending to the file we have.
                Err(_) => {}
            }
        }
        let first = inner.next;
        inner.next += count;
        // `<number>\t` before each line.
        let mut prefixes = Vec::with_capacity(ends.len() * 12);
        let mut prefix_ends = Vec::with_capacity(ends.len());
        for i in 0..ends.len() {
            let _ = write!(prefixes, "{}\t", first + i as u64);
            prefix_ends.push(prefixes.len());
        }
        let mut slices = Vec::with_capacity(ends.len() * 2);
        let (mut p, mut l) = (0, 0);
        for (pe, le) in prefix_ends.iter().zip(ends) {
            slices.push(IoSlice::new(&prefixes[p..*pe]));
            slices.push(IoSlice::new(&lines[l..*le]));
            (p, l) = (*pe, *le);
        }
        let want = prefixes.len() + l;
        let written = (&*inner.file).write_vectored(&slices);
        let result = match written {
            Ok(w) if w == want => {
                inner.bytes += want as u64;
                Ok(())
            }
            Ok(_) => {
                inner.broken = true;
                Err(std::io::Error::new(
                    std::io::ErrorKind::WriteZero,
                    "the journal write came up short",
                ))
            }
            Err(e) => {
                inner.broken = true;
                Err(e)
            }
        };
        // The rows go to the writer either way: a row whose journal write failed is still
        // kept and written to SQLite (the upstream may have charged for it).
        for i in 0..ends.len() {
            then(i, first + i as u64);
        }
        result
    }

    /// fsync the current file (crash_safe's once a second), outside the lock.
    pub(super) fn sync(&self) -> std::io::Result<()> {
        let file = self
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .file
            .clone();
        file.sync_data()
    }

    /// Delete the files whose every row is numbered at most `through` (in SQLite). The
    /// current file is never deleted.
    pub(super) fn trim(&self, through: u64) {
        let files = files(&self.ledger);
        for pair in files.windows(2) {
            // Every row of pair[0] is numbered below pair[1]'s first.
            if pair[1].0 <= through.saturating_add(1) {
                if let Err(e) = std::fs::remove_file(&pair[0].1) {
                    tracing::warn!(file = %pair[0].1.display(), error = %e, "cannot remove a ledger journal file");
                }
            }
        }
    }

    /// Delete every journal file: all their rows are in SQLite (a clean close).
    pub(super) fn remove_all(&self) {
        for (_, path) in files(&self.ledger) {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A journal write failure as the callers see it.
pub(super) fn write_error(ledger: &Path, e: &std::io::Error) -> LedgerError {
    let path = ledger.display().to_string();
    let detail = format!("the journal: {e}");
    if e.raw_os_error() == Some(28) {
        LedgerError::DiskFull { path, detail }
    } else if e.kind() == std::io::ErrorKind::PermissionDenied || e.raw_os_error() == Some(30) {
        LedgerError::ReadOnly { path, detail }
    } else {
        LedgerError::Write { path, detail }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn row(id: &str) -> Row {
        Row {
            at_ms: 1_795_651_199_999,
            request_id: id.into(),
            client: "crm".into(),
            account_id: Some("acc\t\"1\"\n".into()),
            path: "/v2/profiles".into(),
            action: None,
            status: 200,
            credits: u64::MAX,
            credits_known: true,
            credits_raw: None,
            outcome: Outcome::Settled,
        }
    }

    #[test]
    fn rows_come_back_in_order_past_the_watermark_and_torn_lines_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = dir.path().join("l.sqlite3");
        let j = Journal::start(&ledger, 1).unwrap();
        let mut seen = Vec::new();
        for id in ["a", "b", "c"] {
            let mut line = Vec::new();
            encode(&row(id), &mut line);
            j.append(&line, |n| seen.push(n)).unwrap();
        }
        assert_eq!(seen, [1, 2, 3]);
        // A write cut short by a crash of the machine.
        let (_, path) = files(&ledger).pop().unwrap();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"4\t{\"at_ms\":1").unwrap();
        let (rows, last) = replay(&ledger, 1).unwrap();
        assert_eq!(last, 3);
        let ids: Vec<_> = rows
            .iter()
            .map(|(n, r)| (*n, r.request_id.clone()))
            .collect();
        assert_eq!(ids, [(2, "b".to_string()), (3, "c".to_string())]);
        assert_eq!(rows[0].1.account_id.as_deref(), Some("acc\t\"1\"\n"));
        assert_eq!(rows[0].1.credits, u64::MAX);
    }

    #[test]
    fn a_raw_credits_value_round_trips_and_older_lines_without_it_still_replay() {
        let mut r = row("raw");
        r.credits_known = false;
        r.credits_raw = Some("\"1.5\"".into());
        let mut line = Vec::new();
        encode(&r, &mut line);
        let back = decode(std::str::from_utf8(&line).unwrap().trim_end()).unwrap();
        assert_eq!(back.credits_raw.as_deref(), Some("\"1.5\""));
        // A line journaled by the previous release (no `credits_raw`).
        let old = r#"{"at_ms":1,"request_id":"r","client":"crm","account_id":null,"path":"/v2/x","action":null,"status":200,"credits":1,"credits_known":true,"outcome":"settled"}"#;
        let back = decode(old).unwrap();
        assert_eq!(back.credits_raw, None);
        assert_eq!(back.credits, 1);
    }

    #[test]
    fn files_wholly_in_sqlite_are_trimmed_the_current_one_never() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = dir.path().join("l.sqlite3");
        drop(create(&ledger, 1).unwrap());
        drop(create(&ledger, 10).unwrap());
        let j = Journal::start(&ledger, 20).unwrap();
        j.trim(9);
        let firsts: Vec<u64> = files(&ledger).iter().map(|(n, _)| *n).collect();
        assert_eq!(firsts, [10, 20]);
        j.trim(1000);
        let firsts: Vec<u64> = files(&ledger).iter().map(|(n, _)| *n).collect();
        assert_eq!(firsts, [20]);
    }
}
