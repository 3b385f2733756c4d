//! Regression tests for the defects of issue 12: each names a defect that a user
//! found by trying to break singleflight, and fails if it comes back.

use crate::common;

use std::fs;

use common::*;

// ---- 2. Huge durations ----------------------------------------------------------

/// Every duration option refuses a value past the limit at parse time, with a usage
/// error that says what the limit is, before anything runs or is written.
#[test]
fn huge_durations_are_usage_errors_that_name_the_limit() {
    let env = TestEnv::new();
    let huge = "10000000000000000000";
    for option in [
        "--ttl",
        "--timeout",
        "--kill-after",
        "--wait",
        "--max-stale",
        "--retry-after",
        "--backend-timeout",
    ] {
        let out = env.run([option, huge, "huge", "--", "echo", "ran"]);
        assert_status(&out, 2);
        assert!(
            stderr(&out).contains("36500d"),
            "{option}: the error names the limit: {}",
            stderr(&out)
        );
        assert!(stdout(&out).is_empty(), "{option}: nothing ran");
    }
    assert!(
        !env.cache.join("huge.run").exists(),
        "no run record left behind"
    );
}

/// At the limit everything works: the run, the default --wait (timeout +
/// kill-after), the stored ttl (not truncated), and the hit after it.
#[test]
fn durations_at_the_limit_run_store_and_serve() {
    let env = TestEnv::new();
    let args = [
        "--ttl",
        "36500d",
        "--timeout",
        "36500d",
        "--kill-after",
        "36500d",
        "limit",
        "--",
        "echo",
        "hi",
    ];
    for _ in 0..2 {
        let out = env.run(args);
        assert_status(&out, 0);
        assert_eq!(stdout(&out), "hi\n");
    }
    let out = env.run(["status", "limit", "--json"]);
    assert_status(&out, 0);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(json[0]["ttl_ms"], 36_500u64 * 86_400_000);
    assert_eq!(json[0]["state"], "fresh");
    // A loser with nothing servable waits with the default --wait, which does not
    // overflow either: it gets the run's result.
    let gate = env.fifo("gate");
    let script = env.script("slow", &format!("read x < {}; echo slow", gate.display()));
    let winner = env.spawn([
        "--timeout",
        "36500d",
        "--kill-after",
        "36500d",
        "slow",
        "--",
        script.to_str().expect("utf-8"),
    ]);
    wait_until("the winner runs", || env.cache.join("slow.run").exists());
    let loser = env.spawn([
        "--timeout",
        "36500d",
        "--kill-after",
        "36500d",
        "slow",
        "--",
        script.to_str().expect("utf-8"),
    ]);
    // The loser finds the lock held and waits, or (slower than the winner) finds the
    // fresh result: either way it is served the run's output.
    fs::write(&gate, "go\n").expect("open the gate");
    for child in [winner, loser] {
        let out = finish(child);
        assert_status(&out, 0);
        assert_eq!(stdout(&out), "slow\n");
    }
}

// ---- 3. A FIFO in place of a side file ---------------------------------------------

/// How long a call that must not block may take before the test calls it a hang.
/// Generous: a loaded machine is slow, but a blocked `open` never returns at all.
const NO_HANG: std::time::Duration = PATIENCE;

/// Waits for `child` for at most [`NO_HANG`]; kills it (our own pid) if it hangs.
fn finish_or_kill(child: std::process::Child, what: &str) -> std::process::Output {
    let pid = child.id();
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = sender.send(child.wait_with_output());
    });
    match receiver.recv_timeout(NO_HANG) {
        Ok(output) => output.expect("wait for singleflight"),
        Err(_) => {
            #[cfg(unix)]
            {
                let _ = rustix::process::kill_process(
                    rustix::process::Pid::from_raw(pid as i32).expect("a pid"),
                    rustix::process::Signal::KILL,
                );
                panic!("{what} hung (pid {pid}, killed)");
            }
            // The tests are compiled for Windows, not run there: no kill.
            #[cfg(not(unix))]
            panic!("{what} hung (pid {pid})");
        }
    }
}

