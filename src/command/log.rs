//! A service's log: the instance's stdout and stderr, appended to `NAME.log` in the
//! cache dir, rotated once to `NAME.log.1` when it grows past its cap.

use std::fs::{self, File, OpenOptions};
use std::io::{PipeReader, Write};
use std::path::Path;

use super::streams::{Tail, read_chunks};

/// Appends everything read from `pipe` to the log at `path` until the pipe ends (the
/// tree is gone); returns the tail, for the failure record. A log that cannot be
/// written is drained all the same, so that the instance never blocks on it.
pub fn append(pipe: PipeReader, path: &Path, cap: u64) -> Vec<u8> {
    let mut tail = Tail::default();
    let mut log = open(path);
    let mut size = log
        .as_ref()
        .and_then(|file| file.metadata().ok())
        .map_or(0, |meta| meta.len());
    read_chunks(pipe, |chunk| {
        tail.keep(chunk);
        if size > 0 && size.saturating_add(chunk.len() as u64) > cap {
            let mut rotated = path.as_os_str().to_owned();
            rotated.push(".1");
            let _ = fs::rename(path, rotated);
            log = open(path);
            size = 0;
        }
        if let Some(file) = log.as_mut()
            && file.write_all(chunk).is_ok()
        {
            size += chunk.len() as u64;
        }
        true
    });
    tail.into_bytes()
}

fn open(path: &Path) -> Option<File> {
    let mut options = OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path).ok()
}
