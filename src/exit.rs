//! Every exit status singleflight can end with, in one place (the contract's table),
//! and the error type that carries one of them up to `main`.

use std::fmt;

/// A usage error: bad option, NAME, duration or size, or no command.
pub const USAGE: i32 = 2;
/// Nothing to serve: the in-flight run did not finish within `--wait`, or produced nothing.
pub const NOTHING_TO_SERVE: i32 = 75;
/// The command timed out and its process tree was killed.
pub const TIMED_OUT: i32 = 124;
/// singleflight itself failed (cache dir unusable, disk error, etcd unreachable: the
/// command was not run), or stopped the run for exceeding `--max-output` (or the etcd
/// backend's limit for a result), or because the etcd lock was lost mid-run.
pub const INTERNAL: i32 = 125;
/// The command exists but could not be executed.
pub const CANNOT_EXECUTE: i32 = 126;
/// The command was not found.
pub const NOT_FOUND: i32 = 127;

/// `128 + N`: the command, or singleflight, was killed by signal N.
pub const fn signaled(signal: i32) -> i32 {
    128 + signal
}

/// An error that ends the program with a chosen status. Anything else that reaches
/// `main` is an internal failure ([`INTERNAL`]).
#[derive(Debug)]
pub struct Exit {
    pub status: i32,
    pub message: String,
    /// singleflight was stopped by this signal: once everything is cleaned up (locks
    /// released, temp files removed), it dies of it rather than exiting.
    pub signal: Option<i32>,
}

impl Exit {
    pub fn new(status: i32, message: impl Into<String>) -> Self {
        Exit {
            status,
            message: message.into(),
            signal: None,
        }
    }

    /// Stopped by `signal` (exit status 128+N where it cannot die of it); says nothing.
    pub fn killed_by(signal: i32) -> Self {
        Exit {
            status: signaled(signal),
            message: String::new(),
            signal: Some(signal),
        }
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Exit {}

/// The status for an error that reached `main`.
pub fn status_of(error: &anyhow::Error) -> i32 {
    error
        .downcast_ref::<Exit>()
        .map_or(INTERNAL, |exit| exit.status)
}
