//! Helper threads, which the OS may refuse: EAGAIN from `clone3` is what a pids cgroup
//! limit or `RLIMIT_NPROC` gives, in exactly the process storms singleflight is for.
//! `thread::spawn` panics then; these return the error for the caller to handle.

use std::io;
use std::sync::mpsc::{self, Sender};
use std::thread::{self, JoinHandle};

/// Starts `work` on a thread named `name`, or says why the OS refused.
pub fn start<T: Send + 'static>(
    name: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> io::Result<JoinHandle<T>> {
    thread::Builder::new().name(name.to_owned()).spawn(work)
}

/// Starts a thread now for work whose input exists only later (the command's pipes,
/// its `Child`), so that a refused thread is known before anything is started. The
/// thread runs `work` on what is sent; dropping the sender unsent ends it.
pub fn start_waiting<I: Send + 'static>(
    name: &str,
    work: impl FnOnce(I) + Send + 'static,
) -> io::Result<Sender<I>> {
    let (sender, receiver) = mpsc::channel();
    start(name, move || {
        if let Ok(input) = receiver.recv() {
            work(input);
        }
    })?;
    Ok(sender)
}

/// The message for a refused thread: what it was for, and the OS's reason.
pub fn refused(what: &str, error: &io::Error) -> String {
    format!("cannot start a thread to {what}: {error}")
}
