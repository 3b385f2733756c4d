//! The cache dir backend: a NAME's lock is an flock on `NAME.lock`, its result and
//! failure record are files beside it, each written to a temp file and renamed over.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};

use super::semaphore;
use super::{Backend, Cleared, Files, Held, InFlight, Lock, Place, Read, Slots, Snapshot, Unsaved};
use crate::entry::{self, Body, EntryWriter, Meta};
use crate::exit::{Exit, Status};
use crate::key::SlotId;
use crate::lock::{self, LockGuard};
use crate::reap;
use crate::record::{self, Failure, RunRecord};
use crate::say::Say;
use crate::store::{Paths, Store};
use crate::values::{Name, Refresher};

/// How long the lock may take to pass from a `--background` caller to its refresher
/// (Windows: a LockFileEx lock cannot be inherited).
#[cfg(windows)]
const HAND_OVER: Duration = Duration::from_secs(5);

/// Every NAME in the cache dir.
pub struct Local;

impl Backend for Local {
    fn place(&self, store: Store, id: &SlotId) -> Box<dyn Place> {
        Box::new(LocalPlace {
            name: id.name.clone(),
            files: Files {
                paths: store.paths(id),
                store,
            },
        })
    }

    fn verify(&self, store: &Store) -> Result<bool> {
        store.verify_existing()
    }

    fn slots(&self, store: &Store) -> Result<Vec<SlotId>> {
        store.slots()
    }

    fn describe(&self, store: &Store) -> String {
        store.dir().display().to_string()
    }

    fn is_cache_dir(&self) -> bool {
        true
    }
}

/// One NAME's files in the cache dir.
struct LocalPlace {
    name: Name,
    files: Files,
}

impl LocalPlace {
    fn paths(&self) -> &Paths {
        &self.files.paths
    }

    fn lock_error(&self, error: io::Error) -> anyhow::Error {
        let message = if error.kind() == io::ErrorKind::PermissionDenied {
            let dir = self.files.store.dir().display();
            format!(
                "cache dir {dir} is not writable by you ({error}): the command was not run; \
                 run chmod u+w on it, or give another with --cache-dir or SINGLEFLIGHT_CACHE_DIR"
            )
        } else {
            format!("cannot lock {}: {error}", self.paths().lock.display())
        };
        Exit::new(Status::Internal, message).into()
    }

    fn hold(&self, guard: LockGuard) -> Held {
        Box::new(LocalLock {
            guard,
            index: 0,
            name: self.name.clone(),
            store: self.files.store.clone(),
            paths: self.files.paths.clone(),
        })
    }

    /// The run slots of a NAME used with `--slots`, for `status`.
    fn slots(&self) -> Option<Slots> {
        let count = semaphore::recorded(self.paths())?;
        let in_use = (0..count)
            .filter_map(|index| {
                let paths = semaphore::slot_paths(self.paths(), index);
                Some((index, in_flight(&paths)?))
            })
            .collect();
        Some(Slots {
            count,
            in_use,
            waiters: semaphore::waiters(self.paths()),
        })
    }

    /// Only a run record of a live process leads to looking at the lock: the look
    /// takes the lock shared for a moment when nobody holds it, and a caller that
    /// tried it in that moment would take it for a run in flight (and serve stale, or
    /// wait for nothing and exit 75). With a live run the lock is held, and the look
    /// takes nothing.
    fn run_in_flight(&self) -> Option<InFlight> {
        in_flight(self.paths())
    }

