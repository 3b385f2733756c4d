//! The cache dir: where it is, creating it `0700` and refusing one that another user
//! could write into, the file names of a NAME, atomic replacement, old temp cleanup.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};

use crate::exit::{Exit, INTERNAL};
use crate::key::SlotId;
use crate::values::Name;

/// Temp files older than this belong to a crashed run and are removed.
const STALE_TEMP_AGE: Duration = Duration::from_secs(15 * 60);
/// Every temp file starts with this, so cleanup never touches anything else.
const TEMP_PREFIX: &str = ".tmp.";

/// The files of one slot of a NAME (`NAME.*`, or `NAME@<key>.*` with key flags).
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
                        INTERNAL,
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
            if mode & 0o022 != 0 {
                return Err(self.unusable(&format!(
                    "it is writable by others (mode {mode:04o}); run chmod 700 on it"
                )));
            }
        }
        Ok(())
    }

    fn unusable(&self, reason: &str) -> anyhow::Error {
        Exit::new(
            INTERNAL,
            format!("cache dir {} is unusable: {reason}", self.dir.display()),
        )
        .into()
    }

    /// A new temp file in the cache dir (`0600`), to be renamed over a real name.
    pub fn temp_file(&self, name: &Name) -> io::Result<tempfile::NamedTempFile> {
        tempfile::Builder::new()
            .prefix(&format!("{TEMP_PREFIX}{name}."))
            .tempfile_in(&self.dir)
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

    /// Removes temp files that crashed runs left behind, once they are old.
    pub fn remove_stale_temps(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        let now = SystemTime::now();
        for entry in entries.flatten() {
            let is_temp = entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX);
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|modified| {
                    now.duration_since(modified).unwrap_or_default() > STALE_TEMP_AGE
                });
            if is_temp && old {
                let _ = fs::remove_file(entry.path());
            }
        }
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
                matches!(extension, "result" | "lock" | "failure" | "run" | "key")
                    .then(|| SlotId::parse(stem))?
            })
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
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
