//! Results that know what they depend on (issue 14): `--key-cwd`, `--key-env` and
//! `--key-file` give each set of key values its own slot (own lock, own result, never
//! evicting each other), a changed file is a miss, and `--retry-max` grows the back-off
//! after failures in a row and resets it after a success.

use crate::common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

use common::{PATIENCE, TestEnv, assert_status, finish, start, status, stderr, stdout, wait_until};
use serde_json::Value;

/// A script that counts its runs and prints `tag` and what it was keyed by.
fn counting(env: &TestEnv, print: &str) -> PathBuf {
    let body = format!("echo run >> '{}'\n{print}", env.counter().display());
    env.script("job", &body)
}

fn run_in(env: &TestEnv, dir: &Path, vars: &[(&str, Option<&str>)], args: &[&str]) -> Output {
    let mut command = env.command();
    command.current_dir(dir).args(args);
    for (var, value) in vars {
        match value {
            Some(value) => command.env(var, value),
            None => command.env_remove(var),
        };
    }
    finish(start(&mut command))
}

fn status_json(env: &TestEnv, args: &[&str]) -> Vec<Value> {
    let out = env.run([&["status", "--json"], args].concat());
    assert_status(&out, 0);
    let value: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    value.as_array().expect("an array").clone()
}

#[test]
fn two_directories_each_keep_their_own_result_with_key_cwd() {
    let env = TestEnv::new();
    let dirs = [env.path("checkout-1"), env.path("checkout-2")];
    for dir in &dirs {
        fs::create_dir(dir).unwrap();
        let verdict = format!("echo run >> '{}'\npwd", env.counter().display());
        fs::write(dir.join("lint.sh"), format!("#!/bin/sh\n{verdict}\n")).unwrap();
        Command::new("chmod")
            .arg("+x")
            .arg(dir.join("lint.sh"))
            .status()
            .unwrap();
    }
    let args = ["lint", "--key-cwd", "--ttl", "1h", "--", "./lint.sh"];
    for i in 0..20 {
        let dir = &dirs[i % 2];
        let out = run_in(&env, dir, &[], &args);
        assert_status(&out, 0);
        let printed = stdout(&out);
        assert_eq!(
            Path::new(printed.trim()).file_name(),
            dir.file_name(),
            "call {i} got its own directory's verdict"
        );
    }
    assert_eq!(env.runs(), 2, "one run per directory, not one per call");
    let slots = status_json(&env, &["lint"]);
    assert_eq!(slots.len(), 2, "{slots:?}");
    let mut cwds: Vec<String> = slots
        .iter()
        .map(|s| {
            assert_eq!(s["keys"][0]["key"], "cwd", "{s}");
            assert!(s["slot"].as_str().unwrap().starts_with("lint@"), "{s}");
            s["keys"][0]["value"].as_str().unwrap().to_owned()
        })
        .collect();
    cwds.sort();
    let expected: Vec<String> = dirs
        .iter()
        .map(|d| fs::canonicalize(d).unwrap().display().to_string())
        .collect();
    assert_eq!(cwds, expected);

    // What the README warns about: without --key-cwd the second checkout is served
    // the first one's verdict.
    let plain = ["shared", "--ttl", "1h", "--", "./lint.sh"];
    let first = run_in(&env, &dirs[0], &[], &plain);
    let second = run_in(&env, &dirs[1], &[], &plain);
    assert_eq!(stdout(&first), stdout(&second));
    assert!(
        env.result_file("shared").exists(),
        "no key flag: NAME.result, as always"
    );
}

