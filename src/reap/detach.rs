//! Starting a process that outlives its caller, apart from it: a `--background`
//! refresher or a `--service` supervisor is this very executable, in a session of its
//! own (Unix) or a hidden console and process group of its own (Windows), inheriting
//! no file descriptor but the ones it is handed (the NAME's lock, a hand-back pipe).

use std::io;
use std::process::{Child, Command};

/// A command that runs this very executable. On Linux through /proc/self/exe, which
/// works even after the binary was replaced on disk; the process keeps its usual name
/// for `ps` and `pgrep`.
pub fn own_executable() -> io::Result<Command> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if std::path::Path::new("/proc/self/exe").exists() {
        use std::os::unix::process::CommandExt;
        let mut command = Command::new("/proc/self/exe");
        let name = crate::args()
            .first()
            .cloned()
            .unwrap_or_else(|| "singleflight".into());
        command.arg0(name);
        return Ok(command);
    }
    Ok(Command::new(std::env::current_exe()?))
}

/// Starts `command` detached: its own session, inheriting of singleflight's fds only
/// those in `inherit` (made inheritable in the child). Anything else inherited, such
/// as the pipe of a `$(…)` or `| cat` reader, would keep that reader waiting.
#[cfg(unix)]
pub fn spawn_detached(
    command: &mut Command,
    inherit: &[Option<std::os::fd::RawFd>],
) -> io::Result<Child> {
    use std::os::fd::BorrowedFd;
    use std::os::unix::process::CommandExt;
    close_others_on_exec(inherit);
    let inherit: Vec<std::os::fd::RawFd> = inherit.iter().flatten().copied().collect();
    // SAFETY: only async-signal-safe syscalls between fork and exec (setsid, fcntl);
    // the fds are open in the child, copies of ours; the Vec is only read there.
    unsafe {
        command.pre_exec(move || {
            rustix::process::setsid()?;
            for &fd in &inherit {
                let fd = BorrowedFd::borrow_raw(fd);
                rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty())?;
            }
            Ok(())
        });
    }
    command.spawn()
}

/// Starts `command` apart from the caller: its own hidden console (no window flashes
/// up, closing the caller's terminal does not end it), its own process group (the
/// caller's Ctrl+C is not its), and out of the caller's Job Object when that job
/// allows it (a terminal or editor that kills its job on exit). Handles are not
/// inherited by number on Windows: the lock is handed over otherwise (`Held::hand_over`).
#[cfg(windows)]
pub fn spawn_detached(command: &mut Command, _inherit: &[Option<i32>]) -> io::Result<Child> {
    use std::os::windows::process::CommandExt;
    use windows_sys::Win32::System::Threading::{
        CREATE_BREAKAWAY_FROM_JOB, CREATE_NEW_PROCESS_GROUP, CREATE_NO_WINDOW,
    };
    let flags = CREATE_NO_WINDOW | CREATE_NEW_PROCESS_GROUP;
    match command
        .creation_flags(flags | CREATE_BREAKAWAY_FROM_JOB)
        .spawn()
    {
        Ok(child) => Ok(child),
        // ERROR_ACCESS_DENIED: the caller's job does not allow breaking away.
        Err(e) if e.raw_os_error() == Some(5) => command.creation_flags(flags).spawn(),
        Err(e) => Err(e),
    }
}

/// The write end of the pipe a `--background` caller handed its refresher
/// (`--hand-back=FD`), made close-on-exec; `None` unless `fd` is open and a pipe.
#[cfg(unix)]
pub fn adopt_pipe(fd: i32) -> Option<std::fs::File> {
    use std::os::fd::{BorrowedFd, FromRawFd};
    if fd < 3 {
        return None;
    }
    // SAFETY: borrowed for fcntl and fstat; a number that is not open fails (EBADF).
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    rustix::io::fcntl_getfd(borrowed).ok()?;
    let stat = rustix::fs::fstat(borrowed).ok()?;
    if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::Fifo {
        return None;
    }
    rustix::io::fcntl_setfd(borrowed, rustix::io::FdFlags::CLOEXEC).ok()?;
    // SAFETY: an open pipe that our caller passed to us for this one purpose; nothing
    // else in this process knows the number.
    Some(unsafe { std::fs::File::from_raw_fd(fd) })
}

#[cfg(not(unix))]
pub fn adopt_pipe(_fd: i32) -> Option<std::fs::File> {
    None
}

/// Marks every open file descriptor above stderr close-on-exec, except `keep`. std
/// opens its own files that way already; this is for what we inherited without the
/// flag (a shell's `3>&1`, a parent's leaked pipe), which a detached refresher must
/// not hold. Safe to do to ourselves: a caller that starts a detached process execs nothing else.
#[cfg(unix)]
fn close_others_on_exec(keep: &[Option<std::os::fd::RawFd>]) {
    use rustix::io::{FdFlags, fcntl_getfd, fcntl_setfd};
    use std::os::fd::{BorrowedFd, RawFd};
    let listed = ["/proc/self/fd", "/dev/fd"].iter().find_map(|dir| {
        let entries = std::fs::read_dir(dir).ok()?;
        let fds = entries
            .flatten()
            .filter_map(|entry| entry.file_name().to_str()?.parse::<RawFd>().ok());
        Some(fds.collect::<Vec<_>>())
    });
    let fds = listed.unwrap_or_else(|| {
        // No fd listing: try every number up to the limit (bounded, to stay quick).
        let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .unwrap_or(1024)
            .min(1 << 16);
        (3..limit as RawFd).collect()
    });
    for fd in fds
        .into_iter()
        .filter(|&fd| fd > 2 && !keep.contains(&Some(fd)))
    {
        // SAFETY: borrowed for two fcntl calls; a number that is not open (the
        // listing's own fd, closed by now) fails with EBADF and is skipped.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        if let Ok(flags) = fcntl_getfd(borrowed)
            && !flags.contains(FdFlags::CLOEXEC)
        {
            let _ = fcntl_setfd(borrowed, flags | FdFlags::CLOEXEC);
        }
    }
}
