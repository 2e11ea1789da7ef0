//! Fleet mode against real servers: private redis-server and PostgreSQL instances (see
//! `servers.rs`), several gateway replicas, one emulator.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod ledger;
mod replicas;
mod servers;
mod store;
