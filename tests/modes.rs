//! The two other modes: `--service` (one long-lived instance per NAME, supervised) and
//! `--exclusive` (every caller's own command, one at a time). Real processes, counted.
#![cfg(target_os = "linux")]

use crate::common;

use std::fs;
use std::process::Child;

use serde_json::Value;

use common::{TestEnv, alive, assert_status, finish, marker, stderr, stdout, wait_until};

/// A service whose instance records each start, waits for `gate` before it is ready
/// (it then creates `ready`), and lives as `sleep <marker>`.
struct Service {
    env: TestEnv,
    marker: String,
}

impl Service {
    fn new() -> Service {
        let service = Service {
            env: TestEnv::new(),
            marker: marker(),
        };
        // Read by the instance, so that only it (not the supervisor, whose argv has
        // the script) carries the marker.
        fs::write(service.env.path("marker"), &service.marker).expect("marker");
        service
    }

    /// The instance: `echo $$ >> starts`, wait for the gate, `touch ready`, live on.
    fn script(&self) -> String {
        "echo $$ >> starts; while [ ! -e gate ]; do sleep 0.01; done; touch ready; \
         exec sleep $(cat marker)"
            .to_owned()
    }

    fn spawn(&self, options: &[&str]) -> Child {
        let mut args = vec!["--service", "w", "--ready", "test -e ready"];
        args.extend(options);
        args.extend(["--", "sh", "-c"]);
        let script = self.script();
        args.push(&script);
        self.env.spawn(args)
    }

    fn starts(&self) -> usize {
        fs::read_to_string(self.env.path("starts")).map_or(0, |text| text.lines().count())
    }

    fn open_gate(&self) {
        fs::write(self.env.path("gate"), "").expect("gate");
    }

    fn status(&self) -> Value {
        let out = self.env.run(["status", "--json", "w"]);
        assert_status(&out, 0);
        let all: Value = serde_json::from_slice(&out.stdout).expect("json");
        all[0].clone()
    }

    /// `kill -9` of the running instance (as the OOM killer would), and the file its
    /// `--ready` checks for with it; returns once its supervisor let go.
    fn kill_instance(&self) {
        wait_until("the instance runs", || alive(&self.marker).len() == 1);
        let pid = alive(&self.marker)[0];
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(pid as i32).expect("pid"),
            rustix::process::Signal::KILL,
        )
        .expect("kill the instance");
        fs::remove_file(self.env.path("ready")).expect("remove ready");
        wait_until("its supervisor let go", || {
            self.status()["in_flight"] == false
        });
    }

    fn stop(&self) {
        let out = self.env.run(["stop", "w"]);
        assert_status(&out, 0);
        wait_until("the instance is gone after stop", || {
            alive(&self.marker).is_empty()
        });
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.env.run(["stop", "w"]);
    }
}

#[test]
fn thirty_concurrent_service_callers_leave_one_instance_and_return_once_it_is_ready() {
    let service = Service::new();
    let mut callers: Vec<Child> = (0..30).map(|_| service.spawn(&[])).collect();
    wait_until("the instance started", || service.starts() == 1);
    // Not ready yet (the gate is shut): no caller may have returned.
    for caller in &mut callers {
        assert!(
            caller.try_wait().expect("try_wait").is_none(),
            "a caller returned before the instance was ready"
        );
    }
    service.open_gate();
    for caller in callers {
        assert_status(&finish(caller), 0);
    }
    assert_eq!(service.starts(), 1, "instances started");
    wait_until("the instance lives on", || {
        alive(&service.marker).len() == 1
    });
    // A later caller finds it alive and ready: runs nothing, returns at once.
    assert_status(&finish(service.spawn(&[])), 0);
    assert_eq!(service.starts(), 1);
    let status = service.status();
    assert_eq!(status["in_flight"], true, "{status}");
    assert_eq!(status["service"]["starts"], 1, "{status}");
    service.stop();
    assert_eq!(service.status()["in_flight"], false);
}

