//! The run form, `singleflight NAME -- COMMAND`: look, lock, then run, wait or serve,
//! as `decide` says. All the I/O of a call lives here or below; where the lock and the
//! result live (the cache dir or etcd) is the [`Slot`]'s business.

use std::cell::{Cell, RefCell};
use std::fs;
use std::io;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};

use crate::backend::{Held, OutputCap, Read, Slot};
use crate::cli::{Refresher, RunOptions};
use crate::decide::{self, AfterWait, Cached, OnArrival, OnLost, OnWon, Policy};
use crate::entry::{self, Body, Entry, EntryWriter, Invalid, Meta};
use crate::exit::{self, Exit};
use crate::reap;
use crate::record::{self, Failure, RunRecord};
use crate::run::{self, Outcome, RunSpec};
use crate::say::Say;
use crate::values::{format_duration as human, format_size, later, millis};

pub struct Flight {
    opts: RunOptions,
    slot: Slot,
    digest: String,
    say: Say,
    /// A damaged result is reported once per call, not at every look.
    reported_invalid: Cell<bool>,
    /// The cached result is of a newer format version: this call must not replace it.
    newer_cached: Cell<bool>,
    /// The run succeeded (or is to be cached) but its result was not saved.
    unsaved: Cell<bool>,
    /// Whether this call started a refresher already.
    started_refresher: Cell<bool>,
    /// The read end of the pipe a refresher hands back an unsaved result through.
    hand_back: RefCell<Option<io::PipeReader>>,
    /// Why the result was not saved, for the caller it is handed back to.
    unsaved_reason: RefCell<String>,
    /// When `--wait` runs out, counted from the first wait: a caller that waits again
    /// (see [`Flight::wait_for_run`]) waits no longer in all.
    wait_ends: Cell<Option<Instant>>,
    /// How many times this call went back to the lock after a wait.
    retries: Cell<u32>,
    /// When this call began (ms since the epoch): a failure recorded since is of the
    /// run it waited for, or of one that ended meanwhile.
    arrived_ms: u64,
}

/// The head of a handed-back result: its status and the length of its reason.
const HAND_BACK_HEAD: u64 = 8;

