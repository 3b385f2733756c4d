//! The guard: after SIGKILL of singleflight, with no later caller, nothing of the run
//! is left (group members, setsid and double-fork escapees, an escapee that cleared
//! its environment); the guard never outlives a run; and neither the guard nor the
//! next winner ever signals a process that is not provably of the run.
#![cfg(target_os = "linux")]

use crate::common;

use std::fs;
use std::process::{Child, Command};
use std::time::Instant;

use common::{PATIENCE, TestEnv, assert_status, finish, is_root, marker, stderr, wait_until};
use rustix::process::{Pid, Signal};

fn send(pid: u32, signal: Signal) {
    let pid = Pid::from_raw(pid as i32).expect("a real pid");
    rustix::process::kill_process(pid, signal).expect("signal a process of the test");
}

/// Start time (field 22 of /proc/PID/stat) of a live process, None if gone or a zombie.
fn start_of(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if matches!(fields.first(), Some(&"Z" | &"X")) {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// The processes of `list` (pid, start time) that are still alive as themselves.
fn survivors(list: &[(u32, u64)]) -> Vec<(u32, u64)> {
    list.iter()
        .copied()
        .filter(|(pid, start)| start_of(*pid) == Some(*start))
        .collect()
}

fn children(pid: u32) -> Vec<u32> {
    fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|c| c.parse().ok())
        .collect()
}

fn cmdline(pid: u32) -> String {
    String::from_utf8_lossy(&fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default())
        .replace('\0', " ")
}

/// The guard of the singleflight `pid`: its child in `__guard` mode.
fn guard_of(pid: u32) -> Option<u32> {
    children(pid)
        .into_iter()
        .find(|c| cmdline(*c).contains("__guard"))
}

/// The pids a command wrote to `file`, one a line, once there are `count`; with
/// their start times, read while they are certainly alive (each sleeps for long).
fn recorded(file: &std::path::Path, count: usize) -> Vec<(u32, u64)> {
    let mut pids = Vec::new();
    wait_until("the command recorded its processes", || {
        pids = fs::read_to_string(file)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse::<u32>().ok())
            .collect();
        pids.len() >= count
    });
    pids.iter()
        .map(|pid| (*pid, start_of(*pid).expect("a recorded process is alive")))
        .collect()
}

/// A script for `sh -c`: the shell and every sleep append their pid to `pids`, in the
/// shape of the issue's `sleep 300 & setsid sleep 301 & (sleep 302 &); sleep 303`, plus
/// `setsid env -i sleep` (no token, no group); `started` appears once all run.
fn every_kind_of_escapee(m: &str, pids: &std::path::Path) -> String {
    let pids = pids.display();
    // `env -i` clears PATH too: the escapee's shell is named by its path.
    let rec = format!("echo $$ >> {pids}; exec sleep {m}");
    format!(
        "echo $$ >> {pids}; \
         sh -c '{rec}' & \
         setsid sh -c '{rec}' & \
         (sh -c '{rec}' &); \
         setsid env -i /bin/sh -c '{rec}' & \
         exec sh -c '{rec}'"
    )
}

/// A singleflight that gets SIGKILL if the test fails before it is done.
struct Killed(Option<Child>);

impl Drop for Killed {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn after_sigkill_the_guard_kills_every_kind_of_escapee_with_no_later_caller() {
    let env = TestEnv::new();
    let m = marker();
    let pids = env.path("pids");
    let notes = env.path("notes");
    let script = every_kind_of_escapee(&m, &pids);
    let mut command = env.command();
    command
        .args(["g", "--timeout", "1h", "--", "sh", "-c", &script])
        .env("SINGLEFLIGHT_GUARD_NOTES", &notes);
    let mut sf = Killed(Some(common::start(&mut command)));
    let sf_pid = sf.0.as_ref().map(Child::id).expect("started");
    // The shell, the four escapees and the foreground sleep.
    let run = recorded(&pids, 6);
    let guard = guard_of(sf_pid).expect("singleflight has a guard");
    wait_until("the guard has seen the whole tree", || {
        let seen = fs::read_to_string(&notes).unwrap_or_default();
        run.iter()
            .all(|(pid, start)| seen.lines().any(|l| l == format!("{pid} {start}")))
    });

