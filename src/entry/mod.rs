//! A cached result on disk and how it is written and read. One file per result:
//!
//! ```text
//! [ header: 32 bytes ][ body: the command's stdout ][ metadata: JSON ]
//! header = magic "SFLIGHT" + format version (8) | body_len u64 LE | meta_len u64 LE
//!          | xxh3-64 of body and metadata u64 LE
//! ```
//!
//! The body is streamed to a temp file as the command writes it, the header is filled
//! in last, and the file is fsynced and renamed over the old result, so a reader sees
//! the old result or the new one. A file whose length, checksum or metadata does not
//! add up is no result at all: it is never printed.

use std::ffi::OsString;
use std::io::{self, Read};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::{Xxh3, xxh3_64, xxh3_128};

use crate::store::Opened;

mod writer;

pub use writer::{Body, EntryWriter};

const MAGIC: &[u8; 7] = b"SFLIGHT";
const VERSION: u8 = 1;
const HEADER_LEN: u64 = 32;
/// Far above any real metadata (a command line and a few numbers).
const META_MAX: u64 = 1 << 20;
/// Results up to this size are read and checked in one go; larger ones are streamed.
const READ_WHOLE_MAX: u64 = 1 << 20;

/// What a result records besides the bytes of stdout.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Meta {
    /// Identifies the argv that produced the result ([`argv_digest`]), with the
    /// states of any `--key-file` folded in (see `key::Resolved::result_digest`).
    pub argv_digest: String,
    /// The command as the user would type it, for `status`.
    pub command: String,
    /// When the run ended, in milliseconds since the Unix epoch.
    pub written_at_ms: u64,
    /// The `--ttl` of the call that wrote it.
    pub ttl_ms: u64,
    /// The status a caller served this result exits with.
    pub exit_code: i32,
    /// How long the run took.
    pub duration_ms: u64,
}

impl Meta {
    /// How old the result is; `None` if it claims to be from the future, which
    /// counts as not fresh and of unknown age.
    pub fn age(&self, now: SystemTime) -> Option<Duration> {
        let written = crate::values::epoch_ms(self.written_at_ms)?;
        now.duration_since(written).ok()
    }
}

/// A digest of argv that tells results of different commands apart.
pub fn argv_digest(argv: &[OsString]) -> String {
    let mut bytes = Vec::new();
    for arg in argv {
        let arg = arg.as_encoded_bytes();
        bytes.extend_from_slice(&(arg.len() as u64).to_le_bytes());
        bytes.extend_from_slice(arg);
    }
    format!("{:032x}", xxh3_128(&bytes))
}

/// argv as one line a user could paste back into a shell, for `status`.
pub fn display_command(argv: &[OsString]) -> String {
    let quote = |arg: &OsString| {
        let arg = arg.to_string_lossy();
        let plain = !arg.is_empty()
            && arg
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c));
        if plain {
            arg.into_owned()
        } else {
            format!("'{}'", arg.replace('\'', r"'\''"))
        }
    };
    argv.iter().map(quote).collect::<Vec<_>>().join(" ")
}

pub fn now_ms(now: SystemTime) -> u64 {
    now.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Why a file is no result.
#[derive(Debug, PartialEq, Eq)]
pub enum Invalid {
    Truncated,
    Corrupt,
    Foreign,
    /// A FIFO, device, directory or symlink where the result belongs.
    NotAFile,
    /// A result of a newer format version (written by a newer singleflight sharing
    /// the cache dir or etcd prefix): not ours to read, and not ours to replace.
    Newer(u8),
}

impl Invalid {
    pub fn as_str(&self) -> &'static str {
        match self {
            Invalid::Truncated => "truncated",
            Invalid::Corrupt => "corrupt",
            Invalid::Foreign => "not a singleflight result",
            Invalid::NotAFile => "not a regular file",
            Invalid::Newer(_) => "of a newer format version",
        }
    }
}

/// A valid result, read and checked.
pub struct Entry {
    pub meta: Meta,
    pub body: Body,
}

