//! End-to-end tests: the real gateway against the real emulator over loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod checkpoint;
mod common;
mod credits;
mod hostile;
mod inbound_tls;
mod ledger_disk;
mod ledger_watch;
mod limits;
mod operations;
mod proxy;
mod secrets;
mod tls;
