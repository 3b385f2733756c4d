//! singleflight: of any number of concurrent callers at most one runs the command;
//! its stdout is cached atomically and everyone else gets the last good result.
//!
//! `main` parses the command line (`cli`) and calls [`run`]. The decision of every
//! call is in `decide`, carried out by `flight` with the cache (`store`, `entry`), the
//! lock (`lock`) and the process tree (`command`, `reap`). With `--backend etcd://…` the
//! lock and the result live in etcd instead (`etcd`): `backend` is the one interface
//! with an implementation for each (`backend/local.rs`, `backend/fleet/`).
//!
//! The modules are private: the crate is an executable first, and its library is
//! what `main`, the tests and the example need, listed below, nothing else.

mod abort;
mod arena;
mod backend;
mod cli;
mod command;
mod decide;
mod entry;
mod etcd;
pub mod exit;
mod flight;
#[cfg(unix)]
mod guard;
mod hit;
mod input;
mod key;
mod lock;
mod postgres;
mod reap;
mod record;
mod say;
#[cfg(target_os = "linux")]
mod start;
mod status;
mod stop;
mod store;
mod threads;
mod values;

// For `main`.
pub use crate::arena::Arena;
pub use crate::cli::Cli;
pub use crate::command::die_of;
#[cfg(unix)]
pub use crate::guard::{ARG as GUARD_ARG, main as guard_main};
pub use crate::hit::serve_fresh;
#[cfg(target_os = "linux")]
pub use crate::start::prepare;

// For the man page and the completions, generated from the definition (tests/generated.rs).
pub use crate::backend::FENCING_TOKEN_ENV;
pub use crate::cli::EXAMPLES;
pub use crate::reap::RUN_ID_ENV;

/// The etcd client on its own, with the result encoding it stores and the NAME its
/// keys are made of: for the client's tests against a real etcd
/// (`tests/etcd_client.rs`) and the `etcd_get` example. Nothing here touches the
/// cache dir, a lock file or a process.
#[cfg(feature = "etcd")]
pub mod etcd_client {
    pub use crate::entry::{Meta, argv_digest, encoded_len, from_bytes, now_ms, to_bytes};
    pub use crate::etcd::{
        Client, Credentials, DEFAULT_MAX_VALUE, DEFAULT_TIMEOUT, Endpoints, EtcdError,
        FencingToken, LeaseId, LeaseKeeper, LeaseLost, Prefix, Security, TlsFiles, Value, Wait,
        Write, check_size, default_lead,
    };
    pub use crate::values::Name;
}

use std::ffi::OsString;
use std::sync::OnceLock;

use anyhow::Result;

use crate::cli::Verb;
use crate::say::Say;
use crate::store::Store;

static ARGS: OnceLock<Vec<OsString>> = OnceLock::new();

/// The command line, argv\[0\] first: as [`keep_args`] was given it, else std's.
/// On Linux the executable has its own entry point (see `main.rs`), and with musl
/// std never learns argv: everything reads it here.
pub fn args() -> &'static [OsString] {
    ARGS.get_or_init(|| std::env::args_os().collect())
}

/// Keeps argv for [`args`] (the executable's own entry point, before anything reads it).
pub fn keep_args(args: Vec<OsString>) {
    let _ = ARGS.set(args);
}

/// Carries out a parsed command line; returns the exit status.
pub fn run(cli: Cli) -> Result<i32> {
    let global = cli.global;
    let mut config = global.backend_config();
    config.lease_ttl = cli.run.lease_ttl;
    let store = Store::locate(global.cache_dir)?;
    let backend = backend::open(config, &store)?;
    match cli.verb {
        Some(Verb::Status { names, json }) => {
            let say = Say::new(None, global.verbose, global.quiet);
            status::status(&*backend, &store, names, json, &say)
        }
        Some(Verb::Stop { names, kill_after }) => {
            let say = Say::new(None, global.verbose, global.quiet);
            stop::stop(&*backend, &store, names, kill_after, &say)
        }
        Some(Verb::Clear {
            names,
            all,
            older_than,
        }) => {
            let say = Say::new(None, global.verbose, global.quiet);
            let every = all || (older_than.is_some() && names.is_empty());
            status::clear(&*backend, &store, names, every, older_than, &say)
        }
        None => {
            let opts = cli
                .run
                .resolve()
                .expect("clap requires NAME without a verb");
            let mut opts = opts;
            if opts.stdin {
                opts.stdin_bytes = Some(input::read_stdin(&opts.name)?);
            }
            let say = Say::new(Some(opts.name.clone()), global.verbose, global.quiet);
            let key = key::resolve(&opts.name, &opts.keys, opts.stdin_bytes.as_deref())?;
            let slot = backend.slot(store, &key.id).keyed(key);
            flight::Flight::new(opts, slot, say).fly()
        }
    }
}
