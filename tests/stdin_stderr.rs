//! Fronting a status-line or hook command as it is (issue 25): `--stdin` gives the run
//! the caller's stdin (byte for byte; to a `--background` refresher too), the stdin
//! keys (`--key-stdin`, `--key-stdin-json POINTER`) give each session its own result,
//! and a result's stderr is stored with it and replayed to hits and waiters (before
//! the stdout); a result written by the previous release (format version 1) is served.

use crate::common;

use std::fs;
use std::io::Write;
use std::process::{Child, Command, Output, Stdio};

use common::{TestEnv, assert_status, blocked_on_a_lock, finish, stderr, stdout, wait_until};

/// Starts `command` with `input` on its stdin (written by a thread, then closed).
fn start_with_stdin(command: &mut Command, input: &[u8]) -> Child {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("singleflight starts");
    let mut pipe = child.stdin.take().expect("a stdin pipe");
    let input = input.to_vec();
    std::thread::spawn(move || {
        // A call that refuses its stdin (over the cap) closes it early: not an error.
        let _ = pipe.write_all(&input);
    });
    child
}

/// `singleflight ARGS...` with `input` on stdin, run to the end.
fn run_with_stdin(env: &TestEnv, args: &[&str], input: &[u8]) -> Output {
    finish(start_with_stdin(env.command().args(args), input))
}

fn claude_json(session: &str, cost: usize) -> String {
    format!(
        r#"{{"session_id":"{session}","transcript_path":"/tmp/{session}.jsonl","model":{{"id":"claude-sonnet-4","display_name":"Sonnet"}},"workspace":{{"current_dir":"/tmp","project_dir":"/tmp"}},"cost":{{"total_cost_usd":{cost}}}}}"#
    )
}

