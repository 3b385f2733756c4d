//! The fleet backend end to end (issue 7): the real binary on several "machines" (each
//! its own cache dir) against a real etcd (Debian's etcd-server on loopback ports):
//! one run per NAME fleet-wide, the lease lost mid-run, a cluster that loses its
//! leader during a herd, fencing tokens, an etcd that is down, status and clear.
//!
//! Without `/usr/bin/etcd` the tests that need one print `SKIPPED: etcd not installed`
//! and return; in CI (`CI` set) that is a failure.
#![cfg(target_os = "linux")]

use crate::common;

#[cfg(feature = "etcd")]
use std::fs;
#[cfg(feature = "etcd")]
use std::net::TcpListener;
#[cfg(feature = "etcd")]
use std::path::PathBuf;
use std::process::{Child, Command, Output};
#[cfg(feature = "etcd")]
use std::time::Instant;

#[cfg(feature = "etcd")]
use common::etcd::{Etcd, Options};
#[cfg(feature = "etcd")]
use common::stdout;
#[cfg(feature = "etcd")]
use common::{PATIENCE, alive, call_args, marker, status, wait_until};
use common::{TestEnv, assert_status, finish, stderr};
#[cfg(feature = "etcd")]
use serde_json::Value;

/// One machine of the fleet: its own cache dir, the shared etcd as its backend.
struct Machine {
    env: TestEnv,
    backend: String,
    /// The TLS files and login of a secured etcd, as environment variables.
    vars: Vec<(&'static str, std::ffi::OsString)>,
}

impl Machine {
    fn new(backend: &str) -> Machine {
        Machine {
            env: TestEnv::new(),
            backend: backend.to_owned(),
            vars: Vec::new(),
        }
    }

    /// A machine that uses `etcd` with the TLS files and login it needs.
    #[cfg(feature = "etcd")]
    fn of(etcd: &Etcd) -> Machine {
        Machine {
            vars: etcd.client_env(),
            ..Machine::new(&etcd.url())
        }
    }

    fn command(&self) -> Command {
        let mut command = self.env.command();
        command.env("SINGLEFLIGHT_BACKEND", &self.backend);
        command.envs(self.vars.iter().map(|(k, v)| (k, v)));
        command
    }

    fn spawn<I: IntoIterator<Item = S>, S: AsRef<std::ffi::OsStr>>(&self, args: I) -> Child {
        common::start(self.command().args(args))
    }

    fn run<I: IntoIterator<Item = S>, S: AsRef<std::ffi::OsStr>>(&self, args: I) -> Output {
        finish(self.spawn(args))
    }

