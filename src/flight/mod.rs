//! The run form, `singleflight NAME -- COMMAND`: look, lock, then run, wait or serve,
//! as `decide` says. All the I/O of a call lives here or below; where the lock and the
//! result live (the cache dir or etcd) is the [`Slot`]'s business.
//!
//! One file per phase of a call: this one arrives, looks and serves; `won` runs the
//! command holding the lock and settles its outcome; `wait` waits for another
//! caller's run; `background` starts a detached refresher and is one; `exclusive`
//! and `service` are the other two modes (each caller's own run in turn; one
//! long-lived instance).

mod background;
mod exclusive;
mod service;
mod wait;
mod won;

use std::cell::{Cell, RefCell};
use std::io;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};

use crate::backend::{Read, Slot};
use crate::cli::{Mode, RunOptions};
use crate::decide::{self, Cached, OnArrival, Policy};
use crate::entry::{self, Body, Entry, Invalid};
use crate::say::Say;
use crate::values::format_duration as human;

pub struct Flight {
    opts: RunOptions,
    slot: Slot,
    digest: String,
    say: Say,
    /// A damaged result is reported once per call, not at every look.
    reported_invalid: Cell<bool>,
    /// A result of another command under this NAME is said once per call, not at every look.
    reported_other: Cell<bool>,
    /// The cached result is of a newer format version: this call must not replace it.
    newer_cached: Cell<bool>,
    /// Why the result of a run that succeeded (or is to be cached) was not saved,
    /// for a caller it is handed back to.
    unsaved: RefCell<Option<String>>,
    /// Whether this call started a refresher already.
    started_refresher: Cell<bool>,
    /// The read end of the pipe a refresher hands back an unsaved result through.
    hand_back: RefCell<Option<io::PipeReader>>,
    /// When `--wait` runs out, counted from the first wait: a caller that waits again
    /// (see [`Flight::wait_for_run`]) waits no longer in all.
    wait_ends: Cell<Option<Instant>>,
    /// How many times this call went back to the lock after a wait.
    retries: Cell<u32>,
    /// When this call began (ms since the epoch): a failure recorded since is of the
    /// run it waited for, or of one that ended meanwhile.
    arrived_ms: u64,
}

/// What the cache holds, read and judged at one moment.
struct Look {
    cached: Cached,
    entry: Option<Entry>,
}

impl Flight {
    pub fn new(opts: RunOptions, slot: Slot, say: Say) -> Flight {
        Flight {
            digest: slot.result_digest(&opts.command),
            opts,
            slot,
            say,
            reported_invalid: Cell::new(false),
            reported_other: Cell::new(false),
            newer_cached: Cell::new(false),
            unsaved: RefCell::new(None),
            started_refresher: Cell::new(false),
            hand_back: RefCell::new(None),
            wait_ends: Cell::new(None),
            retries: Cell::new(0),
            arrived_ms: entry::now_ms(SystemTime::now()),
        }
    }

    /// Runs the whole decision of one call; returns the exit status.
    pub fn fly(self) -> Result<i32> {
        match (&self.opts.mode, self.opts.refresher) {
            (Mode::Cached, Some(handover)) => return self.refresh(handover),
            (Mode::Cached, None) => {}
            (Mode::Exclusive, _) => return self.exclusive(),
            (Mode::Service { .. }, Some(handover)) => return self.supervise(handover),
            (Mode::Service { ready }, None) => return self.service(ready.as_deref()),
        }
        let look = if self.slot.place().exists()? {
            self.look()?
        } else {
            self.nothing()
        };
        match decide::on_arrival(look.cached, self.opts.background) {
            OnArrival::ServeFresh => {
                if self.say.is_verbose() {
                    let why = self.describe(look.cached);
                    self.say.decided(format_args!("{why}: served"));
                }
                self.serve(look)
            }
            OnArrival::TryLock => {
                self.slot.store().ensure()?;
                match self.slot.try_lock()? {
                    Some(held) => self.won(held),
                    None => self.lost(),
                }
            }
            OnArrival::StartRefresher => self.background(look),
        }
    }

