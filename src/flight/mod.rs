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

use std::io;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};

use crate::backend::{Held, Read, Slot};
use crate::cli::{Mode, RunOptions};
use crate::decide::{self, Cached, Policy, Seen, Step};
use crate::entry::{self, Body, Entry, Invalid};
use crate::say::Say;
use crate::values::format_duration as human;

/// One call of the run form: what it was asked to do, where, and how it talks.
/// Nothing here changes during the call; what does is in [`Call`].
pub struct Flight {
    opts: RunOptions,
    slot: Slot,
    digest: String,
    say: Say,
    /// When this call began (ms since the epoch): a failure recorded since is of the
    /// run it waited for, or of one that ended meanwhile.
    arrived_ms: u64,
}

/// What one call has seen and holds as it moves from step to step. Each step is
/// handed it as `&mut`: who changes what can be read off the signatures.
#[derive(Default)]
struct Call {
    /// What the cache held at the last look: what a `Serve` step prints.
    look: Look,
    /// The NAME's lock, from the step that takes it to the one that runs or lets go.
    held: Option<Held>,
    /// When the result looked at before the wait was written: a result written since
    /// is the awaited run's.
    before_wait: Option<u64>,
    /// What the call knew when it began to wait, for the `-v` line.
    why: String,
    /// A damaged result is reported once per call, not at every look.
    reported_invalid: bool,
    /// A result of another command under this NAME is said once per call.
    reported_other: bool,
    /// The cached result is of a newer format version: this call must not replace it.
    newer_cached: bool,
    /// Why the result of a run that succeeded (or is to be cached) was not saved,
    /// for a caller it is handed back to.
    unsaved: Option<String>,
    /// The refresher this call started, if it did.
    refresher: Option<u32>,
    /// Why no refresher could be started.
    refresher_error: Option<anyhow::Error>,
    /// The read end of the pipe a refresher hands back an unsaved result through.
    hand_back: Option<io::PipeReader>,
    /// When `--wait` runs out, counted from the first wait: a caller that waits again
    /// waits no longer in all.
    wait_ends: Option<Instant>,
    /// How many times this call went back to the lock after a wait.
    retries: u32,
}

/// What the cache holds, read and judged at one moment.
struct Look {
    cached: Cached,
    entry: Option<Entry>,
}

impl Default for Look {
    fn default() -> Look {
        Look {
            cached: Cached::Missing,
            entry: None,
        }
    }
}

impl Look {
    /// When its result was written, if there is one.
    fn written(&self) -> Option<u64> {
        self.entry.as_ref().map(|e| e.meta.written_at_ms)
    }
}

impl Flight {
    pub fn new(opts: RunOptions, slot: Slot, say: Say) -> Flight {
        Flight {
            digest: slot.result_digest(&opts.command),
            opts,
            slot,
            say,
            arrived_ms: entry::now_ms(SystemTime::now()),
        }
    }

    /// Runs the whole decision of one call; returns the exit status. The run form is
    /// one loop: `decide::next` says the step from what the last one saw, and each
    /// step's I/O says what it saw in turn, until a step ends the call.
    pub fn fly(self) -> Result<i32> {
        let mut call = Call::default();
        match (&self.opts.mode, self.opts.refresher) {
            (Mode::Cached, Some(handover)) => return self.refresh(&mut call, handover),
            (Mode::Cached, None) => {}
            (Mode::Exclusive, _) => return self.exclusive(),
            (Mode::Service { .. }, Some(handover)) => return self.supervise(handover),
            (Mode::Service { ready }, None) => return self.service(ready.as_deref()),
        }
        let mut seen = self.arrive(&mut call)?;
        loop {
            seen = match decide::next(seen, self.policy(), self.opts.background) {
                Step::Serve => return self.serve_seen(seen, &mut call),
                Step::TryLock => self.try_lock(&mut call)?,
                Step::LookAgain => self.look_again(&mut call)?,
                Step::Run => return self.execute(&mut call),
                Step::StartRefresher => self.refresh_in_background(&mut call),
                Step::BackOff { serve } => return self.back_off(serve, &mut call),
                Step::Wait => self.wait(&mut call)?,
                Step::AskWhy => self.ask_why(&mut call)?,
                Step::TakeHandedBack => match self.handed_back(&mut call) {
                    Some((status, body)) => {
                        self.print(body)?;
                        return Ok(status);
                    }
                    None => self.ask_why(&mut call)?,
                },
                Step::Queue => self.queue(&mut call)?,
                Step::GiveUp(why) => return Err(self.give_up(why, &mut call)),
            };
        }
    }

    /// The first look, before any lock (and before the cache dir is made). A local
    /// copy of a fleet result that is fresh for this call is served without asking
    /// the fleet; anything else asks it.
    fn arrive(&self, call: &mut Call) -> Result<Seen> {
        if let Some(entry) = self.slot.place().read_mirror()
            && entry.meta.argv_digest == self.digest
        {
            let age = entry.meta.age(SystemTime::now()).unwrap_or(Duration::ZERO);
            if Cached::of_present(Some(age), self.opts.ttl) == Cached::Fresh {
                call.look = Look {
                    cached: Cached::Fresh,
                    entry: Some(entry),
                };
                return Ok(Seen::Arrived {
                    cached: Cached::Fresh,
                });
            }
        }
        if self.slot.place().exists()? {
            call.look = self.look(call)?;
        }
        Ok(Seen::Arrived {
            cached: call.look.cached,
        })
    }

