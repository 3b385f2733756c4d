//! The man page `man/singleflight.1`, built from the clap definition, the examples and
//! the exit statuses by `tests/generated.rs` (which checks that the committed page is
//! this one, and rewrites it with `SINGLEFLIGHT_REGENERATE=1`).

use clap::CommandFactory;
use clap_mangen::Man;
use clap_mangen::roff::{Roff, bold, italic, roman};

use singleflight::exit::Status;
use singleflight::{Cli, EXAMPLES};

/// The man page: clap's sections (name, synopsis, description, options, verbs), then
/// the ones clap has no place for.
pub fn man_page() -> Vec<u8> {
    let command = Cli::command();
    let man = Man::new(command.clone())
        .date("")
        .source(format!("singleflight {}", env!("CARGO_PKG_VERSION")))
        .manual("User Commands");
    let mut out = Vec::new();
    man.render_title(&mut out).expect("render to memory");
    man.render_name_section(&mut out).expect("render to memory");
    let mut roff = Roff::default();
    synopsis(&mut roff);
    description(&mut roff);
    roff.to_writer(&mut out).expect("render to memory");
    man.render_options_section(&mut out)
        .expect("render to memory");
    let mut roff = Roff::default();
    verbs(&mut roff, &command);
    exit_status(&mut roff);
    files(&mut roff);
    environment(&mut roff);
    examples(&mut roff);
    see_also(&mut roff);
    roff.to_writer(&mut out).expect("render to memory");
    out
}

/// clap_mangen's synopsis has no place for `--` and lists options without values.
fn synopsis(roff: &mut Roff) {
    heading(roff, "SYNOPSIS");
    let run = |mode: &'static str| {
        vec![
            bold("singleflight"),
            roman(mode),
            italic("NAME"),
            roman(" -- "),
            italic("COMMAND"),
            roman(" ["),
            italic("ARG"),
            roman("]..."),
        ]
    };
    let lines: Vec<Vec<_>> = vec![
        run(" [OPTIONS] "),
        run(" --exclusive [OPTIONS] "),
        run(" --service [--ready CHECK] [OPTIONS] "),
        vec![
            bold("singleflight status"),
            roman(" ["),
            italic("NAME"),
            roman("]... [--json]"),
        ],
        vec![
            bold("singleflight stop"),
            roman(" [--kill-after "),
            italic("D"),
            roman("] "),
            italic("NAME"),
            roman("..."),
        ],
        vec![
            bold("singleflight clear"),
            roman(" ("),
            italic("NAME"),
            roman("... | --all) [--older-than "),
            italic("D"),
            roman("]"),
        ],
    ];
    for (i, line) in lines.into_iter().enumerate() {
        if i > 0 {
            roff.control("br", []);
        }
        roff.text(line);
    }
}

fn description(roff: &mut Roff) {
    heading(roff, "DESCRIPTION");
    for (i, paragraph) in DESCRIPTION.split("\n\n").enumerate() {
        if i > 0 {
            roff.control("PP", []);
        }
        roff.text([roman(paragraph)]);
    }
}

/// The verbs with their own options (clap_mangen would point to man pages per verb).
fn verbs(roff: &mut Roff, command: &clap::Command) {
    heading(roff, "VERBS");
    for verb in command.get_subcommands() {
        let mut line = vec![bold(format!("singleflight {}", verb.get_name()))];
        let mut options = Vec::new();
        for arg in verb
            .get_arguments()
            .filter(|a| !a.is_global_set() && !a.is_hide_set())
        {
            let mut help = arg.get_help().map(ToString::to_string).unwrap_or_default();
            if let Some(default) = arg.get_default_values().first() {
                help.push_str(&format!(" [default: {}]", default.to_string_lossy()));
            }
            let value = arg
                .get_value_names()
                .and_then(|names| names.first())
                .map(|name| format!(" {name}"))
                .filter(|_| arg.get_action().takes_values())
                .unwrap_or_default();
            match arg.get_long() {
                Some(long) => {
                    line.push(roman(format!(" [--{long}{value}]")));
                    options.push((format!("--{long}{value}"), help));
                }
                None => {
                    line.push(roman(" ["));
                    line.push(italic("NAME"));
                    line.push(roman("]..."));
                    options.push(("NAME".to_owned(), help));
                }
            }
        }
        roff.control("TP", []);
        roff.text(line);
        roff.text([roman(
            verb.get_about()
                .map(ToString::to_string)
                .unwrap_or_default(),
        )]);
        roff.control("RS", []);
        for (tag, help) in options {
            item(roff, &tag, &help);
        }
        roff.control("RE", []);
    }
}

