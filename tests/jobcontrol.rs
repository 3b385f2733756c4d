//! Job control in a real terminal, driven through tmux: a command that reads /dev/tty
//! gets the terminal for the run and the shell gets it back after; Ctrl-Z stops the
//! run with singleflight and `fg` continues both, the stopped time not counting
//! against --timeout. Needs tmux: under CI=true a missing tmux fails.
#![cfg(target_os = "linux")]

use crate::common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{TestEnv, wait_until};

/// A tmux server of the test's own (its own socket) running an interactive bash.
struct Tmux {
    socket: PathBuf,
}

impl Tmux {
    /// `None` (the test skips) where tmux is missing, outside CI.
    fn start(env: &TestEnv) -> Option<Tmux> {
        if Command::new("tmux").arg("-V").output().is_err() {
            common::skip("tmux is not installed");
            return None;
        }
        let tmux = Tmux {
            socket: env.path("tmux.sock"),
        };
        let path = std::env::var("PATH").unwrap_or_default();
        let shell = format!(
            "env -i PATH='{path}' HOME='{home}' TERM=screen SINGLEFLIGHT_CACHE_DIR='{cache}' \
             PS1='$ ' bash --norc --noprofile -i",
            home = env.root().display(),
            cache = env.cache.display(),
        );
        let status = tmux
            .command()
            .args(["new-session", "-d", "-x", "150", "-y", "40", &shell])
            .current_dir(env.root())
            .status()
            .expect("tmux runs");
        assert!(status.success(), "tmux new-session");
        Some(tmux)
    }

    fn command(&self) -> Command {
        let mut command = Command::new("tmux");
        command
            .arg("-S")
            .arg(&self.socket)
            .args(["-f", "/dev/null"]);
        command
    }

    /// Types `keys` (tmux key names: `Enter`, `C-z`) into the terminal.
    fn keys(&self, keys: &[&str]) {
        let status = self
            .command()
            .args(["send-keys", "-t", "0"])
            .args(keys)
            .status()
            .expect("tmux send-keys");
        assert!(status.success(), "tmux send-keys {keys:?}");
    }

    fn screen(&self) -> String {
        let output = self
            .command()
            .args(["capture-pane", "-p", "-t", "0"])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Proves the shell has the terminal: it runs what is typed.
    fn assert_shell_has_the_terminal(&self, env: &TestEnv) {
        let back = env.path("back");
        self.keys(&[&format!("echo back > {}", back.display()), "Enter"]);
        wait_until("the shell runs a command typed after the run", || {
            back.exists()
        });
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.command().arg("kill-server").status();
    }
}

fn state_of(pid: u32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Field `n` after the command name of `/proc/PID/stat` (0: state, 1: ppid, 2: pgrp,
/// 5: the terminal's foreground group).
fn stat_field(pid: u32, n: usize) -> Option<i64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(n)?
        .parse()
        .ok()
}

/// What the processes of a job-control test are doing, for a failure message.
fn job_states(command: u32, singleflight: u32) -> String {
    format!(
        "command {command}: state {:?} pgrp {:?} terminal's group {:?}; \
         singleflight {singleflight}: state {:?} pgrp {:?}",
        state_of(command),
        stat_field(command, 2),
        stat_field(command, 5),
        state_of(singleflight),
        stat_field(singleflight, 2),
    )
}

fn ppid_of(pid: u32) -> u32 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

fn read_pid(file: &Path) -> u32 {
    let mut pid = 0;
    wait_until("the command wrote its pid", || {
        pid = fs::read_to_string(file)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0);
        pid != 0
    });
    pid
}

fn singleflight_line(args: &str) -> String {
    format!("'{}' {args}", env!("CARGO_BIN_EXE_singleflight"))
}

#[test]
fn a_command_that_reads_the_terminal_gets_it_and_the_shell_gets_it_back() {
    let env = TestEnv::new();
    let Some(tmux) = Tmux::start(&env) else {
        return;
    };
    let (pid, out) = (env.path("pid"), env.path("out"));
    let script = format!(
        "echo $$ > {pid}; read x < /dev/tty; echo \"got $x\" > {out}",
        pid = pid.display(),
        out = out.display()
    );
    tmux.keys(&[
        &singleflight_line(&format!("prompt --ttl 0 -- sh -c '{script}'")),
        "Enter",
    ]);
    read_pid(&pid);
    tmux.keys(&["secret", "Enter"]);
    wait_until("the command read what was typed", || {
        fs::read_to_string(&out).is_ok_and(|t| t == "got secret\n")
    });
    tmux.assert_shell_has_the_terminal(&env);
    let screen = tmux.screen();
    assert!(
        !screen.contains("command not found"),
        "the typed answer went to the shell:\n{screen}"
    );
}

#[test]
fn ctrl_z_stops_the_run_with_singleflight_and_fg_continues_both() {
    let env = TestEnv::new();
    let Some(tmux) = Tmux::start(&env) else {
        return;
    };
    let (pid, go, out) = (env.path("pid"), env.path("go"), env.path("out"));
    let script = format!(
        "echo $$ > {pid}; while [ ! -e {go} ]; do sleep 0.05; done; echo finished > {out}",
        pid = pid.display(),
        go = go.display(),
        out = out.display()
    );
    // A --timeout shorter than the time it is held stopped: stopped time does not
    // count, so the run still succeeds. It must also be longer than the time from the
    // run's start to the Ctrl-Z, which a loaded machine stretches: with 4s the test
    // failed now and then in the whole suite, as it does when the run times out before
    // the Ctrl-Z comes (one failure was seen to have timed out so).
    let timeout = Duration::from_secs(15);
    tmux.keys(&[
        &singleflight_line(&format!("jc --ttl 0 --timeout 15s -- sh -c '{script}'")),
        "Enter",
    ]);
    let command = read_pid(&pid);
    let singleflight = ppid_of(command);
    // Ctrl-Z is for the group that holds the terminal: the command's, once singleflight
    // (or the command itself, between fork and exec) has handed it over.
    let start = Instant::now();
    while stat_field(command, 5) != stat_field(command, 2) {
        assert!(
            start.elapsed() < common::PATIENCE,
            "the command's group never got the terminal: {}",
            job_states(command, singleflight)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    tmux.keys(&["C-z"]);
    let start = Instant::now();
    while !(state_of(command) == Some('T') && state_of(singleflight) == Some('T')) {
        assert!(
            start.elapsed() < common::PATIENCE,
            "the command and singleflight were not both stopped: {}\n{}",
            job_states(command, singleflight),
            tmux.screen()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let stopped_at = Instant::now();
    fs::write(&go, "").expect("write go");
    // Held stopped past the timeout: a real wait, bounding nothing but the test's
    // claim that stopped time does not count.
    while stopped_at.elapsed() < timeout + Duration::from_secs(1) {
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            state_of(command),
            Some('T'),
            "the command ran on while stopped"
        );
    }
    assert!(!out.exists(), "the command ran on while stopped");
    tmux.keys(&["fg", "Enter"]);
    wait_until("the run finished after fg", || out.exists());
    wait_until("singleflight exited", || {
        state_of(singleflight).is_none_or(|s| s == 'Z')
    });
    tmux.assert_shell_has_the_terminal(&env);
    let result = fs::read(env.result_file("jc")).unwrap_or_default();
    assert!(
        !result.is_empty(),
        "the run was not cached (timed out?):\n{}",
        tmux.screen()
    );
}