#[test]
fn two_environments_each_keep_their_own_result_and_unset_is_a_value() {
    let env = TestEnv::new();
    let job = counting(&env, "echo \"A=${A-unset}\"");
    let job = job.to_str().unwrap();
    let args = ["envk", "--key-env", "A", "--ttl", "1h", "--", job];
    let root = env.root().to_owned();
    for i in 0..20 {
        let value = ["one", "two"][i % 2];
        let out = run_in(&env, &root, &[("A", Some(value))], &args);
        assert_eq!(stdout(&out), format!("A={value}\n"), "call {i}");
    }
    assert_eq!(env.runs(), 2, "one run per value, not one per call");
    let out = run_in(&env, &root, &[("A", None)], &args);
    assert_eq!(stdout(&out), "A=unset\n");
    let out = run_in(&env, &root, &[("A", Some(""))], &args);
    assert_eq!(stdout(&out), "A=\n", "set to empty is not unset");
    assert_eq!(env.runs(), 4);
    // Another variable that is not a key changes nothing.
    let out = run_in(&env, &root, &[("A", Some("one")), ("B", Some("x"))], &args);
    assert_eq!(stdout(&out), "A=one\n");
    assert_eq!(env.runs(), 4);

    let text = stdout(&env.run(["status", "envk"]));
    for shown in [
        "keys: A=one (slot envk@",
        "keys: A=two",
        "keys: A unset",
        "keys: A= (",
    ] {
        assert!(text.contains(shown), "{shown:?} in:\n{text}");
    }
    // clear NAME clears every slot of it.
    let out = env.run(["clear", "envk"]);
    assert_status(&out, 0);
    let out = env.run(["status", "envk"]);
    assert_status(&out, 1);
    let out = run_in(&env, &root, &[("A", Some("one"))], &args);
    assert_eq!(stdout(&out), "A=one\n");
    assert_eq!(env.runs(), 5, "a cleared slot runs again");
}

#[test]
fn a_file_edit_a_rename_over_it_and_its_deletion_each_cause_exactly_one_rerun() {
    let env = TestEnv::new();
    let file = env.path("Cargo.lock");
    fs::write(&file, "v1\n").unwrap();
    let job = counting(&env, "cat Cargo.lock 2>/dev/null || echo missing");
    let job = job.to_str().unwrap();
    // Relative: resolved against the caller's directory (the test's root).
    let args = ["deps", "--key-file", "Cargo.lock", "--ttl", "1h", "--", job];
    let call = |expected: &str| {
        let out = env.run(args);
        assert_status(&out, 0);
        assert_eq!(stdout(&out), expected);
    };
    call("v1\n");
    call("v1\n");
    assert_eq!(env.runs(), 1);

    // An edit in place that keeps the size: told apart by mtime/ctime. The mtime is
    // set an hour back, so that it differs whatever the file system's timestamp
    // granularity.
    fs::write(&file, "v2\n").unwrap();
    let edited = fs::OpenOptions::new().write(true).open(&file).unwrap();
    edited
        .set_modified(SystemTime::now() - Duration::from_secs(3600))
        .unwrap();
    drop(edited);
    call("v2\n");
    call("v2\n");
    assert_eq!(env.runs(), 2, "an edit: exactly one rerun");

    // Replaced by a rename, the way editors and package managers write files.
    let new = env.path("Cargo.lock.new");
    fs::write(&new, "v3\n").unwrap();
    fs::rename(&new, &file).unwrap();
    call("v3\n");
    call("v3\n");
    assert_eq!(env.runs(), 3, "a rename over it: exactly one rerun");

    fs::remove_file(&file).unwrap();
    call("missing\n");
    call("missing\n");
    assert_eq!(env.runs(), 4, "a deletion: exactly one rerun");

    fs::write(&file, "v5\n").unwrap();
    call("v5\n");
    assert_eq!(env.runs(), 5, "created again: a rerun");
    // One slot for the file, however often it changed.
    let slots = status_json(&env, &["deps"]);
    assert_eq!(slots.len(), 1, "{slots:?}");
    assert_eq!(slots[0]["keys"][0]["key"], "file");
    let shown = slots[0]["keys"][0]["value"].as_str().unwrap();
    assert!(shown.ends_with("/Cargo.lock") && Path::new(shown).is_absolute());
}

