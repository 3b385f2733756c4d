//! The run form, `singleflight NAME -- COMMAND`: look, lock, then run, wait or serve,
//! as `decide` says. All the I/O of a call lives here or below.

use std::fs;
use std::io;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};

use crate::cli::RunOptions;
use crate::decide::{self, AfterWait, Cached, OnArrival, OnLost, OnWon, Policy};
use crate::entry::{self, Body, Entry, EntryWriter, Meta};
use crate::exit::{self, Exit};
use crate::lock::{self, LockGuard};
use crate::reap;
use crate::record::{self, Failure, RunRecord};
use crate::run::{self, Outcome, RunSpec};
use crate::say::Say;
use crate::store::{Paths, Store};
use crate::values::{format_duration as human, format_size};

pub struct Flight {
    opts: RunOptions,
    store: Store,
    paths: Paths,
    digest: String,
    say: Say,
}

/// What the cache holds, read and judged at one moment.
struct Look {
    cached: Cached,
    entry: Option<Entry>,
}

impl Flight {
    pub fn new(opts: RunOptions, store: Store, say: Say) -> Flight {
        Flight {
            paths: store.paths(&opts.name),
            digest: entry::argv_digest(&opts.command),
            opts,
            store,
            say,
        }
    }

    /// Runs the whole decision of one call; returns the exit status.
    pub fn fly(self) -> Result<i32> {
        if let Some(fd) = self.opts.refresher {
            return self.refresh(fd);
        }
        let look = if self.store.verify_existing()? {
            self.look()
        } else {
            self.nothing()
        };
        match decide::on_arrival(look.cached, self.opts.background) {
            OnArrival::ServeFresh => {
                self.say
                    .decided(format_args!("{}: served", self.describe(look.cached)));
                self.serve(look)
            }
            OnArrival::TryLock => {
                self.store.ensure()?;
                match self.try_lock()? {
                    Some(guard) => self.won(&guard),
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

    /// Reads the result; one that is corrupt or of another argv counts as none.
    fn look(&self) -> Look {
        match entry::read(&self.paths.result) {
            Ok(Ok(Some(entry))) if entry.meta.argv_digest == self.digest => {
                let age = entry.meta.age(SystemTime::now());
                Look {
                    cached: Cached::classify(Some(age), self.opts.ttl),
                    entry: Some(entry),
                }
            }
            Ok(Ok(_)) => self.nothing(),
            Ok(Err(invalid)) => {
                self.say.warn(format_args!(
                    "ignoring the cached result: it is {} ({}); the next run replaces it",
                    invalid.as_str(),
                    self.paths.result.display()
                ));
                self.nothing()
            }
            Err(e) => {
                self.say
                    .warn(format_args!("cannot read the cached result: {e}"));
                self.nothing()
            }
        }
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

    fn try_lock(&self) -> Result<Option<LockGuard>> {
        lock::try_exclusive(&self.paths.lock)
            .with_context(|| format!("cannot lock {}", self.paths.lock.display()))
            .map_err(|e| Exit::new(exit::INTERNAL, format!("{e:#}")).into())
    }

    /// Holding the lock: look again, then run, serve, or back off after a failure.
    fn won(&self, guard: &LockGuard) -> Result<i32> {
        match self.won_decision() {
            (OnWon::Run, look) => self.execute(look, guard),
            (decision, look) => self.serve_without_run(decision, look),
        }
    }

    fn won_decision(&self) -> (OnWon, Look) {
        self.clean_up_after_crashes();
        let look = self.look();
        let failed_ago = self.last_failure().map(|f| f.age(SystemTime::now()));
        (decide::on_won(look.cached, failed_ago, self.policy()), look)
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
                let why = self.backing_off();
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

    fn backing_off(&self) -> String {
        match self.last_failure() {
            Some(failure) => {
                let ago = failure.age(SystemTime::now());
                let next = self.opts.retry_after.saturating_sub(ago);
                format!(
                    "the last run failed {} ago ({}); next try in {}",
                    human(ago),
                    failure.reason,
                    human(next)
                )
            }
            None => "the last run failed".to_owned(),
        }
    }

    fn last_failure(&self) -> Option<Failure> {
        record::load::<Failure>(&self.paths.failure).filter(|f| f.argv_digest == self.digest)
    }

    /// A winner kills what a killed run left behind and removes old temp files.
    fn clean_up_after_crashes(&self) {
        if let Some(run) = record::load::<RunRecord>(&self.paths.run) {
            self.say.warn(format_args!(
                "the previous run (pid {}) was killed with its singleflight; killing what is left of it",
                run.pid
            ));
            reap::kill_remains(&run);
        }
        let _ = fs::remove_file(&self.paths.run);
        self.store.remove_stale_temps();
    }

    /// Another caller holds the lock: serve stale at once, or wait for its run.
    fn lost(&self) -> Result<i32> {
        let look = self.look();
        match decide::on_lost(look.cached, self.policy()) {
            OnLost::ServeStale => {
                self.say.decided(format_args!(
                    "{}; a run is in flight: serving the stale result",
                    self.describe(look.cached)
                ));
                self.serve(look)
            }
            OnLost::Wait => self.wait_for_run(&self.describe(look.cached)),
        }
    }

    fn wait_for_run(&self, why: &str) -> Result<i32> {
        let released = lock::wait_released(&self.paths.lock, self.opts.wait)
            .with_context(|| format!("cannot lock {}", self.paths.lock.display()))?;
        let name = &self.opts.name;
        if !released {
            let wait = human(self.opts.wait);
            let message =
                format!("{name}: a run is in flight and --wait {wait} ran out; nothing to serve");
            return Err(Exit::new(exit::NOTHING_TO_SERVE, message).into());
        }
        let look = self.look();
        match decide::after_wait(look.cached, self.policy()) {
            AfterWait::Serve => {
                self.say.decided(format_args!(
                    "{why}; waited for the run in flight: served its result"
                ));
                self.serve(look)
            }
            AfterWait::GiveUp => {
                let message = format!(
                    "{name}: the run in flight produced nothing to serve (see `singleflight status {name}`)"
                );
                Err(Exit::new(exit::NOTHING_TO_SERVE, message).into())
            }
        }
    }

    /// `--background`: make sure one detached refresher runs, then serve stale or wait.
    fn background(self, look: Look) -> Result<i32> {
        self.store.ensure()?;
        let refresh = match self.try_lock()? {
            None => "a refresh is already in flight".to_owned(),
            Some(guard) => match self.won_decision() {
                (OnWon::Run, _) => {
                    let pid = self.start_refresher(&guard)?;
                    format!("refresh started in background (pid {pid})")
                }
                (decision, look) => return self.serve_without_run(decision, look),
            },
        };
        match decide::on_lost(look.cached, self.policy()) {
            OnLost::ServeStale => {
                self.say.decided(format_args!(
                    "{}; {refresh}; serving stale",
                    self.describe(look.cached)
                ));
                self.serve(look)
            }
            OnLost::Wait => {
                self.wait_for_run(&format!("{}; {refresh}", self.describe(look.cached)))
            }
        }
    }

    /// Starts `singleflight --refresher=FD <the same arguments>` in its own session,
    /// handing it the held lock: flock belongs to the open file, which it inherits.
    fn start_refresher(&self, guard: &LockGuard) -> Result<u32> {
        use std::process::{Command, Stdio};
        let exe = std::env::current_exe().context("cannot find singleflight's own executable")?;
        let mut command = Command::new(exe);
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        #[cfg(unix)]
        let fd = {
            use std::os::fd::{AsRawFd, BorrowedFd};
            use std::os::unix::process::CommandExt;
            let fd = guard.file().as_raw_fd();
            // SAFETY: only async-signal-safe syscalls between fork and exec; the fd
            // is open in the child, inherited from us.
            unsafe {
                command.pre_exec(move || {
                    rustix::process::setsid()?;
                    let lock = BorrowedFd::borrow_raw(fd);
                    rustix::io::fcntl_setfd(lock, rustix::io::FdFlags::empty())?;
                    Ok(())
                });
            }
            fd
        };
        #[cfg(not(unix))]
        let fd = {
            let _ = guard;
            -1
        };
        command
            .arg(format!("--refresher={fd}"))
            .args(std::env::args_os().skip(1));
        let child = command
            .spawn()
            .context("cannot start the background refresher")?;
        Ok(child.id())
    }

    /// The detached refresher: holds the lock it inherited and runs if still needed.
    fn refresh(&self, fd: i32) -> Result<i32> {
        #[cfg(unix)]
        let guard = LockGuard::inherited(fd);
        #[cfg(not(unix))]
        let Some(guard) = ({
            let _ = fd;
            self.try_lock()?
        }) else {
            return Ok(0);
        };
        match self.won_decision() {
            (OnWon::Run, look) => self.execute(look, &guard),
            _ => Ok(0),
        }
    }

    /// Runs the command under the lock and deals with its outcome.
    fn execute(&self, last: Look, _guard: &LockGuard) -> Result<i32> {
        let now = SystemTime::now();
        let mut run_record = RunRecord {
            token: format!("{}-{}", std::process::id(), entry::now_ms(now)),
            boot_id: reap::boot_id(),
            owner_pid: std::process::id(),
            started_at_ms: entry::now_ms(now),
            ..RunRecord::default()
        };
        self.write_run_record(&run_record);
        let writer = EntryWriter::create(&self.store, &self.opts.name);
        if let Some(e) = writer.error() {
            self.say.warn(format_args!(
                "cannot write to the cache dir ({e}); this run's result will not be saved"
            ));
        }
        let spec = RunSpec {
            argv: &self.opts.command,
            timeout: self.opts.timeout,
            kill_after: self.opts.kill_after,
            max_output: self.opts.max_output,
            pass_stderr: true,
            token: &run_record.token.clone(),
        };
        let finished = run::run(&spec, writer, |pid| {
            run_record.pid = pid;
            run_record.start_ticks = reap::start_ticks(pid);
            self.write_run_record(&run_record);
        });
        let _ = fs::remove_file(&self.paths.run);
        let finished = finished?;
        let outcome = finished.outcome;
        let status = outcome.exit_status();
        let what = self.describe_outcome(outcome, finished.duration);
        if let Outcome::Interrupted(signal) = outcome {
            self.say.decided(format_args!(
                "{}; ran the command: {what}; nothing cached",
                self.describe(last.cached)
            ));
            // The temp file goes first; the kernel frees the lock.
            drop(finished);
            return Ok(run::die_of(signal));
        }
        if outcome.succeeded() {
            let _ = fs::remove_file(&self.paths.failure);
        } else {
            self.write_failure(outcome, &what, finished.duration, &finished.stderr_tail);
        }
        let cache_it =
            outcome.succeeded() || (self.opts.cache_failures && outcome.is_own_failure());
        if cache_it {
            let meta = Meta {
                argv_digest: self.digest.clone(),
                command: entry::display_command(&self.opts.command),
                written_at_ms: entry::now_ms(SystemTime::now()),
                ttl_ms: self.opts.ttl.as_millis() as u64,
                exit_code: status,
                duration_ms: finished.duration.as_millis() as u64,
            };
            let body = match finished.stdout.save(&meta, &self.paths.result, &self.store) {
                Ok(body) => {
                    self.say.decided(format_args!(
                        "{}; ran the command: {what}; cached",
                        self.describe(last.cached)
                    ));
                    body
                }
                Err((e, body)) => {
                    self.say.warn(format_args!(
                        "{what}, but the result could not be saved ({e}); the previous result is kept"
                    ));
                    body
                }
            };
            self.print(body)?;
            return Ok(status);
        }
        match last.entry {
            Some(entry) => {
                self.say
                    .warn(format_args!("{what}; serving the last good result"));
                self.print(entry.body)?;
            }
            None => {
                self.say
                    .warn(format_args!("{what}; nothing cached to serve instead"));
                self.print(finished.stdout.into_body())?;
            }
        }
        Ok(status)
    }

    fn describe_outcome(&self, outcome: Outcome, took: Duration) -> String {
        match outcome {
            Outcome::Exited(code) => format!("exit status {code} after {}", human(took)),
            Outcome::Signaled(signal) => format!("killed by signal {signal} after {}", human(took)),
            Outcome::TimedOut => format!(
                "timed out after {}; its process tree was killed",
                human(self.opts.timeout)
            ),
            Outcome::OutputOverflow => format!(
                "stdout went over --max-output {}; the run was killed",
                format_size(self.opts.max_output)
            ),
            Outcome::Interrupted(signal) => {
                format!("singleflight got signal {signal}; the run was stopped")
            }
        }
    }

    fn write_run_record(&self, run: &RunRecord) {
        let _ = self.store.write_atomically(
            &self.opts.name,
            &self.paths.run,
            &record::to_bytes(run),
            false,
        );
    }

    fn write_failure(&self, outcome: Outcome, reason: &str, took: Duration, stderr_tail: &[u8]) {
        let failure = Failure {
            at_ms: entry::now_ms(SystemTime::now()),
            argv_digest: self.digest.clone(),
            exit_code: outcome.exit_status(),
            reason: reason.to_owned(),
            stderr_tail: String::from_utf8_lossy(stderr_tail).into_owned(),
            duration_ms: took.as_millis() as u64,
        };
        let bytes = record::to_bytes(&failure);
        if let Err(e) =
            self.store
                .write_atomically(&self.opts.name, &self.paths.failure, &bytes, false)
        {
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
