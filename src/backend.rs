//! Where a NAME's lock, result and failure record live: the local cache dir (flock and
//! files), or etcd (a leased key and values, shared by a fleet) with `--backend`.
//!
//! `flight` and `status` reach them only through a [`Slot`] (one NAME) and a [`Held`]
//! lock. The local arm is the code the cache dir always had, so a local fresh hit pays
//! nothing for the other arm: one `match` on an enum. The cache dir is used with etcd
//! too, for what belongs to this machine: temp files of a run's stdout and run records.

#[cfg(feature = "etcd")]
mod fleet;

use std::ffi::OsString;
use std::fmt;
use std::fs;
use std::io;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::cli::GlobalArgs;
use crate::entry::{self, Body, Entry, EntryWriter, Invalid, Meta};
use crate::exit::{self, Exit};
use crate::key::{KeyValue, Resolved, SlotId};
use crate::lock::{self, LockGuard};
use crate::reap;
use crate::record::{self, Failure, RunRecord};
use crate::run::Abort;
use crate::say::Say;
use crate::store::{Paths, Store};
use crate::values::Name;

#[cfg(feature = "etcd")]
pub use fleet::Fleet;

/// The hidden `--lease-ttl` default: how long the etcd lock outlives a singleflight
/// that can no longer renew it (killed, cut off).
#[cfg(feature = "etcd")]
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);

/// The environment variable that gives the command its fencing token.
pub const FENCING_TOKEN_ENV: &str = "SINGLEFLIGHT_FENCING_TOKEN";

/// `--backend` as given: an etcd URL. A singleflight built without the feature `etcd`
/// refuses every value, so the command line is the same in both builds.
pub fn parse_backend(value: &str) -> Result<crate::etcd::Endpoints, String> {
    #[cfg(not(feature = "etcd"))]
    {
        let _ = value;
        Err(
            "this singleflight was built without the etcd backend: build it with the \
             cargo feature etcd, which is on unless --no-default-features"
                .to_owned(),
        )
    }
    #[cfg(feature = "etcd")]
    crate::etcd::Endpoints::parse(value)
}

/// `--refresher-lease=LEASE:TOKEN` (internal): the etcd lock a `--background` caller
/// hands to its refresher: the lease id in hex (as etcd prints it) and the token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseHandover {
    pub lease: i64,
    pub token: i64,
}

impl LeaseHandover {
    pub fn parse(value: &str) -> Result<LeaseHandover, String> {
        let bad = || format!("invalid lease handover {value:?}: expected LEASE:TOKEN");
        let (lease, token) = value.split_once(':').ok_or_else(bad)?;
        Ok(LeaseHandover {
            // etcd prints lease ids as unsigned hex; the API's int64 may be negative.
            lease: u64::from_str_radix(lease, 16).map_err(|_| bad())? as i64,
            token: token.parse().map_err(|_| bad())?,
        })
    }
}

impl fmt::Display for LeaseHandover {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}:{}", self.lease as u64, self.token)
    }
}

/// Where every NAME's lock and result live, as the command line says.
#[derive(Clone)]
pub enum Backend {
    /// The cache dir.
    Local,
    /// etcd, under a key prefix.
    #[cfg(feature = "etcd")]
    Etcd(Fleet),
}

impl Backend {
    /// The cache dir unless `--backend` (or `SINGLEFLIGHT_BACKEND`) names an etcd.
    /// Nothing is sent to etcd yet.
    pub fn from_args(global: &GlobalArgs) -> Backend {
        match &global.backend {
            None => Backend::Local,
            #[cfg(feature = "etcd")]
            Some(endpoints) => Backend::Etcd(Fleet::new(
                endpoints.clone(),
                global.etcd_prefix.clone().unwrap_or_default(),
                global
                    .backend_timeout
                    .unwrap_or(crate::etcd::DEFAULT_TIMEOUT),
                global.lease_ttl.unwrap_or(DEFAULT_LEASE_TTL),
            )),
            // `parse_backend` refuses every value without the feature.
            #[cfg(not(feature = "etcd"))]
            Some(_) => Backend::Local,
        }
    }

    /// One slot's place in this backend.
    pub fn slot(self, store: Store, id: &SlotId) -> Slot {
        let paths = store.paths(id);
        let place = match self {
            Backend::Local => Place::CacheDir,
            #[cfg(feature = "etcd")]
            Backend::Etcd(fleet) => Place::Etcd(Box::new(fleet.slot(id))),
        };
        Slot {
            store,
            paths,
            place,
            key: None,
        }
    }

