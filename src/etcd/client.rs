//! The etcd client: a NAME's lock (a key attached to a lease, whose create revision is
//! the fencing token), guarded writes and reads, over etcd's v3 JSON gateway.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use super::auth::{Auth, Credentials};
use super::endpoints::Endpoints;
use super::error::EtcdError;
use super::tls::{self, TlsFiles};
use super::token_file::TokenFile;
use super::transport::{Transport, parse};
use super::wire::{self, b64, prefix_end};
use crate::store::Store;

/// `--backend-timeout` default: the longest one request to one member may take.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// The largest value singleflight stores in etcd, by default. etcd refuses requests
/// over 1.5 MiB (`--max-request-bytes`); this leaves room for the request around it.
pub const DEFAULT_MAX_VALUE: u64 = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LeaseId(pub i64);

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// The etcd revision that created a lock key. Each new holder's is larger than every
/// earlier holder's, so a store downstream can refuse writes with an older one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FencingToken(pub i64);

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A granted lease.
#[derive(Clone, Copy, Debug)]
pub struct Lease {
    pub id: LeaseId,
    /// The TTL etcd granted (it may raise a small request to its minimum).
    pub ttl: Duration,
    /// When the grant was sent: etcd cannot expire the lease before `granted_at + ttl`.
    pub granted_at: Instant,
}

/// Who holds a lock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub lease: LeaseId,
    pub token: FencingToken,
    /// What the holder wrote into the lock key (see [`Client::try_lock`]).
    pub owner: Vec<u8>,
}

/// Lock keys with their holders (see [`Client::holders`]).
pub type Holders = Vec<(Vec<u8>, Holder)>;

/// A value read from etcd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Value {
    pub bytes: Vec<u8>,
    /// The revision of its last write.
    pub mod_revision: i64,
}

/// One write of a guarded transaction ([`Client::write_if_holder`]).
#[derive(Clone, Copy, Debug)]
pub enum Write<'a> {
    Put {
        key: &'a [u8],
        value: &'a [u8],
    },
    /// A put that attaches the key to a lease (a put without one detaches it): to
    /// rewrite the lock key's value, which keeps its create revision, the token.
    PutLeased {
        key: &'a [u8],
        value: &'a [u8],
        lease: LeaseId,
    },
    Delete {
        key: &'a [u8],
    },
}

/// How a client proves who it is, and whom it trusts: TLS files (for
/// `etcd+https://`) and a login.
#[derive(Clone, Debug, Default)]
pub struct Security {
    pub tls: TlsFiles,
    pub credentials: Option<Credentials>,
}

/// A blocking etcd client; cheap to clone (the lease keeper holds one, and shares its
/// login).
#[derive(Clone)]
pub struct Client {
    pub(super) transport: Arc<Transport>,
    pub(super) auth: Option<Arc<Auth>>,
}

impl Client {
    /// A client of these members over plain HTTP or TLS with the default roots, each
    /// request to one member bounded by `timeout`. Nothing is sent until the first
    /// operation.
    pub fn new(endpoints: Endpoints, timeout: Duration) -> Client {
        Client {
            transport: Arc::new(Transport::new(endpoints, timeout, None)),
            auth: None,
        }
    }

    /// A client with TLS files and a login. The files are read now; the error names
    /// the one that cannot be used. Nothing is sent until the first operation.
    pub fn with_security(
        endpoints: Endpoints,
        timeout: Duration,
        security: &Security,
    ) -> Result<Client, String> {
        let tls = if security.tls.any() {
            Some(tls::config(&security.tls)?)
        } else {
            None
        };
        Ok(Client {
            transport: Arc::new(Transport::new(endpoints, timeout, tls)),
            auth: security.credentials.clone().map(|c| Arc::new(Auth::new(c))),
        })
    }

    /// Keeps the login's token in the cache dir `store` between calls (see
    /// `token_file`), instead of logging in on every call. Without a login, nothing.
    pub(crate) fn keep_token_in(&mut self, store: &Store) {
        if let Some(auth) = &self.auth {
            let file = TokenFile::new(store.clone(), self.transport.endpoints(), auth.user());
            self.auth = Some(Arc::new(auth.keeping_token_in(file)));
        }
    }