const DESCRIPTION: &str = "\
Of any number of concurrent callers with the same NAME, at most one runs COMMAND; the \
others get the last good result at once, or wait for the run in flight when nothing is \
cached. The command's stdout is cached in the cache dir and replaced atomically; a \
result younger than --ttl is printed without taking a lock or starting a process.

A run has a hard --timeout: the command runs in its own process group (a Job Object on \
Windows), and on timeout its whole tree gets SIGTERM, then SIGKILL --kill-after later. \
No process the command started outlives the run. On Windows the tree gets CTRL_BREAK \
and is terminated with its Job Object --kill-after later; a tree without a console is \
terminated at once.

A failed run (non-zero exit, timeout) keeps the last good result, which callers get \
until --retry-after has passed (with --retry-max, a wait that doubles with each failed \
run in a row, up to --retry-max, with ±10% jitter; a good run resets it); \
--cache-failures caches the failed run's output instead. stdin of the command is /dev/null; its stderr passes through when the caller \
runs it in the foreground, and the tail of a failed run's stderr is kept for status.

Two more shapes share the lock, the limits and the tree kill. --exclusive runs every \
caller's own command (with singleflight's stdin, stdout and stderr), one at a time per \
NAME, each waiting up to --wait for its turn; nothing is cached: flock(1) with a timeout \
and a tree kill. --service keeps one long-lived instance per NAME: the caller that finds \
none starts a detached supervisor, whose instance writes to NAME.log in the cache dir; \
with --ready CHECK every caller returns once the check passes. An instance that was up \
and then ended is started again by the next caller at once; only a crash loop (an \
instance that ended before it was up, or more than --start-limit starts within \
--start-window) backs off. singleflight stop NAME stops it: TERM to its supervisor, then \
KILL after --kill-after; clear --older-than D prunes NAMEs not written for D.