/// A FIFO (or a symlink) where `NAME.result`, `NAME.run` or `NAME.failure` belongs
/// counts as damaged: no call blocks on it, `status` neither, and the run goes on.
#[test]
fn a_fifo_in_place_of_a_side_file_blocks_nothing() {
    for file in ["result", "run", "failure"] {
        let env = TestEnv::new();
        let out = env.run(["--ttl", "0", "sidefile", "--", "echo", "first"]);
        assert_status(&out, 0);
        let path = env.cache.join(format!("sidefile.{file}"));
        let _ = fs::remove_file(&path);
        let made = std::process::Command::new("mkfifo")
            .arg(&path)
            .status()
            .expect("mkfifo runs");
        assert!(made.success());
        let out = finish_or_kill(
            env.spawn(["--ttl", "0", "sidefile", "--", "echo", "second"]),
            &format!("a call with a FIFO as sidefile.{file}"),
        );
        assert_status(&out, 0);
        assert_eq!(stdout(&out), "second\n", "{file}");
        let out = finish_or_kill(
            env.spawn(["status", "--json"]),
            &format!("status with a FIFO as sidefile.{file}"),
        );
        assert_status(&out, 0);
    }
    // A FIFO as the result, freshly made: a hit must not block either, and the
    // result counts as invalid in `status`.
    let env = TestEnv::new();
    let out = env.run(["fresh", "--", "echo", "x"]);
    assert_status(&out, 0);
    let result = env.result_file("fresh");
    fs::remove_file(&result).expect("rm result");
    let made = std::process::Command::new("mkfifo")
        .arg(&result)
        .status()
        .expect("mkfifo runs");
    assert!(made.success());
    let out = finish_or_kill(env.spawn(["status", "fresh", "--json"]), "status");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(json[0]["state"], "invalid", "{}", stderr(&out));
    let out = finish_or_kill(env.spawn(["fresh", "--", "echo", "y"]), "a call");
    assert_eq!(stdout(&out), "y\n", "{}", stderr(&out));
    assert!(
        fs::symlink_metadata(&result).expect("a result").is_file(),
        "the next run replaced the FIFO with a result"
    );
}

/// A symlink where the result belongs is not followed: it is damaged, and the run
/// replaces the link (not the file it points to).
#[cfg(unix)]
#[test]
fn a_symlinked_result_is_not_followed() {
    let env = TestEnv::new();
    let out = env.run(["--ttl", "0", "linked", "--", "echo", "x"]);
    assert_status(&out, 0);
    let elsewhere = env.path("elsewhere");
    fs::copy(env.result_file("linked"), &elsewhere).expect("copy the result");
    fs::remove_file(env.result_file("linked")).expect("rm");
    std::os::unix::fs::symlink(&elsewhere, env.result_file("linked")).expect("symlink");
    let out = env.run(["linked", "--", "echo", "x"]);
    assert_status(&out, 0);
    assert!(
        stderr(&out).contains("not a regular file"),
        "the link counts as damaged, not as a result: {}",
        stderr(&out)
    );
    assert!(
        fs::symlink_metadata(env.result_file("linked"))
            .expect("result")
            .is_file()
    );
}

// ---- 4. The lock is let go before printing ------------------------------------------

/// A winner whose stdout nobody reads (a stalled pipe) has renamed its result into
/// place: its run is over. Another caller may run at once, `clear` does not block,
/// and `status` says nothing is in flight.
#[test]
fn a_stalled_reader_of_the_winner_holds_up_nobody() {
    let env = TestEnv::new();
    // Far more than a pipe holds, so that the winner blocks writing it.
    let script = env.script(
        "big",
        &format!(
            "echo run >> {}; head -c 1000000 /dev/zero",
            env.counter().display()
        ),
    );
    let script = script.to_str().expect("utf-8").to_owned();
    let args = ["--ttl", "0", "stall", "--", &script];
    // Its stdout is piped and not read until the end of the test.
    let mut winner = env.spawn(args);
    wait_until("the winner's result is in place", || {
        env.result_file("stall").exists()
    });
    // Callers keep coming until one runs: with the lock held while the winner
    // prints, every one of them serves the stale result, and none ever runs.
    let start = std::time::Instant::now();
    while env.runs() < 2 {
        assert!(
            start.elapsed() < NO_HANG,
            "no caller ran while the winner's reader stalled: the lock was held"
        );
        let out = env.run(args);
        assert_status(&out, 0);
        assert_eq!(out.stdout.len(), 1_000_000);
    }
    let out = finish_or_kill(env.spawn(["clear", "stall"]), "clear");
    assert_status(&out, 0);
    // Now read the winner's output: all of it arrives.
    let mut stdout = winner.stdout.take().expect("piped");
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut stdout, &mut bytes).expect("read");
    assert_eq!(bytes.len(), 1_000_000);
    let out = finish(winner);
    assert_status(&out, 0);
}