/// Reads and checks the result at `path`: `Ok(None)` if there is none,
/// `Err(Invalid)` if the file is not a complete result of this format.
pub fn read(path: &Path) -> io::Result<Result<Option<Entry>, Invalid>> {
    let (mut file, file_len) = match crate::store::open_regular(path)? {
        Opened::File(file, meta) => (file, meta.len()),
        Opened::Missing => return Ok(Ok(None)),
        Opened::NotAFile => return Ok(Err(Invalid::NotAFile)),
    };
    if file_len < HEADER_LEN {
        return Ok(Err(Invalid::Truncated));
    }
    if file_len <= READ_WHOLE_MAX {
        let mut bytes = vec![0; file_len as usize];
        file.read_exact(&mut bytes)?;
        let header = match Header::parse(&bytes, file_len) {
            Ok(header) => header,
            Err(invalid) => return Ok(Err(invalid)),
        };
        if xxh3_64(&bytes[HEADER_LEN as usize..]) != header.checksum {
            return Ok(Err(Invalid::Corrupt));
        }
        let body_end = (HEADER_LEN + header.body_len) as usize;
        let Ok(meta) = serde_json::from_slice(&bytes[body_end..]) else {
            return Ok(Err(Invalid::Corrupt));
        };
        let body = Body::Memory {
            bytes,
            start: HEADER_LEN as usize,
            end: body_end,
        };
        return Ok(Ok(Some(Entry { meta, body })));
    }
    // Large: check the checksum in one streaming pass, print in a second. The file is
    // never written in place (only replaced by rename), so both passes see one version.
    let mut head = [0; HEADER_LEN as usize];
    file.read_exact(&mut head)?;
    let header = match Header::parse(&head, file_len) {
        Ok(header) => header,
        Err(invalid) => return Ok(Err(invalid)),
    };
    let mut hasher = Xxh3::new();
    let mut buffer = vec![0; 256 * 1024];
    let mut meta_bytes = Vec::with_capacity(header.meta_len as usize);
    let mut offset = HEADER_LEN;
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        let chunk = &buffer[..n];
        hasher.update(chunk);
        let body_end = HEADER_LEN + header.body_len;
        let meta_from = body_end.saturating_sub(offset).min(n as u64) as usize;
        meta_bytes.extend_from_slice(&chunk[meta_from..]);
        offset += n as u64;
    }
    if offset != file_len {
        return Ok(Err(Invalid::Truncated));
    }
    if hasher.digest() != header.checksum {
        return Ok(Err(Invalid::Corrupt));
    }
    let Ok(meta) = serde_json::from_slice(&meta_bytes) else {
        return Ok(Err(Invalid::Corrupt));
    };
    let body = Body::File {
        file,
        offset: HEADER_LEN,
        len: header.body_len,
        tail: Vec::new(),
    };
    Ok(Ok(Some(Entry { meta, body })))
}

struct Header {
    body_len: u64,
    meta_len: u64,
    checksum: u64,
}

impl Header {
    fn parse(bytes: &[u8], file_len: u64) -> Result<Header, Invalid> {
        let word = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
        if &bytes[..7] != MAGIC {
            return Err(Invalid::Foreign);
        }
        match bytes[7] {
            VERSION => {}
            newer if newer > VERSION => return Err(Invalid::Newer(newer)),
            _ => return Err(Invalid::Foreign),
        }
        let header = Header {
            body_len: word(8),
            meta_len: word(16),
            checksum: word(24),
        };
        // Metadata is a few hundred bytes; a huge length is damage, and must not make a
        // reader collect a damaged multi-GB file in memory before the checksum fails.
        if header.meta_len > META_MAX {
            return Err(Invalid::Corrupt);
        }
        let expected = HEADER_LEN
            .checked_add(header.body_len)
            .and_then(|n| n.checked_add(header.meta_len));
        match expected {
            Some(len) if len == file_len => Ok(header),
            Some(len) if len > file_len => Err(Invalid::Truncated),
            _ => Err(Invalid::Corrupt),
        }
    }

    fn to_bytes(&self) -> [u8; HEADER_LEN as usize] {
        let mut bytes = [0; HEADER_LEN as usize];
        bytes[..7].copy_from_slice(MAGIC);
        bytes[7] = VERSION;
        bytes[8..16].copy_from_slice(&self.body_len.to_le_bytes());
        bytes[16..24].copy_from_slice(&self.meta_len.to_le_bytes());
        bytes[24..32].copy_from_slice(&self.checksum.to_le_bytes());
        bytes
    }
}

/// A whole result as bytes in the same format as a result file (header, body,
/// metadata), for a backend that stores values rather than files (etcd), so that a
/// value is checked exactly as a file is.
#[cfg(any(feature = "etcd", test))]
pub fn to_bytes(body: &[u8], meta: &Meta) -> Vec<u8> {
    let meta_bytes = serde_json::to_vec(meta).expect("Meta serializes");
    let mut hasher = Xxh3::new();
    hasher.update(body);
    hasher.update(&meta_bytes);
    let header = Header {
        body_len: body.len() as u64,
        meta_len: meta_bytes.len() as u64,
        checksum: hasher.digest(),
    };
    let mut bytes = Vec::with_capacity(HEADER_LEN as usize + body.len() + meta_bytes.len());
    bytes.extend_from_slice(&header.to_bytes());
    bytes.extend_from_slice(body);
    bytes.extend_from_slice(&meta_bytes);
    bytes
}

/// How long [`to_bytes`] of a body of `body_len` bytes is, to check a size limit
/// before reading the body into memory.
#[cfg(any(feature = "etcd", test))]
pub fn encoded_len(body_len: u64, meta: &Meta) -> u64 {
    let meta_len = serde_json::to_vec(meta).expect("Meta serializes").len() as u64;
    HEADER_LEN + body_len + meta_len
}

