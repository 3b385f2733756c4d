//! The PostgreSQL backend end to end (issue 27): the real binary on several "machines"
//! (each its own cache dir) against a real PostgreSQL (Debian's, started by the test):
//! one run per NAME fleet-wide, the holder's session terminated or the server frozen
//! mid-run (the tree is killed, exit 125, before the lease row could pass to anyone),
//! fencing tokens, a server that is down, a wrong password, waiters woken by NOTIFY.
#![cfg(all(target_os = "linux", feature = "postgres"))]

use crate::common;

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Output};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use common::certs::Certs;
use common::postgres::{PASSWORD, Postgres};
use common::{TestEnv, alive, assert_status, finish, marker, stderr, stdout, wait_until};

/// One machine: its own cache dir, the shared PostgreSQL as its backend.
struct Machine {
    env: TestEnv,
    backend: String,
    password: String,
}

impl Machine {
    fn of(pg: &Postgres) -> Machine {
        Machine {
            env: TestEnv::new(),
            backend: pg.url(),
            password: PASSWORD.to_owned(),
        }
    }

    fn command(&self) -> Command {
        let mut command = self.env.command();
        command
            .env("SINGLEFLIGHT_BACKEND", &self.backend)
            .env("PGPASSWORD", &self.password)
            .env("PGPASSFILE", "/dev/null");
        command
    }

    fn spawn(&self, args: &[&str]) -> Child {
        common::start(self.command().args(args))
    }

    fn run(&self, args: &[&str]) -> Output {
        finish(self.spawn(args))
    }
}

/// Files the commands of every machine share.
struct Shared {
    dir: tempfile::TempDir,
}

