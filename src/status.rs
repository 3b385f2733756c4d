//! The management verbs: `status` (what is cached, what is in flight, what failed)
//! and `clear` (remove results under the lock, so a clear never races a writer), of
//! the cache dir or of the etcd backend alike.

use std::io::{self, Write};
use std::time::{Duration, SystemTime};

use anyhow::Result;
use serde::Serialize;

use crate::backend::{Backend, Cleared, Read};
use crate::exit::{Exit, Status};
use crate::key::{KeyValue, SlotId};
use crate::record::{DecisionKind, ServiceDecision, ServiceExit};
use crate::say::Say;
use crate::store::Store;
use crate::values::{Name, format_duration, format_size};

/// The human table fits this many columns.
const TABLE_WIDTH: usize = 100;
/// How many of the last lines of a failed run's stderr the table shows.
const TAIL_LINES: usize = 3;

/// One NAME as `status --json` shows it: one object of the array. The keys are a
/// stable interface: keys may be added, none is renamed or removed. Times are in
/// milliseconds (`*_at_ms` since the Unix epoch); `null` means "none" or "not known".
#[derive(Debug, Serialize)]
pub struct NameStatus {
    /// The NAME.
    pub name: String,
    /// The slot: the NAME itself, or `NAME@<16 hex>` for the results of one set of
    /// key values (`--key-cwd`, `--key-env`, `--key-file`), each its own slot.
    pub slot: String,
    /// The key values of a keyed slot: `[{"key": "cwd", "value": "/src/a"},
    /// {"key": "env:AWS_PROFILE", "value": "prod"}, {"key": "env:X", "value": null}
    /// (unset), {"key": "file", "value": "/src/a/Cargo.lock"}]`; `null` for the NAME's
    /// plain slot, or when the values were not recorded.
    pub keys: Option<Vec<KeyValue>>,
    /// `fresh` or `stale`, judged by the ttl the result was written with; `none` when
    /// there is no result; `invalid` when the result file is truncated, corrupt, not
    /// a singleflight result or not a regular file (it is never served, and the next
    /// run replaces it), or of a newer format version (never served, never replaced).
    pub state: &'static str,
    /// How long ago the result was written; `null` without a result, or when it is
    /// dated in the future (which counts as stale).
    pub age_ms: Option<u64>,
    /// The `--ttl` of the call that wrote the result.
    pub ttl_ms: Option<u64>,
    /// The size of the cached stdout, in bytes.
    pub size_bytes: Option<u64>,
    /// When the result was written (the end of its run).
    pub written_at_ms: Option<u64>,
    /// How long the run that wrote the result took.
    pub duration_ms: Option<u64>,
    /// The exit status of the run that wrote the result: what a caller served it exits
    /// with (0 unless `--cache-failures` cached a failure).
    pub exit_code: Option<i32>,
    /// Whether a run is in flight now: the NAME's lock is held (a fact, not a guess
    /// from a pid file) by a live process that recorded a run. A holder that has not
    /// recorded its run yet (the first milliseconds) does not count.
    pub in_flight: bool,
    /// The pid of the singleflight process running it (a foreground caller or a
    /// `--background` refresher); `null` when no run is in flight.
    pub pid: Option<u32>,
    /// The machine the run in flight runs on, with the etcd backend (`null` with the
    /// cache dir, where it is this one).
    pub host: Option<String>,
    /// The pid of the command of the run in flight, which is also its process group
    /// (`null` with the etcd backend, which does not record it).
    pub command_pid: Option<u32>,
    /// When the run in flight started.
    pub run_started_at_ms: Option<u64>,
    /// The command of the result, quoted as a shell would need it.
    pub command: Option<String>,
    /// The last failed run since the last good one, if any.
    pub last_failure: Option<FailureStatus>,
    /// A `--service` NAME's instances, as recorded on this machine; `null` for other
    /// NAMEs. While one runs, `in_flight` is true, `pid` is its supervisor,
    /// `command_pid` the instance and `run_started_at_ms` when it started.
    pub service: Option<ServiceStatus>,
}

/// A `--service` NAME (key `service` of [`NameStatus`]).
#[derive(Debug, Serialize)]
pub struct ServiceStatus {
    /// How many instances were started, the running one included.
    pub starts: u64,
    /// How long the running instance has been up; `null` when none runs.
    pub uptime_ms: Option<u64>,
    /// The last instance that ended: `{"at_ms", "exit_code", "reason", "uptime_ms"}`.
    pub last_exit: Option<ServiceExit>,
    /// What the last caller that found no instance running decided:
    /// `{"at_ms", "kind", "reason", "next_start_at_ms"}`, `kind` one of `started`,
    /// `restarted` (the last instance was up, then ended: started again at once),
    /// `backing_off` (a crash loop: none starts before `next_start_at_ms`) and
    /// `ready_unsupervised` (`--ready` passed already: nothing was started).
    pub decision: Option<ServiceDecision>,
}

