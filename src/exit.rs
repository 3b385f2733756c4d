//! Every exit status singleflight can end with, in one place (the contract's table),
//! and the error type that carries one of them up to `main`.

use std::fmt;

/// An exit status of singleflight. The README's and the man page's exit tables list
/// [`Status::ALL`] (a test holds them to it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// The status of the run whose result is served (fresh, stale, or just produced),
    /// or of the run that just failed.
    Run(i32),
    /// 1: `status` was asked about a NAME that has nothing (no result, no failure
    /// record, no run in flight).
    UnknownName,
    /// 2: a usage error: bad option, NAME, duration or size, or no command; or stdin
    /// that `--stdin` cannot take (over 1 MiB; not JSON with `--key-stdin-json`).
    Usage,
    /// 75: nothing to serve: the in-flight run did not finish within `--wait`, or
    /// produced nothing, or a failed run is being backed off with nothing cached.
    NothingToServe,
    /// 124: the command timed out and its process tree was killed.
    TimedOut,
    /// 125: singleflight itself failed (cache dir unusable, disk error, etcd
    /// unreachable: the command was not run), or stopped the run for exceeding
    /// `--max-output` (or the etcd backend's limit for a result), or because the etcd
    /// lock was lost mid-run.
    Internal,
    /// 126: the command exists but could not be executed.
    CannotExecute,
    /// 127: the command was not found.
    NotFound,
    /// 128+N: the command, or singleflight, was killed by signal N.
    Signaled(i32),
}

impl Status {
    /// Every kind of status, as the exit tables list them (a family once: `Run` and
    /// `Signaled` stand for all their values).
    pub const ALL: [Status; 9] = [
        Status::Run(0),
        Status::UnknownName,
        Status::Usage,
        Status::NothingToServe,
        Status::TimedOut,
        Status::Internal,
        Status::CannotExecute,
        Status::NotFound,
        Status::Signaled(0),
    ];

    /// The number the process exits with.
    pub const fn code(self) -> i32 {
        match self {
            Status::Run(code) => code,
            Status::UnknownName => 1,
            Status::Usage => 2,
            Status::NothingToServe => 75,
            Status::TimedOut => 124,
            Status::Internal => 125,
            Status::CannotExecute => 126,
            Status::NotFound => 127,
            Status::Signaled(signal) => 128 + signal,
        }
    }

    /// What it means, in one line (for `--help`; the README and the man page say more).
    pub fn meaning(self) -> &'static str {
        match self {
            Status::Run(_) => "a result was served (fresh, stale or just made): its run's status",
            Status::UnknownName => "status: a NAME it was asked about has nothing",
            Status::Usage => "usage error: bad option, NAME, duration or size, or no command",
            Status::NothingToServe => {
                "nothing to serve: --wait ran out, or the run failed with nothing cached"
            }
            Status::TimedOut => "the command timed out; its process tree was killed",
            Status::Internal => {
                "singleflight failed, the command not run (cache dir, disk, etcd, no thread); \
                 or past --max-output; or the etcd lock lost"
            }
            Status::CannotExecute => {
                "the command could not be executed (or the OS refused a process)"
            }
            Status::NotFound => "the command was not found",
            Status::Signaled(_) => "the command, or singleflight, was killed by signal N",
        }
    }

    /// How the exit tables write it: its number, or the rule of its family.
    pub fn label(self) -> String {
        match self {
            Status::Run(_) => "the result's own".to_owned(),
            Status::Signaled(_) => "128+N".to_owned(),
            fixed => fixed.code().to_string(),
        }
    }
}

/// An error that ends the program with a chosen status. Anything else that reaches
/// `main` is an internal failure ([`Status::Internal`]).
#[derive(Debug)]
pub struct Exit {
    pub status: Status,
    pub message: String,
    /// singleflight was stopped by this signal: once everything is cleaned up (locks
    /// released, temp files removed), it dies of it rather than exiting.
    pub signal: Option<i32>,
    /// The command was never started (the OS refused a thread or a process for it, or
    /// it could not be executed): a caller may serve the last good result instead.
    pub not_run: bool,
    /// Nothing was run or served because another run is in flight (a skipped cron
    /// tick): the status stays, but its line is a warning, which `-q` silences.
    pub skipped: bool,
}

impl Exit {
    pub fn new(status: Status, message: impl Into<String>) -> Self {
        Exit {
            status,
            message: message.into(),
            signal: None,
            not_run: false,
            skipped: false,
        }
    }

    /// Another run is in flight; see [`Exit::skipped`].
    pub fn skipped(status: Status, message: impl Into<String>) -> Self {
        Exit {
            skipped: true,
            ..Exit::new(status, message)
        }
    }

    /// The command could not be started; see [`Exit::not_run`].
    pub fn not_run(status: Status, message: impl Into<String>) -> Self {
        Exit {
            not_run: true,
            ..Exit::new(status, message)
        }
    }

    /// Stopped by `signal` (exit status 128+N where it cannot die of it); says nothing.
    pub fn killed_by(signal: i32) -> Self {
        Exit {
            status: Status::Signaled(signal),
            message: String::new(),
            signal: Some(signal),
            not_run: false,
            skipped: false,
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
pub fn status_of(error: &anyhow::Error) -> Status {
    error
        .downcast_ref::<Exit>()
        .map_or(Status::Internal, |exit| exit.status)
}
