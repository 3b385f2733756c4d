//! The first hour (issue 29): what a new user trips on. Each test drives the real
//! binary into one surprise and checks the exit status and the one line that explains it.

use crate::common;

use std::fs;
#[cfg(unix)]
use std::os::unix::fs::PermissionsExt;

use common::{TestEnv, alive, assert_status, finish, marker, stderr, stdout, wait_until};

/// A `--service` NAME `w` whose instance is `sleep MARKER`, running; stopped when
/// dropped, so that a failed test leaves nothing running.
struct Running<'a> {
    env: &'a TestEnv,
    marker: String,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let _ = self.env.run(["stop", "w"]);
    }
}

fn running_service(env: &TestEnv) -> Running<'_> {
    let marker = marker();
    let up = env.path("up");
    let script = env.script(
        "instance.sh",
        &format!("echo up > '{}'; exec sleep 100000", up.display()),
    );
    let command = [script.display().to_string(), marker.clone()];
    let out = env.call("w", &["--service"], &command);
    assert_status(&out, 0);
    wait_until("the instance runs", || up.exists());
    Running { env, marker }
}

// 1. One NAME, another command.

#[test]
fn another_command_under_one_name_is_said_once_and_quiet_silences_it() {
    let env = TestEnv::new();
    assert_status(&env.call("x", &[], &["echo", "a"]), 0);
    let out = env.call("x", &[], &["echo", "b"]);
    assert_status(&out, 0);
    assert_eq!(stdout(&out), "b\n");
    let err = stderr(&out);
    assert!(
        err.contains("holds a result of another command (echo a); running this one replaces it"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    let out = env.call("x", &["-q"], &["echo", "a"]);
    assert_status(&out, 0);
    assert_eq!(stderr(&out), "");
}

#[test]
fn a_service_asked_for_another_command_is_refused() {
    let env = TestEnv::new();
    let service = running_service(&env);
    let out = env.call("w", &["--service"], &["sleep", "100"]);
    assert_status(&out, 2);
    let err = stderr(&out);
    assert!(err.contains("runs another command"), "{err}");
    assert!(err.contains("singleflight stop w"), "{err}");
    // The same command is still just "running".
    let script = env.path("instance.sh").display().to_string();
    assert_status(
        &env.call("w", &["--service"], &[script, service.marker.clone()]),
        0,
    );
}

// 2. A back-off with no way out.

#[test]
fn a_back_off_names_the_way_out() {
    let env = TestEnv::new();
    let job = env.script("job.sh", "exit 3");
    let job = job.to_str().unwrap();
    assert_status(&env.call("job", &["--retry-after", "1h"], &[job]), 3);
    let out = env.call("job", &["--retry-after", "1h"], &[job]);
    assert_status(&out, 75);
    let err = stderr(&out);
    assert!(err.contains("singleflight clear job"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn another_commands_failure_does_not_hold_back_a_changed_command() {
    let env = TestEnv::new();
    assert_status(
        &env.call("job", &["--retry-after", "1h"], &["sh", "-c", "exit 3"]),
        3,
    );
    let out = env.call("job", &["--retry-after", "1h"], &["echo", "fixed"]);
    assert_status(&out, 0);
    assert_eq!(stdout(&out), "fixed\n");
}

// 3. stop.

#[test]
fn stopping_a_name_with_nothing_running_says_so_and_creates_nothing() {
    let env = TestEnv::new();
    assert_status(&env.call("other", &[], &["true"]), 0);
    let out = env.run(["stop", "typo2"]);
    assert_status(&out, 1);
    let err = stderr(&out);
    assert!(err.contains("typo2: nothing running"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(!env.cache.join("typo2.lock").exists());
}

#[test]
fn a_real_stop_says_what_it_stopped() {
    let env = TestEnv::new();
    let service = running_service(&env);
    let out = env.run(["stop", "w"]);
    assert_status(&out, 0);
    let err = stderr(&out);
    assert!(err.contains("w: stopped pid "), "{err}");
    assert!(err.contains("TERM"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    wait_until("the instance is gone", || alive(&service.marker).is_empty());
}

// 4. status.

#[test]
fn status_names_the_cache_dir_it_read() {
    let env = TestEnv::new();
    let out = env.run(["status"]);
    assert_status(&out, 0);
    let err = stderr(&out);
    assert!(err.contains(&env.cache.display().to_string()), "{err}");
    let out = env.run(["status", "--json"]);
    assert_status(&out, 0);
    assert_eq!(stdout(&out).trim(), "[]");
    assert!(stderr(&out).contains(&env.cache.display().to_string()));
}

#[test]
fn status_shows_a_services_command_and_a_stop_as_a_stop() {
    let env = TestEnv::new();
    let service = running_service(&env);
    let out = env.run(["status", "w"]);
    assert_status(&out, 0);
    let table = stdout(&out);
    assert!(
        table.contains(&format!("instance.sh {}", service.marker)),
        "{table}"
    );
    assert_status(&env.run(["stop", "w"]), 0);
    let out = env.run(["status", "w", "--json"]);
    assert_status(&out, 0);
    let text = stdout(&out);
    assert!(text.contains("stopped by `singleflight stop`"), "{text}");
    assert!(!text.contains("got signal 15"), "{text}");
}

#[test]
fn status_shows_a_name_used_only_with_exclusive() {
    let env = TestEnv::new();
    assert_status(
        &env.call("ex", &["--exclusive"], &["sh", "-c", "exit 3"]),
        3,
    );
    let out = env.run(["status", "ex"]);
    assert_status(&out, 0);
    let table = stdout(&out);
    assert!(table.contains("ex "), "{table}");
    assert!(table.contains("exit 3"), "its last run: {table}");
    assert!(table.contains("sh -c 'exit 3'"), "its command: {table}");
    let out = env.run(["status", "--json", "ex"]);
    assert_status(&out, 0);
    let json = stdout(&out);
    assert!(json.contains("\"last_exclusive_run\""), "{json}");
    assert!(json.contains("\"exit_code\": 3"), "{json}");
    assert_status(&env.run(["clear", "ex"]), 0);
    assert_status(&env.run(["status", "ex"]), 1);
}

// 5. --timeout 0.

#[test]
fn timeout_zero_or_off_means_no_limit() {
    let env = TestEnv::new();
    for value in ["0", "off", "none"] {
        let out = env.call(
            &format!("t{value}"),
            &["--timeout", value],
            &["sh", "-c", "sleep 0.3; echo done"],
        );
        assert_status(&out, 0);
        assert_eq!(stdout(&out), "done\n", "--timeout {value}");
    }
}

// 6. A skipped cron tick with -q.

#[test]
fn quiet_silences_a_skipped_tick() {
    let env = TestEnv::new();
    let gate = env.fifo("gate");
    let hold = format!("read x < '{}'; echo done", gate.display());
    let first = env.spawn(common::call_args("tick", &[], &["sh", "-c", &hold]));
    wait_until("the run is in flight", || {
        fs::read_to_string(env.cache.join("tick.run")).is_ok()
    });
    let out = env.call("tick", &["-q", "--wait", "0"], &["sh", "-c", &hold]);
    assert_status(&out, 75);
    assert_eq!(stderr(&out), "");
    fs::write(&gate, "go\n").unwrap();
    assert_status(&finish(first), 0);
}

// Error messages.

#[test]
fn an_empty_cache_dir_variable_is_named() {
    let env = TestEnv::new();
    let out = env
        .command()
        .env("SINGLEFLIGHT_CACHE_DIR", "")
        .args(["x", "--", "echo", "hi"])
        .output()
        .unwrap();
    assert_status(&out, 2);
    assert!(
        stderr(&out).contains("SINGLEFLIGHT_CACHE_DIR"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_forgotten_double_dash_is_shown_the_fix() {
    let env = TestEnv::new();
    let out = env.run(["hello", "date"]);
    assert_status(&out, 2);
    let err = stderr(&out);
    assert!(err.contains("singleflight hello -- date"), "{err}");
}

#[test]
fn a_negative_duration_is_not_advised_to_follow_a_double_dash() {
    let env = TestEnv::new();
    let out = env.call("x", &["--ttl", "-1s"], &["true"]);
    assert_status(&out, 2);
    let err = stderr(&out);
    assert!(err.contains("durations are not negative"), "{err}");
    assert!(!err.contains("-- -1"), "{err}");
}

#[test]
fn clear_without_a_name_mentions_all() {
    let env = TestEnv::new();
    let out = env.run(["clear"]);
    assert_status(&out, 2);
    assert!(stderr(&out).contains("--all"), "{}", stderr(&out));
}

#[cfg(unix)]
#[test]
fn a_group_writable_cache_dir_is_called_so() {
    let env = TestEnv::new();
    fs::create_dir(&env.cache).unwrap();
    fs::set_permissions(&env.cache, fs::Permissions::from_mode(0o775)).unwrap();
    let out = env.call("x", &[], &["true"]);
    assert_status(&out, 125);
    let err = stderr(&out);
    assert!(err.contains("writable by its group"), "{err}");
    assert!(!err.contains("others"), "{err}");
}

#[cfg(unix)]
#[test]
fn an_unwritable_cache_dir_is_named_with_the_fix() {
    let env = TestEnv::new();
    fs::create_dir(&env.cache).unwrap();
    // Root writes anywhere: as root, singleflight runs as nobody (setpriv, util-linux)
    // against a cache dir that nobody owns, so the check is really made.
    let as_nobody = common::is_root();
    if as_nobody {
        if !std::path::Path::new(SETPRIV).exists() {
            return common::skip("running as root, and no setpriv to run as nobody");
        }
        fs::set_permissions(env.root(), fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::chown(&env.cache, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    fs::set_permissions(&env.cache, fs::Permissions::from_mode(0o500)).unwrap();
    let args = common::call_args(
        "x",
        &[],
        &[
            "sh",
            "-c",
            &format!("echo run >> '{}'", env.counter().display()),
        ],
    );
    let out = if as_nobody {
        let mut command = env.command_for(SETPRIV);
        command
            .args([
                format!("--reuid={NOBODY}"),
                format!("--regid={NOBODY}"),
                "--clear-groups".to_owned(),
                env!("CARGO_BIN_EXE_singleflight").to_owned(),
            ])
            .args(&args);
        common::finish(common::start(&mut command))
    } else {
        env.run(&args).output
    };
    assert_status(&out, 125);
    let err = stderr(&out);
    assert!(err.contains("cache dir"), "{err}");
    assert!(err.contains(&env.cache.display().to_string()), "{err}");
    assert!(err.contains("the command was not run"), "{err}");
    assert!(err.contains("chmod u+w"), "{err}");
    assert_eq!(env.runs(), 0);
    fs::set_permissions(&env.cache, fs::Permissions::from_mode(0o700)).unwrap();
}

/// The uid and gid of `nobody` (and `nogroup`).
#[cfg(unix)]
const NOBODY: u32 = 65534;

/// util-linux's setpriv, to run singleflight as nobody when the tests run as root.
#[cfg(unix)]
const SETPRIV: &str = "/usr/bin/setpriv";