/// The last failed run of a NAME (key `last_failure` of [`NameStatus`]).
#[derive(Debug, Serialize)]
pub struct FailureStatus {
    /// When it ended.
    pub at_ms: u64,
    /// How long ago it ended.
    pub age_ms: u64,
    /// Why, in words: `exit status 3 after 1.2s`, `timed out after 60s; …`,
    /// `stdout went over --max-output …`, `command not found: …`.
    pub reason: String,
    /// The status the caller that ran it exited with (124 timeout, 125 output cap, …).
    pub exit_code: i32,
    /// How long it ran.
    pub duration_ms: u64,
    /// The end of its stderr (at most 2 KiB), decoded as UTF-8 with replacement.
    pub stderr_tail: String,
    /// How many runs in a row have failed, this one included.
    pub consecutive_failures: u32,
    /// The back-off after it: no run starts until it has passed (`--retry-after`, or
    /// grown by `--retry-max`), as chosen by the caller that ran it; `null` if not known.
    pub backoff_ms: Option<u64>,
    /// When the next run may start (`at_ms` + `backoff_ms`), maybe already past.
    pub next_run_at_ms: Option<u64>,
}

pub fn status(
    backend: &dyn Backend,
    store: &Store,
    names: Vec<Name>,
    json: bool,
    say: &Say,
) -> Result<i32> {
    backend.verify(store)?;
    let now = SystemTime::now();
    let asked = !names.is_empty();
    let candidates = if asked {
        backend.slots_of(store, &names)?
    } else {
        backend.slots(store)?
    };
    let mut statuses = Vec::new();
    for slot in candidates {
        statuses.extend(look(backend, store, &slot, now)?);
    }
    let unknown: Vec<String> = names
        .iter()
        .filter(|name| !statuses.iter().any(|s| s.name == name.as_str()))
        .map(Name::to_string)
        .collect();
    let mut out = io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &statuses)?;
        writeln!(out)?;
    } else if !(asked && statuses.is_empty()) {
        // Asked only for NAMEs that do not exist: the error below says it all.
        write_table(&mut out, &statuses)?;
    }
    out.flush()?;
    // Which cache dir (or etcd) was read, on stderr: stdout stays the table or the
    // array, and an empty one is no longer a mystery.
    let shown = statuses
        .iter()
        .map(|s| s.name.as_str())
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    if unknown.is_empty() {
        say.warn(format_args!(
            "read {}{}: {shown} NAME{}",
            if backend.is_cache_dir() {
                "cache dir "
            } else {
                ""
            },
            backend.describe(store),
            if shown == 1 { "" } else { "s" }
        ));
    }
    if asked && !unknown.is_empty() {
        let message = format!(
            "no such NAME in {}: {} (nothing cached, nothing failed, no run in flight)",
            backend.describe(store),
            unknown.join(", ")
        );
        return Err(Exit::new(Status::UnknownName, message).into());
    }
    Ok(0)
}

/// The status of a slot, or `None` if it has no result, no failure record and no run
/// in flight: a bare lock file (left by `clear`, or by a run that never finished) is
/// nothing to show.
fn look(
    backend: &dyn Backend,
    store: &Store,
    slot: &SlotId,
    now: SystemTime,
) -> Result<Option<NameStatus>> {
    let snapshot = backend.slot(store.clone(), slot).place().snapshot()?;
    let mut status = NameStatus {
        name: slot.name.to_string(),
        slot: slot.to_string(),
        keys: snapshot.key_values.filter(|_| slot.key.is_some()),
        state: "none",
        age_ms: None,
        ttl_ms: None,
        size_bytes: None,
        written_at_ms: None,
        duration_ms: None,
        exit_code: None,
        in_flight: false,
        pid: None,
        host: None,
        command_pid: None,
        run_started_at_ms: None,
        command: None,
        last_failure: None,
        service: None,
    };
    match snapshot.result {
        Read::Found(found) => {
            let meta = &found.meta;
            let age = meta.age(now);
            let fresh = age.is_some_and(|age| age.as_millis() < u128::from(meta.ttl_ms));
            status.state = if fresh { "fresh" } else { "stale" };
            status.age_ms = age.map(millis);
            status.ttl_ms = Some(meta.ttl_ms);
            status.size_bytes = Some(found.body.len());
            status.written_at_ms = Some(meta.written_at_ms);
            status.duration_ms = Some(meta.duration_ms);
            status.exit_code = Some(meta.exit_code);
            status.command = Some(meta.command.clone());
        }
        Read::Missing => {}
        Read::Invalid(_) | Read::Unreadable(_) => status.state = "invalid",
    }
    if let Some(run) = snapshot.in_flight {
        status.in_flight = true;
        status.pid = run.pid;
        status.host = run.host;
        status.command_pid = run.command_pid;
        status.run_started_at_ms = run.started_at_ms;
    }
    if let Some(failure) = snapshot.failure {
        status.last_failure = Some(FailureStatus {
            at_ms: failure.at_ms,
            age_ms: millis(failure.age(now)),
            reason: failure.reason,
            exit_code: failure.exit_code,
            duration_ms: failure.duration_ms,
            stderr_tail: failure.stderr_tail,
            consecutive_failures: failure.consecutive.max(1),
            backoff_ms: failure.backoff_ms,
            next_run_at_ms: failure
                .backoff_ms
                .map(|backoff| failure.at_ms.saturating_add(backoff)),
        });
    }
    if let Some(service) = snapshot.service {
        // A service caches no result: its command is the one of its instance.
        if status.command.is_none() && !service.command.is_empty() {
            status.command = Some(service.command.clone());
        }
        let now_ms = crate::entry::now_ms(now);
        status.service = Some(ServiceStatus {
            starts: service.starts,
            uptime_ms: status
                .run_started_at_ms
                .filter(|_| status.in_flight)
                .map(|at| now_ms.saturating_sub(at)),
            last_exit: service.last_exit,
            decision: service.decision,
        });
    }
    let exists = status.state != "none"
        || status.in_flight
        || status.last_failure.is_some()
        || status.service.is_some();
    Ok(exists.then_some(status))
}

