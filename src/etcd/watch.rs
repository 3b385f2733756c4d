//! Waiting for a lock's release: a watch on the lock key (`POST /v3/watch`, a stream
//! of JSON lines), so that a waiter wakes the moment the key is deleted, not at its
//! next look. The watch may take in one more key, the result's: a holder that stores
//! it and lets go of the lock in one transaction hands every waiter the new value in
//! the same message, so none has to ask for it again.
//!
//! The watch starts at the revision after the read that saw the key held, so a
//! release between that read and the watch's creation is still seen. A watch that
//! cannot be opened or breaks (a member going down, an old revision compacted) is
//! opened again after one [`POLL_INTERVAL`]; after [`MAX_WATCH_FAILURES`] in a row the
//! waiter looks every [`POLL_INTERVAL`] instead. Every look and every watch ends by
//! the caller's deadline.

use std::io::{self, BufRead};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;

use super::client::{Client, DEFAULT_MAX_VALUE, Value};
use super::error::{EtcdError, UNAUTHENTICATED};
use super::transport::{Stream, parse};
use super::wire::{self, b64};
use crate::values::later;

/// How long a waiter waits before it looks again where no watch can be kept.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Broken watches in a row after which a waiter polls instead.
const MAX_WATCH_FAILURES: u32 = 3;
/// The longest line of a watch read: room for a result of [`DEFAULT_MAX_VALUE`] (4/3
/// of it in base64) and the other events of its transaction.
const MAX_LINE: usize = 2 * DEFAULT_MAX_VALUE as usize;
/// For `bench/etcd.sh` only: wait by looking every [`POLL_INTERVAL`], as before the
/// watch, so that the two can be measured side by side.
const POLL_ENV: &str = "SINGLEFLIGHT_BENCH_POLL_WAIT";

/// How a wait for a lock's release ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Wait {
    /// The lock was still held at the limit.
    Held,
    /// The lock was released. `value`: what the other watched key had been given by
    /// then, with the revision it was written at, if the watch saw it written (by the
    /// release's own transaction, say); `None` if it did not, and the key is to be
    /// read.
    Released { value: Option<Value> },
}

/// How a watch ended.
enum Watched {
    /// The key was deleted (the lock released, or its lease gone), with the other
    /// key's value if the watch saw it written.
    Deleted(Option<Value>),
    /// The deadline came first.
    OutOfTime,
    /// The stream ended or was cancelled without a deletion.
    Ended,
}

impl Client {
    /// Waits until nobody holds the lock `key`, for at most `limit`. Returns whether
    /// it was released in time. Woken by a watch on the key; see the module.
    pub fn wait_released(&self, key: &[u8], limit: Duration) -> Result<bool, EtcdError> {
        let wait = self.wait_for_release(key, None, limit)?;
        Ok(wait != Wait::Held)
    }

