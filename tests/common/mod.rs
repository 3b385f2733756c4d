//! A throw-away world for one test: a private cache dir, helper scripts, a run
//! counter, gates to hold a command until the test lets it go, and a look at the
//! process table. Every test drives the real binary.
#![allow(dead_code)]

pub mod certs;
// A real etcd is started, paused and killed with Unix signals: the etcd tests are Unix-only.
#[cfg(unix)]
pub mod etcd;
// A real PostgreSQL, frozen with SIGSTOP: Linux only, as Debian's package.
#[cfg(target_os = "linux")]
pub mod postgres;

use std::ffi::{OsStr, OsString};
use std::fs;
#[cfg(unix)]
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long a test waits for something that must happen before calling it a hang.
/// Not a speed assertion: a correct run is done in a small fraction of it.
pub const PATIENCE: Duration = Duration::from_secs(60);

pub struct TestEnv {
    root: tempfile::TempDir,
    pub cache: PathBuf,
}

impl TestEnv {
    pub fn new() -> TestEnv {
        let root = tempfile::tempdir().expect("temp dir");
        let cache = root.path().join("cache");
        TestEnv { root, cache }
    }

    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// A path inside the test's private dir.
    pub fn path(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    /// `singleflight` with this test's cache dir and nothing inherited that matters.
    pub fn command(&self) -> Command {
        self.command_for(env!("CARGO_BIN_EXE_singleflight"))
    }

    /// Another program, run with this test's cache dir in its environment.
    pub fn command_for(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command
            .env("SINGLEFLIGHT_CACHE_DIR", &self.cache)
            .env_remove("SINGLEFLIGHT_BACKEND")
            .env_remove("SINGLEFLIGHT_ETCD_CACERT")
            .env_remove("SINGLEFLIGHT_ETCD_CERT")
            .env_remove("SINGLEFLIGHT_ETCD_KEY")
            .env_remove("SINGLEFLIGHT_ETCD_USER")
            .env_remove("SINGLEFLIGHT_ETCD_PASSWORD")
            .env_remove("SINGLEFLIGHT_ETCD_PASSWORD_FILE")
            .current_dir(self.root.path());
        #[cfg(unix)]
        with_default_signals(&mut command);
        command
    }

    /// The temp files in the cache dir (`.tmp.*`), sorted.
    pub fn temps(&self) -> Vec<PathBuf> {
        let Ok(entries) = fs::read_dir(&self.cache) else {
            return Vec::new();
        };
        let mut found: Vec<PathBuf> = entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp."))
            .map(|e| e.path())
            .collect();
        found.sort();
        found
    }

    /// `singleflight ARGS...`, run to the end with stdin from nothing.
    pub fn run<I, S>(&self, args: I) -> Ran
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let output = finish(self.spawn(&args));
        Ran { args, output }
    }

    /// `singleflight NAME OPTIONS... -- COMMAND...`, run to the end: the one way a
    /// test builds a plain call (verbs and odd orders go through [`TestEnv::run`]).
    pub fn call(&self, name: &str, options: &[&str], command: &[impl AsRef<str>]) -> Ran {
        self.run(call_args(name, options, command))
    }

    /// `singleflight ARGS...` started in the background with stdout and stderr piped.
    pub fn spawn<I, S>(&self, args: I) -> Child
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        start(self.command().args(args))
    }

    /// Writes an executable `sh` script and returns its path.
    pub fn script(&self, name: &str, body: &str) -> PathBuf {
        let path = self.path(name);
        fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write script");
        // Windows has no executable bit (the tests are compiled for Windows, run on Unix).
        #[cfg(unix)]
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod script");
        path
    }

    /// A file that each run appends a line to; `runs()` counts them.
    pub fn counter(&self) -> PathBuf {
        self.path("runs")
    }

    pub fn runs(&self) -> usize {
        fs::read_to_string(self.counter()).map_or(0, |text| text.lines().count())
    }

    /// A named pipe; a command that reads it blocks until the test writes to it.
    pub fn fifo(&self, name: &str) -> PathBuf {
        let path = self.path(name);
        let status = Command::new("mkfifo")
            .arg(&path)
            .status()
            .expect("mkfifo runs");
        assert!(status.success(), "mkfifo {}", path.display());
        path
    }

    /// The files of NAME in the cache dir.
    pub fn result_file(&self, name: &str) -> PathBuf {
        self.cache.join(format!("{name}.result"))
    }
}

/// Starts `command` with SIGINT, SIGTERM and SIGHUP at their default action, whatever
/// the tests inherited: singleflight keeps a signal ignored at its start, and `cargo
/// test` run as a background job of a script (`&`) has SIGINT ignored, so a test that
/// sends SIGINT would see it ignored. (Unix: Windows has no such signals.)
#[cfg(unix)]
fn with_default_signals(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: signal(2) is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        command.pre_exec(|| {
            for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                libc::signal(signal, libc::SIG_DFL);
            }
            Ok(())
        });
    }
}

