//! `--exclusive`: every caller runs its own command, one at a time per NAME, with the
//! run's timeout, tree kill and crash clean-up; nothing is cached. The lock is the
//! NAME's one lock, so an exclusive run and a plain run of a NAME never overlap.
//! With `--slots N` (N > 1) it is one of N run slots, the first of which is that lock
//! (see `backend::semaphore`).

use anyhow::Result;

use super::Flight;
use crate::backend::OutputCap;
use crate::command::{Io, Outcome};
use crate::entry::EntryWriter;
use crate::exit::{Exit, Status};
use crate::record::ExclusiveRun;
use crate::values::format_duration as human;

impl Flight {
    /// Waits up to `--wait` for the NAME's lock (queued for it: see
    /// `Place::lock_within`), then runs the command with singleflight's own stdin,
    /// stdout and stderr and exits with its status.
    pub(super) fn exclusive(&self) -> Result<i32> {
        self.slot.store().ensure()?;
        if self.opts.slots > 1 {
            return self.exclusive_in_a_slot();
        }
        let held = match self.slot.try_lock()? {
            Some(held) => held,
            None => {
                self.say.decided(format_args!(
                    "a run of {} is in flight: waiting for its turn",
                    self.opts.name
                ));
                self.slot.lock_within(self.opts.wait)?.ok_or_else(|| {
                    let message = format!(
                        "{}: still another run's turn after --wait {}; the command was not run",
                        self.opts.name,
                        human(self.opts.wait)
                    );
                    Exit::skipped(Status::NothingToServe, message)
                })?
            }
        };
        self.clean_up_after_crashes();
        self.run_exclusive(held)
    }

    /// `--slots N`: waits up to `--wait` for one of the NAME's N run slots, then runs.
    fn exclusive_in_a_slot(&self) -> Result<i32> {
        let slots = self.opts.slots;
        let held = self
            .slot
            .place()
            .lock_slot_within(slots, self.opts.wait)?
            .ok_or_else(|| {
                let message = format!(
                    "{}: all {slots} slots still in use after --wait {}; the command was not run",
                    self.opts.name,
                    human(self.opts.wait)
                );
                Exit::skipped(Status::NothingToServe, message)
            })?;
        self.say.decided(format_args!(
            "took slot {} of {} of {}",
            held.slot_index(),
            self.opts.name,
            slots
        ));
        match held.run_record() {
            Some(run) => self.clean_up_after_crash_of(run),
            None => self.clean_up_after_crashes(),
        }
        self.run_exclusive(held)
    }

    /// Records the run that just ended for `status` (best effort: a NAME used only
    /// with `--exclusive` caches nothing else to show).
    fn record_last_run(&self, outcome: Outcome, took: std::time::Duration) {
        let now = std::time::SystemTime::now();
        let last = ExclusiveRun {
            at_ms: crate::entry::now_ms(now),
            exit_code: outcome.exit_status().code(),
            duration_ms: u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
            command: crate::entry::display_command(&self.opts.command),
        };
        let _ = self.slot.store().write_atomically(
            &self.opts.name,
            &self.slot.paths().last(),
            &crate::record::to_bytes(&last),
            false,
        );
    }

    /// Runs the command holding `held` (the NAME's lock, or one of its run slots).
    fn run_exclusive(&self, held: crate::backend::Held) -> Result<i32> {
        let unused = EntryWriter::discard();
        let finished =
            self.run_under_lock(&held, Io::Inherit, self.opts.timeout, u64::MAX, unused)?;
        drop(held);
        let outcome = finished.outcome;
        self.record_last_run(outcome, finished.duration);
        if let Outcome::Interrupted(signal) = outcome {
            return Err(Exit::killed_by(signal).into());
        }
        if !outcome.succeeded() {
            let what = self.describe_outcome(outcome, finished.duration, OutputCap::NONE);
            self.say.warn(format_args!("{what}"));
        } else {
            self.say.decided(format_args!(
                "ran the command in its turn after {}",
                human(finished.duration)
            ));
        }
        Ok(outcome.exit_status().code())
    }
}
