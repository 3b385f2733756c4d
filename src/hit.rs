//! The fresh hit, decided before clap: `singleflight NAME --ttl D -- COMMAND` with a
//! fresh result in the cache dir is what singleflight does most, and clap's parse
//! (building the whole command definition, help texts included) cost more than the
//! rest of the hit together (see docs/benchmarks.md). This path reads only the
//! options it knows, exactly as clap would, and serves the result only when the full
//! path would serve it at once: fresh, of this argv and these key values, checksum
//! and all. For anything else it returns `None` having touched nothing (it only
//! reads), and `main` goes on with clap and `run`, which decide everything again.
//!
//! Understood (each value parsed by the parser clap uses for it): NAME, `--` COMMAND,
//! `--ttl`, `--timeout`, `--kill-after`, `--wait`, `--max-stale`, `--retry-after`,
//! `--retry-max`, `--max-output`, `--cache-dir`, `--key-cwd`, `--key-env`,
//! `--key-file`, `--no-replay-stderr`, `--background`, `--cache-failures`, `-q`/
//! `--quiet`, and with a shared backend built in, `--backend etcd://…` or
//! `--backend postgres://…` (whichever the build has), `--pg-schema` and the etcd
//! options (and their environment variables). Those that do not change a fresh hit
//! are parsed only so that a bad value is clap's usage error, not a hit. Everything
//! else falls back: verbs, `-v`, `-h`, `--stdin` and the stdin keys, the modes, an
//! option given twice, an empty value or one that starts with `-`, a value that does
//! not parse, non-UTF-8 where clap wants UTF-8, and options that clap or the backend
//! would refuse together.
//!
//! With `--backend etcd://…` or `postgres://…` the hit is the machine's local copy of
//! the fleet's result (`NAME.fleet`, see `backend/mirror.rs`), with the same checks;
//! nothing is sent to the backend, so the TLS and password files (etcd's options;
//! PostgreSQL's `sslrootcert`, `sslcert`, `sslkey`, `PGPASSFILE`) are not read (a call
//! that asks the backend reads them, and reports one that cannot be used).

use std::ffi::{OsStr, OsString};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;

#[cfg(any(feature = "etcd", feature = "postgres"))]
use crate::backend::BackendUrl;
use crate::decide::Cached;
use crate::entry;
#[cfg(any(feature = "etcd", feature = "postgres"))]
use crate::etcd::Prefix;
use crate::key::{self, KeySpec};
#[cfg(any(feature = "etcd", feature = "postgres"))]
use crate::postgres::PgSchema;
use crate::store::Store;
use crate::values::{Name, parse_duration, parse_size, parse_timeout};

/// The environment variables read besides `SINGLEFLIGHT_CACHE_DIR`, after the prefix.
/// Without a shared backend built in, any of them set means the full path decides;
/// with one, they are read as clap reads them ([`Fleet::take_env`]).
const FLEET_ENV: &[&str] = &[
    "BACKEND",
    "PG_SCHEMA",
    "ETCD_PREFIX",
    "ETCD_CACERT",
    "ETCD_CERT",
    "ETCD_KEY",
    "ETCD_USER",
    "ETCD_PASSWORD_FILE",
    "ETCD_PASSWORD",
];

/// The options of the shared backends that take a value.
const FLEET_OPTIONS: &[&str] = if cfg!(any(feature = "etcd", feature = "postgres")) {
    &[
        "--backend",
        "--pg-schema",
        "--etcd-prefix",
        "--backend-timeout",
        "--lease-ttl",
        "--etcd-cacert",
        "--etcd-cert",
        "--etcd-key",
        "--etcd-user",
        "--etcd-password-file",
    ]
} else {
    &[]
};

