//! The management verbs: `status` (what is cached, what is in flight, what failed)
//! and `clear` (remove results under the lock, so a clear never races a writer).

use std::fs;
use std::io::{self, Write};
use std::time::SystemTime;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::entry;
use crate::exit::Exit;
use crate::lock;
use crate::record::{self, Failure, RunRecord};
use crate::store::Store;
use crate::values::{Name, format_duration, format_size};

/// `status` of a NAME that has nothing in the cache dir.
pub const UNKNOWN_NAME: i32 = 1;

/// One NAME as `status` shows it; the JSON keys are part of the interface.
#[derive(Debug, Serialize)]
pub struct NameStatus {
    pub name: String,
    /// `fresh`, `stale` (by the ttl it was written with), `none` or `invalid`.
    pub state: &'static str,
    pub age_ms: Option<u64>,
    pub ttl_ms: Option<u64>,
    pub size_bytes: Option<u64>,
    pub written_at_ms: Option<u64>,
    pub duration_ms: Option<u64>,
    pub exit_code: Option<i32>,
    pub in_flight: bool,
    pub pid: Option<u32>,
    pub command: Option<String>,
    pub last_failure: Option<FailureStatus>,
}

#[derive(Debug, Serialize)]
pub struct FailureStatus {
    pub at_ms: u64,
    pub age_ms: u64,
    pub reason: String,
    pub exit_code: i32,
    pub duration_ms: u64,
    pub stderr_tail: String,
}

pub fn status(store: &Store, names: Vec<Name>, json: bool) -> Result<i32> {
    if store.verify_existing().is_err() {
        store.verify_existing()?;
    }
    let listed = store.names()?;
    let mut missing = Vec::new();
    let names = if names.is_empty() {
        listed.clone()
    } else {
        for name in &names {
            if !listed.contains(name) {
                missing.push(name.clone());
            }
        }
        names.into_iter().filter(|n| listed.contains(n)).collect()
    };
    let now = SystemTime::now();
    let statuses: Vec<NameStatus> = names.iter().map(|n| look(store, n, now)).collect();
    let mut out = io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &statuses)?;
        writeln!(out)?;
    } else {
        write_table(&mut out, &statuses)?;
    }
    if let Some(name) = missing.first() {
        let message = format!("no such NAME in {}: {name}", store.dir().display());
        return Err(Exit::new(UNKNOWN_NAME, message).into());
    }
    Ok(0)
}

fn look(store: &Store, name: &Name, now: SystemTime) -> NameStatus {
    let paths = store.paths(name);
    let mut status = NameStatus {
        name: name.to_string(),
        state: "none",
        age_ms: None,
        ttl_ms: None,
        size_bytes: None,
        written_at_ms: None,
        duration_ms: None,
        exit_code: None,
        in_flight: lock::is_held(&paths.lock).unwrap_or(false),
        pid: None,
        command: None,
        last_failure: None,
    };
    match entry::read(&paths.result) {
        Ok(Ok(Some(found))) => {
            let meta = &found.meta;
            let age = meta.age(now);
            let fresh = age.is_some_and(|age| age.as_millis() < u128::from(meta.ttl_ms));
            status.state = if fresh { "fresh" } else { "stale" };
            status.age_ms = age.map(|a| a.as_millis() as u64);
            status.ttl_ms = Some(meta.ttl_ms);
            status.size_bytes = Some(found.body.len());
            status.written_at_ms = Some(meta.written_at_ms);
            status.duration_ms = Some(meta.duration_ms);
            status.exit_code = Some(meta.exit_code);
            status.command = Some(meta.command.clone());
        }
        Ok(Ok(None)) => {}
        Ok(Err(_)) | Err(_) => status.state = "invalid",
    }
    if status.in_flight {
        status.pid = record::load::<RunRecord>(&paths.run).map(|r| r.owner_pid);
    }
    if let Some(failure) = record::load::<Failure>(&paths.failure) {
        status.last_failure = Some(FailureStatus {
            at_ms: failure.at_ms,
            age_ms: failure.age(now).as_millis() as u64,
            reason: failure.reason,
            exit_code: failure.exit_code,
            duration_ms: failure.duration_ms,
            stderr_tail: failure.stderr_tail,
        });
    }
    status
}

fn write_table(out: &mut impl Write, statuses: &[NameStatus]) -> io::Result<()> {
    let ms = |v: Option<u64>| {
        v.map_or("-".to_owned(), |v| {
            format_duration(std::time::Duration::from_millis(v))
        })
    };
    let rows: Vec<[String; 8]> = statuses
        .iter()
        .map(|s| {
            [
                s.name.clone(),
                s.state.to_owned(),
                ms(s.age_ms),
                ms(s.ttl_ms),
                s.size_bytes.map_or("-".to_owned(), format_size),
                match (s.duration_ms, s.exit_code) {
                    (Some(d), Some(code)) => format!("{} exit {code}", ms(Some(d))),
                    _ => "-".to_owned(),
                },
                match (s.in_flight, s.pid) {
                    (true, Some(pid)) => format!("pid {pid}"),
                    (true, None) => "yes".to_owned(),
                    (false, _) => "-".to_owned(),
                },
                s.command.clone().unwrap_or_else(|| "-".to_owned()),
            ]
        })
        .collect();
    let header = [
        "NAME",
        "STATE",
        "AGE",
        "TTL",
        "SIZE",
        "LAST RUN",
        "IN FLIGHT",
        "COMMAND",
    ];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    // Fit 100 columns: the command, last, takes what is left.
    let fixed: usize = widths[..7].iter().map(|w| w + 2).sum();
    let command_width = 100usize.saturating_sub(fixed).max(10);
    let line = |cells: [&str; 8]| {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate().take(7) {
            text.push_str(&format!("{cell:<width$}  ", width = widths[i]));
        }
        text.push_str(&truncate(cells[7], command_width));
        text.trim_end().to_owned()
    };
    writeln!(out, "{}", line(header))?;
    for (row, status) in rows.iter().zip(statuses) {
        writeln!(out, "{}", line(row.each_ref().map(String::as_str)))?;
        if let Some(failure) = &status.last_failure {
            let ago = format_duration(std::time::Duration::from_millis(failure.age_ms));
            writeln!(
                out,
                "  last failure {ago} ago: {}",
                truncate(&failure.reason, 80)
            )?;
            for tail_line in failure
                .stderr_tail
                .lines()
                .rev()
                .take(3)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
            {
                writeln!(out, "    {}", truncate(tail_line, 94))?;
            }
        }
    }
    Ok(())
}

fn truncate(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(width.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// Removes the results and failure records of `names`, each under its lock: a run in
/// flight finishes first. Clearing a NAME that has nothing is not an error.
pub fn clear(store: &Store, names: Vec<Name>, all: bool) -> Result<i32> {
    if !store.verify_existing()? {
        return Ok(0);
    }
    let names = if all { store.names()? } else { names };
    for name in &names {
        let paths = store.paths(name);
        let _guard = lock::exclusive(&paths.lock)
            .with_context(|| format!("cannot lock {}", paths.lock.display()))?;
        for path in [&paths.result, &paths.failure] {
            match fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("cannot remove {}", path.display()));
                }
                _ => {}
            }
        }
    }
    Ok(0)
}
