//! Holding the lock: look again, then run the command and settle its outcome (the
//! result saved, the failure recorded), or serve what is there, or back off.

use std::fs;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};

use super::{Call, Flight, Look};
use crate::backend::{Held, OutputCap, Unsaved};
use crate::command::{self, Finished, Io, Outcome, RunSpec};
use crate::decide::{self, Failed, Seen};
use crate::entry::{self, Body, EntryWriter, Meta};
use crate::exit::{Exit, Status};
use crate::reap;
use crate::record::{self, Failure, RunRecord};
use crate::values::{format_duration as human, format_size, millis};

impl Flight {
    /// Holding the lock: cleans up after crashed runs, looks again, and at the last
    /// failure of this argv, whose back-off is judged by this call's options.
    pub(super) fn look_again(&self, call: &mut Call) -> Result<Seen> {
        self.clean_up_after_crashes();
        call.look = self.look(call)?;
        let failed = self.last_failure()?.map(|failure| Failed {
            ago: failure.age(SystemTime::now()),
            backoff: self.backoff(&failure),
        });
        Ok(Seen::Won {
            cached: call.look.cached,
            failed,
        })
    }

    /// How long no run starts after this failure, by this call's options.
    pub(super) fn backoff(&self, failure: &Failure) -> Duration {
        let (after, max) = (self.opts.retry_after, self.opts.retry_max);
        decide::backoff(after, max, failure.consecutive, failure.jitter)
    }

    /// Holding the lock inside the back-off of a failed run: no run. The lock is let
    /// go; the last good result is served (`serve`), or the call gives up.
    pub(super) fn back_off(&self, serve: bool, call: &mut Call) -> Result<i32> {
        drop(call.held.take());
        let look = std::mem::take(&mut call.look);
        let why = self.backing_off()?;
        if serve {
            self.say.decided(format_args!(
                "{}; {why}; serving the last good result",
                self.describe(look.cached)
            ));
            self.serve(look)
        } else {
            Err(Exit::new(
                Status::NothingToServe,
                format!("{}: nothing cached; {why}", self.opts.name),
            )
            .into())
        }
    }

    fn backing_off(&self) -> Result<String> {
        Ok(match self.last_failure()? {
            Some(failure) => {
                let ago = failure.age(SystemTime::now());
                let next = self.backoff(&failure).saturating_sub(ago);
                format!(
                    "the last run failed {} ago ({}); next try in {}, or at once after \
                     `singleflight clear {}`",
                    human(ago),
                    failure.reason,
                    human(next),
                    self.opts.name
                )
            }
            None => "the last run failed".to_owned(),
        })
    }

    pub(super) fn last_failure(&self) -> Result<Option<Failure>> {
        let failure = self.slot.place().read_failure()?;
        Ok(failure.filter(|f| f.argv_digest == self.digest))
    }

    /// A winner kills what a killed run left behind and removes dead runs' temp files. The
    /// run record is this machine's, whatever the backend: a run killed elsewhere is
    /// that machine's to clean up.
    pub(super) fn clean_up_after_crashes(&self) {
        self.clean_up_after_crash_of(&self.slot.paths().run);
    }

    /// As [`Flight::clean_up_after_crashes`], for the run record at `run` (a run slot's
    /// own, with `--slots`).
    pub(super) fn clean_up_after_crash_of(&self, run: &std::path::Path) {
        if let Some(run) = record::load::<RunRecord>(run) {
            self.say.warn(format_args!(
                "the previous run (pid {}) was killed with its singleflight; killing what is left of it",
                run.pid
            ));
            reap::kill_remains(&run);
        }
        let _ = fs::remove_file(run);
        self.slot.store().remove_stale_temps();
    }

    /// Runs the command under the lock, then prints what the caller is served.
    ///
    /// Once the result is renamed into place (or the failure recorded) the run is
    /// over: the lock is let go before printing, so that a slow reader of our stdout
    /// (`| less`, a stalled pipe, a terminal paused with Ctrl-S) holds up no other
    /// caller, refresher or `clear`.
    pub(super) fn execute(&self, call: &mut Call) -> Result<i32> {
        let held = call
            .held
            .take()
            .context("internal error: a run without the lock")?;
        let last = std::mem::take(&mut call.look);
        let ran = self.run_and_store(last, &held, call);
        drop(held);
        let (status, body) = ran?;
        self.print(body)?;
        Ok(status)
    }