/// `--backend etcd://…` or `postgres://…`, `--pg-schema` and the etcd options, from
/// the command line and then the environment (the command line wins, as in clap).
/// Only what decides whether the full path would refuse them, and where the copy is,
/// is kept.
#[derive(Debug, Default)]
#[cfg_attr(
    not(any(feature = "etcd", feature = "postgres")),
    allow(dead_code, reason = "no shared backend to check them for")
)]
struct Fleet {
    #[cfg(any(feature = "etcd", feature = "postgres"))]
    backend: Option<BackendUrl>,
    #[cfg(any(feature = "etcd", feature = "postgres"))]
    prefix: Option<Prefix>,
    #[cfg(any(feature = "etcd", feature = "postgres"))]
    schema: Option<PgSchema>,
    /// `--etcd-cacert`, `--etcd-cert`, `--etcd-key`, `--etcd-user`,
    /// `--etcd-password-file` given, and `SINGLEFLIGHT_ETCD_PASSWORD` set.
    cacert: bool,
    cert: bool,
    key: bool,
    user: bool,
    password_file: bool,
    password_env: bool,
}

impl Fleet {
    /// Takes the value of one of [`FLEET_OPTIONS`] (from the command line, or from
    /// the environment when `from_env`); `None` when clap would refuse it (a backend
    /// this build lacks is refused by the parser).
    #[cfg(any(feature = "etcd", feature = "postgres"))]
    fn take(&mut self, option: &str, value: &OsStr, from_env: bool) -> Option<()> {
        match option {
            "--backend" if from_env && self.backend.is_some() => {}
            "--backend" => {
                self.backend = Some(crate::backend::parse_backend(value.to_str()?).ok()?);
            }
            "--pg-schema" if from_env && self.schema.is_some() => {}
            "--pg-schema" => self.schema = Some(PgSchema::parse(value.to_str()?).ok()?),
            "--etcd-prefix" if from_env && self.prefix.is_some() => {}
            "--etcd-prefix" => self.prefix = Some(Prefix::parse(value.to_str()?).ok()?),
            "--backend-timeout" => {
                parse_duration(value.to_str()?).ok()?;
            }
            "--lease-ttl" => {
                crate::etcd::parse_lease_ttl(value.to_str()?).ok()?;
            }
            "--etcd-user" => {
                value.to_str()?;
                self.user = true;
            }
            "--etcd-cacert" => self.cacert = true,
            "--etcd-cert" => self.cert = true,
            "--etcd-key" => self.key = true,
            "--etcd-password-file" => self.password_file = true,
            _ => return None,
        }
        Some(())
    }

    #[cfg(not(any(feature = "etcd", feature = "postgres")))]
    fn take(&mut self, _: &str, _: &OsStr, _: bool) -> Option<()> {
        None
    }

    /// Takes `SINGLEFLIGHT_<name>=value`, one of [`FLEET_ENV`]; `None` when the full
    /// path must decide (a value clap would refuse, an empty one).
    fn take_env(&mut self, name: &[u8], value: &OsStr) -> Option<()> {
        if value.is_empty() {
            return None;
        }
        let option = match name {
            b"ETCD_PASSWORD" => {
                // Read by the login, not clap: set (and UTF-8) is all it asks.
                value.to_str()?;
                self.password_env = true;
                return Some(());
            }
            b"BACKEND" => "--backend",
            b"PG_SCHEMA" => "--pg-schema",
            b"ETCD_PREFIX" => "--etcd-prefix",
            b"ETCD_CACERT" => "--etcd-cacert",
            b"ETCD_CERT" => "--etcd-cert",
            b"ETCD_KEY" => "--etcd-key",
            b"ETCD_USER" => "--etcd-user",
            b"ETCD_PASSWORD_FILE" => "--etcd-password-file",
            _ => return None,
        };
        self.take(option, value, true)
    }

    /// Whether clap and the backend would take these options together: `--etcd-cert`
    /// and `--etcd-key` both or neither, `--etcd-password-file` only with a user (clap
    /// checks these whatever the backend); with an etcd, TLS options only for
    /// `etcd+https://`, a user only with a password (`Fleet::open`). `Pg::open` ignores
    /// the etcd options; of its URL, it refuses `sslcert` without `sslkey` and the
    /// reverse before reading any file (`postgres::tls_config`).
    fn accepted(&self) -> bool {
        if self.cert != self.key || (self.password_file && !self.user) {
            return false;
        }
        #[cfg(any(feature = "etcd", feature = "postgres"))]
        match &self.backend {
            #[cfg(feature = "etcd")]
            Some(BackendUrl::Etcd(endpoints)) => {
                let tls = self.cacert || self.cert || self.key;
                let password = self.password_file || self.password_env;
                return (endpoints.tls() || !tls) && (password || !self.user);
            }
            #[cfg(feature = "postgres")]
            Some(BackendUrl::Postgres(url)) => {
                return url.sslcert.is_some() == url.sslkey.is_some();
            }
            _ => {}
        }
        true
    }
}

