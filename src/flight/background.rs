//! `--background`: serve at once and refresh in one detached process, which inherits
//! the lock (`--refresher`), runs, and hands an unsaved result back to a caller that
//! waits for it.

use std::fs;
use std::io;
use std::time::Instant;

use anyhow::{Context, Result};

use super::{Call, Flight};
use crate::backend::Held;
use crate::decide::{self, OnLost, Seen, Step};
use crate::entry::Body;
use crate::reap;
use crate::values::Refresher;

/// The head of a handed-back result: its status and the length of its reason.
const HAND_BACK_HEAD: u64 = 8;

impl Flight {
    /// `--background`, holding the lock: hand it to one detached refresher. Only a
    /// caller that wins the lock starts one, so there is at most one refresher per
    /// NAME however many callers arrive. A caller that will wait for it (nothing to
    /// serve meanwhile) keeps the read end of its hand-back pipe.
    pub(super) fn refresh_in_background(&self, call: &mut Call) -> Seen {
        let cached = call.look.cached;
        let Some(held) = call.held.take() else {
            return Seen::RefresherStarted {
                cached,
                started: false,
            };
        };
        let serving = decide::on_lost(cached, self.policy()) == OnLost::ServeStale;
        let started = match self.start_refresher(held, !serving) {
            Ok((pid, hand_back)) => {
                call.refresher = Some(pid);
                call.hand_back = hand_back;
                true
            }
            Err(e) => {
                if serving {
                    self.say.warn(format_args!("{e:#}; serving stale"));
                }
                call.refresher_error = Some(e);
                false
            }
        };
        Seen::RefresherStarted { cached, started }
    }

    /// Starts `singleflight --refresher=FD <the same arguments>` (with etcd:
    /// `--refresher-lease=LEASE:TOKEN`) detached: its own session, stdin, stdout and
    /// stderr on /dev/null, and no other file descriptor than the held lock file, which
    /// it inherits (flock belongs to the open file, so the lock stays held across our
    /// exit). Anything else inherited, such as the pipe of a `$(…)` or `| cat` reader,
    /// would keep that reader waiting for the refresh. (Windows: see `Held::hand_over`.)
    ///
    /// A caller that will wait (`wait`: nothing to serve) also hands the refresher the
    /// write end of a pipe (`--hand-back=FD`): a run whose result cannot be saved (a
    /// full disk) comes back through it, so the waiter is served what a foreground
    /// winner would print.
    /// Returns the refresher's pid, and the read end of the hand-back pipe.
    pub(super) fn start_refresher(
        &self,
        held: Held,
        wait: bool,
    ) -> Result<(u32, Option<io::PipeReader>)> {
        use std::process::Stdio;
        let mut command =
            reap::own_executable().context("cannot find singleflight's own executable")?;
        // With --stdin the refresher reads what this caller read, from a file of its
        // own (unlinked: nothing to clean up, and no other caller's to mix up).
        let stdin = self.stdin_file()?.map_or_else(Stdio::null, Stdio::from);
        command
            .stdin(stdin)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        #[cfg(unix)]
        let (hand_back, pipe) = if wait {
            let (reader, writer) = io::pipe().context("cannot make a pipe for the refresher")?;
            (Some(reader), Some(writer))
        } else {
            (None, None)
        };
        #[cfg(not(unix))]
        let hand_back = None;
        #[cfg(not(unix))]
        let _ = wait;
        // The lock (and the hand-back pipe) are the only fds the refresher inherits.
        #[cfg(unix)]
        let inherit = {
            use std::os::fd::AsRawFd;
            let hand_back = pipe.as_ref().map(AsRawFd::as_raw_fd);
            if let Some(fd) = hand_back {
                command.arg(format!("--hand-back={fd}"));
            }
            [held.inheritable_fd(), hand_back]
        };
        #[cfg(not(unix))]
        let inherit: [Option<i32>; 0] = [];
        command
            .arg(held.refresher_arg())
            .args(crate::args().iter().skip(1));
        let child = reap::spawn_detached(&mut command, &inherit)
            .context("cannot start the background refresher")?;
        // Our copy of the write end goes now: the pipe ends when the refresher does.
        #[cfg(unix)]
        drop(pipe);
        let pid = child.id();
        held.hand_over(child);
        Ok((pid, hand_back))
    }

