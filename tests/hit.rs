//! The fresh hit decided before clap (src/hit.rs): it serves exactly what the full
//! path serves, and leaves everything it does not understand to the full path. The
//! full path is the same call with `-v` first, which the fast path never takes.
use crate::common;

use std::fs;
use std::process::Output;

use common::{TestEnv, assert_status, call_args, finish, stderr, stdout};

/// A command whose result has everything a hit serves: bytes without a final
/// newline (and a NUL), a stderr to replay, a non-zero status (`--cache-failures`).
fn command(env: &TestEnv) -> Vec<String> {
    let script = env.script(
        "cmd",
        &format!(
            r#"printf 'out\000put'; echo "warn $SF_X" >&2; echo run >> '{}'; exit 3"#,
            env.counter().display()
        ),
    );
    vec![script.display().to_string()]
}

/// Runs `args` as given and again with `-v` first (the full path); checks that both
/// end alike: the same stdout and status, the same stderr but for `-v`'s own line.
fn same_as_full_path(env: &TestEnv, args: &[String]) -> Output {
    let fast = env.run(args);
    let mut verbose = vec!["-v".to_owned()];
    verbose.extend_from_slice(args);
    let full = env.run(&verbose);
    assert_eq!(fast.stdout, full.stdout, "stdout of {args:?}");
    assert_eq!(fast.status.code(), full.status.code(), "status of {args:?}");
    let full_stderr: String = stderr(&full)
        .lines()
        .filter(|line| !(line.starts_with("singleflight: ") && line.ends_with(": served")))
        .map(|line| format!("{line}\n"))
        .collect();
    assert_eq!(stderr(&fast), full_stderr, "stderr of {args:?}");
    fast.output.clone()
}

#[test]
fn a_fresh_hit_serves_what_the_full_path_serves_however_it_is_spelled() {
    let env = TestEnv::new();
    let cmd = command(&env);
    let first = env.call("hit", &["--ttl", "1h", "--cache-failures"], &cmd);
    assert_status(&first, 3);
    assert_eq!(env.runs(), 1);
    for options in [
        &["--ttl", "1h"][..],
        &["--ttl=1h"],
        &["--ttl", "3600", "--background"],
        &[
            "--ttl",
            "1h",
            "--cache-failures",
            "--timeout",
            "5m",
            "--kill-after=1s",
        ],
        &[
            "--ttl",
            "1h",
            "--max-stale",
            "0",
            "--wait",
            "2s",
            "--retry-after",
            "1s",
        ],
        &[
            "--ttl",
            "1h",
            "--retry-max",
            "1m",
            "--max-output",
            "1MiB",
            "--timeout=off",
        ],
        &["--ttl", "1h", "--no-replay-stderr"],
        &["--ttl", "1h", "--cache-dir", env.cache.to_str().unwrap()],
    ] {
        let out = same_as_full_path(&env, &call_args("hit", options, &cmd));
        assert_status(&out, 3);
        assert_eq!(out.stdout, b"out\0put");
        let replayed = if options.contains(&"--no-replay-stderr") {
            ""
        } else {
            "warn \n"
        };
        assert_eq!(stderr(&out), replayed, "{options:?}");
    }
    // Options before NAME.
    let mut args = vec!["--ttl".to_owned(), "1h".to_owned(), "hit".to_owned()];
    args.push("--".to_owned());
    args.extend(cmd.iter().cloned());
    assert_eq!(same_as_full_path(&env, &args).stdout, b"out\0put");
    // -q (which -v conflicts with): what the call without it serves.
    let quiet = env.call("hit", &["-q", "--ttl", "1h"], &cmd);
    let plain = env.call("hit", &["--ttl", "1h"], &cmd);
    assert_eq!(quiet.output, plain.output);
    assert_eq!(env.runs(), 1, "every call above was a hit");
}

#[test]
fn keyed_hits_are_the_full_paths_and_a_changed_key_is_a_miss() {
    let env = TestEnv::new();
    let cmd = command(&env);
    let file = env.path("input");
    fs::write(&file, "1").unwrap();
    let file = file.display().to_string();
    let options = [
        "--ttl",
        "1h",
        "--cache-failures",
        "--key-cwd",
        "--key-env",
        "SF_X",
        "--key-file",
        &file,
        "--key-env=HOME",
    ];
    let args = call_args("keyed", &options, &cmd);
    let with = |value: &str| {
        let mut command = env.command();
        command.env("SF_X", value).args(&args);
        finish(common::start(&mut command))
    };
    assert_eq!(stderr(&with("a")), "warn a\n");
    assert_eq!(stderr(&with("a")), "warn a\n", "replayed");
    assert_eq!(env.runs(), 1);
    // The same call through both paths.
    let fast = finish(common::start(env.command().env("SF_X", "a").args(&args)));
    let mut verbose = vec!["-v".to_owned()];
    verbose.extend(args.iter().cloned());
    let full = finish(common::start(env.command().env("SF_X", "a").args(&verbose)));
    assert_eq!(fast.stdout, full.stdout);
    assert_eq!(fast.status.code(), full.status.code());
    assert_eq!(env.runs(), 1);
    // Another value of the variable: another slot, a run.
    assert_eq!(stderr(&with("b")), "warn b\n");
    assert_eq!(env.runs(), 2);
    // The key file changed: the result of its old state is not served.
    fs::write(env.path("input"), "2").unwrap();
    assert_eq!(stderr(&with("a")), "warn a\n");
    assert_eq!(env.runs(), 3);
    assert_eq!(stderr(&with("a")), "warn a\n");
    assert_eq!(env.runs(), 3);
}