#[test]
fn a_ready_instance_killed_with_kill_9_is_started_again_at_once_by_one_of_the_next_callers() {
    // Default options: the failure the kill leaves (30s of --retry-after) is no crash loop.
    let service = Service::new();
    service.open_gate();
    assert_status(&finish(service.spawn(&[])), 0);
    service.kill_instance();
    let callers: Vec<Child> = (0..10).map(|_| service.spawn(&[])).collect();
    for caller in callers {
        assert_status(&finish(caller), 0);
    }
    assert_eq!(service.starts(), 2, "one new instance for ten callers");
    wait_until("one instance runs", || alive(&service.marker).len() == 1);
    let status = service.status();
    assert_eq!(status["service"]["starts"], 2, "{status}");
    let last = status["service"]["last_exit"]["reason"]
        .as_str()
        .unwrap_or("");
    assert!(last.contains("signal 9"), "{status}");
    let decision = &status["service"]["decision"];
    assert_eq!(decision["kind"], "restarted", "{status}");
    assert!(
        decision["reason"]
            .as_str()
            .unwrap_or("")
            .contains("signal 9"),
        "{status}"
    );
    let text = service.env.run(["status", "w"]);
    assert!(
        stdout(&text).contains("restarted after a crash"),
        "{}",
        stdout(&text)
    );
    service.stop();
}

#[test]
fn a_crash_looping_instance_backs_off() {
    let env = TestEnv::new();
    let script = "echo $$ >> starts; echo boom >&2; exit 3";
    let run = |ready: bool| {
        let mut args = vec!["--service", "c"];
        if ready {
            args.extend(["--ready", "false", "--wait", "30s"]);
        }
        args.extend(["--", "sh", "-c", script]);
        env.run(args)
    };
    // The caller that starts it sees it end before it was ready.
    let first = run(true);
    assert_status(&first, 75);
    assert!(
        stderr(&first).contains("ended before it was ready"),
        "{}",
        stderr(&first)
    );
    // The next ones do not start it again within --retry-after (the --ttl, 30s).
    for ready in [true, false, false] {
        let again = run(ready);
        assert_status(&again, 75);
        assert!(
            stderr(&again).contains("not started: a crash loop"),
            "{}",
            stderr(&again)
        );
    }
    let starts = fs::read_to_string(env.path("starts")).unwrap_or_default();
    assert_eq!(starts.lines().count(), 1, "starts: {starts}");
    let log = fs::read_to_string(env.cache.join("c.log")).unwrap_or_default();
    assert!(
        log.contains("boom"),
        "the log has the instance's stderr: {log:?}"
    );
    let status = env.run(["status", "--json", "c"]);
    let all: Value = serde_json::from_slice(&status.stdout).expect("json");
    let decision = &all[0]["service"]["decision"];
    assert_eq!(decision["kind"], "backing_off", "{}", all[0]);
    assert!(decision["next_start_at_ms"].is_u64(), "{}", all[0]);
    let text = env.run(["status", "c"]);
    assert!(
        stdout(&text).contains("backing off in a crash loop"),
        "{}",
        stdout(&text)
    );
}

#[test]
fn more_than_start_limit_starts_within_the_start_window_back_off() {
    let service = Service::new();
    service.open_gate();
    let limit = ["--start-limit", "2", "--start-window", "1h"];
    for start in 1..=2 {
        assert_status(&finish(service.spawn(&limit)), 0);
        assert_eq!(service.starts(), start);
        service.kill_instance();
    }
    // Each was up (ready) before it was killed, but two started within the hour.
    let third = finish(service.spawn(&limit));
    assert_status(&third, 75);
    assert!(
        stderr(&third).contains("--start-limit 2"),
        "{}",
        stderr(&third)
    );
    assert_eq!(service.starts(), 2, "a third instance started");
    let status = service.status();
    assert_eq!(
        status["service"]["decision"]["kind"], "backing_off",
        "{status}"
    );
    // A larger limit lets the next one start.
    let more = ["--start-limit", "3", "--start-window", "1h"];
    assert_status(&finish(service.spawn(&more)), 0);
    assert_eq!(service.starts(), 3);
    service.stop();
}

#[test]
fn a_ready_check_that_passes_already_starts_nothing() {
    // A worker started by hand (or by an older version) answers already.
    let service = Service::new();
    fs::write(service.env.path("ready"), "").expect("ready");
    for _ in 0..3 {
        assert_status(&finish(service.spawn(&[])), 0);
    }
    assert_eq!(service.starts(), 0, "an instance was started");
    let status = service.status();
    assert_eq!(status["in_flight"], false, "{status}");
    assert_eq!(status["service"]["starts"], 0, "{status}");
    assert_eq!(
        status["service"]["decision"]["kind"], "ready_unsupervised",
        "{status}"
    );
    let text = service.env.run(["status", "w"]);
    assert!(
        stdout(&text).contains("ready but not supervised"),
        "{}",
        stdout(&text)
    );
}

