//! `--background` as a status line meets it: a stale result at once, one detached
//! refresher however many callers, nothing that keeps a pipe reader waiting, and the
//! run options and failure handling of a normal run (issue 5).
//!
//! Linux only: the refresher and its descriptors are found in /proc.
#![cfg(target_os = "linux")]

use crate::common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use common::{
    TestEnv, alive, assert_status, blocked_on_a_lock, call_args, finish, marker, status, stderr,
    stdout, wait_until,
};
use serde_json::Value;

/// A command whose runs are counted, and which, once armed, holds each run until the
/// test opens its gate. It prints the content of its value file.
struct Gated {
    script: PathBuf,
    armed: PathBuf,
    gate: PathBuf,
    value: PathBuf,
}

impl Gated {
    fn new(env: &TestEnv) -> Gated {
        let (armed, gate, value) = (env.path("armed"), env.path("gate"), env.path("value"));
        let body = format!(
            "echo run >> '{counter}'\n\
             if [ -e '{armed}' ]; then\n\
               while [ ! -e '{gate}' ] && [ -d '{root}' ]; do sleep 0.01; done\n\
             fi\n\
             cat '{value}'",
            counter = env.counter().display(),
            armed = armed.display(),
            gate = gate.display(),
            value = value.display(),
            root = env.root().display(),
        );
        let script = env.script("gated", &body);
        fs::write(&value, "old\n").unwrap();
        Gated {
            script,
            armed,
            gate,
            value,
        }
    }

    /// From now on runs print `new` and wait for the gate.
    fn arm(&self) {
        fs::write(&self.value, "new\n").unwrap();
        fs::write(&self.armed, "").unwrap();
    }

    fn open(&self) {
        fs::write(&self.gate, "").unwrap();
    }

    fn is_open(&self) -> bool {
        self.gate.exists()
    }

    fn command(&self) -> String {
        self.script.display().to_string()
    }
}

/// Opens the gate however the test ends, so that no run waits for it until its timeout
/// (and should the test's dir go first, the command stops waiting too).
impl Drop for Gated {
    fn drop(&mut self) {
        let _ = fs::write(&self.gate, "");
    }
}

fn status_of(env: &TestEnv, name: &str) -> Value {
    let out = env.run(["status", "--json", name]);
    assert_status(&out, 0);
    let all: Value = serde_json::from_slice(&out.stdout).expect("status --json is JSON");
    all[0].clone()
}

/// Runs `name` once (not armed: prints `old`) with `--ttl 1s` and waits until that
/// result is stale.
fn seed_stale(env: &TestEnv, gated: &Gated, names: &[&str]) {
    for name in names {
        let out = env.run(call_args(name, &["--ttl", "1s"], &[gated.command()]));
        assert_eq!(stdout(&out), "old\n", "seeding {name}: {}", stderr(&out));
    }
    for name in names {
        wait_until(&format!("{name} goes stale"), || {
            status_of(env, name)["state"] == "stale"
        });
    }
}

/// Live `singleflight --refresher=…` processes whose command line mentions `marker`.
/// A child a refresher has forked but not yet exec'd shows the same command line: it
/// is not counted.
fn refreshers(marker: &str) -> Vec<u32> {
    let found: Vec<u32> = alive(marker)
        .into_iter()
        .filter(|pid| {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmdline).contains("--refresher=")
        })
        .collect();
    found
        .iter()
        .copied()
        .filter(|pid| parent(*pid).is_none_or(|parent| !found.contains(&parent)))
        .collect()
}