/// What a fresh hit must not serve, and what it does not understand, is decided by
/// the full path: each case ends as the full path ends it.
#[test]
fn everything_else_falls_back_to_the_full_path() {
    let env = TestEnv::new();
    let cmd = command(&env);
    let hit = |options: &[&str]| env.run(call_args("fb", options, &cmd));
    assert_status(&hit(&["--ttl", "1h", "--cache-failures"]), 3);
    assert_eq!(env.runs(), 1);
    // Usage errors of clap, though a fresh result is there.
    for options in [
        &["--ttl", "1h", "--ttl", "2h"][..],
        &["--ttl", "1h", "--background", "--background"],
        &["--ttl", "1h", "--timeout", "soon"],
        &["--ttl", "1h", "--max-output", "1Q"],
        &["--ttl", "1h", "--bogus"],
        &["--ttl", "1h", "extra"],
        &["--ttl", "1h", "--background", "--exclusive"],
        &["--ttl", "1h", "-q", "-v"],
        &["--ttl", "1h", "--start-limit", "3"],
    ] {
        let out = hit(options);
        assert_status(&out, 2);
        assert!(out.stdout.is_empty(), "{options:?}: {}", stdout(&out));
    }
    // No `--`: clap's usage error, with the advice.
    let mut args = vec!["fb".to_owned(), "--ttl".to_owned(), "1h".to_owned()];
    args.extend(cmd.iter().cloned());
    let out = env.run(&args);
    assert_status(&out, 2);
    assert!(
        stderr(&out).contains("put the command after `--`"),
        "{}",
        stderr(&out)
    );
    assert_eq!(env.runs(), 1);
    // The fleet's variables: the fleet decides (here, cannot be reached), or clap refuses.
    let args = call_args("fb", &["--ttl", "1h"], &cmd);
    let out = finish(common::start(
        env.command()
            .env("SINGLEFLIGHT_BACKEND", "etcd://127.0.0.1:9")
            .args(["--backend-timeout", "200ms"])
            .args(&args),
    ));
    #[cfg(feature = "etcd")]
    assert_status(&out, 125);
    #[cfg(not(feature = "etcd"))]
    assert_status(&out, 2);
    let out = finish(common::start(
        env.command()
            .env("SINGLEFLIGHT_ETCD_CERT", "c.pem")
            .args(&args),
    ));
    assert_status(&out, 2);
    let out = finish(common::start(
        env.command().env("SINGLEFLIGHT_CACHE_DIR", "").args(&args),
    ));
    assert_status(&out, 2);
    assert_eq!(env.runs(), 1);
    // Verbs still work.
    let out = env.run(["status", "fb"]);
    assert_status(&out, 0);
    assert!(stdout(&out).contains("fb"), "{}", stdout(&out));
    // A stdin key: another slot, a run.
    assert_status(&hit(&["--ttl", "1h", "--key-stdin", "--cache-failures"]), 3);
    assert_eq!(env.runs(), 2);
    // Stale by this call's --ttl: a run.
    assert_status(&hit(&["--ttl", "0", "--cache-failures"]), 3);
    assert_eq!(env.runs(), 3);
    // Another command under the NAME: a run, with the full path's warning.
    let other = env.run(call_args("fb", &["--ttl", "1h"], &["echo", "other"]));
    assert_status(&other, 0);
    assert_eq!(stdout(&other), "other\n");
    assert!(
        stderr(&other).contains("another command"),
        "{}",
        stderr(&other)
    );
    // A damaged result is never served: the full path warns and runs.
    let ok = env.script(
        "ok",
        &format!("echo ok; echo run >> '{}'", env.counter().display()),
    );
    let ok = [ok.display().to_string()];
    let served = |runs: usize| {
        let out = env.call("damaged", &["--ttl", "1h"], &ok);
        assert_status(&out, 0);
        assert_eq!(stdout(&out), "ok\n");
        assert_eq!(env.runs(), runs);
        out
    };
    served(4);
    served(4);
    let path = env.result_file("damaged");
    let mut bytes = fs::read(&path).unwrap();
    let at = bytes.len() - 3;
    bytes[at] ^= 0x20;
    fs::write(&path, &bytes).unwrap();
    let out = served(5);
    assert!(
        stderr(&out).contains("ignoring the cached result"),
        "{}",
        stderr(&out)
    );
    // Cut short: the same.
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
    served(6);
    served(6);
}

