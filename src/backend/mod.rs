//! Where a NAME's lock, result and failure record live: the local cache dir (flock and
//! files, `local.rs`), or etcd (a leased key and values shared by a fleet, `fleet/`)
//! or PostgreSQL (lease rows, `pg.rs`) with `--backend`; both of these keep a local
//! copy of a fresh result (`mirror.rs`).
//!
//! A backend is three traits: [`Backend`] (every NAME: list them, open one), [`Place`]
//! (one NAME: read it, lock it, clear it) and [`Lock`] (one NAME's lock, held: save
//! what a run leaves). `flight` and `status` see only these and a [`Slot`], the place
//! with the NAME's files in the local cache dir (temp files of a run's stdout and run
//! records, which stay on this machine whatever the backend). Adding a backend is
//! one file that implements the three, and one line in [`open`].

#[cfg(feature = "etcd")]
mod fleet;
mod local;
#[cfg(any(feature = "etcd", feature = "postgres"))]
mod mirror;
#[cfg(any(feature = "etcd", feature = "postgres"))]
mod owner;
#[cfg(feature = "postgres")]
mod pg;
pub(crate) mod semaphore;

use std::ffi::OsString;
use std::io;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::abort::Abort;
use crate::entry::{self, Body, Entry, EntryWriter, Invalid, Meta};
use crate::etcd::{Endpoints, Prefix};
use crate::key::{KeyValue, Resolved, SlotId};
use crate::postgres::{PgSchema, PgUrl};
use crate::record::{self, ExclusiveRun, Failure, ServiceRecord};
use crate::say::Say;
use crate::store::{Paths, Store};
use crate::values::{Name, Refresher, later};

/// The environment variable that gives the command its fencing token.
pub const FENCING_TOKEN_ENV: &str = "SINGLEFLIGHT_FENCING_TOKEN";

/// The backend options as the command line gave them; `None` is the default.
#[derive(Debug, Default)]
pub struct Config {
    /// `--backend`: the etcd or PostgreSQL to use instead of the cache dir.
    pub backend: Option<BackendUrl>,
    /// `--pg-schema`.
    pub pg_schema: Option<PgSchema>,
    /// `--etcd-prefix`.
    pub prefix: Option<Prefix>,
    /// `--backend-timeout`.
    pub timeout: Option<Duration>,
    /// `--lease-ttl`.
    pub lease_ttl: Option<Duration>,
    /// `--etcd-cacert`, `--etcd-cert`, `--etcd-key`: TLS files.
    pub cacert: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// `--etcd-user` and `--etcd-password-file`.
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
}

/// The backend the options name: the cache dir unless `--backend` names an etcd
/// (whose login token is kept in the cache dir `store` between calls). Nothing is
/// sent to etcd yet, nothing touches the cache dir; the etcd options' files (TLS,
/// password) are read now, and only with `--backend`. (A build without the etcd
/// backend refuses `--backend` when it parses it.)
pub fn open(mut config: Config, store: &Store) -> Result<Box<dyn Backend>> {
    match config.backend.take() {
        None => Ok(Box::new(local::Local)),
        #[cfg(feature = "etcd")]
        Some(BackendUrl::Etcd(endpoints)) => {
            Ok(Box::new(fleet::Fleet::open(endpoints, config, store)?))
        }
        #[cfg(feature = "postgres")]
        Some(BackendUrl::Postgres(url)) => Ok(Box::new(pg::Pg::open(url, config)?)),
        #[allow(
            unreachable_patterns,
            reason = "a build without a backend refuses its URL"
        )]
        Some(other) => {
            let _ = store;
            let message = format!("this singleflight was built without the backend of {other:?}");
            Err(crate::exit::Exit::new(crate::exit::Status::Usage, message).into())
        }
    }
}

/// `--backend` as given: an etcd or a PostgreSQL.
#[derive(Clone, Debug)]
pub enum BackendUrl {
    Etcd(Endpoints),
    Postgres(PgUrl),
}

/// Parses `--backend`: `postgres://` or `postgresql://` is a PostgreSQL, anything else
/// an etcd. A build without that backend refuses it, so the command line is the same
/// in every build.
pub fn parse_backend(value: &str) -> Result<BackendUrl, String> {
    if crate::postgres::is_postgres(value) {
        if cfg!(feature = "postgres") {
            PgUrl::parse(value).map(BackendUrl::Postgres)
        } else {
            Err(
                "this singleflight was built without the PostgreSQL backend: build it with \
                 the cargo feature postgres, which is on unless --no-default-features"
                    .to_owned(),
            )
        }
    } else {
        crate::etcd::parse_backend(value).map(BackendUrl::Etcd)
    }
}