/// The arguments of `singleflight NAME OPTIONS... -- COMMAND...`.
pub fn call_args(name: &str, options: &[&str], command: &[impl AsRef<str>]) -> Vec<String> {
    let mut args = vec![name.to_owned()];
    args.extend(options.iter().map(|s| s.to_string()));
    args.push("--".to_owned());
    args.extend(command.iter().map(|s| s.as_ref().to_owned()));
    args
}

/// A call run to the end: its arguments and its output (which it derefs to).
pub struct Ran {
    pub args: Vec<OsString>,
    pub output: Output,
}

impl std::ops::Deref for Ran {
    type Target = Output;
    fn deref(&self) -> &Output {
        &self.output
    }
}

/// What [`assert_status`] reports of a call: its output, and its arguments if known
/// (a call spawned and finished separately has only its output).
pub trait Call {
    fn output(&self) -> &Output;
    fn argv(&self) -> String {
        "(a spawned call)".to_owned()
    }
}

impl Call for Output {
    fn output(&self) -> &Output {
        self
    }
}

impl Call for Ran {
    fn output(&self) -> &Output {
        &self.output
    }
    fn argv(&self) -> String {
        let args: Vec<_> = self.args.iter().map(|a| format!("{a:?}")).collect();
        format!("singleflight {}", args.join(" "))
    }
}

/// Asserts the exit status of a call; on failure says what was run, and the tails of
/// its stdout and stderr.
#[track_caller]
pub fn assert_status(call: &impl Call, expected: i32) {
    let output = call.output();
    if status(output) == expected {
        return;
    }
    let tail = |bytes: &[u8]| {
        let text = String::from_utf8_lossy(&bytes[bytes.len().saturating_sub(2000)..]);
        text.trim_end().replace('\n', "\n    | ")
    };
    panic!(
        "expected exit status {expected}, got {:?}\n  argv: {}\n  stdout (tail):\n    | {}\n  stderr (tail):\n    | {}",
        output.status,
        call.argv(),
        tail(&output.stdout),
        tail(&output.stderr)
    );
}

/// Starts `command` with stdin from nothing and stdout and stderr piped.
pub fn start(command: &mut Command) -> Child {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("singleflight starts")
}

/// Waits until `condition` holds; panics (the test failed) after [`PATIENCE`].
pub fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(start.elapsed() < PATIENCE, "gave up waiting for: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits for a child to exit, panicking if it hangs past [`PATIENCE`].
pub fn finish(child: Child) -> Output {
    let pid = child.id();
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = sender.send(child.wait_with_output());
    });
    match receiver.recv_timeout(PATIENCE) {
        Ok(output) => output.expect("wait for singleflight"),
        Err(_) => panic!(
            "singleflight (pid {pid}) did not exit; its processes and threads:\n{}",
            where_stuck(pid)
        ),
    }
}

/// What a process that did not exit is doing: `ps` of it and its descendants, each
/// thread with the kernel function it waits in (Linux), for the failure message.
fn where_stuck(pid: u32) -> String {
    let ps = Command::new("ps")
        .args(["-e", "-L", "-o", "pid,ppid,lwp,stat,wchan:32,args"])
        .output();
    let Ok(ps) = ps else {
        return "(ps failed)".to_owned();
    };
    let text = String::from_utf8_lossy(&ps.stdout).into_owned();
    let mut family = vec![pid.to_string()];
    let mut lines = Vec::new();
    for _ in 0..4 {
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() > 2
                && (family.iter().any(|p| p == fields[0]) || family.iter().any(|p| p == fields[1]))
                && !lines.contains(&line)
            {
                lines.push(line);
                if !family.iter().any(|p| p == fields[0]) {
                    family.push(fields[0].to_owned());
                }
            }
        }
    }
    lines.join("\n")
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

pub fn status(output: &Output) -> i32 {
    output.status.code().unwrap_or(-1)
}

/// The pids of live processes whose command line contains `marker`.
pub fn alive(marker: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let state = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let zombie = state
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if !zombie && cmdline.contains(marker) {
            found.push(pid);
        }
    }
    found
}

/// A marker unique to this call, for `sleep MARKER` style processes.
pub fn marker() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!(
        "{}.{}{:04}",
        1000 + std::process::id() % 9000,
        n,
        std::process::id() % 10000
    )
}

#[cfg(unix)]
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Whether this is CI (`CI` set), where a test must not skip.
pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some()
}

/// Says that the test is skipped and why; in CI, where nothing may be skipped, fails
/// it instead. The caller returns right after.
pub fn skip(why: &str) {
    assert!(!in_ci(), "CI must run this test, but {why}");
    eprintln!("SKIPPED: {why}");
}

/// Whether `pid` waits for a lock in `/proc/locks` (a blocked flock): a caller that
/// waits for the run in flight.
pub fn blocked_on_a_lock(pid: u32) -> bool {
    let locks = fs::read_to_string("/proc/locks").unwrap_or_default();
    locks.lines().any(|line| {
        let words: Vec<&str> = line.split_whitespace().collect();
        words.get(1) == Some(&"->") && words.get(5) == Some(&pid.to_string().as_str())
    })
}