    /// The lock handed over as an open file descriptor: it must be open, be this
    /// NAME's lock file, and hold its lock. The fd is closed when it is not.
    ///
    /// # Safety
    ///
    /// Nothing else in this process may own `fd`: it must be a number this process
    /// was handed open at exec (`--refresher=FD`), not yet claimed. A number that was
    /// not open at exec may since name a file this process opened; such a file is
    /// close-on-exec (std and rustix open every file so) and refused here, but a file
    /// opened otherwise (by C code) would not be.
    #[cfg(unix)]
    unsafe fn inherit(&self, fd: std::os::fd::RawFd) -> Result<Held> {
        use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd};
        use std::os::unix::fs::MetadataExt;
        let lock = &self.paths().lock;
        let refuse = |why: &str| refuse(&format!("--refresher={fd}"), why);
        if fd < 3 {
            return Err(refuse("not an open file descriptor"));
        }
        // SAFETY: borrowed for one fcntl; a number that is not open fails with EBADF.
        let flags = rustix::io::fcntl_getfd(unsafe { BorrowedFd::borrow_raw(fd) });
        match flags {
            Err(_) => return Err(refuse("not an open file descriptor")),
            // The caller cleared close-on-exec for the hand-over; every file of ours has it.
            Ok(flags) if flags.contains(rustix::io::FdFlags::CLOEXEC) => {
                return Err(refuse("a file of this process, not one handed over"));
            }
            Ok(_) => {}
        }
        // SAFETY: open, and owned by nothing else in this process (our caller's word).
        let guard = LockGuard::inherited(unsafe { OwnedFd::from_raw_fd(fd) });
        let (held, named) = (guard.file().metadata(), fs::metadata(lock));
        let same =
            matches!((&held, &named), (Ok(a), Ok(b)) if a.dev() == b.dev() && a.ino() == b.ino());
        if !same {
            return Err(refuse(&format!("not {}", lock.display())));
        }
        // Our open file holds the lock already, so this only confirms it.
        if guard.file().try_lock().is_err() {
            return Err(refuse("the lock is held by another process"));
        }
        Ok(self.hold(guard))
    }
}

/// A refused hand-over (internal arguments): status 125.
fn refuse(arg: &str, why: &str) -> anyhow::Error {
    Exit::new(Status::Internal, format!("{arg} (internal): {why}")).into()
}

impl Place for LocalPlace {
    fn run_slot(&self, index: u32) -> Option<Box<dyn Place>> {
        Some(Box::new(LocalPlace {
            name: self.name.clone(),
            files: Files {
                paths: semaphore::slot_paths(self.paths(), index),
                store: self.files.store.clone(),
            },
        }))
    }

    fn files(&self) -> &Files {
        &self.files
    }

    /// The cache dir exists (and is checked: one `stat`).
    fn exists(&self) -> Result<bool> {
        self.files.store.verify_existing()
    }

    fn read_result(&self) -> Result<Read> {
        Ok(match entry::read(&self.paths().result) {
            Ok(Ok(Some(entry))) => Read::Found(entry),
            Ok(Ok(None)) => Read::Missing,
            Ok(Err(invalid)) => Read::Invalid(invalid),
            Err(e) => Read::Unreadable(e),
        })
    }

    fn result_location(&self) -> String {
        self.paths().result.display().to_string()
    }

    fn read_failure(&self) -> Result<Option<Failure>> {
        Ok(record::load::<Failure>(&self.paths().failure))
    }

    fn try_lock(&self) -> Result<Option<Held>> {
        let guard = lock::try_exclusive(&self.paths().lock).map_err(|e| self.lock_error(e))?;
        Ok(guard.map(|guard| self.hold(guard)))
    }

    /// Queues for the lock (see [`lock::exclusive_within`]).
    fn lock_within(&self, limit: Duration) -> Result<Option<Held>> {
        let guard =
            lock::exclusive_within(&self.paths().lock, limit).map_err(|e| self.lock_error(e))?;
        Ok(guard.map(|guard| self.hold(guard)))
    }

    /// Queues on the NAME's turnstile, then takes a free slot or blocks on all of
    /// them (see [`semaphore`]).
    fn lock_slot_within(&self, slots: u32, limit: Duration) -> Result<Option<Held>> {
        let got = semaphore::acquire(&self.files.store, &self.name, self.paths(), slots, limit)
            .map_err(|e| self.lock_error(e))?;
        Ok(got.map(|(index, guard)| -> Held {
            Box::new(LocalLock {
                guard,
                index,
                name: self.name.clone(),
                store: self.files.store.clone(),
                paths: semaphore::slot_paths(self.paths(), index),
            })
        }))
    }

    fn wait_released(&self, limit: Duration) -> Result<bool> {
        let lock = &self.paths().lock;
        lock::wait_released(lock, limit).with_context(|| format!("cannot lock {}", lock.display()))
    }

    unsafe fn take_handed(&self, handover: Refresher) -> Result<Option<Held>> {
        match handover {
            Refresher::Lease(lease) => Err(refuse(
                &format!("--refresher-lease={lease}"),
                "needs the etcd backend",
            )),
            #[cfg(unix)]
            // SAFETY: our caller's word, passed on.
            Refresher::Fd(fd) => unsafe { self.inherit(fd) }.map(Some),
            // Windows: the refresher takes the lock itself once its caller lets go.
            #[cfg(not(unix))]
            Refresher::Fd(_) => {
                let lock = &self.paths().lock;
                let guard =
                    lock::try_exclusive_for(lock, HAND_OVER).map_err(|e| self.lock_error(e))?;
                Ok(guard.map(|guard| self.hold(guard)))
            }
        }
    }

