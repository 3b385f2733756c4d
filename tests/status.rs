//! `status` and `clear` as a user meets them: every JSON key of fresh, stale,
//! in-flight and failed NAMEs, the 100-column table, unknown NAMEs, and clears that
//! wait for the run in flight (issue 5).

use crate::common;

use std::fs;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{SystemTime, UNIX_EPOCH};

use common::{TestEnv, assert_status, finish, status, stderr, stdout, wait_until};
use serde_json::{Map, Value};

const KEYS: [&str; 20] = [
    "name",
    "slot",
    "keys",
    "state",
    "age_ms",
    "ttl_ms",
    "size_bytes",
    "written_at_ms",
    "duration_ms",
    "exit_code",
    "in_flight",
    "pid",
    "host",
    "command_pid",
    "run_started_at_ms",
    "command",
    "last_failure",
    "service",
    "slots",
    "last_exclusive_run",
];
const FAILURE_KEYS: [&str; 9] = [
    "consecutive_failures",
    "backoff_ms",
    "next_run_at_ms",
    "at_ms",
    "age_ms",
    "reason",
    "exit_code",
    "duration_ms",
    "stderr_tail",
];

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn status_json(env: &TestEnv, names: &[&str]) -> Vec<Value> {
    let mut args = vec!["status", "--json"];
    args.extend(names);
    let out = env.run(args);
    assert_status(&out, 0);
    serde_json::from_slice::<Value>(&out.stdout)
        .expect("status --json is JSON")
        .as_array()
        .expect("an array")
        .clone()
}

/// `status --json NAME` once it exists.
fn try_status(env: &TestEnv, name: &str) -> Option<Value> {
    let out = env.run(["status", "--json", name]);
    let all: Value = serde_json::from_slice(&out.stdout).ok()?;
    all.get(0).cloned()
}

fn object(value: &Value) -> &Map<String, Value> {
    value.as_object().expect("an object")
}

/// The keys of a JSON object, sorted (serde_json's map is sorted too).
fn keys(value: &Value) -> Vec<&str> {
    object(value).keys().map(String::as_str).collect()
}

fn sorted<const N: usize>(mut keys: [&str; N]) -> Vec<&str> {
    keys.sort_unstable();
    keys.to_vec()
}

fn u64_of(value: &Value, key: &str) -> u64 {
    value[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} is a number: {value}"))
}

/// A command that holds its run until the test creates the gate file.
fn gated(env: &TestEnv) -> (String, PathBuf) {
    let gate = env.path("gate");
    let body = format!(
        "while [ ! -e '{}' ] && [ -d '{}' ]; do sleep 0.01; done; echo done",
        gate.display(),
        env.root().display()
    );
    (env.script("held", &body).display().to_string(), gate)
}

struct Gate(PathBuf);

impl Drop for Gate {
    fn drop(&mut self) {
        let _ = fs::write(&self.0, "");
    }
}

