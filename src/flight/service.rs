//! `--service`: one long-lived instance of the command per NAME. The caller that finds
//! none (the NAME's lock is free) starts a detached supervisor and hands it the lock,
//! as `--background` hands a refresher its lock; the supervisor runs the instance for
//! as long as it lives, its output appended to `NAME.log`, its tree killed when it
//! ends or when the supervisor dies (the guard; on Linux the death signal too). Every
//! caller then waits for `--ready` to pass, and marks the instance as up when it does.
//! The caller that finds none looks first: `--ready` passing already starts nothing.
//! An instance that was up and ended is started again at once; a crash loop (one that
//! ended before it was up, or `--start-limit` starts within `--start-window`) backs
//! off as a failing run does (`--retry-after`, `--retry-max`).

use std::ffi::OsStr;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Result;

use super::Flight;
use crate::backend::{Held, OutputCap};
use crate::command::{Io, Outcome};
use crate::decide::{self, CrashLoop, OnServiceStart, ServiceHistory};
use crate::entry::{self, EntryWriter};
use crate::exit::{Exit, Status};
use crate::record::{self, DecisionKind, ServiceDecision, ServiceExit, ServiceRecord};
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
                // Look before starting: one that answers already (started by hand, or
                // by an older singleflight) would only fight the new one for its port.
                let left = deadline.saturating_duration_since(Instant::now());
                if let Some(check) = ready
                    && self.is_ready(check, left.min(self.opts.timeout))
                {
                    let reason = "--ready passed already; nothing was started";
                    self.decide(DecisionKind::ReadyUnsupervised, reason, None);
                    drop(held);
                    self.say
                        .decided(format_args!("ready, but not supervised: {reason}"));
                    return Ok(0);
                }
                started = Some(self.start_instance(held, ready.is_some())?);
                if ready.is_none() {
                    return Ok(0);
                }
            } else {
                if started.is_none() {
                    self.refuse_another_command()?;
                }
                if ready.is_none() {
                    self.say.decided(format_args!("running"));
                    return Ok(0);
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if let Some(check) = ready
                && self.is_ready(check, left.min(self.opts.timeout))
            {
                self.mark_ready();
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

    /// Holding the free lock, with `--ready` not passing: starts an instance at once
    /// after one that was up, backs off in a crash loop (see
    /// [`decide::on_service_start`]), else hands the lock to a new supervisor. Returns
    /// the supervisor's pid.
    fn start_instance(&self, held: Held, has_ready: bool) -> Result<u32> {
        self.clean_up_after_crashes();
        let service = self.service_record();
        let failure = self.last_failure()?;
        let now = SystemTime::now();
        let now_ms = entry::now_ms(now);
        let window = millis(self.opts.start_window);
        let starts_in_window = service
            .started_at_ms
            .iter()
            .filter(|&&at| now_ms.saturating_sub(at) < window)
            .count();
        let too_many = starts_in_window >= self.opts.start_limit as usize;
        let (since, backoff) = match &failure {
            Some(failure) => (Some(failure.age(now)), self.backoff(failure)),
            // No failure to count from (the last one exited 0, or its supervisor was
            // killed): a start limit counts from the last start.
            None => {
                let last_start = service.started_at_ms.last().filter(|_| too_many);
                let since = last_start.map(|&at| Duration::from_millis(now_ms.saturating_sub(at)));
                let (after, max) = (self.opts.retry_after, self.opts.retry_max);
                (since, decide::backoff(after, max, 1, 0.0))
            }
        };
        let history = ServiceHistory {
            started_before: service.starts > 0,
            was_up: self.was_up(&service, has_ready),
            starts_in_window,
            since,
            backoff,
        };
        let last_end = match (&failure, &service.last_exit) {
            (Some(failure), _) => failure.reason.clone(),
            (None, Some(last)) if last.instance == service.starts => last.reason.clone(),
            _ => "its supervisor was killed".to_owned(),
        };
        let loop_words = |why| match why {
            CrashLoop::NotUp => format!("the last instance ended before it was ready ({last_end})"),
            CrashLoop::TooManyStarts => format!(
                "{starts_in_window} instances started within --start-window {} \
                 (--start-limit {}); the last: {last_end}",
                human(self.opts.start_window),
                self.opts.start_limit
            ),
        };
        let (kind, reason) = match decide::on_service_start(history, self.opts.start_limit) {
            OnServiceStart::Start => (DecisionKind::Started, "the first instance".to_owned()),
            OnServiceStart::Restart => {
                // It was up: the crash that ended it starts no count of crashes in a row.
                held.forget_failure();
                let reason = format!("{last_end}, once it was up");
                (DecisionKind::Restarted, reason)
            }
            OnServiceStart::Retry(why) => {
                let reason = format!("{}; its back-off has passed", loop_words(why));
                (DecisionKind::Started, reason)
            }
            OnServiceStart::BackOff { left, why } => {
                let reason = format!("a crash loop: {}", loop_words(why));
                let next = now_ms.saturating_add(millis(left));
                self.decide(DecisionKind::BackingOff, &reason, Some(next));
                let message = format!(
                    "{}: not started: {reason}; {}next start in {}",
                    self.opts.name,
                    failure.map_or(String::new(), |f| format!(
                        "{} in a row; ",
                        f.consecutive.max(1)
                    )),
                    human(left)
                );
                return Err(Exit::new(Status::NothingToServe, message).into());
            }
        };
        self.decide(kind, &reason, None);
        let (pid, _) = self.start_refresher(held, false)?;
        self.say.decided(format_args!(
            "no instance was running ({reason}); started one (supervisor pid {pid})"
        ));
        Ok(pid)
    }

    /// Whether the last instance started was up: passed `--ready` (a caller saw it and
    /// left its mark), or without `--ready` lived [`decide::UP_AFTER`].
    fn was_up(&self, service: &ServiceRecord, has_ready: bool) -> bool {
        if has_ready {
            return self.ready_mark() == Some(service.starts);
        }
        service.last_exit.as_ref().is_some_and(|last| {
            (last.instance == service.starts || last.instance == 0)
                && Duration::from_millis(last.uptime_ms) >= decide::UP_AFTER
        })
    }

    /// The number of the instance a caller last saw pass `--ready`.
    fn ready_mark(&self) -> Option<u64> {
        let text = std::fs::read_to_string(self.slot.paths().ready()).ok()?;
        text.trim().parse().ok()
    }

    /// `--ready` passed while an instance is supervised: marks it as up, so that its end
    /// is restarted at once. Written without the lock (its supervisor holds it), in a
    /// file of its own, so that it never races the supervisor's writes of the record.
    /// The instance's number is read after the check passed, and the supervisor writes
    /// it before the instance starts.
    fn mark_ready(&self) {
        let instance = self.service_record().starts;
        if instance == 0 || self.ready_mark() == Some(instance) {
            return;
        }
        let path = self.slot.paths().ready();
        let bytes = format!("{instance}\n");
        let written =
            self.slot
                .store()
                .write_atomically(&self.opts.name, &path, bytes.as_bytes(), false);
        if let Err(e) = written {
            self.say.warn(format_args!(
                "cannot mark the instance as ready (its crash would be backed off): {e:#}"
            ));
        }
    }

    fn service_record(&self) -> ServiceRecord {
        record::load::<ServiceRecord>(&self.slot.paths().service()).unwrap_or_default()
    }

    /// An instance runs: one of another command is not this caller's to serve, nor to
    /// replace behind the back of whoever started it (exit 2, the way out named).
    fn refuse_another_command(&self) -> Result<()> {
        let service = self.service_record();
        if service.argv_digest.is_empty() || service.argv_digest == self.digest {
            return Ok(());
        }
        let name = &self.opts.name;
        let message = format!(
            "{name} runs another command ({}); this one was not started: \
             `singleflight stop {name}` first to replace it",
            service.command
        );
        Err(Exit::new(Status::Usage, message).into())
    }

    /// Records a decision of the caller holding the lock (no supervisor writes then).
    fn decide(&self, kind: DecisionKind, reason: &str, next_start_at_ms: Option<u64>) {
        let mut service = self.service_record();
        if kind != DecisionKind::ReadyUnsupervised {
            service.command = entry::display_command(&self.opts.command);
            service.argv_digest = self.digest.clone();
        }
        service.decision = Some(ServiceDecision {
            at_ms: entry::now_ms(SystemTime::now()),
            kind,
            reason: reason.to_owned(),
            next_start_at_ms,
        });
        self.write_service(&service);
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
        let mut service = self.service_record();
        service.starts += 1;
        let kept = self.opts.start_limit.max(1) as usize;
        service.started_at_ms.push(entry::now_ms(SystemTime::now()));
        let over = service.started_at_ms.len().saturating_sub(kept);
        service.started_at_ms.drain(..over);
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
            instance: service.starts,
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
