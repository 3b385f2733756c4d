//! Where the cache lives: `--cache-dir`, else `SINGLEFLIGHT_CACHE_DIR`, else the platform
//! cache dir + `singleflight` ($XDG_CACHE_HOME or ~/.cache on Linux).
#![cfg(target_os = "linux")]

use crate::common;

use std::path::{Path, PathBuf};

use common::{TestEnv, assert_status, call_args, stdout};

/// `singleflight t -- echo hi` with exactly these cache-related variables set.
fn run_with(env: &TestEnv, vars: &[(&str, &Path)], args: &[&str]) -> std::process::Output {
    let mut command = env.command();
    for var in ["SINGLEFLIGHT_CACHE_DIR", "XDG_CACHE_HOME", "HOME"] {
        command.env_remove(var);
    }
    for (var, value) in vars {
        command.env(var, value);
    }
    let output = command
        .args(call_args("t", args, &["echo", "hi"]))
        .output()
        .expect("singleflight runs");
    assert_status(&output, 0);
    assert_eq!(stdout(&output), "hi\n");
    output
}

fn result_in(dir: &Path) -> PathBuf {
    dir.join("t.result")
}

#[test]
fn xdg_cache_home_is_honoured_when_no_cache_dir_is_set() {
    let env = TestEnv::new();
    let (xdg, home) = (env.path("xdg"), env.path("home"));
    run_with(&env, &[("XDG_CACHE_HOME", &xdg), ("HOME", &home)], &[]);
    assert!(result_in(&xdg.join("singleflight")).is_file());
    assert!(!home.join(".cache").exists(), "~/.cache was used");
}

#[test]
fn without_xdg_cache_home_the_cache_is_under_home() {
    let env = TestEnv::new();
    let home = env.path("home");
    run_with(&env, &[("HOME", &home)], &[]);
    assert!(result_in(&home.join(".cache/singleflight")).is_file());
}

#[test]
fn a_relative_xdg_cache_home_is_ignored() {
    let env = TestEnv::new();
    let home = env.path("home");
    run_with(
        &env,
        &[("XDG_CACHE_HOME", Path::new("rel")), ("HOME", &home)],
        &[],
    );
    assert!(result_in(&home.join(".cache/singleflight")).is_file());
    assert!(
        !env.path("rel").exists(),
        "a relative XDG_CACHE_HOME was used"
    );
}

#[test]
fn the_environment_variable_beats_xdg_cache_home() {
    let env = TestEnv::new();
    let (xdg, mine) = (env.path("xdg"), env.path("mine"));
    run_with(
        &env,
        &[("XDG_CACHE_HOME", &xdg), ("SINGLEFLIGHT_CACHE_DIR", &mine)],
        &[],
    );
    assert!(result_in(&mine).is_file());
    assert!(!xdg.exists(), "XDG_CACHE_HOME was used");
}

#[test]
fn the_option_beats_the_environment_variable() {
    let env = TestEnv::new();
    let (from_env, from_option) = (env.path("env"), env.path("option"));
    let option = from_option.to_str().expect("utf-8 temp path");
    run_with(
        &env,
        &[("SINGLEFLIGHT_CACHE_DIR", &from_env)],
        &["--cache-dir", option],
    );
    assert!(result_in(&from_option).is_file());
    assert!(!from_env.exists(), "SINGLEFLIGHT_CACHE_DIR was used");
    // status and clear look in the same place.
    let listed = env
        .command()
        .env("SINGLEFLIGHT_CACHE_DIR", &from_env)
        .args(["status", "--json", "--cache-dir", option])
        .output()
        .expect("status runs");
    assert_status(&listed, 0);
    assert!(stdout(&listed).contains("\"name\": \"t\""), "{listed:?}");
}
