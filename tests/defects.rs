//! Regression tests for the defects of issue 12: each names a defect that a user
//! found by trying to break singleflight, and fails if it comes back.

mod common;

use std::fs;

use common::*;

// ---- 2. Huge durations ----------------------------------------------------------

/// Every duration option refuses a value past the limit at parse time, with a usage
/// error that says what the limit is, before anything runs or is written.
#[test]
fn huge_durations_are_usage_errors_that_name_the_limit() {
    let env = TestEnv::new();
    let huge = "10000000000000000000";
    for option in [
        "--ttl",
        "--timeout",
        "--kill-after",
        "--wait",
        "--max-stale",
        "--retry-after",
        "--backend-timeout",
    ] {
        let out = env.run([option, huge, "huge", "--", "echo", "ran"]);
        assert_eq!(status(&out), 2, "{option}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("36500d"),
            "{option}: the error names the limit: {}",
            stderr(&out)
        );
        assert!(stdout(&out).is_empty(), "{option}: nothing ran");
    }
    assert!(
        !env.cache.join("huge.run").exists(),
        "no run record left behind"
    );
}

/// At the limit everything works: the run, the default --wait (timeout +
/// kill-after), the stored ttl (not truncated), and the hit after it.
#[test]
fn durations_at_the_limit_run_store_and_serve() {
    let env = TestEnv::new();
    let args = [
        "--ttl",
        "36500d",
        "--timeout",
        "36500d",
        "--kill-after",
        "36500d",
        "limit",
        "--",
        "echo",
        "hi",
    ];
    for _ in 0..2 {
        let out = env.run(args);
        assert_eq!(status(&out), 0, "{}", stderr(&out));
        assert_eq!(stdout(&out), "hi\n");
    }
    let out = env.run(["status", "limit", "--json"]);
    assert_eq!(status(&out), 0, "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(json[0]["ttl_ms"], 36_500u64 * 86_400_000);
    assert_eq!(json[0]["state"], "fresh");
    // A loser with nothing servable waits with the default --wait, which does not
    // overflow either: it gets the run's result.
    let gate = env.fifo("gate");
    let script = env.script("slow", &format!("read x < {}; echo slow", gate.display()));
    let winner = env.spawn([
        "--timeout",
        "36500d",
        "--kill-after",
        "36500d",
        "slow",
        "--",
        script.to_str().expect("utf-8"),
    ]);
    wait_until("the winner runs", || env.cache.join("slow.run").exists());
    let loser = env.spawn([
        "--timeout",
        "36500d",
        "--kill-after",
        "36500d",
        "slow",
        "--",
        script.to_str().expect("utf-8"),
    ]);
    // The loser finds the lock held and waits, or (slower than the winner) finds the
    // fresh result: either way it is served the run's output.
    fs::write(&gate, "go\n").expect("open the gate");
    for child in [winner, loser] {
        let out = finish(child);
        assert_eq!(status(&out), 0, "{}", stderr(&out));
        assert_eq!(stdout(&out), "slow\n");
    }
}
