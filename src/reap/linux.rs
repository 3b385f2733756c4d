//! The Linux side of a run's tree: the process group, plus `/proc` for descendants
//! and identities, reaping as a child subreaper, a death signal for the command, and
//! killing the remains of a killed run.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::process::{Child, Command};

use rustix::process::{Pid, PidfdFlags, Signal, WaitOptions};

use super::{Stop, group};
use crate::record::RunRecord;

/// The command's process group, and every descendant of singleflight (which includes
/// the ones that left the group).
pub struct Tree {
    pid: u32,
}

impl Tree {
    pub fn adopt(child: &mut Child) -> io::Result<Tree> {
        Ok(Tree { pid: child.id() })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn signal(&self, stop: Stop) {
        group::signal(self.pid, stop);
        for pid in descendants(std::process::id()) {
            kill(pid, group::signal_of(stop));
        }
    }

    pub fn kill_leftovers(self) {
        group::signal(self.pid, Stop::Kill);
        // As a subreaper singleflight inherits every orphan of the run, so each process
        // left descends from one of its children. With no child but the guard nothing is
        // left, and no scan of every process is needed (most runs end so).
        let mut children = Vec::new();
        let guard = super::spared();
        if read_children(std::process::id(), &mut children).is_ok()
            && children.iter().all(|&child| child == guard)
        {
            return;
        }
        reap_descendants(self.pid);
    }
}

pub fn become_subreaper() {
    let me = rustix::process::getpid();
    let _ = rustix::process::set_child_subreaper(Some(me));
}

/// Its own process group, and SIGKILL when singleflight dies.
pub fn prepare(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    group::prepare(command);
    let parent = rustix::process::getpid();
    // SAFETY: the closure runs in the child between fork and exec, where a
    // multi-threaded parent's heap lock may be held by a thread that no longer exists:
    // it makes two raw syscalls (prctl, getppid) and nothing else. No allocation: the
    // errors are `from_raw_os_error` (an integer inside the `io::Error`), and rustix's
    // `Errno` converts to one the same way.
    unsafe {
        command.pre_exec(move || {
            use rustix::process::{getppid, set_parent_process_death_signal};
            set_parent_process_death_signal(Some(Signal::KILL))
                .map_err(|e| io::Error::from_raw_os_error(e.raw_os_error()))?;
            // singleflight may have died before the death signal was armed: the child
            // then fails to start with ESRCH ("no such process").
            if getppid() != Some(parent) {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Signals `pid` through a pidfd, if it is still the process that started at `start`.
pub fn signal_process(pid: u32, start: u64, stop: Stop) -> bool {
    let Some(fd) = Pid::from_raw(pid as i32)
        .and_then(|pid| rustix::process::pidfd_open(pid, PidfdFlags::empty()).ok())
    else {
        return false;
    };
    // Read after the pidfd is open: a pid reused in between shows another start time.
    if Stat::read(pid).is_none_or(|stat| stat.start_ticks != start || !stat.alive()) {
        return false;
    }
    rustix::process::pidfd_send_signal(&fd, group::signal_of(stop)).is_ok()
}

pub fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|id| id.trim().to_owned())
        .unwrap_or_default()
}

/// In clock ticks since boot.
pub fn start_ticks(pid: u32) -> u64 {
    Stat::read(pid).map_or(0, |stat| stat.start_ticks)
}

/// The fields of `/proc/PID/stat` that identify a process and place it in a tree.
#[derive(Clone, Copy)]
pub struct Stat {
    pub pid: u32,
    pub state: u8,
    pub ppid: u32,
    pub pgrp: u32,
    pub session: u32,
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
            session: fields.get(3)?.parse().ok()?,
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

/// Every process below `root` in the tree (not `root` itself), but the guard.
fn descendants(root: u32) -> Vec<Stat> {
    let processes = all_processes();
    let guard = super::spared();
    let mut found = Vec::new();
    let mut parents = vec![root];
    while let Some(parent) = parents.pop() {
        for p in processes
            .iter()
            .filter(|p| p.ppid == parent && p.pid != guard && !other_runs_refresher(p))
        {
            parents.push(p.pid);
            found.push(*p);
        }
    }
    found
}

/// Sends `signal`; false only if the process exists and may not be signalled
/// (EPERM: a setuid program, say).
fn kill(stat: Stat, signal: Signal) -> bool {
    Pid::from_raw(stat.pid as i32).is_none_or(|pid| {
        !matches!(rustix::process::kill_process(pid, signal), Err(e) if e == rustix::io::Errno::PERM)
    })
}

/// Kills and reaps every descendant until none is left. Orphans are reparented to
/// singleflight (a subreaper) as their parents die, so each pass finds the next
/// generation; SIGKILLed processes cannot fork, so the passes end. A process that
/// may not be killed is left (and not waited for), or this would never return.
fn reap_descendants(command_pid: u32) {
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
    // The group id is the command's pid. It is provably this run's group only while
    // its leader lives: once the leader is gone and the group's last member exits
    // the pid is free, and a stranger may lead a group with that id (a pipeline
    // whose first command ended, a daemon). So no leader, no group.
    let group_is_ours = record.pid != 0
        && record.start_ticks != 0
        && Stat::read(record.pid).is_some_and(|leader| {
            leader.alive() && leader.start_ticks == record.start_ticks && leader.pgrp == record.pid
        });
    let me = std::process::id();
    // Bounded: each pass kills all it finds, and a killed process cannot fork.
    for _ in 0..100 {
        let remains: Vec<Stat> = all_processes()
            .into_iter()
            .filter(|p| p.alive() && p.pid != me && p.start_ticks >= record.start_ticks)
            .filter(|p| (group_is_ours && p.pgrp == record.pid) || carries_token(p.pid, &needle))
            .filter(|p| !other_runs_refresher(p))
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

/// The children of `pid`, from `/proc/PID/task/*/children` (each thread's own), as
/// many as can be read.
fn children(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    let _ = read_children(pid, &mut found);
    found
}

/// Adds the children of `pid` to `found`; an error if any thread's list could not be
/// read (a thread that ended meanwhile, a kernel without `/proc/PID/task/*/children`),
/// when `found` may miss some.
fn read_children(pid: u32, found: &mut Vec<u32>) -> io::Result<()> {
    let mut complete = Ok(());
    for task in fs::read_dir(format!("/proc/{pid}/task"))? {
        match task.and_then(|task| fs::read_to_string(task.path().join("children"))) {
            Ok(list) => found.extend(
                list.split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            ),
            Err(e) => complete = Err(e),
        }
    }
    complete
}

/// Adds every live descendant of `owner` but the caller (the guard) to `seen`.
pub fn note_tree(owner: u32, seen: &mut HashMap<u32, u64>) {
    let me = std::process::id();
    let mut parents = vec![owner];
    while let Some(parent) = parents.pop() {
        for child in children(parent) {
            if child == me {
                continue;
            }
            if let Some(stat) = Stat::read(child)
                && stat.alive()
                && !other_runs_refresher(&stat)
            {
                seen.insert(child, stat.start_ticks);
                parents.push(child);
            }
        }
    }
}

/// A handle on `pid` that stays with that very process (a pidfd), if it is still the
/// one that started at `start`: the start time is read after the pidfd is opened, so
/// a pid reused in between is caught, and signals through the handle can never reach
/// a later process with the same pid.
fn hold(pid: u32, start: u64) -> Option<OwnedFd> {
    let fd = rustix::process::pidfd_open(Pid::from_raw(pid as i32)?, PidfdFlags::empty()).ok()?;
    let stat = Stat::read(pid)?;
    (stat.start_ticks == start && stat.alive() && !other_runs_refresher(&stat)).then_some(fd)
}

/// The guard's clean-up once singleflight died: the run's processes it saw, those
/// carrying the run's token, and every descendant of those. Each is first stopped
/// (SIGSTOP), generation by generation, so that none can fork a child away while the
/// tree is walked; then all are killed. Every signal goes through a pidfd held on a
/// process whose start time was checked.
pub fn kill_run(known: &super::Known) {
    let mut held: HashMap<u32, OwnedFd> = HashMap::new();
    let mut next: Vec<(u32, u64)> = known.seen.iter().map(|(p, s)| (*p, *s)).collect();
    if let Some((command, start)) = known.command {
        next.push((command, start));
        // Escapees the looks missed (started in the last moments), if they kept the
        // token; a token is no proof alone, so only processes younger than the run.
        if !known.token.is_empty() {
            let needle = format!("{}={}", super::RUN_ID_ENV, known.token).into_bytes();
            next.extend(
                all_processes()
                    .into_iter()
                    .filter(|p| p.alive() && p.start_ticks >= start)
                    .filter(|p| carries_token(p.pid, &needle))
                    .map(|p| (p.pid, p.start_ticks)),
            );
        }
    }
    // Bounded: a stopped process cannot fork, so each pass finds fewer new ones.
    for _ in 0..1000 {
        let mut stopped = Vec::new();
        for (pid, start) in next.drain(..) {
            if held.contains_key(&pid) {
                continue;
            }
            if let Some(fd) = hold(pid, start) {
                let _ = rustix::process::pidfd_send_signal(&fd, Signal::STOP);
                held.insert(pid, fd);
                stopped.push(pid);
            }
        }
        if stopped.is_empty() {
            break;
        }
        for parent in stopped {
            for child in children(parent) {
                if let Some(stat) = Stat::read(child)
                    && stat.ppid == parent
                {
                    next.push((child, stat.start_ticks));
                }
            }
        }
    }
    for fd in held.values() {
        let _ = rustix::process::pidfd_send_signal(fd, Signal::KILL);
    }
}

/// Whether `stat` is a `--background` refresher of another run, started inside this
/// one (a status line script calling `singleflight --background inner …`): such a
/// refresher finishes under its own limits, so a run's clean-up leaves it and its
/// tree alone. Proof, not a mark anyone could copy: it is singleflight itself (the
/// same executable), leads its own session, was started as a refresher
/// (`--refresher…`), and holds an flock'd file (the other NAME's lock it was handed).
/// A process of the run that is all of that is a refresher.
fn other_runs_refresher(stat: &Stat) -> bool {
    use std::os::unix::fs::MetadataExt;
    if stat.session != stat.pid {
        return false;
    }
    let same_file = |a: &fs::Metadata, b: &fs::Metadata| a.dev() == b.dev() && a.ino() == b.ino();
    let pid = stat.pid;
    let (Ok(theirs), Ok(ours)) = (
        fs::metadata(format!("/proc/{pid}/exe")),
        fs::metadata("/proc/self/exe"),
    ) else {
        return false;
    };
    if !same_file(&theirs, &ours) {
        return false;
    }
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if !cmdline
        .split(|b| *b == 0)
        .any(|arg| arg.starts_with(b"--refresher"))
    {
        return false;
    }
    // /proc/locks: "1: FLOCK  ADVISORY  WRITE PID MAJ:MIN:INODE 0 EOF", device in hex.
    let locks = fs::read_to_string("/proc/locks").unwrap_or_default();
    let locked: Vec<(u64, u64, u64)> = locks
        .lines()
        .filter(|l| l.contains("FLOCK"))
        .filter_map(|l| {
            let id = l.split_whitespace().nth(5)?;
            let mut parts = id.split(':');
            let major = u64::from_str_radix(parts.next()?, 16).ok()?;
            let minor = u64::from_str_radix(parts.next()?, 16).ok()?;
            let inode = parts.next()?.parse().ok()?;
            Some((major, minor, inode))
        })
        .collect();
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        fs::metadata(fd.path()).is_ok_and(|m| {
            let dev = m.dev();
            let id = (
                u64::from(rustix::fs::major(dev)),
                u64::from(rustix::fs::minor(dev)),
                m.ino(),
            );
            locked.contains(&id)
        })
    })
}