    /// Checks what must be checked before `status` or `clear` look: `Ok(false)` when
    /// nothing can be there (no cache dir).
    pub fn verify(&self, store: &Store) -> Result<bool> {
        match self {
            Backend::Local => store.verify_existing(),
            #[cfg(feature = "etcd")]
            Backend::Etcd(_) => Ok(true),
        }
    }

    /// Every slot that has anything in the backend, sorted.
    pub fn slots(&self, store: &Store) -> Result<Vec<SlotId>> {
        match self {
            Backend::Local => store.slots(),
            #[cfg(feature = "etcd")]
            Backend::Etcd(fleet) => fleet.slots(),
        }
    }

    /// The slots of these NAMEs: each one's plain slot (which may have nothing), then
    /// its keyed slots that have anything.
    pub fn slots_of(&self, store: &Store, names: &[Name]) -> Result<Vec<SlotId>> {
        let listed = self.slots(store)?;
        let mut slots = Vec::new();
        for name in names {
            slots.push(SlotId::plain(name));
            slots.extend(
                listed
                    .iter()
                    .filter(|slot| &slot.name == name && slot.key.is_some())
                    .cloned(),
            );
        }
        Ok(slots)
    }

    /// Where NAMEs live, for messages: the cache dir, or the etcd and prefix.
    pub fn describe(&self, store: &Store) -> String {
        match self {
            Backend::Local => store.dir().display().to_string(),
            #[cfg(feature = "etcd")]
            Backend::Etcd(fleet) => fleet.to_string(),
        }
    }
}

/// One NAME: its lock, result and failure record in the backend, and its files in the
/// local cache dir (temp files, run record) whatever the backend.
pub struct Slot {
    store: Store,
    paths: Paths,
    place: Place,
    /// The key values of the run call that uses this slot (not of `status`).
    key: Option<Resolved>,
}

enum Place {
    CacheDir,
    #[cfg(feature = "etcd")]
    Etcd(Box<fleet::FleetSlot>),
}

/// A result as read.
pub enum Read {
    Found(Entry),
    Missing,
    /// There is something, but not a complete result (never served).
    Invalid(Invalid),
    /// The cache dir would not let us read it (a warning: counts as none).
    Unreadable(io::Error),
}

/// The run in flight of a NAME, for `status`.
pub struct InFlight {
    /// The singleflight that runs it.
    pub pid: Option<u32>,
    /// The command's pid, when known (on this machine).
    pub command_pid: Option<u32>,
    pub started_at_ms: Option<u64>,
    /// The machine it runs on (the etcd backend).
    pub host: Option<String>,
}

/// Everything `status` shows of a NAME.
pub struct Snapshot {
    pub result: Read,
    pub in_flight: Option<InFlight>,
    pub failure: Option<Failure>,
    /// The key values of a keyed slot, as its first winner recorded them.
    pub key_values: Option<Vec<KeyValue>>,
}

/// What `clear` removed of a NAME.
pub enum Cleared {
    Nothing,
    Removed(Vec<&'static str>),
}

/// The most stdout a run may produce, and whether the backend (not `--max-output`)
/// set it.
#[derive(Clone, Copy, Debug)]
pub struct OutputCap {
    pub bytes: u64,
    pub by_backend: bool,
}

/// A held NAME lock; released when dropped.
pub enum Held {
    Local(LockGuard),
    #[cfg(feature = "etcd")]
    Etcd(fleet::FleetHeld),
}

impl Slot {
    /// The slot of these key values, for a run call.
    pub fn keyed(mut self, key: Resolved) -> Slot {
        self.key = Some(key);
        self
    }

    /// The identity of a result of this argv in this slot: the argv digest, with the
    /// `--key-file` states folded in.
    pub fn result_digest(&self, argv: &[OsString]) -> String {
        let digest = entry::argv_digest(argv);
        match &self.key {
            Some(key) => key.result_digest(digest),
            None => digest,
        }
    }

    /// The local cache dir.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The NAME's files in the local cache dir.
    pub fn paths(&self) -> &Paths {
        &self.paths
    }