    /// `status --json NAME...` as JSON, or `None` when status exits 1 (no such NAME).
    #[cfg(feature = "etcd")]
    fn status_json(&self, names: &[&str]) -> Option<Vec<Value>> {
        let out = self.run(["status", "--json"].iter().chain(names));
        match status(&out) {
            0 => Some(serde_json::from_slice(&out.stdout).expect("status --json is JSON")),
            1 => None,
            other => panic!("status exited {other}: {}", stderr(&out)),
        }
    }
}

/// A dir shared by every machine: the run counter, gates, the overlap detector.
#[cfg(feature = "etcd")]
struct Shared {
    dir: tempfile::TempDir,
}

#[cfg(feature = "etcd")]
impl Shared {
    fn new() -> Shared {
        Shared {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn counter(&self) -> PathBuf {
        self.path("runs")
    }

    fn lines(&self, file: &str) -> Vec<String> {
        std::fs::read_to_string(self.path(file))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn runs(&self) -> usize {
        self.lines("runs").len()
    }
}

/// Asserts that a call exited 0 and printed `expected`; its stderr says why not.
#[cfg(feature = "etcd")]
#[track_caller]
fn assert_served(out: &Output, expected: &str) {
    assert_eq!(
        (status(out), stdout(out).as_str()),
        (0, expected),
        "{}",
        stderr(out)
    );
}

/// A loopback port with nothing listening on it (bound, then released).
#[cfg(feature = "etcd")]
fn dead_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    listener.local_addr().expect("bound address").port()
}

#[cfg(feature = "etcd")]
#[test]
fn with_etcd_down_a_caller_exits_125_at_once_and_never_runs_the_command() {
    let shared = Shared::new();
    let backend = format!("etcd://127.0.0.1:{}", dead_port());
    let machine = Machine::new(&backend);
    let script = format!("echo run >> '{}'; echo hi", shared.counter().display());
    // Nothing cached anywhere, and a result in the local cache dir is not the fleet's.
    let local = machine.env.run(["down", "--", "sh", "-c", &script]);
    assert_eq!(stdout(&local), "hi\n", "{}", stderr(&local));
    assert_eq!(shared.runs(), 1);

    for args in [
        vec!["down", "--", "sh", "-c", &script],
        vec!["--background", "down", "--", "sh", "-c", &script],
        vec!["status"],
        vec!["clear", "down"],
    ] {
        // `finish` fails the test if it does not return within PATIENCE.
        let out = machine.run(&args);
        assert_status(&out, 125);
        let said = stderr(&out);
        assert!(said.contains("etcd unreachable"), "{args:?}: {said}");
        assert!(
            said.contains(&backend["etcd://".len()..]),
            "names it: {said}"
        );
        assert_eq!(stdout(&out), "", "{args:?}: nothing served");
    }
    let out = machine.run(["down", "--", "sh", "-c", &script]);
    assert!(
        stderr(&out).contains("; the command was not run"),
        "{}",
        stderr(&out)
    );
    assert_eq!(shared.runs(), 1, "the command never ran without the lock");
}

#[cfg(feature = "etcd")]
#[test]
fn a_frozen_etcd_ends_a_call_after_the_backend_timeout_with_125() {
    let Some(etcd) = Etcd::start() else { return };
    let shared = Shared::new();
    let machine = Machine::new(&etcd.url());
    let script = format!("echo run >> '{}'; echo hi", shared.counter().display());
    let args = [
        "--backend-timeout",
        "500ms",
        "frozen",
        "--",
        "sh",
        "-c",
        &script,
    ];
    assert_eq!(stdout(&machine.run(args)), "hi\n");
    etcd.pause(0);
    let started = Instant::now();
    let out = machine.run(["--ttl", "0"].iter().chain(&args));
    etcd.resume(0);
    eprintln!(
        "a call to a frozen etcd returned after {:?}",
        started.elapsed()
    );
    assert_status(&out, 125);
    assert!(
        stderr(&out).contains("no answer within 500ms"),
        "{}",
        stderr(&out)
    );
    assert_eq!(shared.runs(), 1);
}

#[cfg(feature = "etcd")]
#[test]
fn a_herd_of_sixty_callers_on_three_machines_runs_the_command_once() {
    let Some(etcd) = Etcd::start() else { return };
    herd_of_sixty(&etcd);
}

/// Over TLS with a login and the default `--backend-timeout` (2s), nothing kept yet:
/// one caller per machine logs in while the others wait for its token (issue 23).
/// Were each of the sixty to log in, etcd would check sixty passwords (bcrypt) at
/// once, and most callers would give up on it (125, "no answer within 2s").
#[cfg(feature = "etcd")]
#[test]
fn a_herd_over_tls_with_a_login_runs_the_command_once() {
    let options = Options {
        debug_log: true,
        ..Options::secure()
    };
    let Some(etcd) = Etcd::with(1, options) else {
        return;
    };
    herd_of_sixty(&etcd);
    assert!(
        etcd.logins() <= 3,
        "one login per machine, not {}",
        etcd.logins()
    );
}

/// 3 machines × 20 callers, nothing cached: one run; the 59 others wait for it by a
/// watch on the lock key (each one a watcher in etcd before the run may end), are
/// woken by the release and served its result. A caller that ends early opens the
/// gate at once, and the failure counts how many were not served, and why.
#[cfg(feature = "etcd")]
fn herd_of_sixty(etcd: &Etcd) {
    let shared = Shared::new();
    let machines: Vec<Machine> = (0..3).map(|_| Machine::of(etcd)).collect();
    let gate = shared.path("gate");
    let script = format!(
        "echo run >> '{}'; while [ ! -e '{}' ]; do sleep 0.01; done; echo herd-output",
        shared.counter().display(),
        gate.display()
    );
    // --wait as long as the timeout (1h): a waiter that is not woken hangs the test.
    let args = call_args("herd", &["--timeout", "1h"], &["sh", "-c", &script]);
    let mut callers: Vec<Child> = machines
        .iter()
        .flat_map(|machine| (0..20).map(|_| machine.spawn(&args)))
        .collect();
    wait_until("the run started, or a caller ended", || {
        shared.runs() == 1 || ended(&mut callers)
    });
    wait_until("the 59 others watch the lock, or a caller ended", || {
        ended(&mut callers) || etcd.metric(0, "etcd_debugging_mvcc_watcher_total") == Some(59.0)
    });
    fs::write(&gate, "").unwrap();
    let outs: Vec<Output> = callers.into_iter().map(finish).collect();
    let unserved: Vec<&Output> = outs
        .iter()
        .filter(|out| (status(out), stdout(out).as_str()) != (0, "herd-output\n"))
        .collect();
    assert!(
        unserved.is_empty(),
        "{} of 60 not served ({} exited 125), etcd logins: {:?}; the first said: {}",
        unserved.len(),
        unserved.iter().filter(|out| status(out) == 125).count(),
        etcd.logins_if_logged(),
        stderr(unserved[0])
    );
    assert_eq!(shared.runs(), 1, "one run across the three machines");
    for machine in &machines {
        assert!(
            !machine.env.result_file("herd").exists(),
            "the result lives in etcd, not in a cache dir"
        );
    }
    wait_until("the watches are gone", || {
        etcd.metric(0, "etcd_debugging_mvcc_watcher_total") == Some(0.0)
    });
}

/// Whether any of `callers` has exited.
#[cfg(feature = "etcd")]
fn ended(callers: &mut [Child]) -> bool {
    callers
        .iter_mut()
        .any(|caller| caller.try_wait().expect("try_wait a caller").is_some())
}

#[cfg(feature = "etcd")]
#[test]
fn losing_the_lease_mid_run_kills_the_tree_and_stores_nothing() {
    let Some(etcd) = Etcd::start() else { return };
    lose_the_lease(&etcd, 3);
}

/// The same over TLS with a login, and etcd's shortest lease: the keeper's renewals
/// are authenticated, and 2s is short enough to lose.
#[cfg(feature = "etcd")]
#[test]
fn losing_a_two_second_lease_over_tls_with_a_login_kills_the_tree() {
    let Some(etcd) = Etcd::with(1, Options::secure()) else {
        return;
    };
    lose_the_lease(&etcd, 2);
}

/// etcd freezes mid-run: with a lease of `ttl` seconds, the tree is killed and nothing
/// is stored; once etcd is back the lock is free.
#[cfg(feature = "etcd")]
fn lose_the_lease(etcd: &Etcd, ttl: u64) {
    let shared = Shared::new();
    let machine = Machine::of(etcd);
    let mark = marker();
    // A tree that ignores SIGTERM: only the SIGKILL after --kill-after ends it.
    let script = format!(
        "trap '' TERM; echo run >> '{}'; sleep {mark} & sleep {mark}; wait",
        shared.counter().display()
    );
    let kill_after = 1;
    let run = machine.spawn([
        "--lease-ttl",
        &format!("{ttl}s"),
        "lose",
        "--kill-after",
        &format!("{kill_after}s"),
        "--timeout",
        "10m",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    let sleepers = || {
        let sleeping = |pid: &u32| {
            fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.starts_with(b"sleep\0"))
        };
        alive(&mark).iter().filter(|pid| sleeping(pid)).count()
    };
    wait_until("the run started", || shared.runs() == 1 && sleepers() == 2);

    etcd.pause(0);
    let paused = Instant::now();
    let out = finish(run);
    wait_until("the tree is dead", || alive(&mark).is_empty());
    eprintln!(
        "tree dead and singleflight exited {:?} after etcd froze (lease ttl {ttl}s, \
         kill-after {kill_after}s)",
        paused.elapsed()
    );
    // etcd is still frozen: the tree died because the lease was lost, not on an answer.
    assert_status(&out, 125);
    assert!(
        stderr(&out).contains("lost the fleet lock mid-run")
            && stderr(&out).contains("nothing was stored"),
        "{}",
        stderr(&out)
    );
    assert_eq!(stdout(&out), "");

    etcd.resume(0);
    // The lease expires in etcd too; then nothing is left of the run: no result, no
    // failure record, no lock.
    wait_until("the lock is released", || {
        machine.status_json(&["lose"]).is_none()
    });
    let out = machine.run(["lose", "--", "echo", "back"]);
    assert_served(&out, "back\n");
    assert_eq!(shared.runs(), 1);
}

#[cfg(feature = "etcd")]
#[test]
fn fencing_tokens_strictly_increase_across_runs_on_any_machine() {
    let Some(etcd) = Etcd::start() else { return };
    let machines: Vec<Machine> = (0..2).map(|_| Machine::new(&etcd.url())).collect();
    let print = ["sh", "-c", "echo \"${SINGLEFLIGHT_FENCING_TOKEN-unset}\""];
    let mut tokens = Vec::new();
    for i in 0..6 {
        // A refresh in the background gets one too (read back from the result).
        let options: &[&str] = if i == 3 {
            &["--ttl", "0", "--background"]
        } else {
            &["--ttl", "0"]
        };
        let args = call_args("fence", options, &print);
        let machine = &machines[i % 2];
        let written = |machine: &Machine| {
            machine
                .status_json(&["fence"])
                .filter(|s| s[0]["in_flight"] == false)
                .map(|s| s[0]["written_at_ms"].clone())
        };
        let before = written(machine);
        let out = machine.run(&args);
        assert_status(&out, 0);
        if i == 3 {
            wait_until("the refresh ran", || {
                written(machine).is_some_and(|now| Some(now) != before)
            });
            let refreshed = machine.run(["fence", "--ttl", "1h", "--"].iter().chain(&print));
            tokens.push(stdout(&refreshed).trim().to_owned());
        } else {
            tokens.push(stdout(&out).trim().to_owned());
        }
    }
    let numbers: Vec<i64> = tokens
        .iter()
        .map(|t| t.parse().unwrap_or_else(|_| panic!("a number: {tokens:?}")))
        .collect();
    assert!(
        numbers.windows(2).all(|pair| pair[0] < pair[1]),
        "strictly increasing: {numbers:?}"
    );
    // The cache dir backend has no token to give.
    let local = machines[0].env.run(["local", "--"].iter().chain(&print));
    assert_eq!(stdout(&local), "unset\n");
}

#[cfg(feature = "etcd")]
#[test]
fn a_cluster_that_loses_its_leader_during_a_herd_never_runs_twice_at_once() {
    let Some(etcd) = Etcd::cluster(3) else {
        return;
    };
    leader_dies_during_a_herd(etcd);
}

#[cfg(feature = "etcd")]
#[test]
fn a_tls_cluster_with_a_login_that_loses_its_leader_during_a_herd_never_runs_twice() {
    let Some(etcd) = Etcd::with(3, Options::secure()) else {
        return;
    };
    leader_dies_during_a_herd(etcd);
}

/// Rounds of 3 machines × 4 callers; during the third round's run the leader is
/// SIGKILLed: never two runs at once, runs go on after, every caller served or 125.
#[cfg(feature = "etcd")]
fn leader_dies_during_a_herd(mut etcd: Etcd) {
    let leader = etcd.wait_leader();
    let shared = Shared::new();
    let machines: Vec<Machine> = (0..3).map(|_| Machine::of(&etcd)).collect();
    let (busy, hold) = (shared.path("busy"), shared.path("hold"));
    // mkdir is atomic: a run that finds the dir of another run overlaps it. While
    // `hold` exists a run stays in flight, so that the leader dies during one.
    let script = format!(
        "mkdir '{busy}' 2>/dev/null || echo OVERLAP >> '{overlaps}'; echo run >> '{runs}'; \
         trap \"rmdir '{busy}'; exit 143\" TERM; while [ -e '{hold}' ]; do sleep 0.01; done; \
         sleep 0.2; rmdir '{busy}'; echo out",
        busy = busy.display(),
        hold = hold.display(),
        overlaps = shared.path("overlaps").display(),
        runs = shared.counter().display()
    );
    let args = [
        "cluster",
        "--ttl",
        "0",
        "--timeout",
        "20s",
        "--",
        "sh",
        "-c",
        &script,
    ];
    let (mut served, mut refused) = (0, 0);
    let mut runs_when_killed = None;
    for round in 0..6 {
        if round == 2 {
            fs::write(&hold, "").expect("write");
        }
        let callers: Vec<Child> = machines
            .iter()
            .flat_map(|machine| (0..4).map(|_| machine.spawn(args)))
            .collect();
        if round == 2 {
            wait_until("a run is in flight", || busy.exists());
            etcd.kill(leader);
            runs_when_killed = Some(shared.runs());
            fs::remove_file(&hold).expect("remove");
        }
        for caller in callers {
            let out = finish(caller);
            match status(&out) {
                0 => {
                    assert_eq!(stdout(&out), "out\n");
                    served += 1;
                }
                // A clear error: no member answered in time (during the election).
                125 if stderr(&out).contains("etcd") => refused += 1,
                other => panic!("exit {other}: {}", stderr(&out)),
            }
        }
    }
    let runs = shared.runs();
    eprintln!(
        "{served} callers served, {refused} refused with 125, {runs} runs; leader was member \
         {leader}, killed after {runs_when_killed:?} runs"
    );
    assert_eq!(
        shared.lines("overlaps"),
        Vec::<String>::new(),
        "no two runs at once"
    );
    assert!(
        runs > runs_when_killed.unwrap(),
        "runs went on after the leader died ({runs} in all)"
    );
    assert!(served > 0);
}

#[cfg(feature = "etcd")]
#[test]
fn status_and_clear_see_the_fleet_from_any_machine() {
    let Some(etcd) = Etcd::start() else { return };
    let shared = Shared::new();
    let (a, b) = (Machine::new(&etcd.url()), Machine::new(&etcd.url()));
    assert_eq!(stdout(&a.run(["ok", "--", "echo", "hi"])), "hi\n");
    let failing = a.run(["failing", "--", "sh", "-c", "echo oops >&2; exit 3"]);
    assert_status(&failing, 3);
    let gate = shared.path("gate");
    let held = format!(
        "while [ ! -e '{}' ]; do sleep 0.01; done; echo done",
        gate.display()
    );
    let running = a.spawn(["running", "--", "sh", "-c", &held]);
    wait_until("the run is in flight", || {
        b.status_json(&["running"])
            .is_some_and(|s| s[0]["in_flight"] == true)
    });

    // Machine B has nothing in its cache dir: all it shows comes from etcd.
    let all = b.status_json(&[]).expect("names in etcd");
    let names: Vec<&str> = all.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["failing", "ok", "running"]);
    let (failed, ok, in_flight) = (&all[0], &all[1], &all[2]);
    assert_eq!(ok["state"], "fresh");
    assert_eq!(ok["size_bytes"], 3);
    assert_eq!(ok["command"], "echo hi");
    assert_eq!(failed["state"], "none");
    assert_eq!(failed["last_failure"]["exit_code"], 3);
    assert!(
        failed["last_failure"]["stderr_tail"]
            .as_str()
            .unwrap()
            .contains("oops")
    );
    assert_eq!(in_flight["pid"], running.id());
    let host = fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let host = host.trim();
    assert_eq!(in_flight["host"], host);
    let table = stdout(&b.run(["status", "running"]));
    assert!(
        table.contains(&format!("{}@{host}", running.id())),
        "{table}"
    );

    // Another prefix is another fleet.
    let other = b.run(["--etcd-prefix", "/elsewhere", "status", "--json"]);
    assert_eq!(stdout(&other).trim(), "[]");

    // clear from B: ok's result is gone for A too, and A runs it again.
    let out = b.run(["clear", "-v", "ok", "failing"]);
    assert_eq!(
        stderr(&out),
        "singleflight: ok: cleared (result)\nsingleflight: failing: cleared (failure record)\n"
    );
    assert!(b.status_json(&["ok"]).is_none());
    let counted = format!("echo run >> '{}'; echo hi", shared.counter().display());
    assert_eq!(stdout(&a.run(["ok", "--", "sh", "-c", &counted])), "hi\n");
    assert_eq!(shared.runs(), 1);

    // clear waits for the run in flight on A, then removes what it stored.
    let said = shared.path("clear.stderr");
    let mut clear = b
        .command()
        .args(["clear", "running"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(fs::File::create(&said).unwrap())
        .spawn()
        .unwrap();
    wait_until("clear says it waits", || {
        fs::read_to_string(&said)
            .unwrap_or_default()
            .contains("waiting")
    });
    assert!(
        clear.try_wait().unwrap().is_none(),
        "clear returned during the run"
    );
    fs::write(&gate, "").unwrap();
    assert_eq!(stdout(&finish(running)), "done\n");
    let start = Instant::now();
    while clear.try_wait().unwrap().is_none() {
        assert!(start.elapsed() < PATIENCE, "clear did not end");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(clear.wait().unwrap().code(), Some(0));
    assert!(
        b.status_json(&["running"]).is_none(),
        "the run's result was cleared after it"
    );

    // --older-than prunes the cache dir's files: a usage error with etcd, one line,
    // and nothing cleared.
    let out = b.run(["clear", "--older-than", "1s", "ok"]);
    assert_status(&out, 2);
    assert_eq!(
        stderr(&out),
        "singleflight: clear --older-than works on the cache dir and PostgreSQL only, not with an etcd --backend\n"
    );
    assert_eq!(
        b.status_json(&["ok"]).expect("ok is kept")[0]["state"],
        "fresh"
    );

    let out = a.run(["clear", "--all"]);
    assert_status(&out, 0);
    assert_eq!(
        b.status_json(&[]).expect("an empty array"),
        Vec::<Value>::new()
    );
}

#[cfg(feature = "etcd")]
#[test]
fn a_background_refresh_across_machines_starts_one_refresher_and_serves_stale_at_once() {
    let Some(etcd) = Etcd::start() else { return };
    let shared = Shared::new();
    let machines: Vec<Machine> = (0..3).map(|_| Machine::new(&etcd.url())).collect();
    let (version, gate) = (shared.path("version"), shared.path("gate"));
    let script = format!(
        "echo run >> '{runs}'; while [ ! -e '{gate}' ]; do sleep 0.01; done; cat '{version}'",
        runs = shared.counter().display(),
        gate = gate.display(),
        version = version.display()
    );
    let args = [
        "--background",
        "bg",
        "--ttl",
        "1s",
        "--",
        "sh",
        "-c",
        &script,
    ];
    fs::write(&version, "v1\n").unwrap();
    fs::write(&gate, "").unwrap();
    let out = machines[0].run(args);
    assert_eq!(
        stdout(&out),
        "v1\n",
        "nothing cached: waits for the refresh"
    );
    wait_until("v1 goes stale", || {
        machines[0]
            .status_json(&["bg"])
            .is_some_and(|s| s[0]["state"] == "stale")
    });

    fs::write(&version, "v2\n").unwrap();
    fs::remove_file(&gate).unwrap();
    // The gate is closed: these return only because they do not wait for the refresh.
    let callers: Vec<Child> = machines
        .iter()
        .flat_map(|machine| (0..5).map(|_| machine.spawn(args)))
        .collect();
    for caller in callers {
        let out = finish(caller);
        assert_served(&out, "v1\n");
    }
    wait_until("the refresh started", || shared.runs() == 2);
    let in_flight = machines[1].status_json(&["bg"]).unwrap();
    assert_eq!(in_flight[0]["in_flight"], true, "{in_flight:?}");
    fs::write(&gate, "").unwrap();
    wait_until("the refresh ended", || {
        machines[1]
            .status_json(&["bg"])
            .is_some_and(|s| s[0]["in_flight"] == false)
    });
    let out = machines[2].run(["bg", "--ttl", "1h", "--", "sh", "-c", &script]);
    assert_eq!(stdout(&out), "v2\n", "{}", stderr(&out));
    assert_eq!(shared.runs(), 2, "one refresh for fifteen stale callers");
}

/// A good run after a failed one forgets the failure record (in the transaction that
/// stores its result and lets go of the lock), for every machine.
#[cfg(feature = "etcd")]
#[test]
fn a_good_run_after_a_failed_one_forgets_the_failure_on_every_machine() {
    let Some(etcd) = Etcd::start() else { return };
    let shared = Shared::new();
    let (a, b) = (Machine::new(&etcd.url()), Machine::new(&etcd.url()));
    let broken = shared.path("broken");
    let script = format!(
        "if [ -e '{}' ]; then echo broken >&2; exit 3; fi; echo fine",
        broken.display()
    );
    let call = [
        "flaky",
        "--ttl",
        "0",
        "--retry-after",
        "0",
        "--",
        "sh",
        "-c",
        &script,
    ];
    let last_failure =
        || b.status_json(&["flaky"]).expect("flaky is in etcd")[0]["last_failure"].clone();
    fs::write(&broken, "").unwrap();
    assert_status(&a.run(call), 3);
    assert_eq!(last_failure()["exit_code"], 3);
    fs::remove_file(&broken).unwrap();
    assert_eq!(stdout(&a.run(call)), "fine\n");
    assert_eq!(
        last_failure(),
        Value::Null,
        "the good run forgot the failure"
    );
}

#[cfg(feature = "etcd")]
#[test]
fn a_result_over_the_etcd_limit_is_refused_not_truncated() {
    let Some(etcd) = Etcd::start() else { return };
    let machine = Machine::new(&etcd.url());
    assert_eq!(
        stdout(&machine.run(["big", "--", "echo", "small"])),
        "small\n"
    );
    let big = [
        "big",
        "--ttl",
        "0",
        "--",
        "head",
        "-c",
        "2000000",
        "/dev/zero",
    ];
    let out = machine.run(big);
    assert_status(&out, 125);
    assert!(
        stderr(&out).contains("etcd backend's limit of 1.0MiB"),
        "{}",
        stderr(&out)
    );
    // The run was stopped at the cap (not buffered whole, not truncated into etcd),
    // and the last good result of `big` is still there.
    let status_now = machine.status_json(&["big"]).unwrap();
    let failure = &status_now[0]["last_failure"];
    assert!(
        failure["reason"]
            .as_str()
            .unwrap()
            .contains("etcd backend's limit"),
        "{failure}"
    );
    assert_eq!(status_now[0]["size_bytes"], 6, "small\\n is kept");
    let printed = out.stdout.len() as u64;
    assert!(
        printed > 0 && printed < 1 << 20,
        "the run's own output up to the cap: {printed} bytes"
    );
}

#[cfg(not(feature = "etcd"))]
#[test]
fn without_the_etcd_feature_a_backend_is_a_usage_error() {
    let machine = Machine::new("etcd://127.0.0.1:2379");
    let out = machine.run(["x", "--", "echo", "hi"]);
    assert_status(&out, 2);
    assert!(
        stderr(&out).contains("built without the etcd backend"),
        "{}",
        stderr(&out)
    );
}

#[cfg(not(feature = "postgres"))]
#[test]
fn without_the_postgres_feature_a_postgres_backend_is_a_usage_error() {
    let machine = Machine::new("postgresql://app@127.0.0.1:5432/app");
    let out = machine.run(["x", "--", "echo", "hi"]);
    assert_status(&out, 2);
    assert!(
        stderr(&out).contains("built without the PostgreSQL backend"),
        "{}",
        stderr(&out)
    );
}

/// A run stopped by a signal gives its etcd lock back on the way out: the next caller
/// wins at once, not when the lease runs out (a 1h lease here, so a lock left to the
/// lease would make the next caller wait and give up).
#[cfg(feature = "etcd")]
#[test]
fn a_run_stopped_by_a_signal_releases_its_etcd_lock_at_once() {
    let Some(etcd) = Etcd::start() else { return };
    let machine = Machine::new(&etcd.url());
    let started = machine.env.path("started");
    let script = format!("touch {}; sleep {}", started.display(), marker());
    let args = ["sig", "--lease-ttl", "1h", "--", "sh", "-c", &script];
    let runner = machine.spawn(args);
    wait_until("the command started", || started.exists());
    // SAFETY: kill(2) on the pid of a child we have not waited for.
    assert_eq!(unsafe { libc::kill(runner.id() as i32, libc::SIGTERM) }, 0);
    let out = finish(runner);
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&out.status),
        Some(15),
        "{}",
        stderr(&out)
    );
    let next = machine.run(["sig", "--wait", "2s", "--", "echo", "next"]);
    assert_served(&next, "next\n");
}

/// A caller that cannot be trusted by etcd, or cannot trust it, exits 125 with one
/// line saying why, and the command never runs: a CA that did not sign the server's
/// certificate, no CA (Mozilla's roots do not have the test CA), no client certificate
/// where etcd asks for one, a wrong password, no login, plain HTTP to a TLS port.
#[cfg(feature = "etcd")]
#[test]
fn a_caller_that_fails_tls_or_login_exits_125_and_never_runs_the_command() {
    let options = Options {
        client_cert_auth: true,
        ..Options::secure()
    };
    let Some(etcd) = Etcd::with(1, options) else {
        return;
    };
    let certs = etcd.certs().expect("TLS is on");
    let shared = Shared::new();
    let script = format!("echo run >> '{}'; echo hi", shared.counter().display());
    let plain = etcd.url().replace("etcd+https://", "etcd://");
    let with = |changes: &[(&'static str, Option<&std::ffi::OsStr>)]| {
        let mut machine = Machine::of(&etcd);
        for (var, value) in changes {
            machine.vars.retain(|(k, _)| k != var);
            if let Some(value) = value {
                machine.vars.push((var, value.to_os_string()));
            }
        }
        machine
    };
    let cases = [
        (
            with(&[("SINGLEFLIGHT_ETCD_CACERT", Some(certs.other_ca.as_os_str()))]),
            "invalid peer certificate: UnknownIssuer",
        ),
        (
            with(&[("SINGLEFLIGHT_ETCD_CACERT", None)]),
            "invalid peer certificate: UnknownIssuer",
        ),
        (
            with(&[
                ("SINGLEFLIGHT_ETCD_CERT", None),
                ("SINGLEFLIGHT_ETCD_KEY", None),
            ]),
            "give --etcd-cert and --etcd-key",
        ),
        (
            with(&[("SINGLEFLIGHT_ETCD_PASSWORD", Some("wrong".as_ref()))]),
            "refused the login of user \"root\": etcdserver: authentication failed",
        ),
        (
            with(&[
                ("SINGLEFLIGHT_ETCD_USER", None),
                ("SINGLEFLIGHT_ETCD_PASSWORD", None),
            ]),
            "it has authentication on; give --etcd-user",
        ),
        (
            Machine {
                backend: plain.clone(),
                ..with(&[
                    ("SINGLEFLIGHT_ETCD_CACERT", None),
                    ("SINGLEFLIGHT_ETCD_CERT", None),
                    ("SINGLEFLIGHT_ETCD_KEY", None),
                ])
            },
            "write etcd+https://",
        ),
    ];
    for (machine, why) in &cases {
        for args in [
            vec!["secure", "--", "sh", "-c", &script],
            vec!["status"],
            vec!["clear", "secure"],
        ] {
            let out = machine.run(&args);
            assert_status(&out, 125);
            let said = stderr(&out);
            assert!(said.contains(why), "{args:?} {:?}: {said}", machine.vars);
            assert_eq!(said.lines().count(), 1, "one line: {said}");
            assert_eq!(stdout(&out), "");
        }
    }
    assert_eq!(shared.runs(), 0, "the command never ran");
    // TLS options with a plain etcd:// backend, or a login with no password: usage.
    let out = with(&[]).run(
        ["--backend", &plain, "secure", "--", "sh", "-c", &script]
            .iter()
            .copied(),
    );
    assert_status(&out, 2);
    assert!(stderr(&out).contains("etcd+https://"), "{}", stderr(&out));
    let out = with(&[("SINGLEFLIGHT_ETCD_PASSWORD", None)]).run(["secure", "--", "true"]);
    assert_status(&out, 2);
    assert!(
        stderr(&out).contains("needs a password: set SINGLEFLIGHT_ETCD_PASSWORD"),
        "{}",
        stderr(&out)
    );
    // Everything right: served, and the same from a password file.
    let out = with(&[]).run(["secure", "--", "sh", "-c", &script]);
    assert_served(&out, "hi\n");
    let password = shared.path("password");
    fs::write(&password, format!("{}\n", common::etcd::PASSWORD)).unwrap();
    let out = with(&[("SINGLEFLIGHT_ETCD_PASSWORD", None)]).run([
        "--etcd-password-file".as_ref(),
        password.as_os_str(),
        "secure".as_ref(),
        "--".as_ref(),
        "sh".as_ref(),
        "-c".as_ref(),
        script.as_ref() as &std::ffi::OsStr,
    ]);
    assert_served(&out, "hi\n");
    assert_eq!(shared.runs(), 1);
}

/// `status` and `clear` over TLS with a login, from another machine.
#[cfg(feature = "etcd")]
#[test]
fn status_and_clear_work_over_tls_with_a_login() {
    let Some(etcd) = Etcd::with(1, Options::secure()) else {
        return;
    };
    let (a, b) = (Machine::of(&etcd), Machine::of(&etcd));
    assert_eq!(stdout(&a.run(["seen", "--", "echo", "hi"])), "hi\n");
    let all = b.status_json(&[]).expect("names in etcd");
    assert_eq!(all.len(), 1);
    assert_eq!(all[0]["name"], "seen");
    assert_eq!(all[0]["state"], "fresh");
    let out = b.run(["clear", "-v", "seen"]);
    assert_eq!(stderr(&out), "singleflight: seen: cleared (result)\n");
    assert!(a.status_json(&["seen"]).is_none());
}

/// A login token that etcd let expire (`--auth-token-ttl 2`, unused during a long
/// run: lease renewals do not use it) is renewed when the run's result is stored:
/// logged in again and the write repeated, the call served.
#[cfg(feature = "etcd")]
#[test]
fn an_expired_login_token_is_renewed_without_failing_the_call() {
    let options = Options {
        token_ttl: Some(2),
        ..Options::secure()
    };
    let Some(etcd) = Etcd::with(1, options) else {
        return;
    };
    let shared = Shared::new();
    let machine = Machine::of(&etcd);
    let gate = shared.path("gate");
    let script = format!(
        "echo run >> '{}'; while [ ! -e '{}' ]; do sleep 0.01; done; echo kept",
        shared.counter().display(),
        gate.display()
    );
    let expired = || etcd.log_text().matches("deleted a simple token").count();
    let before = expired();
    let run = machine.spawn(["expire", "--", "sh", "-c", &script]);
    wait_until("the run started", || shared.runs() == 1);
    wait_until("etcd let the caller's token expire", || expired() > before);
    fs::write(&gate, "").unwrap();
    let out = finish(run);
    assert_served(&out, "kept\n");
    let hit = machine.run(["expire", "--", "sh", "-c", &script]);
    assert_eq!(stdout(&hit), "kept\n", "stored: {}", stderr(&hit));
    assert_eq!(shared.runs(), 1);
}

/// A one-member etcd with TLS and a login whose log counts the logins (`Etcd::logins`),
/// its simple tokens expiring after `token_ttl` seconds unused if given; a shared dir,
/// and a script that counts its runs there and prints `hi`.
#[cfg(feature = "etcd")]
fn logins_counted(token_ttl: Option<u32>) -> Option<(Etcd, Shared, String)> {
    let options = Options {
        token_ttl,
        debug_log: true,
        ..Options::secure()
    };
    let etcd = Etcd::with(1, options)?;
    let shared = Shared::new();
    let script = format!("echo run >> '{}'; echo hi", shared.counter().display());
    Some((etcd, shared, script))
}

/// The login token a call keeps in its cache dir (`etcd-<hash>.token`), if any.
#[cfg(feature = "etcd")]
fn token_file(machine: &Machine) -> Option<PathBuf> {
    let files: Vec<PathBuf> = fs::read_dir(&machine.env.cache)
        .ok()?
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|e| e == "token"))
        .collect();
    assert!(
        files.len() <= 1,
        "one token file per etcd and user: {files:?}"
    );
    files.into_iter().next()
}

/// The token in the token file, and the whole file.
#[cfg(feature = "etcd")]
fn kept_token(machine: &Machine) -> (String, String) {
    let path = token_file(machine).expect("a token file in the cache dir");
    let text = fs::read_to_string(path).unwrap();
    let kept: Value = serde_json::from_str(&text).expect("the token file is JSON");
    (kept["token"].as_str().expect("a token").to_owned(), text)
}

/// Removes `machine`'s local copy of NAME's result (see `mirror_call`), so that its
/// next call asks etcd: the caller that ran the command keeps one too.
#[cfg(feature = "etcd")]
fn drop_copy(machine: &Machine, name: &str) {
    fs::remove_file(machine.env.cache.join(format!("{name}.fleet"))).expect("a local copy");
}

/// A status line that calls singleflight again and again makes etcd check the
/// password (bcrypt) once, not on every call: the token of the first call's login is
/// kept in the cache dir and used by the next calls (a hit, `status`). Logins are
/// counted in etcd's own log. Another machine (cache dir) logs in for itself.
#[cfg(feature = "etcd")]
#[test]
fn calls_after_the_first_use_its_kept_token_and_never_log_in_again() {
    let Some((etcd, shared, script)) = logins_counted(None) else {
        return;
    };
    let (a, b) = (Machine::of(&etcd), Machine::of(&etcd));
    let before = etcd.logins();
    let out = a.run(["kept", "--", "sh", "-c", &script]);
    assert_served(&out, "hi\n");
    assert_eq!(etcd.logins(), before + 1, "the first call logs in");
    let (token, file) = kept_token(&a);
    // The first hit asks etcd (with the kept token), the others serve its copy.
    drop_copy(&a, "kept");
    for _ in 0..3 {
        let hit = a.run(["kept", "--", "sh", "-c", &script]);
        assert_served(&hit, "hi\n");
        assert_eq!(stderr(&hit), "");
    }
    let seen = a.status_json(&["kept"]).expect("kept is in etcd");
    assert_eq!(seen[0]["state"], "fresh");
    assert_eq!(shared.runs(), 1);
    assert_eq!(
        etcd.logins(),
        before + 1,
        "no call after the first logged in"
    );
    assert_eq!(
        kept_token(&a),
        (token.clone(), file),
        "the file is as it was"
    );
    let hit = b.run(["kept", "--", "sh", "-c", &script]);
    assert_eq!(stdout(&hit), "hi\n", "{}", stderr(&hit));
    assert_eq!(
        etcd.logins(),
        before + 2,
        "another cache dir logs in for itself"
    );
    assert_ne!(kept_token(&b).0, token);
}

/// A kept token is bound to the password that got it: a caller with a wrong
/// password does not use it, and fails as it always did (125, one line, the command
/// not run), however valid the token still is. The right password still uses it.
#[cfg(feature = "etcd")]
#[test]
fn a_wrong_password_never_rides_on_a_token_kept_with_the_right_one() {
    let Some((etcd, shared, script)) = logins_counted(None) else {
        return;
    };
    let mut machine = Machine::of(&etcd);
    assert_eq!(
        stdout(&machine.run(["kept", "--", "sh", "-c", &script])),
        "hi\n"
    );
    let kept = kept_token(&machine);
    let logins = etcd.logins();
    // Without the run's local copy every call below asks etcd (a hit from the copy
    // sends nothing, so it reads no password).
    drop_copy(&machine, "kept");
    let right = std::mem::take(&mut machine.vars);
    machine.vars = right.clone();
    machine
        .vars
        .retain(|(k, _)| *k != "SINGLEFLIGHT_ETCD_PASSWORD");
    machine
        .vars
        .push(("SINGLEFLIGHT_ETCD_PASSWORD", "wrong".into()));
    for args in [
        vec!["kept", "--", "sh", "-c", &script],
        vec!["new", "--", "sh", "-c", &script],
        vec!["status"],
        vec!["clear", "kept"],
    ] {
        let out = machine.run(&args);
        assert_status(&out, 125);
        let said = stderr(&out);
        assert!(
            said.contains("refused the login of user \"root\": etcdserver: authentication failed"),
            "{args:?}: {said}"
        );
        assert_eq!(said.lines().count(), 1, "one line: {said}");
        assert_eq!(stdout(&out), "");
    }
    assert_eq!(
        shared.runs(),
        1,
        "the command never ran with the wrong password"
    );
    assert_eq!(kept_token(&machine), kept, "the kept token is left alone");
    machine.vars = right;
    let hit = machine.run(["kept", "--", "sh", "-c", &script]);
    assert_eq!(stdout(&hit), "hi\n", "{}", stderr(&hit));
    assert_eq!(
        etcd.logins(),
        logins,
        "the right password uses the kept token"
    );
}

/// A kept token that etcd let expire (`--auth-token-ttl 2`) is refused on the next
/// call's first request: the call logs in once, is served, and keeps the new token
/// in the file, which the call after it uses.
#[cfg(feature = "etcd")]
#[test]
fn an_expired_kept_token_is_renewed_and_the_file_rewritten() {
    let Some((etcd, shared, script)) = logins_counted(Some(2)) else {
        return;
    };
    let machine = Machine::of(&etcd);
    let expired = || etcd.log_text().matches("deleted a simple token").count();
    let out = machine.run(["expire", "--", "sh", "-c", &script]);
    assert_eq!(stdout(&out), "hi\n", "{}", stderr(&out));
    let (stale, _) = kept_token(&machine);
    let logins = etcd.logins();
    let before = expired();
    wait_until("etcd let the kept token expire", || expired() > before);
    drop_copy(&machine, "expire");
    let hit = machine.run(["expire", "--", "sh", "-c", &script]);
    assert_served(&hit, "hi\n");
    assert_eq!(stderr(&hit), "");
    assert_eq!(
        etcd.logins(),
        logins + 1,
        "one login in place of the expired token"
    );
    let (fresh, _) = kept_token(&machine);
    assert_ne!(fresh, stale, "the file holds the new token");
    drop_copy(&machine, "expire");
    let hit = machine.run(["expire", "--", "sh", "-c", &script]);
    assert_eq!(stdout(&hit), "hi\n", "{}", stderr(&hit));
    assert_eq!(
        etcd.logins(),
        logins + 1,
        "the next call uses the new token"
    );
    assert_eq!(shared.runs(), 1);
}

/// The kept token is for its user only: the file is mode 0600, in the 0700 cache dir.
#[cfg(feature = "etcd")]
#[test]
fn the_kept_token_file_is_mode_0600() {
    use std::os::unix::fs::PermissionsExt;
    let Some(etcd) = Etcd::with(1, Options::secure()) else {
        return;
    };
    let machine = Machine::of(&etcd);
    let out = machine.run(["status"]);
    assert!(matches!(status(&out), 0 | 1), "{}", stderr(&out));
    let path = token_file(&machine).expect("a token file after a login");
    let mode = |p: &std::path::Path| {
        format!(
            "{:04o}",
            fs::metadata(p).unwrap().permissions().mode() & 0o7777
        )
    };
    assert_eq!(mode(&path), "0600", "{}", path.display());
    assert_eq!(mode(&machine.env.cache), "0700");
}

/// `--lease-ttl` is checked when parsed: etcd's shortest lease (2s) to 1h.
#[cfg(feature = "etcd")]
#[test]
fn a_lease_ttl_out_of_bounds_is_a_usage_error_naming_the_limit() {
    let machine = Machine::new("etcd://127.0.0.1:9");
    for (ttl, limit) in [("1s", "2s"), ("500ms", "2s"), ("0", "2s"), ("61m", "1h")] {
        let out = machine.run(["--lease-ttl", ttl, "x", "--", "true"]);
        assert_status(&out, 2);
        assert!(
            stderr(&out).contains(limit) && stderr(&out).contains(ttl),
            "{ttl}: {}",
            stderr(&out)
        );
    }
}

/// `--exclusive --slots 2` across a fleet (issue 26): 3 machines × 6 callers never
/// have more than 2 runs at once (counted under flock(1) in a dir they share), have 2
/// at once at some point, all run, and each run gets its own fencing token.
#[cfg(feature = "etcd")]
#[test]
fn two_slots_across_three_machines_never_run_more_than_two_at_once() {
    let Some(etcd) = Etcd::start() else { return };
    let shared = Shared::new();
    let machines: Vec<Machine> = (0..3).map(|_| Machine::of(&etcd)).collect();
    let dir = shared.dir.path().display().to_string();
    let script = format!(
        "cd '{dir}'; \
         ( flock 9; c=$(( $(cat cur 2>/dev/null || echo 0) + 1 )); echo $c > cur; \
           m=$(cat max 2>/dev/null || echo 0); [ $c -gt $m ] && echo $c > max; \
           echo $SINGLEFLIGHT_FENCING_TOKEN >> tokens ) 9>counter.lock; \
         sleep 0.3; \
         ( flock 9; echo $(( $(cat cur) - 1 )) > cur ) 9>counter.lock"
    );
    let args = call_args(
        "pool",
        &["--exclusive", "--slots", "2", "--wait", "10m"],
        &["sh", "-c", &script],
    );
    let callers: Vec<Child> = machines
        .iter()
        .flat_map(|machine| (0..6).map(|_| machine.spawn(&args)))
        .collect();
    for caller in callers {
        assert_status(&finish(caller), 0);
    }
    let mut tokens = shared.lines("tokens");
    assert_eq!(tokens.len(), 18, "every caller ran: {tokens:?}");
    tokens.sort();
    tokens.dedup();
    assert_eq!(tokens.len(), 18, "a fencing token of its own each");
    let max = shared.lines("max");
    assert_eq!(
        max,
        ["2"],
        "at most 2 at once across the machines, and 2 at some point"
    );
    // Two holders on two machines: a third machine's status shows both slots.
    let gate = shared.path("gate");
    let hold = format!(
        "touch '{dir}/held.'$1; while [ ! -e '{}' ]; do sleep 0.01; done",
        gate.display()
    );
    let holders: Vec<Child> = ["a", "b"]
        .iter()
        .zip(&machines)
        .map(|(id, machine)| {
            let options = ["--exclusive", "--slots", "2", "--lease-ttl", "2s"];
            let mut args = call_args("pool", &options, &["sh", "-c"]);
            args.extend([hold.clone(), "sh".to_owned(), (*id).to_owned()]);
            machine.spawn(&args)
        })
        .collect();
    wait_until("both hold a slot", || {
        shared.path("held.a").exists() && shared.path("held.b").exists()
    });
    let seen = machines[2].status_json(&["pool"]).expect("pool is known");
    let slots = &seen[0]["slots"];
    assert_eq!(slots["count"], 2, "{seen:?}");
    let mut pids: Vec<u64> = slots["in_use"]
        .as_array()
        .expect("in_use")
        .iter()
        .map(|slot| slot["pid"].as_u64().expect("pid"))
        .collect();
    pids.sort_unstable();
    let mut expected: Vec<u64> = holders.iter().map(|h| u64::from(h.id())).collect();
    expected.sort_unstable();
    assert_eq!(pids, expected, "{seen:?}");
    // A waiter watches both slots, longer than its own lease would live (a lease taken
    // before the wait would be gone by the time a slot is free); then one holder is
    // SIGKILLed, and its slot comes free when its lease (2s) expires.
    let waiter = machines[2].spawn(call_args(
        "pool",
        &[
            "--exclusive",
            "--slots",
            "2",
            "--lease-ttl",
            "2s",
            "--wait",
            "10m",
        ],
        &["sh", "-c", &format!("touch '{dir}/ran.c'")],
    ));
    wait_until("the waiter watches the slots", || {
        etcd.metric(0, "etcd_debugging_mvcc_watcher_total") == Some(1.0)
    });
    let watching = Instant::now();
    wait_until("3s of waiting, more than a lease of 2s", || {
        watching.elapsed() > std::time::Duration::from_secs(3)
    });
    let mut holders = holders.into_iter();
    let killed = holders.next().expect("holder a");
    let killed_at = Instant::now();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(i32::try_from(killed.id()).expect("pid")).expect("pid"),
        rustix::process::Signal::KILL,
    )
    .expect("SIGKILL holder a");
    wait_until("the waiter runs in the freed slot", || {
        shared.path("ran.c").exists()
    });
    eprintln!(
        "fleet: a SIGKILLed holder's slot (lease 2s) taken after {:?}",
        killed_at.elapsed()
    );
    assert_status(&finish(waiter), 0);
    let _ = finish(killed);
    fs::write(&gate, "").expect("gate");
    for holder in holders {
        assert_status(&finish(holder), 0);
    }
}

/// `singleflight NAME --ttl TTL -- sh -c 'echo $(cat OUT); echo run >> COUNTER'`: prints
/// what the shared file `out` holds at the run, and counts its runs.
#[cfg(feature = "etcd")]
fn mirror_call(shared: &Shared, name: &str, ttl: &str) -> Vec<String> {
    let script = format!(
        "cat '{}'; echo run >> '{}'",
        shared.path("out").display(),
        shared.counter().display()
    );
    call_args(name, &["--ttl", ttl], &["sh", "-c", &script])
}

/// The number of reads (ranges) etcd has served, from its metrics.
#[cfg(feature = "etcd")]
fn ranges(etcd: &Etcd) -> f64 {
    etcd.metric(0, "etcd_mvcc_range_total")
        .expect("etcd reports etcd_mvcc_range_total")
}

/// A fresh fleet result read once is served from the machine's local copy: later
/// calls ask etcd nothing, until the result's own TTL is over.
#[cfg(feature = "etcd")]
#[test]
fn a_fresh_fleet_result_is_served_from_the_local_copy_without_asking_etcd() {
    let Some(etcd) = Etcd::start() else { return };
    let shared = Shared::new();
    fs::write(shared.path("out"), "one\n").unwrap();
    let (a, b) = (Machine::new(&etcd.url()), Machine::new(&etcd.url()));
    let args = mirror_call(&shared, "mirrored", "1h");
    assert_served(&a.run(&args), "one\n");
    assert_served(&b.run(&args), "one\n");
    assert!(
        b.env.cache.join("mirrored.fleet").is_file(),
        "b kept a copy"
    );
    let before = ranges(&etcd);
    for _ in 0..5 {
        assert_served(&b.run(&args), "one\n");
    }
    assert_eq!(
        ranges(&etcd),
        before,
        "no range request for a hit from the copy"
    );
    assert_eq!(shared.runs(), 1);
}

/// A `clear` on another machine is seen once the local copy is past the result's own
/// TTL, even by a caller with a longer --ttl; a newer result on another machine is
/// served once the local copy is stale; a damaged copy is never served.
#[cfg(feature = "etcd")]
#[test]
fn the_local_copy_gives_way_to_a_clear_a_newer_result_and_damage() {
    let Some(etcd) = Etcd::start() else { return };
    let shared = Shared::new();
    let (a, b) = (Machine::new(&etcd.url()), Machine::new(&etcd.url()));
    let short = mirror_call(&shared, "m", "2s");
    let long = mirror_call(&shared, "m", "1h");
    // A clear on A: B serves its copy at most until the result's own TTL (2s), then
    // asks etcd, finds nothing and runs.
    fs::write(shared.path("out"), "one\n").unwrap();
    assert_served(&a.run(&short), "one\n");
    assert_served(&b.run(&long), "one\n");
    assert!(b.env.cache.join("m.fleet").is_file(), "b kept a copy");
    assert_status(&a.run(["clear", "m"]), 0);
    fs::write(shared.path("out"), "two\n").unwrap();
    let mut outputs = Vec::new();
    wait_until("B runs the command after the clear", || {
        let out = b.run(&long);
        outputs.push(stdout(&out));
        stdout(&out) == "two\n"
    });
    assert!(
        outputs.iter().all(|o| o == "one\n" || o == "two\n"),
        "{outputs:?}"
    );
    assert_eq!(
        shared.runs(),
        2,
        "A's run, then B's once its copy was stale"
    );
    // B keeps a copy of its result; A writes a newer one (its --ttl 0 call runs): B
    // serves it once its copy is stale for B's --ttl, and never runs.
    assert_served(&b.run(&short), "two\n");
    fs::write(shared.path("out"), "three\n").unwrap();
    let now = call_args("m", &["--ttl", "0"], &short[short.len() - 3..]);
    assert_served(&a.run(&now), "three\n");
    wait_until("B serves A's newer result", || {
        stdout(&b.run(&short)) == "three\n"
    });
    assert_eq!(shared.runs(), 3, "B never ran for it");
    // A damaged copy is never served: with the fleet's result cleared, B runs.
    assert_status(&a.run(["clear", "m"]), 0);
    fs::write(shared.path("out"), "four\n").unwrap();
    assert_served(&b.run(&short), "four\n");
    assert_served(&b.run(&short), "four\n");
    assert_eq!(shared.runs(), 4);
    let copy = b.env.cache.join("m.fleet");
    let mut bytes = fs::read(&copy).expect("B keeps a copy");
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    fs::write(&copy, &bytes).unwrap();
    assert_status(&a.run(["clear", "m"]), 0);
    fs::write(shared.path("out"), "five\n").unwrap();
    assert_served(&b.run(&short), "five\n");
    assert_eq!(shared.runs(), 5);
}

/// The caller that ran the command and a waiter on another machine woken by its
/// release both keep a local copy of the result as they have it (stored by the run's
/// own transaction; handed over by the watch), so neither asks etcd at its next call.
#[cfg(feature = "etcd")]
#[test]
fn the_caller_that_ran_and_a_woken_waiter_keep_the_copy() {
    let Some(etcd) = Etcd::start() else { return };
    let shared = Shared::new();
    let (a, b) = (Machine::new(&etcd.url()), Machine::new(&etcd.url()));
    let gate = shared.path("gate");
    let script = format!(
        "echo run >> '{}'; while [ ! -e '{}' ]; do sleep 0.01; done; echo kept",
        shared.counter().display(),
        gate.display()
    );
    // --wait as long as the timeout (1h): a waiter that is not woken hangs the test.
    let args = call_args(
        "kept",
        &["--ttl", "1h", "--timeout", "1h"],
        &["sh", "-c", &script],
    );
    let watchers = || etcd.metric(0, "etcd_debugging_mvcc_watcher_total");
    let idle = watchers();
    let mut callers = vec![a.spawn(&args)];
    wait_until("A runs the command, or ended", || {
        shared.runs() == 1 || ended(&mut callers)
    });
    callers.push(b.spawn(&args));
    wait_until("B watches A's lock, or a caller ended", || {
        ended(&mut callers) || watchers() == idle.map(|n| n + 1.0)
    });
    fs::write(&gate, "").unwrap();
    for caller in callers {
        assert_served(&finish(caller), "kept\n");
    }
    assert_eq!(shared.runs(), 1, "B was served A's run");
    for (machine, who) in [(&a, "A, which ran it"), (&b, "B, woken by the watch")] {
        assert!(
            machine.env.cache.join("kept.fleet").is_file(),
            "{who} kept a copy"
        );
    }
    let before = ranges(&etcd);
    assert_served(&a.run(&args), "kept\n");
    let after_a = ranges(&etcd);
    assert_served(&b.run(&args), "kept\n");
    let after_b = ranges(&etcd);
    assert_eq!(
        after_a, before,
        "A, which ran the command, serves its copy without a range request"
    );
    assert_eq!(
        after_b, after_a,
        "B, woken with the result, serves its copy without a range request"
    );
    assert_eq!(shared.runs(), 1);
}
