//! singleflight: of any number of concurrent callers at most one runs the command;
//! its stdout is cached atomically and everyone else gets the last good result.
//!
//! `main` parses the command line ([`cli`]) and calls [`run`]. The decision of every
//! call is in [`decide`], carried out by [`flight`] with the cache ([`store`],
//! [`entry`]), the lock ([`lock`]) and the process tree ([`run`](mod@run), [`reap`]).
//! With `--backend etcd://…` the lock and the result live in etcd instead ([`etcd`]):
//! [`backend`] is the one place where the two part ways.

pub mod backend;
pub mod cli;
pub mod decide;
pub mod entry;
pub mod etcd;
pub mod exit;
pub mod flight;
#[cfg(unix)]
pub mod guard;
pub mod key;
pub mod lock;
pub mod reap;
pub mod record;
pub mod run;
pub mod say;
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub mod start;
pub mod status;
pub mod store;
pub mod values;

use anyhow::Result;

use crate::backend::Backend;
use crate::cli::{Cli, Verb};
use crate::say::Say;
use crate::store::Store;

/// Carries out a parsed command line; returns the exit status.
pub fn run(cli: Cli) -> Result<i32> {
    let global = cli.global;
    let backend = Backend::from_args(&global);
    let store = Store::locate(global.cache_dir)?;
    match cli.verb {
        Some(Verb::Status { names, json }) => status::status(&backend, &store, names, json),
        Some(Verb::Clear {
            names,
            all,
            older_than,
        }) => {
            let say = Say::new(None, global.verbose, global.quiet);
            let every = all || (older_than.is_some() && names.is_empty());
            status::clear(&backend, &store, names, every, older_than, &say)
        }
        None => {
            let opts = cli
                .run
                .resolve()
                .expect("clap requires NAME without a verb");
            let say = Say::new(Some(opts.name.clone()), global.verbose, global.quiet);
            let key = key::resolve(&opts.name, &opts.keys)?;
            let slot = backend.slot(store, &key.id).keyed(key);
            flight::Flight::new(opts, slot, say).fly()
        }
    }
}
