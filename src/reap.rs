//! The process tree of a run: preparing the command (own process group, death signal),
//! signalling the whole tree, reaping what it left behind, and killing what a killed
//! singleflight left behind. Linux finds escapees (setsid, double fork) as a child
//! subreaper and by a token in their environment; other Unixes have the process group.

use std::process::Command;

/// Set in the environment of every process of a run, to find its tree later.
pub const RUN_ID_ENV: &str = "SINGLEFLIGHT_RUN_ID";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// SIGTERM: please stop.
    Term,
    /// SIGKILL.
    Kill,
}

/// Makes orphaned descendants of this process its children (Linux), so that escapees
/// can be found and reaped. Call once before the first spawn.
pub fn become_subreaper() {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        let me = rustix::process::getpid();
        let _ = rustix::process::set_child_subreaper(Some(me));
    }
}

/// Puts the command in its own process group and, on Linux, has the kernel kill it
/// if singleflight dies (SIGKILL included). The command must be spawned from the
/// thread that lives as long as the run: the death signal fires when that thread ends.
pub fn prepare(command: &mut Command, token: &str) {
    command.env(RUN_ID_ENV, token);
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        command.process_group(0);
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            let parent = rustix::process::getpid();
            // SAFETY: only async-signal-safe syscalls between fork and exec.
            unsafe {
                command.pre_exec(move || {
                    use rustix::process::{Signal, getppid, set_parent_process_death_signal};
                    set_parent_process_death_signal(Some(Signal::KILL))?;
                    // singleflight may have died before the death signal was armed.
                    if getppid() != Some(parent) {
                        return Err(std::io::Error::other("singleflight exited"));
                    }
                    Ok(())
                });
            }
        }
    }
}

/// Signals the run's process group and, on Linux, every descendant of singleflight
/// (which includes the ones that left the group).
pub fn signal_tree(group: u32, stop: Stop) {
    #[cfg(unix)]
    {
        use rustix::process::{Pid, Signal, kill_process_group};
        let signal = match stop {
            Stop::Term => Signal::TERM,
            Stop::Kill => Signal::KILL,
        };
        if let Some(pid) = Pid::from_raw(group as i32) {
            let _ = kill_process_group(pid, signal);
        }
        #[cfg(any(target_os = "linux", target_os = "android"))]
        for pid in linux::descendants(std::process::id()) {
            linux::kill(pid, signal);
        }
    }
    #[cfg(not(unix))]
    let _ = (group, stop);
}

/// After the command itself has exited and been reaped: kills whatever is left of
/// its tree and reaps it, so that the run never outlives a process it started.
pub fn kill_leftovers(group: u32) {
    signal_tree(group, Stop::Kill);
    #[cfg(any(target_os = "linux", target_os = "android"))]
    linux::reap_descendants(group);
}

/// Kills what a run whose singleflight was killed left behind: the processes that
/// carry its token, and the members of its process group if the group is still its
/// own (pid and start time checked, so that a reused pid is never hit).
pub fn kill_remains(record: &crate::record::RunRecord) {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    linux::kill_remains(record);
    #[cfg(all(unix, not(any(target_os = "linux", target_os = "android"))))]
    if let Some(pid) = rustix::process::Pid::from_raw(record.pid as i32) {
        // Without /proc there is no start time to check. A live process with the
        // recorded pid may be a stranger that reused it: it is left alone (and with
        // it, there being no death signal here, the run's own leader). A pid that is
        // gone cannot have been handed out again while its group lives on, so a group
        // with that id is still the run's.
        use rustix::process::{Signal, kill_process_group, test_kill_process};
        if test_kill_process(pid).is_err_and(|e| e == rustix::io::Errno::SRCH) {
            let _ = kill_process_group(pid, Signal::KILL);
        }
    }
    #[cfg(not(unix))]
    let _ = record;
}

/// The kernel's boot id, to tell records of an earlier boot apart.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|id| id.trim().to_owned())
        .unwrap_or_default()
}

/// The start time of `pid` in clock ticks since boot, 0 if unknown.
pub fn start_ticks(pid: u32) -> u64 {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Some(stat) = linux::Stat::read(pid) {
        return stat.start_ticks;
    }
    let _ = pid;
    0
}

#[cfg(any(target_os = "linux", target_os = "android"))]
mod linux {
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

    pub fn kill(stat: Stat, signal: Signal) {
        if let Some(pid) = Pid::from_raw(stat.pid as i32) {
            let _ = rustix::process::kill_process(pid, signal);
        }
    }

    /// Kills and reaps every descendant until none is left. Orphans are reparented to
    /// singleflight (a subreaper) as their parents die, so each pass finds the next
    /// generation; SIGKILLed processes cannot fork, so the passes end.
    pub fn reap_descendants(command_pid: u32) {
        let me = std::process::id();
        loop {
            let rest = descendants(me);
            if rest.is_empty() {
                return;
            }
            let children: Vec<u32> = rest
                .iter()
                .filter(|p| p.ppid == me && p.pid != command_pid)
                .map(|p| p.pid)
                .collect();
            for stat in rest {
                kill(stat, Signal::KILL);
            }
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
                .filter(|p| {
                    (group_is_ours && p.pgrp == record.pid) || carries_token(p.pid, &needle)
                })
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
}
