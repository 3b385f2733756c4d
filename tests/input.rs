//! Bad input and an unusable cache dir: one clear line on stderr, the documented exit
//! status, the command not run, and nothing cached lost.

use crate::common;

use std::fs;
#[cfg(unix)]
use std::os::unix::fs::PermissionsExt;

#[cfg(unix)]
use common::is_root;
use common::{TestEnv, assert_status, stderr, stdout};

/// A cache with one good result in it, and the command that made it.
fn primed() -> (TestEnv, Vec<String>, Vec<u8>) {
    let env = TestEnv::new();
    let script = format!("echo run >> '{}'; echo cached", env.counter().display());
    let command = vec!["sh".into(), "-c".into(), script];
    let out = env.run([&["keep".to_string(), "--".into()][..], &command].concat());
    assert_eq!(stdout(&out), "cached\n");
    let bytes = fs::read(env.result_file("keep")).unwrap();
    (env, command, bytes)
}

fn assert_one_line(text: &str, needle: &str) {
    assert!(text.contains(needle), "expected {needle:?} in {text:?}");
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("singleflight") || l.starts_with("error"))
            .count(),
        1,
        "{text}"
    );
}

#[test]
fn bad_values_are_usage_errors_that_quote_the_value_and_lose_nothing() {
    let (env, command, before) = primed();
    let long = "x".repeat(200);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["../x"], "\"../x\""),
        (vec!["a/b"], "\"a/b\""),
        (vec![""], "invalid NAME"),
        (vec![&long], "invalid NAME"),
        (vec!["keep", "--ttl", "5parsecs"], "\"5parsecs\""),
        (vec!["keep", "--timeout", "-1"], "-1"),
        (vec!["keep", "--max-output", "12XB"], "\"12XB\""),
        (vec!["keep", "--bogus"], "--bogus"),
    ];
    for (args, needle) in cases {
        let full: Vec<String> = args
            .iter()
            .map(|s| s.to_string())
            .chain(["--".into()])
            .chain(command.clone())
            .collect();
        let out = env.run(&full);
        assert_status(&out, 2);
        assert!(stderr(&out).contains(needle), "{args:?}: {}", stderr(&out));
        assert!(out.stdout.is_empty());
    }
    let no_command = env.run(["keep"]);
    assert_status(&no_command, 2);
    assert!(
        stderr(&no_command).contains("COMMAND"),
        "{}",
        stderr(&no_command)
    );
    let empty_command = env.run(["keep", "--"]);
    assert_status(&empty_command, 2);
    assert_eq!(fs::read(env.result_file("keep")).unwrap(), before);
    assert_eq!(env.runs(), 1);
}

#[test]
fn a_name_error_says_what_a_valid_name_looks_like() {
    let env = TestEnv::new();
    let out = env.run(["a/b", "--", "true"]);
    assert!(
        stderr(&out).contains("letters, digits, '.', '_' or '-'"),
        "{}",
        stderr(&out)
    );
}

// The unexecutable file is made by its mode: Unix only.
#[cfg(unix)]
#[test]
fn a_missing_or_unexecutable_command_is_127_or_126_and_keeps_the_cache() {
    let (env, _, before) = primed();
    // -q: another command under "keep" is warned about (issue 29); the error stays.
    let out = env.run(["keep", "-q", "--ttl", "0", "--", "no-such-command-here"]);
    assert_status(&out, 127);
    assert_one_line(&stderr(&out), "no-such-command-here");
    let file = env.path("not-executable");
    fs::write(&file, "echo hi").unwrap();
    fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
    let out = env.run(["keep", "-q", "--ttl", "0", "--", file.to_str().unwrap()]);
    assert_status(&out, 126);
    assert_one_line(&stderr(&out), "not-executable");
    assert_eq!(fs::read(env.result_file("keep")).unwrap(), before);
}