/// The local copy of slot `id`'s result in the etcd or PostgreSQL of `backend` (with
/// its `--etcd-prefix` or `--pg-schema`, `None`: the default), if there is one that
/// checks and is fresh by the result's own TTL (see `mirror.rs`): what a call before
/// clap serves without opening the backend (`hit`). The same copy, by the same path
/// and source, as the backend's place keeps and reads. Nothing is sent, no TLS or
/// password file is read.
#[cfg(any(feature = "etcd", feature = "postgres"))]
pub fn read_copy(
    store: &Store,
    backend: &BackendUrl,
    prefix: Option<&Prefix>,
    schema: Option<&PgSchema>,
    id: &SlotId,
) -> Option<Entry> {
    let _ = (store, prefix, schema, id);
    match backend {
        #[cfg(feature = "etcd")]
        BackendUrl::Etcd(endpoints) => {
            fleet::read_copy(store, endpoints, &prefix.cloned().unwrap_or_default(), id)
        }
        #[cfg(feature = "postgres")]
        BackendUrl::Postgres(url) => {
            pg::read_copy(store, url, &schema.cloned().unwrap_or_default(), id)
        }
        #[allow(
            unreachable_patterns,
            reason = "a build without a backend refuses its URL"
        )]
        _ => None,
    }
}

/// Where every NAME's lock and result live.
pub trait Backend {
    /// One slot's place in this backend, with its files in `store`.
    fn place(&self, store: Store, id: &SlotId) -> Box<dyn Place>;

    /// Checks what must be checked before `status` or `clear` look: `Ok(false)` when
    /// nothing can be there (no cache dir).
    fn verify(&self, store: &Store) -> Result<bool>;

    /// Every slot that has anything in the backend, sorted.
    fn slots(&self, store: &Store) -> Result<Vec<SlotId>>;

    /// Where NAMEs live, for messages: the cache dir, or the etcd and prefix.
    fn describe(&self, store: &Store) -> String;

    /// Whether results are files in the cache dir, which `clear --older-than` ages.
    fn is_cache_dir(&self) -> bool;
}