#[test]
fn two_sessions_interleaved_over_forty_calls_run_twice() {
    let env = TestEnv::new();
    let job = env.script(
        "statusline",
        &format!("echo run >> '{}'\ncat", env.counter().display()),
    );
    let job = job.to_str().unwrap();
    let args = [
        "sl",
        "--stdin",
        "--key-stdin-json",
        "/session_id",
        "--ttl",
        "1h",
        "--",
        job,
    ];
    for call in 0..40 {
        let session = ["abc", "def"][call % 2];
        // The cost changes at every call: only the session picks the result.
        let out = run_with_stdin(&env, &args, claude_json(session, call).as_bytes());
        assert_status(&out, 0);
        // Each session is served its own result: the first call's stdin, echoed.
        assert_eq!(stdout(&out), claude_json(session, call % 2), "call {call}");
    }
    assert_eq!(env.runs(), 2, "one run per session");
    let status = env.run(["status", "sl"]);
    assert_status(&status, 0);
    let shown = stdout(&status);
    assert!(shown.contains(r#"stdin /session_id="abc""#), "{shown}");
    assert!(shown.contains(r#"stdin /session_id="def""#), "{shown}");
}

#[test]
fn stdin_reaches_the_run_byte_for_byte() {
    let env = TestEnv::new();
    // Every byte value, NULs and invalid UTF-8 included, over a pipe buffer's worth.
    let input: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
    let out = run_with_stdin(&env, &["bytes", "--stdin", "--", "cat"], &input);
    assert_status(&out, 0);
    assert!(
        out.stdout == input,
        "the run's stdin differs from the caller's"
    );
    // Without --stdin the run reads nothing, as before.
    let out = run_with_stdin(&env, &["empty", "--", "cat"], &input);
    assert_status(&out, 0);
    assert!(out.stdout.is_empty());
    // Over the 1 MiB cap: exit 2, and nothing runs.
    let job = env.script("job", &format!("echo run >> '{}'", env.counter().display()));
    let big = vec![b'x'; (1 << 20) + 1];
    let out = run_with_stdin(&env, &["big", "--stdin", "--", job.to_str().unwrap()], &big);
    assert_status(&out, 2);
    assert!(
        stderr(&out).contains("over the cap of 1 MiB"),
        "{}",
        stderr(&out)
    );
    assert_eq!(env.runs(), 0);
}

#[test]
fn a_background_refresher_gets_the_stdin_of_the_caller_that_started_it() {
    let env = TestEnv::new();
    let seen = env.path("seen");
    let job = env.script(
        "job",
        &format!(
            "cat > '{seen}.tmp' && mv '{seen}.tmp' '{seen}'\necho run >> '{}'\ncat '{seen}'",
            env.counter().display(),
            seen = seen.display()
        ),
    );
    let args = [
        "bg",
        "--background",
        "--stdin",
        "--ttl",
        "0s",
        "--",
        job.to_str().unwrap(),
    ];
    // Nothing cached: the caller waits for the refresher it started, which read "one".
    let out = run_with_stdin(&env, &args, b"one\0\xff");
    assert_status(&out, 0);
    assert_eq!(out.stdout, b"one\0\xff");
    // Stale: served at once; the refresher this caller starts reads "two".
    let out = run_with_stdin(&env, &args, b"two");
    assert_status(&out, 0);
    assert_eq!(out.stdout, b"one\0\xff");
    wait_until("the refresher ran with the second caller's stdin", || {
        fs::read(&seen).is_ok_and(|bytes| bytes == b"two")
    });
}

#[test]
fn a_non_json_stdin_with_key_stdin_json_exits_2_and_runs_nothing() {
    let env = TestEnv::new();
    let job = env.script("job", &format!("echo run >> '{}'", env.counter().display()));
    let args = [
        "sl",
        "--key-stdin-json",
        "/session_id",
        "--",
        job.to_str().unwrap(),
    ];
    let out = run_with_stdin(&env, &args, b"not json at all");
    assert_status(&out, 2);
    let said = stderr(&out);
    assert!(said.contains("stdin is not JSON"), "{said}");
    assert_eq!(said.lines().count(), 1, "one line: {said}");
    assert_eq!(env.runs(), 0, "nothing ran");
    // A pointer to nothing is a key value of its own: it runs, once.
    for _ in 0..2 {
        assert_status(&run_with_stdin(&env, &args, b"{\"other\":1}"), 0);
    }
    assert_eq!(env.runs(), 1);
    let shown = stdout(&env.run(["status", "sl"]));
    assert!(shown.contains("stdin /session_id missing"), "{shown}");
    // Not a pointer at all: a usage error before anything is read.
    let out = run_with_stdin(
        &env,
        &["sl", "--key-stdin-json", "session_id", "--", "true"],
        b"{}",
    );
    assert_status(&out, 2);
}

/// Runs `args` with stdout and stderr into one file, to see their order.
fn combined(env: &TestEnv, args: &[&str], file: &str) -> (i32, String) {
    let path = env.path(file);
    let out = fs::File::create(&path).unwrap();
    let status = env
        .command()
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .status()
        .unwrap();
    (
        status.code().unwrap_or(-1),
        fs::read_to_string(&path).unwrap(),
    )
}

#[test]
fn a_waiter_and_a_hit_show_the_runs_stderr() {
    let env = TestEnv::new();
    let gate = env.fifo("gate");
    let job = env.script(
        "lint",
        &format!(
            "echo run >> '{}'\necho 'warning: unused variable' >&2\nread line < '{}'\necho 'lint: ok'",
            env.counter().display(),
            gate.display()
        ),
    );
    let args = ["lint", "--ttl", "1h", "--", job.to_str().unwrap()];
    let winner = env.spawn(args);
    wait_until("the run started", || env.runs() == 1);
    let waiter = env.spawn(args);
    wait_until("the waiter waits on the lock", || {
        blocked_on_a_lock(waiter.id())
    });
    fs::write(&gate, "go\n").unwrap();
    let (winner, waiter) = (finish(winner), finish(waiter));
    for (who, out) in [("winner", &winner), ("waiter", &waiter)] {
        assert_status(out, 0);
        assert_eq!(stdout(out), "lint: ok\n", "{who}");
        assert!(stderr(out).contains("warning: unused variable"), "{who}");
    }
    assert!(
        !stdout(&waiter).contains("warning"),
        "stderr is replayed to stderr"
    );
    // A hit: stderr first, then stdout (one file for both shows the order).
    let (code, both) = combined(&env, &args, "hit.out");
    assert_eq!(code, 0);
    assert_eq!(both, "warning: unused variable\nlint: ok\n");
    // --no-replay-stderr: stdout alone.
    let (code, both) = combined(
        &env,
        &[&["lint", "--no-replay-stderr"], &args[1..]].concat(),
        "quiet.out",
    );
    assert_eq!(code, 0);
    assert_eq!(both, "lint: ok\n");
    assert_eq!(env.runs(), 1);
}

#[test]
fn a_cached_failure_is_served_with_its_reason() {
    let env = TestEnv::new();
    let job = env.script(
        "check",
        &format!(
            "echo run >> '{}'\necho 'error[E0425]: cannot find value x' >&2\nexit 3",
            env.counter().display()
        ),
    );
    let args = [
        "check",
        "--cache-failures",
        "--ttl",
        "1h",
        "--",
        job.to_str().unwrap(),
    ];
    for _ in 0..2 {
        let out = env.run(args);
        assert_status(&out, 3);
        assert!(stderr(&out).contains("error[E0425]"), "{}", stderr(&out));
    }
    assert_eq!(env.runs(), 1);
}

/// The command that wrote tests/fixtures/v1.result: `singleflight v1 --ttl 1s -- sh -c
/// …` with the binary of the previous release (commit 7ed1e2f, format version 1),
/// `SF_OUT` and `SF_COUNT` unset. Its argv digest is this argv's.
const V1_COMMAND: [&str; 3] = [
    "sh",
    "-c",
    r#"printf "%s\n" "${SF_OUT:-v1 result}"; echo run >> "${SF_COUNT:-/dev/null}""#,
];

#[test]
fn a_v1_result_written_by_the_previous_release_is_served() {
    let env = TestEnv::new();
    let fixture = include_bytes!("fixtures/v1.result");
    assert_eq!(&fixture[..8], b"SFLIGHT\x01", "a format version 1 result");
    fs::create_dir_all(env.result_file("v1").parent().unwrap()).unwrap();
    fs::write(env.result_file("v1"), fixture).unwrap();
    let counter = env.counter();
    let mut command = env.command();
    command
        .env("SF_COUNT", &counter)
        .env("SF_OUT", "a new run")
        .args(["v1", "--ttl", "36500d", "--"])
        .args(V1_COMMAND);
    let out = finish(common::start(&mut command));
    assert_status(&out, 0);
    assert_eq!(stdout(&out), "v1 result\n", "the v1 result, not a new run");
    assert_eq!(env.runs(), 0);
    assert!(stderr(&out).is_empty(), "{}", stderr(&out));
    // A result of a version above ours is left alone (the run's output is printed).
    let mut newer = fixture.to_vec();
    newer[7] = 9;
    fs::write(env.result_file("v1"), &newer).unwrap();
    let out = finish(common::start(&mut command));
    assert_status(&out, 0);
    assert_eq!(stdout(&out), "a new run\n");
    assert_eq!(fs::read(env.result_file("v1")).unwrap(), newer);
}

/// A result's stderr is stored in etcd with it: a hit on another machine replays it.
#[cfg(all(unix, feature = "etcd"))]
#[test]
fn stderr_round_trips_through_the_fleet() {
    use common::etcd::Etcd;
    let Some(etcd) = Etcd::start() else { return };
    let machines = [TestEnv::new(), TestEnv::new()];
    let command = |env: &TestEnv| {
        let mut command = env.command();
        command
            .env("SINGLEFLIGHT_BACKEND", etcd.url())
            .envs(etcd.client_env())
            .args(["fleet", "--ttl", "1h", "--", "sh", "-c"])
            .arg(format!(
                "echo run >> '{}'; echo 'fleet: warning' >&2; echo fleet-out",
                machines[0].counter().display()
            ));
        command
    };
    for env in &machines {
        let out = finish(common::start(&mut command(env)));
        assert_status(&out, 0);
        assert_eq!(stdout(&out), "fleet-out\n");
        assert!(stderr(&out).contains("fleet: warning"), "{}", stderr(&out));
    }
    assert_eq!(
        machines[0].runs(),
        1,
        "the second machine was served from etcd"
    );
}