    /// Tries the lock: won, the call looks again under it; lost, a run is in flight.
    fn try_lock(&self, call: &mut Call) -> Result<Seen> {
        self.slot.store().ensure()?;
        match self.slot.try_lock()? {
            Some(held) => {
                call.held = Some(held);
                self.look_again(call)
            }
            None => {
                call.look = self.look(call)?;
                Ok(Seen::Lost {
                    cached: call.look.cached,
                })
            }
        }
    }

    /// Prints the last look's result. Serving is no business of the lock: a caller
    /// that holds it (refreshed meanwhile, or queued for it) lets go first.
    fn serve_seen(&self, seen: Seen, call: &mut Call) -> Result<i32> {
        drop(call.held.take());
        if self.say.is_verbose() {
            let what = self.describe(call.look.cached);
            let how = match seen {
                Seen::Arrived { .. } => format!("{what}: served"),
                Seen::Won { .. } => format!("{what} after taking the lock: served"),
                // The lock was taken, and the look after it found a fresh result: the
                // run that held it had just stored it (not a stale result served).
                Seen::Lost {
                    cached: Cached::Fresh,
                } => format!("{what}, just stored by the run in flight: served"),
                Seen::Lost { .. } if self.opts.background => {
                    format!("{what}; a run is already in flight; serving stale")
                }
                Seen::Lost { .. } => {
                    format!("{what}; a run is in flight: serving the stale result")
                }
                Seen::RefresherStarted { .. } => {
                    format!("{what}; {}; serving stale", refresh_note(call))
                }
                Seen::Waited { .. } | Seen::NothingLeft { .. } => format!(
                    "{}; waited for the run in flight: served its result",
                    call.why
                ),
                Seen::Queued { .. } => {
                    format!("{what}; queued for the lock: served the result of the run before")
                }
            };
            self.say.decided(format_args!("{how}"));
        }
        self.serve(std::mem::take(&mut call.look))
    }

    fn policy(&self) -> Policy {
        Policy {
            max_stale: self.opts.max_stale,
            retry_after: self.opts.retry_after,
        }
    }

    /// Reads the result; one that is corrupt or of another argv counts as none. An
    /// error is the backend's (etcd unreachable): the call cannot go on.
    fn look(&self, call: &mut Call) -> Result<Look> {
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
                if other.meta.command != command
                    && !std::mem::replace(&mut call.reported_other, true)
                {
                    self.say.warn(format_args!(
                        "holds a result of another command ({}); running this one replaces it",
                        other.meta.command
                    ));
                }
                Look::default()
            }
            Read::Missing => Look::default(),
            // Two versions sharing a cache dir or prefix must not throw away each
            // other's results: a newer one is a miss that this call leaves in place.
            Read::Invalid(Invalid::Newer(version)) => {
                call.newer_cached = true;
                if !std::mem::replace(&mut call.reported_invalid, true) {
                    self.say.warn(format_args!(
                        "the cached result is of a newer format (version {version}, {}): \
                         left alone; this call runs the command and saves nothing",
                        self.slot.place().result_location()
                    ));
                }
                Look::default()
            }
            Read::Invalid(invalid) => {
                if !std::mem::replace(&mut call.reported_invalid, true) {
                    self.say.warn(format_args!(
                        "ignoring the cached result: it is {} ({}); the next run replaces it",
                        invalid.as_str(),
                        self.slot.place().result_location()
                    ));
                }
                Look::default()
            }
            Read::Unreadable(e) => {
                self.say
                    .warn(format_args!("cannot read the cached result: {e}"));
                Look::default()
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
        let entry = look
            .entry
            .context("internal error: no result to serve (a decision served a missing one)")?;
        serve_entry(entry, self.opts.replay_stderr)
    }

    /// Writes a body to stdout (see [`print`]).
    fn print(&self, body: Body) -> Result<()> {
        print(body)
    }
}

/// Serves a result: its stored stderr (unless `replay_stderr` is off), then its body;
/// returns the status it was stored with. The one way a result is served, by a call
/// that went the whole way or by the fresh hit decided before clap (`hit`).
pub fn serve_entry(entry: Entry, replay_stderr: bool) -> Result<i32> {
    let status = entry.meta.exit_code;
    if replay_stderr && !entry.stderr.is_empty() {
        self::replay_stderr(&entry.stderr);
    }
    print(entry.body)?;
    Ok(status)
}

/// Writes a body to stdout. A reader that went away (`| head`) is not an error.
fn print(body: Body) -> Result<()> {
    match print_to_stdout(body) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("cannot write to stdout"),
    }
}

/// What the `-v` line says of the refresher this call started, or did not.
fn refresh_note(call: &Call) -> String {
    match call.refresher {
        Some(pid) => format!("refresh started in background (pid {pid})"),
        None => "no refresh started".to_owned(),
    }
}

/// Writes a served result's stored stderr to ours, before its stdout: whoever reads
/// both in one place (a terminal, a hook's log) sees the reason first, then the output,
/// as most tools print them; and a reader of stdout alone (a status line) does not wait
/// on it. Best effort: a closed stderr does not keep the result from being served.
fn replay_stderr(stderr: &[u8]) {
    use std::io::Write;
    let mut out = io::stderr().lock();
    let _ = out.write_all(stderr);
    let _ = out.flush();
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
