//! The lock of a NAME: an OS advisory lock (flock on Unix, LockFileEx on Windows) on a
//! file that is never deleted, so the kernel frees it when its holder dies. No PID
//! files, no age heuristics, no steals.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

/// A held exclusive lock; released when dropped (or when the process dies).
#[derive(Debug)]
pub struct LockGuard {
    file: File,
}

impl LockGuard {
    /// The lock a `--background` caller handed to its refresher as an open file.
    /// Owned already: turning the number the caller passed into an owned fd is the
    /// unsafe step, taken once, in `Slot::inherit`.
    #[cfg(unix)]
    pub fn inherited(fd: std::os::fd::OwnedFd) -> LockGuard {
        let file = File::from(fd);
        // It came without close-on-exec. The command must not inherit it: a process
        // of the run that outlived a killed refresher would hold the lock, and no
        // winner would ever come to kill it.
        let _ = rustix::io::fcntl_setfd(&file, rustix::io::FdFlags::CLOEXEC);
        LockGuard { file }
    }

    /// The locked file, so that a detached refresher can inherit the lock.
    #[cfg(unix)]
    pub fn file(&self) -> &File {
        &self.file
    }
}

/// Windows frees the locks of a closed handle only "when resources allow": unlock
/// first, so the next caller finds the lock free at once. (Not on Unix, where the lock
/// belongs to the open file, which a `--background` refresher may share.)
#[cfg(windows)]
impl Drop for LockGuard {
    fn drop(&mut self) {
        let _ = self.file.unlock();
    }
}

/// Releases a look at the lock (a shared lock taken only to see whether it is free).
fn release(file: File) {
    #[cfg(windows)]
    let _ = file.unlock();
    drop(file);
}

fn open(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        // A read-only cache dir still has its lock files, and a lock needs no write access.
        Err(e) if path.exists() => open_read_only(path).map_err(|_| e),
        other => other,
    }
}

/// Opens the lock file read-only without blocking: a FIFO in its place (damage) must
/// not hang `status` in `open`. A FIFO opened for writing (above) does not block.
fn open_read_only(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(&mut options, libc::O_NONBLOCK);
    options.open(path)
}

/// How many times a lock whose file was removed under us is taken again, at most.
const GONE_RETRIES: u32 = 100;

/// Takes the exclusive lock if nobody holds it; `None` if somebody does.
///
/// `clear --older-than` removes lock files, holding their lock. A caller that opened
/// the file before it was removed and locked it after holds a lock nobody else can
/// see: so, once locked, the path must still name the locked file; if it does not,
/// the caller opens the path again and retries.
pub fn try_exclusive(path: &Path) -> io::Result<Option<LockGuard>> {
    for _ in 0..GONE_RETRIES {
        let file = open(path)?;
        match file.try_lock() {
            Ok(()) if still_named(&file, path) => return Ok(Some(LockGuard { file })),
            Ok(()) => continue,
            Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
    }
    Err(io::Error::other(format!(
        "{} keeps being removed while it is locked",
        path.display()
    )))
}

/// Whether `path` still names the open (locked) `file`: the same device and inode.
/// (Windows: lock files are never removed, so it always does.)
pub fn still_named(file: &File, path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (file.metadata(), std::fs::symlink_metadata(path)) {
            (Ok(held), Ok(named)) => held.dev() == named.dev() && held.ino() == named.ino(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (file, path);
        true
    }
}

/// Whether somebody holds the lock now, without taking it for longer than a look.
pub fn is_held(path: &Path) -> io::Result<bool> {
    if !path.exists() {
        return Ok(false);
    }
    let file = open_read_only(path)?;
    match file.try_lock_shared() {
        Ok(()) => {
            release(file);
            Ok(false)
        }
        Err(std::fs::TryLockError::WouldBlock) => Ok(true),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

/// Waits until the current holder (a run in flight) releases the lock, for at most
/// `limit`. Returns whether it was released in time. Waiters share the lock, so they
/// never hold up each other; it is released again at once.
pub fn wait_released(path: &Path, limit: Duration) -> io::Result<bool> {
    let file = open(path)?;
    if file.try_lock_shared().is_ok() {
        release(file);
        return Ok(true);
    }
    // flock has no timeout: block on a thread and stop listening at the deadline. A
    // thread still blocked then ends with the process, which exits right after.
    let (sender, receiver) = mpsc::channel();
    thread::spawn(move || {
        let result = file.lock_shared();
        if result.is_ok() {
            release(file);
        }
        let _ = sender.send(result);
    });
    match receiver.recv_timeout(limit) {
        Ok(result) => result.map(|()| true),
        Err(_) => Ok(false),
    }
}

/// Takes the exclusive lock, waiting as long as it takes (for `clear`). Retries on a
/// lock file removed meanwhile, as [`try_exclusive`] does.
pub fn exclusive(path: &Path) -> io::Result<LockGuard> {
    for _ in 0..GONE_RETRIES {
        let file = open(path)?;
        file.lock()?;
        if still_named(&file, path) {
            return Ok(LockGuard { file });
        }
    }
    Err(io::Error::other(format!(
        "{} keeps being removed while it is locked",
        path.display()
    )))
}

/// Takes the exclusive lock, queued for it (a blocking flock) for at most `limit`;
/// `None` if it stayed held that long. Unlike a loop of [`try_exclusive`] and
/// [`wait_released`], a queued caller cannot lose every turn to callers that take the
/// lock the moment it is let go (`clear` in a loop).
pub fn exclusive_within(path: &Path, limit: Duration) -> io::Result<Option<LockGuard>> {
    if let Some(guard) = try_exclusive(path)? {
        return Ok(Some(guard));
    }
    let queued = path.to_owned();
    // flock has no timeout: block on a thread and stop listening at the deadline. A
    // lock the thread takes after that is let go at once: its send fails and the
    // guard drops. A thread that cannot be started (EAGAIN under a pids limit) is
    // no failure: try the lock again and again instead, unqueued.
    let (sender, receiver) = mpsc::channel();
    let queue = thread::Builder::new()
        .name("lock-queue".to_owned())
        .spawn(move || {
            let _ = sender.send(exclusive(&queued));
        });
    if queue.is_err() {
        return try_exclusive_for(path, limit);
    }
    match receiver.recv_timeout(limit) {
        Ok(result) => result.map(Some),
        Err(_) => Ok(None),
    }
}

/// Takes the exclusive lock, trying for up to `limit`; `None` if it stayed held. For
/// the Windows refresher, which cannot inherit its caller's lock and takes it over
/// once the caller lets go; and for [`exclusive_within`] when it cannot start the
/// thread that queues.
pub fn try_exclusive_for(path: &Path, limit: Duration) -> io::Result<Option<LockGuard>> {
    let deadline = crate::values::later(std::time::Instant::now(), limit);
    loop {
        if let Some(guard) = try_exclusive(path)? {
            return Ok(Some(guard));
        }
        if std::time::Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(10));
    }
}
