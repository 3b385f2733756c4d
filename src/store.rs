//! The cache dir: where it is, creating it `0700` and refusing one that another user
//! could write into, the file names of a NAME, atomic replacement, removing the temp
//! files of runs that are over.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
#[cfg(unix)]
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};

use crate::exit::{Exit, Status};
use crate::key::SlotId;
use crate::values::Name;

/// A temp file younger than this is never removed, even with its lock free: its run
/// may be between creating it and locking it. Age alone never removes one.
#[cfg(unix)]
const TEMP_GRACE: Duration = Duration::from_secs(60);
/// Every temp file starts with this, so cleanup never touches anything else.
const TEMP_PREFIX: &str = ".tmp.";

/// The files of one slot of a NAME (`NAME.*`, or `NAME@<key>.*` with key flags).
#[derive(Clone)]
pub struct Paths {
    /// The cached result: header, stdout, metadata (see `entry`).
    pub result: PathBuf,
    /// The advisory lock; never deleted.
    pub lock: PathBuf,
    /// The last failed run (see `record`).
    pub failure: PathBuf,
    /// The run in flight, so that a later winner can kill what a killed run left.
    pub run: PathBuf,
    /// The key values of a keyed slot, for `status` (see `key`).
    pub key: PathBuf,
}

impl Paths {
    /// A `--service` NAME's record of its instances (`NAME.service`). Formed when
    /// asked, not with the others: a hit never needs it.
    pub fn service(&self) -> PathBuf {
        self.result.with_extension("service")
    }

    /// A `--service` NAME's mark that its running instance passed `--ready`
    /// (`NAME.ready`: the instance's number), written by the callers that saw it pass.
    pub fn ready(&self) -> PathBuf {
        self.result.with_extension("ready")
    }

    /// The mark `singleflight stop` leaves for the run it stops (`NAME.stopping`: the
    /// pid of the singleflight it signals, and its own), so that the run records that
    /// it was stopped, and by what, rather than "got signal 15".
    pub fn stopping(&self) -> PathBuf {
        self.result.with_extension("stopping")
    }

    /// The last run of an `--exclusive` NAME (`NAME.last`), for `status`.
    pub fn last(&self) -> PathBuf {
        self.result.with_extension("last")
    }

    /// A `--service` NAME's log, its instance's stdout and stderr (`NAME.log`).
    pub fn log(&self) -> PathBuf {
        self.result.with_extension("log")
    }
}