fn parent(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The pid in `refresh started in background (pid N)`.
fn started_pid(verbose: &str) -> Option<u32> {
    let (_, rest) = verbose.split_once("refresh started in background (pid ")?;
    rest.split_once(')')?.0.parse().ok()
}

#[test]
fn a_hundred_background_callers_get_the_old_output_at_once_and_start_one_run() {
    let env = TestEnv::new();
    let gated = Gated::new(&env);
    seed_stale(&env, &gated, &["sl"]);
    gated.arm();

    let call = call_args(
        "sl",
        &["-v", "--background", "--ttl", "1s"],
        &[gated.command()],
    );
    let callers: Vec<Child> = (0..100).map(|_| env.spawn(&call)).collect();
    let outputs: Vec<Output> = callers.into_iter().map(finish).collect();

    // Every caller has returned, with the old output, while the run is held.
    assert!(!gated.is_open());
    for out in &outputs {
        assert_eq!(
            (status(out), stdout(out).as_str()),
            (0, "old\n"),
            "{}",
            stderr(out)
        );
    }
    let lines: Vec<String> = outputs.iter().map(stderr).collect();
    let starters: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("refresh started"))
        .collect();
    assert_eq!(
        starters.len(),
        1,
        "exactly one caller starts a refresher: {lines:#?}"
    );
    let line = starters[0];
    assert!(
        line.starts_with("singleflight: sl: stale (age ")
            && line.contains(" >= ttl 1s); refresh started in background (pid ")
            && line.ends_with("); serving stale\n"),
        "{line}"
    );
    for other in lines.iter().filter(|l| !l.contains("refresh started")) {
        assert!(
            other.contains("a run is already in flight; serving stale"),
            "{other}"
        );
    }

    // One refresher, the one announced, running the one run.
    wait_until("the refresher's run starts", || env.runs() == 2);
    let running = refreshers(&gated.command());
    assert_eq!(running, vec![started_pid(line).unwrap()], "{line}");
    let in_flight = status_of(&env, "sl");
    assert_eq!(in_flight["in_flight"], true);

    gated.open();
    wait_until("the refresher exits", || {
        refreshers(&gated.command()).is_empty()
    });
    assert_eq!(status_of(&env, "sl")["in_flight"], false);
    let after = env.run(call_args(
        "sl",
        &["--background", "--ttl", "1s"],
        &[gated.command()],
    ));
    assert_eq!(stdout(&after), "new\n", "the refresh was cached");
    assert_eq!(env.runs(), 2, "the seed and one refresh, for 100 callers");
}

/// Each way a status line may read a caller's stdout: the caller's exit must not
/// wait for the refresh, whatever the caller inherited.
#[test]
fn background_under_a_pipe_or_command_substitution_returns_before_the_refresh_ends() {
    let env = TestEnv::new();
    let gated = Gated::new(&env);
    let shapes = [
        ("piped", "SF | cat"),
        ("substituted", "out=$(SF); printf '%s\\n' \"$out\""),
        // A pipe on an extra fd too: singleflight replaces 1 and 2, not 3.
        ("leaked", "SF 3>&1 | cat"),
    ];
    let names: Vec<&str> = shapes.iter().map(|(name, _)| *name).collect();
    seed_stale(&env, &gated, &names);
    gated.arm();

    for (name, shape) in shapes {
        let call = format!(
            "'{sf}' -v --background {name} --ttl 1s -- '{cmd}'",
            sf = env!("CARGO_BIN_EXE_singleflight"),
            cmd = gated.command()
        );
        let line = shape.replace("SF", &call);
        let child = Command::new("sh")
            .args(["-c", &line])
            .env("SINGLEFLIGHT_CACHE_DIR", &env.cache)
            .env_remove("SINGLEFLIGHT_BACKEND")
            .current_dir(env.root())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = finish(child);
        assert_eq!(stdout(&out), "old\n", "{line}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("refresh started in background"),
            "{line}: {}",
            stderr(&out)
        );
        // The shell is gone while the refresh is still held at the gate.
        assert!(!gated.is_open());
        let refresher = format!("--background {name} --ttl 1s -- {}", gated.command());
        assert_eq!(refreshers(&refresher).len(), 1, "{line}");
    }
    gated.open();
    wait_until("the refreshers exit", || {
        refreshers(&gated.command()).is_empty()
    });
    for name in names {
        assert_eq!(
            status_of(&env, name)["size_bytes"],
            4,
            "{name}: `new\\n` cached"
        );
    }
}

fn fd_targets(pid: u32) -> Vec<(u32, PathBuf)> {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let fd = e.file_name().to_str()?.parse().ok()?;
            Some((fd, fs::read_link(e.path()).ok()?))
        })
        .collect()
}

