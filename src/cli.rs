//! The command line: clap's definition of every option with its help, parsed once
//! into typed values ([`Name`], [`Duration`], sizes).

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::backend;
use crate::backend::{BackendUrl, parse_backend};
use crate::etcd::{Prefix, parse_lease_ttl};
use crate::exit::Status;
use crate::key::KeySpec;
use crate::postgres::PgSchema;
use crate::values::{LeaseHandover, Name, Refresher, parse_duration, parse_size, parse_timeout};

/// The examples of `--help` and of the man page: what each does, then the command line.
pub const EXAMPLES: &[(&str, &str)] = &[
    (
        "A status line source: one run per 30s however many callers ask, the last result at once",
        "singleflight --background ccusage --ttl 30s -- ccusage blocks --json",
    ),
    (
        "A slow check shared by parallel callers: who comes during a run waits for it",
        "singleflight lint --ttl 1m --max-stale 0 --timeout 5m -- cargo clippy",
    ),
    (
        "Serve the last result at once and refresh it in one detached process",
        "singleflight --background weather --ttl 10m -- curl -s 'wttr.in/?format=3'",
    ),
    (
        "What is cached, how old, and why the last run failed",
        "singleflight status",
    ),
    ("Forget a result", "singleflight clear ccusage"),
];

/// `--help`'s closing sections: the value syntax (said once, for every option), the
/// exit statuses, and the [`EXAMPLES`].
fn long_help_end() -> String {
    let mut text = String::from(
        "Values:\n  \
         D (a duration): 500ms, 30s, 5m, 1h, 1h30m, 2d, or a number of seconds (30, 0.5); \
         at most 36500d\n  \
         SIZE: 64KiB, 16MiB, 1GiB (powers of 1024; K, M, G too), 500KB, 1MB (powers of \
         1000), or bytes\n  \
         NAME: 1 to 128 of A-Z a-z 0-9 . _ -, starting with a letter or digit; status, \
         stop, clear and help are verbs\n\n\
         Exit status:\n",
    );
    for status in Status::ALL {
        text.push_str(&format!("  {:<16} {}\n", status.label(), status.meaning()));
    }
    text.push_str("\nExamples:");
    for (what, line) in EXAMPLES {
        text.push_str(&format!("\n  # {what}\n  {line}"));
    }
    text
}

/// `-h`'s closing line.
const SHORT_HELP_END: &str = "-h shows the common options; --help shows them all, with the \
                              duration and size syntax, the exit statuses and examples.";

/// Run a command at most once at a time per NAME; every other caller gets its last good
/// result at once.
#[derive(Debug, Parser)]
#[command(
    name = "singleflight",
    version,
    after_help = SHORT_HELP_END,
    after_long_help = long_help_end(),
    subcommand_negates_reqs = true,
    override_usage = "singleflight [OPTIONS] <NAME> -- <COMMAND> [ARG]...\n       \
                      singleflight --exclusive <NAME> -- <COMMAND> [ARG]...\n       \
                      singleflight --service <NAME> [--ready CHECK] -- <COMMAND> [ARG]...\n       \
                      singleflight status [NAME]... [--json]\n       \
                      singleflight stop <NAME>...\n       \
                      singleflight clear (<NAME>... | --all) [--older-than D]",
    subcommand_value_name = "VERB",
    subcommand_help_heading = "Verbs",
    max_term_width = 100
)]
pub struct Cli {
    #[command(subcommand)]
    pub verb: Option<Verb>,

    #[command(flatten)]
    pub run: RunArgs,

    #[command(flatten)]
    pub global: GlobalArgs,
}

