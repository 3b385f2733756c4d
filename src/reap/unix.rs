//! The side of a run's tree on Unixes other than Linux (macOS, the BSDs): the process
//! group alone. There is no death signal and no cheap walk of the tree, so a process
//! that leaves the group is out of reach, and the remains of a killed run are its
//! group, killed only while its leader provably is the run's command.

use std::io;
use std::process::{Child, Command};

use super::{Stop, group};
use crate::record::RunRecord;

/// The command's process group.
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
    }

    pub fn kill_leftovers(self) {
        group::signal(self.pid, Stop::Kill);
    }
}

/// Nothing to become: orphans go to init (launchd).
pub fn become_subreaper() {}

pub fn prepare(command: &mut Command) {
    group::prepare(command);
}

pub fn kill_remains(record: &RunRecord) {
    kill_group_of(record.pid, record.start_ticks);
}

/// Nothing to note: the guard relies on the group.
pub fn note_tree(_owner: u32, _seen: &mut std::collections::HashMap<u32, u64>) {}

/// No death signal here: the command outlived singleflight, so its group's leader is
/// still there to prove the group is the run's.
pub fn kill_run(known: &super::Known) {
    if let Some((pid, start)) = known.command {
        kill_group_of(pid, start);
    }
}

/// SIGKILL to the group that `leader` leads, if `leader` is alive with this start time.
fn kill_group_of(leader: u32, start: u64) {
    if start != 0 && start_ticks(leader) == start {
        group::signal(leader, Stop::Kill);
    }
}

/// Signals `pid` if it is alive with this start time (checked just before: a pid
/// reused in that moment is the one gap, which Linux closes with a pidfd).
pub fn signal_process(pid: u32, start: u64, stop: Stop) -> bool {
    if start == 0 || start_ticks(pid) != start {
        return false;
    }
    let Some(pid) = rustix::process::Pid::from_raw(pid as i32) else {
        return false;
    };
    rustix::process::kill_process(pid, group::signal_of(stop)).is_ok()
}

/// No boot id to read.
pub fn boot_id() -> String {
    String::new()
}

/// In microseconds since the epoch on macOS; 0 (unknown) elsewhere.
pub fn start_ticks(pid: u32) -> u64 {
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
