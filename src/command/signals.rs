//! Signals during a run: SIGINT, SIGTERM and SIGHUP (Ctrl+C and Ctrl+Break on
//! Windows) become events that stop the run's tree; after it, singleflight dies of
//! them as if it had no handler.

use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};

use super::Event;
use crate::exit::Status;
#[cfg(windows)]
use crate::reap;

/// Ends singleflight by `signal` as if it had no handler for it, so that its parent
/// sees it killed by the signal: a shell shows 128+N, and a shell loop stops on Ctrl-C
/// (bash goes on with a loop whose child merely *exits* 130). Call it with nothing
/// left to clean up. Returns 128+N where the signal cannot be raised.
pub fn die_of(signal: i32) -> i32 {
    #[cfg(unix)]
    let _ = signal_hook::low_level::emulate_default_handler(signal);
    Status::Signaled(signal).code()
}

/// Whether `signal` is ignored now (inherited across exec as ignored).
#[cfg(unix)]
fn ignored(signal: i32) -> bool {
    // SAFETY: sigaction with a null new action only reads the current one into `old`.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(signal, std::ptr::null(), &mut old) == 0
            && old.sa_sigaction == libc::SIG_IGN
    }
}

/// Turns SIGINT, SIGTERM and SIGHUP (on Windows: Ctrl+C and Ctrl+Break) into events
/// while a run is in flight. Once the run is over such a signal ends singleflight at
/// once by its default action: a caller that is saving or printing a result obeys it. (Closing signal-hook's iterator
/// instead would leave the signals ignored: unregistering does not restore the
/// default action.)
pub(super) struct SignalForwarder {
    /// Taken when the run is over; the lock orders each signal before or after that.
    events: Arc<Mutex<Option<Sender<Event>>>>,
}

impl SignalForwarder {
    /// Fails only where the OS refuses the thread that forwards them; the signals keep
    /// their default action then.
    pub(super) fn start(events: Sender<Event>) -> std::io::Result<SignalForwarder> {
        let events = Arc::new(Mutex::new(Some(events)));
        #[cfg(unix)]
        {
            use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
            // Without handlers the signals keep their default action: singleflight
            // dies, and the death signal and the next winner stop the tree.
            // A signal ignored when we started stays ignored (`nohup singleflight …`, a
            // background job of a script): the classic `if (signal(…) != SIG_IGN)`.
            let wanted: Vec<i32> = [SIGINT, SIGTERM, SIGHUP]
                .into_iter()
                .filter(|&s| !ignored(s))
                .collect();
            if let Ok(mut signals) = signal_hook::iterator::Signals::new(&wanted) {
                let events = Arc::clone(&events);
                let forwarding = crate::threads::start("signals", move || {
                    for signal in signals.forever() {
                        let slot = events.lock().unwrap_or_else(|e| e.into_inner());
                        let sent = slot
                            .as_ref()
                            .is_some_and(|events| events.send(Event::Signal(signal)).is_ok());
                        if !sent {
                            die_of(signal);
                        }
                    }
                });
                if let Err(e) = forwarding {
                    for signal in wanted {
                        // SAFETY: restores the default action, as if no handler had
                        // been installed; nothing is left to forward to.
                        unsafe { libc::signal(signal, libc::SIG_DFL) };
                    }
                    return Err(e);
                }
            }
        }
        #[cfg(windows)]
        {
            let events = Arc::clone(&events);
            reap::windows::on_ctrl(Some(Box::new(move |signal| {
                let slot = events.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(events) = slot.as_ref() {
                    let _ = events.send(Event::Signal(signal));
                }
            })));
        }
        Ok(SignalForwarder { events })
    }

    /// Ends forwarding; returns the signals that came before and are still queued.
    pub(super) fn stop(self, receiver: &Receiver<Event>) -> Vec<i32> {
        self.events.lock().unwrap_or_else(|e| e.into_inner()).take();
        #[cfg(windows)]
        reap::windows::on_ctrl(None);
        receiver
            .try_iter()
            .filter_map(|event| match event {
                Event::Signal(signal) => Some(signal),
                _ => None,
            })
            .collect()
    }
}