#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Where locks and results live [default: the platform cache dir + /singleflight]
    #[arg(
        long,
        value_name = "DIR",
        hide_env_values = true,
        env = "SINGLEFLIGHT_CACHE_DIR",
        global = true,
        help_heading = "Input and output"
    )]
    pub cache_dir: Option<PathBuf>,

    /// Say on stderr what was decided and why
    #[arg(short, long, global = true, help_heading = "Input and output")]
    pub verbose: bool,

    /// No warnings on stderr (errors still print)
    #[arg(
        short,
        long,
        global = true,
        conflicts_with = "verbose",
        help_heading = "Input and output"
    )]
    pub quiet: bool,

    // The backend options have no clap defaults (they are documented in the help and
    // resolved in `backend`): a defaulted value costs allocations on every call, and a
    // fresh local hit pays for nothing it does not use.
    /// Keep locks and results in etcd or PostgreSQL, shared by every machine that uses
    /// it, instead of the cache dir: etcd://HOST:PORT[,HOST:PORT...] or
    /// postgres://USER@HOST:PORT/DB?sslmode=... (password from PGPASSWORD or ~/.pgpass)
    #[arg(
        long,
        value_name = "URL",
        hide_env_values = true,
        env = "SINGLEFLIGHT_BACKEND",
        value_parser = parse_backend,
        global = true,
        help_heading = "Fleet",
    )]
    pub backend: Option<BackendUrl>,

    /// The PostgreSQL schema of singleflight's tables, created on first use
    /// [default: singleflight]
    #[arg(
        long,
        value_name = "NAME",
        hide_env_values = true,
        env = "SINGLEFLIGHT_PG_SCHEMA",
        value_parser = PgSchema::parse,
        global = true,
        help_heading = "Fleet",
        hide_short_help = true
    )]
    pub pg_schema: Option<PgSchema>,

    /// The etcd key prefix of singleflight's keys [default: /singleflight/]
    #[arg(
        long,
        value_name = "PREFIX",
        hide_env_values = true,
        env = "SINGLEFLIGHT_ETCD_PREFIX",
        value_parser = Prefix::parse,
        global = true,
        help_heading = "Fleet", hide_short_help = true,
    )]
    pub etcd_prefix: Option<Prefix>,

    /// How long one request to one etcd member may take; a caller that cannot reach
    /// etcd exits 125 without running the command [default: 2s]
    #[arg(long, value_name = "D", value_parser = parse_duration, global = true, help_heading = "Fleet", hide_short_help = true)]
    pub backend_timeout: Option<Duration>,

    /// Trust the etcd+https:// server certificates this CA (PEM) signed, and only
    /// those [default: Mozilla's root certificates]
    #[arg(
        long,
        value_name = "FILE",
        hide_env_values = true,
        env = "SINGLEFLIGHT_ETCD_CACERT",
        global = true,
        help_heading = "Fleet",
        hide_short_help = true
    )]
    pub etcd_cacert: Option<PathBuf>,

    /// Show etcd this client certificate (PEM), for its --client-cert-auth
    #[arg(
        long,
        value_name = "FILE",
        hide_env_values = true,
        env = "SINGLEFLIGHT_ETCD_CERT",
        requires = "etcd_key",
        global = true,
        help_heading = "Fleet",
        hide_short_help = true
    )]
    pub etcd_cert: Option<PathBuf>,

    /// The private key (PEM) of --etcd-cert
    #[arg(
        long,
        value_name = "FILE",
        hide_env_values = true,
        env = "SINGLEFLIGHT_ETCD_KEY",
        requires = "etcd_cert",
        global = true,
        help_heading = "Fleet",
        hide_short_help = true
    )]
    pub etcd_key: Option<PathBuf>,

    /// Log in to etcd as this user; the password comes from the environment variable
    /// SINGLEFLIGHT_ETCD_PASSWORD or --etcd-password-file, never from the command line
    #[arg(
        long,
        value_name = "NAME",
        hide_env_values = true,
        env = "SINGLEFLIGHT_ETCD_USER",
        global = true,
        help_heading = "Fleet",
        hide_short_help = true
    )]
    pub etcd_user: Option<String>,

    /// The --etcd-user's password: the first line of this file
    #[arg(
        long,
        value_name = "FILE",
        hide_env_values = true,
        env = "SINGLEFLIGHT_ETCD_PASSWORD_FILE",
        requires = "etcd_user",
        global = true,
        help_heading = "Fleet",
        hide_short_help = true
    )]
    pub etcd_password_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The shared resource: one lock, one cached result
    #[arg(value_parser = Name::parse, required = true)]
    pub name: Option<Name>,

    /// A result younger than this is fresh
    #[arg(long, value_name = "D", default_value = "30s", value_parser = parse_duration, allow_hyphen_values = true, help_heading = "Caching")]
    pub ttl: Duration,

    /// Hard limit on one run of the command; 0 (or off, none) for no limit
    #[arg(long, value_name = "D", default_value = "60s", value_parser = parse_timeout, allow_hyphen_values = true, help_heading = "Limits")]
    pub timeout: Duration,

    /// Grace between SIGTERM and SIGKILL of the command's process tree
    #[arg(long, value_name = "D", default_value = "5s", value_parser = parse_duration, allow_hyphen_values = true, help_heading = "Limits", hide_short_help = true)]
    pub kill_after: Duration,

    /// How long a caller with nothing servable waits for the in-flight run
    /// [default: timeout + kill-after]
    #[arg(long, value_name = "D", value_parser = parse_duration, allow_hyphen_values = true, help_heading = "Limits")]
    pub wait: Option<Duration>,

    /// The oldest result served while another run is in flight [default: unlimited]
    #[arg(long, value_name = "D", value_parser = parse_duration, allow_hyphen_values = true, help_heading = "Caching")]
    pub max_stale: Option<Duration>,

    /// After a failed run, no new run starts for this long [default: the --ttl]
    #[arg(long, value_name = "D", value_parser = parse_duration, allow_hyphen_values = true, help_heading = "Caching")]
    pub retry_after: Option<Duration>,

    /// Back-off that grows: each failed run in a row doubles the wait before the next
    /// run, from --retry-after up to this, with ±10% jitter; a good run resets it
    #[arg(long, value_name = "D", value_parser = parse_duration, allow_hyphen_values = true, help_heading = "Caching", hide_short_help = true)]
    pub retry_max: Option<Duration>,

    /// The result belongs to the current directory: each directory has its own
    #[arg(long, help_heading = "Keys")]
    pub key_cwd: bool,

    /// The result belongs to this variable's value (set and unset differ); repeatable
    #[arg(long, value_name = "VAR", help_heading = "Keys")]
    pub key_env: Vec<OsString>,

    /// The result belongs to this file's state: a change (write, rename over it,
    /// deletion) makes the next call a miss; repeatable
    #[arg(
        long,
        value_name = "PATH",
        help_heading = "Keys",
        hide_short_help = true
    )]
    pub key_file: Vec<PathBuf>,

    /// Give the command the caller's stdin (read to its end, at most 1 MiB, before
    /// anything else) instead of /dev/null; with --background a refresh in the
    /// background gets the stdin of the caller that started it. More than 1 MiB: exit
    /// 2, nothing runs
    #[arg(long, conflicts_with = "service", help_heading = "Input and output")]
    pub stdin: bool,

    /// The result belongs to the whole of stdin (implies --stdin)
    #[arg(long, conflicts_with = "service", help_heading = "Keys")]
    pub key_stdin: bool,

    /// The result belongs to the value at this RFC 6901 JSON pointer (e.g. /session_id)
    /// in the JSON on stdin; a missing value is a key value of its own; stdin that is
    /// not JSON: exit 2, nothing runs (implies --stdin); repeatable
    #[arg(long, value_name = "POINTER", value_parser = parse_json_pointer, conflicts_with = "service", help_heading = "Keys")]
    pub key_stdin_json: Vec<String>,

    /// Do not write a served result's stored stderr to stderr (by default a hit or a
    /// waiter writes the run's stderr, then its stdout)
    #[arg(long, help_heading = "Input and output", hide_short_help = true)]
    pub no_replay_stderr: bool,

    /// Serve a stale result at once and refresh it in one detached process
    #[arg(long, help_heading = "Modes")]
    pub background: bool,

    /// Every caller runs its own command, one at a time per NAME, waiting up to --wait
    /// for its turn; nothing is cached (flock(1) with a timeout and a tree kill)
    #[arg(long, conflicts_with_all = ["background", "cache_failures", "max_stale", "service"], help_heading = "Modes")]
    pub exclusive: bool,

    /// With --exclusive: at most N runs of the NAME at once (a semaphore of N); the
    /// first N of callers that find every slot free holds until all have let go
    #[arg(
        long,
        value_name = "N",
        requires = "exclusive",
        value_parser = clap::value_parser!(u32).range(1..=64),
        help_heading = "Modes"
    )]
    pub slots: Option<u32>,

    /// Keep one long-lived instance of the command per NAME, started detached by the
    /// caller that finds none and supervised while it lives; output goes to NAME.log
    /// in the cache dir (capped by --max-output). --timeout bounds each --ready check
    #[arg(long, conflicts_with_all = ["background", "cache_failures", "max_stale"], help_heading = "Modes")]
    pub service: bool,

    /// With --service: a shell command that succeeds once the instance is ready (e.g.
    /// `curl -sf localhost:8080/health`); callers return once it does, or exit 75
    /// when --wait runs out
    #[arg(
        long,
        value_name = "CHECK",
        requires = "service",
        help_heading = "Modes"
    )]
    pub ready: Option<OsString>,

    /// With --service: an instance that was up (passed --ready; without one, lived 1s)
    /// and then ended is started again by the next caller at once, unless this many
    /// started within --start-window: that, or an instance that ended before it was
    /// up, is a crash loop, backed off as a failed run (--retry-after, --retry-max)
    #[arg(
        long,
        value_name = "N",
        default_value = "5",
        value_parser = clap::value_parser!(u32).range(1..=1000),
        requires = "service",
        help_heading = "Modes", hide_short_help = true,
    )]
    pub start_limit: u32,

    /// With --service: the window of --start-limit
    #[arg(long, value_name = "D", default_value = "10s", value_parser = parse_duration, requires = "service", allow_hyphen_values = true, help_heading = "Modes", hide_short_help = true)]
    pub start_window: Duration,

    /// A run that exits non-zero replaces the last good result
    #[arg(long, help_heading = "Caching")]
    pub cache_failures: bool,

    /// Cap on captured stdout; past it the run is killed and fails
    #[arg(long, value_name = "SIZE", default_value = "16MiB", value_parser = parse_size, help_heading = "Limits", hide_short_help = true)]
    pub max_output: u64,

    /// Internal: run as the detached refresher started by --background, holding the
    /// lock open as this file descriptor
    #[arg(
        long,
        hide = true,
        value_name = "FD",
        conflicts_with = "refresher_lease"
    )]
    pub refresher: Option<i32>,

    /// Internal: run as the detached refresher started by --background, holding the
    /// etcd lock with this lease and fencing token
    #[arg(long, hide = true, value_name = "LEASE:TOKEN", value_parser = LeaseHandover::parse)]
    pub refresher_lease: Option<LeaseHandover>,

    /// Internal: the refresher writes the output of a run whose result it cannot save
    /// (a full disk) to this pipe, for the `--background` caller waiting for it
    #[arg(long, hide = true, value_name = "FD", requires = "refresher")]
    pub hand_back: Option<i32>,

    /// How long the etcd lock outlives a singleflight that can no longer renew it
    /// (killed, cut off from etcd); renewed every third of it, the run killed when
    /// renewals failed for most of it. From 2s to 1h, whole seconds [default: 10s]
    #[arg(long, value_name = "D", value_parser = parse_lease_ttl, help_heading = "Fleet", hide_short_help = true)]
    pub lease_ttl: Option<Duration>,

    /// The command and its arguments
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

