//! The ledger file's identity and health, checked by the writer about once a second, before
//! the journal is trimmed and after any failed write (issue 14 item 5).
//!
//! SQLite in WAL mode goes on committing into a file that was deleted, replaced or truncated
//! under it: commits land in the WAL (and, for a deleted file, in an inode nobody can open
//! again), callers are answered, and the rows are gone at the next start. So the writer keeps
//! the file's device and inode from the open and a descriptor of its own, and checks: one
//! `stat` of the path (gone? another inode?), one read of the 100-byte SQLite header and one
//! `fstat` of the descriptor (a header at all? as many pages as the header says?).
//!
//! The same header test runs before the gateway opens a ledger, so a file truncated or
//! overwritten while the gateway was down is refused with a clear message instead of
//! SQLite's "file is not a database" or "database disk image is malformed" later.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

/// What went wrong with the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Problem {
    Deleted,
    Replaced,
    Truncated,
    Overwritten,
}

impl Problem {
    /// The metric label.
    pub(super) fn reason(self) -> &'static str {
        match self {
            Problem::Deleted => "deleted",
            Problem::Replaced => "replaced",
            Problem::Truncated => "truncated",
            Problem::Overwritten => "overwritten",
        }
    }

    /// For "the ledger file at X ...".
    pub(super) fn what(self) -> &'static str {
        match self {
            Problem::Deleted => "was deleted",
            Problem::Replaced => "was replaced by another file",
            Problem::Truncated => "was truncated",
            Problem::Overwritten => "was overwritten (no SQLite header)",
        }
    }
}

const MAGIC: &[u8; 16] = b"SQLite format 3\0";
const HEADER: usize = 100;

/// What the header and size of a ledger file say is wrong with it, if anything. `header` is
/// what could be read of the first 100 bytes, read before `size` was taken (the file only
/// grows: SQLite extends it before it writes a page count that needs the room).
/// `pages`: whether to compare the size with the header's page count (not while a
/// checkpoint may be writing: it writes page 1 before the pages that extend the file).
fn inspect(header: &[u8], size: u64, pages: bool) -> Option<(Problem, String)> {
    if size < HEADER as u64 || header.len() < HEADER {
        return Some((
            Problem::Truncated,
            format!("{size} bytes left, not even a SQLite header"),
        ));
    }
    if &header[..16] != MAGIC {
        return Some((
            Problem::Overwritten,
            "its first bytes are not a SQLite header".into(),
        ));
    }
    let be32 = |at: usize| {
        u32::from_be_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
    };
    let page_size = match u16::from_be_bytes([header[16], header[17]]) {
        1 => 65_536,
        n => u64::from(n),
    };
    // The page count in the header is valid when the change counter matches the version it
    // was written for (SQLite 3.7.0 and later always keep them so).
    let count = u64::from(be32(28));
    if pages && be32(24) == be32(92) && count.saturating_mul(page_size) > size {
        return Some((
            Problem::Truncated,
            format!(
                "{size} bytes left, its header says {count} pages of {page_size} bytes ({} bytes)",
                count.saturating_mul(page_size)
            ),
        ));
    }
    None
}