    send(sf_pid, Signal::KILL);
    let output = finish(sf.0.take().expect("started"));
    assert_eq!(output.status.code(), None, "singleflight died of SIGKILL");
    let killed_at = Instant::now();
    // No later caller: only the guard can do it. The deadline bounds a failure only.
    while !survivors(&run).is_empty() && killed_at.elapsed() < PATIENCE {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    eprintln!(
        "the run's processes were gone {:?} after the SIGKILL",
        killed_at.elapsed()
    );
    assert_eq!(
        survivors(&run),
        vec![],
        "processes of the run outlived singleflight"
    );
    wait_until("the guard exits once its work is done", || {
        start_of(guard).is_none()
    });
    assert_eq!(common::alive(&m), Vec::<u32>::new());
}

#[test]
fn the_guard_exits_with_the_run_and_is_never_left_behind() {
    let env = TestEnv::new();
    let gate = env.fifo("gate");
    let script = format!("read x < {}; echo done", gate.display());
    let sf = env.spawn(["ok", "--", "sh", "-c", &script]);
    let mut guard = None;
    wait_until("the guard runs", || {
        guard = guard_of(sf.id());
        guard.is_some()
    });
    let guard = guard.expect("found");
    let guard_start = start_of(guard).expect("alive");
    fs::write(&gate, "go\n").expect("open the gate");
    let output = finish(sf);
    assert_status(&output, 0);
    // singleflight waits for its guard before it exits: gone already, not in a while.
    assert_ne!(
        start_of(guard),
        Some(guard_start),
        "the guard outlived its run"
    );
}

/// The fallback: with the guard killed too, the next winner cleans up; but a group
/// whose leader is gone is never taken for the run's. After a run is SIGKILLed with
/// its guard, an unrelated job is forced onto the command's old pid (through
/// ns_last_pid), leads its group with it and exits, leaving its two workers in the
/// group. The next winner must leave them alone.
#[test]
fn the_next_winner_spares_a_strangers_group_on_the_recorded_pid() {
    if !is_root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "needs root (ns_last_pid), and CI=true"
        );
        eprintln!("skipped: needs root to write /proc/sys/kernel/ns_last_pid");
        return;
    }
    let env = TestEnv::new();
    let m = marker();
    let args = ["reuse", "--ttl", "0", "--", "sleep", &m];
    let sf = env.spawn(args);
    let record = env.cache.join("reuse.run");
    let mut command = 0;
    wait_until("the run record names the command", || {
        let run: serde_json::Value = fs::read(&record)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        command = run["pid"].as_u64().unwrap_or(0) as u32;
        command != 0
    });
    let mut guard = None;
    wait_until("the guard runs", || {
        guard = guard_of(sf.id());
        guard.is_some()
    });
    // A host killing the caller's whole tree: the guard first, then singleflight.
    send(guard.expect("found"), Signal::KILL);
    wait_until("the guard is gone", || guard.and_then(start_of).is_none());
    send(sf.id(), Signal::KILL);
    let _ = finish(sf);
    // Dead and reaped (by init): the pid is free.
    wait_until("the command died with singleflight", || {
        !std::path::Path::new(&format!("/proc/{command}")).exists()
    });
    assert!(
        record.exists(),
        "the killed run's record is left for the next winner"
    );

    // The stranger: leader on the recorded pid, two workers, the leader exits.
    let workers_file = env.path("workers");
    let job = format!(
        "sleep {m}1 & echo $! >> {w}; sleep {m}1 & echo $! >> {w}",
        w = workers_file.display()
    );
    let mut forced = false;
    for _ in 0..200 {
        let _ = fs::remove_file(&workers_file);
        fs::write("/proc/sys/kernel/ns_last_pid", format!("{}", command - 1))
            .expect("write ns_last_pid");
        let mut leader = {
            use std::os::unix::process::CommandExt;
            Command::new("sh")
                .args(["-c", &job])
                .process_group(0)
                .spawn()
                .expect("sh starts")
        };
        let got = leader.id();
        let _ = leader.wait();
        if got == command {
            forced = true;
            break;
        }
        // Another process took the pid first: clean up this try and go again.
        for pid in fs::read_to_string(&workers_file)
            .unwrap_or_default()
            .lines()
        {
            if let Ok(pid) = pid.trim().parse::<u32>() {
                send(pid, Signal::KILL);
            }
        }
    }
    assert!(forced, "could not force a process onto pid {command}");
    let workers = recorded(&workers_file, 2);
    for (pid, _) in &workers {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("worker stat");
        let pgrp: u32 = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(2)?.parse().ok())
            .expect("pgrp");
        assert_eq!(
            pgrp, command,
            "the worker is in the group named like the run's"
        );
    }

    let output = env.run(args.map(|a| if a == m { "0" } else { a }));
    assert_status(&output, 0);
    assert!(
        stderr(&output).contains("killing what is left"),
        "the record was not read: {}",
        stderr(&output)
    );
    let alive = survivors(&workers);
    for (pid, _) in &workers {
        let _ =
            rustix::process::kill_process(Pid::from_raw(*pid as i32).expect("pid"), Signal::KILL);
    }
    assert_eq!(
        alive, workers,
        "the next winner killed a stranger's workers"
    );
}

/// A `--background` refresher started inside another run (a status line script that
/// itself calls `singleflight --background inner …`) outlives the enclosing run and
/// finishes its refresh: the enclosing run's clean-up leaves another run's refresher
/// alone.
#[test]
fn a_background_refresher_started_inside_a_run_finishes_its_refresh() {
    let env = TestEnv::new();
    let go = env.path("go");
    let inner = format!(
        "while [ ! -e {go} ]; do sleep 0.05; done; echo inner-fresh",
        go = go.display()
    );
    let outer = format!(
        "'{sf}' --background inner --ttl 1h --wait 0 -- sh -c '{inner}'; echo outer",
        sf = env!("CARGO_BIN_EXE_singleflight"),
    );
    let output = env.run(["outer", "--", "sh", "-c", &outer]);
    assert_status(&output, 0);
    assert_eq!(common::stdout(&output), "outer\n");
    // The enclosing run is over, its tree reaped; only now may the refresh finish.
    fs::write(&go, "").expect("write go");
    wait_until("the inner refresh is cached", || {
        env.result_file("inner").exists()
    });
    let hit = env.run(["inner", "--ttl", "1h", "--", "sh", "-c", &inner]);
    assert_eq!(common::stdout(&hit), "inner-fresh\n", "{}", stderr(&hit));
}