/// A fleet hit from the machine's copy (`NAME.fleet`) is decided before clap too: it
/// serves what the full path serves however the fleet options are spelled, and
/// leaves to the full path what clap or the backend would refuse together.
#[cfg(all(unix, feature = "etcd"))]
#[test]
fn a_fleet_hit_from_the_copy_is_the_full_paths() {
    let Some(etcd) = common::etcd::Etcd::start() else {
        return;
    };
    let env = TestEnv::new();
    let script = env.script(
        "fleet",
        &format!(
            r#"printf 'out\000put'; echo warn >&2; echo run >> '{}'"#,
            env.counter().display()
        ),
    );
    let cmd = [script.display().to_string()];
    let url = etcd.url();
    let fleet = |options: &[&str]| {
        let mut args: Vec<String> = options.iter().map(|o| o.to_string()).collect();
        args.extend(call_args("fh", &["--ttl", "1h"], &cmd));
        args
    };
    assert_status(&env.run(fleet(&["--backend", &url])), 0);
    assert!(env.cache.join("fh.fleet").is_file(), "the run kept a copy");
    for options in [
        &["--backend", &url][..],
        &[&format!("--backend={url}")],
        &["--backend", &url, "--etcd-prefix", "/singleflight"],
        &[
            "--backend",
            &url,
            "--backend-timeout",
            "1s",
            "--lease-ttl=5s",
        ],
    ] {
        let out = same_as_full_path(&env, &fleet(options));
        assert_status(&out, 0);
        assert_eq!(out.stdout, b"out\0put", "{options:?}");
        assert_eq!(stderr(&out), "warn\n", "{options:?}");
    }
    let from_env = finish(common::start(
        env.command()
            .env("SINGLEFLIGHT_BACKEND", &url)
            .args(call_args("fh", &["--ttl", "1h"], &cmd)),
    ));
    assert_status(&from_env, 0);
    assert_eq!(from_env.stdout, b"out\0put");
    assert_eq!(env.runs(), 1, "every hit was served from the copy or etcd");
    // What clap or the backend refuses is refused, though a fresh copy is there.
    for options in [
        &["--backend", &url, "--etcd-cacert", "ca.pem"][..],
        &["--backend", &url, "--etcd-user", "u"],
        &["--backend", &url, "--etcd-cert", "c.pem"],
        &["--backend", &url, "--etcd-password-file", "p"],
        &["--backend", &url, "--etcd-prefix", ""],
        &["--backend", &url, "--lease-ttl", "2h"],
    ] {
        let out = env.run(fleet(options));
        assert_status(&out, 2);
        assert!(out.stdout.is_empty(), "{options:?}: {}", stdout(&out));
    }
    // Another prefix is another result: a run.
    let other = env.run(fleet(&["--backend", &url, "--etcd-prefix", "/other/"]));
    assert_status(&other, 0);
    assert_eq!(env.runs(), 2);
}

/// A hit from the fleet copy sends nothing to etcd, so it reads none of the TLS and
/// password files: a CA file gone is reported by the first call that asks etcd (here
/// the full path, `-v`), not by the hit. (This is what tells the hit before clap from
/// the full path, which opens the backend first.)
#[cfg(all(unix, feature = "etcd"))]
#[test]
fn a_hit_from_the_fleet_copy_reads_no_tls_file() {
    use common::etcd::{Etcd, Options};
    let Some(etcd) = Etcd::with(1, Options::secure()) else {
        return;
    };
    let env = TestEnv::new();
    let ca = env.path("ca.pem");
    fs::copy(&etcd.certs().expect("TLS is on").ca, &ca).expect("copy the CA");
    let call = |verbose: bool| {
        let mut command = env.command();
        command
            .envs(etcd.client_env())
            .env("SINGLEFLIGHT_ETCD_CACERT", &ca);
        if verbose {
            command.arg("-v");
        }
        command.args(["--backend", &etcd.url()]).args(call_args(
            "tls",
            &["--ttl", "1h"],
            &["echo", "cached"],
        ));
        finish(common::start(&mut command))
    };
    assert_status(&call(false), 0);
    assert!(env.cache.join("tls.fleet").is_file(), "the run kept a copy");
    fs::remove_file(&ca).expect("remove the CA");
    let hit = call(false);
    assert_status(&hit, 0);
    assert_eq!(stdout(&hit), "cached\n");
    let full = call(true);
    assert_status(&full, 125);
    assert!(stderr(&full).contains("ca.pem"), "{}", stderr(&full));
}
