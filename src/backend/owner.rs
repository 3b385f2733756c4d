//! Who holds a fleet lock: the holder writes its host, pid and start beside the lock
//! (the etcd lock key, the PostgreSQL lock row), and `status` on any machine reads it.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::InFlight;
use crate::entry;

#[derive(Serialize, Deserialize)]
struct Owner {
    host: String,
    pid: u32,
    started_at_ms: u64,
}

/// This process, as a lock's owner, in JSON.
pub(super) fn this_process() -> String {
    let owner = Owner {
        host: hostname(),
        pid: std::process::id(),
        started_at_ms: entry::now_ms(SystemTime::now()),
    };
    serde_json::to_string(&owner).expect("Owner serializes")
}

/// Who runs under a lock, from what its holder wrote; nothing known if unreadable.
pub(super) fn in_flight(owner: &[u8]) -> InFlight {
    match serde_json::from_slice::<Owner>(owner) {
        Ok(owner) => InFlight {
            pid: Some(owner.pid),
            command_pid: None,
            started_at_ms: Some(owner.started_at_ms),
            host: Some(owner.host),
        },
        Err(_) => InFlight {
            pid: None,
            command_pid: None,
            started_at_ms: None,
            host: None,
        },
    }
}

/// This machine's name, for `status` of a run in flight.
fn hostname() -> String {
    #[cfg(unix)]
    {
        rustix::system::uname()
            .nodename()
            .to_string_lossy()
            .into_owned()
    }
    #[cfg(not(unix))]
    {
        std::env::var("COMPUTERNAME").unwrap_or_default()
    }
}