    /// How far in the future a result's timestamp may be and still count as written
    /// now. Zero for the cache dir (one machine, one clock: a result from the future
    /// means the clock was set back, and it is not fresh); with etcd the writer is
    /// another machine, and a reader whose clock is a little behind the writer's must
    /// not take every new result for stale and run the command again.
    pub fn clock_skew(&self) -> Duration {
        match &self.place {
            Place::CacheDir => Duration::ZERO,
            #[cfg(feature = "etcd")]
            Place::Etcd(_) => fleet::CLOCK_SKEW,
        }
    }

    /// Whether anything can be cached: the cache dir exists (and is checked: one
    /// `stat`), or the result is in etcd.
    pub fn exists(&self) -> Result<bool> {
        match &self.place {
            Place::CacheDir => self.store.verify_existing(),
            #[cfg(feature = "etcd")]
            Place::Etcd(_) => Ok(true),
        }
    }

    /// Reads and checks the result. An error is the backend's (etcd unreachable).
    pub fn read_result(&self) -> Result<Read> {
        match &self.place {
            Place::CacheDir => Ok(match entry::read(&self.paths.result) {
                Ok(Ok(Some(entry))) => Read::Found(entry),
                Ok(Ok(None)) => Read::Missing,
                Ok(Err(invalid)) => Read::Invalid(invalid),
                Err(e) => Read::Unreadable(e),
            }),
            #[cfg(feature = "etcd")]
            Place::Etcd(etcd) => etcd.read_result(),
        }
    }

    /// Where the result is, for a warning about it.
    pub fn result_location(&self) -> String {
        match &self.place {
            Place::CacheDir => self.paths.result.display().to_string(),
            #[cfg(feature = "etcd")]
            Place::Etcd(etcd) => etcd.result_location(),
        }
    }

    /// The last failed run, if any (of whatever argv).
    pub fn read_failure(&self) -> Result<Option<Failure>> {
        match &self.place {
            Place::CacheDir => Ok(record::load::<Failure>(&self.paths.failure)),
            #[cfg(feature = "etcd")]
            Place::Etcd(etcd) => etcd.read_failure(),
        }
    }

    /// Takes the NAME's lock if nobody holds it; `None` if somebody does. The winner
    /// of a keyed slot records its key values for `status`.
    pub fn try_lock(&self) -> Result<Option<Held>> {
        let held = match &self.place {
            Place::CacheDir => lock::try_exclusive(&self.paths.lock)
                .with_context(|| format!("cannot lock {}", self.paths.lock.display()))
                .map(|guard| guard.map(Held::Local))
                .map_err(|e| Exit::new(exit::INTERNAL, format!("{e:#}")))?,
            #[cfg(feature = "etcd")]
            Place::Etcd(etcd) => etcd.try_lock()?,
        };
        if let Some(held) = &held {
            self.record_key_values(held);
        }
        Ok(held)
    }

    /// Takes the NAME's lock, waiting for it for at most `limit`; `None` if it stayed
    /// held. The cache dir queues for it (see [`lock::exclusive_within`]); etcd has no
    /// queue, so its waiter takes the lock when it sees it let go.
    pub fn lock_within(&self, limit: Duration) -> Result<Option<Held>> {
        let held = match &self.place {
            Place::CacheDir => lock::exclusive_within(&self.paths.lock, limit)
                .with_context(|| format!("cannot lock {}", self.paths.lock.display()))
                .map(|guard| guard.map(Held::Local))
                .map_err(|e| Exit::new(exit::INTERNAL, format!("{e:#}")))?,
            #[cfg(feature = "etcd")]
            Place::Etcd(etcd) => {
                let deadline = crate::values::later(std::time::Instant::now(), limit);
                loop {
                    if let Some(held) = etcd.try_lock()? {
                        break Some(held);
                    }
                    let left = deadline.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() || !etcd.wait_released(left)? {
                        break None;
                    }
                }
            }
        };
        if let Some(held) = &held {
            self.record_key_values(held);
        }
        Ok(held)
    }

    /// Best effort: without the record `status` shows the slot without its values.
    fn record_key_values(&self, held: &Held) {
        let Some(key) = self.key.as_ref().filter(|key| key.id.key.is_some()) else {
            return;
        };
        let bytes = record::to_bytes(&key.values);
        match (&self.place, held) {
            (Place::CacheDir, _) => {
                // Written once: the values of a slot never change (they make it).
                if !self.paths.key.exists() {
                    let _ =
                        self.store
                            .write_atomically(&key.id.name, &self.paths.key, &bytes, false);
                }
            }
            #[cfg(feature = "etcd")]
            (Place::Etcd(etcd), Held::Etcd(held)) => etcd.save_key_values(held, &bytes),
            #[cfg(feature = "etcd")]
            (Place::Etcd(_), Held::Local(_)) => {}
        }
    }