    /// The detached refresher: holds the lock it was handed and runs if still needed.
    /// A run that cannot even start leaves a failure record too, so that `status`
    /// shows why and `--retry-after` keeps callers from starting refresher after
    /// refresher.
    pub(super) fn refresh(&self, call: &mut Call, handover: Refresher) -> Result<i32> {
        // Taken first, so that it is close-on-exec before the command starts: a
        // process of the run holding it would keep the caller waiting.
        let hand_back = self.opts.hand_back.and_then(reap::adopt_pipe);
        // SAFETY: a handed FD is from our own command line (`--refresher`, internal):
        // the caller started us with it open, and this is the one place that claims it.
        let Some(held) = (unsafe { self.slot.place().take_handed(handover)? }) else {
            return Ok(0);
        };
        let seen = self.look_again(call)?;
        match decide::next(seen, self.policy(), false) {
            Step::Run => {
                let look = std::mem::take(&mut call.look);
                let ran = self
                    .run_and_store(look, &held, call)
                    .inspect_err(|e| self.record_failure_to_start(e, &held));
                drop(held);
                let (status, body) = ran?;
                match hand_back {
                    Some(pipe) => hand_back_to(pipe, status, body, call.unsaved.take()),
                    None => self.print(body)?,
                }
                Ok(status)
            }
            _ => Ok(0),
        }
    }

    /// What our refresher handed back through its pipe: the status and output of a run
    /// whose result it could not save. Read until the refresher closes it, within what
    /// is left of `--wait`.
    pub(super) fn handed_back(&self, call: &mut Call) -> Option<(i32, Body)> {
        use std::io::Read as _;
        let mut reader = call.hand_back.take()?;
        let left = call.wait_ends?.saturating_duration_since(Instant::now());
        let limit = self.opts.max_output.saturating_add(HAND_BACK_HEAD + 4096);
        let (sender, receiver) = std::sync::mpsc::channel();
        let reading = move || {
            let mut bytes = Vec::new();
            let read = (&mut reader).take(limit).read_to_end(&mut bytes);
            let _ = sender.send(read.map(|_| bytes));
        };
        // Without a thread to read on (the OS refused one), the cache is read instead.
        crate::threads::start("hand-back", reading).ok()?;
        let bytes = receiver.recv_timeout(left).ok()?.ok()?;
        let (status, rest) = bytes.split_first_chunk::<4>()?;
        let (reason_len, rest) = rest.split_first_chunk::<4>()?;
        let reason_len = u32::from_le_bytes(*reason_len) as usize;
        let reason = String::from_utf8_lossy(rest.get(..reason_len)?).into_owned();
        let status = i32::from_le_bytes(*status);
        let start = HAND_BACK_HEAD as usize + reason_len;
        self.say.warn(format_args!(
            "{reason}; serving the refresher's output, which is not cached"
        ));
        let end = bytes.len();
        Some((status, Body::Memory { bytes, start, end }))
    }
}

/// Hands an unsaved result back to the waiting caller (see [`Flight::handed_back`]):
/// status, the length of the reason (why it was `unsaved`), the reason, the output.
/// Best effort: a caller that stopped waiting has closed its end. A saved result is
/// not handed back: closing the pipe empty tells the caller to read the cache.
fn hand_back_to(mut pipe: fs::File, status: i32, body: Body, unsaved: Option<String>) {
    let Some(reason) = unsaved else {
        return;
    };
    let mut head = Vec::new();
    head.extend_from_slice(&status.to_le_bytes());
    head.extend_from_slice(&(reason.len() as u32).to_le_bytes());
    head.extend_from_slice(reason.as_bytes());
    if io::Write::write_all(&mut pipe, &head).is_ok() {
        let _ = body.print(&mut pipe);
    }
}
