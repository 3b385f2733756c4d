//! Writing a result: a run's stdout streamed into a temp file in the cache dir, the
//! header filled in last, fsynced and renamed over the old result; and a result's
//! body, ready to print.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;

use xxhash_rust::xxh3::Xxh3;

use super::{HEADER_LEN, Header, Meta};
use crate::store::Store;
use crate::values::Name;

/// The stdout of a result or of a run, ready to print.
pub enum Body {
    Memory {
        bytes: Vec<u8>,
        start: usize,
        end: usize,
    },
    /// `len` bytes of `file` from `offset`, then `tail` (what did not fit on disk).
    File {
        file: File,
        offset: u64,
        len: u64,
        tail: Vec<u8>,
    },
}

impl Body {
    /// All of `bytes`.
    pub fn in_memory(bytes: Vec<u8>) -> Body {
        Body::Memory {
            end: bytes.len(),
            bytes,
            start: 0,
        }
    }

    /// How many bytes `print` writes.
    pub fn len(&self) -> u64 {
        match self {
            Body::Memory { start, end, .. } => (end - start) as u64,
            Body::File { len, tail, .. } => len + tail.len() as u64,
        }
    }

    pub fn print(self, out: &mut impl Write) -> io::Result<()> {
        match self {
            Body::Memory { bytes, start, end } => out.write_all(&bytes[start..end])?,
            Body::File {
                file,
                offset,
                len,
                tail,
            } => copy_file(file, offset, len, &tail, out)?,
        }
        out.flush()
    }
}

/// A body kept in its file: `len` bytes from `offset`, then `tail`. Not inlined into
/// `print`: `io::copy`'s 8 KiB stack buffer would make every hit's stack frame that
/// large, two page faults on the path of a small result, which is printed from memory.
#[inline(never)]
fn copy_file(
    mut file: File,
    offset: u64,
    len: u64,
    tail: &[u8],
    out: &mut impl Write,
) -> io::Result<()> {
    file.seek(SeekFrom::Start(offset))?;
    let copied = io::copy(&mut (&mut file).take(len), out)?;
    if copied != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "result shrank",
        ));
    }
    out.write_all(tail)
}

/// Streams a run's stdout into a temp file in the cache dir. If the disk refuses a
/// write, the rest is kept in memory (bounded by `--max-output`) so that the caller
/// still gets the run's output, and the result is not saved.
pub struct EntryWriter {
    temp: Option<tempfile::NamedTempFile>,
    tail: Vec<u8>,
    hasher: Xxh3,
    written: u64,
    error: Option<io::Error>,
}

impl EntryWriter {
    pub fn create(store: &Store, name: &Name) -> EntryWriter {
        let mut writer = EntryWriter {
            temp: None,
            tail: Vec::new(),
            hasher: Xxh3::new(),
            written: 0,
            error: None,
        };
        let temp = store.temp_file(name).and_then(|mut temp| {
            temp.write_all(&[0; HEADER_LEN as usize])?;
            Ok(temp)
        });
        match temp {
            Ok(temp) => writer.temp = Some(temp),
            Err(e) => writer.error = Some(e),
        }
        writer
    }

    /// A writer for a run whose stdout is not captured (`--exclusive`, `--service`):
    /// no temp file, nothing to save.
    pub fn discard() -> EntryWriter {
        EntryWriter {
            temp: None,
            tail: Vec::new(),
            hasher: Xxh3::new(),
            written: 0,
            error: None,
        }
    }

    /// Appends a chunk of stdout.
    pub fn write(&mut self, chunk: &[u8]) {
        self.hasher.update(chunk);
        if let (None, Some(temp)) = (&self.error, &mut self.temp) {
            match temp.write_all(chunk) {
                Ok(()) => {
                    self.written += chunk.len() as u64;
                    return;
                }
                // A partial write leaves the file length unknown: keep what is
                // certainly there and the whole chunk in memory.
                Err(e) => {
                    let _ = temp.as_file().set_len(HEADER_LEN + self.written);
                    let _ = temp.seek(SeekFrom::End(0));
                    self.error = Some(e);
                }
            }
        }
        self.tail.extend_from_slice(chunk);
    }

    pub fn len(&self) -> u64 {
        self.written + self.tail.len() as u64
    }

    /// Why the output cannot be saved, if a write failed.
    pub fn error(&self) -> Option<&io::Error> {
        self.error.as_ref()
    }

    /// Completes the file and renames it over `path`. On error the output is handed
    /// back for printing, and whatever was at `path` is untouched.
    /// `stderr` is stored after the body, before the metadata.
    pub fn save(
        mut self,
        meta: &Meta,
        stderr: &[u8],
        path: &Path,
        store: &Store,
    ) -> Result<Body, (io::Error, Body)> {
        if let Some(error) = self.error.take() {
            return Err((error, self.into_body()));
        }
        let Some(mut temp) = self.temp.take() else {
            let error = io::Error::other("no temp file");
            return Err((error, self.into_body()));
        };
        let meta_bytes = serde_json::to_vec(meta).expect("Meta serializes");
        self.hasher.update(stderr);
        self.hasher.update(&meta_bytes);
        let header = Header {
            len: HEADER_LEN,
            body_len: self.written,
            stderr_len: stderr.len() as u64,
            meta_len: meta_bytes.len() as u64,
            checksum: self.hasher.digest(),
        };
        let finished = (|| {
            temp.write_all(stderr)?;
            temp.write_all(&meta_bytes)?;
            temp.seek(SeekFrom::Start(0))?;
            temp.write_all(&header.to_bytes())?;
            temp.as_file().sync_all()
        })();
        if let Err(e) = finished {
            self.temp = Some(temp);
            return Err((e, self.into_body()));
        }
        match crate::store::persist(temp, path) {
            Ok(file) => {
                store.sync_dir();
                Ok(Body::File {
                    file,
                    offset: HEADER_LEN,
                    len: self.written,
                    tail: Vec::new(),
                })
            }
            Err(e) => {
                self.temp = Some(e.file);
                Err((e.error, self.into_body()))
            }
        }
    }

    /// The output for printing without saving it. The temp file is unlinked at once;
    /// its open handle stays readable, so the output survives even when its path is
    /// gone (a cache dir deleted during the run).
    pub fn into_body(mut self) -> Body {
        let tail = std::mem::take(&mut self.tail);
        match self.temp.take() {
            Some(temp) => {
                let (file, path) = temp.into_parts();
                drop(path);
                Body::File {
                    file,
                    offset: HEADER_LEN,
                    len: self.written,
                    tail,
                }
            }
            None => {
                let end = tail.len();
                Body::Memory {
                    bytes: tail,
                    start: 0,
                    end,
                }
            }
        }
    }
}