impl Shared {
    fn new() -> Shared {
        Shared {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn runs(&self) -> usize {
        fs::read_to_string(self.path("runs")).map_or(0, |s| s.lines().count())
    }
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64()
}

#[test]
fn a_herd_of_sixty_callers_on_three_machines_runs_the_command_once() {
    let Some(pg) = Postgres::start() else { return };
    let shared = Shared::new();
    let script = format!(
        "echo run >> '{}'; sleep 1; echo herd",
        shared.path("runs").display()
    );
    let machines: Vec<Machine> = (0..3).map(|_| Machine::of(&pg)).collect();
    let callers: Vec<Child> = machines
        .iter()
        .flat_map(|m| {
            (0..20).map(|_| {
                m.spawn(&[
                    "--backend-timeout",
                    "20s",
                    "herd",
                    "--",
                    "sh",
                    "-c",
                    &script,
                ])
            })
        })
        .collect();
    for caller in callers {
        let out = finish(caller);
        assert_status(&out, 0);
        assert_eq!(stdout(&out), "herd\n", "{}", stderr(&out));
    }
    assert_eq!(
        shared.runs(),
        1,
        "one run for sixty callers on three machines"
    );
}

/// A run whose lock is lost: the tree is killed, the exit is 125, nothing is stored,
/// and singleflight exited before the lease row's expiry (the server's clock, the same
/// machine's here), so before any other machine could take the NAME.
fn lose_the_lock(pg: &Postgres, ttl: &str, how: impl FnOnce()) {
    let shared = Shared::new();
    let machine = Machine::of(pg);
    let mark = marker();
    let script = format!(
        "echo $SINGLEFLIGHT_FENCING_TOKEN > '{}'; echo run >> '{}'; sleep {mark} & sleep {mark}; wait",
        shared.path("token").display(),
        shared.path("runs").display()
    );
    let run = machine.spawn(&[
        "--lease-ttl",
        ttl,
        "lose",
        "--kill-after",
        "1s",
        "--timeout",
        "10m",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    wait_until("the run started", || {
        shared.runs() == 1 && alive(&mark).len() >= 2
    });
    let first: i64 = fs::read_to_string(shared.path("token"))
        .expect("token")
        .trim()
        .parse()
        .expect("a number");
    let lost = Instant::now();
    how();
    let out = finish(run);
    let exited = now_secs();
    wait_until("the tree is dead", || alive(&mark).is_empty());
    eprintln!(
        "singleflight exited {:?} after the lock was lost (lease {ttl})",
        lost.elapsed()
    );
    pg.thaw();
    assert_status(&out, 125);
    assert!(
        stderr(&out).contains("nothing was stored"),
        "{}",
        stderr(&out)
    );
    assert_eq!(stdout(&out), "");
    let expires: f64 = pg
        .psql("SELECT extract(epoch FROM expires) FROM singleflight.locks WHERE slot = 'lose'")
        .parse()
        .expect("the lease row is still there");
    assert!(
        exited < expires,
        "exited at {exited}, the lease ran until {expires}"
    );

    // The next run (once the lease passed) gets a larger token.
    let again = format!(
        "echo $SINGLEFLIGHT_FENCING_TOKEN > '{}'; echo again",
        shared.path("token").display()
    );
    wait_until("the lease passed", || {
        let out = machine.run(&["lose", "--", "sh", "-c", &again]);
        common::status(&out) == 0
    });
    let second: i64 = fs::read_to_string(shared.path("token"))
        .expect("token")
        .trim()
        .parse()
        .expect("a number");
    assert!(second > first, "token {second} after {first}");
}

#[test]
fn the_holders_session_terminated_mid_run_kills_the_tree_with_125() {
    let Some(pg) = Postgres::start() else { return };
    lose_the_lock(&pg, "10s", || {
        let killed = pg.psql(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE application_name = 'singleflight'",
        );
        assert_ne!(killed, "0", "the holder's session");
    });
}

#[test]
fn a_frozen_server_mid_run_kills_the_tree_with_125_within_the_lease() {
    let Some(pg) = Postgres::start() else { return };
    lose_the_lock(&pg, "5s", || pg.freeze());
}

#[test]
fn with_the_server_down_a_caller_exits_125_at_once_and_never_runs_the_command() {
    let Some(pg) = Postgres::start() else { return };
    let shared = Shared::new();
    let mut machine = Machine::of(&pg);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    machine.backend = format!("postgres://postgres@127.0.0.1:{port}/postgres?sslmode=disable");
    let script = format!("echo run >> '{}'; echo hi", shared.path("runs").display());
    for args in [
        vec!["down", "--", "sh", "-c", &script],
        vec!["--background", "down", "--", "sh", "-c", &script],
        vec!["status"],
        vec!["clear", "down"],
    ] {
        let out = machine.run(&args);
        assert_status(&out, 125);
        assert!(
            stderr(&out).contains("cannot connect to"),
            "{args:?}: {}",
            stderr(&out)
        );
        assert_eq!(stdout(&out), "");
    }
    assert_eq!(shared.runs(), 0);
}

#[test]
fn a_wrong_password_exits_125_and_never_runs_the_command() {
    let Some(pg) = Postgres::start() else { return };
    let shared = Shared::new();
    let mut machine = Machine::of(&pg);
    machine.password = "wrong".to_owned();
    let script = format!("echo run >> '{}'; echo hi", shared.path("runs").display());
    let out = machine.run(&["pw", "--", "sh", "-c", &script]);
    assert_status(&out, 125);
    assert!(
        stderr(&out).contains("password authentication failed"),
        "{}",
        stderr(&out)
    );
    assert!(
        !stderr(&out).contains("wrong"),
        "never echoes the password: {}",
        stderr(&out)
    );
    assert_eq!(shared.runs(), 0);
}

/// Waiters on other machines are woken by the release's NOTIFY, not by the lease's
/// expiry (60s here): the p95 from the run's end to their exits is printed.
#[test]
fn waiters_on_other_machines_wake_on_the_release_notification() {
    let Some(pg) = Postgres::start() else { return };
    let shared = Shared::new();
    let go = shared.path("go");
    let end = shared.path("end");
    let script = format!(
        "echo run >> '{}'; while [ ! -e '{}' ]; do sleep 0.01; done; date +%s.%N > '{}'; echo done",
        shared.path("runs").display(),
        go.display(),
        end.display()
    );
    let machines: Vec<Machine> = (0..3).map(|_| Machine::of(&pg)).collect();
    let holder = machines[0].spawn(&["--lease-ttl", "60s", "wake", "--", "sh", "-c", &script]);
    wait_until("the run started", || shared.runs() == 1);
    let waiters: Vec<Child> = machines
        .iter()
        .flat_map(|m| {
            (0..5).map(|_| {
                m.spawn(&[
                    "--backend-timeout",
                    "20s",
                    "--lease-ttl",
                    "60s",
                    "wake",
                    "--",
                    "sh",
                    "-c",
                    &script,
                ])
            })
        })
        .collect();
    // Every waiter is listening once it has its session: give them the time to start.
    wait_until("the waiters listen", || {
        pg.psql("SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_notify($2, $3)%'")
            .parse::<usize>()
            .is_ok_and(|n| n >= 15)
    });
    fs::write(&go, "").expect("go");
    let exits: Vec<f64> = std::thread::scope(|scope| {
        let handles: Vec<_> = waiters
            .into_iter()
            .map(|w| {
                scope.spawn(move || {
                    let out = finish(w);
                    (now_secs(), out)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                let (at, out) = h.join().expect("waiter");
                assert_status(&out, 0);
                assert_eq!(stdout(&out), "done\n");
                at
            })
            .collect()
    });
    assert_status(&finish(holder), 0);
    let ended: f64 = fs::read_to_string(&end)
        .expect("end")
        .trim()
        .parse()
        .expect("a time");
    let mut delays: Vec<f64> = exits.iter().map(|at| at - ended).collect();
    delays.sort_by(f64::total_cmp);
    let p95 = delays[(delays.len() * 95).div_ceil(100) - 1];
    eprintln!(
        "run end to waiter exit: p95 {:.1}ms, max {:.1}ms",
        p95 * 1e3,
        delays[delays.len() - 1] * 1e3
    );
    assert_eq!(shared.runs(), 1);
    assert!(
        p95 < 30.0,
        "woken by the notification, not the 60s lease: p95 {p95}s"
    );
}

/// `status` and `clear` from a machine that ran nothing see what the others did;
/// `clear --older-than` removes what nobody wrote for that long.
#[test]
fn status_and_clear_see_the_fleet_from_any_machine() {
    let Some(pg) = Postgres::start() else { return };
    let shared = Shared::new();
    let (a, b) = (Machine::of(&pg), Machine::of(&pg));
    assert_eq!(stdout(&a.run(&["ok", "--", "echo", "hi"])), "hi\n");
    assert_status(
        &a.run(&["failing", "--", "sh", "-c", "echo oops >&2; exit 3"]),
        3,
    );
    let gate = shared.path("gate");
    let held = format!(
        "while [ ! -e '{}' ]; do sleep 0.01; done; echo done",
        gate.display()
    );
    let running = a.spawn(&["running", "--", "sh", "-c", &held]);
    let status = |m: &Machine, names: &[&str]| -> Vec<serde_json::Value> {
        let mut args = vec!["status", "--json"];
        args.extend(names);
        let out = m.run(&args);
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    };
    wait_until("the run is in flight", || {
        status(&b, &["running"])
            .first()
            .is_some_and(|s| s["in_flight"] == true)
    });
    let all = status(&b, &[]);
    let names: Vec<&str> = all.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["failing", "ok", "running"]);
    assert_eq!(all[1]["state"], "fresh");
    assert_eq!(all[0]["last_failure"]["exit_code"], 3);
    assert_eq!(all[2]["pid"], running.id());

    // Another schema is another fleet.
    let other = b.run(&["--pg-schema", "elsewhere", "status", "--json"]);
    assert_eq!(stdout(&other).trim(), "[]", "{}", stderr(&other));

    let out = b.run(&["clear", "-v", "ok", "failing"]);
    assert_eq!(
        stderr(&out),
        "singleflight: ok: cleared (result)\nsingleflight: failing: cleared (failure record)\n"
    );
    let counted = format!("echo run >> '{}'; echo hi", shared.path("runs").display());
    assert_eq!(stdout(&a.run(&["ok", "--", "sh", "-c", &counted])), "hi\n");
    assert_eq!(shared.runs(), 1, "cleared for machine A too");

    // --older-than leaves what was just written, and the run in flight.
    let out = b.run(&["clear", "-v", "--older-than", "1h", "--all"]);
    assert_status(&out, 0);
    assert!(!stderr(&out).contains("cleared"), "{}", stderr(&out));
    pg.psql("UPDATE singleflight.slots SET updated = now() - interval '2 hours'");
    let out = b.run(&["clear", "-v", "--older-than", "1h", "--all"]);
    assert!(
        stderr(&out).contains("ok: cleared (result)"),
        "{}",
        stderr(&out)
    );
    fs::write(&gate, "").unwrap();
    assert_eq!(stdout(&finish(running)), "done\n");
    assert_eq!(status(&b, &["running"])[0]["state"], "fresh");
}

/// Fifteen stale callers on three machines are served at once and start one refresh,
/// whose refresher (another process) takes the lock over by its token.
#[test]
fn a_background_refresh_across_machines_starts_one_refresher() {
    let Some(pg) = Postgres::start() else { return };
    let shared = Shared::new();
    let machines: Vec<Machine> = (0..3).map(|_| Machine::of(&pg)).collect();
    let (version, gate) = (shared.path("version"), shared.path("gate"));
    let script = format!(
        "echo run >> '{runs}'; while [ ! -e '{gate}' ]; do sleep 0.01; done; cat '{version}'",
        runs = shared.path("runs").display(),
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
    assert_eq!(stdout(&machines[0].run(&args)), "v1\n");
    wait_until("v1 goes stale", || {
        let out = machines[0].run(&["status", "--json", "bg"]);
        serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout)
            .is_ok_and(|s| s[0]["state"] == "stale")
    });
    fs::write(&version, "v2\n").unwrap();
    fs::remove_file(&gate).unwrap();
    let callers: Vec<Child> = machines
        .iter()
        .flat_map(|m| (0..5).map(|_| m.spawn(&args)))
        .collect();
    for caller in callers {
        let out = finish(caller);
        assert_eq!(stdout(&out), "v1\n", "{}", stderr(&out));
    }
    wait_until("the refresh started", || shared.runs() == 2);
    fs::write(&gate, "").unwrap();
    wait_until("the refresh stored v2", || {
        let out = machines[2].run(&["bg", "--ttl", "1h", "--", "sh", "-c", &script]);
        stdout(&out) == "v2\n"
    });
    assert_eq!(shared.runs(), 2, "one refresh for fifteen stale callers");
}

/// `--exclusive` across machines: one at a time, each gets its own run, in turn.
#[test]
fn exclusive_runs_take_turns_across_machines() {
    let Some(pg) = Postgres::start() else { return };
    let shared = Shared::new();
    let machines: Vec<Machine> = (0..3).map(|_| Machine::of(&pg)).collect();
    let script = format!(
        "[ -e '{busy}' ] && echo overlap >> '{runs}'; touch '{busy}'; echo run >> '{runs}'; \
         sleep 0.2; rm '{busy}'",
        busy = shared.path("busy").display(),
        runs = shared.path("runs").display()
    );
    let callers: Vec<Child> = machines
        .iter()
        .flat_map(|m| (0..2).map(|_| m.spawn(&["--exclusive", "ex", "--", "sh", "-c", &script])))
        .collect();
    for caller in callers {
        assert_status(&finish(caller), 0);
    }
    let runs = fs::read_to_string(shared.path("runs")).unwrap();
    assert_eq!(runs, "run\n".repeat(6), "six turns, never two at once");
}

/// TLS with `sslmode=verify-full`: the server's certificate checked against
/// `sslrootcert`; a client certificate logs in without a password; a CA that did not
/// sign the server's certificate ends the call with 125 before anything runs.
#[test]
fn tls_verify_full_with_a_client_certificate_and_an_unverifiable_server() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::make(dir.path());
    let Some(pg) = Postgres::with_tls(Some(&certs)) else {
        return;
    };
    let shared = Shared::new();
    let script = format!("echo run >> '{}'; echo tls", shared.path("runs").display());
    let url = |user: &str, ca: &std::path::Path, extra: &str| {
        format!(
            "postgres://{user}@127.0.0.1:{}/postgres?sslmode=verify-full&sslrootcert={}{extra}",
            pg.port,
            ca.display()
        )
    };

    let mut machine = Machine::of(&pg);
    machine.backend = url("postgres", &certs.ca, "");
    let out = machine.run(&["tls", "--", "sh", "-c", &script]);
    assert_eq!(stdout(&out), "tls\n", "{}", stderr(&out));

    let mut by_cert = Machine::of(&pg);
    by_cert.password = String::new();
    by_cert.backend = url(
        "certuser",
        &certs.ca,
        &format!(
            "&sslcert={}&sslkey={}",
            certs.pg_client.display(),
            certs.pg_client_key.display()
        ),
    );
    let out = by_cert.run(&["tls", "--", "sh", "-c", &script]);
    assert_eq!(
        stdout(&out),
        "tls\n",
        "served over TLS by a client certificate: {}",
        stderr(&out)
    );

    let mut untrusting = Machine::of(&pg);
    untrusting.backend = url("postgres", &certs.other_ca, "");
    let out = untrusting.run(&["untrusted", "--", "sh", "-c", &script]);
    assert_status(&out, 125);
    assert!(
        stderr(&out).contains("the command was not run"),
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).to_lowercase().contains("certificate"),
        "{}",
        stderr(&out)
    );
    assert_eq!(shared.runs(), 1);
}

/// Behind PgBouncer in transaction mode LISTEN cannot be counted on: waiters are
/// served all the same, and the command runs once.
#[test]
fn behind_a_transaction_pooler_waiters_are_served_and_the_command_runs_once() {
    let Some(pg) = Postgres::start() else { return };
    let Some(bouncer) = pg.bouncer() else { return };
    let shared = Shared::new();
    let gate = shared.path("gate");
    let script = format!(
        "echo run >> '{}'; while [ ! -e '{}' ]; do sleep 0.01; done; echo pooled",
        shared.path("runs").display(),
        gate.display()
    );
    let mut machines: Vec<Machine> = (0..2).map(|_| Machine::of(&pg)).collect();
    for m in &mut machines {
        m.backend = format!(
            "postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable",
            bouncer.port
        );
    }
    let holder = machines[0].spawn(&["pooled", "--", "sh", "-c", &script]);
    wait_until("the run started", || shared.runs() == 1);
    // A waiter that finds LISTEN unusable says so and looks every 500ms; where the
    // pooler happens to deliver the notification it is woken by it; where it drops it,
    // the holder's lease bounds the wait. In every case: served, and run once.
    let said: Vec<PathBuf> = (0..3)
        .map(|i| shared.path(&format!("waiter{i}.stderr")))
        .collect();
    let waiters: Vec<std::process::Child> = said
        .iter()
        .map(|path| {
            machines[1]
                .command()
                .args(["pooled", "--", "sh", "-c", &script])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(fs::File::create(path).unwrap())
                .spawn()
                .unwrap()
        })
        .collect();
    // They wait once the lock statement is behind them (each tried and lost).
    wait_until("the waiters tried the lock", || {
        pg.psql("SELECT last_value FROM singleflight.fencing")
            .parse::<i64>()
            .is_ok_and(|n| n >= 4)
    });
    fs::write(&gate, "").unwrap();
    assert_eq!(stdout(&finish(holder)), "pooled\n");
    for (waiter, path) in waiters.into_iter().zip(&said) {
        let out = finish(waiter);
        assert_status(&out, 0);
        assert_eq!(
            stdout(&out),
            "pooled\n",
            "{}",
            fs::read_to_string(path).unwrap()
        );
    }
    assert_eq!(shared.runs(), 1);
}

/// `--service` across machines: of ten callers on two machines one instance starts, and
/// every caller returns once it is ready (its `--ready` check looks at a shared file).
#[test]
fn one_service_instance_for_callers_on_two_machines() {
    let Some(pg) = Postgres::start() else { return };
    let shared = Shared::new();
    let mark = marker();
    let script = format!(
        "echo $$ >> '{starts}'; while [ ! -e '{gate}' ]; do sleep 0.01; done; \
         touch '{ready}'; exec sleep {mark}",
        starts = shared.path("runs").display(),
        gate = shared.path("gate").display(),
        ready = shared.path("ready").display()
    );
    let ready = format!("test -e '{}'", shared.path("ready").display());
    let machines: Vec<Machine> = (0..2).map(|_| Machine::of(&pg)).collect();
    let args = [
        "--service",
        "svc",
        "--ready",
        &ready,
        "--",
        "sh",
        "-c",
        &script,
    ];
    let mut callers: Vec<Child> = machines
        .iter()
        .flat_map(|m| (0..5).map(|_| m.spawn(&args)))
        .collect();
    wait_until("the instance started", || shared.runs() == 1);
    for caller in &mut callers {
        assert!(
            caller.try_wait().unwrap().is_none(),
            "returned before ready"
        );
    }
    fs::write(shared.path("gate"), "").unwrap();
    for caller in callers {
        let out = finish(caller);
        assert_status(&out, 0);
    }
    assert_eq!(shared.runs(), 1, "one instance for two machines");
    let supervising = machines
        .iter()
        .find(|m| common::status(&m.run(&["stop", "svc"])) == 0);
    assert!(supervising.is_some(), "one machine's stop ends it");
    wait_until("the instance is gone", || alive(&mark).is_empty());
}

/// `--exclusive --slots 2` across machines: 3 machines × 6 callers never have more
/// than 2 runs at once (counted under flock(1) in a dir they share), have 2 at once at
/// some point, all run, and each run gets its own fencing token. Then two holders on
/// two machines show in a third machine's `status`, and a waiter there runs once one
/// of them lets go.
#[test]
fn two_slots_across_three_machines_never_run_more_than_two_at_once() {
    let Some(pg) = Postgres::start() else { return };
    let shared = Shared::new();
    let machines: Vec<Machine> = (0..3).map(|_| Machine::of(&pg)).collect();
    let dir = shared.dir.path().display().to_string();
    let script = format!(
        "cd '{dir}'; \
         ( flock 9; c=$(( $(cat cur 2>/dev/null || echo 0) + 1 )); echo $c > cur; \
           m=$(cat max 2>/dev/null || echo 0); [ $c -gt $m ] && echo $c > max; \
           echo $SINGLEFLIGHT_FENCING_TOKEN >> tokens ) 9>counter.lock; \
         sleep 0.3; \
         ( flock 9; echo $(( $(cat cur) - 1 )) > cur ) 9>counter.lock"
    );
    let args = [
        "--exclusive",
        "--slots",
        "2",
        "--wait",
        "10m",
        "pool",
        "--",
        "sh",
        "-c",
        &script,
    ];
    let started = Instant::now();
    let callers: Vec<Child> = machines
        .iter()
        .flat_map(|machine| (0..6).map(|_| machine.spawn(&args)))
        .collect();
    for caller in callers {
        assert_status(&finish(caller), 0);
    }
    eprintln!(
        "postgres: 18 runs of 0.3s in 2 slots took {:?}",
        started.elapsed()
    );
    let lines = |file: &str| -> Vec<String> {
        fs::read_to_string(shared.path(file))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    };
    let mut tokens = lines("tokens");
    assert_eq!(tokens.len(), 18, "every caller ran: {tokens:?}");
    tokens.sort();
    tokens.dedup();
    assert_eq!(tokens.len(), 18, "a fencing token of its own each");
    assert_eq!(
        lines("max"),
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
            machine.spawn(&[
                "--exclusive",
                "--slots",
                "2",
                "pool",
                "--",
                "sh",
                "-c",
                &hold,
                "sh",
                id,
            ])
        })
        .collect();
    wait_until("both hold a slot", || {
        shared.path("held.a").exists() && shared.path("held.b").exists()
    });
    let out = machines[2].run(&["status", "--json", "pool"]);
    assert_status(&out, 0);
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let slots = &seen[0]["slots"];
    assert_eq!(slots["count"], 2, "{seen}");
    let mut pids: Vec<u64> = slots["in_use"]
        .as_array()
        .expect("in_use")
        .iter()
        .map(|slot| slot["pid"].as_u64().expect("pid"))
        .collect();
    pids.sort_unstable();
    let mut expected: Vec<u64> = holders.iter().map(|h| u64::from(h.id())).collect();
    expected.sort_unstable();
    assert_eq!(pids, expected, "{seen}");
    // A waiter on the third machine runs once a holder lets go (woken by NOTIFY).
    let ran = shared.path("ran.c");
    let touch = format!("touch '{}'", ran.display());
    let waiter = machines[2].spawn(&[
        "--exclusive",
        "--slots",
        "2",
        "--wait",
        "10m",
        "pool",
        "--",
        "sh",
        "-c",
        &touch,
    ]);
    assert!(!ran.exists(), "ran while both slots were held");
    fs::write(&gate, "").expect("gate");
    for holder in holders {
        assert_status(&finish(holder), 0);
    }
    assert_status(&finish(waiter), 0);
    assert!(ran.exists());
}

/// Callers on different machines that disagree on N: the N recorded by the caller that
/// found every slot free holds until all holders have let go (docs/modes.md).
#[test]
fn callers_that_disagree_on_n_use_the_n_in_force_until_every_slot_is_free() {
    let Some(pg) = Postgres::start() else { return };
    let shared = Shared::new();
    let machines: Vec<Machine> = (0..3).map(|_| Machine::of(&pg)).collect();
    let dir = shared.dir.path().display().to_string();
    let hold =
        format!("touch '{dir}/held.'$1; while [ ! -e '{dir}/gate.'$1 ]; do sleep 0.01; done");
    let slotted = |machine: &Machine, n: &str, id: &str| {
        machine.spawn(&[
            "--exclusive",
            "--slots",
            n,
            "w",
            "--",
            "sh",
            "-c",
            &hold,
            "sh",
            id,
        ])
    };
    let count = |machine: &Machine| {
        let out = machine.run(&["status", "--json", "w"]);
        assert_status(&out, 0);
        let seen: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        seen[0]["slots"]["count"].clone()
    };
    let first = slotted(&machines[0], "2", "a");
    wait_until("the first caller holds a slot", || {
        shared.path("held.a").exists()
    });
    // Says 3, but 2 are in force: takes the second slot.
    let second = slotted(&machines[1], "3", "b");
    wait_until("the second caller holds a slot", || {
        shared.path("held.b").exists()
    });
    assert_eq!(count(&machines[2]), 2);
    // Says 3 too: both slots in force are in use, so it waits (and gives up).
    let ran = shared.path("ran.c");
    let touch = format!("touch '{}'", ran.display());
    let third = machines[2].run(&[
        "--exclusive",
        "--slots",
        "3",
        "--wait",
        "300ms",
        "w",
        "--",
        "sh",
        "-c",
        &touch,
    ]);
    assert_status(&third, 75);
    assert!(
        stderr(&third).contains("all 3 slots still in use"),
        "{}",
        stderr(&third)
    );
    assert!(!ran.exists(), "a third run while 2 are in force");
    for (id, caller) in [("a", first), ("b", second)] {
        fs::write(shared.path(&format!("gate.{id}")), "").expect("gate");
        assert_status(&finish(caller), 0);
    }
    // Every slot is free: the next caller's N is the one in force.
    let fourth = slotted(&machines[2], "3", "d");
    wait_until("the fourth caller holds a slot", || {
        shared.path("held.d").exists()
    });
    assert_eq!(count(&machines[0]), 3);
    fs::write(shared.path("gate.d"), "").expect("gate");
    assert_status(&finish(fourth), 0);
}

/// `singleflight NAME --ttl TTL -- sh -c 'cat OUT; echo run >> RUNS'`: prints what the
/// shared file `out` holds at the run, and counts its runs.
fn copy_call(shared: &Shared, name: &str, ttl: &str) -> Vec<String> {
    let script = format!(
        "cat '{}'; echo run >> '{}'",
        shared.path("out").display(),
        shared.path("runs").display()
    );
    [name, "--ttl", ttl, "--", "sh", "-c", &script]
        .map(str::to_owned)
        .to_vec()
}

fn assert_served(out: &Output, expected: &str) {
    assert_eq!(
        (common::status(out), stdout(out).as_str()),
        (0, expected),
        "{}",
        stderr(out)
    );
}

/// `args` with `options` before them.
fn with(options: &[&str], args: &[String]) -> Vec<String> {
    options
        .iter()
        .map(|o| o.to_string())
        .chain(args.iter().cloned())
        .collect()
}

/// A fresh result is kept in a machine's local copy (`NAME.fleet`) wherever the
/// machine comes to hold it: the run that stored it (A), a waiter woken by its
/// release (B), a later read (C). Every one of them then serves it with the server
/// frozen (SIGSTOP: a call that asks it gives up after --backend-timeout, exit 125, as
/// D, which holds no copy, shows), by the hit before clap and by the full path (`-v`);
/// the hit before clap reads no TLS file (which tells it from the full path). The copy
/// names the server, database, schema and slot, and holds no password.
#[test]
fn a_fresh_result_is_served_from_the_local_copy_without_asking_the_server() {
    let Some(pg) = Postgres::start() else { return };
    let shared = Shared::new();
    fs::write(shared.path("out"), "one\n").unwrap();
    let (a, b, c, d) = (
        Machine::of(&pg),
        Machine::of(&pg),
        Machine::of(&pg),
        Machine::of(&pg),
    );
    let gate = shared.path("gate");
    let script = format!(
        "echo run >> '{}'; while [ ! -e '{}' ]; do sleep 0.01; done; cat '{}'",
        shared.path("runs").display(),
        gate.display(),
        shared.path("out").display()
    );
    let args: Vec<String> = [
        "copied",
        "--ttl",
        "1h",
        "--timeout",
        "1h",
        "--backend-timeout",
        "20s",
        "--",
        "sh",
        "-c",
        &script,
    ]
    .map(str::to_owned)
    .to_vec();
    let holder = a.spawn(&args.iter().map(String::as_str).collect::<Vec<_>>());
    wait_until("A runs the command", || shared.runs() == 1);
    let waiter = b.spawn(&args.iter().map(String::as_str).collect::<Vec<_>>());
    wait_until("B listens for the release", || {
        pg.psql(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_notify($2, $3)%' \
             AND pid <> pg_backend_pid()",
        )
        .parse::<usize>()
        .is_ok_and(|n| n >= 1)
    });
    fs::write(&gate, "").unwrap();
    assert_served(&finish(holder), "one\n");
    assert_served(&finish(waiter), "one\n");
    assert_served(
        &c.run(&args.iter().map(String::as_str).collect::<Vec<_>>()),
        "one\n",
    );
    assert_eq!(shared.runs(), 1);
    pg.freeze();
    // A call that asks the frozen server gives up after 1s.
    let quick: Vec<&str> = args
        .iter()
        .map(|arg| if arg == "20s" { "1s" } else { arg.as_str() })
        .collect();
    let outs: Vec<(&str, Output)> = [(&a, "A"), (&b, "B"), (&c, "C")]
        .into_iter()
        .flat_map(|(machine, who)| {
            let full: Vec<&str> = ["-v"].into_iter().chain(quick.iter().copied()).collect();
            [(who, machine.run(&quick)), (who, machine.run(&full))]
        })
        .collect();
    let unserved = d.run(&quick);
    // The hit before clap opens no backend: it reads no TLS file, which the full path
    // reads (and refuses, exit 125) before it would send anything.
    let missing_ca = format!(
        "postgres://postgres@127.0.0.1:{}/postgres?sslmode=verify-full&sslrootcert={}",
        pg.port,
        shared.path("missing-ca.pem").display()
    );
    let quick_owned: Vec<String> = quick.iter().map(|a| a.to_string()).collect();
    let tls_fast = with(&["--backend", &missing_ca], &quick_owned);
    let tls_fast = c.run(&tls_fast.iter().map(String::as_str).collect::<Vec<_>>());
    let tls_full = with(&["-v", "--backend", &missing_ca], &quick_owned);
    let tls_full = c.run(&tls_full.iter().map(String::as_str).collect::<Vec<_>>());
    // Refused by clap or Pg::open though a fresh copy is there.
    let refused: Vec<(i32, Output)> = [
        (2, with(&["--etcd-cert", "c.pem"], &args)),
        (2, with(&["--pg-schema", "Bad"], &args)),
        (
            125,
            with(
                &[
                    "--backend",
                    &format!("{}&sslcert=/nonexistent.pem", pg.url()),
                ],
                &args,
            ),
        ),
    ]
    .into_iter()
    .map(|(code, args)| {
        (
            code,
            c.run(&args.iter().map(String::as_str).collect::<Vec<_>>()),
        )
    })
    .collect();
    pg.thaw();
    for (who, out) in &outs {
        assert_served(out, "one\n");
        assert!(!stderr(out).contains("warning"), "{who}: {}", stderr(out));
    }
    assert_status(&unserved, 125);
    assert_served(&tls_fast, "one\n");
    assert_status(&tls_full, 125);
    assert!(
        stderr(&tls_full).contains("sslrootcert"),
        "{}",
        stderr(&tls_full)
    );
    for (code, out) in &refused {
        assert_status(out, *code);
        assert_eq!(stdout(out), "");
    }
    assert_eq!(shared.runs(), 1);
    for (machine, who) in [
        (&a, "A, which ran"),
        (&b, "B, woken"),
        (&c, "C, which read"),
    ] {
        let copy = fs::read(machine.env.cache.join("copied.fleet"))
            .unwrap_or_else(|e| panic!("{who} kept a copy: {e}"));
        let text = String::from_utf8_lossy(&copy);
        let source = format!(
            "postgres://127.0.0.1:{}/postgres schema singleflight\ncopied",
            pg.port
        );
        assert!(text.contains(&source), "{who}: the source: {text:?}");
        assert!(!text.contains(PASSWORD), "{who}: no password in {text:?}");
    }
}

/// A `clear` on another machine is seen once the local copy is past the result's own
/// TTL (2s), even by a caller with a longer --ttl; a `clear` on this machine drops its
/// copy at once.
#[test]
fn a_clear_on_another_machine_is_seen_once_the_copy_is_past_the_results_ttl() {
    let Some(pg) = Postgres::start() else { return };
    let shared = Shared::new();
    let (a, b) = (Machine::of(&pg), Machine::of(&pg));
    let short = copy_call(&shared, "m", "2s");
    let long = copy_call(&shared, "m", "1h");
    let run = |machine: &Machine, args: &[String]| {
        machine.run(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    fs::write(shared.path("out"), "one\n").unwrap();
    assert_served(&run(&a, &short), "one\n");
    assert_served(&run(&b, &long), "one\n");
    assert!(b.env.cache.join("m.fleet").is_file(), "B kept a copy");
    assert_status(&a.run(&["clear", "m"]), 0);
    fs::write(shared.path("out"), "two\n").unwrap();
    let mut outputs = Vec::new();
    wait_until("B runs the command after the clear", || {
        let out = run(&b, &long);
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
    // B's run kept a copy; B's own clear drops it, and B runs again.
    assert!(b.env.cache.join("m.fleet").is_file(), "B's run kept a copy");
    assert_status(&b.run(&["clear", "m"]), 0);
    assert!(
        !b.env.cache.join("m.fleet").exists(),
        "B's clear dropped it"
    );
    fs::write(shared.path("out"), "three\n").unwrap();
    assert_served(&run(&b, &long), "three\n");
    assert_eq!(shared.runs(), 3);
}

/// A damaged copy is never served (the server's result cleared meanwhile, the
/// caller runs): a flipped byte where only the copy's checksum can tell (its
/// revision), then one in the result. A copy of another schema is not served either.
#[test]
fn a_damaged_copy_or_one_of_another_schema_is_never_served() {
    let Some(pg) = Postgres::start() else { return };
    let shared = Shared::new();
    let (a, b) = (Machine::of(&pg), Machine::of(&pg));
    let long = copy_call(&shared, "d", "1h");
    let run = |machine: &Machine, args: &[String]| {
        machine.run(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    fs::write(shared.path("out"), "one\n").unwrap();
    assert_served(&run(&a, &long), "one\n");
    assert_served(&run(&b, &long), "one\n");
    let copy = b.env.cache.join("d.fleet");
    assert!(copy.is_file(), "B kept a copy");
    // Another schema is another fleet: B runs there, its copy notwithstanding.
    fs::write(shared.path("out"), "elsewhere\n").unwrap();
    assert_served(
        &run(&b, &with(&["--pg-schema", "elsewhere"], &long)),
        "elsewhere\n",
    );
    assert_eq!(shared.runs(), 2);
    // That run kept a copy of the other schema's result: back to B's own.
    assert_served(&run(&b, &long), "one\n");
    assert_eq!(shared.runs(), 2);
    let mut last = "one".to_owned();
    for (damage, next) in [(16usize, "two"), (usize::MAX, "three")] {
        let mut bytes = fs::read(&copy).expect("B keeps a copy");
        let at = damage.min(bytes.len() / 2);
        bytes[at] ^= 0x01;
        fs::write(&copy, &bytes).unwrap();
        assert_status(&a.run(&["clear", "d"]), 0);
        fs::write(shared.path("out"), format!("{next}\n")).unwrap();
        for args in [long.clone(), with(&["-v"], &long)] {
            let out = run(&b, &args);
            assert_ne!(
                stdout(&out),
                format!("{last}\n"),
                "byte {at} damaged: served"
            );
            assert_served(&out, &format!("{next}\n"));
        }
        last = next.to_owned();
    }
    assert_eq!(shared.runs(), 4);
}