    fn results_in_cache_dir(&self) -> bool {
        true
    }

    fn snapshot(&self) -> Result<Snapshot> {
        Ok(Snapshot {
            result: self.read_result()?,
            in_flight: self.run_in_flight(),
            failure: record::load::<Failure>(&self.paths().failure),
            key_values: record::load(&self.paths().key),
            service: record::load(&self.paths().service()),
            slots: self.slots(),
            last_exclusive: record::load(&self.paths().last()),
        })
    }

    /// (Lock files stay: deleting one could split callers onto two locks.)
    fn clear(&self, name: &Name, say: &Say) -> Result<Cleared> {
        let paths = self.paths();
        let last = paths.last();
        let anything = [
            &paths.lock,
            &paths.result,
            &paths.failure,
            &paths.key,
            &last,
        ]
        .iter()
        .any(|path| path.exists());
        if !anything {
            return Ok(Cleared::Nothing);
        }
        let context = || format!("cannot lock {}", paths.lock.display());
        let _guard = match lock::try_exclusive(&paths.lock).with_context(context)? {
            Some(guard) => guard,
            None => {
                say.warn(format_args!(
                    "{name}: a run is in flight; waiting for it to end before clearing"
                ));
                lock::exclusive(&paths.lock).with_context(context)?
            }
        };
        let (service, ready, log) = (paths.service(), paths.ready(), paths.log());
        let last = paths.last();
        remove_all(&[
            (&last, "last run"),
            (&paths.result, "result"),
            (&paths.failure, "failure record"),
            (&paths.key, "key values"),
            (&service, "service record"),
            (&ready, "ready mark"),
            (&log, "log"),
        ])
    }

    /// Removes the result, failure record and lock file of a NAME none of whose files
    /// was written for `older_than`. A NAME whose lock is held (a run in flight, a
    /// clear) is left alone. The lock file is removed holding its lock, once the path
    /// is seen to still name the locked file; a caller that opened it before and locks
    /// it after sees the file gone and opens the path again (see
    /// `lock::try_exclusive`), so no two callers ever hold two locks of a NAME.
    /// Windows: lock files stay (an open file cannot be removed for good there).
    fn clear_older(&self, name: &Name, older_than: Duration, say: &Say) -> Result<Cleared> {
        let paths = self.paths();
        let old = || {
            let last = paths.last();
            let newest = [
                &last,
                &paths.result,
                &paths.failure,
                &paths.run,
                &paths.lock,
                &paths.key,
            ]
            .iter()
            .filter_map(|path| fs::symlink_metadata(path).ok()?.modified().ok())
            .max();
            newest.is_some_and(|newest| {
                SystemTime::now()
                    .duration_since(newest)
                    .is_ok_and(|age| age >= older_than)
            })
        };
        if !old() {
            return Ok(Cleared::Nothing);
        }
        let context = || format!("cannot lock {}", paths.lock.display());
        let Some(guard) = lock::try_exclusive(&paths.lock).with_context(context)? else {
            say.decided(format_args!("{name}: a run is in flight; left alone"));
            return Ok(Cleared::Nothing);
        };
        // A run may have written between the look and the lock.
        if !old() {
            return Ok(Cleared::Nothing);
        }
        // A run killed with its singleflight: what is left of it goes first, as the
        // next winner would see to (its record is about to go).
        if let Some(run) = record::load::<RunRecord>(&paths.run) {
            reap::kill_remains(&run);
        }
        let (service, ready, log) = (paths.service(), paths.ready(), paths.log());
        let last = paths.last();
        #[cfg_attr(windows, allow(unused_mut))]
        let mut files = vec![
            (&last, "last run"),
            (&paths.result, "result"),
            (&paths.failure, "failure record"),
            (&paths.run, "run record"),
            (&paths.key, "key values"),
            (&service, "service record"),
            (&ready, "ready mark"),
            (&log, "log"),
        ];
        #[cfg(unix)]
        if lock::still_named(guard.file(), &paths.lock) {
            files.push((&paths.lock, "lock"));
        }
        let removed = remove_all(&files);
        drop(guard);
        removed
    }
}

