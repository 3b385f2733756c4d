//! A cached result on disk and how it is written and read. One file per result:
//!
//! ```text
//! version 2 (written since stderr is stored):
//! [ header: 40 bytes ][ body: the command's stdout ][ its stderr ][ metadata: JSON ]
//! header = magic "SFLIGHT" + format version (8) | body_len u64 LE | stderr_len u64 LE
//!          | meta_len u64 LE | xxh3-64 of body, stderr and metadata u64 LE
//! version 1 (read, never written):
//! [ header: 32 bytes ][ body ][ metadata ]
//! header = magic "SFLIGHT" + 1 | body_len | meta_len | xxh3-64 of body and metadata
//! ```
//!
//! A version-1 result (an older singleflight's) is served as one with no stderr; a
//! result of a version above 2 is left alone ([`Invalid::Newer`]). A result with no
//! stderr costs what a version-1 result cost to read: 8 more header bytes.
//!
//! The body is streamed to a temp file as the command writes it, the header is filled
//! in last, and the file is fsynced and renamed over the old result, so a reader sees
//! the old result or the new one. A file whose length, checksum or metadata does not
//! add up is no result at all: it is never printed.

use std::ffi::OsString;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::{Xxh3, xxh3_64, xxh3_128};

use crate::store::Opened;

mod writer;

pub use writer::{Body, EntryWriter};

const MAGIC: &[u8; 7] = b"SFLIGHT";
/// The version written; [`V1`] is read too.
const VERSION: u8 = 2;
const V1: u8 = 1;
/// The header's length in the version written ([`V1_HEADER_LEN`] in version 1).
const HEADER_LEN: u64 = 40;
const V1_HEADER_LEN: u64 = 32;
/// The most stderr a result keeps (see [`STDERR_MAX`] in `command`): a larger length
/// in a header is damage.
const STDERR_READ_MAX: u64 = 2 << 20;
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

/// What ends a stored stderr that was cut short.
const STDERR_CUT: &[u8] = b"\n[singleflight: the rest of this stderr was not stored]\n";

/// `stderr` as it fits in `room` bytes: itself, or its start and a line that says the
/// rest was not stored (nothing at all where not even that line fits).
pub fn fit_stderr(stderr: &[u8], room: u64) -> std::borrow::Cow<'_, [u8]> {
    if stderr.len() as u64 <= room {
        return stderr.into();
    }
    let Some(start) = (room as usize).checked_sub(STDERR_CUT.len()) else {
        return Vec::new().into();
    };
    let mut cut = stderr[..start].to_vec();
    cut.extend_from_slice(STDERR_CUT);
    cut.into()
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

/// The wall clock, for a hit's age. On Linux one `clock_gettime` system call rather
/// than the vDSO's: the first read through the vDSO maps two of its pages, two page
/// faults that cost a hit more than a system call does (see docs/benchmarks.md).
pub fn wall_clock() -> SystemTime {
    #[cfg(target_os = "linux")]
    {
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: the kernel writes one timespec, which lives on this stack frame.
        let read =
            unsafe { libc::syscall(libc::SYS_clock_gettime, libc::CLOCK_REALTIME, &raw mut now) };
        if let (0, Ok(secs), Ok(nanos)) =
            (read, u64::try_from(now.tv_sec), u32::try_from(now.tv_nsec))
        {
            return UNIX_EPOCH + std::time::Duration::new(secs, nanos);
        }
    }
    SystemTime::now()
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
    /// The run's stderr, as stored (empty in a version-1 result).
    pub stderr: Vec<u8>,
}

