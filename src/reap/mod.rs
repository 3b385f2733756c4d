//! The process tree of a run: preparing the command (own process group, death signal),
//! signalling the whole tree, reaping what it left behind, and killing what a killed
//! singleflight left behind.
//!
//! This file is the portable interface; each platform implements it in its own file:
//! `linux.rs` finds escapees (setsid, double fork) as a child subreaper and by a token
//! in their environment, on top of the process group (`group.rs`); `unix.rs` (macOS,
//! the BSDs) has the process group alone; `windows.rs` has a Job Object that kills the
//! tree when it is closed. A new platform is one more file with the functions below.

#[cfg(unix)]
use std::collections::HashMap;
use std::io;
use std::process::{Child, Command};

use crate::record::RunRecord;

mod detach;
#[cfg(unix)]
mod group;
#[cfg(unix)]
pub mod terminal;

pub use detach::{adopt_pipe, own_executable, spawn_detached};

#[cfg(any(target_os = "linux", target_os = "android"))]
mod linux;
#[cfg(any(target_os = "linux", target_os = "android"))]
use linux as sys;
#[cfg(all(unix, not(any(target_os = "linux", target_os = "android"))))]
mod unix;
#[cfg(all(unix, not(any(target_os = "linux", target_os = "android"))))]
use unix as sys;
#[cfg(windows)]
pub(crate) mod windows;
#[cfg(windows)]
use windows as sys;

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
pub struct Tree(sys::Tree);

impl Tree {
    /// Takes charge of the tree of a command spawned after [`prepare`]. On Windows the
    /// command was created suspended: it is put in a Job Object that kills everything
    /// in it when closed (so the tree dies with singleflight, however singleflight
    /// dies) and only then let go, so nothing it starts can be outside the job. If that
    /// fails, the command is killed before it ran a single instruction.
    pub fn adopt(child: &mut Child) -> io::Result<Tree> {
        sys::Tree::adopt(child).map(Tree)
    }

    /// The command's pid (on Unix also its process group id).
    pub fn pid(&self) -> u32 {
        self.0.pid()
    }

    /// Asks the whole tree to stop ([`Stop::Term`]) or kills it ([`Stop::Kill`]). On
    /// Windows the ask is a CTRL_BREAK to the command's console process group; a tree
    /// that cannot get one (no console) is killed at once.
    pub fn signal(&self, stop: Stop) {
        self.0.signal(stop);
    }

    /// After the command itself has exited and been reaped: kills whatever is left of
    /// its tree and waits until it is gone, so that the run never outlives a process
    /// it started.
    pub fn kill_leftovers(self) {
        self.0.kill_leftovers();
    }
}

/// Makes orphaned descendants of this process its children (Linux), so that escapees
/// can be found and reaped. Call once before the first spawn.
pub fn become_subreaper() {
    sys::become_subreaper();
}

/// Puts the command in its own process group and, on Linux, has the kernel kill it
/// if singleflight dies (SIGKILL included). The command must be spawned from the
/// thread that lives as long as the run: the death signal fires when that thread ends.
/// On Windows it is created suspended in a new console process group, for
/// [`Tree::adopt`].
pub fn prepare(command: &mut Command, token: &str) {
    command.env(RUN_ID_ENV, token);
    sys::prepare(command);
}

/// Kills what a run whose singleflight was killed left behind: the processes that
/// carry its token (Linux), and the members of its process group if the group is
/// provably still its own: its leader alive with the recorded pid and start time. A
/// group whose leader is gone may be anyone's (the pid is free again once the group's
/// last member exits), so it is left alone. (Windows: the Job Object died with
/// singleflight and took the tree with it.)
pub fn kill_remains(record: &RunRecord) {
    sys::kill_remains(record);
}

/// The guard's look at the run while singleflight lives: adds every descendant of
/// `owner` (but the guard) to `seen`, by pid and start time. Elsewhere than Linux
/// there is no cheap way to walk the tree, and the guard relies on the group.
#[cfg(unix)]
pub fn note_tree(owner: u32, seen: &mut HashMap<u32, u64>) {
    sys::note_tree(owner, seen);
}

/// The guard's work when singleflight died: kills the run's tree, never a process
/// that is not provably of the run (pid and start time checked before each signal).
#[cfg(unix)]
pub fn kill_run(known: &Known) {
    sys::kill_run(known);
}

/// What the guard ([`crate::guard`]) knows of the run it watches.
#[cfg(unix)]
#[derive(Default)]
pub struct Known {
    /// Processes seen in the run's tree: pid and start time.
    pub seen: HashMap<u32, u64>,
    /// The command (its process group's leader): pid and start time.
    pub command: Option<(u32, u64)>,
    /// The run's token (`SINGLEFLIGHT_RUN_ID`); read from `/proc` on Linux only.
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    pub token: String,
}

/// Sends `stop` to the one process `pid`, if it provably still is the process that
/// started at `start` (a run's singleflight, for `stop`); whether it was sent. Never
/// sent where the start time is unknown (0). On Windows both stops terminate the
/// process (its Job Object then kills its command's tree) and wait until it is gone.
pub fn signal_process(pid: u32, start: u64, stop: Stop) -> bool {
    start != 0 && sys::signal_process(pid, start, stop)
}

/// Why [`signal_process`] sent nothing to `pid`, in words, for `stop`'s one line.
#[cfg(unix)]
pub fn unproven(_pid: u32, _start: u64) -> String {
    "it cannot be proven to be the run's singleflight (gone, another process now, or a \
     platform where singleflight cannot tell)"
        .to_owned()
}

/// Why [`signal_process`] sent nothing to `pid`, in words, for `stop`'s one line: gone,
/// or another process now (its creation time is not the recorded one).
#[cfg(windows)]
pub fn unproven(pid: u32, start: u64) -> String {
    sys::unproven(pid, start)
}

/// The kernel's boot id, to tell records of an earlier boot apart ("" where there is
/// none to read).
pub fn boot_id() -> String {
    sys::boot_id()
}

/// The start time of `pid`, 0 if unknown: on Linux in clock ticks since boot, on
/// macOS in microseconds since the epoch, on Windows its creation time in 100 ns since
/// 1601. Only ever compared with itself.
pub fn start_ticks(pid: u32) -> u64 {
    sys::start_ticks(pid)
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

/// The guard's pid, 0 for none.
#[cfg_attr(not(any(target_os = "linux", target_os = "android")), allow(dead_code))]
fn spared() -> u32 {
    GUARD.load(std::sync::atomic::Ordering::Relaxed)
}