/// `  service: restarted after a crash 3s ago: …`, and the like.
fn decision_line(decision: &ServiceDecision) -> String {
    let now_ms = crate::entry::now_ms(SystemTime::now());
    let ago = |at: u64| format_duration(Duration::from_millis(now_ms.saturating_sub(at)));
    let what = match decision.kind {
        DecisionKind::Started => "started",
        DecisionKind::Restarted => "restarted after a crash",
        DecisionKind::BackingOff => "backing off in a crash loop",
        DecisionKind::ReadyUnsupervised => "ready but not supervised",
    };
    let mut text = format!(
        "  service: {what} ({} ago): {}",
        ago(decision.at_ms),
        decision.reason
    );
    if let Some(next) = decision.next_start_at_ms {
        let left = Duration::from_millis(next.saturating_sub(now_ms));
        match left.is_zero() {
            true => text.push_str("; next start now"),
            false => text.push_str(&format!("; next start in {}", format_duration(left))),
        }
    }
    text
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// The table's columns: header and the most a cell may take. The command, last,
/// takes what is left of [`TABLE_WIDTH`].
const COLUMNS: [(&str, usize); 8] = [
    ("NAME", 20),
    ("STATE", 7),
    ("AGE", 7),
    ("TTL", 7),
    ("SIZE", 8),
    ("LAST RUN", 14),
    ("IN FLIGHT", 11),
    ("COMMAND", TABLE_WIDTH),
];
const GAP: &str = "  ";

fn write_table(out: &mut impl Write, statuses: &[NameStatus]) -> io::Result<()> {
    let rows: Vec<[String; 8]> = statuses.iter().map(row).collect();
    let mut widths = COLUMNS.map(|(header, _)| header.chars().count());
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count().min(COLUMNS[i].1));
        }
    }
    let fixed: usize = widths[..7].iter().map(|w| w + GAP.len()).sum();
    widths[7] = TABLE_WIDTH - fixed;
    let line = |cells: [&str; 8]| {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            let cell = truncate(cell, widths[i]);
            if i < 7 {
                let pad = widths[i] - cell.chars().count();
                text.push_str(&cell);
                text.push_str(&" ".repeat(pad));
                text.push_str(GAP);
            } else {
                text.push_str(&cell);
            }
        }
        text.trim_end().to_owned()
    };
    writeln!(out, "{}", line(COLUMNS.map(|(header, _)| header)))?;
    for (row, status) in rows.iter().zip(statuses) {
        writeln!(out, "{}", line(row.each_ref().map(String::as_str)))?;
        if status.slot != status.name {
            let values = match &status.keys {
                Some(keys) => keys.iter().map(|k| k.to_string()).collect::<Vec<_>>(),
                None => vec!["(not recorded)".to_owned()],
            };
            let text = format!("  keys: {} (slot {})", values.join(", "), status.slot);
            writeln!(out, "{}", truncate(&text, TABLE_WIDTH))?;
        }
        if let Some(service) = &status.service {
            let mut text = format!("  service: {} started", service.starts);
            if let Some(up) = service.uptime_ms {
                text.push_str(&format!(
                    ", up {}",
                    format_duration(Duration::from_millis(up))
                ));
            }
            if let Some(last) = &service.last_exit {
                text.push_str(&format!("; last exit: {}", last.reason));
            }
            writeln!(out, "{}", truncate(&text, TABLE_WIDTH))?;
            if let Some(decision) = &service.decision {
                writeln!(out, "{}", truncate(&decision_line(decision), TABLE_WIDTH))?;
            }
        }
        if let Some(failure) = &status.last_failure {
            let ago = format_duration(Duration::from_millis(failure.age_ms));
            let mut text = format!("  last failure {ago} ago: {}", failure.reason);
            if let Some(backoff) = failure.backoff_ms {
                let left = backoff.saturating_sub(failure.age_ms);
                let next = match left {
                    0 => "now".to_owned(),
                    left => format!("in {}", format_duration(Duration::from_millis(left))),
                };
                text.push_str(&format!(
                    "; {} in a row, back-off {}, next run {next}",
                    failure.consecutive_failures,
                    format_duration(Duration::from_millis(backoff))
                ));
            }
            writeln!(out, "{}", truncate(&text, TABLE_WIDTH))?;
            let tail: Vec<&str> = failure
                .stderr_tail
                .lines()
                .filter(|l| !l.trim().is_empty())
                .collect();
            for tail_line in &tail[tail.len().saturating_sub(TAIL_LINES)..] {
                writeln!(
                    out,
                    "{}",
                    truncate(&format!("    | {tail_line}"), TABLE_WIDTH)
                )?;
            }
        }
    }
    Ok(())
}