#[test]
fn a_run_in_one_slot_does_not_hold_up_another_slot() {
    let env = TestEnv::new();
    let gate = env.path("gate");
    let body = format!(
        "echo run >> '{}'\nif [ \"$A\" = slow ]; then while [ ! -e '{}' ]; do sleep 0.01; done; fi\necho \"$A\"",
        env.counter().display(),
        gate.display()
    );
    let job = env.script("job", &body);
    let job = job.to_str().unwrap();
    let args = ["k", "--key-env", "A", "--", job];
    let mut slow = env.command();
    slow.env("A", "slow").args(args);
    let slow = start(&mut slow);
    wait_until("the slow slot is running", || env.runs() == 1);
    // The other slot's lock is free: it runs at once and is not served the other's.
    let root = env.root().to_owned();
    let out = run_in(&env, &root, &[("A", Some("quick"))], &args);
    assert_eq!(stdout(&out), "quick\n");
    // The slow slot's own lock is held: a second caller with nothing cached waits.
    let out = run_in(
        &env,
        &root,
        &[("A", Some("slow"))],
        &["--wait", "0", "k", "--key-env", "A", "--", job],
    );
    assert_eq!(
        status(&out),
        75,
        "one run per slot at a time: {}",
        stderr(&out)
    );
    fs::write(&gate, "").unwrap();
    let out = finish(slow);
    assert_eq!(stdout(&out), "slow\n");
    assert_eq!(env.runs(), 2);
}

#[test]
fn a_background_refresher_runs_in_its_callers_slot() {
    let env = TestEnv::new();
    let job = counting(&env, "echo \"A=$A\"");
    let job = job.to_str().unwrap();
    let args = [
        "--background",
        "bg",
        "--key-env",
        "A",
        "--ttl",
        "1h",
        "--",
        job,
    ];
    let root = env.root().to_owned();
    // Nothing cached: the caller starts a refresher, which must find the lock it was
    // handed to be its slot's, and waits for its result.
    for value in ["one", "two", "one", "two"] {
        let out = run_in(&env, &root, &[("A", Some(value))], &args);
        assert_status(&out, 0);
        assert_eq!(stdout(&out), format!("A={value}\n"));
    }
    assert_eq!(env.runs(), 2);
}

/// The start times (ms since the epoch) of the runs recorded in the counter.
fn run_times(env: &TestEnv) -> Vec<u64> {
    fs::read_to_string(env.counter())
        .unwrap_or_default()
        .lines()
        .map(|line| line.trim().parse::<u64>().expect("a time in ms") / 1_000_000)
        .collect()
}

fn last_failure(env: &TestEnv) -> Value {
    let all = status_json(env, &["flaky"]);
    all[0]["last_failure"].clone()
}

#[test]
fn the_back_off_doubles_up_to_retry_max_and_a_success_resets_it() {
    let env = TestEnv::new();
    let ok = env.path("ok");
    let body = format!(
        "date +%s%N >> '{}'\nif [ -e '{}' ]; then echo fine; else echo down >&2; exit 1; fi",
        env.counter().display(),
        ok.display()
    );
    let job = env.script("job", &body);
    let job = job.to_str().unwrap();
    // --ttl 0: every call wants a run; only the back-off stops it.
    let args = [
        "-q",
        "flaky",
        "--ttl",
        "0",
        "--retry-after",
        "100ms",
        "--retry-max",
        "800ms",
        "--",
        job,
    ];
    // Call in a loop until seven runs have failed: calls in between back off (75).
    let runs = 7;
    let deadline = std::time::Instant::now() + PATIENCE;
    let mut calls = 0;
    while env.runs() < runs {
        assert!(
            std::time::Instant::now() < deadline,
            "gave up after {calls} calls"
        );
        let out = env.run(args);
        assert!(matches!(status(&out), 1 | 75), "{}", stderr(&out));
        calls += 1;
    }
    let times = run_times(&env);
    // However slow the machine, a run never starts before the back-off of the failure
    // before it has passed: 100ms, 200ms, 400ms, then 800ms, each -10% at worst (and
    // 2ms for the failure's time in whole ms). Without growth they would be 100ms.
    let expected = [100, 200, 400, 800, 800, 800];
    for (k, pair) in times.windows(2).enumerate() {
        let gap = pair[1] - pair[0];
        let least = expected[k] * 9 / 10 - 2;
        assert!(
            gap >= least,
            "run {} came {gap}ms after the one before, not >= {least}ms: {times:?}",
            k + 2
        );
    }
    // The cap, as the failure record says: 7 in a row, back-off at most --retry-max.
    let failure = last_failure(&env);
    assert_eq!(failure["consecutive_failures"], 7, "{failure}");
    let backoff = failure["backoff_ms"].as_u64().unwrap();
    assert!(
        (720..=800).contains(&backoff),
        "capped with jitter: {backoff}"
    );
    assert_eq!(
        failure["next_run_at_ms"].as_u64().unwrap(),
        failure["at_ms"].as_u64().unwrap() + backoff
    );
    let text = stdout(&env.run(["status", "flaky"]));
    assert!(text.contains("; 7 in a row, back-off "), "{text}");

    // A success resets it: the next failure backs off for --retry-after again.
    fs::write(&ok, "").unwrap();
    wait_until("a run succeeded", || {
        let out = env.run(args);
        status(&out) == 0 && stdout(&out) == "fine\n" && env.runs() > runs
    });
    assert!(status_json(&env, &["flaky"])[0]["last_failure"].is_null());
    fs::remove_file(&ok).unwrap();
    let before = env.runs();
    wait_until("the next run failed", || {
        env.run(args);
        env.runs() > before
    });
    let failure = last_failure(&env);
    assert_eq!(failure["consecutive_failures"], 1, "{failure}");
    let backoff = failure["backoff_ms"].as_u64().unwrap();
    assert!(
        (90..=110).contains(&backoff),
        "back to --retry-after: {backoff}"
    );
}