#[test]
fn status_json_gives_every_key_of_fresh_stale_in_flight_and_failed_names() {
    let env = TestEnv::new();
    let before = now_ms();
    let out = env.call("fresh", &["--ttl", "1h"], &["printf", "hello"]);
    assert_eq!(stdout(&out), "hello");
    // --ttl 0: stale the moment it is written.
    let out = env.call(
        "stale",
        &["--ttl", "0"],
        &["sh", "-c", "echo stale; exit 0"],
    );
    assert_eq!(stdout(&out), "stale\n");
    let failing = [
        "sh",
        "-c",
        "echo partial; echo first >&2; echo boom >&2; exit 3",
    ];
    let out = env.call("failed", &[], &failing);
    assert_status(&out, 3);
    let (held, gate) = gated(&env);
    let _gate = Gate(gate.clone());
    let mut running = env.spawn(["running", "--", &held]);
    wait_until("the run is recorded", || {
        try_status(&env, "running").is_some_and(|s| s["command_pid"].is_u64())
    });
    let after = now_ms();

    let all = status_json(&env, &[]);
    let names: Vec<&str> = all.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["failed", "fresh", "running", "stale"],
        "sorted by NAME"
    );
    for s in &all {
        assert_eq!(keys(s), sorted(KEYS), "exactly these keys: {s}");
    }
    let [failed, fresh, in_flight, stale] = [&all[0], &all[1], &all[2], &all[3]];

    // fresh: every field of the result.
    assert_eq!(fresh["state"], "fresh");
    assert!(u64_of(fresh, "age_ms") < 3_600_000);
    assert_eq!(fresh["ttl_ms"], 3_600_000);
    assert_eq!(fresh["size_bytes"], 5);
    let written = u64_of(fresh, "written_at_ms");
    assert!(
        (before..=after).contains(&written),
        "{before} <= {written} <= {after}"
    );
    assert!(u64_of(fresh, "duration_ms") <= after - before);
    assert_eq!(fresh["exit_code"], 0);
    assert_eq!(fresh["in_flight"], false);
    for key in ["pid", "command_pid", "run_started_at_ms", "last_failure"] {
        assert!(fresh[key].is_null(), "{key}: {fresh}");
    }
    assert_eq!(fresh["command"], "printf hello");

    // stale: judged by the ttl it was written with.
    assert_eq!(stale["state"], "stale");
    assert_eq!(stale["ttl_ms"], 0);
    assert_eq!(stale["size_bytes"], 6);
    assert!(u64_of(stale, "age_ms") <= now_ms() - before);
    assert_eq!(stale["command"], "sh -c 'echo stale; exit 0'");
    assert!(stale["last_failure"].is_null());

    // in flight: the lock is held; the pids are those of singleflight and its command.
    assert_eq!(in_flight["state"], "none");
    assert_eq!(in_flight["in_flight"], true);
    assert_eq!(u64_of(in_flight, "pid"), u64::from(running.id()));
    assert!(
        in_flight["host"].is_null(),
        "the cache dir's runs are this machine's"
    );
    let command_pid = u64_of(in_flight, "command_pid");
    assert_ne!(command_pid, 0, "the command's pid");
    #[cfg(target_os = "linux")]
    {
        let cmdline = fs::read(format!("/proc/{command_pid}/cmdline")).unwrap();
        assert!(
            String::from_utf8_lossy(&cmdline).contains(&held),
            "the command's pid"
        );
    }
    let started = u64_of(in_flight, "run_started_at_ms");
    assert!((before..=after).contains(&started));
    for key in [
        "age_ms",
        "ttl_ms",
        "size_bytes",
        "written_at_ms",
        "duration_ms",
        "exit_code",
    ] {
        assert!(in_flight[key].is_null(), "{key}: {in_flight}");
    }
    assert!(in_flight["command"].is_null() && in_flight["last_failure"].is_null());

    // failed: nothing cached (no --cache-failures), and why.
    assert_eq!(failed["state"], "none");
    assert_eq!(failed["in_flight"], false);
    assert!(failed["command"].is_null());
    let failure = &failed["last_failure"];
    assert_eq!(keys(failure), sorted(FAILURE_KEYS), "{failure}");
    let at = u64_of(failure, "at_ms");
    assert!((before..=after).contains(&at));
    assert!(u64_of(failure, "age_ms") <= now_ms() - at);
    let reason = failure["reason"].as_str().unwrap();
    assert!(reason.starts_with("exit status 3 after "), "{reason}");
    assert_eq!(failure["exit_code"], 3);
    assert!(u64_of(failure, "duration_ms") <= after - before);
    assert_eq!(failure["stderr_tail"], "first\nboom\n");

    assert!(running.try_wait().unwrap().is_none());
    fs::write(&gate, "").unwrap();
    let out = finish(running);
    assert_eq!(stdout(&out), "done\n");
    let done = &status_json(&env, &["running"])[0];
    assert_eq!(
        (done["state"].as_str(), &done["in_flight"]),
        (Some("fresh"), &Value::Bool(false))
    );
    assert!(done["pid"].is_null());
}

