//! One run of the command: spawned in its own process group with stdin from nothing,
//! stdout streamed into the result's temp file (capped), stderr passed through with
//! its tail kept, under a hard timeout with SIGTERM then SIGKILL of the whole tree,
//! and never returning while a process it started is alive.

use std::ffi::OsString;
use std::io;
use std::path::PathBuf;
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use crate::abort::Abort;
use crate::entry::EntryWriter;
use crate::exit::{Exit, Status};
use crate::reap::{self, Stop, Tree};
use crate::threads;
use crate::values::deadline;

mod log;
mod signals;
mod streams;

use signals::SignalForwarder;
pub use signals::die_of;
use streams::{stream_stdout, tee_stderr};

/// How much of a failed run's stderr is kept for `status`.
const STDERR_TAIL: usize = 2048;
/// The most stderr stored with a result (or `--max-output`, if less): past it the rest
/// is dropped with a note (see [`crate::entry::fit_stderr`]), and the run goes on.
pub const STDERR_MAX: u64 = 1 << 20;
const CHUNK: usize = 64 * 1024;

/// Where the command's stdin, stdout and stderr go.
pub enum Io {
    /// stdin from nothing (or `RunSpec::stdin`), stdout captured into the result's
    /// writer (capped at `max_output`), stderr passed through (with `pass_stderr`),
    /// kept for the result (up to [`STDERR_MAX`]) and its tail kept.
    Capture,
    /// singleflight's own stdin (or `RunSpec::stdin`), stdout and stderr
    /// (`--exclusive`: nothing is cached).
    Inherit,
    /// stdin from nothing, stdout and stderr appended to this log, which is rotated to
    /// `.1` once past `max_output` (`--service`); its tail is kept as stderr's.
    Log(PathBuf),
}

pub struct RunSpec<'a> {
    pub argv: &'a [OsString],
    pub io: Io,
    pub timeout: Duration,
    pub kill_after: Duration,
    pub max_output: u64,
    /// Pass the command's stderr through to ours (the foreground caller's terminal).
    pub pass_stderr: bool,
    /// Marks every process of the run (see `reap::RUN_ID_ENV`).
    pub token: &'a str,
    /// More environment for the command (`SINGLEFLIGHT_FENCING_TOKEN` with the etcd
    /// backend).
    pub env: &'a [(OsString, OsString)],
    /// Stops the run from outside when tripped (the lease keeper, when the etcd lock
    /// is lost): [`Outcome::LeaseLost`].
    pub abort: Option<&'a Abort>,
    /// The command's stdin instead of the default: what `--stdin` read, in a file.
    pub stdin: Option<std::fs::File>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Exited(i32),
    /// The command was killed by this signal, not by us.
    #[cfg_attr(windows, allow(dead_code, reason = "no signals on Windows"))]
    Signaled(i32),
    TimedOut,
    /// stdout went past `--max-output`.
    OutputOverflow,
    /// singleflight got this signal and stopped the run.
    Interrupted(i32),
    /// The lock was lost mid-run (the etcd lease; see [`Abort`]) and the run stopped,
    /// or never started.
    LeaseLost,
}

impl Outcome {
    /// The status a caller exits with after this run.
    pub fn exit_status(self) -> Status {
        match self {
            Outcome::Exited(code) => Status::Run(code),
            Outcome::Signaled(signal) | Outcome::Interrupted(signal) => Status::Signaled(signal),
            Outcome::TimedOut => Status::TimedOut,
            Outcome::OutputOverflow | Outcome::LeaseLost => Status::Internal,
        }
    }

    pub fn succeeded(self) -> bool {
        self == Outcome::Exited(0)
    }

    /// A failure of the command itself, which `--cache-failures` may cache.
    pub fn is_own_failure(self) -> bool {
        matches!(self, Outcome::Exited(_) | Outcome::Signaled(_)) && !self.succeeded()
    }
}

