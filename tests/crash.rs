//! Never an orphan, never a torn cache: runs that end by success, failure, timeout,
//! signals to singleflight, SIGKILL, output overflow and disk faults, checked against
//! the real process table and the real cache dir.

// Half of these tests need /proc and run on Linux only; elsewhere their helpers go unused.
// The ones that send signals (and `Running`, which does) are Unix-only.
#![cfg_attr(not(target_os = "linux"), allow(dead_code, unused_imports))]

use crate::common;

use std::fs;
#[cfg(unix)]
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{
    TestEnv, alive, assert_status, blocked_on_a_lock, call_args, finish, marker, status, stderr,
    stdout, wait_until,
};
#[cfg(unix)]
use rustix::process::{Pid, Signal};

/// Sends `signal` to a process the test started.
#[cfg(unix)]
fn send(pid: u32, signal: Signal) {
    let pid = Pid::from_raw(pid as i32).expect("a real pid");
    rustix::process::kill_process(pid, signal).expect("signal a process of the test");
}

/// A singleflight the test started: if the test fails before it is finished, it gets
/// SIGTERM (and stops its run's tree) instead of lingering.
#[cfg(unix)]
struct Running(Option<Child>);

#[cfg(unix)]
impl Running {
    fn id(&self) -> u32 {
        self.0.as_ref().expect("running").id()
    }

    fn finish(mut self) -> std::process::Output {
        finish(self.0.take().expect("running"))
    }
}

#[cfg(unix)]
impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            // Not reaped yet, so the pid is still this child's.
            send(child.id(), Signal::TERM);
            let _ = child.wait();
        }
    }
}

/// The live `sleep MARKER` processes (not the shells or singleflights whose command
/// lines mention the marker too).
fn sleepers(marker: &str) -> Vec<u32> {
    alive(marker)
        .into_iter()
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmdline| cmdline.split(|b| *b == 0).next() == Some(b"sleep"))
        })
        .collect()
}

fn file_in_cache(env: &TestEnv, name: &str) -> PathBuf {
    env.cache.join(name)
}

/// `<NAME>.failure` as JSON.
fn failure(env: &TestEnv, name: &str) -> serde_json::Value {
    let text = fs::read_to_string(file_in_cache(env, &format!("{name}.failure")))
        .expect("a failure record");
    serde_json::from_str(&text).expect("the failure record is JSON")
}

/// Waits for a child without reading its pipes (which would unblock it).
fn wait_exit(child: &mut Child) -> ExitStatus {
    let mut status = None;
    wait_until("singleflight exits", || {
        status = child.try_wait().expect("try_wait");
        status.is_some()
    });
    status.expect("exited")
}

#[cfg(unix)]
fn assert_died_of(output_status: ExitStatus, signal: i32, what: &str) {
    assert_eq!(
        output_status.signal(),
        Some(signal),
        "{what}: expected death by signal {signal} (a shell shows {}), got {output_status:?}",
        128 + signal
    );
}

// ---------------------------------------------------------------------------------
// Escapees

/// A command whose descendants leave the run's process group (`setsid`), double fork
/// (`( … &)`) and stay in the background (`&`), then ends as `end` says. Their pids
/// go to `pids`.
fn escaping(marker: &str, pids: &std::path::Path, end: &str) -> String {
    format!(
        "setsid sleep {marker} & echo $! >> {pids}; (sleep {marker} & echo $! >> {pids}); \
         sleep {marker} & echo $! >> {pids}; echo out; {end}",
        pids = pids.display()
    )
}

/// The escapees were there, and none is left.
fn assert_escapees_gone(env: &TestEnv, marker: &str) {
    let pids = fs::read_to_string(env.path("pids")).unwrap_or_default();
    assert_eq!(pids.lines().count(), 3, "the escapees never started");
    assert_eq!(
        alive(marker),
        Vec::<u32>::new(),
        "processes of the run outlived it"
    );
}

/// A run that ends with `tail` (after printing "out") leaves no escapee alive.
fn escapees_are_killed_when_the_run_ends_with(tail: &str, expected: i32) {
    let env = TestEnv::new();
    let m = marker();
    let script = escaping(&m, &env.path("pids"), tail);
    let output = finish(env.spawn(["esc", "--", "sh", "-c", &script]));
    assert_status(&output, expected);
    assert_eq!(stdout(&output), "out\n");
    assert_escapees_gone(&env, &m);
}

#[cfg(target_os = "linux")]
#[test]
fn escapees_are_killed_when_the_run_succeeds() {
    escapees_are_killed_when_the_run_ends_with("exit 0", 0);
}

#[cfg(target_os = "linux")]
#[test]
fn escapees_are_killed_when_the_run_fails() {
    escapees_are_killed_when_the_run_ends_with("exit 3", 3);
}

#[cfg(target_os = "linux")]
#[test]
fn escapees_are_killed_when_the_run_times_out_ignoring_sigterm() {
    let env = TestEnv::new();
    let m = marker();
    // Everything ignores SIGTERM (the disposition is inherited): only SIGKILL ends it.
    let script = format!(
        "trap '' TERM; {}",
        escaping(&m, &env.path("pids"), &format!("sleep {m}"))
    );
    // The timeout cannot wait for the escapees to start: a run whose shell had not
    // started all three in time (a loaded machine) proves nothing and is tried again
    // with a longer timeout.
    for timeout in ["1s", "4s", "16s"] {
        let _ = fs::remove_file(env.path("pids"));
        let output = finish(env.spawn([
            "esc",
            "--timeout",
            timeout,
            "--kill-after",
            "1s",
            "--retry-after",
            "0",
            "--",
            "sh",
            "-c",
            &script,
        ]));
        assert_status(&output, 124);
        assert!(
            !env.result_file("esc").exists(),
            "a timed-out run was cached"
        );
        let pids = fs::read_to_string(env.path("pids")).unwrap_or_default();
        if pids.lines().count() == 3 {
            assert_escapees_gone(&env, &m);
            return;
        }
        assert_eq!(alive(&m), Vec::<u32>::new(), "processes outlived the run");
    }
    panic!("the escapees never started before the timeout");
}