#[test]
fn without_retry_max_the_back_off_stays_retry_after() {
    let env = TestEnv::new();
    let job = counting(&env, "exit 1");
    let job = job.to_str().unwrap();
    let args = [
        "-q",
        "fails",
        "--ttl",
        "0",
        "--retry-after",
        "1h",
        "--",
        job,
    ];
    for _ in 0..3 {
        env.run(args);
    }
    assert_eq!(env.runs(), 1, "backed off for --retry-after");
    let all = status_json(&env, &["fails"]);
    let failure = &all[0]["last_failure"];
    assert_eq!(
        failure["backoff_ms"], 3_600_000,
        "exactly, no jitter: {failure}"
    );
}

/// The fleet backend keys the same way: the slot is in the etcd key
/// (`<prefix>NAME@<key>/result`), so two machines with the same key values share one
/// result and other values get their own, and `status` and `clear` see every slot.
#[cfg(all(target_os = "linux", feature = "etcd"))]
#[test]
fn with_etcd_the_same_key_values_share_a_slot_across_machines() {
    let Some(etcd) = common::etcd::Etcd::start() else {
        return;
    };
    let machines = [TestEnv::new(), TestEnv::new()];
    let shared = tempfile::tempdir().unwrap();
    let counter = shared.path().join("runs");
    let job = format!("echo run >> '{}'; echo \"A=$A\"", counter.display());
    let args = [
        "envk",
        "--key-env",
        "A",
        "--ttl",
        "1h",
        "--",
        "sh",
        "-c",
        &job,
    ];
    let call = |machine: &TestEnv, value: &str, args: &[&str]| {
        let mut command = machine.command();
        command
            .env("SINGLEFLIGHT_BACKEND", etcd.url())
            .env("A", value)
            .args(args);
        finish(start(&mut command))
    };
    let runs = || fs::read_to_string(&counter).map_or(0, |t| t.lines().count());
    for i in 0..20 {
        let value = ["one", "two"][i % 2];
        let out = call(&machines[(i / 2) % 2], value, &args);
        assert_eq!(
            stdout(&out),
            format!("A={value}\n"),
            "call {i}: {}",
            stderr(&out)
        );
    }
    assert_eq!(runs(), 2, "one run per value, fleet-wide");
    let out = call(&machines[1], "", &["status", "--json", "envk"]);
    let all: Vec<Value> = serde_json::from_slice(&out.stdout).expect("JSON");
    let mut values: Vec<&str> = all
        .iter()
        .map(|s| s["keys"][0]["value"].as_str().unwrap())
        .collect();
    values.sort();
    assert_eq!(values, ["one", "two"], "{all:?}");
    let out = call(&machines[0], "", &["clear", "envk"]);
    assert_status(&out, 0);
    let out = call(&machines[1], "", &["status", "envk"]);
    assert_status(&out, 1);
}