#[derive(Debug, Subcommand)]
pub enum Verb {
    /// Show each NAME's result, age, last run and whether a run is in flight
    Status {
        /// Only these NAMEs
        #[arg(value_parser = Name::parse)]
        names: Vec<Name>,
        /// One JSON array with stable snake_case keys
        #[arg(long)]
        json: bool,
    },
    /// Stop the run in flight of each NAME (a --service instance, say): TERM to the
    /// singleflight that runs it, which stops the command's tree (TERM, then KILL
    /// after its --kill-after)
    Stop {
        /// The NAMEs to stop
        #[arg(value_parser = Name::parse, required = true)]
        names: Vec<Name>,
        /// How long to wait for it to let go before it is killed (its guard then kills
        /// the tree)
        #[arg(long, value_name = "D", default_value = "10s", value_parser = parse_duration, allow_hyphen_values = true)]
        kill_after: Duration,
    },
    /// Remove results, waiting for any run in flight
    #[command(override_usage = "singleflight clear (<NAME>... | --all) [--older-than D]")]
    Clear {
        /// The NAMEs to clear
        #[arg(value_parser = Name::parse, required_unless_present_any = ["all", "older_than"])]
        names: Vec<Name>,
        /// Clear every NAME
        #[arg(long, conflicts_with = "names")]
        all: bool,
        /// Only NAMEs not written for this long (of every NAME, unless NAMEs are given):
        /// their results, failure records and lock files go; a NAME with a run in
        /// flight is left alone
        #[arg(long, value_name = "D", value_parser = parse_duration, allow_hyphen_values = true)]
        older_than: Option<Duration>,
    },
}

