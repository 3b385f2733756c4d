//! One login per machine: callers of one cache dir that find no token kept (see
//! `token_file`) take turns at a lock beside the token file. The first logs in and
//! keeps its token; each of the others, in its turn, finds that token kept and uses
//! it. Without the turns every caller of a herd logs in at once, and etcd checks each
//! password with bcrypt: sixty at once keep it busy for seconds, past the backend
//! timeout, and the herd exits 125 "etcd unreachable".
//!
//! The lock is `etcd-<hash>.login` (the token file's hash), taken as a NAME's lock is:
//! flock on a file that is never deleted, so the kernel frees it when its holder dies.
//! Not `.lock`: a NAME's lock file is listed by `status` and aged by `clear
//! --older-than`. Best effort, as the token file is: a turn that cannot be had (an
//! unusable cache dir, a lock that stays held) only means the caller logs in without
//! it, as it did before.

use std::path::PathBuf;
use std::time::Duration;

use crate::lock::{self, LockGuard};
use crate::store::Store;

/// The lock of one etcd and user's logins in one cache dir.
pub struct LoginLock {
    store: Store,
    path: PathBuf,
}

impl LoginLock {
    /// The lock at `path` in the cache dir `store`.
    pub fn new(store: Store, path: PathBuf) -> LoginLock {
        LoginLock { store, path }
    }

    /// This caller's turn to log in, queued for it at most `limit`; held until the
    /// guard drops. `None`: no turn (see the module's doc), log in without one.
    pub fn turn(&self, limit: Duration) -> Option<LockGuard> {
        self.store.ensure().ok()?;
        lock::exclusive_within(&self.path, limit).ok().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn login_lock(dir: &std::path::Path) -> LoginLock {
        let store = Store::locate(Some(dir.join("cache"))).unwrap();
        LoginLock::new(store, dir.join("cache").join("etcd-x.login"))
    }

    #[test]
    fn one_turn_at_a_time_and_the_next_when_it_ends() {
        let dir = tempfile::tempdir().unwrap();
        let lock = login_lock(dir.path());
        let first = lock.turn(Duration::ZERO).expect("a free lock is a turn");
        assert!(lock.turn(Duration::from_millis(1)).is_none(), "held");
        drop(first);
        // Queued (the waiter given up on above may take it first, and let it go).
        assert!(lock.turn(Duration::from_secs(60)).is_some(), "free again");
    }

    #[test]
    fn an_unusable_cache_dir_gives_no_turn() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cache"), "").unwrap();
        assert!(login_lock(dir.path()).turn(Duration::ZERO).is_none());
    }
}
