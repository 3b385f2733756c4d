//! Job control for a run in the foreground of a terminal: the command's process group
//! gets the terminal for the run (a command that asks for a password on `/dev/tty`
//! reads what the user types, not the shell) and singleflight takes it back however
//! the run ends; Ctrl-Z (which the terminal then sends to the command's group) stops
//! singleflight too, and `fg` continues both.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};

/// The controlling terminal of a singleflight that runs in its foreground.
pub struct Terminal {
    tty: File,
    /// The command's group holds the terminal (given, not yet taken back).
    given: std::cell::Cell<bool>,
}

impl Terminal {
    /// The controlling terminal, if there is one and singleflight's process group is
    /// its foreground group (a shell's foreground job). A caller in the background,
    /// or without a terminal (cron, a refresher in its own session), gets `None` and
    /// never touches a terminal.
    pub fn if_foreground() -> Option<Terminal> {
        let tty = File::options()
            .read(true)
            .write(true)
            .open("/dev/tty")
            .ok()?;
        // SAFETY: tcgetpgrp and getpgrp only read; the fd is open.
        let foreground = unsafe { libc::tcgetpgrp(tty.as_raw_fd()) == libc::getpgrp() };
        foreground.then_some(Terminal {
            tty,
            given: std::cell::Cell::new(false),
        })
    }

    /// The fd, for the command's `pre_exec` (it takes the terminal itself, so that
    /// it never reads the terminal from the background before singleflight hands it).
    pub fn fd(&self) -> RawFd {
        self.tty.as_raw_fd()
    }

    /// Makes `group` the terminal's foreground group.
    pub fn give(&self, group: u32) {
        if set_foreground(self.fd(), group as libc::pid_t) {
            self.given.set(true);
        }
    }

    /// Gives the terminal back to singleflight's own process group, if the command's
    /// group has it from us (after `bg` it is the shell's, and stays so).
    pub fn reclaim(&self) {
        if self.given.replace(false) {
            // SAFETY: getpgrp cannot fail.
            set_foreground(self.fd(), unsafe { libc::getpgrp() });
        }
    }

    /// Whether singleflight's group is the terminal's foreground group again (`fg`,
    /// as opposed to `bg`).
    pub fn ours(&self) -> bool {
        // SAFETY: as in `if_foreground`.
        unsafe { libc::tcgetpgrp(self.fd()) == libc::getpgrp() }
    }
}

impl Drop for Terminal {
    /// However the run ends (a spawn that failed after the child took the terminal
    /// included), the terminal goes back.
    fn drop(&mut self) {
        self.reclaim();
    }
}

/// Has the command take the terminal itself between fork and exec, so that it never
/// reads the terminal from the background before singleflight hands it over.
pub fn hand_to_child(command: &mut std::process::Command, terminal: &Terminal) {
    use std::os::unix::process::CommandExt;
    // From the spawn on, the terminal may be the command's: taken back at the end
    // whatever happens, a failed exec included.
    terminal.given.set(true);
    let tty = terminal.fd();
    // SAFETY: between fork and exec the closure makes raw syscalls only (getpid,
    // sigprocmask, tcsetpgrp) and allocates nothing. std has already put the child in
    // its own group (process_group runs before the pre_exec closures).
    unsafe {
        command.pre_exec(move || {
            set_foreground(tty, libc::getpid());
            Ok(())
        });
    }
}

/// Stops the run with singleflight (the command's group got Ctrl-Z, or read the
/// terminal from the background): the terminal goes back to singleflight's group, the
/// whole group is stopped, and singleflight stops itself, so that the shell sees its
/// job stopped. On `fg` (or `bg`) the group is continued, and gets the terminal again
/// if singleflight is in the foreground. Returns how long the run was stopped.
pub fn suspend(terminal: &Terminal, group: u32) -> std::time::Duration {
    use rustix::process::{Pid, Signal, kill_process, kill_process_group};
    terminal.reclaim();
    let Some(group_id) = Pid::from_raw(group as i32) else {
        return std::time::Duration::ZERO;
    };
    let _ = kill_process_group(group_id, Signal::STOP);
    let stopped = std::time::Instant::now();
    let _ = kill_process(rustix::process::getpid(), Signal::STOP);
    // Continued.
    if terminal.ours() {
        terminal.give(group);
    }
    let _ = kill_process_group(group_id, Signal::CONT);
    stopped.elapsed()
}

/// tcsetpgrp with SIGTTOU blocked: a process outside the foreground group that sets
/// it would otherwise be stopped by SIGTTOU. Async-signal-safe (used between fork and
/// exec): three syscalls, no allocation.
pub fn set_foreground(tty: RawFd, group: libc::pid_t) -> bool {
    // SAFETY: sigset_t is plain data filled by sigemptyset/sigaddset; the masks live on
    // this stack frame; tcsetpgrp on an open fd.
    unsafe {
        let mut block: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut block);
        libc::sigaddset(&mut block, libc::SIGTTOU);
        libc::pthread_sigmask(libc::SIG_BLOCK, &block, &mut old);
        let done = libc::tcsetpgrp(tty, group) == 0;
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        done
    }
}

/// What the command did, as its parent sees it without reaping it.
pub enum Seen {
    Stopped,
    Exited,
}

/// Waits until the command `pid` stops or exits. A stop is consumed; an exit is left
/// for `Child::wait` to reap.
pub fn wait_stop_or_exit(pid: u32) -> Seen {
    loop {
        // SAFETY: waitid fills `info`, which lives on this stack frame.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let flags = libc::WEXITED | libc::WSTOPPED | libc::WNOWAIT;
        let got = unsafe { libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, flags) };
        if got != 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Seen::Exited;
        }
        if info.si_code != libc::CLD_STOPPED && info.si_code != libc::CLD_TRAPPED {
            return Seen::Exited;
        }
        // Consume the stop (WNOHANG: it may have been continued meanwhile).
        // SAFETY: as above.
        unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WSTOPPED | libc::WNOHANG,
            )
        };
        return Seen::Stopped;
    }
}