    /// The lock a `--background` caller handed over as an etcd lease.
    pub fn adopt(&self, handover: LeaseHandover) -> Result<Held> {
        #[cfg(feature = "etcd")]
        if let Place::Etcd(etcd) = &self.place {
            return etcd.adopt(handover);
        }
        let message = format!("--refresher-lease={handover} (internal) needs the etcd backend");
        Err(Exit::new(exit::INTERNAL, message).into())
    }

    /// The lock a `--background` caller handed over as an open file descriptor: it
    /// must be open, be this NAME's lock file, and hold its lock. The fd is closed
    /// when it is not.
    ///
    /// # Safety
    ///
    /// Nothing else in this process may own `fd`: it must be a number this process
    /// was handed open at exec (`--refresher=FD`), not yet claimed. A number that was
    /// not open at exec may since name a file this process opened; such a file is
    /// close-on-exec (std and rustix open every file so) and refused here, but a file
    /// opened otherwise (by C code) would not be.
    #[cfg(unix)]
    pub unsafe fn inherit(&self, fd: std::os::fd::RawFd) -> Result<Held> {
        use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd};
        use std::os::unix::fs::MetadataExt;
        let refuse = |why: &str| -> anyhow::Error {
            let message = format!("--refresher={fd} (internal): {why}");
            Exit::new(exit::INTERNAL, message).into()
        };
        if !matches!(self.place, Place::CacheDir) {
            return Err(refuse(
                "a lock file is handed over only with the cache dir backend",
            ));
        }
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
        let (held, named) = (guard.file().metadata(), fs::metadata(&self.paths.lock));
        let same =
            matches!((&held, &named), (Ok(a), Ok(b)) if a.dev() == b.dev() && a.ino() == b.ino());
        if !same {
            return Err(refuse(&format!("not {}", self.paths.lock.display())));
        }
        // Our open file holds the lock already, so this only confirms it.
        if guard.file().try_lock().is_err() {
            return Err(refuse("the lock is held by another process"));
        }
        Ok(Held::Local(guard))
    }

    /// Waits until the run in flight releases the lock, for at most `limit`; whether
    /// it did.
    pub fn wait_released(&self, limit: Duration) -> Result<bool> {
        match &self.place {
            Place::CacheDir => lock::wait_released(&self.paths.lock, limit)
                .with_context(|| format!("cannot lock {}", self.paths.lock.display())),
            #[cfg(feature = "etcd")]
            Place::Etcd(etcd) => etcd.wait_released(limit),
        }
    }

    /// The cap on a run's stdout: `--max-output`, or less where the backend cannot
    /// store more (etcd: its value limit less the metadata, `meta` with the largest
    /// numbers it can have).
    pub fn output_cap(&self, max_output: u64, meta: &Meta) -> OutputCap {
        let cap = OutputCap {
            bytes: max_output,
            by_backend: false,
        };
        match &self.place {
            Place::CacheDir => {
                let _ = meta;
                cap
            }
            #[cfg(feature = "etcd")]
            Place::Etcd(etcd) => {
                let room = etcd.room_for_body(meta);
                if room < max_output {
                    OutputCap {
                        bytes: room,
                        by_backend: true,
                    }
                } else {
                    cap
                }
            }
        }
    }

    /// Whether results are files in the cache dir (which a run's stdout is streamed
    /// into), rather than values elsewhere (read back from the temp file, or from
    /// memory where the temp file failed).
    pub fn results_in_cache_dir(&self) -> bool {
        matches!(self.place, Place::CacheDir)
    }

    /// The size limit the backend puts on a result, for messages.
    pub fn backend_limit(&self) -> Option<u64> {
        match &self.place {
            Place::CacheDir => None,
            #[cfg(feature = "etcd")]
            Place::Etcd(etcd) => Some(etcd.max_value()),
        }
    }

    /// Stores a run's result, holding the lock. On error the output is handed back
    /// for printing with why it was not stored, and the previous result is untouched.
    pub fn save_result(
        &self,
        held: &Held,
        stdout: EntryWriter,
        meta: &Meta,
    ) -> Result<Body, (String, Body)> {
        match (&self.place, held) {
            (Place::CacheDir, _) => stdout
                .save(meta, &self.paths.result, &self.store)
                .map_err(|(e, body)| (e.to_string(), body)),
            #[cfg(feature = "etcd")]
            (Place::Etcd(etcd), Held::Etcd(held)) => etcd.save_result(held, stdout, meta),
            #[cfg(feature = "etcd")]
            (Place::Etcd(_), Held::Local(_)) => {
                unreachable!("an etcd slot is locked in etcd")
            }
        }
    }

