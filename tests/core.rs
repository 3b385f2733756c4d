//! The core runner as a user meets it: fresh hits, herds, stale serving, failures,
//! timeouts, output capture, atomic results and bad input (issue 3).

use crate::common;

use std::fs;
#[cfg(unix)]
use std::os::unix::fs::PermissionsExt;

// `Ran` and `assert_status` serve Linux-only tests too; on macOS the rest compiles alone.
#[cfg_attr(not(target_os = "linux"), allow(unused_imports))]
use common::{
    Ran, TestEnv, assert_status, blocked_on_a_lock, finish, status, stderr, stdout, wait_until,
};
#[cfg(target_os = "linux")]
use common::{alive, marker};

/// A command that counts its runs in the test's counter file and prints `output`.
fn counting(env: &TestEnv, output: &str) -> Vec<String> {
    let script = format!(
        "echo run >> '{}'; printf '%s' '{output}'",
        env.counter().display()
    );
    vec!["sh".into(), "-c".into(), script]
}

#[test]
fn a_fresh_hit_serves_the_bytes_and_status_of_the_run_without_running_again() {
    let env = TestEnv::new();
    let command = counting(&env, "hello");
    for _ in 0..3 {
        let out = env.call("greet", &[], &command);
        assert_eq!((status(&out), stdout(&out).as_str()), (0, "hello"));
    }
    assert_eq!(env.runs(), 1);
}

#[test]
fn a_hit_is_byte_for_byte_for_binary_empty_and_unterminated_output() {
    let env = TestEnv::new();
    let binary: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    fs::write(env.path("blob"), &binary).unwrap();
    let cases: [(&str, &[u8]); 3] = [
        ("blob", &binary),
        ("empty", b""),
        ("unterminated", b"no newline"),
    ];
    for (name, bytes) in cases {
        fs::write(env.path(name), bytes).unwrap();
        let command = ["cat".to_string(), env.path(name).display().to_string()];
        let first = env.call(name, &[], &command);
        fs::write(env.path(name), b"changed").unwrap();
        let hit = env.call(name, &[], &command);
        assert_eq!(first.stdout, bytes, "{name}: the run");
        assert_eq!(hit.stdout, bytes, "{name}: the hit");
    }
}

#[test]
fn a_cached_failure_is_served_with_its_own_exit_status() {
    let env = TestEnv::new();
    let script = format!(
        "echo run >> '{}'; echo partial; exit 3",
        env.counter().display()
    );
    let command = ["sh".to_string(), "-c".into(), script];
    for _ in 0..2 {
        let out = env.call("flaky", &["--cache-failures"], &command);
        assert_eq!((status(&out), stdout(&out).as_str()), (3, "partial\n"));
    }
    assert_eq!(env.runs(), 1);
}

#[test]
fn a_different_command_under_the_same_name_is_never_served_the_other_result() {
    let env = TestEnv::new();
    let a = env.call("shared", &[], &["echo", "a"]);
    let b = env.call("shared", &[], &["echo", "b"]);
    assert_eq!((stdout(&a).as_str(), stdout(&b).as_str()), ("a\n", "b\n"));
}

#[test]
fn a_herd_of_callers_on_a_cold_name_runs_the_command_once_and_all_get_its_output() {
    let env = TestEnv::new();
    let gate = env.path("gate");
    let script = format!(
        "echo run >> '{}'; while [ ! -e '{}' ]; do sleep 0.01; done; echo herd-output; exit 4",
        env.counter().display(),
        gate.display()
    );
    let callers: Vec<_> = (0..24)
        .map(|_| env.spawn(["cold", "--cache-failures", "--", "sh", "-c", &script]))
        .collect();
    wait_until("the run started", || env.runs() == 1);
    fs::write(&gate, "").unwrap();
    for caller in callers {
        let out = finish(caller);
        assert_eq!(
            (status(&out), stdout(&out).as_str()),
            (4, "herd-output\n"),
            "{}",
            stderr(&out)
        );
    }
    assert_eq!(env.runs(), 1);
}

#[test]
fn while_one_caller_refreshes_the_others_get_the_stale_result_at_once() {
    let env = TestEnv::new();
    let (version, gate, started) = (env.path("version"), env.path("gate"), env.path("started"));
    let script = format!(
        "touch '{started}'; while [ ! -e '{gate}' ]; do sleep 0.01; done; cat '{version}'",
        started = started.display(),
        gate = gate.display(),
        version = version.display()
    );
    let args = ["stale", "--ttl", "0", "--", "sh", "-c", &script];
    fs::write(&version, "v1").unwrap();
    fs::write(&gate, "").unwrap();
    assert_eq!(stdout(&env.run(args)), "v1");

    fs::write(&version, "v2").unwrap();
    fs::remove_file(&gate).unwrap();
    fs::remove_file(&started).unwrap();
    let refresher = env.spawn(args);
    wait_until("the refresh started", || started.exists());
    // The gate is closed: these return only because they do not wait for the run.
    for _ in 0..5 {
        let out = finish(env.spawn(args));
        assert_eq!((status(&out), stdout(&out).as_str()), (0, "v1"));
    }
    fs::write(&gate, "").unwrap();
    assert_eq!(stdout(&finish(refresher)), "v2");
}

