//! Keeping a run's lease alive: a thread that renews it every third of its TTL and
//! reports, once, the moment the lease can no longer be counted on.
//!
//! The lease is counted on until `last successful renewal sent + TTL`, measured on
//! our clock from when the request was *sent*: etcd restarts the TTL when it
//! receives the renewal, later, so etcd cannot free the lock before that moment.
//! The loss is reported `lead` before it ([`default_lead`]: a little), so that the
//! run's tree gets its SIGTERM while the lock is still ours.

use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread;
use std::time::{Duration, Instant};

use super::{Client, EtcdError, Lease, LeaseId};
use crate::values::{format_duration, later};

/// How soon a failed renewal is tried again (within what is left of the lease).
const RETRY: Duration = Duration::from_millis(250);

/// Why a lease can no longer be counted on.
#[derive(Debug, Clone)]
pub struct LeaseLost {
    pub lease: LeaseId,
    pub why: String,
}

/// Keeps a lease alive until stopped or dropped. Stopping does not revoke the lease.
pub struct LeaseKeeper {
    stop: Option<Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl LeaseKeeper {
    /// Starts renewing `lease`. `on_lost` is called at most once, from the keeper's
    /// thread, when etcd says the lease is gone, or when no renewal got through and
    /// the lease may expire within `lead`; the keeper stops then. A `lead` as long as
    /// the run's `--kill-after` would have the tree dead before the lock can pass on,
    /// at the price of giving up on shorter etcd hiccups.
    pub fn start(
        client: Client,
        lease: Lease,
        lead: Duration,
        on_lost: impl FnOnce(LeaseLost) + Send + 'static,
    ) -> std::io::Result<LeaseKeeper> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = thread::Builder::new()
            .name(format!("lease-{}", lease.id))
            .spawn(move || {
                if let Some(lost) = keep(&client, lease, lead, &stopped) {
                    on_lost(lost);
                }
            })?;
        Ok(LeaseKeeper {
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Stops renewing and waits for the thread (at most one request's timeout).
    pub fn stop(mut self) {
        self.stop.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for LeaseKeeper {
    /// Tells the thread to stop without waiting for it.
    fn drop(&mut self) {
        self.stop.take();
    }
}

/// A lead that leaves time to deliver SIGTERM before the lease may expire, and
/// gives up only after renewals failed for most of the TTL.
pub fn default_lead(ttl: Duration) -> Duration {
    (ttl / 10).min(Duration::from_millis(500))
}

/// Renews until told to stop (`None`) or the lease is lost (`Some`).
fn keep(
    client: &Client,
    lease: Lease,
    lead: Duration,
    stopped: &mpsc::Receiver<()>,
) -> Option<LeaseLost> {
    let interval = lease.ttl / 3;
    // The ttl is etcd's answer: formed with checked arithmetic, whatever it says.
    let mut expires = later(lease.granted_at, lease.ttl);
    let mut next = later(lease.granted_at, interval);
    let mut last_error: Option<EtcdError> = None;
    let lost = |why: String| {
        Some(LeaseLost {
            lease: lease.id,
            why,
        })
    };
    loop {
        match stopped.recv_timeout(next.saturating_duration_since(Instant::now())) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return None,
        }
        let give_up_at = expires.checked_sub(lead).unwrap_or(lease.granted_at);
        if Instant::now() >= give_up_at {
            let why = match &last_error {
                Some(e) => format!(
                    "no renewal of the {} lease got through ({e})",
                    format_duration(lease.ttl)
                ),
                None => "the lease was not renewed in time".to_owned(),
            };
            return lost(why);
        }
        let sent = Instant::now();
        match client.keep_alive_until(lease.id, Some(give_up_at)) {
            Ok(ttl) if !ttl.is_zero() => {
                expires = later(sent, ttl);
                next = later(sent, interval);
                last_error = None;
            }
            Ok(_) => return lost("etcd says the lease expired".to_owned()),
            Err(e) => {
                next = later(Instant::now(), RETRY).min(give_up_at);
                last_error = Some(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_lead_is_small_against_the_ttl() {
        assert_eq!(
            default_lead(Duration::from_secs(2)),
            Duration::from_millis(200)
        );
        assert_eq!(
            default_lead(Duration::from_secs(10)),
            Duration::from_millis(500)
        );
        assert_eq!(
            default_lead(Duration::from_secs(60)),
            Duration::from_millis(500)
        );
    }
}