/// What a fresh hit needs of the command line.
#[derive(Debug)]
struct HitArgs {
    name: Name,
    ttl: Duration,
    cache_dir: Option<PathBuf>,
    keys: KeySpec,
    replay_stderr: bool,
    command: Vec<OsString>,
    fleet: Fleet,
}

/// Serves a fresh result if the full path would serve it at once; `None` (nothing
/// done, nothing printed) when the full path must decide. `args` without argv[0].
pub fn serve_fresh(args: &[OsString]) -> Option<Result<i32>> {
    let mut hit = parse(args)?;
    let from_env = environment(&mut hit.fleet)?;
    if !hit.fleet.accepted() {
        return None;
    }
    let cache_dir = hit.cache_dir.or(from_env);
    let store = Store::locate(cache_dir).ok()?;
    if !store.verify_existing().ok()? {
        return None;
    }
    let key = key::resolve(&hit.name, &hit.keys, None).ok()?;
    let entry = match fleet_copy(&hit.fleet) {
        None => match entry::read(&store.result_path(&key.id)) {
            Ok(Ok(Some(entry))) => entry,
            _ => return None,
        },
        #[cfg(any(feature = "etcd", feature = "postgres"))]
        Some(backend) => crate::backend::read_copy(
            &store,
            backend,
            hit.fleet.prefix.as_ref(),
            hit.fleet.schema.as_ref(),
            &key.id,
        )?,
    };
    if entry.meta.argv_digest != key.result_digest(entry::argv_digest(&hit.command)) {
        return None;
    }
    let age = entry.meta.age(entry::wall_clock());
    if Cached::of_present(age, hit.ttl) != Cached::Fresh {
        return None;
    }
    Some(crate::flight::serve_entry(entry, hit.replay_stderr))
}

/// The backend whose copy a fleet hit serves; `None` for a local hit.
#[cfg(any(feature = "etcd", feature = "postgres"))]
fn fleet_copy(fleet: &Fleet) -> Option<&BackendUrl> {
    fleet.backend.as_ref()
}

#[cfg(not(any(feature = "etcd", feature = "postgres")))]
fn fleet_copy(_: &Fleet) -> Option<std::convert::Infallible> {
    None
}

/// The command line as clap would read it, if every part of it is understood here.
fn parse(args: &[OsString]) -> Option<HitArgs> {
    let mut name = None;
    let mut ttl = None;
    let mut cache_dir = None;
    let mut keys = KeySpec::default();
    let mut fleet = Fleet::default();
    let mut seen: Vec<&str> = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let arg = args[i].to_str()?;
        i += 1;
        if arg == "--" {
            let command = args[i..].to_vec();
            if command.is_empty() {
                return None;
            }
            return Some(HitArgs {
                name: name?,
                ttl: match ttl {
                    Some(ttl) => ttl,
                    None => parse_duration("30s").ok()?,
                },
                cache_dir,
                replay_stderr: !seen.contains(&"--no-replay-stderr"),
                keys,
                command,
                fleet,
            });
        }
        if !arg.starts_with('-') {
            // NAME, once, and not a verb (which clap takes as the verb).
            if name.is_some() || matches!(arg, "status" | "stop" | "clear" | "help") {
                return None;
            }
            name = Some(Name::parse(arg).ok()?);
            continue;
        }
        let (option, inline) = match arg.split_once('=') {
            Some((option, value)) if option.starts_with("--") => (option, Some(value)),
            _ => (arg, None),
        };
        let option = if option == "-q" { "--quiet" } else { option };
        let takes_value = matches!(
            option,
            "--ttl"
                | "--timeout"
                | "--kill-after"
                | "--wait"
                | "--max-stale"
                | "--retry-after"
                | "--retry-max"
                | "--max-output"
                | "--cache-dir"
                | "--key-env"
                | "--key-file"
        ) || FLEET_OPTIONS.contains(&option);
        let flag = matches!(
            option,
            "--key-cwd" | "--no-replay-stderr" | "--background" | "--cache-failures" | "--quiet"
        );
        if !takes_value && !flag {
            return None;
        }
        let repeatable = matches!(option, "--key-env" | "--key-file");
        if !repeatable && seen.contains(&option) {
            return None;
        }
        seen.push(option);
        if flag {
            if inline.is_some() {
                return None;
            }
            if option == "--key-cwd" {
                keys.cwd = true;
            }
            continue;
        }
        let value: &OsStr = match inline {
            Some(value) => OsStr::new(value),
            None => {
                let value = args.get(i)?;
                i += 1;
                value
            }
        };
        let bytes = value.as_encoded_bytes();
        if bytes.is_empty() || bytes[0] == b'-' {
            return None;
        }
        match option {
            "--key-env" => keys.env.push(value.to_owned()),
            "--key-file" => keys.files.push(PathBuf::from(value)),
            "--cache-dir" => cache_dir = Some(PathBuf::from(value)),
            "--max-output" => {
                parse_size(value.to_str()?).ok()?;
            }
            "--timeout" => {
                parse_timeout(value.to_str()?).ok()?;
            }
            "--ttl" => ttl = Some(parse_duration(value.to_str()?).ok()?),
            _ if FLEET_OPTIONS.contains(&option) => fleet.take(option, value, false)?,
            _ => {
                parse_duration(value.to_str()?).ok()?;
            }
        }
    }
    // No `--`: clap's usage error.
    None
}