    pub fn endpoints(&self) -> &Endpoints {
        self.transport.endpoints()
    }

    pub fn timeout(&self) -> Duration {
        self.transport.timeout()
    }

    fn call(&self, path: &str, body: serde_json::Value) -> Result<Vec<u8>, EtcdError> {
        self.authed(None, |token| {
            Ok(self.transport.post(path, &body, None, token)?.bytes)
        })
    }

    /// Runs `op` with the login's token (none without a login). When etcd refuses
    /// the token (expired), logs in again and runs `op` once more.
    pub(super) fn authed<T>(
        &self,
        deadline: Option<Instant>,
        op: impl Fn(Option<&str>) -> Result<T, EtcdError>,
    ) -> Result<T, EtcdError> {
        let Some(auth) = &self.auth else {
            return op(None);
        };
        let token = auth.token(&self.transport, deadline)?;
        match op(Some(&token)) {
            Err(e) if e.is_stale_token() => {
                let token = auth.renew(&self.transport, &token, deadline)?;
                op(Some(&token))
            }
            other => other,
        }
    }

    /// Grants a lease of `ttl` (whole seconds, rounded up).
    pub fn grant(&self, ttl: Duration) -> Result<Lease, EtcdError> {
        let granted_at = Instant::now();
        let seconds = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        let answer = self.call("/lease/grant", json!({ "TTL": seconds.to_string() }))?;
        let grant: wire::LeaseGrantResponse = parse(&answer, "lease grant")?;
        if !grant.error.is_empty() || grant.id == 0 || grant.ttl <= 0 {
            return Err(EtcdError::Garbled {
                detail: format!(
                    "lease grant: id {}, ttl {}, error {:?}",
                    grant.id, grant.ttl, grant.error
                ),
            });
        }
        Ok(Lease {
            id: LeaseId(grant.id),
            ttl: Duration::from_secs(grant.ttl as u64),
            granted_at,
        })
    }

    /// Renews a lease; returns its time to live from now, zero if it is gone
    /// (expired or revoked).
    pub fn keep_alive(&self, lease: LeaseId) -> Result<Duration, EtcdError> {
        self.keep_alive_until(lease, None)
    }

    pub(super) fn keep_alive_until(
        &self,
        lease: LeaseId,
        deadline: Option<Instant>,
    ) -> Result<Duration, EtcdError> {
        let body = json!({ "ID": lease.0.to_string() });
        self.authed(deadline, |token| {
            let answer = self
                .transport
                .post("/lease/keepalive", &body, deadline, token)?;
            // A streaming call: one message per line; one request, one message.
            let line = answer
                .bytes
                .split(|&b| b == b'\n')
                .find(|line| !line.iter().all(u8::is_ascii_whitespace))
                .unwrap_or_default();
            let message: wire::StreamMessage<wire::LeaseKeepAliveResponse> =
                parse(line, "lease keepalive")?;
            match (message.result, message.error) {
                (Some(result), _) => Ok(Duration::from_secs(result.ttl.max(0) as u64)),
                (None, Some(error)) => Err(error.refused_by(answer.member)),
                (None, None) => Err(EtcdError::Garbled {
                    detail: format!("lease keepalive: {:?}", String::from_utf8_lossy(line)),
                }),
            }
        })
    }

