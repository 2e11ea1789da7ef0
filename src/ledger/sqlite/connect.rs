//! The embedded ledger's connections (writer, reader, checkpointer), its WAL file and the
//! `<ledger>.lock` that makes one gateway its only writer.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::config::DbConfig;
use rusqlite::{Connection, OpenFlags};

use super::super::LedgerError;
#[cfg(test)]
use super::Fault;
use super::{BUSY_TIMEOUT, LOCK_WAIT};
use crate::config::LedgerSync;

/// Closing `conn` must not checkpoint the WAL into the database file (the file was lost:
/// copying the WAL into a truncated file would make it look whole but be malformed).
pub(super) fn no_checkpoint_on_close(conn: &Connection) {
    let _ = conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true);
}

pub(super) fn open_wal(path: &Path) -> std::io::Result<std::fs::File> {
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    std::fs::File::open(wal)
}

pub(super) fn open_writer(path: &Path, sync: LedgerSync) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // WAL with NORMAL: a commit is in the OS's hands when it returns (it survives a crash of
    // the process, not of the machine); FULL adds an fsync of the WAL to every commit.
    let level = match sync {
        LedgerSync::PowerSafe => "FULL",
        LedgerSync::CrashSafe | LedgerSync::Async => "NORMAL",
    };
    conn.pragma_update(None, "synchronous", level)?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.execute_batch(
        "CREATE TEMP TABLE IF NOT EXISTS fold_batch (
            day TEXT, client TEXT, account TEXT, action TEXT, outcome TEXT,
            requests INTEGER, credits INTEGER, unknown INTEGER)",
    )?;
    // Checkpoints run on their own thread (see `run_checkpoints`), not inside a commit that
    // callers are waiting for.
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    // The WAL file is never cut at a rewind (cutting it there cost p99 ~40 ms under load): it
    // stays at its high-water mark, about WAL_REWIND_FRAMES pages, and is overwritten in place.
    conn.pragma_update(None, "journal_size_limit", -1)?;
    Ok(conn)
}

pub(super) fn open_checkpointer(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    Ok(conn)
}

pub(super) fn open_reader(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "query_only", true)?;
    Ok(conn)
}

/// Take the exclusive lock on `<ledger>.lock` and write this process's id into it: exactly one
/// gateway writes a ledger (two would each enforce the whole budget, and replay each other's
/// journal). A lock still held by this process (a gateway restarted in place) is waited for
/// briefly; another process's is refused, naming it.
pub(super) fn lock(path: &Path) -> Result<File, LedgerError> {
    let display = path.display().to_string();
    let fail = |reason: String| LedgerError::Open {
        path: display.clone(),
        reason,
    };
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock_path = PathBuf::from(lock_path);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&lock_path)
        .map_err(|e| fail(format!("cannot open {}: {e}", lock_path.display())))?;
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match file.try_lock() {
            Ok(()) => break,
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&lock_path).unwrap_or_default();
                let holder = holder.trim();
                let ours = holder == std::process::id().to_string();
                if !ours || Instant::now() >= deadline {
                    return Err(LedgerError::Locked {
                        path: display,
                        holder: if holder.is_empty() {
                            "unknown".into()
                        } else {
                            holder.to_owned()
                        },
                    });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(fail(format!("cannot lock {}: {e}", lock_path.display())))
            }
        }
    }
    use std::io::{Seek, Write};
    let _ = file.set_len(0);
    let _ = file.seek(std::io::SeekFrom::Start(0));
    let _ = write!(file, "{}", std::process::id());
    Ok(file)
}

#[cfg(test)]
impl Fault {
    pub(super) fn open(self, path: &Path, sync: LedgerSync) -> rusqlite::Result<Connection> {
        match self {
            Fault::ReadOnlyFile => Connection::open_with_flags(
                path,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            ),
            Fault::DiskFull => {
                let conn = open_writer(path, sync)?;
                let pages: i64 = conn.pragma_query_value(None, "page_count", |r| r.get(0))?;
                conn.pragma_update(None, "max_page_count", pages)?;
                Ok(conn)
            }
        }
    }
}