impl Cli {
    /// Parses the command line, exiting with a usage error (2) as clap does. Global
    /// options may come before a verb (`singleflight -v status`), but a NAME may not.
    pub fn parse_args() -> Cli {
        use clap::{CommandFactory, Parser, error::ErrorKind};
        let cli =
            Cli::try_parse_from(crate::args()).unwrap_or_else(|error| {
                match first_hour_advice(&error) {
                    Some((kind, message)) => Cli::command().error(kind, message).exit(),
                    None => error.exit(),
                }
            });
        if let (Some(verb), Some(name)) = (&cli.verb, &cli.run.name) {
            let verb = match verb {
                Verb::Status { .. } => "status",
                Verb::Stop { .. } => "stop",
                Verb::Clear { .. } => "clear",
            };
            let message = format!(
                "NAME '{name}' cannot be followed by the verb '{verb}': run `singleflight {verb} …` \
                 or `singleflight {name} -- COMMAND`"
            );
            Cli::command()
                .error(ErrorKind::ArgumentConflict, message)
                .exit();
        }
        cli
    }
}

/// A clearer line than clap's for the usage errors a new user makes first: an empty
/// `SINGLEFLIGHT_CACHE_DIR`, a command without `--` before it.
fn first_hour_advice(error: &clap::Error) -> Option<(clap::error::ErrorKind, String)> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let args: Vec<String> = crate::args()
        .iter()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let invalid = match error.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(arg)) => arg.clone(),
        _ => String::new(),
    };
    match error.kind() {
        ErrorKind::InvalidValue
            if invalid.starts_with("--cache-dir")
                && !args.iter().any(|a| a.starts_with("--cache-dir"))
                && std::env::var_os("SINGLEFLIGHT_CACHE_DIR").is_some_and(|v| v.is_empty()) =>
        {
            let message = "SINGLEFLIGHT_CACHE_DIR is set but empty: unset it (for the default \
                           cache dir) or set it to a directory";
            Some((ErrorKind::InvalidValue, message.to_owned()))
        }
        ErrorKind::UnknownArgument if !args.iter().any(|a| a == "--") => {
            let at = args.iter().position(|a| *a == invalid)?;
            if invalid.starts_with('-') || at == 0 {
                return None;
            }
            let message = format!(
                "unexpected argument '{invalid}': put the command after `--`: \
                 `singleflight {} -- {}`",
                args[..at].join(" "),
                args[at..].join(" ")
            );
            Some((ErrorKind::UnknownArgument, message))
        }
        _ => None,
    }
}