#[test]
fn with_nothing_servable_a_loser_waits_for_the_run_and_gives_up_after_wait() {
    let env = TestEnv::new();
    let (gate, started) = (env.path("gate"), env.path("started"));
    let script = format!(
        "touch '{}'; while [ ! -e '{}' ]; do sleep 0.01; done; echo done",
        started.display(),
        gate.display()
    );
    let args = |wait: &str| {
        ["slow", "--wait", wait, "--", "sh", "-c", &script]
            .map(String::from)
            .to_vec()
    };
    let winner = env.spawn(args("60s"));
    wait_until("the run started", || started.exists());
    let impatient = env.run(args("100ms"));
    assert_status(&impatient, 75);
    assert!(
        stderr(&impatient).contains("--wait 100ms ran out"),
        "{}",
        stderr(&impatient)
    );
    assert!(impatient.stdout.is_empty());
    let patient = env.spawn(args("60s"));
    fs::write(&gate, "").unwrap();
    assert_eq!(stdout(&finish(patient)), "done\n");
    assert_eq!(stdout(&finish(winner)), "done\n");
}

#[test]
fn max_stale_bounds_what_a_loser_is_served() {
    let env = TestEnv::new();
    let (gate, started, version) = (env.path("gate"), env.path("started"), env.path("version"));
    let script = format!(
        "echo run >> '{}'; touch '{}'; while [ ! -e '{}' ]; do sleep 0.01; done; cat '{}'",
        env.counter().display(),
        started.display(),
        gate.display(),
        version.display()
    );
    fs::write(&gate, "").unwrap();
    fs::write(&version, "old").unwrap();
    let args = |extra: &[&str]| {
        let mut args = vec!["ms", "--ttl", "0"];
        args.extend_from_slice(extra);
        args.extend(["--", "sh", "-c", &script]);
        args.into_iter().map(String::from).collect::<Vec<_>>()
    };
    env.run(args(&[]));
    fs::remove_file(&gate).unwrap();
    fs::remove_file(&started).unwrap();
    fs::write(&version, "new").unwrap();
    let winner = env.spawn(args(&[]));
    wait_until("the run started", || started.exists());
    // The result is at least as old as the gap since it was written; 0s is too old:
    // that caller waits for the run in flight, blocked on its lock.
    let strict = env.spawn(args(&["--max-stale", "0", "--wait", "60s"]));
    wait_until("the strict caller waits for the run", || {
        blocked_on_a_lock(strict.id())
    });
    let relaxed = finish(env.spawn(args(&["--max-stale", "1h"])));
    assert_eq!(stdout(&relaxed), "old", "{}", stderr(&relaxed));
    fs::write(&gate, "").unwrap();
    assert_eq!(stdout(&finish(strict)), "new", "it waited for the run");
    assert_eq!(stdout(&finish(winner)), "new");
    assert_eq!(env.runs(), 2, "only the winner ran, once");
}