pub struct Finished {
    pub outcome: Outcome,
    pub duration: Duration,
    pub stdout: EntryWriter,
    pub stderr_tail: Vec<u8>,
    /// The stderr stored with the result (see [`STDERR_MAX`]); empty unless captured.
    pub stderr: Vec<u8>,
}

enum Event {
    Exited(io::Result<ExitStatus>),
    Overflow,
    Stdout(Box<EntryWriter>),
    /// stderr ended: its tail, and what is kept of it for the result.
    Stderr(Vec<u8>, Vec<u8>),
    Signal(i32),
    #[cfg_attr(
        not(feature = "etcd"),
        allow(dead_code, reason = "only an etcd lease trips it")
    )]
    Abort,
    /// The command stopped (SIGTSTP from the terminal, SIGTTIN, SIGSTOP).
    #[cfg_attr(windows, allow(dead_code, reason = "job control is Unix's"))]
    Stopped,
}

/// Runs the command to the end, however it ends. `started` is told the command's pid
/// as soon as it runs. Only a command that cannot be started is an error (126/127).
pub fn run(
    spec: &mut RunSpec,
    stdout: EntryWriter,
    started: impl FnOnce(u32),
) -> anyhow::Result<Finished> {
    let (events, receiver) = mpsc::channel();
    if let Some(abort) = spec.abort
        && !abort.arm({
            let events = events.clone();
            move || {
                let _ = events.send(Event::Abort);
            }
        })
    {
        return Ok(Finished {
            outcome: Outcome::LeaseLost,
            duration: Duration::ZERO,
            stdout,
            stderr_tail: Vec::new(),
            stderr: Vec::new(),
        });
    }
    // Handlers go in before the spawn: a Ctrl-C a moment later must not orphan the tree.
    let signals = SignalForwarder::start(events.clone())
        .map_err(|e| not_started("forward signals to the run", &e))?;
    reap::become_subreaper();

    let mut command = Command::new(&spec.argv[0]);
    command.args(&spec.argv[1..]);
    let log_pipe = match &spec.io {
        Io::Capture => {
            let stdin = spec.stdin.take().map_or_else(Stdio::null, Stdio::from);
            command
                .stdin(stdin)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            None
        }
        Io::Inherit => {
            if let Some(stdin) = spec.stdin.take() {
                command.stdin(stdin);
            }
            None
        }
        Io::Log(_) => {
            let cannot = |e: io::Error| {
                Exit::new(
                    Status::Internal,
                    format!("cannot make a pipe for the log: {e}"),
                )
            };
            let (reader, writer) = io::pipe().map_err(cannot)?;
            let second = writer.try_clone().map_err(cannot)?;
            command.stdin(Stdio::null()).stdout(writer).stderr(second);
            Some(reader)
        }
    };
    // Every thread the run needs starts before the command does: where the OS refuses
    // one, the call ends with one line and nothing started.
    let mut streams = Streams::default();
    let helpers = Helpers::start(spec, log_pipe, stdout, &events, &mut streams)?;
    // The guard starts alongside the command (each spawn waits for its exec; in
    // parallel they cost one wait). Its first look finds whatever the command started
    // meanwhile. A singleflight killed in the moment before its guard exists leaves
    // the clean-up to the next winner, as without a guard. The guard is dropped (told
    // `done`, waited for) once the tree is gone, on every way out of here. Without a
    // thread for it, it is started right after the command instead.
    #[cfg(unix)]
    let guard = {
        let token = spec.token.to_owned();
        threads::start("guard", move || crate::guard::Guard::start(&token))
    };

    reap::prepare(&mut command, spec.token);
    // The caller that runs the command in the foreground of a terminal hands it the
    // terminal for the run; a refresher or a caller in the background never does.
    #[cfg(unix)]
    let terminal = spec
        .pass_stderr
        .then(reap::terminal::Terminal::if_foreground)
        .flatten();
    #[cfg(unix)]
    if let Some(terminal) = &terminal {
        reap::terminal::hand_to_child(&mut command, terminal);
    }
    command.envs(spec.env.iter().map(|(key, value)| (key, value)));
    let start = Instant::now();
    let spawned = command.spawn();
    // Our copies of the log pipe's write ends go now: it ends when the tree does.
    drop(command);
    // Joined on every way out, a failed spawn included: a guard still between fork
    // and exec holds copies of singleflight's fds, the NAME's lock among them.
    #[cfg(unix)]
    let mut guard = match guard {
        Ok(thread) => thread.join().ok().flatten(),
        Err(_) if spawned.is_ok() => crate::guard::Guard::start(spec.token),
        Err(_) => None,
    };
    let mut child = spawned.map_err(|e| spawn_error(&spec.argv[0], &e))?;
    let tree = Tree::adopt(&mut child).map_err(|e| {
        Exit::new(
            Status::Internal,
            format!("cannot take charge of the command's process tree: {e}"),
        )
    })?;
    #[cfg(unix)]
    if let Some(guard) = guard.as_mut() {
        guard.started(tree.pid(), reap::start_ticks(tree.pid()));
    }
    #[cfg(unix)]
    if let Some(terminal) = &terminal {
        terminal.give(tree.pid());
    }
    started(tree.pid());
    helpers.hand_over(child);

    // Time the user holds the run stopped (Ctrl-Z) does not count against --timeout.
    #[cfg_attr(not(unix), allow(unused_mut))]
    let mut timeout_at = deadline(start, spec.timeout);
    let mut outcome = loop {
        break match next(&receiver, timeout_at, &mut streams) {
            Wake::Stopped => {
                #[cfg(unix)]
                if let Some(terminal) = &terminal {
                    let held = reap::terminal::suspend(terminal, tree.pid());
                    timeout_at = timeout_at.and_then(|at| at.checked_add(held));
                }
                continue;
            }
            Wake::Exited(status) => outcome_of(status),
            Wake::Stop(stop @ Outcome::Interrupted(_)) => {
                terminate(&tree, spec.kill_after, &receiver, &mut streams);
                stop
            }
            // A signal to singleflight while it stops the run for another reason wins.
            Wake::Stop(stop) => terminate(&tree, spec.kill_after, &receiver, &mut streams)
                .map_or(stop, Outcome::Interrupted),
            Wake::Deadline => terminate(&tree, spec.kill_after, &receiver, &mut streams)
                .map_or(Outcome::TimedOut, Outcome::Interrupted),
        };
    };
    tree.kill_leftovers();
    #[cfg(unix)]
    drop(terminal);
    #[cfg(unix)]
    drop(guard);
    let duration = start.elapsed();
    if let Some(abort) = spec.abort {
        abort.disarm();
    }

    // Every process that held the pipes is dead now, so both readers reach the end.
    // (Not `next`: it returns only on an exit, an overflow or a signal.)
    while streams.stdout.is_none() || streams.stderr.is_none() {
        match receiver.recv() {
            Ok(Event::Stdout(writer)) => streams.stdout = Some(*writer),
            Ok(Event::Stderr(tail, kept)) => streams.stderr = Some((tail, kept)),
            Ok(Event::Overflow) if outcome.succeeded() => outcome = Outcome::OutputOverflow,
            Ok(Event::Signal(signal)) => interrupt(&mut outcome, signal),
            // Once the lock is lost nothing may be written, whatever the run did.
            Ok(Event::Abort) if !matches!(outcome, Outcome::Interrupted(_)) => {
                outcome = Outcome::LeaseLost
            }
            Ok(Event::Overflow | Event::Exited(_) | Event::Abort | Event::Stopped) => {}
            // The signal forwarder holds a sender to the end: not before the streams.
            Err(_) => break,
        }
    }
    // From here on a signal ends singleflight at once; one that came before still
    // counts: nothing of this run is cached then.
    for signal in signals.stop(&receiver) {
        interrupt(&mut outcome, signal);
    }
    let (stderr_tail, stderr) = streams.stderr.unwrap_or_default();
    Ok(Finished {
        outcome,
        duration,
        stdout: streams
            .stdout
            .expect("the stdout reader always hands its writer back"),
        stderr_tail,
        stderr,
    })
}