/// An RFC 6901 JSON pointer: empty (the whole document) or `/` and its reference
/// tokens, with `~` only as `~0` or `~1`.
fn parse_json_pointer(text: &str) -> Result<String, String> {
    if !text.is_empty() && !text.starts_with('/') {
        return Err(format!(
            "a JSON pointer starts with '/' (RFC 6901), as in /session_id; not '{text}'"
        ));
    }
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '~' && !matches!(chars.next(), Some('0' | '1')) {
            return Err("in a JSON pointer '~' is written '~0' and '/' '~1' (RFC 6901)".into());
        }
    }
    Ok(text.to_owned())
}

/// What a run call is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// One run for many callers; its result is cached and served.
    Cached,
    /// Each caller's own run, one at a time (`--exclusive`).
    Exclusive,
    /// One long-lived instance (`--service`), ready when `ready` succeeds.
    Service { ready: Option<OsString> },
}

/// The options of one run call, with every default resolved.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub name: Name,
    pub command: Vec<OsString>,
    pub mode: Mode,
    pub ttl: Duration,
    pub timeout: Duration,
    pub kill_after: Duration,
    pub wait: Duration,
    /// `--slots`: how many `--exclusive` runs of the NAME may run at once (1 without it).
    pub slots: u32,
    pub max_stale: Option<Duration>,
    pub retry_after: Duration,
    pub retry_max: Option<Duration>,
    /// `--service`: at most this many starts within `start_window` before backing off.
    pub start_limit: u32,
    pub start_window: Duration,
    pub keys: KeySpec,
    /// `--stdin` or a stdin key: stdin is read and given to the run.
    pub stdin: bool,
    /// What `--stdin` read (set once it is read, before the key is resolved).
    pub stdin_bytes: Option<Vec<u8>>,
    /// A served result's stored stderr is written to stderr (not `--no-replay-stderr`).
    pub replay_stderr: bool,
    pub background: bool,
    pub refresher: Option<Refresher>,
    /// The refresher's pipe back to its waiting caller (see `--hand-back`).
    pub hand_back: Option<i32>,
    pub cache_failures: bool,
    pub max_output: u64,
}

