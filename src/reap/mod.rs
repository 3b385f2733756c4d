//! The process tree of a run: preparing the command (own process group, death signal),
//! signalling the whole tree, reaping what it left behind, and killing what a killed
//! singleflight left behind. Linux finds escapees (setsid, double fork) as a child
//! subreaper and by a token in their environment; other Unixes have the process group;
//! Windows has a Job Object that kills the tree when it is closed.

use std::io;
use std::process::{Child, Command};

/// Set in the environment of every process of a run, to find its tree later.
pub const RUN_ID_ENV: &str = "SINGLEFLIGHT_RUN_ID";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// SIGTERM: please stop.
    Term,
    /// SIGKILL.
    Kill,
}

/// The process tree of one run, from its spawn until it is gone: the command's process
/// group on Unix, its Job Object on Windows.
pub struct Tree {
    /// The command's pid, which is also its process group id.
    pid: u32,
    #[cfg(windows)]
    job: windows::Job,
}

impl Tree {
    /// Takes charge of the tree of a command spawned after [`prepare`]. On Windows the
    /// command was created suspended: it is put in a Job Object that kills everything
    /// in it when closed (so the tree dies with singleflight, however singleflight
    /// dies) and only then let go, so nothing it starts can be outside the job. If that
    /// fails, the command is killed before it ran a single instruction.
    pub fn adopt(child: &mut Child) -> io::Result<Tree> {
        #[cfg(windows)]
        {
            let adopted = windows::Job::new().and_then(|job| {
                job.assign(child)?;
                windows::resume(child.id())?;
                Ok(job)
            });
            match adopted {
                Ok(job) => Ok(Tree {
                    pid: child.id(),
                    job,
                }),
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    Err(e)
                }
            }
        }
        #[cfg(not(windows))]
        Ok(Tree { pid: child.id() })
    }

    /// The command's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Asks the whole tree to stop ([`Stop::Term`]) or kills it ([`Stop::Kill`]). On
    /// Windows the ask is a CTRL_BREAK to the command's console process group; a tree
    /// that cannot get one (no console) is killed at once.
    pub fn signal(&self, stop: Stop) {
        #[cfg(windows)]
        if stop == Stop::Kill || !windows::ctrl_break(self.pid) {
            self.job.terminate();
        }
        #[cfg(not(windows))]
        signal_tree(self.pid, stop);
    }

    /// After the command itself has exited: kills whatever is left of its tree and
    /// waits until it is gone.
    pub fn kill_leftovers(self) {
        #[cfg(windows)]
        {
            self.job.terminate();
            self.job.wait_until_empty();
        }
        #[cfg(not(windows))]
        kill_leftovers(self.pid);
    }
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
/// On Windows it is created suspended in a new console process group, for
/// [`Tree::adopt`].
pub fn prepare(command: &mut Command, token: &str) {
    command.env(RUN_ID_ENV, token);
    #[cfg(windows)]
    std::os::windows::process::CommandExt::creation_flags(command, windows::RUN_FLAGS);
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        command.process_group(0);
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            let parent = rustix::process::getpid();
            // SAFETY: the closure runs in the child between fork and exec, where a
            // multi-threaded parent's heap lock may be held by a thread that no longer
            // exists: it makes two raw syscalls (prctl, getppid) and nothing else. No
            // allocation: the errors are `from_raw_os_error` (an integer inside the
            // `io::Error`), and rustix's `Errno` converts to one the same way.
            unsafe {
                command.pre_exec(move || {
                    use rustix::process::{Signal, getppid, set_parent_process_death_signal};
                    set_parent_process_death_signal(Some(Signal::KILL))
                        .map_err(|e| std::io::Error::from_raw_os_error(e.raw_os_error()))?;
                    // singleflight may have died before the death signal was armed:
                    // the child then fails to start with ESRCH ("no such process").
                    if getppid() != Some(parent) {
                        return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                    }
                    Ok(())
                });
            }
        }
    }
}