#[test]
fn the_refresher_has_its_own_session_stdio_on_null_and_no_descriptor_but_the_lock() {
    let env = TestEnv::new();
    let gated = Gated::new(&env);
    seed_stale(&env, &gated, &["fds"]);
    gated.arm();
    let leak = env.path("leaked-file");
    // fds 7 and 8 are inherited without close-on-exec, as a careless parent leaves them.
    let line = format!(
        "exec 7>'{leak}' 8<'{leak}'; '{sf}' -v --background fds --ttl 1s -- '{cmd}'",
        leak = leak.display(),
        sf = env!("CARGO_BIN_EXE_singleflight"),
        cmd = gated.command()
    );
    let child = Command::new("sh")
        .args(["-c", &line])
        .env("SINGLEFLIGHT_CACHE_DIR", &env.cache)
        .env_remove("SINGLEFLIGHT_BACKEND")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = finish(child);
    assert_eq!(stdout(&out), "old\n", "{}", stderr(&out));
    let pid = started_pid(&stderr(&out)).expect("a refresher was started");
    wait_until("the refresher's run starts", || env.runs() == 2);

    let fds = fd_targets(pid);
    for fd in 0..3 {
        let target = fds.iter().find(|(n, _)| *n == fd).map(|(_, t)| t.clone());
        assert_eq!(target, Some(PathBuf::from("/dev/null")), "fd {fd}: {fds:?}");
    }
    let lock = env.cache.join("fds.lock");
    assert_eq!(fds.iter().filter(|(_, t)| *t == lock).count(), 1, "{fds:?}");
    assert!(
        !fds.iter().any(|(_, t)| *t == leak),
        "a leaked fd was inherited: {fds:?}"
    );
    // Everything else is the refresher's own: the run's temp file, pipes and signal
    // socket, and /dev/null opened for the stdio of what it spawns (its guard).
    for (fd, target) in &fds {
        let own = target.starts_with(&env.cache)
            || *target == Path::new("/dev/null")
            || ["pipe:", "socket:", "anon_inode:"]
                .iter()
                .any(|kind| target.to_string_lossy().starts_with(kind));
        assert!(*fd < 3 || own, "fd {fd} -> {}: {fds:?}", target.display());
    }
    // Its own session (setsid): sid == pid, so no terminal hangup reaches it.
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    assert_eq!(
        fields[3],
        pid.to_string(),
        "session of the refresher: {stat}"
    );
    // The command it runs has nothing of it either: past stdio, only the shell's own
    // handle on its script.
    let sh = alive(&gated.command())
        .into_iter()
        .find(|p| parent(*p) == Some(pid) && !refreshers(&gated.command()).contains(p))
        .expect("the command is running");
    let command_fds = fd_targets(sh);
    assert_eq!(
        command_fds.iter().find(|(fd, _)| *fd == 0).unwrap().1,
        PathBuf::from("/dev/null")
    );
    assert!(
        command_fds
            .iter()
            .all(|(fd, t)| *fd < 3 || *t == gated.script),
        "{command_fds:?}"
    );
}

