//! `--exclusive --slots N` on the cache dir: N run slots of a NAME, each an flock.
//!
//! Slot 0 is the NAME's own lock (`NAME.lock`), so that a NAME without `--slots` (N = 1)
//! is exactly the one lock it always was; slot i > 0 is `NAME.lock.i`, with its run
//! record `NAME.run.i`. Callers queue on a turnstile, `NAME.lock.turn`, with a blocking
//! flock: the one that holds it (the head of the queue) tries the slots, and if all are
//! in use blocks on every one of them at once (a thread each) and takes the first that
//! is let go, then lets the turnstile go to the next. Nobody polls; a holder killed
//! outright (SIGKILL) lets its flock go with its last open file, which wakes the head.
//!
//! Callers that disagree on N: the N in force is recorded in `NAME.slots` by the caller
//! that finds every slot free (under the turnstile), and every caller uses the recorded
//! N while any slot is held. So the first N holds until all its holders have let go, and
//! never more than that many run at once.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::lock::{self, LockGuard};
use crate::store::{Paths, Store};
use crate::values::{Name, later};

/// Slot `index`'s lock and run record (slot 0: the NAME's own).
pub fn slot_paths(paths: &Paths, index: u32) -> Paths {
    let mut paths = paths.clone();
    if index > 0 {
        paths.lock = numbered(&paths.lock, index);
        paths.run = numbered(&paths.run, index);
    }
    paths
}

fn numbered(path: &Path, index: u32) -> PathBuf {
    let mut numbered = path.as_os_str().to_owned();
    numbered.push(format!(".{index}"));
    PathBuf::from(numbered)
}

/// The turnstile every caller of a NAME with `--slots` queues on.
pub fn turnstile(paths: &Paths) -> PathBuf {
    let mut turn = paths.lock.as_os_str().to_owned();
    turn.push(".turn");
    PathBuf::from(turn)
}

/// The file that records the N in force.
pub fn count_file(paths: &Paths) -> PathBuf {
    paths.result.with_extension("slots")
}

/// The N in force, as recorded.
pub fn recorded(paths: &Paths) -> Option<u32> {
    let text = fs::read_to_string(count_file(paths)).ok()?;
    text.trim().parse().ok().filter(|n| *n > 0)
}

/// Takes a free slot of the `slots` (the N recorded while any is held), waiting for
/// one for at most `limit`: the slot's number and its lock; `None` if none was let go.
pub fn acquire(
    store: &Store,
    name: &Name,
    paths: &Paths,
    slots: u32,
    limit: Duration,
) -> io::Result<Option<(u32, LockGuard)>> {
    let deadline = later(Instant::now(), limit);
    let Some(turn) = lock::exclusive_within(&turnstile(paths), limit)? else {
        return Ok(None);
    };
    let recorded = recorded(paths);
    let span = recorded.unwrap_or(0).max(slots);
    let mut free = Vec::new();
    for index in 0..span {
        if let Some(guard) = lock::try_exclusive(&slot_paths(paths, index).lock)? {
            free.push((index, guard));
        }
    }
    let all_free = free.len() == usize::try_from(span).unwrap_or(usize::MAX);
    let count = match recorded {
        Some(recorded) if !all_free => recorded,
        _ => {
            if recorded != Some(slots) {
                let bytes = format!("{slots}\n");
                store
                    .write_atomically(name, &count_file(paths), bytes.as_bytes(), false)
                    .map_err(|e| io::Error::other(format!("{e:#}")))?;
            }
            slots
        }
    };
    // The lowest free slot in force; the others found free are let go again.
    if let Some(got) = free.into_iter().find(|(index, _)| *index < count) {
        drop(turn);
        return Ok(Some(got));
    }
    let left = deadline.saturating_duration_since(Instant::now());
    let got = first_free(paths, count, left)?;
    drop(turn);
    Ok(got)
}

/// Blocks on every slot at once and takes the first let go, for at most `limit`.
/// A slot a thread takes after that is let go at once: its send fails, its guard drops.
fn first_free(paths: &Paths, count: u32, limit: Duration) -> io::Result<Option<(u32, LockGuard)>> {
    let (sender, receiver) = mpsc::channel();
    for index in 0..count {
        let path = slot_paths(paths, index).lock;
        let sender = sender.clone();
        let started = crate::threads::start("slot", move || {
            let _ = sender.send(lock::exclusive(&path).map(|guard| (index, guard)));
        });
        if started.is_err() {
            // No thread to block on (the machine is out of them): try every few ms.
            return poll(paths, count, limit);
        }
    }
    drop(sender);
    match receiver.recv_timeout(limit) {
        Ok(got) => got.map(Some),
        Err(_) => Ok(None),
    }
}

fn poll(paths: &Paths, count: u32, limit: Duration) -> io::Result<Option<(u32, LockGuard)>> {
    let deadline = later(Instant::now(), limit);
    loop {
        for index in 0..count {
            if let Some(guard) = lock::try_exclusive(&slot_paths(paths, index).lock)? {
                return Ok(Some((index, guard)));
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(10).min(left));
    }
}

/// How many callers wait for a slot: those queued on the turnstile, and the one that
/// holds it (Linux: blocked flocks are listed in /proc/locks). `None` elsewhere.
pub fn waiters(paths: &Paths) -> Option<u32> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::MetadataExt;
        let meta = fs::metadata(turnstile(paths)).ok()?;
        let locks = fs::read_to_string("/proc/locks").ok()?;
        let (major, minor) = (libc::major(meta.dev()), libc::minor(meta.dev()));
        let id = format!("{major:02x}:{minor:02x}:{}", meta.ino());
        let (mut queued, mut held) = (0, false);
        for line in locks.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let blocked = fields.get(1) == Some(&"->");
            let at = if blocked { 6 } else { 5 };
            if fields.get(at) == Some(&id.as_str()) {
                match blocked {
                    true => queued += 1,
                    false => held = true,
                }
            }
        }
        Some(queued + u32::from(held))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = paths;
        None
    }
}
