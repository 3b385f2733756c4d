//! Machines in trouble: every system call that a miss, a stale refresh, a `--background`
//! refresh and a hit make is failed once, at its 1st to 6th call, with a realistic
//! errno (Debian's `strace -f -e inject=…`). Whatever fails, singleflight never panics
//! or hangs, an exit 0 prints the whole result, nothing of the run is alive 1.5 s
//! later, and the next call and `status` work.
//!
//! Run alone: `cargo test --test tests faults::` (needs `strace`; `.ci/run` installs it).
#![cfg(target_os = "linux")]

use crate::common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The system calls failed, each with an errno it really gives.
const FAULTS: &[(&str, &str)] = &[
    ("openat", "EMFILE"),
    ("read", "EIO"),
    ("write", "ENOSPC"),
    ("renameat", "EXDEV"),
    ("renameat2", "EXDEV"),
    ("rename", "EXDEV"),
    ("fsync", "EIO"),
    ("flock", "ENOLCK"),
    ("unlink", "EACCES"),
    ("unlinkat", "EACCES"),
    ("mkdir", "EACCES"),
    ("statx", "ENOMEM"),
    ("getdents64", "EIO"),
    ("pipe2", "EMFILE"),
    ("wait4", "EINTR"),
    ("waitid", "EINTR"),
    ("copy_file_range", "EXDEV"),
    ("ftruncate", "ENOSPC"),
    ("fcntl", "EINTR"),
    ("poll", "EINTR"),
    ("execve", "ENOMEM"),
    ("clone", "EAGAIN"),
    ("clone3", "EAGAIN"),
];

/// Each system call is failed at its 1st to this call (per process and thread).
const NTH: u32 = 6;

/// Longer than any call takes with a failed system call: past it, the call hangs.
const HANG: Duration = Duration::from_secs(30);

/// What the command prints: a result is whole when it is all of this.
const LINES: u32 = 400;

#[derive(Clone, Copy, Debug)]
enum Path {
    Miss,
    Stale,
    Background,
    Hit,
}

#[test]
fn a_miss_survives_any_failed_system_call() {
    survives(Path::Miss);
}

#[test]
fn a_stale_refresh_survives_any_failed_system_call() {
    survives(Path::Stale);
}

#[test]
fn a_background_refresh_survives_any_failed_system_call() {
    survives(Path::Background);
}

#[test]
fn a_hit_survives_any_failed_system_call() {
    survives(Path::Hit);
}

fn survives(path: Path) {
    if !strace_works() {
        return skip("strace cannot trace here (not installed, or ptrace refused)");
    }
    let env = TestEnv::new();
    let marker = marker();
    // A command that leaves a child behind (in the run's group), so that every case
    // also proves the tree is killed when the run ends: `sleep` under a name that
    // carries the marker, for `alive` to find.
    let nap = env.path(&format!("nap-{marker}"));
    std::os::unix::fs::symlink(which("sleep"), &nap).expect("link sleep");
    let script = format!("'{}' 30 & seq 1 {LINES}", nap.display());
    let command = ["sh", "-c", script.as_str()];
    let whole: String = (1..=LINES).map(|n| format!("{n}\n")).collect();
    let mut failures = Vec::new();
    let mut n = 0;
    for &(syscall, errno) in FAULTS {
        for nth in 1..=NTH {
            n += 1;
            let name = format!("f{n}");
            let case = format!("{path:?}, {syscall} failing with {errno} at its call {nth}");
            if let Err(why) = one_case(&env, path, &name, &command, &whole, syscall, errno, nth) {
                failures.push(format!("{case}: {why}"));
            }
        }
    }
    // Nothing of any run is alive 1.5 s after its call ended (the last one ended now).
    let last_ended = Instant::now();
    wait_until("1.5 s to pass", || {
        last_ended.elapsed() >= Duration::from_millis(1500)
    });
    let left = alive(&marker);
    if !left.is_empty() {
        failures.push(format!(
            "processes of a run still alive 1.5 s later: {left:?}"
        ));
    }
    assert!(
        failures.is_empty(),
        "{} of {n} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// One call of `path` with `syscall` failed at its `nth` call, then the checks.
#[allow(clippy::too_many_arguments)]
fn one_case(
    env: &TestEnv,
    path: Path,
    name: &str,
    command: &[&str],
    whole: &str,
    syscall: &str,
    errno: &str,
    nth: u32,
) -> Result<(), String> {
    let options: &[&str] = match path {
        Path::Miss => &["--ttl", "1h"],
        Path::Stale => &["--ttl", "0"],
        Path::Background => &["--ttl", "0", "--background"],
        Path::Hit => &["--ttl", "1h"],
    };
    if !matches!(path, Path::Miss) {
        let primed = env.call(name, &["--ttl", "1h"], command);
        if status(&primed) != 0 || stdout(&primed) != whole {
            return Err(format!("priming failed: {}", stderr(&primed)));
        }
    }
    let inject = format!("inject={syscall}:error={errno}:when={nth}");
    let mut strace = env.command_for("strace");
    strace
        .args(["-f", "-qq", "-o", "/dev/null", "-e", &inject])
        .arg(env!("CARGO_BIN_EXE_singleflight"))
        .args(call_args(name, options, command))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let output = run_within(strace, HANG)?;
    let said = stderr(&output);
    let code = output.status.code();
    if said.contains("panicked") || matches!(code, Some(101 | 134 | 139) | None) {
        return Err(format!("crashed ({:?}): {said}", output.status));
    }
    if code == Some(0) && stdout(&output) != whole {
        return Err(format!(
            "exit 0 with a partial result ({} bytes): {said}",
            output.stdout.len()
        ));
    }
    // The next call works: a failure the fault caused is not waited out.
    let next = env.call(name, &["--ttl", "1h", "--retry-after", "0"], command);
    if status(&next) != 0 || stdout(&next) != whole {
        return Err(format!(
            "the next call exited {:?}: {}",
            next.status,
            stderr(&next)
        ));
    }
    let shown = env.run(["status", name]);
    if status(&shown) != 0 {
        return Err(format!(
            "status exited {:?}: {}",
            shown.status,
            stderr(&shown)
        ));
    }
    Ok(())
}

/// Runs `command` to the end; an error if it is still running after `limit` (then it
/// and its group are killed).
fn run_within(mut command: Command, limit: Duration) -> Result<std::process::Output, String> {
    use std::os::unix::process::CommandExt;
    command.process_group(0);
    let child = command.spawn().map_err(|e| format!("strace: {e}"))?;
    let pid = child.id();
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = sender.send(child.wait_with_output());
    });
    match receiver.recv_timeout(limit) {
        Ok(output) => output.map_err(|e| format!("wait: {e}")),
        Err(_) => {
            // SAFETY: kill(2) on the group this test started.
            unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
            Err(format!("hung: still running after {limit:?}"))
        }
    }
}

/// Whether `strace` is here and may trace (a container may refuse ptrace).
fn strace_works() -> bool {
    Command::new("strace")
        .args(["-f", "-qq", "-o", "/dev/null", "true"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// Where `program` is on the PATH.
fn which(program: &str) -> std::path::PathBuf {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .expect("sh runs");
    std::path::PathBuf::from(String::from_utf8_lossy(&found.stdout).trim())
}
