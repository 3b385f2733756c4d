//! The run's output streams: stdout copied into the result's writer (capped), stderr
//! passed through with its tail kept.

use std::io::{self, Read, Write};
use std::process::{ChildStderr, ChildStdout};
use std::sync::mpsc::Sender;

use super::{CHUNK, Event, STDERR_TAIL};
use crate::entry::EntryWriter;

/// Reads `pipe` chunk by chunk into `take` until the end, an error, or `take` says
/// stop (returns false).
pub(super) fn read_chunks(mut pipe: impl Read, mut take: impl FnMut(&[u8]) -> bool) {
    let mut buffer = vec![0; CHUNK];
    loop {
        match pipe.read(&mut buffer) {
            Ok(0) => return,
            Ok(n) if !take(&buffer[..n]) => return,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Copies stdout into the writer, never past `max` bytes: at the cap it reports the
/// overflow and stops reading (the run is then killed).
pub(super) fn stream_stdout(
    out: ChildStdout,
    mut writer: EntryWriter,
    max: u64,
    events: Sender<Event>,
) {
    read_chunks(out, |chunk| {
        let room = max.saturating_sub(writer.len());
        if chunk.len() as u64 > room {
            writer.write(&chunk[..room as usize]);
            let _ = events.send(Event::Overflow);
            return false;
        }
        writer.write(chunk);
        true
    });
    let _ = events.send(Event::Stdout(Box::new(writer)));
}

/// Passes stderr through as it comes (with `pass`); returns its tail, and its first
/// `keep` bytes for the result (with a note where the rest was dropped).
pub(super) fn tee_stderr(err: ChildStderr, pass: bool, keep: u64) -> (Vec<u8>, Vec<u8>) {
    let mut tail = Tail::default();
    let mut kept = Vec::new();
    let mut more = false;
    let mut stderr = io::stderr();
    read_chunks(err, |chunk| {
        if pass {
            let _ = stderr.write_all(chunk);
        }
        tail.keep(chunk);
        let room = keep.saturating_sub(kept.len() as u64) as usize;
        more |= chunk.len() > room;
        kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
        true
    });
    if more {
        kept = crate::entry::fit_stderr(&kept, keep.saturating_sub(1)).into_owned();
    }
    (tail.into_bytes(), kept)
}

/// The last [`STDERR_TAIL`] bytes of a stream.
#[derive(Default)]
pub(super) struct Tail(Vec<u8>);

impl Tail {
    pub(super) fn keep(&mut self, chunk: &[u8]) {
        self.0.extend_from_slice(chunk);
        if self.0.len() > 2 * STDERR_TAIL {
            self.0.drain(..self.0.len() - STDERR_TAIL);
        }
    }

    pub(super) fn into_bytes(mut self) -> Vec<u8> {
        if self.0.len() > STDERR_TAIL {
            self.0.drain(..self.0.len() - STDERR_TAIL);
        }
        self.0
    }
}