// ---------------------------------------------------------------------------------
// Signals to singleflight

/// SIGINT, SIGTERM or SIGHUP to a singleflight whose run is blocked: the tree is
/// stopped, nothing is cached, no temp file or run record is left, and singleflight
/// dies of the signal (a shell shows 128+N).
#[cfg(unix)]
fn signal_stops_the_run(signal: Signal, number: i32) {
    let env = TestEnv::new();
    let m = marker();
    let started = env.path("started");
    let script = format!(
        "setsid sleep {m} & sleep {m} & echo partial; touch {}; sleep {m}",
        started.display()
    );
    let child = Running(Some(
        env.spawn(["sig", "--ttl", "0", "--", "sh", "-c", &script]),
    ));
    wait_until("the command and its sleeps started", || {
        started.exists() && sleepers(&m).len() == 3
    });
    send(child.id(), signal);
    let output = child.finish();
    assert_died_of(output.status, number, "singleflight");
    assert_eq!(stdout(&output), "", "an interrupted run printed its output");
    assert_eq!(
        alive(&m),
        Vec::<u32>::new(),
        "processes of the run outlived it"
    );
    assert!(
        !env.result_file("sig").exists(),
        "an interrupted run was cached"
    );
    assert_eq!(env.temps(), Vec::<PathBuf>::new(), "temp file left behind");
    assert!(
        !file_in_cache(&env, "sig.run").exists(),
        "run record left behind"
    );
    // The next call runs normally.
    let next = env.run(["sig", "--", "echo", "next"]);
    assert_eq!((status(&next), stdout(&next)), (0, "next\n".into()));
}

#[cfg(unix)]
#[test]
fn sigint_stops_the_run_and_caches_nothing() {
    signal_stops_the_run(Signal::INT, 2);
}

#[cfg(unix)]
#[test]
fn sigterm_stops_the_run_and_caches_nothing() {
    signal_stops_the_run(Signal::TERM, 15);
}

#[cfg(unix)]
#[test]
fn sighup_stops_the_run_and_caches_nothing() {
    signal_stops_the_run(Signal::HUP, 1);
}

/// `nohup singleflight …`: a signal ignored when singleflight started stays ignored,
/// for singleflight and for the command, and the run goes on to be cached.
#[cfg(unix)]
#[test]
fn a_signal_ignored_at_start_stays_ignored() {
    let env = TestEnv::new();
    let (started, gate) = (env.path("started"), env.path("gate"));
    let script = format!(
        "touch {}; while [ ! -e {} ]; do sleep 0.01; done; echo survived",
        started.display(),
        gate.display()
    );
    let bin = env!("CARGO_BIN_EXE_singleflight");
    let nohup = format!("trap '' HUP; exec {bin} hup -- sh -c \"$0\"");
    let child = env
        .command_for("sh")
        .args(["-c", &nohup, &script])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the command started", || started.exists());
    send(child.id(), Signal::HUP);
    // The run is still on: its command sees the gate only now.
    fs::write(&gate, "").unwrap();
    let output = finish(child);
    assert_eq!(
        (status(&output), stdout(&output)),
        (0, "survived\n".into()),
        "{}",
        stderr(&output)
    );
    assert!(env.result_file("hup").exists(), "the run was cached");
}

#[cfg(unix)]
#[test]
fn a_signal_gives_the_tree_sigterm_then_sigkill_after_the_grace() {
    let env = TestEnv::new();
    let m = marker();
    let started = env.path("started");
    let got = env.path("got");
    // The shell notes SIGTERM and carries on; only SIGKILL after --kill-after ends it.
    let script = format!(
        "trap 'echo TERM >> {got}' TERM; touch {started}; while :; do sleep {m}; done",
        got = got.display(),
        started = started.display()
    );
    // The grace is generous so that a loaded machine still lets the shell run its trap
    // within it; the test takes that long, as it waits for the SIGKILL.
    let child = env.spawn(["grace", "--kill-after", "5s", "--", "sh", "-c", &script]);
    // Not just `started`: a SIGTERM that reaches the shell's child between its fork and
    // its exec of `sleep` runs the shell's handler there and is lost with the exec;
    // the shell, which defers its trap until its foreground `sleep` ends, then waits
    // for that sleep until the SIGKILL (measured: dash alone, signalled as soon as
    // `started` appeared under a CPU hog, lost 48 of 400 such signals). An exec'd
    // `sleep` has SIGTERM at its default and dies of it.
    wait_until("the command's sleep started", || {
        started.exists() && sleepers(&m).len() == 1
    });
    send(child.id(), Signal::TERM);
    let output = finish(child);
    assert_died_of(output.status, 15, "singleflight");
    let got = fs::read_to_string(&got).unwrap_or_default();
    assert!(got.starts_with("TERM"), "the command never saw SIGTERM");
    assert_eq!(alive(&m), Vec::<u32>::new(), "SIGKILL did not follow");
}