#[test]
fn status_shows_the_pid_of_the_background_refresher() {
    let env = TestEnv::new();
    let (held, gate) = gated(&env);
    let _gate = Gate(gate.clone());
    let caller = env.spawn(["-v", "--background", "bg", "--", &held]);
    let caller_pid = u64::from(caller.id());
    wait_until("the refresher runs", || {
        try_status(&env, "bg").is_some_and(|s| s["command_pid"].is_u64())
    });
    let s = &status_json(&env, &["bg"])[0];
    fs::write(&gate, "").unwrap();
    let out = finish(caller);
    let line = stderr(&out);
    let announced = line
        .split_once("(pid ")
        .and_then(|(_, rest)| rest.split_once(')'))
        .map(|(pid, _)| pid.parse::<u64>().unwrap());
    assert_eq!(s["pid"].as_u64(), announced, "{line}");
    assert_ne!(
        s["pid"].as_u64(),
        Some(caller_pid),
        "the refresher, not the caller"
    );
    assert_eq!(stdout(&out), "done\n");
}

#[test]
fn the_status_table_fits_100_columns_and_shows_failures() {
    let env = TestEnv::new();
    let long_name = "n".repeat(128);
    let long_arg = "x".repeat(300);
    let out = env.call(&long_name, &["--ttl", "1h"], &["echo", &long_arg]);
    assert_status(&out, 0);
    let escape = "echo hidden >&2; echo plain >&2; printf '\\033[31mred\\033[0m\\n' >&2; \
                  echo long $(seq 1 60) >&2; exit 4";
    let out = env.call("broken", &[], &["sh", "-c", escape]);
    assert_status(&out, 4);

    let out = env.run(["status"]);
    assert_status(&out, 0);
    let table = stdout(&out);
    let lines: Vec<&str> = table.lines().collect();
    for line in &lines {
        assert!(
            line.chars().count() <= 100,
            "{} columns: {line}",
            line.chars().count()
        );
        assert!(
            !line.contains('\u{1b}'),
            "terminal escapes are shown escaped: {line}"
        );
    }
    let header: Vec<&str> = lines[0].split("  ").filter(|c| !c.is_empty()).collect();
    assert_eq!(
        header.iter().map(|c| c.trim()).collect::<Vec<_>>(),
        [
            "NAME",
            "STATE",
            "AGE",
            "TTL",
            "SIZE",
            "LAST RUN",
            "IN FLIGHT",
            "COMMAND"
        ]
    );
    assert!(
        lines[1].starts_with("broken ") && lines[1].contains(" none "),
        "{table}"
    );
    assert!(
        lines[2].starts_with("  last failure ") && lines[2].contains(" ago: exit status 4 after ")
    );
    assert!(lines[3].starts_with("    | plain"), "{table}");
    assert_eq!(lines[4], "    | \\u{1b}[31mred\\u{1b}[0m", "{table}");
    assert!(
        lines[5].starts_with("    | long 1 2 3 ") && lines[5].ends_with('…'),
        "{table}"
    );
    let row = lines[6];
    assert!(
        row.starts_with("nnnnnnnnnnnnnnnnnnn… "),
        "a long NAME is cut: {row}"
    );
    assert!(row.contains(" fresh ") && row.contains(" 1h0m ") && row.contains(" exit 0 "));
    assert!(row.ends_with('…') && row.contains("echo xxxx"), "{row}");
    assert_eq!(lines.len(), 7, "only the last 3 lines of stderr: {table}");
}

#[test]
fn status_with_nothing_cached_is_an_empty_table_or_array() {
    let env = TestEnv::new();
    let out = env.run(["status"]);
    assert_status(&out, 0);
    let read = format!(
        "singleflight: read cache dir {}: 0 NAMEs\n",
        env.cache.display()
    );
    assert_eq!(stderr(&out), read);
    assert_eq!(
        stdout(&out),
        "NAME  STATE  AGE  TTL  SIZE  LAST RUN  IN FLIGHT  COMMAND\n"
    );
    let out = env.run(["status", "--json"]);
    assert_eq!((status(&out), stdout(&out).as_str()), (0, "[]\n"));
    assert!(!env.cache.exists(), "status creates nothing");
}

#[test]
fn status_of_a_name_that_does_not_exist_exits_1_and_says_so() {
    let env = TestEnv::new();
    let out = env.call("known", &[], &["echo", "hi"]);
    assert_status(&out, 0);

    let out = env.run(["status", "nope"]);
    assert_status(&out, 1);
    assert_eq!(stdout(&out), "");
    let message = stderr(&out);
    assert!(
        message.starts_with("singleflight: no such NAME in ") && message.contains(": nope ("),
        "{message}"
    );

    // The ones that exist are shown, and the status still says one did not.
    let out = env.run(["status", "--json", "known", "nope", "other"]);
    assert_status(&out, 1);
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown.as_array().unwrap().len(), 1);
    assert_eq!(shown[0]["name"], "known");
    assert!(stderr(&out).contains(": nope, other ("), "{}", stderr(&out));
}