// ---- 1. A quiet run keeps its temp file ---------------------------------------------

/// Whether NAME's run record names its command's pid: written once the command is
/// spawned, which is after the run's temp file was created.
fn command_started(env: &TestEnv, name: &str) -> bool {
    let record = fs::read(env.cache.join(format!("{name}.run"))).unwrap_or_default();
    serde_json::from_slice::<serde_json::Value>(&record)
        .is_ok_and(|run| run["pid"].as_u64().unwrap_or(0) != 0)
}

/// Sets a file's mtime to two hours ago.
fn backdate(paths: &[std::path::PathBuf]) {
    let touched = std::process::Command::new("touch")
        .args(["-d", "2 hours ago"])
        .args(paths)
        .status()
        .expect("touch runs");
    assert!(touched.success());
}

/// A run that prints nothing for hours keeps its temp file: the winner of another
/// NAME, sweeping temp files, leaves it alone however old it looks, and the run's
/// result is saved. The temp file of a run that is over (killed) does go.
#[test]
fn a_quiet_run_keeps_its_temp_file_and_a_dead_one_goes() {
    let env = TestEnv::new();
    let gate = env.fifo("gate");
    let quiet = env.script(
        "quiet",
        &format!("read x < {}; echo finally", gate.display()),
    );
    let run = env.spawn(["quiet", "--", quiet.to_str().expect("utf-8")]);
    // Not the first temp file seen: the run record is written through one too.
    wait_until("the quiet run's command", || command_started(&env, "quiet"));
    let quiet_temp = env.temps();
    assert_eq!(quiet_temp.len(), 1, "{quiet_temp:?}");
    backdate(&quiet_temp);
    // A run killed with its singleflight leaves its temp file behind.
    let stuck = env.script("stuck", "echo partial; exec sleep 1000");
    let mut killed = env.spawn(["dead", "--", stuck.to_str().expect("utf-8")]);
    let others = || -> Vec<_> {
        env.temps()
            .into_iter()
            .filter(|t| !quiet_temp.contains(t))
            .collect()
    };
    wait_until("the dead run's command", || command_started(&env, "dead"));
    killed.kill().expect("SIGKILL our own singleflight");
    let _ = killed.wait();
    let dead_temp = others();
    assert_eq!(dead_temp.len(), 1, "{dead_temp:?}");
    backdate(&dead_temp);
    // The winner of another NAME sweeps.
    let out = env.run(["other", "--", "echo", "other"]);
    assert_status(&out, 0);
    assert_eq!(
        env.temps(),
        quiet_temp,
        "the dead run's temp went, the quiet one stayed"
    );
    fs::write(&gate, "go\n").expect("open the gate");
    let out = finish(run);
    assert_status(&out, 0);
    assert_eq!(stdout(&out), "finally\n");
    assert!(
        !stderr(&out).contains("could not be saved"),
        "{}",
        stderr(&out)
    );
    let out = env.run(["quiet", "--", quiet.to_str().expect("utf-8")]);
    assert_eq!(
        stdout(&out),
        "finally\n",
        "the quiet run's result was cached"
    );
}

// ---- 6. A clear is not a run ----------------------------------------------------------

/// Callers with nothing cached keep arriving while `clear --all` runs in a loop. A
/// caller that finds the lock held by a clear must not take it for a run, wait for
/// it, then exit 75 for want of its result: each is served a run's output.
#[test]
fn a_caller_that_meets_a_clear_does_not_exit_75() {
    use std::sync::Arc;
    let env = Arc::new(TestEnv::new());
    let out = env.run(["seed", "--", "echo", "seed"]);
    assert_status(&out, 0);
    let (clears, failures) = calls_during_clears(
        &env,
        &["clear", "--all"],
        &["--ttl", "0", "cleared", "--", "echo", "hi"],
        60,
        "hi\n",
    );
    assert!(clears > 0);
    assert!(
        failures.is_empty(),
        "{} of 180 callers failed during {clears} clears, e.g. {:?}",
        failures.len(),
        failures.first()
    );
}

