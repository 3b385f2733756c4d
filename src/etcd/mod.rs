//! The fleet backend's etcd client: a NAME's lock (a key attached to a lease, whose
//! create revision is the fencing token) and its result, over etcd's v3 JSON gateway.
//!
//! Blocking and small on purpose: a call makes one to three requests, each bounded by
//! `--backend-timeout`, so an async runtime and gRPC code generation (protoc) would buy
//! nothing. The gateway answers on etcd's client port from 3.4 on. Every operation is
//! safe to repeat on another member after a timeout (see [`Client::try_lock`]), which
//! is what lets the transport move on to the next member when one does not answer.
//!
//! Without the cargo feature `etcd` only the parsing of `--backend` and
//! `--etcd-prefix` is built (the command line is the same in both builds, and refuses
//! a backend it cannot use); the client and its dependencies are left out.

mod endpoints;
mod keys;

#[cfg(feature = "etcd")]
mod auth;
#[cfg(feature = "etcd")]
mod client;
#[cfg(feature = "etcd")]
mod error;
#[cfg(feature = "etcd")]
mod keeper;
#[cfg(feature = "etcd")]
mod login_lock;
#[cfg(feature = "etcd")]
mod tls;
#[cfg(feature = "etcd")]
mod token_file;
#[cfg(feature = "etcd")]
mod transport;
#[cfg(feature = "etcd")]
mod watch;
#[cfg(feature = "etcd")]
mod wire;

pub use endpoints::{Endpoints, parse_backend};

use std::time::Duration;

/// The shortest `--lease-ttl`: what etcd 3.4 grants at least with its default
/// `--election-timeout` (1 s: a lease is at least 1.5 election timeouts, rounded up;
/// a shorter request is raised to it).
pub const MIN_LEASE_TTL: Duration = Duration::from_secs(2);
/// The longest `--lease-ttl`: a lock of a singleflight that died stays taken this long.
pub const MAX_LEASE_TTL: Duration = Duration::from_secs(3600);

/// `--lease-ttl D`: a duration from [`MIN_LEASE_TTL`] to [`MAX_LEASE_TTL`]; etcd's
/// TTLs are whole seconds, so a fraction is rounded up.
pub fn parse_lease_ttl(value: &str) -> Result<Duration, String> {
    let ttl = crate::values::parse_duration(value)?;
    let ttl = Duration::from_secs(ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0));
    if ttl < MIN_LEASE_TTL {
        return Err(format!(
            "a lease TTL of {value:?} is below etcd's shortest lease, 2s (etcd raises a \
             shorter one to 1.5 times its --election-timeout, 2s by default)"
        ));
    }
    if ttl > MAX_LEASE_TTL {
        return Err(format!(
            "a lease TTL of {value:?} is over the limit of 1h: a lock whose holder died \
             would stay taken that long"
        ));
    }
    Ok(ttl)
}
#[cfg(feature = "etcd")]
pub use keys::Keys;
pub use keys::Prefix;

#[cfg(feature = "etcd")]
pub use auth::Credentials;
#[cfg(feature = "etcd")]
pub use client::{
    Client, DEFAULT_MAX_VALUE, DEFAULT_TIMEOUT, FencingToken, Lease, LeaseId, Security, Value,
    Write,
};
#[cfg(feature = "etcd")]
pub use error::{EtcdError, check_size};
#[cfg(feature = "etcd")]
pub use keeper::{LeaseKeeper, LeaseLost, default_lead};
#[cfg(feature = "etcd")]
pub use tls::TlsFiles;
#[cfg(feature = "etcd")]
pub use watch::Wait;