/// Reads and checks the result at `path`: `Ok(None)` if there is none,
/// `Err(Invalid)` if the file is not a complete result of this format.
pub fn read(path: &Path) -> io::Result<Result<Option<Entry>, Invalid>> {
    let (mut file, file_len) = match crate::store::open_regular(path)? {
        Opened::File(file, meta) => (file, meta.len()),
        Opened::Missing => return Ok(Ok(None)),
        Opened::NotAFile => return Ok(Err(Invalid::NotAFile)),
    };
    if file_len < V1_HEADER_LEN {
        return Ok(Err(Invalid::Truncated));
    }
    if file_len <= READ_WHOLE_MAX {
        let mut bytes = vec![0; file_len as usize];
        file.read_exact(&mut bytes)?;
        return Ok(from_bytes(bytes).map(Some));
    }
    // Large: check the checksum in one streaming pass, print in a second. The file is
    // never written in place (only replaced by rename), so both passes see one version.
    let mut head = [0; HEADER_LEN as usize];
    file.read_exact(&mut head)?;
    let header = match Header::parse(&head, file_len) {
        Ok(header) => header,
        Err(invalid) => return Ok(Err(invalid)),
    };
    file.seek(SeekFrom::Start(header.len))?;
    let mut hasher = Xxh3::new();
    let mut buffer = vec![0; 256 * 1024];
    // What follows the body: stderr and metadata, both bounded by the header check.
    let mut after = Vec::with_capacity((header.stderr_len + header.meta_len) as usize);
    let mut offset = header.len;
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        let chunk = &buffer[..n];
        hasher.update(chunk);
        let body_end = header.len + header.body_len;
        let after_from = body_end.saturating_sub(offset).min(n as u64) as usize;
        after.extend_from_slice(&chunk[after_from..]);
        offset += n as u64;
    }
    if offset != file_len {
        return Ok(Err(Invalid::Truncated));
    }
    if hasher.digest() != header.checksum
        || after.len() as u64 != header.stderr_len + header.meta_len
    {
        return Ok(Err(Invalid::Corrupt));
    }
    let meta_bytes = after.split_off(header.stderr_len as usize);
    let Ok(meta) = serde_json::from_slice(&meta_bytes) else {
        return Ok(Err(Invalid::Corrupt));
    };
    let body = Body::File {
        file,
        offset: header.len,
        len: header.body_len,
        tail: Vec::new(),
    };
    Ok(Ok(Some(Entry {
        meta,
        body,
        stderr: after,
    })))
}

struct Header {
    /// The header's own length: [`HEADER_LEN`], or [`V1_HEADER_LEN`] in version 1.
    len: u64,
    body_len: u64,
    stderr_len: u64,
    meta_len: u64,
    checksum: u64,
}

impl Header {
    /// Parses the header at the start of `bytes` (at least [`V1_HEADER_LEN`] of them;
    /// a version-2 header needs [`HEADER_LEN`]) of a result `file_len` long.
    fn parse(bytes: &[u8], file_len: u64) -> Result<Header, Invalid> {
        let word = |i: usize| -> Result<u64, Invalid> {
            let word = bytes.get(i..i + 8).ok_or(Invalid::Truncated)?;
            Ok(u64::from_le_bytes(
                word.try_into().map_err(|_| Invalid::Truncated)?,
            ))
        };
        if bytes.get(..7) != Some(MAGIC.as_slice()) {
            return Err(Invalid::Foreign);
        }
        let header = match bytes[7] {
            VERSION if file_len < HEADER_LEN => return Err(Invalid::Truncated),
            VERSION => Header {
                len: HEADER_LEN,
                body_len: word(8)?,
                stderr_len: word(16)?,
                meta_len: word(24)?,
                checksum: word(32)?,
            },
            V1 => Header {
                len: V1_HEADER_LEN,
                body_len: word(8)?,
                stderr_len: 0,
                meta_len: word(16)?,
                checksum: word(24)?,
            },
            newer if newer > VERSION => return Err(Invalid::Newer(newer)),
            _ => return Err(Invalid::Foreign),
        };
        // Metadata is a few hundred bytes, stderr at most a few MiB; a huge length is
        // damage, and must not make a reader collect a damaged multi-GB file in memory
        // before the checksum fails.
        if header.meta_len > META_MAX || header.stderr_len > STDERR_READ_MAX {
            return Err(Invalid::Corrupt);
        }
        let expected = header
            .len
            .checked_add(header.body_len)
            .and_then(|n| n.checked_add(header.stderr_len))
            .and_then(|n| n.checked_add(header.meta_len));
        match expected {
            Some(len) if len == file_len => Ok(header),
            Some(len) if len > file_len => Err(Invalid::Truncated),
            _ => Err(Invalid::Corrupt),
        }
    }

    /// The header of the version written.
    fn to_bytes(&self) -> [u8; HEADER_LEN as usize] {
        let mut bytes = [0; HEADER_LEN as usize];
        bytes[..7].copy_from_slice(MAGIC);
        bytes[7] = VERSION;
        bytes[8..16].copy_from_slice(&self.body_len.to_le_bytes());
        bytes[16..24].copy_from_slice(&self.stderr_len.to_le_bytes());
        bytes[24..32].copy_from_slice(&self.meta_len.to_le_bytes());
        bytes[32..40].copy_from_slice(&self.checksum.to_le_bytes());
        bytes
    }
}