/// `SINGLEFLIGHT_CACHE_DIR` as clap reads it: `Some(None)` when unset; `None` (fall
/// back) when set but empty, which is clap's usage error. The fleet's variables
/// ([`FLEET_ENV`]) go to `fleet` where the command line did not give their option;
/// `None` when one of them means the full path must decide.
fn environment(fleet: &mut Fleet) -> Option<Option<PathBuf>> {
    let mut cache_dir = None;
    for (name, value) in singleflight_vars() {
        if name == b"CACHE_DIR" {
            cache_dir = Some(value);
        } else if FLEET_ENV.iter().any(|var| var.as_bytes() == name) {
            fleet.take_env(name, &value)?;
        }
    }
    match cache_dir {
        None => Some(None),
        Some(dir) if dir.is_empty() => None,
        Some(dir) => Some(Some(PathBuf::from(dir))),
    }
}

const PREFIX: &str = "SINGLEFLIGHT_";

/// The environment's `SINGLEFLIGHT_*` variables, as (the name after the prefix,
/// value). On Linux one pass over `environ` that looks no further than the prefix of
/// the others: eight `getenv`s, each comparing every variable's name, were a third
/// of a hit's instructions.
#[cfg(target_os = "linux")]
fn singleflight_vars() -> Vec<(&'static [u8], OsString)> {
    use std::os::unix::ffi::OsStrExt;
    unsafe extern "C" {
        static environ: *const *const libc::c_char;
    }
    let mut found = Vec::new();
    // SAFETY: called first thing in main, before any thread exists that could change
    // the environment; `environ` is a null-terminated array of NUL-terminated strings.
    unsafe {
        let mut at = environ;
        while !at.is_null() && !(*at).is_null() {
            let entry = std::ffi::CStr::from_ptr(*at).to_bytes();
            at = at.add(1);
            let Some(rest) = entry.strip_prefix(PREFIX.as_bytes()) else {
                continue;
            };
            if let Some(eq) = rest.iter().position(|&b| b == b'=') {
                let value = OsStr::from_bytes(&rest[eq + 1..]).to_owned();
                found.push((&rest[..eq], value));
            }
        }
    }
    found
}

