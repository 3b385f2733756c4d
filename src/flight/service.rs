//! `--service`: one long-lived instance of the command per NAME. The caller that finds
//! none (the NAME's lock is free) starts a detached supervisor and hands it the lock,
//! as `--background` hands a refresher its lock; the supervisor runs the instance for
//! as long as it lives, its output appended to `NAME.log`, its tree killed when it
//! ends or when the supervisor dies (the guard; on Linux the death signal too). Every
//! caller then waits for `--ready` to pass. A crashing instance backs off as a failing
//! run does (`--retry-after`, `--retry-max`).

use std::ffi::OsStr;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Result;

use super::Flight;
use crate::backend::{Held, OutputCap};
use crate::command::{Io, Outcome};
use crate::entry::{self, EntryWriter};
use crate::exit::{Exit, Status};
use crate::record::{self, ServiceExit, ServiceRecord};
use crate::values::{Refresher, format_duration as human, later, millis};

/// The first pause between two `--ready` checks; it doubles up to [`CHECK_PAUSE_MAX`].
const CHECK_PAUSE: Duration = Duration::from_millis(20);
const CHECK_PAUSE_MAX: Duration = Duration::from_millis(500);

impl Flight {
    /// A caller: make sure one instance runs, then wait for it to be ready.
    pub(super) fn service(&self, ready: Option<&OsStr>) -> Result<i32> {
        self.slot.store().ensure()?;
        let deadline = later(Instant::now(), self.opts.wait);
        let mut pause = CHECK_PAUSE;
        let mut started = None;
        loop {
            if let Some(held) = self.slot.try_lock()? {
                // Free: no instance runs (or the one we started has ended already).
                if let Some(pid) = started {
                    drop(held);
                    return Err(self.ended_at_once(pid));
                }
                started = Some(self.start_instance(held)?);
                if ready.is_none() {
                    return Ok(0);
                }
            } else if ready.is_none() {
                self.say.decided(format_args!("running"));
                return Ok(0);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if let Some(check) = ready
                && self.is_ready(check, left.min(self.opts.timeout))
            {
                self.say.decided(format_args!("ready"));
                return Ok(0);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let message = format!(
                    "{}: the instance was not ready within --wait {} (its log: {})",
                    self.opts.name,
                    human(self.opts.wait),
                    self.slot.paths().log().display()
                );
                return Err(Exit::new(Status::NothingToServe, message).into());
            }
            thread::sleep(pause.min(left));
            pause = (pause * 2).min(CHECK_PAUSE_MAX);
        }
    }

    /// Holding the free lock: backs off after crashes, else hands the lock to a new
    /// supervisor. Returns the supervisor's pid.
    fn start_instance(&self, held: Held) -> Result<u32> {
        self.clean_up_after_crashes();
        if let Some(failure) = self.last_failure()? {
            let ago = failure.age(SystemTime::now());
            let backoff = self.backoff(&failure);
            if ago < backoff {
                let message = format!(
                    "{}: not started: the last instance failed {} ago ({}; {} in a row); \
                     next start in {}",
                    self.opts.name,
                    human(ago),
                    failure.reason,
                    failure.consecutive.max(1),
                    human(backoff - ago)
                );
                return Err(Exit::new(Status::NothingToServe, message).into());
            }
        }
        let pid = self.start_refresher(held, false)?;
        self.say.decided(format_args!(
            "no instance was running; started one (supervisor pid {pid})"
        ));
        Ok(pid)
    }

    /// The instance we started is gone before it was ready.
    fn ended_at_once(&self, supervisor: u32) -> anyhow::Error {
        let why = self
            .last_failure()
            .ok()
            .flatten()
            .map_or_else(|| "it exited".to_owned(), |failure| failure.reason);
        let message = format!(
            "{}: the instance started (supervisor pid {supervisor}) ended before it was \
             ready: {why} (its log: {})",
            self.opts.name,
            self.slot.paths().log().display()
        );
        Exit::new(Status::NothingToServe, message).into()
    }

    /// Runs `--ready` once (`sh -c CHECK`; `cmd /C` on Windows), for at most `limit`.
    fn is_ready(&self, check: &OsStr, limit: Duration) -> bool {
        let mut command = if cfg!(windows) {
            let mut command = Command::new("cmd");
            command.arg("/C");
            command
        } else {
            let mut command = Command::new("sh");
            command.arg("-c");
            command
        };
        let spawned = command
            .arg(check)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let Ok(mut child) = spawned else {
            return false;
        };
        let ends = later(Instant::now(), limit);
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return status.success(),
                Ok(None) if Instant::now() < ends => thread::sleep(Duration::from_millis(5)),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return false;
                }
            }
        }
    }

    /// The supervisor: holds the lock it was handed for the instance's whole life.
    pub(super) fn supervise(&self, handover: Refresher) -> Result<i32> {
        // SAFETY: as for a refresher (see `refresh`): the FD is from our own command line.
        let Some(held) = (unsafe { self.slot.place().take_handed(handover)? }) else {
            return Ok(0);
        };
        let mut service =
            record::load::<ServiceRecord>(&self.slot.paths().service()).unwrap_or_default();
        service.starts += 1;
        self.write_service(&service);
        let log = Io::Log(self.slot.paths().log());
        let ran = self.run_under_lock(
            &held,
            log,
            Duration::MAX,
            self.opts.max_output,
            EntryWriter::discard(),
        );
        let finished = ran.inspect_err(|e| self.record_failure_to_start(e, &held))?;
        let outcome = finished.outcome;
        let what = self.describe_outcome(outcome, finished.duration, OutputCap::NONE);
        let status = outcome.exit_status().code();
        service.last_exit = Some(ServiceExit {
            at_ms: entry::now_ms(SystemTime::now()),
            exit_code: status,
            reason: what.clone(),
            uptime_ms: millis(finished.duration),
        });
        self.write_service(&service);
        if outcome.succeeded() {
            held.forget_failure();
        } else if !matches!(outcome, Outcome::Interrupted(_)) {
            let tail = &finished.stderr_tail;
            self.write_failure(&held, status, &what, finished.duration, tail);
        }
        drop(held);
        match outcome {
            Outcome::Interrupted(signal) => Err(Exit::killed_by(signal).into()),
            _ => Ok(status),
        }
    }

    fn write_service(&self, service: &ServiceRecord) {
        let _ = self.slot.store().write_atomically(
            &self.opts.name,
            &self.slot.paths().service(),
            &record::to_bytes(service),
            false,
        );
    }
}
