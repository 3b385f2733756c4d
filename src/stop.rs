//! `singleflight stop NAME...`: ends the run in flight of each NAME (a `--service`
//! instance, or a long run): TERM to the singleflight that runs it, which stops the
//! command's tree as on a timeout (TERM, its `--kill-after`, KILL) and lets go of the
//! lock. One that has not let go after `--kill-after` is killed (its guard then kills
//! the tree), and what is left is cleaned up holding the lock. A process is signalled
//! only while it provably is the run's singleflight: pid and start time. On Windows
//! (start time: the creation time) there is no TERM to another console: the
//! singleflight is terminated at once, and its Job Object kills the command's tree.

use std::fs;
use std::time::Duration;

use anyhow::Result;

use crate::backend::{Backend, Slot};
use crate::exit::{Exit, Status};
use crate::reap::{self, Stop};
use crate::record::{self, RunRecord};
use crate::say::Say;
use crate::store::Store;
use crate::values::{Name, format_duration as human};

/// How long to wait for the lock once the run's singleflight was killed outright.
const AFTER_KILL: Duration = Duration::from_secs(10);

pub fn stop(
    backend: &dyn Backend,
    store: &Store,
    names: Vec<Name>,
    kill_after: Duration,
    say: &Say,
) -> Result<i32> {
    if !backend.verify(store)? {
        return Ok(0);
    }
    for id in backend.slots_of(store, &names)? {
        let slot = backend.slot(store.clone(), &id);
        match stop_slot(&slot, kill_after)? {
            Some(pid) => say.decided(format_args!("{id}: stopped (singleflight pid {pid})")),
            None => say.decided(format_args!("{id}: nothing running")),
        }
    }
    Ok(0)
}

/// Stops the run of one slot; the pid of the singleflight that ran it, `None` if none
/// ran.
fn stop_slot(slot: &Slot, kill_after: Duration) -> Result<Option<u32>> {
    let place = slot.place();
    if place.try_lock()?.is_some() {
        return Ok(None);
    }
    // Held: by a run whose record names its singleflight, or by a `clear` or a caller
    // in the moment between the lock and the record (nothing to stop then).
    let Some(run) = record::load::<RunRecord>(&slot.paths().run) else {
        return Ok(None);
    };
    let (pid, start) = (run.owner_pid, run.owner_start_ticks);
    if run.boot_id != reap::boot_id() || !reap::signal_process(pid, start, Stop::Term) {
        let why = reap::unproven(pid, start);
        let message = format!("cannot stop the run of pid {pid}: {why}; nothing was signalled");
        return Err(Exit::new(Status::Internal, message).into());
    }
    let held = match place.lock_within(kill_after)? {
        Some(held) => held,
        None => {
            reap::signal_process(pid, start, Stop::Kill);
            place.lock_within(AFTER_KILL)?.ok_or_else(|| {
                let message = format!(
                    "pid {pid} was killed after --kill-after {} but the lock is still held",
                    human(kill_after)
                );
                Exit::new(Status::Internal, message)
            })?
        }
    };
    // A singleflight killed outright left its tree to its guard; what the guard
    // missed goes now, as the next winner would see to.
    if let Some(left) = record::load::<RunRecord>(&slot.paths().run)
        && left.token == run.token
    {
        reap::kill_remains(&left);
        let _ = fs::remove_file(&slot.paths().run);
    }
    drop(held);
    Ok(Some(pid))
}