#[derive(Clone, Debug)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// The cache dir to use: `--cache-dir` / `SINGLEFLIGHT_CACHE_DIR`, else the
    /// platform's cache dir + `singleflight`. Nothing is touched on disk.
    pub fn locate(explicit: Option<PathBuf>) -> Result<Store> {
        let dir = match explicit {
            Some(dir) => dir,
            None => dirs::cache_dir()
                .ok_or_else(|| {
                    Exit::new(
                        Status::Internal,
                        "no cache dir: set HOME, SINGLEFLIGHT_CACHE_DIR or --cache-dir",
                    )
                })?
                .join("singleflight"),
        };
        Ok(Store { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn paths(&self, slot: &SlotId) -> Paths {
        let file = |extension: &str| self.dir.join(format!("{slot}.{extension}"));
        Paths {
            result: file("result"),
            lock: file("lock"),
            failure: file("failure"),
            run: file("run"),
            key: file("key"),
        }
    }

    /// The result file of a slot alone: what a hit reads (see [`paths`](Store::paths)).
    pub fn result_path(&self, slot: &SlotId) -> PathBuf {
        self.dir.join(format!("{slot}.result"))
    }

    /// Checks the dir if it exists: `Ok(false)` when it does not (nothing is cached).
    /// This is the only check on the hit path: one `stat`.
    pub fn verify_existing(&self) -> Result<bool> {
        match fs::metadata(&self.dir) {
            Ok(meta) => self.verify(&meta).map(|()| true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(self.unusable(&e.to_string())),
        }
    }

    /// Creates the dir (`0700`) if needed and checks it.
    pub fn ensure(&self) -> Result<()> {
        if self.verify_existing()? {
            return Ok(());
        }
        let mut builder = fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder
            .create(&self.dir)
            .map_err(|e| self.unusable(&format!("cannot create it: {e}")))?;
        let meta = fs::metadata(&self.dir).map_err(|e| self.unusable(&e.to_string()))?;
        self.verify(&meta)
    }

    fn verify(&self, meta: &fs::Metadata) -> Result<()> {
        if !meta.is_dir() {
            return Err(self.unusable("it is not a directory"));
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            let me = rustix::process::geteuid().as_raw();
            if meta.uid() != me {
                return Err(self.unusable(&format!(
                    "it is owned by uid {}, not by you (uid {me})",
                    meta.uid()
                )));
            }
            let mode = meta.mode() & 0o7777;
            let writers = match (mode & 0o020 != 0, mode & 0o002 != 0) {
                (true, true) => Some("its group and others"),
                (true, false) => Some("its group"),
                (false, true) => Some("others"),
                (false, false) => None,
            };
            if let Some(writers) = writers {
                return Err(self.unusable(&format!(
                    "it is writable by {writers} (mode {mode:04o}); run chmod 700 on it"
                )));
            }
        }
        Ok(())
    }

    fn unusable(&self, reason: &str) -> anyhow::Error {
        Exit::new(
            Status::Internal,
            format!("cache dir {} is unusable: {reason}", self.dir.display()),
        )
        .into()
    }

    /// A new temp file in the cache dir (`0600`), to be renamed over a real name.
    ///
    /// It carries the lock of the run that writes it (flock, held by our open file
    /// until it is closed or we die): [`remove_stale_temps`](Store::remove_stale_temps)
    /// removes only temp files whose lock is free, so never one of a run in flight,
    /// however long it stays quiet. Nobody else waits for this lock, so taking it does
    /// not block. (Not on Windows, where a lock would keep readers out of the result
    /// this file becomes.)
    pub fn temp_file(&self, name: &Name) -> io::Result<tempfile::NamedTempFile> {
        let temp = tempfile::Builder::new()
            .prefix(&format!("{TEMP_PREFIX}{name}."))
            .tempfile_in(&self.dir)?;
        #[cfg(unix)]
        temp.as_file().lock()?;
        Ok(temp)
    }

    /// Writes `bytes` to `path` all at once: temp file, rename. With `durable`, the
    /// file and the dir are fsynced too.
    pub fn write_atomically(
        &self,
        name: &Name,
        path: &Path,
        bytes: &[u8],
        durable: bool,
    ) -> Result<()> {
        let mut temp = self.temp_file(name)?;
        temp.write_all(bytes)?;
        if durable {
            temp.as_file().sync_all()?;
        }
        persist(temp, path).with_context(|| format!("cannot replace {}", path.display()))?;
        if durable {
            self.sync_dir();
        }
        Ok(())
    }

    /// Makes a rename in the cache dir durable. Best effort: not every platform can
    /// open a directory to fsync it (Windows cannot, and needs not: NTFS journals it).
    pub fn sync_dir(&self) {
        #[cfg(unix)]
        if let Ok(dir) = File::open(&self.dir) {
            let _ = dir.sync_all();
        }
    }

    /// Removes the temp files of runs that are provably over: their lock (see
    /// [`temp_file`](Store::temp_file)) is free, which the kernel makes so when the
    /// run's singleflight dies, however it dies. Never by age alone: a quiet run may
    /// print nothing for hours. Only files singleflight wrote are touched: named as
    /// its temp files are, regular, ours, and found in the opened cache dir, checked
    /// again through its descriptor (a symlinked cache dir is its target; see
    /// [`CacheDir`]). Windows: nothing is removed, since nothing proves a temp file's
    /// run is over there.
    pub fn remove_stale_temps(&self) {
        #[cfg(unix)]
        {
            let Some(dir) = self.open_dir() else {
                return;
            };
            let now = SystemTime::now();
            dir.for_each_file(|file_name, file, meta| {
                if !is_temp_name(file_name) {
                    return;
                }
                let young = meta.modified().map_or(true, |modified| {
                    now.duration_since(modified).unwrap_or_default() < TEMP_GRACE
                });
                // Holding its lock while removing it: no run can have it.
                if !young && file.try_lock().is_ok() {
                    dir.remove(file_name);
                }
            });
        }
    }

    /// The cache dir, opened and checked through its descriptor; `None` if it cannot
    /// be opened or fails the checks.
    #[cfg(unix)]
    pub fn open_dir(&self) -> Option<CacheDir> {
        use rustix::fs::{Mode, OFlags};
        let fd = rustix::fs::open(
            &self.dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .ok()?;
        let meta = File::from(fd.try_clone().ok()?).metadata().ok()?;
        self.verify(&meta).ok()?;
        Some(CacheDir { fd })
    }

    /// Every slot that has a file in the cache dir, sorted (a NAME's plain slot first,
    /// then its keyed ones).
    pub fn slots(&self) -> Result<Vec<SlotId>> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.unusable(&e.to_string())),
        };
        let mut names: Vec<SlotId> = entries
            .flatten()
            .filter_map(|entry| {
                let file = entry.file_name();
                let (stem, extension) = file.to_str()?.rsplit_once('.')?;
                matches!(
                    extension,
                    "result" | "lock" | "failure" | "run" | "key" | "service" | "last"
                )
                .then(|| SlotId::parse(stem))?
            })
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }
}

/// A file of the cache dir opened for reading, as it was found.
pub enum Opened {
    File(File, fs::Metadata),
    Missing,
    /// A FIFO, a device, a directory or a symlink: damage, never read.
    NotAFile,
}

/// Opens a file of the cache dir for reading without blocking (`O_NONBLOCK`: a FIFO
/// put in place of a result or a record would block the open, and every caller,
/// forever) and without following a symlink (`O_NOFOLLOW`): singleflight reads only
/// regular files it could have written itself. One `open` and one `fstat`, as before.
pub fn open_regular(path: &Path) -> io::Result<Opened> {
    let mut options = fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(
        &mut options,
        libc::O_NONBLOCK | libc::O_NOFOLLOW,
    );
    let file = match options.open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Opened::Missing),
        #[cfg(unix)]
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Ok(Opened::NotAFile),
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Ok(Opened::NotAFile);
    }
    Ok(Opened::File(file, meta))
}

