//! The reliability suite: apilb and its HAProxy under conditions that go
//! wrong in production, each test against the real HAProxy with test API
//! servers and clients connecting all along.
//!
//! - `reloads`: thousands of long-lived TLS connections held across 20
//!   validated reloads under a steady load of new connections.
//! - `kills`: SIGKILL of an HAProxy worker, the HAProxy master and apilb
//!   itself, under load; what each costs.
//! - `disk`: the runtime directory full (ENOSPC) and read-only while a
//!   change is applied.
//! - `state_files`: garbage, truncated and empty state files (the saved
//!   master set, HAProxy's server state, the pidfile) at start and adoption.
//! - `config_garbage`: apilb.yaml replaced by garbage or an invalid value
//!   while running, under load.
//!
//! Size: reduced by default (what CI runs with `cargo test`), full with
//! `APILB_RELIABILITY=full`. Every test prints what it measured, one line
//! starting with `reliability[<size>]` (`cargo test --test reliability --
//! --nocapture`), in a form docs/reliability.md and BENCHMARKS.md quote.

#[path = "../support/mod.rs"]
mod support;

mod common;

mod config_garbage;
mod disk;
mod kills;
mod reloads;
mod state_files;