A result is keyed by NAME, the command line and the values of any keys: --key-cwd \
(the current directory), --key-env VAR (its value; set and unset differ) and \
--key-file PATH (the file's state: an edit, a rename over it or its deletion is a \
miss). Nothing else is looked at: a relative command shared across directories shares \
its result unless --key-cwd is given. Each set of key values is its own slot, with its \
own lock and result, kept in NAME@<16 hex>.* in the cache dir; status shows each slot \
with its key values, and clear NAME clears them all.

With --backend etcd://HOST:PORT (or SINGLEFLIGHT_BACKEND) the lock and the result live in \
etcd, so that of all the callers on all the machines that use it at most one runs \
COMMAND. The lock is held with an etcd lease; the command gets its fencing token in \
SINGLEFLIGHT_FENCING_TOKEN. If the lease is lost mid-run (etcd unreachable), the \
command's tree is stopped as on a timeout and nothing is stored (exit 125); a caller \
that cannot reach etcd within --backend-timeout exits 125 without running the command. \
A result stored in etcd is at most 1 MiB with its metadata.";

fn heading(roff: &mut Roff, title: &str) {
    roff.control("SH", [title]);
}

fn item(roff: &mut Roff, tag: &str, text: &str) {
    roff.control("TP", []);
    roff.text([bold(tag)]);
    roff.text([roman(text)]);
}

fn exit_status(roff: &mut Roff) {
    heading(roff, "EXIT STATUS");
    roff.text([roman(
        "A served result (fresh, stale, or just produced) exits with the status its run \
         exited with. Otherwise:",
    )]);
    for status in Status::ALL {
        let text = match status {
            Status::Run(_) => continue,
            Status::UnknownName => {
                "status: a NAME it was asked about has nothing (no result, no failure record, \
                 no run in flight)."
            }
            Status::Usage => {
                "Usage error: bad option, NAME, duration or size, or no command; or stdin \
                 that --stdin cannot take (over 1 MiB; not JSON with --key-stdin-json): \
                 nothing runs."
            }
            Status::NothingToServe => {
                "Nothing to serve: another run is in flight and --wait ran out, or it failed \
                 with nothing cached, or a failed run is being backed off (--retry-after) with \
                 nothing cached."
            }
            Status::TimedOut => "The command timed out and its process tree was killed.",
            Status::Internal => {
                "singleflight itself failed (cache dir unusable, disk error, etcd unreachable \
                 within --backend-timeout; the command was not run), or the command's stdout \
                 went past --max-output (or the etcd backend's limit for a result), or the etcd \
                 lock was lost mid-run (the command's tree was killed, nothing was stored)."
            }
            Status::CannotExecute => "The command exists but could not be executed.",
            Status::NotFound => "The command was not found.",
            Status::Signaled(_) => {
                "The command was killed by signal N, or singleflight was (SIGINT, SIGTERM, \
                 SIGHUP: the run is stopped and nothing is cached)."
            }
        };
        item(roff, &status.label(), text);
    }
}

fn files(roff: &mut Roff) {
    heading(roff, "FILES");
    roff.text([roman(
        "The cache dir, unless --cache-dir or SINGLEFLIGHT_CACHE_DIR names another:",
    )]);
    for (platform, dir) in [
        (
            "Linux",
            "$XDG_CACHE_HOME/singleflight, or ~/.cache/singleflight",
        ),
        ("macOS", "~/Library/Caches/singleflight"),
        ("Windows", "%LOCALAPPDATA%\\singleflight"),
    ] {
        item(roff, platform, dir);
    }
    roff.control("PP", []);
    roff.text([roman(
        "It is created with mode 0700; singleflight refuses (exit 125) one owned by another \
         user or writable by group or others. For each NAME it holds ",
    )]);
    let each = [
        ("NAME.result", "the cached result"),
        (
            "NAME.lock",
            "the lock, never deleted but by clear --older-than",
        ),
        ("NAME.failure", "the last failed run"),
        ("NAME.run", "the run in flight"),
        ("NAME.log", "a --service instance's stdout and stderr"),
        ("NAME.service", "a --service NAME's record of its instances"),
        ("NAME.ready", "the instance that passed --ready"),
        ("NAME.stopping", "the run singleflight stop stopped"),
        (
            "NAME.fleet",
            "with an etcd --backend, the last fresh result read from the fleet, served here while its own TTL lasts",
        ),
        (
            "NAME@<16 hex>.*",
            "the same files of one set of key values, with its .key file (the values, for status)",
        ),
        (
            "etcd-<hash>.token and etcd-<hash>.login",
            "with --etcd-user, the kept login token (0600) and the lock callers take turns at to log in",
        ),
    ];
    for (i, (file, what)) in each.iter().enumerate() {
        let sep = if i + 1 == each.len() { "." } else { ", " };
        roff.text([italic(*file), roman(format!(" ({what}){sep}"))]);
    }
}

fn environment(roff: &mut Roff) {
    heading(roff, "ENVIRONMENT");
    item(
        roff,
        "SINGLEFLIGHT_CACHE_DIR",
        "The cache dir, if --cache-dir is not given.",
    );
    item(
        roff,
        "XDG_CACHE_HOME",
        "On Linux, the base of the default cache dir when it is an absolute path.",
    );
    item(
        roff,
        "SINGLEFLIGHT_BACKEND",
        "The backend, if --backend is not given: etcd://HOST:PORT[,HOST:PORT...] keeps \
         locks and results in etcd, shared by every machine that uses it.",
    );
    item(
        roff,
        "SINGLEFLIGHT_ETCD_PREFIX",
        "The etcd key prefix, if --etcd-prefix is not given.",
    );
    item(
        roff,
        singleflight::FENCING_TOKEN_ENV,
        "Set by singleflight in the environment of the command with the etcd backend: \
         the lock's fencing token, an integer that is larger for every new holder of the \
         lock. A store the command writes to can refuse writes with a smaller token than \
         one it has seen.",
    );
    item(
        roff,
        singleflight::RUN_ID_ENV,
        "Set by singleflight in the environment of the command: a token that marks \
         every process of one run.",
    );
}

fn examples(roff: &mut Roff) {
    heading(roff, "EXAMPLES");
    for (what, line) in EXAMPLES {
        roff.control("PP", []);
        roff.text([roman(*what)]);
        roff.control("RS", ["4"]);
        roff.control("EX", []);
        roff.text([roman(*line)]);
        roff.control("EE", []);
        roff.control("RE", []);
    }
}

fn see_also(roff: &mut Roff) {
    heading(roff, "SEE ALSO");
    roff.text([
        bold("flock"),
        roman("(1), "),
        bold("timeout"),
        roman("(1), "),
        bold("cron"),
        roman("(8)"),
    ]);
}
