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

#[cfg(windows)]
pub(crate) mod windows;

#[cfg(any(target_os = "linux", target_os = "android"))]
mod linux;