/// Removes these files; what was there, by name.
fn remove_all(files: &[(&PathBuf, &'static str)]) -> Result<Cleared> {
    let mut removed = Vec::new();
    for (path, what) in files {
        match fs::remove_file(path) {
            Ok(()) => removed.push(*what),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e).with_context(|| format!("cannot remove {}", path.display()));
            }
        }
    }
    Ok(if removed.is_empty() {
        Cleared::Nothing
    } else {
        Cleared::Removed(removed)
    })
}

/// The run in flight under these paths' lock (see `LocalPlace::run_in_flight`).
fn in_flight(paths: &Paths) -> Option<InFlight> {
    let run = current_run(paths)?;
    lock::is_held(&paths.lock)
        .unwrap_or(false)
        .then(|| InFlight {
            pid: Some(run.owner_pid),
            command_pid: (run.pid != 0).then_some(run.pid),
            started_at_ms: Some(run.started_at_ms),
            host: None,
        })
}

/// The record of the run in flight, if it names a live process of this boot. A record
/// left by a killed run is removed by the next winner, but may still be there in the
/// moment after it took the lock.
fn current_run(paths: &Paths) -> Option<RunRecord> {
    let run = record::load::<RunRecord>(&paths.run)?;
    if run.boot_id != reap::boot_id() {
        return None;
    }
    #[cfg(unix)]
    {
        let pid = rustix::process::Pid::from_raw(i32::try_from(run.owner_pid).ok()?)?;
        match rustix::process::test_kill_process(pid) {
            Ok(()) | Err(rustix::io::Errno::PERM) => {}
            Err(_) => return None,
        }
    }
    Some(run)
}

/// A NAME's flock, held, with what its holder writes.
struct LocalLock {
    guard: LockGuard,
    /// Which run slot of `--slots` (0: the NAME's own lock); `paths` are the slot's.
    index: u32,
    name: Name,
    store: Store,
    paths: Paths,
}

impl Lock for LocalLock {
    fn save_result(
        &self,
        stdout: EntryWriter,
        stderr: &[u8],
        meta: &Meta,
    ) -> Result<Body, Unsaved> {
        stdout
            .save(meta, stderr, &self.paths.result, &self.store)
            .map_err(|(e, body)| Unsaved {
                reason: e.to_string(),
                body,
            })
    }

    fn save_failure(&self, failure: &Failure) -> Result<()> {
        let bytes = record::to_bytes(failure);
        self.store
            .write_atomically(&self.name, &self.paths.failure, &bytes, false)
    }

    fn forget_failure(&self) {
        let _ = fs::remove_file(&self.paths.failure);
    }

    /// Written once: the values of a slot never change (they make it).
    fn save_key_values(&self, bytes: &[u8]) {
        if !self.paths.key.exists() {
            let _ = self
                .store
                .write_atomically(&self.name, &self.paths.key, bytes, false);
        }
    }

    fn run_record(&self) -> Option<&std::path::Path> {
        Some(&self.paths.run)
    }

    fn slot_index(&self) -> u32 {
        self.index
    }

    #[cfg(unix)]
    fn inheritable_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        Some(self.guard.file().as_raw_fd())
    }

    fn refresher_arg(&self) -> OsString {
        #[cfg(unix)]
        {
            use std::os::fd::AsRawFd;
            format!("--refresher={}", self.guard.file().as_raw_fd()).into()
        }
        // Windows: the refresher takes the lock itself once we let it go.
        #[cfg(not(unix))]
        "--refresher=-1".into()
    }

    /// Unix: the refresher's copy of the open file holds the lock. Windows: a
    /// LockFileEx lock cannot be handed over; wait until the refresher has taken it
    /// (or has ended), so that a caller that goes on to wait for the run does not
    /// find the lock free before the run has begun.
    fn hand_over(self: Box<Self>, refresher: std::process::Child) {
        let LocalLock { guard, paths, .. } = *self;
        drop(guard);
        #[cfg(windows)]
        {
            use std::time::Instant;
            let mut refresher = refresher;
            let deadline = Instant::now() + HAND_OVER;
            while Instant::now() < deadline
                && !lock::is_held(&paths.lock).unwrap_or(true)
                && matches!(refresher.try_wait(), Ok(None))
            {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        #[cfg(not(windows))]
        let _ = (refresher, paths);
    }
}