#[cfg(not(target_os = "linux"))]
fn singleflight_vars() -> Vec<(&'static [u8], OsString)> {
    std::iter::once("CACHE_DIR")
        .chain(FLEET_ENV.iter().copied())
        .filter_map(|var| Some((var.as_bytes(), std::env::var_os(format!("{PREFIX}{var}"))?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<OsString> {
        line.split(' ').map(OsString::from).collect()
    }

    #[test]
    fn reads_what_a_hit_needs() {
        let hit = parse(&args(
            "--background ccusage --ttl=1h -q --key-env HOME --key-env USER --key-cwd -- ccusage -x",
        ))
        .unwrap();
        assert_eq!(hit.name.as_str(), "ccusage");
        assert_eq!(hit.ttl, Duration::from_secs(3600));
        assert!(hit.keys.cwd);
        assert_eq!(hit.keys.env, ["HOME", "USER"]);
        assert!(hit.replay_stderr);
        assert_eq!(hit.command, ["ccusage", "-x"]);
        let hit = parse(&args("n --no-replay-stderr -- c")).unwrap();
        assert_eq!(hit.ttl, Duration::from_secs(30));
        assert!(!hit.replay_stderr);
    }

    /// The etcd options: parsed as clap parses them, and taken together only as clap
    /// and `Fleet::open` would take them.
    #[cfg(feature = "etcd")]
    #[test]
    fn reads_the_etcd_options_as_the_full_path_takes_them() {
        let fleet = |line: &str| parse(&args(line)).expect(line).fleet;
        let endpoints = |fleet: &Fleet| match &fleet.backend {
            Some(BackendUrl::Etcd(endpoints)) => endpoints.to_string(),
            other => panic!("not an etcd: {other:?}"),
        };
        let plain = fleet("n --backend etcd://h:1 --lease-ttl 5s --backend-timeout 1s -- c");
        assert_eq!(endpoints(&plain), "etcd://h:1");
        assert!(plain.prefix.is_none() && plain.accepted());
        let prefixed = fleet("--etcd-prefix=/p n --backend=etcd://h:1 -- c");
        assert_eq!(prefixed.prefix.unwrap().as_bytes(), b"/p/");
        for (line, accepted) in [
            ("n --backend etcd+https://h:1 --etcd-cacert ca -- c", true),
            ("n --backend etcd://h:1 --etcd-cacert ca -- c", false),
            (
                "n --backend etcd+https://h:1 --etcd-cert c --etcd-key k -- c",
                true,
            ),
            ("n --backend etcd+https://h:1 --etcd-cert c -- c", false),
            ("n --backend etcd+https://h:1 --etcd-key k -- c", false),
            (
                "n --backend etcd://h:1 --etcd-user u --etcd-password-file f -- c",
                true,
            ),
            ("n --backend etcd://h:1 --etcd-user u -- c", false),
            ("n --backend etcd://h:1 --etcd-password-file f -- c", false),
            // Without a backend the etcd options are only checked by clap.
            ("n --etcd-cacert ca -- c", true),
            ("n --etcd-user u -- c", true),
            ("n --etcd-password-file f -- c", false),
        ] {
            assert_eq!(fleet(line).accepted(), accepted, "{line}");
        }
        let mut with_env = fleet("n --backend etcd://h:1 --etcd-user u -- c");
        with_env
            .take_env(b"ETCD_PASSWORD", OsStr::new("pw"))
            .unwrap();
        assert!(with_env.accepted());
        // The command line wins over the environment, which clap then does not parse.
        let mut both = fleet("n --backend etcd://h:1 -- c");
        both.take_env(b"BACKEND", OsStr::new("not a url")).unwrap();
        assert_eq!(endpoints(&both), "etcd://h:1");
        let mut env_only = Fleet::default();
        env_only
            .take_env(b"BACKEND", OsStr::new("etcd+https://e:2"))
            .unwrap();
        env_only.take_env(b"ETCD_CACERT", OsStr::new("ca")).unwrap();
        assert!(env_only.accepted());
        for (name, value) in [
            (&b"BACKEND"[..], ""),
            (b"ETCD_PREFIX", ""),
            (b"PG_SCHEMA", ""),
            (b"PG_SCHEMA", "Not-A-Schema"),
        ] {
            assert!(
                Fleet::default().take_env(name, OsStr::new(value)).is_none(),
                "{value}"
            );
        }
    }

    /// A PostgreSQL backend and `--pg-schema`: parsed as clap parses them, and taken
    /// together with the etcd options as clap and `Pg::open` take them (it ignores
    /// them; clap checks `requires` whatever the backend).
    #[cfg(feature = "postgres")]
    #[test]
    fn reads_the_postgres_options_as_the_full_path_takes_them() {
        let fleet = |line: &str| parse(&args(line)).expect(line).fleet;
        let url = |fleet: &Fleet| match &fleet.backend {
            Some(BackendUrl::Postgres(url)) => url.to_string(),
            other => panic!("not a PostgreSQL: {other:?}"),
        };
        let plain = fleet("n --backend postgres://u@h:5432/db?sslmode=disable -- c");
        assert_eq!(url(&plain), "postgres://u@h:5432/db");
        assert!(plain.schema.is_none() && plain.accepted());
        let schema = fleet("--pg-schema=team_a n --backend=postgresql://h/db -- c");
        assert_eq!(schema.schema.as_ref().unwrap().as_str(), "team_a");
        for (line, accepted) in [
            // Pg::open ignores the etcd options; clap checks only `requires`.
            ("n --backend postgres://h/db --etcd-cacert ca -- c", true),
            ("n --backend postgres://h/db --etcd-user u -- c", true),
            ("n --backend postgres://h/db --etcd-prefix /p -- c", true),
            ("n --backend postgres://h/db --etcd-cert c -- c", false),
            (
                "n --backend postgres://h/db --etcd-password-file f -- c",
                false,
            ),
            // tls_config refuses one of sslcert and sslkey without the other.
            ("n --backend postgres://h/db?sslcert=c&sslkey=k -- c", true),
            ("n --backend postgres://h/db?sslcert=c -- c", false),
            ("n --backend postgres://h/db?sslkey=k -- c", false),
        ] {
            assert_eq!(fleet(line).accepted(), accepted, "{line}");
        }
        // The environment, where the command line does not give the option.
        let mut env_only = Fleet::default();
        env_only
            .take_env(b"BACKEND", OsStr::new("postgres://u@h:5432/db"))
            .unwrap();
        env_only.take_env(b"PG_SCHEMA", OsStr::new("s")).unwrap();
        assert_eq!(url(&env_only), "postgres://u@h:5432/db");
        assert_eq!(env_only.schema.unwrap().as_str(), "s");
        let mut both = fleet("n --pg-schema a --backend postgres://h/db -- c");
        both.take_env(b"PG_SCHEMA", OsStr::new("Not Parsed"))
            .unwrap();
        assert_eq!(both.schema.unwrap().as_str(), "a");
        for line in [
            "n --backend postgres://u:pw@h/db -- c",
            "n --backend postgres://h/db?password=pw -- c",
            "n --backend postgres://h/db?nope=1 -- c",
            "n --backend postgres://h/db --pg-schema Bad -- c",
            "n --pg-schema a --pg-schema b -- c",
            "n --pg-schema= -- c",
        ] {
            assert!(parse(&args(line)).is_none(), "{line}");
        }
    }

    #[test]
    fn leaves_everything_else_to_clap() {
        for line in [
            "n --",
            "n --ttl 1h",
            "status -- c",
            "help -- c",
            "n m -- c",
            "-v n -- c",
            "-qv n -- c",
            "n --ttl 1h --ttl 2h -- c",
            "n --background --background -- c",
            "n --ttl -- c",
            "n --ttl=-1s -- c",
            "n --ttl x -- c",
            "n --timeout x -- c",
            "n --max-output 1Q -- c",
            "n --key-env= -- c",
            "n --key-file --ttl -- c",
            "n --stdin -- c",
            "n --key-stdin -- c",
            "n --exclusive -- c",
            "n --service -- c",
            "n --backend etcd://h:1 --backend etcd://h:2 -- c",
            "n --backend etcd://h:1 --etcd-prefix= -- c",
            "n --backend etcd://h:1 --lease-ttl 2h -- c",
            "n --backend etcd://h:1 --backend-timeout x -- c",
            "n --refresher 3 -- c",
            "n --background=yes -- c",
            "n --tt 1h -- c",
            "-h",
            "--version",
            "bad/name -- c",
        ] {
            assert!(parse(&args(line)).is_none(), "{line}");
        }
        // A backend the build lacks is clap's usage error.
        #[cfg(not(feature = "postgres"))]
        assert!(parse(&args("n --backend postgres://u@h:5432/db -- c")).is_none());
        #[cfg(not(feature = "etcd"))]
        assert!(parse(&args("n --backend etcd://h:1 -- c")).is_none());
        #[cfg(not(any(feature = "etcd", feature = "postgres")))]
        assert!(parse(&args("n --pg-schema s -- c")).is_none());
    }
}