// Used by the Unix-only tests below (modes, owners, /proc).
#[cfg(unix)]
fn assert_refused(env: &TestEnv, cache: &std::path::Path, reason: &str) {
    let script = format!("echo run >> '{}'", env.counter().display());
    let out = env
        .command()
        .args([
            "--cache-dir",
            cache.to_str().unwrap(),
            "x",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .output()
        .unwrap();
    assert_status(&out, 125);
    assert_one_line(&stderr(&out), reason);
    assert!(
        stderr(&out).contains(cache.to_str().unwrap()),
        "names the dir: {}",
        stderr(&out)
    );
    assert_eq!(env.runs(), 0, "the command was not run");
}

#[cfg(unix)]
#[test]
fn an_unusable_cache_dir_is_125_naming_the_dir_and_the_reason() {
    let env = TestEnv::new();
    let file = env.path("a-file");
    fs::write(&file, "").unwrap();
    assert_refused(&env, &file, "not a directory");
    assert_refused(&env, &file.join("below"), "Not a directory");
    assert_refused(
        &env,
        std::path::Path::new("/proc/self/no-such-cache"),
        "cannot create it",
    );
    let open = env.path("open");
    fs::create_dir(&open).unwrap();
    fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
    assert_refused(&env, &open, "writable by its group and others (mode 0777)");
    fs::set_permissions(&open, fs::Permissions::from_mode(0o770)).unwrap();
    assert_refused(&env, &open, "writable by its group (mode 0770)");
}

#[cfg(unix)]
#[test]
fn a_cache_dir_owned_by_another_user_is_refused() {
    let env = TestEnv::new();
    let theirs = env.path("theirs");
    fs::create_dir(&theirs).unwrap();
    if !is_root() {
        common::skip("giving a dir to another user needs root");
        return;
    }
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
    assert_refused(&env, &theirs, "owned by uid 65534");
}

#[test]
fn verbose_says_what_was_decided_in_one_line_and_quiet_says_nothing() {
    let env = TestEnv::new();
    let ran = env.run(["-v", "v", "--", "echo", "x"]);
    assert_one_line(&stderr(&ran), "ran the command");
    let hit = env.run(["v", "-v", "--", "echo", "x"]);
    assert_one_line(&stderr(&hit), "fresh");
    fs::write(env.result_file("v"), "garbage").unwrap();
    let warned = env.run(["v", "--", "echo", "x"]);
    assert_one_line(&stderr(&warned), "ignoring the cached result");
    fs::write(env.result_file("v"), "garbage").unwrap();
    let quiet = env.run(["v", "-q", "--", "echo", "x"]);
    assert_eq!(stderr(&quiet), "");
    assert_eq!(stdout(&quiet), "x\n");
}

#[test]
fn durations_in_every_documented_form_are_accepted() {
    let env = TestEnv::new();
    let forms = [
        ("500ms", 500),
        ("30s", 30_000),
        ("5m", 300_000),
        ("1h", 3_600_000),
        ("1h30m", 5_400_000),
        ("30", 30_000),
        ("0.5", 500),
        ("0", 0),
    ];
    for (ttl, ms) in forms {
        // A result written with this ttl carries it, in milliseconds.
        let _ = fs::remove_file(env.result_file("d"));
        let out = env.run(["d", "--ttl", ttl, "--", "true"]);
        assert_status(&out, 0);
        let shown = env.run(["status", "--json", "d"]);
        let json: serde_json::Value = serde_json::from_slice(&shown.stdout).expect("JSON");
        assert_eq!(json[0]["ttl_ms"], ms, "--ttl {ttl}: {}", stdout(&shown));
    }
}

#[test]
fn global_options_may_come_before_a_verb_but_a_name_may_not() {
    let env = TestEnv::new();
    env.run(["seen", "--", "echo", "x"]);
    let status_out = env.run(["-v", "status", "seen"]);
    assert_status(&status_out, 0);
    assert!(stdout(&status_out).contains("seen"));
    let dir = env.cache.to_str().unwrap();
    let with_dir = env.run(["--cache-dir", dir, "status", "seen"]);
    assert_status(&with_dir, 0);
    let confused = env.run(["seen", "status", "--", "echo", "x"]);
    assert_status(&confused, 2);
    assert!(
        stderr(&confused).contains("cannot be followed by the verb 'status'"),
        "{}",
        stderr(&confused)
    );
}