    fn policy(&self) -> Policy {
        Policy {
            max_stale: self.opts.max_stale,
            retry_after: self.opts.retry_after,
        }
    }

    fn nothing(&self) -> Look {
        Look {
            cached: Cached::Missing,
            entry: None,
        }
    }

    /// Reads the result; one that is corrupt or of another argv counts as none. An
    /// error is the backend's (etcd unreachable): the call cannot go on.
    fn look(&self) -> Result<Look> {
        Ok(match self.slot.place().read_result()? {
            Read::Found(entry) if entry.meta.argv_digest == self.digest => {
                let now = SystemTime::now();
                let age = entry.meta.age(now).or_else(|| {
                    // Dated a little ahead by another machine's clock: just written.
                    let skew = self.slot.place().clock_skew();
                    entry
                        .meta
                        .age(now.checked_add(skew)?)
                        .map(|_| Duration::ZERO)
                });
                Look {
                    cached: Cached::of_present(age, self.opts.ttl),
                    entry: Some(entry),
                }
            }
            Read::Found(other) => {
                // The same command with other key values (a changed --key-file) is no
                // surprise; another command is: two commands under one NAME evict each
                // other at every call.
                let command = entry::display_command(&self.opts.command);
                if other.meta.command != command && !self.reported_other.replace(true) {
                    self.say.warn(format_args!(
                        "holds a result of another command ({}); running this one replaces it",
                        other.meta.command
                    ));
                }
                self.nothing()
            }
            Read::Missing => self.nothing(),
            // Two versions sharing a cache dir or prefix must not throw away each
            // other's results: a newer one is a miss that this call leaves in place.
            Read::Invalid(Invalid::Newer(version)) => {
                self.newer_cached.set(true);
                if !self.reported_invalid.replace(true) {
                    self.say.warn(format_args!(
                        "the cached result is of a newer format (version {version}, {}): \
                         left alone; this call runs the command and saves nothing",
                        self.slot.place().result_location()
                    ));
                }
                self.nothing()
            }
            Read::Invalid(invalid) => {
                if !self.reported_invalid.replace(true) {
                    self.say.warn(format_args!(
                        "ignoring the cached result: it is {} ({}); the next run replaces it",
                        invalid.as_str(),
                        self.slot.place().result_location()
                    ));
                }
                self.nothing()
            }
            Read::Unreadable(e) => {
                self.say
                    .warn(format_args!("cannot read the cached result: {e}"));
                self.nothing()
            }
        })
    }

    fn describe(&self, cached: Cached) -> String {
        let ttl = human(self.opts.ttl);
        match cached {
            Cached::Fresh => format!("fresh (ttl {ttl})"),
            Cached::Stale { age: Some(age) } => format!("stale (age {} >= ttl {ttl})", human(age)),
            Cached::Stale { age: None } => "stale (written in the future)".to_owned(),
            Cached::Missing => "nothing cached".to_owned(),
        }
    }

    fn serve(&self, look: Look) -> Result<i32> {
        let entry = look.entry.expect("a servable result is present");
        let status = entry.meta.exit_code;
        self.print(entry.body)?;
        Ok(status)
    }

    /// Writes a body to stdout. A reader that went away (`| head`) is not an error.
    fn print(&self, body: Body) -> Result<()> {
        match print_to_stdout(body) {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
            other => other.context("cannot write to stdout"),
        }
    }
}

/// Writes to fd 1 without std's line buffering: a result goes out in as few writes as
/// it can, and large ones are copied file to file by the kernel.
fn print_to_stdout(body: Body) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::fd::FromRawFd;
        // SAFETY: fd 1 is open for the life of the process; ManuallyDrop never closes it.
        let stdout = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(1) });
        body.print(&mut &*stdout)
    }
    #[cfg(not(unix))]
    body.print(&mut io::stdout().lock())
}