// ---- 5. A symlinked cache dir ---------------------------------------------------------

/// A symlinked cache dir is its target, checked as any cache dir. Sweeping temp files
/// there deletes only files singleflight wrote: not a user's old `.tmp.notes`.
#[cfg(unix)]
#[test]
fn a_symlinked_cache_dir_keeps_files_singleflight_never_wrote() {
    let env = TestEnv::new();
    let victim = env.path("victim");
    fs::create_dir(&victim).expect("mkdir");
    fs::set_permissions(&victim, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .expect("chmod");
    let notes = [victim.join(".tmp.notes"), victim.join(".tmp.notes.txt")];
    for file in &notes {
        fs::write(file, "mine").expect("write");
    }
    backdate(&notes);
    std::os::unix::fs::symlink(&victim, &env.cache).expect("symlink");
    let out = env.run(["linkdir", "--", "echo", "hi"]);
    assert_status(&out, 0);
    assert_eq!(stdout(&out), "hi\n");
    assert!(
        victim.join("linkdir.result").exists(),
        "the link's target is the cache dir"
    );
    for file in &notes {
        assert!(file.exists(), "{} was deleted", file.display());
    }
}

// ---- 9. A result of a newer format version ---------------------------------------------

/// A result written by a newer singleflight (a higher format version) sharing the
/// cache dir is left alone: this version runs the command and prints its output, as
/// on a miss, with one warning line, and does not overwrite the newer result.
#[test]
fn a_result_of_a_newer_format_version_is_left_alone() {
    let env = TestEnv::new();
    let out = env.run(["--ttl", "0", "newer", "--", "echo", "old"]);
    assert_status(&out, 0);
    let path = env.result_file("newer");
    let mut bytes = fs::read(&path).expect("a result");
    assert_eq!(&bytes[..7], b"SFLIGHT");
    bytes[7] += 1;
    fs::write(&path, &bytes).expect("write the newer result");
    for _ in 0..2 {
        let out = env.run(["--ttl", "0", "newer", "--", "echo", "mine"]);
        assert_status(&out, 0);
        assert_eq!(stdout(&out), "mine\n");
        let err = stderr(&out);
        let warnings: Vec<&str> = err.lines().filter(|line| line.contains("newer")).collect();
        assert_eq!(warnings.len(), 1, "one warning line: {}", stderr(&out));
        assert_eq!(fs::read(&path).expect("still there"), bytes, "left alone");
    }
}

// ---- 10. Size limits for side files ------------------------------------------------------

/// A huge `NAME.run` or `NAME.failure` (1 GiB, sparse) is damage, not something to
/// read whole. The command itself reports how much its singleflight had read by the
/// time it started (`rchar` of `/proc/$PPID/io`): both records are read before it.
#[test]
fn huge_side_files_are_not_read_whole() {
    for file in ["run", "failure"] {
        let env = TestEnv::new();
        let out = env.run(["--ttl", "0", "hugeside", "--", "echo", "first"]);
        assert_status(&out, 0);
        let path = env.cache.join(format!("hugeside.{file}"));
        let sized = std::process::Command::new("truncate")
            .args(["-s", "1G"])
            .arg(&path)
            .status()
            .expect("truncate runs");
        assert!(sized.success());
        let script = env.script("io", "sed -n 's/^rchar: //p' /proc/$PPID/io");
        let out = env.run([
            "--ttl",
            "0",
            "hugeside",
            "--",
            script.to_str().expect("utf-8"),
        ]);
        assert_status(&out, 0);
        let read: u64 = stdout(&out).trim().parse().expect("rchar");
        assert!(
            read < 64 << 20,
            "{file}: singleflight read {read} bytes before the command started"
        );
        let out = env.run(["status", "hugeside", "--json"]);
        assert_status(&out, 0);
    }
}

// ---- 8. A first --background call on a full disk ------------------------------------------

/// The first `--background` call has nothing to serve and waits for its refresher.
/// The refresher's run succeeds but its result cannot be saved (RLIMIT_FSIZE makes
/// the write fail as a full disk does, while the command's pipe is unaffected): the
/// waiter gets the run's output with a warning, as a foreground winner would, not 75.
#[test]
fn a_first_background_call_on_a_full_disk_still_gets_the_output() {
    let env = TestEnv::new();
    let args = [
        "diskbg",
        "--background",
        "--",
        "sh",
        "-c",
        "yes new | head -c 65536",
    ];
    let output = finish(start(
        env.command_for("sh")
            .arg("-c")
            .arg(r#"trap "" XFSZ; ulimit -f 1; exec "$0" "$@""#)
            .arg(env!("CARGO_BIN_EXE_singleflight"))
            .args(args),
    ));
    assert_status(&output, 0);
    assert_eq!(output.stdout.len(), 65536, "{}", stderr(&output));
    assert!(output.stdout.chunks(4).all(|c| c == &b"new\n"[..c.len()]));
    assert!(
        stderr(&output).contains("could not be saved"),
        "a warning: {}",
        stderr(&output)
    );
    assert!(!env.result_file("diskbg").exists());
}

// ---- 7. clear --older-than ----------------------------------------------------------------

/// The files of NAME in the cache dir, by extension.
fn files_of(env: &TestEnv, name: &str) -> Vec<String> {
    let mut found: Vec<String> = ["result", "failure", "run", "lock"]
        .into_iter()
        .filter(|ext| env.cache.join(format!("{name}.{ext}")).exists())
        .map(str::to_owned)
        .collect();
    found.sort();
    found
}

/// `clear --older-than D` removes the result, failure record and lock file of every
/// NAME not written for D, and of no other: not a fresh one, not one with a run in
/// flight (whose run then saves its result as usual). Dead runs' temp files go too.
#[test]
fn clear_older_than_removes_old_names_with_their_locks() {
    let env = TestEnv::new();
    for name in ["old", "fresh"] {
        let out = env.run([name, "--", "echo", name]);
        assert_status(&out, 0);
    }
    let out = env.run(["failed", "--", "sh", "-c", "exit 3"]);
    assert_status(&out, 3);
    assert_eq!(files_of(&env, "failed"), ["failure", "lock"]);
    let gate = env.fifo("gate");
    let slow = env.script("slow", &format!("read x < {}; echo late", gate.display()));
    let slow = slow.to_str().expect("utf-8").to_owned();
    let out = env.run(["busy", "--", "echo", "seed"]);
    assert_status(&out, 0);
    let busy = env.spawn(["--ttl", "0", "busy", "--", &slow]);
    wait_until("the busy run", || env.cache.join("busy.run").exists());
    let mut old_files = Vec::new();
    for name in ["old", "failed", "busy"] {
        for ext in ["result", "failure", "lock", "run"] {
            let path = env.cache.join(format!("{name}.{ext}"));
            if path.exists() {
                old_files.push(path);
            }
        }
    }
    backdate(&old_files);
    let out = env.run(["clear", "--older-than", "1h"]);
    assert_status(&out, 0);
    assert_eq!(files_of(&env, "old"), Vec::<String>::new());
    assert_eq!(files_of(&env, "failed"), Vec::<String>::new());
    assert_eq!(files_of(&env, "fresh"), ["lock", "result"]);
    assert!(
        files_of(&env, "busy").contains(&"lock".to_owned()),
        "in flight: left alone"
    );
    fs::write(&gate, "go\n").expect("open the gate");
    let out = finish(busy);
    assert_eq!(
        (status(&out), stdout(&out).as_str()),
        (0, "late\n"),
        "{}",
        stderr(&out)
    );
    assert_eq!(files_of(&env, "busy"), ["lock", "result"]);
    // Named NAMEs only, with --older-than: the others stay.
    backdate(&[env.result_file("fresh"), env.cache.join("fresh.lock")]);
    let out = env.run(["clear", "--older-than", "1h", "busy"]);
    assert_status(&out, 0);
    assert_eq!(files_of(&env, "fresh"), ["lock", "result"]);
}

/// Lock files removed by `clear --older-than 0s` in a loop while callers keep
/// running the command: no two runs ever overlap (a caller that locked a removed
/// lock file would run beside one that locked the new file), and every caller is
/// served.
#[test]
fn removing_lock_files_never_lets_two_runs_overlap() {
    use std::sync::Arc;
    let env = Arc::new(TestEnv::new());
    let running = env.path("running");
    let overlaps = env.path("overlaps");
    let script = env.script(
        "exclusive",
        &format!(
            "mkdir {r} 2>/dev/null || echo overlap >> {o}; sleep 0.01; rmdir {r}; echo ok",
            r = running.display(),
            o = overlaps.display()
        ),
    );
    let script = script.to_str().expect("utf-8").to_owned();
    let out = env.run(["--ttl", "0", "pruned", "--", &script]);
    assert_status(&out, 0);
    let (clears, failures) = calls_during_clears(
        &env,
        &["clear", "--older-than", "0s"],
        &["--ttl", "0", "pruned", "--", &script],
        40,
        "ok\n",
    );
    assert!(clears > 0);
    assert_eq!(
        fs::read_to_string(&overlaps).unwrap_or_default(),
        "",
        "runs overlapped"
    );
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        failures.first()
    );
}

/// The inode a path names, or of what an fd link in /proc points to.
#[cfg(unix)]
fn inode(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).ok().map(|m| m.ino())
}