/// Checks a result held in memory (see [`to_bytes`]): `Err` if the bytes are not a
/// complete result of this format.
#[cfg(any(feature = "etcd", test))]
pub fn from_bytes(bytes: Vec<u8>) -> Result<Entry, Invalid> {
    let len = bytes.len() as u64;
    if len < HEADER_LEN {
        return Err(Invalid::Truncated);
    }
    let header = Header::parse(&bytes, len)?;
    if xxh3_64(&bytes[HEADER_LEN as usize..]) != header.checksum {
        return Err(Invalid::Corrupt);
    }
    let body_end = (HEADER_LEN + header.body_len) as usize;
    let meta = serde_json::from_slice(&bytes[body_end..]).map_err(|_| Invalid::Corrupt)?;
    Ok(Entry {
        meta,
        body: Body::Memory {
            bytes,
            start: HEADER_LEN as usize,
            end: body_end,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use crate::values::Name;

    fn meta() -> Meta {
        Meta {
            argv_digest: argv_digest(&["echo".into(), "hi".into()]),
            command: "echo hi".into(),
            written_at_ms: 1_000,
            ttl_ms: 30_000,
            exit_code: 0,
            duration_ms: 5,
        }
    }

    fn printed(body: Body) -> Vec<u8> {
        let mut out = Vec::new();
        body.print(&mut out).unwrap();
        out
    }

    fn write_entry(store: &Store, body: &[u8]) -> std::path::PathBuf {
        let name = Name::parse("t").unwrap();
        let path = store.paths(&crate::key::SlotId::plain(&name)).result;
        let mut writer = EntryWriter::create(store, &name);
        for chunk in body.chunks(7000) {
            writer.write(chunk);
        }
        assert_eq!(
            printed(writer.save(&meta(), &path, store).ok().unwrap()),
            body
        );
        path
    }

    #[test]
    fn round_trip_small_large_and_empty() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::locate(Some(dir.path().into())).unwrap();
        for body in [
            Vec::new(),
            b"no newline".to_vec(),
            (0..=255u8).cycle().take(3 << 20).collect(),
        ] {
            let path = write_entry(&store, &body);
            let entry = read(&path).unwrap().unwrap().unwrap();
            assert_eq!(entry.meta.command, "echo hi");
            assert_eq!(printed(entry.body), body);
        }
    }

    #[test]
    fn every_truncation_and_flipped_byte_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::locate(Some(dir.path().into())).unwrap();
        let path = write_entry(&store, b"hello world\n");
        let good = std::fs::read(&path).unwrap();
        for len in 0..good.len() {
            std::fs::write(&path, &good[..len]).unwrap();
            assert!(read(&path).unwrap().is_err(), "truncated to {len}");
        }
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x20;
            std::fs::write(&path, &bad).unwrap();
            assert!(read(&path).unwrap().is_err(), "byte {i} flipped");
        }
        std::fs::write(&path, b"#!/bin/sh\necho some other file format entirely\n").unwrap();
        assert_eq!(read(&path).unwrap().err(), Some(Invalid::Foreign));
    }

    #[test]
    fn digests_tell_argv_apart() {
        let d = |args: &[&str]| argv_digest(&args.iter().map(OsString::from).collect::<Vec<_>>());
        assert_ne!(d(&["a b"]), d(&["a", "b"]));
        assert_ne!(d(&["ab", ""]), d(&["a", "b"]));
        assert_eq!(d(&["x", "y"]), d(&["x", "y"]));
    }

    #[test]
    fn display_quotes_what_a_shell_would_split() {
        let argv: Vec<OsString> = ["ccusage", "blocks", "--json", "a b", "it's"]
            .map(Into::into)
            .into();
        assert_eq!(
            display_command(&argv),
            r"ccusage blocks --json 'a b' 'it'\''s'"
        );
    }

    #[test]
    fn bytes_round_trip_and_refuse_damage() {
        let body = b"hello from etcd\n";
        let bytes = to_bytes(body, &meta());
        assert_eq!(bytes.len() as u64, encoded_len(body.len() as u64, &meta()));
        let entry = from_bytes(bytes.clone()).ok().unwrap();
        assert_eq!(entry.meta.command, "echo hi");
        assert_eq!(printed(entry.body), body);
        for len in 0..bytes.len() {
            assert!(
                from_bytes(bytes[..len].to_vec()).is_err(),
                "truncated to {len}"
            );
        }
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x20;
            assert!(from_bytes(bad).is_err(), "byte {i} flipped");
        }
        // The same bytes as a file are a valid result file.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.result");
        std::fs::write(&path, &bytes).unwrap();
        assert!(read(&path).unwrap().unwrap().is_some());
    }
}