/// Records that singleflight got `signal`; the first such signal is the one it dies of.
fn interrupt(outcome: &mut Outcome, signal: i32) {
    if !matches!(outcome, Outcome::Interrupted(_)) {
        *outcome = Outcome::Interrupted(signal);
    }
}

/// What the reader threads hand back when their streams end.
#[derive(Default)]
struct Streams {
    stdout: Option<EntryWriter>,
    /// stderr's tail, and what is kept of it for the result.
    stderr: Option<(Vec<u8>, Vec<u8>)>,
}

enum Wake {
    Exited(io::Result<ExitStatus>),
    /// The run must stop: output overflow, or a signal to singleflight.
    Stop(Outcome),
    /// The command stopped.
    Stopped,
    Deadline,
}

/// Waits for the next event that matters, until `deadline` (`None`: no limit), and
/// keeps the streams handed back meanwhile.
fn next(receiver: &Receiver<Event>, deadline: Option<Instant>, streams: &mut Streams) -> Wake {
    loop {
        let event = match deadline {
            Some(deadline) => {
                receiver.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            }
            None => receiver.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match event {
            Ok(Event::Exited(status)) => return Wake::Exited(status),
            Ok(Event::Overflow) => return Wake::Stop(Outcome::OutputOverflow),
            Ok(Event::Signal(signal)) => return Wake::Stop(Outcome::Interrupted(signal)),
            Ok(Event::Abort) => return Wake::Stop(Outcome::LeaseLost),
            Ok(Event::Stopped) => return Wake::Stopped,
            Ok(Event::Stdout(writer)) => streams.stdout = Some(*writer),
            Ok(Event::Stderr(tail, kept)) => streams.stderr = Some((tail, kept)),
            Err(RecvTimeoutError::Timeout) => return Wake::Deadline,
            // Every sender is gone: nothing more will come.
            Err(RecvTimeoutError::Disconnected) => {
                return Wake::Exited(Err(io::Error::other("event channel closed")));
            }
        }
    }
}

/// SIGTERM to the tree, up to `kill_after` for the command to exit, then SIGKILL.
/// Returns once the command itself has exited, with the signal singleflight got
/// meanwhile, if any.
fn terminate(
    tree: &Tree,
    kill_after: Duration,
    receiver: &Receiver<Event>,
    streams: &mut Streams,
) -> Option<i32> {
    tree.signal(Stop::Term);
    let grace_ends = deadline(Instant::now(), kill_after);
    let mut signal = None;
    loop {
        match next(receiver, grace_ends, streams) {
            Wake::Exited(_) => return signal,
            // A (second) Ctrl-C: no more grace.
            Wake::Stop(Outcome::Interrupted(got)) => {
                signal = Some(got);
                break;
            }
            Wake::Stop(_) | Wake::Stopped => continue,
            Wake::Deadline => break,
        }
    }
    tree.signal(Stop::Kill);
    loop {
        match next(receiver, None, streams) {
            Wake::Exited(_) => return signal,
            Wake::Stop(Outcome::Interrupted(got)) => signal = signal.or(Some(got)),
            _ => {}
        }
    }
}

fn spawn_error(program: &OsString, error: &io::Error) -> anyhow::Error {
    let program = program.to_string_lossy();
    let (status, what) = match error.kind() {
        io::ErrorKind::NotFound => (Status::NotFound, "command not found"),
        // EAGAIN or ENOMEM from fork: the machine is out of processes or memory.
        io::ErrorKind::WouldBlock | io::ErrorKind::OutOfMemory => (
            Status::CannotExecute,
            "cannot start the command: the system refused a new process",
        ),
        _ => (Status::CannotExecute, "cannot execute"),
    };
    Exit::not_run(status, format!("{what}: {program}: {error}")).into()
}

/// The threads of a run, started before its command: the readers of its streams and
/// the one that waits for its end, each waiting for what it works on.
struct Helpers {
    stdout: Option<Sender<ChildStdout>>,
    stderr: Option<Sender<ChildStderr>>,
    waiter: Sender<Child>,
}

impl Helpers {
    /// Starts them for `spec.io`; what needs no thread goes straight into `streams`.
    fn start(
        spec: &RunSpec,
        log_pipe: Option<io::PipeReader>,
        stdout: EntryWriter,
        events: &Sender<Event>,
        streams: &mut Streams,
    ) -> anyhow::Result<Helpers> {
        let refused = |e: io::Error| not_started("read the command's output", &e);
        let (max, pass) = (spec.max_output, spec.pass_stderr);
        let (mut out, mut err) = (None, None);
        match (&spec.io, log_pipe) {
            (Io::Log(path), Some(pipe)) => {
                streams.stdout = Some(stdout);
                let (sender, path) = (events.clone(), path.clone());
                threads::start("log", move || {
                    let tail = log::append(pipe, &path, max);
                    let _ = sender.send(Event::Stderr(tail, Vec::new()));
                })
                .map_err(refused)?;
            }
            (Io::Capture, _) => {
                let sender = events.clone();
                out = Some(
                    threads::start_waiting("stdout", move |pipe| {
                        stream_stdout(pipe, stdout, max, sender)
                    })
                    .map_err(refused)?,
                );
                let sender = events.clone();
                let keep = max.min(STDERR_MAX);
                err = Some(
                    threads::start_waiting("stderr", move |pipe| {
                        let (tail, kept) = tee_stderr(pipe, pass, keep);
                        let _ = sender.send(Event::Stderr(tail, kept));
                    })
                    .map_err(refused)?,
                );
            }
            _ => {
                streams.stdout = Some(stdout);
                streams.stderr = Some((Vec::new(), Vec::new()));
            }
        }
        let events = events.clone();
        let waiter = threads::start_waiting("wait", move |mut child: Child| {
            #[cfg(unix)]
            while let reap::terminal::Seen::Stopped = reap::terminal::wait_stop_or_exit(child.id())
            {
                let _ = events.send(Event::Stopped);
            }
            let _ = events.send(Event::Exited(child.wait()));
        })
        .map_err(|e| not_started("wait for the command", &e))?;
        Ok(Helpers {
            stdout: out,
            stderr: err,
            waiter,
        })
    }

    /// Gives the started command's pipes and the command itself to their threads.
    fn hand_over(self, mut child: Child) {
        if let (Some(thread), Some(pipe)) = (self.stdout, child.stdout.take()) {
            let _ = thread.send(pipe);
        }
        if let (Some(thread), Some(pipe)) = (self.stderr, child.stderr.take()) {
            let _ = thread.send(pipe);
        }
        let _ = self.waiter.send(child);
    }
}

/// A thread the run needs was refused: nothing of the run was started.
fn not_started(what: &str, error: &io::Error) -> anyhow::Error {
    let why = threads::refused(what, error);
    Exit::not_run(Status::Internal, format!("{why}; the command was not run")).into()
}

fn outcome_of(status: io::Result<ExitStatus>) -> Outcome {
    let Ok(status) = status else {
        return Outcome::Exited(Status::Internal.code());
    };
    if let Some(code) = status.code() {
        return Outcome::Exited(code);
    }
    #[cfg(unix)]
    if let Some(signal) = std::os::unix::process::ExitStatusExt::signal(&status) {
        return Outcome::Signaled(signal);
    }
    Outcome::Exited(Status::Internal.code())
}