#[cfg(unix)]
#[test]
fn a_caller_waiting_for_the_run_dies_of_sigterm_at_once() {
    let env = TestEnv::new();
    let m = marker();
    let started = env.path("started");
    let script = format!("touch {}; sleep {m}", started.display());
    let args = ["w", "--", "sh", "-c", &script];
    let runner = Running(Some(env.spawn(args)));
    wait_until("the command started", || {
        started.exists() && sleepers(&m).len() == 1
    });
    let waiter = env.spawn(args);
    let pid = waiter.id();
    wait_until("the second caller waits for the lock", || {
        blocked_on_a_lock(pid)
    });
    send(pid, Signal::TERM);
    let output = finish(waiter);
    assert_died_of(output.status, 15, "the waiting caller");
    // The run itself goes on, unharmed.
    assert_eq!(sleepers(&m).len(), 1, "the run in flight was disturbed");
    send(runner.id(), Signal::TERM);
    assert_died_of(runner.finish().status, 15, "the running caller");
    assert_eq!(alive(&m), Vec::<u32>::new());
}

/// Once the run is over a signal is no longer turned into "stop the run": it must end
/// singleflight at once, even while it writes a large result to a reader that does
/// not read. (signal-hook's unregistered handlers used to leave the signals ignored.)
#[cfg(target_os = "linux")]
#[test]
fn a_caller_printing_its_fresh_result_dies_of_sigterm_at_once() {
    let env = TestEnv::new();
    let mut child = env
        .command()
        .args(["big", "--", "head", "-c", "4000000", "/dev/zero"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("singleflight starts");
    let pid = child.id();
    let wchan = format!("/proc/{pid}/wchan");
    wait_until(
        "singleflight saved the result and blocks writing it",
        || {
            env.result_file("big").exists()
                && fs::read_to_string(&wchan).is_ok_and(|w| w.contains("pipe"))
        },
    );
    send(pid, Signal::TERM);
    let exit = wait_exit(&mut child);
    assert_died_of(exit, 15, "the printing caller");
}

// ---------------------------------------------------------------------------------
// SIGKILL to singleflight

#[cfg(target_os = "linux")]
#[test]
fn after_sigkill_the_next_winner_kills_what_is_left_of_the_run() {
    let env = TestEnv::new();
    let m = marker();
    let started = env.path("started");
    let done = env.path("done");
    // The first run leaves its tree behind; the next call finds "done" and just prints.
    let script = format!(
        "if [ -e {done} ]; then echo second; exit 0; fi; \
         setsid sleep {m} & (sleep {m} &); sleep {m} & touch {started}; sleep {m}",
        done = done.display(),
        started = started.display()
    );
    let args = ["k9", "--ttl", "0", "--", "sh", "-c", &script];
    let first = env.spawn(args);
    wait_until("the command and its sleeps started", || {
        started.exists() && sleepers(&m).len() == 4
    });
    let command = direct_child(first.id()).expect("the command runs");
    // The guard dies too (a host killing every process of the caller): the fallback.
    kill_guard_of(first.id());
    send(first.id(), Signal::KILL);
    assert_died_of(finish(first).status, 9, "singleflight");
    // PR_SET_PDEATHSIG: the command itself goes with singleflight ...
    wait_until("the command died with singleflight", || !is_alive(command));
    // ... and the escapees stay until the next winner.
    assert_eq!(
        sleepers(&m).len(),
        4,
        "setsid, double-forked, background and foreground sleeps"
    );
    assert!(file_in_cache(&env, "k9.run").exists(), "no run record");
    fs::write(&done, "").expect("write done");
    let second = env.run(args);
    assert_status(&second, 0);
    assert_eq!(stdout(&second), "second\n");
    assert!(
        stderr(&second).contains("killing what is left"),
        "{}",
        stderr(&second)
    );
    assert_eq!(
        alive(&m),
        Vec::<u32>::new(),
        "the next winner left remains alive"
    );
    assert!(!file_in_cache(&env, "k9.run").exists());
    // It cached: a fresh call now is a hit.
    let third = env.run(["k9", "--ttl", "1h", "--", "sh", "-c", &script]);
    assert_eq!(stdout(&third), "second\n");
}

/// A `--background` refresher hands its lock on as an inherited fd: the command must
/// not inherit it too, or the escapees of a SIGKILLed refresher hold the lock forever
/// and no winner ever comes to kill them.
#[cfg(target_os = "linux")]
#[test]
fn after_sigkill_of_a_background_refresher_the_lock_is_free_and_remains_are_killed() {
    let env = TestEnv::new();
    let m = marker();
    let done = env.path("done");
    let script = format!(
        "if [ -e {done} ]; then echo second; exit 0; fi; setsid sleep {m} & sleep {m}",
        done = done.display()
    );
    let first = env.run([
        "bg",
        "--background",
        "--wait",
        "0",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    assert_status(&first, 75);
    let record = file_in_cache(&env, "bg.run");
    let mut refresher = 0;
    wait_until("the refresher started the command", || {
        let run: serde_json::Value = fs::read(&record)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        refresher = run["owner_pid"].as_u64().unwrap_or(0) as u32;
        run["pid"].as_u64().unwrap_or(0) != 0 && sleepers(&m).len() == 2
    });
    kill_guard_of(refresher);
    send(refresher, Signal::KILL);
    wait_until("the refresher is gone", || !is_alive(refresher));
    assert_eq!(sleepers(&m).len(), 2, "the escapees outlive the refresher");
    fs::write(&done, "").expect("write done");
    let second = env.run([
        "bg", "--ttl", "0", "--wait", "5s", "--", "sh", "-c", &script,
    ]);
    assert_status(&second, 0);
    assert_eq!(stdout(&second), "second\n");
    assert_eq!(
        alive(&m),
        Vec::<u32>::new(),
        "remains of the refresher's run"
    );
}

/// A record names a pid that now belongs to an unrelated process (same pid, another
/// start time, no token): the next winner must leave it alone. The same record with
/// the right start time does get it killed, so the check is what spares it.
#[cfg(target_os = "linux")]
#[test]
fn a_reused_pid_is_never_hit() {
    let env = TestEnv::new();
    let m = marker();
    let mut unrelated = {
        use std::os::unix::process::CommandExt;
        Command::new("sleep")
            .arg(&m)
            .process_group(0)
            .spawn()
            .expect("sleep starts")
    };
    let pid = unrelated.id();
    let ticks = start_ticks(pid);
    assert!(ticks > 0);
    let boot_id = fs::read_to_string("/proc/sys/kernel/random/boot_id").expect("boot id");
    let forge = |start_ticks: u64| {
        let record = serde_json::json!({
            "token": "forged-token-nobody-carries",
            "boot_id": boot_id.trim(),
            "owner_pid": 1,
            "pid": pid,
            // Earlier than the live process: the recorded run started before it, as
            // when a pid is reused.
            "start_ticks": start_ticks,
            "started_at_ms": 0,
        });
        fs::create_dir_all(&env.cache).expect("cache dir");
        let mut perms = fs::metadata(&env.cache).expect("cache dir").permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o700);
        fs::set_permissions(&env.cache, perms).expect("chmod cache dir");
        fs::write(file_in_cache(&env, "reuse.run"), record.to_string()).expect("forge record");
    };

    forge(ticks - 1);
    let output = env.run(["reuse", "--ttl", "0", "--", "echo", "hi"]);
    assert_status(&output, 0);
    assert!(
        stderr(&output).contains("killing what is left"),
        "the record was not read"
    );
    assert!(
        unrelated.try_wait().expect("try_wait").is_none(),
        "a process that only shares the pid was killed"
    );
    assert_eq!(sleepers(&m), vec![pid]);

    // Control: the same record with the process's real start time names its group.
    forge(ticks);
    let output = env.run(["reuse", "--ttl", "0", "--", "echo", "hi"]);
    assert_status(&output, 0);
    let exit = wait_exit(&mut unrelated);
    assert_eq!(exit.signal(), Some(9), "the recorded group was not killed");
}

fn start_ticks(pid: u32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let (_, rest) = stat.rsplit_once(')').unwrap_or_default();
    rest.split_whitespace()
        .nth(19)
        .and_then(|t| t.parse().ok())
        .unwrap_or(0)
}

fn is_alive(pid: u32) -> bool {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(')')
        .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
}

/// The children of singleflight `pid`: (its guard, its command).
fn children_of(pid: u32) -> (Option<u32>, Option<u32>) {
    let children =
        fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    let (mut guard, mut command) = (None, None);
    for child in children
        .split_whitespace()
        .filter_map(|c| c.parse::<u32>().ok())
    {
        let cmdline = fs::read(format!("/proc/{child}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains("__guard") {
            guard = Some(child);
        } else {
            command = command.or(Some(child));
        }
    }
    (guard, command)
}

/// The command of singleflight `pid` (its child that is not the guard).
fn direct_child(pid: u32) -> Option<u32> {
    children_of(pid).1
}

/// SIGKILLs the guard of singleflight `pid` and waits until it is gone, so that what
/// a SIGKILL of singleflight leaves is the next winner's to clean up.
#[cfg(unix)]
fn kill_guard_of(pid: u32) {
    let guard = children_of(pid).0.expect("singleflight has a guard");
    send(guard, Signal::KILL);
    wait_until("the guard is gone", || !is_alive(guard));
}

// ---------------------------------------------------------------------------------
// Torture: SIGKILL at any moment, concurrent readers

/// The command of the torture test: a version line (`MARKER PID TOKEN`) repeated to a
/// size derived from the pid, 1 to 4 MiB; plus an escapee only a winner can kill.
const TORTURE_SCRIPT: &str = r#"setsid sleep "$0" &
line="$0 $$ $SINGLEFLIGHT_RUN_ID"
yes "$line" | head -c $(( 1048576 + ($$ % 3072) * 1024 ))"#;

/// Whether `out` is exactly one complete version written by [`TORTURE_SCRIPT`].
fn check_version(out: &[u8], marker: &str) -> Result<(), String> {
    let Some(end) = out.iter().position(|b| *b == b'\n') else {
        return Err(format!("no version line in {} bytes", out.len()));
    };
    let line = &out[..=end];
    let text = String::from_utf8_lossy(line);
    let words: Vec<&str> = text.split_whitespace().collect();
    if words.len() != 3 || words[0] != marker {
        return Err(format!("not a version line: {text:?}"));
    }
    let pid: u64 = words[1]
        .parse()
        .map_err(|_| format!("bad pid in {text:?}"))?;
    let size = 1_048_576 + (pid % 3072) * 1024;
    if out.len() as u64 != size {
        return Err(format!(
            "{} bytes of version {text:?}, not {size}",
            out.len()
        ));
    }
    for (i, chunk) in out.chunks(line.len()).enumerate() {
        if chunk != &line[..chunk.len()] {
            return Err(format!("version {text:?} mixed with another at line {i}"));
        }
    }
    Ok(())
}

struct Reads {
    /// Reads checked, by kind of reader: fresh hits, stale servers.
    checked: [AtomicUsize; 2],
    bad: std::sync::Mutex<Vec<String>>,
}

fn reader(
    env: Arc<TestEnv>,
    kind: usize,
    args: Vec<String>,
    marker: String,
    stop: Arc<AtomicBool>,
    reads: Arc<Reads>,
) {
    while !stop.load(Ordering::Relaxed) {
        let output = env.run(&args);
        let verdict = if output.status.success() {
            check_version(&output.stdout, &marker)
        } else {
            Err(format!("status {:?}: {}", output.status, stderr(&output)))
        };
        match verdict {
            Ok(()) => reads.checked[kind].fetch_add(1, Ordering::Relaxed),
            Err(e) => {
                reads
                    .bad
                    .lock()
                    .expect("lock")
                    .push(format!("{args:?}: {e}"));
                0
            }
        };
    }
}

#[cfg(target_os = "linux")]
#[test]
fn kill_9_at_any_moment_never_tears_the_cache_nor_sticks_the_lock() {
    const ITERATIONS: usize = 200;
    let env = Arc::new(TestEnv::new());
    let m = marker();
    let command = |ttl: &str, extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = vec!["big".into(), "--ttl".into(), ttl.into()];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend(["--", "sh", "-c", TORTURE_SCRIPT, &m].map(String::from));
        args
    };
    let writer_args = command("0", &[]);
    let seed = env.run(&writer_args);
    assert_status(&seed, 0);
    check_version(&seed.stdout, &m).expect("the seed is a version");

    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(Reads {
        checked: Default::default(),
        bad: Default::default(),
    });
    // Fresh hits read the file while it is replaced; stale servers take the lock's
    // "lost" path, and run the command themselves when they win.
    let readers: Vec<_> = [command("1h", &[]), command("0", &["--max-stale", "1h"])]
        .into_iter()
        .enumerate()
        .map(|(kind, args)| {
            let (env, m, stop, reads) = (env.clone(), m.clone(), stop.clone(), reads.clone());
            thread::spawn(move || reader(env, kind, args, m, stop, reads))
        })
        .collect();

    let mut killed_mid_write = 0;
    let mut killed_after_rename = 0;
    for i in 0..ITERATIONS {
        let before = env.temps();
        let mut writer = env
            .command()
            .args(&writer_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("singleflight starts");
        // The moment varies with the progress of the run: right away, once its temp
        // file holds `threshold` bytes (0 to past the largest output, which lands in
        // the save), or once its temp file has been renamed (printing).
        let threshold = ((i * 37) % 26) as u64 * 170 * 1024;
        let mut seen_temp = None;
        if i % 25 != 0 {
            wait_until("the moment to kill", || {
                if writer.try_wait().expect("try_wait").is_some() {
                    return true;
                }
                let now = env.temps();
                match &seen_temp {
                    None => {
                        seen_temp = now.into_iter().find(|t| !before.contains(t));
                        false
                    }
                    Some(temp) => match fs::metadata(temp) {
                        Ok(meta) => meta.len() >= threshold,
                        Err(_) => {
                            killed_after_rename += 1;
                            true
                        }
                    },
                }
            });
        }
        if seen_temp.as_ref().is_some_and(|t| t.exists()) {
            killed_mid_write += 1;
        }
        let _ = rustix::process::kill_process(
            Pid::from_raw(writer.id() as i32).expect("pid"),
            Signal::KILL,
        );
        let _ = writer.wait();
    }
    stop.store(true, Ordering::Relaxed);
    for reader in readers {
        reader.join().expect("reader thread");
    }
    let elapsed = start.elapsed();
    let [hits, stale] = [0, 1].map(|kind| reads.checked[kind].load(Ordering::Relaxed));
    let bad = reads.bad.lock().expect("lock").clone();
    eprintln!(
        "torture: {ITERATIONS} SIGKILLs ({killed_mid_write} with the temp file present, \
         {killed_after_rename} after its rename) in {elapsed:?}; {hits} fresh hits and \
         {stale} stale reads checked"
    );
    assert!(bad.is_empty(), "torn or failed reads: {bad:#?}");
    // Every moment the test means to cover was hit. A kill after the rename needs the
    // poll to fall between the rename and the exit; of the ~75 iterations that wait
    // for it (threshold past the output) some always do.
    assert!(killed_mid_write > 0, "no run was killed while writing");
    assert!(
        killed_after_rename > 0,
        "no run was killed after its rename"
    );
    assert!(hits > 0, "the fresh-hit reader read nothing");
    assert!(stale > 0, "the stale reader read nothing");

    // No stuck lock: a call wins and runs; it kills what the last victim left.
    let leftover = env.temps();
    let last = env.run(
        ["-v"]
            .iter()
            .map(|s| s.to_string())
            .chain(writer_args.clone()),
    );
    assert_status(&last, 0);
    assert!(
        stderr(&last).contains("ran the command"),
        "{}",
        stderr(&last)
    );
    check_version(&last.stdout, &m).expect("the last run's output");
    assert_eq!(
        alive(&m),
        Vec::<u32>::new(),
        "processes of killed runs are alive"
    );
    check_version(&read_result_body(&env), &m).expect("the cached result");

    // Temp files of killed runs go once they are old, and only then.
    let old = env.cache.join(".tmp.big.oldone");
    let young = env.cache.join(".tmp.big.youngone");
    fs::write(&old, "x").expect("write");
    fs::write(&young, "x").expect("write");
    let mut to_age: Vec<PathBuf> = leftover.iter().filter(|t| t.exists()).cloned().collect();
    to_age.push(old.clone());
    let touched = Command::new("touch")
        .args(["-d", "2 hours ago"])
        .args(&to_age)
        .status()
        .expect("touch runs");
    assert!(touched.success());
    eprintln!(
        "torture: {} temp files left by killed runs",
        to_age.len() - 1
    );
    let cleanup = env.run(&writer_args);
    assert_status(&cleanup, 0);
    assert_eq!(
        env.temps(),
        vec![young],
        "old temps stay, or a young one went"
    );
}

/// The body of the cached result, skipping the header and metadata.
fn read_result_body(env: &TestEnv) -> Vec<u8> {
    let bytes = fs::read(env.result_file("big")).unwrap_or_default();
    let word = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().unwrap_or_default());
    // Format version 2: a 40-byte header (see src/entry/mod.rs).
    if bytes.len() < 40 {
        return Vec::new();
    }
    let body_len = word(8) as usize;
    bytes[40..(40 + body_len).min(bytes.len())].to_vec()
}

// ---------------------------------------------------------------------------------
// --max-output

/// Watches the cache dir until told to stop; returns the largest file seen.
fn watch_sizes(dir: PathBuf, stop: Arc<AtomicBool>) -> thread::JoinHandle<u64> {
    thread::spawn(move || {
        let mut largest = 0;
        while !stop.load(Ordering::Relaxed) {
            for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
                if let Ok(meta) = entry.metadata() {
                    largest = largest.max(meta.len());
                }
            }
            thread::sleep(Duration::from_millis(1));
        }
        largest
    })
}

#[cfg(target_os = "linux")]
#[test]
fn max_output_kills_the_tree_and_writes_nothing_past_the_cap() {
    let env = TestEnv::new();
    let m = marker();
    let mode = env.path("mode");
    let script = format!(
        "if [ -e {mode} ]; then setsid sleep {m} & yes {m}; else echo good; fi",
        mode = mode.display()
    );
    let args = [
        "cap",
        "--ttl",
        "0",
        "--max-output",
        "64KiB",
        "--",
        "sh",
        "-c",
        &script,
    ];
    const CAP: u64 = 64 * 1024;

    // Nothing cached: the run's own (capped) output, exit 125, nothing cached.
    fs::write(&mode, "").expect("write mode");
    let stop = Arc::new(AtomicBool::new(false));
    fs::create_dir_all(&env.cache).expect("cache dir");
    fs::set_permissions(
        &env.cache,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .expect("chmod");
    let watcher = watch_sizes(env.cache.clone(), stop.clone());
    let output = env.run(args);
    stop.store(true, Ordering::Relaxed);
    let largest = watcher.join().expect("watcher");
    assert_status(&output, 125);
    assert!(
        stderr(&output).contains("--max-output"),
        "{}",
        stderr(&output)
    );
    assert_eq!(
        output.stdout.len() as u64,
        CAP,
        "the capped output is printed"
    );
    let line = format!("{m}\n");
    assert!(
        output
            .stdout
            .chunks(line.len())
            .all(|c| c == &line.as_bytes()[..c.len()]),
        "the printed bytes are the command's"
    );
    assert!(
        largest <= CAP + 40,
        "a file of {largest} bytes in the cache dir"
    );
    assert!(largest > 0, "the watcher saw nothing");
    assert_eq!(
        alive(&m),
        Vec::<u32>::new(),
        "the tree outlived the overflow"
    );
    assert!(
        !env.result_file("cap").exists(),
        "an overflowing run was cached"
    );
    assert_eq!(env.temps(), Vec::<PathBuf>::new());
    let reason = failure(&env, "cap")["reason"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(reason.contains("max-output"), "failure reason: {reason}");

    // A good result: an overflowing run keeps it, and it is served.
    fs::remove_file(&mode).expect("rm mode");
    let good = env.run(args);
    assert_eq!((status(&good), stdout(&good)), (0, "good\n".into()));
    let before = fs::read(env.result_file("cap")).expect("result");
    fs::write(&mode, "").expect("write mode");
    let output = env.run(args);
    assert_status(&output, 125);
    assert_eq!(stdout(&output), "good\n", "the last good result is served");
    assert_eq!(fs::read(env.result_file("cap")).expect("result"), before);
    assert_eq!(alive(&m), Vec::<u32>::new());
}

// ---------------------------------------------------------------------------------
// --retry-after

/// A command that counts its runs and fails (exit 3, "oops" on stderr) while `fail`
/// exists.
fn flaky(env: &TestEnv) -> (String, PathBuf) {
    let fail = env.path("fail");
    let script = format!(
        "echo run >> {counter}; if [ -e {fail} ]; then echo oops >&2; exit 3; fi; echo good",
        counter = env.counter().display(),
        fail = fail.display()
    );
    (script, fail)
}

/// `r --ttl 0 --retry-after RETRY -- sh -c SCRIPT`: every call wants a run.
fn flaky_args(script: &str, retry: &str) -> Vec<String> {
    call_args(
        "r",
        &["--ttl", "0", "--retry-after", retry],
        &["sh", "-c", script],
    )
}

/// Waits until the NAME's failure record is older than `age`.
fn wait_failure_older_than(env: &TestEnv, name: &str, age: Duration) {
    let at = failure(env, name)["at_ms"].as_u64().expect("at_ms");
    let at = UNIX_EPOCH + Duration::from_millis(at);
    wait_until("the failure is old enough", || {
        SystemTime::now().duration_since(at).unwrap_or_default() > age
    });
}

#[test]
fn within_retry_after_nobody_reruns_and_nothing_cached_means_75() {
    let env = TestEnv::new();
    let (script, fail) = flaky(&env);
    let args = |retry: &str| flaky_args(&script, retry);
    fs::write(&fail, "").expect("write fail");
    let first = env.run(args("1h"));
    assert_status(&first, 3);
    assert_eq!(env.runs(), 1);
    let record = failure(&env, "r");
    assert!(
        record["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("exit status 3")
    );
    assert!(
        record["stderr_tail"]
            .as_str()
            .unwrap_or_default()
            .contains("oops")
    );

    fs::remove_file(&fail).expect("rm fail");
    for _ in 0..5 {
        let output = env.run(args("1h"));
        assert_status(&output, 75);
        assert_eq!(stdout(&output), "");
        assert!(stderr(&output).contains("failed"), "{}", stderr(&output));
        assert!(
            stderr(&output).contains("next try in"),
            "{}",
            stderr(&output)
        );
    }
    assert_eq!(env.runs(), 1, "a caller reran within --retry-after");

    wait_failure_older_than(&env, "r", Duration::from_secs(1));
    let output = env.run(args("1s"));
    assert_eq!((status(&output), stdout(&output)), (0, "good\n".into()));
    assert_eq!(env.runs(), 2, "no rerun after --retry-after");
}

#[test]
fn within_retry_after_callers_get_the_last_good_result() {
    let env = TestEnv::new();
    let (script, fail) = flaky(&env);
    let args = |retry: &str| flaky_args(&script, retry);
    let good = env.run(args("1h"));
    assert_eq!((status(&good), stdout(&good)), (0, "good\n".into()));
    fs::write(&fail, "").expect("write fail");
    let failed = env.run(args("1h"));
    assert_status(&failed, 3);
    assert_eq!(stdout(&failed), "good\n", "the last good result is printed");
    assert_eq!(env.runs(), 2);
    for _ in 0..5 {
        let output = env.run(args("1h"));
        assert_eq!((status(&output), stdout(&output)), (0, "good\n".into()));
    }
    assert_eq!(env.runs(), 2, "a caller reran within --retry-after");

    wait_failure_older_than(&env, "r", Duration::from_secs(1));
    let output = env.run(args("1s"));
    assert_status(&output, 3);
    assert_eq!(env.runs(), 3, "no rerun after --retry-after");
}

#[test]
fn a_timed_out_run_counts_as_a_failure_for_retry_after() {
    let env = TestEnv::new();
    let m = marker();
    let script = format!("echo run >> {}; sleep {m}", env.counter().display());
    let args = [
        "t",
        "--timeout",
        "300ms",
        "--kill-after",
        "100ms",
        "--retry-after",
        "1h",
    ];
    let first = env.run(args.iter().copied().chain(["--", "sh", "-c", &script]));
    assert_status(&first, 124);
    let reason = failure(&env, "t")["reason"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(reason.contains("timed out"), "{reason}");
    // Not `runs() == 1`: on a loaded machine the shell may not have got to its `echo`
    // within the 300ms.
    let ran = env.runs();
    let again = env.run(args.iter().copied().chain(["--", "sh", "-c", &script]));
    assert_status(&again, 75);
    assert_eq!(
        env.runs(),
        ran,
        "the command ran again within --retry-after"
    );
}

// ---------------------------------------------------------------------------------
// Faults

/// Output bigger than RLIMIT_FSIZE lets singleflight write to a file: the write of
/// the result fails (EFBIG) as on a full disk, while the command, writing to a pipe,
/// is unaffected.
#[cfg(target_os = "linux")]
#[test]
fn a_full_disk_keeps_the_old_result_and_still_prints_the_run() {
    let env = TestEnv::new();
    let version = env.path("version");
    let script = format!("v=$(cat {}); yes \"$v\" | head -c 65536", version.display());
    let args = ["disk", "--ttl", "0", "--", "sh", "-c", &script];
    fs::write(&version, "old").expect("write");
    let old = env.run(args);
    assert_status(&old, 0);
    let before = fs::read(env.result_file("disk")).expect("result");

    fs::write(&version, "new").expect("write");
    let output = Command::new("sh")
        .arg("-c")
        .arg(r#"trap "" XFSZ; ulimit -f 1; exec "$0" "$@""#)
        .arg(env!("CARGO_BIN_EXE_singleflight"))
        .args(args)
        .env("SINGLEFLIGHT_CACHE_DIR", &env.cache)
        .env_remove("SINGLEFLIGHT_BACKEND")
        .stdin(Stdio::null())
        .output()
        .expect("sh runs");
    assert_eq!(
        status(&output),
        0,
        "the run's own status: {}",
        stderr(&output)
    );
    assert_eq!(output.stdout.len(), 65536, "{}", stderr(&output));
    assert!(output.stdout.chunks(4).all(|c| c == &b"new\n"[..c.len()]));
    assert!(
        stderr(&output).contains("could not be saved")
            && stderr(&output).contains("the previous result is kept"),
        "no warning: {}",
        stderr(&output)
    );
    assert_eq!(fs::read(env.result_file("disk")).expect("result"), before);
    assert_eq!(env.temps(), Vec::<PathBuf>::new());
}

#[cfg(target_os = "linux")]
#[test]
fn a_read_only_cache_dir_keeps_the_old_result_and_still_prints_the_run() {
    let env = TestEnv::new();
    let sf = env!("CARGO_BIN_EXE_singleflight");
    let cache = env.cache.display().to_string();
    let version = env.path("version");
    let script = format!("cat {}", version.display());
    fs::write(&version, "old\n").expect("write");
    let out_dir = env.path("out");
    fs::create_dir(&out_dir).expect("mkdir");
    // One sh session: a cache with an old result, made read-only, then a run.
    let scenario = |make_read_only: &str, undo: &str| {
        format!(
            r#"set -e
{setup}
"$SF" ro --ttl 0 -- sh -c '{script}' > /dev/null
cp "$CACHE/ro.result" "$OUT/before"
echo new > '{version}'
{make_read_only}
set +e
"$SF" ro --ttl 0 -- sh -c '{script}' > "$OUT/stdout" 2> "$OUT/stderr"
echo $? > "$OUT/status"
cp "$CACHE/ro.result" "$OUT/after"
ls -a "$CACHE" > "$OUT/ls"
{undo}"#,
            setup = if make_read_only.contains("mount") {
                "mkdir -p \"$CACHE\"; mount -t tmpfs -o mode=0700,size=4m tmpfs \"$CACHE\""
            } else {
                "mkdir -m 700 -p \"$CACHE\""
            },
            version = version.display(),
        )
    };
    let attempts: Vec<(&str, Vec<String>)> = if common::is_root() {
        vec![
            // Root ignores permission bits: a private mount namespace with a tmpfs
            // remounted read-only, else the immutable attribute.
            (
                "read-only tmpfs in a private mount namespace",
                vec![
                    "unshare".into(),
                    "-m".into(),
                    "sh".into(),
                    "-c".into(),
                    scenario("mount -o remount,ro \"$CACHE\"", ""),
                ],
            ),
            (
                "chattr +i on the cache dir",
                vec![
                    "sh".into(),
                    "-c".into(),
                    scenario("chattr +i \"$CACHE\"", "chattr -i \"$CACHE\""),
                ],
            ),
        ]
    } else {
        vec![(
            "chmod 500 on the cache dir",
            vec![
                "sh".into(),
                "-c".into(),
                scenario("chmod 500 \"$CACHE\"", "chmod 700 \"$CACHE\""),
            ],
        )]
    };
    let mut failures = Vec::new();
    let mut tried = 0;
    for (how, argv) in attempts {
        let _ = fs::remove_dir_all(&env.cache);
        let _ = fs::remove_file(out_dir.join("status"));
        fs::write(&version, "old\n").expect("write");
        let ran = Command::new(&argv[0])
            .args(&argv[1..])
            .env("SF", sf)
            .env("CACHE", &cache)
            .env("OUT", &out_dir)
            .env("SINGLEFLIGHT_CACHE_DIR", &cache)
            .stdin(Stdio::null())
            .output()
            .expect("sh runs");
        let Ok(code) = fs::read_to_string(out_dir.join("status")) else {
            failures.push(format!("{how}: {}", String::from_utf8_lossy(&ran.stderr)));
            continue;
        };
        let read = |f: &str| fs::read_to_string(out_dir.join(f)).unwrap_or_default();
        eprintln!("read-only cache dir by {how}");
        assert_eq!(code.trim(), "0", "the run's own status: {}", read("stderr"));
        assert_eq!(read("stdout"), "new\n", "the run's output");
        assert!(
            read("stderr").contains("cannot write to the cache dir"),
            "{}",
            read("stderr")
        );
        assert_eq!(read("before"), read("after"), "the old result changed");
        assert!(!read("ls").contains(".tmp."), "{}", read("ls"));
        tried += 1;
    }
    if tried == 0 {
        common::skip(&format!(
            "there is no way to make a read-only cache dir here: {failures:?}"
        ));
    }
}

#[cfg(unix)]
#[test]
fn deleting_the_cache_dir_under_a_run_crashes_nobody() {
    let env = TestEnv::new();
    let go = env.path("go");
    let script = format!(
        "touch {root}/started.$$; while [ ! -e {go} ]; do sleep 0.01; done; echo out",
        root = env.root().display(),
        go = go.display()
    );
    let args = ["gone", "--ttl", "0", "--", "sh", "-c", &script];
    let started = || {
        fs::read_dir(env.root())
            .expect("root")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("started."))
            .count()
    };
    let runner = Running(Some(env.spawn(args)));
    wait_until("the run started", || started() == 1);
    let waiter = Running(Some(env.spawn(args)));
    let waiter_pid = waiter.id();
    wait_until("the waiter waits", || blocked_on_a_lock(waiter_pid));
    fs::remove_dir_all(&env.cache).expect("rm -rf the cache dir");
    // A caller after the deletion finds no lock: it makes a new dir and runs too.
    let late = Running(Some(env.spawn(args)));
    wait_until("the late caller's run started", || started() == 2);
    fs::write(&go, "").expect("open the gate");
    let (runner, waiter, late) = (runner.finish(), waiter.finish(), late.finish());
    for (who, output) in [("runner", &runner), ("waiter", &waiter), ("late", &late)] {
        eprintln!(
            "{who}: status {:?}, stdout {:?}, stderr {:?}",
            output.status,
            stdout(output),
            stderr(output)
        );
        assert!(!stderr(output).contains("panicked"), "{who} crashed");
    }
    assert_eq!((status(&runner), stdout(&runner)), (0, "out\n".into()));
    assert!(
        stderr(&runner).contains("could not be saved"),
        "{}",
        stderr(&runner)
    );
    assert_eq!((status(&late), stdout(&late)), (0, "out\n".into()));
    // The waiter serves the late caller's result if it is there by then, else 75.
    match status(&waiter) {
        0 => assert_eq!(stdout(&waiter), "out\n"),
        75 => assert!(
            stderr(&waiter).contains("nothing to serve"),
            "{}",
            stderr(&waiter)
        ),
        other => panic!("waiter exited {other}: {}", stderr(&waiter)),
    }
    assert_eq!(
        stdout(&env.run(["gone", "--ttl", "1h", "--", "sh", "-c", &script])),
        "out\n"
    );
}
