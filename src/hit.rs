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
//! `--quiet`. Those that do not change a fresh hit are parsed only so that a bad value
//! is clap's usage error, not a hit. Everything else falls back: verbs, `-v`, `-h`,
//! `--stdin` and the stdin keys, the modes, the fleet options, an option given twice,
//! an empty value or one that starts with `-`, a value that does not parse, non-UTF-8
//! where clap wants UTF-8, and any of the fleet's environment variables.

use std::ffi::{OsStr, OsString};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::Result;

use crate::decide::Cached;
use crate::entry;
use crate::key::{self, KeySpec};
use crate::store::Store;
use crate::values::{Name, parse_duration, parse_size, parse_timeout};

/// The environment variables clap reads besides `SINGLEFLIGHT_CACHE_DIR`: any of them
/// set (to anything) means the fleet, or a usage error of it: the full path decides.
const FLEET_ENV: &[&str] = &[
    "SINGLEFLIGHT_BACKEND",
    "SINGLEFLIGHT_ETCD_PREFIX",
    "SINGLEFLIGHT_ETCD_CACERT",
    "SINGLEFLIGHT_ETCD_CERT",
    "SINGLEFLIGHT_ETCD_KEY",
    "SINGLEFLIGHT_ETCD_USER",
    "SINGLEFLIGHT_ETCD_PASSWORD_FILE",
];

/// What a fresh hit needs of the command line.
#[derive(Debug)]
struct HitArgs {
    name: Name,
    ttl: Duration,
    cache_dir: Option<PathBuf>,
    keys: KeySpec,
    replay_stderr: bool,
    command: Vec<OsString>,
}

/// Serves a fresh result if the full path would serve it at once; `None` (nothing
/// done, nothing printed) when the full path must decide. `args` without argv[0].
pub fn serve_fresh(args: &[OsString]) -> Option<Result<i32>> {
    let hit = parse(args)?;
    let from_env = env_cache_dir()?;
    let cache_dir = hit.cache_dir.or(from_env);
    let store = Store::locate(cache_dir).ok()?;
    if !store.verify_existing().ok()? {
        return None;
    }
    let key = key::resolve(&hit.name, &hit.keys, None).ok()?;
    let path = store.result_path(&key.id);
    let entry = match entry::read(&path) {
        Ok(Ok(Some(entry))) => entry,
        _ => return None,
    };
    if entry.meta.argv_digest != key.result_digest(entry::argv_digest(&hit.command)) {
        return None;
    }
    let age = entry.meta.age(SystemTime::now());
    if Cached::of_present(age, hit.ttl) != Cached::Fresh {
        return None;
    }
    Some(crate::flight::serve_entry(entry, hit.replay_stderr))
}

/// The command line as clap would read it, if every part of it is understood here.
fn parse(args: &[OsString]) -> Option<HitArgs> {
    let mut name = None;
    let mut ttl = None;
    let mut cache_dir = None;
    let mut keys = KeySpec::default();
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
        );
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
            _ => {
                parse_duration(value.to_str()?).ok()?;
            }
        }
    }
    // No `--`: clap's usage error.
    None
}

/// `SINGLEFLIGHT_CACHE_DIR` as clap reads it: `Some(None)` when unset; `None` (fall
/// back) when set but empty, which is clap's usage error, or when any of the fleet's
/// variables ([`FLEET_ENV`]) is set.
fn env_cache_dir() -> Option<Option<PathBuf>> {
    let mut cache_dir = None;
    for (name, value) in singleflight_vars() {
        if name == b"CACHE_DIR" {
            cache_dir = Some(value);
        } else if FLEET_ENV
            .iter()
            .any(|var| var.as_bytes()[PREFIX.len()..] == *name)
        {
            return None;
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
    std::iter::once("SINGLEFLIGHT_CACHE_DIR")
        .chain(FLEET_ENV.iter().copied())
        .filter_map(|var| Some((&var.as_bytes()[PREFIX.len()..], std::env::var_os(var)?)))
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
            "n --backend etcd://h:1 -- c",
            "n --lease-ttl 5s -- c",
            "n --refresher 3 -- c",
            "n --background=yes -- c",
            "n --tt 1h -- c",
            "-h",
            "--version",
            "bad/name -- c",
        ] {
            assert!(parse(&args(line)).is_none(), "{line}");
        }
    }
}