fn row(s: &NameStatus) -> [String; 8] {
    let ms = |v: Option<u64>| {
        v.map_or("-".to_owned(), |v| {
            format_duration(Duration::from_millis(v))
        })
    };
    [
        s.name.clone(),
        s.state.to_owned(),
        ms(s.age_ms),
        ms(s.ttl_ms),
        s.size_bytes.map_or("-".to_owned(), format_size),
        match (s.duration_ms, s.exit_code) {
            (Some(took), Some(code)) => format!("{} exit {code}", ms(Some(took))),
            _ => "-".to_owned(),
        },
        match (s.in_flight, s.pid, &s.host) {
            (true, Some(pid), Some(host)) => format!("{pid}@{host}"),
            (true, Some(pid), None) => format!("pid {pid}"),
            (true, None, _) => "yes".to_owned(),
            (false, _, _) => "-".to_owned(),
        },
        s.command.clone().unwrap_or_else(|| "-".to_owned()),
    ]
}

/// `text` cut to `width` characters (the last one `…` when cut), with control
/// characters escaped so that a command or stderr cannot move the terminal's cursor.
fn truncate(text: &str, width: usize) -> String {
    let clean: String = text
        .chars()
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect();
    if clean.chars().count() <= width {
        return clean;
    }
    let mut cut: String = clean.chars().take(width.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// Removes the results and failure records of `names` (of every NAME with `all`),
/// each under its lock: a run in flight finishes first, and its result is removed
/// after it. Clearing a NAME that has nothing cached is not an error: afterwards it
/// has no result, which is all `clear` promises (like `rm -f`).
///
/// With `older_than`, only NAMEs none of whose files was written for that long, and
/// their lock files go too (see `Place::clear_older` in `backend`); the
/// temp files of runs that are over are swept as a winner sweeps them.
pub fn clear(
    backend: &dyn Backend,
    store: &Store,
    names: Vec<Name>,
    all: bool,
    older_than: Option<Duration>,
    say: &Say,
) -> Result<i32> {
    if !backend.verify(store)? {
        return Ok(0);
    }
    if older_than.is_some() && !backend.clears_older() {
        let message = "clear --older-than works on the cache dir and PostgreSQL only, not with an etcd --backend";
        return Err(Exit::new(Status::Usage, message).into());
    }
    let slots = if all {
        backend.slots(store)?
    } else {
        backend.slots_of(store, &names)?
    };
    // A NAME is every slot of it: the plain one and one per set of key values
    // (`slots_of` and `slots` list a NAME's slots together).
    for group in slots.chunk_by(|a, b| a.name == b.name) {
        let mut cleared = false;
        for slot in group {
            let held = backend.slot(store.clone(), slot);
            let held = held.place();
            let outcome = match older_than {
                Some(age) => held.clear_older(&slot.name, age, say)?,
                None => held.clear(&slot.name, say)?,
            };
            if let Cleared::Removed(removed) = outcome {
                cleared = true;
                say.decided(format_args!("{slot}: cleared ({})", removed.join(", ")));
            }
        }
        if !cleared {
            say.decided(format_args!("{}: nothing to clear", group[0].name));
        }
    }
    if older_than.is_some() {
        store.remove_stale_temps();
    }
    Ok(0)
}
