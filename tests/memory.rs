//! A 100 MiB result passes through singleflight in bounded memory. Alone in its own
//! test binary, so that the peak RSS of waited-for children is singleflight's own.
//! Unix only: the peak is getrusage(2)'s.
#![cfg(unix)]

mod common;

use common::TestEnv;

#[test]
fn a_100_mib_output_is_streamed_not_held_in_memory() {
    let env = TestEnv::new();
    let script = "head -c 104857600 /dev/zero";
    for pass in ["run", "hit"] {
        let out = env
            .command()
            .args(["big", "--max-output", "200MiB", "--", "sh", "-c", script])
            .stdout(std::fs::File::create("/dev/null").unwrap())
            .status()
            .unwrap();
        assert_eq!(out.code(), Some(0), "{pass}");
    }
    // SAFETY: getrusage only writes the struct it is given.
    let peak_kib = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        assert_eq!(libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage), 0);
        usage.ru_maxrss as u64
    };
    assert!(
        peak_kib < 32 * 1024,
        "peak RSS {peak_kib} KiB for a 100 MiB result"
    );
}