impl dyn Backend + '_ {
    /// One slot: its place, and its files in the local cache dir.
    pub fn slot(&self, store: Store, id: &SlotId) -> Slot {
        Slot {
            place: self.place(store, id),
            key: None,
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
}

/// A slot's own files in the local cache dir, whatever the backend.
pub struct Files {
    pub store: Store,
    pub paths: Paths,
}

/// One NAME (one slot of it) in a backend.
pub trait Place {
    /// Its files in the local cache dir.
    fn files(&self) -> &Files;

    /// Run slot `index` (1 to N-1) of an `--exclusive --slots N` NAME, as a place of
    /// its own (its lock and run record), for `stop`; `None` where the backend has no
    /// such place.
    fn run_slot(&self, index: u32) -> Option<Box<dyn Place>> {
        let _ = index;
        None
    }

    /// How far in the future a result's timestamp may be and still count as written
    /// now. Zero where the writer is this machine (one clock: a result from the future
    /// means the clock was set back, and it is not fresh).
    fn clock_skew(&self) -> Duration {
        Duration::ZERO
    }

    /// Whether anything can be cached (the cache dir exists).
    fn exists(&self) -> Result<bool>;

    /// Reads and checks the result. An error is the backend's (etcd unreachable).
    fn read_result(&self) -> Result<Read>;

    /// A local copy of the result that may be served without asking the backend (etcd's
    /// or PostgreSQL's, while fresh by its own TTL: see `mirror.rs`); `None` elsewhere.
    fn read_mirror(&self) -> Option<Entry> {
        None
    }

    /// Where the result is, for a warning about it.
    fn result_location(&self) -> String;

    /// The last failed run, if any (of whatever argv).
    fn read_failure(&self) -> Result<Option<Failure>>;

    /// Takes the lock if nobody holds it; `None` if somebody does.
    fn try_lock(&self) -> Result<Option<Held>>;

    /// Takes the lock, waiting for it for at most `limit`; `None` if it stayed held.
    /// The default looks, then waits for a release, then looks again: a backend with
    /// a queue for its lock (flock) queues instead.
    fn lock_within(&self, limit: Duration) -> Result<Option<Held>> {
        let deadline = later(Instant::now(), limit);
        loop {
            if let Some(held) = self.try_lock()? {
                return Ok(Some(held));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || !self.wait_released(left)? {
                return Ok(None);
            }
        }
    }

    /// Takes one of the NAME's `slots` run slots (`--exclusive --slots N`, N > 1),
    /// waiting for one for at most `limit`; `None` if every slot stayed in use.
    fn lock_slot_within(&self, slots: u32, limit: Duration) -> Result<Option<Held>> {
        let _ = (slots, limit);
        let message = "--slots does not work with this --backend";
        Err(crate::exit::Exit::new(crate::exit::Status::Usage, message).into())
    }

    /// Waits until the run in flight releases the lock, for at most `limit`; whether
    /// it did.
    fn wait_released(&self, limit: Duration) -> Result<bool>;

    /// The lock a `--background` caller handed to this refresher; `None` if it is no
    /// longer to be had (a refresher that has nothing to do).
    ///
    /// # Safety
    ///
    /// A handed file descriptor must be one this process was handed open at exec
    /// (`--refresher=FD`), not yet claimed, and owned by nothing else in it.
    unsafe fn take_handed(&self, handover: Refresher) -> Result<Option<Held>>;

    /// The most stdout a result can hold next to `meta`, where the backend limits it.
    fn room_for_body(&self, meta: &Meta) -> Option<u64> {
        let _ = meta;
        None
    }

    /// The size limit the backend puts on a result, for messages.
    fn value_limit(&self) -> Option<u64> {
        None
    }

    /// Whether results are files in the cache dir (which a run's stdout is streamed
    /// into), rather than values elsewhere (read back from the temp file, or from
    /// memory where the temp file failed).
    fn results_in_cache_dir(&self) -> bool;

    /// Everything `status` shows of the NAME.
    fn snapshot(&self) -> Result<Snapshot>;

    /// Removes the result and failure record under the lock: a run in flight
    /// finishes first, and its result is removed after it.
    fn clear(&self, name: &Name, say: &Say) -> Result<Cleared>;

    /// `clear --older-than`: where results are files in the cache dir.
    fn clear_older(&self, name: &Name, older_than: Duration, say: &Say) -> Result<Cleared> {
        let _ = (name, older_than, say);
        let message = "clear --older-than works on the cache dir and PostgreSQL only, not with an etcd --backend";
        Err(crate::exit::Exit::new(crate::exit::Status::Usage, message).into())
    }
}

/// A held NAME lock; released when dropped.
pub type Held = Box<dyn Lock>;

/// A NAME's lock, held: what only its holder may write.
pub trait Lock {
    /// Stores a run's result (its stdout and stderr). On error the output is handed
    /// back for printing with why it was not stored, and the previous result is
    /// untouched.
    fn save_result(&self, stdout: EntryWriter, stderr: &[u8], meta: &Meta)
    -> Result<Body, Unsaved>;

    /// Records a failed run.
    fn save_failure(&self, failure: &Failure) -> Result<()>;

    /// Removes the failure record after a good run (best effort: a record left
    /// behind only delays the next run by `--retry-after`). It may be done later, with
    /// the result's save or as the lock is let go, but before others can take it.
    fn forget_failure(&self);

    /// Records the key values of a keyed slot (best effort: they are for `status`).
    fn save_key_values(&self, bytes: &[u8]);

    /// Where the run record of a run under this lock goes, when not the NAME's own
    /// (`NAME.run`): a run slot of `--slots` other than the first has its own.
    fn run_record(&self) -> Option<&std::path::Path> {
        None
    }

    /// Which run slot of `--slots` this is (0 for the NAME's own lock).
    fn slot_index(&self) -> u32 {
        0
    }

    /// Environment for the command (the fencing token with etcd).
    fn env(&self) -> &[(OsString, OsString)] {
        &[]
    }

    /// The trip wire of a lock that can be lost while held (an etcd lease).
    fn abort(&self) -> Option<&Abort> {
        None
    }

    /// The open file a refresher must inherit, if the lock is one.
    #[cfg(unix)]
    fn inheritable_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }

    /// The argument that tells a refresher which lock it is handed.
    fn refresher_arg(&self) -> OsString;

    /// Lets go of the lock once the refresher it was handed to has started.
    fn hand_over(self: Box<Self>, refresher: std::process::Child);
}

/// A run's output that was not stored, and why.
pub struct Unsaved {
    pub reason: String,
    pub body: Body,
}

/// The run's stdout read back into memory, for a backend that stores a result as one
/// value (etcd, PostgreSQL); a read error is an unsaved result with what was read.
#[cfg_attr(
    not(any(feature = "etcd", feature = "postgres")),
    allow(dead_code, reason = "only the fleet backends store values")
)]
pub(crate) fn stdout_in_memory(stdout: crate::entry::EntryWriter) -> Result<Vec<u8>, Unsaved> {
    // A write error of the temp file left the rest in memory: all of it is here.
    let body = stdout.into_body();
    let mut bytes = Vec::with_capacity(body.len() as usize);
    match body.print(&mut bytes) {
        Ok(()) => Ok(bytes),
        Err(e) => Err(Unsaved {
            reason: format!("cannot read the run's output back: {e}"),
            body: Body::in_memory(bytes),
        }),
    }
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
    /// What the supervisors of a `--service` NAME recorded (on this machine).
    pub service: Option<ServiceRecord>,
    /// The run slots of an `--exclusive --slots N` NAME; `None` for other NAMEs.
    pub slots: Option<Slots>,
    /// The last run of an `--exclusive` NAME (on this machine).
    pub last_exclusive: Option<ExclusiveRun>,
}