/// A `clear` that waits for a lock whose file is removed meanwhile (by `clear
/// --older-than`, simulated here by the test) must not take the lock of the removed
/// file: it opens the path again and waits for the lock a new holder took there.
#[cfg(unix)]
#[test]
fn a_caller_that_locks_a_removed_lock_file_opens_it_again() {
    let env = TestEnv::new();
    let out = env.run(["racy", "--", "echo", "x"]);
    assert_status(&out, 0);
    let lock = env.cache.join("racy.lock");
    let old = fs::File::open(&lock).expect("open the lock");
    old.lock().expect("lock it");
    let old_inode = inode(&lock).expect("a lock file");
    let mut clear = env.spawn(["clear", "racy"]);
    let pid = clear.id();
    let holds = |wanted: u64| {
        fs::read_dir(format!("/proc/{pid}/fd"))
            .is_ok_and(|fds| fds.flatten().any(|fd| inode(&fd.path()) == Some(wanted)))
    };
    wait_until("clear opened the lock file", || holds(old_inode));
    // The lock file goes and a new holder locks a new one; then the old lock is let go.
    fs::remove_file(&lock).expect("rm the lock file");
    let new = fs::File::create(&lock).expect("a new lock file");
    new.lock().expect("lock the new one");
    let new_inode = inode(&lock).expect("the new lock file");
    drop(old);
    wait_until("clear waits on the new lock file, or is done", || {
        holds(new_inode) || clear.try_wait().ok().flatten().is_some()
    });
    assert!(
        clear.try_wait().expect("try_wait").is_none(),
        "clear took the lock of a removed file while the new one was held"
    );
    assert!(
        env.result_file("racy").exists(),
        "nothing cleared under a held lock"
    );
    drop(new);
    let out = finish(clear);
    assert_status(&out, 0);
    assert!(!env.result_file("racy").exists());
}

