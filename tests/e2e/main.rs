//! End-to-end tests: the real gateway against the real emulator over loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod big_answers;
mod checkpoint;
mod common;
mod credits;
mod hostile;
mod idempotency;
mod inbound_tls;
mod ledger_disk;
mod ledger_watch;
mod limits;
mod operations;
mod pacing;
mod proxy;
mod scopes;
mod secrets;
mod tls;
mod upstream_h2;