/// Signals the run's process group and, on Linux, every descendant of singleflight
/// (which includes the ones that left the group).
#[cfg(not(windows))]
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
            // A stopped process acts on SIGTERM only once continued (as timeout(1)).
            if stop == Stop::Term {
                let _ = kill_process_group(pid, Signal::CONT);
            }
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
#[cfg(not(windows))]
pub fn kill_leftovers(group: u32) {
    signal_tree(group, Stop::Kill);
    #[cfg(any(target_os = "linux", target_os = "android"))]
    linux::reap_descendants(group);
}

/// Kills what a run whose singleflight was killed left behind: the processes that
/// carry its token, and the members of its process group if the group is provably
/// still its own: its leader alive with the recorded pid and start time. A group
/// whose leader is gone may be anyone's (the pid is free again once the group's last
/// member exits), so it is left alone.
pub fn kill_remains(record: &crate::record::RunRecord) {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    linux::kill_remains(record);
    #[cfg(all(unix, not(any(target_os = "linux", target_os = "android"))))]
    if record.start_ticks != 0 && start_ticks(record.pid) == record.start_ticks {
        kill_group(record.pid);
    }
    #[cfg(not(unix))]
    let _ = record;
}

/// SIGKILL to the process group `group`.
#[cfg(all(unix, not(any(target_os = "linux", target_os = "android"))))]
fn kill_group(group: u32) {
    if let Some(pid) = rustix::process::Pid::from_raw(group as i32) {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
}

/// The pid of this process's guard ([`crate::guard`]), 0 for none: it is
/// singleflight's child but not of the run, so the run's clean-up spares it.
#[cfg_attr(
    windows,
    allow(dead_code, reason = "no guard on Windows: the Job Object is one")
)]
static GUARD: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Marks `pid` (0: nothing) as the guard, which the run's clean-up leaves alone.
#[cfg_attr(windows, allow(dead_code))]
pub fn spare(pid: u32) {
    GUARD.store(pid, std::sync::atomic::Ordering::Relaxed);
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn spared() -> u32 {
    GUARD.load(std::sync::atomic::Ordering::Relaxed)
}

/// The guard's look at the run while singleflight lives: adds every descendant of
/// `owner` (but the guard) to `seen`, by pid and start time. Elsewhere than Linux
/// there is no cheap way to walk the tree, and the guard relies on the group.
#[cfg(unix)]
pub fn note_tree(owner: u32, seen: &mut std::collections::HashMap<u32, u64>) {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    linux::note_tree(owner, seen);
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = (owner, seen);
}

/// The guard's work when singleflight died: kills the run's tree, never a process
/// that is not provably of the run (pid and start time checked before each signal).
#[cfg(unix)]
pub fn kill_run(known: &crate::guard::Known) {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    linux::kill_run(known);
    // No death signal here: the command outlived singleflight, so its group's leader
    // is still there to prove the group is the run's.
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    if let Some((pid, start)) = known.command
        && start != 0
        && start_ticks(pid) == start
    {
        kill_group(pid);
    }
}

/// The kernel's boot id, to tell records of an earlier boot apart.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|id| id.trim().to_owned())
        .unwrap_or_default()
}

/// The start time of `pid`, 0 if unknown: on Linux in clock ticks since boot, on
/// macOS in microseconds since the epoch. Only ever compared with itself.
pub fn start_ticks(pid: u32) -> u64 {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Some(stat) = linux::Stat::read(pid) {
        return stat.start_ticks;
    }
    #[cfg(target_os = "macos")]
    {
        let mut info: libc::proc_bsdinfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::proc_bsdinfo>() as libc::c_int;
        // SAFETY: proc_pidinfo writes at most `size` bytes into `info`.
        let got = unsafe {
            libc::proc_pidinfo(
                pid as libc::c_int,
                libc::PROC_PIDTBSDINFO,
                0,
                (&raw mut info).cast(),
                size,
            )
        };
        if got == size {
            return info.pbi_start_tvsec * 1_000_000 + info.pbi_start_tvusec;
        }
    }
    let _ = pid;
    0
}

#[cfg(unix)]
pub mod terminal;
#[cfg(windows)]
pub(crate) mod windows;

#[cfg(any(target_os = "linux", target_os = "android"))]
mod linux;
