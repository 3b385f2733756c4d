//! `--exclusive --slots N`: at most N runs of a NAME at once, each caller's own
//! command. Real processes; overlap is counted by the commands themselves under
//! flock(1), never by the clock.
#![cfg(target_os = "linux")]

use crate::common;

use std::fs;
use std::process::Child;
use std::time::Instant;

use serde_json::Value;

use common::{TestEnv, alive, assert_status, finish, marker, stderr, wait_until};

/// The overlap counter: under `flock counter.lock`, a run adds one to `cur`, raises
/// `max` to it and appends its number to `starts`; then it runs `body`, then takes
/// one off `cur`.
fn counted(body: &str) -> String {
    format!(
        "( flock 9; c=$(( $(cat cur 2>/dev/null || echo 0) + 1 )); echo $c > cur; \
           m=$(cat max 2>/dev/null || echo 0); [ $c -gt $m ] && echo $c > max; \
           echo $1 >> starts ) 9>counter.lock; \
         {body}; \
         ( flock 9; echo $(( $(cat cur) - 1 )) > cur ) 9>counter.lock"
    )
}

fn read_number(env: &TestEnv, file: &str) -> u32 {
    fs::read_to_string(env.path(file))
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(0)
}

fn lines(env: &TestEnv, file: &str) -> Vec<String> {
    fs::read_to_string(env.path(file))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// `--exclusive --slots N w OPTIONS -- sh -c SCRIPT sh ID`.
fn spawn_slotted(env: &TestEnv, slots: &str, options: &[&str], script: &str, id: &str) -> Child {
    let mut args = vec!["--exclusive", "--slots", slots, "w"];
    args.extend(options);
    args.extend(["--", "sh", "-c", script, "sh", id]);
    env.spawn(args)
}

/// A run that marks `held.ID` and holds its slot until `gate.ID` exists.
fn holder(id: &str) -> String {
    counted(&format!(
        "touch held.{id}; while [ ! -e gate.{id} ]; do sleep 0.01; done"
    ))
}

fn status(env: &TestEnv) -> Value {
    let out = env.run(["status", "--json", "w"]);
    assert_status(&out, 0);
    let all: Value = serde_json::from_slice(&out.output.stdout).expect("json");
    all[0].clone()
}

fn waiters(env: &TestEnv) -> u64 {
    status(env)["slots"]["waiters"].as_u64().unwrap_or(0)
}

#[test]
fn twelve_callers_with_three_slots_never_run_more_than_three_at_once() {
    let env = TestEnv::new();
    let script = counted("sleep 1");
    let started = Instant::now();
    let callers: Vec<Child> = (0..12)
        .map(|n| spawn_slotted(&env, "3", &["--wait", "10m"], &script, &n.to_string()))
        .collect();
    for caller in callers {
        assert_status(&finish(caller), 0);
    }
    eprintln!("12 callers, --slots 3, 1 s each: {:?}", started.elapsed());
    assert_eq!(lines(&env, "starts").len(), 12, "every caller ran");
    assert_eq!(
        read_number(&env, "max"),
        3,
        "at most 3 at once, and 3 at some point"
    );
    assert_eq!(read_number(&env, "cur"), 0);
}

#[test]
fn a_sigkilled_holder_frees_its_slot_for_a_waiter() {
    let env = TestEnv::new();
    let mark = marker();
    let killed = spawn_slotted(
        &env,
        "2",
        &[],
        &format!("touch held.a; exec sleep {mark}"),
        "a",
    );
    let other = spawn_slotted(&env, "2", &[], &holder("b"), "b");
    wait_until("both slots are held", || {
        env.path("held.a").exists() && env.path("held.b").exists()
    });
    let waiter = spawn_slotted(&env, "2", &["--wait", "10m"], "touch ran.c", "c");
    wait_until("the third caller waits for a slot", || waiters(&env) == 1);
    let killed_at = Instant::now();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(i32::try_from(killed.id()).expect("pid")).expect("pid"),
        rustix::process::Signal::KILL,
    )
    .expect("SIGKILL the holder");
    wait_until("the waiter runs in the freed slot", || {
        env.path("ran.c").exists()
    });
    eprintln!(
        "a SIGKILLed holder's slot taken by a waiter after {:?}",
        killed_at.elapsed()
    );
    assert_status(&finish(waiter), 0);
    wait_until("the guard killed the holder's tree", || {
        alive(&mark).is_empty()
    });
    fs::write(env.path("gate.b"), "").expect("gate");
    assert_status(&finish(other), 0);
    let _ = finish(killed);
}