/// The first bytes of `file` (up to 100) and then its size.
fn header_and_size(file: &File) -> std::io::Result<(Vec<u8>, u64)> {
    let mut header = vec![0u8; HEADER];
    let mut got = 0;
    while got < HEADER {
        match file.read_at(&mut header[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    header.truncate(got);
    let size = file.metadata()?.len();
    Ok((header, size))
}

/// The file the writer opened: its identity and a descriptor of its own.
pub(super) struct FileWatch {
    path: PathBuf,
    file: File,
    dev: u64,
    ino: u64,
}

impl FileWatch {
    /// Right after the open (the file is a sound ledger by then).
    pub(super) fn open(path: &Path) -> std::io::Result<FileWatch> {
        let file = File::open(path)?;
        let meta = file.metadata()?;
        Ok(FileWatch {
            path: path.to_path_buf(),
            dev: meta.dev(),
            ino: meta.ino(),
            file,
        })
    }

    /// Is the file at the path still the one opened, with what was written to it? `pages`:
    /// compare its size with its header's page count too (no checkpoint is running).
    pub(super) fn check(&self, pages: bool) -> Option<(Problem, String)> {
        match std::fs::metadata(&self.path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Some((Problem::Deleted, "no file at that path any more".into()));
            }
            // Cannot tell (a permission changed on a directory...): a write will say.
            Err(_) => return None,
            Ok(m) if (m.dev(), m.ino()) != (self.dev, self.ino) => {
                return Some((
                    Problem::Replaced,
                    format!(
                        "the path now names inode {} on device {}, the gateway wrote inode {} \
                         on device {}",
                        m.ino(),
                        m.dev(),
                        self.ino,
                        self.dev
                    ),
                ));
            }
            Ok(_) => {}
        }
        match header_and_size(&self.file) {
            Ok((header, size)) => inspect(&header, size, pages),
            Err(_) => None,
        }
    }
}

/// Before the open: a file that exists but was truncated or overwritten is refused, with what
/// is wrong and what to do. A missing file is a new ledger; so is an empty one, unless a WAL
/// beside it shows it had content (truncated to 0 bytes: SQLite would drop that WAL and start
/// an empty ledger). `Ok(Some(detail))`: shorter than its header says, but a WAL with content
/// is beside it, as a crash in the middle of a checkpoint leaves it (page 1 is written before
/// the pages that extend the file): the caller asks SQLite (`PRAGMA quick_check`) once the WAL
/// is read.
pub(super) fn check_before_open(path: &Path) -> Result<Option<String>, String> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        // SQLite's own open says it better (permissions, a directory...).
        Err(_) => return Ok(None),
    };
    let (header, size) =
        header_and_size(&file).map_err(|e| format!("cannot read its header: {e}"))?;
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    let wal_bytes = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    if size == 0 {
        if wal_bytes == 0 {
            return Ok(None);
        }
        let detail = format!(
            "0 bytes left, but its write-ahead log {} ({wal_bytes} bytes) shows it had content",
            Path::new(&wal).display(),
        );
        return Err(refusal(path, Problem::Truncated, &detail));
    }
    if let Some((problem, detail)) = inspect(&header, size, false) {
        return Err(refusal(path, problem, &detail));
    }
    match inspect(&header, size, true) {
        None => Ok(None),
        Some((_, detail)) if wal_bytes > 0 => Ok(Some(detail)),
        Some((problem, detail)) => Err(refusal(path, problem, &detail)),
    }
}

/// Why the gateway will not start on the file at `path`, and what to do.
pub(super) fn refusal(path: &Path, problem: Problem, detail: &str) -> String {
    let p = path.display();
    format!(
        "the file {} ({detail}): it cannot be trusted, and the gateway will not start on it. \
         Move {p} aside (with {p}-wal and {p}-shm if present) and restore the last good copy \
         of the ledger to {p}, or leave the path empty to start a new ledger. Rows still in \
         the journal ({p}.journal-*) are written into whichever ledger the gateway opens",
        problem.what()
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn header(pages: u32, page_size: u16) -> Vec<u8> {
        let mut h = vec![0u8; HEADER];
        h[..16].copy_from_slice(MAGIC);
        h[16..18].copy_from_slice(&page_size.to_be_bytes());
        h[24..28].copy_from_slice(&7u32.to_be_bytes());
        h[28..32].copy_from_slice(&pages.to_be_bytes());
        h[92..96].copy_from_slice(&7u32.to_be_bytes());
        h
    }

    #[test]
    fn a_header_is_judged_against_the_size() {
        assert_eq!(inspect(&header(3, 4096), 3 * 4096, true), None);
        assert_eq!(inspect(&header(3, 1), 3 * 65_536, true), None);
        // Not compared while a checkpoint may be extending the file.
        assert_eq!(inspect(&header(3, 4096), 2 * 4096, false), None);
        assert_eq!(
            inspect(&header(3, 4096), 2 * 4096, true).unwrap().0,
            Problem::Truncated
        );
        assert_eq!(inspect(&[], 0, true).unwrap().0, Problem::Truncated);
        assert_eq!(
            inspect(&header(1, 4096)[..10], 10, true).unwrap().0,
            Problem::Truncated
        );
        let mut garbage = header(1, 4096);
        garbage[0] = b'x';
        assert_eq!(
            inspect(&garbage, 4096, true).unwrap().0,
            Problem::Overwritten
        );
        // A stale page count (counter and valid-for differ) is not trusted.
        let mut stale = header(9, 4096);
        stale[92] = 1;
        assert_eq!(inspect(&stale, 4096, true), None);
    }
}
