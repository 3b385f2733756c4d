//! Process start-up for the executable's own entry point on Linux (glibc or musl), which
//! skips std's runtime set-up (see `main.rs`): the part of it singleflight relies on.

/// What std would have done before `main`, minus its stack-overflow handler:
/// - fds 0, 1 and 2 are made open (on `/dev/null` if closed), so that no file
///   singleflight opens later becomes its own stdout or stderr;
/// - SIGPIPE is ignored, so that writing to a reader that went away (`| head`) is an
///   `EPIPE` error rather than death. std resets it to the default in every command it
///   spawns, as it does after its own set-up.
///
/// Call once, first thing, before any other thread exists.
pub fn prepare() {
    // SAFETY: poll, open and signal are called with valid arguments; no Rust object
    // owns fds 0-2 yet, and no other thread exists to race with.
    unsafe {
        let mut standard = [0, 1, 2].map(|fd| libc::pollfd {
            fd,
            events: 0,
            revents: 0,
        });
        let polled = loop {
            let n = libc::poll(standard.as_mut_ptr(), 3, 0);
            if n != -1 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted
            {
                break n;
            }
        };
        for pfd in &standard {
            let closed = if polled == -1 {
                libc::fcntl(pfd.fd, libc::F_GETFD) == -1
            } else {
                pfd.revents & libc::POLLNVAL != 0
            };
            // The lowest free fd is the one just found closed: 0 to 2 are checked in order.
            if closed && libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) == -1 {
                std::process::abort();
            }
        }
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
}