/// Three callers make `calls` calls each of `call`, every one expected to print
/// `expected` and exit 0, while `clear_args` runs in a loop until they are done.
/// Returns how many clears ran and what went wrong for the callers.
fn calls_during_clears(
    env: &std::sync::Arc<TestEnv>,
    clear_args: &[&str],
    call: &[&str],
    calls: usize,
    expected: &str,
) -> (usize, Vec<String>) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = Arc::new(AtomicBool::new(false));
    let clearer = {
        let (env, stop) = (env.clone(), stop.clone());
        let clear_args: Vec<String> = clear_args.iter().map(|a| a.to_string()).collect();
        std::thread::spawn(move || {
            let mut clears = 0;
            while !stop.load(Ordering::Relaxed) {
                let out = env.run(&clear_args);
                assert_status(&out, 0);
                clears += 1;
            }
            clears
        })
    };
    let call: Vec<String> = call.iter().map(|a| a.to_string()).collect();
    let callers: Vec<_> = (0..3)
        .map(|_| {
            let (env, call, expected) = (env.clone(), call.clone(), expected.to_owned());
            std::thread::spawn(move || {
                let mut failures = Vec::new();
                for _ in 0..calls {
                    let out = env.run(&call);
                    if status(&out) != 0 || stdout(&out) != expected {
                        failures.push(format!("{}: {}", status(&out), stderr(&out)));
                    }
                }
                failures
            })
        })
        .collect();
    let failures: Vec<String> = callers
        .into_iter()
        .flat_map(|caller| caller.join().expect("caller thread"))
        .collect();
    stop.store(true, Ordering::Relaxed);
    let clears = clearer.join().expect("clear thread");
    (clears, failures)
}
