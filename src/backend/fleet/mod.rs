//! The etcd arm of the backend: a NAME's lock, result and failure record as keys under
//! `--etcd-prefix`, shared by every machine that talks to the same etcd.
//!
//! The lock is a key attached to a lease that a [`LeaseKeeper`] renews while it is
//! held; its create revision is the fencing token. Every write of a holder is guarded
//! by that token, so a holder that lost its lease writes nothing. An etcd that does
//! not answer within `--backend-timeout` ends the call with status 125.

use std::fmt;
use std::time::Duration;

use anyhow::Result;

use super::mirror;
use super::{Backend, Config, Place};
use crate::etcd::{
    Client, Credentials, DEFAULT_MAX_VALUE, DEFAULT_TIMEOUT, Endpoints, Prefix, Security, TlsFiles,
};
use crate::exit::{Exit, Status};
use crate::key::SlotId;
use crate::store::Store;

mod lock;
mod place;

use place::FleetPlace;

/// The `--lease-ttl` default: how long the etcd lock outlives a singleflight that can
/// no longer renew it (killed, cut off).
const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);

/// The etcd backend as the command line gives it; cheap to clone.
#[derive(Clone)]
pub struct Fleet {
    client: Client,
    prefix: Prefix,
    lease_ttl: Duration,
    max_value: u64,
}

impl Fleet {
    /// The etcd of `endpoints` with the other options as given (`None`: their
    /// defaults). TLS options with a plain `etcd://` backend, or a user without a
    /// password, are usage errors (2); a TLS or password file that cannot be read or
    /// used is singleflight's failure (125). The login's token is kept in the cache
    /// dir `store` between calls.
    pub fn open(endpoints: Endpoints, config: Config, store: &Store) -> Result<Fleet> {
        let tls = TlsFiles {
            cacert: config.cacert,
            cert: config.cert,
            key: config.key,
        };
        if tls.any() && !endpoints.tls() {
            let message = format!(
                "--etcd-cacert, --etcd-cert and --etcd-key are for TLS: write the backend as \
                 etcd+https://..., not {endpoints}"
            );
            return Err(Exit::new(Status::Usage, message).into());
        }
        let credentials = match config.user {
            None => None,
            Some(user) => {
                let file = config.password_file.as_deref();
                let loaded = Credentials::load(user, file).map_err(|message| {
                    let status = if file.is_some() {
                        Status::Internal
                    } else {
                        Status::Usage
                    };
                    Exit::new(status, message)
                })?;
                Some(loaded)
            }
        };
        let security = Security { tls, credentials };
        let timeout = config.timeout.unwrap_or(DEFAULT_TIMEOUT);
        let mut client = Client::with_security(endpoints, timeout, &security)
            .map_err(|message| Exit::new(Status::Internal, message))?;
        client.keep_token_in(store);
        Ok(Fleet {
            client,
            prefix: config.prefix.unwrap_or_default(),
            lease_ttl: config.lease_ttl.unwrap_or(DEFAULT_LEASE_TTL),
            max_value: DEFAULT_MAX_VALUE,
        })
    }
}

impl Backend for Fleet {
    fn place(&self, store: Store, id: &SlotId) -> Box<dyn Place> {
        Box::new(FleetPlace::new(self.clone(), store, id))
    }

    fn verify(&self, _: &Store) -> Result<bool> {
        Ok(true)
    }

    /// Every slot with a key under the prefix.
    fn slots(&self, _: &Store) -> Result<Vec<SlotId>> {
        let keys = self
            .client
            .list(self.prefix.as_bytes())
            .map_err(|e| Exit::new(Status::Internal, format!("{self}: {e}")))?;
        Ok(self.prefix.slots(keys.iter().map(Vec::as_slice)))
    }

    fn describe(&self, _: &Store) -> String {
        self.to_string()
    }

    fn is_cache_dir(&self) -> bool {
        false
    }
}

impl fmt::Display for Fleet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&describe(self.client.endpoints(), &self.prefix))
    }
}

/// An etcd backend as it is named in messages and in a local copy's source.
fn describe(endpoints: &Endpoints, prefix: &Prefix) -> String {
    format!(
        "{endpoints} under {}",
        String::from_utf8_lossy(prefix.as_bytes())
    )
}

/// The local copy of slot `id`'s result in the etcd at `endpoints` under `prefix`, if
/// there is one that checks and is fresh by the result's own TTL (see `mirror`): what
/// a call before clap serves without opening the backend (`hit`). The same copy, by
/// the same path and source, as a `FleetPlace` keeps and reads.
pub fn read_copy(
    store: &Store,
    endpoints: &Endpoints,
    prefix: &Prefix,
    id: &SlotId,
) -> Option<crate::entry::Entry> {
    let source = mirror::source(&describe(endpoints, prefix), &prefix.keys(id).result);
    mirror::read(
        &mirror::path(&store.result_path(id)),
        &source,
        place::CLOCK_SKEW,
    )
}
