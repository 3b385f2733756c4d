mod common;

use common::TestEnv;

#[test]
fn a_fresh_hit_serves_the_first_run() {
    let env = TestEnv::new();
    let counter = env.counter();
    let cmd = format!("echo run >> {}; echo hello", counter.display());
    for _ in 0..3 {
        env.sf().args(["greet", "--", "sh", "-c", &cmd]).assert().success().stdout("hello\n");
    }
    assert_eq!(env.runs(), 1);
}