#[test]
fn a_failed_run_keeps_the_last_good_result_and_reports_its_own_status() {
    let env = TestEnv::new();
    let mode = env.path("mode");
    let script = format!(
        "echo run >> '{}'; if [ -e '{}' ]; then echo broken; echo oops >&2; exit 3; fi; echo good",
        env.counter().display(),
        mode.display()
    );
    let args = [
        "f",
        "--ttl",
        "0",
        "--retry-after",
        "1h",
        "--",
        "sh",
        "-c",
        &script,
    ];
    assert_eq!(stdout(&env.run(args)), "good\n");
    fs::write(&mode, "").unwrap();
    let failed = env.run(args);
    assert_eq!((status(&failed), stdout(&failed).as_str()), (3, "good\n"));
    assert!(
        stderr(&failed).contains("oops"),
        "the run's stderr passes through"
    );
    // --retry-after: nobody reruns the failing command; all get the last good result.
    for _ in 0..5 {
        let out = env.run(args);
        assert_eq!((status(&out), stdout(&out).as_str()), (0, "good\n"));
    }
    assert_eq!(env.runs(), 2);
    // --cache-failures: the failing output replaces the good one.
    let replaced = env.run([
        "f",
        "--ttl",
        "0",
        "--retry-after",
        "0",
        "--cache-failures",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    assert_eq!(
        (status(&replaced), stdout(&replaced).as_str()),
        (3, "broken\n")
    );
}

#[test]
fn a_failing_command_with_nothing_cached_prints_its_own_output_then_backs_off() {
    let env = TestEnv::new();
    let script = format!(
        "echo run >> '{}'; echo own; exit 5",
        env.counter().display()
    );
    let first = env.run(["nf", "--", "sh", "-c", &script]);
    assert_eq!((status(&first), stdout(&first).as_str()), (5, "own\n"));
    let second = env.run(["nf", "--", "sh", "-c", &script]);
    assert_status(&second, 75);
    assert!(
        stderr(&second).contains("last run failed"),
        "{}",
        stderr(&second)
    );
    assert_eq!(env.runs(), 1);
}

#[cfg(target_os = "linux")]
#[test]
fn a_timeout_kills_the_whole_group_even_children_that_ignore_sigterm() {
    let env = TestEnv::new();
    let mark = marker();
    let pids = env.path("pids");
    let script = format!(
        "trap '' TERM; sleep {mark} & echo $! >> {pids}; sleep {mark} & echo $! >> {pids}; \
         echo partial; wait",
        pids = pids.display()
    );
    let out = timed_out_after_children_started(&env, "t", &["--kill-after", "500ms"], &script);
    assert!(stderr(&out).contains("timed out"), "{}", stderr(&out));
    assert_eq!(alive(&mark), Vec::<u32>::new());
    assert!(!env.result_file("t").exists(), "nothing cached");
    let background = format!(
        "sleep {mark} & echo $! >> {pids}; echo $$ >> {pids}; sleep {mark}",
        pids = pids.display()
    );
    timed_out_after_children_started(&env, "t2", &[], &background);
    assert_eq!(alive(&mark), Vec::<u32>::new());
}

/// Runs `script` (which appends two pids to the test's `pids` file once its children
/// run) under a `--timeout`; returns the output of a run that timed out with both
/// children started. A timeout is the behaviour under test, so it cannot wait for the
/// children: a run whose shell had not started them in time (a loaded machine) proves
/// nothing and is tried again with a longer timeout.
#[cfg(target_os = "linux")]
fn timed_out_after_children_started(
    env: &TestEnv,
    name: &str,
    options: &[&str],
    script: &str,
) -> Ran {
    let pids = env.path("pids");
    for timeout in ["500ms", "2s", "8s", "30s"] {
        let _ = fs::remove_file(&pids);
        // A timed-out run is a failure: the next try must not back off from it.
        let mut args = vec![name, "--timeout", timeout, "--retry-after", "0"];
        args.extend_from_slice(options);
        args.extend(["--", "sh", "-c", script]);
        let out = env.run(&args);
        assert_status(&out, 124);
        let started = fs::read_to_string(&pids).unwrap_or_default();
        if started.lines().count() == 2 {
            return out;
        }
    }
    panic!("{name}: the command never started its children before the timeout");
}

#[test]
fn stdin_is_empty_and_stderr_passes_through() {
    let env = TestEnv::new();
    let mut child = env
        .command()
        .args(["io", "--", "sh", "-c", "cat; echo to-err >&2; echo out"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Never written to nor closed until the end: a command reading our stdin would hang.
    let held_stdin = child.stdin.take();
    let out = finish(child);
    drop(held_stdin);
    assert_eq!(stdout(&out), "out\n");
    assert_eq!(stderr(&out), "to-err\n");
}

#[test]
fn large_output_streams_through_the_cache_in_bounded_memory() {
    let env = TestEnv::new();
    let script = "head -c 104857600 /dev/zero";
    let out = env.run(["big", "--max-output", "200MiB", "--", "sh", "-c", script]);
    assert_status(&out, 0);
    assert_eq!(out.stdout.len(), 104_857_600);
    assert!(out.stdout.iter().all(|b| *b == 0));
    let hit = env.run(["big", "--max-output", "200MiB", "--", "sh", "-c", script]);
    assert_eq!(hit.stdout.len(), 104_857_600);
    // Memory is measured in tests/memory.rs, alone in its process.
}

#[test]
fn a_corrupt_truncated_or_foreign_result_is_never_printed_and_gets_replaced() {
    let env = TestEnv::new();
    let command = counting(&env, "real");
    env.call("c", &[], &command);
    let good = fs::read(env.result_file("c")).unwrap();
    let mut flipped = good.clone();
    flipped[34] ^= 1;
    let damaged: [(&str, Vec<u8>); 5] = [
        ("truncated", good[..good.len() - 3].to_vec()),
        ("flipped", flipped),
        ("empty", Vec::new()),
        ("foreign", b"{\"some\": \"other tool's file\"}\n".to_vec()),
        ("header only", good[..40].to_vec()),
    ];
    for (i, (what, bytes)) in damaged.into_iter().enumerate() {
        fs::write(env.result_file("c"), &bytes).unwrap();
        let out = env.call("c", &["--ttl", "1h"], &command);
        assert_eq!((status(&out), stdout(&out).as_str()), (0, "real"), "{what}");
        assert!(
            stderr(&out).contains("ignoring the cached result"),
            "{what}: {}",
            stderr(&out)
        );
        assert_eq!(env.runs(), i + 2, "{what}: ran again");
        let hit = env.call("c", &["--ttl", "1h"], &command);
        assert_eq!(stdout(&hit), "real", "{what}: replaced by a valid result");
        assert_eq!(env.runs(), i + 2, "{what}: the replacement is a hit");
    }
}

// Modes: Unix only.
#[cfg(unix)]
#[test]
fn the_lock_file_stays_and_results_are_private() {
    let env = TestEnv::new();
    env.call("p", &[], &["true".to_string()]);
    let mode = |path: &std::path::Path| fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&env.cache), 0o700);
    assert_eq!(mode(&env.result_file("p")), 0o600);
    assert_eq!(mode(&env.cache.join("p.lock")), 0o600);
}