    /// [`Client::wait_released`], watching `value_key` as well: a value written to it
    /// by the time of the release comes with [`Wait::Released`].
    pub fn wait_for_release(
        &self,
        key: &[u8],
        value_key: Option<&[u8]>,
        limit: Duration,
    ) -> Result<Wait, EtcdError> {
        let deadline = later(Instant::now(), limit);
        let mut failures = if std::env::var_os(POLL_ENV).is_some() {
            MAX_WATCH_FAILURES
        } else {
            0
        };
        loop {
            let (holder, revision) = self.range_at(key)?;
            if holder.is_none() {
                return Ok(Wait::Released { value: None });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(Wait::Held);
            }
            if failures < MAX_WATCH_FAILURES {
                let from = revision.saturating_add(1);
                match self.watch_deleted(key, value_key, from, deadline) {
                    Ok(Watched::Deleted(value)) => return Ok(Wait::Released { value }),
                    // Looks once more, then says it stayed held.
                    Ok(Watched::OutOfTime) => continue,
                    Ok(Watched::Ended) | Err(_) => failures += 1,
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            thread::sleep(left.min(POLL_INTERVAL));
        }
    }

    /// Waits until any key that starts with `prefix` is deleted after revision
    /// `seen` (a run slot of `--slots` let go), for at most `limit`; whether one was.
    /// A watch that cannot be kept is replaced by one look after [`POLL_INTERVAL`]
    /// (the caller looks again either way).
    pub fn wait_any_released(
        &self,
        prefix: &[u8],
        seen: i64,
        limit: Duration,
    ) -> Result<bool, EtcdError> {
        let deadline = later(Instant::now(), limit);
        let body = json!({ "create_request": {
            "key": b64(prefix),
            "range_end": b64(&wire::prefix_end(prefix)),
            "start_revision": seen.saturating_add(1).to_string(),
        }});
        let watched = self.authed(Some(deadline), |token| {
            let stream = self.transport.stream("/watch", &body, deadline, token)?;
            read_until(stream, &|_| true, None)
        });
        match watched {
            Ok(Watched::Deleted(_)) => Ok(true),
            Ok(Watched::OutOfTime) => Ok(false),
            Ok(Watched::Ended) | Err(_) => {
                let left = deadline.saturating_duration_since(Instant::now());
                thread::sleep(left.min(POLL_INTERVAL));
                Ok(!left.is_zero())
            }
        }
    }

    /// Watches `key` (and `value_key`: the range from the lower of the two to the
    /// higher) from revision `from` until `key` is deleted, the stream ends, or
    /// `deadline`.
    fn watch_deleted(
        &self,
        key: &[u8],
        value_key: Option<&[u8]>,
        from: i64,
        deadline: Instant,
    ) -> Result<Watched, EtcdError> {
        let (low, high) = match value_key {
            Some(other) => (key.min(other), key.max(other)),
            None => (key, key),
        };
        let body = json!({ "create_request": {
            "key": b64(low),
            // The key just after `high`: the range takes in `high` itself.
            "range_end": b64(&[high, b"\0"].concat()),
            "start_revision": from.to_string(),
        }});
        self.authed(Some(deadline), |token| {
            let stream = self.transport.stream("/watch", &body, deadline, token)?;
            read_until(stream, &|deleted| deleted == key, value_key)
        })
    }
}

/// Reads the watch until a key that `released` accepts is deleted.
fn read_until(
    mut stream: Stream,
    released: &dyn Fn(&[u8]) -> bool,
    value_key: Option<&[u8]>,
) -> Result<Watched, EtcdError> {
    let mut value = None;
    let mut line = Vec::new();
    loop {
        line.clear();
        match read_line(&mut stream.reader, &mut line) {
            Ok(0) => return Ok(Watched::Ended),
            Ok(_) => {}
            Err(e) if timed_out(&e) => return Ok(Watched::OutOfTime),
            Err(e) => {
                return Err(EtcdError::Unreachable {
                    tried: vec![(stream.member, format!("the watch broke: {e}"))],
                });
            }
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let message: wire::StreamMessage<wire::WatchResponse> = parse(&line, "watch")?;
        if let Some(error) = message.error {
            return Err(error.refused_by(stream.member));
        }
        let Some(watch) = message.result else {
            continue;
        };
        // In order: a transaction's events come in one message, as it made them.
        for event in watch.events {
            let deleted = event.kind == "DELETE";
            if deleted && released(&event.kv.key) {
                return Ok(Watched::Deleted(value));
            }
            if Some(event.kv.key.as_slice()) == value_key {
                value = (!deleted).then_some(Value {
                    bytes: event.kv.value,
                    mod_revision: event.kv.mod_revision,
                });
            }
        }
        if watch.canceled {
            // Refused for its token: the caller logs in again and watches once more.
            let reason = watch.cancel_reason;
            if reason.contains("invalid auth token") || reason.contains("Unauthenticated") {
                return Err(EtcdError::Refused {
                    member: stream.member,
                    code: UNAUTHENTICATED,
                    message: reason,
                });
            }
            return Ok(Watched::Ended);
        }
    }
}

/// Reads one line (up to `\n`) into `line`, at most [`MAX_LINE`] bytes; 0 at the end.
fn read_line(reader: &mut impl BufRead, line: &mut Vec<u8>) -> io::Result<usize> {
    loop {
        let available = reader.fill_buf()?;
        if available.is_empty() {
            return Ok(line.len());
        }
        let (taken, done) = match available.iter().position(|&b| b == b'\n') {
            Some(end) => (end + 1, true),
            None => (available.len(), false),
        };
        line.extend_from_slice(&available[..taken]);
        reader.consume(taken);
        if done {
            return Ok(line.len());
        }
        if line.len() > MAX_LINE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a watch message over {MAX_LINE} bytes"),
            ));
        }
    }
}

/// Whether a read failed because its deadline came.
fn timed_out(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::TimedOut
        || error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<ureq::Error>())
            .is_some_and(|e| matches!(e, ureq::Error::Timeout(_)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn lines_are_read_whole_and_bounded() {
        let mut input = io::Cursor::new(b"{\"a\":1}\n\n{\"b\":2}".to_vec());
        let mut line = Vec::new();
        assert_eq!(read_line(&mut input, &mut line).unwrap(), 8);
        assert_eq!(line, b"{\"a\":1}\n");
        line.clear();
        assert_eq!(read_line(&mut input, &mut line).unwrap(), 1);
        line.clear();
        assert_eq!(read_line(&mut input, &mut line).unwrap(), 7);
        line.clear();
        assert_eq!(read_line(&mut input, &mut line).unwrap(), 0);
        let mut huge = io::BufReader::with_capacity(4096, io::repeat(b'x').take(3 << 20));
        assert!(read_line(&mut huge, &mut line).is_err());
    }
}
