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
mod client;
#[cfg(feature = "etcd")]
mod keeper;
#[cfg(feature = "etcd")]
mod transport;
#[cfg(feature = "etcd")]
mod wire;

pub use endpoints::{Endpoints, parse_backend};
#[cfg(feature = "etcd")]
pub use keys::Keys;
pub use keys::Prefix;

#[cfg(feature = "etcd")]
pub use client::{
    Client, DEFAULT_MAX_VALUE, DEFAULT_TIMEOUT, EtcdError, FencingToken, Lease, LeaseId, Write,
    check_size,
};
#[cfg(feature = "etcd")]
pub use keeper::{LeaseKeeper, LeaseLost, default_lead};
