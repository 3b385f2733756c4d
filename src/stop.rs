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

use crate::backend::{Backend, Place, semaphore};
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
    let verified = backend.verify(store)?;
    let mut idle = Vec::new();
    let slots = if verified {
        backend.slots_of(store, &names)?
    } else {
        Vec::new()
    };
    for name in &names {
        let mut stopped = false;
        for id in slots.iter().filter(|id| &id.name == name) {
            let slot = backend.slot(store.clone(), id);
            // A NAME never run here has no lock file: looking must not make one.
            if backend.is_cache_dir() && !slot.paths().lock.exists() {
                continue;
            }
            if let Some(stop) = stop_place(slot.place(), name, kill_after)? {
                stopped = true;
                say.warn(format_args!("{id}: stopped {stop}"));
            }
            // The other run slots of `--exclusive --slots N`, each its own lock.
            let count = semaphore::recorded(slot.paths()).unwrap_or(1);
            for index in 1..count {
                let Some(place) = slot.place().run_slot(index) else {
                    break;
                };
                if !place.files().paths.lock.exists() {
                    continue;
                }
                if let Some(stop) = stop_place(&*place, name, kill_after)? {
                    stopped = true;
                    say.warn(format_args!("{id} (run slot {index}): stopped {stop}"));
                }
            }
        }
        if !stopped {
            idle.push(name.to_string());
        }
    }
    if idle.is_empty() {
        return Ok(0);
    }
    // As `status typo` does: a NAME with nothing to stop is most likely a typo.
    let message = format!("{}: nothing running", idle.join(", "));
    Err(Exit::new(Status::UnknownName, message).into())
}

/// What a stop did, for its one line.
struct Stopped {
    pid: u32,
    killed_after: Option<Duration>,
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.killed_after {
            // No TERM to another console on Windows: it is terminated at once.
            None if cfg!(windows) => write!(
                f,
                "pid {} (its singleflight), terminated; its Job Object ends the command's tree",
                self.pid
            ),
            None => write!(f, "pid {} (its singleflight) with TERM", self.pid),
            Some(after) => write!(
                f,
                "pid {} (its singleflight) with KILL: TERM had not stopped it after --kill-after {}",
                self.pid,
                human(after)
            ),
        }
    }
}

/// Stops the run that holds one place's lock; what was stopped, `None` if nothing ran.
fn stop_place(place: &dyn Place, name: &Name, kill_after: Duration) -> Result<Option<Stopped>> {
    let (store, paths) = (&place.files().store, &place.files().paths);
    if place.try_lock()?.is_some() {
        return Ok(None);
    }
    // Held: by a run whose record names its singleflight, or by a `clear` or a caller
    // in the moment between the lock and the record (nothing to stop then).
    let Some(run) = record::load::<RunRecord>(&paths.run) else {
        return Ok(None);
    };
    let (pid, start) = (run.owner_pid, run.owner_start_ticks);
    // Best effort: without the mark the run records the bare signal.
    let mark = format!("{pid} {}\n", std::process::id());
    let _ = store.write_atomically(name, &paths.stopping(), mark.as_bytes(), false);
    if run.boot_id != reap::boot_id() || !reap::signal_process(pid, start, Stop::Term) {
        let why = reap::unproven(pid, start);
        let message = format!("cannot stop the run of pid {pid}: {why}; nothing was signalled");
        return Err(Exit::new(Status::Internal, message).into());
    }
    let mut killed_after = None;
    let held = match place.lock_within(kill_after)? {
        Some(held) => held,
        None => {
            killed_after = Some(kill_after);
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
    if let Some(left) = record::load::<RunRecord>(&paths.run)
        && left.token == run.token
    {
        reap::kill_remains(&left);
        let _ = fs::remove_file(&paths.run);
    }
    let _ = fs::remove_file(paths.stopping());
    drop(held);
    Ok(Some(Stopped { pid, killed_after }))
}