/// The run slots of a NAME used with `--exclusive --slots N`, for `status`.
pub struct Slots {
    /// The N in force (the one recorded by the last caller that found them all free).
    pub count: u32,
    /// The slots in use: each one's number and run.
    pub in_use: Vec<(u32, InFlight)>,
    /// How many callers wait for a slot, where that can be counted (Linux).
    pub waiters: Option<u32>,
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

impl OutputCap {
    /// No cap: a run whose stdout is not captured (`--exclusive`, `--service`).
    pub const NONE: OutputCap = OutputCap {
        bytes: u64::MAX,
        by_backend: false,
    };
}

/// One NAME as a run call or `status` uses it: its place in the backend, and the key
/// values of the run call (not of `status`).
pub struct Slot {
    place: Box<dyn Place>,
    key: Option<Resolved>,
}

impl Slot {
    /// The slot of these key values, for a run call.
    pub fn keyed(mut self, key: Resolved) -> Slot {
        self.key = Some(key);
        self
    }

    /// Its place in the backend.
    pub fn place(&self) -> &dyn Place {
        &*self.place
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
        &self.place.files().store
    }

    /// The NAME's files in the local cache dir.
    pub fn paths(&self) -> &Paths {
        &self.place.files().paths
    }

    /// Takes the NAME's lock if nobody holds it; `None` if somebody does. The winner
    /// of a keyed slot records its key values for `status`.
    pub fn try_lock(&self) -> Result<Option<Held>> {
        let held = self.place.try_lock()?;
        self.record_key_values(held.as_deref());
        Ok(held)
    }

    /// Takes the NAME's lock, waiting for it for at most `limit`; `None` if it stayed
    /// held. The winner of a keyed slot records its key values.
    pub fn lock_within(&self, limit: Duration) -> Result<Option<Held>> {
        let held = self.place.lock_within(limit)?;
        self.record_key_values(held.as_deref());
        Ok(held)
    }

    fn record_key_values(&self, held: Option<&dyn Lock>) {
        if let (Some(held), Some(key)) = (held, &self.key)
            && key.id.key.is_some()
        {
            held.save_key_values(&record::to_bytes(&key.values));
        }
    }

    /// The cap on a run's stdout: `--max-output`, or less where the backend cannot
    /// store more (etcd: its value limit less the metadata, `meta` with the largest
    /// numbers it can have).
    pub fn output_cap(&self, max_output: u64, meta: &Meta) -> OutputCap {
        match self.place.room_for_body(meta) {
            Some(room) if room < max_output => OutputCap {
                bytes: room,
                by_backend: true,
            },
            _ => OutputCap {
                bytes: max_output,
                by_backend: false,
            },
        }
    }
}
