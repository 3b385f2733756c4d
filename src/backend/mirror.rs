//! The local copy of a fleet result (`NAME.fleet` in the cache dir), for both shared
//! backends (etcd, `fleet/`; PostgreSQL, `pg.rs`): a fresh result is kept with its
//! revision and the time it was had, and a later call on this machine serves it
//! without asking the backend while it is fresh by the result's own TTL (the `--ttl`
//! of the run that wrote it) and by the caller's. It is kept wherever a caller comes
//! to hold the fleet's result: read from the backend, handed to a waiter with the
//! lock's release, and stored by the caller that ran the command (a result that was
//! not stored, its lock lost or too large, keeps none). Each of them would otherwise
//! ask the backend again at its next call.
//!
//! The revision: with etcd the key's mod_revision (as read; the watch event's for a
//! result handed to a waiter; the storing transaction's for the caller that ran).
//! PostgreSQL's result row has no version column (`<schema>.slots`, see
//! `postgres/sql.rs`), so a copy of a PostgreSQL result records 0. Nothing reads it
//! back: it is there to tell copies apart when looking at one.
//!
//! What changes: a `clear` or a newer result on another machine is seen here once the
//! copy is no longer fresh, at most the result's TTL after it was written (before,
//! at the next call). What does not: the copy is never fresher than the fleet's result
//! it copies (its age is that result's age); the run stays one per fleet (a call that
//! finds the copy stale asks the backend, and runs only as it says); a stale result is
//! never served from the copy (stale-while-revalidate and waits go through the backend).
//!
//! ```text
//! "SFMIRROR" | read_at_ms u64 LE | revision i64 LE | source_len u64 LE | source
//!            | the result as the backend holds it (entry::to_bytes) | xxh3-64 of all before
//! ```
//! `source` is the backend and the key of the slot the copy is of: with etcd the
//! endpoints, prefix and result key; with PostgreSQL the server (host or socket dir,
//! port), database, schema and slot, never the user's password (see `pg.rs`). Two
//! clusters, servers, prefixes or schemas sharing a cache dir never serve each other's
//! copies. A copy whose checksum, source or result does not check is never served.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use xxhash_rust::xxh3::xxh3_64;

use crate::entry::{self, Entry};
use crate::store::Store;
use crate::values::Name;

/// One slot's copy and all that keeping it takes: the cache dir and NAME it is written
/// under, its path, its source, the clock skew allowed. The place that reads a result
/// and the lock that stores one hold the same, so both keep the copy alike.
#[derive(Clone)]
pub(super) struct Mirror {
    pub(super) store: Store,
    pub(super) name: Name,
    pub(super) path: PathBuf,
    pub(super) source: Vec<u8>,
    pub(super) skew: Duration,
}

impl Mirror {
    /// Keeps a copy of `result`, a valid result just read from the backend, delivered
    /// to a waiter or stored by this caller (which the backend holds at `revision`), if
    /// it is fresh by its own TTL; removes any older copy otherwise. Best effort: a copy
    /// that cannot be written only means the next call asks the backend.
    pub(super) fn keep(&self, revision: i64, result: &[u8]) {
        let now = SystemTime::now();
        let fresh = entry::from_bytes(result.to_vec())
            .is_ok_and(|entry| fresh_by_own_ttl(&entry, now, self.skew));
        if !fresh {
            self.forget();
            return;
        }
        if self.store.ensure().is_err() {
            return;
        }
        let bytes = encode(&self.source, revision, entry::now_ms(now), result);
        let _ = self
            .store
            .write_atomically(&self.name, &self.path, &bytes, false);
    }

    /// Drops the copy (the fleet holds no result, or one not worth keeping).
    pub(super) fn forget(&self) {
        let _ = std::fs::remove_file(&self.path);
    }

    /// The copy's result, if it checks and is fresh (see [`read`]).
    pub(super) fn read(&self) -> Option<Entry> {
        read(&self.path, &self.source, self.skew)
    }
}

const MAGIC: &[u8; 8] = b"SFMIRROR";
const HEAD_LEN: usize = 8 + 8 + 8 + 8;

/// Where a slot's copy is: beside its local result, `NAME.fleet`.
pub fn path(result_path: &Path) -> PathBuf {
    result_path.with_extension("fleet")
}

