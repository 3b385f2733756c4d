//! The small JSON side files of a NAME: the last failed run (for `--retry-after` and
//! `status`) and the run in flight (so that a later winner can kill what a killed run
//! left behind). A missing or unreadable record counts as none.

use std::io::Read;
use std::path::Path;
use std::time::{Duration, SystemTime};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::store::{Opened, open_regular};

/// The last run that failed: exited non-zero, timed out, overflowed `--max-output`,
/// or could not start.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Failure {
    pub at_ms: u64,
    pub argv_digest: String,
    pub exit_code: i32,
    /// In words: `exit status 3`, `timed out after 60s`, `output over 16.0MiB`.
    pub reason: String,
    /// The last lines of the run's stderr.
    pub stderr_tail: String,
    pub duration_ms: u64,
    /// How many runs in a row have failed, this one included (0 in records written
    /// before it was counted: read as 1).
    #[serde(default)]
    pub consecutive: u32,
    /// The jitter draw (-1..=1) of this failure's back-off (see `decide::backoff`).
    #[serde(default)]
    pub jitter: f64,
    /// The back-off its writer chose: no run starts before `at_ms` + this. Callers
    /// judge by their own options; this is what `status` shows.
    #[serde(default)]
    pub backoff_ms: Option<u64>,
}

impl Failure {
    pub fn age(&self, now: SystemTime) -> Duration {
        // A timestamp past what a SystemTime holds is from the future: just now.
        crate::values::epoch_ms(self.at_ms)
            .and_then(|at| now.duration_since(at).ok())
            .unwrap_or_default()
    }
}

/// What a `--service` NAME's supervisors recorded of its instances, for `status`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ServiceRecord {
    /// How many instances were started, the running one included.
    pub starts: u64,
    /// The last instance that ended, if one did.
    pub last_exit: Option<ServiceExit>,
    /// When the latest instances started (ms since the epoch), oldest first: as many
    /// as the `--start-limit` of the supervisor that wrote it.
    #[serde(default)]
    pub started_at_ms: Vec<u64>,
    /// What the last caller that found no instance running decided, for `status`.
    #[serde(default)]
    pub decision: Option<ServiceDecision>,
    /// The command of the instance last started (as `status` shows it) and its digest,
    /// written by the caller that starts it before the instance runs: a caller with
    /// another command is refused while it runs. Empty when written by an older version.
    #[serde(default)]
    pub command: String,
    #[serde(default)]
    pub argv_digest: String,
}

/// A caller's decision on finding no instance running (holding the NAME's lock).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServiceDecision {
    pub at_ms: u64,
    pub kind: DecisionKind,
    /// In words: why the instance was (re)started or not.
    pub reason: String,
    /// Backing off: when the next start may be.
    pub next_start_at_ms: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecisionKind {
    /// The first instance.
    Started,
    /// The last instance was up (passed `--ready`, or lived a second without one) and
    /// then ended: a new one was started at once.
    Restarted,
    /// A crash loop (an instance ended before it was up, or too many started within
    /// `--start-window`): none is started until the back-off has passed.
    BackingOff,
    /// `--ready` already passed with no instance of ours running: nothing was started.
    ReadyUnsupervised,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServiceExit {
    pub at_ms: u64,
    pub exit_code: i32,
    /// In words: `exit status 1 after 2.0s`, `killed by signal 9 after 1h`.
    pub reason: String,
    pub uptime_ms: u64,
    /// Which instance it was (the record's `starts` when it started); 0 in records
    /// written before it was kept.
    #[serde(default)]
    pub instance: u64,
}

/// The last run of an `--exclusive` NAME (`NAME.last`), which caches nothing, for
/// `status` (key `last_exclusive_run`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExclusiveRun {
    /// When it ended.
    pub at_ms: u64,
    /// The status its caller exited with.
    pub exit_code: i32,
    /// How long it ran.
    pub duration_ms: u64,
    /// Its command, quoted as a shell would need it.
    pub command: String,
}

/// The identity of a run in flight, written by its winner before the command starts
/// and removed once the whole tree is gone.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RunRecord {
    /// Set in every process of the run's tree as `SINGLEFLIGHT_RUN_ID`.
    pub token: String,
    /// The kernel's boot id: a record from before a reboot names nothing alive.
    pub boot_id: String,
    /// singleflight's own pid.
    pub owner_pid: u32,
    /// singleflight's start time (as `start_ticks`), so that `stop` signals it only
    /// while it provably is the run's; 0 if unknown (records written before it).
    #[serde(default)]
    pub owner_start_ticks: u64,
    /// The command's pid, which is also its process group id; 0 until it started.
    pub pid: u32,
    /// The command's start time in clock ticks since boot (`/proc/PID/stat` field 22).
    pub start_ticks: u64,
    pub started_at_ms: u64,
}

/// The largest record: far above any real one (a failure's stderr tail is 2 KiB, six
/// times that escaped as JSON, plus its reason), so a bigger file is damage and is
/// never read, as a result's metadata is bounded too.
pub const RECORD_MAX: u64 = 64 << 10;

/// Reads a record; a missing, unreadable or damaged one (not a regular file: see
/// [`open_regular`]; larger than [`RECORD_MAX`]) counts as none.
pub fn load<T: DeserializeOwned>(path: &Path) -> Option<T> {
    let Ok(Opened::File(file, meta)) = open_regular(path) else {
        return None;
    };
    if meta.len() > RECORD_MAX {
        return None;
    }
    // Bounded again while reading: the file may grow after the fstat.
    let mut bytes = Vec::new();
    file.take(RECORD_MAX + 1).read_to_end(&mut bytes).ok()?;
    if bytes.len() as u64 > RECORD_MAX {
        return None;
    }
    serde_json::from_slice(&bytes).ok()
}

/// Decodes a record held in memory (a value from etcd), with the same limit.
#[cfg(any(feature = "etcd", feature = "postgres"))]
pub fn from_bytes<T: DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    if bytes.len() as u64 > RECORD_MAX {
        return None;
    }
    serde_json::from_slice(bytes).ok()
}

pub fn to_bytes<T: Serialize>(record: &T) -> Vec<u8> {
    serde_json::to_vec(record).expect("records serialize")
}
