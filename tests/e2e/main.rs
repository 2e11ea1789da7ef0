//! End-to-end tests: the real gateway against the real emulator over loopback.

mod common;
mod hostile;
mod operations;
mod proxy;
mod secrets;