#[test]
fn clear_waits_for_the_run_in_flight_and_then_removes_its_result() {
    let env = TestEnv::new();
    let (held, gate) = gated(&env);
    let _gate = Gate(gate.clone());
    let running = env.spawn(["slow", "--", &held]);
    wait_until("the run is in flight", || {
        try_status(&env, "slow").is_some_and(|s| s["in_flight"] == true)
    });

    let said = env.path("clear.stderr");
    let mut clear = env
        .command()
        .args(["clear", "slow"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&said).unwrap())
        .spawn()
        .unwrap();
    wait_until("clear says it waits", || {
        fs::read_to_string(&said)
            .unwrap_or_default()
            .contains("waiting")
    });
    assert_eq!(
        fs::read_to_string(&said).unwrap(),
        "singleflight: slow: a run is in flight; waiting for it to end before clearing\n"
    );
    // It waits in the lock, which the run holds until the gate opens.
    assert!(
        clear.try_wait().unwrap().is_none(),
        "clear returned during the run"
    );
    assert!(!env.result_file("slow").exists());

    fs::write(&gate, "").unwrap();
    let out = finish(running);
    assert_eq!(stdout(&out), "done\n", "the run ends normally");
    wait_until("clear ends", || clear.try_wait().unwrap().is_some());
    assert_eq!(clear.wait().unwrap().code(), Some(0));
    assert!(
        !env.result_file("slow").exists(),
        "the run's result was cleared after it"
    );
    assert!(env.cache.join("slow.lock").exists(), "the lock file stays");
    let out = env.run(["status", "slow"]);
    assert_status(&out, 1);
}

#[test]
fn clear_all_removes_every_result_and_failure_record_and_keeps_the_locks() {
    let env = TestEnv::new();
    let counter = env.counter().display().to_string();
    let counting = format!("echo run >> '{counter}'; echo one");
    assert_eq!(
        status(&env.call("one", &["--ttl", "1h"], &["sh", "-c", &counting])),
        0
    );
    assert_status(&env.call("two", &[], &["echo", "two"]), 0);
    assert_status(&env.call("bad", &[], &["sh", "-c", "exit 5"]), 5);
    assert_eq!(status_json(&env, &[]).len(), 3);

    let out = env.run(["clear", "--all"]);
    assert_eq!(
        (status(&out), stdout(&out).as_str(), stderr(&out).as_str()),
        (0, "", "")
    );
    assert!(status_json(&env, &[]).is_empty());
    for name in ["one", "two", "bad"] {
        assert!(
            env.cache.join(format!("{name}.lock")).exists(),
            "{name}.lock stays"
        );
        assert!(!env.result_file(name).exists());
        assert!(!env.cache.join(format!("{name}.failure")).exists());
    }
    // The next call runs the command again.
    let out = env.call("one", &["--ttl", "1h"], &["sh", "-c", &counting]);
    assert_eq!(stdout(&out), "one\n");
    assert_eq!(env.runs(), 2);
}

#[test]
fn clear_of_names_says_what_it_removed_and_an_unknown_name_is_no_error() {
    let env = TestEnv::new();
    assert_status(&env.call("kept", &[], &["echo", "kept"]), 0);
    assert_status(&env.call("gone", &[], &["echo", "gone"]), 0);
    let out = env.run(["clear", "-v", "gone", "nope"]);
    assert_status(&out, 0);
    assert_eq!(
        stderr(&out),
        "singleflight: gone: cleared (result)\nsingleflight: nope: nothing to clear\n"
    );
    assert!(
        !env.cache.join("nope.lock").exists(),
        "clear creates nothing for an unknown NAME"
    );
    let left: Vec<Value> = status_json(&env, &[]);
    assert_eq!(left.len(), 1);
    assert_eq!(left[0]["name"], "kept");
}
