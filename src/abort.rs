//! A trip wire for a run, pulled from another thread: how a lock that can be lost while
//! held (an etcd lease) stops the run it guards. `backend` trips it, `command` arms it.

use std::sync::Mutex;

/// Tripped before the spawn, the command never starts; during the run, its tree is
/// stopped as on a timeout (TERM, `--kill-after`, KILL) and the outcome is
/// `Outcome::LeaseLost`.
#[derive(Default)]
pub struct Abort {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    reason: Option<String>,
    /// Wakes the run in flight, if one is armed.
    wake: Option<Box<dyn FnOnce() + Send>>,
}

impl Abort {
    /// Stops the run (at most once; later reasons are dropped).
    #[cfg_attr(
        not(feature = "etcd"),
        allow(dead_code, reason = "only an etcd lease trips it")
    )]
    pub fn trip(&self, reason: String) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.reason.is_none() {
            state.reason = Some(reason);
            if let Some(wake) = state.wake.take() {
                wake();
            }
        }
    }

    /// Why it was tripped, if it was.
    pub fn reason(&self) -> Option<String> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.reason.clone()
    }

    /// Connects the wire to a run: `wake` is called once if it trips. `false` if it was
    /// tripped already.
    pub fn arm(&self, wake: impl FnOnce() + Send + 'static) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.wake = Some(Box::new(wake));
        state.reason.is_none()
    }

    /// Disconnects the wire from a run that is over.
    pub fn disarm(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.wake = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn a_trip_wakes_the_armed_run_once_and_keeps_the_first_reason() {
        let abort = Abort::default();
        let (woken, wakes) = mpsc::channel();
        assert!(abort.arm(move || woken.send(()).unwrap()));
        abort.trip("lease lost".to_owned());
        abort.trip("later".to_owned());
        assert_eq!(wakes.try_iter().count(), 1);
        assert_eq!(abort.reason().as_deref(), Some("lease lost"));
        // Tripped already: a new run is refused at once.
        assert!(!abort.arm(|| {}));
    }
}
