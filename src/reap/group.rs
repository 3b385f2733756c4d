//! The Unix process group of a run: the command leads its own group, and the group is
//! signalled as one. Linux adds what a group misses (`linux.rs`); other Unixes have the
//! group alone (`unix.rs`).

use std::process::Command;

use rustix::process::{Pid, Signal, kill_process_group};

use super::Stop;

/// Makes the command the leader of a new process group.
pub fn prepare(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    command.process_group(0);
}

/// The signal a stop sends.
pub fn signal_of(stop: Stop) -> Signal {
    match stop {
        Stop::Term => Signal::TERM,
        Stop::Kill => Signal::KILL,
    }
}

/// Signals the process group `group`. A stopped process acts on SIGTERM only once
/// continued (as timeout(1) does it), so a TERM is followed by a CONT.
pub fn signal(group: u32, stop: Stop) {
    let Some(pid) = Pid::from_raw(group as i32) else {
        return;
    };
    let _ = kill_process_group(pid, signal_of(stop));
    if stop == Stop::Term {
        let _ = kill_process_group(pid, Signal::CONT);
    }
}