/// At most this many trips back to the lock after waits that ended with nothing to
/// serve and no failure: a bound on a loop that the `--wait` deadline bounds too.
const MAX_RETRIES: u32 = 100;

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
            newer_cached: Cell::new(false),
            unsaved: Cell::new(false),
            started_refresher: Cell::new(false),
            hand_back: RefCell::new(None),
            unsaved_reason: RefCell::new(String::new()),
            wait_ends: Cell::new(None),
            retries: Cell::new(0),
            arrived_ms: entry::now_ms(SystemTime::now()),
        }
    }

    /// Runs the whole decision of one call; returns the exit status.
    pub fn fly(self) -> Result<i32> {
        if let Some(handover) = self.opts.refresher {
            return self.refresh(handover);
        }
        let look = if self.slot.exists()? {
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
        Ok(match self.slot.read_result()? {
            Read::Found(entry) if entry.meta.argv_digest == self.digest => {
                let now = SystemTime::now();
                let age = entry.meta.age(now).or_else(|| {
                    // Dated a little ahead by another machine's clock: just written.
                    let skew = self.slot.clock_skew();
                    entry
                        .meta
                        .age(now.checked_add(skew)?)
                        .map(|_| Duration::ZERO)
                });
                Look {
                    cached: Cached::classify(Some(age), self.opts.ttl),
                    entry: Some(entry),
                }
            }
            Read::Found(_) | Read::Missing => self.nothing(),
            // Two versions sharing a cache dir or prefix must not throw away each
            // other's results: a newer one is a miss that this call leaves in place.
            Read::Invalid(Invalid::Newer(version)) => {
                self.newer_cached.set(true);
                if !self.reported_invalid.replace(true) {
                    self.say.warn(format_args!(
                        "the cached result is of a newer format (version {version}, {}): \
                         left alone; this call runs the command and saves nothing",
                        self.slot.result_location()
                    ));
                }
                self.nothing()
            }
            Read::Invalid(invalid) => {
                if !self.reported_invalid.replace(true) {
                    self.say.warn(format_args!(
                        "ignoring the cached result: it is {} ({}); the next run replaces it",
                        invalid.as_str(),
                        self.slot.result_location()
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

    /// Holding the lock: look again, then run, serve, or back off after a failure.
    fn won(&self, held: Held) -> Result<i32> {
        match self.won_decision()? {
            (OnWon::Run, look) => self.execute(look, held),
            (decision, look) => {
                // Nothing to run: serving is no business of the lock (see `execute`).
                drop(held);
                self.serve_without_run(decision, look)
            }
        }
    }

    fn won_decision(&self) -> Result<(OnWon, Look)> {
        self.clean_up_after_crashes();
        let look = self.look()?;
        let failure = self.last_failure()?;
        let failed_ago = failure.as_ref().map(|f| f.age(SystemTime::now()));
        let policy = Policy {
            retry_after: failure
                .as_ref()
                .map_or(self.opts.retry_after, |f| self.backoff(f)),
            ..self.policy()
        };
        Ok((decide::on_won(look.cached, failed_ago, policy), look))
    }

    /// How long no run starts after this failure, by this call's options.
    fn backoff(&self, failure: &Failure) -> Duration {
        let (after, max) = (self.opts.retry_after, self.opts.retry_max);
        decide::backoff(after, max, failure.consecutive, failure.jitter)
    }

    fn serve_without_run(&self, decision: OnWon, look: Look) -> Result<i32> {
        match decision {
            OnWon::ServeFresh => {
                self.say.decided(format_args!(
                    "{} after taking the lock: served",
                    self.describe(look.cached)
                ));
                self.serve(look)
            }
            OnWon::BackOff { serve } => {
                let why = self.backing_off()?;
                if serve {
                    self.say.decided(format_args!(
                        "{}; {why}; serving the last good result",
                        self.describe(look.cached)
                    ));
                    self.serve(look)
                } else {
                    Err(Exit::new(
                        exit::NOTHING_TO_SERVE,
                        format!("{}: nothing cached; {why}", self.opts.name),
                    )
                    .into())
                }
            }
            OnWon::Run => unreachable!("a run is not served"),
        }
    }

    fn backing_off(&self) -> Result<String> {
        Ok(match self.last_failure()? {
            Some(failure) => {
                let ago = failure.age(SystemTime::now());
                let next = self.backoff(&failure).saturating_sub(ago);
                format!(
                    "the last run failed {} ago ({}); next try in {}",
                    human(ago),
                    failure.reason,
                    human(next)
                )
            }
            None => "the last run failed".to_owned(),
        })
    }

    fn last_failure(&self) -> Result<Option<Failure>> {
        let failure = self.slot.read_failure()?;
        Ok(failure.filter(|f| f.argv_digest == self.digest))
    }

    /// A winner kills what a killed run left behind and removes dead runs' temp files. The
    /// run record is this machine's, whatever the backend: a run killed elsewhere is
    /// that machine's to clean up.
    fn clean_up_after_crashes(&self) {
        if let Some(run) = record::load::<RunRecord>(&self.slot.paths().run) {
            self.say.warn(format_args!(
                "the previous run (pid {}) was killed with its singleflight; killing what is left of it",
                run.pid
            ));
            reap::kill_remains(&run);
        }
        let _ = fs::remove_file(&self.slot.paths().run);
        self.slot.store().remove_stale_temps();
    }

    /// Another caller holds the lock: serve stale at once, or wait for its run.
    fn lost(&self) -> Result<i32> {
        let look = self.look()?;
        match decide::on_lost(look.cached, self.policy()) {
            OnLost::ServeStale => {
                self.say.decided(format_args!(
                    "{}; a run is in flight: serving the stale result",
                    self.describe(look.cached)
                ));
                self.serve(look)
            }
            OnLost::Wait => self.wait_for_run(&look, &self.describe(look.cached)),
        }
    }

    /// Waits for the run in flight; `before` is what the cache held before it.
    ///
    /// The lock's holder may be no run at all: `clear` takes the same lock. So a wait
    /// that ends with nothing to serve gives up (75) only if the run it waited for
    /// recorded a failure; otherwise (a clear, a run stopped by a signal, or one whose
    /// result a clear removed at once) the caller goes back to the lock, to run, or
    /// to wait again for what is left of `--wait`.
    fn wait_for_run(&self, before: &Look, why: &str) -> Result<i32> {
        let wait_ends = match self.wait_ends.get() {
            Some(ends) => ends,
            None => {
                let ends = later(Instant::now(), self.opts.wait);
                self.wait_ends.set(Some(ends));
                ends
            }
        };
        let left = wait_ends.saturating_duration_since(Instant::now());
        let released = self.slot.wait_released(left)?;
        let name = &self.opts.name;
        if !released {
            return Err(self.wait_ran_out());
        }
        let look = self.look()?;
        let written = |look: &Look| look.entry.as_ref().map(|e| e.meta.written_at_ms);
        let fresh_from_run = written(&look) != written(before);
        match decide::after_wait(look.cached, fresh_from_run, self.policy()) {
            AfterWait::Serve => {
                self.say.decided(format_args!(
                    "{why}; waited for the run in flight: served its result"
                ));
                self.serve(look)
            }
            AfterWait::GiveUp if let Some((status, body)) = self.handed_back() => {
                self.print(body)?;
                Ok(status)
            }
            // Not when a newer version's result is cached (runs of this version save
            // nothing), nor after this call started a refresher: going back would only
            // start run after run.
            AfterWait::GiveUp
                if !self.newer_cached.get()
                    && !self.started_refresher.get()
                    && !self.failed_since(self.arrived_ms)? =>
            {
                if self.retries.replace(self.retries.get() + 1) < MAX_RETRIES {
                    self.say.decided(format_args!(
                        "{why}; the lock was let go with nothing to serve and no failure \
                         recorded (a clear, or a run that was stopped): trying again"
                    ));
                    return self.queue(before);
                }
                let message = format!(
                    "{name}: the lock holders let go {MAX_RETRIES} times with nothing to serve; \
                     giving up"
                );
                Err(Exit::new(exit::NOTHING_TO_SERVE, message).into())
            }
            AfterWait::GiveUp => {
                let message = format!(
                    "{name}: the run in flight produced nothing to serve (see `singleflight status {name}`)"
                );
                Err(Exit::new(exit::NOTHING_TO_SERVE, message).into())
            }
        }
    }

    /// What our refresher handed back through its pipe: the status and output of a run
    /// whose result it could not save. Read until the refresher closes it, within what
    /// is left of `--wait`.
    fn handed_back(&self) -> Option<(i32, Body)> {
        use std::io::Read as _;
        let mut reader = self.hand_back.borrow_mut().take()?;
        let left = self
            .wait_ends
            .get()?
            .saturating_duration_since(Instant::now());
        let limit = self.opts.max_output.saturating_add(HAND_BACK_HEAD + 4096);
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let read = (&mut reader).take(limit).read_to_end(&mut bytes);
            let _ = sender.send(read.map(|_| bytes));
        });
        let bytes = receiver.recv_timeout(left).ok()?.ok()?;
        let (status, rest) = bytes.split_first_chunk::<4>()?;
        let (reason_len, rest) = rest.split_first_chunk::<4>()?;
        let reason_len = u32::from_le_bytes(*reason_len) as usize;
        let reason = String::from_utf8_lossy(rest.get(..reason_len)?).into_owned();
        let status = i32::from_le_bytes(*status);
        let start = HAND_BACK_HEAD as usize + reason_len;
        self.say.warn(format_args!(
            "{reason}; serving the refresher's output, which is not cached"
        ));
        let end = bytes.len();
        Some((status, Body::Memory { bytes, start, end }))
    }

    /// Hands an unsaved result back to the waiting caller (see [`Self::handed_back`]):
    /// status, the length of the reason, the reason, the output. Best effort: a caller
    /// that stopped waiting has closed its end. A saved result is not handed back:
    /// closing the pipe empty tells the caller to read the cache.
    fn hand_back(&self, mut pipe: fs::File, status: i32, body: Body) {
        if !self.unsaved.get() {
            return;
        }
        let reason = self.unsaved_reason.borrow().clone();
        let mut head = Vec::new();
        head.extend_from_slice(&status.to_le_bytes());
        head.extend_from_slice(&(reason.len() as u32).to_le_bytes());
        head.extend_from_slice(reason.as_bytes());
        if io::Write::write_all(&mut pipe, &head).is_ok() {
            let _ = body.print(&mut pipe);
        }
    }

    /// Whether a run of this argv recorded a failure at or after `since_ms`.
    fn failed_since(&self, since_ms: u64) -> Result<bool> {
        Ok(self
            .last_failure()?
            .is_some_and(|failure| failure.at_ms >= since_ms))
    }

    /// Back to the lock after a wait that ended with nothing to serve: run (or start
    /// a refresher) if it is free, else serve or wait as any caller that lost.
    /// Back at the lock after a wait that ended with nothing to serve. This time the
    /// caller queues for the lock itself, for what is left of `--wait`, and decides
    /// under it: going back to `try_lock` and waiting again could lose every turn to a
    /// `clear` in a loop, each taking the lock the moment a run lets it go and deleting
    /// its result before this caller looks.
    fn queue(&self, before: &Look) -> Result<i32> {
        if self.opts.background {
            return self.again();
        }
        let left = self.wait_ends.get().map_or(self.opts.wait, |ends| {
            ends.saturating_duration_since(Instant::now())
        });
        let Some(held) = self.slot.lock_within(left)? else {
            return Err(self.wait_ran_out());
        };
        // A run that ended while this caller queued left its result: that is what the
        // caller waited for, as any waiter would be served it.
        let look = self.look()?;
        let written = |look: &Look| look.entry.as_ref().map(|e| e.meta.written_at_ms);
        let fresh_from_run = look.entry.is_some() && written(&look) != written(before);
        if decide::after_wait(look.cached, fresh_from_run, self.policy()) == AfterWait::Serve {
            drop(held);
            self.say.decided(format_args!(
                "{}; queued for the lock: served the result of the run before",
                self.describe(look.cached)
            ));
            return self.serve(look);
        }
        self.won(held)
    }

    fn wait_ran_out(&self) -> anyhow::Error {
        let (name, wait) = (&self.opts.name, human(self.opts.wait));
        let message =
            format!("{name}: a run is in flight and --wait {wait} ran out; nothing to serve");
        Exit::new(exit::NOTHING_TO_SERVE, message).into()
    }

    fn again(&self) -> Result<i32> {
        if self.opts.background {
            return self.background(self.nothing());
        }
        match self.slot.try_lock()? {
            Some(held) => self.won(held),
            None => self.lost(),
        }
    }

    /// `--background`: make sure one detached refresher runs, then serve stale or wait.
    /// Only the caller that wins the lock starts one, and hands the lock over to it, so
    /// there is at most one refresher per NAME however many callers arrive.
    fn background(&self, look: Look) -> Result<i32> {
        self.slot.store().ensure()?;
        let servable = decide::on_lost(look.cached, self.policy()) == OnLost::ServeStale;
        let refresh = match self.slot.try_lock()? {
            None => "a run is already in flight".to_owned(),
            // Inside --retry-after of a failed run, or refreshed meanwhile: no refresher.
            Some(held) => match self.won_decision()? {
                (OnWon::Run, _) => {
                    // Our hold of the lock goes in there: the refresher's is the only
                    // one left, and a wait below must not wait for ourselves.
                    match self.start_refresher(held, !servable) {
                        Ok(pid) => format!("refresh started in background (pid {pid})"),
                        Err(e) if servable => {
                            self.say.warn(format_args!("{e:#}; serving stale"));
                            "no refresh started".to_owned()
                        }
                        Err(e) => return Err(Exit::new(exit::INTERNAL, format!("{e:#}")).into()),
                    }
                }
                (decision, look) => {
                    drop(held);
                    return self.serve_without_run(decision, look);
                }
            },
        };
        let why = format!("{}; {refresh}", self.describe(look.cached));
        if servable {
            self.say.decided(format_args!("{why}; serving stale"));
            self.serve(look)
        } else {
            self.wait_for_run(&look, &why)
        }
    }

    /// Starts `singleflight --refresher=FD <the same arguments>` (with etcd:
    /// `--refresher-lease=LEASE:TOKEN`) detached: its own session, stdin, stdout and
    /// stderr on /dev/null, and no other file descriptor than the held lock file, which
    /// it inherits (flock belongs to the open file, so the lock stays held across our
    /// exit). Anything else inherited, such as the pipe of a `$(…)` or `| cat` reader,
    /// would keep that reader waiting for the refresh. (Windows: see `Held::hand_over`.)
    ///
    /// A caller that will wait (`wait`: nothing to serve) also hands the refresher the
    /// write end of a pipe (`--hand-back=FD`): a run whose result cannot be saved (a
    /// full disk) comes back through it, so the waiter is served what a foreground
    /// winner would print.
    fn start_refresher(&self, held: Held, wait: bool) -> Result<u32> {
        use std::process::Stdio;
        let mut command = refresher_command()?;
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        #[cfg(unix)]
        let pipe = if wait {
            let (reader, writer) = io::pipe().context("cannot make a pipe for the refresher")?;
            *self.hand_back.borrow_mut() = Some(reader);
            Some(writer)
        } else {
            None
        };
        #[cfg(not(unix))]
        let _ = wait;
        #[cfg(unix)]
        {
            use std::os::fd::{AsRawFd, BorrowedFd};
            use std::os::unix::process::CommandExt;
            let lock = held.inheritable_fd();
            let hand_back = pipe.as_ref().map(AsRawFd::as_raw_fd);
            close_others_on_exec(&[lock, hand_back]);
            // SAFETY: only async-signal-safe syscalls between fork and exec; the fds
            // are open in the child, copies of ours.
            unsafe {
                command.pre_exec(move || {
                    rustix::process::setsid()?;
                    for fd in [lock, hand_back].into_iter().flatten() {
                        let fd = BorrowedFd::borrow_raw(fd);
                        rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty())?;
                    }
                    Ok(())
                });
            }
            if let Some(fd) = hand_back {
                command.arg(format!("--hand-back={fd}"));
            }
        }
        command
            .arg(held.refresher_arg())
            .args(std::env::args_os().skip(1));
        #[cfg(windows)]
        let child = windows::spawn_detached(&mut command);
        #[cfg(not(windows))]
        let child = command.spawn();
        let child = child.context("cannot start the background refresher")?;
        // Our copy of the write end goes now: the pipe ends when the refresher does.
        #[cfg(unix)]
        drop(pipe);
        self.started_refresher.set(true);
        let pid = child.id();
        held.hand_over(child, &self.slot);
        Ok(pid)
    }

    /// The detached refresher: holds the lock it was handed and runs if still needed.
    /// A run that cannot even start leaves a failure record too, so that `status`
    /// shows why and `--retry-after` keeps callers from starting refresher after
    /// refresher.
    fn refresh(&self, handover: Refresher) -> Result<i32> {
        // Taken first, so that it is close-on-exec before the command starts: a
        // process of the run holding it would keep the caller waiting.
        let hand_back = self.opts.hand_back.and_then(adopt_pipe);
        let held = match handover {
            Refresher::Lease(lease) => self.slot.adopt(lease)?,
            #[cfg(unix)]
            // SAFETY: FD is from our own command line (`--refresher`, internal): the
            // caller started us with it open, and this is the one place that claims it.
            Refresher::Fd(fd) => unsafe { self.slot.inherit(fd)? },
            #[cfg(not(unix))]
            Refresher::Fd(_) => {
                let lock = &self.slot.paths().lock;
                match crate::lock::try_exclusive_for(lock, crate::backend::HAND_OVER)
                    .with_context(|| format!("cannot lock {}", lock.display()))?
                {
                    Some(guard) => Held::Local(guard),
                    None => return Ok(0),
                }
            }
        };
        match self.won_decision()? {
            (OnWon::Run, look) => {
                let ran = self.run_and_store(look, &held).inspect_err(|e| {
                    // A refresher stopped by a signal did not fail.
                    if e.downcast_ref::<Exit>()
                        .is_none_or(|exit| exit.signal.is_none())
                    {
                        self.record_failure_to_start(e, &held);
                    }
                });
                drop(held);
                let (status, body) = ran?;
                match hand_back {
                    Some(pipe) => self.hand_back(pipe, status, body),
                    None => self.print(body)?,
                }
                Ok(status)
            }
            _ => Ok(0),
        }
    }

    fn record_failure_to_start(&self, error: &anyhow::Error, held: &Held) {
        let reason = format!("{error:#}");
        self.write_failure(held, exit::status_of(error), &reason, Duration::ZERO, &[]);
    }

    /// Runs the command under the lock, then prints what the caller is served.
    ///
    /// Once the result is renamed into place (or the failure recorded) the run is
    /// over: the lock is let go before printing, so that a slow reader of our stdout
    /// (`| less`, a stalled pipe, a terminal paused with Ctrl-S) holds up no other
    /// caller, refresher or `clear`.
    fn execute(&self, last: Look, held: Held) -> Result<i32> {
        let ran = self.run_and_store(last, &held);
        drop(held);
        let (status, body) = ran?;
        self.print(body)?;
        Ok(status)
    }

    /// Runs the command under the lock and stores its outcome; returns the exit
    /// status and the stdout the caller is to print.
    fn run_and_store(&self, last: Look, held: &Held) -> Result<(i32, Body)> {
        let now = SystemTime::now();
        let mut run_record = RunRecord {
            token: format!("{}-{}", std::process::id(), entry::now_ms(now)),
            boot_id: reap::boot_id(),
            owner_pid: std::process::id(),
            started_at_ms: entry::now_ms(now),
            ..RunRecord::default()
        };
        self.write_run_record(&run_record);
        let writer = EntryWriter::create(self.slot.store(), &self.opts.name);
        if let Some(e) = writer.error()
            && self.slot.results_in_cache_dir()
        {
            self.say.warn(format_args!(
                "cannot write to the cache dir ({e}); this run's result will not be saved"
            ));
        }
        // The largest metadata the result can have bounds the room left for stdout.
        let cap = self.slot.output_cap(
            self.opts.max_output,
            &self.meta(i32::MIN, u64::MAX, Duration::MAX),
        );
        let spec = RunSpec {
            argv: &self.opts.command,
            timeout: self.opts.timeout,
            kill_after: self.opts.kill_after,
            max_output: cap.bytes,
            pass_stderr: true,
            token: &run_record.token.clone(),
            env: held.env(),
            abort: held.abort(),
        };
        let finished = run::run(&spec, writer, |pid| {
            run_record.pid = pid;
            run_record.start_ticks = reap::start_ticks(pid);
            self.write_run_record(&run_record);
        });
        let _ = fs::remove_file(&self.slot.paths().run);
        let finished = finished?;
        let outcome = finished.outcome;
        let status = outcome.exit_status();
        if outcome == Outcome::LeaseLost {
            let why = held.abort().and_then(|abort| abort.reason());
            let message = format!(
                "{}: lost the etcd lock mid-run: {}; the command's process tree was killed \
                 and nothing was stored",
                self.opts.name,
                why.as_deref().unwrap_or("lease lost")
            );
            return Err(Exit::new(status, message).into());
        }
        let what = self.describe_outcome(outcome, finished.duration, cap);
        if let Outcome::Interrupted(signal) = outcome {
            self.say.decided(format_args!(
                "{}; ran the command: {what}; nothing cached",
                self.describe(last.cached)
            ));
            // singleflight dies of the signal in `main`, once the temp file is removed
            // and the lock released (an etcd lease revoked) on the way there.
            return Err(Exit::killed_by(signal).into());
        }
        if outcome.succeeded() {
            self.slot.forget_failure(held);
        } else {
            self.write_failure(
                held,
                status,
                &what,
                finished.duration,
                &finished.stderr_tail,
            );
        }
        let cache_it =
            outcome.succeeded() || (self.opts.cache_failures && outcome.is_own_failure());
        if cache_it && self.newer_cached.get() {
            self.unsaved.set(true);
            *self.unsaved_reason.borrow_mut() = format!(
                "{what}, but a newer singleflight's result is cached, which this one leaves alone"
            );
            self.say.decided(format_args!(
                "{}; ran the command: {what}; not cached (a newer version's result is kept)",
                self.describe(last.cached)
            ));
            return Ok((status, finished.stdout.into_body()));
        }
        if cache_it {
            let written_at_ms = entry::now_ms(SystemTime::now());
            let meta = self.meta(status, written_at_ms, finished.duration);
            let body = match self.slot.save_result(held, finished.stdout, &meta) {
                Ok(body) => {
                    self.say.decided(format_args!(
                        "{}; ran the command: {what}; cached",
                        self.describe(last.cached)
                    ));
                    body
                }
                Err((e, body)) => {
                    let kept = match last.entry {
                        Some(_) => "the previous result is kept",
                        None => "nothing is cached",
                    };
                    let why = format!("{what}, but the result could not be saved ({e})");
                    self.say.warn(format_args!("{why}; {kept}"));
                    self.unsaved.set(true);
                    *self.unsaved_reason.borrow_mut() = why;
                    body
                }
            };
            return Ok((status, body));
        }
        let body = match last.entry {
            Some(entry) => {
                self.say
                    .warn(format_args!("{what}; serving the last good result"));
                entry.body
            }
            None => {
                self.say
                    .warn(format_args!("{what}; nothing cached to serve instead"));
                finished.stdout.into_body()
            }
        };
        Ok((status, body))
    }

    /// The metadata of a result of this call's command.
    fn meta(&self, exit_code: i32, written_at_ms: u64, took: Duration) -> Meta {
        Meta {
            argv_digest: self.digest.clone(),
            command: entry::display_command(&self.opts.command),
            written_at_ms,
            ttl_ms: millis(self.opts.ttl),
            exit_code,
            duration_ms: millis(took),
        }
    }

    fn describe_outcome(&self, outcome: Outcome, took: Duration, cap: OutputCap) -> String {
        match outcome {
            Outcome::Exited(code) => format!("exit status {code} after {}", human(took)),
            Outcome::Signaled(signal) => format!("killed by signal {signal} after {}", human(took)),
            Outcome::TimedOut => format!(
                "timed out after {}; its process tree was killed",
                human(self.opts.timeout)
            ),
            Outcome::OutputOverflow if cap.by_backend => format!(
                "stdout went over {}, what fits in the etcd backend's limit of {} for a \
                 result with its metadata; the run was killed",
                format_size(cap.bytes),
                format_size(self.slot.backend_limit().unwrap_or(cap.bytes))
            ),
            Outcome::OutputOverflow => format!(
                "stdout went over --max-output {}; the run was killed",
                format_size(self.opts.max_output)
            ),
            Outcome::Interrupted(signal) => {
                format!("singleflight got signal {signal}; the run was stopped")
            }
            Outcome::LeaseLost => "the etcd lock was lost; the run was stopped".to_owned(),
        }
    }

    fn write_run_record(&self, run: &RunRecord) {
        let _ = self.slot.store().write_atomically(
            &self.opts.name,
            &self.slot.paths().run,
            &record::to_bytes(run),
            false,
        );
    }

    fn write_failure(
        &self,
        held: &Held,
        exit_code: i32,
        reason: &str,
        took: Duration,
        stderr_tail: &[u8],
    ) {
        let at_ms = entry::now_ms(SystemTime::now());
        let previous = self.last_failure().ok().flatten();
        let consecutive = previous.map_or(1, |f| f.consecutive.max(1).saturating_add(1));
        let jitter = decide::jitter_from(at_ms ^ u64::from(std::process::id()) << 40);
        let (after, max) = (self.opts.retry_after, self.opts.retry_max);
        let backoff = decide::backoff(after, max, consecutive, jitter);
        let failure = Failure {
            at_ms,
            consecutive,
            jitter,
            backoff_ms: Some(u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX)),
            argv_digest: self.digest.clone(),
            exit_code,
            reason: reason.to_owned(),
            stderr_tail: String::from_utf8_lossy(stderr_tail).into_owned(),
            duration_ms: millis(took),
        };
        if let Err(e) = self.slot.save_failure(&self.opts.name, held, &failure) {
            self.say
                .warn(format_args!("cannot record the failure: {e:#}"));
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
        let stdout = std::mem::ManuallyDrop::new(unsafe { fs::File::from_raw_fd(1) });
        body.print(&mut &*stdout)
    }
    #[cfg(not(unix))]
    body.print(&mut io::stdout().lock())
}

/// The write end of the pipe a `--background` caller handed its refresher
/// (`--hand-back=FD`), made close-on-exec; `None` unless `fd` is open and a pipe.
#[cfg(unix)]
fn adopt_pipe(fd: i32) -> Option<fs::File> {
    use std::os::fd::{BorrowedFd, FromRawFd};
    if fd < 3 {
        return None;
    }
    // SAFETY: borrowed for fcntl and fstat; a number that is not open fails (EBADF).
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    rustix::io::fcntl_getfd(borrowed).ok()?;
    let stat = rustix::fs::fstat(borrowed).ok()?;
    if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::Fifo {
        return None;
    }
    rustix::io::fcntl_setfd(borrowed, rustix::io::FdFlags::CLOEXEC).ok()?;
    // SAFETY: an open pipe that our caller passed to us for this one purpose; nothing
    // else in this process knows the number.
    Some(unsafe { fs::File::from_raw_fd(fd) })
}

#[cfg(not(unix))]
fn adopt_pipe(_fd: i32) -> Option<fs::File> {
    None
}

/// The command that starts a refresher: this very executable. On Linux through
/// /proc/self/exe, which works even after the binary was replaced on disk; the
/// process keeps its usual name for `ps` and `pgrep`.
fn refresher_command() -> Result<std::process::Command> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if std::path::Path::new("/proc/self/exe").exists() {
        use std::os::unix::process::CommandExt;
        let mut command = std::process::Command::new("/proc/self/exe");
        let name = std::env::args_os()
            .next()
            .unwrap_or_else(|| "singleflight".into());
        command.arg0(name);
        return Ok(command);
    }
    let exe = std::env::current_exe().context("cannot find singleflight's own executable")?;
    Ok(std::process::Command::new(exe))
}

/// Marks every open file descriptor above stderr close-on-exec, except `keep`. std
/// opens its own files that way already; this is for what we inherited without the
/// flag (a shell's `3>&1`, a parent's leaked pipe), which a detached refresher must
/// not hold. Safe to do to ourselves: a `--background` caller execs nothing else.
#[cfg(unix)]
fn close_others_on_exec(keep: &[Option<std::os::fd::RawFd>]) {
    use rustix::io::{FdFlags, fcntl_getfd, fcntl_setfd};
    use std::os::fd::{BorrowedFd, RawFd};
    let listed = ["/proc/self/fd", "/dev/fd"].iter().find_map(|dir| {
        let entries = fs::read_dir(dir).ok()?;
        let fds = entries
            .flatten()
            .filter_map(|entry| entry.file_name().to_str()?.parse::<RawFd>().ok());
        Some(fds.collect::<Vec<_>>())
    });
    let fds = listed.unwrap_or_else(|| {
        // No fd listing: try every number up to the limit (bounded, to stay quick).
        let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .unwrap_or(1024)
            .min(1 << 16);
        (3..limit as RawFd).collect()
    });
    for fd in fds
        .into_iter()
        .filter(|&fd| fd > 2 && !keep.contains(&Some(fd)))
    {
        // SAFETY: borrowed for two fcntl calls; a number that is not open (the
        // listing's own fd, closed by now) fails with EBADF and is skipped.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        if let Ok(flags) = fcntl_getfd(borrowed)
            && !flags.contains(FdFlags::CLOEXEC)
        {
            let _ = fcntl_setfd(borrowed, flags | FdFlags::CLOEXEC);
        }
    }
}

#[cfg(windows)]
mod windows {
    use std::io;
    use std::os::windows::process::CommandExt;
    use std::process::{Child, Command};

    use windows_sys::Win32::System::Threading::{
        CREATE_BREAKAWAY_FROM_JOB, CREATE_NEW_PROCESS_GROUP, CREATE_NO_WINDOW,
    };

    /// Starts the refresher apart from the caller: its own hidden console (no window
    /// flashes up, closing the caller's terminal does not end it), its own process
    /// group (the caller's Ctrl+C is not its), and out of the caller's Job Object when
    /// that job allows it (a terminal or editor that kills its job on exit).
    pub fn spawn_detached(command: &mut Command) -> io::Result<Child> {
        let flags = CREATE_NO_WINDOW | CREATE_NEW_PROCESS_GROUP;
        match command
            .creation_flags(flags | CREATE_BREAKAWAY_FROM_JOB)
            .spawn()
        {
            Ok(child) => Ok(child),
            // ERROR_ACCESS_DENIED: the caller's job does not allow breaking away.
            Err(e) if e.raw_os_error() == Some(5) => command.creation_flags(flags).spawn(),
            Err(e) => Err(e),
        }
    }
}