#[test]
fn with_nothing_cached_the_caller_waits_for_the_refresher_and_serves_what_it_made() {
    let env = TestEnv::new();
    let gated = Gated::new(&env);
    gated.arm();

    // --wait runs out while the run is held: 75, and the refresh goes on.
    let short = env.run(call_args(
        "cold",
        &["--background", "--wait", "100ms"],
        &[gated.command()],
    ));
    assert_status(&short, 75);
    assert!(
        stderr(&short).contains("--wait 100ms ran out"),
        "{}",
        stderr(&short)
    );
    assert_eq!(stdout(&short), "");

    // A second caller finds the refresher in flight and waits for it.
    let mut waiting = env.spawn(call_args(
        "cold",
        &["-v", "--background"],
        &[gated.command()],
    ));
    wait_until("the refresher's run starts", || env.runs() == 1);
    // Not only started: waiting on the lock, or on a loaded machine it may arrive
    // after the run and be served a fresh result.
    wait_until("the second caller waits for the run", || {
        blocked_on_a_lock(waiting.id())
    });
    assert!(waiting.try_wait().unwrap().is_none());
    gated.open();
    let out = finish(waiting);
    assert_eq!(
        (status(&out), stdout(&out).as_str()),
        (0, "new\n"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        stderr(&out),
        "singleflight: cold: nothing cached; a run is already in flight; \
         waited for the run in flight: served its result\n"
    );
    assert_eq!(env.runs(), 1);
}

#[test]
fn the_caller_that_starts_the_refresher_waits_for_it_when_nothing_is_cached() {
    let env = TestEnv::new();
    let gated = Gated::new(&env);
    gated.arm();
    let mut caller = env.spawn(call_args(
        "first",
        &["-v", "--background"],
        &[gated.command()],
    ));
    wait_until("the refresher's run starts", || env.runs() == 1);
    assert!(caller.try_wait().unwrap().is_none(), "the caller waits");
    gated.open();
    let out = finish(caller);
    assert_eq!(
        (status(&out), stdout(&out).as_str()),
        (0, "new\n"),
        "{}",
        stderr(&out)
    );
    let line = stderr(&out);
    assert!(
        line.starts_with(
            "singleflight: first: nothing cached; refresh started in background (pid "
        ) && line.ends_with("); waited for the run in flight: served its result\n"),
        "{line}"
    );
}

/// A command that prints `good` until the test makes it fail or misbehave.
fn switchable(env: &TestEnv, misbehave: &str) -> (String, PathBuf) {
    let switch = env.path("switch");
    let body = format!(
        "echo run >> '{counter}'\n\
         if [ -e '{switch}' ]; then {misbehave}; fi\n\
         echo good",
        counter = env.counter().display(),
        switch = switch.display(),
    );
    (
        env.script("switchable", &body).display().to_string(),
        switch,
    )
}

fn seed_good_then_stale(env: &TestEnv, name: &str, command: &str) {
    let out = env.run(call_args(name, &["--ttl", "1s"], &[&command]));
    assert_eq!(stdout(&out), "good\n", "{}", stderr(&out));
    wait_until("the result goes stale", || {
        status_of(env, name)["state"] == "stale"
    });
}

/// Waits until the refresher of `command` has exited, and returns the NAME's status,
/// which must show a failure.
fn wait_for_failure(env: &TestEnv, name: &str, command: &str) -> Value {
    wait_until("the refresher exits", || refreshers(command).is_empty());
    let s = status_of(env, name);
    assert_eq!(s["in_flight"], false, "{s}");
    assert!(!s["last_failure"].is_null(), "{s}");
    s
}

#[test]
fn a_failing_refresher_keeps_the_last_good_result_records_why_and_backs_off() {
    let env = TestEnv::new();
    let (command, switch) = switchable(&env, "echo boom >&2; exit 3");
    seed_good_then_stale(&env, "flaky", &command);
    fs::write(&switch, "").unwrap();
    let call = call_args(
        "flaky",
        &["-v", "--background", "--ttl", "1s", "--retry-after", "1h"],
        &[&command],
    );

    let first = env.run(&call);
    assert_eq!((status(&first), stdout(&first).as_str()), (0, "good\n"));
    assert!(
        stderr(&first).contains("refresh started in background"),
        "{}",
        stderr(&first)
    );
    let failed = wait_for_failure(&env, "flaky", &command);
    assert_eq!(env.runs(), 2);
    assert_eq!(failed["state"], "stale");
    assert_eq!(failed["exit_code"], 0, "the last good result stays");
    assert_eq!(failed["last_failure"]["exit_code"], 3);
    assert_eq!(failed["last_failure"]["stderr_tail"], "boom\n");
    let reason = failed["last_failure"]["reason"].as_str().unwrap();
    assert!(reason.starts_with("exit status 3 after "), "{reason}");

    // Inside --retry-after: the last good result, and no refresher is started.
    for _ in 0..5 {
        let out = env.run(&call);
        assert_eq!((status(&out), stdout(&out).as_str()), (0, "good\n"));
        let line = stderr(&out);
        assert!(!line.contains("refresh started"), "{line}");
        assert!(
            line.contains("the last run failed") && line.contains("(exit status 3 after "),
            "{line}"
        );
        assert!(line.ends_with("serving the last good result\n"), "{line}");
    }
    assert_eq!(env.runs(), 2, "no run during the back-off");
    assert_eq!(status_of(&env, "flaky")["in_flight"], false);
}

#[test]
fn the_refresher_obeys_timeout_and_kills_the_tree() {
    let env = TestEnv::new();
    let sleeper = marker();
    let (command, switch) = switchable(&env, &format!("sleep {sleeper} & sleep {sleeper}; wait"));
    seed_good_then_stale(&env, "slow", &command);
    fs::write(&switch, "").unwrap();
    let call = call_args(
        "slow",
        &[
            "--background",
            "--ttl",
            "1s",
            "--timeout",
            "300ms",
            "--kill-after",
            "100ms",
        ],
        &[&command],
    );
    let out = env.run(&call);
    assert_eq!(stdout(&out), "good\n", "{}", stderr(&out));
    let failed = wait_for_failure(&env, "slow", &command);
    assert_eq!(failed["last_failure"]["exit_code"], 124);
    let reason = failed["last_failure"]["reason"].as_str().unwrap();
    assert!(reason.starts_with("timed out after 300ms"), "{reason}");
    assert!(alive(&sleeper).is_empty(), "the run's tree is gone");
    assert_eq!(failed["exit_code"], 0);
    assert_eq!(failed["size_bytes"], 5, "`good\\n` is still the result");
}

#[test]
fn the_refresher_obeys_max_output() {
    let env = TestEnv::new();
    let (command, switch) = switchable(&env, "head -c 100000 /dev/zero; exit 0");
    seed_good_then_stale(&env, "big", &command);
    fs::write(&switch, "").unwrap();
    let call = call_args(
        "big",
        &["--background", "--ttl", "1s", "--max-output", "1KiB"],
        &[&command],
    );
    let out = env.run(&call);
    assert_eq!(stdout(&out), "good\n", "{}", stderr(&out));
    let failed = wait_for_failure(&env, "big", &command);
    assert_eq!(failed["last_failure"]["exit_code"], 125);
    let reason = failed["last_failure"]["reason"].as_str().unwrap();
    assert!(reason.contains("--max-output 1.0KiB"), "{reason}");
    assert_eq!(failed["size_bytes"], 5, "`good\\n` is still the result");
}

#[test]
fn a_refresher_whose_command_cannot_start_records_it() {
    let env = TestEnv::new();
    let missing = env.path("no-such-command");
    let call = call_args(
        "gone",
        &["--background", "--wait", "1m"],
        &[missing.display().to_string()],
    );
    let out = env.run(&call);
    assert_status(&out, 75);
    assert!(
        stderr(&out).contains("produced nothing to serve"),
        "{}",
        stderr(&out)
    );
    let failed = wait_for_failure(&env, "gone", &missing.display().to_string());
    assert_eq!(failed["last_failure"]["exit_code"], 127);
    let reason = failed["last_failure"]["reason"].as_str().unwrap();
    assert!(reason.contains("command not found"), "{reason}");
}

#[test]
fn a_fresh_result_is_served_without_a_refresher() {
    let env = TestEnv::new();
    let gated = Gated::new(&env);
    let out = env.run(call_args("hit", &["--ttl", "1h"], &[gated.command()]));
    assert_eq!(stdout(&out), "old\n");
    gated.arm();
    let out = env.run(call_args(
        "hit",
        &["-v", "--background", "--ttl", "1h"],
        &[gated.command()],
    ));
    assert_eq!(stdout(&out), "old\n");
    assert_eq!(
        stderr(&out),
        "singleflight: hit: fresh (ttl 1h0m): served\n"
    );
    assert_eq!(env.runs(), 1);
    assert!(refreshers(&gated.command()).is_empty());
}

/// `--refresher=FD` (internal) claims only a lock file it was handed: an fd that is not
/// open, or is open on another file, is refused (125) before anything runs, and the
/// other file's fd is not taken for the lock.
#[test]
fn a_refresher_takes_only_the_lock_file_it_was_handed() {
    let env = TestEnv::new();
    fs::create_dir(&env.cache).expect("mkdir");
    fs::set_permissions(
        &env.cache,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .expect("chmod");
    let sf = env!("CARGO_BIN_EXE_singleflight");
    let counter = env.counter();
    let script = format!("echo run >> '{}'", counter.display());
    let cases = [
        ("", "--refresher=9", "not an open file descriptor"),
        ("exec 9</dev/null; ", "--refresher=9", "not "),
        ("", "--refresher=1", "not an open file descriptor"),
    ];
    for (setup, arg, said) in cases {
        let line = format!("{setup}exec '{sf}' {arg} handed -- sh -c \"$0\"");
        let out = finish(common::start(
            env.command_for("sh").args(["-c", &line, &script]),
        ));
        assert_status(&out, 125);
        assert!(stderr(&out).contains(said), "{arg}: {}", stderr(&out));
        assert_eq!(env.runs(), 0, "{arg}: the command ran");
    }
}