#[test]
fn a_caller_whose_wait_runs_out_with_every_slot_in_use_exits_75() {
    let env = TestEnv::new();
    let holders: Vec<Child> = ["a", "b"]
        .iter()
        .map(|id| spawn_slotted(&env, "2", &[], &holder(id), id))
        .collect();
    wait_until("both slots are held", || {
        env.path("held.a").exists() && env.path("held.b").exists()
    });
    let late = finish(spawn_slotted(
        &env,
        "2",
        &["--wait", "200ms"],
        "touch ran.late",
        "late",
    ));
    assert_status(&late, 75);
    let err = stderr(&late);
    assert!(
        err.contains("all 2 slots still in use after --wait 200ms"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(!env.path("ran.late").exists(), "the late caller ran");
    for (id, holder) in ["a", "b"].iter().zip(holders) {
        fs::write(env.path(&format!("gate.{id}")), "").expect("gate");
        assert_status(&finish(holder), 0);
    }
}

/// The N recorded by the caller that found every slot free holds until all have let
/// go: a caller that says 3 while 2 are in force and in use waits; once all let go,
/// the next caller's N is recorded.
#[test]
fn callers_that_disagree_on_n_use_the_n_in_force_until_every_slot_is_free() {
    let env = TestEnv::new();
    let first = spawn_slotted(&env, "2", &[], &holder("a"), "a");
    wait_until("the first caller holds a slot", || {
        env.path("held.a").exists()
    });
    // Says 3, but 2 are in force: takes the second slot.
    let second = spawn_slotted(&env, "3", &[], &holder("b"), "b");
    wait_until("the second caller holds a slot", || {
        env.path("held.b").exists()
    });
    assert_eq!(status(&env)["slots"]["count"], 2);
    // Says 3 too: both slots in force are in use, so it waits (and gives up).
    let third = finish(spawn_slotted(
        &env,
        "3",
        &["--wait", "300ms"],
        "touch ran.c",
        "c",
    ));
    assert_status(&third, 75);
    assert!(
        stderr(&third).contains("all 3 slots still in use"),
        "{}",
        stderr(&third)
    );
    assert!(
        !env.path("ran.c").exists(),
        "a third run while 2 are in force"
    );
    // A caller without --slots waits for the NAME's own lock, slot 0, held by the first.
    let plain = finish(env.spawn([
        "--exclusive",
        "w",
        "--wait",
        "300ms",
        "--",
        "touch",
        "ran.plain",
    ]));
    assert_status(&plain, 75);
    assert!(!env.path("ran.plain").exists());
    for (id, caller) in [("a", first), ("b", second)] {
        fs::write(env.path(&format!("gate.{id}")), "").expect("gate");
        assert_status(&finish(caller), 0);
    }
    assert_eq!(
        read_number(&env, "max"),
        2,
        "never more than the 2 in force"
    );
    // Every slot is free: the next caller's N is the one in force.
    let fourth = spawn_slotted(&env, "3", &[], &holder("d"), "d");
    wait_until("the fourth caller holds a slot", || {
        env.path("held.d").exists()
    });
    assert_eq!(status(&env)["slots"]["count"], 3);
    fs::write(env.path("gate.d"), "").expect("gate");
    assert_status(&finish(fourth), 0);
}

#[test]
fn status_shows_each_slot_in_use_with_its_pid_and_the_waiters() {
    let env = TestEnv::new();
    let holders: Vec<Child> = ["a", "b"]
        .iter()
        .map(|id| spawn_slotted(&env, "2", &[], &holder(id), id))
        .collect();
    wait_until("both slots are held", || {
        env.path("held.a").exists() && env.path("held.b").exists()
    });
    let waiter = spawn_slotted(&env, "2", &["--wait", "10m"], &holder("c"), "c");
    wait_until("the third caller waits", || waiters(&env) == 1);
    let seen = status(&env);
    let slots = &seen["slots"];
    assert_eq!(slots["count"], 2);
    let mut pids: Vec<u64> = slots["in_use"]
        .as_array()
        .expect("in_use")
        .iter()
        .map(|slot| {
            assert!(slot["started_at_ms"].is_u64(), "{slot}");
            assert!(slot["command_pid"].is_u64(), "{slot}");
            slot["pid"].as_u64().expect("pid")
        })
        .collect();
    pids.sort_unstable();
    let mut expected: Vec<u64> = holders.iter().map(|h| u64::from(h.id())).collect();
    expected.sort_unstable();
    assert_eq!(pids, expected, "{seen}");
    assert_eq!(seen["in_flight"], true);
    let table = env.run(["status", "w"]);
    let text = String::from_utf8_lossy(&table.output.stdout).into_owned();
    assert!(
        text.contains("slots: 2 of 2 in use, 1 waiting: #0 pid"),
        "{text}"
    );
    for (id, holder) in ["a", "b"].iter().zip(holders) {
        fs::write(env.path(&format!("gate.{id}")), "").expect("gate");
        assert_status(&finish(holder), 0);
    }
    wait_until("the waiter runs", || env.path("held.c").exists());
    fs::write(env.path("gate.c"), "").expect("gate");
    assert_status(&finish(waiter), 0);
    let done = status(&env);
    assert_eq!(done["slots"]["in_use"].as_array().map(Vec::len), Some(0));
    assert_eq!(done["in_flight"], false);
}

/// `singleflight stop NAME` stops the run in every slot of `--slots N`, each with its
/// singleflight and its tree, and says so for each; it used to stop the first only.
#[test]
fn stop_stops_the_run_in_every_slot() {
    let env = TestEnv::new();
    let marks = [marker(), marker()];
    let holders: Vec<Child> = ["a", "b"]
        .iter()
        .zip(&marks)
        .map(|(id, mark)| {
            let script = format!("touch held.{id}; exec sleep {mark}");
            spawn_slotted(&env, "2", &[], &script, id)
        })
        .collect();
    wait_until("both slots are held", || {
        env.path("held.a").exists() && env.path("held.b").exists()
    });
    let out = env.run(["stop", "w"]);
    assert_status(&out, 0);
    let said = stderr(&out);
    assert_eq!(said.matches("stopped pid").count(), 2, "{said}");
    assert!(said.contains("w (run slot 1): stopped pid"), "{said}");
    for holder in holders {
        let out = finish(holder);
        // Its singleflight ends of the TERM it got, as on any signal.
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(out.status.signal(), Some(15), "{:?}", out.status);
    }
    for mark in &marks {
        assert!(alive(mark).is_empty(), "a run's tree outlived the stop");
    }
    assert_eq!(
        status(&env)["slots"]["in_use"].as_array().map(Vec::len),
        Some(0)
    );
}
