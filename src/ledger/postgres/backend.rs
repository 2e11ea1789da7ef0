//! The fleet ledger's side of the shared writer loop (`super::super::writer`): one batch is one
//! statement on the writer's connection, retried once on a fresh connection after a failure
//! on a reused one (the server may have restarted while it was idle), and a few times after a
//! lost deadlock or serialization conflict. Rows already inserted by a commit whose
//! acknowledgement was lost are skipped by their `row_uid`.

use postgres::error::SqlState;

use super::super::writer::{Backend, Pending};
use super::super::LedgerError;
use super::connect::Target;
use super::schema::{write_rows, Conn};
use super::CONFLICT_RETRIES;

pub(super) struct PostgresBackend {
    pub(super) target: Target,
    /// `None` after a failure: the next attempt connects afresh.
    pub(super) conn: Option<Conn>,
}

impl Backend for PostgresBackend {
    type Tag = String;

    /// One transaction. A failure on a reused connection is retried once on a fresh one (the
    /// server may have restarted while we were idle); a lost deadlock or serialization conflict is
    /// retried a few times. Rows already inserted by a commit whose acknowledgement was lost
    /// are skipped by their `row_uid`.
    fn commit(&mut self, rows: &[Pending<String>]) -> Result<(), LedgerError> {
        let mut fresh_retry = true;
        let mut conflicts = 0;
        loop {
            let reused = self.conn.is_some();
            let mut conn = match self.conn.take() {
                Some(conn) => conn,
                None => self
                    .target
                    .connect()
                    .and_then(Conn::prepare)
                    .map_err(|e| self.target.write_error(&e))?,
            };
            match write_rows(&mut conn, rows) {
                Ok(()) => {
                    self.conn = Some(conn);
                    return Ok(());
                }
                Err(e) => {
                    let conflict = matches!(
                        e.code(),
                        Some(&SqlState::T_R_DEADLOCK_DETECTED)
                            | Some(&SqlState::T_R_SERIALIZATION_FAILURE)
                    );
                    if conflict && conflicts < CONFLICT_RETRIES {
                        conflicts += 1;
                        self.conn = Some(conn);
                        continue;
                    }
                    // Otherwise the connection is dropped. One that had been idle may have
                    // died with a server restart: try once more on a fresh one at once.
                    if reused && fresh_retry {
                        fresh_retry = false;
                        continue;
                    }
                    return Err(self.target.write_error(&e));
                }
            }
        }
    }
}