    /// Records a failed run, holding the lock.
    pub fn save_failure(&self, name: &Name, held: &Held, failure: &Failure) -> Result<()> {
        match (&self.place, held) {
            (Place::CacheDir, _) => {
                let bytes = record::to_bytes(failure);
                self.store
                    .write_atomically(name, &self.paths.failure, &bytes, false)
            }
            #[cfg(feature = "etcd")]
            (Place::Etcd(etcd), Held::Etcd(held)) => etcd.save_failure(held, failure),
            #[cfg(feature = "etcd")]
            (Place::Etcd(_), Held::Local(_)) => {
                unreachable!("an etcd slot is locked in etcd")
            }
        }
    }

    /// Removes the failure record after a good run, holding the lock (best effort:
    /// a record left behind only delays the next run by `--retry-after`).
    pub fn forget_failure(&self, held: &Held) {
        match (&self.place, held) {
            (Place::CacheDir, _) => {
                let _ = fs::remove_file(&self.paths.failure);
            }
            #[cfg(feature = "etcd")]
            (Place::Etcd(etcd), Held::Etcd(held)) => etcd.forget_failure(held),
            #[cfg(feature = "etcd")]
            (Place::Etcd(_), Held::Local(_)) => {}
        }
    }

    /// Everything `status` shows of the NAME.
    pub fn snapshot(&self) -> Result<Snapshot> {
        match &self.place {
            Place::CacheDir => Ok(Snapshot {
                result: self.read_result()?,
                in_flight: self.local_run_in_flight(),
                failure: record::load::<Failure>(&self.paths.failure),
                key_values: record::load(&self.paths.key),
            }),
            #[cfg(feature = "etcd")]
            Place::Etcd(etcd) => etcd.snapshot(),
        }
    }

    /// Only a run record of a live process leads to looking at the lock: the look takes
    /// the lock shared for a moment when nobody holds it, and a caller that tried it in
    /// that moment would take it for a run in flight (and serve stale, or wait for
    /// nothing and exit 75). With a live run the lock is held, and the look takes nothing.
    fn local_run_in_flight(&self) -> Option<InFlight> {
        let run = current_run(&self.paths)?;
        lock::is_held(&self.paths.lock)
            .unwrap_or(false)
            .then(|| InFlight {
                pid: Some(run.owner_pid),
                command_pid: (run.pid != 0).then_some(run.pid),
                started_at_ms: Some(run.started_at_ms),
                host: None,
            })
    }

    /// Removes the result and failure record under the lock: a run in flight finishes
    /// first, and its result is removed after it. (Lock files stay: deleting one could
    /// split callers onto two locks.)
    pub fn clear(&self, name: &Name, say: &Say) -> Result<Cleared> {
        match &self.place {
            Place::CacheDir => self.clear_local(name, say),
            #[cfg(feature = "etcd")]
            Place::Etcd(etcd) => etcd.clear(say),
        }
    }