#[test]
fn kill_9_of_the_supervisor_leaves_no_process_of_the_instance() {
    let env = TestEnv::new();
    let marker = marker();
    fs::write(env.path("marker"), &marker).expect("marker");
    let script = "m=$(cat marker); sleep ${m}1 & setsid sleep ${m}2 & (sleep ${m}3 &); \
                  exec sleep ${m}4";
    let out = env.run(["--service", "k", "--", "sh", "-c", script]);
    assert_status(&out, 0);
    wait_until("the instance's four sleeps run", || {
        alive(&marker).len() == 4
    });
    let status = env.run(["status", "--json", "k"]);
    let all: Value = serde_json::from_slice(&status.stdout).expect("json");
    let supervisor = all[0]["pid"].as_u64().expect("a supervisor pid") as i32;
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(supervisor).expect("pid"),
        rustix::process::Signal::KILL,
    )
    .expect("kill -9 the supervisor");
    wait_until("nothing of the instance is left", || {
        alive(&marker).is_empty()
    });
}

#[test]
fn twenty_exclusive_appenders_take_turns_and_every_line_is_whole() {
    let env = TestEnv::new();
    // The overlap detector: a run that finds another's mark records an overlap.
    let script = "mkdir running 2>/dev/null || echo overlap >> overlaps; \
                  i=0; while [ $i -lt 1000 ]; do i=$((i+1)); \
                  echo \"writer $1 line $i of 1000\" >> journal; done; \
                  rmdir running; echo \"$1 done\"";
    let callers: Vec<Child> = (0..20)
        .map(|n| {
            let n = n.to_string();
            env.spawn([
                "--exclusive",
                "j",
                "--wait",
                "10m",
                "--",
                "sh",
                "-c",
                script,
                "sh",
                &n,
            ])
        })
        .collect();
    for (n, caller) in callers.into_iter().enumerate() {
        let out = finish(caller);
        assert_status(&out, 0);
        assert_eq!(
            stdout(&out),
            format!("{n} done\n"),
            "its own command's stdout"
        );
    }
    assert!(!env.path("overlaps").exists(), "two runs overlapped");
    let journal = fs::read_to_string(env.path("journal")).expect("journal");
    let lines: Vec<&str> = journal.lines().collect();
    assert_eq!(lines.len(), 20_000);
    for line in &lines {
        let words: Vec<&str> = line.split(' ').collect();
        assert!(
            words.len() == 6 && words[0] == "writer" && words[5] == "1000",
            "a torn line: {line:?}"
        );
    }
    assert!(
        !env.cache.join("j.result").exists(),
        "--exclusive caches nothing"
    );
}

#[test]
fn an_exclusive_caller_whose_wait_runs_out_exits_75_without_running() {
    let env = TestEnv::new();
    let gate = env.fifo("gate");
    let holder = env.spawn([
        "--exclusive",
        "x",
        "--",
        "sh",
        "-c",
        &format!("echo holding > held; cat {}", gate.display()),
    ]);
    wait_until("the first run holds the turn", || env.path("held").exists());
    let late = env.run([
        "--exclusive",
        "x",
        "--wait",
        "200ms",
        "--",
        "sh",
        "-c",
        "echo ran > late",
    ]);
    assert_status(&late, 75);
    assert!(stderr(&late).contains("--wait 200ms"), "{}", stderr(&late));
    assert!(
        !env.path("late").exists(),
        "the late caller ran its command"
    );
    fs::write(&gate, "go\n").expect("open the gate");
    assert_status(&finish(holder), 0);
}

#[test]
fn an_exclusive_caller_gets_its_own_output_and_status_and_nothing_is_cached() {
    let env = TestEnv::new();
    for (word, code) in [("one", 4), ("two", 0)] {
        let out = env.call(
            "e",
            &["--exclusive"],
            &["sh", "-c", &format!("echo {word}; exit {code}")],
        );
        assert_status(&out, code);
        assert_eq!(stdout(&out), format!("{word}\n"));
    }
    assert!(!env.cache.join("e.result").exists());
    assert!(
        !env.cache.join("e.failure").exists(),
        "nothing to back off from"
    );
}
