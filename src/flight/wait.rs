//! Another caller holds the lock: serve stale at once, or wait for its run and serve
//! what it leaves.

use std::time::Instant;

use anyhow::Result;

use super::{Flight, Look};
use crate::decide::{self, AfterWait, OnLost};
use crate::exit::{Exit, Status};
use crate::values::{format_duration as human, later};

/// At most this many trips back to the lock after waits that ended with nothing to
/// serve and no failure: a bound on a loop that the `--wait` deadline bounds too.
const MAX_RETRIES: u32 = 100;

impl Flight {
    /// Another caller holds the lock: serve stale at once, or wait for its run.
    pub(super) fn lost(&self) -> Result<i32> {
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
    pub(super) fn wait_for_run(&self, before: &Look, why: &str) -> Result<i32> {
        let wait_ends = match self.wait_ends.get() {
            Some(ends) => ends,
            None => {
                let ends = later(Instant::now(), self.opts.wait);
                self.wait_ends.set(Some(ends));
                ends
            }
        };
        let left = wait_ends.saturating_duration_since(Instant::now());
        let released = self.slot.place().wait_released(left)?;
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
                Err(Exit::new(Status::NothingToServe, message).into())
            }
            AfterWait::GiveUp => {
                let message = format!(
                    "{name}: the run in flight produced nothing to serve (see `singleflight status {name}`)"
                );
                Err(Exit::new(Status::NothingToServe, message).into())
            }
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
        Exit::skipped(Status::NothingToServe, message).into()
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
}
