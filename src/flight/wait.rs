//! Another caller holds the lock: wait for its run and look at what it left, find out
//! why it left nothing, or queue for the lock.
//!
//! The lock's holder may be no run at all: `clear` takes the same lock. So a wait
//! that ends with nothing to serve gives up (75) only if the run it waited for
//! recorded a failure; otherwise (a clear, a run stopped by a signal, or one whose
//! result a clear removed at once) the caller goes back to the lock, to run, or to
//! wait again for what is left of `--wait`.

use std::time::Instant;

use anyhow::Result;

use super::{Call, Flight, refresh_note};
use crate::decide::{GiveUp, MAX_RETRIES, Nothing, Seen};
use crate::exit::{Exit, Status};
use crate::values::{format_duration as human, later};

impl Flight {
    /// Waits for the run in flight to let go of the lock, for what is left of
    /// `--wait` (counted from the call's first wait), then looks again.
    pub(super) fn wait(&self, call: &mut Call) -> Result<Seen> {
        if self.say.is_verbose() {
            let what = self.describe(call.look.cached);
            call.why = match (self.opts.background, call.refresher) {
                (true, Some(_)) => format!("{what}; {}", refresh_note(call)),
                (true, None) => format!("{what}; a run is already in flight"),
                (false, _) => what,
            };
        }
        let wait_ends = *call
            .wait_ends
            .get_or_insert_with(|| later(Instant::now(), self.opts.wait));
        let left = wait_ends.saturating_duration_since(Instant::now());
        call.before_wait = call.look.written();
        let released = self.slot.place().wait_released(left)?;
        if released {
            call.look = self.look(call)?;
        }
        Ok(Seen::Waited {
            released,
            cached: call.look.cached,
            fresh_from_run: call.look.written() != call.before_wait,
        })
    }

    /// The run waited for left nothing to serve: a hand-back from our refresher, a
    /// failure recorded since the call began, or neither (worth going back). Not worth
    /// it when a newer version's result is cached (runs of this version save nothing),
    /// nor after this call started a refresher: going back would only start run after
    /// run.
    pub(super) fn ask_why(&self, call: &mut Call) -> Result<Seen> {
        let why = if call.hand_back.is_some() {
            Nothing::HandedBack
        } else if !call.newer_cached
            && call.refresher.is_none()
            && !self.failed_since(self.arrived_ms)?
        {
            let retries = call.retries;
            call.retries += 1;
            if retries < MAX_RETRIES {
                self.say.decided(format_args!(
                    "{}; the lock was let go with nothing to serve and no failure \
                     recorded (a clear, or a run that was stopped): trying again",
                    call.why
                ));
            }
            Nothing::NoFailure { retries }
        } else {
            Nothing::Final
        };
        Ok(Seen::NothingLeft { why })
    }

    /// Whether a run of this argv recorded a failure at or after `since_ms`.
    fn failed_since(&self, since_ms: u64) -> Result<bool> {
        Ok(self
            .last_failure()?
            .is_some_and(|failure| failure.at_ms >= since_ms))
    }

    /// Queues for the lock itself (a blocking lock), for what is left of `--wait`.
    pub(super) fn queue(&self, call: &mut Call) -> Result<Seen> {
        let left = call.wait_ends.map_or(self.opts.wait, |ends| {
            ends.saturating_duration_since(Instant::now())
        });
        let got = match self.slot.lock_within(left)? {
            Some(held) => {
                call.held = Some(held);
                call.look = self.look(call)?;
                true
            }
            None => false,
        };
        Ok(Seen::Queued {
            got,
            cached: call.look.cached,
            fresh_from_run: call.look.written() != call.before_wait,
        })
    }

    /// The error a call gives up with (exit 75; the refresher's error, 125).
    pub(super) fn give_up(&self, why: GiveUp, call: &mut Call) -> anyhow::Error {
        let (name, wait) = (&self.opts.name, human(self.opts.wait));
        let message = match why {
            GiveUp::WaitRanOut => {
                let message = format!(
                    "{name}: a run is in flight and --wait {wait} ran out; nothing to serve"
                );
                // A skipped tick (cron): `-q` silences it, the status stays.
                return Exit::skipped(Status::NothingToServe, message).into();
            }
            GiveUp::NothingProduced => format!(
                "{name}: the run in flight produced nothing to serve (see `singleflight status {name}`)"
            ),
            GiveUp::TooManyRetries => format!(
                "{name}: the lock holders let go {MAX_RETRIES} times with nothing to serve; \
                 giving up"
            ),
            GiveUp::NoRefresher => {
                let why = call.refresher_error.take();
                let why =
                    why.map_or_else(|| "no refresher started".to_owned(), |e| format!("{e:#}"));
                return Exit::new(Status::Internal, why).into();
            }
        };
        Exit::new(Status::NothingToServe, message).into()
    }
}