/// What a copy is of: the backend as named for copies (etcd: its endpoints and prefix
/// as `Fleet` displays them; PostgreSQL: see `pg::copy_backend`) and the result's key
/// in it (etcd: the result key; PostgreSQL: the slot).
pub fn source(backend: &str, result_key: &[u8]) -> Vec<u8> {
    [backend.as_bytes(), b"\n", result_key].concat()
}

/// The bytes of a copy of `result` (as the backend holds it at `revision`).
fn encode(source: &[u8], revision: i64, read_at_ms: u64, result: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(HEAD_LEN + source.len() + result.len() + 8);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&read_at_ms.to_le_bytes());
    bytes.extend_from_slice(&revision.to_le_bytes());
    bytes.extend_from_slice(&(source.len() as u64).to_le_bytes());
    bytes.extend_from_slice(source);
    bytes.extend_from_slice(result);
    let checksum = xxh3_64(&bytes);
    bytes.extend_from_slice(&checksum.to_le_bytes());
    bytes
}

/// The result in a copy's bytes, if they check and are of `source`.
fn decode(source: &[u8], mut bytes: Vec<u8>) -> Option<Entry> {
    let body_end = bytes.len().checked_sub(8)?;
    let checksum = u64::from_le_bytes(bytes[body_end..].try_into().ok()?);
    if bytes.len() < HEAD_LEN + 8 || &bytes[..8] != MAGIC || xxh3_64(&bytes[..body_end]) != checksum
    {
        return None;
    }
    let source_len = usize::try_from(u64::from_le_bytes(bytes[24..32].try_into().ok()?)).ok()?;
    let result_start = HEAD_LEN.checked_add(source_len)?;
    if result_start > body_end || bytes[HEAD_LEN..result_start] != *source {
        return None;
    }
    bytes.truncate(body_end);
    let result = bytes.split_off(result_start);
    entry::from_bytes(result).ok()
}

/// Whether a result is fresh by its own TTL at `now`, allowing `skew` for a writer's
/// clock ahead of ours.
fn fresh_by_own_ttl(entry: &Entry, now: SystemTime, skew: Duration) -> bool {
    let now_ms = entry::now_ms(now);
    let written = entry.meta.written_at_ms;
    written <= now_ms.saturating_add(skew.as_millis() as u64)
        && now_ms < written.saturating_add(entry.meta.ttl_ms)
}

/// The copy's result, if there is one that checks, of `source`, fresh by its own TTL.
pub fn read(path: &Path, source: &[u8], skew: Duration) -> Option<Entry> {
    let mut file = match crate::store::open_regular(path).ok()? {
        crate::store::Opened::File(file, meta) if meta.len() <= 64 << 20 => file,
        _ => return None,
    };
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut file, &mut bytes).ok()?;
    let entry = decode(source, bytes)?;
    fresh_by_own_ttl(&entry, entry::wall_clock(), skew).then_some(entry)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::Meta;

    fn result(written_at_ms: u64, ttl_ms: u64) -> Vec<u8> {
        let meta = Meta {
            argv_digest: entry::argv_digest(&["echo".into()]),
            command: "echo".into(),
            written_at_ms,
            ttl_ms,
            exit_code: 0,
            duration_ms: 1,
        };
        entry::to_bytes(b"body\n", b"", &meta)
    }

    #[test]
    fn a_copy_is_served_only_whole_of_its_source_and_fresh() {
        let now = entry::now_ms(SystemTime::now());
        let good = encode(b"src", 7, now, &result(now, 60_000));
        assert!(decode(b"src", good.clone()).is_some());
        assert!(decode(b"other", good.clone()).is_none());
        for len in 0..good.len() {
            assert!(
                decode(b"src", good[..len].to_vec()).is_none(),
                "cut to {len}"
            );
        }
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x01;
            assert!(decode(b"src", bad).is_none(), "byte {i} flipped");
        }
        let at = SystemTime::now();
        let entry = |bytes: Vec<u8>| entry::from_bytes(bytes).ok().unwrap();
        assert!(fresh_by_own_ttl(
            &entry(result(now, 60_000)),
            at,
            Duration::ZERO
        ));
        assert!(!fresh_by_own_ttl(
            &entry(result(now - 61_000, 60_000)),
            at,
            Duration::ZERO
        ));
        assert!(!fresh_by_own_ttl(
            &entry(result(now + 10_000, 60_000)),
            at,
            Duration::ZERO
        ));
    }
}
