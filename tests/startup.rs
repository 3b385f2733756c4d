//! What a process start-up must give singleflight (std's, or its own on Linux/glibc):
//! closed standard fds are not reused for cache files, a reader that goes away is not
//! a crash, and the command runs with SIGPIPE at its default.
#![cfg(unix)]

use crate::common;

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};

use common::{TestEnv, assert_status, finish, status, stderr, stdout};

/// `singleflight ARGS...` started by `sh` with its stdout closed.
fn with_stdout_closed(env: &TestEnv, args: &[&str]) -> std::process::Output {
    Command::new("sh")
        .args(["-c", "exec >&-; exec \"$@\"", "sh"])
        .arg(env!("CARGO_BIN_EXE_singleflight"))
        .args(args)
        .env("SINGLEFLIGHT_CACHE_DIR", &env.cache)
        .stdin(Stdio::null())
        .output()
        .expect("sh runs")
}

#[test]
fn a_hit_with_stdout_closed_does_not_write_into_the_cache() {
    let env = TestEnv::new();
    let args = ["closed", "--", "echo", "hello"];
    let first = env.run(args);
    assert_eq!((status(&first), stdout(&first).as_str()), (0, "hello\n"));

    // Were fd 1 left closed, the result file would be opened as fd 1 and "printed"
    // into: a failed write at best.
    let output = with_stdout_closed(&env, &args);
    assert_status(&output, 0);
    assert_eq!(stderr(&output), "");
    let after = env.run(args);
    assert_eq!((status(&after), stdout(&after).as_str()), (0, "hello\n"));
}

#[test]
fn a_reader_that_goes_away_is_not_a_crash() {
    let env = TestEnv::new();
    // More than a pipe holds, so that the hit is still writing when the reader leaves.
    let args = ["big", "--", "head", "-c", "1048576", "/dev/zero"];
    let primed = env.run(args);
    assert_status(&primed, 0);

    let mut child = env.spawn(args);
    let mut first = [0; 1];
    let mut out = child.stdout.take().expect("piped stdout");
    out.read_exact(&mut first).expect("the hit starts writing");
    drop(out);
    let output = finish(child);
    assert_eq!(
        output.status.signal(),
        None,
        "killed by a signal; stderr: {}",
        stderr(&output)
    );
    assert_status(&output, 0);
    assert_eq!(stderr(&output), "");
}

#[test]
#[cfg(target_os = "linux")]
fn the_command_runs_with_sigpipe_at_its_default() {
    let env = TestEnv::new();
    let output = env.run(["sigpipe", "--", "grep", "^SigIgn:", "/proc/self/status"]);
    assert_status(&output, 0);
    let line = stdout(&output);
    let mask = line
        .trim()
        .strip_prefix("SigIgn:")
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or_else(|| panic!("unexpected line {line:?}"));
    let sigpipe_bit = 1 << (13 - 1);
    assert_eq!(mask & sigpipe_bit, 0, "SIGPIPE is ignored in the command");
}
