//! The integration tests: one binary with a module per area, as ripgrep does, so that
//! `cargo test` links the tree once, not once per file. Each test drives the real
//! binary with a cache dir of its own (`common::TestEnv`). `memory.rs` stays a binary
//! of its own: it measures its child's peak memory, which a neighbour test would blur.

mod common;

mod background;
mod cache_dir;
#[path = "core.rs"]
mod core_calls;
mod crash;
mod defects;
mod etcd;
mod etcd_client;
mod faults;
mod first_hour;
mod generated;
mod guard;
mod hit;
mod input;
mod jobcontrol;
mod keys;
mod modes;
mod postgres;
mod slots;
mod startup;
mod status;
mod stdin_stderr;