    /// Revokes a lease, deleting the keys attached to it (the lock). A lease that is
    /// already gone is not an error.
    pub fn revoke(&self, lease: LeaseId) -> Result<(), EtcdError> {
        match self.call("/lease/revoke", json!({ "ID": lease.0.to_string() })) {
            Ok(_) => Ok(()),
            Err(EtcdError::Refused { code, .. }) if code == wire::NOT_FOUND => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Takes the lock `key` for `lease` if nobody holds it: one transaction "if the key
    /// does not exist, create it attached to the lease". Returns the fencing token (the
    /// revision that created the key), or `None` if somebody else holds it. `owner`
    /// is stored in the key for `status` (who runs it: host, pid).
    ///
    /// Safe to repeat: if an earlier attempt took the lock but its answer was lost, the
    /// key is found attached to our own lease and its token is returned.
    pub fn try_lock(
        &self,
        key: &[u8],
        lease: LeaseId,
        owner: &[u8],
    ) -> Result<Option<FencingToken>, EtcdError> {
        let key64 = b64(key);
        let answer = self.call(
            "/kv/txn",
            json!({
                "compare": [{
                    "key": key64, "target": "CREATE", "result": "EQUAL",
                    "create_revision": "0",
                }],
                "success": [{ "request_put": {
                    "key": key64, "value": b64(owner), "lease": lease.0.to_string(),
                }}],
                "failure": [{ "request_range": { "key": key64 } }],
            }),
        )?;
        let txn: wire::TxnResponse = parse(&answer, "lock transaction")?;
        if txn.succeeded {
            return Ok(Some(FencingToken(txn.header.revision)));
        }
        let holder = txn
            .responses
            .into_iter()
            .find_map(|op| op.response_range)
            .and_then(|range| range.kvs.into_iter().next());
        Ok(holder
            .filter(|kv| kv.lease == lease.0)
            .map(|kv| FencingToken(kv.create_revision)))
    }

    /// Who holds the lock `key`, if anybody.
    pub fn lock_holder(&self, key: &[u8]) -> Result<Option<Holder>, EtcdError> {
        Ok(self.range_one(key)?.map(|kv| Holder {
            lease: LeaseId(kv.lease),
            token: FencingToken(kv.create_revision),
            owner: kv.value,
        }))
    }

    /// The value at `key` and the revision of its last write.
    pub fn get(&self, key: &[u8]) -> Result<Option<Value>, EtcdError> {
        Ok(self.range_one(key)?.map(|kv| Value {
            bytes: kv.value,
            mod_revision: kv.mod_revision,
        }))
    }

    fn range_one(&self, key: &[u8]) -> Result<Option<wire::KeyValue>, EtcdError> {
        Ok(self.range_at(key)?.0)
    }

    /// The key's value if any, and the revision of the store when it was read.
    pub(super) fn range_at(&self, key: &[u8]) -> Result<(Option<wire::KeyValue>, i64), EtcdError> {
        let answer = self.call("/kv/range", json!({ "key": b64(key) }))?;
        let range: wire::RangeResponse = parse(&answer, "range")?;
        Ok((range.kvs.into_iter().next(), range.header.revision))
    }

    /// The keys that start with `prefix`, in key order.
    pub fn list(&self, prefix: &[u8]) -> Result<Vec<Vec<u8>>, EtcdError> {
        let answer = self.call(
            "/kv/range",
            json!({
                "key": b64(prefix), "range_end": b64(&prefix_end(prefix)), "keys_only": true,
            }),
        )?;
        let range: wire::RangeResponse = parse(&answer, "range")?;
        Ok(range.kvs.into_iter().map(|kv| kv.key).collect())
    }

    /// The lock keys that start with `prefix` (the run slots of `--slots`), each with
    /// its holder, in key order, and the revision of the store when they were read.
    pub fn holders(&self, prefix: &[u8]) -> Result<(Holders, i64), EtcdError> {
        let answer = self.call(
            "/kv/range",
            json!({ "key": b64(prefix), "range_end": b64(&prefix_end(prefix)) }),
        )?;
        let range: wire::RangeResponse = parse(&answer, "range")?;
        let holders = range
            .kvs
            .into_iter()
            .map(|kv| {
                let holder = Holder {
                    lease: LeaseId(kv.lease),
                    token: FencingToken(kv.create_revision),
                    owner: kv.value,
                };
                (kv.key, holder)
            })
            .collect();
        Ok((holders, range.header.revision))
    }

    /// Takes the run slot `key` (as [`Client::try_lock`]) and records `count` at
    /// `count_key`, in one transaction, if the slot is free and `count_key` is as it
    /// was read (`count_revision`, 0: absent): every taking of a slot rewrites
    /// `count_key`, so two callers that read the same state cannot both take a slot on
    /// it. The fencing token, or `None` if either changed.
    pub fn try_lock_slot(
        &self,
        key: &[u8],
        lease: LeaseId,
        owner: &[u8],
        count_key: &[u8],
        count_revision: i64,
        count: &[u8],
    ) -> Result<Option<FencingToken>, EtcdError> {
        let answer = self.call(
            "/kv/txn",
            json!({
                "compare": [
                    { "key": b64(key), "target": "CREATE", "result": "EQUAL",
                      "create_revision": "0" },
                    { "key": b64(count_key), "target": "MOD", "result": "EQUAL",
                      "mod_revision": count_revision.to_string() },
                ],
                "success": [
                    { "request_put": {
                        "key": b64(key), "value": b64(owner), "lease": lease.0.to_string(),
                    }},
                    { "request_put": { "key": b64(count_key), "value": b64(count) } },
                ],
            }),
        )?;
        let txn: wire::TxnResponse = parse(&answer, "slot transaction")?;
        Ok(txn.succeeded.then_some(FencingToken(txn.header.revision)))
    }

    /// Carries out `writes` in one transaction if, and only if, the lock `lock_key`
    /// is still held with `token`: a holder that lost the lock (its lease expired, or
    /// it was revoked) writes nothing. Returns whether the writes happened.
    ///
    /// Safe to repeat: writing the same values again changes nothing a reader sees.
    pub fn write_if_holder(
        &self,
        lock_key: &[u8],
        token: FencingToken,
        writes: &[Write],
    ) -> Result<bool, EtcdError> {
        let revision = self.write_if_holder_at(lock_key, token, writes)?;
        Ok(revision.is_some())
    }

    /// [`Client::write_if_holder`], returning the revision of the transaction if the
    /// writes happened: the mod_revision of every key it put, which a copy of a value
    /// it stored is kept with.
    pub fn write_if_holder_at(
        &self,
        lock_key: &[u8],
        token: FencingToken,
        writes: &[Write],
    ) -> Result<Option<i64>, EtcdError> {
        let ops: Vec<serde_json::Value> = writes
            .iter()
            .map(|write| match write {
                Write::Put { key, value } => {
                    json!({ "request_put": { "key": b64(key), "value": b64(value) } })
                }
                Write::PutLeased { key, value, lease } => json!({ "request_put": {
                    "key": b64(key), "value": b64(value), "lease": lease.0.to_string(),
                }}),
                Write::Delete { key } => json!({ "request_delete_range": { "key": b64(key) } }),
            })
            .collect();
        let answer = self.call(
            "/kv/txn",
            json!({
                "compare": [{
                    "key": b64(lock_key), "target": "CREATE", "result": "EQUAL",
                    "create_revision": token.0.to_string(),
                }],
                "success": ops,
            }),
        )?;
        let txn: wire::TxnResponse = parse(&answer, "guarded write")?;
        Ok(txn.succeeded.then_some(txn.header.revision))
    }

    /// Puts `value` at `key` if the lock is still held with `token`.
    pub fn put_if_holder(
        &self,
        key: &[u8],
        value: &[u8],
        lock_key: &[u8],
        token: FencingToken,
    ) -> Result<bool, EtcdError> {
        self.write_if_holder(lock_key, token, &[Write::Put { key, value }])
    }

    /// Deletes `key` if the lock is still held with `token`.
    pub fn delete_if_holder(
        &self,
        key: &[u8],
        lock_key: &[u8],
        token: FencingToken,
    ) -> Result<bool, EtcdError> {
        self.write_if_holder(lock_key, token, &[Write::Delete { key }])
    }

    /// Releases the lock if it is still ours (held with `token`); a lock that was lost
    /// meanwhile, and maybe taken by somebody else, is left alone.
    pub fn release(&self, lock_key: &[u8], token: FencingToken) -> Result<bool, EtcdError> {
        self.write_if_holder(lock_key, token, &[Write::Delete { key: lock_key }])
    }
}