impl GlobalArgs {
    /// What the backend is to be, as given (its defaults are the backend's).
    pub fn backend_config(&self) -> backend::Config {
        backend::Config {
            backend: self.backend.clone(),
            pg_schema: self.pg_schema.clone(),
            prefix: self.etcd_prefix.clone(),
            timeout: self.backend_timeout,
            // A run's (see `RunArgs::lease_ttl`); a verb's lock takes the default.
            lease_ttl: None,
            cacert: self.etcd_cacert.clone(),
            cert: self.etcd_cert.clone(),
            key: self.etcd_key.clone(),
            user: self.etcd_user.clone(),
            password_file: self.etcd_password_file.clone(),
        }
    }
}

impl RunArgs {
    /// Resolves the defaults that depend on other options. `None` when no NAME was
    /// given, which clap only allows together with a verb.
    pub fn resolve(self) -> Option<RunOptions> {
        Some(RunOptions {
            name: self.name?,
            wait: self
                .wait
                .unwrap_or(self.timeout.saturating_add(self.kill_after)),
            slots: self.slots.unwrap_or(1),
            retry_after: self.retry_after.unwrap_or(self.ttl),
            retry_max: self.retry_max,
            start_limit: self.start_limit,
            start_window: self.start_window,
            stdin: self.stdin || self.key_stdin || !self.key_stdin_json.is_empty(),
            stdin_bytes: None,
            replay_stderr: !self.no_replay_stderr,
            keys: KeySpec {
                cwd: self.key_cwd,
                env: self.key_env,
                files: self.key_file,
                stdin: self.key_stdin,
                stdin_json: self.key_stdin_json,
            },
            command: self.command,
            mode: if self.exclusive {
                Mode::Exclusive
            } else if self.service {
                Mode::Service { ready: self.ready }
            } else {
                Mode::Cached
            },
            ttl: self.ttl,
            timeout: self.timeout,
            kill_after: self.kill_after,
            max_stale: self.max_stale,
            background: self.background,
            refresher: match (self.refresher, self.refresher_lease) {
                (Some(fd), _) => Some(Refresher::Fd(fd)),
                (None, Some(lease)) => Some(Refresher::Lease(lease)),
                (None, None) => None,
            },
            hand_back: self.hand_back,
            cache_failures: self.cache_failures,
            max_output: self.max_output,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