    fn clear_local(&self, name: &Name, say: &Say) -> Result<Cleared> {
        let paths = &self.paths;
        let anything = [&paths.lock, &paths.result, &paths.failure, &paths.key]
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
        let mut removed = Vec::new();
        for (path, what) in [
            (&paths.result, "result"),
            (&paths.failure, "failure record"),
            (&paths.key, "key values"),
        ] {
            match fs::remove_file(path) {
                Ok(()) => removed.push(what),
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
}

impl Slot {
    /// `clear --older-than`: removes the result, failure record and lock file of a
    /// NAME none of whose files was written for `older_than`. A NAME whose lock is
    /// held (a run in flight, a clear) is left alone. The lock file is removed holding
    /// its lock, once the path is seen to still name the locked file; a caller that
    /// opened it before and locks it after sees the file gone and opens the path again
    /// (see `lock::try_exclusive`), so no two callers ever hold two locks of a NAME.
    /// Windows: lock files stay (an open file cannot be removed for good there).
    pub fn clear_older(&self, name: &Name, older_than: Duration, say: &Say) -> Result<Cleared> {
        let paths = &self.paths;
        let old = || {
            let newest = [
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
                std::time::SystemTime::now()
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
        let mut removed = Vec::new();
        #[cfg_attr(windows, allow(unused_mut))]
        let mut files = vec![
            (&paths.result, "result"),
            (&paths.failure, "failure record"),
            (&paths.run, "run record"),
            (&paths.key, "key values"),
        ];
        #[cfg(unix)]
        if lock::still_named(guard.file(), &paths.lock) {
            files.push((&paths.lock, "lock"));
        }
        for (path, what) in files {
            match fs::remove_file(path) {
                Ok(()) => removed.push(what),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot remove {}", path.display()));
                }
            }
        }
        drop(guard);
        Ok(if removed.is_empty() {
            Cleared::Nothing
        } else {
            Cleared::Removed(removed)
        })
    }
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

impl Held {
    /// Environment for the command: the fencing token with etcd, nothing locally.
    pub fn env(&self) -> &[(OsString, OsString)] {
        match self {
            Held::Local(_) => &[],
            #[cfg(feature = "etcd")]
            Held::Etcd(held) => held.env(),
        }
    }

    /// The trip wire of a lock that can be lost while held (an etcd lease).
    pub fn abort(&self) -> Option<&Abort> {
        match self {
            Held::Local(_) => None,
            #[cfg(feature = "etcd")]
            Held::Etcd(held) => Some(held.abort()),
        }
    }

    /// The open lock file a refresher must inherit (the cache dir backend).
    #[cfg(unix)]
    pub fn inheritable_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        match self {
            Held::Local(guard) => Some(guard.file().as_raw_fd()),
            #[cfg(feature = "etcd")]
            Held::Etcd(_) => None,
        }
    }

    /// The argument that tells a refresher which lock it is handed.
    pub fn refresher_arg(&self) -> OsString {
        match self {
            #[cfg(unix)]
            Held::Local(guard) => {
                use std::os::fd::AsRawFd;
                format!("--refresher={}", guard.file().as_raw_fd()).into()
            }
            // Windows: the refresher takes the lock itself once we let it go.
            #[cfg(not(unix))]
            Held::Local(_) => "--refresher=-1".into(),
            #[cfg(feature = "etcd")]
            Held::Etcd(held) => format!("--refresher-lease={}", held.handover()).into(),
        }
    }

    /// Lets go of the lock once the refresher it was handed to has started. Unix,
    /// cache dir: the refresher's copy of the open file holds it. Windows, cache dir: a
    /// LockFileEx lock cannot be handed over; wait until the refresher has taken it (or
    /// has ended), so that a caller that goes on to wait for the run does not find the
    /// lock free before the run has begun. etcd: stop renewing, do not revoke: the
    /// refresher renews the lease now.
    pub fn hand_over(self, refresher: std::process::Child, slot: &Slot) {
        match self {
            Held::Local(guard) => {
                #[cfg(windows)]
                {
                    use std::time::Instant;
                    let mut refresher = refresher;
                    drop(guard);
                    let deadline = Instant::now() + HAND_OVER;
                    while Instant::now() < deadline
                        && !lock::is_held(&slot.paths.lock).unwrap_or(true)
                        && matches!(refresher.try_wait(), Ok(None))
                    {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
                #[cfg(not(windows))]
                {
                    let _ = (refresher, slot);
                    drop(guard);
                }
            }
            #[cfg(feature = "etcd")]
            Held::Etcd(held) => {
                let _ = (refresher, slot);
                held.hand_over();
            }
        }
    }
}

/// How long the lock may take to pass from a `--background` caller to its refresher
/// (Windows, cache dir).
#[cfg(windows)]
pub const HAND_OVER: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_handovers_round_trip() {
        let handover = LeaseHandover {
            lease: 0x694d_8b2a_1c3f_0a11,
            token: 42,
        };
        assert_eq!(handover.to_string(), "694d8b2a1c3f0a11:42");
        assert_eq!(LeaseHandover::parse(&handover.to_string()), Ok(handover));
        let negative = LeaseHandover {
            lease: -2,
            token: 7,
        };
        assert_eq!(negative.to_string(), "fffffffffffffffe:7");
        assert_eq!(LeaseHandover::parse("fffffffffffffffe:7"), Ok(negative));
        for bad in ["", "12", "x:1", "1:y", ":", "1:"] {
            assert!(LeaseHandover::parse(bad).is_err(), "{bad}");
        }
    }
}