/// A whole result as bytes in the same format as a result file (header, body,
/// metadata), for a backend that stores values rather than files (etcd), so that a
/// value is checked exactly as a file is.
#[cfg(any(feature = "etcd", feature = "postgres", test))]
pub fn to_bytes(body: &[u8], stderr: &[u8], meta: &Meta) -> Vec<u8> {
    let meta_bytes = serde_json::to_vec(meta).expect("Meta serializes");
    let mut hasher = Xxh3::new();
    hasher.update(body);
    hasher.update(stderr);
    hasher.update(&meta_bytes);
    let header = Header {
        len: HEADER_LEN,
        body_len: body.len() as u64,
        stderr_len: stderr.len() as u64,
        meta_len: meta_bytes.len() as u64,
        checksum: hasher.digest(),
    };
    let mut bytes =
        Vec::with_capacity(HEADER_LEN as usize + body.len() + stderr.len() + meta_bytes.len());
    bytes.extend_from_slice(&header.to_bytes());
    bytes.extend_from_slice(body);
    bytes.extend_from_slice(stderr);
    bytes.extend_from_slice(&meta_bytes);
    bytes
}

/// How long [`to_bytes`] of a body of `body_len` bytes and a stderr of `stderr_len`
/// is, to check a size limit before reading the body into memory.
#[cfg(any(feature = "etcd", feature = "postgres", test))]
pub fn encoded_len(body_len: u64, stderr_len: u64, meta: &Meta) -> u64 {
    let meta_len = serde_json::to_vec(meta).expect("Meta serializes").len() as u64;
    HEADER_LEN + body_len + stderr_len + meta_len
}

/// Checks a result held in memory (a whole small file, or a value from etcd; see
/// [`to_bytes`]): `Err` if the bytes are not a complete result of a version read.
pub fn from_bytes(bytes: Vec<u8>) -> Result<Entry, Invalid> {
    let len = bytes.len() as u64;
    if len < V1_HEADER_LEN {
        return Err(Invalid::Truncated);
    }
    let header = Header::parse(&bytes, len)?;
    if xxh3_64(&bytes[header.len as usize..]) != header.checksum {
        return Err(Invalid::Corrupt);
    }
    let body_end = (header.len + header.body_len) as usize;
    let stderr_end = body_end + header.stderr_len as usize;
    let meta = serde_json::from_slice(&bytes[stderr_end..]).map_err(|_| Invalid::Corrupt)?;
    Ok(Entry {
        meta,
        stderr: bytes[body_end..stderr_end].to_vec(),
        body: Body::Memory {
            bytes,
            start: header.len as usize,
            end: body_end,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use crate::values::Name;

    #[test]
    fn the_wall_clock_is_the_system_clock() {
        let before = SystemTime::now();
        let now = wall_clock();
        let after = SystemTime::now();
        assert!(
            before <= now && now <= after,
            "{before:?} {now:?} {after:?}"
        );
    }

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
            printed(writer.save(&meta(), b"warn\n", &path, store).ok().unwrap()),
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
            assert_eq!(entry.stderr, b"warn\n");
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

    /// A version-1 result (what singleflight wrote before stderr was stored) is read
    /// as one with no stderr; a version above ours is left alone.
    #[test]
    fn version_1_is_read_and_a_newer_one_refused() {
        let meta_bytes = serde_json::to_vec(&meta()).unwrap();
        let body = b"old\n";
        let mut v1 = Vec::new();
        v1.extend_from_slice(MAGIC);
        v1.push(1);
        v1.extend_from_slice(&(body.len() as u64).to_le_bytes());
        v1.extend_from_slice(&(meta_bytes.len() as u64).to_le_bytes());
        let mut hasher = Xxh3::new();
        hasher.update(body);
        hasher.update(&meta_bytes);
        v1.extend_from_slice(&hasher.digest().to_le_bytes());
        v1.extend_from_slice(body);
        v1.extend_from_slice(&meta_bytes);
        let entry = from_bytes(v1.clone()).ok().unwrap();
        assert!(entry.stderr.is_empty());
        assert_eq!(printed(entry.body), body);
        for len in 0..v1.len() {
            assert!(
                from_bytes(v1[..len].to_vec()).is_err(),
                "truncated to {len}"
            );
        }
        let mut newer = to_bytes(body, b"", &meta());
        newer[7] = VERSION + 1;
        assert_eq!(from_bytes(newer).err(), Some(Invalid::Newer(VERSION + 1)));
    }

    #[test]
    fn stderr_is_cut_to_fit_with_a_note() {
        assert_eq!(&*fit_stderr(b"short", 5), b"short");
        let cut = fit_stderr(&[b'x'; 1000], 200);
        assert_eq!(cut.len(), 200);
        assert!(cut.ends_with(STDERR_CUT));
        assert!(fit_stderr(&[b'x'; 1000], 3).is_empty());
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
        let bytes = to_bytes(body, b"err\n", &meta());
        assert_eq!(
            bytes.len() as u64,
            encoded_len(body.len() as u64, 4, &meta())
        );
        let entry = from_bytes(bytes.clone()).ok().unwrap();
        assert_eq!(entry.meta.command, "echo hi");
        assert_eq!(entry.stderr, b"err\n");
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