    /// Runs the command under the lock and stores its outcome; returns the exit
    /// status and the stdout the caller is to print.
    pub(super) fn run_and_store(
        &self,
        last: Look,
        held: &Held,
        call: &mut Call,
    ) -> Result<(i32, Body)> {
        let writer = EntryWriter::create(self.slot.store(), &self.opts.name);
        if let Some(e) = writer.error()
            && self.slot.place().results_in_cache_dir()
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
        let finished =
            match self.run_under_lock(held, Io::Capture, self.opts.timeout, cap.bytes, writer) {
                Ok(finished) => finished,
                Err(error) => return self.not_run(error, last, held),
            };
        let outcome = finished.outcome;
        let status = outcome.exit_status().code();
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
            held.forget_failure();
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
        if cache_it && call.newer_cached {
            call.unsaved = Some(format!(
                "{what}, but a newer singleflight's result is cached, which this one leaves alone"
            ));
            self.say.decided(format_args!(
                "{}; ran the command: {what}; not cached (a newer version's result is kept)",
                self.describe(last.cached)
            ));
            return Ok((status, finished.stdout.into_body()));
        }
        if cache_it {
            let written_at_ms = entry::now_ms(SystemTime::now());
            let meta = self.meta(status, written_at_ms, finished.duration);
            let body = match held.save_result(finished.stdout, &finished.stderr, &meta) {
                Ok(body) => {
                    self.say.decided(format_args!(
                        "{}; ran the command: {what}; cached",
                        self.describe(last.cached)
                    ));
                    body
                }
                Err(Unsaved { reason, body }) => {
                    let kept = match last.entry {
                        Some(_) => "the previous result is kept",
                        None => "nothing is cached",
                    };
                    let why = format!("{what}, but the result could not be saved ({reason})");
                    self.say.warn(format_args!("{why}; {kept}"));
                    call.unsaved = Some(why);
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

    /// The command was not run: the OS refused a thread or a process for it, or it
    /// could not be executed. One that could not be executed is recorded as a failed
    /// run, so that a storm of callers backs off instead of forking again (one not
    /// found is not: that is a typo to fix, not a storm to wait out). The caller is
    /// served the last good result, as after a failed run, with the reason said.
    fn not_run(&self, error: anyhow::Error, last: Look, held: &Held) -> Result<(i32, Body)> {
        let Some(exit) = error.downcast_ref::<Exit>().filter(|exit| exit.not_run) else {
            return Err(error);
        };
        if exit.status == Status::CannotExecute {
            self.record_failure_to_start(&error, held);
        }
        match last.entry {
            Some(entry) => {
                self.say
                    .error(format_args!("{exit}; serving the last good result"));
                Ok((exit.status.code(), entry.body))
            }
            None => Err(error),
        }
    }

    /// Runs the command holding `held`, with a run record for the run's lifetime (so
    /// that `status` shows it and a later winner can clean up after a crash). A lock
    /// lost mid-run is an error: nothing of the run may be written then.
    pub(super) fn run_under_lock(
        &self,
        held: &Held,
        io: Io,
        timeout: Duration,
        max_output: u64,
        writer: EntryWriter,
    ) -> Result<Finished> {
        let now = SystemTime::now();
        let mut run_record = RunRecord {
            token: format!("{}-{}", std::process::id(), entry::now_ms(now)),
            boot_id: reap::boot_id(),
            owner_pid: std::process::id(),
            owner_start_ticks: reap::start_ticks(std::process::id()),
            started_at_ms: entry::now_ms(now),
            ..RunRecord::default()
        };
        let record_at = held.run_record().unwrap_or(&self.slot.paths().run);
        self.write_run_record(record_at, &run_record);
        let stdin = match io {
            Io::Log(_) => None,
            Io::Capture | Io::Inherit => self.stdin_file()?,
        };
        let mut spec = RunSpec {
            argv: &self.opts.command,
            stdin,
            pass_stderr: !matches!(io, Io::Log(_)),
            io,
            timeout,
            kill_after: self.opts.kill_after,
            max_output,
            token: &run_record.token.clone(),
            env: held.env(),
            abort: held.abort(),
        };
        let finished = command::run(&mut spec, writer, |pid| {
            run_record.pid = pid;
            run_record.start_ticks = reap::start_ticks(pid);
            self.write_run_record(record_at, &run_record);
        });
        let _ = fs::remove_file(record_at);
        let finished = finished?;
        if finished.outcome == Outcome::LeaseLost {
            let why = held.abort().and_then(|abort| abort.reason());
            let message = format!(
                "{}: lost the fleet lock mid-run: {}; the command's process tree was killed \
                 and nothing was stored",
                self.opts.name,
                why.as_deref().unwrap_or("lease lost")
            );
            return Err(Exit::new(finished.outcome.exit_status(), message).into());
        }
        Ok(finished)
    }

    /// What `--stdin` read, in an unlinked temp file in the cache dir, ready to be a
    /// process's stdin (the run's, or a refresher's): `None` without `--stdin`.
    pub(super) fn stdin_file(&self) -> Result<Option<fs::File>> {
        use std::io::{Seek, Write};
        let Some(bytes) = &self.opts.stdin_bytes else {
            return Ok(None);
        };
        let file = (|| {
            let temp = self.slot.store().temp_file(&self.opts.name)?;
            let (mut file, path) = temp.into_parts();
            drop(path);
            file.write_all(bytes)?;
            file.rewind()?;
            Ok::<_, std::io::Error>(file)
        })();
        let file = file.map_err(|e| {
            Exit::new(
                Status::Internal,
                format!(
                    "{}: cannot keep stdin for the command in the cache dir: {e}; the \
                     command was not run",
                    self.opts.name
                ),
            )
        })?;
        Ok(Some(file))
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

    pub(super) fn describe_outcome(
        &self,
        outcome: Outcome,
        took: Duration,
        cap: OutputCap,
    ) -> String {
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
                format_size(self.slot.place().value_limit().unwrap_or(cap.bytes))
            ),
            Outcome::OutputOverflow => format!(
                "stdout went over --max-output {}; the run was killed",
                format_size(self.opts.max_output)
            ),
            Outcome::Interrupted(signal) => match self.stopped_by() {
                Some(stopper) => format!(
                    "stopped by `singleflight stop` (pid {stopper}) after {}",
                    human(took)
                ),
                None => format!("singleflight got signal {signal}; the run was stopped"),
            },
            Outcome::LeaseLost => "the fleet lock was lost; the run was stopped".to_owned(),
        }
    }

    /// The pid of the `singleflight stop` that stopped this process's run, if one did
    /// (see `Paths::stopping`).
    fn stopped_by(&self) -> Option<u32> {
        let mark = fs::read_to_string(self.slot.paths().stopping()).ok()?;
        let (stopped, stopper) = mark.trim().split_once(' ')?;
        (stopped.parse::<u32>().ok()? == std::process::id()).then_some(())?;
        stopper.parse().ok()
    }

    fn write_run_record(&self, at: &std::path::Path, run: &RunRecord) {
        let _ =
            self.slot
                .store()
                .write_atomically(&self.opts.name, at, &record::to_bytes(run), false);
    }

    pub(super) fn write_failure(
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
        if let Err(e) = held.save_failure(&failure) {
            self.say
                .warn(format_args!("cannot record the failure: {e:#}"));
        }
    }

    /// Records why a detached run (a refresher, a supervisor) did not get to run, for
    /// `status` and the back-off; one stopped by a signal did not fail.
    pub(super) fn record_failure_to_start(&self, error: &anyhow::Error, held: &Held) {
        if error
            .downcast_ref::<Exit>()
            .is_some_and(|exit| exit.signal.is_some())
        {
            return;
        }
        let reason = format!("{error:#}");
        self.write_failure(
            held,
            crate::exit::status_of(error).code(),
            &reason,
            Duration::ZERO,
            &[],
        );
    }
}
