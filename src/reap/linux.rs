//! The Linux side of a run's tree: `/proc` for descendants and identities, reaping
//! as a child subreaper, and killing the remains of a killed run.

use std::fs;

use rustix::process::{Pid, Signal, WaitOptions};

use crate::record::RunRecord;

/// The fields of `/proc/PID/stat` that identify a process and place it in a tree.
#[derive(Clone, Copy)]
pub struct Stat {
    pub pid: u32,
    pub state: u8,
    pub ppid: u32,
    pub pgrp: u32,
    pub start_ticks: u64,
}

impl Stat {
    pub fn read(pid: u32) -> Option<Stat> {
        let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name (field 2) may hold spaces and parentheses: split after
        // the last ')'. Fields from 3 on: state, ppid, pgrp, … starttime is 22.
        let (_, rest) = text.rsplit_once(')')?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        Some(Stat {
            pid,
            state: *fields.first()?.as_bytes().first()?,
            ppid: fields.get(1)?.parse().ok()?,
            pgrp: fields.get(2)?.parse().ok()?,
            start_ticks: fields.get(19)?.parse().ok()?,
        })
    }

    fn alive(&self) -> bool {
        !matches!(self.state, b'Z' | b'X')
    }
}

fn all_processes() -> Vec<Stat> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(Stat::read)
        .collect()
}

/// Every process below `root` in the tree (not `root` itself).
pub fn descendants(root: u32) -> Vec<Stat> {
    let processes = all_processes();
    let mut found = Vec::new();
    let mut parents = vec![root];
    while let Some(parent) = parents.pop() {
        for p in processes.iter().filter(|p| p.ppid == parent) {
            parents.push(p.pid);
            found.push(*p);
        }
    }
    found
}

/// Sends `signal`; false only if the process exists and may not be signalled
/// (EPERM: a setuid program, say).
pub fn kill(stat: Stat, signal: Signal) -> bool {
    Pid::from_raw(stat.pid as i32).is_none_or(|pid| {
        !matches!(rustix::process::kill_process(pid, signal), Err(e) if e == rustix::io::Errno::PERM)
    })
}

/// Kills and reaps every descendant until none is left. Orphans are reparented to
/// singleflight (a subreaper) as their parents die, so each pass finds the next
/// generation; SIGKILLed processes cannot fork, so the passes end. A process that
/// may not be killed is left (and not waited for), or this would never return.
pub fn reap_descendants(command_pid: u32) {
    let me = std::process::id();
    let mut unkillable = std::collections::HashSet::new();
    loop {
        let rest: Vec<Stat> = descendants(me)
            .into_iter()
            .filter(|p| !unkillable.contains(&p.pid) && (p.alive() || p.ppid == me))
            .collect();
        if rest.is_empty() {
            return;
        }
        for stat in &rest {
            if stat.alive() && !kill(*stat, Signal::KILL) {
                unkillable.insert(stat.pid);
            }
        }
        let children: Vec<u32> = rest
            .iter()
            .filter(|p| p.ppid == me && p.pid != command_pid && !unkillable.contains(&p.pid))
            .map(|p| p.pid)
            .collect();
        for child in &children {
            if let Some(pid) = Pid::from_raw(*child as i32) {
                let _ = rustix::process::waitpid(Some(pid), WaitOptions::empty());
            }
        }
        if children.is_empty() {
            // Only grandchildren whose parents are dying: give the kernel a moment
            // to reparent them to us.
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

fn carries_token(pid: u32, needle: &[u8]) -> bool {
    fs::read(format!("/proc/{pid}/environ"))
        .is_ok_and(|env| env.split(|b| *b == 0).any(|var| var == needle))
}

pub fn kill_remains(record: &RunRecord) {
    if record.token.is_empty() || record.boot_id != super::boot_id() {
        return;
    }
    let needle = format!("{}={}", super::RUN_ID_ENV, record.token).into_bytes();
    // The group id is the command's pid. It is still this run's group unless the
    // pid now names another process: a pid in use as a group id is never reused,
    // so a different process with that pid means the old group is gone.
    let group_is_ours = record.pid != 0
        && Stat::read(record.pid).is_none_or(|leader| leader.start_ticks == record.start_ticks);
    let me = std::process::id();
    // Bounded: each pass kills all it finds, and a killed process cannot fork.
    for _ in 0..100 {
        let remains: Vec<Stat> = all_processes()
            .into_iter()
            .filter(|p| p.alive() && p.pid != me && p.start_ticks >= record.start_ticks)
            .filter(|p| (group_is_ours && p.pgrp == record.pid) || carries_token(p.pid, &needle))
            .collect();
        if remains.is_empty() {
            return;
        }
        for stat in remains {
            kill(stat, Signal::KILL);
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}
