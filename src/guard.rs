//! The guard of a run: singleflight itself, started as `singleflight __guard` in a
//! session of its own, holding the read end of a pipe whose write end only the run's
//! singleflight has. The pipe ends when singleflight ends, however it ends: after the
//! word `done` that is a normal end and the guard just exits; without it singleflight
//! died (SIGKILL, the OOM killer, a crash) and the guard kills the run's tree at once.
//!
//! On Linux the guard knows the tree by more than the token: every [`LOOK_EVERY`],
//! while singleflight lives, it notes singleflight's descendants by pid and start time.
//! singleflight is a child subreaper, so setsid and double-fork escapees are among
//! them, and so is one that cleared its environment (`setsid env -i …`). Elsewhere it
//! knows the command's process group: its leader's pid and start time.

use std::io::{self, Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::reap::Known;

/// The hidden first argument that makes singleflight a guard (not a valid NAME, so no
/// user's command line means it).
pub const ARG: &str = "__guard";

/// How often the guard notes the run's processes. A process started and orphaned
/// within this long before singleflight's death may go unseen (unless it kept the
/// token); its parent, if still alive, is seen and its children with it.
const LOOK_EVERY: Duration = Duration::from_millis(50);

/// `SINGLEFLIGHT_GUARD=off`: no guard (for bench/guard.sh; a SIGKILLed run's tree
/// then lives until the next winner).
pub const OFF_ENV: &str = "SINGLEFLIGHT_GUARD";

/// For the tests: a file where the guard lists what it has seen (`pid start` lines),
/// so that a test kills singleflight only once the guard knows the tree.
pub const NOTES_ENV: &str = "SINGLEFLIGHT_GUARD_NOTES";

/// singleflight's end of the pipe to its guard, and the guard process.
pub struct Guard {
    child: Child,
    pipe: Option<io::PipeWriter>,
}

impl Guard {
    /// Starts the guard of the run this process is about to start, before the command
    /// exists, so that nothing of the run is ever unguarded. `None` if it cannot be
    /// started: the run goes on without one, and the next winner cleans up after a
    /// killed run as it always did.
    pub fn start(token: &str) -> Option<Guard> {
        // For bench/guard.sh, which measures what the guard costs a run.
        if std::env::var_os(OFF_ENV).is_some_and(|v| v == "off") {
            return None;
        }
        // /proc/self/exe execs even when the binary was replaced or deleted meanwhile.
        #[cfg(target_os = "linux")]
        let exe = std::path::PathBuf::from("/proc/self/exe");
        #[cfg(not(target_os = "linux"))]
        let exe = std::env::current_exe().ok()?;
        // Both ends are close-on-exec: the command never holds the write end, or its
        // escapees would keep the guard from ever seeing the end.
        let (reader, writer) = io::pipe().ok()?;
        let mut command = Command::new(exe);
        command
            .arg(ARG)
            .arg(std::process::id().to_string())
            .arg(token)
            .stdin(reader)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        {
            use std::os::unix::process::CommandExt;
            command.arg0("singleflight");
            // SAFETY: between fork and exec the closure makes one raw syscall (setsid)
            // and allocates nothing (`from_raw_os_error`). Its own session keeps the
            // guard out of the terminal's signals (Ctrl-C, hang-up) and out of a
            // `kill -- -PGID` of the caller's group, which it must outlive.
            unsafe {
                command.pre_exec(|| {
                    rustix::process::setsid()
                        .map(drop)
                        .map_err(|e| io::Error::from_raw_os_error(e.raw_os_error()))
                });
            }
        }
        let child = command.spawn().ok()?;
        crate::reap::spare(child.id());
        Some(Guard {
            child,
            pipe: Some(writer),
        })
    }

    /// Tells the guard the command's pid and start time (its process group).
    pub fn started(&mut self, pid: u32, start: u64) {
        if let Some(pipe) = self.pipe.as_mut() {
            // One write, shorter than PIPE_BUF: it arrives whole.
            let _ = pipe.write_all(format!("run {pid} {start}\n").as_bytes());
        }
    }
}

impl Drop for Guard {
    /// The run is over and its tree gone: the guard is told so and waited for, so it
    /// is never left behind.
    fn drop(&mut self) {
        if let Some(mut pipe) = self.pipe.take() {
            let _ = pipe.write_all(b"done\n");
        }
        let _ = self.child.wait();
        crate::reap::spare(0);
    }
}

/// The guard's life (`singleflight __guard OWNER_PID TOKEN`, stdin the pipe); returns
/// its exit status.
pub fn main() -> i32 {
    let args: Vec<String> = crate::args()
        .iter()
        .skip(2)
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let (Some(owner), Some(token)) = (args.first().and_then(|a| a.parse().ok()), args.get(1))
    else {
        return 2;
    };
    let mut known = Known {
        token: token.clone(),
        ..Known::default()
    };
    let notes = std::env::var_os(NOTES_ENV);
    let mut stdin = io::stdin().lock();
    let mut said = Vec::new();
    let mut buffer = [0u8; 256];
    loop {
        // Whether singleflight is still there: once it is gone the guard is reparented.
        let owner_lives = rustix::process::getppid()
            .is_some_and(|parent| parent.as_raw_nonzero().get() as u32 == owner);
        if owner_lives {
            let before = known.seen.len();
            crate::reap::note_tree(owner, &mut known.seen);
            if let Some(notes) = notes.as_ref()
                && known.seen.len() != before
            {
                let list: String = known
                    .seen
                    .iter()
                    .map(|(p, s)| format!("{p} {s}\n"))
                    .collect();
                let _ = std::fs::write(notes, list);
            }
        }
        if !readable(LOOK_EVERY) {
            continue;
        }
        match stdin.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => said.extend_from_slice(&buffer[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
        // Only whole lines count.
        let whole = said
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(0, |end| end + 1);
        let text = String::from_utf8_lossy(&said[..whole]);
        for line in text.lines() {
            let words: Vec<&str> = line.split(' ').collect();
            match words.as_slice() {
                ["done"] => return 0,
                ["run", pid, start] => {
                    if let (Ok(pid), Ok(start)) = (pid.parse(), start.parse()) {
                        known.command = Some((pid, start));
                    }
                }
                _ => {}
            }
        }
    }
    // The pipe ended without "done": singleflight died.
    crate::reap::kill_run(&known);
    0
}

/// Whether stdin has something to read (or its end) within `timeout`.
fn readable(timeout: Duration) -> bool {
    let mut fds = [libc::pollfd {
        fd: 0,
        events: libc::POLLIN,
        revents: 0,
    }];
    // SAFETY: poll on one pollfd that lives on this stack frame.
    let ready = unsafe { libc::poll(fds.as_mut_ptr(), 1, timeout.as_millis() as libc::c_int) };
    ready > 0
}
