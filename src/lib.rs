//! linkup-gateway: an authenticating, key-injecting, rate-limiting, credit-accounting gateway
//! in front of LinkupAPI v2. See README.md for the tour and `stack.rs` for the onion.

#![forbid(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod admission;
pub mod body;
pub mod budgets;
pub mod config;
pub mod context;
pub mod dashboard;
pub mod deadline;
pub mod demo;
pub mod detach;
pub mod emulator;
pub mod envelope;
pub mod error;
pub mod fleet;
pub mod headers;
pub mod http1;
pub mod idempotency;
pub mod inbound_tls;
pub mod keygen;
pub mod layers;
pub mod ledger;
pub mod limits;
pub mod metrics;
pub mod reconcile;
pub mod server;
pub mod shared;
pub mod stack;
pub mod upstream;
pub mod usage;
pub mod util;
pub mod webhook_owners;
pub mod workers;