/// Whether a file name is one [`Store::temp_file`] makes: `.tmp.NAME.XXXXXX`, six
/// letters or digits of tempfile's after a valid NAME. Nothing else is ever swept.
#[cfg_attr(windows, allow(dead_code, reason = "nothing is swept on Windows"))]
fn is_temp_name(file_name: &str) -> bool {
    let Some(rest) = file_name.strip_prefix(TEMP_PREFIX) else {
        return false;
    };
    let Some((name, random)) = rest.rsplit_once('.') else {
        return false;
    };
    Name::parse(name).is_ok()
        && random.len() == 6
        && random.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// The cache dir opened as a directory: the files in it are opened and removed
/// relative to this descriptor, so what was checked is what is changed, even if the
/// path (a symlink, or one of its parents) is pointed elsewhere meanwhile.
#[cfg(unix)]
pub struct CacheDir {
    fd: std::os::fd::OwnedFd,
}

#[cfg(unix)]
impl CacheDir {
    /// Calls `each` with every regular file in the dir that is ours (our uid), open
    /// (read-only, without blocking, without following a symlink) and stat-ed.
    pub fn for_each_file(&self, mut each: impl FnMut(&str, &File, &fs::Metadata)) {
        use rustix::fs::{Dir, Mode, OFlags};
        use std::os::unix::fs::MetadataExt;
        let Ok(entries) = Dir::read_from(&self.fd) else {
            return;
        };
        let me = rustix::process::geteuid().as_raw();
        for entry in entries.flatten() {
            let Ok(file_name) = entry.file_name().to_str() else {
                continue;
            };
            let flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            let Ok(fd) = rustix::fs::openat(&self.fd, file_name, flags, Mode::empty()) else {
                continue;
            };
            let file = File::from(fd);
            let Ok(meta) = file.metadata() else {
                continue;
            };
            if meta.is_file() && meta.uid() == me {
                each(file_name, &file, &meta);
            }
        }
    }

    /// Removes a file of the dir, best effort.
    pub fn remove(&self, file_name: &str) {
        let _ = rustix::fs::unlinkat(&self.fd, file_name, rustix::fs::AtFlags::empty());
    }
}

/// Renames a complete temp file over `path` in one step and returns it, open.
///
/// On Windows, std's rename replaces the target even while readers have it open, as
/// long as they opened it sharing delete access (every reader in singleflight does,
/// through std). A reader of another program (an editor, a virus scanner) may not, and
/// blocks the replace for as long as it holds the file: retry for a moment.
pub fn persist(temp: tempfile::NamedTempFile, path: &Path) -> Result<File, tempfile::PersistError> {
    #[cfg(not(windows))]
    return temp.persist(path);
    #[cfg(windows)]
    windows::persist(temp, path)
}

#[cfg(windows)]
mod windows {
    use std::fs::{self, File};
    use std::io;
    use std::os::windows::ffi::OsStrExt;
    use std::path::Path;
    use std::time::{Duration, Instant};

    use windows_sys::Win32::Storage::FileSystem::{FILE_ATTRIBUTE_NORMAL, SetFileAttributesW};

    /// How long a replace blocked by another program's reader is retried.
    const BLOCKED_PATIENCE: Duration = Duration::from_secs(2);
    const ERROR_ACCESS_DENIED: i32 = 5;
    const ERROR_SHARING_VIOLATION: i32 = 32;
    const ERROR_LOCK_VIOLATION: i32 = 33;

    pub fn persist(
        temp: tempfile::NamedTempFile,
        path: &Path,
    ) -> Result<File, tempfile::PersistError> {
        // tempfile marks its files temporary (kept in memory by the cache manager if it
        // can); a result is not temporary.
        let wide: Vec<u16> = temp.path().as_os_str().encode_wide().chain([0]).collect();
        // SAFETY: a NUL-terminated path.
        unsafe { SetFileAttributesW(wide.as_ptr(), FILE_ATTRIBUTE_NORMAL) };
        let deadline = Instant::now() + BLOCKED_PATIENCE;
        let mut pause = Duration::from_millis(5);
        loop {
            match fs::rename(temp.path(), path) {
                // The temp name is gone: dropping its path removes nothing.
                Ok(()) => return Ok(temp.into_file()),
                Err(e) if blocked(&e) && Instant::now() < deadline => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(100));
                }
                Err(error) => return Err(tempfile::PersistError { error, file: temp }),
            }
        }
    }

    fn blocked(error: &io::Error) -> bool {
        matches!(
            error.raw_os_error(),
            Some(ERROR_ACCESS_DENIED | ERROR_SHARING_VIOLATION | ERROR_LOCK_VIOLATION)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_names_of_our_temp_files_are_temp_names() {
        for ours in [".tmp.big.oldone", ".tmp.a.b.c.XyZ123", ".tmp.x.000000"] {
            assert!(is_temp_name(ours), "{ours}");
        }
        for theirs in [
            ".tmp.notes",
            ".tmp.notes.txt",
            ".tmp..abcdef",
            ".tmp.-x.abcdef",
            "tmp.big.oldone",
            ".tmp.big.old-ne",
            ".tmp.big.oldones",
        ] {
            assert!(!is_temp_name(theirs), "{theirs}");
        }
    }
}
